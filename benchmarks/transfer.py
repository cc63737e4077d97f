"""Cross-domain transfer (issue 30): does meta-training help on another dataset, or hurt?

    python benchmarks/transfer.py --preset smoke                      # tiny random model, < 30 s
    python benchmarks/transfer.py --preset gpu --device cuda --budget-minutes 3
    python benchmarks/transfer.py --preset cpu --threads 1             # ~3 h on 2 cores (estimated), resumable
    python benchmarks/transfer.py --preset cpu --plan                  # the cells, in order; runs nothing

Protocol (numbers per preset in `PRESETS`):

1. **Data, by role.** Each shipped dataset's classes are split by the standard few-shot
   class split (ProtAugment's `splits/01/labels.{train,valid,test}.txt`): a dataset used
   as a *source* meta-trains on its train + test classes and is *chosen on* (meta-val)
   with its held-out valid classes; a dataset used as a *target* is meta-tested on its
   test classes only. Each dataset is written once to `<work>/data/<name>.json` in
   CLINC150's `{role: [[text, label], ...]}` layout (CLINC150: the source role from its
   `train` split, choose from `val`, target from `test`; HWU64 and Liu54 are one table),
   so no reader beyond the JSON module is needed on the GPU machine.
2. **Pairs.** CLINC150 <-> HWU64 and CLINC150 <-> Liu54. HWU64 and Liu54 label the SAME
   utterances, so a pair between them is refused, and no third dataset unrelated to both
   source and target ships: the choice (meta-val) is made on the source's own held-out
   classes, never on the target (choosing on Liu54 for a CLINC150 -> HWU64 run would
   choose on the target's utterances).
3. **Rows**, per pair x shape x seed, all on the same fixed target episodes (drawn with
   seed 0) and with the same budget: `melora` (exact second order, K inner steps),
   `fomaml_lora` (same, Hessian `none`), `proto_lora` (K = 0 in meta-training), each
   meta-trained from the pretrained encoder for `iterations` meta-iterations; the controls
   without meta-training: `frozen_cosine` (cosine prototypes of the frozen encoder, 0
   steps), `frozen_cosine_finetune` (the same, then `test_steps` SGD steps on LoRA + head)
   and `frozen_euclidean` (ProtoNet: Euclidean prototypes of mean-pooled frozen features).
   Meta-learned rows are scored after `test_steps` adaptation steps.
4. **Why**: every `eval_every` meta-iterations, the target accuracy on `curve_episodes`
   episodes (the curve), the meta-val accuracy, and how far the encoder moved: linear CKA
   (Kornblith et al., 2019) and mean cosine similarity between the frozen and the current
   features of `similarity_texts` target utterances.
5. **Remedies** (on MELoRA, `remedy_pairs`, the first shape): model selection on meta-val
   (the checkpoint with the best meta-val accuracy among the curve points, what
   `training.val_every` keeps as best.pt), a proximal anchor on the LoRA update
   (`meta_learning.anchor`), less capacity (low rank, top layers only), meta-learning only
   the head's temperature and the inner rates (`meta_learning.outer.learn_lora: false`,
   `learn_lr: true`), episodes from several source datasets (only where a second source
   unrelated to the target ships), and the recipe of configs/cross_domain.yml. Each gets
   its accuracy per target, the paired difference and Wilcoxon p against `frozen_cosine`
   and against plain `melora`, and a verdict; one that does not help says so.

Budget (`--budget-minutes`): cells run in priority order (the preset's order: the first two
pairs at the first shape with every row, seed by seed; then the remedies; then the other
shapes and pairs); a cell that would not fit, by the time similar cells took, is skipped,
one that runs out of time is abandoned unsaved, and the JSON says what ran and what did not.
Every finished cell is saved atomically under `--work-dir` and reused when its spec matches;
the JSON, a markdown table and the figure are rewritten after every cell.

transfer.json: {"settings": {"clinc150->hwu64": {"5way1shot": {"rows": {name: {"accuracy_mean",
"ci95_seeds", "p_vs_frozen_cosine", "encoder_similarity", "curve", ...}}}}}, "remedies": [{"name",
"setting", "accuracy": {setting: {...}}, "verdict"}], "cells_done", "cells_not_run", ...}
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):  # the modules, and common.py / accuracy.py beside this file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

from analysis import wilcoxon_p  # noqa: E402  (the project's one paired test: Pratt's Wilcoxon)

RESULTS = REPO / "benchmarks" / "results"
CELL_FORMAT = "melora-transfer-cell/1"
RESULT_FORMAT = "melora-transfer/1"
METHODS = ("melora", "fomaml_lora", "proto_lora")   # meta-trained rows, same budget
CONTROLS = ("frozen_cosine", "frozen_cosine_finetune", "frozen_euclidean")
# Shipped datasets: file, text and label fields, the split holding each role's texts.
DATASETS = {
    "clinc150": {"path": "data/clinc150/data_full.json", "roles": {"source": "train", "choose": "val",
                                                                    "target": "test"}},
    "hwu64": {"path": "data/hwu64/full.jsonl", "text": "sentence", "label": "label"},
    "liu54": {"path": "data/liu54/full.jsonl", "text": "sentence", "label": "label"},
}
# Datasets that share utterances: a transfer within a family is not cross-domain.
FAMILY = {"clinc150": "clinc150", "hwu64": "hwu64-utterances", "liu54": "hwu64-utterances"}
# Role -> the ProtAugment class lists it takes.
ROLE_CLASSES = {"source": ("train", "test"), "choose": ("valid",), "target": ("test",)}
METHOD_KEYS = {
    "melora": {"memory_optimization.hessian_approximation.method": "full"},
    "fomaml_lora": {"memory_optimization.hessian_approximation.method": "none"},
    "proto_lora": {"memory_optimization.hessian_approximation.method": "none",
                   "meta_learning.inner.default_num_steps": 0},
}
# What a meta-trained cell reads of the role files; part of its spec, so cells trained when
# the loader class-split the roles again (about 3/4 of the source classes, 1/4 of the
# meta-val classes, seed-dependent) are recomputed. The frozen rows read only the target.
TRAINED_ROLES = "every class of its role"
RECIPE = REPO / "configs" / "cross_domain.yml"
# Sections of configs/cross_domain.yml that the `recipe` remedy applies (its data and
# iteration count are the protocol's: same data, same budget as every other row).
RECIPE_KEYS = ("lora.", "meta_learning.anchor", "meta_learning.outer.learn_lora",
               "meta_learning.inner.learn_lr", "memory_optimization.hessian_approximation.method",
               "training.val_every")

log = logging.getLogger("melora.transfer")


class OutOfBudget(Exception):
    """The time budget ran out in the middle of a cell (the cell is not saved)."""


# ------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (caches below)
class Preset:
    """One size of the protocol; `cuts` says what it leaves out."""

    name: str
    model: str
    pairs: tuple[tuple[str, str], ...]        # (source, target), in priority order
    shapes: tuple[tuple[int, int], ...]       # (n_way, k_shot); the first is the primary
    q_query: int
    max_length: int
    meta_batch: int
    iterations: int                            # meta-iterations of every meta-trained row
    eval_every: int                            # curve / meta-val / similarity every this many
    test_episodes: int
    curve_episodes: int
    val_episodes: int
    similarity_texts: int
    seeds: tuple[int, ...]
    test_steps: int = 3                        # adaptation steps at meta-test (every row)
    remedy_pairs: tuple[tuple[str, str], ...] = ()
    remedy_seeds: tuple[int, ...] | None = None  # None = seeds
    anchors: tuple[float, ...] = (1.0, 0.1)
    top_layers: tuple[int, ...] = (4, 5)       # the low-capacity remedy's LoRA blocks
    low_rank: int = 2
    rows_per_class: int = 0                    # 0 = every example; >0 caps each class (smoke)
    split_index: int = 1                       # ProtAugment class split splits/0N
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    cuts: tuple[str, ...] = ()


_PRIMARY = (("clinc150", "hwu64"), ("hwu64", "clinc150"))
_ALL_PAIRS = _PRIMARY + (("clinc150", "liu54"), ("liu54", "clinc150"))

PRESETS = {
    "gpu": Preset(
        name="gpu", model="minilm-l6", pairs=_ALL_PAIRS, shapes=((5, 1), (5, 5)), q_query=5,
        max_length=32, meta_batch=4, iterations=40, eval_every=20, test_episodes=60,
        curve_episodes=20, val_episodes=20, similarity_texts=100, seeds=(0, 1, 2),
        remedy_pairs=_PRIMARY,
        overrides={"meta_learning.outer.default_lr": 0.002, "meta_learning.batched_tasks": True,
                   "memory_optimization.checkpointing.enabled": False,
                   "memory_optimization.gradient_accumulation.default_micro_batch": 0},
        cuts=("40 meta-iterations per row (the issue's check), meta-batch 4, outer lr 2e-3, 32 tokens",
              "60 target episodes x 5 queries per class (the issue's check); curve, meta-val (20 episodes each) and "
              "similarity (100 target utterances) at iterations 0, 20, 40",
              "one ProtAugment class split (01) per dataset")),
    "cpu": Preset(
        name="cpu", model="minilm-l6", pairs=_PRIMARY, shapes=((5, 1),), q_query=4,
        max_length=32, meta_batch=4, iterations=30, eval_every=10, test_episodes=60,
        curve_episodes=20, val_episodes=20, similarity_texts=100, seeds=(0, 1, 2),
        remedy_pairs=_PRIMARY, remedy_seeds=(0, 1, 2), anchors=(1.0,),
        overrides={"meta_learning.outer.default_lr": 0.002,
                   "memory_optimization.gradient_accumulation.default_micro_batch": 0},
        cuts=("CLINC150 <-> HWU64 at 5-way 1-shot only (no Liu54, no 5-shot)",
              "30 meta-iterations per row, meta-batch 4, outer lr 2e-3, 4 queries per class, 32 tokens",
              "60 target episodes; curve on 20 of them every 10 iterations",
              "one anchor strength (1.0)",
              "one ProtAugment class split (01) per dataset",
              "time estimated (not measured) from the accuracy study's 7-10 s per MiniLM "
              "meta-iteration with K = 3 on 2 shared cores: about 3 h")),
    "smoke": Preset(
        name="smoke", model="tiny-bert", pairs=_PRIMARY, shapes=((3, 1),), q_query=2,
        max_length=16, meta_batch=2, iterations=2, eval_every=2, test_episodes=4,
        curve_episodes=2, val_episodes=2, similarity_texts=12, seeds=(0, 1), test_steps=1,
        remedy_pairs=(("hwu64", "clinc150"),), remedy_seeds=(0,), anchors=(1.0,), top_layers=(1,),
        low_rank=1, rows_per_class=6,
        overrides={"memory_optimization.checkpointing.enabled": False,
                   "meta_learning.inner.default_num_steps": 1},
        cuts=("a tiny random model on 6 examples per class: the numbers test the pipeline only",)),
}


def shape_key(shape: Sequence[int]) -> str:
    return f"{shape[0]}way{shape[1]}shot"


def pair_key(pair: Sequence[str]) -> str:
    return f"{pair[0]}->{pair[1]}"


def check_pair(pair: Sequence[str]) -> None:
    """Refuse unknown datasets and pairs that share utterances (not cross-domain)."""
    from utils import ConfigError
    for name in pair:
        if name not in DATASETS:
            raise ConfigError(f"unknown dataset {name!r}; the transfer benchmark knows {', '.join(DATASETS)}")
    if FAMILY[pair[0]] == FAMILY[pair[1]]:
        raise ConfigError(f"{pair_key(pair)} is not cross-domain: HWU64 and Liu54 label the same "
                          "utterances; pair either one with clinc150")


# ------------------------------------------------------------------------------------
# Cells: what runs, in priority order
# ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def remedies(preset: Preset) -> dict[str, dict]:
    """name -> {"setting": words, "overrides": config keys, "derived": no training of its own}."""
    out = {"select_meta_val": {"setting": f"theta with the best meta-val accuracy (source's held-out "
                                          f"classes, {preset.val_episodes} episodes) among the curve "
                                          f"points every {preset.eval_every} iterations: what "
                                          "training.val_every keeps as best.pt",
                               "overrides": {}, "derived": True}}
    for a in preset.anchors:
        out[f"anchor_{a:g}"] = {"setting": f"meta_learning.anchor={a:g}: (lambda/2) sum ||scaling B A||^2",
                                "overrides": {"meta_learning.anchor": a}}
    out["low_capacity"] = {"setting": f"LoRA rank {preset.low_rank} (alpha scaled to keep scaling 2) "
                                      f"on blocks {list(preset.top_layers)} only",
                           "overrides": {"lora.default_rank": preset.low_rank,
                                         "lora.alpha": 2.0 * preset.low_rank,
                                         "lora.layers": list(preset.top_layers)}}
    out["head_and_rates"] = {"setting": "meta_learning.outer.learn_lora=false, inner.learn_lr=true: "
                                        "meta-learn only the cosine temperature and per-step inner rates",
                             "overrides": {"meta_learning.outer.learn_lora": False,
                                           "meta_learning.inner.learn_lr": True}}
    out["multi_source"] = {"setting": "meta-train on every shipped dataset unrelated to the target "
                                      "(episodes drawn from each by equal weight)",
                           "overrides": {}, "multi_source": True}
    out["recipe"] = {"setting": f"configs/{RECIPE.name}: " + ", ".join(
        f"{k}={v}" for k, v in recipe_overrides().items()), "overrides": recipe_overrides(),
        "select": recipe_overrides().get("training.val_every", 0) > 0}
    return out


@functools.lru_cache(maxsize=1)
def recipe_overrides() -> dict:
    """The keys of configs/cross_domain.yml that the `recipe` remedy applies."""
    import yaml
    from config import Config
    if not RECIPE.is_file():
        return {}
    flat = Config(yaml.safe_load(RECIPE.read_text()) or {}).flat()
    return {k: v for k, v in flat.items() if any(k.startswith(p) for p in RECIPE_KEYS)}


def sources_for(preset: Preset, pair: Sequence[str], variant: str) -> list[str]:
    """Meta-train datasets of a cell: the pair's source, or (multi_source) every dataset
    of another family than the target's."""
    if variant != "multi_source":
        return [pair[0]]
    return [d for d in DATASETS if FAMILY[d] != FAMILY[pair[1]]]


