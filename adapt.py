"""Use a meta-learned checkpoint on your own few-shot task, and export it for plain PEFT.

    python main.py --mode adapt --checkpoint CKPT --support support.csv --predict texts.csv
    python main.py --mode export --checkpoint CKPT --output_dir DIR

    import adapt
    classifier = adapt.adapt("checkpoint_iter_100.pt", ["hi there", "bye now", ...],
                             ["greet", "leave", ...])
    classifier.predict(["hello!"])          # ["greet"]
    classifier.save("my_classifier/")       # loads with transformers + peft alone

Adaptation is MELoRA's meta-test adaptation (evaluation.py): the checkpoint's LoRA
factors and head, the head started from the support-set prototypes (Proto-MAML,
`meta_learning.head_init: proto`) or from the meta-learned head, then K =
`meta_learning.inner.default_num_steps` SGD steps on the support set at the checkpoint's
inner rate (its learned per-step rates with `learn_lr`), dropout seeded with
`training.seed`. It runs through the same functions (`trainer.initial_fast_weights`,
`baseline.FewShotMethod.fast_weights`). Any number of classes N >= 2 works, whatever
the training `n_way`: with `head_init: zero` and N != n_way every class starts from the
mean of the meta-learned head's rows (episode labels are permuted in meta-training, so
the rows are interchangeable).

A saved (adapted or exported) directory holds:

    adapter_config.json, adapter_model.safetensors   the LoRA factors, a PEFT adapter
    head.safetensors       the head: weight (N, hidden), bias (N,) (+ scale: cosine head)
    melora_head.json       family, pooling and N of the head
    labels.json            labels (class names in head-row order; null for an export),
                           pooling, max_length, base_model (a hub id, a folder, or
                           base_model: the folder inside), backbone_class, how it
                           was adapted, and the files of the save (the only ones an
                           --overwrite may replace)
    tokenizer files        the tokenizer (pad token and right padding as in training)
    base_model/            only for the random tiny-* models: their backbone weights

`peft.PeftModel.from_pretrained(backbone, directory)` restores the adapter; README.md
("Adapt") shows the few lines that classify a text with it.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch

import baseline as B
import model as M
from config import Config, load_config
from dataset_loader import read_table
from evaluation import evaluation_checkpoint
from trainer import dropout_off, load_theta, val_summary
from utils import (_UMASK, UserError, atomic_write_bytes, atomic_write_json, atomic_write_text,
                   resolve_device, set_seed, world_size)

log = logging.getLogger("melora")

PREDICTIONS_FILE = "predictions.csv"
PREDICTION_METRICS_FILE = "metrics.json"  # accuracy and confusion of labelled texts (not the sink's metrics.jsonl)
CONFUSION_FILE = "confusion_matrix.png"
ADAPTED_DIR = "adapted"
LABELS_FILE = "labels.json"
BASE_MODEL_DIR = "base_model"
PROBABILITY_PREFIX = "probability_"  # + class name: one column per class (adapt.probabilities)
OUTPUT_COLUMNS = ("prediction", "confidence")
# Past this many classes the confusion figure and printout show only the most-confused
# classes: at 1,000 classes the whole figure would need gigabytes (issue 27).
MAX_FIGURE_CLASSES = 30
# What a save wrote before labels.json listed its files (tokenizer* files besides).
_SAVE_NAMES = frozenset({LABELS_FILE, BASE_MODEL_DIR, "adapter_config.json", "adapter_model.safetensors",
                         "head.safetensors", "melora_head.json", "special_tokens_map.json",
                         "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "added_tokens.json",
                         "chat_template.jinja"})


# ------------------------------------------------------------------------------------
# The classifier and the Python API
# ------------------------------------------------------------------------------------

class Classifier:
    """A checkpoint adapted to one task: phi (LoRA + head) on the checkpoint's model.

    Built by `adapt`; predicts the task's class names and saves a PEFT adapter.

    Attributes:
        classes: the class names, in head-row order (as the user wrote them).
        phi: the adapted LoRA factors and head, keyed as in `model.named_parameters()`.
        model, tokenizer: the LoRA-wrapped model and its tokenizer.
        info: how it was adapted (checkpoint, inner steps and rate, support size, ...).
    """

    def __init__(self, model: M.MELoRAModel, tokenizer, phi: Mapping[str, torch.Tensor],
                 classes: Sequence[Hashable], cfg: Config, info: Mapping[str, Any]):
        self.model, self.tokenizer, self.phi = model, tokenizer, dict(phi)
        self.classes, self.cfg, self.info = list(classes), cfg, dict(info)

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str], batch_size: int | None = None,
                      progress: bool = False) -> np.ndarray:
        """Class probabilities (len(texts), N), columns in `classes` order; dropout off.

        Args:
            texts: the texts to classify.
            batch_size: texts per forward pass (default `adapt.batch_size`).
            progress: show a tqdm bar when there is more than one batch.
        """
        from tqdm.auto import tqdm
        if isinstance(texts, str):
            raise UserError("predict takes a list of texts, got one string; wrap it: [text]")
        texts = list(texts)
        _check_texts(texts, "the texts to predict")
        size = batch_size or self.cfg.adapt.batch_size
        starts = range(0, len(texts), size)
        out = []
        with dropout_off(self.model):
            for start in tqdm(starts, desc="predict", unit="batch",
                              disable=not progress or len(starts) < 2):
                batch = _tokenize(self.tokenizer, texts[start:start + size], self.cfg.models.max_length,
                                  next(self.model.parameters()).device)
                logits = M.forward(self.model, self.phi, batch)  # (b, N)
                out.append(torch.softmax(logits.double(), -1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))

    def predict(self, texts: Sequence[str], batch_size: int | None = None) -> list:
        """The predicted class name of every text."""
        return [self.classes[i] for i in self.predict_proba(texts, batch_size).argmax(1)]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the adapted model as a PEFT adapter directory plus the head (module docstring).

        The directory is written whole or not at all; an existing one is replaced only if
        it holds an earlier save (its labels.json and adapter_config.json).

        Returns:
            The directory.
        """
        with torch.no_grad():  # the model's own LoRA/head parameters become phi
            for name, param in M.lora_parameters(self.model).items():
                param.copy_(self.phi[name])
        return save_directory(self.model, self.tokenizer, self.cfg, directory,
                              {"labels": self.classes, **self.info})


