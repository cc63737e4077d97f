"""Statistics over recorded MELoRA results: paired tests, CIs, effect sizes, tables.

The statistics and tables work on plain JSON-like data written by `evaluation.py` and
`trainer.py`; they import no torch and touch no model, so they run anywhere
(`python -c "import analysis; ..."`) on the files of a finished run. The drivers at the
end (ablations, Optuna search, meta-gradient fidelity, and `run_full`, the body of
`python main.py --mode full`) run training and evaluation; they import torch and the
trainer inside the functions.

Input formats (the contract with `evaluation.py` and `trainer.py`):

1. Evaluation results, ``<run>/results.json``::

       {"model": str, "n_way": int, "k_shot": int, "q_query": int, "num_episodes": int,
        "methods": {"<name>": {                 # melora, maml, fomaml, reptile, ...
            "accuracy_mean": float,             # fraction in [0, 1]
            "accuracy_ci95": [lo, hi],
            "per_episode_accuracy": [float, ...],   # same episodes, same order for every
                                                    # method: the comparisons are paired
            "accuracy_per_step": {"steps": [...], "mean": [...],
                                  "ci95_low": [...], "ci95_high": [...]},
            "peak_memory_mb": float, "seconds_per_episode": float,
            # optional, written by evaluation.py's fair protocol (see its docstring):
            # "head_init", "inner_lr", "outer_lr", "tuning_trials", "meta_train_iterations",
            # "seeds", "seed_accuracies", "accuracy_sd", "per_seed_episode_accuracy",
            # "meta_step_hessian", "meta_step_peak_memory_mb_by_hessian": {hessian: MiB},
            "memory_breakdown_mb": {"weights": f, "adapter_and_optimizer": f,
                                    "activations": f, "second_order": f}}}}  # optional

2. Training log, ``<run>/metrics.jsonl``: one object per line with ``iteration``,
   ``meta_loss``, ``query_acc_before``, ``query_acc_after``, ``grad_norm``,
   ``outer_lr``, ``peak_memory_mb``, ``seconds``.
3. Ablation results, ``<run>/ablations.json``: a list of ``{"parameter", "value",
   "accuracy_mean", "accuracy_ci95", "peak_memory_mb", "seconds_per_iteration"}``.
4. Meta-gradient fidelity, ``<run>/fidelity.json``: ``{"full": 1.0, "gauss_newton": f,
   ...}`` (cosine similarity to the exact meta-gradient) or a list of such dicts, one
   per task.

Statistics (all comparisons are paired over the shared meta-test episodes):

- t confidence interval of a mean (`mean_ci`);
- paired t-test and Wilcoxon signed-rank test with Pratt's treatment of zero differences
  (`paired_ttest`, `wilcoxon_test`);
- BCa bootstrap CI of the mean paired difference (`bootstrap_ci_diff`, via
  `scipy.stats.bootstrap`; Efron & Tibshirani 1993, ch. 14);
- Cohen's d for paired samples, d_z = mean(diff) / sd(diff) (`cohens_d_paired`;
  Cohen 1988; Lakens 2013);
- Holm's step-down correction for multiple comparisons (`holm_bonferroni`; Holm 1979).

Example:
    >>> import analysis, json
    >>> results = analysis.load_results("results/melora/results.json")  # doctest: +SKIP
    >>> print(analysis.format_comparison_table(analysis.compare_methods(results)))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

# Defaults of the public signatures; config.yml (analysis.confidence,
# analysis.bootstrap_samples) is where a run sets them.
DEFAULT_CONFIDENCE = 0.95
DEFAULT_N_RESAMPLES = 10000
DEFAULT_REFERENCE = "melora"

# Paired differences are rounded to this many decimals before testing: accuracies are
# k / n_query fractions, and float round-off (0.7 - 0.6 != 0.6 - 0.5) would otherwise
# break true ties in the Wilcoxon ranks and hide a zero variance.
DIFF_DECIMALS = 12

# Bootstrap resamples are drawn in batches of at most this many indices, bounding memory
# for long evaluations (scipy.stats.bootstrap's `batch`).
_BOOTSTRAP_CHUNK_ELEMENTS = 2**20


# --- Loading ---------------------------------------------------------------------------


def load_results(path: str | os.PathLike) -> dict:
    """Read an evaluation ``results.json`` and check that it has a ``methods`` mapping.

    Args:
        path: Path of the results file.

    Returns:
        The parsed results dict.

    Raises:
        ValueError: If the file is not a results object with a ``methods`` mapping.
    """
    results = _read_json(path)
    methods_of(results)  # validates the shape
    return results


def load_metrics(path: str | os.PathLike) -> list[dict]:
    """Read a training log ``metrics.jsonl`` (one JSON object per line; blank lines skipped).

    Args:
        path: Path of the JSON-lines file.

    Returns:
        The records in file order.

    Raises:
        ValueError: If a line is not a JSON object; the message names the line.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no} is not valid JSON: {e}") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no} must be a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def load_json(path: str | os.PathLike) -> Any:
    """Read any JSON file (ablation rows, fidelity dicts).

    Args:
        path: Path of the JSON file.

    Returns:
        The parsed object.

    Raises:
        ValueError: If the file is not valid JSON.
    """
    return _read_json(path)


