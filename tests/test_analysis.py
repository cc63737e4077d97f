"""Tests of analysis.py against scipy, numpy and hand-computed references."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import analysis

N_QUERY = 25  # accuracies in these tests are k / N_QUERY fractions, as in a real episode


def _accuracies(seed, n, p):
    """Per-episode accuracies of n episodes with success probability p."""
    rng = np.random.default_rng(seed)
    return rng.binomial(N_QUERY, p, size=n) / N_QUERY


def _results(n=40, **per_method):
    """A results.json dict with the given methods' per-episode accuracies."""
    methods = {}
    for name, acc in per_method.items():
        mean, lo, hi = analysis.mean_ci(acc)
        methods[name] = {"accuracy_mean": mean, "accuracy_ci95": [lo, hi],
                         "per_episode_accuracy": list(acc), "peak_memory_mb": 1000.0,
                         "seconds_per_episode": 0.5}
    return {"model": "tiny", "n_way": 5, "k_shot": 5, "q_query": 5, "num_episodes": n, "methods": methods}


# --- mean_ci -----------------------------------------------------------------------------


def test_mean_ci_matches_scipy_t_interval():
    x = _accuracies(0, 30, 0.6)
    mean, lo, hi = analysis.mean_ci(x, confidence=0.9)
    ref_lo, ref_hi = stats.t.interval(0.9, df=x.size - 1, loc=x.mean(), scale=stats.sem(x))
    assert mean == pytest.approx(x.mean())
    assert (lo, hi) == pytest.approx((ref_lo, ref_hi))


def test_mean_ci_clips_to_bounds_and_is_scipy_inside_them():
    """Three spread-out accuracies: scipy's t-interval leaves [0, 1]; with bounds the
    interval is scipy's clipped to them (the mean unchanged)."""
    x = np.array([0.0, 0.1, 1.0])
    ref_lo, ref_hi = stats.t.interval(0.95, df=2, loc=x.mean(), scale=stats.sem(x))
    assert ref_lo < 0 and ref_hi > 1
    assert analysis.mean_ci(x, 0.95, (0.0, 1.0)) == pytest.approx((x.mean(), 0.0, 1.0))
    assert analysis.mean_ci(x, 0.95) == pytest.approx((x.mean(), ref_lo, ref_hi))
    y = _accuracies(0, 30, 0.6)  # well inside: bounds change nothing
    assert analysis.mean_ci(y, 0.95, (0.0, 1.0)) == pytest.approx(analysis.mean_ci(y, 0.95))


def test_mean_ci_degenerate_and_invalid():
    assert analysis.mean_ci([0.4, 0.4, 0.4]) == pytest.approx((0.4, 0.4, 0.4))
    assert analysis.mean_ci([0.7]) == (0.7, 0.7, 0.7)
    with pytest.raises(ValueError, match="at least 1"):
        analysis.mean_ci([])
    with pytest.raises(ValueError, match="confidence"):
        analysis.mean_ci([0.1, 0.2], confidence=95)
    with pytest.raises(ValueError, match="finite"):
        analysis.mean_ci([0.1, float("nan")])


# --- paired tests ------------------------------------------------------------------------


def test_paired_ttest_matches_scipy_ttest_rel():
    a, b = _accuracies(1, 50, 0.7), _accuracies(2, 50, 0.6)
    res, ref = analysis.paired_ttest(a, b), stats.ttest_rel(a, b)
    assert res["statistic"] == pytest.approx(ref.statistic)
    assert res["p_value"] == pytest.approx(ref.pvalue)


def test_wilcoxon_matches_scipy_with_ties_and_zeros():
    a, b = _accuracies(3, 60, 0.7), _accuracies(4, 60, 0.65)
    d = a - b
    assert np.any(d == 0) and len(np.unique(np.abs(d))) < len(d)  # zeros and ties exercised
    res = analysis.wilcoxon_test(a, b)
    ref = stats.wilcoxon(np.round(d, analysis.DIFF_DECIMALS), zero_method="pratt")
    assert res["statistic"] == pytest.approx(ref.statistic)
    assert res["p_value"] == pytest.approx(ref.pvalue)


