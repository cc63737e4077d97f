"""Full mode through the real CLI: one folder per experiment with results, figures, report.md."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

import analysis
import config
import experiment as drivers
from conftest import REPO

SMALL = ["tasks.n_way=3", "tasks.k_shot=2", "tasks.q_query=2", "models.max_length=16",
         "meta_learning.default_meta_batch_size=1", "meta_learning.inner.default_num_steps=1",
         "tracking.tensorboard=false", "tracking.mlflow=false", "evaluation.num_episodes=3", "evaluation.adaptation_steps=1",
         "evaluation.baseline_meta_iterations=1", "evaluation.child_process=false",
         "evaluation.seeds=1", "evaluation.tuning_trials=0",
         "evaluation.baselines=[maml,protonet]", "analysis.bootstrap_samples=100",
         "analysis.fidelity_tasks=1", "analysis.run_ablations=true",
         *[f"analysis.ablations.{p}=[]" for p in ("lora_rank", "inner_steps", "checkpointing", "micro_batch")],
         "analysis.ablations.hessian_method=[none]",
         "analysis.hyperparameter_search.n_trials=1", "analysis.hyperparameter_search.num_iterations=1",
         "analysis.hyperparameter_search.val_episodes=1", "analysis.hyperparameter_search.lora_rank=[2]"]


def full_cli(out, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "main.py", "--mode", "full", "--model", "tiny-bert", "--synthetic_only",
            "--num_iterations", "2", "--output_dir", str(out), "--experiment_name", "exp",
            *[arg for item in SMALL for arg in ("--set", item)], *extra]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    done = full_cli(out, "--hyperparameter_search")
    assert done.returncode == 0, done.stderr[-4000:]
    return out, out / "exp", done


def test_full_mode_writes_results_figures_and_report(experiment):
    _, run, done = experiment
    results = analysis.load_results(run / "results.json")
    assert list(results["methods"]) == ["melora", "maml", "protonet"]
    comparison = json.loads((run / "comparison.json").read_text())
    assert [r["method"] for r in comparison] == ["maml", "protonet"]
    fidelity = json.loads((run / "fidelity.json").read_text())
    assert len(fidelity) == 1 and fidelity[0]["full"] == pytest.approx(1.0, abs=1e-6)
    assert [r["value"] for r in json.loads((run / "ablations.json").read_text())] == ["none"]
    for stem in ("training_curves", "memory", "accuracy_vs_memory", "gradient_fidelity", "ablations"):
        assert (run / "figures" / f"{stem}.png").is_file() and (run / "figures" / f"{stem}.pdf").is_file()
    assert (run / "checkpoints" / "checkpoint_iter_2.pt").is_file()
    assert f"full experiment done: {run}" in done.stdout  # the closing summary says where it went


def test_report_embeds_figures_tables_and_the_command(experiment):
    _, run, _ = experiment
    report = (run / "report.md").read_text()
    for heading in ("## Results", "## MELoRA against each baseline", "## Meta-gradient fidelity",
                    "## Ablations", "## Hyperparameter search", "## Figures"):
        assert heading in report
    assert "| melora |" in report and "Wilcoxon p (Holm)" in report and "| hessian_method | none |" in report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert "figures/training_curves.png" in links
    assert all(not os.path.isabs(link) and (run / link).is_file() for link in links)
    command = report.split("```bash\n")[1].split("\n```")[0]
    argv = shlex.split(command)
    assert argv[:4] == ["python", "main.py", "--mode", "full"] and "--hyperparameter_search" in argv


def test_search_in_full_mode_feeds_the_run(experiment):
    _, run, _ = experiment
    best = config.load_config(run / "best_config.yml")
    assert best.lora.default_rank == 2  # the only rank searched
    used = config.load_config(run / "config.yml")  # the config the meta-training ran with
    assert used.meta_learning.inner.default_lr == best.meta_learning.inner.default_lr
    assert (run / "optuna.db").is_file()


def test_rerun_refuses_an_existing_experiment_without_overwrite(experiment):
    out, run, _ = experiment
    before = (run / "report.md").read_bytes()
    done = full_cli(out)
    assert done.returncode == 2
    assert "already holds a run" in done.stderr and "--overwrite" in done.stderr
    assert "Traceback" not in done.stderr
    assert (run / "report.md").read_bytes() == before


def test_full_mode_flags_reach_run_full(monkeypatch, tmp_path):
    import main
    calls = []
    monkeypatch.setattr(drivers, "run_full", lambda cfg, run_dir, search, skip, mode_args: calls.append(
        (cfg.training.experiment_name, run_dir.name, search, skip, mode_args)) or {})
    assert main.main(["--mode", "full", "--model", "tiny-bert", "--output_dir", str(tmp_path),
                      "--experiment_name", "flags", "--hyperparameter_search", "--skip_baselines"]) == 0
    assert calls == [("flags", "flags", True, True, ("--mode", "full", "--skip_baselines"))]
