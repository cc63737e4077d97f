"""Few-shot evaluation of a MELoRA checkpoint against the baselines, on fixed episodes.

    python main.py --mode evaluate --checkpoint results/melora/checkpoints/checkpoint_iter_1000.pt
    python main.py --mode evaluate --checkpoint CKPT --skip_baselines --set evaluation.num_episodes=50

The protocol (a fair fight: only meta-learning separates the methods):

- the same pretrained model, the same `evaluation.num_episodes` meta-test episodes in
  the same order (their spec is saved as `<run>/meta_test_episodes.json`, so analysis
  can pair them and a later run can repeat them), K =
  `meta_learning.inner.default_num_steps` adaptation steps; accuracy is reported after
  K steps, and per step for 0..max(K, `evaluation.adaptation_steps`);
- one head init for every gradient-based baseline (`evaluation.head_init`: support
  prototypes computed with dropout off, or zero); MELoRA keeps its training's;
- equal budgets: every meta-learned baseline meta-trains for
  `evaluation.baseline_meta_iterations` iterations (0 = MELoRA's own count) at MELoRA's
  meta-batch size;
- each baseline's inner rate (and outer rate if it meta-trains) is chosen on meta-val
  episodes by `evaluation.tuning_trials` Optuna trials (TPE, the configured rates first);
  MELoRA's rates are its checkpoint's (tuned by `--hyperparameter_search`);
- `evaluation.seeds` trainings of every meta-learned method (MELoRA: seed 0 is the
  checkpoint, the others retrain it with its config): per-episode accuracies are
  averaged over seeds for the CIs and paired tests, and the spread across seeds is
  reported (`seed_accuracies`, `accuracy_sd`).

Memory: each phase of a method is measured in a `utils.MemoryWindow` (the benchmarks'
instrument; `memory_method` in the results):

- CUDA: `torch.cuda.max_memory_allocated` in the window;
- CPU, `evaluation.child_process: true`: each method runs in a freshly spawned process
  with glibc's mmap threshold fixed (freed tensors leave the resident set), and
  `peak_memory_mb` is the process's peak RSS over its phases, interpreter and libraries
  included;
- CPU, `child_process: false`: the RSS increase over the method's start (for tests).

`meta_step_peak_memory_mb` is the extra peak of one meta-training step over the memory
before it, with the Hessian method that step used (`meta_step_hessian`); MELoRA's is
measured with its configured method and with `full` (`meta_step_peak_memory_mb_by_hessian`).

Writes `<run>/results.json` (schema: analysis.py's module docstring, plus the keys
documented in `run_evaluation`), logs to `<run>/evaluation/` (metrics.jsonl, MLflow,
TensorBoard) and prints the results table. The checkpoint is only read.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from tqdm import tqdm

import analysis
import baseline as B
import model as M
from config import Config, Rules, checkpoint_config, load_config_with_base, register_rules
from dataset_loader import DatasetLoader
from metrics import MetricsSink
from runs import load_checkpoint, saved_config
from trainer import MetaTrainer, restore_model, val_summary
from utils import (ConfigError, MemoryWindow, RunInterrupted, UserError, atomic_write_json, episode_seed,
                   fix_mmap_threshold, gather_to_main, is_main_process, rank, rank_device,
                   resident_memory_bytes, resolve_device, run_on_main, set_seed, thread_budget,
                   world_size)

log = logging.getLogger("melora")

RESULTS_FILE, EPISODE_SPEC = analysis.RESULTS_FILE, analysis.EPISODE_SPEC
SINK_DIR = "evaluation"       # metrics of evaluation, apart from the training run's
SEED_EPISODE_STRIDE = 10_000_019  # seed s meta-trains on meta-train episodes s * stride + i
ACCURACY_BOUNDS = (0.0, 1.0)  # confidence intervals of an accuracy stay inside [0, 1]
PARTIAL_RESULTS_FILE = "results.partial.json"  # raw accuracies, when the statistics fail
PARENT_POLL_S = 0.5           # how often a pool worker checks that its parent still runs


def check_search(cfg) -> None:
    """Fail fast on a search setting that cannot work, naming the key: its ranges (also
    checked at load time) and the meta-validation tasks it scores trials on."""
    _validate_search(cfg.analysis.hyperparameter_search.to_dict())
    if not cfg.datasets.synthetic_only and not cfg.datasets.meta_val:
        raise ConfigError("the hyperparameter search scores trials on meta-validation tasks, "
                          "but datasets.meta_val lists no source; add one, or use --synthetic_only")


def _validate_search(s: Mapping) -> None:
    """The search ranges of `analysis.hyperparameter_search` (Optuna's and evaluation's tuning)."""
    key = "analysis.hyperparameter_search"
    for name in ("inner_lr", "outer_lr"):
        r = s[name]
        if not (isinstance(r, list) and len(r) == 2 and 0 < r[0] <= r[1]):
            raise ConfigError(f"{key}.{name} must be [low, high] with 0 < low <= high "
                              f"(a log-uniform range), got {r!r}")
    r = s["inner_steps"]
    if not (isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r) and 1 <= r[0] <= r[1]):
        raise ConfigError(f"{key}.inner_steps must be [low, high] integers with 1 <= low <= high, got {r!r}")
    if not (isinstance(s["lora_rank"], list) and s["lora_rank"]
            and all(isinstance(v, int) and v > 0 for v in s["lora_rank"])):
        raise ConfigError(f"{key}.lora_rank must be a non-empty list of positive integers, "
                          f"got {s['lora_rank']!r}")
    for name in ("report_every", "val_episodes"):
        if s[name] < 1:
            raise ConfigError(f"{key}.{name} must be a positive integer, got {s[name]!r}")
    for name in ("num_iterations", "pruner_startup_trials"):
        if s[name] < 0:
            raise ConfigError(f"{key}.{name} must be >= 0, got {s[name]!r}")


register_rules("evaluation", Rules(
    check=lambda data: _validate_search(data["analysis"]["hyperparameter_search"]), whole_run=True))


# ------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------

def run_evaluation(cfg: Config, checkpoint: str | os.PathLike | None, skip_baselines: bool,
                   run_dir: str | os.PathLike, config_file: str | os.PathLike | None = None,
                   explicit_overrides: Mapping | None = None) -> dict:
    """Evaluate a checkpoint (and the baselines) on the fixed meta-test episodes.

    The config is the checkpoint's (model, data, tasks, inner loop), with `cfg`'s
    evaluation, tracking, analysis, device and output-folder keys, and every key the user
    named (`config_file` and `explicit_overrides`, as main passes them; without them,
    every key `cfg` sets to a non-default value) on top; keys that define the model stay
    the checkpoint's (`config.checkpoint_config`).

    Args:
        cfg: the validated config of the command line.
        checkpoint: a `checkpoint_iter_N.pt` written by training.
        skip_baselines: evaluate MELoRA only.
        run_dir: where results.json, the episode spec and the metrics go.
        config_file, explicit_overrides: the `--config` file and the flags/`--set` keys
            the user gave.

    Returns:
        The results dict written to `<run_dir>/results.json`: analysis.py's schema, plus
        `checkpoint`, `config`, `memory_method`, `reported_step`, `steps`, and per method
        `per_episode_accuracy_per_step` (averaged over seeds), `per_seed_episode_accuracy`,
        `seeds`, `seed_accuracies`, `accuracy_sd`, `head_init`, `inner_lr`, `outer_lr`,
        `tuning_trials`, `tuning`, `meta_step_peak_memory_mb`, `meta_step_hessian`,
        `meta_step_peak_memory_mb_by_hessian`, `adapt_peak_memory_mb`,
        `meta_train_iterations`, `meta_train_seconds`, `trainable_parameters`,
        `total_parameters`.

    Under torchrun every rank adapts on its share of the episodes (strided, seeds per
    episode unchanged) and rank 0 gathers the results and writes them; the other ranks
    return {}.

    Raises:
        UserError: no checkpoint, a missing, truncated or foreign checkpoint, a model
            other than the checkpoint's, an unknown baseline name, or tuning without
            meta-validation tasks.
    """
    if checkpoint is None:
        raise UserError("--mode evaluate needs --checkpoint PATH (a checkpoints/"
                        "checkpoint_iter_N.pt file of a training run)")
    run_dir = Path(run_dir)
    cfg, state = evaluation_checkpoint(checkpoint, cfg, config_file, explicit_overrides)
    methods = ["melora"] + ([] if skip_baselines else _baseline_names(cfg))
    _check_tuning(cfg, methods)
    if "fomaml_lora" in methods and cfg.memory_optimization.hessian_approximation.method == "none":
        log.info("MELoRA is first order here (hessian_approximation.method: none, the default), as is "
                 "fomaml_lora: their difference is rates only. To measure what the exact meta-gradient "
                 "adds, train with --set memory_optimization.hessian_approximation.method=full")
    # 1. The fixed episodes, saved once so every method (and a later run) uses them.
    spec = run_on_main(prepare_episodes, cfg, run_dir, baselines=len(methods) > 1)
    # 2. Each method in a window of its own (a child process on CPU, by default).
    job = {"config": cfg.to_dict(), "checkpoint": str(checkpoint), "spec": str(spec),
           "share": [rank(), world_size()], "melora_iterations": int(state.get("iteration", 0)),
           "threads": thread_budget()}
    raw = {}
    for name in methods:
        log.info("evaluating %s on %d episodes", name, cfg.evaluation.num_episodes)
        shares = gather_to_main(_run_job({**job, "method": name}, cfg))  # rank 0 gets all
        raw[name] = _merge_shares(shares) if shares is not None else None
    if not is_main_process():
        return {}
    # 3. Statistics, results.json, metrics and the table.
    try:
        results = summarize(raw, cfg, checkpoint, spec)
    except Exception as e:  # the episodes' accuracies are not lost with the statistics
        partial = run_dir / PARTIAL_RESULTS_FILE
        atomic_write_json(partial, {"error": f"{type(e).__name__}: {e}", "checkpoint": str(checkpoint),
                                    "config": cfg.to_dict(), "methods": raw})
        log.error("the statistics failed; every episode's accuracy is kept in %s", partial)
        raise
    atomic_write_json(run_dir / RESULTS_FILE, results)
    _log_metrics(results, cfg, run_dir)
    print(format_tables(results))
    for line in (frozen_comparison(results), val_summary(state)):  # issue 30: say when it hurts
        if line:
            print(line)
    log.info("results: %s", run_dir / RESULTS_FILE)
    return results


def evaluation_checkpoint(checkpoint: str | os.PathLike, cfg: Config, config_file=None,
                          explicit_overrides: Mapping | None = None) -> tuple[Config, dict]:
    """(config, state) of a checkpoint to evaluate or adapt: its state read by
    `runs.load_checkpoint`, its config by `evaluation_config` (`config_file`,
    `explicit_overrides`: what main passes).

    Raises:
        UserError: a missing, truncated or foreign checkpoint, another model or LoRA rank
            asked for.
    """
    state = load_checkpoint(checkpoint)
    return evaluation_config(cfg, state, checkpoint, config_file, explicit_overrides), state


def evaluation_config(cfg: Config, state: Mapping, checkpoint, config_file=None,
                      explicit_overrides: Mapping | None = None) -> Config:
    """The checkpoint's config, with the command line's run-control keys (evaluation,
    tracking, analysis, device, output folder) and the keys the user named (`config_file`,
    `explicit_overrides`; None: those of `cfg` that differ from config.yml) applied on top:
    `config.checkpoint_config`'s rule.

    Raises:
        UserError: `cfg` asks for another model or LoRA rank than the checkpoint's.
    """
    return checkpoint_config(saved_config(state, checkpoint), config_file, explicit_overrides,
                             "evaluate", checkpoint, current=cfg)


def prepare_episodes(cfg: Config, run_dir: Path, baselines: bool) -> Path:
    """Save (or check) the fixed meta-test episode spec and fill the tokenisation cache."""
    spec = run_dir / EPISODE_SPEC
    _check_spec(spec, cfg)
    _, tokenizer = M.load_model(cfg.models.selected_model, cfg.tasks.n_way)
    loader = _loader(cfg, tokenizer, baselines)
    loader.fixed_episodes("meta_test", cfg.evaluation.num_episodes, spec)
    return spec


def budget(name: str, cfg: Config, melora_iterations: int) -> int:
    """Meta-training iterations of a method: MELoRA's own count for MELoRA and, unless
    `evaluation.baseline_meta_iterations` sets another, for every meta-learned baseline."""
    if name == "melora":
        return melora_iterations
    if name not in B.META_LEARNED:
        return 0
    return cfg.evaluation.baseline_meta_iterations or melora_iterations


def seed_config(cfg: Config, s: int) -> Config:
    """The config of training seed s: `training.seed` + s (LoRA init, dropout, order)."""
    return cfg if s == 0 else load_config_with_base(
        cfg.to_dict(), None, {"training.seed": cfg.training.seed + s})


class SeedEpisodes:
    """A loader whose meta-train episode i is the base loader's s * stride + i: another
    seed meta-trains on other tasks of the same distribution; every other split (the
    meta-test episodes, meta-val) is the base loader's, unchanged."""

    def __init__(self, loader, s: int):
        self.loader, self.offset = loader, s * SEED_EPISODE_STRIDE

    def episode(self, split: str, index: int):
        return self.loader.episode(split, index + (self.offset if split == "meta_train" else 0))

    def __getattr__(self, name):
        return getattr(self.loader, name)