def adapt(checkpoint: str | os.PathLike, support_texts: Sequence[str],
          support_labels: Sequence[Hashable], classes: Sequence[Hashable] | None = None,
          overrides: Mapping[str, Any] | Sequence[str] | None = None) -> Classifier:
    """Adapt a MELoRA checkpoint to a labelled support set, as evaluation does.

    Args:
        checkpoint: a `checkpoints/checkpoint_iter_N.pt` of a training run.
        support_texts: the support examples.
        support_labels: their class names (any hashable: str, int, ...), kept as given.
        classes: the head's classes in order (default: order of first appearance);
            every one needs a support example.
        overrides: config keys to change, `{"meta_learning.inner.default_num_steps": 5}`
            or `["training.device=cpu"]`; model-defining keys stay the checkpoint's.

    Returns:
        The adapted `Classifier`.

    Raises:
        UserError: a missing or foreign checkpoint, fewer than 2 classes, a class
            without an example, a text that is not a string, texts and labels of
            different lengths.

    Example:
        >>> clf = adapt("ckpt.pt", ["hi", "hello", "bye", "see you"], ["hi", "hi", "bye", "bye"])
        >>> clf.predict(["hey there"])
        ['hi']
    """
    cfg, state = evaluation_checkpoint(checkpoint, load_config(None, overrides), None, overrides or {})
    classes = check_support(support_texts, support_labels, classes, "the support set")
    method, tokenizer = build_adapter(cfg, state, checkpoint, len(classes))
    return fit(method, tokenizer, cfg, state, checkpoint, list(support_texts),
               list(support_labels), classes)


def build_adapter(cfg: Config, state: Mapping, checkpoint, n_classes: int) -> tuple[B.MELoRA, Any]:
    """MELoRA at meta-test time (as `evaluation.build_method`) with an N-way head.

    Raises:
        UserError: the checkpoint's tensors do not fit its model (another model, LoRA
            setting, or an edited file).
    """
    data = cfg.to_dict()
    data["tasks"]["n_way"] = n_classes
    model, tokenizer = M.build_model(Config(data), resolve_device(cfg.training.device))
    load_theta(model, _theta_for(state["theta"], n_classes), checkpoint)
    memory = cfg.memory_optimization
    method = B.MELoRA(model, _inner_lr(cfg, state, model), cfg.meta_learning.inner.default_num_steps,
                      memory.hessian_approximation.method,
                      memory.gradient_accumulation.default_micro_batch, cfg.meta_learning.head_init)
    return method, tokenizer


