"""The accuracy study, redone where meta-learning can act (issue 29): curves, controls, many ways.

    python benchmarks/accuracy.py --preset smoke                # tiny random model, synthetic, < 30 s
    python benchmarks/accuracy.py --preset cpu --threads 1      # 3-5 h (estimate), resumable
    python benchmarks/accuracy.py --preset gpu --device cuda --budget-minutes 3
    python benchmarks/accuracy.py --preset cpu --plan           # the cells in priority order

Home: HWU64, ProtAugment class split 01 (meta-train on its 16 train intents, choose on its
23 valid intents, test once on its 25 test intents; in-domain: the same assistant, other
intents); 20-way cells on CLINC150 class split 01 (50 / 50 / 50 intents), the only shipped
split with 20 classes in every part. MiniLM-L6, LoRA on the top blocks with the prefix
cache, short sequences (`Preset`).

Methods (one engine, `baseline.LoRAMetaLearner`, so only the meta-gradient differs):

| row | meta-training | at meta-test |
| --- | --- | --- |
| `melora` | exact second order through K inner steps (`full`) | K SGD steps on LoRA + head |
| `fomaml_lora` | first order (`none`), K inner steps | the same |
| `proto_lora` | no inner loop (K = 0): LoRA through the prototype head | the same |
| `protonet` | none (frozen encoder), Euclidean prototypes | - |
| `protonet_cosine` | none (frozen encoder), cosine prototypes | - |
| `<m>_equal_compute` | `m` given MELoRA's meta-training wall clock | as `m` |

Protocol, in priority order (`--budget-minutes` stops cleanly between and inside cells; the
JSON says what ran):

1. **Main comparison** on the main shapes (5-way 1-shot, 5-way 5-shot): the frozen rows;
   every meta-trained method at the grid's first point on every seed (a usable table if the
   budget ends here); then the same grid (inner lr x outer lr, defaults inside) for every
   method on seed 0, each trained until meta-val stops improving (`plateau`: no gain > `min_gain` over the last
   `patience` evaluations, at least `min_points` evaluations) or `max_iterations`, keeping the
   best meta-val theta; its `curve` records meta-val accuracy (after K steps and at step 0),
   meta-loss and query accuracy before/after adaptation. **Choice** per method on meta-val:
   the best configuration, or the cheapest (least training time to its best point) within one
   standard error of it. The chosen configuration is retrained on the other seeds; every seed
   is tested once on the same meta-test episodes (accuracy at step 0 and after K).
2. **Positive control**: a linear head started at zero (`head_init: zero`, Euclidean), many
   ways, where second order should beat first order; `full` vs `none`, paired test, and the
   meta-gradients' cosine at the start (why, when they tie).
3. **Regime map**: (ways, shots, inner lr, outer lr) cells at 5, 10 and 20 ways, `full`,
   `none`, `proto_lora` each trained to a plateau, tested after K steps; Holm over all tests.
4. **Equal compute**: `proto_lora`, `fomaml_lora` (their chosen configurations) meta-trained
   for MELoRA's measured meta-training seconds instead of its iteration count.

Statistics: per row the mean over seeds, sd, the t-interval of per-episode accuracy
(`ci95`) and `ci95_seeds`, a bootstrap over seeds and episodes (`analysis.bootstrap_ci_seeds`);
MELoRA against every row: per-episode paired Wilcoxon and t tests with Holm, and the
difference's two-level bootstrap interval. Resumable: every cell (one training, one test
evaluation) is a file under `--work-dir`, reused when its spec matches.

Imports only what the GPU machine has (no `datasets`, `mlflow`, `optuna`: data are read
through `classes_file` sources, baselines tuned by the plain grid above on meta-val).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import accuracy as A  # noqa: E402  (cells, configs: the study's shared plumbing)
import study_data  # noqa: E402

log = logging.getLogger("melora.accuracy")

# name -> (Hessian method of the meta-gradient, whether meta-training runs the inner loop)
META_METHODS = {"melora": ("full", True), "fomaml_lora": ("none", True), "proto_lora": ("none", False)}
FROZEN_METHODS = ("protonet", "protonet_cosine")
EQUAL_COMPUTE = ("proto_lora", "fomaml_lora")
STUDY_FORMAT = "melora-accuracy-study/2"


# ------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Preset:
    """One size of the study (see the module docstring for the protocol)."""

    name: str
    model: str
    data: str                                  # hwu64 or synthetic
    split: str                                 # ProtAugment class split (real data)
    many_way_data: str                         # where 20-way cells live (clinc150; synthetic)
    max_length: int
    q_query: int
    meta_batch: int
    lora_layers: tuple[int, ...]               # LoRA blocks (with the prefix cache below them)
    main_shapes: tuple[tuple[int, int], ...]
    inner_steps: int                           # K, meta-training and meta-test
    inner_lrs: tuple[float, ...]               # the grid every meta-trained method is tuned over
    outer_lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    eval_every: int
    max_iterations: int
    val_episodes: int
    test_episodes: int
    positive_control: dict                     # data, n_way, k_shot, inner_lr, outer_lr, inner_steps
    regime_cells: tuple[tuple, ...]            # (data, n_way, k_shot, inner_lr, outer_lr)
    regime_seeds: tuple[int, ...] = (0,)
    patience: int = 3
    min_gain: float = 0.005
    min_points: int = 5
    head: str = "cosine"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    bootstrap_samples: int = 10000
    batched_tasks: bool = False                # a meta-batch's inner loops together (GPU)
    cuts: tuple[str, ...] = ()


_SPEED = {"memory_optimization.checkpointing.enabled": False,
          "memory_optimization.gradient_accumulation.default_micro_batch": 0,
          "memory_optimization.prefix_cache": True, "lora.dropout": 0.1}

PRESETS = {
    "gpu": Preset(
        name="gpu", model="minilm-l6", data="hwu64", split="01", many_way_data="clinc150",
        max_length=32, q_query=5, meta_batch=4, lora_layers=(4, 5), main_shapes=((5, 1), (5, 5)),
        inner_steps=3, inner_lrs=(0.5,), outer_lrs=(2e-3, 5e-3, 5e-4), seeds=(0, 1, 2),
        eval_every=10, max_iterations=120, val_episodes=60, test_episodes=200, batched_tasks=True,
        positive_control={"data": "clinc150", "n_way": 20, "k_shot": 1, "inner_lr": 0.5,
                          "outer_lr": 2e-3, "inner_steps": 3},
        regime_cells=(("hwu64", 5, 2, 0.5, 2e-3), ("hwu64", 10, 1, 0.5, 2e-3),
                      ("clinc150", 20, 1, 0.5, 2e-3), ("hwu64", 5, 1, 0.1, 5e-3),
                      ("hwu64", 5, 1, 2.0, 5e-3), ("hwu64", 10, 5, 0.5, 2e-3),
                      ("clinc150", 20, 5, 0.5, 2e-3), ("hwu64", 5, 1, 0.5, 5e-4),
                      ("hwu64", 5, 1, 0.1, 5e-4), ("hwu64", 5, 1, 2.0, 5e-4)),
        overrides=_SPEED,
        cuts=("one inner lr (0.5) in the main grid; the inner lr x outer lr grid in the regime map",
              "K = 3 and the cosine head (config.yml's defaults) fixed for every method, not swept",
              "LoRA on the top 2 of 6 blocks (prefix cache), 32 tokens, 5 queries per class",
              "cells beyond --budget-minutes are listed under not_run")),
    "cpu": Preset(
        name="cpu", model="minilm-l6", data="hwu64", split="01", many_way_data="clinc150",
        max_length=32, q_query=5, meta_batch=4, lora_layers=(4, 5), main_shapes=((5, 1), (5, 5)),
        inner_steps=3, inner_lrs=(0.5,), outer_lrs=(2e-3, 5e-3, 5e-4), seeds=(0, 1, 2),
        eval_every=8, max_iterations=40, val_episodes=40, test_episodes=100,
        positive_control={"data": "hwu64", "n_way": 10, "k_shot": 1, "inner_lr": 0.5,
                          "outer_lr": 2e-3, "inner_steps": 3},
        regime_cells=(("hwu64", 5, 2, 0.5, 2e-3), ("hwu64", 10, 1, 0.5, 2e-3),
                      ("clinc150", 20, 1, 0.5, 2e-3)),
        overrides=_SPEED, bootstrap_samples=4000,
        cuts=("at most 40 meta-iterations per training (evaluated every 8 on 40 meta-val episodes), "
              "100 meta-test episodes",
              "one inner lr (0.5) in the main grid; no inner lr x outer lr cells (the gpu preset has them)",
              "K = 3 and the cosine head (config.yml's defaults) fixed for every method, not swept",
              "LoRA on the top 2 of 6 blocks (prefix cache), 32 tokens, 5 queries per class",
              "positive control at 10-way (HWU64) rather than 20-way")),
    "smoke": Preset(
        name="smoke", model="tiny-bert", data="synthetic", split="-", many_way_data="synthetic",
        max_length=16, q_query=2, meta_batch=2, lora_layers=(1,), main_shapes=((3, 2),),
        inner_steps=1, inner_lrs=(0.5,), outer_lrs=(5e-3, 5e-4), seeds=(0, 1),
        eval_every=1, max_iterations=5, val_episodes=3, test_episodes=4,
        positive_control={"data": "synthetic", "n_way": 5, "k_shot": 1, "inner_lr": 0.5,
                          "outer_lr": 5e-3, "inner_steps": 1},
        regime_cells=(("synthetic", 5, 1, 0.5, 5e-3), ("synthetic", 10, 1, 0.5, 5e-3),
                      ("synthetic", 20, 1, 0.5, 5e-3)),
        min_points=3, patience=2, bootstrap_samples=200, batched_tasks=True,
        overrides={"memory_optimization.checkpointing.enabled": False},
        cuts=("a tiny random model on synthetic tasks: the numbers test the pipeline only",)),
}


# ------------------------------------------------------------------------------------
# Budget
# ------------------------------------------------------------------------------------

class Budget:
    """Wall-clock budget of one run: cells start only while time is left, and a training
    stops (keeping its best theta so far) when it is spent."""

    def __init__(self, minutes: float | None):
        self.start, self.seconds = time.perf_counter(), None if minutes is None else 60.0 * minutes
        self.ran: list[str] = []
        self.not_run: list[str] = []
        self.paused = False  # a phase this process does not compute: cached cells only

    def spent(self) -> bool:
        return self.paused or (self.seconds is not None
                               and time.perf_counter() - self.start >= self.seconds)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# ------------------------------------------------------------------------------------
# The study: configs, episodes, cells
# ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
    """One meta-training: a method on one shape with one configuration and seed."""

    method: str
    data: str
    n_way: int
    k_shot: int
    inner_lr: float
    outer_lr: float
    seed: int
    inner_steps: int
    head: str = "cosine"
    head_init: str = "proto"
    seconds: float | None = None   # equal compute: meta-train for this wall clock instead

    def key(self) -> str:
        """The cell's file name: every field, readable."""
        extra = "" if self.seconds is None else f"-eq{self.seconds:.1f}s"
        return (f"{self.method}-{self.data}-{self.n_way}w{self.k_shot}s-a{self.inner_lr:g}-b{self.outer_lr:g}"
                f"-K{self.inner_steps}-{self.head}-{self.head_init}-seed{self.seed}{extra}")


