"""Few-shot evaluation of a MELoRA checkpoint against the baselines, on fixed episodes.

    python main.py --mode evaluate --checkpoint results/melora/checkpoints/checkpoint_iter_1000.pt
    python main.py --mode evaluate --checkpoint CKPT --skip_baselines --set evaluation.num_episodes=50

Every method (MELoRA from the checkpoint, then each of `evaluation.baselines`, see
baseline.py) runs on the same pretrained model, the same `evaluation.num_episodes`
meta-test episodes in the same order (their spec is saved as
`<run>/meta_test_episodes.json`, so analysis can pair them and a later run can repeat
them) and the same budget: K = `meta_learning.inner.default_num_steps` inner SGD steps
at the inner rate. Accuracy is reported after K steps, and per step for
0..max(K, `evaluation.adaptation_steps`).

Memory: each method is measured in a window of its own (`memory_method` in the results):

- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`;
- CPU, `evaluation.child_process: true`: each method runs in a freshly spawned process,
  and its peak resident memory (`ru_maxrss`) is its own, interpreter and libraries
  included; phases inside it are sampled by a thread (psutil RSS, every 2 ms);
- CPU, `child_process: false`: sampled RSS increase over the method's start (fast, for
  tests; an allocator that reuses memory freed earlier can hide some of it).

Writes `<run>/results.json` (schema: analysis.py's module docstring, plus the keys
documented in `run_evaluation`), logs to `<run>/evaluation/` (metrics.jsonl, MLflow,
TensorBoard) and prints the results table. The checkpoint is only read.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

import analysis
import baseline as B
import model as M
from utils import (Config, MetricsSink, RunInterrupted, UserError, atomic_write_json, gather_to_main,
                   is_main_process, load_checkpoint, load_config, load_config_with_base,
                   peak_memory_mb, rank, rank_device, resolve_device, run_on_main, set_seed,
                   world_size, resident_memory_bytes)

log = logging.getLogger("melora")

RESULTS_FILE = "results.json"
EPISODE_SPEC = "meta_test_episodes.json"
SINK_DIR = "evaluation"       # metrics of evaluation, apart from the training run's
SAMPLE_SECONDS = 0.002        # RSS sampling interval on CPU


# ------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------

def run_evaluation(cfg: Config, checkpoint: str | os.PathLike | None, skip_baselines: bool,
                   run_dir: str | os.PathLike) -> dict:
    """Evaluate a checkpoint (and the baselines) on the fixed meta-test episodes.

    The config is the checkpoint's (model, data, tasks, inner loop), with `cfg`'s
    evaluation, tracking, analysis, device and output-folder keys, and every other key
    `cfg` sets to a non-default value (a `--config` file, flags, `--set`), on top; keys
    that define the model stay the checkpoint's.

    Args:
        cfg: the validated config of the command line.
        checkpoint: a `checkpoint_iter_N.pt` written by training.
        skip_baselines: evaluate MELoRA only.
        run_dir: where results.json, the episode spec and the metrics go.

    Returns:
        The results dict written to `<run_dir>/results.json`: analysis.py's schema, plus
        `checkpoint`, `config`, `memory_method`, `reported_step`, `steps`, and per method
        `per_episode_accuracy_per_step`, `meta_step_peak_memory_mb`,
        `adapt_peak_memory_mb`, `meta_train_iterations`, `meta_train_seconds`,
        `trainable_parameters`, `total_parameters`.

    Under torchrun every rank adapts on its share of the episodes (strided, seeds per
    episode unchanged) and rank 0 gathers the results and writes them; the other ranks
    return {}.

    Raises:
        UserError: no checkpoint, a missing, truncated or foreign checkpoint, a model
            other than the checkpoint's, or an unknown baseline name.
    """
    if checkpoint is None:
        raise UserError("--mode evaluate needs --checkpoint PATH (a checkpoints/"
                        "checkpoint_iter_N.pt file of a training run)")
    run_dir = Path(run_dir)
    state = read_checkpoint(checkpoint)
    cfg = evaluation_config(cfg, state, checkpoint)
    methods = ["melora"] + ([] if skip_baselines else _baseline_names(cfg))
    # 1. The fixed episodes, saved once so every method (and a later run) uses them.
    spec = run_on_main(prepare_episodes, cfg, run_dir, baselines=len(methods) > 1)
    # 2. Each method in a window of its own (a child process on CPU, by default).
    job = {"config": cfg.to_dict(), "checkpoint": str(checkpoint), "spec": str(spec),
           "share": [rank(), world_size()]}
    raw = {}
    for name in methods:
        log.info("evaluating %s on %d episodes", name, cfg.evaluation.num_episodes)
        shares = gather_to_main(_run_job({**job, "method": name}, cfg))  # rank 0 gets all
        raw[name] = _merge_shares(shares) if shares is not None else None
    if not is_main_process():
        return {}
    # 3. Statistics, results.json, metrics and the table.
    results = summarize(raw, cfg, checkpoint, spec)
    atomic_write_json(run_dir / RESULTS_FILE, results)
    _log_metrics(results, cfg, run_dir)
    print(format_tables(results))
    log.info("results: %s", run_dir / RESULTS_FILE)
    return results


def read_checkpoint(checkpoint: str | os.PathLike) -> dict:
    """The checkpoint's state (read-only); errors name the problem and the fix."""
    state = load_checkpoint(checkpoint)
    missing = [k for k in ("theta", "config", "inner_lr") if k not in state]
    if missing:
        raise UserError(f"checkpoint {str(checkpoint)!r} lacks {', '.join(missing)}; it was "
                        "not written by `python main.py --mode train`")
    return state