def fit(method: B.MELoRA, tokenizer, cfg: Config, state: Mapping, checkpoint,
        texts: list[str], labels: list, classes: list) -> Classifier:
    """K inner steps on the support set from phi_0 (the evaluation's adaptation)."""
    steps = cfg.meta_learning.inner.default_num_steps
    row = {c: i for i, c in enumerate(classes)}
    support = _tokenize(tokenizer, texts, cfg.models.max_length, next(method.model.parameters()).device)
    support["labels"] = torch.tensor([row[y] for y in labels], device=support["input_ids"].device)
    _say_changes(cfg, state, method.inner_lr)
    set_seed(cfg.training.seed)  # dropout masks of the inner steps
    for phi in method.fast_weights(support, steps):
        pass
    rate = method.inner_lr.tolist() if torch.is_tensor(method.inner_lr) else method.inner_lr
    _check_finite(phi, rate, steps)
    info = {"checkpoint": str(checkpoint), "inner_steps": steps, "inner_lr": rate,
            "head_init": cfg.meta_learning.head_init, "support_examples": len(texts)}
    log.info("adapted %s to %d classes from %d support examples (%d steps, inner rate %s)",
             checkpoint, len(classes), len(texts), steps, rate)
    return Classifier(method.model, tokenizer, phi, classes, cfg, info)


def check_support(texts: Sequence, labels: Sequence, classes: Sequence | None,
                  where: str) -> list:
    """The head's classes; refuses an unusable support set (message names the fix)."""
    if len(texts) != len(labels):
        raise UserError(f"{where} has {len(texts)} texts but {len(labels)} labels; they must pair up")
    _check_texts(texts, where)
    empty = [i for i, y in enumerate(labels) if _no_label(y)]
    if empty:
        raise UserError(f"{where}: {len(empty)} example(s) have no label (first: row {empty[0]}); "
                        "give every support example its class")
    seen = list(dict.fromkeys(labels))
    if classes is None:
        classes = seen
    classes = list(classes)
    unknown = [y for y in seen if y not in classes]
    if unknown:
        raise UserError(f"{where} has labels {unknown!r} that are not among the classes "
                        f"{classes!r}; add them to the classes or drop those examples")
    without = [c for c in classes if c not in seen]
    if without:
        raise UserError(f"class(es) {without!r} have no example in {where}; every class needs "
                        "at least one labelled support example (add some, or drop the class)")
    if len(classes) < 2:
        raise UserError(f"{where} has {len(classes)} class ({classes!r}); adaptation needs at "
                        "least 2 classes, each with at least one labelled example")
    return classes


# ------------------------------------------------------------------------------------
# --mode adapt
# ------------------------------------------------------------------------------------

@dataclass
class AdaptJob:
    """Everything `--mode adapt` needs, read and checked before its run folder exists."""

    cfg: Config
    state: dict
    checkpoint: str
    method: B.MELoRA
    tokenizer: Any
    support_texts: list[str]
    support_labels: list[str]
    classes: list[str]
    frame: Any                 # the --predict rows (pandas DataFrame), in file order
    texts: list[str]
    labels: list[str] | None   # None when --predict has no label column


