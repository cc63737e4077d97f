"""Standard few-shot intent detection (issue 28): HWU64, Liu54 and CLINC150 on the 5 class splits.

    python benchmarks/standard.py --preset gpu --device cuda --budget-minutes 6 --out DIR
    python benchmarks/standard.py --preset cpu              # ~3 h of 2 cores (estimated), resumable
    python benchmarks/standard.py --preset cpu --plan       # print the cells and the cuts, run nothing
    python benchmarks/standard.py --preset smoke            # tiny random model, bundled data, < 30 s
    python benchmarks/standard.py --preset cpu --stage setfit   # SetFit beside MELoRA's adapt mode

Protocol (that of ProtAugment, Dopierre et al., ACL 2021, arXiv 2105.12995, on its class splits
shipped in data/{hwu64,liu54,clinc150}/splits/0N): per class split, meta-train on the split's
train intents, meta-validation tasks from its valid intents, meta-test on its test intents;
5-way 1-shot and 5-way 5-shot; `episodes_per_split` fixed meta-test episodes per split (gpu:
120 x 5 splits = 600); accuracy per split is the mean over its episodes, and the table gives
the mean over splits with a 95% Student-t CI over splits (none with one split).

Methods (ours; every one on the same episodes of a split, `evaluation.run_evaluation`):

- `melora`: config.yml's inner lr, K and head (the meta-val winner of benchmarks/accuracy.py)
  with the exact meta-gradient, meta-trained `iterations` meta-iterations (config.yml's Hessian
  default, first order, is the `fomaml_lora` row);
- `proto_lora`, `fomaml_lora`: the controls (no inner loop in meta-training; first order over
  the same LoRA), the same iterations and rates;
- `protonet_cosine`: frozen MiniLM, nearest support prototype by cosine (no training);
- `protonet`: frozen MiniLM, nearest prototype by Euclidean distance (Snell et al., 2017).

What "choose on valid" means here: nothing is tuned on the test intents; every method runs at
config.yml's rates (`evaluation.tuning_trials` 0: Optuna is not installed on the GPU machine)
for a fixed iteration count (no early stopping), and MELoRA's configuration was chosen before,
on CLINC150's `work` domain (benchmarks/accuracy.py). The valid intents feed no choice of
table 1 (the report says so); in the cpu preset's full-MAML table they choose the full-weight
baselines' rates (`FullMAML.tuning_trials`).

Three tables (benchmarks/results/standard.json and standard.md):

1. `datasets.<name>.<shape>`: `ours` (method -> accuracy_mean, ci95, splits) and `published`
   (the ProtAugment paper's rows on the same splits and shapes, never mixed into ours; their
   protocol differs: BERT-base, 110M parameters, further pretrained on each dataset's texts,
   against MiniLM-L6, 22M, not; 5 queries per class and 600 episodes in both).
2. `setfit.<name>.<shape>`: SetFit (the `setfit` package, its default training, the same
   MiniLM-L6 weights) against MELoRA's adapt mode (`adapt.adapt` from this run's checkpoint) on
   the same few-shot tasks at 5 and 8 shots: accuracy, seconds to adapt one task, peak memory.
   A CPU row: `setfit` is imported only by this stage.
3. `full_maml`: the seed's headline on real data, one setting, the same episodes for every row:
   MELoRA, full-weight second-order MAML, FOMAML and fomaml_lora; accuracy with CI, seconds per
   meta-iteration, the extra peak memory of one meta-training step (each method in its own
   process: `evaluation.child_process`, one meter), and MELoRA's memory as a fraction of MAML's.
   MiniLM-L6 in every preset: GPT-2-small's pretrained weights are not available offline (the
   memory at GPT-2-small's shape, random weights, is benchmarks/memory.py's table).

Budget and order (`--budget-minutes`): split 01 first (every dataset at 5-way 1-shot, then at
5-way 5-shot; MELoRA and the controls), then the other splits, then `full_maml`, then SetFit.
A cell starts only when the time left exceeds the last measured cell of its kind (a kind not
timed yet: a guess scaled from another); results are written after every cell, so a stopped
run leaves a valid report that lists what it did not do (`not_done`). Resumable: finished
cells are files under `--work-dir` (benchmarks/accuracy.py's cells: a cell is reused only when
its spec matches) and never recomputed. `--stage` computes only the stages named; the report
still shows every saved cell of the others.

Imports on the gpu path: torch, transformers, numpy, scipy, yaml, tqdm; never datasets,
mlflow, optuna or setfit (tested).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as A  # noqa: E402  (puts the repository on sys.path, sets the offline variables)

import numpy as np  # noqa: E402

REPO = A.REPO
RESULTS = A.RESULTS
# Each dataset's split-01 config (configs/): its sources with `classes_file` per meta-split.
DATASET_CONFIGS = {"hwu64": "hwu64.yml", "liu54": "liu54.yml", "clinc150": "clinc150_split01.yml"}
SPLITS = ("01", "02", "03", "04", "05")
EVALUATED = ("proto_lora", "fomaml_lora", "protonet")   # through evaluation.run_evaluation
METHODS = ("melora", "proto_lora", "fomaml_lora", "protonet_cosine", "protonet")
FULL_MAML_BASELINES = ("maml", "fomaml", "fomaml_lora")
STAGES = ("ours", "full_maml", "setfit")
CELL_FORMAT = A.CELL_FORMAT

log = logging.getLogger("melora.standard")

# The ProtAugment paper's Table (Dopierre, Gravier, Logerais, ACL 2021, arXiv 2105.12995):
# 5-way accuracy (%) averaged over the same 5 class splits. Checked against the paper: see
# docs/benchmarks.md (how far they were checked). Encoder BERT-base-cased (110M) further pretrained by masked language
# modelling on each dataset's texts; "low" = 10 labelled examples per training class, "full" =
# all; ProtAugment also uses unlabelled texts and their paraphrases.
PAPER = "Dopierre et al., PROTAUGMENT, ACL 2021 (arXiv 2105.12995)"
PUBLISHED_PROTOCOL = ("BERT-base-cased (110M parameters) further pretrained (MLM) on each dataset's "
                      "texts; 5 queries per class; 600 test episodes on each of the 5 splits (one run each); early "
                      "stopping on valid; ProtAugment rows also use unlabelled texts and paraphrases")
PUBLISHED_CHECK = ("transcribed from the paper's results table as reproduced in the first author's "
                   "thesis slides (tdopierre/thesis-presentation, figures/protaugment-results-dark.png); "
                   "not read off the paper's text, which the search tool did not hold: check against "
                   "arXiv 2105.12995 before quoting")
PUBLISHED = {  # dataset -> [(method, (1-shot, 5-shot))]
    "hwu64": [("ProtoNet (low)", (74.37, 86.48)), ("ProtoNet (full)", (77.09, 89.02)),
              ("ProtAugment, back-translation (full)", (81.31, 91.44)),
              ("ProtAugment, DBS + unigram (full)", (84.34, 92.55))],
    "liu54": [("ProtoNet (low)", (80.06, 89.62)), ("ProtoNet (full)", (82.76, 91.37)),
              ("ProtAugment, back-translation (full)", (84.14, 92.67)),
              ("ProtAugment, DBS + unigram (full)", (86.11, 93.70))],
    "clinc150": [("ProtoNet (low)", (94.29, 98.10)), ("ProtoNet (full)", (96.05, 98.61)),
                 ("ProtAugment, back-translation (full)", (95.19, 98.36)),
                 ("ProtAugment, DBS + unigram (full)", (96.49, 98.74))],
}


# ------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FullMAML:
    """The one setting of the full-MAML table."""

    dataset: str
    split: str
    shape: tuple[int, int]
    iterations: int
    episodes: int
    child_process: bool  # each method in its own process (the same meter for every row)
    tuning_trials: int = 0  # Optuna trials choosing each baseline's rates on the split's valid intents


@dataclasses.dataclass(frozen=True)
class SetFitPlan:
    """SetFit against MELoRA's adapt mode: `tasks` N-way tasks per shot count and dataset,
    drawn from split `split`'s test intents; MELoRA adapts from that split's checkpoint of
    shape `checkpoint_shape`."""

    shots: tuple[int, ...] = (5, 8)
    n_way: int = 5
    tasks: int = 10
    queries: int = 5
    split: str = "01"
    checkpoint_shape: tuple[int, int] = (5, 5)


@dataclasses.dataclass(frozen=True)
class Preset:
    """One size of the benchmark; `cuts` says what it leaves out of the protocol."""

    name: str
    model: str
    datasets: tuple[str, ...]
    splits: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    q_query: int
    max_length: int
    meta_batch: int
    iterations: int
    episodes_per_split: int
    full_maml: FullMAML | None
    setfit: SetFitPlan | None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    cuts: tuple[str, ...] = ()


_COMMON = {"evaluation.adaptation_steps": 0, "evaluation.tuning_trials": 0,
           "evaluation.child_process": False}
PRESETS = {
    "gpu": Preset(
        name="gpu", model="minilm-l6", datasets=tuple(DATASET_CONFIGS), splits=SPLITS,
        shapes=((5, 1), (5, 5)), q_query=5, max_length=64, meta_batch=8, iterations=100,
        episodes_per_split=120,
        full_maml=FullMAML("hwu64", "01", (5, 1), 100, 120, child_process=True), setfit=None,
        overrides={**_COMMON, "memory_optimization.checkpointing.enabled": False,
                   "memory_optimization.gradient_accumulation.default_micro_batch": 0,
                   "meta_learning.batched_tasks": True},
        cuts=("100 meta-iterations of meta-batch 8 per method and split (ProtAugment trains for "
              "thousands, with early stopping on valid): a short-training protocol",
              "SetFit is not installed on the GPU machine: its table is the cpu preset's")),
    "cpu": Preset(
        name="cpu", model="minilm-l6", datasets=tuple(DATASET_CONFIGS), splits=("01",),
        shapes=((5, 1), (5, 5)), q_query=5, max_length=32, meta_batch=4, iterations=20,
        episodes_per_split=80,
        full_maml=FullMAML("hwu64", "01", (5, 1), 20, 80, child_process=True, tuning_trials=4),
        setfit=SetFitPlan(),
        overrides={**_COMMON, "memory_optimization.gradient_accumulation.default_micro_batch": 0},
        cuts=("class split 01 only (not 01-05): no CI over splits",
              "80 test episodes (not 600), 20 meta-iterations of meta-batch 4 per method, 32 tokens",
              "full_maml: 20 meta-iterations, 80 episodes; each baseline's inner and outer rates "
              "chosen on meta-val (valid intents) by 4 Optuna trials, the first at MELoRA's rates",
              "SetFit: 10 tasks per dataset and shot count, from split 01's test intents")),
    "smoke": Preset(
        name="smoke", model="tiny-bert", datasets=("hwu64",), splits=("01",),
        shapes=((5, 1),), q_query=2, max_length=16, meta_batch=2, iterations=1,
        episodes_per_split=2,
        full_maml=FullMAML("hwu64", "01", (5, 1), 1, 2, child_process=False),
        setfit=None,
        overrides={**_COMMON, "memory_optimization.checkpointing.enabled": False,
                   "meta_learning.batched_tasks": True, "analysis.bootstrap_samples": 200},
        cuts=("a tiny random model: the numbers test the pipeline only",
              "full_maml in one process (memory read as RSS increases)")),
}


# ------------------------------------------------------------------------------------
# Sources and cells (benchmarks/accuracy.py's cells, one per dataset x split x shape)
# ------------------------------------------------------------------------------------

def split_sources(dataset: str, split: str) -> dict:
    """The config keys datasets.meta_{train,val,test} of `dataset` at class split `split`:
    configs/<dataset>'s split-01 sources with absolute paths and split `split`'s label files.

    Raises:
        ConfigError: an unknown dataset, or a label file that does not exist.
    """
    import yaml

    from utils import ConfigError
    if dataset not in DATASET_CONFIGS:
        raise ConfigError(f"--datasets names {dataset!r}; choose from {', '.join(DATASET_CONFIGS)}")
    data = yaml.safe_load((REPO / "configs" / DATASET_CONFIGS[dataset]).read_text())["datasets"]
    out = {}
    for part in ("meta_train", "meta_val", "meta_test"):
        entries = []
        for entry in data[part]:
            entry = dict(entry)
            for key in ("source", "group_file", "classes_file"):
                if entry.get(key) and not Path(entry[key]).is_absolute():
                    entry[key] = str(REPO / entry[key])
            labels = Path(entry["classes_file"])
            entry["classes_file"] = str(labels.parent.parent / split / labels.name)  # splits/0N/labels.*
            if not Path(entry["classes_file"]).is_file():
                raise ConfigError(f"class split {split!r} of {dataset}: {entry['classes_file']} does "
                                  f"not exist; --splits takes {', '.join(SPLITS)}")
            entries.append(entry)
        out[f"datasets.{part}"] = entries
    return out


def cell_preset(preset: Preset, dataset: str, split: str, iterations: int, episodes: int,
                methods: Sequence[str], child_process: bool | None = None) -> A.Preset:
    """benchmarks/accuracy.py's preset of one dataset and split (its cell machinery)."""
    overrides = {**preset.overrides, **split_sources(dataset, split)}
    if child_process is not None:
        overrides["evaluation.child_process"] = child_process
    return A.Preset(name=f"standard-{preset.name}", model=preset.model, data=f"{dataset}/{split}",
                    shapes=preset.shapes, q_query=preset.q_query, max_length=preset.max_length,
                    meta_batch=preset.meta_batch, grid={}, sweep_iterations=0, val_episodes=0,
                    sweep_seeds=(), test_iterations=iterations, test_episodes=episodes, seeds=(0,),
                    methods=tuple(methods), overrides=overrides)