def evaluation_config(cfg: Config, state: Mapping, checkpoint) -> Config:
    """The checkpoint's config, with the command line's run-control keys (evaluation,
    tracking, analysis, device, output folder) and every other key it changed from
    config.yml applied on top.

    Raises:
        UserError: `cfg` asks for another model or LoRA rank than the checkpoint's.
    """
    from trainer import MODEL_KEYS, REFUSED_KEYS, RUN_CONTROL_KEYS, saved_config
    saved = saved_config(state, checkpoint)
    theirs, defaults = Config(saved).flat(), load_config().flat()
    given = {k: v for k, v in cfg.flat().items()
             if defaults.get(k) != v or k.startswith(RUN_CONTROL_KEYS)}
    for key in REFUSED_KEYS:
        if key in given and given[key] != theirs.get(key):
            raise UserError(f"checkpoint {str(checkpoint)!r} belongs to model "
                            f"{theirs['models.selected_model']!r} with LoRA rank "
                            f"{theirs['lora.default_rank']}, but {key}={given[key]!r} was asked "
                            "for; drop --model/--lora_rank to evaluate this checkpoint")
    kept = [k for k in given if k.startswith(MODEL_KEYS) and given[k] != theirs.get(k)]
    if kept:
        warnings.warn(f"evaluate: {', '.join(kept)} differ from the checkpoint's run; the "
                      "checkpoint's values are kept (they define the model)", UserWarning,
                      stacklevel=2)
    overrides = {k: v for k, v in given.items() if not k.startswith(MODEL_KEYS)}
    return load_config_with_base(saved, None, overrides)


def prepare_episodes(cfg: Config, run_dir: Path, baselines: bool) -> Path:
    """Save (or check) the fixed meta-test episode spec and fill the tokenisation cache."""
    spec = run_dir / EPISODE_SPEC
    _check_spec(spec, cfg)
    _, tokenizer = M.load_model(cfg.models.selected_model, cfg.tasks.n_way)
    loader = _loader(cfg, tokenizer, baselines)
    loader.fixed_episodes("meta_test", cfg.evaluation.num_episodes, spec)
    return spec


# ------------------------------------------------------------------------------------
# One method (runs in a child process when evaluation.child_process is true)
# ------------------------------------------------------------------------------------