def plan_cells(preset: Preset) -> list[dict]:
    """Every cell in priority order: {"pair", "shape", "seed", "variant"} (variant: "frozen",
    a method, or a remedy that trains)."""
    cells, first = [], preset.shapes[0]
    rows = ("frozen",) + METHODS
    primary = preset.pairs[:2]
    for seed in preset.seeds:  # 1. the first two pairs, first shape, every row, seed by seed
        cells += [dict(pair=p, shape=first, seed=seed, variant=v) for p in primary for v in rows]
    trained = [n for n, r in remedies(preset).items() if not r.get("derived")]
    for seed in preset.remedy_seeds or preset.seeds:  # 2. the remedies
        cells += [dict(pair=p, shape=first, seed=seed, variant=v) for p in preset.remedy_pairs
                  for v in trained]
    for shape in preset.shapes[1:]:  # 3. other shapes, first pairs; 4. the other pairs
        cells += [dict(pair=p, shape=shape, seed=s, variant=v) for s in preset.seeds for p in primary for v in rows]
    for shape in preset.shapes:
        cells += [dict(pair=p, shape=shape, seed=s, variant=v) for s in preset.seeds
                  for p in preset.pairs[2:] for v in rows]
    return cells


def applicable(preset: Preset, cell: dict) -> str | None:
    """Why a cell cannot run (None: it can)."""
    if cell["variant"] == "multi_source" and sources_for(preset, cell["pair"], "multi_source") == [cell["pair"][0]]:
        return (f"no second source unrelated to {cell['pair'][1]} ships (HWU64 and Liu54 share "
                "utterances), so multi-source equals the single source here")
    return None


