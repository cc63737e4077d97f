"""Accuracy study: does meta-learning (and MELoRA's exact second order) pay, end to end, resumable.

Two protocols share this entry point and its cell plumbing:

* **The study (issue 29)**, `benchmarks/accuracy_study.py`: HWU64 class split 01, training to a
  meta-val plateau with learning curves, frozen cosine/Euclidean ProtoNet controls, equal
  compute, many ways, a positive control and seed-level intervals:

    python benchmarks/accuracy.py --preset smoke            # tiny random model, synthetic, < 30 s
    python benchmarks/accuracy.py --preset cpu --threads 1  # 3-5 h (estimate), resumable
    python benchmarks/accuracy.py --preset gpu --device cuda --budget-minutes 3
    python benchmarks/accuracy.py --preset cpu --plan       # the cells in priority order

* **The CLINC150 study (issue 18)**, the protocol below, kept to reproduce its committed
  results (`benchmarks/results/accuracy_clinc150.json`; README "The CLINC150 experiment"):

    python benchmarks/accuracy.py --preset clinc150_cpu --threads 1 --output benchmarks/results/accuracy_clinc150.json
    python benchmarks/accuracy.py --preset clinc150_smoke   # tiny random model, synthetic data, < 1 min

Protocol (every preset; the numbers per preset are in `PRESETS`):

1. **Meta-val sweep of MELoRA** (choice on meta-validation only). For every episode shape
   of the preset (N-way K-shot) and every configuration of the grid (inner lr x inner
   steps K x learned per-step rates x Hessian method x head), meta-train a fresh model
   (`trainer.MetaTrainer`) for `sweep_iterations` meta-iterations and score the query
   accuracy after K adaptation steps on `val_episodes` fixed meta-val episodes (the same
   episodes for every configuration of a shape). CLINC150 offline: meta-train on the 7
   training domains, meta-val on `work`, meta-test on `small_talk` + `meta`
   (configs/clinc150_local.yml).
2. **Choice**: MELoRA's recommended configuration is the grid point with the highest
   meta-val accuracy averaged over the shapes (and sweep seeds); a tie goes to the cheaper
   point (fewer inner steps, then the cheaper Hessian method, then fixed rates; `cost_rank`).
   Meta-test plays no part.
3. **Meta-test, every method once**: for every shape and each of `seeds` training seeds,
   MELoRA with the chosen configuration is meta-trained for `test_iterations`, and
   `evaluation.run_evaluation` evaluates it and the baselines (proto_lora, fomaml_lora,
   protonet, finetune, maml; each meta-learned baseline with the same iteration count) on
   `test_episodes` fixed meta-test episodes, the same episodes for every seed and method.
   A comparison method that `baseline.BASELINES` does not (yet) have is listed under
   `missing_methods` in the JSON, never dropped silently.
4. **Report** (benchmarks/results/accuracy.json, accuracy.md, accuracy_regime_map.png):
   per method accuracy mean and sd over seeds, the 95% CI of the per-episode accuracy
   (averaged over seeds), seconds per meta-iteration and peak memory; MELoRA against every
   row, paired over episodes: mean difference and Holm-corrected p (Wilcoxon; t-test too)
   from `analysis.compare_methods`; the **regime map**: the paired meta-val difference
   full - none and full - proto_lora over inner lr x K x shots (learned rates off), per head.

CPU budget (measured 2026-11-30 on 2 shared cores, one thread per process): the cpu preset
took about 2 hours wall clock (sweep 45 min; the 5-way 5-shot regime cells 29 min in a second
process, `--stage regime`; meta-test 76 min for 3 seeds with seed 2 in a second process,
`--seeds 2`). MiniLM-L6, 5-way 1-shot, meta-batch 4: 3 s per meta-iteration with K = 1, 7-10 s
with K = 3 and `full`; 5-way 5-shot 11-14 s (K = 1) and 28-30 s (K = 3, `full`).

Resumable: every finished cell (one sweep configuration x shape x seed; one meta-test
shape x seed) is saved atomically under `--work-dir` and never recomputed; a rerun of the
same command continues where it stopped. A cell file records its full spec and is reused
only when the spec matches (the preset, the cell's keys, `--set`s and a hash of
config.yml's values: editing a default there recomputes the cells). Statistics and figures
are recomputed from the cells.

accuracy.json: {"seeds", "preset", "methods": {name: {"accuracy_mean", "accuracy_sd",
"ci95", "config", ...}}, "comparisons": {name: {"diff", "p_holm", ...}}, "regime_map": [...]}
for the primary shape (the preset's first), and the same per shape under "settings".
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# The rows of the meta-test table: MELoRA against these, by name in baseline.BASELINES.
COMPARISON_METHODS = ("proto_lora", "fomaml_lora", "protonet", "finetune", "maml")
CELL_FORMAT = "melora-accuracy-cell/1"

log = logging.getLogger("melora.accuracy")


# ------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Preset:
    """One size of the study. `grid` is factorial; `cuts` says what a preset left out."""

    name: str
    model: str
    data: str                                 # "clinc150" (offline copy), "synthetic", or a name
                                              # whose sources `overrides` gives (standard.py)
    shapes: tuple[tuple[int, int], ...]       # (n_way, k_shot); the first is the primary
    q_query: int
    max_length: int
    meta_batch: int
    grid: dict[str, tuple]                    # inner_lr, inner_steps, learn_lr, hessian, head
    sweep_iterations: int
    val_episodes: int
    sweep_seeds: tuple[int, ...]
    test_iterations: int
    test_episodes: int
    seeds: tuple[int, ...]
    methods: tuple[str, ...] = COMPARISON_METHODS
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # config keys
    # Shapes swept for the regime map only (no part in the choice, no meta-test), on
    # `regime_grid` (a sub-grid of `grid`; None = `grid`).
    regime_shapes: tuple[tuple[int, int], ...] = ()
    regime_grid: dict[str, tuple] | None = None
    cuts: tuple[str, ...] = ()


FULL_GRID = {"inner_lr": (0.01, 0.1, 0.5), "inner_steps": (1, 3, 5), "learn_lr": (False, True),
             "hessian": ("full", "gauss_newton", "diagonal", "none"),
             "head": ("euclidean", "cosine")}

PRESETS = {
    "clinc150_gpu": Preset(
        name="clinc150_gpu", model="minilm-l6", data="clinc150", shapes=((5, 1), (5, 5), (10, 1)),
        q_query=5, max_length=64, meta_batch=8, grid=FULL_GRID, sweep_iterations=300,
        val_episodes=100, sweep_seeds=(0,), test_iterations=1000, test_episodes=600,
        seeds=(0, 1, 2),
        overrides={"memory_optimization.checkpointing.enabled": False,
                   "memory_optimization.gradient_accumulation.default_micro_batch": 0,
                   "evaluation.child_process": False}),
    "clinc150_cpu": Preset(
        name="clinc150_cpu", model="minilm-l6", data="clinc150", shapes=((5, 1),),
        q_query=4, max_length=32, meta_batch=4,
        grid={"inner_lr": (0.01, 0.1, 0.5), "inner_steps": (1, 3), "learn_lr": (False,),
              "hessian": ("full", "none"), "head": ("euclidean", "cosine")},
        sweep_iterations=10, val_episodes=20, sweep_seeds=(0,), test_iterations=30,
        test_episodes=100, seeds=(0, 1, 2), methods=("proto_lora", "fomaml_lora", "protonet", "finetune"),
        regime_shapes=((5, 5),),
        regime_grid={"inner_lr": (0.1, 0.5), "inner_steps": (1, 3), "learn_lr": (False,),
                     "hessian": ("full", "none"), "head": ("cosine",)},
        overrides={"memory_optimization.gradient_accumulation.default_micro_batch": 0,
                   "evaluation.child_process": False, "evaluation.tuning_trials": 2},
        cuts=("meta-test at 5-way 1-shot only (no 5-way 5-shot, no 10-way 1-shot); 5-way 5-shot "
              "only in the regime map, on inner lr {0.1, 0.5} x K {1, 3} x {full, none}, cosine head",
              "sweep grid: K in {1, 3} (no 5), learned per-step rates off only, Hessian in "
              "{full, none} (no gauss_newton, diagonal): 24 of 144 configurations",
              "10 meta-iterations per sweep configuration, meta-batch 4, 4 queries per class, "
              "20 meta-val episodes, 32 tokens",
              "meta-test: 30 meta-iterations per method and seed, 100 episodes (not 600)",
              "maml (full-weight second order) left out of the meta-test rows",
              "2 meta-val tuning trials per baseline (config.yml: 8), the same for every baseline",
              "evaluation in-process (memory read as RSS increase, not a child's peak)")),
    "clinc150_smoke": Preset(
        name="clinc150_smoke", model="tiny-bert", data="synthetic", shapes=((3, 1), (3, 2)),
        q_query=2, max_length=16, meta_batch=2,
        grid={"inner_lr": (0.5,), "inner_steps": (1, 2), "learn_lr": (False,),
              "hessian": ("full", "none"), "head": ("euclidean", "cosine")},
        sweep_iterations=1, val_episodes=3, sweep_seeds=(0,), test_iterations=1,
        test_episodes=3, seeds=(0, 1, 2),
        overrides={"evaluation.child_process": False, "evaluation.adaptation_steps": 0,
                   "evaluation.tuning_trials": 0,
                   "analysis.bootstrap_samples": 200,
                   "memory_optimization.checkpointing.enabled": False},
        cuts=("a tiny random model on synthetic tasks: the numbers test the pipeline only",)),
}


def grid_configs(preset: Preset, grid: dict | None = None) -> list[dict]:
    """Every point of `grid` (default: the preset's) as {inner_lr, inner_steps, learn_lr,
    hessian, head}."""
    grid = preset.grid if grid is None else grid
    keys = ("inner_lr", "inner_steps", "learn_lr", "hessian", "head")
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def swept_shapes(preset: Preset, stage: str = "all") -> list[tuple[tuple[int, int], dict]]:
    """(shape, grid) of every swept shape: the preset's shapes on its grid, then the
    regime-only shapes on the regime grid (stage "regime": those only)."""
    regime = [(s, preset.regime_grid or preset.grid) for s in preset.regime_shapes]
    return regime if stage == "regime" else [(s, preset.grid) for s in preset.shapes] + regime


def config_key(c: dict) -> str:
    """A readable, unique name of a grid point (file names, JSON keys)."""
    return (f"lr{c['inner_lr']:g}-K{c['inner_steps']}-{'learned' if c['learn_lr'] else 'fixed'}"
            f"-{c['hessian']}-{c['head']}")


def shape_key(shape: Sequence[int]) -> str:
    return f"{shape[0]}way{shape[1]}shot"


# ------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------

def base_overrides(preset: Preset, shape: Sequence[int], seed: int, work: Path,
                   within_group: bool) -> dict:
    """Config keys shared by every cell of one shape and seed."""
    n_way, k_shot = shape
    out = {"models.selected_model": preset.model, "models.max_length": preset.max_length,
           "tasks.n_way": n_way, "tasks.k_shot": k_shot, "tasks.q_query": preset.q_query,
           "tasks.within_group": within_group,
           "meta_learning.default_meta_batch_size": preset.meta_batch,
           "meta_learning.num_iterations": preset.test_iterations,
           "training.seed": seed, "training.output_dir": str(work / "runs"),
           "datasets.cache_dir": str(work / "cache"), "tracking.mlflow": False,
           "tracking.tensorboard": False, "evaluation.num_episodes": preset.test_episodes,
           "evaluation.baseline_meta_iterations": preset.test_iterations,
           "analysis.fidelity_tasks": 0, **preset.overrides}
    if preset.data == "synthetic":
        out["datasets.synthetic_only"] = True
    elif preset.data == "clinc150":
        out.update(clinc150_datasets())
    elif "datasets.meta_train" not in preset.overrides:  # another `data`: the overrides name the sources
        raise ValueError(f"preset data {preset.data!r} needs its sources in the preset's overrides "
                         "(datasets.meta_train, meta_val, meta_test), as benchmarks/standard.py sets them")
    return out


def clinc150_datasets() -> dict:
    """configs/clinc150_local.yml's sources with absolute paths (any working directory)."""
    import yaml
    data = yaml.safe_load((REPO / "configs" / "clinc150_local.yml").read_text())["datasets"]
    out = {}
    for split in ("meta_train", "meta_val", "meta_test"):
        entries = []
        for entry in data[split]:
            entry = dict(entry)
            for key in ("source", "group_file"):
                if entry.get(key) and not Path(entry[key]).is_absolute():
                    entry[key] = str(REPO / entry[key])
            entries.append(entry)
        out[f"datasets.{split}"] = entries
    return out