def evaluate_method(job: Mapping[str, Any]) -> dict:
    """Build one method, meta-train it if it has meta-training, adapt on every episode.

    Args:
        job: `method`, `config` (a plain dict), `checkpoint`, `spec` (the episode spec),
            `in_process` (measure RSS increases instead of process peaks), `share`
            ([rank, world size]: adapt on episodes rank, rank + world size, ...).

    Returns:
        Raw per-episode accuracies per step, timings and memory readings.
    """
    cfg, name = Config(job["config"]), job["method"]
    device = rank_device(resolve_device(cfg.training.device))
    meter = _meter_factory(device, job["in_process"])
    out: dict[str, Any] = {}
    # 1. Setup: the method's model and the episodes (from the saved spec).
    with meter() as setup:
        method, tokenizer = build_method(name, cfg, job["checkpoint"], device)
        loader = _loader(cfg, tokenizer, baselines=name != "melora")
        episodes = loader.load_episode_spec(job["spec"])
    # 2. Memory breakdown first, in a fresh heap and from the smallest window to the
    #    largest, so a CPU allocator that reuses freed memory hides nothing it should show.
    if cfg.evaluation.memory_profiling.enabled:
        out.update(memory_breakdown(method, episodes[0], meter,
                                    cfg.evaluation.memory_profiling.detailed_breakdown))
    # 3. Meta-training (baselines), then one meta-training step on episode 0: the memory
    #    reference (MELoRA's step uses its configured Hessian method; theta is unchanged).
    iterations = cfg.evaluation.baseline_meta_iterations if _meta_learned(name) else 0
    start = time.perf_counter()
    with meter() as training:
        method.meta_train(loader, iterations, cfg.meta_learning.default_meta_batch_size)
    out["meta_train_seconds"], out["meta_train_iterations"] = time.perf_counter() - start, iterations
    with meter() as step:
        method.meta_step(episodes[:1], update=False)
    # 4. Adaptation on every episode, dropout masks seeded per episode (paired runs).
    steps = max(cfg.meta_learning.inner.default_num_steps, cfg.evaluation.adaptation_steps)
    start, accuracies = time.perf_counter(), []
    mine = range(job["share"][0], len(episodes), job["share"][1])  # this rank's episodes
    with meter() as adapt:
        for i in mine:
            set_seed(cfg.training.seed + 7919 * (i + 1))
            accuracies.append(method.adapt(episodes[i], steps))
    out["seconds_per_episode"] = (time.perf_counter() - start) / max(1, len(mine))
    # 5. Memory: the method's peak over every phase.
    phases = (setup, training, step, adapt)
    out["peak_memory_mb"] = (peak_memory_mb(device) if device.type == "cpu" and not job["in_process"]
                             else max(p.mb for p in phases))
    out["meta_step_peak_memory_mb"] = step.mb if _has_meta_step(name) else None
    out["adapt_peak_memory_mb"] = adapt.mb
    _, total = M.count_parameters(method.model)
    out.update(per_episode_accuracy_per_step=accuracies, episode_indices=list(mine),
               trainable_parameters=method.trainable_numel(),
               total_parameters=total)
    return out


def build_method(name: str, cfg: Config, checkpoint: str, device: torch.device):
    """(method, tokenizer): MELoRA restored from the checkpoint, or a baseline."""
    if name != "melora":
        return B.build_baseline(name, cfg, device)
    from trainer import build_model, load_theta
    state = read_checkpoint(checkpoint)
    model, tokenizer = build_model(cfg, device)
    load_theta(model, state["theta"], checkpoint)
    inner_lr = state["inner_lr"].to(device) if state["inner_lr"] is not None \
        else cfg.meta_learning.inner.default_lr
    memory = cfg.memory_optimization
    return B.MELoRA(model, inner_lr, cfg.meta_learning.inner.default_num_steps,
                    memory.hessian_approximation.method,
                    memory.gradient_accumulation.default_micro_batch,
                    cfg.meta_learning.head_init), tokenizer


