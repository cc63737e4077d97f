"""Few-shot episodes from real text-classification datasets and the synthetic generator.

Sources (config.yml, section `datasets`; each of `meta_train`, `meta_val`, `meta_test` is a
list of sources mixed by `weight`):

- a Hugging Face hub dataset (`clinc_oos` with config `plus`, `banking77`, ...), loaded
  with `datasets.load_dataset`; offline it fails at once, naming `--synthetic_only` and
  `--dataset PATH`;
- a local `csv` or JSON-lines file (`.jsonl`, or `.json` with one object a line; every cell
  read as a string), a `json` or `parquet` table (read by `datasets`), or a JSON object
  of split -> `[[text, label], ...]` (CLINC150's `data_full.json`; `split` picks the key);
  relative paths resolve against the current working directory;
- `custom:NAME`: whatever a subclass's `_load_custom_task(NAME)` returns;
- the synthetic generator (`synthetic_weight`, or everything with `synthetic_only`).

Classes: a source with `groups` takes the classes of those groups of its `group_file`
(a JSON class-to-group map such as CLINC150's `domains.json`, a path or an http(s) URL).
A source with a `classes_file` (a text file, one class name a line, such as the standard
few-shot class splits `data/hwu64/splits/01/labels.train.txt`) takes exactly those classes;
a name the data lacks, or an empty file, is an error. A source with neither named by several meta-splits has its classes (or, with a
`group_file`, its groups) split at random, seeded, disjoint, by `class_split`. Meta-train,
meta-validation and meta-test classes of one source never overlap (checked).

With `tasks.within_group: true` an episode first draws one group (domain) of its source's
`group_file`, uniformly among the groups with at least `n_way` usable classes, then its N
classes from that group: fine-grained episodes (synthetic tasks are unchanged).

Each source split is tokenised once (batched, fast tokenizer) and cached as `.npy` files
under `cache_dir`, keyed by tokenizer, `max_length` and a hash of the data. An episode is a
pure function of `(seed, split, index)`:

    loader = DatasetLoader(cfg.datasets, cfg.tasks, cfg.synthetic, tokenizer,
                           max_length=cfg.models.max_length, cache_dir="results/cache", seed=42)
    ep = loader.episode("meta_train", iteration * meta_batch_size + task_index)
    ep.support["input_ids"].shape  # (N*K, T), padded to the longest support example
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import socket
import tempfile
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np
import torch

from config import Config
from synthetic_data_generator import SyntheticTaskGenerator, TextTask
from utils import ConfigError, UserError, atomic_write_bytes, atomic_write_json

log = logging.getLogger("melora.data")

SPLITS = ("meta_train", "meta_val", "meta_test")
SYNTHETIC = "synthetic"
CUSTOM_PREFIX = "custom:"
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPEC_FORMAT = "melora-episodes/1"
CACHE_VERSION = 1             # bump when the cache layout changes
HUB_PROBE_TIMEOUT_S = 3.0     # a hub that does not answer within this is taken as offline
TOKENIZE_BATCH = 2048         # texts per tokenizer call
_CLASS_SPLIT_STREAM = 1_000   # seed-stream tags, so class splits and episodes never share
_SYNTHETIC_STREAM = 2_000     # random numbers with each other or with the generator
_OFFLINE_HINT = ("To work offline, run with --synthetic_only, or point MELoRA at a local "
                 "file with --dataset PATH (csv, json, jsonl, parquet, or CLINC150's "
                 "data_full.json) and, for evaluation, --eval_dataset PATH.")


class DataError(UserError):
    """Unusable data: a missing column or split, a class too small, too few classes."""


@dataclass
class Episode:
    """One N-way K-shot task, tokenised.

    Attributes:
        support: `input_ids` and `attention_mask` (long, (N*K, T)) and `labels` (long,
            (N*K,)); padded to the longest support example, not to `max_length`.
        query: the same for the N*Q query examples, (N*Q, T').
        n_way: N.
        classes: class names; `classes[label]` names an episode label.
        source: the source's name (`clinc_oos/plus:train`, a file path with its split,
            `custom:NAME`) or `"synthetic"`.
    """

    support: dict[str, torch.Tensor]
    query: dict[str, torch.Tensor]
    n_way: int
    classes: list[str]
    source: str


@dataclass(frozen=True)
class _Source:
    """One entry of a meta-split's source list, normalised."""

    source: str
    config: str
    split: str
    text_column: str
    label_column: str
    group_file: str
    groups: tuple[str, ...]
    weight: float
    classes_file: str = ""

    @property
    def name(self) -> str:
        config = f"/{self.config}" if self.config and self.kind == "hub" else ""
        return f"{self.source}{config}:{self.split}"

    @property
    def kind(self) -> str:
        if self.source.startswith(CUSTOM_PREFIX):
            return "custom"
        path = Path(self.source)
        return "file" if path.suffix.lower() in FILE_BUILDERS or path.exists() else "hub"

    @property
    def table_key(self) -> tuple:
        """Entries with the same key read the same rows."""
        return (self.source, self.config, self.split, self.text_column, self.label_column)

    @property
    def identity(self) -> tuple:
        """Entries with the same identity share one class universe (any split)."""
        return (self.source, self.config, self.label_column)


@dataclass
class _Table:
    """One source split: a label per row and, once tokenised, ragged token ids."""

    name: str
    fingerprint: str
    label_names: list[str]          # class names, index = row label id
    labels: np.ndarray              # (rows,) int64
    offsets: np.ndarray | None = None    # (rows + 1,) int64 into input_ids
    input_ids: np.ndarray | None = None  # (total tokens,) int32
    texts: list[str] | None = None       # kept only until tokenised

    def ids(self, row: int) -> np.ndarray:
        return self.input_ids[self.offsets[row]:self.offsets[row + 1]]


@dataclass
class _Pool:
    """The classes one source offers to one meta-split."""

    table: _Table | None            # None for the synthetic generator
    classes: list[int]              # eligible label ids of `table`
    rows: dict[int, np.ndarray]     # label id -> row indices
    weight: float
    groups: list[tuple[str, list[int]]] | None = None  # tasks.within_group: (group, label ids)


