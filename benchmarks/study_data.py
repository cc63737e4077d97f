"""The accuracy study's data: the shipped class splits as loader sources, without `datasets`.

HWU64 (`data/hwu64/full.jsonl`) and CLINC150 (`data/clinc150/data_full.json`) ship with the
5 ProtAugment class splits (`splits/0N/labels.{train,valid,test}.txt`). The study reads them
through `dataset_loader` as a CLINC150-style pairs file (`{"all": [[text, label], ...]}`)
and a group file (`{"train": [...], "valid": [...], "test": [...]}`) written once under the
work folder: the pairs reader needs no `datasets` package (absent on the GPU machine), and
the group file keeps meta-train, meta-val and meta-test classes disjoint, as the split says.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"hwu64": REPO / "data" / "hwu64", "clinc150": REPO / "data" / "clinc150"}
SPLIT_GROUPS = {"meta_train": "train", "meta_val": "valid", "meta_test": "test"}


def class_split_sources(data: str, split: str, work: Path) -> dict:
    """`datasets.*` config overrides reading `data`'s class split `split` (e.g. "01").

    Args:
        data: "hwu64" or "clinc150".
        split: the class split's folder name under `data/<data>/splits/`.
        work: where the pairs and group files are written (once; atomically).

    Raises:
        UserError: an unknown dataset or split (names the ones that exist).
    """
    from utils import UserError, atomic_write_json
    if data not in DATASETS:
        raise UserError(f"unknown study dataset {data!r}; choose from {', '.join(DATASETS)}")
    folder = DATASETS[data] / "splits" / split
    if not folder.is_dir():
        have = sorted(p.name for p in (DATASETS[data] / "splits").iterdir() if p.is_dir())
        raise UserError(f"{data} has no class split {split!r}; it has {', '.join(have)}")
    out = work / "data"
    pairs, groups = out / f"{data}_pairs.json", out / f"{data}_split{split}_groups.json"
    if not pairs.is_file():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(pairs, {"all": _rows(data)})
    if not groups.is_file():
        atomic_write_json(groups, {g: _labels(folder / f"labels.{g}.txt") for g in SPLIT_GROUPS.values()})
    return {f"datasets.{s}": [{"source": str(pairs), "config": "", "split": "all", "text_column": "text",
                               "label_column": "label", "group_file": str(groups), "groups": [g],
                               "weight": 1.0}]
            for s, g in SPLIT_GROUPS.items()}


def _rows(data: str) -> list[list[str]]:
    """Every in-scope [text, label] pair of `data`."""
    if data == "hwu64":
        lines = (DATASETS[data] / "full.jsonl").read_text(encoding="utf-8").splitlines()
        return [[r["sentence"], r["label"]] for r in map(json.loads, filter(str.strip, lines))]
    full = json.loads((DATASETS[data] / "data_full.json").read_text(encoding="utf-8"))
    return [list(row) for part in ("train", "val", "test") for row in full[part]]  # oos_* excluded


def _labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