def cell_name(cell: dict) -> str:
    return f"{pair_key(cell['pair'])}/{shape_key(cell['shape'])}/{cell['variant']}/seed{cell['seed']}"


# ------------------------------------------------------------------------------------
# Data by role
# ------------------------------------------------------------------------------------

def prepare_data(preset: Preset, work: Path) -> dict[str, str]:
    """Write each dataset as `<work>/data/<name>.json` ({role: [[text, label], ...]}).

    Returns:
        {name: sha256 of the written file} (part of every cell's spec).
    """
    from utils import atomic_write_text
    out = {}
    for name in DATASETS:
        roles = {role: _role_rows(preset, name, role) for role in ROLE_CLASSES}
        text = json.dumps(roles, ensure_ascii=False)
        path = data_path(work, name)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
        out[name] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


def data_path(work: Path, name: str) -> Path:
    return work / "data" / f"{name}.json"


def _role_rows(preset: Preset, name: str, role: str) -> list[list[str]]:
    """[[text, label], ...] of the role's classes (and split), capped per class if asked."""
    spec = DATASETS[name]
    folder = REPO / Path(spec["path"]).parent / "splits" / f"{preset.split_index:02d}"
    classes = set()
    for part in ROLE_CLASSES[role]:
        classes |= {c.strip() for c in (folder / f"labels.{part}.txt").read_text().splitlines() if c.strip()}
    path = REPO / spec["path"]
    if "roles" in spec:  # CLINC150: {split: [[text, label], ...]}
        rows = json.loads(path.read_text(encoding="utf-8"))[spec["roles"][role]]
    else:
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [[r[spec["text"]], r[spec["label"]]] for r in lines]
    kept, count = [], {}
    for text, label in rows:
        if label in classes and (not preset.rows_per_class or count.get(label, 0) < preset.rows_per_class):
            kept.append([text, label])
            count[label] = count.get(label, 0) + 1
    return kept


def _entry(work: Path, name: str, role: str) -> dict:
    return {"source": str(data_path(work, name)), "config": "", "split": role, "text_column": "text",
            "label_column": "label", "group_file": "", "groups": [], "weight": 1.0}


# ------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------

def cell_config(preset: Preset, cell: dict, work: Path, device: str, extra: Sequence[str] = (),
                seed: int | None = None):
    """The validated config of a cell (seed: another training seed, e.g. 0 for the episodes)."""
    return _cell_config(preset, tuple(cell["pair"]), tuple(cell["shape"]), cell["variant"],
                        cell["seed"] if seed is None else seed, work, device, tuple(extra))