def melora_config() -> dict:
    """MELoRA's row, as an accuracy.py grid point: config.yml's inner lr, K, rates and head
    with the exact meta-gradient (`full`). config.yml's own Hessian default, first order, is
    the `fomaml_lora` row, so each table shows both and the difference is second order."""
    m = A.make_config({}).meta_learning
    return {"inner_lr": m.inner.default_lr, "inner_steps": m.inner.default_num_steps,
            "learn_lr": m.inner.learn_lr, "head": m.head, "hessian": "full"}


class Budget:
    """Wall-clock budget: a cell starts only if the time left exceeds the last cell of its kind."""

    def __init__(self, minutes: float | None):
        self.start = time.monotonic()
        self.deadline = None if minutes is None else self.start + 60.0 * minutes
        self.last: dict[Any, float] = {}

    def allows(self, kind, guess: float = 0.0) -> bool:
        """Whether a cell of `kind` fits in the time left: its last measured time, else `guess`."""
        if self.deadline is None:
            return True
        return self.deadline - time.monotonic() > self.last.get(kind, guess)

    def record(self, kind, seconds: float) -> None:
        self.last[kind] = seconds

    def elapsed_minutes(self) -> float:
        return (time.monotonic() - self.start) / 60.0


def evaluated_cell(ap: A.Preset, shape, methods: Sequence[str], work: Path, extra: Sequence[str],
                   budget: Budget, kind, guess: float = 0.0, compute: bool = True) -> dict | None:
    """MELoRA meta-trained and evaluated with `methods` on one split and shape (accuracy.py's
    test cell): the saved cell, else (with `compute`) computed when the budget allows, else None."""
    best = melora_config()
    spec, folder = A._test_folder(ap, shape, best, 0, list(methods), work, False, extra)
    cell = A.load_cell(folder / "cell.json", spec)
    if cell is not None:
        return cell
    if not compute or not budget.allows(kind, guess):
        return None
    start = time.monotonic()
    cell = A.test_cell(ap, shape, best, 0, list(methods), work, False, extra, None)
    budget.record(kind, time.monotonic() - start)
    return cell