def test_wilcoxon_small_sample_exact_matches_scipy():
    a = np.array([0.5, 0.75, 0.25, 1.0, 0.625, 0.875])  # binary fractions: no round-off
    b = np.array([0.375, 0.25, 0.5, 0.0, 0.5, 0.0])
    res, ref = analysis.wilcoxon_test(a, b), stats.wilcoxon(a, b, zero_method="pratt")
    assert (res["statistic"], res["p_value"]) == pytest.approx((ref.statistic, ref.pvalue))


def test_wilcoxon_pratt_keeps_ties_in_the_sample():
    """Many tied episodes: Pratt ranks the zeros (less evidence than dropping them)."""
    a = np.array([0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.8, 0.7, 0.9, 0.7, 0.8, 0.4])
    b = np.array([0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6])
    d = np.round(a - b, analysis.DIFF_DECIMALS)
    pratt, wilcox = stats.wilcoxon(d, zero_method="pratt"), stats.wilcoxon(d, zero_method="wilcox")
    assert analysis.wilcoxon_test(a, b)["p_value"] == pytest.approx(pratt.pvalue)
    assert pratt.pvalue != pytest.approx(wilcox.pvalue)


def test_identical_samples_give_no_evidence():
    a = _accuracies(5, 20, 0.5)
    assert analysis.paired_ttest(a, a) == {"statistic": 0.0, "p_value": 1.0}
    assert analysis.wilcoxon_test(a, a) == {"statistic": 0.0, "p_value": 1.0}
    assert analysis.cohens_d_paired(a, a) == 0.0


def test_constant_nonzero_difference_is_infinitely_significant():
    a = np.array([0.5, 0.6, 0.7, 0.8])
    b = a - 0.1  # round-off makes the raw differences unequal; rounding restores them
    assert analysis.paired_ttest(a, b) == {"statistic": math.inf, "p_value": 0.0}
    assert analysis.cohens_d_paired(b, a) == -math.inf


@pytest.mark.parametrize("fn", [analysis.paired_ttest, analysis.wilcoxon_test,
                                analysis.cohens_d_paired, analysis.bootstrap_ci_diff])
def test_unpaired_samples_are_rejected(fn):
    with pytest.raises(ValueError, match="same length, got 3 and 2"):
        fn([0.1, 0.2, 0.3], [0.1, 0.2])


# --- bootstrap and effect size -------------------------------------------------------------


def test_bootstrap_ci_equals_scipy_bca():
    a, b = _accuracies(6, 35, 0.7), _accuracies(7, 35, 0.6)
    lo, hi = analysis.bootstrap_ci_diff(a, b, n_resamples=2000, confidence=0.9, seed=3)
    d = np.round(a - b, analysis.DIFF_DECIMALS)
    ref = stats.bootstrap((d,), np.mean, n_resamples=2000, confidence_level=0.9, method="BCa",
                          rng=np.random.default_rng(3))
    assert (lo, hi) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    percentile = stats.bootstrap((d,), np.mean, n_resamples=2000, confidence_level=0.9,
                                 method="percentile", rng=np.random.default_rng(3))
    assert (lo, hi) != pytest.approx((percentile.confidence_interval.low,
                                      percentile.confidence_interval.high))  # BCa, not percentile