@functools.lru_cache(maxsize=256)  # config.yml is parsed once per distinct cell, not per use
def _cell_config(preset: Preset, pair: tuple, shape: tuple, variant: str, seed: int, work: Path,
                 device: str, extra: tuple):
    from config import load_config
    cell = {"pair": pair, "shape": shape, "variant": variant, "seed": seed}
    n_way, k_shot = cell["shape"]
    sources = sources_for(preset, pair, variant)
    keys = {"models.selected_model": preset.model, "models.max_length": preset.max_length,
            "tasks.n_way": n_way, "tasks.k_shot": k_shot, "tasks.q_query": preset.q_query,
            "meta_learning.default_meta_batch_size": preset.meta_batch,
            "meta_learning.num_iterations": preset.iterations, "meta_learning.head": "cosine",
            "meta_learning.head_init": "proto",
            "training.seed": seed, "training.device": device,
            "training.output_dir": str(work / "runs"), "datasets.cache_dir": str(work / "cache"),
            "tracking.mlflow": False, "tracking.tensorboard": False,
            "datasets.meta_train": [_entry(work, s, "source") for s in sources],
            "datasets.meta_val": [_entry(work, pair[0], "choose")],
            "datasets.meta_test": [_entry(work, pair[1], "target")],
            **preset.overrides}
    keys.update(METHOD_KEYS.get(variant, METHOD_KEYS["melora"]))
    keys.update(remedies(preset).get(variant, {}).get("overrides", {}))
    for item in extra:
        key, _, value = item.partition("=")
        import yaml
        keys[key] = yaml.safe_load(value)
    return load_config(overrides=keys)


def cell_spec(preset: Preset, cell: dict, data_hashes: dict, extra: Sequence[str]) -> dict:
    """Everything a cell's result depends on; its file is reused only when this matches."""
    from accuracy import config_defaults_hash
    fields = {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)
              if f.name not in ("name", "pairs", "shapes", "seeds", "remedy_pairs", "remedy_seeds", "cuts")}
    return {"cell": {**cell, "pair": list(cell["pair"]), "shape": list(cell["shape"])},
            "preset": fields, "data": data_hashes, "extra": list(extra),
            "remedy": remedies(preset).get(cell["variant"], {}).get("overrides"),
            "config_defaults": config_defaults_hash(),
            **({} if cell["variant"] == "frozen" else {"roles": TRAINED_ROLES})}


def _hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell_path(work: Path, cell: dict) -> Path:
    return work / "cells" / pair_key(cell["pair"]).replace("->", "_to_") / shape_key(cell["shape"]) / \
        f"{cell['variant']}-seed{cell['seed']}.json"


def load_cell(path: Path, spec: dict) -> dict | None:
    try:
        cell = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = cell.get("format") == CELL_FORMAT and cell.get("spec_hash") == _hash(spec)
    return cell if ok else None


def save_cell(path: Path, spec: dict, result: dict) -> dict:
    from utils import atomic_write_json
    cell = {"format": CELL_FORMAT, "spec_hash": _hash(spec), "spec": spec, **result}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, cell)
    return cell


# ------------------------------------------------------------------------------------
# Evaluation on the target
# ------------------------------------------------------------------------------------

class Target:
    """The fixed episodes of one pair x shape (drawn with seed 0: the same for every seed
    and row) and a probe batch of target utterances for the similarity measures."""

    def __init__(self, preset: Preset, cfg0, tokenizer, device):
        from dataset_loader import DatasetLoader
        loader = DatasetLoader.from_config(cfg0, tokenizer, ("meta_val", "meta_test"))
        self.test = [loader.episode("meta_test", i) for i in range(preset.test_episodes)]
        self.curve = self.test[:preset.curve_episodes]
        self.val = [loader.episode("meta_val", i) for i in range(preset.val_episodes)]
        self.probe, n = [], 0
        for episode in self.test:  # query sets of the first episodes, until similarity_texts
            if n >= preset.similarity_texts:
                break
            self.probe.append(episode.query)
            n += len(episode.query["labels"])
        self.device = device


def adapted(method, episodes: list, steps: int, seed: int) -> np.ndarray:
    """(episodes, steps + 1) query accuracies; dropout seeded per episode (paired)."""
    from utils import episode_seed, set_seed
    rows = []
    for i, episode in enumerate(episodes):
        set_seed(episode_seed(seed, i))
        rows.append(method.adapt(episode, steps))
    return np.asarray(rows, dtype=float)


def features(model, probe: list, device) -> "torch.Tensor":
    """Pooled features (n, hidden) of the probe batches at the model's current theta."""
    import torch

    import model as M
    import trainer as T
    from utils import to_device
    with torch.no_grad(), T.dropout_off(model):
        return torch.cat([M.forward(model, {}, to_device(b, device), features_only=True).double()
                          for b in probe])


def linear_cka(x, y) -> float:
    """Linear CKA (Kornblith et al., 2019): ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), centred."""
    x, y = x - x.mean(0), y - y.mean(0)
    cross = float((y.T @ x).pow(2).sum())
    return cross / float((x.T @ x).norm() * (y.T @ y).norm())


def mean_cosine(x, y) -> float:
    """Mean cosine similarity of paired rows (the same utterance, frozen vs meta-trained)."""
    import torch.nn.functional as F
    return float(F.cosine_similarity(x, y, dim=-1).mean())


# ------------------------------------------------------------------------------------
# Running a cell
# ------------------------------------------------------------------------------------

def run_cell(preset: Preset, cell: dict, work: Path, device: str, extra: Sequence[str],
             deadline: float) -> dict:
    """Train (or not, for the controls) and evaluate one cell; the result to save."""
    if cell["variant"] == "frozen":
        return frozen_cell(preset, cell, work, device, extra)
    return trained_cell(preset, cell, work, device, extra, deadline)


def frozen_cell(preset: Preset, cell: dict, work: Path, device: str, extra: Sequence[str]) -> dict:
    """The controls without meta-training, on the freshly built (LoRA B = 0) model."""
    import baseline as B
    import model as M
    from utils import resolve_device
    cfg = cell_config(preset, {**cell, "variant": "melora"}, work, device, extra)
    dev = resolve_device(device)
    model, tokenizer = M.build_model(cfg, dev)
    target = Target(preset, cell_config(preset, {**cell, "variant": "melora"}, work, device, extra, seed=0),
                    tokenizer, dev)
    meta = cfg.meta_learning
    cosine = adapted(B.MELoRA(model, meta.inner.default_lr, meta.inner.default_num_steps, "none",
                              head_init="proto"), target.test, preset.test_steps, cell["seed"])
    euclid = adapted(B.ProtoNet(model), target.test, 0, cell["seed"])
    return {"rows": {"frozen_cosine": cosine[:, 0].tolist(),
                     "frozen_cosine_finetune": cosine[:, -1].tolist(),
                     "frozen_euclidean": euclid[:, 0].tolist()}}