class Study:
    """Builds configs, fixed episodes and cells for one preset under one work folder."""

    def __init__(self, preset: Preset, work: Path, device: str, extra: Sequence[str], budget: Budget,
                 shard: tuple[int, int] = (0, 1)):
        self.preset, self.work, self.device, self.extra, self.budget = preset, work, device, extra, budget
        self.shard = shard
        self._episodes: dict = {}
        self._configs: dict = {}
        self._tokenizer = None

    # -- configs ------------------------------------------------------------------------

    def config(self, data: str, n_way: int, k_shot: int, seed: int = 0, **keys):
        """The validated config of one cell (config.yml, the preset, `keys`, then `--set`s);
        built once per distinct argument list (validation takes a noticeable fraction of a
        second, and a run asks for the same few configs many times)."""
        memo = (data, n_way, k_shot, seed, tuple(sorted(keys.items())))
        if memo not in self._configs:
            self._configs[memo] = self._config(data, n_way, k_shot, seed, **keys)
        return self._configs[memo]

    def _config(self, data: str, n_way: int, k_shot: int, seed: int, **keys):
        p = self.preset
        out = {"models.selected_model": p.model, "models.max_length": p.max_length,
               "tasks.n_way": n_way, "tasks.k_shot": k_shot, "tasks.q_query": p.q_query,
               "lora.layers": list(p.lora_layers), "meta_learning.head": p.head,
               "meta_learning.default_meta_batch_size": p.meta_batch, "training.seed": seed,
               "training.device": self.device, "training.output_dir": str(self.work / "runs"),
               "datasets.cache_dir": str(self.work / "cache"), "tracking.mlflow": False,
               "tracking.tensorboard": False, **p.overrides, **keys}
        if data == "synthetic":
            out["datasets.synthetic_only"] = True
        else:
            out.update(study_data.class_split_sources(data, p.split))
        return A.make_config(out, self.extra)

    def spec(self, kind: str, **what) -> dict:
        """What a cell depends on: the preset's data fields, the cell's keys, config.yml."""
        p = self.preset
        fields = {f: getattr(p, f) for f in ("model", "split", "max_length", "q_query", "meta_batch",
                                             "lora_layers", "overrides", "val_episodes", "eval_every",
                                             "max_iterations", "patience", "min_gain", "min_points")}
        return {"kind": kind, "preset": fields, **what, "extra": list(self.extra),
                "device": self.device.split(":")[0], "config_defaults": A.config_defaults_hash()}

    # -- episodes -----------------------------------------------------------------------

    def episodes(self, data: str, n_way: int, k_shot: int, split: str) -> list:
        """The fixed meta-val or meta-test episodes of a shape (the same for every method and
        seed: drawn with a loader seeded 0, whatever the training seed)."""
        key = (data, n_way, k_shot, split)
        if key not in self._episodes:
            from dataset_loader import DatasetLoader
            cfg = self.config(data, n_way, k_shot, seed=0)
            loader = DatasetLoader.from_config(cfg, self.tokenizer(cfg), (split,))
            num = self.preset.val_episodes if split == "meta_val" else self.preset.test_episodes
            self._episodes[key] = [loader.episode(split, i) for i in range(num)]
        return self._episodes[key]

    def tokenizer(self, cfg):
        """The model's tokenizer, loaded once per run."""
        if self._tokenizer is None:
            import model as M
            self._tokenizer = M.load_model(cfg.models.selected_model, 2)[1]
        return self._tokenizer

    # -- cells --------------------------------------------------------------------------

    def train(self, run: Run) -> dict | None:
        """Meta-train `run` to a plateau (cached): its curve, stop reason and best theta."""
        spec = self.spec("train", run=dataclasses.asdict(run))
        path = self.work / "train" / f"{run.key()}.json"
        cell = A.load_cell(path, spec)
        if cell is not None and cell["stopped"] != "budget":
            return cell
        if self.budget.spent() or not self.mine(run.key()):
            self.budget.not_run.append(f"train {run.key()}")
            return cell  # a budget-cut cell from an earlier run, or None
        result, theta = meta_train(self, run)
        theta_path = path.with_suffix(".pt")
        _save_tensors(theta_path, theta)
        self.budget.ran.append(f"train {run.key()} ({result['stopped']}, {result['iterations']} it)")
        return A.save_cell(path, spec, {**result, "theta_file": theta_path.name})

    def test(self, run: Run, trained: dict) -> dict | None:
        """Accuracy after 0..K steps on the meta-test episodes of the trained theta (cached)."""
        spec = self.spec("test", run=dataclasses.asdict(run), trained=trained["spec_hash"],
                         test_episodes=self.preset.test_episodes)
        path = self.work / "test" / f"{run.key()}.json"
        cell = A.load_cell(path, spec)
        if cell is not None:
            return cell
        if self.budget.spent() or not self.mine(run.key()):
            self.budget.not_run.append(f"test {run.key()}")
            return None
        method = self.learner(run)
        _load_theta(self, method, trained)
        episodes = self.episodes(run.data, run.n_way, run.k_shot, "meta_test")
        per_step = A.adapted_accuracies(method, episodes, run.inner_steps, run.seed)
        self.budget.ran.append(f"test {run.key()}")
        return A.save_cell(path, spec, {"per_episode_accuracy_per_step": per_step})

    def frozen(self, name: str, data: str, n_way: int, k_shot: int) -> dict | None:
        """A frozen-encoder ProtoNet row on the meta-test episodes (cached)."""
        spec = self.spec("frozen", method=name, data=data, shape=[n_way, k_shot],
                         test_episodes=self.preset.test_episodes)
        path = self.work / "test" / f"{name}-{data}-{n_way}w{k_shot}s.json"
        cell = A.load_cell(path, spec)
        if cell is not None:
            return cell
        if self.budget.spent() or not self.mine(path.stem):
            self.budget.not_run.append(f"test {name} {n_way}w{k_shot}s")
            return None
        import baseline as B
        from utils import resolve_device
        cfg = self.config(data, n_way, k_shot)
        model, _ = B.full_model(cfg, resolve_device(cfg.training.device))
        method = B.ProtoNet(model) if name == "protonet" else CosineProtoNet(model)
        episodes = self.episodes(data, n_way, k_shot, "meta_test")
        accuracies = [method.adapt(ep, 0)[0] for ep in episodes]
        self.budget.ran.append(f"test {name} {n_way}w{k_shot}s")
        return A.save_cell(path, spec, {"per_episode_accuracy_per_step": [[a] for a in accuracies]})

    def mine(self, key: str) -> bool:
        """Whether this process computes the cell `key` (`--shard I/N`: a stable hash of the
        key mod N; a run's training and its test share the key, so one process does both)."""
        index, count = self.shard
        return int(hashlib.sha1(key.encode()).hexdigest(), 16) % count == index

    def learner(self, run: Run):
        """A fresh `LoRAMetaLearner` for `run` (LoRA init from the seed, as MELoRA's)."""
        import baseline as B
        import model as M
        from utils import resolve_device
        hessian, inner = META_METHODS[run.method]
        cfg = self.config(run.data, run.n_way, run.k_shot, run.seed, **{
            "meta_learning.head": run.head, "meta_learning.head_init": run.head_init})
        model, _ = M.build_model(cfg, resolve_device(cfg.training.device))
        learner = B.LoRAMetaLearner(model, run.inner_lr, run.inner_steps if inner else 0, hessian,
                                    run.outer_lr, cfg.meta_learning.outer.grad_clip,
                                    cfg.memory_optimization.gradient_accumulation.default_micro_batch,
                                    run.head_init, run.seed, batched=self.preset.batched_tasks)
        learner.name, learner.cfg = run.method, cfg
        return learner


