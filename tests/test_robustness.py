"""Safe to leave running: bad input ends in one clean paragraph, never a traceback; killed
or interrupted runs resume exactly; nothing is overwritten silently; untrusted files run
no code; CUDA out-of-memory names what to lower and retries with a smaller micro-batch.

What test_cli.py, test_config.py and test_trainer_loop.py already cover (bad flags, bad
`--set` values, refusal of an existing run folder, bad checkpoints read directly) is not
repeated here; this file adds the table of bad inputs through `main.main`, a property
test of `load_config`, and the interrupted-run scenarios through real subprocesses.
Issue 14's cases are here too: what `--overwrite`, `--resume` and evaluate may delete or
write (in a throwaway tree whose other files must survive byte for byte), disk-full and
signal paths, and CSV texts kept as strings.
"""

import copy
import errno
import json
import logging
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapt  # noqa: F401  adapt, baseline, evaluation, experiment and model register their
import baseline  # noqa: F401  config rules on import; the range tests need every owner's
import config
import evaluation  # noqa: F401
import experiment  # noqa: F401
import main
import model  # noqa: F401
import runs
import trainer
import utils
from conftest import REPO

TINY = ["--model", "tiny-bert", "--synthetic_only", "--meta_batch_size", "2", "--inner_steps", "1",
        "--set", "tasks.n_way=3", "--set", "tasks.k_shot=2", "--set", "tasks.q_query=2",
        "--set", "models.max_length=16", "--set", "tracking.mlflow=false",
        "--set", "tracking.tensorboard=false",
        "--set", "memory_optimization.hessian_approximation.method=none"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True)
def _fresh_log_handlers():
    """main.main adds handlers on the stderr of its test (captured, then closed) and on
    the run folder's log file; drop them after each test."""
    yield
    log = logging.getLogger("melora")
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def error_line(stderr: str) -> str:
    """The one `error: ...` paragraph that ends stderr (warnings may precede it)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr
    return lines[-1]


# ---- a table of bad inputs through the real entry point ------------------------------------

def _write(path, text):
    path.write_text(text)
    return str(path)


def _write_bytes(path, data):
    path.write_bytes(data)
    return str(path)


def _data(tmp, source):
    """The tiny run on `source` (--dataset) with its columns text/label."""
    return [*TINY[:2], "--dataset", source, "--text_column", "text", "--label_column", "label", *TINY[3:]]


def _checkpoint(tmp, kind):
    """A checkpoint file that is missing, truncated, foreign, pickled code, a folder, or
    written by MELoRA's saver but lacking what a resume reads."""
    path = tmp / f"{kind}.pt"
    if kind in ("no-config", "no-theta", "bad-config"):
        state = {"theta": {"a": torch.ones(2)}, "config": "{}", "inner_lr": None, "optimizer": {},
                 "iteration": 1, "nonfinite_streak": 0}
        state.pop({"no-config": "config", "no-theta": "theta"}.get(kind, "-"), None)
        if kind == "bad-config":
            state["config"] = "not json {"
        runs.save_checkpoint(path, state)
    elif kind == "truncated":
        good = runs.save_checkpoint(tmp / "good.pt", {"theta": {"a": torch.ones(64)}})
        path.write_bytes(good.read_bytes()[:100])
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    elif kind == "evil":
        _Exploit.target = str(tmp / "pwned")
        torch.save({"format": runs.CHECKPOINT_FORMAT, "x": _Exploit()}, path)
    elif kind == "folder":
        path.mkdir()
    return str(path)


class _Exploit:
    """Unpickling it would create a file: what a malicious checkpoint could do."""
    target = ""

    def __reduce__(self):
        return (open, (self.target, "w"))