class DatasetLoader:
    """Builds seeded N-way K-shot episodes for meta-train, meta-val and meta-test.

    Everything that can be checked is checked in the constructor, before tokenising:
    sources, columns, groups, class sizes, and that each split has at least `n_way`
    classes. Tokenisation of uncached sources comes last.

    The loader is a facade over three collaborators: `_SourceReader` (sources -> tables ->
    the classes each meta-split may use), `_TokenCache` (tokenisation and its on-disk cache)
    and `_EpisodeSampler` (episode plans, tokenised episodes, episode specs).

    Args:
        datasets_cfg: the `datasets` config section.
        tasks_cfg: the `tasks` config section (`n_way`, `k_shot`, `q_query`).
        synthetic_cfg: the `synthetic` config section.
        tokenizer: a Hugging Face tokenizer (a fast one tokenises much faster).
        max_length: tokens per example; longer texts are truncated.
        cache_dir: folder of the tokenisation cache (e.g. `<output_dir>/cache`).
        seed: seeds class splits and episodes.
        splits: the meta-splits to prepare; evaluation alone may pass `("meta_test",)`.

    Raises:
        ConfigError: an invalid `datasets` setting, naming the key.
        DataError: a missing file, column, split or group, a class with fewer than
            `k_shot + q_query` examples, or fewer than `n_way` classes in a split.
        UserError: a hub source while offline.

    Example:
        >>> loader = DatasetLoader(cfg.datasets, cfg.tasks, cfg.synthetic, tok, 64, "cache", 0)
        >>> ep = loader.episode("meta_train", 0)
        >>> ep.support["labels"].shape
        torch.Size([25])
    """

    def __init__(self, datasets_cfg, tasks_cfg, synthetic_cfg, tokenizer, max_length: int,
                 cache_dir, seed: int, splits: Sequence[str] = SPLITS):
        self.cfg = datasets_cfg
        self.n_way, self.k_shot, self.q_query = tasks_cfg.n_way, tasks_cfg.k_shot, tasks_cfg.q_query
        self.within_group = bool(tasks_cfg.within_group) if "within_group" in tasks_cfg else False
        self.synthetic_cfg = synthetic_cfg
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.cache_dir = Path(cache_dir)
        self.seed = int(seed)
        self.splits = tuple(splits)
        self._cache = _TokenCache(tokenizer, self.max_length, self.cache_dir)
        self.cache_stats = self._cache.stats   # tokenisation cache, per source split
        self.validate()
        shape = (self.n_way, self.k_shot, self.q_query)
        generators = {s: SyntheticTaskGenerator(synthetic_cfg, _synthetic_seed(self.seed, s))
                      for s in SPLITS}
        self._reader = _SourceReader(datasets_cfg, self.splits, shape, self.within_group,
                                     self.seed, self._cache, self._load_custom_task)
        self._tables = self._reader.tables   # source table key -> rows (and token ids)
        pools = self._reader.build_pools()
        self._cache.tokenize_pending(self._tables, self._reader.sources)
        self._sampler = _EpisodeSampler(pools, self._tables, generators, shape, self.seed,
                                        synthetic_cfg, tokenizer, self.max_length)

    @classmethod
    def from_config(cls, cfg: Config, tokenizer, splits: Sequence[str],
                    cache_dir: str | os.PathLike | None = None) -> "DatasetLoader":
        """The loader of a whole config: its datasets, tasks, synthetic and model length, seed
        `training.seed`; the token cache is `cache_dir`, else `datasets.cache_dir`, else
        ``<training.output_dir>/cache``."""
        cache = cache_dir or cfg.datasets.cache_dir or Path(cfg.training.output_dir) / "cache"
        return cls(cfg.datasets, cfg.tasks, cfg.synthetic, tokenizer, cfg.models.max_length,
                   cache, cfg.training.seed, splits=tuple(splits))

    @property
    def data_fingerprint(self) -> dict[str, str]:
        """{source split name: fingerprint of its data} of every table read (a file's
        SHA-256, a hub dataset's fingerprint); the synthetic generator is its config."""
        return {table.name: table.fingerprint for table in self._tables.values()}

    def validate(self) -> None:
        """Check the config and that named files exist; reads no data.

        Raises:
            ConfigError: a bad setting, naming the key and the fix.
            DataError: a named file does not exist.
        """
        _validate_datasets(self.cfg, self.splits, self.n_way)

    def episode(self, split: str, index: int) -> Episode:
        """Episode number `index` of `split`: a pure function of (seed, split, index).

        Args:
            split: `meta_train`, `meta_val` or `meta_test` (one this loader prepared).
            index: any integer >= 0; the trainer passes
                `iteration * meta_batch_size + task_index`.

        Returns:
            The tokenised episode; labels are a fresh permutation of the classes.

        Raises:
            UserError: `split` was not prepared or has no source.
        """
        return self._sampler.episode(split, index)

    def fixed_episodes(self, split: str, num: int, spec_path=None) -> list[Episode]:
        """The fixed evaluation list: episodes 0..num-1 of `split`.

        With `spec_path`, the list is read from that saved spec when the file exists (so a
        later run, or another method, evaluates on exactly the same episodes even if the
        config changed) and saved there otherwise.

        Args:
            split: usually `meta_test`.
            num: number of episodes (`evaluation.num_episodes`).
            spec_path: optional JSON spec file (see `save_episode_spec`).

        Returns:
            `num` episodes.

        Raises:
            UserError: a saved spec holds a different number of episodes or names data
                this loader does not have.
        """
        return self._sampler.fixed_episodes(split, num, spec_path)

    def save_episode_spec(self, split: str, num: int, path) -> None:
        """Write episodes 0..num-1 of `split` as a tokenizer-independent JSON spec.

        The spec names, per episode, the source, its data fingerprint, the class names and
        the row ids (position in the source split) of every support and query example in
        order, with their episode labels; synthetic episodes are stored as generator seed,
        index and config. `load_episode_spec` rebuilds them with any tokenizer.

        Args:
            split: the meta-split.
            num: number of episodes.
            path: the JSON file to write (atomically).
        """
        self._sampler.save_spec(split, num, path)

    def load_episode_spec(self, path) -> list[Episode]:
        """Rebuild the episodes of a spec written by `save_episode_spec`.

        Args:
            path: the spec file.

        Returns:
            The episodes, in order, tokenised with this loader's tokenizer.

        Raises:
            UserError: not a spec file, or it names a source this loader has not loaded
                or whose data changed since.
        """
        return self._sampler.load_spec(path)

    def split_classes(self, split: str) -> dict[str, list[str]]:
        """Source name -> the class names `split` samples from (synthetic excluded)."""
        return self._sampler.split_classes(split)

    def _plan(self, split: str, index: int) -> dict[str, Any]:
        """JSON-able description of episode `index`: source, classes, row ids, labels."""
        return self._sampler.plan(split, index)

    # --------------------------------------------------------------------------------
    # Extension point
    # --------------------------------------------------------------------------------

    def _load_custom_task(self, task_name: str) -> Dict[str, List]:
        """Rows of the source `custom:<task_name>`; override this in a subclass.

        Args:
            task_name: the part of the source name after `custom:`.

        Returns:
            `{"text": [str, ...], "label": [label, ...]}`, equally long; labels may be
            strings or integers (they become class names).

        Raises:
            ConfigError: always, in this base class.

        Example:
            >>> class MyLoader(DatasetLoader):
            ...     def _load_custom_task(self, task_name):
            ...         rows = read_my_rows(task_name)
            ...         return {"text": [r.text for r in rows], "label": [r.tag for r in rows]}
        """
        raise ConfigError(f"source 'custom:{task_name}' needs a DatasetLoader subclass that "
                          "overrides _load_custom_task; or use a hub name or file path")


# ------------------------------------------------------------------------------------
# Sources -> tables -> pools (class selection and checks)
# ------------------------------------------------------------------------------------

