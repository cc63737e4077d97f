"""Every figure is written as a non-blank PNG and a PDF from small recorded results."""

import json

import numpy as np
import pytest

import analysis
import visualization

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_BYTES = 5_000  # a rendered figure with axes and text is well above this
STEPS = list(range(6))


def _method(rng, acc, memory, breakdown=True):
    per_episode = np.clip(rng.normal(acc, 0.08, size=30), 0, 1)
    mean, lo, hi = analysis.mean_ci(per_episode)
    curve = acc - 0.3 * np.exp(-np.array(STEPS))
    m = {"accuracy_mean": mean, "accuracy_ci95": [lo, hi], "per_episode_accuracy": per_episode.tolist(),
         "accuracy_per_step": {"steps": STEPS, "mean": curve.tolist(), "ci95_low": (curve - 0.03).tolist(),
                               "ci95_high": (curve + 0.03).tolist()},
         "peak_memory_mb": memory, "seconds_per_episode": 0.4}
    if breakdown:
        m["memory_breakdown_mb"] = {"weights": 0.4 * memory, "adapter_and_optimizer": 0.1 * memory,
                                    "activations": 0.3 * memory, "second_order": 0.1 * memory}
    return m


@pytest.fixture(scope="module")
def results():
    rng = np.random.default_rng(0)
    methods = {"melora": _method(rng, 0.78, 1200.0), "maml": _method(rng, 0.80, 9000.0),
               "fomaml": _method(rng, 0.74, 1100.0), "finetune": _method(rng, 0.55, 1500.0, breakdown=False),
               "protonet": _method(rng, 0.70, 800.0)}
    del methods["protonet"]["accuracy_per_step"]  # a method without adaptation steps
    return {"model": "tiny-gpt2", "n_way": 5, "k_shot": 5, "q_query": 10, "num_episodes": 30,
            "methods": methods}


@pytest.fixture(scope="module")
def metrics():
    rng = np.random.default_rng(1)
    it = np.arange(1, 81)
    return [{"iteration": int(i), "meta_loss": float(1.6 * np.exp(-i / 30) + 0.3 + rng.normal(0, 0.05)),
             "query_acc_before": float(0.2 + rng.normal(0, 0.02)),
             "query_acc_after": float(0.8 - 0.6 * np.exp(-i / 25) + rng.normal(0, 0.03)),
             "grad_norm": float(abs(rng.normal(1, 0.3))), "outer_lr": 5e-4, "peak_memory_mb": 900.0,
             "seconds": 0.2} for i in it]


@pytest.fixture(scope="module")
def ablations():
    grid = {"lora_rank": [4, 8, 16, 32], "inner_steps": [1, 3, 5],
            "hessian_method": ["full", "gauss_newton", "diagonal", "none"], "micro_batch": [1, 4, 0]}
    return [{"parameter": p, "value": v, "accuracy_mean": 0.7 + 0.01 * i,
             "accuracy_ci95": [0.68 + 0.01 * i, 0.72 + 0.01 * i],
             "peak_memory_mb": 1000.0 + 150 * i, "seconds_per_iteration": 0.3}
            for p, values in grid.items() for i, v in enumerate(values)]


FIDELITY = {"full": 1.0, "gauss_newton": 0.93, "block_diagonal": 0.81, "diagonal": 0.62, "none": 0.47}


def _assert_figure_files(paths, stem):
    assert [p.name for p in paths] == [f"{stem.name}.png", f"{stem.name}.pdf"]
    png, pdf = paths
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > MIN_BYTES
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > MIN_BYTES
    from matplotlib.image import imread

    assert imread(png).var() > 0  # not a blank canvas


def test_training_curves_from_records_and_from_file(tmp_path, metrics):
    _assert_figure_files(visualization.plot_training_curves(metrics, tmp_path / "a"), tmp_path / "a")
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in metrics) + "\n")
    stem = tmp_path / "sub" / "b"  # parents are created
    _assert_figure_files(visualization.plot_training_curves(path, stem), stem)


def test_training_curves_reject_bad_records(tmp_path):
    with pytest.raises(ValueError, match="no records"):
        visualization.plot_training_curves([], tmp_path / "x")
    with pytest.raises(ValueError, match=r"metrics record 0 is missing \['meta_loss'"):
        visualization.plot_training_curves([{"iteration": 1}], tmp_path / "x")


@pytest.mark.parametrize("plot", [visualization.plot_accuracy_per_step, visualization.plot_memory,
                                  visualization.plot_accuracy_vs_memory])
def test_results_figures(tmp_path, results, plot):
    stem = tmp_path / plot.__name__
    _assert_figure_files(plot(results, stem), stem)


def test_memory_without_breakdown(tmp_path, results):
    plain = {**results, "methods": {n: {k: v for k, v in m.items() if k != "memory_breakdown_mb"}
                                    for n, m in results["methods"].items()}}
    _assert_figure_files(visualization.plot_memory(plain, tmp_path / "m"), tmp_path / "m")


def test_accuracy_per_step_needs_a_curve(tmp_path, results):
    flat = {"methods": {"protonet": results["methods"]["protonet"]}}
    with pytest.raises(ValueError, match="accuracy_per_step"):
        visualization.plot_accuracy_per_step(flat, tmp_path / "x")


def test_ablations(tmp_path, ablations):
    _assert_figure_files(visualization.plot_ablations(ablations, tmp_path / "abl"), tmp_path / "abl")


@pytest.mark.parametrize("fidelity", [FIDELITY, [FIDELITY, {**FIDELITY, "diagonal": 0.5, "none": 0.3},
                                                  {**FIDELITY, "gauss_newton": 0.97, "none": 0.52}]])
def test_gradient_fidelity_single_and_over_tasks(tmp_path, fidelity):
    _assert_figure_files(visualization.plot_gradient_fidelity(fidelity, tmp_path / "fid"), tmp_path / "fid")


def test_gradient_fidelity_rejects_non_cosines(tmp_path):
    with pytest.raises(ValueError, match="'diagonal'"):
        visualization.plot_gradient_fidelity({"full": 1.0, "diagonal": 3.0}, tmp_path / "x")


def test_plot_all_draws_what_the_run_holds(tmp_path, results, metrics, ablations):
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in metrics))
    (tmp_path / "ablations.json").write_text(json.dumps(ablations))
    (tmp_path / "fidelity.json").write_text(json.dumps([FIDELITY, FIDELITY]))
    paths = visualization.plot_all(tmp_path)
    stems = {p.stem for p in paths}
    assert stems == {"memory", "accuracy_vs_memory", "accuracy_per_step", "training_curves", "ablations",
                     "gradient_fidelity"}
    assert all(p.parent == tmp_path / "figures" and p.stat().st_size > MIN_BYTES for p in paths)


def test_plot_all_partial_and_empty(tmp_path):
    (tmp_path / "fidelity.json").write_text(json.dumps(FIDELITY))
    names = {p.name for p in visualization.plot_all(tmp_path)}
    assert names == {"gradient_fidelity.png", "gradient_fidelity.pdf"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert visualization.plot_all(empty) == []
    with pytest.raises(ValueError, match="not a directory"):
        visualization.plot_all(tmp_path / "missing")


def test_no_global_pyplot_state(tmp_path, results):
    import matplotlib

    backend = matplotlib.get_backend()
    visualization.plot_memory(results, tmp_path / "m")
    assert matplotlib.get_backend() == backend
