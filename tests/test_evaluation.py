"""Evaluate mode: the real CLI end to end, results schema, checkpoint errors, memory windows."""

import os
import subprocess
import sys

import pytest
import torch

import analysis
import evaluation
import main
import utils
from conftest import REPO

TINY = ["datasets.synthetic_only=true", "tasks.n_way=3", "tasks.k_shot=2", "tasks.q_query=2",
        "models.max_length=16", "meta_learning.default_meta_batch_size=2",
        "meta_learning.inner.default_num_steps=2", "tracking.mlflow=false",
        "tracking.tensorboard=false"]
FAST_EVAL = ["evaluation.num_episodes=3", "evaluation.adaptation_steps=3",
             "evaluation.baseline_meta_iterations=1", "evaluation.child_process=false"]


def sets(items):
    return [arg for item in items for arg in ("--set", item)]



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A one-iteration tiny-bert checkpoint, trained through the CLI."""
    out = tmp_path_factory.mktemp("train")
    assert main.main(["--mode", "train", "--model", "tiny-bert", "--num_iterations", "1",
                      "--output_dir", str(out), "--experiment_name", "run", *sets(TINY)]) == 0
    return out / "run" / "checkpoints" / "checkpoint_iter_1.pt"


def evaluate_cli(checkpoint, out, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "main.py", "--mode", "evaluate", "--checkpoint",
                           str(checkpoint), "--output_dir", str(out), "--experiment_name", "eval",
                           *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_evaluate_cli_end_to_end(checkpoint, tmp_path):
    mtime, data = checkpoint.stat().st_mtime_ns, checkpoint.read_bytes()
    done = evaluate_cli(checkpoint, tmp_path, *sets(FAST_EVAL + [
        "evaluation.memory_profiling.enabled=true", "evaluation.memory_profiling.detailed_breakdown=true",
        "tracking.mlflow=true", "tracking.tensorboard=true"]))
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "eval"
    results = analysis.load_results(run / "results.json")
    methods = results["methods"]
    assert list(methods) == ["melora", *utils.load_config().evaluation.baselines]
    for name, m in methods.items():
        assert len(m["per_episode_accuracy"]) == 3, name
        assert 0 <= m["accuracy_ci95"][0] <= m["accuracy_mean"] <= m["accuracy_ci95"][1] <= 1
        assert m["accuracy_per_step"]["steps"] == [0, 1, 2, 3]  # 0..max(K=2, 3)
        assert m["per_episode_accuracy"] == [row[2] for row in m["per_episode_accuracy_per_step"]]
        assert set(m["memory_breakdown_mb"]) == {"weights", "adapter_and_optimizer",
                                                 "activations", "second_order"}
        assert m["seconds_per_episode"] > 0 and m["peak_memory_mb"] >= 0
    assert methods["maml"]["trainable_parameters"] > 10 * methods["melora"]["trainable_parameters"]
    assert results["memory_method"] == "rss_increase_sampled" and results["reported_step"] == 2
    assert results["checkpoint"] == str(checkpoint) and results["config"]["tasks"]["n_way"] == 3
    assert "| melora |" in done.stdout and "Accuracy (%, mean ± 95% CI)" in done.stdout
    assert analysis.compare_methods(results, n_resamples=50)  # paired over the same episodes
    assert (run / "meta_test_episodes.json").is_file()
    assert (run / "evaluation" / "metrics.jsonl").is_file() and (run / "evaluation" / "mlflow.db").is_file()
    assert any((run / "evaluation" / "tensorboard").iterdir())
    # The checkpoint is only read.
    assert checkpoint.read_bytes() == data and checkpoint.stat().st_mtime_ns == mtime


def test_child_processes_measure_each_method_apart(checkpoint, tmp_path, monkeypatch):
    """The default: a spawned process per method; its peak RSS includes the interpreter."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = utils.load_config(overrides=[f"training.output_dir={tmp_path}", "evaluation.num_episodes=2",
                                       "evaluation.adaptation_steps=1"])
    results = evaluation.run_evaluation(cfg, checkpoint, True, tmp_path)
    assert results["memory_method"] == "peak_rss_child_process"
    assert list(results["methods"]) == ["melora"]
    assert results["methods"]["melora"]["peak_memory_mb"] > 100  # python + torch at least