class _SourceReader:
    """Reads each source split once (from the token cache when it can) and picks, per
    meta-split, the classes episodes may draw: groups, `class_split`, class sizes,
    `tasks.within_group`, and that no class serves two meta-splits.

    Args:
        cfg: the `datasets` config section.
        splits: the meta-splits to prepare.
        shape: `(n_way, k_shot, q_query)`.
        within_group: `tasks.within_group`.
        seed: seeds the class splits.
        cache: the token cache, asked first for each source split; its folder also holds
            `datasets`' own cache (`hf/`) and downloaded group files (`groups/`).
        load_custom: the loader's `_load_custom_task` (for `custom:NAME` sources).
    """

    def __init__(self, cfg, splits: tuple[str, ...], shape: tuple[int, int, int],
                 within_group: bool, seed: int, cache: "_TokenCache",
                 load_custom: Callable[[str], Dict[str, List]]):
        self.cfg, self.splits, self.seed = cfg, splits, seed
        self.n_way, self.k_shot, self.q_query = shape
        self.within_group = within_group
        self.cache = cache
        self.load_custom = load_custom
        self.tables: dict[tuple, _Table] = {}       # table key -> rows
        self.sources: dict[tuple, _Source] = {}     # table key -> the entry first read
        self.group_maps: dict[str, dict[str, list[str]]] = {}

    def entries(self, split: str) -> list[_Source]:
        return _entries(self.cfg, split)

    def build_pools(self) -> dict[str, list[_Pool]]:
        """Per requested split, the weighted pools episodes draw from."""
        synthetic = _Pool(None, [], {}, 1.0)
        if self.cfg.synthetic_only:
            return {s: [synthetic] for s in self.splits}
        pools, small = {}, []
        for split in self.splits:
            pools[split] = [self._pool(split, e, small) for e in self.entries(split)]
            if split == "meta_train" and self.cfg.synthetic_weight > 0:
                pools[split].append(_Pool(None, [], {}, self.cfg.synthetic_weight))
        if small:
            warnings.warn(f"skipped {len(small)} class(es) with fewer than k_shot + q_query = "
                          f"{self.k_shot + self.q_query} examples (datasets.skip_small_classes): "
                          + ", ".join(small[:10]) + (" ..." if len(small) > 10 else ""))
        self._check_disjoint(pools)
        return pools

    def _pool(self, split: str, entry: _Source, small: list[str]) -> _Pool:
        """The eligible classes of `entry` for `split`, after the class-size checks."""
        table = self.table(entry)
        wanted = set(self._entry_classes(split, entry, table))
        counts = np.bincount(table.labels, minlength=len(table.label_names))
        needed = self.k_shot + self.q_query
        classes = []
        for label, name in enumerate(table.label_names):
            if name not in wanted:
                continue
            if counts[label] >= needed:
                classes.append(label)
            elif self.cfg.skip_small_classes:
                small.append(f"{name!r} ({counts[label]}, {table.name})")
            else:
                raise DataError(
                    f"class {name!r} of {table.name} has {counts[label]} examples but an "
                    f"episode needs k_shot + q_query = {needed}; lower --k_shot/--q_query, or "
                    "set datasets.skip_small_classes=true to skip such classes")
        if len(classes) < self.n_way:
            raise DataError(
                f"datasets.{split} source {table.name} offers {len(classes)} usable classes "
                f"but tasks.n_way is {self.n_way}; lower --n_way or give this split more "
                "classes (groups, class_split)")
        rows = {c: np.flatnonzero(table.labels == c) for c in classes}
        groups = self._within_groups(split, entry, table, classes) if self.within_group else None
        return _Pool(table, classes, rows, entry.weight, groups)


    def _within_groups(self, split: str, entry: _Source, table: _Table,
                       classes: list[int]) -> list[tuple[str, list[int]]]:
        """tasks.within_group: the groups of `entry` with at least n_way eligible classes."""
        if not entry.group_file:
            raise ConfigError(f"tasks.within_group draws each episode's classes from one group, "
                              f"but datasets.{split} source {table.name} has no group_file; set "
                              "its group_file (e.g. data/clinc150/domains.json) or "
                              "tasks.within_group=false")
        groups = self._group_map(entry)
        eligible = {table.label_names[c]: c for c in classes}
        out, small = [], []
        for name in (entry.groups or sorted(groups)):
            members = [eligible[c] for c in groups[name] if c in eligible]
            if len(members) >= self.n_way:
                out.append((name, members))
            elif members:
                small.append(f"{name} ({len(members)})")
        if not out:
            raise DataError(f"tasks.within_group: no group of datasets.{split} source "
                            f"{table.name} has tasks.n_way = {self.n_way} usable classes "
                            f"(groups: {', '.join(small) or 'none'}); lower --n_way or set "
                            "tasks.within_group=false")
        if small:
            log.info("tasks.within_group: %s groups with fewer than %d classes are not sampled: %s",
                     split, self.n_way, ", ".join(small))
        return out

    def table(self, entry: _Source) -> _Table:
        """The rows of `entry`, from the token cache or read from the source."""
        if entry.table_key not in self.tables:
            self.tables[entry.table_key] = self._open_table(entry)
            self.sources[entry.table_key] = entry
        return self.tables[entry.table_key]

    def _open_table(self, entry: _Source) -> _Table:
        fingerprint, read = self._open_source(entry)
        cached = self.cache.read(entry, fingerprint)
        if cached is not None:
            return cached
        texts, labels = read()
        label_names = sorted(set(labels))
        index = {name: i for i, name in enumerate(label_names)}
        label_ids = np.fromiter((index[x] for x in labels), dtype=np.int64, count=len(labels))
        return _Table(entry.name, fingerprint, label_names, label_ids, texts=texts)

    def _open_source(self, entry: _Source) -> tuple[str, Callable[[], tuple[list, list]]]:
        """(fingerprint of the data, a function returning (texts, label names))."""
        if entry.kind == "custom":
            data = self.load_custom(entry.source[len(CUSTOM_PREFIX):])
            texts, labels = _check_custom(entry.source, data)
            return _hash_json([texts, labels]), lambda: (texts, labels)
        if entry.kind == "file":
            path = Path(entry.source)
            fingerprint = _hash_file(path)
            return fingerprint, lambda: _read_file(path, entry, self.cache.cache_dir / "hf")
        dataset = _load_hub(entry)
        return dataset._fingerprint, lambda: _columns(dataset, entry)

    def _entry_classes(self, split: str, entry: _Source, table: _Table) -> list[str]:
        """Class names `entry` contributes to `split` (before the size checks)."""
        present = set(table.label_names)
        if entry.classes_file:
            return _read_classes_file(entry, present)
        if entry.groups:
            groups = self._group_map(entry)
            classes = [c for g in entry.groups for c in groups[g] if c in present]
            if not classes:
                raise DataError(f"none of the classes of groups {list(entry.groups)} "
                                f"({entry.group_file}) is a label of {table.name}; labels look "
                                f"like {table.label_names[:5]}; check label_column")
            return classes
        users = [s for s in SPLITS if any(e.identity == entry.identity and not e.groups
                                          and not e.classes_file for e in self.entries(s))]
        if len(users) <= 1 or self._splits_disjoint(entry, users):
            return table.label_names
        return self._class_split_part(split, entry, users, present)

    def _splits_disjoint(self, entry: _Source, users: list[str]) -> bool:
        """Whether the meta-splits sharing `entry`'s source read parts of it (e.g. a file's
        train and val splits) whose classes are already disjoint: then each keeps all of its
        classes, and `class_split` (which exists to make them disjoint) does not apply."""
        seen: set[str] = set()
        tables = {other.table_key: self.table(other) for split in users
                  for other in self.entries(split) if other.identity == entry.identity}
        if len(tables) < len(users):  # two meta-splits read the same rows
            return False
        for table in tables.values():
            names = set(table.label_names)
            if names & seen:
                return False
            seen |= names
        return True

    def _class_split_part(self, split, entry, users, present) -> list[str]:
        """This split's share of a source's classes (or groups) split by `class_split`."""
        fractions = [self.cfg.class_split[SPLITS.index(s)] for s in users]
        groups = self._group_map(entry) if entry.group_file else None
        units = sorted(groups) if groups else self._class_universe(entry, users)
        parts = split_units(units, fractions, self.seed)
        mine = parts[users.index(split)]
        classes = [c for g in mine for c in groups[g]] if groups else mine
        return [c for c in classes if c in present]

    def _class_universe(self, entry: _Source, users: list[str]) -> list[str]:
        """Sorted class names of every split of a source shared by several meta-splits."""
        names = set()
        for split in users:
            for other in self.entries(split):
                if other.identity == entry.identity:
                    names.update(self.table(other).label_names)
        return sorted(names)

    def _group_map(self, entry: _Source) -> dict[str, list[str]]:
        """The group -> classes map named by `entry.group_file`, with its groups checked."""
        if not entry.group_file:
            raise ConfigError(f"source {entry.name} selects groups {list(entry.groups)} but "
                              "has no group_file; set group_file to a class-to-group JSON "
                              "(e.g. CLINC150's domains.json) or set groups to []")
        if entry.group_file not in self.group_maps:
            self.group_maps[entry.group_file] = _read_group_file(entry.group_file,
                                                                  self.cache.cache_dir / "groups")
        groups = self.group_maps[entry.group_file]
        unknown = [g for g in entry.groups if g not in groups]
        if unknown:
            raise ConfigError(f"groups {unknown} of source {entry.name} are not in "
                              f"{entry.group_file}; it has: {', '.join(sorted(groups))}")
        return groups

    def _check_disjoint(self, pools: dict[str, list[_Pool]]) -> None:
        """No class of one source may serve two meta-splits."""
        seen: dict[tuple, str] = {}
        for split in self.splits:
            for entry, pool in zip(self.entries(split), pools[split]):
                for label in pool.classes:
                    key = (entry.identity, pool.table.label_names[label])
                    if seen.setdefault(key, split) != split:
                        raise ConfigError(
                            f"class {key[1]!r} of {entry.source} is in both datasets."
                            f"{seen[key]} and datasets.{split}; give the splits disjoint "
                            "groups, or drop groups so class_split divides the classes")

