"""Figures of recorded MELoRA results (matplotlib; every figure saved as PNG and PDF).

Each ``plot_*`` function takes recorded data (a dict or list, or the path of the file
that holds it; formats in `analysis`'s module docstring) and an output path *stem*
(``figures/memory`` writes ``figures/memory.png`` and ``figures/memory.pdf``) and
returns the written PNG and PDF paths; the docstrings below name only the other arguments. `plot_all` draws whatever a run directory holds:

    python -c "import visualization; print(visualization.plot_all('results/melora'))"

Figures are built on `matplotlib.figure.Figure` with no pyplot state, so nothing here
changes the global backend or leaks open figures; rendering uses the Agg (PNG) and PDF
canvases. matplotlib is imported inside the functions that draw (STYLE.md: heavy
optional imports stay local).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import analysis
from analysis import ABLATIONS_FILE, FIDELITY_FILE, FIGURES_DIR, METRICS_FILE, RESULTS_FILE  # run-folder files

logger = logging.getLogger(__name__)

# --- Constants -------------------------------------------------------------------------

FORMATS = ("png", "pdf")
DPI = 150
EMA_WEIGHT = 0.9          # smoothing of training curves, as TensorBoard's slider (0 = raw)
RAW_ALPHA = 0.25          # opacity of the unsmoothed curve behind the smoothed one
BAND_ALPHA = 0.2          # opacity of confidence bands
COSINE_TOL = 1e-6        # float round-off allowed beyond |cosine| = 1 in fidelity files
LOG_SCALE_RATIO = 10.0    # accuracy-vs-memory uses a log x axis when max/min memory exceeds this
MEMORY_BASELINE = "maml"  # the headline memory comparison: reference vs full second-order MAML

# Fixed colours per method so one method looks the same in every figure.
KNOWN_METHODS = ("melora", "maml", "fomaml", "reptile", "reptile_lora", "finetune",
                 "finetune_multitask", "protonet")
BREAKDOWN_ORDER = ("weights", "adapter_and_optimizer", "activations", "second_order")
BREAKDOWN_LABELS = {"weights": "frozen weights", "adapter_and_optimizer": "adapter + optimizer state",
                    "activations": "activations", "second_order": "second-order (HVP) graph"}
PARAMETER_LABELS = {"lora_rank": "LoRA rank r", "inner_steps": "Inner steps K",
                    "hessian_method": "Hessian approximation", "checkpointing": "Gradient checkpointing",
                    "micro_batch": "Micro-batch size (0 = whole set)"}


# --- Figures ---------------------------------------------------------------------------


def plot_training_curves(metrics: Sequence[Mapping] | str | os.PathLike,
                         out_stem: str | os.PathLike) -> list[Path]:
    """Meta-training curves: meta-loss, query accuracy before/after adaptation, grad norm.

    Each series is drawn raw (faint) and smoothed by a debiased exponential moving
    average (weight `EMA_WEIGHT`). The gradient-norm panel appears when every record
    has ``grad_norm``.

    Args:
        metrics: Training-log records, or the path of ``metrics.jsonl``.

    Raises:
        ValueError: If there are no records or a record lacks a required key.

    Example:
        >>> plot_training_curves("run/metrics.jsonl", "run/figures/training_curves")  # doctest: +SKIP
    """
    records = analysis.load_metrics(metrics) if isinstance(metrics, str | os.PathLike) else list(metrics)
    if not records:
        raise ValueError("metrics has no records to plot")
    for i, record in enumerate(records):
        analysis.require_keys(record, ("iteration", "meta_loss", "query_acc_after"),
                          f"metrics record {i}")
    # query_acc_before is logged only with training.log_query_acc_before
    before = [("query_acc_before", "before adaptation", 100.0)] if all(
        "query_acc_before" in r for r in records) else []
    panels = [("Meta-loss (query cross-entropy, nats)", [("meta_loss", "meta-loss", 1.0)]),
              ("Query accuracy (%)", [*before, ("query_acc_after", "after adaptation", 100.0)])]
    if all("grad_norm" in r for r in records):
        panels.append(("Meta-gradient L2 norm", [("grad_norm", "gradient norm", 1.0)]))
    fig, axes = _new_figure(1, len(panels), (4.8 * len(panels), 3.8))
    iterations = np.array([r["iteration"] for r in records], dtype=float)
    for ax, (ylabel, series) in zip(axes[0], panels, strict=True):
        for color, (key, label, scale) in enumerate(series):
            values = scale * np.array([r[key] for r in records], dtype=float)
            _raw_and_smoothed(ax, iterations, values, label, f"C{color}")
        ax.set(xlabel="Meta-iteration", ylabel=ylabel, title=ylabel.split(" (")[0])
        ax.legend(fontsize="small")
    fig.suptitle(f"Meta-training curves (faint: raw; solid: EMA, weight {EMA_WEIGHT})")
    return _save(fig, out_stem)


def plot_accuracy_per_step(results: Mapping | str | os.PathLike, out_stem: str | os.PathLike) -> list[Path]:
    """Query accuracy after 0..K adaptation steps for every method, with CI bands.

    Args:
        results: Evaluation results (``results.json`` format) or its path.

    Raises:
        ValueError: If no method has ``accuracy_per_step`` or its lists differ in length.

    Example:
        >>> plot_accuracy_per_step("run/results.json", "run/figures/accuracy_per_step")  # doctest: +SKIP
    """
    results = _as_results(results)
    curves = {name: m["accuracy_per_step"] for name, m in analysis.methods_of(results).items()
              if m.get("accuracy_per_step")}
    if not curves:
        raise ValueError("no method in the results has 'accuracy_per_step' to plot")
    fig, axes = _new_figure(1, 1, (7.0, 4.5))
    ax = axes[0, 0]
    for name, curve in curves.items():
        steps, mean, low, high = _step_curve(name, curve)
        color = _method_color(name)
        ax.plot(steps, mean, marker="o", markersize=3, color=color, label=name)
        ax.fill_between(steps, low, high, color=color, alpha=BAND_ALPHA, linewidth=0)
    if results.get("n_way"):
        chance = 100.0 / results["n_way"]
        ax.axhline(chance, color="grey", linestyle=":", label=f"chance (1/N = {chance:.1f}%)")
    _integer_xticks(ax)
    ax.set(xlabel="Adaptation steps on the support set (inner-loop gradient steps)",
           ylabel="Query accuracy (%)", title=f"Accuracy vs. adaptation steps{_task_label(results)}")
    ax.legend(fontsize="small", title="method (band: 95% CI)", title_fontsize="small")
    return _save(fig, out_stem)


def plot_memory(results: Mapping | str | os.PathLike, out_stem: str | os.PathLike) -> list[Path]:
    """Bars of peak memory per method, stacked by component where a breakdown exists.

    Components not covered by the breakdown are drawn as "other" up to the peak. When
    both ``melora`` and `MEMORY_BASELINE` are present the title states the reduction.

    Args:
        results: Evaluation results (``results.json`` format) or its path.

    Raises:
        ValueError: If a method lacks ``peak_memory_mb``.

    Example:
        >>> plot_memory("run/results.json", "run/figures/memory")  # doctest: +SKIP
    """
    methods = analysis.methods_of(_as_results(results))
    for name, m in methods.items():
        analysis.require_keys(m, ("peak_memory_mb",), f"method {name!r}")
    names = list(methods)
    fig, axes = _new_figure(1, 1, (max(6.0, 1.1 * len(names)), 4.5))
    ax = axes[0, 0]
    x = np.arange(len(names))
    if any(methods[n].get("memory_breakdown_mb") for n in names):
        _stacked_memory_bars(ax, x, [methods[n] for n in names])
        ax.legend(fontsize="small", title="component", title_fontsize="small")
    else:
        ax.bar(x, [methods[n]["peak_memory_mb"] for n in names], color=[_method_color(n) for n in names])
    for xi, n in zip(x, names, strict=True):
        peak = methods[n]["peak_memory_mb"]
        ax.annotate(f"{peak:.0f}", (xi, peak), xytext=(0, 2), textcoords="offset points",
                    ha="center", va="bottom", fontsize="small")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel="Peak memory (MiB)", title="Peak memory per method" + _reduction_note(methods))
    ax.margins(y=0.1)
    return _save(fig, out_stem)


def plot_accuracy_vs_memory(results: Mapping | str | os.PathLike, out_stem: str | os.PathLike) -> list[Path]:
    """Accuracy against peak memory per method, with the Pareto front highlighted.

    Upper left is better; the front (no method both leaner and more accurate) is
    joined by a step line. Points carry 95% CI error bars and the method's name.

    Args:
        results: Evaluation results (``results.json`` format) or its path.

    Raises:
        ValueError: If a method lacks accuracy or memory.

    Example:
        >>> plot_accuracy_vs_memory("run/results.json", "run/figures/accuracy_vs_memory")  # doctest: +SKIP
    """
    methods = analysis.methods_of(_as_results(results))
    for name, m in methods.items():
        analysis.require_keys(m, ("accuracy_mean", "accuracy_ci95", "peak_memory_mb"), f"method {name!r}")
    names = list(methods)
    memory = [methods[n]["peak_memory_mb"] for n in names]
    accuracy = [100.0 * methods[n]["accuracy_mean"] for n in names]
    front = analysis.pareto_front(memory, accuracy)
    fig, axes = _new_figure(1, 1, (7.0, 5.0))
    ax = axes[0, 0]
    ax.step([memory[i] for i in front], [accuracy[i] for i in front], where="post", color="black",
            linestyle="--", linewidth=1, label="Pareto front", zorder=1)
    for i, n in enumerate(names):
        lo, hi = (100.0 * v for v in methods[n]["accuracy_ci95"])
        ax.errorbar(memory[i], accuracy[i], yerr=[[accuracy[i] - lo], [hi - accuracy[i]]], fmt="o",
                    color=_method_color(n), capsize=3, markersize=8 if i in front else 6,
                    markeredgecolor="black" if i in front else "none", zorder=2)
        ax.annotate(n, (memory[i], accuracy[i]), xytext=(6, 4), textcoords="offset points", fontsize="small",
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.8, "linewidth": 0},
                    zorder=3)  # the box keeps a name readable over a neighbour's error bar
    log_x = min(memory) > 0 and max(memory) / min(memory) > LOG_SCALE_RATIO
    if log_x:
        _plain_log_xaxis(ax)
    ax.set(xlabel="Peak memory (MiB" + (", log scale)" if log_x else ")"),
           ylabel="Accuracy (%, mean ± 95% CI)",
           title="Accuracy vs. memory (upper left is better; black edge: on the front)")
    ax.legend(fontsize="small", loc="lower right")
    ax.margins(0.12)
    return _save(fig, out_stem)


def plot_ablations(rows: Sequence[Mapping] | str | os.PathLike, out_stem: str | os.PathLike) -> list[Path]:
    """One panel per ablated parameter: accuracy with 95% CI and peak memory on a twin axis.

    Args:
        rows: Ablation rows (format in `analysis`) or the path of ``ablations.json``.

    Raises:
        ValueError: If there are no rows or a row lacks a required key.

    Example:
        >>> plot_ablations("run/ablations.json", "run/figures/ablations")  # doctest: +SKIP
    """
    rows = analysis.load_json(rows) if isinstance(rows, str | os.PathLike) else rows
    groups = analysis.group_ablations(rows)
    if not groups:
        raise ValueError("no ablation rows to plot")
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = _new_figure(nrows, ncols, (4.8 * ncols, 3.8 * nrows))
    for ax, (param, group) in zip(axes.flat, groups.items()):
        _ablation_panel(ax, param, group)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.suptitle("Ablations (left axis: accuracy, mean ± 95% CI; right axis: peak memory)")
    return _save(fig, out_stem)


def plot_gradient_fidelity(fidelity: Mapping | Sequence[Mapping] | str | os.PathLike,
                           out_stem: str | os.PathLike) -> list[Path]:
    """Bars of cosine similarity to the exact meta-gradient per Hessian approximation.

    With a list of per-task dicts the bars show the mean, error bars one standard
    deviation, and dots the individual tasks.

    Args:
        fidelity: ``{method: cosine}``, a list of such dicts, or the path of ``fidelity.json``.

    Raises:
        ValueError: If there are no values or a value is not a number in [-1, 1].

    Example:
        >>> plot_gradient_fidelity({"full": 1.0, "none": 0.47}, "run/figures/fidelity")  # doctest: +SKIP
    """
    tasks = _fidelity_tasks(fidelity)
    names = list(dict.fromkeys(m for t in tasks for m in t))  # as written: trainer.HESSIAN_METHODS' order
    values = [np.array([t[m] for t in tasks if m in t], dtype=float) for m in names]
    means = np.array([v.mean() for v in values])
    fig, axes = _new_figure(1, 1, (max(6.0, 1.2 * len(names)), 4.5))
    ax = axes[0, 0]
    x = np.arange(len(names))
    spread = [v.std() for v in values] if len(tasks) > 1 else None
    ax.bar(x, means, yerr=spread, capsize=4, color="C0", alpha=0.8, label="mean" if spread else None)
    if len(tasks) > 1:
        for xi, v in zip(x, values, strict=True):
            ax.plot(xi + np.linspace(-0.2, 0.2, v.size), v, "o", color="black", markersize=3, alpha=0.6)
        ax.plot([], [], "o", color="black", markersize=3, label="one task")
    for xi, mean in zip(x, means, strict=True):  # value at the bar's base: clear of error bars and dots
        ax.annotate(f"{mean:.3f}", (xi, max(mean, 0.0)), xytext=(0, -3), textcoords="offset points",
                    ha="center", va="top", fontsize="small", color="white", fontweight="bold")
    ax.axhline(1.0, color="grey", linestyle=":", label="exact (cosine 1)")
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylim(min(0.0, float(min(v.min() for v in values))) - 0.05, 1.1)
    over = f" (mean ± sd over {len(tasks)} tasks)" if len(tasks) > 1 else ""
    ax.set(xlabel="Hessian approximation (hessian_approximation.method)",
           ylabel="Cosine similarity to exact meta-gradient", title=f"Meta-gradient fidelity{over}")
    fig.legend(fontsize="small", loc="outside lower center", ncols=3)
    return _save(fig, out_stem)


def plot_all(run_dir: str | os.PathLike) -> list[Path]:
    """Draw every figure the files in a run directory allow, into ``run_dir/figures/``.

    Reads whichever of ``results.json``, ``metrics.jsonl``, ``ablations.json`` and
    ``fidelity.json`` exist; files that are absent or empty are skipped with a log
    message, malformed ones raise.

    Args:
        run_dir: The run directory.

    Returns:
        All written paths (empty when there was nothing to draw).

    Raises:
        ValueError: If ``run_dir`` is not a directory or a present file is malformed.

    Example:
        >>> plot_all("results/melora")  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run_dir {str(run_dir)!r} is not a directory")
    out, paths = run_dir / FIGURES_DIR, []
    if (run_dir / RESULTS_FILE).exists():
        paths += _plot_results(analysis.load_results(run_dir / RESULTS_FILE), out)
    if (run_dir / METRICS_FILE).exists() and (records := analysis.load_metrics(run_dir / METRICS_FILE)):
        paths += plot_training_curves(records, out / "training_curves")
    if (run_dir / ABLATIONS_FILE).exists() and (rows := analysis.load_json(run_dir / ABLATIONS_FILE)):
        paths += plot_ablations(rows, out / "ablations")
    if (run_dir / FIDELITY_FILE).exists():
        paths += plot_gradient_fidelity(run_dir / FIDELITY_FILE, out / "gradient_fidelity")
    if not paths:
        logger.warning("No figures drawn: %s holds none of %s (or they are empty)", run_dir,
                       [RESULTS_FILE, METRICS_FILE, ABLATIONS_FILE, FIDELITY_FILE])
    logger.info("Wrote %d figure files to %s", len(paths), out)
    return paths


