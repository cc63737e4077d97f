"""Issue 27: nothing lost, nothing hangs, every refusal before the work.

Each test reproduces one failure a new user's probe found, on a tiny random model, and
asserts the message the user sees; the data-loss cases compare the user's files byte for
byte.
"""

import json

import pytest

import main
from test_adapt import TINY, assert_one_paragraph_error, files, sets, task


@pytest.fixture(scope="module")
def checkpoint(train_tiny):
    """A one-iteration tiny-bert checkpoint (3-way), trained through the CLI. (conftest's, shared)"""
    return train_tiny(TINY)


def snapshot(root):
    """Every file under `root` (or `root` itself) with its bytes."""
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def export(checkpoint, out, *extra):
    return main.main(["--mode", "export", "--checkpoint", str(checkpoint), "--output_dir", str(out),
                      "--overwrite", *extra])


# ------------------------------------------------------------------------------------
# 1. export --overwrite replaces only an earlier export
# ------------------------------------------------------------------------------------

def test_export_overwrite_never_deletes_a_users_folder(checkpoint, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ideas.txt").write_text("my thesis plan\n")
    (notes / "sub").mkdir()
    (notes / "sub" / "data.bin").write_bytes(bytes(range(256)))
    before = snapshot(notes)
    assert export(checkpoint, notes) == 2
    assert_one_paragraph_error(capsys, "--output_dir", "not an earlier MELoRA export", "ideas.txt")
    assert snapshot(notes) == before


def test_export_overwrite_never_deletes_the_checkpoint_or_a_file(checkpoint, tmp_path, capsys):
    copy = tmp_path / "ck.pt"
    copy.write_bytes(checkpoint.read_bytes())
    before = snapshot(copy)
    assert export(copy, copy) == 2
    assert_one_paragraph_error(capsys, "is a file", "never replaces a file")
    assert snapshot(copy) == before
    # Nor a folder that holds the checkpoint beside an earlier export.
    out = tmp_path / "exported"
    assert export(checkpoint, out) == 0
    inside = out / "ck.pt"
    inside.write_bytes(checkpoint.read_bytes())
    before = snapshot(out)
    assert export(inside, out) == 2
    assert_one_paragraph_error(capsys, "not an earlier MELoRA export", "ck.pt")
    assert snapshot(out) == before


def test_export_overwrite_replaces_an_earlier_export_only(checkpoint, tmp_path, capsys):
    out = tmp_path / "exported"
    assert export(checkpoint, out) == 0
    first = snapshot(out)
    assert "labels.json" in first and "adapter_config.json" in first
    assert export(checkpoint, out) == 0  # an earlier export: replaced
    assert set(snapshot(out)) == set(first)
    (out / "my_notes.txt").write_text("keep me")  # now it holds something else
    before = snapshot(out)
    assert export(checkpoint, out) == 2
    assert_one_paragraph_error(capsys, "not an earlier MELoRA export", "my_notes.txt")
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------
# 2. the confusion figure's size does not grow with the number of classes
# ------------------------------------------------------------------------------------

def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def confusion_metrics(n, confused=()):
    """Metrics of n classes, each row mostly right; `confused` pairs (i, j) get 50 errors."""
    import numpy as np
    matrix = np.eye(n, dtype=np.int64) * 10
    for i, j in confused:
        matrix[i, j] += 50
    return {"accuracy": 0.5, "labelled_rows": int(matrix.sum()), "chance": 1 / n,
            "classes": [f"class {i}" for i in range(n)], "confusion_matrix": matrix.tolist()}


def test_confusion_figure_and_printout_are_bounded_past_many_classes(monkeypatch):
    import adapt
    monkeypatch.setattr(adapt, "MAX_FIGURE_CLASSES", 6)  # the same rule, drawn faster
    side = 0.6 * adapt.MAX_FIGURE_CLASSES
    bound = (round((2 + side) * 120), round((1.5 + side) * 120))  # its size at MAX_FIGURE_CLASSES
    assert png_size(adapt.confusion_png(confusion_metrics(adapt.MAX_FIGURE_CLASSES + 10))) == bound
    assert png_size(adapt.confusion_png(confusion_metrics(1000, [(7, 900)]))) == bound
    # The figure shows the most-confused classes: the pair that is confused is among them.
    shown = adapt.most_confused(confusion_metrics(1000, [(7, 900), (3, 4)])["confusion_matrix"], 4)
    assert set(shown) == {7, 900, 3, 4}
    text = adapt.format_metrics(confusion_metrics(1000))
    assert len(text.splitlines()) < adapt.MAX_FIGURE_CLASSES + 10
    assert "1000 classes" in text and "metrics.json" in text


def test_a_failure_after_the_predictions_keeps_them(checkpoint, tmp_path, monkeypatch, capsys):
    import adapt
    from test_adapt import adapt_cli

    def fails(metrics):
        raise MemoryError("figure")
    monkeypatch.setattr(adapt, "confusion_png", fails)
    s, p = files(tmp_path, *task())
    with pytest.raises(MemoryError):
        adapt_cli(checkpoint, s, p, tmp_path / "out")
    run = tmp_path / "out" / "adapt"
    assert (run / "predictions.csv").is_file() and (run / "metrics.json").is_file()


# ------------------------------------------------------------------------------------
# 3. adapt reads a CSV as training does: every cell a string
# ------------------------------------------------------------------------------------

# Labels and texts that type guessing turns into missing values, numbers or merged classes.
TRICKY_LABELS = ["N/A", "NA", "None", "01", "1"]


def test_adapt_reads_csv_cells_as_written_as_training_does(checkpoint, tmp_path, capsys):
    import csv

    import dataset_loader
    from test_adapt import adapt_cli, read_csv
    support = [(f"{word} example {i}", label) for i in range(2)
               for word, label in zip(["coffee", "bus", "rain", "song", "snow"], TRICKY_LABELS)]
    predict = [("000", "NA", "N/A"), ("007", "123", "01"), ("1", "None", "")]
    s = tmp_path / "support.csv"
    with open(s, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *support])
    p = tmp_path / "predict.csv"
    with open(p, "w", newline="") as f:
        csv.writer(f).writerows([("id", "text", "label"), *predict])
    # Training's reader and adapt's reader agree on every cell.
    entry = dataset_loader._Source(str(s), "", "train", "text", "label", "", (), 1.0)
    trained = dataset_loader._read_file(s, entry, tmp_path / "hf")
    frame, texts, labels = dataset_loader.read_table(s, "text", "label", "--support")
    assert (texts, labels) == tuple(trained) == ([t for t, _ in support], [y for _, y in support])
    out = tmp_path / "out"
    assert adapt_cli(checkpoint, s, p, out) == 0, capsys.readouterr().err
    rows = read_csv(out / "adapt" / "predictions.csv")
    assert [(r["id"], r["text"], r["label"]) for r in rows] == predict
    metrics = json.loads((out / "adapt" / "metrics.json").read_text())
    assert metrics["classes"] == TRICKY_LABELS and metrics["labelled_rows"] == 2


