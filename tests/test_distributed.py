"""Distributed training under torchrun (gloo, 2 CPU processes): same theta as one process,
exact resume from rank 0's checkpoints; batched tasks equal sequential ones."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import config
import runs
import trainer
import utils
from conftest import REPO

TINY = ["models.selected_model=tiny-bert", "datasets.synthetic_only=true", "tasks.n_way=3",
        "tasks.k_shot=2", "tasks.q_query=2", "models.max_length=16",
        "meta_learning.inner.default_num_steps=2", "meta_learning.outer.default_lr=0.01",
        "training.precision=fp64", "training.save_every=2", "tracking.mlflow=false",
        "tracking.tensorboard=false"]
ITERATIONS = 5


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def torchrun_command(output_dir, *args, mode="train", iterations=ITERATIONS) -> list[str]:
    """`torchrun --standalone --nproc_per_node 2 main.py --mode MODE ...` on this machine."""
    sets = [a for key in TINY for a in ("--set", key)]
    train = ["--meta_batch_size", "4", "--num_iterations", str(iterations)] if mode == "train" else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(REPO / "main.py"), "--mode", mode, "--device", "cpu", *train,
            "--output_dir", str(output_dir), *sets, *args]


def torchrun(output_dir, *args, mode="train"):
    return subprocess.run(torchrun_command(output_dir, *args, mode=mode), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)


def metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "peak_memory_mb")}
            for line in lines]


def theta(run_dir, iteration):
    return runs.load_checkpoint(trainer.checkpoint_path(run_dir, iteration))["theta"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Five iterations on 2 gloo processes, meta-batch 4 (2 tasks per rank), dropout on."""
    out = tmp_path_factory.mktemp("ddp")
    done = torchrun(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "melora", done


def test_two_processes_give_the_one_process_theta(two_processes, tmp_path):
    run, done = two_processes
    cfg = config.load_config(overrides=TINY + [f"training.output_dir={tmp_path}",
                                              "meta_learning.default_meta_batch_size=4",
                                              f"meta_learning.num_iterations={ITERATIONS}"])
    (tmp_path / "one").mkdir()
    trainer.run_training(cfg, tmp_path / "one")
    ours, theirs = theta(run, ITERATIONS), theta(tmp_path / "one", ITERATIONS)
    assert ours["head.weight"].dtype == torch.float64
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    lora = next(n for n in ours if n.endswith("lora_B"))
    assert not torch.equal(theta(run, 2)[lora], ours[lora])  # it trained
    # Metrics are means over all 4 tasks, logged once (rank 0 only).
    for a, b in zip(metrics(run), metrics(tmp_path / "one"), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    assert done.stderr.count("training done") == 1  # one summary, from rank 0


def test_two_processes_resume_exactly_from_rank_zero_checkpoints(two_processes, tmp_path):
    run, _ = two_processes
    resumed = tmp_path / "melora"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(trainer.checkpoint_path(run, 2), resumed / "checkpoints")
    shutil.copy(run / "metrics.jsonl", resumed)
    done = torchrun(tmp_path, "--resume", str(trainer.checkpoint_path(resumed, 2)))
    assert done.returncode == 0, done.stderr[-3000:]
    ours, theirs = theta(resumed, ITERATIONS), theta(run, ITERATIONS)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    assert metrics(resumed) == metrics(run)


def test_two_processes_split_evaluation_episodes_and_gather_them(two_processes, tmp_path):
    run, _ = two_processes
    checkpoint = trainer.checkpoint_path(run, ITERATIONS)
    extra = ["evaluation.num_episodes=3", "evaluation.child_process=false",
             "evaluation.adaptation_steps=2", "evaluation.seeds=1"]  # 3 episodes: rank 0 adapts on 2, rank 1 on 1
    done = torchrun(tmp_path, "--checkpoint", str(checkpoint), "--skip_baselines",
                    *[a for key in extra for a in ("--set", key)], mode="evaluate")
    assert done.returncode == 0, done.stderr[-3000:]
    ours = json.loads((tmp_path / "melora" / "results.json").read_text())["methods"]["melora"]
    import evaluation
    cfg = config.load_config(overrides=TINY + extra + [f"training.output_dir={tmp_path / 'one'}"])
    theirs = evaluation.run_evaluation(cfg, checkpoint, True, runs.prepare_run_dir(
        tmp_path / "one", "melora", overwrite=False, resume=False))["methods"]["melora"]
    assert len(ours["per_episode_accuracy_per_step"]) == 3
    assert ours["per_episode_accuracy_per_step"] == theirs["per_episode_accuracy_per_step"]  # in order
    assert ours["accuracy_mean"] == pytest.approx(theirs["accuracy_mean"])


def test_meta_batch_must_split_evenly_over_processes():
    assert list(trainer._rank_tasks(4, 1, 2)) == [2, 3]
    assert list(trainer._rank_tasks(3, 0, 1)) == [0, 1, 2]
    with pytest.raises(utils.ConfigError, match=r"default_meta_batch_size \(3\).*processes \(2\)"):
        trainer._rank_tasks(3, 0, 2)


def test_batched_tasks_equal_sequential_tasks_without_dropout(tmp_path, monkeypatch):
    # Dropout masks differ between the paths: switch off the backbone's and LoRA's.
    monkeypatch.setattr(trainer.M, "load_model", functools.partial(trainer.M.load_model, dropout=0.0))
    runs = {}
    for batched in (False, True):
        cfg = config.load_config(overrides=TINY + [
            f"training.output_dir={tmp_path}", "lora.dropout=0.0", "meta_learning.num_iterations=2",
            "meta_learning.default_meta_batch_size=2", f"meta_learning.batched_tasks={batched}",
            "memory_optimization.hessian_approximation.method=full"])
        runs[batched] = tmp_path / str(batched)
        runs[batched].mkdir()
        trainer.run_training(cfg, runs[batched])
    for name, tensor in theta(runs[False], 2).items():
        torch.testing.assert_close(theta(runs[True], 2)[name], tensor, rtol=1e-9, atol=1e-12, msg=name)
    for a, b in zip(metrics(runs[True]), metrics(runs[False]), strict=True):
        assert a == pytest.approx(b, rel=1e-9)


def _children(pid: int) -> dict[int, str]:
    """{pid: environ} of the live descendants of `pid` (Linux /proc)."""
    stats = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                pid_, rest = int(proc.name), (proc / "stat").read_text().rsplit(") ", 1)[1].split()
                stats[pid_] = (int(rest[1]), rest[0])  # (parent, state)
        except (OSError, IndexError):
            pass
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, state) in stats.items():
            if ppid == parent and state != "Z":
                try:
                    found[child] = (Path("/proc") / str(child) / "environ").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_a_killed_rank_stops_every_process_promptly_with_a_one_line_reason(tmp_path):
    # A long run; once rank 0 has logged an iteration, rank 1 is killed with SIGKILL (no
    # handler can run). Rank 0's next collective fails: it must say so in one line and
    # exit, and torchrun with it, well within torchrun's 30 s grace before its own SIGKILL.
    run = subprocess.Popen(torchrun_command(tmp_path, iterations=10_000), cwd=REPO, env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    ranks = {}
    try:
        log, deadline = tmp_path / "melora" / "metrics.jsonl", time.monotonic() + 300
        while not (log.exists() and log.read_text().strip()):
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-3000:]
            time.sleep(0.2)
        ranks = {pid: env for pid, env in _children(run.pid).items() if "\0RANK=" in "\0" + env}
        victim = next(pid for pid, env in ranks.items() if "\0RANK=1\0" in "\0" + env)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = run.communicate(timeout=120)
        took = time.monotonic() - killed
    finally:
        for pid in [run.pid, *ranks]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert len(ranks) == 2
    assert took < 30, f"torchrun took {took:.0f} s to stop after rank 1 was killed"
    assert run.returncode != 0
    assert not [pid for pid in ranks if _alive(pid)]  # no rank left behind
    ours = [line for line in stderr.splitlines() if line.startswith("error: rank 0 of 2 stopped")]
    assert len(ours) == 1, stderr[-3000:]
    assert "--resume" in ours[0]
    assert "terminate called" not in stderr
