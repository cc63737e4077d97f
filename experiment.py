"""The experiment drivers: full mode, ablations, the Optuna search, meta-gradient fidelity, report.

`python main.py --mode full` runs `run_full`; it is the only module that imports this one
(besides tests and benchmarks). The drivers run training (`trainer`) and evaluation
(`evaluation`), then the statistics and tables of `analysis` and the figures of
`visualization`. Every driver writes into a run folder (file names in `analysis`):

    run_ablations(cfg, run_dir)              -> <run>/ablations.json, <run>/ablations/<param>-<value>/
    run_hyperparameter_search(cfg, run_dir)  -> <run>/optuna.db, <run>/best_config.yml, <run>/hpo_trials.json
    compute_fidelity(cfg, checkpoint)        -> [{method: cosine}, ...] (full mode: <run>/fidelity.json)
    run_full(cfg, run_dir, hyperparameter_search)  -> train, evaluate, fidelity, ablations,
                                                     statistics, figures, <run>/report.md
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
import yaml
from tqdm import tqdm

import baseline as B
import evaluation
import model as M
import trainer as T
import visualization
from analysis import (ABLATIONS_DIR, ABLATIONS_FILE, BEST_CONFIG_FILE, COMPARISON_FILE, EPISODE_SPEC,
                      FIDELITY_FILE, FIGURES_DIR, FULL_SUMMARY_FILE, METRICS_FILE, OPTUNA_DB,
                      REPORT_FILE, RESULTS_FILE, TRIALS_FILE, _markdown, compare_methods,
                      format_ablation_table, format_comparison_table, format_fidelity_table,
                      format_protocol_table, format_results_table, load_metrics, methods_of)
from config import Rules, check_variant, load_config_with_base, register_rules
from dataset_loader import DatasetLoader
from evaluation import check_search
from metrics import MlflowRun
from runs import load_checkpoint, prepare_run_dir
from utils import ConfigError, UserError, atomic_write_json, atomic_write_text, resolve_device

logger = logging.getLogger("melora")

# Ablated parameter (analysis.ablations key) -> the config key it sets.
ABLATION_KEYS = {
    "lora_rank": "lora.default_rank",
    "inner_steps": "meta_learning.inner.default_num_steps",
    "hessian_method": "memory_optimization.hessian_approximation.method",
    "checkpointing": "memory_optimization.checkpointing.enabled",
    "micro_batch": "memory_optimization.gradient_accumulation.default_micro_batch",
}
# Searched hyperparameter (analysis.hyperparameter_search key) -> the config key it sets.
SEARCH_KEYS = {
    "inner_lr": "meta_learning.inner.default_lr",
    "outer_lr": "meta_learning.outer.default_lr",
    "inner_steps": "meta_learning.inner.default_num_steps",
    "lora_rank": "lora.default_rank",
}


def _check_ablations(data: dict) -> None:
    """Every variant of analysis.ablations is a valid config, checked at load time (a bad
    value fails before training, not after hours)."""
    for param, values in data["analysis"]["ablations"].items():
        if param not in ABLATION_KEYS:
            raise ConfigError(f"analysis.ablations.{param} is not an ablation; use "
                              f"{', '.join(ABLATION_KEYS)}")
        if not isinstance(values, list):
            raise ConfigError(f"analysis.ablations.{param} must be a list of values, got {values!r}")
        for value in values:  # each variant is the config with one key changed: validate it
            check_variant(data, ABLATION_KEYS[param], value)


register_rules("experiment", Rules(check=_check_ablations, whole_run=True))


def run_ablations(cfg, run_dir: str | os.PathLike) -> list[dict]:
    """Train and evaluate one variant per value of `analysis.ablations`; write ablations.json.

    Each variant changes one key of `cfg` (see `ABLATION_KEYS`), keeps every seed, is
    meta-trained for `meta_learning.num_iterations` in ``<run>/ablations/<param>-<value>/``
    and evaluated (MELoRA only) on the same meta-test episodes: the run's own
    ``meta_test_episodes.json`` when it has one, else the first variant's.

    Peak memory is that of one meta-training step of the variant (evaluation's
    ``meta_step_peak_memory_mb``: its configured Hessian method, micro-batch and
    checkpointing, in a memory window of its own), not the process's, so variants run
    one after another in one process stay comparable.

    Args:
        cfg: the validated config (`config.Config`).
        run_dir: the run folder; ablations.json goes there.

    Returns:
        The rows (`parameter`, `value`, `accuracy_mean`, `accuracy_ci95`,
        `peak_memory_mb`, `seconds_per_iteration`, plus `run_dir`, `iterations`).

    Raises:
        utils.ConfigError: a variant the config rejects (names and values are checked
            when the config loads, so a bad one never reaches here).
    """

    run_dir = Path(run_dir)
    variants = _ablation_variants(cfg)  # all configs first: a bad value fails before any work
    spec = run_dir / EPISODE_SPEC
    rows = []
    for param, value, variant in tqdm(variants, desc="ablations", unit="variant", dynamic_ncols=True):
        sub = run_dir / ABLATIONS_DIR / _variant_folder(param, value)
        rows.append(_ablation_row(param, value, variant, sub, spec if spec.is_file() else None))
        if not spec.is_file():
            spec = sub / EPISODE_SPEC
        _write_json(run_dir / ABLATIONS_FILE, rows)  # after each variant: partial results survive
    _write_json(run_dir / ABLATIONS_FILE, rows)
    return rows


def run_hyperparameter_search(cfg, run_dir: str | os.PathLike) -> dict:
    """Bayesian search (Optuna TPE, median pruner) over inner/outer rate, inner steps, rank.

    Each trial meta-trains a fresh model for `hyperparameter_search.num_iterations`
    iterations and every `report_every` iterations reports the mean query accuracy after
    K adaptation steps on `val_episodes` fixed meta-validation episodes; the median pruner
    stops trials below the median of earlier ones at the same step. The study lives in
    `storage` (default ``sqlite:///<run>/optuna.db``) under `study_name`, so a second call
    continues it: trials already finished count towards `n_trials`. Each trial is an
    MLflow run (experiment ``<experiment_name>-hpo``) when `tracking.mlflow` is on.

    Args:
        cfg: the validated config.
        run_dir: the run folder.

    Returns:
        ``{"best_params", "best_value", "best_trial", "best_config", "n_trials",
        "storage", "study_name", "trials"}``; ``best_config`` is the path of a YAML file
        `--config` accepts (the whole config with the best values).

    Raises:
        utils.UserError: a bad search setting, no meta-validation tasks, or no trial
            finished.
    """

    search, run_dir = cfg.analysis.hyperparameter_search, Path(run_dir)
    check_search(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = search.storage or f"sqlite:///{(run_dir / OPTUNA_DB).resolve()}"
    study = optuna.create_study(
        study_name=search.study_name, storage=storage, load_if_exists=True, direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=cfg.training.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=search.pruner_startup_trials))
    done = [t for t in study.trials if t.state.is_finished()]
    remaining = max(0, search.n_trials - len(done))
    logger.info("hyperparameter search: study %r in %s holds %d finished trials; running %d more",
                search.study_name, storage, len(done), remaining)
    tracker = _TrialTracker(cfg, run_dir)
    study.optimize(lambda trial: _objective(trial, cfg, tracker), n_trials=remaining,
                   catch=(T.NonFiniteError,), show_progress_bar=remaining > 0)
    return _search_summary(study, cfg, run_dir, storage)


def compute_fidelity(cfg, checkpoint: str | os.PathLike, num_tasks: int | None = None) -> list[dict]:
    """Cosine similarity of each Hessian approximation's meta-gradient to the exact one.

    At the checkpoint's theta, for meta-train tasks 0..num_tasks-1, computes
    `trainer.compute_meta_gradient` with every method of `trainer.HESSIAN_METHODS`
    (same dropout seed, inner rate, K and micro-batch as training) and compares each
    with ``method="full"`` (the exact meta-gradient) over all theta tensors.

    Args:
        cfg: the validated config (device and `analysis.fidelity_tasks` are read; the
            model, tasks and inner loop are the checkpoint's).
        checkpoint: a training checkpoint.
        num_tasks: tasks to use; default `analysis.fidelity_tasks`.

    Returns:
        One ``{method: cosine}`` dict per task (the format `visualization.plot_gradient_fidelity`
        reads); empty when num_tasks is 0.
    """


    num_tasks = cfg.analysis.fidelity_tasks if num_tasks is None else num_tasks
    if num_tasks <= 0:
        return []
    device = resolve_device(cfg.training.device)
    model, tokenizer, ckpt_cfg, inner_lr = T.restore_model(checkpoint, device)
    loader = DatasetLoader.from_config(ckpt_cfg, tokenizer, ("meta_train",))
    theta = _model_theta(model)
    memory = ckpt_cfg.memory_optimization
    hessian = T.HessianOptions(memory.hessian_approximation.diagonal_estimator,
                               memory.hessian_approximation.hutchinson_probes)
    rows = []
    for index in tqdm(range(num_tasks), desc="fidelity", unit="task", dynamic_ncols=True):
        episode = loader.episode("meta_train", index)
        support, query = ({k: v.to(device) for k, v in s.items()} for s in (episode.support, episode.query))
        grads = {}
        for method in T.HESSIAN_METHODS:  # the same seed: every method sees the same dropout masks
            _, g = T.compute_meta_gradient(
                model, theta, support, query, inner_lr, ckpt_cfg.meta_learning.inner.default_num_steps,
                method, memory.gradient_accumulation.default_micro_batch, hessian=hessian,
                seed=ckpt_cfg.training.seed + index, head_init=ckpt_cfg.meta_learning.head_init)
            grads[method] = torch.cat([g[n].reshape(-1).double() for n in theta])  # (|theta|,)
        rows.append({m: _cosine(grads[m], grads["full"]) for m in T.HESSIAN_METHODS})
    return rows


def run_full(cfg, run_dir: str | os.PathLike, hyperparameter_search: bool = False,
             skip_baselines: bool = False, resume: str | os.PathLike | None = None,
             config_file=None, explicit_overrides: Mapping | None = None,
             mode_args: tuple[str, ...] = ("--mode", "full")) -> dict:
    """The whole experiment in one folder: (search,) train, evaluate, fidelity, (ablations,)
    statistics, figures and ``report.md``.

    Phases, each writing into `run_dir`:

    0. `--hyperparameter_search`: `run_hyperparameter_search`; the rest uses its best config.
    1. Meta-train (`T.run_training`): checkpoints/, metrics.jsonl, config.yml.
    2. Evaluate MELoRA and `evaluation.baselines` on the fixed meta-test episodes
       (`evaluation.run_evaluation`): results.json.
    3. Meta-gradient fidelity at the trained theta (`compute_fidelity`): fidelity.json.
    4. `analysis.run_ablations: true`: `run_ablations`: ablations.json.
    5. Paired comparisons of MELoRA with every baseline (`compare_methods`): comparison.json.
    6. Figures (`visualization.plot_all`): figures/.
    7. ``report.md``: the command, tables and figures.

    The meta-test data is read, its shape checked and its episodes fixed before training
    starts, so a class too small for the episodes is refused in the first minute.

    Args:
        cfg: the validated config.
        run_dir: the experiment folder (from `runs.prepare_run_dir`).
        hyperparameter_search: search hyperparameters first.
        skip_baselines: evaluate MELoRA only.
        resume: a checkpoint of this run (`--mode full --resume`): training continues from
            it (or is done already), then every later phase runs into the same folder.
        config_file, explicit_overrides: with `resume`, the keys the user named
            (`T.run_training`).
        mode_args: the flags of the command that continues this run after a stop.

    Returns:
        A summary: the run folder, the report, and the file of each phase.
    """

    run_dir, files, search = Path(run_dir), {}, None
    if hyperparameter_search:
        logger.info("full mode 0/7: hyperparameter search")
        search = run_hyperparameter_search(cfg, run_dir)
        best = {SEARCH_KEYS[k]: v for k, v in search["best_params"].items()}
        cfg = load_config_with_base(cfg.to_dict(), None, best)
        files["best_config"] = search["best_config"]
    baselines = not skip_baselines and bool(cfg.evaluation.baselines)
    evaluation.prepare_episodes(cfg, run_dir, baselines)  # data shape checked before training
    logger.info("full mode 1/7: meta-training")
    training = _meta_train(cfg, run_dir, resume, config_file, explicit_overrides, mode_args)
    logger.info("full mode 2/7: evaluation%s", "" if skip_baselines else " with baselines")
    results = evaluation.run_evaluation(cfg, training["last_checkpoint"], skip_baselines, run_dir)
    files["results"] = str(run_dir / RESULTS_FILE)
    logger.info("full mode 3/7: meta-gradient fidelity")
    fidelity = compute_fidelity(cfg, training["last_checkpoint"])
    if fidelity:
        files["fidelity"] = _write_json(run_dir / FIDELITY_FILE, fidelity)
    ablations = None
    if cfg.analysis.run_ablations:
        logger.info("full mode 4/7: ablations")
        ablations = run_ablations(cfg, run_dir)
        files["ablations"] = str(run_dir / ABLATIONS_FILE)
    logger.info("full mode 5/7: statistics")
    comparison = compare_methods(results, confidence=cfg.analysis.confidence,
                                 n_resamples=cfg.analysis.bootstrap_samples, seed=cfg.training.seed) \
        if len(methods_of(results)) > 1 else []
    files["comparison"] = _write_json(run_dir / COMPARISON_FILE, comparison)
    logger.info("full mode 6/7: figures")
    figures = visualization.plot_all(run_dir)
    logger.info("full mode 7/7: report")
    report = write_report(run_dir, cfg, results, comparison, figures, fidelity, ablations, search, training)
    summary = {"run_dir": str(run_dir), "report": str(report), "files": files,
               "figures": [str(p) for p in figures], "training": training}
    _write_json(run_dir / FULL_SUMMARY_FILE, summary)
    print(_full_summary_text(summary, training))
    return summary


def _meta_train(cfg, run_dir: Path, resume, config_file, explicit_overrides,
                mode_args: tuple[str, ...]) -> dict:
    """Phase 1: train (or continue `resume`); a checkpoint that finished training is used
    as it is, with the summary its training wrote."""
    if resume is not None:
        state = load_checkpoint(resume)
        if state["iteration"] >= cfg.meta_learning.num_iterations:
            logger.info("training of %s is complete (%d iterations): evaluating it",
                        resume, state["iteration"])
            return _finished_training(run_dir, Path(resume), state["iteration"])
    return T.run_training(cfg, run_dir, resume=resume, config_file=config_file,
                          explicit_overrides=explicit_overrides, mode_args=mode_args)


def _finished_training(run_dir: Path, checkpoint: Path, iterations: int) -> dict:
    """The summary of a training that already ended at `checkpoint`."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        if Path(summary["last_checkpoint"]).resolve() == checkpoint.resolve():
            return summary
    except (OSError, ValueError, KeyError, TypeError):
        pass  # killed between the last checkpoint and its summary: rebuild the essentials
    return {"run_dir": str(run_dir), "iterations": iterations, "checkpoints": [str(checkpoint)],
            "last_checkpoint": str(checkpoint), "config": str(run_dir / "config.yml"),
            "final_metrics": {}}


def write_report(run_dir: str | os.PathLike, cfg, results: Mapping, comparison: Sequence[Mapping],
                 figures: Sequence[os.PathLike], fidelity: Sequence[Mapping] | None = None,
                 ablations: Sequence[Mapping] | None = None, search: Mapping | None = None,
                 training: Mapping | None = None, argv: Sequence[str] | None = None) -> Path:
    """Write ``<run>/report.md``: the command, the setup, tables and the figures (relative links).

    Args:
        run_dir: the run folder (figures are linked relative to it).
        cfg: the config the run used.
        results: evaluation results (results.json).
        comparison: `compare_methods` rows.
        figures: figure paths (PNG ones are embedded).
        fidelity: `compute_fidelity` rows, or None.
        ablations: ablation rows, or None when ablations did not run.
        search: `run_hyperparameter_search`'s summary, or None.
        training: `T.run_training`'s summary, or None.
        argv: the command line; default `sys.argv`.

    Returns:
        The path of report.md.
    """
    run_dir = Path(run_dir)
    sections = [_report_header(cfg, results, training, argv),
                ("## Results\n\n" + format_results_table(results)),
                ("## Protocol per method\n\n" + _PROTOCOL_NOTE + "\n\n" + format_protocol_table(results)),
                ("## MELoRA against each baseline (paired over episodes)\n\n"
                 + format_comparison_table(comparison))]
    if fidelity:
        sections.append("## Meta-gradient fidelity\n\n" + format_fidelity_table(fidelity))
    if ablations is not None:
        sections.append("## Ablations\n\n" + format_ablation_table(ablations))
    if search is not None:
        sections.append(_report_search(search, run_dir))
    sections.append(_report_figures(run_dir, figures))
    path = run_dir / REPORT_FILE
    atomic_write_text(path, "\n\n".join(sections) + "\n")
    return path


_PROTOCOL_NOTE = (
    "Every method adapts on the same meta-test episodes for K steps from the same head init "
    "(`evaluation.head_init`; MELoRA keeps its training's). Each baseline's inner rate (and outer "
    "rate if it meta-trains) was chosen on meta-val episodes by the same number of Optuna trials; "
    "MELoRA's are its checkpoint's. Meta-learned methods train for the same number of iterations "
    "(MELoRA's) at the same meta-batch size, once per seed; accuracies and paired tests use "
    "per-episode accuracies averaged over seeds. `proto_lora` is MELoRA without an inner loop "
    "(K = 0) and `fomaml_lora` first-order MAML over the same LoRA: a lead over them is what the "
    "inner loop and its second order add. Memory of one meta-training step is the extra peak "
    "over the memory before it, named by the Hessian method the step used (MAML: `full` over "
    "all weights; MELoRA: its configured method and `full`).")


# --- Driver helpers --------------------------------------------------------------------



def _variant_config(cfg, overrides: Mapping[str, Any], experiment_name: str):
    """`cfg` with `overrides` ({"section.key": value}) applied and validated."""
    return load_config_with_base(cfg.to_dict(), None,
                                 {**overrides, "training.experiment_name": experiment_name})


def _ablation_variants(cfg) -> list[tuple[str, Any, Any]]:
    """(param, value, variant config) of every ablation (names and values were checked at load)."""
    out = []
    for param, values in cfg.analysis.ablations.to_dict().items():
        for value in values:
            name = f"{cfg.training.experiment_name}-{_variant_folder(param, value)}"
            out.append((param, value, _variant_config(cfg, {ABLATION_KEYS[param]: value}, name)))
    return out


def _variant_folder(param: str, value: Any) -> str:
    return f"{param}-{str(value).lower()}"


def _ablation_row(param: str, value: Any, cfg, sub: Path, spec: Path | None) -> dict:
    """Train and evaluate one ablation variant in `sub`; its row of ablations.json."""


    sub = prepare_run_dir(sub.parent, sub.name, overwrite=True, resume=False)
    if spec is not None:  # the same meta-test episodes as the run (or the first variant)
        shutil.copyfile(spec, sub / EPISODE_SPEC)
    training = T.run_training(cfg, sub)
    results = evaluation.run_evaluation(cfg, training["last_checkpoint"], True, sub)
    melora = results["methods"]["melora"]
    seconds = [r["seconds"] for r in load_metrics(sub / METRICS_FILE) if r.get("seconds") is not None]
    step_mb = melora.get("meta_step_peak_memory_mb")
    return {"parameter": param, "value": value, "accuracy_mean": melora["accuracy_mean"],
            "accuracy_ci95": melora["accuracy_ci95"],
            "peak_memory_mb": step_mb if step_mb is not None else melora["peak_memory_mb"],
            "seconds_per_iteration": float(np.mean(seconds)) if seconds else float("nan"),
            "iterations": training["iterations"], "run_dir": str(sub)}


def _suggest(trial, search) -> dict[str, Any]:
    """One trial's hyperparameters, keyed as in `SEARCH_KEYS`."""
    return {"inner_lr": trial.suggest_float("inner_lr", *search.inner_lr, log=True),
            "outer_lr": trial.suggest_float("outer_lr", *search.outer_lr, log=True),
            "inner_steps": trial.suggest_int("inner_steps", *search.inner_steps),
            "lora_rank": trial.suggest_categorical("lora_rank", list(search.lora_rank))}


def _objective(trial, cfg, tracker: "_TrialTracker") -> float:
    """Meta-train one trial's config; report meta-val accuracy every `report_every` iterations."""


    search = cfg.analysis.hyperparameter_search
    params = _suggest(trial, search)
    trial_cfg = _variant_config(cfg, {SEARCH_KEYS[k]: v for k, v in params.items()},
                                f"{cfg.training.experiment_name}-trial-{trial.number}")
    # 1. A fresh model and its meta-val episodes (the same fixed list for every trial).
    meta = T.MetaTrainer.from_config(trial_cfg)
    val_loader = DatasetLoader.from_config(trial_cfg, meta.loader.tokenizer, ("meta_val",))
    val = [val_loader.episode("meta_val", i) for i in range(search.val_episodes)]
    K = trial_cfg.meta_learning.inner.default_num_steps
    method = B.MELoRA(meta.model, meta.inner_lr, K, meta.method, meta.micro_batch,
                      head_init=trial_cfg.meta_learning.head_init)  # shares theta with `meta`
    iterations = search.num_iterations or trial_cfg.meta_learning.num_iterations
    run = tracker.start(trial.number, params)
    accuracy, state = float("nan"), "FAILED"
    try:
        # 2. Train in chunks; after each, meta-val accuracy goes to the pruner and MLflow.
        for it in range(iterations):
            metrics = meta.train_step(it)
            tracker.log(run, it + 1, {"meta_loss": metrics["meta_loss"]})
            if (it + 1) % search.report_every and it + 1 != iterations:
                continue
            accuracy = evaluation.val_accuracy(method, val, K, trial_cfg.training.seed)
            trial.report(accuracy, it + 1)
            tracker.log(run, it + 1, {"val_accuracy": accuracy})
            if trial.should_prune():
                state = "KILLED"
                raise optuna.TrialPruned(f"meta-val accuracy {accuracy:.3f} at iteration {it + 1}")
        state = "FINISHED"
        return accuracy
    finally:
        tracker.end(run, state, accuracy)


class _TrialTracker:
    """One MLflow run per trial, in the run folder's store (experiment <name>-hpo), written
    by the MLflow writer process (`metrics.MlflowRun`): the search never imports MLflow."""

    def __init__(self, cfg, run_dir: Path):
        self.on, self.run_dir = cfg.tracking.mlflow, run_dir
        self.experiment = f"{cfg.training.experiment_name}-hpo"
        self.step = 0

    def start(self, number: int, params: Mapping[str, Any]):
        if not self.on:
            return None
        self.step = 0
        return MlflowRun(self.run_dir, self.experiment, f"trial-{number}", params)

    def log(self, run, step: int, metrics: Mapping[str, float]) -> None:
        if run is None:
            return
        self.step = step
        run.log(step, {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)})

    def end(self, run, state: str, accuracy: float) -> None:
        if run is None:
            return
        if math.isfinite(accuracy):
            run.log(self.step, {"final_val_accuracy": accuracy})
        run.close(state, tags={"optuna_state": {"FINISHED": "complete", "KILLED": "pruned"}.get(state, "failed")})


def _search_summary(study, cfg, run_dir: Path, storage: str) -> dict:
    """Write best_config.yml and hpo_trials.json; the search's summary."""

    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
               "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())}}
              for t in study.trials]
    _write_json(run_dir / TRIALS_FILE, trials)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete:
        raise UserError(f"no trial of study {study.study_name!r} finished ({len(trials)} pruned or "
                        f"failed, see {run_dir / TRIALS_FILE}); narrow analysis.hyperparameter_search "
                        "ranges (smaller outer_lr) or raise n_trials")
    best = study.best_trial
    best_cfg = _variant_config(cfg, {SEARCH_KEYS[k]: v for k, v in best.params.items()},
                               f"{cfg.training.experiment_name}-best")
    header = (f"# Best config of Optuna study {study.study_name!r} ({storage}):\n"
              f"# trial {best.number}, meta-val accuracy {best.value:.4f}, params {best.params}.\n"
              "# Use it with: python main.py --config <this file> ...\n")
    path = run_dir / BEST_CONFIG_FILE
    atomic_write_text(path, header + yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    logger.info("hyperparameter search: best trial %d (meta-val accuracy %.4f) %s; config %s",
                best.number, best.value, best.params, path)
    return {"best_params": dict(best.params), "best_value": float(best.value),
            "best_trial": best.number, "best_config": str(path), "n_trials": len(trials),
            "storage": storage, "study_name": study.study_name, "trials": trials}


def _model_theta(model) -> dict:
    return M.lora_parameters(model)


def _cosine(a, b) -> float:
    """Cosine similarity of two flat tensors (0 when either is zero)."""
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


def _write_json(path: Path, obj: Any) -> str:
    atomic_write_json(path, obj)
    return str(path)


def _command_line(argv: Sequence[str] | None) -> str:
    """The command that produced the run, shell-quoted (`python main.py ...`)."""
    argv = list(sys.argv if argv is None else argv)
    prefix = ["python"] if argv and argv[0].endswith(".py") else []
    return shlex.join(prefix + argv)


def _report_header(cfg, results: Mapping, training: Mapping | None, argv) -> str:
    m = cfg.meta_learning
    budget = (f"{cfg.evaluation.baseline_meta_iterations} iterations"
              if cfg.evaluation.baseline_meta_iterations else "as many iterations as MELoRA")
    memory = cfg.memory_optimization
    lines = [f"# MELoRA experiment `{cfg.training.experiment_name}`", "",
             "Produced by:", "", "```bash", _command_line(argv), "```", "",
             f"- model: `{cfg.models.selected_model}`, LoRA rank {cfg.lora.default_rank}, "
             f"alpha {cfg.lora.alpha}",
             f"- tasks: {cfg.tasks.n_way}-way {cfg.tasks.k_shot}-shot, {cfg.tasks.q_query} query "
             f"per class; data: {'synthetic' if cfg.datasets.synthetic_only else 'see config.yml'}",
             f"- meta-training: {training['iterations'] if training else m.num_iterations} iterations, "
             f"meta-batch {m.default_meta_batch_size}, K={m.inner.default_num_steps} inner steps, "
             f"inner lr {m.inner.default_lr}, outer lr {m.outer.default_lr}",
             f"- meta-gradient: Hessian method `{memory.hessian_approximation.method}`, micro-batch "
             f"{memory.gradient_accumulation.default_micro_batch}, checkpointing "
             f"{({True: 'on', False: 'off'}.get(memory.checkpointing.enabled, 'auto'))}",
             f"- evaluation: {results.get('num_episodes', '?')} fixed meta-test episodes; accuracy "
             f"after K={results.get('reported_step', '?')} steps; memory: {results.get('memory_method', '?')}; "
             f"meta-learned baselines trained for {budget}; head init `{cfg.evaluation.head_init}`; "
             f"{cfg.evaluation.seeds} seed(s); {cfg.evaluation.tuning_trials} tuning trial(s) per "
             "baseline on meta-val",
             "- files: `results.json`, `comparison.json`, `metrics.jsonl`, `checkpoints/`, "
             "`config.yml` (the full config), `figures/`"]
    return "\n".join(lines)


def _report_search(search: Mapping, run_dir: Path) -> str:
    rows = [[str(t["number"]), t["state"].lower(), "-" if t["value"] is None else f"{100 * t['value']:.2f}",
             ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())]
            for t in search["trials"]]
    best = Path(search["best_config"])
    return (f"## Hyperparameter search\n\nOptuna study `{search['study_name']}` "
            f"({search['n_trials']} trials, storage `{search['storage']}`). Best: trial "
            f"{search['best_trial']}, meta-val accuracy {100 * search['best_value']:.2f}%, "
            f"{search['best_params']}; config `{_relative(best, run_dir)}` (used for this run).\n\n"
            + _markdown(["Trial", "State", "Meta-val acc. (%)", "Params"], rows))


def _report_figures(run_dir: Path, figures: Sequence[os.PathLike]) -> str:
    pngs = [Path(p) for p in figures if str(p).endswith(".png")]
    if not pngs:
        return "## Figures\n\n_No figures._"
    parts = ["## Figures (PDF beside each PNG)"]
    for p in pngs:
        parts.append(f"### {p.stem.replace('_', ' ')}\n\n![{p.stem}]({_relative(p, run_dir)})")
    return "\n\n".join(parts)


def _relative(path: Path, run_dir: Path) -> str:
    try:
        return Path(path).resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


def _full_summary_text(summary: Mapping, training: Mapping) -> str:
    run = summary["run_dir"]
    lines = [f"full experiment done: {run}", f"  report        {summary['report']}"]
    lines += [f"  {name:<13} {path}" for name, path in summary["files"].items()]
    lines.append(f"  figures       {Path(run) / FIGURES_DIR} ({len(summary['figures'])} files)")
    if "mlflow_command" in training:
        lines.append(f"  MLflow        {training['mlflow_command']}")
    if "tensorboard_command" in training:
        lines.append(f"  TensorBoard   {training['tensorboard_command']}")
    return "\n".join(lines)