# ------------------------------------------------------------------------------------
# One method (runs in a child process when evaluation.child_process is true)
# ------------------------------------------------------------------------------------

def evaluate_method(job: Mapping[str, Any]) -> dict:
    """Tune one method's rates, meta-train it once per seed, adapt on every episode.

    Args:
        job: `method`, `config` (a plain dict), `checkpoint`, `spec` (the episode spec),
            `in_process` (measure RSS increases instead of process peaks), `share`
            ([rank, world size]: adapt on episodes rank, rank + world size, ...),
            `melora_iterations` (the checkpoint's meta-iterations: the budget).
            `threads` (torch threads of a child process: its share of the cores, as
            `utils.thread_budget`; the parent waits meanwhile).

    Shows a progress bar of the episodes (done, s/episode, ETA) on stderr, from a child
    process too (it writes to the inherited stderr); under torchrun, rank 0's share.

    Returns:
        Raw per-seed, per-episode accuracies per step, rates, timings and memory readings.
    """
    cfg, name = Config(job["config"]), job["method"]
    if not job["in_process"]:
        fix_mmap_threshold()  # freed tensors leave RSS, as in benchmarks/ (utils.MemoryWindow)
        if job.get("threads"):
            torch.set_num_threads(job["threads"])  # a child: its share of the cores, not all
    device = rank_device(resolve_device(cfg.training.device))
    windows: list[MemoryWindow] = []

    def window() -> MemoryWindow:  # in-process (tests): no gc pass over the big heap
        windows.append(MemoryWindow(device, collect=not job["in_process"]))
        return windows[-1]

    origin = resident_memory_bytes() / 2**20 if device.type == "cpu" and job["in_process"] else 0.0
    meta_learned = name == "melora" or name in B.META_LEARNED
    show = job["share"][0] == 0  # progress bars: rank 0's share only
    iterations = budget(name, cfg, job["melora_iterations"])
    out: dict[str, Any] = {"meta_train_iterations": iterations}
    # 1. Setup: the episodes (from the saved spec) and the meta-train/val tasks.
    with window():
        loader, episodes = _episodes(name, cfg, job["spec"], iterations)
    # 2. Rates: tuned on meta-val (baselines), or the configured / checkpoint's ones.
    with window():
        rates = tune_rates(name, cfg, loader, device, iterations) if _tuned(name, cfg) \
            else {"inner_lr": None, "outer_lr": None, "tuning_trials": 0, "tuning": []}
    steps = max(cfg.meta_learning.inner.default_num_steps, cfg.evaluation.adaptation_steps)
    mine = range(job["share"][0], len(episodes), job["share"][1])  # this rank's episodes
    per_seed, seconds, train_seconds = [], [], []
    for s in range(cfg.evaluation.seeds if meta_learned else 1):
        # 3. The method of seed s (MELoRA: s = 0 is the checkpoint, others retrain it).
        with window():
            method, train_s = build_method(name, cfg, job["checkpoint"], device, s, iterations,
                                           loader, rates)
        if s == 0:
            out.update(_memory_reference(name, method, rates, episodes[0], window,
                                         cfg.evaluation.memory_profiling))
        # 4. Meta-training (baselines; MELoRA's retrains are timed in build_method).
        start = time.perf_counter()
        todo = iterations if name != "melora" else 0
        label = f"{name} seed {s}" if meta_learned and cfg.evaluation.seeds > 1 else name
        with window(), _counting_meta_steps(method, label, todo, show):
            method.meta_train(SeedEpisodes(loader, s), todo, cfg.meta_learning.default_meta_batch_size)
        if name != "melora" or s > 0:  # MELoRA's seed 0 is the checkpoint: not timed here
            train_seconds.append(train_s + time.perf_counter() - start)
        # 5. Adaptation on every episode of this rank.
        accuracies, per_episode, adapt = _adapt_episodes(method, episodes, mine, steps,
                                                         cfg.training.seed, label, show, window)
        seconds.append(per_episode)
        per_seed.append(accuracies)
        if s == 0:
            out["adapt_peak_memory_mb"] = adapt.extra_mb
            _, total = M.count_parameters(method.model)
            out.update(trainable_parameters=method.trainable_numel(), total_parameters=total)
        del method
    # 6. Memory: the method's peak over every phase (process RSS in a child; else the
    #    increase over the method's start).
    out["peak_memory_mb"] = max(0.0, max(w.base_mb + w.extra_mb for w in windows) - origin)
    out.update(per_seed_accuracy_per_step=per_seed, episode_indices=list(mine),
               seconds_per_episode=sum(seconds) / len(seconds),
               meta_train_seconds=sum(train_seconds) / len(train_seconds) if train_seconds else None,
               torch_threads=torch.get_num_threads())
    return out