def test_a_csv_is_read_once_with_only_the_columns_melora_reads(tmp_path):
    # A wide export: MELoRA reads two columns; the others are never parsed into memory
    # (benchmarks/csv_memory.py measures the peak), yet a wrong column name still lists
    # every column of the header, and --predict keeps them to write beside its predictions.
    import dataset_loader
    path = tmp_path / "wide.csv"
    path.write_text("id,text,notes,label,owner\n7,hello there,x,greet,ann\n8,bye now,y,leave,bob\n")
    frame, texts, labels = dataset_loader.read_table(path, "text", "label", "--support")
    assert list(frame.columns) == ["text", "label"]
    assert (texts, labels) == (["hello there", "bye now"], ["greet", "leave"])
    frame, _, _ = dataset_loader.read_table(path, "text", "label", "--predict", other_columns=True)
    assert list(frame.columns) == ["id", "text", "notes", "label", "owner"]
    with pytest.raises(dataset_loader.DataError, match="no column 'intent'.*id, text, notes, label, owner"):
        dataset_loader.read_table(path, "text", "intent", "--support")
    entry = dataset_loader._Source(str(path), "", "train", "text", "intent", "", (), 1.0)
    with pytest.raises(dataset_loader.DataError, match="no column 'intent'.*id, text, notes, label, owner"):
        dataset_loader._read_file(path, entry, tmp_path / "hf")
    entry = dataset_loader._Source(str(path), "", "train", "text", "label", "", (), 1.0)
    assert dataset_loader._read_file(path, entry, tmp_path / "hf") == (texts, labels)