# ------------------------------------------------------------------------------------
# Tokenisation and its cache
# ------------------------------------------------------------------------------------

class _TokenCache:
    """Tokenises source splits into ragged token ids and keeps them as `.npy` files under
    `<cache_dir>/tokens/`, keyed by tokenizer, `max_length`, the data's fingerprint and the
    source's table key.

    Args:
        tokenizer: the Hugging Face tokenizer.
        max_length: tokens per example; longer texts are truncated.
        cache_dir: the cache folder (`datasets`' own cache and group files go beside).
    """

    def __init__(self, tokenizer, max_length: int, cache_dir: Path):
        self.tokenizer, self.max_length, self.cache_dir = tokenizer, max_length, cache_dir
        self.stats = {"hits": 0, "misses": 0}   # per source split
        self._fingerprint: str | None = None

    def tokenize_pending(self, tables: dict[tuple, _Table], sources: dict[tuple, _Source]) -> None:
        """Tokenise every table not read from the cache, then cache it."""
        for key, table in tables.items():
            if table.input_ids is not None:
                continue
            self.stats["misses"] += 1
            if not getattr(self.tokenizer, "is_fast", True):
                log.warning("tokenising with a slow (Python) tokenizer; a fast one is much quicker")
            log.info("tokenising %d texts of %s", len(table.texts), table.name)
            table.input_ids, table.offsets = self.tokenize(table.texts)
            table.texts = None
            self.write(sources[key], table)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ragged token ids: (flat int32 ids, (len(texts) + 1,) offsets)."""
        lengths, chunks = [], []
        for start in range(0, len(texts), TOKENIZE_BATCH):
            encoded = self.tokenizer(texts[start:start + TOKENIZE_BATCH], truncation=True,
                                     max_length=self.max_length)["input_ids"]
            lengths.extend(len(ids) for ids in encoded)
            chunks.extend(np.asarray(ids, dtype=np.int32) for ids in encoded)
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
        return flat, offsets

    def path(self, entry: _Source, fingerprint: str) -> Path:
        key = _hash_json({"version": CACHE_VERSION, "tokenizer": self.tokenizer_fingerprint(),
                          "max_length": self.max_length, "data": fingerprint,
                          "table": list(entry.table_key)})[:24]
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(entry.source).name + "_" + entry.split)
        return self.cache_dir / "tokens" / f"{stem}-{key}"

    def read(self, entry: _Source, fingerprint: str) -> _Table | None:
        """The cached, tokenised table of `entry` at `fingerprint`, or None (a miss)."""
        folder = self.path(entry, fingerprint)
        meta_file = folder / "meta.json"   # written last: its presence marks a whole entry
        if not meta_file.is_file():
            return None
        meta = json.loads(meta_file.read_text())
        arrays = {k: np.load(folder / f"{k}.npy", allow_pickle=False)
                  for k in ("labels", "offsets", "input_ids")}
        self.stats["hits"] += 1
        log.info("tokenisation cache hit for %s", entry.name)
        return _Table(entry.name, fingerprint, meta["label_names"], arrays["labels"],
                      arrays["offsets"], arrays["input_ids"])

    def write(self, entry: _Source, table: _Table) -> None:
        folder = self.path(entry, table.fingerprint)
        for name in ("labels", "offsets", "input_ids"):
            buffer = io.BytesIO()
            np.save(buffer, getattr(table, name), allow_pickle=False)
            atomic_write_bytes(folder / f"{name}.npy", buffer.getvalue())
        atomic_write_json(folder / "meta.json", {
            "source": table.name, "fingerprint": table.fingerprint,
            "tokenizer": getattr(self.tokenizer, "name_or_path", ""),
            "max_length": self.max_length, "label_names": table.label_names})

    def tokenizer_fingerprint(self) -> str:
        if self._fingerprint is None:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is not None:
                # Calls set truncation/padding on the backend; they are not its identity.
                state = json.loads(backend.to_str())
                state.pop("truncation", None), state.pop("padding", None)
                payload = json.dumps(state, sort_keys=True)
            else:
                payload = json.dumps(sorted(self.tokenizer.get_vocab().items()))
            side = getattr(self.tokenizer, "truncation_side", "right")
            self._fingerprint = _hash_json([type(self.tokenizer).__name__, side, payload])
        return self._fingerprint


# ------------------------------------------------------------------------------------
# Episodes
# ------------------------------------------------------------------------------------

class _EpisodeSampler:
    """Episodes as pure functions of `(seed, split, index)`: first a JSON-able plan (source,
    classes, row ids, labels), then the padded, tokenised episode; plans saved as a spec
    rebuild the same episodes later.

    Args:
        pools: meta-split -> the weighted pools its episodes draw from.
        tables: the source tables (shared with the reader), for rebuilding plans.
        generators: meta-split -> its synthetic task generator.
        shape: `(n_way, k_shot, q_query)`.
        seed: seeds the episodes.
        synthetic_cfg: the `synthetic` config section (saved in synthetic plans).
        tokenizer: tokenises synthetic tasks; its pad token and side pad every episode.
        max_length: tokens per synthetic example.
    """

    def __init__(self, pools: dict[str, list[_Pool]], tables: dict[tuple, _Table],
                 generators: dict[str, SyntheticTaskGenerator], shape: tuple[int, int, int],
                 seed: int, synthetic_cfg, tokenizer, max_length: int):
        self.pools, self.tables, self.generators = pools, tables, generators
        self.n_way, self.k_shot, self.q_query = shape
        self.seed, self.synthetic_cfg = seed, synthetic_cfg
        self.tokenizer, self.max_length = tokenizer, max_length

    def episode(self, split: str, index: int) -> Episode:
        return self.materialise(self.plan(split, index))

    def fixed_episodes(self, split: str, num: int, spec_path=None) -> list[Episode]:
        """Episodes 0..num-1 of `split`, read from `spec_path` if it exists, else saved there."""
        if spec_path is not None and Path(spec_path).is_file():
            episodes = self.load_spec(spec_path)
            if len(episodes) != num:
                raise UserError(f"episode spec {spec_path} holds {len(episodes)} episodes, not "
                                f"{num}; delete it to sample a new list or set "
                                f"evaluation.num_episodes={len(episodes)}")
            return episodes
        if spec_path is not None:
            self.save_spec(split, num, spec_path)
        return [self.episode(split, i) for i in range(num)]

    def save_spec(self, split: str, num: int, path) -> None:
        atomic_write_json(path, {"format": SPEC_FORMAT, "split": split, "seed": self.seed,
                                 "n_way": self.n_way, "k_shot": self.k_shot,
                                 "q_query": self.q_query,
                                 "episodes": [self.plan(split, i) for i in range(num)]})

    def load_spec(self, path) -> list[Episode]:
        try:
            spec = json.loads(Path(path).read_text())
            assert spec["format"] == SPEC_FORMAT
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            raise UserError(f"{path} is not a MELoRA episode spec ({e!r}); delete it or "
                            "pass a file written by save_episode_spec") from e
        return [self.materialise(plan) for plan in spec["episodes"]]

    def split_classes(self, split: str) -> dict[str, list[str]]:
        return {p.table.name: [p.table.label_names[c] for c in p.classes]
                for p in self._split_pools(split) if p.table is not None}

    def _split_pools(self, split: str) -> list[_Pool]:
        if split not in self.pools:
            raise UserError(f"meta-split {split!r} was not prepared by this loader (it has "
                            f"{', '.join(self.pools)}); construct it with splits including it")
        if not self.pools[split]:
            raise UserError(f"datasets.{split} lists no source; add one to config.yml")
        return self.pools[split]

    def plan(self, split: str, index: int) -> dict[str, Any]:
        """JSON-able description of episode `index`: source, classes, row ids, labels."""
        pools = self._split_pools(split)
        rng = np.random.default_rng([self.seed, SPLITS.index(split), int(index)])
        weights = np.array([p.weight for p in pools], dtype=float)
        pool = pools[rng.choice(len(pools), p=weights / weights.sum())]
        if pool.table is None:
            return {"source": SYNTHETIC, "seed": self.generators[split].seed,
                    "index": int(index), "synthetic": self.synthetic_cfg.to_dict()}
        # Sampling without replacement in random order = a fresh label permutation.
        group = None
        if pool.groups is not None:  # tasks.within_group: one group (domain), then its classes
            group, members = pool.groups[rng.choice(len(pool.groups))]
            classes = rng.choice(members, size=self.n_way, replace=False)
        else:
            classes = rng.choice(pool.classes, size=self.n_way, replace=False)
        support, query = [], []
        for label, cls in enumerate(classes):
            rows = rng.choice(pool.rows[cls], size=self.k_shot + self.q_query, replace=False)
            support += [(int(r), label) for r in rows[:self.k_shot]]
            query += [(int(r), label) for r in rows[self.k_shot:]]
        support = [support[i] for i in rng.permutation(len(support))]
        query = [query[i] for i in rng.permutation(len(query))]
        plan = {"source": pool.table.name, "fingerprint": pool.table.fingerprint,
                "classes": [pool.table.label_names[c] for c in classes],
                "support_ids": [r for r, _ in support], "support_labels": [y for _, y in support],
                "query_ids": [r for r, _ in query], "query_labels": [y for _, y in query]}
        if group is not None:
            plan["group"] = group
        return plan

    def materialise(self, plan: dict[str, Any]) -> Episode:
        if plan["source"] == SYNTHETIC:
            generator = SyntheticTaskGenerator(Config(plan["synthetic"]), plan["seed"])
            task = generator.sample_task(self.n_way, self.k_shot, self.q_query, plan["index"])
            return self._episode_from_text(task, SYNTHETIC)
        table = self._table_for_plan(plan)
        support = self._collate([table.ids(r) for r in plan["support_ids"]], plan["support_labels"])
        query = self._collate([table.ids(r) for r in plan["query_ids"]], plan["query_labels"])
        return Episode(support, query, len(plan["classes"]), list(plan["classes"]), plan["source"])

    def _table_for_plan(self, plan: dict[str, Any]) -> _Table:
        for table in self.tables.values():
            if table.name == plan["source"] and table.fingerprint == plan["fingerprint"]:
                return table
        raise UserError(f"episode spec names source {plan['source']} (data fingerprint "
                        f"{plan['fingerprint']}), which this loader has not loaded or whose "
                        "data changed; configure the datasets the spec was saved with, or "
                        "delete the spec to sample a new list")

    def _episode_from_text(self, task: TextTask, source: str) -> Episode:
        """Tokenise a raw-text task (synthetic tasks are not cached: they are small)."""
        def encode(texts):
            ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
            return [np.asarray(x, dtype=np.int64) for x in ids]
        support = self._collate(encode(task.support_texts), task.support_labels)
        query = self._collate(encode(task.query_texts), task.query_labels)
        return Episode(support, query, len(task.classes), list(task.classes), source)

    def _collate(self, seqs: list[np.ndarray], labels: list[int]) -> dict[str, torch.Tensor]:
        """Pad to the longest sequence of this set, on the tokenizer's padding side."""
        longest = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), longest), self._pad_id(), dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        for i, seq in enumerate(seqs):
            span = slice(longest - len(seq), longest) if left else slice(0, len(seq))
            input_ids[i, span] = torch.from_numpy(np.asarray(seq, dtype=np.int64))
            attention_mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "labels": torch.tensor(labels, dtype=torch.long)}

    def _pad_id(self) -> int:
        # GPT-2 has no pad token; any id works under a zero attention mask.
        for pad in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if pad is not None:
                return int(pad)
        return 0


