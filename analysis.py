"""Statistics over recorded MELoRA results: paired tests, CIs, effect sizes, tables.

The statistics and tables work on plain JSON-like data written by `evaluation.py` and
`trainer.py`; they import no torch, touch no model and import no other module of the
project, so they run anywhere (`python -c "import analysis; ..."`) on the files of a
finished run. The drivers that produce those files (ablations, Optuna search,
meta-gradient fidelity, `run_full`) live in `experiment.py`.

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


def mean_ci(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE,
            bounds: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval of the mean.

    Args:
        values: At least one finite value.
        confidence: Confidence level in (0, 1).
        bounds: The range the quantity cannot leave (accuracies: ``(0, 1)``); the
            interval is clipped to it (a t-interval of few, spread-out values overshoots).

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
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return mean, lo, hi


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


def wilcoxon_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """`wilcoxon_test`'s p-value, or None with fewer than two pairs (no test): the one paired
    test of every benchmark table.

    Example:
        >>> wilcoxon_p([0.9], [0.5]) is None
        True
    """
    return wilcoxon_test(a, b)["p_value"] if len(a) >= 2 else None


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


def bootstrap_ci_seeds(matrix: Sequence[Sequence[float]], n_resamples: int = DEFAULT_N_RESAMPLES,
                       confidence: float = DEFAULT_CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the grand mean of a (seeds, episodes) matrix, resampling
    seeds and episodes (a two-level, crossed bootstrap).

    Every seed is evaluated on the same episodes, so a resample draws S seed rows and E
    episode columns with replacement (the same columns for every row) and takes the mean
    of the resampled matrix: the interval includes the variance between training seeds,
    which an interval over episodes of the seed-averaged accuracy leaves out (Field &
    Welsh 2007, "Bootstrapping clustered data"). With one seed it is the percentile
    bootstrap over episodes; with one episode, over seeds.

    Args:
        matrix: (seeds, episodes) scores (e.g. accuracies, or paired differences).
        n_resamples: Number of bootstrap resamples (positive).
        confidence: Confidence level in (0, 1).
        seed: Seed of the resampling.

    Returns:
        ``(lo, hi)``; ``(m, m)`` when every entry is the same m.

    Raises:
        ValueError: An empty, ragged or non-finite matrix, or out-of-range arguments.

    Example:
        >>> lo, hi = bootstrap_ci_seeds([[0.8, 0.9, 0.7], [0.6, 0.7, 0.5]], n_resamples=2000)
        >>> lo < 0.7 < hi
        True
    """
    _check_confidence(confidence)
    if not isinstance(n_resamples, int | np.integer) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    try:
        m = np.asarray(matrix, dtype=float)
    except ValueError as e:
        raise ValueError(f"matrix must be a (seeds, episodes) table of numbers ({e})") from e
    if m.ndim != 2 or m.size == 0 or not np.all(np.isfinite(m)):
        raise ValueError(f"matrix must be a non-empty, finite (seeds, episodes) table, got shape {m.shape}")
    if np.all(m == m.flat[0]):
        return float(m.flat[0]), float(m.flat[0])
    rng = np.random.default_rng(seed)
    s, e = m.shape
    means = np.empty(int(n_resamples))
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // m.size)
    for start in range(0, int(n_resamples), chunk):
        b = min(chunk, int(n_resamples) - start)
        rows = rng.integers(0, s, size=(b, s))                      # (b, S) seeds drawn
        counts = rng.multinomial(e, np.full(e, 1.0 / e), size=b)    # (b, E) times each episode is drawn
        per_episode = m[rows].mean(1)                               # (b, E) mean over drawn seeds
        means[start:start + b] = (per_episode * counts).sum(1) / e
    alpha = 1.0 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


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


# --- Run-folder file names (read by the loaders' callers, visualization and experiment) ---
RESULTS_FILE, METRICS_FILE = "results.json", "metrics.jsonl"  # evaluation.py; metrics.MetricsSink
EPISODE_SPEC = "meta_test_episodes.json"                       # evaluation.py's fixed episodes
FULL_SUMMARY_FILE, FIGURES_DIR = "full_summary.json", "figures"
ABLATIONS_FILE, FIDELITY_FILE, COMPARISON_FILE = "ablations.json", "fidelity.json", "comparison.json"
BEST_CONFIG_FILE, TRIALS_FILE, OPTUNA_DB, REPORT_FILE = ("best_config.yml", "hpo_trials.json",
                                                        "optuna.db", "report.md")
ABLATIONS_DIR = "ablations"


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