def test_the_csv_memory_benchmark_reads_every_row_each_way(tmp_path, capsys):
    import subprocess
    import sys

    from conftest import REPO
    out = tmp_path / "csv_memory.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "csv_memory.py"), "--mb", "0.2",
                           "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["ways"]) == {"training", "adapt", "whole_text"} and result["rows"] > 500
    assert "| training |" in done.stdout


# ------------------------------------------------------------------------------------
# 4. a YAML alias bomb or deep nesting is one clear error within a second
# ------------------------------------------------------------------------------------

def alias_bomb(levels=10, width=9):
    """A value whose aliases expand to width**levels strings (a "billion laughs")."""
    value = "&l0 [" + ", ".join(['"lol"'] * width) + "]"
    for k in range(1, levels):
        value = f"&l{k} [{value}, " + ", ".join([f"*l{k - 1}"] * (width - 1)) + "]"
    return value


@pytest.mark.parametrize("text, fragments", [
    (f"lora:\n  default_rank: {alias_bomb()}\n", ["expands to more than", "aliases"]),
    ("lora:\n  default_rank: " + "[" * 3000 + "]" * 3000 + "\n", ["nests deeper than"]),
], ids=["alias bomb", "deep nesting"])
def test_a_yaml_bomb_is_one_error_within_a_second(text, fragments, tmp_path, capsys):
    # CPU seconds of this process, not wall time: a busy machine (xdist beside other jobs)
    # must not fail a test of how much work the refusal does.
    import time
    path = tmp_path / "bomb.yml"
    path.write_text(text)
    start = time.process_time()
    assert main.main(["--mode", "train", "--config", str(path), "--output_dir", str(tmp_path)]) == 2
    assert time.process_time() - start < 1.0
    assert_one_paragraph_error(capsys, "bomb.yml", *fragments)
    start = time.process_time()  # the same value through --set
    value = text.split("default_rank: ", 1)[1].strip()
    assert main.main(["--mode", "train", "--set", f"lora.default_rank={value}",
                      "--output_dir", str(tmp_path)]) == 2
    assert time.process_time() - start < 1.0
    assert_one_paragraph_error(capsys, "--set", *fragments)


# ------------------------------------------------------------------------------------
# 5. the evaluation's worker process ends when its parent is killed
# ------------------------------------------------------------------------------------

SLEEPER = '''
import os, sys, time
sys.path.insert(0, {repo!r})
import config, evaluation

def sleeper(job):
    with open({pid_file!r}, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)

if __name__ == "__main__":
    cfg = config.load_config(None, ["evaluation.child_process=true"])
    evaluation._run_job({{"method": "melora"}}, cfg, target=sleeper)
'''