class CosineProtoNet:
    """Nearest class prototype by cosine similarity of frozen mean-pooled features: the
    control that separates what the cosine distance gives from what meta-training gives."""

    def __init__(self, model):
        import baseline as B
        self.inner = B.ProtoNet(model)

    def adapt(self, episode, steps: int) -> list[float]:
        import torch
        import torch.nn.functional as F

        import trainer as T
        net = self.inner
        support, query = net.to_device(episode.support), net.to_device(episode.query)
        with torch.no_grad(), T.dropout_off(net.model):
            s, q = net.features(support), net.features(query)  # (N*K, d), (N*Q, d)
            n_way = int(support["labels"].max()) + 1
            prototypes = torch.stack([s[support["labels"] == c].mean(0) for c in range(n_way)])
            predictions = (F.normalize(q, dim=-1) @ F.normalize(prototypes, dim=-1).T).argmax(-1)
        return [(predictions == query["labels"]).float().mean().item()] * (steps + 1)


# ------------------------------------------------------------------------------------
# Meta-training with a learning curve and a plateau rule
# ------------------------------------------------------------------------------------

def meta_train(study: Study, run: Run) -> tuple[dict, dict]:
    """Meta-train until meta-val plateaus, `max_iterations`, `run.seconds` or the budget.

    Returns:
        (result, best theta): the curve (one point per evaluation: iteration, meta-val
        accuracy after K and at step 0, mean meta-loss, query accuracy before/after adaptation
        and support loss since the last point), the stop reason, the best point, the
        meta-training seconds (evaluations excluded).
    """
    from dataset_loader import DatasetLoader
    p = study.preset
    learner = study.learner(run)
    loader = DatasetLoader.from_config(learner.cfg, study.tokenizer(learner.cfg), ("meta_train",))
    val = study.episodes(run.data, run.n_way, run.k_shot, "meta_val")
    curve, since, seconds, stopped = [], [], 0.0, "max_iterations"
    best = {"meta_val_accuracy": -1.0}
    cap = p.max_iterations if run.seconds is None else 10**9
    for it in range(cap + 1):
        # 1. Evaluate every `eval_every` iterations (and at 0): the learning curve.
        if it % p.eval_every == 0:
            point = _evaluate(learner, val, run, it, seconds, since)
            curve.append(point)
            since = []
            if point["meta_val_accuracy"] > best["meta_val_accuracy"]:
                best = point
                theta = {n: t.detach().cpu().clone() for n, t in learner.theta.items()}
            if _plateau(curve, p) and run.seconds is None:
                stopped = "plateau"
                break
        if it == cap:
            break
        if run.seconds is not None and seconds >= run.seconds:
            stopped = "equal_compute"
            break
        if study.budget.spent():
            stopped = "budget"
            break
        # 2. One outer step on a meta-batch of meta-train episodes.
        start = time.perf_counter()
        tasks = [loader.episode("meta_train", it * p.meta_batch + t) for t in range(p.meta_batch)]
        learner.iteration = it
        loss = learner.meta_step(tasks)
        seconds += time.perf_counter() - start
        since.append({"meta_loss": loss, **learner.last_metrics})
    if since:  # the last steps' metrics after the last scheduled evaluation
        curve.append(_evaluate(learner, val, run, it, seconds, since))
        if curve[-1]["meta_val_accuracy"] > best["meta_val_accuracy"]:
            best, theta = curve[-1], {n: t.detach().cpu().clone() for n, t in learner.theta.items()}
    result = {"curve": curve, "stopped": stopped, "iterations": curve[-1]["iteration"],
              "best": best, "train_seconds": seconds,
              "seconds_per_meta_iteration": seconds / max(1, curve[-1]["iteration"]),
              "best_val_per_episode": best.pop("per_episode")}
    for point in curve:
        point.pop("per_episode", None)
    return result, theta