# --- Private helpers -------------------------------------------------------------------


def _new_figure(nrows: int, ncols: int, size: tuple[float, float]) -> tuple[Any, np.ndarray]:
    """A pyplot-free figure and its (nrows, ncols) array of axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig: Any, out_stem: str | os.PathLike) -> list[Path]:
    """Write fig as <out_stem>.png and <out_stem>.pdf (parents created)."""
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(f"{stem.name}.{ext}") for ext in FORMATS]
    for path in paths:
        fig.savefig(path, dpi=DPI)
    return paths


def _plot_results(results: Mapping, out: Path) -> list[Path]:
    paths = plot_memory(results, out / "memory")
    paths += plot_accuracy_vs_memory(results, out / "accuracy_vs_memory")
    if any(m.get("accuracy_per_step") for m in analysis.methods_of(results).values()):
        paths += plot_accuracy_per_step(results, out / "accuracy_per_step")
    else:
        logger.info("Skipping accuracy_per_step: no method recorded accuracy per step")
    return paths


def _as_results(results: Mapping | str | os.PathLike) -> Mapping:
    return analysis.load_results(results) if isinstance(results, str | os.PathLike) else results


def _method_color(name: str) -> str:
    """Colour of a method: fixed for the known ones, hashed into tab20 otherwise."""
    if name in KNOWN_METHODS:
        return f"C{KNOWN_METHODS.index(name)}"
    from matplotlib import colormaps

    index = sum(map(ord, name)) % 20  # deterministic across runs, unlike hash()
    r, g, b, _ = colormaps["tab20"](index)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def _ema(values: np.ndarray, weight: float) -> np.ndarray:
    """Debiased exponential moving average; non-finite values are skipped (held)."""
    out, acc, norm = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        if np.isfinite(v):
            acc, norm = weight * acc + (1 - weight) * v, weight * norm + (1 - weight)
        out[i] = acc / norm if norm > 0 else np.nan
    return out


def _raw_and_smoothed(ax: Any, x: np.ndarray, y: np.ndarray, label: str, color: str) -> None:
    ax.plot(x, y, color=color, alpha=RAW_ALPHA, linewidth=1)
    ax.plot(x, _ema(y, EMA_WEIGHT), color=color, linewidth=2, label=label)


def _step_curve(name: str, curve: Mapping) -> tuple[np.ndarray, ...]:
    """(steps, mean %, low %, high %) of one accuracy_per_step record, validated."""
    keys = ("steps", "mean", "ci95_low", "ci95_high")
    analysis.require_keys(curve, keys, f"accuracy_per_step of {name!r}")
    lengths = {k: len(curve[k]) for k in keys}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"accuracy_per_step of {name!r} has lists of different lengths: {lengths}")
    steps = np.asarray(curve["steps"], dtype=float)
    return (steps, *(100.0 * np.asarray(curve[k], dtype=float) for k in keys[1:]))


def _integer_xticks(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _plain_log_xaxis(ax: Any) -> None:
    """Log x axis with ticks at 1, 2, 5 x 10^k written as plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _task_label(results: Mapping) -> str:
    if not all(k in results for k in ("n_way", "k_shot")):
        return ""
    episodes = f", {results['num_episodes']} episodes" if "num_episodes" in results else ""
    model = f"{results['model']}, " if "model" in results else ""
    return f"\n({model}{results['n_way']}-way {results['k_shot']}-shot{episodes})"