# ------------------------------------------------------------------------------------
# CLI flags -> config overrides
# ------------------------------------------------------------------------------------

def cli_dataset_overrides(dataset: str | None, eval_dataset: str | None,
                          text_column: str | None, label_column: str | None) -> dict[str, object]:
    """Turn `--dataset/--eval_dataset/--text_column/--label_column` into config overrides.

    `--dataset X` alone: meta-train, meta-val and meta-test all come from X, its classes
    split by `datasets.class_split`. `--eval_dataset Y` alone: meta-test on Y (all its
    classes). Both, different: meta-train/meta-val split X's classes, meta-test on Y. Both
    the same: as `--dataset X` alone. Hub sources use their `train` split for meta-train
    and meta-val and `test` for meta-test; single-table files use their one `train` split;
    a CLINC150-style `data_full.json` uses `train` and `test`.

    Args:
        dataset: a hub name or local file for meta-training, or None.
        eval_dataset: a hub name or local file for meta-testing, or None.
        text_column: the text column of these sources (None: the config's).
        label_column: the label column of these sources (None: the config's).

    Returns:
        `{"datasets.meta_train": [...], ...}` for `config.load_config(overrides=...)`;
        empty when no flag is given.

    Raises:
        ConfigError: a column flag without a dataset flag.
    """
    if dataset is None and eval_dataset is None:
        if text_column is not None or label_column is not None:
            raise ConfigError("--text_column/--label_column need --dataset or --eval_dataset")
        return {}
    columns = {k: v for k, v in (("text_column", text_column), ("label_column", label_column))
               if v is not None}

    def entry(source: str, role: str) -> dict:
        return {"source": source, "config": "", "split": _cli_split(source, role),
                "group_file": "", "groups": [], "classes_file": "", "weight": 1.0, **columns}

    out: dict[str, object] = {}
    if dataset is not None:
        out["datasets.meta_train"] = [entry(dataset, "train")]
        out["datasets.meta_val"] = [entry(dataset, "train")]
    if dataset is not None and eval_dataset in (None, dataset):
        out["datasets.meta_test"] = [entry(dataset, "test")]
    elif eval_dataset is not None:
        out["datasets.meta_test"] = [entry(eval_dataset, "test")]
    return out