def melora_overrides(c: dict) -> dict:
    """Config keys of one grid point."""
    return {"meta_learning.inner.default_lr": c["inner_lr"],
            "meta_learning.inner.default_num_steps": c["inner_steps"],
            "meta_learning.inner.learn_lr": c["learn_lr"],
            "memory_optimization.hessian_approximation.method": c["hessian"],
            "meta_learning.head": c["head"], "meta_learning.head_init": "proto"}


def make_config(overrides: dict, extra: Sequence[str] = ()):
    """The validated config: config.yml, then `overrides`, then the user's `--set`s."""
    from config import load_config
    items = dict(overrides)
    for item in extra:
        key, _, value = item.partition("=")
        items[key] = _parse_value(value)
    return load_config(overrides=items)


def _parse_value(text: str):
    import yaml
    return yaml.safe_load(text)


# ------------------------------------------------------------------------------------
# Cells (atomic JSON files, reused when their spec matches)
# ------------------------------------------------------------------------------------

_DATA_FIELDS = ("model", "data", "q_query", "max_length", "meta_batch", "overrides")


def _preset_spec(preset: Preset, *fields: str) -> dict:
    """The preset fields a cell depends on (other fields may change without invalidating it)."""
    return {f: getattr(preset, f) for f in _DATA_FIELDS + fields}