def trained_cell(preset: Preset, cell: dict, work: Path, device: str, extra: Sequence[str],
                 deadline: float) -> dict:
    """Meta-train one row from the pretrained encoder, with the curve; evaluate the last
    theta (and the best meta-val theta) on the target episodes."""
    import trainer as T
    from utils import resolve_device
    cfg = cell_config(preset, cell, work, device, extra)
    meta = T.MetaTrainer.from_config(cfg)
    cfg0 = cell_config(preset, cell, work, device, extra, seed=0)
    target = Target(preset, cfg0, meta.loader.tokenizer, resolve_device(device))
    frozen = features(meta.model, target.probe, target.device)  # theta at init: B = 0, the frozen encoder
    curve, best = [], None
    started = time.perf_counter()
    for it in range(preset.iterations + 1):
        if it % preset.eval_every == 0 or it == preset.iterations:
            point = first_point(preset, meta, cell, target, frozen) if it == 0 else \
                curve_point(preset, meta, cell, target, frozen, it)
            curve.append(point)
            if best is None or point["val_accuracy"] > best[0]:
                best = (point["val_accuracy"], it, snapshot(meta))
        if it == preset.iterations:
            break
        if time.monotonic() > deadline:
            raise OutOfBudget(cell_name(cell))
        meta.train_step(it)
    seconds = time.perf_counter() - started
    final = adapted(_method(meta), target.test, preset.test_steps, cell["seed"])
    result = {"curve": curve, "step0": final[:, 0].tolist(), "accuracy": final[:, -1].tolist(),
              "similarity": {"cka": curve[-1]["cka"], "cosine": curve[-1]["cosine"]},
              "seconds_training": seconds, "learned_inner_lr": _rates(meta.inner_lr)}
    if cell["variant"] == "melora" or remedies(preset).get(cell["variant"], {}).get("select"):
        chosen = final
        if best[1] != preset.iterations:  # the last theta is already scored
            restore(meta, best[2])
            chosen = adapted(_method(meta), target.test, preset.test_steps, cell["seed"])
        result["selected"] = {"iteration": best[1], "val_accuracy": best[0],
                              "accuracy": chosen[:, -1].tolist()}
    return result


_FIRST_POINTS: dict = {}  # (pair, shape, seed, LoRA settings) -> the iteration-0 point


def first_point(preset: Preset, meta, cell: dict, target: Target, frozen) -> dict:
    """The curve's iteration 0: every row of a pair x shape x seed starts from the same
    initialisation (same seed, same LoRA), so it is computed once per process."""
    lora = {k: v for k, v in remedies(preset).get(cell["variant"], {}).get("overrides", {}).items()
            if k.startswith("lora.") or k.endswith("learn_lr")}
    key = (id(preset), tuple(cell["pair"]), tuple(cell["shape"]), cell["seed"], json.dumps(lora, sort_keys=True))
    if key not in _FIRST_POINTS:
        _FIRST_POINTS[key] = curve_point(preset, meta, cell, target, frozen, 0)
    return dict(_FIRST_POINTS[key])


def curve_point(preset: Preset, meta, cell: dict, target: Target, frozen, it: int) -> dict:
    """Target and meta-val accuracy after `test_steps` steps, and the encoder's movement."""
    method = _method(meta)
    now = features(meta.model, target.probe, target.device)
    return {"iteration": it,
            "target_accuracy": float(adapted(method, target.curve, preset.test_steps, cell["seed"])[:, -1].mean()),
            "val_accuracy": float(adapted(method, target.val, preset.test_steps, cell["seed"])[:, -1].mean()),
            "cka": linear_cka(frozen, now), "cosine": mean_cosine(frozen, now)}


def _method(meta):
    import baseline as B
    return B.MELoRA(meta.model, meta.inner_lr, meta.inner_steps, meta.method, meta.micro_batch,
                    head_init=meta.meta.head_init)


def snapshot(meta) -> dict:
    import torch
    rates = meta.inner_lr.detach().clone() if torch.is_tensor(meta.inner_lr) else None
    return {"theta": {n: p.detach().clone() for n, p in meta.theta.items()}, "inner_lr": rates}


def restore(meta, snap: dict) -> None:
    import torch
    with torch.no_grad():
        for n, p in meta.theta.items():
            p.copy_(snap["theta"][n])
        if snap["inner_lr"] is not None:
            meta.inner_lr.copy_(snap["inner_lr"])


def _rates(inner_lr) -> list[float] | None:
    import torch
    return inner_lr.detach().cpu().reshape(-1).tolist() if torch.is_tensor(inner_lr) else None


# ------------------------------------------------------------------------------------
# Statistics and report
# ------------------------------------------------------------------------------------

def ci95(values: Sequence[float]) -> float | None:
    """Half-width of the 95% t-interval of the mean (None for fewer than 2 values)."""
    if len(values) < 2:
        return None
    from scipy import stats
    return float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values)))


def row_stats(per_seed: dict[int, list[float]], reference: dict[int, list[float]] | None) -> dict:
    """accuracy_mean, ci95_seeds, the per-episode CI, and the paired comparison with
    `reference` (per-episode accuracies averaged over the seeds both have)."""
    seeds = sorted(per_seed)
    means = [float(np.mean(per_seed[s])) for s in seeds]
    episodes = np.mean([per_seed[s] for s in seeds], axis=0)
    out = {"accuracy_mean": float(np.mean(means)), "ci95_seeds": ci95(means), "seeds": seeds,
           "accuracy_per_seed": means,
           "ci95_episodes": float(1.96 * np.std(episodes, ddof=1) / np.sqrt(len(episodes))) if len(episodes) > 1 else None}
    paired = on_common_seeds(per_seed, reference or {})
    if paired:
        mine, ref = paired
        out["diff_vs_frozen_cosine"] = float(np.mean(mine - ref))
        out["p_vs_frozen_cosine"] = wilcoxon_p(mine, ref)
    return out