def check_sources(datasets_cfg) -> None:
    """Check every source of every meta-split (files exist, types known); reads no data.

    So a bad `--eval_dataset` is refused by `--mode train` too, not only when evaluating.

    Raises:
        ConfigError, DataError: as `DatasetLoader.validate`, naming the source's key.
    """
    if datasets_cfg.synthetic_only:
        return
    for split in SPLITS:
        for i, e in enumerate(getattr(datasets_cfg, split)):
            _validate_entry(f"datasets.{split}[{i}]", _source(e))


def _cli_split(source: str, role: str) -> str:
    path = Path(source)
    single_table = (path.suffix.lower() in FILE_BUILDERS or path.exists()) and not _is_pairs_json(path)
    return "train" if single_table else role


def _is_pairs_json(path: Path) -> bool:
    """Whether `path` looks like CLINC150's `{"split": [[text, label], ...]}` (peeks only)."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    with path.open("r", encoding="utf-8", errors="replace") as f:  # _read_file names bad bytes
        head = f.read(4096)
    return re.match(r'\s*\{\s*"[^"]*"\s*:\s*\[\s*\[', head) is not None


# ------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------

def split_units(units: list[str], fractions: list[float], seed: int) -> list[list[str]]:
    """Split `units` (classes or groups) into disjoint parts sized by `fractions`, seeded.

    Sizes follow the largest-remainder rule, and every part gets at least one unit when
    there are enough.

    Args:
        units: names; their order does not matter (they are sorted first).
        fractions: relative part sizes (renormalised).
        seed: the same seed and units give the same parts.

    Returns:
        One sorted list per fraction.
    """
    units = sorted(units)
    rng = np.random.default_rng([seed, _CLASS_SPLIT_STREAM])
    shuffled = [units[i] for i in rng.permutation(len(units))]
    share = np.asarray(fractions, dtype=float) / sum(fractions) * len(units)
    sizes = np.floor(share).astype(int)
    for i in np.argsort(-(share - sizes), kind="stable")[:len(units) - sizes.sum()]:
        sizes[i] += 1
    for i in range(len(sizes)):  # borrow from the largest part for an empty one
        if sizes[i] == 0 and fractions[i] > 0 and sizes.max() > 1:
            sizes[i], sizes[sizes.argmax()] = 1, sizes.max() - 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [sorted(shuffled[bounds[i]:bounds[i + 1]]) for i in range(len(sizes))]


def _source(e: dict) -> _Source:
    """A `_Source` from one config item of a meta-split's list."""
    return _Source(e["source"], e["config"], e["split"], e["text_column"], e["label_column"],
                   e["group_file"], tuple(e["groups"]), e["weight"], e["classes_file"])


def _entries(datasets_cfg, split: str) -> list[_Source]:
    """The sources of one meta-split, normalised."""
    return [_source(e) for e in getattr(datasets_cfg, split)]