def cosine_cell(ap: A.Preset, shape, cell: dict, work: Path, extra: Sequence[str]) -> dict:
    """Frozen cosine prototypes on the cell's meta-test episodes (cached beside the cell)."""
    import evaluation
    spec_file = Path(cell["episode_spec"])
    spec = {"kind": "protonet_cosine", "cell": cell["spec_hash"], "extra": list(extra)}
    path = spec_file.parent / "protonet_cosine.json"
    saved = A.load_cell(path, spec)
    if saved is not None:
        return saved
    import baseline as B
    from dataset_loader import DatasetLoader
    from utils import episode_seed, resolve_device, set_seed
    cfg = A.make_config(A.base_overrides(ap, shape, 0, work, False), extra)
    method, tokenizer = B.build_baseline("protonet", cfg, resolve_device(cfg.training.device))
    episodes = DatasetLoader.from_config(cfg, tokenizer, ("meta_test",)).load_episode_spec(spec_file)
    accuracies = []
    for i, episode in enumerate(episodes):
        set_seed(episode_seed(cfg.training.seed, i))
        accuracies.append(cosine_accuracy(method, episode))
    assert len(accuracies) == len(cell["results"]["methods"]["melora"]["per_episode_accuracy"]), \
        evaluation.EPISODE_SPEC
    return A.save_cell(path, spec, {"per_episode_accuracy": accuracies,
                                    "accuracy_mean": float(np.mean(accuracies))})