def on_common_seeds(a: dict[int, Sequence[float]], b: dict[int, Sequence[float]]) -> tuple | None:
    """Two rows' per-episode accuracies, each averaged over the seeds both ran (None when they
    share none), so a row with fewer seeds is never set against the other's mean over more."""
    common = [s for s in a if s in b]
    if not common:
        return None
    return np.mean([a[s] for s in common], axis=0), np.mean([b[s] for s in common], axis=0)


def summarize(preset: Preset, cells: dict[str, dict]) -> dict:
    """settings[pair][shape]["rows"][name] from the finished cells."""
    settings: dict = {}
    for pair in preset.pairs:
        for shape in preset.shapes:
            found = {v: {c["spec"]["cell"]["seed"]: c for k, c in cells.items()
                         if k.startswith(f"{pair_key(pair)}/{shape_key(shape)}/{v}/")}
                     for v in ("frozen",) + METHODS}
            if not any(found.values()):
                continue
            reference = {s: c["rows"]["frozen_cosine"] for s, c in found["frozen"].items()}
            rows = {}
            for name in CONTROLS:
                per_seed = {s: c["rows"][name] for s, c in found["frozen"].items()}
                if per_seed:
                    rows[name] = row_stats(per_seed, reference)
                    # on the curve's episodes (the first curve_episodes), for the figure's lines
                    rows[name]["accuracy_curve_episodes"] = float(np.mean(
                        [np.mean(v[:preset.curve_episodes]) for v in per_seed.values()]))
            for name in METHODS:
                if found[name]:
                    rows[name] = trained_row(found[name], reference)
            settings.setdefault(pair_key(pair), {})[shape_key(shape)] = {"rows": rows}
    return settings


def trained_row(by_seed: dict[int, dict], reference: dict) -> dict:
    """A meta-trained row: stats, step-0 accuracy, similarity and the curve (seed means)."""
    out = row_stats({s: c["accuracy"] for s, c in by_seed.items()}, reference)
    out["accuracy_step0_mean"] = float(np.mean([np.mean(c["step0"]) for c in by_seed.values()]))
    out["encoder_similarity"] = {m: float(np.mean([c["similarity"][m] for c in by_seed.values()]))
                                 for m in ("cka", "cosine")}
    out["curve"] = mean_curve([c["curve"] for c in by_seed.values()])
    out["seconds_training_mean"] = float(np.mean([c["seconds_training"] for c in by_seed.values()]))
    return out


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """Point-wise means over seeds of the curves' numbers, by iteration."""
    keys = ("target_accuracy", "val_accuracy", "cka", "cosine")
    iterations = sorted({p["iteration"] for c in curves for p in c})
    out = []
    for it in iterations:
        points = [p for c in curves for p in c if p["iteration"] == it]
        out.append({"iteration": it, **{k: float(np.mean([p[k] for p in points])) for k in keys},
                    "seeds": len(points)})
    return out


def remedy_table(preset: Preset, cells: dict[str, dict]) -> list[dict]:
    """Per remedy: its setting, and per target setting its accuracy, p against
    frozen_cosine and against plain melora (same seeds), and a verdict."""
    out = []
    shape = shape_key(preset.shapes[0])
    for name, r in remedies(preset).items():
        row = {"name": name, "setting": r["setting"], "accuracy": {}}
        for pair in preset.remedy_pairs:
            prefix = f"{pair_key(pair)}/{shape}/"
            frozen = {c["spec"]["cell"]["seed"]: c["rows"]["frozen_cosine"] for k, c in cells.items()
                      if k.startswith(prefix + "frozen/")}
            plain = {c["spec"]["cell"]["seed"]: c for k, c in cells.items() if k.startswith(prefix + "melora/")}
            if name == "select_meta_val":
                mine = {s: c["selected"]["accuracy"] for s, c in plain.items() if "selected" in c}
            else:
                mine = {c["spec"]["cell"]["seed"]: (c.get("selected") or c)["accuracy"]
                        for k, c in cells.items() if k.startswith(prefix + name + "/")}
            if not mine:
                continue
            stats = row_stats(mine, frozen)
            base = row_stats({s: c["accuracy"] for s, c in plain.items()}, None) if plain else None
            paired = on_common_seeds(mine, {s: c["accuracy"] for s, c in plain.items()})
            if paired:
                a, b = paired
                stats["diff_vs_melora"], stats["p_vs_melora"] = float(np.mean(a - b)), wilcoxon_p(a, b)
            stats["melora_accuracy_mean"] = base["accuracy_mean"] if base else None
            row["accuracy"][f"{pair_key(pair)}/{shape}"] = stats
        row["verdict"] = verdict(row["accuracy"])
        out.append(row)
    return out


def verdict(accuracy: dict) -> str:
    """Helps / does not help, judged against plain melora at p < 0.05 on every target."""
    if not accuracy:
        return "not run"
    helps = [a.get("diff_vs_melora", 0) > 0 and (a.get("p_vs_melora") or 1) < 0.05 for a in accuracy.values()]
    hurts_vs_frozen = [a.get("diff_vs_frozen_cosine", 0) < 0 and (a.get("p_vs_frozen_cosine") or 1) < 0.05
                       for a in accuracy.values()]
    if all(helps):
        head = "helps: above plain melora on every target (p < 0.05)"
    elif any(helps):
        head = "helps on some targets only"
    else:
        head = "does not help: not significantly above plain melora on any target"
    tail = ("; still significantly below frozen_cosine on some target" if any(hurts_vs_frozen)
            else "; not significantly below frozen_cosine on any target")
    return head + tail


def best_remedy(table: list[dict]) -> dict | None:
    """The remedy with the highest mean accuracy over the targets it ran on (every remedy
    must have run on all remedy targets). Chosen on the targets it is reported on: read
    its numbers as optimistic; `leave_one_out` gives the held-out view."""
    complete = [r for r in table if r["accuracy"] and len(r["accuracy"]) == max(len(x["accuracy"]) for x in table)]
    if not complete:
        return None
    score = {r["name"]: float(np.mean([a["accuracy_mean"] for a in r["accuracy"].values()])) for r in complete}
    name = max(score, key=score.get)
    loo = {}
    targets = list(complete[0]["accuracy"])
    if len(targets) > 1:
        for held in targets:  # choose on the other targets, report on the held-out one
            others = {r["name"]: np.mean([a["accuracy_mean"] for t, a in r["accuracy"].items() if t != held])
                      for r in complete if held in r["accuracy"]}
            chosen = max(others, key=others.get)
            row = next(r for r in complete if r["name"] == chosen)["accuracy"][held]
            loo[held] = {"chosen_on_the_other_targets": chosen, "accuracy_mean": row["accuracy_mean"],
                         "diff_vs_frozen_cosine": row.get("diff_vs_frozen_cosine"),
                         "p_vs_frozen_cosine": row.get("p_vs_frozen_cosine")}
    return {"name": name, "mean_accuracy": score[name], "leave_one_out": loo}


