"""Run folders and checkpoint files: one owner for each.

A run folder (`<output_dir>/<experiment_name>`) is opened by `open_run_dir`, which refuses
to mix or lose runs, and settled by `close_run_dir` when its command ends. A checkpoint is
one `torch.save` archive written atomically by `save_checkpoint` and read back by the one
reader, `load_checkpoint`, which checks the one list of keys every checkpoint holds
(`CHECKPOINT_KEYS`); `saved_config` reads the config it recorded. What a checkpoint holds
is written by `trainer.MetaTrainer.state_dict`; how its config meets this command's is
`config.checkpoint_config`.

    folder = open_run_dir("runs", "melora", overwrite=False, resume=False)
    save_checkpoint(folder.path / "checkpoints" / "checkpoint_iter_1.pt", state)
    state = load_checkpoint(folder.path / "checkpoints" / "checkpoint_iter_1.pt")
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from utils import UserError, atomic_write_bytes, atomic_write_json

log = logging.getLogger("melora")


CHECKPOINT_FORMAT = "melora-checkpoint"
# What every checkpoint holds (all written by `trainer.MetaTrainer.state_dict`): what
# `--resume` continues from, and what evaluation and adapt rebuild the model from.
CHECKPOINT_KEYS = ("config", "theta", "inner_lr", "optimizer", "iteration", "nonfinite_streak")
# Written into every run folder MELoRA creates; `--overwrite` replaces only a folder
# holding it, so a mistyped --output_dir or --experiment_name cannot delete user files.
RUN_MARKER = ".melora-run"
# The files that show a run has started (its inputs were read and work was saved).
# A failure once one of these exists keeps the folder (adapt's predictions.csv too).
_STARTED_GLOBS = ("checkpoints/*.pt", "results*.json", "hpo_trials.json", "predictions.csv")
_NAME_MAX_BYTES = 255  # NAME_MAX of the common file systems
# The checkpoint format's version, written into every checkpoint by `save_checkpoint`.
# `load_checkpoint` brings an older one up to date through `_MIGRATIONS`, one step per
# version, and refuses a newer one. History:
#   1 (to release 33): the config recorded only the keys that existed when it was written;
#   2: the recorded config names every model-defining key (version 1's are filled in).
CHECKPOINT_VERSION = 2
# What a checkpoint saved before a model-defining key existed meant by it: its behaviour then,
# not today's default. Without this, config layering filled in today's default (the cosine
# head) and the checkpoint's Euclidean head was refused as "another model".
PRE_KEY_VALUES = {("meta_learning", "head"): "euclidean"}


@dataclass(frozen=True)
class RunFolder:
    """A run folder opened by `open_run_dir`; `close_run_dir` settles it at the end.

    Attributes:
        path: the run folder.
        created: this command created it (it did not exist, or was empty).
        existed: the folder existed before (empty); a failed start empties it again
            instead of removing it.
        set_aside: a hidden `.replaced-*` folder holding what `--overwrite` moved away
            (the earlier run, or its evaluation files), put back or deleted by
            `close_run_dir`; None when nothing was replaced.
        before: the checkpoints and results already there, `(path, mtime_ns)`, so a
            failure can tell whether this command saved any.
    """
    path: Path
    created: bool
    set_aside: Path | None = None
    before: tuple = ()
    existed: bool = False


def prepare_run_dir(output_dir: str | os.PathLike, experiment_name: str, overwrite: bool,
                    resume: bool, protect: Iterable[str] = ()) -> Path:
    """`open_run_dir(...).path`: the run folder, for callers that manage no failure."""
    return open_run_dir(output_dir, experiment_name, overwrite, resume, protect).path


def open_run_dir(output_dir: str | os.PathLike, experiment_name: str, overwrite: bool,
                 resume: bool, protect: Iterable[str] = (), replace: Iterable[str] = (),
                 checkpoint: str | os.PathLike | None = None,
                 reserved: Iterable[str | os.PathLike] = ()) -> RunFolder:
    """Check, then open `<output_dir>/<experiment_name>`, refusing to mix or lose runs.

    Every check runs before anything on disk changes, and `--overwrite` deletes nothing
    here: it moves the earlier run (only a folder holding `RUN_MARKER`) into a hidden
    `.replaced-*` folder beside it. `close_run_dir` deletes that once the new run has
    started, or puts it back when the new run failed before saving anything.

    Args:
        output_dir: parent of every run folder (`training.output_dir`).
        experiment_name: the run's folder name (`training.experiment_name`).
        overwrite: replace an existing run (`--overwrite`).
        resume: continue in an existing folder (`--resume`, `--mode evaluate`).
        protect: files this command writes (e.g. `results.json` of `--mode evaluate`):
            a folder already holding one is refused unless `overwrite`.
        replace: with `resume` and `overwrite`, the earlier outputs to set aside (e.g.
            `results.json` and the episode spec); the rest of the folder stays.
        checkpoint: with `resume`, the checkpoint continued; an existing, non-empty run
            folder must be the one holding it.
        reserved: folders a run folder must not be or lie inside (the token cache).

    Returns:
        The RunFolder; a folder this command created holds `RUN_MARKER`.

    Raises:
        UserError: a name that is not a plain folder name, an output_dir that is a file
            or cannot be written, another run's folder given to `--resume`, an existing
            run without `--overwrite`, or a folder to overwrite MELoRA did not create.
    """
    _check_experiment_name(experiment_name)
    output_dir = Path(output_dir)
    run_dir = output_dir / experiment_name
    _check_output_dir(output_dir)
    for folder in map(Path, reserved):
        if run_dir.resolve() == folder.resolve() or folder.resolve() in run_dir.resolve().parents:
            raise UserError(f"run folder {str(run_dir)!r} is the tokenisation cache "
                            f"({str(folder)!r}); pass another --experiment_name")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run folder {str(run_dir)!r} exists and is a file; pass another "
                        "--experiment_name or --output_dir")
    holds = run_dir.is_dir() and any(run_dir.iterdir())
    if holds and resume and checkpoint is not None:
        _check_resume_folder(run_dir, Path(checkpoint))
    if holds and not resume and not overwrite:
        raise UserError(f"run folder {str(run_dir)!r} already holds a run; pass --overwrite "
                        "to replace it, --resume CHECKPOINT to continue it, or another "
                        "--experiment_name")
    existing = [name for name in protect if (run_dir / name).exists()]
    if existing and not overwrite:
        raise UserError(f"run folder {str(run_dir)!r} already holds {', '.join(existing)} of an "
                        "earlier run; pass --overwrite to replace it, or another "
                        "--experiment_name to keep both")
    outputs = [run_dir / name for name in replace if (run_dir / name).exists()] if resume else []
    if overwrite and (outputs or holds and not resume):
        _check_marker(run_dir)
    # Every check passed: only now does anything on disk change.
    set_aside, existed = None, run_dir.is_dir() and not holds
    if overwrite and holds and not resume:
        set_aside, holds = _set_aside([run_dir], output_dir), False
    elif overwrite and outputs:
        set_aside = _set_aside(outputs, run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not holds:
            atomic_write_json(run_dir / RUN_MARKER, {"format": RUN_MARKER, "pid": os.getpid()})
    except OSError as e:
        close_run_dir(RunFolder(run_dir, not holds, set_aside, (), existed), ok=False)  # undo
        raise UserError(f"cannot create run folder {str(run_dir)!r} ({e.strerror}); pass an "
                        "--output_dir you can write to") from e
    return RunFolder(run_dir, not holds, set_aside, _saved_files(run_dir), existed)


def close_run_dir(folder: RunFolder, ok: bool) -> None:
    """Settle a folder of `open_run_dir` when its command ends (call it on rank 0).

    After success, or a failure once this command saved a checkpoint or results, what
    `--overwrite` set aside is deleted. After a failure before that (a failed start,
    whatever the error), a folder this command created is removed, so the corrected
    command is not refused as a rerun, and what was set aside is put back.

    Args:
        folder: the RunFolder of this command.
        ok: whether the command succeeded.
    """
    import shutil
    _close_log_files(folder.path)  # this command's log file is complete
    started = set(_saved_files(folder.path)) - set(folder.before)
    if ok or started:
        if folder.set_aside is not None:
            shutil.rmtree(folder.set_aside, ignore_errors=True)
        return
    if folder.created:
        shutil.rmtree(folder.path, ignore_errors=True)
        if folder.existed:  # the user's empty folder: leave it as it was
            folder.path.mkdir(exist_ok=True)
    if folder.set_aside is not None:
        for item in folder.set_aside.iterdir():  # back where it was: the aside's parent
            target = folder.set_aside.parent / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(item, target)
        folder.set_aside.rmdir()


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder MELoRA created as a run folder (it holds `RUN_MARKER`)."""
    return (Path(path) / RUN_MARKER).is_file()