def test_bootstrap_ci_is_deterministic_and_batched_draws_agree(monkeypatch):
    a, b = _accuracies(8, 30, 0.7), _accuracies(9, 30, 0.6)
    first = analysis.bootstrap_ci_diff(a, b, n_resamples=500, seed=11)
    assert analysis.bootstrap_ci_diff(a, b, n_resamples=500, seed=11) == first
    monkeypatch.setattr(analysis, "_BOOTSTRAP_CHUNK_ELEMENTS", 64)  # many small batches
    assert analysis.bootstrap_ci_diff(a, b, n_resamples=500, seed=11) == pytest.approx(first)
    lo, hi = first
    assert lo <= np.mean(a - b) <= hi
    assert analysis.bootstrap_ci_diff(a, a - 0.1, n_resamples=50) == pytest.approx((0.1, 0.1))


def test_bootstrap_rejects_bad_resamples():
    with pytest.raises(ValueError, match="n_resamples"):
        analysis.bootstrap_ci_diff([0.1, 0.2], [0.2, 0.1], n_resamples=0)


def test_cohens_d_matches_numpy():
    a, b = _accuracies(10, 40, 0.7), _accuracies(11, 40, 0.6)
    d = a - b
    assert analysis.cohens_d_paired(a, b) == pytest.approx(d.mean() / d.std(ddof=1))


# --- Holm ----------------------------------------------------------------------------------


def test_holm_hand_computed_example():
    # sorted: b 0.005*4=0.02, d 0.01*3=0.03, a 0.03*2=0.06, c 0.04*1=0.04 -> max(0.06, 0.04)=0.06
    raw = {"a": 0.03, "b": 0.005, "c": 0.04, "d": 0.01}
    assert analysis.holm_bonferroni(raw) == pytest.approx({"a": 0.06, "b": 0.02, "c": 0.06, "d": 0.03})


def test_holm_caps_at_one_and_handles_empty():
    adjusted = analysis.holm_bonferroni({"a": 0.6, "b": 0.7, "c": 0.2})
    assert adjusted == pytest.approx({"a": 1.0, "b": 1.0, "c": 0.6})
    assert analysis.holm_bonferroni({}) == {}
    with pytest.raises(ValueError, match="'x'"):
        analysis.holm_bonferroni({"x": float("nan")})


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=4), st.floats(0.0, 1.0), min_size=1, max_size=8))
def test_holm_properties(raw):
    adjusted = analysis.holm_bonferroni(raw)
    assert adjusted.keys() == raw.keys()
    for name in raw:
        assert raw[name] <= adjusted[name] <= 1.0
    by_raw = sorted(raw, key=raw.get)
    assert all(adjusted[x] <= adjusted[y] for x, y in zip(by_raw, by_raw[1:]))


# --- compare_methods and tables --------------------------------------------------------------


def test_compare_methods_rows_match_the_single_tests():
    mel, maml, ft = _accuracies(12, 40, 0.75), _accuracies(13, 40, 0.72), _accuracies(14, 40, 0.45)
    rows = analysis.compare_methods(_results(melora=mel, maml=maml, finetune=ft), n_resamples=500)
    assert [r["method"] for r in rows] == ["maml", "finetune"]
    ft_row = rows[1]
    assert ft_row["mean_diff"] == pytest.approx(np.mean(mel - ft))
    assert ft_row["t_p_value"] == pytest.approx(stats.ttest_rel(mel, ft).pvalue)
    assert ft_row["cohens_d"] == pytest.approx(analysis.cohens_d_paired(mel, ft))
    assert (ft_row["ci_low"], ft_row["ci_high"]) == analysis.bootstrap_ci_diff(mel, ft, n_resamples=500)
    holm = analysis.holm_bonferroni({r["method"]: r["wilcoxon_p_value"] for r in rows})
    assert [r["wilcoxon_p_holm"] for r in rows] == [holm["maml"], holm["finetune"]]
    assert ft_row["significant"] and ft_row["mean_diff"] > 0