def format_tables(result: dict) -> str:
    """Markdown: one table per setting, then the remedies."""
    lines = [f"# Cross-domain transfer ({result['preset']} preset, {result['model']})", "",
             result["choice_note"], "",
             f"Complete: {result['complete']}. Cells done: {len(result['cells_done'])}, not run: "
             f"{len(result['cells_not_run'])}.", ""]
    for pair, shapes in result["settings"].items():
        for shape, s in shapes.items():
            lines += [f"## {pair}, {shape}", "",
                      "| row | accuracy % | 95% CI seeds | seeds | vs frozen_cosine (pp) | p | CKA | cosine |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for name, r in s["rows"].items():
                sim = r.get("encoder_similarity") or {}
                lines.append(
                    f"| {name} | {100 * r['accuracy_mean']:.2f} | {_pm(r['ci95_seeds'])} | {len(r['seeds'])} | "
                    f"{_pp(r.get('diff_vs_frozen_cosine'))} | {_p(r.get('p_vs_frozen_cosine'))} | "
                    f"{_f(sim.get('cka'))} | {_f(sim.get('cosine'))} |")
            lines.append("")
    lines += ["## Remedies (MELoRA)", "", "| remedy | target | accuracy % | melora % | vs melora (pp) | p | "
              "vs frozen_cosine (pp) | p | verdict |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["remedies"]:
        for target, a in r["accuracy"].items():
            lines.append(f"| {r['name']} | {target} | {100 * a['accuracy_mean']:.2f} | "
                         f"{_f(a.get('melora_accuracy_mean'), 100)} | {_pp(a.get('diff_vs_melora'))} | "
                         f"{_p(a.get('p_vs_melora'))} | {_pp(a.get('diff_vs_frozen_cosine'))} | "
                         f"{_p(a.get('p_vs_frozen_cosine'))} | {r['verdict']} |")
        if not r["accuracy"]:
            lines.append(f"| {r['name']} | - | - | - | - | - | - | - | {r['verdict']} |")
    if result.get("best_remedy"):
        lines += ["", f"Best remedy by mean target accuracy: `{result['best_remedy']['name']}` "
                      "(chosen on the targets it is reported on; leave-one-target-out choice in the JSON)."]
    return "\n".join(lines) + "\n"


def _pm(x):
    return "-" if x is None else f"± {100 * x:.2f}"


def _pp(x):
    return "-" if x is None else f"{100 * x:+.2f}"


def _p(x):
    return "-" if x is None else f"{x:.2g}"


def _f(x, scale=1.0):
    return "-" if x is None else f"{scale * x:.3f}" if scale == 1.0 else f"{scale * x:.2f}"


def plot(result: dict, path: Path) -> Path | None:
    """Target accuracy (top) and linear CKA to the frozen encoder (bottom) against
    meta-iteration, per setting; the frozen encoder as horizontal lines."""
    settings = [(p, s, v) for p, shapes in result["settings"].items() for s, v in shapes.items()
                if any("curve" in r for r in v["rows"].values())]
    if not settings:
        return None
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4.2 * len(settings), 6.4), constrained_layout=True)
    axes = fig.subplots(2, len(settings), squeeze=False)
    for j, (pair, shape, s) in enumerate(settings):
        top, bottom = axes[0][j], axes[1][j]
        for name in METHODS:
            curve = s["rows"].get(name, {}).get("curve")
            if curve:
                its = [p["iteration"] for p in curve]
                top.plot(its, [100 * p["target_accuracy"] for p in curve], marker="o", label=name)
                bottom.plot(its, [p["cka"] for p in curve], marker="o", label=name)
        for name, style in (("frozen_cosine", "-"), ("frozen_cosine_finetune", "--")):
            if name in s["rows"]:  # the frozen encoder on the same (curve) episodes
                top.axhline(100 * s["rows"][name]["accuracy_curve_episodes"], color="k", ls=style,
                            lw=1, label=name)
        top.set_title(f"{pair}, {shape}", fontsize=9)
        top.set_ylabel("target accuracy % (curve episodes)")
        bottom.ticklabel_format(axis="y", useOffset=False)
        bottom.set_ylabel("linear CKA, frozen vs meta-trained")
        bottom.set_xlabel("meta-iteration")
        top.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------

CHOICE_NOTE = ("Choice (meta-val) on the source's own held-out classes (ProtAugment split 01 "
               "`valid`), never on the target: HWU64 and Liu54 share utterances, so no shipped "
               "third dataset is unrelated to both ends of a CLINC150 <-> HWU64/Liu54 pair. Target "
               "episodes: the target's `test` classes, the same episodes for every row and seed.")