def alive(pid):
    """Whether process `pid` runs (a zombie waiting to be reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_evaluation_worker_exits_when_its_parent_is_killed(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO
    pid_file = tmp_path / "worker.pid"
    script = tmp_path / "parent.py"
    script.write_text(SLEEPER.format(repo=str(REPO), pid_file=str(pid_file)))
    parent = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            assert parent.poll() is None, "the parent ended before its worker started"
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        assert alive(worker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(worker), "the worker outlived its killed parent by 10 s"
    finally:
        parent.kill()
        if pid_file.is_file() and pid_file.read_text() and alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


# ------------------------------------------------------------------------------------
# 6. every config value is range-checked before a model loads; results survive a late failure
# ------------------------------------------------------------------------------------

@pytest.fixture
def no_model(monkeypatch):
    """Building or loading a model fails the test: a refusal must come before."""
    import model as M

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")
    monkeypatch.setattr(M, "build_model", loaded)
    monkeypatch.setattr(M, "load_model", loaded)


def mode_argv(mode, checkpoint, tmp_path):
    s, p = files(tmp_path, *task())
    return {"train": [], "full": [], "evaluate": ["--checkpoint", str(checkpoint)],
            "adapt": ["--checkpoint", str(checkpoint), "--support", str(s), "--predict", str(p)],
            "export": ["--checkpoint", str(checkpoint)]}[mode]


@pytest.mark.parametrize("mode", ["train", "evaluate", "full", "adapt", "export"])
@pytest.mark.parametrize("setting, fragments", [
    ("analysis.confidence=1", ["analysis.confidence", "between 0 and 1"]),
    ("analysis.confidence=0", ["analysis.confidence", "between 0 and 1"]),
    ("adapt.batch_size=0", ["adapt.batch_size", "positive integer"]),
    ("analysis.fidelity_tasks=-1", ["analysis.fidelity_tasks", ">= 0"]),
])
def test_bad_config_values_are_refused_before_a_model_loads(mode, setting, fragments, checkpoint,
                                                            tmp_path, no_model, capsys):
    import time
    argv = ["--mode", mode, *mode_argv(mode, checkpoint, tmp_path), *sets(TINY), "--set", setting,
            "--output_dir", str(tmp_path / "out")]
    start = time.process_time()
    assert main.main(argv) == 2
    assert time.process_time() - start < 5
    assert_one_paragraph_error(capsys, *fragments)
    assert not (tmp_path / "out").exists()


def test_a_failure_after_the_episodes_ran_keeps_their_accuracies(checkpoint, tmp_path, monkeypatch):
    import evaluation

    def fails(*args, **kwargs):
        raise RuntimeError("statistics failed")
    monkeypatch.setattr(evaluation, "summarize", fails)
    with pytest.raises(RuntimeError, match="statistics failed"):
        main.main(["--mode", "evaluate", "--checkpoint", str(checkpoint), "--skip_baselines",
                   "--set", "evaluation.num_episodes=2", "--set", "evaluation.child_process=false",
                   "--output_dir", str(tmp_path), "--experiment_name", "ev"])
    kept = json.loads((tmp_path / "ev" / evaluation.PARTIAL_RESULTS_FILE).read_text())
    assert kept["error"] == "RuntimeError: statistics failed"
    per_seed = kept["methods"]["melora"]["per_seed_accuracy_per_step"]
    assert len(per_seed[0]) == 2  # the two episodes' accuracies


# ------------------------------------------------------------------------------------
# 7. an interrupted --mode full is finished by --mode full --resume; data checked first
# ------------------------------------------------------------------------------------

FULL = ["--mode", "full", "--model", "tiny-bert", "--skip_baselines", *sets(TINY + [
    "evaluation.num_episodes=2", "evaluation.adaptation_steps=1", "evaluation.child_process=false",
    "evaluation.seeds=1", "analysis.fidelity_tasks=0", "analysis.run_ablations=false"])]


def last_line(text):
    return [line for line in text.splitlines() if line.strip()][-1]


def hint(stderr):
    """The command after 'Continue with: ' on stderr's last line, as argv for main.main."""
    import shlex
    line = last_line(stderr)
    assert "Continue with: " in line, line
    argv = shlex.split(line.split("Continue with: ", 1)[1])
    assert argv[:2] == ["python", "main.py"], argv
    return argv[2:]


def test_an_interrupted_full_run_is_finished_by_its_hint(tmp_path, monkeypatch, capsys):
    import signal

    import trainer
    monkeypatch.setattr(trainer.StopOnSignal, "agreed", lambda self, device: signal.SIGTERM)
    argv = [*FULL, "--num_iterations", "2", "--output_dir", str(tmp_path), "--experiment_name", "exp"]
    assert main.main(argv) == 128 + signal.SIGTERM  # stopped after iteration 1
    run = tmp_path / "exp"
    assert not (run / "results.json").exists()
    resume = hint(capsys.readouterr().err)
    assert resume[:3] == ["--mode", "full", "--skip_baselines"] and resume[-2] == "--resume"
    monkeypatch.undo()
    assert main.main(argv) == 2  # the plain rerun is refused, and says what to do
    assert "--resume" in capsys.readouterr().err
    assert main.main(resume) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint_iter_1.pt", "checkpoint_iter_2.pt"]
    assert json.loads((run / "results.json").read_text())["methods"]["melora"]
    assert (run / "report.md").is_file() and f"full experiment done: {run}" in capsys.readouterr().out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # one line per iteration
    # A full run stopped after its training finished is finished the same way.
    (run / "results.json").unlink()
    (run / "report.md").unlink()
    assert main.main([*resume[:-1], str(run / "checkpoints" / "checkpoint_iter_2.pt")]) == 0
    assert (run / "results.json").is_file() and (run / "report.md").is_file()


