"""config.load_config: defaults, overrides and one clear error per bad value."""

import pytest

import config
import experiment  # noqa: F401  (imports every module that registers config rules: config.RULES)
import utils


def test_defaults_load_and_overrides_apply(tmp_path):
    cfg = config.load_config()
    assert cfg.lora.default_rank == 8 and cfg.models.selected_model == "gpt2-small"
    user = tmp_path / "user.yml"
    user.write_text("lora:\n  default_rank: 16\n")
    cfg = config.load_config(user, ["meta_learning.inner.default_lr=0.05", "models.selected_model=tiny-bert"])
    assert cfg.lora.default_rank == 16 and cfg.lora.dropout == 0.1
    assert cfg.meta_learning.inner.default_lr == 0.05 and cfg.models.selected_model == "tiny-bert"
    assert cfg.flat()["lora.default_rank"] == 16


@pytest.mark.parametrize("override, message", [
    (["lora.rnak=4"], r"unknown config key 'lora.rnak'.*default_rank"),
    (["lora.default_rank=0"], r"'lora.default_rank' must be a positive integer"),
    (["lora.default_rank=2.5"], r"'lora.default_rank' must be of type int"),
    (["lora.default_rank=true"], r"'lora.default_rank' must be of type int"),
    (["models.selected_model=gpt5"], r"gpt5.*gpt2-small.*minilm-l6"),
    (["memory_optimization.hessian_approximation.method=exact"], r"full, gauss_newton"),
    (["lora.dropout=1.5"], r"'lora.dropout' must be in \[0, 1\]"),
    (["lora=3"], r"'lora' must be a mapping"),
    (["nonsense"], r"section.key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(utils.ConfigError, match=message):
        config.load_config(None, override)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("lora: [unclosed\n")
    with pytest.raises(utils.ConfigError, match="not valid YAML"):
        config.load_config(bad)
    with pytest.raises(utils.ConfigError, match="does not exist"):
        config.load_config(tmp_path / "missing.yml")


def test_float_keys_accept_ints_and_open_mappings_accept_new_families():
    cfg = config.load_config(None, {"lora.alpha": 32, "lora.target_modules.roberta": ["query"]})
    assert cfg.lora.alpha == 32.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.lora.target_modules.roberta == ["query"]


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "out" / "r.json"
    utils.atomic_write_json(target, {"a": 1})
    utils.atomic_write_json(target, {"a": 2})
    assert target.read_text().strip().endswith("}") and '"a": 2' in target.read_text()
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]


@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("-2E+3", -2000.0), ("1.5e-3", 1.5e-3),
                                         ("1_0e1", 100.0), ("12", 12), ("1e", "1e"),
                                         ("e5", "e5"), ("1e-4x", "1e-4x")])
def test_yaml_reads_exponents_without_a_dot_as_numbers(text, value):
    import yaml
    loaded = yaml.load(text, Loader=config.YamlLoader)
    assert loaded == value and type(loaded) is type(value)


def test_1e_4_is_accepted_in_set_and_in_yaml_files(tmp_path):
    import yaml
    assert yaml.safe_load("1e-4") == "1e-4"  # PyYAML's YAML 1.1 rule, which we replace
    cfg = config.load_config(overrides=["meta_learning.outer.default_lr=1e-4"])
    assert cfg.meta_learning.outer.default_lr == 1e-4
    path = tmp_path / "c.yml"
    path.write_text("meta_learning:\n  inner:\n    default_lr: 5e-2\n")
    assert config.load_config(path).meta_learning.inner.default_lr == 0.05
    with pytest.raises(utils.ConfigError, match="default_lr"):  # a string is still refused
        config.load_config(overrides=["meta_learning.outer.default_lr=fast"])


@pytest.mark.parametrize("override, named", [
    ({"evaluation.baselines": ["maml", "bogus"]}, "evaluation.baselines"),
    ({"analysis.ablations.inner_steps": [1, -2]}, "meta_learning.inner.default_num_steps"),
    ({"analysis.ablations.hessian_method": ["exact"]}, "hessian_approximation.method"),
    ({"analysis.hyperparameter_search.outer_lr": [0.1, 0.01]}, "hyperparameter_search.outer_lr"),
])
def test_what_full_mode_runs_after_training_is_checked_at_load_time(override, named):
    with pytest.raises(utils.ConfigError, match=named):
        config.load_config(overrides=override)


def test_full_mode_with_an_unknown_baseline_fails_before_training(tmp_path, capsys):
    import main
    assert main.main(["--mode", "full", "--model", "tiny-bert", "--output_dir", str(tmp_path),
                      "--set", "evaluation.baselines=[maml,bogus]"]) == 2
    assert "evaluation.baselines" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_library_defaults_are_the_config_defaults():
    """trainer's and baseline's defaults (trainer.HESSIAN_METHOD, trainer.HEAD_INIT) are config.yml's."""
    import inspect

    import baseline
    import trainer
    cfg = config.load_config()
    method, head_init = cfg.memory_optimization.hessian_approximation.method, cfg.meta_learning.head_init
    assert (trainer.HESSIAN_METHOD, trainer.HEAD_INIT) == (method, head_init)
    assert cfg.evaluation.head_init == head_init
    for fn in (trainer.compute_meta_gradient, trainer.compute_batched_meta_gradient,
               trainer.MetaGradient, trainer.initial_fast_weights, baseline.FewShotMethod,
               baseline.MELoRA, baseline.LoRAMetaLearner, baseline.FineTune,
               baseline.MultitaskFineTune, baseline.MAML, baseline.FOMAML, baseline.Reptile):
        params = inspect.signature(fn).parameters
        assert params["head_init"].default == head_init, fn
        if "method" in params:
            assert params["method"].default == method, fn
    assert baseline.FewShotMethod.head_init == head_init


def test_search_ranges_contain_the_configured_rates():
    """The searched ranges contain config.yml's own rates (inner lr 0.5 was outside
    [0.001, 0.1], so tuning never searched around the default it was compared with)."""
    cfg = config.load_config()
    search = cfg.analysis.hyperparameter_search
    assert search.inner_lr[0] <= cfg.meta_learning.inner.default_lr <= search.inner_lr[1]
    assert search.outer_lr[0] <= cfg.meta_learning.outer.default_lr <= search.outer_lr[1]
    assert search.inner_steps[0] <= cfg.meta_learning.inner.default_num_steps <= search.inner_steps[1]


def test_config_yml_is_parsed_once_per_version(tmp_path, monkeypatch):
    """Every load and every ablation variant's check needs config.yml's values: they are
    parsed once per version of the file (with every owner's rules registered, a load read
    the file 18 times), each caller gets its own copy, and an edited file is read again."""
    reads = []
    real = config._read_yaml
    monkeypatch.setattr(config, "_read_yaml", lambda path: reads.append(path) or real(path))
    defaults = tmp_path / "config.yml"
    defaults.write_text(config.DEFAULT_CONFIG.read_text())
    monkeypatch.setattr(config, "DEFAULT_CONFIG", defaults)
    first = config.load_config(None, ["lora.default_rank=4"])
    second = config.load_config()
    assert reads == [defaults] and first.lora.default_rank == 4 and second.lora.default_rank == 8
    config._defaults()["lora"]["default_rank"] = 99  # a caller's copy, not the cache
    assert config.load_config().lora.default_rank == 8 and reads == [defaults]
    defaults.write_text(defaults.read_text().replace("default_rank: 8", "default_rank: 16", 1))  # another size
    assert config.load_config().lora.default_rank == 16 and reads == [defaults, defaults]