def _episodes(name: str, cfg: Config, spec, iterations: int) -> tuple[DatasetLoader, list]:
    """The loader of the tasks `name` trains (and tunes) on, and the saved spec's episodes."""
    _, tokenizer = M.load_model(cfg.models.selected_model, cfg.tasks.n_way)
    retrains = name == "melora" and cfg.evaluation.seeds > 1 and iterations > 0
    loader = _loader(cfg, tokenizer, baselines=name != "melora" or retrains,
                     meta_val=_tuned(name, cfg))
    return loader, loader.load_episode_spec(spec)


def _memory_reference(name: str, method, rates: Mapping, episode, window, profiling) -> dict:
    """Memory breakdown (with `evaluation.memory_profiling` on) and one meta-training step
    (theta unchanged): the memory reference, for every Hessian method it names."""
    out = _describe(name, method, rates)
    if profiling.enabled:
        out.update(memory_breakdown(method, episode, window, profiling.detailed_breakdown))
    out.update(_meta_step_memory(name, method, episode, window))
    return out


def _adapt_episodes(method, episodes: list, mine: range, steps: int, seed: int, label: str,
                    show: bool, window) -> tuple[list, float, MemoryWindow]:
    """Adapt on episodes `mine`, dropout masks seeded per episode (paired runs, the same
    masks for every seed: seeds change the training, not the episodes).

    Returns:
        (accuracies per step of each episode, seconds per episode, the memory window).
    """
    start, accuracies = time.perf_counter(), []
    bar = tqdm(mine, desc=f"evaluate {label}", unit="episode", mininterval=1.0,
               dynamic_ncols=True, disable=not show)
    with window() as adapt:
        for i in bar:
            set_seed(episode_seed(seed, i))
            accuracies.append(method.adapt(episodes[i], steps))
    bar.close()
    return accuracies, (time.perf_counter() - start) / max(1, len(mine)), adapt


