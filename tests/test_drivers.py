"""Drivers of experiment.py: ablations, Optuna search (resumable), meta-gradient fidelity."""

import math

import pytest

import analysis
import config
import experiment
import runs
import trainer
import utils

TINY = {"models.selected_model": "tiny-bert", "datasets.synthetic_only": True,
        "tasks.n_way": 3, "tasks.k_shot": 2, "tasks.q_query": 2, "models.max_length": 16,
        "meta_learning.default_meta_batch_size": 1, "meta_learning.inner.default_num_steps": 1,
        "meta_learning.num_iterations": 2, "tracking.mlflow": False, "tracking.tensorboard": False,
        "evaluation.num_episodes": 3, "evaluation.adaptation_steps": 1,
        "evaluation.child_process": False, "evaluation.baselines": [], "evaluation.seeds": 1,
        "memory_optimization.hessian_approximation.method": "none",
        # the plumbing under test at the pre-study defaults (config.yml now: cosine, 0.5)
        "meta_learning.head": "euclidean", "meta_learning.inner.default_lr": 0.01}
NO_ABLATIONS = {f"analysis.ablations.{p}": [] for p in experiment.ABLATION_KEYS}


def tiny_config(tmp_path, **overrides):
    return config.load_config(overrides={**TINY, "training.output_dir": str(tmp_path),
                                        "datasets.cache_dir": str(tmp_path / "cache"), **overrides})



def test_ablation_rows_for_two_ranks(tmp_path):
    cfg = tiny_config(tmp_path, **{**NO_ABLATIONS, "analysis.ablations.lora_rank": [2, 4]})
    rows = experiment.run_ablations(cfg, tmp_path / "run")
    assert [(r["parameter"], r["value"]) for r in rows] == [("lora_rank", 2), ("lora_rank", 4)]
    for r in rows:
        lo, hi = r["accuracy_ci95"]
        assert 0 <= lo <= r["accuracy_mean"] <= hi <= 1
        assert r["peak_memory_mb"] >= 0 and r["seconds_per_iteration"] > 0 and r["iterations"] == 2
    assert analysis.load_json(tmp_path / "run" / "ablations.json") == rows
    assert "| lora_rank | 2 |" in analysis.format_ablation_table(rows)  # the table reads the rows
    # Each variant in its own folder, with its own rank, on the same meta-test episodes.
    folders = [tmp_path / "run" / "ablations" / name for name in ("lora_rank-2", "lora_rank-4")]
    assert [config.load_config(r / "config.yml").lora.default_rank for r in folders] == [2, 4]
    specs = [(r / "meta_test_episodes.json").read_text() for r in folders]
    assert specs[0] == specs[1]
    a, b = (runs.load_checkpoint(r / "checkpoints" / "checkpoint_iter_2.pt") for r in folders)
    assert next(iter(a["theta"].values())).shape != next(iter(b["theta"].values())).shape


def test_ablation_value_the_config_rejects_fails_before_any_run(tmp_path):
    with pytest.raises(utils.ConfigError, match="hessian_approximation.method"):
        cfg = tiny_config(tmp_path, **{**NO_ABLATIONS, "analysis.ablations.lora_rank": [2],
                                  "analysis.ablations.hessian_method": ["exact"]})  # fails at load time
        experiment.run_ablations(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


SEARCH = {"analysis.hyperparameter_search.num_iterations": 2,
          "analysis.hyperparameter_search.report_every": 1,
          "analysis.hyperparameter_search.val_episodes": 2,
          "analysis.hyperparameter_search.inner_steps": [1, 2],
          "analysis.hyperparameter_search.lora_rank": [2, 4]}


def test_search_writes_a_loadable_best_config_and_resumes_the_study(tmp_path):
    import optuna
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config(tmp_path, **SEARCH, **{"analysis.hyperparameter_search.n_trials": 2,
                                        "tracking.mlflow": True})
    first = experiment.run_hyperparameter_search(cfg, run)
    assert first["n_trials"] == 2 and 0 <= first["best_value"] <= 1
    best = config.load_config(first["best_config"])  # what --config accepts
    for name, key in experiment.SEARCH_KEYS.items():
        assert best.flat()[key] == first["best_params"][name]
    assert best.models.selected_model == "tiny-bert"
    storage = f"sqlite:///{run / 'optuna.db'}"
    trial = optuna.load_study(study_name="melora", storage=storage).trials[0]
    assert set(trial.params) == set(experiment.SEARCH_KEYS)
    assert sorted(trial.intermediate_values) == [1, 2]  # meta-val accuracy per report, for the pruner
    # A second call with more trials continues the same study.
    more = config.load_config(overrides={**cfg.flat(), "analysis.hyperparameter_search.n_trials": 3})
    second = experiment.run_hyperparameter_search(more, run)
    assert second["n_trials"] == 3
    assert [t["params"] for t in second["trials"][:2]] == [t["params"] for t in first["trials"]]
    # Each trial is an MLflow run.
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    hpo_experiment = client.get_experiment_by_name(f"{cfg.training.experiment_name}-hpo")
    runs = client.search_runs([hpo_experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["trial-0", "trial-1", "trial-2"]
    assert all("val_accuracy" in r.data.metrics for r in runs)


def test_search_refuses_a_bad_range_naming_the_key(tmp_path):
    with pytest.raises(utils.ConfigError, match="hyperparameter_search.inner_lr"):
        cfg = tiny_config(tmp_path, **{"analysis.hyperparameter_search.inner_lr": [0.1, 0.0]})  # at load time
        experiment.run_hyperparameter_search(cfg, tmp_path)


def test_fidelity_of_each_hessian_method(tmp_path):
    cfg = tiny_config(tmp_path, **{"meta_learning.inner.default_num_steps": 2,
                              "meta_learning.inner.default_lr": 0.5})
    summary = trainer.run_training(cfg, runs.prepare_run_dir(tmp_path, "train", False, False))
    rows = experiment.compute_fidelity(cfg, summary["last_checkpoint"], num_tasks=2)
    assert len(rows) == 2
    for row in rows:
        assert list(row) == list(trainer.HESSIAN_METHODS)
        assert row["full"] == pytest.approx(1.0, abs=1e-6)
        assert all(-1 - 1e-9 <= v <= 1 + 1e-9 and math.isfinite(v) for v in row.values())
    assert experiment.compute_fidelity(cfg, summary["last_checkpoint"], num_tasks=0) == []
