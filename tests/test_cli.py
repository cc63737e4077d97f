"""main.py: the real CLI for two iterations, and one-paragraph errors with exit status 2."""

import os
import subprocess
import sys

import pytest

import main
from conftest import REPO

TINY = ["--model", "tiny-bert", "--synthetic_only", "--num_iterations", "2",
        "--meta_batch_size", "2", "--inner_steps", "1",
        "--set", "tasks.n_way=3", "--set", "tasks.k_shot=2", "--set", "tasks.q_query=2",
        "--set", "models.max_length=16", "--set", "tracking.mlflow=false",
        "--set", "memory_optimization.hessian_approximation.method=none"]


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_paragraph_error(stderr, *fragments):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_train_refuse_the_existing_run_then_resume(tmp_path):
    done = run_cli("--mode", "train", *TINY, "--output_dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    run = tmp_path / "melora"
    assert (run / "checkpoints" / "checkpoint_iter_2.pt").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert "tensorboard --logdir" in done.stderr  # the closing summary says how to open it
    again = run_cli("--mode", "train", *TINY, "--output_dir", str(tmp_path))
    assert again.returncode == 2
    assert_one_paragraph_error(again.stderr, str(run), "--overwrite", "--resume")
    # --resume alone continues with the checkpoint's settings (model, tasks, run folder).
    resumed = run_cli("--resume", str(run / "checkpoints" / "checkpoint_iter_2.pt"),
                      "--num_iterations", "3")
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "checkpoints" / "checkpoint_iter_3.pt").is_file()
    assert "warning" not in resumed.stderr.lower()


def test_a_bad_set_value_exits_2_without_traceback():
    done = run_cli("--set", "lora.default_rank=zero")
    assert done.returncode == 2
    assert_one_paragraph_error(done.stderr, "lora.default_rank", "int")


@pytest.mark.parametrize("argv, fragments", [
    (["--lora_rank", "abc"], ["--lora_rank", "invalid int"]),
    (["--mode", "serve"], ["--mode", "invalid choice"]),
    (["--set", "lora.default_rank=-1"], ["lora.default_rank", "positive"]),
    (["--set", "nokey"], ["section.key=value"]),
    (["--set", "foo.bar=1"], ["unknown config key 'foo'"]),
    (["--resume", "x.pt", "--overwrite"], ["--resume", "--overwrite"]),
    (["--checkpoint", "x.pt"], ["--checkpoint", "--mode evaluate"]),
    (["--skip_baselines"], ["--skip_baselines"]),
    (["--hyperparameter_search"], ["--mode full"]),
    (["--resume", "missing.pt"], ["missing.pt", "does not exist"]),
    (["--model", "no-such-model"], ["no-such-model", "minilm-l6"]),
    (["--text_column", "t"], ["--dataset"]),
])
def test_bad_flags_are_one_paragraph_errors(argv, fragments, capsys, tmp_path):
    assert main.main([*argv, "--output_dir", str(tmp_path)]) == 2
    assert_one_paragraph_error(capsys.readouterr().err, *fragments)
    assert not (tmp_path / "melora").exists()  # refused before any work


def test_flags_override_only_when_given():
    args = main.build_parser().parse_args(["--lora_rank", "4", "--set", "lora.alpha=2"])
    overrides = main.config_overrides(args)
    assert overrides == {"lora.default_rank": 4, "lora.alpha": 2}
    assert main.config_overrides(main.build_parser().parse_args([])) == {}


def test_few_shot_flags_map_to_their_config_keys():
    args = main.build_parser().parse_args(["--n_way", "3", "--k_shot", "2", "--q_query", "4",
                                           "--inner_lr", "0.5", "--outer_lr", "1e-4"])
    overrides = main.config_overrides(args)
    assert overrides == {"tasks.n_way": 3, "tasks.k_shot": 2, "tasks.q_query": 4,
                         "meta_learning.inner.default_lr": 0.5,
                         "meta_learning.outer.default_lr": 1e-4}
    cfg = main.load(args)
    assert (cfg.tasks.n_way, cfg.tasks.k_shot, cfg.tasks.q_query) == (3, 2, 4)
    assert cfg.meta_learning.outer.default_lr == 1e-4
    assert set(main.FLAG_KEYS) >= {"n_way", "k_shot", "q_query", "inner_lr", "outer_lr"}


@pytest.mark.parametrize("argv, fragments", [
    (["--n_way", "0"], ["tasks.n_way", "positive"]),
    (["--k_shot", "two"], ["--k_shot", "invalid int"]),
    (["--inner_lr", "-1"], ["meta_learning.inner.default_lr", ">= 0"]),
])
def test_few_shot_flags_refuse_bad_values(argv, fragments, capsys, tmp_path):
    assert main.main([*argv, "--output_dir", str(tmp_path)]) == 2
    assert_one_paragraph_error(capsys.readouterr().err, *fragments)