def run(preset: Preset, work: Path, output: Path, device: str = "auto", budget_minutes: float = 0.0,
        extra: Sequence[str] = (), shard: tuple[int, int] = (0, 1), compute: bool = True) -> dict:
    """Run the cells in priority order within the budget; write the JSON, table and figure
    after every cell. Returns the result dict.

    `shard` (i, n): compute only the cells whose place in the priority order is i mod n (the
    others are reported when already saved under `work`), so n processes share one work folder
    on one machine. `compute` False (`--report`): compute nothing, report every saved cell."""
    from tqdm import tqdm

    from common import hardware, resolve
    for pair in preset.pairs + preset.remedy_pairs:
        check_pair(pair)
    started = time.monotonic()
    deadline = started + budget_minutes * 60 if budget_minutes > 0 else float("inf")
    data = prepare_data(preset, work)
    cells, skipped, seconds = {}, [], {}
    planned = plan_cells(preset)
    for cell in {(c["shape"], c["variant"]): c for c in planned}.values():
        cell_config(preset, cell, work, device, extra)  # validated before any work (a bad --set fails here)
    hw = hardware(resolve(device))
    bar = tqdm(planned, desc="transfer cells", unit="cell", dynamic_ncols=True)
    for index, cell in enumerate(bar):
        name, why = cell_name(cell), applicable(preset, cell)
        if why:
            skipped.append({"cell": name, "reason": why})
            continue
        spec, path = cell_spec(preset, cell, data, extra), cell_path(work, cell)
        found = load_cell(path, spec)
        if found is None and not compute:
            skipped.append({"cell": name, "reason": "not computed yet (a --report run computes none)"})
            continue
        if found is None and index % shard[1] != shard[0]:
            skipped.append({"cell": name, "reason": f"another shard's (--shard {index % shard[1]}/{shard[1]})"})
            continue
        if found is None:
            kind = "frozen" if cell["variant"] == "frozen" else "trained"
            estimate = float(np.median(seconds[kind])) if seconds.get(kind) else 0.0
            if time.monotonic() + estimate > deadline or time.monotonic() > deadline:
                skipped.append({"cell": name, "reason": f"budget ({budget_minutes:g} min) spent"})
                continue
            bar.set_postfix_str(name)
            t0 = time.monotonic()
            try:
                found = save_cell(path, spec, run_cell(preset, cell, work, device, extra, deadline))
            except OutOfBudget:
                skipped.append({"cell": name, "reason": f"budget ({budget_minutes:g} min) ran out during it"})
                continue
            seconds.setdefault(kind, []).append(time.monotonic() - t0)
        cells[name] = found
        report(preset, cells, skipped, planned, output, hw, budget_minutes, started, extra, final=False)
    bar.close()
    result = report(preset, cells, skipped, planned, output, hw, budget_minutes, started, extra, final=True)
    print(format_tables(result))
    print(f"wrote {output}, {output.with_suffix('.md')}" +
          (f", {output.with_name(result['figure'])}" if result.get("figure") else ""))
    return result


def _shard(text: str) -> tuple[int, int]:
    """`I/N` -> (I, N), refused unless 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise SystemExit(f"error: --shard takes I/N with 0 <= I < N (e.g. 1/3), got {text!r}")
    return i, n


def report(preset: Preset, cells: dict, skipped: list, planned: list, output: Path, hw: dict,
           budget_minutes: float, started: float, extra: Sequence[str], final: bool) -> dict:
    """The result dict from the finished cells, written atomically (JSON and markdown);
    the figure at the end."""
    from utils import atomic_write_json, atomic_write_text
    done = set(cells)
    not_run = skipped + [{"cell": cell_name(c), "reason": "not reached yet"} for c in planned
                         if cell_name(c) not in done and cell_name(c) not in {s["cell"] for s in skipped}]
    table = remedy_table(preset, cells)
    model = cell_config(preset, planned[0], Path(output).parent, "cpu", extra).models.selected_model
    result = {"format": RESULT_FORMAT, "preset": preset.name, "model": model,
              "complete": not not_run, "choice_note": CHOICE_NOTE,
              "settings": summarize(preset, cells), "remedies": table, "best_remedy": best_remedy(table),
              "cells_done": sorted(done), "cells_not_run": not_run,
              "budget_minutes": budget_minutes or None, "wall_seconds": time.monotonic() - started,
              "hardware": hw, "extra_overrides": list(extra), "cuts": list(preset.cuts),
              "protocol": {k: v for k, v in dataclasses.asdict(preset).items() if k not in ("cuts", "name")}}
    output.parent.mkdir(parents=True, exist_ok=True)
    if final:
        try:
            figure = plot(result, output.with_suffix(".png"))
            result["figure"] = figure.name if figure else None
        except ImportError as e:  # matplotlib missing: the numbers still stand
            result["figure"] = None
            result["figure_error"] = f"no figure: {e}"
    atomic_write_json(output, result)
    atomic_write_text(output.with_suffix(".md"), format_tables(result))
    return result


def replot(output: Path) -> dict:
    """Redraw the figure and the markdown table of a written transfer.json."""
    from utils import atomic_write_json, atomic_write_text
    result = json.loads(Path(output).read_text())
    figure = plot(result, Path(output).with_suffix(".png"))
    result["figure"] = figure.name if figure else None
    atomic_write_json(output, result)
    atomic_write_text(Path(output).with_suffix(".md"), format_tables(result))
    print(f"wrote {Path(output).with_suffix('.png')}, {Path(output).with_suffix('.md')}")
    return result


def plan_text(preset: Preset) -> str:
    cells = plan_cells(preset)
    lines = [f"preset {preset.name}: {preset.model}, pairs {', '.join(map(pair_key, preset.pairs))}, "
             f"shapes {', '.join(map(shape_key, preset.shapes))}, seeds {list(preset.seeds)}, "
             f"{preset.iterations} meta-iterations per row, {preset.test_episodes} target episodes",
             f"  {len(cells)} cells in priority order:"]
    lines += [f"  {i + 1:4d}. {cell_name(c)}" + (f"  (not run: {applicable(preset, c)})" if applicable(preset, c) else "")
              for i, c in enumerate(cells)]
    lines += [f"  cut: {c}" for c in preset.cuts]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument("--budget-minutes", type=float, default=0.0,
                        help="stop starting cells when this is spent (0 = no limit); the JSON says what ran")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every cell; repeatable")
    parser.add_argument("--work-dir", type=Path, help="cells (default benchmarks/results/transfer_work/<preset>)")
    parser.add_argument("--output", type=Path, help="default benchmarks/results/transfer.json "
                                                    "(transfer_smoke.json for smoke)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--plan", action="store_true", help="print the cells in priority order only")
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="compute only the cells whose place in the priority order is I mod N "
                             "(N processes can share one --work-dir); saved cells are always reported")
    parser.add_argument("--report", action="store_true",
                        help="compute no cell: write the JSON, table and figure from the saved cells")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the figure (and table) from --output's JSON (e.g. after a run was cut off)")
    args = parser.parse_args(argv)
    import torch

    from utils import UserError
    preset = PRESETS[args.preset]
    if args.plan:
        print(plan_text(preset))
        return None
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    output = args.output or RESULTS / ("transfer.json" if preset.name != "smoke" else "transfer_smoke.json")
    if args.replot:
        return replot(output)
    work = args.work_dir or RESULTS / "transfer_work" / preset.name
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return run(preset, work, output, args.device, args.budget_minutes, args.set, _shard(args.shard),
                   compute=not args.report)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