def test_full_mode_checks_the_evaluation_data_before_training(tmp_path, monkeypatch, capsys):
    import csv

    import trainer

    def trains(*args, **kwargs):
        raise AssertionError("training started before the data was checked")
    monkeypatch.setattr(trainer, "run_training", trains)
    big, small = tmp_path / "big.csv", tmp_path / "small.csv"
    with open(big, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label")] + [(f"text {c} {i}", f"c{c}") for c in range(12)
                                                       for i in range(6)])
    with open(small, "w", newline="") as f:  # class "tiny" has 1 example; an episode needs 4
        csv.writer(f).writerows([("text", "label")] + [(f"x {c} {i}", c) for c in ("a", "b", "c")
                                                       for i in range(6)] + [("only one", "tiny")])
    argv = [a for a in FULL if a != "datasets.synthetic_only=true"]
    argv = [a for i, a in enumerate(argv) if not (a == "--set" and argv[i + 1:i + 2] == ["--set"])]
    assert main.main([*argv, "--dataset", str(big), "--eval_dataset", str(small), "--text_column", "text",
                      "--label_column", "label", "--num_iterations",
                      "1", "--output_dir", str(tmp_path / "out")]) == 2
    assert_one_paragraph_error(capsys, "'tiny'", "has 1 examples", "k_shot + q_query = 4")
    assert not (tmp_path / "out" / "melora").exists()


# ------------------------------------------------------------------------------------
# 8. a diverging inner loop in adapt is an error, and nothing is written
# ------------------------------------------------------------------------------------

def test_adapt_with_a_diverging_inner_loop_is_an_error(checkpoint, tmp_path, capsys):
    from test_adapt import adapt_cli
    s, p = files(tmp_path, *task())
    out = tmp_path / "out"
    assert adapt_cli(checkpoint, s, p, out, "--set", "meta_learning.inner.default_lr=1e30") == 2
    assert_one_paragraph_error(capsys, "not finite", "meta_learning.inner.default_lr", "1e+30")
    assert not (out / "adapt").exists()


# ------------------------------------------------------------------------------------
# 9. every hint the CLI prints after a stop is a command that works
# ------------------------------------------------------------------------------------

def test_the_hint_after_a_stopped_training_continues_it(tmp_path, monkeypatch, capsys):
    import signal

    import trainer
    monkeypatch.setattr(trainer.StopOnSignal, "agreed", lambda self, device: signal.SIGTERM)
    argv = ["--model", "tiny-bert", *sets(TINY), "--num_iterations", "2", "--output_dir", str(tmp_path)]
    assert main.main(argv) == 128 + signal.SIGTERM
    resume = hint(capsys.readouterr().err)
    assert resume[0] == "--resume"
    monkeypatch.undo()
    assert main.main(resume) == 0, capsys.readouterr().err
    assert (tmp_path / "melora" / "checkpoints" / "checkpoint_iter_2.pt").is_file()


def test_the_hint_after_a_stopped_adapt_is_to_run_it_again(checkpoint, tmp_path, monkeypatch, capsys):
    import shutil
    import signal

    import adapt
    run = tmp_path / "run"  # adapt into the training run's own folder, which holds checkpoints
    shutil.copytree(checkpoint.parents[1], run)
    s, p = files(tmp_path, *task())
    argv = ["--mode", "adapt", "--checkpoint", str(run / "checkpoints" / checkpoint.name),
            "--support", str(s), "--predict", str(p), "--output_dir", str(tmp_path),
            "--experiment_name", "run"]

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt(signal.SIGTERM)  # what main's SIGTERM handler raises
    monkeypatch.setattr(adapt, "fit", stopped)
    assert main.main(argv) == 128 + signal.SIGTERM
    line = last_line(capsys.readouterr().err)
    assert "--resume" not in line and "run the command again" in line, line
    monkeypatch.undo()
    assert main.main(argv) == 0, capsys.readouterr().err  # the hint: the same command again
    assert (run / "predictions.csv").is_file()


