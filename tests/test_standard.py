"""benchmarks/standard.py: the smoke preset end to end on the bundled HWU64 splits.

The smoke run happens once, in a subprocess where `datasets`, `mlflow`, `optuna`, `setfit` and
`tensorboard` cannot be imported (the GPU machine lacks the first four; tracking is off): the
path the gpu preset runs must not need them. The tests then check the JSON's shape against the issue, its numbers against the
cell files they summarise, resumption, the budget and bad flags.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import standard  # noqa: E402

BLOCKED = ("datasets", "mlflow", "optuna", "setfit", "tensorboard")
RUNNER = """
import runpy, sys
for name in {blocked!r}:
    sys.modules[name] = None   # `import name` raises ImportError
sys.argv = ["standard.py"] + {args!r}
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run without the packages the GPU machine lacks: (result, out dir, args)."""
    out = tmp_path_factory.mktemp("standard")
    args = ["--preset", "smoke", "--device", "cpu", "--out", str(out), "--budget-minutes", "30"]
    code = RUNNER.format(blocked=BLOCKED, args=args, script=str(REPO / "benchmarks" / "standard.py"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "standard_smoke.json").read_text()), out, args


def test_smoke_json_has_the_issue_shape(smoke):
    result, out, _ = smoke
    entry = result["datasets"]["hwu64"]["5way1shot"]
    assert entry["splits_done"] == ["01"] and entry["splits_missing"] == []
    assert set(entry["ours"]) == set(standard.METHODS)
    for method, m in entry["ours"].items():
        assert list(m["splits"]) == ["01"] and m["accuracy_mean"] == m["splits"]["01"], method
        assert m["ci95"] is None  # one split: no interval over splits
    published = entry["published"]
    assert [r["method"] for r in published] == [m for m, _ in standard.PUBLISHED["hwu64"]]
    assert published[0]["accuracy"] == pytest.approx(0.7437) and "2105.12995" in published[0]["paper"]
    assert result["not_done"] == [] and result["setfit"] == {}
    md = (out / "standard_smoke.md").read_text()
    assert "| protonet_cosine | ours (tiny-bert) |" in md and "| ProtoNet (low) | published" in md


def test_mean_and_t_interval_over_splits():
    """The table's mean and 95% CI over splits: split means, then a Student-t interval (scipy)."""
    preset = standard.dataclasses.replace(standard.PRESETS["smoke"], splits=("01", "02", "03"))
    per_episode = {"01": [1.0, 0.5], "02": [0.25, 0.75], "03": [0.8, 0.6]}
    done = {("hwu64", "5way1shot", s): {"methods": {"melora": acc}} for s, acc in per_episode.items()}
    entry = standard.summarize_ours(preset, done, 0.95)["hwu64"]["5way1shot"]
    m = entry["ours"]["melora"]
    values = [np.mean(v) for v in per_episode.values()]
    half = stats.t.ppf(0.975, len(values) - 1) * stats.sem(values)
    assert m["splits"] == pytest.approx(dict(zip(per_episode, values)))
    assert m["accuracy_mean"] == pytest.approx(np.mean(values))
    assert m["ci95"] == pytest.approx([np.mean(values) - half, np.mean(values) + half])
    assert set(entry["ours"]) == {"melora"} and entry["splits_done"] == ["01", "02", "03"]
    partial = standard.summarize_ours(preset, {k: v for k, v in done.items() if k[2] != "02"}, 0.95)
    assert partial["hwu64"]["5way1shot"]["splits_missing"] == ["02"]


def test_smoke_numbers_are_the_cells_numbers(smoke):
    """Each split's accuracy is the mean over that split's episodes in its cell; every method
    of a split saw the same episodes, of that split's test intents only."""
    result, out, _ = smoke
    work = out / "standard_work" / "smoke" / "test" / "5way1shot"
    cells = [json.loads(p.read_text()) for p in work.glob("*/cell.json")]
    by_split = {}
    for cell in cells:
        if sorted(cell["results"]["methods"]) == sorted(("melora",) + standard.EVALUATED):
            split = Path(cell["spec"]["preset"]["overrides"]["datasets.meta_test"][0]["classes_file"]).parent.name
            by_split[split] = cell
    assert sorted(by_split) == ["01"]
    ours = result["datasets"]["hwu64"]["5way1shot"]["ours"]
    for split, cell in by_split.items():
        for name, m in cell["results"]["methods"].items():
            assert ours[name]["splits"][split] == pytest.approx(np.mean(m["per_episode_accuracy"]))
        spec = json.loads(Path(cell["episode_spec"]).read_text())
        test_intents = set((REPO / f"data/hwu64/splits/{split}/labels.test.txt").read_text().split())
        names = {c for episode in spec["episodes"] for c in episode["classes"]}
        assert names and names <= test_intents
        cosine = json.loads((Path(cell["episode_spec"]).parent / "protonet_cosine.json").read_text())
        assert ours["protonet_cosine"]["splits"][split] == pytest.approx(np.mean(cosine["per_episode_accuracy"]))