def memory_breakdown(method: B.FewShotMethod, episode, meter, detailed: bool) -> dict:
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
    with meter(relative=True) as act:
        method.adapt(episode, 1)
    second = 0.0
    if method.second_order:
        with meter(relative=True) as first:
            method.meta_step([episode], update=False, first_order=True)
        with meter(relative=True) as full:
            method.meta_step([episode], update=False)
        second = max(0.0, full.mb - first.mb)
    mb = 2**20
    out = {"memory_breakdown_mb": {
        "weights": sum(p.numel() * p.element_size() for p in params) / mb,
        "adapter_and_optimizer": trainable * method.optimizer_copies / mb,
        "activations": max(0.0, act.mb - 2 * trainable / mb),
        "second_order": second}}
    if detailed:
        out["memory_breakdown_detail"] = {
            "trainable_bytes": trainable, "optimizer_copies": method.optimizer_copies,
            "adapt_step_increase_mb": act.mb,
            "first_order_step_increase_mb": first.mb if method.second_order else None,
            "second_order_step_increase_mb": full.mb if method.second_order else None}
    return out


# ------------------------------------------------------------------------------------
# Memory windows
# ------------------------------------------------------------------------------------

class MemoryMeter:
    """Peak memory of a block of work, in MiB (a context manager).

    CUDA: `max_memory_allocated` after `reset_peak_memory_stats`. CPU: resident memory
    sampled by a background thread every `SAMPLE_SECONDS` (torch kernels release the
    GIL, so it samples during them).

    Args:
        device: the device the work runs on.
        origin: bytes subtracted from the peak (None: the peak as read); `relative=True`
            takes the reading at entry.

    Example:
        >>> with MemoryMeter(torch.device("cpu")) as m:
        ...     x = torch.ones(2**20)
        >>> m.mb > 0
        True
    """

    def __init__(self, device: torch.device, origin: int | None = None, relative: bool = False):
        self.device, self.origin, self.relative = device, origin, relative
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "MemoryMeter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            now = torch.cuda.memory_allocated(self.device)
        else:
            now = resident_memory_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self.peak = now
        if self.relative:
            self.origin = now
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, resident_memory_bytes())

    @property
    def mb(self) -> float:
        return (self.peak - (self.origin or 0)) / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, resident_memory_bytes())


def memory_method(device: torch.device, child_process: bool) -> str:
    """How `peak_memory_mb` was measured (recorded in results.json)."""
    if device.type == "cuda":
        return "cuda_max_memory_allocated"
    return "peak_rss_child_process" if child_process else "rss_increase_sampled"


def _meter_factory(device: torch.device, in_process: bool):
    """Meters of one method: on CPU in-process, relative to the method's start."""
    origin = resident_memory_bytes() if device.type == "cpu" and in_process else None

    def meter(relative: bool = False) -> MemoryMeter:
        return MemoryMeter(device, None if relative else origin, relative)
    return meter


# ------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------

def summarize(raw: Mapping[str, dict], cfg: Config, checkpoint, spec: Path) -> dict:
    """The results.json dict: accuracy at step K with its CI, per-step curves, memory."""
    device = resolve_device(cfg.training.device)
    k = cfg.meta_learning.inner.default_num_steps
    methods = {name: _method_stats(r, k, cfg.analysis.confidence) for name, r in raw.items()}
    return {"model": cfg.models.selected_model, "n_way": cfg.tasks.n_way,
            "k_shot": cfg.tasks.k_shot, "q_query": cfg.tasks.q_query,
            "num_episodes": cfg.evaluation.num_episodes, "reported_step": k,
            "steps": max(k, cfg.evaluation.adaptation_steps),
            "inner_lr": cfg.meta_learning.inner.default_lr, "confidence": cfg.analysis.confidence,
            "memory_method": memory_method(device, cfg.evaluation.child_process),
            "device": str(device), "checkpoint": str(checkpoint), "episodes_spec": str(spec),
            "config": cfg.to_dict(), "methods": methods}