def _validate_datasets(datasets_cfg, splits: Sequence[str], n_way: int) -> None:
    """`DatasetLoader.validate`: the `datasets` settings and named files; reads no data."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ConfigError(f"unknown meta-split(s) {unknown}; use {', '.join(SPLITS)}")
    if n_way < 2:
        raise ConfigError(f"tasks.n_way must be >= 2 (a task needs two classes), got {n_way}")
    if datasets_cfg.synthetic_weight < 0:
        raise ConfigError(f"datasets.synthetic_weight must be >= 0, got {datasets_cfg.synthetic_weight}")
    fractions = list(datasets_cfg.class_split)
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ConfigError("datasets.class_split must be three fractions >= 0 "
                          f"(meta-train, meta-val, meta-test), got {fractions}")
    if datasets_cfg.synthetic_only:
        return
    for split in splits:
        _validate_split(datasets_cfg, split)


def _validate_split(datasets_cfg, split: str) -> None:
    entries = _entries(datasets_cfg, split)
    synthetic = datasets_cfg.synthetic_weight if split == "meta_train" else 0.0
    if not entries and split == "meta_val":
        return  # meta-validation is optional
    if not entries and not synthetic:
        raise ConfigError(f"datasets.{split} lists no source; add one (or run with "
                          "--synthetic_only, or --dataset PATH)")
    for i, entry in enumerate(entries):
        _validate_entry(f"datasets.{split}[{i}]", entry)
    if entries and sum(e.weight for e in entries) + synthetic <= 0:
        raise ConfigError(f"the weights of datasets.{split} sum to 0; give a source a "
                          "positive weight")


def _synthetic_seed(seed: int, split: str) -> int:
    """A generator seed per meta-split, so meta-test tasks differ from meta-train ones."""
    return int(np.random.SeedSequence([seed, _SYNTHETIC_STREAM, SPLITS.index(split)])
               .generate_state(1)[0])


def _validate_entry(key: str, entry: _Source) -> None:
    if not entry.source:
        raise ConfigError(f"{key}.source is empty; name a hub dataset or a local file")
    if entry.weight < 0:
        raise ConfigError(f"{key}.weight must be >= 0, got {entry.weight}")
    if entry.groups and not entry.group_file:
        raise ConfigError(f"{key} selects groups {list(entry.groups)} but has no group_file; "
                          "set group_file to a class-to-group JSON (e.g. CLINC150's "
                          "domains.json) or set groups to []")
    if entry.groups and entry.classes_file:
        raise ConfigError(f"{key} sets both groups {list(entry.groups)} and classes_file "
                          f"{entry.classes_file!r}; keep one (set groups to [] or classes_file "
                          "to \"\")")
    if entry.classes_file and not Path(entry.classes_file).is_file():
        raise DataError(f"{key}.classes_file {entry.classes_file!r} does not exist; give the "
                        "path of a text file with one class name a line (e.g. "
                        "data/hwu64/splits/01/labels.train.txt) or set it to \"\"")
    if entry.kind == "file":
        check_data_file(entry.source, f"{key}.source", "--dataset data/clinc150/data_full.json")
    if entry.group_file and not _is_url(entry.group_file) and not Path(entry.group_file).is_file():
        raise DataError(f"{key}.group_file {entry.group_file!r} does not exist; give the path "
                        "of a JSON class-to-group map or set it to \"\"")


def check_data_file(spec: str, what: str, example: str = "") -> None:
    """Refuse a data file that is a folder, does not exist, or has a type MELoRA cannot read.

    Used for dataset sources and for `--mode adapt`'s `--support`/`--predict` files.

    Args:
        spec: the path as the user gave it (named verbatim in the message).
        what: what the path is, e.g. `datasets.meta_train[0].source` or `--predict`.
        example: a good value, shown when `spec` is a folder; "" for none.

    Raises:
        DataError: naming `what`, `spec` and the fix.
    """
    path = Path(spec)
    if path.is_dir():
        hint = f" (e.g. {example})" if example else ""
        raise DataError(f"{what}: {spec!r} is a folder; pass a {', '.join(FILE_BUILDERS)} file{hint}")
    if not path.is_file():
        raise DataError(f"{what}: file {spec!r} does not exist (relative paths resolve against "
                        f"{os.getcwd()})")
    if path.suffix.lower() not in FILE_BUILDERS:
        raise DataError(f"{what}: {spec!r} has an unsupported type; use {', '.join(FILE_BUILDERS)}")


def read_table(path: str | os.PathLike, text_column: str, label_column: str, what: str,
               need_labels: bool = True, other_columns: bool = False
               ) -> tuple[Any, list[str], list[str | None] | None]:
    """(rows, texts, labels) of one local csv/json/jsonl/parquet table, read as training
    reads a `--dataset` file: every CSV cell is the string written (`NA`, `None`, `01`,
    `000` and `123` stay as they are), json/parquet numbers become their text.

    Used by `--mode adapt` for `--support` and `--predict`, so a file that trains also
    adapts, with the same labels.

    Args:
        path: the file.
        text_column, label_column: the columns to take.
        what: the flag naming the file in messages, e.g. `--support`.
        need_labels: refuse a file without `label_column` (else its labels are None).
        other_columns: keep the file's other columns in the rows (`--predict` writes them
            back beside each prediction); without, a CSV's are never parsed into memory.

    Returns:
        (the rows as a pandas DataFrame in file order (the two columns only, unless
        `other_columns`), the texts, the labels as strings
        with None for a row without one, or None when there is no label column).

    Raises:
        DataError: no such file, another format, not UTF-8, unreadable, no rows, a
            missing column, a row without text.
    """
    path = Path(path)
    check_data_file(str(path), what)
    where = f"{what} file {str(path)!r}"
    frame, names = _read_frame(path, where, None if other_columns else (text_column, label_column))
    if frame is None or len(frame) == 0:
        raise DataError(f"{where} has no rows; give it one row per text")
    for role, column in [("text_column", text_column)] + ([("label_column", label_column)] if need_labels else []):
        if column not in frame.columns:
            raise DataError(f"{where} has no column {column!r} (the {role}); its columns are: "
                            f"{', '.join(map(str, frame.attrs.get('columns', frame.columns)))}; "
                            f"pass --{role} NAME")
    texts = [None if _missing(t) else str(t) for t in frame[text_column]]
    empty = [i for i, t in enumerate(texts) if t is None or t == ""]
    if empty:
        raise DataError(f"{where}: {len(empty)} row(s) have no text in column {text_column!r} "
                        f"(first: data row {empty[0] + 1}); fill them in or drop those rows")
    if label_column not in frame.columns:
        return frame, texts, None
    decode = names.get(label_column, str)  # ClassLabel ids -> their names
    labels = [None if _missing(y) or (isinstance(y, str) and not y.strip()) else decode(y)
              for y in frame[label_column]]
    return frame, texts, labels


def _read_frame(path: Path, where: str, columns: Sequence[str] | None = None):
    """(DataFrame or None when empty, {column: id -> name}) of a table file; a CSV keeps
    only `columns` (see `_read_csv`)."""
    if path.suffix.lower() == ".csv":  # training's reader: every cell a string
        return _read_csv(path, where, columns), {}
    import datasets
    if path.stat().st_size == 0:
        return None, {}
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # one small file: no "Generating train split" bar
    try:
        with tempfile.TemporaryDirectory() as cache:  # nothing cached beside the user's files
            table = datasets.load_dataset(FILE_BUILDERS[path.suffix.lower()], data_files=str(path),
                                          split="train", cache_dir=cache)
            names = {c: f.int2str for c, f in table.features.items() if hasattr(f, "int2str")}
            return table.to_pandas(), names
    except ValueError as e:  # "Instruction 'train' corresponds to no data": no rows
        if "no data" in str(e):
            return None, {}
        raise DataError(f"could not read {where} ({e}); check its format") from e
    except (OSError, StopIteration, datasets.exceptions.DatasetGenerationError) as e:
        raise DataError(f"could not read {where} ({e!r}); check its format") from e
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def _missing(value) -> bool:
    """None or a float NaN (json null, a parquet gap)."""
    return value is None or (isinstance(value, float) and value != value)


def _check_custom(source: str, data: Any) -> tuple[list[str], list[str]]:
    if not isinstance(data, dict) or not {"text", "label"} <= set(data):
        raise DataError(f"_load_custom_task for {source!r} must return "
                        f"{{'text': [...], 'label': [...]}}, got {type(data).__name__} "
                        f"with keys {sorted(data) if isinstance(data, dict) else '-'}")
    texts, labels = list(data["text"]), [str(x) for x in data["label"]]
    if len(texts) != len(labels):
        raise DataError(f"_load_custom_task for {source!r} returned {len(texts)} texts but "
                        f"{len(labels)} labels; they must pair up")
    return [str(t) for t in texts], labels


def _read_file(path: Path, entry: _Source, hf_cache: Path) -> tuple[list[str], list[str]]:
    """(texts, label names) of a local file: CLINC150 pairs JSON or a `datasets` table."""
    suffix = path.suffix.lower()
    if suffix == ".csv":  # every cell a string: "NA", "nan" and "123" are texts, "" is empty
        return _csv_columns(path, entry)
    if suffix in (".json", ".jsonl"):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{entry.source} is not UTF-8 text (byte {e.start}: {e.reason}); "
                            "save it as UTF-8") from e
    if suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            if not _is_json_lines(text):
                raise DataError(f"{entry.source} is not valid JSON ({e}); fix the file, or "
                                "save it as JSON lines (one object per line)") from e
            data = None  # JSON lines: read as a table below
        if isinstance(data, dict) and _looks_like_pairs(data):
            return _read_pairs(data, entry)
    if suffix == ".jsonl" or (suffix == ".json" and data is None):
        return _read_json_lines(text, entry)
    import datasets
    if entry.split != "train":
        raise DataError(f"{entry.source} is one table, which `datasets` calls split 'train'; "
                        f"set the source's split to \"train\" (got {entry.split!r})")
    try:
        table = datasets.load_dataset(FILE_BUILDERS[suffix], data_files=str(path),
                                      split="train", cache_dir=str(hf_cache))
    except Exception as e:  # pandas, pyarrow and `datasets` each fail in their own way
        first = (str(e) or type(e).__name__).splitlines()[0][:300]
        raise DataError(f"could not read {entry.source} as {path.suffix[1:]} ({first}); check "
                        "the file's format") from e
    return _columns(table, entry)


def _read_json_lines(text: str, entry: _Source) -> tuple[list[str], list[str]]:
    """(texts, label names) of JSON-lines text (one object a line), every value a string.

    Read with the standard library, as CSV cells are (no `datasets` type guessing): a label
    `01` stays `01`, and a number is a text like any other.
    """
    if entry.split != "train":
        raise DataError(f"{entry.source} is one table, which `datasets` calls split 'train'; "
                        f"set the source's split to \"train\" (got {entry.split!r})")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{entry.source} line {number} is not JSON ({e}); fix that line") from e
        if not isinstance(row, dict):
            raise DataError(f"{entry.source} line {number} is not a JSON object; each line "
                            "must be one object such as {\"text\": ..., \"label\": ...}")
        rows.append(row)
    columns = sorted({k for row in rows for k in row})
    for role in ("text_column", "label_column"):
        column = getattr(entry, role)
        if column not in columns:
            raise DataError(f"{entry.name} has no column {column!r} (the {role}); its columns "
                            f"are: {', '.join(columns)}; pass --{role} NAME or set {role} in "
                            "datasets")
    labels = [_cell(row.get(entry.label_column)) for row in rows]
    _check_filled(labels, entry, entry.label_column, "have an empty label")
    texts = [_cell(row.get(entry.text_column)) for row in rows]
    _check_filled(texts, entry, entry.text_column, "have no text")
    return texts, labels


def _cell(value) -> str | None:
    """A JSON value as a table cell: strings kept, numbers and booleans as their JSON text."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