def test_same_episodes_on_a_second_run_and_spec_shape_checked(checkpoint, tmp_path):
    cfg = utils.load_config(overrides=[f"training.output_dir={tmp_path}", *FAST_EVAL])
    first = evaluation.run_evaluation(cfg, checkpoint, True, tmp_path)
    second = evaluation.run_evaluation(cfg, checkpoint, True, tmp_path)
    assert first["methods"]["melora"]["per_episode_accuracy_per_step"] == \
        second["methods"]["melora"]["per_episode_accuracy_per_step"]
    other = utils.load_config(overrides=[f"training.output_dir={tmp_path}", *FAST_EVAL,
                                         "tasks.k_shot=3"])
    with pytest.raises(utils.UserError, match="2-shot.*3-shot.*delete the spec"):
        evaluation.run_evaluation(other, checkpoint, True, tmp_path)


@pytest.mark.parametrize("kind", ["missing", "truncated", "foreign"])
def test_bad_checkpoint_is_a_clear_error(checkpoint, tmp_path, kind, capsys):
    path = tmp_path / "bad.pt"
    if kind == "truncated":
        path.write_bytes(checkpoint.read_bytes()[:1000])
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    code = main.main(["--mode", "evaluate", "--checkpoint", str(path), "--output_dir",
                      str(tmp_path), "--experiment_name", "eval"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: checkpoint") and str(path) in err
    assert {"missing": "does not exist", "truncated": "truncated",
            "foreign": "not a MELoRA checkpoint"}[kind] in err


def test_checkpoint_of_another_model_is_refused(checkpoint, tmp_path):
    cfg = utils.load_config(overrides=[f"training.output_dir={tmp_path}", "models.selected_model=tiny-gpt2"])
    with pytest.raises(utils.UserError, match="belongs to model 'tiny-bert'.*tiny-gpt2"):
        evaluation.run_evaluation(cfg, checkpoint, True, tmp_path)


def test_checkpoint_whose_tensors_do_not_fit_is_refused(checkpoint, tmp_path):
    state = utils.load_checkpoint(checkpoint)
    state["theta"].pop(next(iter(state["theta"])))
    path = utils.save_checkpoint(tmp_path / "edited.pt", {k: v for k, v in state.items() if k != "format"})
    cfg = utils.load_config(overrides=[f"training.output_dir={tmp_path}", *FAST_EVAL])
    with pytest.raises(utils.UserError, match="do not fit"):
        evaluation.run_evaluation(cfg, path, True, tmp_path)


def test_evaluate_needs_a_checkpoint(tmp_path):
    cfg = utils.load_config(overrides=[f"training.output_dir={tmp_path}"])
    with pytest.raises(utils.UserError, match="--checkpoint"):
        evaluation.run_evaluation(cfg, None, False, tmp_path)


def test_memory_meter_sees_an_allocation():
    with evaluation.MemoryMeter(torch.device("cpu"), relative=True) as meter:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB
        x += 1
    assert meter.mb > 48


def test_proto_head_checkpoint_adapts_from_support_prototypes(tmp_path):
    """head_init=proto: step-0 accuracy comes from prototypes, not from a zero head (chance)."""
    out = tmp_path / "train"
    easy = ["synthetic.keyword_prob=0.9", "synthetic.class_overlap=0.0", "synthetic.noise=0.0",
            "meta_learning.head_init=proto"]
    assert main.main(["--mode", "train", "--model", "tiny-bert", "--num_iterations", "1",
                      "--output_dir", str(out), "--experiment_name", "run", *sets(TINY + easy)]) == 0
    cfg = utils.load_config(overrides=[f"training.output_dir={tmp_path}", *FAST_EVAL,
                                       "evaluation.num_episodes=4"])
    results = evaluation.run_evaluation(cfg, out / "run" / "checkpoints" / "checkpoint_iter_1.pt",
                                        True, tmp_path)
    assert results["methods"]["melora"]["accuracy_per_step"]["mean"][0] > 0.6