@contextlib.contextmanager
def _counting_meta_steps(method, name: str, iterations: int, show: bool):
    """A progress bar of a baseline's meta-training: counts its `meta_step` calls."""
    if not iterations or not show:
        yield
        return
    bar = tqdm(total=iterations, desc=f"meta-train {name}", unit="it", mininterval=1.0,
               dynamic_ncols=True)
    step = method.meta_step

    def counted(*args, **kwargs):
        loss = step(*args, **kwargs)
        bar.update()
        return loss
    method.meta_step = counted  # the instance attribute shadows the method
    try:
        yield
    finally:
        del method.meta_step
        bar.close()


def tune_rates(name: str, cfg: Config, loader, device: torch.device, iterations: int) -> dict:
    """A baseline's inner rate (and outer rate if it meta-trains), chosen on meta-val.

    `evaluation.tuning_trials` Optuna trials (TPE sampler seeded by `training.seed`; the
    first trial is the configured rates, so tuning never scores below them on meta-val):
    each builds the method (seed 0) with the trial's rates, meta-trains it for the
    method's budget and scores its mean query accuracy after K steps on the first
    `analysis.hyperparameter_search.val_episodes` meta-val episodes (log-uniform ranges
    `hyperparameter_search.inner_lr` / `outer_lr`). The meta-test episodes are never seen.

    Returns:
        `inner_lr`, `outer_lr` (None when the method does not meta-train), `tuning_trials`
        and `tuning` (each trial's rates and meta-val accuracy).
    """
    import optuna

    search, trials = cfg.analysis.hyperparameter_search, cfg.evaluation.tuning_trials
    meta = name in B.META_LEARNED
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=cfg.training.seed))
    configured = {"inner_lr": cfg.meta_learning.inner.default_lr}
    if meta:
        configured["outer_lr"] = cfg.meta_learning.outer.default_lr
    for key, rate in configured.items():  # the configured rate is tried first even outside
        low, high = getattr(search, key)    # the range; say so (Optuna's own warning is muted)
        if not low <= rate <= high:
            log.warning("%s: the configured %s %g is outside analysis.hyperparameter_search.%s "
                        "[%g, %g]; it is tried first, but the search draws only from the range: "
                        "widen the range to search around it", name, key, rate, key, low, high)
    study.enqueue_trial(configured, skip_if_exists=True)
    val = [loader.episode("meta_val", i) for i in range(search.val_episodes)]
    k = cfg.meta_learning.inner.default_num_steps

    def objective(trial) -> float:
        inner = trial.suggest_float("inner_lr", *search.inner_lr, log=True)
        outer = trial.suggest_float("outer_lr", *search.outer_lr, log=True) if meta else None
        method, _ = B.build_baseline(name, cfg, device, inner, outer)
        method.meta_train(loader, iterations, cfg.meta_learning.default_meta_batch_size)
        accuracy = val_accuracy(method, val, k, cfg.training.seed)
        return accuracy if math.isfinite(accuracy) else 0.0

    with warnings.catch_warnings():  # an enqueued rate outside the search range is kept
        warnings.simplefilter("ignore", UserWarning)
        study.optimize(objective, n_trials=trials)
    best = study.best_params
    log.info("%s: meta-val accuracy %.4f with %s (%d trials)", name, study.best_value, best, trials)
    return {"inner_lr": best["inner_lr"], "outer_lr": best.get("outer_lr"), "tuning_trials": trials,
            "tuning": [{"params": t.params, "val_accuracy": t.value} for t in study.trials]}


