"""The accuracy study of issue 29 (benchmarks/accuracy_study.py): smoke run end to end on
the GPU machine's import path, resume, budget, and the pieces its verdict rests on (the
seed-level bootstrap against scipy, the one-standard-error choice, the plateau rule, the
batched meta-step, the class-split data)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import accuracy_study as S  # noqa: E402
import analysis  # noqa: E402

# Run as the GPU machine would: `datasets`, `mlflow` and `optuna` are not installed there.
_BLOCKED = ("import sys; sys.modules.update(datasets=None, mlflow=None, optuna=None); "
            "sys.path.insert(0, 'benchmarks'); import accuracy; accuracy.main(sys.argv[1:])")


def _study(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _BLOCKED, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    args = ["--preset", "smoke", "--device", "cpu", "--work-dir", str(root / "work"),
            "--output", str(root / "accuracy.json")]
    done = _study(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, args, json.loads((root / "accuracy.json").read_text())


def test_smoke_study_writes_every_field_without_datasets_mlflow_optuna(smoke):
    root, _, r = smoke
    p = S.PRESETS["smoke"]
    assert r["budget"]["complete"] and r["budget"]["not_run"] == []
    rows = r["methods"]
    assert set(rows) == {"protonet", "protonet_cosine", "melora", "fomaml_lora", "proto_lora",
                         "proto_lora_equal_compute", "fomaml_lora_equal_compute"}
    for name, m in rows.items():
        lo, hi = m["ci95_seeds"]
        assert lo <= m["accuracy_mean"] + 1e-9 <= hi + 2e-9 and 0 <= m["accuracy_step0"] <= 1
        if name in S.FROZEN_METHODS:
            assert m["curve"] == [] and m["accuracy_step0"] == m["accuracy_mean"]
            continue
        assert len(m["seed_accuracies"]) == len(p.seeds)
        # A plateau needs min_points evaluations; an equal-compute row stops at MELoRA's
        # wall clock, so how many it reaches depends on the machine's load: at least one.
        assert len(m["curve"]) >= (1 if name.endswith("_equal_compute") else p.min_points), name
        assert [c["iteration"] for c in m["curve"]] == sorted(c["iteration"] for c in m["curve"])
        assert all(c["meta_loss"] is not None for c in m["curve"][1:])
        assert {"meta_val_accuracy", "meta_val_accuracy_step0", "query_acc_before",
                "query_acc_after"} <= set(m["curve"][-1])
    # MELoRA - row is the difference of the rows' means (same episodes, seeds paired)
    for name, c in r["comparisons"].items():
        assert c["diff"] == pytest.approx(rows["melora"]["accuracy_mean"] - rows[name]["accuracy_mean"], abs=1e-9)
        assert 0 <= c["p_holm"] <= 1 and c["ci95_seeds_diff"][0] <= c["ci95_seeds_diff"][1]
    # equal compute ran for MELoRA's seconds (to the tenth), not its iterations
    for name in ("proto_lora_equal_compute", "fomaml_lora_equal_compute"):
        assert set(rows[name]["stopped"]) == {"equal_compute"}
        assert rows[name]["config"]["seconds"] is not None
    # the choice is one of the grid's and the one marked chosen
    for method, table in r["settings"]["3way2shot"]["selection"].items():
        assert sum(t["chosen"] for t in table) == 1 and len(table) == len(p.outer_lrs)
        chosen = next(t for t in table if t["chosen"])
        assert rows[method]["config"]["outer_lr"] == chosen["outer_lr"]
        assert chosen["curve"] == [{k: c[k] for k in ("iteration", "meta_val_accuracy")}
                                   for c in rows[method]["curve"]]
    cells = r["regime_map"]
    assert {c["n_way"] for c in cells} == {5, 10, 20}
    for c in cells:
        assert {"n_way", "k_shot", "inner_lr", "outer_lr", "full", "none", "proto_lora", "p_holm"} <= set(c)
        assert c["full_minus_none"] == pytest.approx(c["full"] - c["none"], abs=1e-12)
    pc = r["positive_control"]
    assert {"config", "full", "none", "diff", "p"} <= set(pc) and pc["config"]["head_init"] == "zero"
    assert pc["diff"] == pytest.approx(pc["full"] - pc["none"], abs=1e-12)
    for where in ("at_start", "trained"):
        g = pc[f"gradient_cosine_full_vs_none_{where}"]
        assert -1 <= g["cosine_mean"] <= 1 + 1e-6 and g["lora_relative_second_order"] >= 0
    for method, curve in pc["curves"].items():  # the mean of the seeds' training curves
        assert curve and curve[0]["iteration"] == 0 and curve[0]["meta_train_query_accuracy"] is None
        assert all(0 <= c["meta_val_accuracy"] <= 1 for c in curve)
        assert all(0 <= c["meta_train_query_accuracy"] <= 1 for c in curve[1:])
    assert "## Regime map" in (root / "accuracy.md").read_text()
    assert (root / r["figures"][0]).stat().st_size > 1000


def test_smoke_study_resumes_and_stops_on_budget(smoke, tmp_path):
    root, args, first = smoke
    again = _study(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    r = json.loads((root / "accuracy.json").read_text())
    assert r["budget"]["ran"] == []  # every cell reused
    assert r["methods"] == first["methods"] and r["regime_map"] == first["regime_map"]
    report = _study(*args, "--phases", "")  # report only: the same tables from the saved cells
    assert report.returncode == 0, report.stderr[-3000:]
    r = json.loads((root / "accuracy.json").read_text())
    assert r["budget"]["ran"] == [] and r["budget"]["complete"]
    assert r["methods"] == first["methods"] and r["positive_control"] == first["positive_control"]
    assert "Budget: report of the saved cells (no phase ran); every cell ran." in (
        root / "accuracy.md").read_text()
    cut = _study("--preset", "smoke", "--device", "cpu", "--work-dir", str(tmp_path / "w"),
                 "--output", str(tmp_path / "a.json"), "--budget-minutes", "0.0001")
    assert cut.returncode == 0, cut.stderr[-3000:]
    r = json.loads((tmp_path / "a.json").read_text())
    assert not r["budget"]["complete"] and r["budget"]["not_run"]
    assert "did not run" in (tmp_path / "a.md").read_text()


def test_study_refuses_clinc150_only_flags_and_bad_budget(capsys):
    import accuracy
    for extra in (["--methods", "protonet"], ["--budget-minutes", "0"], ["--phases", "main,nope"],
                  ["--shard", "2/2"]):
        with pytest.raises(SystemExit) as e:
            accuracy.main(["--preset", "smoke", *extra])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "belong to the clinc150_* presets" in err and "unknown --phases ['nope']" in err
    assert "--shard takes I/N" in err
    assert accuracy.main(["--preset", "gpu", "--plan"]) is None
    assert "1. main comparison 5w1s, 5w5s" in capsys.readouterr().out


def test_shards_split_the_cells_between_processes(tmp_path):
    """--shard I/N: every cell belongs to exactly one of the N processes, and a run's training
    and its test (one key) to the same one."""
    keys = [S.Run(m, "hwu64", 5, k, 0.5, lr, seed, 3).key() for m in ("melora", "fomaml_lora")
            for k in (1, 5) for lr in (5e-4, 2e-3) for seed in range(3)]
    studies = [S.Study(S.PRESETS["smoke"], tmp_path, "cpu", (), S.Budget(None), (i, 3)) for i in range(3)]
    owners = [[i for i, st in enumerate(studies) if st.mine(key)] for key in keys]
    assert all(len(o) == 1 for o in owners)
    assert len({o[0] for o in owners}) == 3  # the work is spread, not given to one process


def test_bootstrap_ci_seeds_agrees_with_scipy_and_includes_seed_variance():
    rng = np.random.default_rng(1)
    episodes = rng.binomial(10, 0.7, size=300) / 10
    lo, hi = analysis.bootstrap_ci_seeds([episodes], n_resamples=20000)
    ref = stats.bootstrap((episodes,), np.mean, n_resamples=20000, method="percentile",
                          rng=np.random.default_rng(2)).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.004) and hi == pytest.approx(ref.high, abs=0.004)
    seeds = np.array([0.62, 0.70, 0.75, 0.81])  # one episode: the bootstrap over seeds alone
    lo, hi = analysis.bootstrap_ci_seeds(seeds[:, None], n_resamples=20000)
    ref = stats.bootstrap((seeds,), np.mean, n_resamples=20000, method="percentile",
                          rng=np.random.default_rng(3)).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.01) and hi == pytest.approx(ref.high, abs=0.01)
    # seeds that disagree widen the interval beyond the one of the seed-averaged episodes
    matrix = episodes[None, :] + np.array([[-0.05], [0.0], [0.05]])
    lo_s, hi_s = analysis.bootstrap_ci_seeds(matrix, n_resamples=5000)
    lo_e, hi_e = analysis.bootstrap_ci_seeds([matrix.mean(0)], n_resamples=5000)
    assert hi_s - lo_s > 1.5 * (hi_e - lo_e)
    assert analysis.bootstrap_ci_seeds([[0.5, 0.5]], n_resamples=10) == (0.5, 0.5)
    with pytest.raises(ValueError, match="finite"):
        analysis.bootstrap_ci_seeds([[0.5, float("nan")]])


def _cell(acc, seconds, iteration=10):
    return {"best_val_per_episode": acc, "best": {"iteration": iteration, "train_seconds": seconds},
            "stopped": "plateau", "curve": [{"iteration": 0, "meta_val_accuracy": 0.5}]}


def test_choice_goes_to_the_cheaper_configuration_within_one_standard_error():
    runs = [S.Run("melora", "hwu64", 5, 1, 0.5, b, 0, 3) for b in (5e-4, 2e-3, 5e-3)]
    base = np.tile([1.0, 0.8, 0.6, 1.0, 0.6], 8)   # mean 0.8, se 0.030
    near = np.tile([1.0, 0.8, 0.6, 1.0, 0.55], 8)  # 0.79: within one se of 0.8
    far = np.tile([0.6, 0.8, 0.6, 0.6, 0.4], 8)   # 0.60: outside
    pick, table = S.choose([(runs[0], _cell(base, 100.0)), (runs[1], _cell(near, 20.0)),
                            (runs[2], _cell(far, 5.0))])
    assert pick is runs[1] and [t["chosen"] for t in table] == [False, True, False]
    pick, _ = S.choose([(runs[0], _cell(base, 100.0)), (runs[2], _cell(far, 5.0))])
    assert pick is runs[0]  # a cheaper but clearly worse configuration is not taken


def test_a_row_with_fewer_seeds_is_compared_on_the_seeds_it_ran():
    # MELoRA ran seeds 0-2; an unfinished row ran seed 0 only and equals MELoRA there. Set
    # against MELoRA's mean over all three seeds it would look 10 points worse.
    rng = np.random.default_rng(0)
    seed0 = rng.binomial(5, 0.8, size=60) / 5
    melora = np.stack([seed0, np.minimum(seed0 + 0.15, 1.0), np.minimum(seed0 + 0.15, 1.0)])
    frozen = seed0[None, :] - 0.05
    p = S.PRESETS["smoke"]
    c = S.compare(analysis, p, {"frozen": frozen, "melora": melora, "partial": seed0[None, :]},
                  {"melora": [0, 1, 2], "partial": [0]})
    assert c["partial"]["seeds"] == [0] and c["partial"]["diff"] == pytest.approx(0.0)
    assert c["partial"]["ci95_seeds_diff"] == [0.0, 0.0]
    assert c["frozen"]["seeds"] == [0, 1, 2]
    assert c["frozen"]["diff"] == pytest.approx((melora.mean(0) - frozen[0]).mean())
    # seeds are matched by name, not position: a row that ran seeds 2 and 0, in that order
    c = S.compare(analysis, p, {"melora": melora, "late": melora[[2, 0]]},
                  {"melora": [0, 1, 2], "late": [2, 0]})
    assert c["late"]["seeds"] == [0, 2] and c["late"]["diff"] == pytest.approx(0.0)


def test_plateau_rule():
    p = S.PRESETS["cpu"]  # patience 3, min gain 0.5 pp, at least 5 points
    curve = lambda accs: [{"meta_val_accuracy": a} for a in accs]  # noqa: E731
    assert not S._plateau(curve([0.8, 0.8, 0.8, 0.8]), p)             # too few points
    assert S._plateau(curve([0.80, 0.85, 0.853, 0.854, 0.855]), p)     # +0.5 pp at most
    assert not S._plateau(curve([0.80, 0.85, 0.85, 0.85, 0.86]), p)    # +1 pp: still rising


def test_batched_meta_step_equals_the_sequential_one(tmp_path):
    """Without dropout, LoRAMetaLearner(batched=True) takes the same outer step (float64)."""
    import baseline as B
    import model as M
    from dataset_loader import DatasetLoader
    from config import load_config
    cfg = load_config(overrides={
        "models.selected_model": "tiny-bert", "datasets.synthetic_only": True, "tasks.n_way": 3,
        "tasks.k_shot": 2, "tasks.q_query": 2, "models.max_length": 16, "lora.dropout": 0.0,
        "training.output_dir": str(tmp_path),
        "lora.layers": [1], "training.precision": "fp64", "tracking.mlflow": False,
        "tracking.tensorboard": False, "memory_optimization.checkpointing.enabled": False,
        "memory_optimization.gradient_accumulation.default_micro_batch": 0})
    out = []
    for batched in (False, True):
        model, tok = M.build_model(cfg, torch.device("cpu"))
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        loader = DatasetLoader.from_config(cfg, tok, ("meta_train",))
        learner = B.LoRAMetaLearner(model, 0.5, 2, "full", 1e-2, 0.0, 0, "proto", 0, batched=batched)
        loss = learner.meta_step([loader.episode("meta_train", i) for i in range(3)])
        out.append((loss, {n: t.detach().clone() for n, t in learner.theta.items()}, learner.last_metrics))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-12)
    for name, t in out[0][1].items():
        torch.testing.assert_close(t, out[1][1][name], rtol=1e-12, atol=1e-12)
    assert out[0][2] == pytest.approx(out[1][2], rel=1e-12)


def test_class_split_sources_read_without_datasets(tmp_path, monkeypatch):
    """HWU64 split 02 (not the configs' 01): the loader's three class sets are exactly the
    split's label files, read without the `datasets` package."""
    import model as M
    import study_data
    from dataset_loader import DatasetLoader
    from config import load_config
    from utils import UserError
    monkeypatch.setitem(sys.modules, "datasets", None)
    sources = study_data.class_split_sources("hwu64", "02")
    cfg = load_config(overrides={**sources, "training.output_dir": str(tmp_path), "tasks.n_way": 5,
                                 "tasks.k_shot": 1, "tasks.q_query": 5, "models.max_length": 16})
    loader = DatasetLoader.from_config(cfg, M.load_model("tiny-bert", 2)[1], study_data.SPLITS)
    folder = REPO / "data" / "hwu64" / "splits" / "02"
    for split, name in zip(study_data.SPLITS, ("train", "valid", "test")):
        (classes,) = loader.split_classes(split).values()
        assert sorted(classes) == sorted((folder / f"labels.{name}.txt").read_text().split())
    with pytest.raises(UserError, match="has no class split '09'"):
        study_data.class_split_sources("hwu64", "09")