def test_compare_methods_errors_name_the_problem():
    a = _accuracies(15, 10, 0.5)
    with pytest.raises(ValueError, match="'melora' is not in the results"):
        analysis.compare_methods(_results(maml=a))
    bad = _results(melora=a, maml=a)
    bad["methods"]["maml"]["per_episode_accuracy"] = list(a[:7])
    with pytest.raises(ValueError, match="'maml' has 7 .* 'melora' has 10"):
        analysis.compare_methods(bad)
    assert analysis.compare_methods(_results(melora=a)) == []


def test_tables_are_markdown_with_one_row_per_item():
    mel, maml = _accuracies(16, 20, 0.75), _accuracies(17, 20, 0.6)
    results = _results(melora=mel, maml=maml)
    comparison = analysis.format_comparison_table(analysis.compare_methods(results, n_resamples=200))
    assert comparison.splitlines()[0].startswith("| Method |") and "95% bootstrap CI" in comparison
    assert len(comparison.splitlines()) == 3 and "| maml |" in comparison
    table = analysis.format_results_table(results)
    assert len(table.splitlines()) == 4 and f"{100 * mel.mean():.2f} ±" in table
    rows = [{"parameter": "lora_rank", "value": r, "accuracy_mean": 0.7, "accuracy_ci95": [0.68, 0.72],
             "peak_memory_mb": 100.0 * r, "seconds_per_iteration": 0.1} for r in (4, 8)]
    ablation = analysis.format_ablation_table(rows)
    assert "| lora_rank | 8 | 70.00 ± 2.00 | 800.0 | 0.100 |" in ablation
    with pytest.raises(ValueError, match="ablation row 0 is missing"):
        analysis.format_ablation_table([{"parameter": "lora_rank"}])


def test_pareto_front():
    memory, accuracy = [100, 200, 150, 300, 100], [0.6, 0.8, 0.55, 0.8, 0.5]
    assert analysis.pareto_front(memory, accuracy) == [0, 1]


def test_loaders_roundtrip(tmp_path):
    results = _results(melora=_accuracies(18, 5, 0.5))
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert analysis.load_results(tmp_path / "results.json") == results
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1}\n\n{"iteration": 2}\n')
    assert analysis.load_metrics(tmp_path / "metrics.jsonl") == [{"iteration": 1}, {"iteration": 2}]
    (tmp_path / "bad.jsonl").write_text('{"iteration": 1}\n[1]\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        analysis.load_metrics(tmp_path / "bad.jsonl")
    (tmp_path / "empty.json").write_text('{"methods": {}}')
    with pytest.raises(ValueError, match="non-empty 'methods'"):
        analysis.load_results(tmp_path / "empty.json")


def test_percent_accuracies_are_rejected():
    results = _results(melora=_accuracies(19, 5, 0.5))
    results["methods"]["melora"]["accuracy_mean"] = 72.5
    with pytest.raises(ValueError, match="'melora' must be a fraction"):
        analysis.format_results_table(results)


def test_docstring_examples_run():
    import doctest

    failures, _ = doctest.testmod(analysis)
    assert failures == 0


def test_protocol_table_names_rates_seeds_and_the_hessian_of_each_memory_figure():
    results = _results(melora=_accuracies(20, 10, 0.7), protonet=_accuracies(21, 10, 0.6))
    results["methods"]["melora"].update(
        head_init="proto", inner_lr=0.01, outer_lr=5e-4, tuning_trials=0, meta_train_iterations=30,
        seed_accuracies=[0.7, 0.72], accuracy_sd=0.0141, meta_step_hessian="diagonal",
        meta_step_peak_memory_mb_by_hessian={"diagonal": 57.2, "full": 143.2})
    table = analysis.format_protocol_table(results)
    assert "| melora | proto | 0.01 | 0.0005 | 0 | 30 | 70.00, 72.00 | 1.41 | 57.2 (diagonal); 143.2 (full) |" in table
    assert "| protonet | - | - | - | - | - | - | - | - |" in table  # older files: dashes
    assert "| melora | " in analysis.format_results_table(results) and "| diagonal |" in \
        analysis.format_results_table(results)