def _cell_spec(kind: str, preset_fields: dict, shape, seed: int, within_group: bool,
               extra: Sequence[str], **what) -> dict:
    """Everything a cell's result depends on (its file is reused only when this matches):
    the preset's fields and the cell's own keys, and config.yml's defaults underneath them
    (any key the preset leaves to config.yml, such as the outer lr or the tuning ranges)."""
    return {"kind": kind, "preset": preset_fields, "shape": list(shape), **what, "seed": seed,
            "within_group": within_group, "extra": list(extra), "config_defaults": config_defaults_hash()}


@functools.lru_cache(maxsize=1)
def config_defaults_hash() -> str:
    """A hash of config.yml's values (its comments and layout may change freely); read
    once per process, so every cell of a run is judged against the same file."""
    import yaml

    from config import DEFAULT_CONFIG
    return _spec_hash(yaml.safe_load(DEFAULT_CONFIG.read_text()))


def _spec_hash(spec: dict) -> str:
    """The spec's hash, with paths inside this checkout written relative to it: a cell made in
    one clone (or a snapshot of it) is found from another at a different path."""
    text = json.dumps(spec, sort_keys=True, default=str)
    text = text.replace(json.dumps(str(REPO) + os.sep)[1:-1], "<repo>/")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_cell(path: Path, spec: dict) -> dict | None:
    """A finished cell with this spec, or None (absent, torn, or from another spec)."""
    try:
        cell = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if cell.get("format") != CELL_FORMAT or cell.get("spec_hash") != _spec_hash(spec):
        return None
    if "episode_spec" in cell:  # written beside the cell: where the cell is now, not where it was made
        cell["episode_spec"] = str(path.parent / Path(cell["episode_spec"]).name)
    return cell


def save_cell(path: Path, spec: dict, result: dict) -> dict:
    from utils import atomic_write_json
    cell = {"format": CELL_FORMAT, "spec_hash": _spec_hash(spec), "spec": spec, **result}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, cell)
    return cell


# ------------------------------------------------------------------------------------
# Meta-val sweep
# ------------------------------------------------------------------------------------

def train_melora(cfg, iterations: int, desc: str):
    """A fresh MetaTrainer meta-trained for `iterations`; (trainer, s/iteration, peak MiB)."""
    from tqdm import tqdm

    import trainer as T
    meta = T.MetaTrainer.from_config(cfg)
    seconds, peak = [], 0.0
    for it in tqdm(range(iterations), desc=desc, unit="it", leave=False, dynamic_ncols=True):
        metrics = meta.train_step(it)
        seconds.append(metrics["seconds"])
        peak = max(peak, float(metrics.get("peak_memory_mb") or 0.0))
    return meta, (float(np.mean(seconds)) if seconds else 0.0), peak


def val_episodes(cfg, tokenizer, num: int) -> list:
    """Meta-val episodes 0..num-1 (fixed: the same for every configuration of a shape)."""
    from dataset_loader import DatasetLoader
    loader = DatasetLoader.from_config(cfg, tokenizer, ("meta_val",))
    return [loader.episode("meta_val", i) for i in range(num)]


def adapted_accuracies(method, episodes: list, steps: int, seed: int) -> list[list[float]]:
    """Per episode, query accuracy after 0..steps adaptation steps (dropout seeded per
    episode, as evaluation.py does, so configurations are paired)."""
    from utils import episode_seed, set_seed
    out = []
    for i, episode in enumerate(episodes):
        set_seed(episode_seed(seed, i))
        out.append(method.adapt(episode, steps))
    return out


def sweep_cell(preset: Preset, shape, c: dict, seed: int, work: Path, within_group: bool,
               extra: Sequence[str]) -> dict:
    """Meta-train one grid point and score it on the meta-val episodes (cached)."""
    spec = _cell_spec("sweep", _preset_spec(preset, "sweep_iterations", "val_episodes"), shape, seed,
                      within_group, extra, config=c)
    path = work / "sweep" / shape_key(shape) / f"{config_key(c)}-seed{seed}.json"
    cell = load_cell(path, spec)
    if cell is not None:
        return cell
    import baseline as B
    cfg = make_config({**base_overrides(preset, shape, seed, work, within_group),
                       **melora_overrides(c)}, extra)
    meta, seconds, peak = train_melora(cfg, preset.sweep_iterations,
                                       f"{shape_key(shape)} {config_key(c)}")
    episodes = val_episodes(cfg, meta.loader.tokenizer, preset.val_episodes)
    method = B.MELoRA(meta.model, meta.inner_lr, c["inner_steps"], meta.method, meta.micro_batch,
                      head_init=cfg.meta_learning.head_init)
    accuracies = [row[-1] for row in adapted_accuracies(method, episodes, c["inner_steps"], seed)]
    return save_cell(path, spec, {"per_episode_accuracy": accuracies,
                                  "accuracy_mean": float(np.mean(accuracies)),
                                  "seconds_per_iteration": seconds, "peak_memory_mb": peak,
                                  "learned_inner_lr": _rates(meta.inner_lr)})


