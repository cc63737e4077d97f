"""Shared fixtures: tiny random models (offline), the real CLINC150 files, determinism."""

import functools
import inspect
import os
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One thread: tiny models gain nothing from two, and tests that start child processes
# (torchrun, the CLI) must not oversubscribe a 2-core machine.
torch.set_num_threads(1)

CLINC_DIR = REPO / "data" / "clinc150"
TINY_MODELS = ["tiny-gpt2", "tiny-bert", "tiny-distilbert", "tiny-t5"]


@pytest.fixture(autouse=True)
def melora_log_reaches_caplog(monkeypatch):
    """utils.setup_logging (run by CLI tests) stops the melora logger's propagation to the
    root logger that caplog reads; every test starts with it on again."""
    import logging
    monkeypatch.setattr(logging.getLogger("melora"), "propagate", True)


@pytest.fixture
def clinc_dir() -> Path:
    assert (CLINC_DIR / "data_full.json").is_file(), f"CLINC150 expected at {CLINC_DIR}"
    return CLINC_DIR


def make_batch(tokenizer, texts, labels, dtype_long=torch.long):
    """A right-padded batch dict with labels, as the episode pipeline produces."""
    batch = dict(tokenizer(list(texts), padding=True, truncation=True, max_length=32,
                           return_tensors="pt"))
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": torch.tensor(labels, dtype=dtype_long)}


@pytest.fixture(scope="session")
def train_tiny(tmp_path_factory):
    """`train_tiny(items)`: a one-iteration tiny-bert checkpoint trained through the CLI with
    `--set` items, made once per distinct list in a session (test_adapt, test_evaluation and
    test_reliability share them instead of each training its own)."""
    made = {}

    def train(items) -> Path:
        key = tuple(items)
        if key not in made:
            import main
            out = tmp_path_factory.mktemp("train")
            sets = [arg for item in items for arg in ("--set", item)]
            assert main.main(["--mode", "train", "--model", "tiny-bert", "--num_iterations", "1",
                              "--output_dir", str(out), "--experiment_name", "run", *sets]) == 0
            made[key] = out / "run" / "checkpoints" / "checkpoint_iter_1.pt"
        return made[key]
    return train



# ---- the e2e marker ---------------------------------------------------------------------
# A test is `e2e` when it runs a MELoRA command as a user would, `main.main(argv)` in this
# process or a child process (`python main.py`, torchrun, a benchmark script), or uses what
# such a run made: directly, through a helper function of its own module, or through a
# fixture (the shared `train_tiny` checkpoints, a benchmark's smoke run). `pytest -m "not
# e2e"` runs the rest: the unit and property tests of each module.
_LAUNCHES = re.compile(r"\bmain\.main\(|\bsubprocess\.(?:run|Popen|call|check_call|check_output)\("
                       r"|\bPopen\(")
_CALLS = re.compile(r"\b([A-Za-z_]\w*)\(")


def launches_a_run(function, module, seen=None) -> bool:
    """Whether `function`'s source, or a function of `module` it calls, launches a run."""
    seen = set() if seen is None else seen
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    if _LAUNCHES.search(source):
        return True
    for name in _CALLS.findall(source):
        helper = getattr(module, name, None)
        if (name not in seen and inspect.isfunction(helper)
                and helper.__module__ == module.__name__):
            seen.add(name)
            if launches_a_run(helper, module, seen):
                return True
    return False


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: runs a MELoRA command end to end (main.main, "
                            "python main.py, torchrun or a benchmark script); deselect with "
                            "-m 'not e2e'")


@functools.cache
def _launches(function, module) -> bool:
    """`launches_a_run`, once per test or fixture function (fixtures are shared by many tests,
    and every xdist worker collects the whole suite)."""
    return launches_a_run(function, module)


def pytest_collection_modifyitems(config, items):
    for item in items:
        function = getattr(item, "function", None)
        if function is None:
            continue
        fixtures = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        ours = [definitions[-1].func for definitions in fixtures.values() if definitions]
        ours = [(f, sys.modules[f.__module__]) for f in ours  # the suite's fixtures, not pytest's
                if f.__module__ == "conftest" or f.__module__.startswith("test_")]
        if any(_launches(f, module) for f, module in [(function, item.module), *ours]):
            item.add_marker(pytest.mark.e2e)