def _stacked_memory_bars(ax: Any, x: np.ndarray, methods: list[Mapping]) -> None:
    """Stack each method's breakdown components; the rest of its peak is 'other'."""
    bottoms = np.zeros(len(methods))
    components = list(BREAKDOWN_ORDER)
    components += sorted({c for m in methods for c in m.get("memory_breakdown_mb") or {}} - set(components))
    for i, comp in enumerate(components):
        heights = np.array([(m.get("memory_breakdown_mb") or {}).get(comp, 0.0) for m in methods])
        if heights.any():
            ax.bar(x, heights, bottom=bottoms, color=f"C{i}", label=BREAKDOWN_LABELS.get(comp, comp))
            bottoms += heights
    other = np.array([max(0.0, m["peak_memory_mb"] - b) for m, b in zip(methods, bottoms, strict=True)])
    if other.any():
        ax.bar(x, other, bottom=bottoms, color="lightgrey", hatch="//", edgecolor="grey",
               label="other / no breakdown")


def _reduction_note(methods: Mapping[str, Mapping]) -> str:
    ref = analysis.DEFAULT_REFERENCE
    if ref not in methods or MEMORY_BASELINE not in methods:
        return ""
    if methods[MEMORY_BASELINE]["peak_memory_mb"] <= 0:
        return ""
    saving = 1.0 - methods[ref]["peak_memory_mb"] / methods[MEMORY_BASELINE]["peak_memory_mb"]
    return f"\n{ref} uses {100 * saving:.0f}% less peak memory than {MEMORY_BASELINE}"