def _read_classes_file(entry: _Source, present: set[str]) -> list[str]:
    """The class names of `entry.classes_file` (one a line), each checked against the data."""
    path = Path(entry.classes_file)
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise DataError(f"classes_file {entry.classes_file} of {entry.name} names no class; "
                        "write one class name a line")
    missing = [n for n in names if n not in present]
    if missing:
        raise DataError(f"classes_file {entry.classes_file} names {len(missing)} class(es) that "
                        f"{entry.name} does not have (first: {missing[:3]}); labels look like "
                        f"{sorted(present)[:5]}; check the file and label_column")
    return names


def _read_csv(path: Path, where: str, columns: Sequence[str] | None = None):
    """A CSV file as a pandas DataFrame of strings, with no value read as missing, or None
    when it holds nothing.

    With `columns`, only those of them the file has are built (the header names the rest,
    for messages, in `frame.attrs["columns"]`): the file is parsed once, as a stream, so a
    wide or long file costs about the memory of the two columns MELoRA reads, not of a copy
    of its text plus every column (benchmarks/csv_memory.py measures it).
    """
    import pandas as pd
    options = dict(dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8")
    try:
        if not _has_text(path):
            return None
        header = list(pd.read_csv(path, nrows=0, **options).columns)
        keep = None if columns is None else [c for c in header if c in set(columns)]
        frame = pd.read_csv(path, usecols=keep, **options)
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 text (byte {e.start}: {e.reason}); save it "
                        "as UTF-8") from e
    except pd.errors.EmptyDataError:
        return None
    except Exception as e:  # pandas' parser errors have no common base
        first = (str(e) or type(e).__name__).splitlines()[0][:300]
        raise DataError(f"could not read {where} as csv ({first}); check its format") from e
    frame.attrs["columns"] = header
    return frame


def _has_text(path: Path) -> bool:
    """Does the file hold anything but whitespace? (Read in blocks, never whole.)"""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            if block.strip():
                return True
    return False


def _read_pairs(data: dict, entry: _Source) -> tuple[list[str], list[str]]:
    """(texts, label names) of a CLINC150-style `{split: [[text, label], ...]}` object."""
    if entry.split not in data:
        raise DataError(f"{entry.source} has no split {entry.split!r}; its splits are "
                        f"{', '.join(data)}; set the source's split to one of them")
    rows = data[entry.split]
    bad = [i for i, row in enumerate(rows) if not (isinstance(row, list) and len(row) == 2
                                                   and row[0] not in (None, "")
                                                   and row[1] not in (None, ""))]
    if bad:
        raise DataError(f"{entry.source}: {len(bad)} row(s) of split {entry.split!r} are not "
                        f"[text, label] pairs with a text and a label (first: row {bad[0]}, "
                        f"{str(rows[bad[0]])[:80]}); fix or drop those rows")
    return [str(t) for t, _ in rows], [str(y) for _, y in rows]


def _looks_like_pairs(data: dict) -> bool:
    first = next(iter(data.values()), None)  # rows are checked by _read_pairs
    return isinstance(first, list) and bool(first) and isinstance(first[0], list)


def _is_json_lines(text: str) -> bool:
    """Whether every non-blank line of `text` is one JSON object."""
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        return bool(lines) and all(isinstance(json.loads(line), dict) for line in lines)
    except ValueError:
        return False


def _columns(table, entry: _Source) -> tuple[list[str], list[str]]:
    """(texts, label names) of a `datasets.Dataset`, checking both columns exist."""
    _check_columns(table.column_names, table.column_names, entry)
    feature = table.features[entry.label_column]
    raw = table[entry.label_column]
    _check_filled(raw, entry, entry.label_column, "have an empty label")
    labels = [feature.int2str(x) for x in raw] if hasattr(feature, "int2str") else [str(x) for x in raw]
    texts = table[entry.text_column]
    _check_filled(texts, entry, entry.text_column, "have no text")
    return [t if isinstance(t, str) else str(t) for t in texts], labels  # numbers are texts too


def _check_columns(present, header: Sequence[str], entry: _Source) -> None:
    """Refuse a source whose `present` columns lack its text or label column (`header`:
    every column of the file, for the message)."""
    for role in ("text_column", "label_column"):
        column = getattr(entry, role)
        if column not in present:
            raise DataError(f"{entry.name} has no column {column!r} (the {role}); its columns "
                            f"are: {', '.join(map(str, header))}; pass --{role} NAME or set "
                            f"{role} in datasets")


def _csv_columns(path: Path, entry: _Source) -> tuple[list[str], list[str]]:
    """(texts, label names) of a CSV source, read once with only its two columns."""
    if entry.split != "train":
        raise DataError(f"{entry.source} is one table, which `datasets` calls split 'train'; "
                        f"set the source's split to \"train\" (got {entry.split!r})")
    frame = _read_csv(path, entry.source, (entry.text_column, entry.label_column))
    if frame is None:
        raise DataError(f"could not read {entry.source} as csv (it is empty); check the file's format")
    _check_columns(frame.columns, frame.attrs["columns"], entry)
    labels, texts = frame[entry.label_column].tolist(), frame[entry.text_column].tolist()
    del frame
    _check_filled(labels, entry, entry.label_column, "have an empty label")
    _check_filled(texts, entry, entry.text_column, "have no text")
    return texts, labels


def _check_filled(values: list, entry: _Source, column: str, problem: str) -> None:
    """Refuse rows whose `column` value is None or ""; `problem` says what they lack."""
    empty = [i for i, x in enumerate(values) if x is None or x == ""]
    if empty:
        raise DataError(f"{entry.name}: {len(empty)} row(s) {problem} in column {column!r} "
                        f"(first: data row {empty[0] + 1}); fill them in or drop those rows")


def _load_hub(entry: _Source):
    """`datasets.load_dataset` of a hub source; offline, fail at once with the fix."""
    import datasets
    offline = datasets.config.HF_HUB_OFFLINE
    if not offline and not _hub_reachable():
        raise UserError(f"cannot reach the Hugging Face hub to load {entry.name}. "
                        + _OFFLINE_HINT + " (If the dataset is in your local HF cache, set "
                        "HF_DATASETS_OFFLINE=1.)")
    try:
        return datasets.load_dataset(entry.source, entry.config or None, split=entry.split)
    except (ConnectionError, OSError, ValueError) as e:
        raise UserError(f"could not load hub dataset {entry.name} ({type(e).__name__}: {e}). "
                        "Check the name, config and split; offline: " + _OFFLINE_HINT) from e


def _hub_reachable() -> bool:
    from huggingface_hub import constants
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def _read_group_file(spec: str, cache: Path) -> dict[str, list[str]]:
    """A `{group: [class, ...]}` JSON from a path or an http(s) URL (cached on disk)."""
    if _is_url(spec):
        local = cache / (hashlib.sha256(spec.encode()).hexdigest()[:24] + ".json")
        if not local.is_file():
            try:
                with urllib.request.urlopen(spec, timeout=HUB_PROBE_TIMEOUT_S * 3) as response:
                    atomic_write_bytes(local, response.read())
            except OSError as e:
                raise UserError(f"cannot download group_file {spec} ({e}). " + _OFFLINE_HINT
                                + " Or set group_file to a local copy.") from e
        path = local
    else:
        path = Path(spec)
    try:
        groups = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"group_file {spec} is not JSON ({e})") from e
    if not isinstance(groups, dict) or not all(isinstance(v, list) for v in groups.values()):
        raise DataError(f"group_file {spec} must be a JSON object of group -> [class, ...]")
    return {str(g): [str(c) for c in v] for g, v in groups.items()}


def _is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()