# (case id, argv builder(tmp) -> list, fragments the error must contain)
BAD_INPUTS = [
    # config files: invalid YAML, unknown key, wrong type, out of range, code in YAML
    ("yaml-syntax", lambda t: ["--config", _write(t / "c.yml", "lora: {rank: [1\n")],
     ["c.yml", "not valid YAML", "line"]),
    ("yaml-not-mapping", lambda t: ["--config", _write(t / "c.yml", "- lora\n")],
     ["must hold a mapping of sections"]),
    ("yaml-unknown-key", lambda t: ["--config", _write(t / "c.yml", "lora:\n  rnak: 4\n")],
     ["unknown config key 'lora.rnak'", "default_rank"]),
    ("yaml-wrong-type", lambda t: ["--config", _write(t / "c.yml", "tasks:\n  n_way: five\n")],
     ["'tasks.n_way' must be of type int", "'five'"]),
    ("yaml-out-of-range", lambda t: ["--config", _write(t / "c.yml", "synthetic:\n  noise: 2\n")],
     ["'synthetic.noise' must be in [0, 1]"]),
    ("yaml-nan", lambda t: ["--config", _write(t / "c.yml", "meta_learning:\n  outer:\n    default_lr: .nan\n")],
     ["'meta_learning.outer.default_lr' must be a finite number"]),
    ("yaml-list-item-type", lambda t: ["--config", _write(t / "c.yml", "datasets:\n  class_split: [a, b, c]\n")],
     ["'datasets.class_split[0]' must be of type float"]),
    ("yaml-python-tag", lambda t: ["--config", _write(t / "c.yml", "lora: !!python/object/apply:os.system ['touch pwned']\n")],
     ["not valid YAML"]),
    ("config-missing", lambda t: ["--config", str(t / "nope.yml")], ["nope.yml", "does not exist"]),
    # flags
    ("negative-iterations", lambda t: ["--num_iterations", "-3"], ["meta_learning.num_iterations", "positive"]),
    ("zero-meta-batch", lambda t: ["--meta_batch_size", "0"], ["default_meta_batch_size", "positive"]),
    ("resume-with-evaluate", lambda t: ["--mode", "evaluate", "--resume", "x.pt"], ["--resume", "--mode train"]),
    ("experiment-name-path", lambda t: [*TINY, "--experiment_name", "a/b"], ["'a/b'", "plain folder name"]),
    ("cuda-without-gpu", lambda t: [*TINY, "--device", "cuda:0"], ["cuda:0", "--device cpu"]),
    # datasets: missing file, missing columns, unsupported file type
    ("dataset-missing", lambda t: [*TINY[:2], "--dataset", str(t / "nope.csv"), *TINY[3:]],
     ["nope.csv", "does not exist"]),
    ("dataset-columns", lambda t: [*TINY[:2], "--dataset", _write(t / "d.csv", "a,b\nx,1\n"), *TINY[3:]],
     ["d.csv", "no column 'text'", "--text_column"]),
    ("dataset-type", lambda t: [*TINY[:2], "--dataset", _write(t / "d.txt", "hello\n"), *TINY[3:]],
     ["d.txt", "unsupported"]),
    # checkpoints for --resume and --mode evaluate
    ("resume-missing", lambda t: ["--resume", str(t / "missing.pt")], ["missing.pt", "does not exist"]),
    ("resume-truncated", lambda t: ["--resume", _checkpoint(t, "truncated")], ["truncated.pt", "truncated"]),
    ("resume-foreign", lambda t: ["--resume", _checkpoint(t, "foreign")], ["foreign.pt", "not a MELoRA checkpoint"]),
    ("resume-pickled-code", lambda t: ["--resume", _checkpoint(t, "evil")], ["evil.pt", "refused", "never executes code"]),
    ("resume-folder", lambda t: ["--resume", _checkpoint(t, "folder")], ["folder.pt", "is a folder"]),
    ("evaluate-truncated", lambda t: ["--mode", "evaluate", "--checkpoint", _checkpoint(t, "truncated")],
     ["truncated.pt", "truncated"]),
    ("evaluate-pickled-code", lambda t: ["--mode", "evaluate", "--checkpoint", _checkpoint(t, "evil")],
     ["evil.pt", "refused"]),
    # issue 14, case 4: config files that are not UTF-8 text, binary, or a folder
    ("config-not-utf8", lambda t: ["--config", _write_bytes(t / "c.yml", b"lora:\n  alpha: \xff\xfe\n")],
     ["c.yml", "not UTF-8"]),
    ("config-binary", lambda t: ["--config", _write_bytes(t / "c.yml", b"\x00\x01\x02\x03PK")],
     ["c.yml", "not valid YAML"]),
    ("config-folder", lambda t: ["--config", str(t)], ["is a folder", "--config with the path of a YAML file"]),
    # case 5: a text file as a checkpoint (torch.load fails with KeyError, IndexError, ...)
    *[(f"resume-text-{i}", lambda t, text=text: ["--resume", _write(t / "notes.pt", text)],
       ["notes.pt", "not a torch checkpoint"]) for i, text in enumerate(["hello world\n", "e", "{}\n"])],
    ("evaluate-text", lambda t: ["--mode", "evaluate", "--checkpoint", _write(t / "notes.pt", "hello\n")],
     ["notes.pt", "not a torch checkpoint"]),
    # case 6: MELoRA checkpoints lacking what --resume reads
    ("resume-no-config", lambda t: ["--resume", _checkpoint(t, "no-config")], ["no-config.pt", "lacks config"]),
    ("resume-no-theta", lambda t: ["--resume", _checkpoint(t, "no-theta")], ["no-theta.pt", "lacks", "theta"]),
    ("resume-config-not-json", lambda t: ["--resume", _checkpoint(t, "bad-config")],
     ["bad-config.pt", "no readable config"]),
    # case 7: dataset JSON that is invalid, not UTF-8, or CLINC-style pairs with a short row
    ("dataset-json-invalid", lambda t: _data(t, _write(t / "d.json", '{"train": [["a", "x"], ["b"\n')),
     ["d.json", "not valid JSON"]),
    ("dataset-json-not-utf8", lambda t: _data(t, _write_bytes(t / "d.json", b'{"train": [["caf\xe9", "a"]]}')),
     ["d.json", "not UTF-8"]),
    ("dataset-json-short-row", lambda t: _data(t, _write(t / "d.json", json.dumps(
        {"train": [["a", "x"], ["b"]], "test": [["c", "y"]]}))), ["d.json", "not [text, label] pairs", "row 1"]),
    ("dataset-csv-not-utf8", lambda t: _data(t, _write_bytes(t / "d.csv", b"text,label\ncaf\xe9,a\n")),
     ["d.csv", "not UTF-8"]),
    # case 8: output_dir a file or not writable; a name too long for a folder
    ("output-dir-file", lambda t: [*TINY, "--set", f"training.output_dir={_write(t / 'f', 'x')}"],
     ["is a file, not a folder", "--output_dir"]),
    ("output-dir-not-writable", lambda t: [*TINY, "--set", "training.output_dir=/sys/melora-test-output"],
     ["cannot", "/sys/melora-test-output", "--output_dir you can write to"]),
    ("experiment-name-too-long", lambda t: [*TINY, "--experiment_name", "x" * 256],
     ["256 bytes", "at most 255", "shorter --experiment_name"]),
    # case 9: devices torch knows but MELoRA cannot use; seeds out of range; LoRA targets
    # that match nothing; max_length beyond the model's positions
    ("device-mps", lambda t: [*TINY, "--device", "mps"], ["'mps'", "--device cpu"]),
    ("device-meta", lambda t: [*TINY, "--device", "meta"], ["'meta'", "cpu, cuda or mps"]),
    ("seed-negative", lambda t: [*TINY, "--seed", "-1"], ["training.seed", "2**32", "--seed"]),
    ("seed-too-large", lambda t: [*TINY, "--seed", str(2**32)], ["training.seed", "2**32", "--seed"]),
    ("lora-target-matches-nothing", lambda t: [*TINY, "--set", "lora.target_modules.bert=[nothing]"],
     ["['nothing'] match no linear layer", "attention.self.query", "lora.target_modules"]),
    ("max-length-above-positions", lambda t: [*TINY, "--set", "models.max_length=4096"],
     ["models.max_length is 4096", "128 positions"]),
    # case 11: rows with an empty label are refused, not made a class "None"
    ("dataset-csv-empty-label", lambda t: _data(t, _write(t / "d.csv", "text,label\nhello,a\nbye,\n")),
     ["d.csv", "1 row(s) have an empty label", "'label'", "data row 2"]),
    # case 13: a folder as --dataset; an --eval_dataset that train mode would not read; a run
    # folder that is the token cache
    ("dataset-folder", lambda t: _data(t, str(t)), ["datasets.meta_train[0].source", "is a folder"]),
    ("train-bad-eval-dataset", lambda t: [*TINY[:2], "--eval_dataset", str(t / "nope.csv"), *TINY[3:]],
     ["datasets.meta_test[0]", "nope.csv", "does not exist"]),
    ("experiment-name-cache", lambda t: [*TINY, "--experiment_name", "cache"],
     ["tokenisation cache", "another --experiment_name"]),
]