def _check_experiment_name(name: str) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or "\0" in name or \
            Path(name).name != name or "/" in name or os.sep in name:
        raise UserError(f"experiment name {name!r} must be a plain folder name (not '.' or "
                        "'..', no '/'); set it with --experiment_name")
    if len(os.fsencode(name)) > _NAME_MAX_BYTES:
        raise UserError(f"experiment name {name[:40]!r}... is {len(os.fsencode(name))} bytes; "
                        f"a folder name holds at most {_NAME_MAX_BYTES}: pass a shorter "
                        "--experiment_name")


def _check_output_dir(output_dir: Path) -> None:
    """output_dir, or the nearest of its parents that exists, must be a writable folder."""
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(f"output_dir {str(output_dir)!r}: {str(existing)!r} is a file, not a "
                        "folder; pass another --output_dir")
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output_dir {str(output_dir)!r}: cannot write to {str(existing)!r} "
                        "(permission denied); pass an --output_dir you can write to")


def _check_resume_folder(run_dir: Path, checkpoint: Path) -> None:
    """A resumed run continues in the checkpoint's own folder, never in another run's."""
    home = checkpoint.resolve().parent
    home = home.parent if home.name == "checkpoints" else home
    if run_dir.resolve() != home:
        raise UserError(f"run folder {str(run_dir)!r} holds another run than checkpoint "
                        f"{str(checkpoint)!r} (of {str(home)!r}); resume without "
                        "--experiment_name/--output_dir to continue in the checkpoint's "
                        "folder, or name a new folder")


