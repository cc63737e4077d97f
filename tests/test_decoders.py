"""Today's decoders (Llama, Qwen2, Mistral, Phi-3, Gemma): tiny random models built from their
configs (no download), against PEFT, plain unrolled autograd in float64, and the real CLI."""

import copy
import json

import pytest
import torch

import config
import main
import model as M
import trainer
import utils
from conftest import make_batch
from test_meta_gradient import (QUERY, Q_LABELS, S_LABELS, SUPPORT, flat, relative_error,
                                setup_task, unrolled_meta_gradient)

DECODERS = ["tiny-llama", "tiny-qwen2"]
TEXTS = ["book a table for two", "what is my balance", "play some jazz music please", "hi"]


def targets(family):
    return list(config.load_config().lora.target_modules[family])


def tiny_decoder(family, seed=0):
    """A MELoRAModel over a random decoder of `family` (float64, MiniLM's vocabulary size)."""
    config, cls = M.tiny_decoder_config(family, vocab=200)
    torch.manual_seed(seed)
    return M.MELoRAModel(cls(config).double().eval(), family, 3, "last", head="euclidean").double()


def local_llama_dir(path, pad_token=False):
    """A llama-layout model directory (config.json, weights, tokenizer), as from the hub;
    its tokenizer has no pad token unless asked (as Llama's own)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(M.minilm_path()))
    if not pad_token:
        tokenizer.pad_token, tokenizer.eos_token = None, "[SEP]"
    config, cls = M.tiny_decoder_config("llama", vocab=len(tokenizer), eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    cls(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


# ---- LoRA and the model -----------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3", "gemma"])
def test_lora_hidden_states_equal_peft(family):
    from peft import LoraConfig, get_peft_model
    model = tiny_decoder(family)
    reference = copy.deepcopy(model.backbone)
    wrapped = M.inject_lora(model, rank=4, alpha=8.0, dropout=0.0, target_modules=targets(family))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in M.lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    peft_model = get_peft_model(reference, LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0,
                                                      target_modules=targets(family))).eval()
    params = dict(peft_model.named_parameters())
    for name in wrapped:
        for factor in ("lora_A", "lora_B"):
            key = f"base_model.model.{name.removeprefix('backbone.')}.{factor}.default.weight"
            with torch.no_grad():
                params[key].copy_(getattr(model.get_submodule(name), factor))
    ids = torch.randint(1, 200, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ours = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    theirs = peft_model(input_ids=ids, attention_mask=mask).last_hidden_state
    with peft_model.disable_adapter():
        plain = peft_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (ours - plain).abs().max() > 1e-3  # the LoRA path changes the states
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-10)
    every_linear = 4 if family == "phi3" else 7
    assert len(wrapped) == every_linear * model.backbone.config.num_hidden_layers


@pytest.mark.parametrize("name", DECODERS)
def test_left_and_right_padding_pool_the_same_last_token(name):
    model, tok = M.load_model(name, num_labels=3, dtype=torch.float64, dropout=0.0)
    model.eval()
    assert tok.padding_side == "right" and model.pooling == "last"
    right = make_batch(tok, TEXTS, [0, 1, 2, 0])
    tok.padding_side = "left"
    left = make_batch(tok, TEXTS, [0, 1, 2, 0])
    assert not torch.equal(left["attention_mask"], right["attention_mask"])
    a = M.forward(model, {}, right, features_only=True)
    b = M.forward(model, {}, left, features_only=True)
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    # pooling a pad position instead would differ
    first = model.backbone(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).last_hidden_state[:, 0]
    assert (first - a).abs().max() > 1e-3


def test_pad_token_rotary_gqa_and_positions_of_a_local_llama_directory(tmp_path):
    path = local_llama_dir(tmp_path / "llama")
    assert M.family_of(str(path)) == "llama"
    model, tok = M.load_model(str(path), num_labels=3)
    assert tok.pad_token == "[SEP]" and tok.padding_side == "right"  # eos pads
    config = model.backbone.config
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert model.pooling == "last"
    M.check_max_length(model, config.max_position_embeddings)
    with pytest.raises(utils.ConfigError, match="128 positions"):
        M.check_max_length(model, config.max_position_embeddings + 1)
    assert [len(b) for b in M._block_lists(model.backbone)] == [config.num_hidden_layers]


def test_bad_model_type_and_unreachable_hub_id_are_one_clear_error(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "mamba"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(utils.UserError, match="'mamba' model; MELoRA supports.*llama.*qwen2"):
        M.load_model(str(bad), num_labels=2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(utils.UserError, match="not in the local Hugging Face cache.*minilm-l6"):
        M.load_model("no-such-owner/no-such-model-xyz", num_labels=2)
    for model, fragment in ((str(bad), "'mamba' model"), ("no-such-owner/no-such-model-xyz", "minilm-l6")):
        capsys.readouterr()
        assert main.main(["--mode", "train", "--model", model, "--synthetic_only",
                          "--output_dir", str(tmp_path / "out")]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert not (tmp_path / "out" / "melora").exists()  # refused before a run folder
    assert M.is_hub_id("Qwen/Qwen2.5-0.5B") and not M.is_hub_id("../x") \
        and not M.is_hub_id("gpt2-small")
    assert M.family_of("qwen2.5-0.5b") == "qwen2" and M.family_of("gemma-2-2b") == "gemma"


def test_a_hub_id_loads_from_the_local_hugging_face_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from transformers import AutoTokenizer
    repo = tmp_path / "hub" / "models--melora-test--tiny-qwen"  # the hub cache's layout
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    tokenizer = AutoTokenizer.from_pretrained(str(M.minilm_path()))
    config, cls = M.tiny_decoder_config("qwen2", len(tokenizer))
    cls(config).save_pretrained(str(snapshot))
    tokenizer.save_pretrained(str(snapshot))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    M._hub_model_type.cache_clear()
    model, tok = M.load_model("melora-test/tiny-qwen", num_labels=3)
    assert M.family_of("melora-test/tiny-qwen") == "qwen2" and model.pooling == "last"
    assert type(model.backbone).__name__ == "Qwen2Model" and tok.pad_token is not None
    M._hub_model_type.cache_clear()


# ---- the exact meta-gradient --------------------------------------------------------------

@pytest.mark.parametrize("name", DECODERS)
def test_exact_meta_gradient_equals_unrolled_autograd(name):
    model, theta, support, query = setup_task(name)
    _, ref = unrolled_meta_gradient(model, theta, support, query, 0.5, 2)
    _, first = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, "none", head_init="zero")
    assert relative_error(flat(first, theta), flat(ref, theta)) > 1e-3  # second order matters
    for micro_batch in (0, 2):
        loss, grads = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, "full",
                                                    micro_batch, head_init="zero")
        assert relative_error(flat(grads, theta), flat(ref, theta)) < 1e-6, micro_batch
    assert M.enable_checkpointing(model, lora_only=True) == 2
    try:
        _, grads = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, "full", 2,
                                                 head_init="zero")
    finally:
        M.disable_checkpointing(model)
    assert relative_error(flat(grads, theta), flat(ref, theta)) < 1e-6


@pytest.mark.parametrize("name", DECODERS)
def test_prefix_cache_and_checkpointing_keep_the_exact_meta_gradient(name):
    model, tok = M.load_model(name, num_labels=3, dtype=torch.float64, dropout=0.0)
    torch.manual_seed(0)
    M.inject_lora(model, rank=2, alpha=4.0, dropout=0.0, target_modules=targets(M.family_of(name)),
                  layers=[1])
    model.eval()
    gen = torch.Generator().manual_seed(0)
    theta = {n: p.detach() + torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3
             for n, p in M.lora_parameters(model).items()}
    support, query = make_batch(tok, SUPPORT, S_LABELS), make_batch(tok, QUERY, Q_LABELS)
    _, ref = unrolled_meta_gradient(model, theta, support, query, 0.5, 2)
    assert M.enable_prefix_cache(model) == 1
    try:
        assert M.enable_checkpointing(model, lora_only=True) == 1
        try:
            _, grads = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, "full", 4,
                                                     head_init="zero")
        finally:
            M.disable_checkpointing(model)
        assert model._prefix_cache.hits > 0
    finally:
        M.disable_prefix_cache(model)
    assert relative_error(flat(grads, theta), flat(ref, theta)) < 1e-6


# ---- the CLI end to end, and the adapter in plain transformers + peft ----------------------

def test_train_evaluate_adapt_export_a_local_llama_directory_through_the_cli(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel
    path = local_llama_dir(tmp_path / "llama")
    sets = [a for s in ["tasks.n_way=3", "tasks.k_shot=2", "tasks.q_query=2", "models.max_length=16",
                        "tracking.mlflow=false", "tracking.tensorboard=false", "evaluation.num_episodes=2",
                        "evaluation.baselines=[]", "evaluation.seeds=1", "evaluation.tuning_trials=0",
                        "evaluation.adaptation_steps=1", "evaluation.child_process=false"]
            for a in ("--set", s)]
    common = ["--model", str(path), "--synthetic_only", "--inner_steps", "1", *sets]
    assert main.main(["--mode", "train", *common, "--num_iterations", "2", "--meta_batch_size", "2",
                      "--output_dir", str(tmp_path / "out"), "--experiment_name", "run"]) == 0
    checkpoint = tmp_path / "out" / "run" / "checkpoints" / "checkpoint_iter_2.pt"
    assert main.main(["--mode", "evaluate", "--checkpoint", str(checkpoint), *sets,
                      "--output_dir", str(tmp_path / "out"), "--experiment_name", "eval"]) == 0
    assert list((tmp_path / "out" / "eval").glob("*.json"))
    support, predict = tmp_path / "support.csv", tmp_path / "predict.csv"
    support.write_text("text,label\ncoffee latte,drink\nespresso please,drink\nrain today,weather\n"
                       "snow and wind,weather\n")
    predict.write_text("text\nhot latte\nheavy rain\n")
    assert main.main(["--mode", "adapt", "--checkpoint", str(checkpoint), "--support", str(support),
                      "--predict", str(predict), "--output_dir", str(tmp_path / "out"),
                      "--experiment_name", "adapt"]) == 0
    rows = (tmp_path / "out" / "adapt" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 3 and all(r.split(",")[1] in ("drink", "weather") for r in rows[1:])
    # docs/adapt.md's plain transformers + peft lines on the adapted folder give the same labels
    from test_adapt import readme_lines
    printed, _ = readme_lines(tmp_path / "out" / "adapt" / "adapted", ["hot latte", "heavy rain"])
    assert printed == [r.split(",")[1] for r in rows[1:]]
    out = tmp_path / "exported"
    assert main.main(["--mode", "export", "--checkpoint", str(checkpoint), "--output_dir", str(out)]) == 0
    # plain transformers + peft: the adapter on the directory's model, last-token pooling, the head
    model, tokenizer, _, _ = trainer.restore_model(checkpoint)
    model.eval()
    batch = dict(tokenizer(["coffee please", "play a song now"], padding=True, return_tensors="pt"))
    batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = model(**batch)
        peft = PeftModel.from_pretrained(AutoModel.from_pretrained(str(path)), str(out)).eval()
        hidden = peft(**batch).last_hidden_state
        pooled = hidden[torch.arange(2), batch["attention_mask"].sum(1) - 1]
        head = load_file(str(out / "head.safetensors"))
        unit = torch.nn.functional.normalize
        logits = head["scale"] * unit(pooled, dim=-1) @ unit(head["weight"], dim=-1).T + head["bias"]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("mlp.gate_proj.lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())


# ---- keep_graphs: auto under a memory budget ------------------------------------------------

def test_keep_graphs_auto_keeps_what_fits_the_budget_with_the_same_meta_gradient(tmp_path, caplog):
    overrides = ["models.selected_model=tiny-llama", "datasets.synthetic_only=true", "tasks.n_way=3",
                 "tasks.k_shot=2", "tasks.q_query=2", "models.max_length=64", "training.precision=fp64",
                 "meta_learning.inner.default_num_steps=3", "meta_learning.default_meta_batch_size=1",
                 "memory_optimization.hessian_approximation.method=full",
                 "memory_optimization.hessian_approximation.keep_graphs=auto",
                 "memory_optimization.gradient_accumulation.default_micro_batch=2",
                 f"training.output_dir={tmp_path}"]
    cfg = config.load_config(overrides=overrides)
    model, _ = M.build_model(cfg, torch.device("cpu"))
    estimates = [M.estimate_peak_activation_mb(cfg, model, k) for k in range(4)]
    assert estimates[0] < estimates[1] < estimates[2] < estimates[3]
    # a budget just above each estimate keeps that many graphs; below the first, none and checkpointing
    budgets = [int(e) + 1 for e in reversed(estimates)] + [int(estimates[0]) - 1]
    expected = [(3, False), (2, False), (1, False), (0, False), (0, True)]
    reference = None
    for budget, (keep, checkpointing) in zip(budgets, expected):
        caplog.clear()
        with caplog.at_level("INFO", logger="melora"):
            tr = trainer.MetaTrainer.from_config(config.load_config(
                overrides=[*overrides, f"memory_optimization.memory_budget_mb={budget}"]), cache_dir=tmp_path)
        plan = tr.model.memory_plan
        assert (plan.keep_graphs, plan.checkpointing) == (keep, checkpointing), budget
        assert tr.hessian.keep_graphs == keep and M.is_checkpointed(tr.model) == checkpointing
        assert f"keep_graphs auto: {keep} of 3 inner steps keep their graph" in caplog.text
        assert f"memory budget of {budget} MiB" in caplog.text
        loss, grads, _ = tr.meta_gradient(tr.sample_tasks(0), 0)
        if reference is None:
            reference = (loss, grads)
        assert abs(loss - reference[0]) < 1e-10
        assert relative_error(flat(grads, reference[1]), flat(reference[1], reference[1])) < 1e-8
    with pytest.raises(utils.ConfigError, match="integer >= 0 or auto"):
        config.load_config(overrides=["memory_optimization.hessian_approximation.keep_graphs=some"])


# ---- a bf16 frozen base under fp32 theta ----------------------------------------------------

def test_bf16_frozen_base_keeps_theta_and_the_meta_gradient_in_fp32():
    # theta near a trained state (at scale 0.3 even the first-order gradient nearly cancels
    # on this random model, and bf16 rounding alone turns it: cosine 0.04 measured)
    model, theta, support, query = setup_task("tiny-llama", scale=0.05)
    model.float()
    theta = {n: t.float() for n, t in theta.items()}
    with torch.no_grad():  # the reference sees the same rounded base weights, in fp32
        for p in model.parameters():
            if not p.requires_grad:
                p.copy_(p.to(torch.bfloat16).float())
    _, reference = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, "full", head_init="zero")
    fp32_mb = M.weights_mb(model)
    assert M.cast_frozen_base(model, torch.bfloat16) > 0
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if n in M.lora_parameters(model))
    assert {d for n, d in dtypes.items() if n not in M.lora_parameters(model)} == {torch.bfloat16}
    assert M.weights_mb(model) < 0.6 * fp32_mb
    loss, grads = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, "full", head_init="zero")
    assert all(g.dtype == torch.float32 for g in grads.values()) and torch.isfinite(loss)
    cosine = torch.nn.functional.cosine_similarity(flat(grads, theta), flat(reference, theta), dim=0)
    assert cosine > 0.995, cosine  # measured 0.99985


def test_bf16_precision_keeps_the_base_in_fp32_on_cpu():
    cfg = config.load_config(overrides=["models.selected_model=tiny-llama", "datasets.synthetic_only=true",
                                       "training.precision=bf16", "models.max_length=16"])
    model, _ = M.build_model(cfg, torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_gpu_check_decoder_bf16_base_runs_on_cpu_and_writes_its_json_where_asked(tmp_path):
    import sys
    sys.path.insert(0, str(M.Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_check
    out = tmp_path / "deep" / "check.json"
    result = gpu_check.main(["--device", "cpu", "--quick", "--checks", "decoder_bf16_base",
                             "--output", str(out)])
    (entry,) = json.loads(out.read_text())["checks"]
    assert entry["name"] == "decoder_bf16_base" and entry["status"] == gpu_check.NO_CUDA
    assert entry["cosine"] > 0.99 and entry["theta_and_meta_gradient_fp32"] and result["failed"] == []
    assert entry["bf16_weights_mb"] < 0.6 * entry["fp32_weights_mb"]
    assert entry["shape"]["num_key_value_heads"] < entry["shape"]["num_attention_heads"]
    assert "| decoder_bf16_base |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        gpu_check.main(["--checks", "no_such_check", "--output", str(out)])