def _evaluate(learner, val: list, run: Run, it: int, seconds: float, since: list[dict]) -> dict:
    """One curve point: meta-val accuracy after K steps and at step 0, and the training
    metrics averaged since the last point."""
    per_step = A.adapted_accuracies(learner, val, run.inner_steps, run.seed)
    after = [row[-1] for row in per_step]
    point = {"iteration": it, "meta_val_accuracy": float(np.mean(after)),
             "meta_val_accuracy_step0": float(np.mean([row[0] for row in per_step])),
             "train_seconds": seconds, "per_episode": after}
    for key in ("meta_loss", "query_acc_before", "query_acc_after", "support_loss"):
        values = [m[key] for m in since if key in m]
        point[key] = float(np.mean(values)) if values else None
    return point


def _plateau(curve: list[dict], p: Preset) -> bool:
    """No gain > `min_gain` in the last `patience` evaluations over the best before them
    (at least `min_points` evaluations)."""
    if len(curve) < max(p.min_points, p.patience + 1):
        return False
    acc = [c["meta_val_accuracy"] for c in curve]
    return max(acc[-p.patience:]) <= max(acc[:-p.patience]) + p.min_gain


# ------------------------------------------------------------------------------------
# Protocol phases
# ------------------------------------------------------------------------------------

def main_comparison(study: Study) -> dict:
    """Phase 1 over the main shapes, in an order that leaves a usable table wherever the
    budget cuts it: (a) the frozen rows; (b) every method at the first grid point (inner
    lr, outer lr) on every seed, tested; (c) the rest of the grid on the first seed;
    (d) per shape and method the choice on meta-val among the grid points finished for
    every method (so a cut grid stays a fair one), retrained on the other seeds."""
    p = study.preset
    grid = list(itertools.product(p.inner_lrs, p.outer_lrs))

    def run(method, shape, point, seed):
        return Run(method, p.data, shape[0], shape[1], point[0], point[1], seed, p.inner_steps, p.head)

    frozen = {s: {name: [study.frozen(name, p.data, *s)] for name in FROZEN_METHODS} for s in p.main_shapes}
    for seed in p.seeds:  # (b)
        for shape in p.main_shapes:
            _train_and_test(study, [run(m, shape, grid[0], seed) for m in META_METHODS])
    for point in grid[1:]:  # (c)
        for shape in p.main_shapes:
            for m in META_METHODS:
                study.train(run(m, shape, point, p.seeds[0]))
    out = {}
    for shape in p.main_shapes:  # (d)
        cells = {(m, pt): study.train(run(m, shape, pt, p.seeds[0])) for m in META_METHODS for pt in grid}
        finished = [pt for pt in grid if all(cells[(m, pt)] is not None and cells[(m, pt)]["stopped"] != "budget"
                                             for m in META_METHODS)]
        selection, trained = {}, {}
        for m in META_METHODS:
            if not finished:
                continue
            pick, selection[m] = choose([(run(m, shape, pt, p.seeds[0]), cells[(m, pt)]) for pt in finished])
            trained[m] = _train_and_test(study, [dataclasses.replace(pick, seed=s) for s in p.seeds])
        out[shape] = {"n_way": shape[0], "k_shot": shape[1], "selection": selection,
                      "frozen": frozen[shape], "trained": trained,
                      "grid_finished": [list(pt) for pt in finished]}
    return out


def choose(cells: list[tuple[Run, dict]]) -> tuple[Run, list[dict]]:
    """The cheapest configuration within one standard error of the best meta-val accuracy.

    The standard error is the best configuration's, over its meta-val episodes; cost is the
    meta-training seconds to the best point (what the choice costs to reproduce)."""
    table = []
    for run, cell in cells:
        acc = np.asarray(cell["best_val_per_episode"], dtype=float)
        table.append({"inner_lr": run.inner_lr, "outer_lr": run.outer_lr,
                      "meta_val_accuracy": float(acc.mean()),
                      "se": float(acc.std(ddof=1) / np.sqrt(acc.size)) if acc.size > 1 else 0.0,
                      "best_iteration": cell["best"]["iteration"], "stopped": cell["stopped"],
                      "seconds_to_best": cell["best"]["train_seconds"], "run": run,
                      "curve": [{"iteration": c["iteration"], "meta_val_accuracy": c["meta_val_accuracy"]}
                                for c in cell["curve"]]})
    top = max(table, key=lambda r: r["meta_val_accuracy"])
    near = [r for r in table if r["meta_val_accuracy"] >= top["meta_val_accuracy"] - top["se"]]
    pick = min(near, key=lambda r: (r["seconds_to_best"], -r["meta_val_accuracy"]))
    for r in table:
        r["chosen"] = r is pick
    return pick["run"], [{k: v for k, v in r.items() if k != "run"} for r in table]