def _ablation_panel(ax: Any, param: str, group: list[Mapping]) -> None:
    x = np.arange(len(group))
    acc = np.array([100.0 * r["accuracy_mean"] for r in group])
    lo, hi = (np.array([100.0 * r["accuracy_ci95"][j] for r in group]) for j in (0, 1))
    # join the points only when the values are ordered numbers (rank, K), not categories
    ordered = all(isinstance(r["value"], int | float) and not isinstance(r["value"], bool) for r in group)
    style = "-" if ordered else ""
    ax.errorbar(x, acc, yerr=[acc - lo, hi - acc], fmt=style + "o", color="C0", capsize=3, label="accuracy")
    ax.set_ylabel("Accuracy (%)", color="C0")
    twin = ax.twinx()
    twin.plot(x, [r["peak_memory_mb"] for r in group], ("--" if ordered else "") + "s", color="C1",
              label="peak memory")
    twin.set_ylabel("Peak memory (MiB)", color="C1")
    ax.set_xticks(x, [str(r["value"]) for r in group])
    label = PARAMETER_LABELS.get(param, param)
    ax.set(xlabel=label, title=label.split(" (")[0])
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize="small", loc="best")


def _fidelity_tasks(fidelity: Mapping | Sequence[Mapping] | str | os.PathLike) -> list[Mapping]:
    """The fidelity data as a non-empty list of validated per-task dicts."""
    if isinstance(fidelity, str | os.PathLike):
        fidelity = analysis.load_json(fidelity)
    tasks = [fidelity] if isinstance(fidelity, Mapping) else list(fidelity)
    if not tasks or not all(isinstance(t, Mapping) and t for t in tasks):
        raise ValueError("fidelity must be a non-empty {method: cosine} dict or a list of such dicts")
    for i, task in enumerate(tasks):
        for method, cos in task.items():
            if not isinstance(cos, int | float) or abs(cos) > 1.0 + COSINE_TOL:
                raise ValueError(f"fidelity of {method!r} (task {i}) must be a cosine in [-1, 1], "
                                 f"got {cos!r}")
    return tasks