def prepare(cfg: Config, checkpoint: str | None, support: str | None,
            predict: str | None, config_file=None, explicit_overrides: Mapping | None = None) -> AdaptJob:
    """Read and check every input of `--mode adapt`, and build the model (no output yet).

    `config_file` and `explicit_overrides` are the keys the user named (see `evaluation.evaluation_checkpoint`).

    Raises:
        UserError: a missing flag, checkpoint or file; a file without the text or label
            column; no rows; fewer than 2 classes; a --predict label without a support
            example; a checkpoint that does not fit its model.
    """
    for flag, value in (("--checkpoint", checkpoint), ("--support", support), ("--predict", predict)):
        if not value:
            raise UserError(f"--mode adapt needs {flag}; e.g. python main.py --mode adapt "
                            "--checkpoint CKPT --support support.csv --predict texts.csv")
    if world_size() > 1:
        raise UserError("--mode adapt runs in one process; run it with python main.py, not torchrun")
    cfg, state = evaluation_checkpoint(checkpoint, cfg, config_file, explicit_overrides)
    columns = cfg.adapt
    _, s_texts, s_labels = read_table(support, columns.text_column, columns.label_column,
                                      "--support", need_labels=True)
    classes = check_support(s_texts, s_labels, None, f"--support file {support!r}")
    frame, texts, labels = read_table(predict, columns.text_column, columns.label_column,
                                      "--predict", need_labels=False, other_columns=True)
    _check_predict(frame, labels, classes, predict, cfg)
    method, tokenizer = build_adapter(cfg, state, checkpoint, len(classes))
    return AdaptJob(cfg, state, str(checkpoint), method, tokenizer, s_texts, s_labels, classes,
                    frame, texts, labels)


def run_adapt(job: AdaptJob, run_dir: str | os.PathLike) -> dict:
    """Adapt, predict every --predict row, then write predictions, metrics and the model.

    Writes `<run>/predictions.csv`, `<run>/adapted/`, and with labels `<run>/metrics.json`
    and `<run>/confusion_matrix.png`. Returns the metrics (or {} without labels).
    """
    run_dir = Path(run_dir)
    # 1. Adapt and predict (nothing is written until both are done).
    clf = fit(job.method, job.tokenizer, job.cfg, job.state, job.checkpoint,
              job.support_texts, job.support_labels, job.classes)
    proba = clf.predict_proba(job.texts, progress=True)  # (rows, N)
    if not np.isfinite(proba).all():  # finite weights can still overflow in the forward pass
        raise UserError("adaptation diverged: the adapted model's probabilities are not finite; "
                        "nothing was written. Lower meta_learning.inner.default_lr (--set "
                        "meta_learning.inner.default_lr=...) or the inner steps")
    predicted = [job.classes[i] for i in proba.argmax(1)]
    frame = job.frame.copy()
    frame["prediction"], frame["confidence"] = predicted, proba.max(1)
    if job.cfg.adapt.probabilities:
        for j, name in enumerate(job.classes):
            frame[f"{PROBABILITY_PREFIX}{name}"] = proba[:, j]
    metrics = classification_metrics(job.labels, predicted, job.classes) if job.labels else {}
    # 2. Outputs, each file atomic.
    clf.save(run_dir / ADAPTED_DIR)
    atomic_write_text(run_dir / PREDICTIONS_FILE, frame.to_csv(index=False))
    if metrics:
        atomic_write_json(run_dir / PREDICTION_METRICS_FILE, metrics)
        atomic_write_bytes(run_dir / CONFUSION_FILE, confusion_png(metrics))
        print(format_metrics(metrics))
    if val_summary(job.state):  # the checkpoint's meta-val against the frozen encoder (issue 30)
        print(val_summary(job.state))
    print(f"predictions: {run_dir / PREDICTIONS_FILE} ({len(frame)} rows)\n"
          f"adapted model: {run_dir / ADAPTED_DIR} (PEFT adapter + head; README.md, Adapt)")
    return metrics


# ------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------

def classification_metrics(labels: Sequence, predicted: Sequence, classes: Sequence) -> dict:
    """Accuracy, the confusion matrix (rows: true class, columns: predicted) and per-class
    precision/recall over the labelled rows."""
    index = {c: i for i, c in enumerate(classes)}
    pairs = [(index[y], index[p]) for y, p in zip(labels, predicted) if y is not None]
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in pairs:
        matrix[t, p] += 1
    correct = np.diag(matrix)
    recall = correct / np.maximum(matrix.sum(1), 1)
    precision = correct / np.maximum(matrix.sum(0), 1)
    return {"accuracy": float(correct.sum() / max(len(pairs), 1)), "labelled_rows": len(pairs),
            "chance": 1.0 / len(classes), "classes": list(classes),
            "confusion_matrix": matrix.tolist(),
            "per_class": {str(c): {"precision": float(precision[i]), "recall": float(recall[i]),
                                   "support": int(matrix[i].sum())} for i, c in enumerate(classes)}}