def proto_lora_cell(preset: Preset, shape, head: str, seed: int, work: Path, within_group: bool,
                    extra: Sequence[str]) -> dict:
    """proto_lora (no inner loop in meta-training) on the same meta-val episodes, adapted at
    every inner lr of the grid for 0..max K steps: the regime map's second reference."""
    spec = _cell_spec("proto_lora", _preset_spec(preset, "sweep_iterations", "val_episodes", "grid"),
                      shape, seed, within_group, extra, head=head)
    path = work / "sweep" / shape_key(shape) / f"proto_lora-{head}-seed{seed}.json"
    cell = load_cell(path, spec)
    if cell is not None:
        return cell
    import baseline as B
    from dataset_loader import DatasetLoader
    from utils import resolve_device
    lrs, steps = preset.grid["inner_lr"], max(preset.grid["inner_steps"])
    cfg = make_config({**base_overrides(preset, shape, seed, work, within_group),
                       "meta_learning.head": head, "meta_learning.head_init": "proto",
                       "meta_learning.inner.default_num_steps": steps}, extra)
    method, tokenizer = B.build_baseline("proto_lora", cfg, resolve_device(cfg.training.device))
    loader = DatasetLoader.from_config(cfg, tokenizer, ("meta_train",))  # training.seed = seed
    start = time.perf_counter()
    method.meta_train(loader, preset.sweep_iterations, preset.meta_batch)
    seconds = (time.perf_counter() - start) / max(1, preset.sweep_iterations)
    episodes = val_episodes(cfg, tokenizer, preset.val_episodes)
    by_lr = {}
    for lr in lrs:
        method.inner_lr = lr  # test-time adaptation at the grid's rate (FewShotMethod.rate)
        by_lr[f"{lr:g}"] = adapted_accuracies(method, episodes, steps, seed)  # (episodes, steps+1)
    return save_cell(path, spec, {"per_episode_accuracy_per_step": by_lr,
                                  "seconds_per_iteration": seconds})


def _rates(inner_lr) -> list[float] | None:
    import torch
    return inner_lr.detach().cpu().reshape(-1).tolist() if torch.is_tensor(inner_lr) else None


# ------------------------------------------------------------------------------------
# Meta-test
# ------------------------------------------------------------------------------------

def _test_folder(preset: Preset, shape, best: dict, seed: int, methods: list[str], work: Path,
                 within_group: bool, extra: Sequence[str]) -> tuple[dict, Path]:
    """A meta-test cell's spec and folder."""
    spec = _cell_spec("test", _preset_spec(preset, "test_iterations", "test_episodes"), shape, seed,
                      within_group, extra, config=best, methods=methods)
    return spec, work / "test" / shape_key(shape) / f"seed{seed}-{_spec_hash(spec)}"


def test_cell(preset: Preset, shape, best: dict, seed: int, methods: list[str], work: Path,
              within_group: bool, extra: Sequence[str], spec_source: Path | None) -> dict:
    """Meta-train MELoRA (best config) for one seed; evaluate it and the baselines (cached).

    The MELoRA checkpoint is kept in the cell folder, so a run stopped during evaluation
    does not meta-train again.
    """
    import evaluation
    from runs import load_checkpoint
    from utils import atomic_write_json
    spec, folder = _test_folder(preset, shape, best, seed, methods, work, within_group, extra)
    path = folder / "cell.json"
    cell = load_cell(path, spec)
    if cell is not None:
        return cell
    folder.mkdir(parents=True, exist_ok=True)
    overrides = {**base_overrides(preset, shape, seed, work, within_group), **melora_overrides(best),
                 "evaluation.baselines": methods, "training.experiment_name": folder.name}
    if "seeds" in make_config({}).evaluation:  # seeds are this study's loop: one per evaluation
        overrides["evaluation.seeds"] = 1
    cfg = make_config(overrides, extra)
    checkpoint, timing = folder / "melora.pt", folder / "melora_training.json"
    if not (checkpoint.is_file() and timing.is_file()):
        meta, seconds, peak = train_melora(cfg, preset.test_iterations,
                                           f"meta-test {shape_key(shape)} seed {seed}")
        meta.save_checkpoint(checkpoint)
        atomic_write_json(timing, {"seconds_per_iteration": seconds, "peak_memory_mb": peak,
                                   "learned_inner_lr": _rates(meta.inner_lr)})
        del meta
    load_checkpoint(checkpoint)  # a torn file fails here, naming it
    results_file = folder / evaluation.RESULTS_FILE
    if spec_source is not None and not (folder / evaluation.EPISODE_SPEC).is_file():
        shutil.copyfile(spec_source, folder / evaluation.EPISODE_SPEC)  # same episodes for every seed
    if results_file.is_file():
        results = json.loads(results_file.read_text())
    else:
        results = evaluation.run_evaluation(cfg, checkpoint, not methods, folder)
    return save_cell(path, spec, {"results": results, "training": json.loads(timing.read_text()),
                                  "episode_spec": str(folder / evaluation.EPISODE_SPEC)})


# ------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------

def mean_over(values: list[list[float]]) -> list[float]:
    """Element-wise mean of equally long lists (per-episode accuracy over seeds)."""
    return np.mean(np.asarray(values, dtype=float), axis=0).tolist()


def choose(preset: Preset, sweep: dict) -> tuple[dict, list[dict]]:
    """The grid point with the best meta-val accuracy (mean over shapes and seeds), and
    the ranking of all of them."""
    rows = []
    for c in grid_configs(preset):
        key = config_key(c)
        cells = [sweep[(shape_key(s), key, seed)] for s in preset.shapes for seed in preset.sweep_seeds]
        per_shape = {shape_key(s): float(np.mean([sweep[(shape_key(s), key, seed)]["accuracy_mean"]
                                                 for seed in preset.sweep_seeds]))
                     for s in preset.shapes}
        rows.append({"config": c, "key": key, "val_accuracy": float(np.mean(list(per_shape.values()))),
                     "val_accuracy_per_shape": per_shape,
                     "seconds_per_iteration": float(np.mean([x["seconds_per_iteration"] for x in cells])),
                     "peak_memory_mb": float(max(x["peak_memory_mb"] for x in cells))})
    ranked = sorted(rows, key=lambda r: (-r["val_accuracy"], cost_rank(r["config"])))
    return ranked[0]["config"], ranked