def _check_marker(run_dir: Path) -> None:
    if not is_run_folder(run_dir):
        raise UserError(f"--overwrite replaces only run folders MELoRA created (they hold "
                        f"{RUN_MARKER}); {str(run_dir)!r} does not, so nothing was deleted: "
                        "pass another --experiment_name or --output_dir, or move that "
                        "folder away yourself")


def _set_aside(paths: list[Path], parent: Path) -> Path:
    """Move `paths` into a new hidden folder in `parent` (renames: nothing is copied)."""
    aside = Path(tempfile.mkdtemp(prefix=".replaced-", dir=parent))
    for path in paths:
        os.replace(path, aside / path.name)
    log.info("--overwrite: %s set aside in %s until the new run has started",
             ", ".join(p.name for p in paths), aside)
    return aside


def _saved_files(run_dir: Path) -> tuple:
    """`(path, mtime_ns)` of every checkpoint and results file of `run_dir`."""
    return tuple(sorted((str(p), p.stat().st_mtime_ns) for pattern in _STARTED_GLOBS
                        for p in run_dir.glob(pattern)))


def _close_log_files(run_dir: Path) -> None:
    """Close the log handlers writing into `run_dir` (before it is removed)."""
    for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)
                    and Path(h.baseFilename).parent == run_dir.resolve()]:
        log.removeHandler(handler)
        handler.close()


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write `state` (tensors, numbers, strings, lists, dicts) as ONE file, atomically.

    The file is a `torch.save` archive written to a temporary file, fsynced and renamed
    over `path`, so a crash leaves the old checkpoint or the new one, never a part.

    Args:
        path: the checkpoint file (parents are created).
        state: what to save; `format` and `version` (`CHECKPOINT_VERSION`) are added so
            `load_checkpoint` recognises the file and knows its layout.

    Returns:
        `path` as a Path.

    Raises:
        UserError: the file could not be written (disk full, read-only, ...); the
            checkpoints written before are intact.
    """
    import io
    buffer = io.BytesIO()
    torch.save({**state, "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as e:
        raise UserError(f"cannot write checkpoint {str(path)!r} ({e.strerror or e}); the "
                        "checkpoints written before it are intact (writes are atomic): free "
                        "disk space, then continue from the newest with --resume") from e
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by `save_checkpoint`, onto the CPU, executing no code.

    `torch.load(weights_only=True)` accepts only tensors and plain containers, so a file
    carrying pickled code is refused instead of run. A checkpoint of an older format
    version is migrated to `CHECKPOINT_VERSION` in memory (the file is not touched).

    Args:
        path: the checkpoint file.

    Returns:
        The saved state.

    Raises:
        UserError: the file is missing, truncated, not a torch archive, holds objects
            other than tensors and plain data, is not a MELoRA checkpoint, or lacks one
            of `CHECKPOINT_KEYS`, or was written by a newer MELoRA; each message names
            the path.
    """
    import pickle
    import zipfile
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {str(path)!r} is a folder; pass one of the "
                        "checkpoints/checkpoint_iter_N.pt files of a training run")
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist; pass the path of a "
                        "checkpoints/checkpoint_iter_N.pt file of a training run")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; text, cut-off files fail here
        raise UserError(f"checkpoint {str(path)!r} is truncated or not a torch checkpoint (no "
                        "torch.save archive); use another checkpoint of the run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"checkpoint {str(path)!r} holds objects other than tensors and plain "
                        "data, so it was refused (loading never executes code); use a "
                        "checkpoint written by MELoRA") from e
    except Exception as e:  # torch.load fails in many ways on a file it cannot parse
        raise UserError(f"checkpoint {str(path)!r} is truncated or not a torch checkpoint "
                        f"({type(e).__name__}: {(str(e) or '-').splitlines()[0][:200]}); use "
                        "another checkpoint of the run") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {str(path)!r} is a torch file but not a MELoRA "
                        "checkpoint; pass a checkpoints/checkpoint_iter_N.pt file written "
                        "by `python main.py --mode train`")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise UserError(f"checkpoint {str(path)!r} lacks {', '.join(missing)}; it was not "
                        "written by `python main.py --mode train`, or was edited: pass "
                        "another checkpoint of the run")
    version = state.get("version", 1)  # version 1 did not always write its number
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"checkpoint {str(path)!r} has format version {version!r}, which no "
                        "MELoRA wrote; pass another checkpoint of the run")
    if version > CHECKPOINT_VERSION:
        raise UserError(f"checkpoint {str(path)!r} has format version {version}, newer than "
                        f"this MELoRA reads ({CHECKPOINT_VERSION}); upgrade MELoRA (pip install "
                        "-U the project's requirements and pull its code) to read it")
    for step in range(version, CHECKPOINT_VERSION):
        state = _MIGRATIONS[step](state, path)
    return {**state, "version": CHECKPOINT_VERSION}


def _fill_pre_key_values(state: dict, path: Path) -> dict:
    """Version 1 -> 2: write the meaning of every model-defining key the config lacks."""
    saved = saved_config(state, path)
    for (section, key), value in PRE_KEY_VALUES.items():
        if isinstance(saved.get(section), dict) and key not in saved[section]:
            saved[section][key] = value
    return {**state, "config": json.dumps(saved)}


_MIGRATIONS = {1: _fill_pre_key_values}  # version N -> N + 1


def saved_config(state: Mapping, checkpoint) -> dict:
    """The config a checkpoint recorded, as nested dicts.

    Raises:
        UserError: the record is not a JSON mapping (an edited or foreign checkpoint).
    """
    try:
        saved = json.loads(state["config"])
    except (TypeError, ValueError) as e:
        raise UserError(f"checkpoint {str(checkpoint)!r} holds no readable config ({e}); pass "
                        "another checkpoint of the run") from e
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint {str(checkpoint)!r} holds no readable config; pass "
                        "another checkpoint of the run")
    return saved