def format_metrics(metrics: Mapping) -> str:
    """Accuracy and the confusion matrix as text (past `MAX_FIGURE_CLASSES` classes the
    accuracy only: the matrix is in metrics.json)."""
    classes = [str(c) for c in metrics["classes"]]
    head = (f"accuracy {metrics['accuracy']:.4f} on {metrics['labelled_rows']} labelled rows "
            f"(chance {metrics['chance']:.4f})")
    if len(classes) > MAX_FIGURE_CLASSES:
        return (f"{head}\nconfusion matrix of {len(classes)} classes: {PREDICTION_METRICS_FILE} "
                f"(the {MAX_FIGURE_CLASSES} most-confused classes: {CONFUSION_FILE})")
    width = max(len(c) for c in classes + ["true \\ predicted"])
    lines = [head, "", "true \\ predicted".ljust(width) + "".join(f" {i:>5d}" for i in range(len(classes)))]
    for i, (name, row) in enumerate(zip(classes, metrics["confusion_matrix"])):
        lines.append(f"{name:<{width}}" + "".join(f" {v:>5d}" for v in row) + f"   ({i})")
    return "\n".join(lines)


def most_confused(matrix, k: int) -> list[int]:
    """The k classes (ascending index) with the most errors, as true or predicted class."""
    matrix = np.asarray(matrix)
    errors = matrix.sum(0) + matrix.sum(1) - 2 * np.diag(matrix)  # (N,) off-diagonal mass
    return sorted(np.argsort(-errors, kind="stable")[:k].tolist())


def confusion_png(metrics: Mapping) -> bytes:
    """The confusion matrix as a PNG (counts in the cells, true class on the rows).

    Past `MAX_FIGURE_CLASSES` classes it shows the most-confused ones, so its size and
    memory do not grow with N.
    """
    from matplotlib.figure import Figure
    matrix = np.asarray(metrics["confusion_matrix"])
    names = [str(c) for c in metrics["classes"]]
    title = f"accuracy {metrics['accuracy']:.3f} ({metrics['labelled_rows']} rows)"
    if len(matrix) > MAX_FIGURE_CLASSES:
        keep = most_confused(matrix, MAX_FIGURE_CLASSES)
        matrix, names = matrix[np.ix_(keep, keep)], [names[i] for i in keep]
        title += f"\nthe {len(keep)} most-confused of {len(metrics['classes'])} classes"
    n = len(matrix)
    fig = Figure(figsize=(2 + 0.6 * n, 1.5 + 0.6 * n), layout="constrained")
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------
# --mode export and the saved directory
# ------------------------------------------------------------------------------------

def run_export(cfg: Config, checkpoint: str | None, output_dir: str | None,
               overwrite: bool = False, config_file=None, explicit_overrides: Mapping | None = None) -> Path:
    """Write a checkpoint's meta-learned initialisation (theta) as a PEFT adapter + head.

    `config_file` and `explicit_overrides` are the keys the user named (see `evaluation.evaluation_checkpoint`).

    Raises:
        UserError: no --checkpoint or --output_dir, a missing or foreign checkpoint, or an
            output directory that already holds files (without --overwrite).
    """
    if not checkpoint or not output_dir:
        raise UserError("--mode export needs --checkpoint CKPT and --output_dir DIR")
    out = Path(output_dir)
    if out.exists() and not out.is_dir() or Path(checkpoint).resolve().is_relative_to(out.resolve()):
        check_replaceable(out, "--output_dir", protect=checkpoint)  # refused, with or without --overwrite
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--output_dir {str(out)!r} already exists and is not empty; pass "
                            "--overwrite to replace an earlier export, or another directory")
        check_replaceable(out, "--output_dir", protect=checkpoint)
    cfg, state = evaluation_checkpoint(checkpoint, cfg, config_file, explicit_overrides)
    model, tokenizer = M.build_model(cfg, torch.device("cpu"))
    load_theta(model, state["theta"], checkpoint)
    rate = _inner_lr(cfg, state, model)
    info = {"labels": None, "checkpoint": str(checkpoint),
            "inner_steps": cfg.meta_learning.inner.default_num_steps,
            "inner_lr": rate.tolist() if torch.is_tensor(rate) else rate,
            "head_init": cfg.meta_learning.head_init}
    save_directory(model, tokenizer, cfg, out, info, replace=overwrite)
    print(f"exported the meta-learned initialisation of {checkpoint} to {out} (PEFT adapter + head)")
    return out