def val_accuracy(method, episodes: list, steps: int, seed: int) -> float:
    """Mean query accuracy after `steps` adaptation steps (dropout seeded per episode, as
    `evaluate_method` does: paired across trials)."""
    accuracies = []
    for i, episode in enumerate(episodes):
        set_seed(episode_seed(seed, i))
        accuracies.append(method.adapt(episode, steps)[-1])
    return float(np.mean(accuracies))


def build_method(name: str, cfg: Config, checkpoint: str, device: torch.device, s: int = 0,
                 iterations: int = 0, loader=None, rates: Mapping | None = None):
    """(method, seconds spent meta-training it here) for training seed s.

    MELoRA: s = 0 is the checkpoint's theta; s >= 1 meta-trains MELoRA again with the
    checkpoint's config and `training.seed` + s for `iterations` iterations (as
    trainer.py does). A baseline: built with the rates in `rates` (None: configured)
    and seed `training.seed` + s; its meta-training is the caller's.
    """
    rates = rates or {}
    if name != "melora":
        method, _ = B.build_baseline(name, seed_config(cfg, s), device, rates.get("inner_lr"),
                                     rates.get("outer_lr"))
        return method, 0.0
    memory = cfg.memory_optimization
    start = time.perf_counter()
    if s == 0:
        model, _, _, inner_lr = restore_model(checkpoint, device, cfg, load_checkpoint(checkpoint))
    else:
        scfg = seed_config(cfg, s)
        model, _ = M.build_model(scfg, device)
        meta = MetaTrainer(model, SeedEpisodes(loader, s), scfg.meta_learning, memory,
                           scfg.training, device, {"lora": {"rank": cfg.lora.default_rank}})
        for it in range(iterations):
            meta.train_step(it)
        inner_lr = meta.inner_lr.detach() if torch.is_tensor(meta.inner_lr) else meta.inner_lr
    method = B.MELoRA(model, inner_lr, cfg.meta_learning.inner.default_num_steps,
                      memory.hessian_approximation.method,
                      memory.gradient_accumulation.default_micro_batch,
                      cfg.meta_learning.head_init)
    method.outer_lr = cfg.meta_learning.outer.default_lr
    return method, time.perf_counter() - start if s else 0.0