def methods_of(results: Mapping) -> Mapping[str, Mapping]:
    """Return the ``methods`` mapping of an evaluation results dict.

    Args:
        results: Evaluation results in the ``results.json`` format.

    Returns:
        Method name -> that method's results.

    Raises:
        ValueError: If ``results`` has no non-empty ``methods`` mapping, or an
            ``accuracy_mean`` is not a fraction in [0, 1] (tables and figures show percent).
    """
    methods = results.get("methods") if isinstance(results, Mapping) else None
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError("results must be a dict with a non-empty 'methods' mapping "
                         "(the results.json format written by evaluation.py)")
    for name, m in methods.items():
        acc = m.get("accuracy_mean", 0.0)
        if not 0.0 <= acc <= 1.0:
            raise ValueError(f"accuracy_mean of method {name!r} must be a fraction in [0, 1], got {acc!r}")
    return methods


# --- Basic statistics ------------------------------------------------------------------


def mean_ci(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval of the mean.

    Args:
        values: At least one finite value.
        confidence: Confidence level in (0, 1).

    Returns:
        ``(mean, lo, hi)``. With one value or zero spread the interval collapses to the
        mean (there is no sampling spread to report).

    Raises:
        ValueError: If ``values`` is empty or not finite, or ``confidence`` is out of range.

    Example:
        >>> mean_ci([0.5, 0.7, 0.6])[0]
        0.6
    """
    _check_confidence(confidence)
    x = _as_finite_1d(values, "values", min_len=1)
    mean = float(np.mean(x))
    sem = float(stats.sem(x)) if x.size > 1 else 0.0
    if sem == 0.0:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + confidence / 2, df=x.size - 1)) * sem
    return mean, mean - half, mean + half


def paired_ttest(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Two-sided paired t-test of mean(a - b) = 0.

    Args:
        a: Per-episode scores of one method.
        b: Per-episode scores of another method on the same episodes.

    Returns:
        ``{"statistic", "p_value"}`` as `scipy.stats.ttest_rel`. When every difference
        is the same (zero variance): all zero gives statistic 0 and p 1; a constant
        non-zero difference gives statistic +-inf and p 0.

    Raises:
        ValueError: If the samples differ in length, have fewer than two values or are
            not finite.

    Example:
        >>> paired_ttest([0.6, 0.8, 0.7], [0.6, 0.8, 0.7])
        {'statistic': 0.0, 'p_value': 1.0}
    """
    d = _paired_differences(a, b)
    if np.all(d == d[0]):
        if d[0] == 0:
            return {"statistic": 0.0, "p_value": 1.0}
        return {"statistic": math.copysign(math.inf, d[0]), "p_value": 0.0}
    res = stats.ttest_1samp(d, 0.0)
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue)}


