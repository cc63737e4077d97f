"""Smoke tests of benchmarks/memory.py and benchmarks/speed.py on a tiny model.

Each benchmark runs end to end (child processes included) with the smallest settings
and must print its tables and write valid JSON. Nothing here asserts a speed or memory
target: those depend on the machine and are what the benchmarks report.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import accuracy  # noqa: E402
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


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """tiny-bert saved as a Hugging Face directory (the peer loads models from disk)."""
    import model as M
    path = tmp_path_factory.mktemp("tiny-bert")
    backbone, tokenizer = M._build_tiny("bert", 0, 0.0)
    backbone.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_peer_meta_gradient_equals_melora_full(tiny_bert_dir):
    """The peer (PEFT + torch.func, unrolled) and MELoRA `full` agree on the same weights."""
    import model as M
    import peer
    from trainer import compute_meta_gradient
    net, theta = peer.build_peer(str(tiny_bert_dir), 2)
    ours, _ = M.load_model(str(tiny_bert_dir), 2, pooling="mean", dropout=0.0)
    M.inject_lora(ours, 8, 16.0, 0.0, speed.PEER_LORA["melora_targets"])
    net, ours = net.double().eval(), ours.double().eval()
    gen = torch.Generator().manual_seed(0)
    mine = M.lora_parameters(ours)
    mapping = {}  # MELoRA name -> the peer's
    for name in mine:
        match = [p for p in theta if p.replace(".default", "").replace(".base_model.model", "")
                 .replace(".weight", "") == name.replace(".weight", "")]
        assert len(match) == 1, (name, match)
        mapping[name] = match[0]
    values = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.3 for n, t in mine.items()}
    peer_theta = {mapping[n]: v for n, v in values.items()}
    setting = common.Setting("tiny", 2, 2, 2, 8, "cpu")
    episode = common.make_episode(setting, vocab_size=net.backbone.config.vocab_size)
    _, g_peer = peer.maml_meta_gradient(net, peer_theta, episode.support, episode.query, 0.5, 2)
    _, g_ours = compute_meta_gradient(ours, values, episode.support, episode.query, 0.5, 2, "full",
                                      head_init="zero")
    a = torch.cat([g_ours[n].flatten() for n in values])
    b = torch.cat([g_peer[mapping[n]].flatten() for n in values])
    assert ((a - b).norm() / b.norm()).item() < 1e-6
    _, first = peer.maml_meta_gradient(net, peer_theta, episode.support, episode.query, 0.5, 2,
                                       first_order=True)
    _, ours_first = compute_meta_gradient(ours, values, episode.support, episode.query, 0.5, 2, "none",
                                          head_init="zero")
    c = torch.cat([first[mapping[n]].flatten() for n in values])
    d = torch.cat([ours_first[n].flatten() for n in values])
    assert ((c - d).norm() / d.norm()).item() < 1e-6 and ((c - b).norm() / b.norm()).item() > 1e-4


def test_speed_peer_writes_json_and_table(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "speed_peer.json"
    result = speed.main(["--peer", "--peer-model", str(tiny_bert_dir), "--device", "cpu", "--n-way", "2",
                         "--k-shot", "1", "--q-query", "1", "--seq-len", "8", "--inner-steps", "2",
                         "--repeats", "2", "--peer-tasks", "1", "--clock", "cpu", "--output", str(out)]
                        + _threads())
    written = json.loads(out.read_text())
    assert set(written["candidates"]) == set(speed.PEER_CANDIDATES) == set(result["candidates"])
    for name, row in written["candidates"].items():
        assert row["seconds_per_iteration"] > 0 and row["extra_mb"] is not None, name
        if row["reference"] is not None:
            assert len(row["time_ratio_rounds"]) == 2 and row["time_ratio"] > 0, name
    printed = capsys.readouterr().out
    assert "| MELoRA full, every graph kept |" in printed and "of peer 2nd" in printed


def test_speed_prefix_cache_times_the_frozen_blocks(tiny_bert_dir, tmp_path, capsys):
    """--prefix-cache: the uncached runs time their frozen blocks: what a cache can save."""
    out = tmp_path / "speed_prefix_cache.json"
    result = speed.main(["--peer", "--prefix-cache", "--top-blocks", "1", "--peer-model", str(tiny_bert_dir),
                         "--device", "cpu", "--n-way", "2", "--k-shot", "1", "--q-query", "1",
                         "--seq-len", "8", "--inner-steps", "2", "--repeats", "2", "--peer-tasks", "1",
                         "--no-memory", "--output", str(out)] + _threads())
    rows = json.loads(out.read_text())["candidates"]
    assert set(rows) == set(speed.CACHE_CANDIDATES) == set(result["candidates"])
    for plain in (speed.FULL_PLAIN, speed.NONE_PLAIN):
        # the frozen block ran inside every timed uncached run and took part of its time
        assert all(0 < f < t for f, t in zip(rows[plain]["frozen_seconds_all"], rows[plain]["seconds_all"]))
    for name, row in rows.items():
        if row["reference"] is not None:
            share = rows[row["reference"]]["frozen_share"]
            assert row["speedup_expected"] == pytest.approx(1 / (1 - share)), name
            assert "frozen_share" not in row  # the cache skips the frozen block: nothing to time
    assert "Speed-up (expected)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="leaves no frozen block"):
        speed.main(["--peer", "--prefix-cache", "--top-blocks", "2", "--peer-model", str(tiny_bert_dir),
                    "--device", "cpu", "--repeats", "1", "--no-memory", "--output", str(out)] + _threads())


# ------------------------------------------------------------------------------------
# benchmarks/accuracy.py: the accuracy study, smoke preset end to end
# ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    """One smoke run (tiny random model, synthetic tasks): its JSON and its folders."""
    root = tmp_path_factory.mktemp("accuracy")
    args = ["--preset", "clinc150_smoke", "--work-dir", str(root / "work"), "--output", str(root / "accuracy.json"),
            "--threads", str(torch.get_num_threads())]
    result = accuracy.main(args)
    return result, root, args


def test_accuracy_smoke_writes_the_study_json(smoke_study):
    import baseline as B

    result, root, _ = smoke_study
    written = json.loads((root / "accuracy.json").read_text())
    assert written["preset"] == "clinc150_smoke" and written["seeds"] == [0, 1, 2]
    # methods that do not exist yet are reported, never dropped silently
    missing = [m for m in accuracy.COMPARISON_METHODS if m not in B.BASELINES]
    assert written["missing_methods"] == missing
    expected = ["melora"] + [m for m in accuracy.PRESETS["clinc150_smoke"].methods if m in B.BASELINES]
    assert list(written["methods"]) == expected
    for name, m in written["methods"].items():
        assert 0.0 <= m["accuracy_mean"] <= 1.0 and len(m["seed_accuracies"]) == 3
        assert m["accuracy_sd"] == pytest.approx(np.std(m["seed_accuracies"], ddof=1), abs=1e-12)
        lo, hi = m["ci95"]
        assert lo <= m["accuracy_mean"] + 1e-12 and m["accuracy_mean"] <= hi + 1e-12
        assert isinstance(m["config"], dict)
    # paired over the same episodes: the mean difference is the difference of the means
    assert set(written["comparisons"]) == set(expected) - {"melora"}
    for name, comp in written["comparisons"].items():
        assert comp["diff"] == pytest.approx(written["methods"]["melora"]["accuracy_mean"]
                                             - written["methods"][name]["accuracy_mean"], abs=1e-9)
        assert 0.0 <= comp["p_holm"] <= 1.0
    # MELoRA's configuration is the meta-val winner, and it is what the meta-test ran
    best = max(r["val_accuracy"] for r in written["sweep"])
    assert written["sweep"][0]["val_accuracy"] == best
    assert written["recommended_config"] == written["sweep"][0]["config"]
    assert {k: written["methods"]["melora"]["config"][k] for k in written["recommended_config"]} \
        == written["recommended_config"]
    assert set(written["settings"]) == {"3way1shot", "3way2shot"}
    assert written["methods"] == written["settings"]["3way1shot"]["methods"]
    # regime map: head x inner lr x K x shots, full - none as the difference of the two
    grid = accuracy.PRESETS["clinc150_smoke"].grid
    assert len(written["regime_map"]) == len(grid["head"]) * len(grid["inner_lr"]) * len(grid["inner_steps"]) * 2
    val = {r["key"]: r["val_accuracy_per_shape"] for r in written["sweep"]}
    for row in written["regime_map"]:
        assert row["full_minus_none"] == pytest.approx(row["full"] - row["none"], abs=1e-12)
        shape = f"{row['n_way']}way{row['k_shot']}shot"
        for hessian in ("full", "none"):  # the sweep's own meta-val accuracy of that cell
            key = accuracy.config_key({"inner_lr": row["inner_lr"], "inner_steps": row["inner_steps"],
                                       "learn_lr": False, "hessian": hessian, "head": row["head"]})
            assert row[hessian] == pytest.approx(val[key][shape], abs=1e-12)
        assert (row["full_minus_proto_lora"] is None) == ("proto_lora" in missing)
    assert "| melora |" in (root / "accuracy.md").read_text()
    for figure in written["figures"]:
        assert "/" not in figure and (root / figure).stat().st_size > 1000  # beside the JSON


def test_accuracy_study_resumes_without_recomputing(smoke_study, monkeypatch, capsys):
    result, root, args = smoke_study
    cells = sorted((root / "work").rglob("*.json"))
    assert any("sweep" in str(p) for p in cells) and any("test" in str(p) for p in cells)

    def no_training(*a, **k):
        raise AssertionError("a finished cell was recomputed")
    monkeypatch.setattr(accuracy, "train_melora", no_training)
    again = accuracy.main(args)
    assert again["methods"] == result["methods"] and again["regime_map"] == result["regime_map"]
    # a cell whose spec changed is not reused: another sweep length must train again
    changed = accuracy.dataclasses.replace(accuracy.PRESETS["clinc150_smoke"], sweep_iterations=2)
    c = accuracy.grid_configs(changed)[0]
    with pytest.raises(AssertionError, match="recomputed"):
        accuracy.sweep_cell(changed, (3, 1), c, 0, root / "work", False, [])
    # nor when a config.yml default under the preset changed (the outer lr, say)
    same = accuracy.PRESETS["clinc150_smoke"]
    assert accuracy.sweep_cell(same, (3, 1), accuracy.grid_configs(same)[0], 0, root / "work", False, [])
    monkeypatch.setattr(accuracy, "config_defaults_hash", lambda: "another config.yml")
    with pytest.raises(AssertionError, match="recomputed"):
        accuracy.sweep_cell(same, (3, 1), accuracy.grid_configs(same)[0], 0, root / "work", False, [])


def test_accuracy_plan_and_bad_input(capsys):
    assert accuracy.main(["--preset", "clinc150_gpu", "--plan"]) is None
    printed = capsys.readouterr().out
    assert "144 configurations x 3 shapes" in printed and "600 episodes" in printed
    with pytest.raises(SystemExit) as exit_info:
        accuracy.main(["--preset", "clinc150_smoke", "--methods", "mamlx", "--work-dir", "/nonexistent/x"])
    assert exit_info.value.code == 2
    assert "error: --methods names ['mamlx']" in capsys.readouterr().err


def test_accuracy_study_picks_up_a_new_method_by_name(tmp_path):
    """A comparison method of baseline.BASELINES (here the proto_lora control) gets its row,
    its comparison and the regime map's full - proto_lora."""
    preset = accuracy.dataclasses.replace(
        accuracy.PRESETS["clinc150_smoke"], shapes=((3, 1),), seeds=(0, 1), methods=("proto_lora", "protonet"),
        grid={"inner_lr": (0.5,), "inner_steps": (1,), "learn_lr": (False,),
              "hessian": ("full", "none"), "head": ("euclidean",)})
    result = accuracy.run(preset, tmp_path / "work", tmp_path / "accuracy.json")
    assert list(result["methods"]) == ["melora", "proto_lora", "protonet"]
    assert "proto_lora" not in result["missing_methods"] and "proto_lora" in result["comparisons"]
    (row,) = result["regime_map"]
    cell = json.loads(next((tmp_path / "work" / "sweep").rglob("proto_lora-*.json")).read_text())
    after_k = [episode[1] for episode in cell["per_episode_accuracy_per_step"]["0.5"]]  # K = 1
    assert row["proto_lora"] == pytest.approx(float(np.mean(after_k)), abs=1e-12)
    assert row["full_minus_proto_lora"] == pytest.approx(row["full"] - row["proto_lora"], abs=1e-12)