def _describe(name: str, method: B.FewShotMethod, rates: Mapping) -> dict:
    """What results.json records of a method's protocol."""
    lr = method.inner_lr if name in B.GRADIENT_BASED else None
    return {"head_init": method.head_init,
            "inner_lr": lr.tolist() if torch.is_tensor(lr) else None if lr is None else float(lr),
            "outer_lr": getattr(method, "outer_lr", None)
            if (name == "melora" or name in B.META_LEARNED) else None,
            "tuning_trials": rates.get("tuning_trials", 0), "tuning": rates.get("tuning", [])}


def _meta_step_memory(name: str, method: B.FewShotMethod, episode, window) -> dict:
    """Extra peak of one meta-training step (theta unchanged), named by its Hessian
    method; MELoRA's with its configured method and with `full`."""
    if not _has_meta_step(name):
        return {"meta_step_peak_memory_mb": None, "meta_step_hessian": None,
                "meta_step_peak_memory_mb_by_hessian": {}}
    by = {}
    method.meta_step([episode], update=False)  # warm-up: lazy library state is not the step's
    with window() as step:
        method.meta_step([episode], update=False)
    by[method.hessian] = step.extra_mb
    if name == "melora" and method.hessian != "full":
        with window() as full:
            method.meta_step([episode], update=False, method="full")
        by["full"] = full.extra_mb
    return {"meta_step_peak_memory_mb": step.extra_mb, "meta_step_hessian": method.hessian,
            "meta_step_peak_memory_mb_by_hessian": by}


def memory_breakdown(method: B.FewShotMethod, episode, window, detailed: bool) -> dict:
    """Peak memory split into weights, adapter + optimizer state, activations, second order.

    An estimate, from the parts that can be counted and three measured windows:

    - weights: bytes of every parameter of the method's model;
    - adapter_and_optimizer: trainable elements x bytes x `optimizer_copies` (gradient
      and Adam's two moments while meta-training; gradient only for plain SGD);
    - activations: the increase during one adaptation step (forward + backward) beyond
      phi and its gradient;
    - second_order: the extra increase of a second-order meta-training step over the
      same step with the second-order terms dropped (0 for first-order methods).
    """
    params = {id(p): p for p in method.model.parameters()}.values()
    element = next(iter(params)).element_size()
    trainable = method.trainable_numel() * element
    with window() as act:
        method.adapt(episode, 1)
    second = 0.0
    if method.second_order:
        with window() as first:
            method.meta_step([episode], update=False, first_order=True)
        with window() as full:
            method.meta_step([episode], update=False)
        second = max(0.0, full.extra_mb - first.extra_mb)
    mb = 2**20
    out = {"memory_breakdown_mb": {
        "weights": sum(p.numel() * p.element_size() for p in params) / mb,
        "adapter_and_optimizer": trainable * method.optimizer_copies / mb,
        "activations": max(0.0, act.extra_mb - 2 * trainable / mb),
        "second_order": second}}
    if detailed:
        out["memory_breakdown_detail"] = {
            "trainable_bytes": trainable, "optimizer_copies": method.optimizer_copies,
            "adapt_step_increase_mb": act.extra_mb,
            "first_order_step_increase_mb": first.extra_mb if method.second_order else None,
            "second_order_step_increase_mb": full.extra_mb if method.second_order else None}
    return out


# ------------------------------------------------------------------------------------
# Memory (measured with utils.MemoryWindow, the benchmarks' instrument)
# ------------------------------------------------------------------------------------

def memory_method(device: torch.device, child_process: bool) -> str:
    """How `peak_memory_mb` was measured (recorded in results.json)."""
    if device.type == "cuda":
        return "cuda_max_memory_allocated"
    return "peak_rss_child_process" if child_process else "rss_increase_sampled"


# ------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------

def summarize(raw: Mapping[str, dict], cfg: Config, checkpoint, spec: Path) -> dict:
    """The results.json dict: accuracy at step K with its CI, per-step curves, seeds, memory."""
    device = resolve_device(cfg.training.device)
    k = cfg.meta_learning.inner.default_num_steps
    methods = {name: _method_stats(r, k, cfg.analysis.confidence) for name, r in raw.items()}
    return {"model": cfg.models.selected_model, "n_way": cfg.tasks.n_way,
            "k_shot": cfg.tasks.k_shot, "q_query": cfg.tasks.q_query,
            "num_episodes": cfg.evaluation.num_episodes, "reported_step": k,
            "steps": max(k, cfg.evaluation.adaptation_steps),
            "inner_lr": cfg.meta_learning.inner.default_lr, "confidence": cfg.analysis.confidence,
            "seeds": cfg.evaluation.seeds, "tuning_trials": cfg.evaluation.tuning_trials,
            "head_init": cfg.evaluation.head_init,
            "memory_method": memory_method(device, cfg.evaluation.child_process),
            "device": str(device), "checkpoint": str(checkpoint), "episodes_spec": str(spec),
            "config": cfg.to_dict(), "methods": methods}