# ------------------------------------------------------------------------------------
# 10. a label column with no label is an error naming the column
# ------------------------------------------------------------------------------------

def test_a_predict_label_column_without_labels_is_an_error(checkpoint, tmp_path, capsys):
    from test_adapt import adapt_cli
    support, predict = task()
    s, p = files(tmp_path, support, [(text, "") for text, _ in predict])
    out = tmp_path / "out"
    assert adapt_cli(checkpoint, s, p, out) == 2
    assert_one_paragraph_error(capsys, "predict.csv", "column 'label'", "no row has a label")
    assert not (out / "adapt").exists()


# ------------------------------------------------------------------------------------
# 11. the checkpoint records its data; resuming on other data warns
# ------------------------------------------------------------------------------------

def test_resume_on_changed_data_warns_naming_the_source(tmp_path, capsys):
    import csv

    import torch
    data = tmp_path / "data.csv"

    def write(extra):
        with open(data, "w", newline="") as f:
            csv.writer(f).writerows([("text", "label")] + [(f"text {c} {i}{extra}", f"c{c}")
                                                           for c in range(12) for i in range(6)])
    write("")
    argv = ["--model", "tiny-bert", *sets([t for t in TINY if t != "datasets.synthetic_only=true"]),
            "--dataset", str(data), "--text_column", "text", "--label_column", "label",
            "--output_dir", str(tmp_path)]
    assert main.main([*argv, "--num_iterations", "1"]) == 0
    checkpoint = tmp_path / "melora" / "checkpoints" / "checkpoint_iter_1.pt"
    recorded = torch.load(checkpoint, weights_only=True)["data"]
    assert list(recorded.values()) == [__import__("dataset_loader")._hash_file(data)]
    capsys.readouterr()
    write(" changed")  # same classes and sizes, other texts
    with pytest.warns(UserWarning, match="data changed since the checkpoint.*data.csv:train"):
        assert main.main(["--resume", str(checkpoint), "--num_iterations", "2"]) == 0


# ------------------------------------------------------------------------------------
# Also found: a saved folder still loads after it was moved
# ------------------------------------------------------------------------------------

def test_a_saved_folder_loads_after_it_was_moved(checkpoint, tmp_path):
    import shutil

    import adapt
    from test_adapt import readme_lines
    support, _ = task()
    clf = adapt.adapt(checkpoint, [t for t, _ in support], [y for _, y in support])
    out = clf.save(tmp_path / "adapted")
    assert json.loads((out / "labels.json").read_text())["base_model"] == "base_model"
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(str(out), str(moved))
    texts = ["coffee latte espresso", "rain snow"]
    printed, _ = readme_lines(moved, texts)
    assert printed == clf.predict(texts)


@pytest.mark.parametrize("mode", ["evaluate", "train"])
def test_run_the_command_again_is_a_command_that_works(mode, checkpoint, tmp_path, monkeypatch, capsys):
    """A stop at once in evaluate, or in training before its first checkpoint, keeps
    nothing that blocks the rerun the message asks for."""
    import signal

    import evaluation
    import trainer

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt(signal.SIGTERM)  # what main's SIGTERM handler raises
    if mode == "evaluate":
        monkeypatch.setattr(evaluation, "evaluate_method", stopped)
        argv = ["--mode", "evaluate", "--checkpoint", str(checkpoint), "--skip_baselines",
                *sets(["evaluation.num_episodes=2", "evaluation.child_process=false"])]
    else:
        monkeypatch.setattr(trainer.MetaTrainer, "train_step", stopped)
        argv = ["--model", "tiny-bert", *sets(TINY), "--num_iterations", "1"]
    argv += ["--output_dir", str(tmp_path), "--experiment_name", "again"]
    assert main.main(argv) == 128 + signal.SIGTERM
    line = last_line(capsys.readouterr().err)
    assert "run the command again" in line and "--resume" not in line, line
    monkeypatch.undo()
    assert main.main(argv) == 0, capsys.readouterr().err
