"""The config: config.yml's defaults layered with a `--config` file, flags, `--set` and a
checkpoint's saved config, checked once and handed out as a read-only `Config`.

config.yml is the one file of defaults and its values' types. This module owns the
mechanism (reading YAML, merging, type checks, the range rules below and the layering for
resumed runs); the modules that use a section own its allowed values and cross-key checks
and hand them in with `register_rules` when they are imported (`model`: model names,
pooling, heads; `trainer`: curvature methods, head inits, precision; `baseline`: baseline
names; `evaluation`: the search ranges; `experiment`: ablations). It imports only `utils`.

    cfg = load_config("config.yml", ["lora.default_rank=16"])
    cfg.lora.default_rank  # 16
"""

from __future__ import annotations

import copy
import functools
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from utils import ConfigError, UserError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yml"

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


@dataclass(frozen=True)
class Rules:
    """What a module allows in the config keys it owns, beyond config.yml's types.

    Attributes:
        choices: dotted key -> the values it may take (checked after the type check).
        check: a cross-key check of the whole config (nested dicts), raising ConfigError
            naming the key; None for none.
        whole_run: `check` concerns what full mode runs after training (baseline names,
            ablations, search ranges): it is skipped for an ablation variant, which is
            the checked config with one key changed.
    """
    choices: Mapping[str, tuple] = field(default_factory=dict)
    check: Callable[[dict], None] | None = None
    whole_run: bool = False


# Owner module -> its rules, in import order (see `register_rules`).
RULES: dict[str, Rules] = {}


def register_rules(owner: str, rules: Rules) -> None:
    """Hand in the allowed values and checks of the keys `owner` (a module name) uses.

    Each owning module calls this once at import, so every config loaded after it is
    checked against them; a config loaded before the owner was imported is checked for
    types and ranges only until `check` runs (`main` loads, imports the owners, checks).

    Example:
        >>> register_rules("model", Rules(choices={"meta_learning.head": ("euclidean", "cosine")}))
    """
    RULES[owner] = rules


def choices() -> dict[str, tuple]:
    """Every registered key with a fixed set of values -> that set."""
    return {key: allowed for rules in RULES.values() for key, allowed in rules.choices.items()}


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


def _defaults() -> dict:
    """config.yml's values: parsed once per version of the file (its path, size and
    modification time), a fresh copy each call (callers merge into it). Every config load,
    and every ablation variant's check, needs them; parsing the file each time cost about
    80 ms a read, 18 reads a load once analysis's rules were registered."""
    try:
        stat = DEFAULT_CONFIG.stat()
    except OSError:
        return _read_yaml(DEFAULT_CONFIG)  # missing or unreadable: its clear error
    return copy.deepcopy(_parsed_yaml(str(DEFAULT_CONFIG), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _parsed_yaml(path: str, mtime_ns: int, size: int) -> dict:
    return _read_yaml(Path(path))


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
    for key, allowed in choices().items():
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
    if not 0 <= data["training"]["seed"] < 2**32:  # what NumPy's and torch's seeding accept
        raise ConfigError(f"config key 'training.seed' must be in 0 .. 2**32 - 1 = {2**32 - 1}, "
                          f"got {data['training']['seed']!r}; pass another --seed")
    for rules in RULES.values():
        if rules.check is not None and (experiment or not rules.whole_run):
            rules.check(data)


def check(cfg: Config) -> None:
    """Check a loaded config again, against every rule registered by now (`main` loads the
    config, so a bad file or value fails within a second, then imports the owning modules
    and calls this).

    Raises:
        ConfigError: a value an owner does not allow, naming the key.
    """
    _validate_values(cfg.to_dict())


def check_variant(data: Mapping, key: str, value: Any) -> None:
    """Check the config `data` (nested dicts) with `key` set to `value`, as an ablation
    variant runs it (the whole-run checks skipped).

    Raises:
        ConfigError: the variant's value is invalid, naming the key.
    """
    variant = copy.deepcopy(dict(data))
    _merge(variant, _nest(key, value), _defaults(), "")
    _validate_values(variant, experiment=False)


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
    defaults = _defaults()
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
    defaults = _defaults()
    data = copy.deepcopy(defaults)
    _merge(data, base, defaults, "")
    if path is not None:
        _merge(data, _read_yaml(Path(path)), defaults, "")
    for key, value in _parse_overrides(overrides):
        _merge(data, _nest(key, value), defaults, "")
    _validate_values(data)
    return Config(data)