def positive_control(study: Study) -> dict | None:
    """Phase 2: head at zero (linear, Euclidean), many ways; full vs none on every seed."""
    c = study.preset.positive_control
    runs = {m: [Run(m, c["data"], c["n_way"], c["k_shot"], c["inner_lr"], c["outer_lr"], s,
                    c["inner_steps"], "euclidean", "zero") for s in study.preset.seeds]
            for m in ("melora", "fomaml_lora")}
    tested = {m: _train_and_test(study, rs) for m, rs in runs.items()}
    if not all(tested.values()):
        return None
    full, none = (_per_seed(tested[m]) for m in ("melora", "fomaml_lora"))
    seeds = min(len(full), len(none))
    full, none = full[:seeds], none[:seeds]
    import analysis
    a, b = np.mean(full, 0), np.mean(none, 0)
    return {"config": {**c, "head": "euclidean", "head_init": "zero", "seeds": list(study.preset.seeds[:seeds])},
            "full": float(a.mean()), "none": float(b.mean()), "diff": float(a.mean() - b.mean()),
            "p": analysis.wilcoxon_p(a, b), "ci95_seeds_diff": _ci_seeds(analysis, full - none, study.preset),
            "stopped": {m: [t[1]["stopped"] for t in tested[m]] for m in tested},
            "curves": {m: training_curve(tested[m]) for m in tested},
            "gradient_cosine_full_vs_none_at_start": gradient_cosine(study, runs["melora"][0]),
            "gradient_cosine_full_vs_none_trained": gradient_cosine(study, runs["melora"][0],
                                                                    tested["melora"][0][1])}


def training_curve(tested: list[tuple]) -> list[dict]:
    """Mean over seeds, at each evaluated iteration all seeds reached: meta-val accuracy after
    K steps, and the meta-train query accuracy after adaptation (the training tasks' view).
    Whether selection on meta-val can tell the methods apart rests on these two."""
    curves = [t["curve"] for _, t, _ in tested]
    common = sorted(set.intersection(*({c["iteration"] for c in curve} for curve in curves)))
    out = []
    for it in common:
        points = [next(c for c in curve if c["iteration"] == it) for curve in curves]
        train = [c.get("query_acc_after") for c in points]
        out.append({"iteration": it,
                    "meta_val_accuracy": float(np.mean([c["meta_val_accuracy"] for c in points])),
                    "meta_train_query_accuracy": None if None in train else float(np.mean(train))})
    return out


def gradient_cosine(study: Study, run: Run, trained: dict | None = None, tasks: int = 4) -> dict:
    """Cosine between the exact and the first-order meta-gradient on a few meta-train tasks,
    and the support loss there, at theta_0 (or at a `trained` cell's best theta): why full
    and none tie when they do."""
    import torch

    import trainer as T
    from dataset_loader import DatasetLoader
    learner = study.learner(run)
    if trained is not None:
        _load_theta(study, learner, trained)
    loader = DatasetLoader.from_config(learner.cfg, study.tokenizer(learner.cfg), ("meta_train",))
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
    cosines, lora, ratio, losses = [], [], [], []
    for t in range(tasks):
        ep = loader.episode("meta_train", t)
        s, q = learner.to_device(ep.support), learner.to_device(ep.query)
        grads = {}
        for method in ("full", "none"):
            metrics = {}
            _, g = T.compute_meta_gradient(learner.model, learner.theta, s, q, run.inner_lr,
                                           run.inner_steps, method, seed=t, head_init=run.head_init,
                                           metrics=metrics)
            grads[method] = {n: v.reshape(-1).double() for n, v in g.items()}
            losses.append(float(metrics.get("support_loss", float("nan"))))
        flat = {m: torch.cat(list(g.values())) for m, g in grads.items()}
        # the encoder's share (LoRA factors): the head's gradient can dominate the whole vector
        enc = {m: torch.cat([v for n, v in g.items() if "lora_" in n]) for m, g in grads.items()}
        cosines.append(cos(flat["full"], flat["none"]))
        lora.append(cos(enc["full"], enc["none"]) if enc["none"].norm() > 0 else float("nan"))
        ratio.append(float((enc["full"] - enc["none"]).norm() / enc["full"].norm().clamp(min=1e-30)))
    return {"cosine_mean": float(np.mean(cosines)), "cosines": cosines,
            "lora_cosine_mean": float(np.nanmean(lora)) if not all(np.isnan(lora)) else None,
            "lora_relative_second_order": float(np.mean(ratio)),
            "support_loss_mean": float(np.nanmean(losses)), "tasks": tasks}


def regime_map(study: Study) -> list[dict]:
    """Phase 3: full, none and proto_lora per cell, tested after K steps; Holm over all."""
    import analysis
    p, rows = study.preset, []
    for data, n, k, a, b in p.regime_cells:
        tested = {m: _train_and_test(study, [Run(m, data, n, k, a, b, s, p.inner_steps, p.head)
                                             for s in p.regime_seeds]) for m in META_METHODS}
        if not all(tested.values()):
            continue
        acc = {m: np.mean(_per_seed(t), 0) for m, t in tested.items()}
        rows.append({"data": data, "n_way": n, "k_shot": k, "inner_lr": a, "outer_lr": b,
                     "inner_steps": p.inner_steps, "seeds": list(p.regime_seeds),
                     **{m: float(acc[m].mean()) for m in acc},
                     "full_minus_none": float(acc["melora"].mean() - acc["fomaml_lora"].mean()),
                     "full_minus_proto_lora": float(acc["melora"].mean() - acc["proto_lora"].mean()),
                     "p_raw": {"none": analysis.wilcoxon_p(acc["melora"], acc["fomaml_lora"]),
                               "proto_lora": analysis.wilcoxon_p(acc["melora"], acc["proto_lora"])},
                     "stopped": {m: [t[1]["stopped"] for t in tested[m]] for m in tested},
                     "iterations": {m: [t[1]["iterations"] for t in tested[m]] for m in tested}})
    raw = {f"{i}:{m}": r["p_raw"][m] for i, r in enumerate(rows) for m in ("none", "proto_lora")
           if r["p_raw"][m] is not None}
    holm = analysis.holm_bonferroni(raw) if raw else {}
    for i, r in enumerate(rows):
        r["full"], r["none"] = r.pop("melora"), r.pop("fomaml_lora")
        r["p_holm"] = {m: holm.get(f"{i}:{m}") for m in ("none", "proto_lora")}
    return rows