def _method_stats(raw: Mapping, k: int, confidence: float) -> dict:
    per_step = raw["per_episode_accuracy_per_step"]  # (episodes, steps + 1)
    final = [row[k] for row in per_step]
    mean, lo, hi = analysis.mean_ci(final, confidence)
    curve = [analysis.mean_ci([row[s] for row in per_step], confidence)
             for s in range(len(per_step[0]))]
    return {"accuracy_mean": mean, "accuracy_ci95": [lo, hi], "per_episode_accuracy": final,
            "accuracy_per_step": {"steps": list(range(len(curve))),
                                  "mean": [c[0] for c in curve],
                                  "ci95_low": [c[1] for c in curve],
                                  "ci95_high": [c[2] for c in curve]},
            **{key: value for key, value in raw.items() if key != "per_episode_accuracy_per_step"},
            "per_episode_accuracy_per_step": per_step}


def format_tables(results: Mapping) -> str:
    """The results table, then memory of one meta-training step and the accuracy curve."""
    lines = [analysis.format_results_table(results), "",
             f"Accuracy after K={results['reported_step']} steps; memory: "
             f"{results['memory_method']}; {results['num_episodes']} episodes, "
             f"{results['n_way']}-way {results['k_shot']}-shot.", "",
             "| Method | Acc. step 0 (%) | Acc. last step (%) | Meta-train step peak (MiB) |",
             "|---|---|---|---|"]
    for name, m in results["methods"].items():
        curve, step_mb = m["accuracy_per_step"]["mean"], m.get("meta_step_peak_memory_mb")
        lines.append(f"| {name} | {100 * curve[0]:.2f} | {100 * curve[-1]:.2f} | "
                     f"{'-' if step_mb is None else f'{step_mb:.1f}'} |")
    return "\n".join(lines)


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

def _run_job(job: dict, cfg: Config) -> dict:
    """`evaluate_method(job)` in a fresh spawned process, or here."""
    child = cfg.evaluation.child_process
    if not child:
        result = evaluate_method({**job, "in_process": True})
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return result
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        with _stop_on_signal(job["method"]):
            return pool.submit(evaluate_method, {**job, "in_process": False}).result()
    except BaseException:
        _terminate_workers(pool)  # a signal or an error ended the wait: the child must not outlive us
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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


def _terminate_workers(pool) -> None:
    """Stop the pool's worker processes (ProcessPoolExecutor has no public way before 3.14)."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
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
    by_index = {i: acc for s in shares
                for i, acc in zip(s.pop("episode_indices"), s["per_episode_accuracy_per_step"])}
    out.pop("episode_indices", None)
    out["per_episode_accuracy_per_step"] = [by_index[i] for i in sorted(by_index)]
    out["seconds_per_episode"] = sum(s["seconds_per_episode"] * len(s["per_episode_accuracy_per_step"])
                                     for s in shares) / max(1, len(by_index))
    for key in ("peak_memory_mb", "meta_step_peak_memory_mb", "adapt_peak_memory_mb"):
        values = [s[key] for s in shares if s[key] is not None]
        out[key] = max(values) if values else None
    return out


def _baseline_names(cfg: Config) -> list[str]:
    names = list(cfg.evaluation.baselines)
    unknown = [n for n in names if n not in B.BASELINES]
    if unknown:
        raise UserError(f"evaluation.baselines names unknown method(s) {unknown}; choose "
                        f"from {', '.join(B.BASELINES)}")
    return names


def _meta_learned(name: str) -> bool:
    return name in ("maml", "fomaml", "reptile", "reptile_lora", "finetune_multitask")


def _has_meta_step(name: str) -> bool:
    return name == "melora" or _meta_learned(name)


def _loader(cfg: Config, tokenizer, baselines: bool):
    from dataset_loader import DatasetLoader
    cache = cfg.datasets.cache_dir or Path(cfg.training.output_dir) / "cache"
    splits = ("meta_train", "meta_test") if baselines else ("meta_test",)
    return DatasetLoader(cfg.datasets, cfg.tasks, cfg.synthetic, tokenizer, cfg.models.max_length,
                         cache, cfg.training.seed, splits=splits)


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

