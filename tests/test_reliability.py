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
def checkpoint(tmp_path_factory):
    """A one-iteration tiny-bert checkpoint (3-way), trained through the CLI."""
    out = tmp_path_factory.mktemp("train")
    assert main.main(["--mode", "train", "--model", "tiny-bert", "--num_iterations", "1",
                      "--output_dir", str(out), "--experiment_name", "run", *sets(TINY)]) == 0
    return out / "run" / "checkpoints" / "checkpoint_iter_1.pt"


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