def wilcoxon_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Two-sided Wilcoxon signed-rank test of the paired differences a - b.

    ``zero_method="pratt"`` (Pratt 1959): zero differences are ranked with the others
    and then dropped from the rank sums, so episodes on which two methods tie still
    count towards the sample size (scipy's default, ``"wilcox"``, discards them first,
    which overstates the evidence when many episodes tie, as few-shot accuracies do).
    scipy chooses the exact or the normal-approximation p-value.

    Args:
        a: Per-episode scores of one method.
        b: Per-episode scores of another method on the same episodes.

    Returns:
        ``{"statistic", "p_value"}`` as ``scipy.stats.wilcoxon(a - b, zero_method="pratt")``.
        When every difference is zero there is no evidence of a difference: statistic 0, p 1.

    Raises:
        ValueError: If the samples differ in length, have fewer than two values or are
            not finite.

    Example:
        >>> wilcoxon_test([0.9, 0.8, 0.7, 0.9, 0.8, 0.9], [0.5, 0.6, 0.4, 0.3, 0.6, 0.5])["p_value"]
        0.03125
    """
    d = _paired_differences(a, b)
    if np.all(d == 0):
        return {"statistic": 0.0, "p_value": 1.0}
    res = stats.wilcoxon(d, zero_method="pratt")
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue)}


def bootstrap_ci_diff(a: Sequence[float], b: Sequence[float], n_resamples: int = DEFAULT_N_RESAMPLES,
                      confidence: float = DEFAULT_CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """BCa bootstrap CI of the mean paired difference mean(a - b).

    Episodes are resampled with replacement as pairs (the differences d = a - b are
    resampled), and the interval is the bias-corrected and accelerated one (Efron 1987;
    Efron & Tibshirani 1993, ch. 14): it corrects the percentile interval for the skew
    and bias of the mean of bounded accuracies. Computed by
    ``scipy.stats.bootstrap((d,), np.mean, method="BCa", rng=np.random.default_rng(seed))``
    in batches of resamples that bound memory for long evaluations.

    Args:
        a: Per-episode scores of one method.
        b: Per-episode scores of another method on the same episodes.
        n_resamples: Number of bootstrap resamples (positive).
        confidence: Confidence level in (0, 1).
        seed: Seed of the resampling; the same seed gives the same interval.

    Returns:
        ``(lo, hi)``; ``(d, d)`` when every difference is the same d (no spread).

    Raises:
        ValueError: On unpaired or non-finite samples or out-of-range arguments.

    Example:
        >>> lo, hi = bootstrap_ci_diff([0.9, 0.8, 0.7, 0.9], [0.5, 0.6, 0.4, 0.3], n_resamples=1000)
        >>> 0.0 < lo < hi
        True
    """
    _check_confidence(confidence)
    if not isinstance(n_resamples, int | np.integer) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    d = _paired_differences(a, b)
    if np.all(d == d[0]):
        return float(d[0]), float(d[0])
    res = stats.bootstrap((d,), np.mean, n_resamples=int(n_resamples), confidence_level=confidence,
                          method="BCa", batch=max(1, _BOOTSTRAP_CHUNK_ELEMENTS // d.size),
                          rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def cohens_d_paired(a: Sequence[float], b: Sequence[float]) -> float:
    """Cohen's d for paired samples (d_z): mean(a - b) / sd(a - b), sd with ddof=1.

    Args:
        a: Per-episode scores of one method.
        b: Per-episode scores of another method on the same episodes.

    Returns:
        The effect size. With zero variance of the differences: 0.0 when they are all
        zero, +-inf (the sign of the difference) when they are a non-zero constant.

    Raises:
        ValueError: On unpaired, too short or non-finite samples.

    Example:
        >>> round(cohens_d_paired([0.9, 0.8, 0.7], [0.5, 0.6, 0.6]), 3)
        1.528
    """
    d = _paired_differences(a, b)
    mean = float(np.mean(d))
    sd = float(np.std(d, ddof=1))
    if sd == 0.0:
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / sd


def holm_bonferroni(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (Holm 1979).

    With raw p-values sorted ascending p_(1) <= ... <= p_(m), the adjusted value is
    ``max_{j <= i} min(1, (m - j + 1) * p_(j))``: monotone in the raw order, never below
    the raw p-value, capped at 1. Rejecting where adjusted p < alpha controls the
    family-wise error rate at alpha.

    Args:
        p_values: Name -> raw p-value in [0, 1].

    Returns:
        Name -> adjusted p-value, same keys (empty in, empty out).

    Raises:
        ValueError: If a p-value is not a number in [0, 1]; the message names it.

    Example:
        >>> holm_bonferroni({"a": 0.01, "b": 0.04, "c": 0.03})
        {'a': 0.03, 'b': 0.06, 'c': 0.06}
    """
    for name, p in p_values.items():
        if not isinstance(p, int | float | np.floating) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p-value of {name!r} must be a number in [0, 1], got {p!r}")
    order = sorted(p_values, key=lambda name: p_values[name])
    m = len(order)
    adjusted, running_max = {}, 0.0
    for rank, name in enumerate(order):
        running_max = max(running_max, min(1.0, (m - rank) * float(p_values[name])))
        adjusted[name] = running_max
    return {name: adjusted[name] for name in p_values}


# --- Method comparison -----------------------------------------------------------------


def compare_methods(results: Mapping, reference: str = DEFAULT_REFERENCE,
                    confidence: float = DEFAULT_CONFIDENCE, n_resamples: int = DEFAULT_N_RESAMPLES,
                    seed: int = 0) -> list[dict]:
    """Compare the reference method with every other method, paired over episodes.

    For each other method (in the order of ``results["methods"]``) computes the mean
    difference reference - method of per-episode accuracy, its BCa bootstrap CI,
    the paired t-test, the Wilcoxon signed-rank test, Cohen's d_z, and Holm-adjusted
    p-values of both tests over the family of comparisons. A comparison is
    ``significant`` when both Holm-adjusted p-values are below alpha = 1 - confidence.

    Args:
        results: Evaluation results in the ``results.json`` format.
        reference: Method every other method is compared with.
        confidence: Confidence level of the bootstrap CI; alpha = 1 - confidence.
        n_resamples: Bootstrap resamples per comparison.
        seed: Bootstrap seed (the same for every comparison).

    Returns:
        One dict per compared method with keys ``method``, ``reference``, ``n_episodes``,
        ``mean_diff``, ``ci_low``, ``ci_high``, ``confidence``, ``t_statistic``,
        ``t_p_value``, ``t_p_holm``, ``wilcoxon_statistic``, ``wilcoxon_p_value``,
        ``wilcoxon_p_holm``, ``cohens_d``, ``significant``. Empty when the reference is
        the only method.

    Raises:
        ValueError: If the reference is missing, a method lacks ``per_episode_accuracy``,
            or a method's episodes do not pair with the reference's (different lengths).

    Example:
        >>> results = {"methods": {"melora": {"per_episode_accuracy": [0.9, 0.8, 0.7, 0.9]},
        ...                        "maml": {"per_episode_accuracy": [0.5, 0.6, 0.4, 0.3]}}}
        >>> [(r["method"], round(r["mean_diff"], 3)) for r in compare_methods(results, n_resamples=100)]
        [('maml', 0.375)]
    """
    _check_confidence(confidence)
    methods = methods_of(results)
    if reference not in methods:
        raise ValueError(f"reference method {reference!r} is not in the results; "
                         f"available: {sorted(methods)}")
    ref = _episode_accuracy(methods, reference)
    rows = [_compare_pair(ref, _episode_accuracy(methods, name), reference, name,
                          confidence, n_resamples, seed)
            for name in methods if name != reference]
    _add_holm(rows, "t_p_value", "t_p_holm")
    _add_holm(rows, "wilcoxon_p_value", "wilcoxon_p_holm")
    alpha = 1.0 - confidence
    for row in rows:
        row["significant"] = bool(row["t_p_holm"] < alpha and row["wilcoxon_p_holm"] < alpha)
    return rows