def cosine_accuracy(protonet, episode) -> float:
    """Query accuracy of the nearest support prototype by cosine similarity (frozen features)."""
    import torch
    import torch.nn.functional as F

    import trainer as T
    support, query = protonet.to_device(episode.support), protonet.to_device(episode.query)
    with torch.no_grad(), T.dropout_off(protonet.model):
        s, q = protonet.features(support), protonet.features(query)  # (N*K, d), (N*Q, d)
        n_way = int(support["labels"].max()) + 1
        prototypes = torch.stack([s[support["labels"] == c].mean(0) for c in range(n_way)])  # (N, d)
        predictions = (F.normalize(q, dim=-1) @ F.normalize(prototypes, dim=-1).T).argmax(-1)
    return (predictions == query["labels"]).float().mean().item()


# ------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------

def ours_cells(preset: Preset, work: Path, extra: Sequence[str], budget: Budget,
               report, compute: bool = True) -> tuple[dict, list[str]]:
    """Every (dataset, split, shape) cell in priority order: split 01 first, every dataset at
    1 shot, then at 5. Without `compute`, the saved cells only (another stage's run).

    Returns:
        ({(dataset, shape_key, split): per-method per-episode accuracies and the cell}, the
        cells not done, each with the reason).
    """
    from tqdm import tqdm
    done, not_done = {}, []
    order = [(split, dataset, shape) for split in preset.splits for shape in preset.shapes
             for dataset in preset.datasets]
    names = [f"{dataset} split {split} {A.shape_key(shape)}" for split, dataset, shape in order]
    later = ["full_maml (not reached yet)"] if preset.full_maml else []
    report(done, [f"{n} (not reached yet)" for n in names] + later)  # a valid report from the start
    for i, (split, dataset, shape) in enumerate(tqdm(order, desc="standard splits", unit="cell",
                                                     dynamic_ncols=True)):
        name = names[i]
        ap = cell_preset(preset, dataset, split, preset.iterations, preset.episodes_per_split, EVALUATED)
        # a shape not timed yet: guess from another shape's cell, scaled by the examples per task
        guess = max([t * (shape[1] + preset.q_query) / (k + preset.q_query)
                     for (kind, k), t in budget.last.items() if kind == "ours"] or [0.0])
        cell = evaluated_cell(ap, shape, EVALUATED, work, extra, budget, ("ours", shape[1]), guess,
                              compute)
        if cell is None:
            not_done.append(f"{name} ({'budget' if compute else 'stage ours not run'})")
            continue
        cosine = cosine_cell(ap, shape, cell, work, extra)
        rows = {m: e["per_episode_accuracy"] for m, e in cell["results"]["methods"].items()}
        rows["protonet_cosine"] = cosine["per_episode_accuracy"]
        done[(dataset, A.shape_key(shape), split)] = {"methods": rows, "cell": cell}
        report(done, not_done + [f"{n} (not reached yet)" for n in names[i + 1:]] + later)
    return done, not_done