def test_smoke_full_maml_table(smoke):
    result, _, _ = smoke
    f = result["full_maml"]
    rows = ("melora", "maml", "fomaml", "fomaml_lora")
    for name in rows:
        r = f[name]
        assert 0.0 <= r["accuracy_mean"] <= 1.0 and r["ci95"][0] <= r["accuracy_mean"] <= r["ci95"][1]
        assert r["seconds_per_meta_iteration"] > 0 and r["peak_memory_mb"] is not None, name
    assert f["melora_memory_fraction"] == pytest.approx(f["melora"]["peak_memory_mb"] / f["maml"]["peak_memory_mb"])
    assert f["maml"]["peak_memory_mb"] > f["fomaml_lora"]["peak_memory_mb"]  # every weight vs LoRA, first order
    assert f["setting"]["dataset"] == "hwu64" and f["setting"]["shape"] == "5way1shot"
    rates = f["setting"]["baseline_rates"]  # the smoke plan tunes nothing: MELoRA's rates
    assert set(rates) == {"maml", "fomaml", "fomaml_lora"}
    assert all(r["tuning_trials"] == 0 and r["inner_lr"] == f["setting"]["melora_config"]["inner_lr"]
               for r in rates.values())


def test_full_maml_rates_are_chosen_on_meta_val_where_optuna_is_installed():
    """The cpu preset chooses the full-weight baselines' rates on meta-val (MELoRA's, set for
    LoRA, are far too large for every weight); the gpu and smoke presets cannot (no Optuna)."""
    assert standard.PRESETS["cpu"].full_maml.tuning_trials > 0
    assert standard.PRESETS["gpu"].full_maml.tuning_trials == 0
    assert standard.PRESETS["smoke"].full_maml.tuning_trials == 0
    assert any("meta-val" in cut for cut in standard.PRESETS["cpu"].cuts)


def test_rerun_reuses_every_cell(smoke, monkeypatch):
    result, out, args = smoke
    import accuracy

    def no_training(*a, **k):
        raise AssertionError("a finished cell was computed again")
    monkeypatch.setattr(accuracy, "train_melora", no_training)
    monkeypatch.setattr(standard, "cosine_accuracy", no_training)
    again = standard.main(args)
    assert again["datasets"] == result["datasets"]
    assert again["full_maml"]["maml"] == result["full_maml"]["maml"]


def test_spent_budget_writes_a_valid_report_of_what_was_not_done(smoke, tmp_path):
    """A budget spent before the first cell: nothing computed, every cell listed as not done."""
    budget = standard.Budget(1e-9)
    assert not budget.allows("any")
    result = standard.run(standard.PRESETS["smoke"], tmp_path / "work", tmp_path, ["training.device=cpu"], 1e-9)
    assert result["datasets"]["hwu64"]["5way1shot"]["ours"] == {}
    assert result["not_done"] == ["hwu64 split 01 5way1shot (budget)", "full_maml (budget)"]
    written = json.loads((tmp_path / "standard_smoke.json").read_text())
    assert written["not_done"] == result["not_done"] and (tmp_path / "standard_smoke.md").is_file()
    waiting = standard.Budget(10.0)
    waiting.record(("ours", 1), 3600.0)  # the last such cell took longer than what is left
    assert not waiting.allows(("ours", 1)) and waiting.allows(("ours", 5)) and not waiting.allows(("ours", 5), 3600.0)