def equal_compute(study: Study, main: dict) -> dict:
    """Phase 4: proto_lora and fomaml_lora meta-trained for MELoRA's seconds, per seed."""
    out = {}
    melora = {r.seed: trained for r, trained, _ in main["trained"].get("melora", [])}
    for method in EQUAL_COMPUTE:
        seeds = []
        for run, _, _ in main["trained"].get(method, []):
            if run.seed not in melora:
                continue
            r = dataclasses.replace(run, seconds=round(melora[run.seed]["train_seconds"], 1))
            trained = study.train(r)
            tested = study.test(r, trained) if trained is not None else None
            if tested is not None:
                seeds.append((r, trained, tested))
        if seeds:
            out[f"{method}_equal_compute"] = seeds
    return out


def _train_and_test(study: Study, runs: list[Run]) -> list[tuple]:
    out = []
    for r in runs:
        trained = study.train(r)
        tested = study.test(r, trained) if trained is not None else None
        if tested is not None:
            out.append((r, trained, tested))
    return out


def _per_seed(tested: list[tuple], step: int = -1) -> np.ndarray:
    """(seeds, episodes) accuracy at adaptation step `step` (-1: after K)."""
    return np.asarray([[row[step] for row in t["per_episode_accuracy_per_step"]] for _, _, t in tested])


def _ci_seeds(analysis, matrix: np.ndarray, p: Preset) -> list[float]:
    return list(analysis.bootstrap_ci_seeds(matrix, n_resamples=p.bootstrap_samples))


# ------------------------------------------------------------------------------------
# Summaries
# ------------------------------------------------------------------------------------

def summarize(study: Study, main: dict, extra_rows: dict) -> dict:
    """Rows (mean over seeds, sd, CIs, step 0) and MELoRA against every row."""
    import analysis
    p = study.preset
    rows, matrices, seeds = {}, {}, {}
    for name, cells in main["frozen"].items():
        if cells[0] is None:
            continue
        m = np.asarray([[row[0] for row in cells[0]["per_episode_accuracy_per_step"]]])
        matrices[name] = m
        rows[name] = _row(analysis, p, m, m, config={"frozen": True}, curve=[])
    for name, tested in {**main["trained"], **extra_rows}.items():
        if not tested:
            continue
        after, step0 = _per_seed(tested), _per_seed(tested, 0)
        matrices[name] = after
        seeds[name] = [r.seed for r, _, _ in tested]
        run, first = tested[0][0], tested[0][1]
        config = {k: v for k, v in dataclasses.asdict(run).items() if k not in ("seed",)}
        rows[name] = _row(analysis, p, after, step0, config=config, curve=first["curve"])
        rows[name].update(
            stopped=[t["stopped"] for _, t, _ in tested], iterations=[t["iterations"] for _, t, _ in tested],
            best_iteration=[t["best"]["iteration"] for _, t, _ in tested],
            train_seconds=[t["train_seconds"] for _, t, _ in tested],
            seconds_per_meta_iteration=float(np.mean([t["seconds_per_meta_iteration"] for _, t, _ in tested])))
    return {"methods": rows, "comparisons": compare(analysis, p, matrices, seeds)}


def _row(analysis, p: Preset, after: np.ndarray, step0: np.ndarray, config: dict, curve: list) -> dict:
    from evaluation import ACCURACY_BOUNDS
    seed_acc = after.mean(1)
    mean, lo, hi = analysis.mean_ci(after.mean(0).tolist(), 0.95, ACCURACY_BOUNDS)
    return {"accuracy_mean": float(seed_acc.mean()),
            "accuracy_sd": float(seed_acc.std(ddof=1)) if seed_acc.size > 1 else 0.0,
            "seed_accuracies": seed_acc.tolist(), "ci95": [lo, hi],
            "ci95_seeds": _ci_seeds(analysis, after, p),
            "accuracy_step0": float(step0.mean()), "accuracy_step0_seeds": step0.mean(1).tolist(),
            "episodes": int(after.shape[1]), "config": config, "curve": curve}


def compare(analysis, p: Preset, matrices: dict, seeds: dict) -> dict:
    """MELoRA - row: per-episode paired tests (mean over seeds; Holm over every row) and the
    difference's bootstrap over seeds and episodes, on the seeds both rows ran. `seeds`: each
    trained row -> its seeds in matrix order; a frozen row, absent from it, has one seed-free
    matrix that pairs with all of MELoRA's. A row that ran fewer seeds is compared on those
    only, so an unfinished row is never set against MELoRA's mean over seeds it did not run."""
    if "melora" not in matrices or len(matrices) < 2:
        return {}

    def on(name: str, common: tuple) -> np.ndarray:
        m = matrices[name]
        return m if name not in seeds else m[[seeds[name].index(s) for s in common]]

    groups: dict[tuple, list[str]] = {}  # the seeds MELoRA shares with a row -> those rows
    for name in matrices:
        common = tuple(s for s in seeds["melora"] if s in seeds.get(name, seeds["melora"]))
        if name != "melora" and common:
            groups.setdefault(common, []).append(name)
    rows = []
    for common, names in groups.items():
        pooled = {n: {"per_episode_accuracy": on(n, common).mean(0).tolist()} for n in ("melora", *names)}
        rows += [dict(r, seeds=list(common)) for r in analysis.compare_methods(
            {"methods": pooled}, reference="melora", confidence=0.95, n_resamples=p.bootstrap_samples)]
    holm_w = analysis.holm_bonferroni({r["method"]: r["wilcoxon_p_value"] for r in rows})
    holm_t = analysis.holm_bonferroni({r["method"]: r["t_p_value"] for r in rows})
    out = {}
    for row in sorted(rows, key=lambda r: list(matrices).index(r["method"])):
        name, common = row["method"], row["seeds"]
        diff = on("melora", common) - on(name, common)  # a frozen row broadcasts over seeds
        out[name] = {"diff": row["mean_diff"], "p_holm": holm_w[name], "p_holm_ttest": holm_t[name],
                     "ci95_diff": [row["ci_low"], row["ci_high"]],
                     "ci95_seeds_diff": _ci_seeds(analysis, diff, p), "n_episodes": row["n_episodes"],
                     "seeds": common}
    return out


# ------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------

