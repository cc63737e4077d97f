"""The accuracy study's data: the repository's class-split configs as loader sources.

HWU64 and CLINC150 ship with the 5 ProtAugment class splits, and `configs/hwu64.yml` and
`configs/clinc150_split01.yml` read split 01 through `classes_file` sources (meta-train,
meta-val and meta-test classes exactly as the label files say; JSON lines and CLINC150's
pairs file are read without the `datasets` package, which the GPU machine lacks). The study
takes those configs' `datasets` sections, points them at the split it asks for, and makes
their paths absolute so any working directory works.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"hwu64": REPO / "configs" / "hwu64.yml", "clinc150": REPO / "configs" / "clinc150_split01.yml"}
SPLITS = ("meta_train", "meta_val", "meta_test")


def class_split_sources(data: str, split: str) -> dict:
    """`datasets.*` config overrides reading `data`'s class split `split` (e.g. "01").

    Args:
        data: "hwu64" or "clinc150".
        split: the class split's folder name under `data/<data>/splits/`.

    Raises:
        UserError: an unknown dataset or split (names the ones that exist).
    """
    import yaml

    from utils import UserError
    if data not in CONFIGS:
        raise UserError(f"unknown study dataset {data!r}; choose from {', '.join(CONFIGS)}")
    splits = REPO / "data" / data / "splits"
    if not (splits / split).is_dir():
        have = sorted(p.name for p in splits.iterdir() if p.is_dir())
        raise UserError(f"{data} has no class split {split!r}; it has {', '.join(have)}")
    sections = yaml.safe_load(CONFIGS[data].read_text())["datasets"]
    out = {}
    for s in SPLITS:
        entries = []
        for entry in sections[s]:
            entry = dict(entry)
            entry["source"] = str(REPO / entry["source"])
            entry["classes_file"] = str(REPO / entry["classes_file"].replace("/splits/01/", f"/splits/{split}/"))
            entries.append(entry)
        out[f"datasets.{s}"] = entries
    return out