def _method_stats(raw: Mapping, k: int, confidence: float) -> dict:
    """Per-seed accuracies, then the seed-averaged per-episode accuracies behind the CI,
    the curves and the paired tests."""
    per_seed = np.asarray(raw["per_seed_accuracy_per_step"], dtype=float)  # (seeds, episodes, steps + 1)
    per_step = per_seed.mean(0)  # (episodes, steps + 1): averaged over seeds
    final = per_step[:, k].tolist()
    mean, lo, hi = analysis.mean_ci(final, confidence, ACCURACY_BOUNDS)
    curve = [analysis.mean_ci(per_step[:, s].tolist(), confidence, ACCURACY_BOUNDS)
             for s in range(per_step.shape[1])]
    seed_means = per_seed[:, :, k].mean(1)
    return {"accuracy_mean": mean, "accuracy_ci95": [lo, hi], "per_episode_accuracy": final,
            "seeds": int(per_seed.shape[0]), "seed_accuracies": seed_means.tolist(),
            "accuracy_sd": float(seed_means.std(ddof=1)) if seed_means.size > 1 else 0.0,
            "per_seed_episode_accuracy": per_seed[:, :, k].tolist(),
            "accuracy_per_step": {"steps": list(range(len(curve))),
                                  "mean": [c[0] for c in curve],
                                  "ci95_low": [c[1] for c in curve],
                                  "ci95_high": [c[2] for c in curve]},
            **{key: value for key, value in raw.items() if key != "per_seed_accuracy_per_step"},
            "per_episode_accuracy_per_step": per_step.tolist()}


def format_tables(results: Mapping) -> str:
    """The results table, then each method's protocol (head init, tuned rates, budget,
    seeds), its meta-training step's memory by Hessian method, and the accuracy curve."""
    lines = [analysis.format_results_table(results), "",
             f"Accuracy after K={results['reported_step']} steps; memory: "
             f"{results['memory_method']}; {results['num_episodes']} episodes, "
             f"{results['n_way']}-way {results['k_shot']}-shot.", "",
             analysis.format_protocol_table(results), "",
             "| Method | Acc. step 0 (%) | Acc. last step (%) |", "|---|---|---|"]
    for name, m in results["methods"].items():
        curve = m["accuracy_per_step"]["mean"]
        lines.append(f"| {name} | {100 * curve[0]:.2f} | {100 * curve[-1]:.2f} |")
    return "\n".join(lines)


def frozen_comparison(results: Mapping) -> str | None:
    """MELoRA's accuracy beside the frozen encoder's (`finetune`: no meta-training, the same
    head and adaptation steps), when both were evaluated; None otherwise."""
    methods = results["methods"]
    if "melora" not in methods or "finetune" not in methods:
        return None
    mine, frozen = 100 * methods["melora"]["accuracy_mean"], 100 * methods["finetune"]["accuracy_mean"]
    verdict = "helped" if mine > frozen else "did not help"
    return (f"meta-learned (melora) {mine:.2f}% vs frozen encoder (finetune, no meta-training) "
            f"{frozen:.2f}%: meta-training {verdict} here ({mine - frozen:+.2f} points)")


def _log_metrics(results: Mapping, cfg: Config, run_dir: Path) -> None:
    """Per-step accuracy curves (step = adaptation step) and summaries to the sink."""
    sink_dir = run_dir / SINK_DIR
    sink_dir.mkdir(parents=True, exist_ok=True)
    sink = MetricsSink(sink_dir, cfg.tracking, f"{cfg.training.experiment_name}-evaluate", cfg.flat())
    status = "FAILED"
    try:
        for step in range(results["steps"] + 1):
            sink.log(step, {f"{name}/accuracy": m["accuracy_per_step"]["mean"][step]
                            for name, m in results["methods"].items()})
        for name, m in results["methods"].items():
            numbers = {k: v for k, v in m.items() if isinstance(v, (int, float)) and v is not None}
            numbers.update(m.get("memory_breakdown_mb", {}))
            sink.log(results["reported_step"], {f"{name}/{k}": v for k, v in numbers.items()})
        status = "FINISHED"
    finally:
        sink.close(status)


# ------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------

class ChildDied(UserError):
    """The child process evaluating a method ended without a result (killed, or crashed)."""


def _run_job(job: dict, cfg: Config, *, target=None) -> dict:
    """`evaluate_method(job)` (or `target(job)`) in a fresh spawned process, or here.

    Raises:
        ChildDied: the child ended without a result (e.g. killed by the OS for memory).
    """
    target = target or evaluate_method
    child = cfg.evaluation.child_process
    if not child:
        result = target({**job, "in_process": True})
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return result
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_exit_with_parent, initargs=(os.getpid(),))
    workers = []
    try:
        with _stop_on_signal(job["method"]):
            future = pool.submit(target, {**job, "in_process": False})
            workers = _pool_processes(pool)
            return future.result()
    except BrokenProcessPool as error:
        raise ChildDied(_death_message(job["method"], workers)) from error
    except BaseException:
        _terminate_workers(pool)  # a signal or an error ended the wait: the child must not outlive us
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _death_message(method: str, workers: list) -> str:
    deadline = time.monotonic() + 5
    for process in workers:  # the pool's own thread reaps it: wait for the code it records
        while process.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.05)
    code = next((p.exitcode for p in workers if p.exitcode), None)
    if code is None:
        how = "no exit status"
    elif code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:  # a signal number this platform does not name
            how = f"killed by signal {-code}"
    else:
        how = f"exit status {code}"
    return (f"the child process evaluating {method} ended without a result ({how}); results.json "
            "was not written. A SIGKILL usually means the machine ran out of memory: lower "
            "evaluation.num_episodes, models.max_length or "
            "memory_optimization.gradient_accumulation.default_micro_batch, or set "
            "evaluation.child_process: false to run the evaluation in this process and see its "
            "own error; then run the command again")