def summarize_ours(preset: Preset, done: dict, confidence: float) -> dict:
    """datasets.<name>.<shape>: ours (method -> accuracy_mean, ci95 over splits, splits) and
    the published rows."""
    import analysis
    out = {}
    for dataset in preset.datasets:
        for shape in preset.shapes:
            key = A.shape_key(shape)
            cells = {s: done[(dataset, key, s)] for s in preset.splits if (dataset, key, s) in done}
            entry = {"splits_done": sorted(cells), "splits_missing": [s for s in preset.splits if s not in cells],
                     "episodes_per_split": preset.episodes_per_split, "ours": {},
                     "published": published_rows(dataset, shape)}
            for method in METHODS:
                splits = {s: float(np.mean(c["methods"][method])) for s, c in cells.items()
                          if method in c["methods"]}
                if not splits:
                    continue
                values = list(splits.values())
                mean, lo, hi = analysis.mean_ci(values, confidence, (0.0, 1.0))
                entry["ours"][method] = {"accuracy_mean": mean,
                                         "ci95": [lo, hi] if len(values) > 1 else None,
                                         "splits": splits}
            out.setdefault(dataset, {})[key] = entry
    return out


def published_rows(dataset: str, shape) -> list[dict]:
    """The paper's rows for a 5-way 1- or 5-shot shape (accuracy as a fraction), else []."""
    column = {(5, 1): 0, (5, 5): 1}.get(tuple(shape))
    if column is None:
        return []
    return [{"method": method, "paper": PAPER, "accuracy": values[column] / 100.0,
             "protocol": PUBLISHED_PROTOCOL, "checked": PUBLISHED_CHECK}
            for method, values in PUBLISHED.get(dataset, [])]