@pytest.mark.parametrize("flags, message", [
    (["--datasets", "hwu65"], "--datasets names"),
    (["--splits", "06"], "--splits names"),
    (["--budget-minutes", "0"], "--budget-minutes must be positive"),
])
def test_bad_flags_are_one_clear_error(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        standard.main(["--preset", "smoke", "--out", str(tmp_path)] + flags)
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before any work


def test_gpu_preset_plan_follows_the_protocol(capsys):
    gpu = standard.PRESETS["gpu"]
    assert gpu.splits == standard.SPLITS and gpu.shapes == ((5, 1), (5, 5)) and gpu.q_query == 5
    assert gpu.episodes_per_split * len(gpu.splits) == 600 and gpu.setfit is None
    assert standard.main(["--preset", "gpu", "--plan", "--datasets", "liu54"]) is None
    printed = capsys.readouterr().out
    assert "datasets liu54;" in printed and "split 01 first" in printed


def test_setfit_tasks_and_melora_adapt_row(smoke):
    """The SetFit stage's tasks (seeded, test intents only) and MELoRA's adapt-mode row on them,
    from the smoke run's checkpoint; without the `setfit` package the stage says it skipped."""
    import setfit_row
    _, out, _ = smoke
    entry = standard.split_sources("hwu64", "01")["datasets.meta_test"][0]
    tasks = setfit_row.make_tasks(entry, 5, 2, 3, 2, seed=0)
    assert tasks == setfit_row.make_tasks(entry, 5, 2, 3, 2, seed=0)
    test_intents = set((REPO / "data/hwu64/splits/01/labels.test.txt").read_text().split())
    texts = setfit_row.read_texts(entry)
    for task in tasks:
        assert len(set(task["classes"])) == 5 and set(task["classes"]) <= test_intents
        assert [c for _, c in task["support"]].count(task["classes"][0]) == 2 and len(task["query"]) == 15
        assert all(t in texts[c] for t, c in task["support"] + task["query"])
    checkpoint = next((out / "standard_work" / "smoke" / "test" / "5way1shot").glob("*/melora.pt"))
    row = setfit_row.adapt_tasks({"method": "melora", "tasks": tasks, "checkpoint": str(checkpoint),
                                  "seed": 0, "threads": 1})
    assert row["tasks"] == 2 and row["accuracy_mean"] == pytest.approx(np.mean(row["per_task_accuracy"]))
    assert row["seconds_per_task"] > 0 and row["peak_memory_mb"] >= 0
    if importlib.util.find_spec("setfit") is None:
        preset = standard.dataclasses.replace(standard.PRESETS["smoke"], setfit=standard.SetFitPlan(tasks=1))
        rows, skipped = setfit_row.run(preset, out, {}, [], standard.Budget(None))
        assert rows == {} and "not installed" in skipped[0]


def test_one_stage_reports_the_saved_cells_of_the_others(smoke, tmp_path):
    """--stage full_maml on the smoke run's work folder: the standard cells are read, not run."""
    result, out, _ = smoke
    again = standard.main(["--preset", "smoke", "--device", "cpu", "--out", str(tmp_path),
                           "--work-dir", str(out / "standard_work" / "smoke"), "--stage", "full_maml"])
    assert again["datasets"] == result["datasets"] and again["not_done"] == []
    empty = standard.main(["--preset", "smoke", "--device", "cpu", "--out", str(tmp_path),
                           "--work-dir", str(tmp_path / "empty"), "--stage", "setfit"])
    assert empty["datasets"]["hwu64"]["5way1shot"]["ours"] == {} and empty["full_maml"] is None
    assert "hwu64 split 01 5way1shot (stage ours not run)" in empty["not_done"]
    assert "full_maml (stage full_maml not run)" in empty["not_done"]


def test_saved_setfit_rows_stay_in_the_report_of_another_stage(smoke, tmp_path, monkeypatch):
    """--stage full_maml after --stage setfit keeps the SetFit rows: it reads them and computes
    none, with neither the `setfit` package nor MELoRA's (git-ignored) checkpoint file."""
    import importlib.util as iu

    import setfit_row
    _, out, _ = smoke
    work = tmp_path / "work"
    shutil.copytree(out / "standard_work" / "smoke", work)
    plan = standard.SetFitPlan(shots=(2,), tasks=2, queries=2, checkpoint_shape=(5, 1))
    monkeypatch.setitem(standard.PRESETS, "smoke",
                        standard.dataclasses.replace(standard.PRESETS["smoke"], setfit=plan))
    jobs = []

    def child(function, job):  # stands in for the child process (SetFit is not a test dependency)
        jobs.append((job["method"], Path(job["checkpoint"]).is_file()))
        accuracy = [0.5, 1.0] if job["method"] == "setfit" else [1.0, 1.0]
        return {"per_task_accuracy": accuracy, "accuracy_mean": float(np.mean(accuracy)),
                "seconds_per_task": 2.0, "predict_seconds_per_task": 0.1, "peak_memory_mb": 9.0, "tasks": 2}
    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: object() if name == "setfit" else real(name, *a))
    monkeypatch.setattr(setfit_row.C, "run_in_child", child)
    args = ["--preset", "smoke", "--device", "cpu", "--out", str(tmp_path), "--work-dir", str(work)]
    first = standard.main(args + ["--stage", "setfit"])
    assert jobs == [("setfit", True), ("melora", True)]
    row = first["setfit"]["hwu64"]["5way2shot"]
    assert row["accuracy_mean"] == 0.75 and row["melora_adapt"]["accuracy_mean"] == 1.0
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "setfit" else real(name, *a))
    for checkpoint in work.glob("test/*/*/melora.pt"):
        checkpoint.unlink()
    again = standard.main(args + ["--stage", "full_maml"])
    assert len(jobs) == 2 and again["setfit"] == first["setfit"]
    assert not [n for n in again["not_done"] if n.startswith("setfit")]
    shutil.rmtree(work / "setfit")  # rows to compute again, MELoRA's checkpoint gone: one clear line
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: object() if name == "setfit" else real(name, *a))
    third = standard.main(args + ["--stage", "setfit"])
    assert jobs[2:] == [("setfit", False)]
    [line] = [n for n in third["not_done"] if n.startswith("setfit")]
    assert "melora (MELoRA's checkpoint" in line and "is missing" in line and "--stage ours" in line