@contextlib.contextmanager
def _stop_on_signal(method: str):
    """SIGTERM/SIGINT while a child evaluates: raise RunInterrupted here (main thread only),
    so `_run_job` ends the child instead of dying and leaving it blocked on its pipe."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise RunInterrupted(f"{signal.Signals(signum).name} stopped the evaluation of {method}; "
                             "results.json was not written: run the command again", signum)
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _exit_with_parent(parent: int) -> None:
    """In a pool worker: end this process when `parent` dies (even by SIGKILL, which
    runs no cleanup), instead of waiting forever on a pipe only the worker still holds."""
    def watch():
        while os.getppid() == parent:  # an orphan is adopted by another process
            time.sleep(PARENT_POLL_S)
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _pool_processes(pool) -> list:
    """The pool's worker processes (ProcessPoolExecutor has no public way before 3.14)."""
    return list((getattr(pool, "_processes", None) or {}).values())


def _terminate_workers(pool) -> None:
    """Stop the pool's worker processes."""
    for process in _pool_processes(pool):
        if process.is_alive():
            process.terminate()
            process.join(10)
        if process.is_alive():
            process.kill()
            process.join()


def _merge_shares(shares: list[dict]) -> dict:
    """One method's raw results from every rank's share of the episodes, in episode order;
    times per episode averaged, memory peaks the largest rank's."""
    out = dict(shares[0])
    indices = [i for s in shares for i in s["episode_indices"]]
    order = sorted(range(len(indices)), key=indices.__getitem__)
    seeds = len(shares[0]["per_seed_accuracy_per_step"])
    out["per_seed_accuracy_per_step"] = [
        [[row for s in shares for row in s["per_seed_accuracy_per_step"][seed]][j] for j in order]
        for seed in range(seeds)]
    out.pop("episode_indices", None)
    count = lambda s: len(s["episode_indices"])  # noqa: E731
    out["seconds_per_episode"] = sum(s["seconds_per_episode"] * count(s) for s in shares) / max(1, len(indices))
    for key in ("peak_memory_mb", "meta_step_peak_memory_mb", "adapt_peak_memory_mb"):
        values = [s[key] for s in shares if s[key] is not None]
        out[key] = max(values) if values else None
    return out


def _baseline_names(cfg: Config) -> list[str]:
    return list(cfg.evaluation.baselines)  # names checked at load time (baseline.BASELINES)


def _has_meta_step(name: str) -> bool:
    return name == "melora" or name in B.META_LEARNED


def _tuned(name: str, cfg: Config) -> bool:
    """Baselines that adapt by gradient steps get their rates tuned on meta-val."""
    return cfg.evaluation.tuning_trials > 0 and name != "melora" and name in B.GRADIENT_BASED


def _check_tuning(cfg: Config, methods: list[str]) -> None:
    """Tuning needs meta-validation tasks: fail before any work when there are none."""
    if not any(_tuned(n, cfg) for n in methods):
        return
    if not cfg.datasets.synthetic_only and not cfg.datasets.meta_val:
        raise UserError("evaluation.tuning_trials > 0 chooses each baseline's learning rates on "
                        "meta-validation tasks, but datasets.meta_val lists no source; add one, or "
                        "set --set evaluation.tuning_trials=0 to use the configured rates")
    check_search(cfg)


def _loader(cfg: Config, tokenizer, baselines: bool, meta_val: bool = False):
    splits = ("meta_train", "meta_test") if baselines else ("meta_test",)
    splits += ("meta_val",) if meta_val else ()
    return DatasetLoader.from_config(cfg, tokenizer, splits)


def _check_spec(spec: Path, cfg: Config) -> None:
    """A saved spec must describe episodes of this config's shape."""
    if not spec.is_file():
        return
    try:
        saved = json.loads(spec.read_text())
        shape = (saved["n_way"], saved["k_shot"], saved["q_query"], len(saved["episodes"]))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{spec} is not an episode spec ({e!r}); delete it") from e
    ours = (cfg.tasks.n_way, cfg.tasks.k_shot, cfg.tasks.q_query, cfg.evaluation.num_episodes)
    if shape != ours:
        raise UserError(f"{spec} holds {shape[3]} {shape[0]}-way {shape[1]}-shot "
                        f"{shape[2]}-query episodes, but this evaluation asks for {ours[3]} "
                        f"{ours[0]}-way {ours[1]}-shot {ours[2]}-query ones; delete the spec "
                        "or pass another --experiment_name")