def full_maml_table(preset: Preset, work: Path, extra: Sequence[str], budget: Budget,
                    confidence: float, resamples: int, compute: bool = True) -> dict | None:
    """The seed's headline on real data: MELoRA, MAML, FOMAML, fomaml_lora on one setting."""
    plan = preset.full_maml
    ap = cell_preset(preset, plan.dataset, plan.split, plan.iterations, plan.episodes,
                     FULL_MAML_BASELINES, plan.child_process)
    # tasks one after another for every row (MAML has no batched path): the same seconds' meaning;
    # rates chosen on meta-val when the plan tunes (MELoRA's rates, set for LoRA, are far too large
    # for every weight: measured, full MAML at inner lr 0.5 scored 29% at 5-way, FOMAML 56%)
    ap = dataclasses.replace(ap, shapes=(plan.shape,),
                             overrides={**ap.overrides, "meta_learning.batched_tasks": False,
                                        **({"evaluation.tuning_trials": plan.tuning_trials}
                                           if plan.tuning_trials else {})})
    # not timed yet: four meta-trainings (one of every weight, second order) against the three of
    # a standard cell: guess twice the slowest standard cell
    guess = 2.0 * max([t for (kind, _), t in budget.last.items() if kind == "ours"] or [0.0])
    cell = evaluated_cell(ap, plan.shape, FULL_MAML_BASELINES, work, extra, budget, ("full_maml", 0),
                          guess, compute)
    if cell is None:
        return None
    best = melora_config()
    summary = A.summarize_shape(ap, plan.shape, [cell], best, confidence, resamples)
    rows = {}
    for name in ("melora",) + FULL_MAML_BASELINES:
        m = summary["methods"][name]
        rows[name] = {"accuracy_mean": m["accuracy_mean"], "ci95": m["ci95"],
                      "seconds_per_meta_iteration": m["seconds_per_meta_iteration"],
                      "peak_memory_mb": m["meta_step_peak_memory_mb"],
                      "process_peak_memory_mb": m["peak_memory_mb"],
                      "difference_to_melora": summary["comparisons"].get(name),
                      **{k: cell["results"]["methods"][name].get(k)  # the rates it ran at
                         for k in ("inner_lr", "outer_lr", "tuning_trials")}}
    maml = rows["maml"]["peak_memory_mb"]
    fraction = rows["melora"]["peak_memory_mb"] / maml if maml else None
    for row in rows.values():
        row["memory_fraction_of_maml"] = (row["peak_memory_mb"] / maml
                                          if maml and row["peak_memory_mb"] is not None else None)
    return {"setting": {"dataset": plan.dataset, "split": plan.split, "shape": A.shape_key(plan.shape),
                        "model": preset.model, "meta_iterations": plan.iterations,
                        "episodes": summary["episodes"], "melora_config": best,
                        "own_process_per_method": plan.child_process,
                        "baseline_rates": {n: {k: cell["results"]["methods"][n].get(k) for k in
                                               ("inner_lr", "outer_lr", "tuning_trials", "tuning")}
                                           for n in FULL_MAML_BASELINES}},
            **rows, "melora_memory_fraction": fraction,
            "memory_method": cell["results"].get("memory_method"),
            "peak_memory_note": ("peak_memory_mb: extra peak of one meta-training step (one task) "
                                 "over the memory before it, measured with the same meter for every "
                                 "row; seconds per meta-iteration: MELoRA's from its meta-training, "
                                 "the others' from theirs, tasks one after another for all")}


def run(preset: Preset, work: Path, out_dir: Path, extra: Sequence[str] = (),
        budget_minutes: float | None = None, stages: Sequence[str] = STAGES) -> dict:
    """The whole benchmark; writes (after every cell) and returns the standard.json dict."""
    from utils import atomic_write_json, atomic_write_text
    for dataset in preset.datasets:  # bad input fails here, before any work
        for split in preset.splits:
            A.make_config(A.base_overrides(cell_preset(preset, dataset, split, 1, 1, EVALUATED),
                                           preset.shapes[0], 0, work, False), extra)
    print(plan(preset), flush=True)
    work.mkdir(parents=True, exist_ok=True)
    stats = A.make_config({}).analysis
    budget = Budget(budget_minutes)
    name = "standard" if preset.name != "smoke" else "standard_smoke"
    output = out_dir / f"{name}.json"
    result = {"benchmark": "standard", "preset": preset.name, "model": preset.model,
              "protocol": _protocol(preset), "cuts": list(preset.cuts), "stages": list(stages),
              "budget_minutes": budget_minutes, "extra_overrides": list(extra),
              "datasets": {}, "setfit": {}, "full_maml": None, "not_done": []}

    def write(partial_done=None, partial_missing=()):
        if partial_done is not None:
            result["datasets"] = summarize_ours(preset, partial_done, stats.confidence)
            result["not_done"] = list(partial_missing)
        result["elapsed_minutes"] = budget.elapsed_minutes()
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output, result)
        atomic_write_text(output.with_suffix(".md"), format_tables(result))

    # A stage not selected still reports its saved cells (computing none).
    done, missing = ours_cells(preset, work, extra, budget, write, "ours" in stages)
    pending = "full_maml (not reached yet)"
    write(done, missing + ([pending] if preset.full_maml is not None else []))
    if preset.full_maml is not None:
        table = full_maml_table(preset, work, extra, budget, stats.confidence, stats.bootstrap_samples,
                                "full_maml" in stages)
        result["full_maml"] = table
        result["not_done"].remove(pending)
        if table is None:
            result["not_done"].append("full_maml (" + ("budget" if "full_maml" in stages
                                                       else "stage full_maml not run") + ")")
        write()
    if preset.setfit is not None:
        import setfit_row
        result["setfit"], skipped = setfit_row.run(preset, work, done, extra, budget, "setfit" in stages)
        result["not_done"] += skipped
        write()
    print(format_tables(result))
    print(f"wrote {output}, {output.with_suffix('.md')} (cells under {work})", flush=True)
    return result