# Ties on meta-val accuracy go to the cheaper configuration (then grid order): fewer inner
# steps, then the cheaper Hessian method, then fixed rates. A measured s/iteration would
# break ties by machine noise; this order is what each choice costs by construction.
HESSIAN_COST = ("none", "diagonal", "block_diagonal", "gauss_newton", "full")


def cost_rank(c: dict) -> tuple:
    """Sort key of a grid point by cost (smaller = cheaper)."""
    return (c["inner_steps"], HESSIAN_COST.index(c["hessian"]), bool(c["learn_lr"]))


def regime_map(preset: Preset, sweep: dict, proto: dict) -> list[dict]:
    """Paired meta-val differences full - none and full - proto_lora per (head, lr, K, shape),
    learned rates off, per-episode accuracies averaged over the sweep seeds."""
    import analysis
    out = []
    cells = [(head, lr, k, shape) for shape, grid in swept_shapes(preset)
             if {"full", "none"} <= set(grid["hessian"]) and False in grid["learn_lr"]
             for head, lr, k in itertools.product(grid["head"], grid["inner_lr"], grid["inner_steps"])]
    order = [s for s, _ in swept_shapes(preset)]  # head, lr, K, then shape vary slowest to fastest
    for head, lr, k, shape in sorted(cells, key=lambda x: (preset.grid["head"].index(x[0]), x[1], x[2],
                                                           order.index(x[3]))):
        acc = {}
        for hessian in ("full", "none"):
            key = config_key({"inner_lr": lr, "inner_steps": k, "learn_lr": False,
                              "hessian": hessian, "head": head})
            acc[hessian] = mean_over([sweep[(shape_key(shape), key, s)]["per_episode_accuracy"]
                                      for s in preset.sweep_seeds])
        row = {"head": head, "inner_lr": lr, "inner_steps": k, "n_way": shape[0], "k_shot": shape[1],
               "full": float(np.mean(acc["full"])), "none": float(np.mean(acc["none"])),
               "full_minus_none": float(np.mean(acc["full"]) - np.mean(acc["none"])),
               "p_full_vs_none": analysis.wilcoxon_p(acc["full"], acc["none"]),
               "proto_lora": None, "full_minus_proto_lora": None, "p_full_vs_proto_lora": None}
        cells = [proto.get((shape_key(shape), head, s)) for s in preset.sweep_seeds]
        if all(cells):
            p = mean_over([[row_[k] for row_ in c["per_episode_accuracy_per_step"][f"{lr:g}"]]
                           for c in cells])
            row.update(proto_lora=float(np.mean(p)),
                       full_minus_proto_lora=float(np.mean(acc["full"]) - np.mean(p)),
                       p_full_vs_proto_lora=analysis.wilcoxon_p(acc["full"], p))
        out.append(row)
    return out


def summarize_shape(preset: Preset, shape, cells: list[dict], best: dict, confidence: float,
                    resamples: int) -> dict:
    """Per method mean/sd over seeds, pooled CI, timing and memory; MELoRA vs every row."""
    import analysis
    from evaluation import ACCURACY_BOUNDS
    first = cells[0]["results"]["methods"]
    names = list(first)
    methods, pooled = {}, {}
    for name in names:
        entries = [c["results"]["methods"][name] for c in cells]
        seed_acc = [float(e["accuracy_mean"]) for e in entries]
        per_episode = mean_over([e["per_episode_accuracy"] for e in entries])
        pooled[name] = {"per_episode_accuracy": per_episode}
        mean, lo, hi = analysis.mean_ci(per_episode, confidence, ACCURACY_BOUNDS)
        if name == "melora":
            config = {**best, "meta_train_iterations": preset.test_iterations}
            seconds = float(np.mean([c["training"]["seconds_per_iteration"] for c in cells]))
        else:
            config = {k: entries[0][k] for k in ("inner_lr", "outer_lr", "head_init",
                                                 "meta_train_iterations") if k in entries[0]}
            iters = [e.get("meta_train_iterations") or 0 for e in entries]
            seconds = (float(np.mean([e["meta_train_seconds"] / i for e, i in zip(entries, iters)]))
                       if all(iters) and all("meta_train_seconds" in e for e in entries) else None)
        methods[name] = {"accuracy_mean": float(np.mean(seed_acc)),
                         "accuracy_sd": float(np.std(seed_acc, ddof=1)) if len(seed_acc) > 1 else 0.0,
                         "ci95": [lo, hi], "seed_accuracies": seed_acc,
                         "seconds_per_meta_iteration": seconds,
                         "peak_memory_mb": max(float(e.get("peak_memory_mb") or 0.0) for e in entries),
                         "meta_step_peak_memory_mb": _max_or_none(e.get("meta_step_peak_memory_mb")
                                                                  for e in entries),
                         "config": config}
    comparisons = {}
    if len(names) > 1:
        rows = analysis.compare_methods({"methods": pooled}, reference="melora",
                                        confidence=confidence, n_resamples=resamples)
        for row in rows:
            comparisons[row["method"]] = {
                "diff": row["mean_diff"], "p_holm": row.get("wilcoxon_p_holm"),
                "p_holm_ttest": row.get("t_p_holm"), "ci95_diff": [row["ci_low"], row["ci_high"]],
                "n_episodes": row["n_episodes"]}
    return {"n_way": shape[0], "k_shot": shape[1], "episodes": len(pooled["melora"]["per_episode_accuracy"]),
            "methods": methods, "comparisons": comparisons}