@pytest.mark.parametrize("argv, fragments", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_clean_paragraph_and_exit_2(argv, fragments, tmp_path, capsys):
    out = tmp_path / "out"
    assert main.main([*argv(tmp_path), "--output_dir", str(out)]) == 2
    line = error_line(capsys.readouterr().err)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not (tmp_path / "pwned").exists()  # no file ran code
    # Nothing of a run is left behind, so the corrected command is not refused.
    assert not (out / "melora").exists() or not any((out / "melora").iterdir())


def test_a_failed_start_does_not_block_the_corrected_command(tmp_path, capsys):
    out = ["--output_dir", str(tmp_path), "--num_iterations", "1"]
    bad = [*TINY[:2], "--dataset", str(tmp_path / "nope.csv"), *TINY[3:]]
    assert main.main([*bad, *out]) == 2
    assert main.main([*TINY, *out]) == 0, capsys.readouterr().err
    assert (tmp_path / "melora" / "checkpoints" / "checkpoint_iter_1.pt").is_file()


def test_evaluate_refuses_to_overwrite_results(tmp_path, capsys):
    run = tmp_path / "melora"
    assert main.main([*TINY, "--num_iterations", "1", "--output_dir", str(tmp_path)]) == 0
    (run / "results.json").write_text("{}\n")  # an earlier evaluation's results
    code = main.main(["--mode", "evaluate", "--checkpoint", str(run / "checkpoints" / "checkpoint_iter_1.pt"),
                      "--output_dir", str(tmp_path)])
    assert code == 2
    line = error_line(capsys.readouterr().err)
    assert "results.json" in line and "--overwrite" in line and "--experiment_name" in line
    assert (run / "results.json").read_text() == "{}\n"


# ---- no data lost: what a command may delete ------------------------------------------------

def snapshot(root):
    """Every file under `root` (hidden ones included) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def user_tree(tmp_path):
    """A throwaway 'repository' with the user's own files around results/: what no
    command may touch."""
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / "notes.md").write_bytes(b"my notes \x00\xff")
    (repo / "results" / "docs").mkdir(parents=True)  # the user's folder, not a run
    (repo / "results" / "docs" / "paper.tex").write_text("\\section{x}\n")
    return repo


def _assert_untouched(repo, before):
    def ours(tree):  # the token cache may grow; it is MELoRA's, not the user's
        return {k: v for k, v in tree.items() if not k.startswith("results/cache/")}
    assert ours(snapshot(repo)) == ours(before)
    assert not [p for p in repo.rglob(".replaced-*")]  # nothing set aside is left over


@pytest.mark.parametrize("how", [
    ["--experiment_name", ".."],
    ["--set", "training.experiment_name=.."],
    ["--config", "CONFIG"],
    ["--experiment_name", "."],
    ["--experiment_name", "docs"],  # the user's own folder: never deleted, not a run folder
])
def test_overwrite_never_deletes_what_it_did_not_create(user_tree, how, capsys):
    """Case 1: `--experiment_name .. --overwrite` deleted the parent of output_dir."""
    config = user_tree.parent / "c.yml"
    config.write_text("training:\n  experiment_name: ..\n")
    how = [str(config) if a == "CONFIG" else a for a in how]
    before = snapshot(user_tree)
    code = main.main([*TINY, "--num_iterations", "1", "--output_dir", str(user_tree / "results"),
                      "--overwrite", *how])
    assert code == 2
    line = error_line(capsys.readouterr().err)
    assert "plain folder name" in line or "MELoRA created" in line, line
    _assert_untouched(user_tree, before)


def test_evaluate_never_writes_outside_its_run_folder(user_tree, capsys):
    """Case 1 without --overwrite: evaluate wrote results.json into the parent."""
    out = user_tree / "results"
    assert main.main([*TINY, "--num_iterations", "1", "--output_dir", str(out)]) == 0
    checkpoint = out / "melora" / "checkpoints" / "checkpoint_iter_1.pt"
    before = snapshot(user_tree)
    assert main.main(["--mode", "evaluate", "--checkpoint", str(checkpoint), "--skip_baselines",
                      "--output_dir", str(out), "--experiment_name", ".."]) == 2
    assert "plain folder name" in error_line(capsys.readouterr().err)
    _assert_untouched(user_tree, before)


def test_resume_refuses_another_runs_folder(user_tree, capsys):
    """Case 2: `--resume CKPT_OF_A --experiment_name B` rewrote B's files."""
    out = user_tree / "results"
    for name in ("a", "b"):
        assert main.main([*TINY, "--num_iterations", "1", "--output_dir", str(out),
                          "--experiment_name", name]) == 0
    before = snapshot(user_tree)
    code = main.main(["--resume", str(out / "a" / "checkpoints" / "checkpoint_iter_1.pt"),
                      "--num_iterations", "2", "--experiment_name", "b"])
    assert code == 2
    line = error_line(capsys.readouterr().err)
    assert "holds another run" in line and str(out / "a") in line, line
    _assert_untouched(user_tree, before)
    # Resuming in the checkpoint's own folder still works.
    assert main.main(["--resume", str(out / "a" / "checkpoints" / "checkpoint_iter_1.pt"),
                      "--num_iterations", "2"]) == 0, capsys.readouterr().err
    assert (out / "a" / "checkpoints" / "checkpoint_iter_2.pt").is_file()
    assert not (out / "b" / "checkpoints" / "checkpoint_iter_2.pt").exists()


def test_overwrite_deletes_the_old_run_only_after_the_new_one_started(user_tree, capsys):
    """Case 3: `--overwrite --label_column typo` deleted the old run before reading the data."""
    out = user_tree / "results"
    data = user_tree / "d.csv"
    data.write_text("text,label\n" + "".join(f"t{i} {c},{c}\n" for c in "abcdefghijklmno" for i in range(5)))
    argv = [*TINY[:2], "--dataset", str(data), *TINY[3:], "--num_iterations", "1",
            "--output_dir", str(out), "--text_column", "text"]
    assert main.main([*argv, "--label_column", "label"]) == 0, capsys.readouterr().err
    before = snapshot(user_tree)
    assert main.main([*argv, "--label_column", "typo", "--overwrite"]) == 2
    assert "no column 'typo'" in error_line(capsys.readouterr().err)
    _assert_untouched(user_tree, before)  # the old run is back, byte for byte
    # With valid inputs --overwrite replaces the run, and nothing set aside is left.
    assert main.main([*argv, "--label_column", "label", "--overwrite",
                      "--set", "training.seed=7"]) == 0, capsys.readouterr().err
    assert "seed: 7" in (out / "melora" / "config.yml").read_text()
    assert runs.is_run_folder(out / "melora")
    assert not list(user_tree.rglob(".replaced-*"))  # the old run, set aside, is gone now
    assert {k: v for k, v in snapshot(user_tree).items() if not k.startswith("results/")} == \
        {k: v for k, v in before.items() if not k.startswith("results/")}
    assert snapshot(out / "docs") == {"paper.tex": b"\\section{x}\n"}


def test_a_failed_start_leaves_no_folder_whatever_the_error(tmp_path, monkeypatch, capsys):
    """Case 10: any error (here one no check foresees) before the first checkpoint."""
    def crash(*args, **kwargs):
        raise RuntimeError("something unforeseen")
    monkeypatch.setattr(trainer.MetaTrainer, "train", crash)
    with pytest.raises(RuntimeError, match="unforeseen"):
        main.main([*TINY, "--num_iterations", "1", "--output_dir", str(tmp_path)])
    assert not (tmp_path / "melora").exists()
    monkeypatch.undo()
    assert main.main([*TINY, "--num_iterations", "1", "--output_dir", str(tmp_path)]) == 0


def test_the_users_empty_folder_is_kept_after_a_failed_start(tmp_path, capsys):
    (tmp_path / "melora").mkdir()
    assert main.main([*TINY, "--device", "meta", "--output_dir", str(tmp_path)]) == 2
    assert main.main([*TINY, "--set", "models.max_length=4096", "--output_dir", str(tmp_path)]) == 2
    assert (tmp_path / "melora").is_dir() and not any((tmp_path / "melora").iterdir())


def test_overwrite_puts_the_old_run_back_when_the_new_folder_cannot_be_made(tmp_path, monkeypatch):
    old = runs.prepare_run_dir(tmp_path, "exp", overwrite=False, resume=False)
    (old / "metrics.jsonl").write_text("{}\n")
    before = snapshot(tmp_path)
    real = utils.atomic_write_json

    def full(path, obj):
        if path.name == runs.RUN_MARKER:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, obj)
    monkeypatch.setattr(runs, "atomic_write_json", full)  # open_run_dir's writer of the marker
    with pytest.raises(utils.UserError, match="cannot create run folder .*No space left"):
        runs.open_run_dir(tmp_path, "exp", overwrite=True, resume=False)
    assert snapshot(tmp_path) == before and not list(tmp_path.glob(".replaced-*"))