def plan(p: Preset) -> str:
    """The phases and cells of `p`, in priority order (`--plan`)."""
    grid = len(p.inner_lrs) * len(p.outer_lrs)
    trainings = len(p.main_shapes) * len(META_METHODS) * (grid + len(p.seeds) - 1)
    lines = [f"preset {p.name}: {p.model} on {p.data} class split {p.split}, LoRA blocks "
             f"{list(p.lora_layers)}, {p.max_length} tokens, {p.q_query} queries, K = {p.inner_steps}",
             f"  1. main comparison {', '.join(f'{n}w{k}s' for n, k in p.main_shapes)}: "
             f"{', '.join(FROZEN_METHODS)} frozen; {', '.join(META_METHODS)} at inner lr "
             f"{p.inner_lrs[0]:g}, outer lr {p.outer_lrs[0]:g} on seeds {list(p.seeds)}; then inner lr "
             f"{list(p.inner_lrs)} x outer lr {list(p.outer_lrs)} on seed {p.seeds[0]}, the choice "
             f"on seeds {list(p.seeds)}: <= {trainings} trainings of <= {p.max_iterations} iterations "
             f"(meta-val every {p.eval_every} on {p.val_episodes} episodes; plateau: no gain > "
             f"{100 * p.min_gain:g} pp over {p.patience} evaluations); {p.test_episodes} test episodes",
             f"  2. positive control: {p.positive_control}, head euclidean from zero, full vs none, "
             f"seeds {list(p.seeds)}",
             f"  3. regime map: {len(p.regime_cells)} cells (data, ways, shots, inner lr, outer lr) "
             f"x full/none/proto_lora x seeds {list(p.regime_seeds)}: {list(p.regime_cells)}",
             f"  4. equal compute: {', '.join(EQUAL_COMPUTE)} for MELoRA's seconds, per main shape and seed"]
    lines += [f"  cut: {c}" for c in p.cuts]
    return "\n".join(lines)


PHASES = ("main", "positive_control", "regime_map", "equal_compute")


def run_study(p: Preset, work: Path, output: Path, device: str = "auto", extra: Sequence[str] = (),
              budget_minutes: float | None = None, phases: Sequence[str] = PHASES,
              shard: tuple[int, int] = (0, 1)) -> dict:
    """The whole study in priority order; writes (and returns) the results JSON and MD.

    `phases` computes only those phases; the others report their cells already saved under
    `work` (so several processes, each with its own phases, can share one work folder, and
    `phases=()` rebuilds the report from the saved cells alone). `shard` (i, n) computes only
    the cells that `Study.mine` gives to process i of n sharing `work`."""
    from tqdm import tqdm

    from utils import atomic_write_json, atomic_write_text
    budget = Budget(budget_minutes)
    study = Study(p, work, device, extra, budget, shard)
    from utils import resolve_device
    cfg = study.config(p.data, *p.main_shapes[0])  # a bad --set or data fails here, before any work
    resolve_device(cfg.training.device)            # so does --device cuda without a GPU
    print(plan(p), flush=True)
    work.mkdir(parents=True, exist_ok=True)
    ends = {"start": budget.elapsed()}  # elapsed seconds at the end of each phase
    computed = phases
    phases = tqdm(total=len(p.main_shapes) + 3, desc="accuracy study", unit="phase", dynamic_ncols=True)
    budget.paused = "main" not in computed
    mains = main_comparison(study)  # 1
    ends["main_comparison"] = budget.elapsed()
    phases.update(len(p.main_shapes))
    budget.paused = "positive_control" not in computed
    control = positive_control(study)  # 2
    ends["positive_control"] = budget.elapsed()
    phases.update()
    budget.paused = "regime_map" not in computed
    rmap = regime_map(study)  # 3
    ends["regime_map"] = budget.elapsed()
    phases.update()
    budget.paused = "equal_compute" not in computed
    equal = {shape: equal_compute(study, mains[shape]) for shape in p.main_shapes}  # 4
    ends["equal_compute"] = budget.elapsed()
    budget.paused = False
    phases.update()
    phases.close()
    settings = {}
    for shape, m in mains.items():
        s = summarize(study, m, equal[shape])
        settings[f"{shape[0]}way{shape[1]}shot"] = {"n_way": shape[0], "k_shot": shape[1],
                                                    "selection": m["selection"],
                                                    "grid_finished": m["grid_finished"], **s}
    primary = settings[f"{p.main_shapes[0][0]}way{p.main_shapes[0][1]}shot"]
    result = {"format": STUDY_FORMAT, "preset": p.name, "model": p.model, "data": p.data,
              "class_split": p.split, "device": device, "seeds": list(p.seeds),
              "primary_setting": f"{p.main_shapes[0][0]}way{p.main_shapes[0][1]}shot",
              "methods": primary["methods"], "comparisons": primary["comparisons"],
              "settings": settings, "positive_control": control, "regime_map": rmap,
              "budget": {"minutes": budget_minutes, "elapsed_seconds": budget.elapsed(),
                         "complete": not budget.not_run, "ran": budget.ran,
                         "not_run": list(dict.fromkeys(budget.not_run)), "phase_ends_seconds": ends},
              "protocol": {k: v for k, v in dataclasses.asdict(p).items() if k not in ("cuts", "name")},
              "plateau_rule": f"stop when the last {p.patience} meta-val evaluations gain no more than "
                              f"{100 * p.min_gain:g} pp over the best before them (>= {p.min_points} "
                              f"evaluations, every {p.eval_every} iterations; cap {p.max_iterations})",
              "selection_rule": "per method on seed 0's meta-val, among the grid points finished for "
                                "every method: the least training time to its best point among "
                                "configurations within one standard error of the best",
              "cuts": list(p.cuts), "extra_overrides": list(extra)}
    output.parent.mkdir(parents=True, exist_ok=True)
    result["figures"] = plot_curves(result, output)
    atomic_write_json(output, result)
    table = format_tables(result)
    atomic_write_text(output.with_suffix(".md"), table)
    print(table)
    print(f"wrote {output}, {output.with_suffix('.md')}" + "".join(f", {output.with_name(f)}"
                                                                   for f in result["figures"]))
    return result


# ------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------

