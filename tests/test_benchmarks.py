"""Smoke tests of benchmarks/memory.py and benchmarks/speed.py on a tiny model.

Each benchmark runs end to end (child processes included) with the smallest settings
and must print its tables and write valid JSON. Nothing here asserts a speed or memory
target: those depend on the machine and are what the benchmarks report.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402
import gpu_check  # noqa: E402
import memory  # noqa: E402
import speed  # noqa: E402

TINY = ["--model-shape", "tiny", "--device", "cpu", "--seq-len", "8", "--n-way", "2",
        "--q-query", "1"]


def _threads() -> list[str]:
    """Keep this process's thread count (main() sets it)."""
    return ["--threads", str(torch.get_num_threads())]


def test_memory_benchmark_writes_json_and_tables(tmp_path, capsys):
    out = tmp_path / "memory.json"
    memory.main(TINY + _threads() + ["--inner-steps", "1", "--k-sweep", "1,2", "--methods",
                                     "full,none", "--micro-batches", "0", "--output", str(out)])
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "| Method | Hessian |" in printed and "| K | MAML" in printed and "| Target |" in printed
    for key in ("date", "cpu", "cpu_cores", "torch", "device"):
        assert result["hardware"][key] not in (None, "")
    kinds = [r["kind"] for r in result["grid"]]
    assert kinds[:3] == ["idle", "maml", "fomaml"]
    assert len(result["grid"]) == 3 + 2 * 2  # methods x checkpointing x micro-batches
    assert sorted(r["inner_steps"] for r in result["k_sweep"]) == [1, 1, 2, 2]
    for row in result["grid"] + result["k_sweep"]:
        assert "error" not in row and math.isfinite(row["extra_mb"]) and row["seconds"] >= 0
    assert {"full_vs_maml", "first_order_below_full", "full_flat_in_k",
            "maml_grows_in_k"} <= set(result["targets"])


def test_speed_benchmark_writes_json_and_tables(tmp_path, capsys):
    out = tmp_path / "speed.json"
    speed.main(TINY + _threads() + ["--inner-steps", "1", "--methods", "full,none", "--repeats",
                                    "1", "--meta-batch", "2", "--output", str(out)])
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "Overhead vs lower bound" in printed and "MELoRA full, keep_last_step" in printed
    assert set(result["methods"]) == {speed.LOWER_BOUND, "full", "none", speed.KEPT, speed.UNROLLED}
    for m in result["methods"].values():
        assert m["seconds_per_iteration"] > 0 and m["overhead_vs_lower_bound"] > 0
    for name in ("full", speed.KEPT):
        ratios = result["vs_unrolled"][name]
        assert ratios["time_ratio"] > 0 and ratios["memory_ratio"] > 0
        assert ratios["melora"]["fixed_mmap_threshold"] is True  # glibc: RSS follows live tensors
    assert result["batched"]["speedup"] > 0 and result["batched"]["met"] is None  # CPU: reported only
    assert result["hardware"]["device"] == "cpu"


def test_child_errors_reach_the_parent():
    setting = common.Setting("tiny", 2, 1, 1, 8, "cpu")
    job = {"setting": setting.__dict__, "kind": "no-such-kind", "method": None,
           "checkpointing": False, "micro_batch": 0, "inner_steps": 1, "threads": 1}
    with pytest.raises(RuntimeError, match="no-such-kind"):
        common.run_in_child(common.measure, job)


def test_memory_window_sees_an_allocation():
    """The instrument itself: a touched 256 MiB tensor shows up (loosely) in the window."""
    with common.MemoryWindow(torch.device("cpu")) as window:
        block = torch.ones(64, 2**20)  # 256 MiB, written so every page is resident
        del block
    assert window.extra_mb > 200


def test_gpu_check_runs_on_cpu_quick(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    result = gpu_check.main(["--device", "cpu", "--quick", "--output", str(out)] + _threads())
    written = json.loads(out.read_text())
    assert [c["name"] for c in written["checks"]] == list(gpu_check.CHECKS)  # one entry per check
    status = {c["name"]: c for c in written["checks"]}
    assert written["failed"] == [] and result["failed"] == [], [c.get("error") for c in written["checks"]]
    # CUDA criteria are not judged on CPU, but every check that can run its code did
    for name in ("autocast_bf16", "autocast_fp16", "memory_table", "batched_tasks"):
        assert status[name]["status"] == gpu_check.NO_CUDA and status[name]["cpu_smoke"] == "ran", name
    for name in ("torchrun_nccl", "oom_retry"):
        assert status[name]["status"] == gpu_check.NO_CUDA, name
    assert status["autocast_bf16"]["cosine"] > 0.99  # bf16 autocast on CPU stays close to fp32
    assert status["attention_kernels"]["status"] == "pass"  # judged on CPU too
    assert len(status["memory_table"]["rows"]) == len(gpu_check.MEMORY_ROWS)
    assert status["batched_tasks"]["speedup"] > 0
    markdown = out.with_suffix(".md").read_text()
    assert "| autocast_bf16 | skipped: no CUDA |" in markdown and "| Configuration | Extra peak MiB |" in markdown
    assert "| Check | Status | Result |" in capsys.readouterr().out