def pareto_front(memory: Sequence[float], accuracy: Sequence[float]) -> list[int]:
    """Indices of the points on the accuracy-memory Pareto front.

    A point is on the front when no other point has memory <= and accuracy >= with at
    least one strict (less memory is better, more accuracy is better).

    Args:
        memory: Peak memory per point.
        accuracy: Accuracy per point, same length.

    Returns:
        Indices of the non-dominated points, sorted by memory ascending.

    Raises:
        ValueError: If the lengths differ.

    Example:
        >>> pareto_front([100, 200, 150], [0.6, 0.8, 0.5])
        [0, 1]
    """
    if len(memory) != len(accuracy):
        raise ValueError(f"memory and accuracy must have the same length, "
                         f"got {len(memory)} and {len(accuracy)}")
    points = list(zip(memory, accuracy, strict=True))
    front = [i for i, (m, a) in enumerate(points)
             if not any(m2 <= m and a2 >= a and (m2 < m or a2 > a) for m2, a2 in points)]
    return sorted(front, key=lambda i: (memory[i], -accuracy[i]))


# --- Markdown tables -------------------------------------------------------------------


def format_comparison_table(rows: Sequence[Mapping]) -> str:
    """Markdown table of `compare_methods` rows (differences in accuracy points, %).

    Args:
        rows: Output of `compare_methods`.

    Returns:
        The table; a one-line note when there is nothing to compare.
    """
    if not rows:
        return "_No methods to compare._"
    level = _percent_label(rows[0].get("confidence", DEFAULT_CONFIDENCE))
    ref = rows[0]["reference"]
    header = ["Method", f"Δ acc. {ref} − method (pp)", f"{level} bootstrap CI (pp)",
              "t p (Holm)", "Wilcoxon p (Holm)", "Cohen's d", "Significant"]
    body = [[r["method"], f"{100 * r['mean_diff']:+.2f}",
             f"[{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]",
             f"{_fmt_p(r['t_p_value'])} ({_fmt_p(r['t_p_holm'])})",
             f"{_fmt_p(r['wilcoxon_p_value'])} ({_fmt_p(r['wilcoxon_p_holm'])})",
             f"{r['cohens_d']:.2f}", "yes" if r["significant"] else "no"] for r in rows]
    return _markdown(header, body)


def format_results_table(results: Mapping) -> str:
    """Markdown table of the evaluation results, one row per method.

    Args:
        results: Evaluation results in the ``results.json`` format.

    Returns:
        Columns: method, accuracy (%) mean ± half-width of the 95% CI, peak memory
        (MiB) with the Hessian method of the method's meta-gradient (``meta_step_hessian``;
        "-" without meta-training), seconds per episode.

    Raises:
        ValueError: If a method lacks one of the reported keys.
    """
    header = ["Method", "Accuracy (%, mean ± 95% CI)", "Peak memory (MiB)", "Meta-gradient Hessian",
              "Time (s/episode)"]
    body = []
    for name, m in methods_of(results).items():
        require_keys(m, ("accuracy_mean", "accuracy_ci95", "peak_memory_mb", "seconds_per_episode"),
                     f"method {name!r}")
        lo, hi = m["accuracy_ci95"]
        body.append([name, f"{100 * m['accuracy_mean']:.2f} ± {100 * (hi - lo) / 2:.2f}",
                     f"{m['peak_memory_mb']:.1f}", str(m.get("meta_step_hessian") or "-"),
                     f"{m['seconds_per_episode']:.3f}"])
    return _markdown(header, body)


def format_protocol_table(results: Mapping) -> str:
    """Markdown table of how each method was run: head init, rates (tuned on meta-val or
    configured), meta-training budget, seeds and their spread, and the extra peak memory
    of one meta-training step by the Hessian method it used.

    Args:
        results: Evaluation results in the ``results.json`` format (keys missing from
            older files show as "-").

    Returns:
        The table.
    """
    header = ["Method", "Head init", "Inner lr", "Outer lr", "Tuning trials", "Meta-train iterations",
              "Seeds: accuracy (%)", "SD across seeds (pp)", "Meta-step extra peak (MiB, by Hessian)"]
    body = []
    for name, m in methods_of(results).items():
        by = m.get("meta_step_peak_memory_mb_by_hessian") or {}
        seeds = m.get("seed_accuracies") or []
        body.append([name, str(m.get("head_init", "-")), _fmt_rate(m.get("inner_lr")),
                     _fmt_rate(m.get("outer_lr")), str(m.get("tuning_trials", "-")),
                     str(m.get("meta_train_iterations", "-")),
                     ", ".join(f"{100 * a:.2f}" for a in seeds) or "-",
                     f"{100 * m['accuracy_sd']:.2f}" if "accuracy_sd" in m else "-",
                     "; ".join(f"{mb:.1f} ({h})" for h, mb in by.items()) or "-"])
    return _markdown(header, body)