def test_cells_are_found_from_a_clone_at_another_path(smoke, tmp_path):
    """A cell's spec names the checkout's data by absolute path; its hash writes them relative
    to the checkout (committed cells are found from any clone), and a cell read from a moved
    folder points at the episode file beside it, not where it was made."""
    import accuracy
    here = {"source": str(REPO / "data" / "hwu64" / "hwu64.jsonl")}
    assert accuracy._spec_hash(here) == accuracy._spec_hash({"source": "<repo>/data/hwu64/hwu64.jsonl"})
    assert accuracy._spec_hash(here) != accuracy._spec_hash({"source": "/another/clone/data/hwu64/hwu64.jsonl"})
    _, out, _ = smoke
    moved = tmp_path / "moved"
    shutil.copytree(out / "standard_work" / "smoke", moved)
    for cell_file in moved.glob("test/*/*/cell.json"):
        made = json.loads(cell_file.read_text())
        cell = accuracy.load_cell(cell_file, made["spec"])
        assert cell is not None and Path(made["episode_spec"]).parent != cell_file.parent
        assert Path(cell["episode_spec"]) == cell_file.parent / Path(made["episode_spec"]).name
        assert Path(cell["episode_spec"]).is_file()


def test_report_is_valid_before_the_first_cell_ends(tmp_path, monkeypatch):
    """A run killed inside its first cell still leaves a report naming every cell as not reached."""
    import accuracy

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(accuracy, "test_cell", killed)
    with pytest.raises(KeyboardInterrupt):
        standard.run(standard.PRESETS["smoke"], tmp_path / "work", tmp_path, ["training.device=cpu"])
    written = json.loads((tmp_path / "standard_smoke.json").read_text())
    assert written["not_done"] == ["hwu64 split 01 5way1shot (not reached yet)", "full_maml (not reached yet)"]


def test_melora_against_setfit_is_paired_over_the_same_tasks():
    """MELoRA adapt - SetFit: the mean per-task difference and the Wilcoxon p over tasks (Pratt,
    as every table of the project: the tied task stays in the sample)."""
    import setfit_row
    from scipy import stats
    melora = {"per_task_accuracy": [0.9, 0.8, 1.0, 0.7, 0.95, 0.85]}
    setfit = {"per_task_accuracy": [0.8, 0.8, 0.9, 0.6, 0.9, 0.7]}
    out = setfit_row.paired(melora, setfit)
    assert out["melora_minus_setfit"] == pytest.approx(np.mean(np.subtract(melora["per_task_accuracy"],
                                                                            setfit["per_task_accuracy"])))
    assert out["p_wilcoxon_tasks"] == pytest.approx(stats.wilcoxon(melora["per_task_accuracy"],
                                                                   setfit["per_task_accuracy"],
                                                                   zero_method="pratt").pvalue)
    import analysis
    rng = np.random.default_rng(0)  # 60 tasks, 38 tied: Pratt's p, not scipy's default
    a = rng.choice([0.6, 0.8, 1.0], 60, p=[0.2, 0.3, 0.5])
    b = np.where(rng.random(60) < 0.5, a, rng.choice([0.6, 0.8, 1.0], 60))
    d = np.round(a - b, analysis.DIFF_DECIMALS)  # as analysis.wilcoxon_test: 0.8 - 0.6 == 1.0 - 0.8
    p = setfit_row.paired({"per_task_accuracy": list(a)}, {"per_task_accuracy": list(b)})["p_wilcoxon_tasks"]
    assert p == pytest.approx(stats.wilcoxon(d, zero_method="pratt").pvalue)
    assert p != pytest.approx(stats.wilcoxon(d).pvalue)
    assert setfit_row.paired(melora, melora) == {"melora_minus_setfit": 0.0, "p_wilcoxon_tasks": 1.0}
    assert setfit_row.paired({"per_task_accuracy": [1.0]}, {"per_task_accuracy": [0.5]})["p_wilcoxon_tasks"] is None