# ---- disk full ------------------------------------------------------------------------------

def _enospc_on(monkeypatch, name):
    real = utils.atomic_write_bytes

    def write(path, data):
        if os.path.basename(path) == name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)
    for module in (utils, runs):  # utils' text/JSON writers, and runs.save_checkpoint's own name
        monkeypatch.setattr(module, "atomic_write_bytes", write)


def test_disk_full_on_a_checkpoint_keeps_the_earlier_one(tmp_path, monkeypatch, capsys):
    _enospc_on(monkeypatch, "checkpoint_iter_2.pt")
    assert main.main([*TINY, "--num_iterations", "3", "--output_dir", str(tmp_path),
                      "--set", "training.save_every=1"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "checkpoint_iter_2.pt" in line and "No space left" in line and "--resume" in line
    first = tmp_path / "melora" / "checkpoints" / "checkpoint_iter_1.pt"
    assert runs.load_checkpoint(first)["iteration"] == 1  # intact: the run can go on
    assert not list(first.parent.glob("*.tmp"))


def test_disk_full_before_the_first_checkpoint_is_one_error_and_no_folder(tmp_path, monkeypatch, capsys):
    _enospc_on(monkeypatch, "config.yml")  # written by training, outside any check
    assert main.main([*TINY, "--num_iterations", "1", "--output_dir", str(tmp_path)]) == 2
    line = error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "config.yml" in line
    assert not (tmp_path / "melora").exists()


def test_mlflow_store_failure_is_one_warning_and_keeps_the_metrics(tmp_path, monkeypatch, capsys):
    """A store MLflow cannot write (full disk, unwritable path) fails only its writer process:
    the run ends normally, one warning names the store, and metrics.jsonl holds every metric."""
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/a_file/mlflow.db")
    with pytest.warns(UserWarning, match="MLflow logging to .* failed"):
        assert main.main([*TINY, "--num_iterations", "2", "--output_dir", str(tmp_path),
                          "--set", "tracking.mlflow=true"]) == 0
    lines = (tmp_path / "melora" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2]


# ---- data files: texts stay strings, labels must be there -----------------------------------

def test_csv_texts_are_kept_as_strings(tmp_path):
    """Case 11: "NA"/"nan" counted as missing and numeric texts as no text."""
    import dataset_loader as D
    path = tmp_path / "d.csv"
    path.write_text('text,label\nNA,a\nnan,a\n123,b\n"0.5",b\nNone,1\n')
    entry = D._Source(str(path), "", "train", "text", "label", "", (), 1.0)
    texts, labels = D._read_file(path, entry, tmp_path / "hf")
    assert texts == ["NA", "nan", "123", "0.5", "None"]
    assert labels == ["a", "a", "b", "b", "1"]


def test_json_lines_in_a_json_file_still_read(tmp_path):
    import dataset_loader as D
    path = tmp_path / "d.json"
    path.write_text('{"text": "hi", "label": "a"}\n{"text": "yo", "label": "b"}\n')
    entry = D._Source(str(path), "", "train", "text", "label", "", (), 1.0)
    assert D._read_file(path, entry, tmp_path / "hf") == (["hi", "yo"], ["a", "b"])


# ---- what stop messages promise ---------------------------------------------------------------

def test_the_nonfinite_stop_claims_no_checkpoint_it_did_not_write(tmp_path, monkeypatch, capsys):
    """Case 12: the non-finite stop said 'the last checkpoint holds ...' with none written."""
    def nan_gradient(model, theta, *args, **kwargs):
        return torch.tensor(float("nan")), {n: torch.zeros_like(p) for n, p in theta.items()}
    monkeypatch.setattr(trainer, "compute_meta_gradient", nan_gradient)
    assert main.main([*TINY, "--num_iterations", "3", "--output_dir", str(tmp_path),
                      "--set", "training.max_nonfinite=1"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "no checkpoint was written yet" in line and "last checkpoint" not in line, line
    assert not (tmp_path / "melora").exists()


def test_evaluate_overwrite_replaces_the_episode_spec(tmp_path, capsys):
    """Case 13: `--overwrite` in evaluate kept a stale meta_test_episodes.json."""
    assert main.main([*TINY, "--num_iterations", "1", "--output_dir", str(tmp_path)]) == 0
    run = tmp_path / "melora"
    evaluate = ["--mode", "evaluate", "--checkpoint", str(run / "checkpoints" / "checkpoint_iter_1.pt"),
                "--skip_baselines", "--output_dir", str(tmp_path), "--set", "evaluation.child_process=false",
                "--set", "evaluation.adaptation_steps=1", "--set", "tracking.mlflow=false",
                "--set", "tracking.tensorboard=false"]
    assert main.main([*evaluate, "--set", "evaluation.num_episodes=2"]) == 0, capsys.readouterr().err
    checkpoint = (run / "checkpoints" / "checkpoint_iter_1.pt").read_bytes()
    assert main.main([*evaluate, "--set", "evaluation.num_episodes=3", "--overwrite"]) == 0, \
        capsys.readouterr().err
    assert len(json.loads((run / "meta_test_episodes.json").read_text())["episodes"]) == 3
    assert len(json.loads((run / "results.json").read_text())["methods"]["melora"]
               ["per_episode_accuracy_per_step"]) == 3
    assert (run / "checkpoints" / "checkpoint_iter_1.pt").read_bytes() == checkpoint  # the run stays
    assert not list(run.glob(".replaced-*"))


# ---- config.yml's documented ranges: the contract the checks are held to -----------------

class Range:
    """A range written at the end of a key's comment in config.yml: {>= 1}, {> 0},
    {[0, 1]}, {(0, 1)}; `words` are the key's documented non-numbers (keep_graphs: auto)."""

    def __init__(self, text: str, words: tuple = ()):
        self.text, self.words = text, words
        one_sided = re.fullmatch(r"(>=|>) (-?\d+(?:\.\d+)?)", text)
        if one_sided:
            self.low, self.low_open = float(one_sided[2]), one_sided[1] == ">"
            self.high, self.high_open = math.inf, True
        else:
            two = re.fullmatch(r"([\[(])(-?\d+(?:\.\d+)?), (-?\d+(?:\.\d+)?)([\])])", text)
            assert two, f"config.yml: unreadable range {{{text}}}"
            self.low, self.high = float(two[2]), float(two[3])
            self.low_open, self.high_open = two[1] == "(", two[4] == ")"

    def holds(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __repr__(self):
        return f"{{{self.text}}}"


def documented_ranges(path) -> dict[str, Range]:
    """Dotted key -> the Range its config.yml comment ends with (mapping keys; list items'
    keys are not numbers)."""
    ranges, stack = {}, []
    for line in path.read_text().splitlines():
        found = re.match(r"^( *)([A-Za-z_]\w*):(.*)$", line)
        if not found:
            continue
        indent = len(found[1])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, found[2]))
        written = re.search(r"#.*\{([^{}]+)\}\s*$", found[3])
        if written and re.match(r"[>\[(]", written[1]):
            key = ".".join(name for _, name in stack)
            ranges[key] = Range(written[1], config.INT_OR_WORD.get(key, ()))
    return ranges


DOCUMENTED = documented_ranges(REPO / "config.yml")
DEFAULT_FLAT = config.load_config().flat()


def test_config_yml_documents_a_range_for_every_number_and_its_default_is_in_it():
    numbers = {key for key, value in DEFAULT_FLAT.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    assert numbers - set(DOCUMENTED) == set(), "numbers without a documented range"
    for key, documented in DOCUMENTED.items():
        assert documented.holds(DEFAULT_FLAT[key]), (key, DEFAULT_FLAT[key], documented)


def _edges(key: str, documented: Range) -> tuple[list, list]:
    """Values at the documented edges (inside) and just beyond them (outside)."""
    integer = isinstance(DEFAULT_FLAT[key], int)
    step = 1 if integer else 1e-6
    inside, outside = [], []
    for edge, is_open, sign in ((documented.low, documented.low_open, -1),
                                (documented.high, documented.high_open, +1)):
        if math.isinf(edge):
            continue
        edge = int(edge) if integer else edge
        (outside if is_open else inside).append(edge)
        outside.append(edge + sign * step)
        if is_open:
            inside.append(edge - sign * step)
    return inside, outside


@pytest.mark.parametrize("key", sorted(DOCUMENTED))
def test_load_accepts_exactly_the_documented_range(key):
    """Each documented edge value loads and each value just beyond it is a ConfigError
    naming the key: config.yml's comments and the checks cannot drift apart."""
    inside, outside = _edges(key, DOCUMENTED[key])
    for value in inside:
        config.check(config.load_config(overrides={key: value}))
    for value in outside:
        with pytest.raises(utils.ConfigError, match=re.escape(key)):
            config.check(config.load_config(overrides={key: value}))


# ---- property: any mutation of the config loads or is a clean ConfigError ------------------

DEFAULTS = yaml.safe_load((REPO / "config.yml").read_text())
LEAVES = sorted(DEFAULT_FLAT)
SECTIONS = sorted({key.rsplit(".", 1)[0] for key in LEAVES} | set(DEFAULTS))

any_value = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.one_of(st.integers(-5, 5), st.floats(-2, 2), st.text(max_size=4)), max_size=4),
    st.dictionaries(st.text(min_size=1, max_size=6), st.integers(), max_size=2))
# Numbers at and just beyond the edges of every range check.
edge_numbers = st.sampled_from([0, -1, 1, 2, 0.0, -0.5, 0.5, 1.0, 1.5, 10**9, -(10**9),
                                float("inf"), float("-inf"), float("nan")])


def typed_value(default):
    """A value of the default's type (items of a list: the first item's type, or any)."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.one_of(st.integers(-3, 10**6), edge_numbers.filter(lambda v: isinstance(v, int)))
    if isinstance(default, float):
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True), edge_numbers)
    if isinstance(default, str):
        return st.one_of(st.text(max_size=10), st.just(""))
    if isinstance(default, list) and default and not isinstance(default[0], dict):
        return st.lists(st.one_of(typed_value(default[0]), any_value), max_size=4)
    return any_value


mutation = st.one_of(
    st.sampled_from(LEAVES).flatmap(
        lambda key: st.tuples(st.just("set"), st.just(key), typed_value(DEFAULT_FLAT[key]))),
    st.tuples(st.just("set"), st.sampled_from(LEAVES), any_value),
    st.tuples(st.just("set"), st.sampled_from(LEAVES), edge_numbers),
    st.tuples(st.just("set"), st.sampled_from(SECTIONS), any_value),
    st.tuples(st.just("unknown"), st.sampled_from(SECTIONS), st.text(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.sampled_from(LEAVES), st.none()))


def _apply(data: dict, kind: str, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if kind == "delete":
        node.pop(leaf, None)
    elif kind == "unknown":
        target = node.setdefault(leaf, {}) if isinstance(node.get(leaf, {}), dict) else node
        target[f"x_{value}"] = 1
    else:
        node[leaf] = value


@settings(max_examples=int(os.environ.get("ROBUST_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(mutation, min_size=1, max_size=3), as_file=st.booleans())
def test_random_config_mutations_load_or_fail_cleanly(mutations, as_file, tmp_path_factory):
    data = copy.deepcopy(DEFAULTS)
    for kind, key, value in mutations:
        _apply(data, kind, key, value)
    try:
        if as_file:  # through YAML text, as a user's --config file
            path = tmp_path_factory.mktemp("cfg") / "user.yml"
            path.write_text(yaml.safe_dump(data, allow_unicode=True))
            cfg = config.load_config(path)
        else:  # through --set style dotted overrides
            flat = config.Config(data).flat() if isinstance(data, dict) else {}
            cfg = config.load_config(None, {k: v for k, v in flat.items()})
    except utils.ConfigError as e:
        assert str(e).strip()  # main prints it as one paragraph (whitespace collapsed)
        return
    assert isinstance(cfg, config.Config)
    _assert_sane(cfg)


def _assert_sane(cfg: config.Config) -> None:
    """What load_config promises of a config it accepts: config.yml's documented ranges
    (read from its comments, not from config.py's tables) and types."""
    flat = cfg.flat()
    for key, documented in DOCUMENTED.items():
        if isinstance(flat[key], (int, float)) and not isinstance(flat[key], bool):
            assert documented.holds(flat[key]), (key, flat[key], documented)
        else:
            assert flat[key] in documented.words, (key, flat[key])
    for key, allowed in config.choices().items():
        assert flat[key] in allowed, key
    for key, value in flat.items():
        if isinstance(value, float):
            assert value == value and abs(value) != float("inf"), key
        default = DEFAULT_FLAT.get(key)
        if default is not None and not key.startswith(config.OPEN_MAPPINGS):
            assert type(value) is type(default), (key, value)  # the default's type
        if isinstance(default, list) and default and not isinstance(default[0], dict):
            assert all(type(v) is type(default[0]) for v in value), (key, value)


# ---- killed and interrupted runs (real subprocesses) -----------------------------------------

def train_command(out, iterations, *extra):
    return [sys.executable, str(REPO / "main.py"), "--mode", "train", *TINY,
            "--num_iterations", str(iterations), "--output_dir", str(out), *extra]


def start(command):
    return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path, process, timeout=240):
    """Poll until `path` exists; fail early if the process ended first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def theta(path):
    return runs.load_checkpoint(path)["theta"]


def losses(run_dir):
    return [json.loads(line)["meta_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_at_any_moment_then_resume_equals_an_uninterrupted_run(tmp_path):
    # Kill after a random checkpoint k, a random moment later (mid-iteration, mid-write or
    # between them), far enough from the end that the run cannot finish first, however fast.
    rng = random.Random()
    n, k, pause = 40, rng.randint(1, 15), rng.uniform(0.0, 0.2)
    reference = start(train_command(tmp_path / "ref", n))
    victim = start(train_command(tmp_path / "victim", n, "--set", "training.save_every=1"))
    run = tmp_path / "victim" / "melora"
    wait_for(run / "checkpoints" / f"checkpoint_iter_{k}.pt", victim)
    time.sleep(pause)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL, f"finished before the kill ({pause:.2f}s)"
    # The newest complete checkpoint reads; a write cut short leaves only a .tmp beside it.
    last = trainer.latest_checkpoint(run)
    assert 1 <= runs.load_checkpoint(last)["iteration"] < n
    resumed = subprocess.run([sys.executable, str(REPO / "main.py"), "--resume", str(last)],
                             cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait(timeout=300) == 0, reference.communicate()[1]
    ours, theirs = theta(run / "checkpoints" / f"checkpoint_iter_{n}.pt"), \
        theta(tmp_path / "ref" / "melora" / "checkpoints" / f"checkpoint_iter_{n}.pt")
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs), f"killed at {k}+{pause:.2f}s"
    assert losses(run) == losses(tmp_path / "ref" / "melora")  # metrics.jsonl repeats too
    assert not list((run / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_finish_the_iteration_checkpoint_and_exit(tmp_path, signum, code):
    process = start(train_command(tmp_path, 500, "--set", "training.save_every=1000"))
    run = tmp_path / "melora"
    wait_for(run / "metrics.jsonl", process)
    while not (run / "metrics.jsonl").read_text():  # the first iteration is done
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    name = signal.Signals(signum).name
    assert last.startswith(f"interrupted: {name} stopped training after iteration "), last
    checkpoint = trainer.latest_checkpoint(run)
    done = runs.load_checkpoint(checkpoint)["iteration"]
    assert f"python main.py --resume {checkpoint}" in last and f"iteration {done} of 500" in last
    assert len(losses(run)) == done  # every finished iteration was logged, none half-done


def _truthful_stop(run, stderr):
    """The last stderr line names a checkpoint only if one exists, and a run that saved
    none leaves no folder behind."""
    assert "Traceback" not in stderr, stderr
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    checkpoint = trainer.latest_checkpoint(run) if run.exists() else None
    if checkpoint is None:
        assert "before its first checkpoint" in last and "nothing to resume" in last, last
        assert not run.exists()
    else:
        assert f"--resume {checkpoint}" in last, last
    return checkpoint


def test_sigterm_during_setup_leaves_nothing_and_says_so(tmp_path):
    """Case 10/12: a SIGTERM before training's own handler killed the process and left a
    folder that blocked the rerun."""
    process = start(train_command(tmp_path, 5))
    run = tmp_path / "melora"
    wait_for(run / "train.log", process)  # the folder is open; the model is being set up
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert _truthful_stop(run, stderr) is None, "training started before the signal"


def test_a_second_sigterm_before_the_first_checkpoint_claims_no_checkpoint(tmp_path):
    """Case 12: a second SIGTERM before the first checkpoint said 'resume from the last
    checkpoint' when none existed."""
    slow = ["--meta_batch_size", "4", "--inner_steps", "2", "--set", "training.save_every=1000",
            "--set", "memory_optimization.hessian_approximation.method=full"]
    process = start(train_command(tmp_path, 500, *slow))
    run = tmp_path / "melora"
    wait_for(run / "metrics.jsonl", process)
    while not (run / "metrics.jsonl").read_text():  # in the loop: its handler is active
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    while "SIGTERM received" not in (run / "train.log").read_text():
        assert process.poll() is None
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)  # mid-iteration: stop at once
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    _truthful_stop(run, stderr)


def test_sigterm_during_evaluate_ends_the_child_too(tmp_path, capsys):
    """Case 12: SIGTERM during evaluate left the spawned child orphaned, blocked on a pipe."""
    import psutil
    assert main.main([*TINY, "--num_iterations", "1", "--output_dir", str(tmp_path)]) == 0
    run = tmp_path / "melora"
    process = start([sys.executable, str(REPO / "main.py"), "--mode", "evaluate", "--checkpoint",
                     str(run / "checkpoints" / "checkpoint_iter_1.pt"), "--skip_baselines",
                     "--output_dir", str(tmp_path), "--set", "evaluation.num_episodes=500",
                     "--set", "evaluation.child_process=true"])
    deadline, children = time.monotonic() + 240, []
    while not children:  # the spawned worker (not multiprocessing's resource tracker)
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline
        children = [c for c in psutil.Process(process.pid).children()
                    if "spawn_main" in " ".join(c.cmdline())]
        time.sleep(0.05)
    time.sleep(1.0)  # the child is importing or evaluating
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("interrupted: SIGTERM stopped the evaluation") and "results.json was not written" in last
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, "the evaluation child outlived its parent"
    assert not (run / "results.json").exists()
    assert (run / "checkpoints" / "checkpoint_iter_1.pt").is_file()  # the trained run stays


def test_a_half_written_checkpoint_and_a_torn_metrics_line_do_not_break_resume(tmp_path):
    cfg = config.load_config(overrides=[
        "models.selected_model=tiny-bert", "datasets.synthetic_only=true", "tasks.n_way=3",
        "tasks.k_shot=2", "tasks.q_query=2", "models.max_length=16",
        "meta_learning.default_meta_batch_size=2", "meta_learning.inner.default_num_steps=1",
        "memory_optimization.hessian_approximation.method=none", "training.save_every=1",
        "tracking.mlflow=false", "tracking.tensorboard=false", "meta_learning.num_iterations=2",
        f"training.output_dir={tmp_path}"])
    run = runs.prepare_run_dir(tmp_path, "melora", overwrite=False, resume=False)
    trainer.run_training(cfg, run)
    # What a kill during iteration 3's writes leaves: a temp file and half a JSON line.
    partial = run / "checkpoints" / ".checkpoint_iter_3.pt.k2j4x9.tmp"
    partial.write_bytes(b"PK\x03\x04 garbage from a write cut short")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 3, "meta_lo')
    assert trainer.latest_checkpoint(run).name == "checkpoint_iter_2.pt"
    summary = trainer.run_training(trainer.resume_config(trainer.latest_checkpoint(run), None,
                                                         {"meta_learning.num_iterations": 3}),
                                   run, resume=trainer.latest_checkpoint(run))
    assert runs.load_checkpoint(summary["last_checkpoint"])["iteration"] == 3
    assert not partial.exists()
    assert [json.loads(line)["iteration"] for line in
            (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# ---- CUDA out of memory (simulated on CPU) ---------------------------------------------------

@pytest.fixture
def oom_above(monkeypatch):
    """compute_meta_gradient raises CUDA's out-of-memory error above a micro-batch size."""
    real, seen = trainer.compute_meta_gradient, []

    def fake(*args, micro_batch=0, **kwargs):
        seen.append(micro_batch)
        if micro_batch == 0 or micro_batch > fake.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, micro_batch=micro_batch, **kwargs)
    fake.limit, fake.seen = 2, seen
    monkeypatch.setattr(trainer, "compute_meta_gradient", fake)
    return fake


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_oom_halves_the_micro_batch_logs_it_and_keeps_it(oom_above, tmp_path, capsys):
    records = _Records()
    logging.getLogger("melora").addHandler(records)
    argv = [*TINY, "--num_iterations", "2", "--output_dir", str(tmp_path),
            "--set", "memory_optimization.gradient_accumulation.default_micro_batch=0"]
    try:
        assert main.main(argv) == 0, capsys.readouterr().err
    finally:
        logging.getLogger("melora").removeHandler(records)
    # 0 = whole sets of 3 x 2 examples: 6 -> 3 -> 1, then 1 for the rest of the run.
    assert [m for m in records.messages if "out of memory" in m] == [
        "iteration 1: CUDA out of memory with micro-batch 6; retrying with micro-batch 3, kept "
        "for the rest of this run (start there with --set "
        "memory_optimization.gradient_accumulation.default_micro_batch=3)",
        "iteration 1: CUDA out of memory with micro-batch 3; retrying with micro-batch 1, kept "
        "for the rest of this run (start there with --set "
        "memory_optimization.gradient_accumulation.default_micro_batch=1)"]
    assert oom_above.seen == [0, 3, 1, 1, 1, 1]  # two tasks per iteration, two iterations
    assert (tmp_path / "melora" / "checkpoints" / "checkpoint_iter_2.pt").is_file()


@pytest.mark.parametrize("extra", [["--set", "memory_optimization.auto_micro_batch=false"],
                                   ["--set", "memory_optimization.gradient_accumulation.default_micro_batch=1"]])
def test_oom_that_cannot_be_retried_names_the_settings_to_lower(oom_above, tmp_path, capsys, extra):
    oom_above.limit = 0  # nothing fits
    assert main.main([*TINY, "--num_iterations", "2", "--output_dir", str(tmp_path), *extra]) == 2
    line = error_line(capsys.readouterr().err)
    for fragment in ("CUDA out of memory at iteration 1", "Tried to allocate 2.00 GiB",
                     "--meta_batch_size", "default_micro_batch", "--lora_rank", "--inner_steps",
                     "auto_micro_batch=true"):
        assert fragment in line, (fragment, line)
    assert not (tmp_path / "melora").exists()  # nothing to resume: no folder left to refuse


def test_oom_chosen_micro_batch_is_checkpointed_and_used_on_resume(oom_above, tmp_path, capsys):
    argv = [*TINY, "--num_iterations", "2", "--output_dir", str(tmp_path),
            "--set", "memory_optimization.gradient_accumulation.default_micro_batch=0"]
    assert main.main(argv) == 0, capsys.readouterr().err
    last = tmp_path / "melora" / "checkpoints" / "checkpoint_iter_2.pt"
    saved = json.loads(runs.load_checkpoint(last)["config"])
    assert saved["memory_optimization"]["gradient_accumulation"]["default_micro_batch"] == 1
    oom_above.seen.clear()
    assert main.main(["--resume", str(last), "--num_iterations", "3"]) == 0, capsys.readouterr().err
    assert oom_above.seen == [1, 1]  # the third iteration's two tasks, no out-of-memory retry