def save_directory(model: M.MELoRAModel, tokenizer, cfg: Config, directory: str | os.PathLike,
                   info: Mapping[str, Any], replace: bool = False) -> Path:
    """`model.export_peft_adapter` plus labels.json, the tokenizer (and a tiny base model),
    written into a temporary sibling and renamed into place: whole or not at all.

    An existing directory is replaced only when it holds an earlier save and nothing
    else (`check_replaceable`); `replace` is kept for the callers' symmetry.

    Raises:
        UserError: `directory` is a file, or a folder that holds anything but an earlier save.
    """
    out = Path(directory).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        check_replaceable(out, str(directory))
    out.parent.mkdir(parents=True, exist_ok=True)
    name = cfg.models.selected_model
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; give the usual permissions
    try:
        base = _base_model(name, model, tmp, out)
        M.export_peft_adapter(model, tmp, base_model_name_or_path=base)
        tokenizer.save_pretrained(str(tmp))
        labels = {**info, "pooling": model.pooling, "max_length": cfg.models.max_length,
                  "base_model": base, "family": model.family, "head": model.head_kind,
                  "backbone_class": "T5EncoderModel" if model.family == "t5" else "AutoModel",
                  "model": name}
        # What this save wrote: an --overwrite later replaces a folder holding only these.
        labels["files"] = sorted([f.name for f in tmp.iterdir()] + [LABELS_FILE])
        atomic_write_json(tmp / LABELS_FILE, labels)
        for f in tmp.iterdir():  # safetensors writes 0600; give the usual permissions
            if f.is_file():
                os.chmod(f, 0o666 & ~_UMASK)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_replaceable(out: Path, what: str, protect: str | os.PathLike | None = None) -> None:
    """Refuse to replace `out` unless it is a folder holding an earlier MELoRA save only.

    An earlier save has labels.json and adapter_config.json, and nothing but the entries
    its labels.json lists (`_SAVE_NAMES` for a save older than that list). A file, the
    checkpoint `protect` (or a folder holding it) and anything else are never deleted.

    Raises:
        UserError: naming what was found and the fix.
    """
    if out.is_symlink() or not out.is_dir():
        raise UserError(f"{what} {str(out)!r} is a file; a save is a folder, and MELoRA never "
                        "replaces a file: pass a new or empty directory")
    if protect is not None and Path(protect).resolve().is_relative_to(out.resolve()):
        raise UserError(f"{what} {str(out)!r} is not an earlier MELoRA export: it holds the "
                        f"checkpoint {Path(protect).name}; pass a new or empty directory")
    foreign = _foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(f"{what} {str(out)!r} is not an earlier MELoRA export: it holds other files ({shown}); "
                        "MELoRA replaces only a folder holding its own earlier save and nothing "
                        "else: pass a new or empty directory")