def _max_or_none(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return max(values) if values else None


# ------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------

def format_tables(result: dict) -> str:
    lines = [f"# Accuracy study ({result['preset']} preset)", ""]
    if result["cuts"]:
        lines += ["Cut from the full protocol: " + "; ".join(result["cuts"]) + ".", ""]
    if result["missing_methods"]:
        lines += [f"Missing methods (not in baseline.BASELINES yet): {', '.join(result['missing_methods'])}.", ""]
    best = result["recommended_config"]
    lines += [f"MELoRA's configuration, chosen on meta-val: `{config_key(best)}`.", ""]
    for key, s in result["settings"].items():
        lines += [f"## {s['n_way']}-way {s['k_shot']}-shot meta-test ({s['episodes']} episodes, "
                  f"seeds {result['seeds']})", "",
                  "| Method | Accuracy (%, mean ± sd over seeds) | 95% CI (%) | s / meta-iteration "
                  "| Peak memory (MiB) | Method - MELoRA (pp) | Holm p (Wilcoxon) |",
                  "|---|---|---|---|---|---|---|"]
        for name, m in s["methods"].items():
            comp = s["comparisons"].get(name)
            diff = "-" if comp is None else f"{-100 * comp['diff']:+.2f}"
            p = "-" if comp is None or comp["p_holm"] is None else f"{comp['p_holm']:.4f}"
            sec = "-" if m["seconds_per_meta_iteration"] is None else f"{m['seconds_per_meta_iteration']:.3f}"
            lines.append(f"| {name} | {100 * m['accuracy_mean']:.2f} ± {100 * m['accuracy_sd']:.2f} | "
                         f"[{100 * m['ci95'][0]:.2f}, {100 * m['ci95'][1]:.2f}] | {sec} | "
                         f"{m['peak_memory_mb']:.1f} | {diff} | {p} |")
        lines.append("")
    lines += ["## Regime map (meta-val, paired differences in pp; learned rates off)", "",
              "| Head | Shape | Inner lr | K | full (%) | full - none | p | full - proto_lora | p |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["regime_map"]:
        fp = "-" if r["full_minus_proto_lora"] is None else f"{100 * r['full_minus_proto_lora']:+.2f}"
        pp = "-" if r["p_full_vs_proto_lora"] is None else f"{r['p_full_vs_proto_lora']:.3f}"
        pn = "-" if r["p_full_vs_none"] is None else f"{r['p_full_vs_none']:.3f}"
        lines.append(f"| {r['head']} | {r['n_way']}w{r['k_shot']}s | {r['inner_lr']:g} | {r['inner_steps']} | "
                     f"{100 * r['full']:.2f} | {100 * r['full_minus_none']:+.2f} | {pn} | {fp} | {pp} |")
    lines += ["", "## Meta-val ranking (top 10 of the sweep)", "",
              "| Configuration | Meta-val accuracy (%) | s / meta-iteration |", "|---|---|---|"]
    for r in result["sweep"][:10]:
        lines.append(f"| {r['key']} | {100 * r['val_accuracy']:.2f} | {r['seconds_per_iteration']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_regime_map(rows: list[dict], head: str, path: Path) -> Path | None:
    """Heatmaps of full - none and full - proto_lora over inner lr x K, one column per shape."""
    rows = [r for r in rows if r["head"] == head]
    if not rows:
        return None
    from matplotlib.figure import Figure
    shapes = sorted({(r["n_way"], r["k_shot"]) for r in rows})
    lrs = sorted({r["inner_lr"] for r in rows})
    ks = sorted({r["inner_steps"] for r in rows})
    diffs = [("full_minus_none", "full - none"), ("full_minus_proto_lora", "full - proto_lora")]
    values = [100 * r[d] for r in rows for d, _ in diffs if r[d] is not None]
    bound = max([abs(v) for v in values] + [1.0])  # at least +-1 pp, so zeros stay white
    fig = Figure(figsize=(3.2 * len(shapes) + 1, 5.6), constrained_layout=True)
    axes = fig.subplots(2, len(shapes), squeeze=False)
    image = None
    for i, (diff, title) in enumerate(diffs):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            grid = np.full((len(lrs), len(ks)), np.nan)
            for r in rows:
                if (r["n_way"], r["k_shot"]) == shape and r[diff] is not None:
                    grid[lrs.index(r["inner_lr"]), ks.index(r["inner_steps"])] = 100 * r[diff]
            image = ax.imshow(grid, cmap="RdBu", vmin=-bound, vmax=bound, origin="lower", aspect="auto")
            for (a, b), v in np.ndenumerate(grid):
                ax.text(b, a, "n/a" if np.isnan(v) else f"{v:+.1f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(ks)), [str(k) for k in ks])
            ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
            ax.set_xlabel("inner steps K")
            ax.set_ylabel("inner lr")
            ax.set_title(f"{title}, {shape[0]}-way {shape[1]}-shot", fontsize=9)
    fig.colorbar(image, ax=axes, label=f"meta-val accuracy difference (pp), {head} head")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# ------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------

def plan(preset: Preset, methods: list[str], missing: list[str]) -> str:
    configs = len(grid_configs(preset))
    sweep = configs * len(preset.shapes) * len(preset.sweep_seeds)
    proto = (len(preset.grid["head"]) * len(preset.shapes) * len(preset.sweep_seeds)
             if "proto_lora" in methods else 0)
    tests = len(preset.shapes) * len(preset.seeds)
    meta_learned = [m for m in methods if m not in ("protonet", "finetune")]
    iterations = (sweep + proto) * preset.sweep_iterations + tests * (1 + len(meta_learned)) * preset.test_iterations
    lines = [f"preset {preset.name}: {preset.model} on {preset.data}, shapes "
             f"{', '.join(f'{n}-way {k}-shot' for n, k in preset.shapes)}, {preset.q_query} queries",
             f"  sweep: {configs} configurations x {len(preset.shapes)} shapes x "
             f"{len(preset.sweep_seeds)} seed(s) = {sweep} cells of {preset.sweep_iterations} "
             f"meta-iterations, {preset.val_episodes} meta-val episodes each; proto_lora "
             f"references: {proto} cells",
             f"  meta-test: {tests} cells (shape x seed), each MELoRA {preset.test_iterations} "
             f"meta-iterations + {', '.join(methods) or 'no baselines'} on {preset.test_episodes} episodes",
             f"  meta-iterations in all (about): {iterations}"]
    if preset.regime_shapes:
        regime = len(grid_configs(preset, preset.regime_grid)) * len(preset.regime_shapes)
        lines.append(f"  regime map only (no choice, no meta-test): "
                     f"{', '.join(f'{n}-way {k}-shot' for n, k in preset.regime_shapes)}, "
                     f"{regime} cells of {preset.sweep_iterations} meta-iterations")
    if missing:
        lines.append(f"  missing methods (reported in the JSON): {', '.join(missing)}")
    for cut in preset.cuts:
        lines.append(f"  cut: {cut}")
    return "\n".join(lines)


def run(preset: Preset, work: Path, output: Path, within_group: bool = False,
        extra: Sequence[str] = (), only_methods: Sequence[str] | None = None,
        stage: str = "all", seeds: Sequence[int] | None = None) -> dict | None:
    """The whole study; returns (and writes) the accuracy.json dict. `stage="regime"`
    computes the regime-only shapes' cells and returns None (a second process may run it
    beside the main one: cells are separate files); `seeds` computes those meta-test
    seeds only and returns None (the first seed's episode file must exist: every seed
    evaluates on the same episodes)."""
    import baseline as B
    from utils import ConfigError, atomic_write_json, atomic_write_text

    wanted = list(only_methods) if only_methods is not None else list(preset.methods)
    unknown = [m for m in wanted if m not in COMPARISON_METHODS]
    if unknown:
        raise ConfigError(f"--methods names {unknown}; the study compares MELoRA with "
                          f"{', '.join(COMPARISON_METHODS)}")
    methods = [m for m in wanted if m in B.BASELINES]
    missing = [m for m in COMPARISON_METHODS if m not in B.BASELINES]
    if within_group and preset.data == "synthetic":
        raise ConfigError("--within-group needs grouped real data (the gpu or cpu preset); "
                          "synthetic tasks have no groups")
    # Every configuration is validated before any work (a bad --set fails here).
    for shape, grid in swept_shapes(preset):
        for c in grid_configs(preset, grid):
            make_config({**base_overrides(preset, shape, 0, work, within_group), **melora_overrides(c)}, extra)
    print(plan(preset, methods, missing), flush=True)
    work.mkdir(parents=True, exist_ok=True)

    # 1. Meta-val sweep (and the proto_lora references of the regime map).
    sweep, proto = {}, {}
    jobs = [(shape, c, seed) for shape, grid in swept_shapes(preset, stage)
            for c in grid_configs(preset, grid) for seed in preset.sweep_seeds]
    from tqdm import tqdm
    for shape, c, seed in tqdm(jobs, desc="meta-val sweep", unit="cell", dynamic_ncols=True):
        sweep[(shape_key(shape), config_key(c), seed)] = sweep_cell(preset, shape, c, seed, work,
                                                                   within_group, extra)
    if "proto_lora" in methods:
        for shape, head, seed in [(s, h, seed) for s, grid in swept_shapes(preset, stage)
                                  for h in grid["head"] for seed in preset.sweep_seeds]:
            proto[(shape_key(shape), head, seed)] = proto_lora_cell(preset, shape, head, seed, work,
                                                                    within_group, extra)
    if stage == "regime":
        print(f"regime-only cells done under {work / 'sweep'}; the main run reports them", flush=True)
        return None
    # 2. The choice, on meta-val only.
    best, ranking = choose(preset, sweep)
    log.info("recommended configuration (meta-val): %s", config_key(best))
    # 3. Meta-test: every method once per shape and seed, on the same episodes.
    settings = {}
    stats_cfg = make_config(base_overrides(preset, preset.shapes[0], 0, work, within_group), extra).analysis
    import evaluation
    for shape in preset.shapes:
        cells = []
        # every seed evaluates on the first seed's episodes (its spec file, once written)
        first = _test_folder(preset, shape, best, preset.seeds[0], methods, work, within_group, extra)[1]
        spec_source = first / evaluation.EPISODE_SPEC
        for seed in tqdm([s for s in preset.seeds if seeds is None or s in seeds],
                         desc=f"meta-test {shape_key(shape)}", unit="seed", dynamic_ncols=True):
            if seed != preset.seeds[0] and not spec_source.is_file():
                raise ConfigError(f"seed {seed} needs the episodes of seed {preset.seeds[0]}: run "
                                  f"that seed first (--seeds {preset.seeds[0]})")
            cells.append(test_cell(preset, shape, best, seed, methods, work, within_group, extra,
                                   spec_source if seed != preset.seeds[0] else None))
        if seeds is not None:
            continue
        settings[shape_key(shape)] = summarize_shape(preset, shape, cells, best, stats_cfg.confidence,
                                                     stats_cfg.bootstrap_samples)
    if seeds is not None:
        print(f"meta-test cells of seed(s) {seeds} done under {work / 'test'}; the run without "
              "--seeds reports them", flush=True)
        return None
    # 4. Report.
    primary = settings[shape_key(preset.shapes[0])]
    rmap = regime_map(preset, sweep, proto)
    result = {"seeds": list(preset.seeds), "preset": preset.name, "model": preset.model,
              "data": preset.data, "within_group": within_group, "primary_setting": shape_key(preset.shapes[0]),
              "methods": primary["methods"], "comparisons": primary["comparisons"],
              "regime_map": rmap, "settings": settings, "recommended_config": best,
              "missing_methods": missing, "cuts": list(preset.cuts),
              "protocol": {k: v for k, v in dataclasses.asdict(preset).items() if k not in ("cuts", "name")},
              "extra_overrides": list(extra), "sweep": ranking}
    if missing:
        result["missing_note"] = ("not in baseline.BASELINES at the time of the run: no rows, no "
                                  "comparisons" + (", regime map full - proto_lora is null"
                                                   if "proto_lora" in missing else ""))
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output, result)
    table = format_tables(result)
    atomic_write_text(output.with_suffix(".md"), table)
    figures = [plot_regime_map(rmap, head, output.with_name(f"{output.stem}_regime_map_{head}.png"))
               for head in preset.grid["head"]]
    result["figures"] = [f.name for f in figures if f is not None]  # beside the JSON
    atomic_write_json(output, result)
    print(table)
    print(f"wrote {output}, {output.with_suffix('.md')}" +
          "".join(f", {output.with_name(f)}" for f in result["figures"]))
    return result


def frozen_controls(preset: Preset, work: Path, output: Path, extra: Sequence[str] = ()) -> dict:
    """Frozen-encoder ProtoNet with Euclidean and with cosine prototypes on the primary
    shape's meta-test episodes (seed 0's, as every method of the meta-test saw them): what
    the distance alone gives, without any training (issue 29's audit). Writes `output`."""
    import torch

    import accuracy_study as S
    import baseline as B
    from dataset_loader import DatasetLoader
    from utils import atomic_write_json, resolve_device
    cfg = make_config(base_overrides(preset, preset.shapes[0], preset.seeds[0], work, False), extra)
    model, tokenizer = B.full_model(cfg, resolve_device(cfg.training.device))
    loader = DatasetLoader.from_config(cfg, tokenizer, ("meta_test",))
    episodes = [loader.episode("meta_test", i) for i in range(preset.test_episodes)]
    result = {"preset": preset.name, "shape": shape_key(preset.shapes[0]), "episodes": len(episodes)}
    with torch.no_grad():
        for name, method in (("protonet", B.ProtoNet(model)), ("protonet_cosine", S.CosineProtoNet(model))):
            accuracies = [method.adapt(ep, 0)[0] for ep in episodes]
            result[name] = {"accuracy_mean": float(np.mean(accuracies)), "per_episode_accuracy": accuracies}
            print(f"{name}: {100 * result[name]['accuracy_mean']:.2f}% on {len(episodes)} episodes")
    atomic_write_json(output, result)
    print(f"wrote {output}")
    return result


def main(argv: Sequence[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    import accuracy_study as S
    parser.add_argument("--preset", choices=sorted(PRESETS) + sorted(S.PRESETS), required=True,
                        help="smoke, cpu, gpu: the study of issue 29; clinc150_*: the CLINC150 study")
    parser.add_argument("--device", default="auto", help="study presets: auto, cpu, cuda, cuda:N")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="study presets: stop starting (and cut) cells after M minutes, in priority "
                             "order; the JSON lists what did not run. A rerun continues")
    parser.add_argument("--within-group", action="store_true",
                        help="fine-grained episodes: each episode's classes from one domain (tasks.within_group)")
    parser.add_argument("--methods", help="comma-separated subset of " + ",".join(COMPARISON_METHODS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every cell (e.g. training.device=cuda); repeatable")
    parser.add_argument("--work-dir", type=Path, help="cell files (default benchmarks/results/accuracy_work/<preset>)")
    parser.add_argument("--output", type=Path, help="default benchmarks/results/accuracy.json "
                                                    "(accuracy_<preset>.json for smoke)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--plan", action="store_true", help="print the cells and the budget only")
    parser.add_argument("--phases", default=",".join(S.PHASES),
                        help="study presets: comma-separated phases to compute (" + ",".join(S.PHASES)
                             + "); the others report the cells already saved in --work-dir, so "
                             "processes with different phases can share one; '' = report only")
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="study presets: compute only this process's share of the cells (a stable "
                             "hash of each cell mod N), so N processes can share one --work-dir")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",") if x.strip()],
                        help="meta-test only these training seeds and stop (e.g. 2: a second process "
                             "beside the main run, once the first seed's episodes exist)")
    parser.add_argument("--frozen-controls", action="store_true",
                        help="clinc150_* presets: frozen ProtoNet, Euclidean and cosine, on the meta-test "
                             "episodes only (writes <output stem>_frozen.json)")
    parser.add_argument("--stage", choices=["all", "regime"], default="all",
                        help="regime: only the regime-map-only shapes' cells (may run beside the main run)")
    args = parser.parse_args(argv)
    import torch

    import baseline as B
    from utils import UserError
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.preset in S.PRESETS:
        return _study_main(S, args)
    preset = PRESETS[args.preset]
    suffix = "" if preset.name != "clinc150_smoke" else "_smoke"
    output = args.output or RESULTS / f"accuracy_clinc150{suffix}.json"
    work = args.work_dir or RESULTS / "accuracy_work" / preset.name
    only = [m for m in args.methods.split(",") if m] if args.methods is not None else None
    try:
        if args.frozen_controls:
            return frozen_controls(preset, work, output.with_name(f"{output.stem}_frozen.json"), args.set)
        if args.plan:
            wanted = only if only is not None else list(preset.methods)
            print(plan(preset, [m for m in wanted if m in B.BASELINES],
                       [m for m in COMPARISON_METHODS if m not in B.BASELINES]))
            return None
        return run(preset, work, output, args.within_group, args.set, only, args.stage, args.seeds)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def _study_main(S, args) -> dict | None:
    """The study presets (accuracy_study.py): --plan, or the run."""
    from utils import UserError
    preset = S.PRESETS[args.preset]
    unused = [f for f, v in (("--methods", args.methods), ("--seeds", args.seeds),
                             ("--within-group", args.within_group or None),
                             ("--frozen-controls", args.frozen_controls or None),
                             ("--stage", None if args.stage == "all" else args.stage)) if v is not None]
    if unused:
        print(f"error: {', '.join(unused)} belong to the clinc150_* presets; the study preset "
              f"{args.preset!r} takes --device, --budget-minutes, --set, --work-dir, --output", file=sys.stderr)
        raise SystemExit(2)
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        print(f"error: --budget-minutes must be positive, got {args.budget_minutes}", file=sys.stderr)
        raise SystemExit(2)
    if args.plan:
        print(S.plan(preset))
        return None
    suffix = "" if preset.name in ("cpu", "gpu") else f"_{preset.name}"
    output = args.output or RESULTS / f"accuracy{suffix}.json"
    work = args.work_dir or RESULTS / "accuracy_work" / f"study_{preset.name}"
    try:
        phases = [x for x in args.phases.split(",") if x.strip()]
        unknown = sorted(set(phases) - set(S.PHASES))
        if unknown:
            print(f"error: unknown --phases {unknown}; choose from {', '.join(S.PHASES)}", file=sys.stderr)
            raise SystemExit(2)
        try:
            shard = tuple(int(x) for x in args.shard.split("/"))
            assert len(shard) == 2 and 0 <= shard[0] < shard[1]
        except (ValueError, AssertionError):
            print(f"error: --shard takes I/N with 0 <= I < N (e.g. 1/3), got {args.shard!r}", file=sys.stderr)
            raise SystemExit(2)
        return S.run_study(preset, work, output, args.device, args.set, args.budget_minutes, phases, shard)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