def _fmt_rate(rate) -> str:
    if rate is None:
        return "-"
    if isinstance(rate, Sequence):
        return "[" + ", ".join(f"{r:.3g}" for r in rate) + "]"
    return f"{rate:.3g}"


def format_ablation_table(rows: Sequence[Mapping]) -> str:
    """Markdown table of ablation rows, grouped by parameter in order of appearance.

    Args:
        rows: Ablation rows (``parameter``, ``value``, ``accuracy_mean``,
            ``accuracy_ci95``, ``peak_memory_mb``, ``seconds_per_iteration``).

    Returns:
        The table; a one-line note when there are no rows.

    Raises:
        ValueError: If a row lacks one of those keys.
    """
    if not rows:
        return "_No ablation results._"
    header = ["Parameter", "Value", "Accuracy (%, mean ± 95% CI)", "Peak memory (MiB)", "Time (s/iteration)"]
    body = []
    for param, group in group_ablations(rows).items():
        for r in group:
            lo, hi = r["accuracy_ci95"]
            body.append([param, str(r["value"]),
                         f"{100 * r['accuracy_mean']:.2f} ± {100 * (hi - lo) / 2:.2f}",
                         f"{r['peak_memory_mb']:.1f}", f"{r['seconds_per_iteration']:.3f}"])
    return _markdown(header, body)