def _foreign_entries(out: Path) -> list[str]:
    """Names in `out` that no earlier save of MELoRA wrote (all of them if it is none)."""
    names = sorted(p.name for p in out.iterdir())
    try:
        labels = json.loads((out / LABELS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return names
    if not isinstance(labels, dict) or not (out / "adapter_config.json").is_file():
        return names
    ours = labels.get("files")
    if isinstance(ours, list):
        return [n for n in names if n not in ours]
    return [n for n in names if n not in _SAVE_NAMES and not n.startswith("tokenizer")]


# ------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------

def _theta_for(theta: Mapping[str, torch.Tensor], n_classes: int) -> dict[str, torch.Tensor]:
    """theta with an N-row head: the checkpoint's when N = n_way, else its mean row N times."""
    out = dict(theta)
    for name in (M.HEAD_WEIGHT, M.HEAD_BIAS):
        t = theta[name]
        if t.shape[0] != n_classes:
            out[name] = t.mean(0, keepdim=True).expand(n_classes, *t.shape[1:]).clone()
    return out


def _inner_lr(cfg: Config, state: Mapping, model: M.MELoRAModel) -> float | torch.Tensor:
    """The checkpoint's learned per-step rates, unless the inner rate was set by the user."""
    saved = json.loads(state["config"])["meta_learning"]["inner"]["default_lr"]
    learned = state.get("inner_lr")
    if learned is not None and cfg.meta_learning.inner.default_lr == saved:
        return learned.to(next(model.parameters()).device)
    return cfg.meta_learning.inner.default_lr


def _say_changes(cfg: Config, state: Mapping, inner_lr) -> None:
    """Warn when --set moved the inner steps or rate away from the checkpoint's."""
    inner = json.loads(state["config"])["meta_learning"]["inner"]
    changed = []
    if cfg.meta_learning.inner.default_num_steps != inner["default_num_steps"]:
        changed.append(f"{cfg.meta_learning.inner.default_num_steps} inner steps (the "
                       f"checkpoint's: {inner['default_num_steps']})")
    if cfg.meta_learning.inner.default_lr != inner["default_lr"]:
        was = "its learned per-step rates" if state.get("inner_lr") is not None else inner["default_lr"]
        changed.append(f"inner rate {inner_lr} (the checkpoint's: {was})")
    if changed:
        warnings.warn(f"adapt: using {' and '.join(changed)}, as the command asked", UserWarning,
                      stacklevel=3)


def _tokenize(tokenizer, texts: Sequence[str], max_length: int, device: torch.device) -> dict:
    """A right-padded batch (input_ids, attention_mask), truncated as in training."""
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    return {"input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device)}


def _check_finite(phi: Mapping[str, torch.Tensor], rate, steps: int) -> None:
    """Refuse adapted weights that are not finite (a diverged inner loop), as training does:
    nothing would be exported or predicted from them."""
    bad = [name for name, t in phi.items() if not torch.isfinite(t).all()]
    if bad:
        raise UserError(f"adaptation diverged: after {steps} inner step(s) at rate {rate} the "
                        f"adapted weights are not finite ({len(bad)} tensor(s), first {bad[0]}); "
                        "nothing was written. Lower meta_learning.inner.default_lr (--set "
                        "meta_learning.inner.default_lr=...) or the inner steps")


def _check_texts(texts: Sequence, where: str) -> None:
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise UserError(f"{where}: {len(bad)} row(s) have no text (first: row {bad[0]}, "
                        f"{texts[bad[0]]!r}); every text must be a string")


def _no_label(y) -> bool:
    return y is None or (isinstance(y, float) and math.isnan(y)) or (isinstance(y, str) and not y.strip())


def _check_predict(frame, labels, classes: list, path, cfg: Config) -> None:
    """--predict's labels must be support classes; its columns must not clash with ours."""
    ours = list(OUTPUT_COLUMNS) + ([f"{PROBABILITY_PREFIX}{c}" for c in classes]
                                   if cfg.adapt.probabilities else [])
    clash = [c for c in ours if c in frame.columns]
    if clash:
        raise UserError(f"--predict file {str(path)!r} already has column(s) {clash}, which "
                        "predictions.csv adds; rename them in the file")
    if labels is not None and all(y is None for y in labels):
        raise UserError(f"--predict file {str(path)!r} has a label column "
                        f"{cfg.adapt.label_column!r} but no row has a label, so there is nothing "
                        "to score; fill in the labels, or drop the column to only predict")
    if labels is not None:
        without = sorted({y for y in labels if y is not None and y not in classes})
        if without:
            raise UserError(f"class(es) {without!r} of --predict file {str(path)!r} have no "
                            "example in --support; add support examples of them, or drop "
                            "those rows from --predict (or its label column)")


def _base_model(name: str, model: M.MELoRAModel, tmp: Path, out: Path) -> str:
    """Where transformers finds the backbone: a hub id or a directory; a random tiny-*
    backbone is saved into the directory itself, named by the relative `base_model`, so
    the directory still loads after it was moved."""
    spec = M._resolve(name)
    if spec.source == "tiny":
        dtype = next(model.parameters()).dtype
        M.load_model(name, 1, dtype=dtype)[0].backbone.save_pretrained(str(tmp / BASE_MODEL_DIR))
        return BASE_MODEL_DIR
    if spec.source == "minilm-package":
        return str(M.minilm_path())
    return str(Path(spec.source).resolve()) if Path(spec.source).is_dir() else spec.source