def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def format_tables(r: dict) -> str:
    """accuracy.md: per main shape the rows and the meta-val selection, the positive
    control and the regime map."""
    b = r["budget"]
    lines = [f"# Accuracy study ({r['preset']} preset, {r['model']} on {r['data']} class split "
             f"{r['class_split']}, device {r['device']})", "",
             f"Plateau rule: {r['plateau_rule']}. Choice: {r['selection_rule']}.", ""]
    if r["cuts"]:
        lines += ["Cut from the full protocol: " + "; ".join(r["cuts"]) + ".", ""]
    spent = ("report of the saved cells (no phase ran)" if b["minutes"] is None
             else f"{b['minutes']} min, {b['elapsed_seconds']:.0f} s used")
    lines += [f"Budget: {spent}; "
              + ("every cell ran." if b["complete"] else
                 f"**{len(b['not_run'])} cells did not run** (listed in the JSON under budget.not_run)."), ""]
    for key, s in r["settings"].items():
        lines += [f"## {s['n_way']}-way {s['k_shot']}-shot meta-test (seeds {r['seeds']})", "",
                  "| Method | Accuracy after K (%, mean ± sd) | step 0 (%) | 95% CI episodes | 95% CI seeds+episodes "
                  "| MELoRA - method (pp) | Holm p | CI seeds (pp) | stopped | iterations |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, m in s["methods"].items():
            c = s["comparisons"].get(name)
            diff = "-" if c is None else f"{100 * c['diff']:+.2f}"
            if c is not None and c.get("seeds") is not None and len(c["seeds"]) < len(r["seeds"]):
                diff += f" (seeds {c['seeds']} only)"
            pv = "-" if c is None or c["p_holm"] is None else f"{c['p_holm']:.4f}"
            cs = "-" if c is None else f"[{100 * c['ci95_seeds_diff'][0]:+.2f}, {100 * c['ci95_seeds_diff'][1]:+.2f}]"
            lines.append(f"| {name} | {100 * m['accuracy_mean']:.2f} ± {100 * m['accuracy_sd']:.2f} | "
                         f"{100 * m['accuracy_step0']:.2f} | [{100 * m['ci95'][0]:.2f}, {100 * m['ci95'][1]:.2f}] | "
                         f"[{100 * m['ci95_seeds'][0]:.2f}, {100 * m['ci95_seeds'][1]:.2f}] | {diff} | {pv} | {cs} | "
                         f"{','.join(m.get('stopped', ['-']))} | {m.get('iterations', '-')} |")
        lines += ["", "Meta-val selection (seed 0):", "",
                  "| Method | inner lr | outer lr | meta-val (%) | SE | best at | stopped | chosen |",
                  "|---|---|---|---|---|---|---|---|"]
        for method, table in s["selection"].items():
            for t in table:
                lines.append(f"| {method} | {t['inner_lr']:g} | {t['outer_lr']:g} | {100 * t['meta_val_accuracy']:.2f} "
                             f"| {100 * t['se']:.2f} | {t['best_iteration']} | {t['stopped']} | "
                             f"{'yes' if t['chosen'] else ''} |")
        lines.append("")
    pc = r["positive_control"]
    lines += ["## Positive control (linear head from zero)", ""]
    if pc is None:
        lines += ["Did not run (budget).", ""]
    else:
        g = pc["gradient_cosine_full_vs_none_at_start"]
        lines += [f"{pc['config']}: full {100 * pc['full']:.2f}, none {100 * pc['none']:.2f}, "
                  f"diff {100 * pc['diff']:+.2f} pp, p = {pc['p']}, CI seeds {pc['ci95_seeds_diff']}; "
                  f"meta-gradient cosine(full, none) at theta_0 {g['cosine_mean']:.5f} (LoRA factors only: "
                  f"{g['lora_cosine_mean']}, |full - none| / |full| {g['lora_relative_second_order']:.4f}), "
                  f"support loss {g['support_loss_mean']:.4f}; at the trained theta "
                  f"{pc['gradient_cosine_full_vs_none_trained']['cosine_mean']:.5f}.", ""]
        curves = pc.get("curves") or {}
        if curves:
            lines += ["Along training (mean over seeds; selection keeps each method's best meta-val point):", "",
                      "| iteration | " + " | ".join(f"{m} meta-val (%) | {m} meta-train query (%)" for m in curves) + " |",
                      "|---|" + "---|---|" * len(curves)]
            for i, point in enumerate(next(iter(curves.values()))):
                cells = []
                for m, curve in curves.items():
                    c = curve[i] if i < len(curve) else {}
                    cells += [_pct(c.get("meta_val_accuracy")), _pct(c.get("meta_train_query_accuracy"))]
                lines.append(f"| {point['iteration']} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Regime map (meta-test after K steps; Holm over all cells)", "",
              "| data | ways | shots | inner lr | outer lr | full | none | proto_lora | full - none | Holm p | "
              "full - proto_lora | Holm p |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in r["regime_map"]:
        ph = c["p_holm"]
        lines.append(f"| {c['data']} | {c['n_way']} | {c['k_shot']} | {c['inner_lr']:g} | {c['outer_lr']:g} | "
                     f"{100 * c['full']:.2f} | {100 * c['none']:.2f} | {100 * c['proto_lora']:.2f} | "
                     f"{100 * c['full_minus_none']:+.2f} | {_p(ph['none'])} | "
                     f"{100 * c['full_minus_proto_lora']:+.2f} | {_p(ph['proto_lora'])} |")
    return "\n".join(lines) + "\n"


def _p(p) -> str:
    return "-" if p is None else f"{p:.4f}"


def plot_curves(result: dict, output: Path) -> list[str]:
    """Meta-val accuracy against meta-iterations for every seed-0 selection run, one panel
    per main shape: `<output stem>_curves.png` beside the JSON."""
    from matplotlib.figure import Figure
    settings = result["settings"]
    if not settings:
        return []
    fig = Figure(figsize=(5.5 * len(settings), 4.2), constrained_layout=True)
    axes = fig.subplots(1, len(settings), squeeze=False)[0]
    for ax, (key, s) in zip(axes, settings.items()):
        for i, (method, table) in enumerate(s["selection"].items()):
            for t in table:  # every grid point; the chosen one solid
                ax.plot([c["iteration"] for c in t["curve"]], [100 * c["meta_val_accuracy"] for c in t["curve"]],
                        color=f"C{i}", ls="-" if t["chosen"] else ":", marker="o", ms=2.5,
                        label=f"{method} outer lr {t['outer_lr']:g}" + (" (chosen)" if t["chosen"] else ""))
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel("meta-val accuracy after K steps (%)")
        ax.set_title(f"{s['n_way']}-way {s['k_shot']}-shot, seed 0, every grid point", fontsize=9)
        ax.legend(fontsize=7)
    path = output.with_name(f"{output.stem}_curves.png")
    fig.savefig(path, dpi=110)
    return [path.name]


# ------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------

def _save_tensors(path: Path, tensors: dict) -> None:
    import io

    import torch

    from utils import atomic_write_bytes
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def _load_tensors(path: Path, like: dict) -> dict:
    import torch
    tensors = torch.load(path, map_location="cpu", weights_only=True)
    if set(tensors) != set(like):
        raise ValueError(f"{path} holds other tensors than the model's theta; delete it to retrain")
    return {n: t.to(like[n].device, like[n].dtype) for n, t in tensors.items()}


def _load_theta(study: Study, learner, trained: dict) -> None:
    """Copy a training cell's best theta into `learner`'s LoRA and head tensors.

    The cells' JSON is committed without their `.pt` files (git keeps the study resumable
    across sessions without megabytes of tensors): a missing theta is trained again, which
    gives the same tensors (every training is seeded)."""
    import torch
    path = study.work / "train" / trained["theta_file"]
    if not path.exists():
        _save_tensors(path, meta_train(study, Run(**trained["spec"]["run"]))[1])
    theta = _load_tensors(path, learner.theta)
    with torch.no_grad():
        for name, t in learner.theta.items():
            t.copy_(theta[name])
