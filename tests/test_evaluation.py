"""Evaluate mode: the real CLI end to end, results schema, checkpoint errors, memory windows."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import analysis
import config
import evaluation
import main
import runs
import utils
from conftest import REPO

TINY = ["datasets.synthetic_only=true", "tasks.n_way=3", "tasks.k_shot=2", "tasks.q_query=2",
        "models.max_length=16", "meta_learning.default_meta_batch_size=2",
        "meta_learning.inner.default_num_steps=2", "tracking.mlflow=false",
        "tracking.tensorboard=false"]
FAST_EVAL = ["evaluation.num_episodes=3", "evaluation.adaptation_steps=3",
             "evaluation.baseline_meta_iterations=1", "evaluation.child_process=false",
             "evaluation.seeds=1", "evaluation.tuning_trials=0"]


def sets(items):
    return [arg for item in items for arg in ("--set", item)]



@pytest.fixture(scope="module")
def checkpoint(train_tiny):
    """A one-iteration tiny-bert checkpoint, trained through the CLI. (conftest's, shared)"""
    return train_tiny(TINY)


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
    assert list(methods) == ["melora", *config.load_config().evaluation.baselines]
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
    cfg = config.load_config(overrides=[f"training.output_dir={tmp_path}", "evaluation.num_episodes=2",
                                       "evaluation.adaptation_steps=1", "evaluation.seeds=1"])
    results = evaluation.run_evaluation(cfg, checkpoint, True, tmp_path)
    assert results["memory_method"] == "peak_rss_child_process"
    assert list(results["methods"]) == ["melora"]
    assert results["methods"]["melora"]["peak_memory_mb"] > 100  # python + torch at least


def test_same_episodes_on_a_second_run_and_spec_shape_checked(checkpoint, tmp_path):
    cfg = config.load_config(overrides=[f"training.output_dir={tmp_path}", *FAST_EVAL])
    first = evaluation.run_evaluation(cfg, checkpoint, True, tmp_path)
    second = evaluation.run_evaluation(cfg, checkpoint, True, tmp_path)
    assert first["methods"]["melora"]["per_episode_accuracy_per_step"] == \
        second["methods"]["melora"]["per_episode_accuracy_per_step"]
    other = config.load_config(overrides=[f"training.output_dir={tmp_path}", *FAST_EVAL,
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
    cfg = config.load_config(overrides=[f"training.output_dir={tmp_path}", "models.selected_model=tiny-gpt2"])
    with pytest.raises(utils.UserError, match="belongs to model 'tiny-bert'.*tiny-gpt2"):
        evaluation.run_evaluation(cfg, checkpoint, True, tmp_path)


def test_checkpoint_whose_tensors_do_not_fit_is_refused(checkpoint, tmp_path):
    state = runs.load_checkpoint(checkpoint)
    state["theta"].pop(next(iter(state["theta"])))
    path = runs.save_checkpoint(tmp_path / "edited.pt", {k: v for k, v in state.items() if k != "format"})
    cfg = config.load_config(overrides=[f"training.output_dir={tmp_path}", *FAST_EVAL])
    with pytest.raises(utils.UserError, match="do not fit"):
        evaluation.run_evaluation(cfg, path, True, tmp_path)


def test_evaluate_needs_a_checkpoint(tmp_path):
    cfg = config.load_config(overrides=[f"training.output_dir={tmp_path}"])
    with pytest.raises(utils.UserError, match="--checkpoint"):
        evaluation.run_evaluation(cfg, None, False, tmp_path)


def test_evaluation_measures_with_the_benchmarks_memory_window():
    """One instrument: evaluation.py and benchmarks/common.py use utils.MemoryWindow."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import common
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert evaluation.MemoryWindow is utils.MemoryWindow is common.MemoryWindow
    assert not hasattr(evaluation, "MemoryMeter")
    with evaluation.MemoryWindow(torch.device("cpu")) as window:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB
        x += 1
    assert window.extra_mb > 48


def test_proto_head_checkpoint_adapts_from_support_prototypes(tmp_path):
    """head_init=proto: step-0 accuracy comes from prototypes, not from a zero head (chance)."""
    out = tmp_path / "train"
    easy = ["synthetic.keyword_prob=0.9", "synthetic.class_overlap=0.0", "synthetic.noise=0.0",
            "meta_learning.head_init=proto"]
    assert main.main(["--mode", "train", "--model", "tiny-bert", "--num_iterations", "1",
                      "--output_dir", str(out), "--experiment_name", "run", *sets(TINY + easy)]) == 0
    cfg = config.load_config(overrides=[f"training.output_dir={tmp_path}", *FAST_EVAL,
                                       "evaluation.num_episodes=4"])
    results = evaluation.run_evaluation(cfg, out / "run" / "checkpoints" / "checkpoint_iter_1.pt",
                                        True, tmp_path)
    assert results["methods"]["melora"]["accuracy_per_step"]["mean"][0] > 0.6


# ---- the fair protocol --------------------------------------------------------------------

GRADIENT = ["melora", "proto_lora", "fomaml_lora", "maml", "finetune"]
META_LEARNED = ["melora", "proto_lora", "fomaml_lora", "maml"]


def test_fair_protocol_cli_with_two_seeds(checkpoint, tmp_path):
    """`--set evaluation.seeds=2`: one head init, MELoRA's budget, tuned rates, seeds."""
    done = evaluate_cli(checkpoint, tmp_path, *sets(FAST_EVAL + [
        "evaluation.seeds=2", "evaluation.tuning_trials=1", "evaluation.num_episodes=2",
        "evaluation.baseline_meta_iterations=0", "analysis.hyperparameter_search.val_episodes=2",
        "evaluation.baselines=[proto_lora,fomaml_lora,maml,finetune,protonet]"]))
    assert done.returncode == 0, done.stderr[-3000:]
    results = analysis.load_results(tmp_path / "eval" / "results.json")
    methods = results["methods"]
    assert list(methods) == ["melora", "proto_lora", "fomaml_lora", "maml", "finetune", "protonet"]
    assert results["seeds"] == 2 and results["head_init"] == "proto"
    for name in GRADIENT:
        m = methods[name]
        assert m["head_init"] == "proto", name
        assert isinstance(m["inner_lr"], float) and m["inner_lr"] > 0, name
        assert m["tuning_trials"] == (0 if name == "melora" else 1), name
    for name in META_LEARNED:
        m = methods[name]
        assert m["meta_train_iterations"] == 1, name  # the checkpoint's iteration count
        assert len(m["seed_accuracies"]) == 2 and len(m["per_seed_episode_accuracy"]) == 2, name
        assert m["accuracy_sd"] == pytest.approx(float(np.std(m["seed_accuracies"], ddof=1))), name
        assert m["outer_lr"] > 0, name
        # the CI and the paired tests use per-episode accuracies averaged over seeds
        assert m["per_episode_accuracy"] == pytest.approx(np.mean(m["per_seed_episode_accuracy"], 0).tolist())
    for name in ("finetune", "protonet"):
        assert methods[name]["meta_train_iterations"] == 0 and len(methods[name]["seed_accuracies"]) == 1
    assert methods["protonet"]["inner_lr"] is None
    # every meta-step memory names its Hessian method; MELoRA's also for `full`
    configured = results["config"]["memory_optimization"]["hessian_approximation"]["method"]
    assert set(methods["melora"]["meta_step_peak_memory_mb_by_hessian"]) == {configured, "full"}
    assert methods["maml"]["meta_step_hessian"] == "full"
    assert methods["proto_lora"]["meta_step_hessian"] == "none"
    assert "| proto_lora | proto |" in done.stdout and f"({configured})" in done.stdout


def test_seeds_change_the_training_not_the_episodes(checkpoint, tmp_path, monkeypatch, caplog):
    """Each seed adapts on the same episodes (same order), from differently trained theta; a
    first-order MELoRA (config.yml's default) beside fomaml_lora is pointed out."""
    import logging

    import baseline as B
    caplog.set_level(logging.INFO, logger="melora")
    seen = []
    adapt = B.FewShotMethod.adapt

    def spy(self, episode, steps):
        seen.append((self.name, float(sum(t.detach().double().sum() for t in self.theta.values())),
                     episode.support["input_ids"].tolist(), episode.query["input_ids"].tolist()))
        return adapt(self, episode, steps)

    monkeypatch.setattr(B.FewShotMethod, "adapt", spy)
    cfg = config.load_config(overrides=[f"training.output_dir={tmp_path}", *FAST_EVAL, "evaluation.seeds=2",
                                       "evaluation.num_episodes=2", "evaluation.baselines=[fomaml_lora]"])
    results = evaluation.run_evaluation(cfg, checkpoint, False, tmp_path)
    for name in ("melora", "fomaml_lora"):
        calls = [c for c in seen if c[0] == name]
        assert len(calls) == 4, name  # 2 seeds x 2 episodes
        first, second = calls[:2], calls[2:]
        assert [c[2:] for c in first] == [c[2:] for c in second], name  # the same episodes
        assert first[0][1] != second[0][1], name  # another theta
        assert len(results["methods"][name]["seed_accuracies"]) == 2
    assert results["config"]["memory_optimization"]["hessian_approximation"]["method"] == "none"
    assert "MELoRA is first order here" in caplog.text and "method=full" in caplog.text


def test_inner_steps_zero_trains_melora(tmp_path):
    """K = 0 (`--inner_steps 0`): MELoRA learns through the proto head alone (proto_lora)."""
    out = tmp_path / "train"
    assert main.main(["--mode", "train", "--model", "tiny-bert", "--num_iterations", "2",
                      "--inner_steps", "0", "--output_dir", str(out), "--experiment_name", "run",
                      *sets([t for t in TINY if "default_num_steps" not in t])]) == 0
    state = runs.load_checkpoint(out / "run" / "checkpoints" / "checkpoint_iter_2.pt")
    assert state["iteration"] == 2 and "default_num_steps\": 0" in state["config"]
    start = trainer_start_theta(state)
    moved = [n for n in state["theta"] if "lora_B" in n and not torch.equal(state["theta"][n], start[n])]
    assert moved  # the LoRA factors were trained (B starts at zero)
    with pytest.raises(utils.ConfigError, match="learn_lr"):
        config.load_config(overrides=["meta_learning.inner.default_num_steps=0",
                                     "meta_learning.inner.learn_lr=true"])


def trainer_start_theta(state):
    import model as M
    cfg = config.Config(json.loads(state["config"]))
    net, _ = M.build_model(cfg, torch.device("cpu"))
    return M.lora_parameters(net)


def test_tuning_needs_meta_val_tasks(tmp_path):
    cfg = config.load_config(overrides=[f"training.output_dir={tmp_path}", "datasets.meta_val=[]",
                                       "evaluation.tuning_trials=2"])
    with pytest.raises(utils.UserError, match="datasets.meta_val lists no source.*tuning_trials=0"):
        evaluation._check_tuning(cfg, ["melora", "finetune"])
    evaluation._check_tuning(cfg, ["melora", "protonet"])  # nothing to tune: no error


def test_explicit_key_equal_to_the_default_wins_over_the_checkpoint(tmp_path):
    """`--set meta_learning.inner.default_lr=<config.yml's value>` against a checkpoint
    trained at 0.05 evaluates at config.yml's value; without it, at the checkpoint's 0.05."""
    default = config.load_config().meta_learning.inner.default_lr
    assert default != 0.05
    assert main.main(["--mode", "train", "--model", "tiny-bert", "--num_iterations", "1",
                      "--output_dir", str(tmp_path), "--experiment_name", "run",
                      *sets(TINY + ["meta_learning.inner.default_lr=0.05"])]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint_iter_1.pt"
    rates = {}
    for name, extra in (("named", [f"meta_learning.inner.default_lr={default}"]), ("unnamed", [])):
        assert main.main(["--mode", "evaluate", "--checkpoint", str(ckpt), "--skip_baselines",
                          "--output_dir", str(tmp_path), "--experiment_name", name,
                          *sets(FAST_EVAL + extra)]) == 0
        results = analysis.load_results(tmp_path / name / "results.json")
        rates[name] = (results["config"]["meta_learning"]["inner"]["default_lr"],
                       results["methods"]["melora"]["inner_lr"])
    assert rates == {"named": (default, default), "unnamed": (0.05, 0.05)}


def _killed(job):
    """Stands in for evaluate_method in a child that the OS kills (as for memory)."""
    import signal
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_evaluation_child_is_a_clear_error():
    """A child killed mid-evaluation is a UserError naming the method, the signal and the
    fix, not a BrokenProcessPool traceback."""
    cfg = config.load_config(overrides={"evaluation.child_process": True})
    with pytest.raises(evaluation.ChildDied, match=r"evaluating fomaml_lora .*killed by SIGKILL.*"
                                                   r"out of memory.*child_process: false"):
        evaluation._run_job({"method": "fomaml_lora"}, cfg, target=_killed)
    assert issubclass(evaluation.ChildDied, utils.UserError)  # main prints it, exits 2