def test_accuracy_choice_breaks_meta_val_ties_by_cost():
    """Equal meta-val accuracy: fewer inner steps win, then the cheaper Hessian method; the
    higher accuracy wins whatever it costs."""
    preset = accuracy.dataclasses.replace(
        accuracy.PRESETS["clinc150_smoke"], shapes=((3, 1),), sweep_seeds=(0,),
        grid={"inner_lr": (0.1,), "inner_steps": (1, 3), "learn_lr": (False,),
              "hessian": ("full", "none"), "head": ("euclidean",)})
    configs = accuracy.grid_configs(preset)
    accuracy_of = {(1, "full"): 0.8, (1, "none"): 0.8, (3, "full"): 0.8, (3, "none"): 0.8}

    def sweep(acc):
        return {("3way1shot", accuracy.config_key(c), 0):
                {"accuracy_mean": acc[(c["inner_steps"], c["hessian"])], "seconds_per_iteration": 1.0,
                 "peak_memory_mb": 1.0} for c in configs}

    assert accuracy.shape_key((3, 1)) == "3way1shot"
    best, ranked = accuracy.choose(preset, sweep(accuracy_of))
    assert (best["inner_steps"], best["hessian"]) == (1, "none")
    assert [(r["config"]["inner_steps"], r["config"]["hessian"]) for r in ranked] == [
        (1, "none"), (1, "full"), (3, "none"), (3, "full")]
    best, _ = accuracy.choose(preset, sweep({**accuracy_of, (3, "full"): 0.81}))
    assert (best["inner_steps"], best["hessian"]) == (3, "full")