def _protocol(preset: Preset) -> dict:
    fields = dataclasses.asdict(preset)
    return {k: v for k, v in fields.items() if k not in ("cuts", "name")}


def plan(preset: Preset) -> str:
    """What the preset will do, in priority order."""
    cells = len(preset.datasets) * len(preset.splits) * len(preset.shapes)
    lines = [f"preset {preset.name}: {preset.model}; datasets {', '.join(preset.datasets)}; class "
             f"splits {', '.join(preset.splits)}; shapes "
             f"{', '.join(f'{n}-way {k}-shot' for n, k in preset.shapes)}; {preset.q_query} queries "
             "per class",
             f"  1. {cells} cells (split 01 first: every dataset at 1 shot, then at 5): MELoRA "
             f"({preset.iterations} meta-iterations, meta-batch {preset.meta_batch}) + "
             f"{', '.join(EVALUATED)} + protonet_cosine on {preset.episodes_per_split} episodes each"]
    if preset.full_maml:
        f = preset.full_maml
        lines.append(f"  2. full_maml: {f.dataset} split {f.split} {A.shape_key(f.shape)}, melora + "
                     f"{', '.join(FULL_MAML_BASELINES)}, {f.iterations} meta-iterations, {f.episodes} "
                     f"episodes{', each method in its own process' if f.child_process else ''}")
    if preset.setfit:
        s = preset.setfit
        lines.append(f"  3. setfit: {s.tasks} tasks x {s.n_way}-way x shots {s.shots} per dataset "
                     f"(split {s.split} test intents), against MELoRA's adapt mode")
    lines += [f"  cut: {c}" for c in preset.cuts]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------