def group_ablations(rows: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    """Group ablation rows by ``parameter``, keeping the order of first appearance.

    Args:
        rows: Ablation rows.

    Returns:
        Parameter -> its rows in input order.

    Raises:
        ValueError: If a row lacks a required key; the message names the row.
    """
    keys = ("parameter", "value", "accuracy_mean", "accuracy_ci95", "peak_memory_mb", "seconds_per_iteration")
    groups: dict[str, list[Mapping]] = {}
    for i, row in enumerate(rows):
        require_keys(row, keys, f"ablation row {i}")
        groups.setdefault(str(row["parameter"]), []).append(row)
    return groups


def require_keys(record: Mapping, keys: Sequence[str], what: str) -> None:
    """Check that a recorded result has the keys a table or figure needs.

    Args:
        record: One recorded result (a method's results, an ablation row, a log record).
        keys: Keys that must be present.
        what: How to name the record in the error, e.g. ``"method 'maml'"``.

    Raises:
        ValueError: Naming the record and its missing keys.
    """
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{what} is missing {missing}")


# --- Private helpers -------------------------------------------------------------------


def _read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


def _as_finite_1d(values: Sequence[float], name: str, min_len: int) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size < min_len:
        raise ValueError(f"{name} must be a 1-D sequence of at least {min_len} values, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite, got {int(np.sum(~np.isfinite(x)))} non-finite values")
    return x


def _paired_differences(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """a - b rounded to DIFF_DECIMALS, after checking the samples pair up."""
    x, y = _as_finite_1d(a, "a", 2), _as_finite_1d(b, "b", 2)
    if x.size != y.size:
        raise ValueError(f"paired samples must have the same length, got {x.size} and {y.size}")
    return np.round(x - y, DIFF_DECIMALS)


def _episode_accuracy(methods: Mapping[str, Mapping], name: str) -> list[float]:
    values = methods[name].get("per_episode_accuracy")
    if not isinstance(values, Sequence) or len(values) < 2:
        raise ValueError(f"method {name!r} needs 'per_episode_accuracy' with at least 2 episodes "
                         "for paired tests")
    return list(values)


def _compare_pair(ref: list[float], other: list[float], reference: str, name: str,
                  confidence: float, n_resamples: int, seed: int) -> dict:
    if len(ref) != len(other):
        raise ValueError(f"method {name!r} has {len(other)} per-episode accuracies but reference "
                         f"{reference!r} has {len(ref)}; paired tests need the same episodes")
    t, w = paired_ttest(ref, other), wilcoxon_test(ref, other)
    lo, hi = bootstrap_ci_diff(ref, other, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return {"method": name, "reference": reference, "n_episodes": len(ref),
            "mean_diff": float(np.mean(_paired_differences(ref, other))),
            "ci_low": lo, "ci_high": hi, "confidence": confidence,
            "t_statistic": t["statistic"], "t_p_value": t["p_value"],
            "wilcoxon_statistic": w["statistic"], "wilcoxon_p_value": w["p_value"],
            "cohens_d": cohens_d_paired(ref, other)}


def _add_holm(rows: list[dict], raw_key: str, adjusted_key: str) -> None:
    adjusted = holm_bonferroni({row["method"]: row[raw_key] for row in rows})
    for row in rows:
        row[adjusted_key] = adjusted[row["method"]]


def _fmt_p(p: float) -> str:
    return "<1e-4" if p < 1e-4 else f"{p:.4f}"


def _percent_label(confidence: float) -> str:
    return f"{100 * confidence:g}%"


def _markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


# --- Drivers (ablations, hyperparameter search) ---
# Reserved: the ablation and Optuna hyperparameter-search drivers go here. They run
# training/evaluation and write rows in the ablation format documented above.
#
# They import torch, the trainer and the evaluator inside the functions, so the
# statistics above stay importable without them. Every driver writes into a run folder:
#
#     run_ablations(cfg, run_dir)              -> <run>/ablations.json, <run>/ablations/<param>-<value>/
#     run_hyperparameter_search(cfg, run_dir)  -> <run>/optuna.db, <run>/best_config.yml, <run>/hpo_trials.json
#     compute_fidelity(cfg, checkpoint)        -> [{method: cosine}, ...] (full mode: <run>/fidelity.json)
#     run_full(cfg, run_dir, hyperparameter_search)  -> train, evaluate, fidelity, ablations,
#                                                      statistics, figures, <run>/report.md

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
ABLATIONS_FILE, FIDELITY_FILE, COMPARISON_FILE = "ablations.json", "fidelity.json", "comparison.json"
BEST_CONFIG_FILE, TRIALS_FILE, OPTUNA_DB, REPORT_FILE = ("best_config.yml", "hpo_trials.json",
                                                        "optuna.db", "report.md")
ABLATIONS_DIR = "ablations"
FIGURES_DIR = "figures"


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
        cfg: the validated config (`utils.Config`).
        run_dir: the run folder; ablations.json goes there.

    Returns:
        The rows (`parameter`, `value`, `accuracy_mean`, `accuracy_ci95`,
        `peak_memory_mb`, `seconds_per_iteration`, plus `run_dir`, `iterations`).

    Raises:
        utils.ConfigError: an unknown ablated parameter or a value the config rejects,
            naming the key, before any variant runs.
    """
    from tqdm import tqdm

    run_dir = Path(run_dir)
    variants = _ablation_variants(cfg)  # all configs first: a bad value fails before any work
    spec = run_dir / "meta_test_episodes.json"
    rows = []
    for param, value, variant in tqdm(variants, desc="ablations", unit="variant", dynamic_ncols=True):
        sub = run_dir / ABLATIONS_DIR / _variant_folder(param, value)
        rows.append(_ablation_row(param, value, variant, sub, spec if spec.is_file() else None))
        if not spec.is_file():
            spec = sub / "meta_test_episodes.json"
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
    import optuna

    search, run_dir = cfg.analysis.hyperparameter_search, Path(run_dir)
    _check_search(cfg)
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
    from trainer import NonFiniteError
    tracker = _TrialTracker(cfg, run_dir)
    study.optimize(lambda trial: _objective(trial, cfg, tracker), n_trials=remaining,
                   catch=(NonFiniteError,), show_progress_bar=remaining > 0)
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
    import torch
    from tqdm import tqdm

    import trainer as T
    from utils import resolve_device

    num_tasks = cfg.analysis.fidelity_tasks if num_tasks is None else num_tasks
    if num_tasks <= 0:
        return []
    device = resolve_device(cfg.training.device)
    model, tokenizer, ckpt_cfg, inner_lr = T.restore_model(checkpoint, device)
    loader = _loader(ckpt_cfg, tokenizer, ("meta_train",))
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
             skip_baselines: bool = False) -> dict:
    """The whole experiment in one folder: (search,) train, evaluate, fidelity, (ablations,)
    statistics, figures and ``report.md``.

    Phases, each writing into `run_dir`:

    0. `--hyperparameter_search`: `run_hyperparameter_search`; the rest uses its best config.
    1. Meta-train (`trainer.run_training`): checkpoints/, metrics.jsonl, config.yml.
    2. Evaluate MELoRA and `evaluation.baselines` on the fixed meta-test episodes
       (`evaluation.run_evaluation`): results.json.
    3. Meta-gradient fidelity at the trained theta (`compute_fidelity`): fidelity.json.
    4. `analysis.run_ablations: true`: `run_ablations`: ablations.json.
    5. Paired comparisons of MELoRA with every baseline (`compare_methods`): comparison.json.
    6. Figures (`visualization.plot_all`): figures/.
    7. ``report.md``: the command, tables and figures.

    Args:
        cfg: the validated config.
        run_dir: the experiment folder (from `utils.prepare_run_dir`).
        hyperparameter_search: search hyperparameters first.
        skip_baselines: evaluate MELoRA only.

    Returns:
        A summary: the run folder, the report, and the file of each phase.
    """
    import trainer
    import evaluation
    import visualization
    from utils import load_config_with_base

    run_dir, files, search = Path(run_dir), {}, None
    if hyperparameter_search:
        logger.info("full mode 0/7: hyperparameter search")
        search = run_hyperparameter_search(cfg, run_dir)
        best = {SEARCH_KEYS[k]: v for k, v in search["best_params"].items()}
        cfg = load_config_with_base(cfg.to_dict(), None, best)
        files["best_config"] = search["best_config"]
    logger.info("full mode 1/7: meta-training")
    training = trainer.run_training(cfg, run_dir)
    logger.info("full mode 2/7: evaluation%s", "" if skip_baselines else " with baselines")
    results = evaluation.run_evaluation(cfg, training["last_checkpoint"], skip_baselines, run_dir)
    files["results"] = str(run_dir / "results.json")
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
    _write_json(run_dir / "full_summary.json", summary)
    print(_full_summary_text(summary, training))
    return summary


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
        training: `trainer.run_training`'s summary, or None.
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
    from utils import atomic_write_text
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


def format_fidelity_table(fidelity: Sequence[Mapping]) -> str:
    """Markdown table of cosine similarities per Hessian method over tasks.

    Cosines near 1 (small inner rates) differ in the far decimals, so the table also
    gives 1 - cosine in scientific notation.

    Args:
        fidelity: ``{method: cosine}`` dicts, one per task.

    Returns:
        The table (mean, 1 - mean, min and max cosine per method); a one-line note when
        there are no values.

    Example:
        >>> print(format_fidelity_table([{"full": 1.0, "none": 0.5}, {"full": 1.0, "none": 0.7}]).splitlines()[-1])
        | none | 0.600000 | 4.00e-01 | 0.500000 | 0.700000 |
    """
    if not fidelity:
        return "_No fidelity results._"
    names = list(dict.fromkeys(m for row in fidelity for m in row))
    body = []
    for name in names:
        values = np.array([row[name] for row in fidelity if name in row], dtype=float)
        mean = values.mean()
        body.append([name, f"{mean:.6f}", f"{1 - mean:.2e}", f"{values.min():.6f}", f"{values.max():.6f}"])
    return _markdown(["Hessian method", f"Cosine to exact (mean of {len(fidelity)} tasks)",
                      "1 − cosine", "Min", "Max"], body)


# --- Driver helpers --------------------------------------------------------------------

import logging  # noqa: E402  (the drivers' logger; the statistics above log nothing)

logger = logging.getLogger("melora")


def _variant_config(cfg, overrides: Mapping[str, Any], experiment_name: str):
    """`cfg` with `overrides` ({"section.key": value}) applied and validated."""
    from utils import load_config_with_base
    return load_config_with_base(cfg.to_dict(), None,
                                 {**overrides, "training.experiment_name": experiment_name})


def _ablation_variants(cfg) -> list[tuple[str, Any, Any]]:
    from utils import ConfigError
    out = []
    for param, values in cfg.analysis.ablations.to_dict().items():
        if param not in ABLATION_KEYS:
            raise ConfigError(f"analysis.ablations.{param} is not an ablation; use "
                              f"{', '.join(ABLATION_KEYS)}")
        if not isinstance(values, list):
            raise ConfigError(f"analysis.ablations.{param} must be a list of values, got {values!r}")
        for value in values:
            name = f"{cfg.training.experiment_name}-{_variant_folder(param, value)}"
            out.append((param, value, _variant_config(cfg, {ABLATION_KEYS[param]: value}, name)))
    return out


def _variant_folder(param: str, value: Any) -> str:
    return f"{param}-{str(value).lower()}"


def _ablation_row(param: str, value: Any, cfg, sub: Path, spec: Path | None) -> dict:
    """Train and evaluate one ablation variant in `sub`; its row of ablations.json."""
    import shutil

    import evaluation
    import trainer
    from utils import prepare_run_dir

    sub = prepare_run_dir(sub.parent, sub.name, overwrite=True, resume=False)
    if spec is not None:  # the same meta-test episodes as the run (or the first variant)
        shutil.copyfile(spec, sub / "meta_test_episodes.json")
    training = trainer.run_training(cfg, sub)
    results = evaluation.run_evaluation(cfg, training["last_checkpoint"], True, sub)
    melora = results["methods"]["melora"]
    seconds = [r["seconds"] for r in load_metrics(sub / "metrics.jsonl") if r.get("seconds") is not None]
    step_mb = melora.get("meta_step_peak_memory_mb")
    return {"parameter": param, "value": value, "accuracy_mean": melora["accuracy_mean"],
            "accuracy_ci95": melora["accuracy_ci95"],
            "peak_memory_mb": step_mb if step_mb is not None else melora["peak_memory_mb"],
            "seconds_per_iteration": float(np.mean(seconds)) if seconds else float("nan"),
            "iterations": training["iterations"], "run_dir": str(sub)}


def _check_search(cfg) -> None:
    """Fail fast on a search setting that cannot work, naming the key."""
    from utils import ConfigError
    s, key = cfg.analysis.hyperparameter_search, "analysis.hyperparameter_search"
    for name in ("inner_lr", "outer_lr"):
        r = s[name]
        if not (isinstance(r, list) and len(r) == 2 and 0 < r[0] <= r[1]):
            raise ConfigError(f"{key}.{name} must be [low, high] with 0 < low <= high "
                              f"(a log-uniform range), got {r!r}")
    r = s.inner_steps
    if not (isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r) and 1 <= r[0] <= r[1]):
        raise ConfigError(f"{key}.inner_steps must be [low, high] integers with 1 <= low <= high, got {r!r}")
    if not (isinstance(s.lora_rank, list) and s.lora_rank
            and all(isinstance(v, int) and v > 0 for v in s.lora_rank)):
        raise ConfigError(f"{key}.lora_rank must be a non-empty list of positive integers, got {s.lora_rank!r}")
    for name in ("report_every", "val_episodes"):
        if s[name] < 1:
            raise ConfigError(f"{key}.{name} must be a positive integer, got {s[name]!r}")
    if s.num_iterations < 0 or s.pruner_startup_trials < 0:
        raise ConfigError(f"{key}.num_iterations and {key}.pruner_startup_trials must be >= 0")
    if not cfg.datasets.synthetic_only and not cfg.datasets.meta_val:
        raise ConfigError("the hyperparameter search scores trials on meta-validation tasks, "
                          "but datasets.meta_val lists no source; add one, or use --synthetic_only")


def _suggest(trial, search) -> dict[str, Any]:
    """One trial's hyperparameters, keyed as in `SEARCH_KEYS`."""
    return {"inner_lr": trial.suggest_float("inner_lr", *search.inner_lr, log=True),
            "outer_lr": trial.suggest_float("outer_lr", *search.outer_lr, log=True),
            "inner_steps": trial.suggest_int("inner_steps", *search.inner_steps),
            "lora_rank": trial.suggest_categorical("lora_rank", list(search.lora_rank))}


def _objective(trial, cfg, tracker: "_TrialTracker") -> float:
    """Meta-train one trial's config; report meta-val accuracy every `report_every` iterations."""
    import optuna

    import baseline as B
    import trainer as T

    search = cfg.analysis.hyperparameter_search
    params = _suggest(trial, search)
    trial_cfg = _variant_config(cfg, {SEARCH_KEYS[k]: v for k, v in params.items()},
                                f"{cfg.training.experiment_name}-trial-{trial.number}")
    # 1. A fresh model and its meta-val episodes (the same fixed list for every trial).
    meta = T.MetaTrainer.from_config(trial_cfg)
    val_loader = _loader(trial_cfg, meta.loader.tokenizer, ("meta_val",))
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
            accuracy = _val_accuracy(method, val, K, trial_cfg.training.seed)
            trial.report(accuracy, it + 1)
            tracker.log(run, it + 1, {"val_accuracy": accuracy})
            if trial.should_prune():
                state = "KILLED"
                raise optuna.TrialPruned(f"meta-val accuracy {accuracy:.3f} at iteration {it + 1}")
        state = "FINISHED"
        return accuracy
    finally:
        tracker.end(run, state, accuracy)


def _val_accuracy(method, episodes: list, steps: int, seed: int) -> float:
    """Mean query accuracy after `steps` adaptation steps (dropout seeded per episode)."""
    from utils import set_seed
    accuracies = []
    for i, episode in enumerate(episodes):
        set_seed(seed + 7919 * (i + 1))  # as evaluation.py: paired across trials
        accuracies.append(method.adapt(episode, steps)[-1])
    return float(np.mean(accuracies))


class _TrialTracker:
    """One MLflow run per trial, in the run folder's store (experiment <name>-hpo)."""

    def __init__(self, cfg, run_dir: Path):
        self.client = None
        if not cfg.tracking.mlflow:
            return
        import warnings
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.client = MlflowClient(tracking_uri=self.uri)
            self.client.search_experiments(max_results=1)
        name = f"{cfg.training.experiment_name}-hpo"
        found = self.client.get_experiment_by_name(name)
        self.experiment = found.experiment_id if found else self.client.create_experiment(
            name, artifact_location=(run_dir / "mlflow-artifacts").resolve().as_uri())

    def start(self, number: int, params: Mapping[str, Any]):
        if self.client is None:
            return None
        run = self.client.create_run(self.experiment, run_name=f"trial-{number}")
        for key, value in params.items():
            self.client.log_param(run.info.run_id, key, value)
        return run.info.run_id

    def log(self, run, step: int, metrics: Mapping[str, float]) -> None:
        if run is None:
            return
        for key, value in metrics.items():
            if value is not None and math.isfinite(value):
                self.client.log_metric(run, key, float(value), step=step)

    def end(self, run, state: str, accuracy: float) -> None:
        if run is None:
            return
        self.client.set_tag(run, "optuna_state", {"FINISHED": "complete", "KILLED": "pruned"}.get(state, "failed"))
        if math.isfinite(accuracy):
            self.client.log_metric(run, "final_val_accuracy", accuracy)
        self.client.set_terminated(run, status=state)


def _search_summary(study, cfg, run_dir: Path, storage: str) -> dict:
    """Write best_config.yml and hpo_trials.json; the search's summary."""
    import yaml

    from utils import UserError, atomic_write_text
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


def _loader(cfg, tokenizer, splits: tuple[str, ...]):
    from dataset_loader import DatasetLoader
    cache = cfg.datasets.cache_dir or Path(cfg.training.output_dir) / "cache"
    return DatasetLoader(cfg.datasets, cfg.tasks, cfg.synthetic, tokenizer, cfg.models.max_length,
                         cache, cfg.training.seed, splits=splits)


def _model_theta(model) -> dict:
    import model as M
    return M.lora_parameters(model)


def _cosine(a, b) -> float:
    """Cosine similarity of two flat tensors (0 when either is zero)."""
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


def _write_json(path: Path, obj: Any) -> str:
    from utils import atomic_write_json
    atomic_write_json(path, obj)
    return str(path)


def _command_line(argv: Sequence[str] | None) -> str:
    """The command that produced the run, shell-quoted (`python main.py ...`)."""
    import shlex
    import sys
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