def test_accuracy_regime_only_shapes_join_the_map_not_the_choice(tmp_path):
    """A regime-only shape is swept (alone with stage="regime") and reported in the regime
    map, but plays no part in the choice and gets no meta-test."""
    grid = {"inner_lr": (0.5,), "inner_steps": (1,), "learn_lr": (False,),
            "hessian": ("full", "none"), "head": ("euclidean",)}
    preset = accuracy.dataclasses.replace(
        accuracy.PRESETS["clinc150_smoke"], shapes=((3, 1),), seeds=(0, 1), methods=("protonet",), grid=grid,
        regime_shapes=((3, 2),), regime_grid={**grid, "hessian": ("none", "full")})
    work = tmp_path / "work"
    assert accuracy.run(preset, work, tmp_path / "accuracy.json", stage="regime") is None
    assert sorted(p.name for p in (work / "sweep").iterdir()) == ["3way2shot"]
    result = accuracy.run(preset, work, tmp_path / "accuracy.json")
    assert set(result["settings"]) == {"3way1shot"}
    assert all(set(r["val_accuracy_per_shape"]) == {"3way1shot"} for r in result["sweep"])
    assert [(r["n_way"], r["k_shot"]) for r in result["regime_map"]] == [(3, 1), (3, 2)]
    for row in result["regime_map"]:
        assert row["full_minus_none"] == pytest.approx(row["full"] - row["none"], abs=1e-12)