def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def format_tables(result: dict) -> str:
    """standard.md: the three tables, with the protocol differences beside the published rows."""
    lines = [f"# Standard few-shot intent benchmarks ({result['preset']} preset, {result['model']})", ""]
    if result["cuts"]:
        lines += ["Cut from the full protocol: " + "; ".join(result["cuts"]) + ".", ""]
    if result["not_done"]:
        lines += ["Not done in this run: " + "; ".join(result["not_done"]) + ".", ""]
    lines += ["Ours: accuracy (%) on each split's test intents, mean over the splits done and the 95% "
              "Student-t CI over splits (none with one split). No choice was made on the valid "
              "intents: config.yml's rates, fixed iteration counts, no early stopping. MELoRA's "
              "configuration was chosen earlier on CLINC150's `work` domain, 2 to 5 of whose intents "
              "are test intents of the CLINC150 splits.",
              f"Published ({PAPER}): {PUBLISHED_PROTOCOL}. Not comparable row for row: "
              "another encoder (BERT-base, 110M parameters, against MiniLM-L6's 22M), in-domain pretraining, "
              "longer training. The published numbers are transcribed from the thesis slides, not "
              "read off the paper (docs/benchmarks.md).", ""]
    for dataset, shapes in result["datasets"].items():
        for key, entry in shapes.items():
            lines += [f"## {dataset}, {key} (splits done: {', '.join(entry['splits_done']) or 'none'}; "
                      f"{entry['episodes_per_split']} episodes per split)", "",
                      "| Method | Source | Accuracy (%) | 95% CI over splits (%) | Per split (%) |",
                      "|---|---|---|---|---|"]
            for method, m in entry["ours"].items():
                ci = "-" if m["ci95"] is None else f"[{_pct(m['ci95'][0])}, {_pct(m['ci95'][1])}]"
                per = ", ".join(f"{s}: {_pct(v)}" for s, v in m["splits"].items())
                lines.append(f"| {method} | ours ({result['model']}) | {_pct(m['accuracy_mean'])} | {ci} | {per} |")
            for row in entry["published"]:
                lines.append(f"| {row['method']} | published (BERT-base + MLM) | {_pct(row['accuracy'])} | - | - |")
            lines.append("")
    if result["setfit"]:
        lines += ["## SetFit against MELoRA's adapt mode (the same tasks)", "",
                  "| Dataset | Shape | Method | Accuracy (%) | s / task | Peak memory (MiB) | Tasks | "
                  "MELoRA - SetFit (pp, Wilcoxon p over tasks) |",
                  "|---|---|---|---|---|---|---|---|"]
        for dataset, shapes in result["setfit"].items():
            for key, e in shapes.items():
                for label, row in (("SetFit", e), ("MELoRA adapt", e.get("melora_adapt"))):
                    if row:
                        diff = "-"
                        if label != "SetFit" and e.get("melora_minus_setfit") is not None:
                            p = e.get("p_wilcoxon_tasks")
                            diff = f"{100 * e['melora_minus_setfit']:+.2f} ({'-' if p is None else f'{p:.2g}'})"
                        lines.append(f"| {dataset} | {key} | {label} | {_pct(row['accuracy_mean'])} | "
                                     f"{row['seconds_per_task']:.2f} | {row['peak_memory_mb']:.0f} | "
                                     f"{row['tasks']} | {diff} |")
        lines.append("")
    f = result["full_maml"]
    if f:
        s = f["setting"]
        lines += [f"## Full MAML on real data: {s['dataset']} split {s['split']}, {s['shape']}, "
                  f"{s['model']}, {s['meta_iterations']} meta-iterations, {s['episodes']} episodes", "",
                  "| Method | Accuracy (%) | 95% CI (%) | s / meta-iteration | Peak memory of a meta-step "
                  "(MiB) | Fraction of MAML's memory | Inner lr, outer lr |", "|---|---|---|---|---|---|---|"]
        for name in ("melora",) + FULL_MAML_BASELINES:
            r = f[name]
            lr = "-"
            if isinstance(r.get("inner_lr"), float) and r.get("outer_lr") is not None:
                how = f"meta-val, {r['tuning_trials']} trials" if r.get("tuning_trials") else "config.yml"
                lr = f"{r['inner_lr']:.3g}, {r['outer_lr']:.2g} ({how})"
            sec = "-" if r["seconds_per_meta_iteration"] is None else f"{r['seconds_per_meta_iteration']:.3f}"
            mem = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.1f}"
            frac = "-" if r["memory_fraction_of_maml"] is None else f"{r['memory_fraction_of_maml']:.3f}"
            lines.append(f"| {name} | {_pct(r['accuracy_mean'])} | [{_pct(r['ci95'][0])}, "
                         f"{_pct(r['ci95'][1])}] | {sec} | {mem} | {frac} | {lr} |")
        lines += ["", f"Memory: {f['memory_method']}; {f['peak_memory_note']}.", ""]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default config.yml's training.device)")
    parser.add_argument("--budget-minutes", type=float,
                        help="stop starting cells when the time left is less than the last cell of "
                             "the kind took; the report lists what was not done")
    parser.add_argument("--work-dir", type=Path, help="cell files (default <out>/standard_work/<preset>)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--datasets", help="comma-separated subset of " + ",".join(DATASET_CONFIGS))
    parser.add_argument("--splits", help="comma-separated subset of " + ",".join(SPLITS))
    parser.add_argument("--stage", action="append", choices=STAGES,
                        help="run only this stage (repeatable; default all of the preset's)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--plan", action="store_true", help="print the cells and the cuts only")
    args = parser.parse_args(argv)
    from utils import UserError
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        preset = select(PRESETS[args.preset], args.datasets, args.splits)
        if args.plan:
            print(plan(preset))
            return None
        import torch
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        extra = [] if args.device is None else [f"training.device={args.device}"]
        if args.device is not None:
            from utils import resolve_device
            resolve_device(args.device)  # cuda on a machine without one fails here
        if args.budget_minutes is not None and args.budget_minutes <= 0:
            raise UserError(f"--budget-minutes must be positive, got {args.budget_minutes}")
        work = args.work_dir or args.out / "standard_work" / preset.name
        return run(preset, work, args.out, extra, args.budget_minutes, args.stage or STAGES)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def select(preset: Preset, datasets: str | None, splits: str | None) -> Preset:
    """The preset restricted to --datasets / --splits (each checked against the known names)."""
    from utils import ConfigError
    changes = {}
    for flag, value, known, field in (("--datasets", datasets, tuple(DATASET_CONFIGS), "datasets"),
                                      ("--splits", splits, SPLITS, "splits")):
        if value is None:
            continue
        names = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise ConfigError(f"{flag} names {unknown or value!r}; choose from {', '.join(known)}")
        changes[field] = tuple(names)
    return dataclasses.replace(preset, **changes)


if __name__ == "__main__":
    main()
