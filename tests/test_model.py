"""LoRA injector, registry, head and functional forward, against PEFT and autograd."""

import copy

import pytest
import torch
import torch.nn.functional as F

import config
import model as M
import utils
from conftest import TINY_MODELS, make_batch

TEXTS = ["book a table for two", "what is my balance", "play some jazz music please",
         "how do i reset my password"]
LABELS = [0, 1, 2, 1]


def targets(name):
    return list(config.load_config().lora.target_modules[M.family_of(name)])


def build(name, dtype=torch.float64, rank=4, dropout=0.0):
    model, tok = M.load_model(name, num_labels=3, dtype=dtype, dropout=0.0)
    wrapped = M.inject_lora(model, rank=rank, alpha=8.0, dropout=dropout, target_modules=targets(name))
    model.eval()
    return model, tok, wrapped


def randomise_lora(model, seed=0):
    """B starts at zero (LoRA is a no-op at init); give it values so tests see the path."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in M.lora_parameters(model).items():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_logits_match_peft(name):
    from peft import LoraConfig, get_peft_model
    model, tok = M.load_model(name, num_labels=3, dtype=torch.float64, dropout=0.0)
    reference = copy.deepcopy(model.backbone)
    wrapped = M.inject_lora(model, rank=4, alpha=8.0, dropout=0.0, target_modules=targets(name))
    randomise_lora(model)
    peft_model = get_peft_model(reference, LoraConfig(
        r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=targets(name),
        fan_in_fan_out=M.family_of(name) == "gpt2"))
    peft_params = dict(peft_model.named_parameters())
    for layer_name in wrapped:
        layer = model.get_submodule(layer_name)
        for factor in ("lora_A", "lora_B"):
            key = f"base_model.model.{layer_name.removeprefix('backbone.')}.{factor}.default.weight"
            with torch.no_grad():
                peft_params[key].copy_(getattr(layer, factor))
    model.eval(), peft_model.eval()
    batch = make_batch(tok, TEXTS, LABELS)
    ours = model(**batch)
    original = model.backbone
    model.backbone = peft_model  # same pooling and head over PEFT's backbone
    try:
        theirs = model(**batch)
    finally:
        model.backbone = original
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert len(wrapped) == sum(1 for _ in peft_model.modules() if hasattr(_, "lora_A")
                               and isinstance(getattr(_, "lora_A"), torch.nn.ModuleDict))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert"])
def test_merge_unmerge_roundtrip(name):
    model, tok, _ = build(name)
    randomise_lora(model)
    batch = make_batch(tok, TEXTS, LABELS)
    before = model(**batch)
    M.merge_lora(model)
    merged = model(**batch)
    M.unmerge_lora(model)
    after = model(**batch)
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, before, atol=1e-10, rtol=1e-10)


def test_only_lora_and_head_train():
    model, _, wrapped = build("tiny-bert")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or n.startswith("head.") for n in trainable)
    assert set(trainable) == set(M.lora_parameters(model))
    assert len(trainable) == 2 * len(wrapped) + 2
    n_trainable, n_total = M.count_parameters(model)
    assert 0 < n_trainable < n_total


def test_lora_init_is_identity_and_scaling():
    model, _, wrapped = build("tiny-gpt2", rank=4)
    layer = model.get_submodule(wrapped[0])
    assert layer.fan_in_fan_out and layer.scaling == 8.0 / 4
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0


def test_unmatched_target_lists_linear_layers():
    model, _ = M.load_model("tiny-bert", num_labels=2)
    with pytest.raises(ValueError, match=r"attention\.self\.query") as info:
        M.inject_lora(model, rank=4, alpha=8, dropout=0.0, target_modules=["attn.c_attn"])
    assert "attn.c_attn" in str(info.value)
    with pytest.raises(ValueError, match="positive integer"):
        M.inject_lora(model, rank=0, alpha=8, dropout=0.0, target_modules=["query"])


def test_unknown_model_names_offline_models():
    with pytest.raises(utils.UserError, match="minilm-l6"):
        M.load_model("no-such-model", num_labels=2)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5"])
def test_functional_forward_grads_match_module(name):
    model, tok, _ = build(name)
    randomise_lora(model)
    batch = make_batch(tok, TEXTS, LABELS)
    theta = M.lora_parameters(model)
    F.cross_entropy(model(**batch), batch["labels"]).backward()
    expected = {n: p.grad.clone() for n, p in theta.items()}
    params = {n: p.detach().clone().requires_grad_() for n, p in theta.items()}
    loss = F.cross_entropy(M.forward(model, params, batch), batch["labels"])
    grads = torch.autograd.grad(loss, list(params.values()))
    for (n, g) in zip(params, grads):
        torch.testing.assert_close(g, expected[n], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert"])
def test_hessian_vector_product_matches_finite_differences(name):
    model, tok, _ = build(name)
    randomise_lora(model)
    batch = make_batch(tok, TEXTS, LABELS)
    params = {n: p.detach().clone().requires_grad_() for n, p in M.lora_parameters(model).items()}
    gen = torch.Generator().manual_seed(1)
    v = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}

    def grad_at(p, create_graph=False):
        loss = F.cross_entropy(M.forward(model, p, batch), batch["labels"])
        return torch.autograd.grad(loss, list(p.values()), create_graph=create_graph)

    with M.second_order_attention():
        g = grad_at(params, create_graph=True)
        hvp = torch.autograd.grad(sum((gi * v[n]).sum() for gi, n in zip(g, params)),
                                  list(params.values()))
    eps = 1e-5
    plus = grad_at({n: (p + eps * v[n]).detach().requires_grad_() for n, p in params.items()})
    minus = grad_at({n: (p - eps * v[n]).detach().requires_grad_() for n, p in params.items()})
    fd = [(a - b) / (2 * eps) for a, b in zip(plus, minus)]
    flat = lambda xs: torch.cat([x.flatten() for x in xs])  # noqa: E731
    torch.testing.assert_close(flat(hvp), flat(fd), atol=1e-6, rtol=1e-5)
    assert flat(hvp).abs().max() > 1e-3


@pytest.mark.parametrize("name", TINY_MODELS)
def test_checkpointing_keeps_first_and_second_order_grads(name):
    model, tok, _ = build(name)
    randomise_lora(model)
    batch = make_batch(tok, TEXTS, LABELS)
    params = {n: p.detach().clone().requires_grad_() for n, p in M.lora_parameters(model).items()}
    v = [torch.ones_like(p) for p in params.values()]

    def grad_and_hvp():
        with M.second_order_attention():
            loss = F.cross_entropy(M.forward(model, params, batch), batch["labels"])
            g = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            hv = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, v)), list(params.values()))
        return [x.detach() for x in g] + list(hv)

    plain = grad_and_hvp()
    assert M.enable_checkpointing(model) == 2
    checkpointed = grad_and_hvp()
    M.disable_checkpointing(model)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert"])
def test_exported_adapter_loads_in_peft(name, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    model, tok, wrapped = build(name)
    randomise_lora(model)
    base = M.load_model(name, num_labels=3, dtype=torch.float64, dropout=0.0)[0].backbone
    out = M.export_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=name)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    peft_backbone = PeftModel.from_pretrained(base, str(out)).eval()
    batch = make_batch(tok, TEXTS, LABELS)
    expected = model(**batch)
    model.head.load_state_dict(load_file(str(out / M.HEAD_WEIGHTS)))
    model.backbone = peft_backbone
    torch.testing.assert_close(model(**batch), expected, atol=1e-5, rtol=1e-5)


def test_minilm_loads_offline_with_plausible_trainable_share():
    model, tok = M.load_model("minilm-l6", num_labels=5)
    M.inject_lora(model, rank=8, alpha=16, dropout=0.1, target_modules=targets("minilm-l6"))
    trainable, total = M.count_parameters(model)
    assert 22_000_000 < total < 24_000_000
    assert 0.001 < trainable / total < 0.02
    logits = model(**make_batch(tok, TEXTS, LABELS))
    assert logits.shape == (4, 5) and torch.isfinite(logits).all()


# ---- checkpointing.enabled: auto ----------------------------------------------------

def auto_cfg(name, *extra):
    return config.load_config(overrides=[f"models.selected_model={name}", "datasets.synthetic_only=true",
                                        "tasks.n_way=3", "tasks.k_shot=2", "tasks.q_query=2",
                                        "models.max_length=16", *extra])


def checkpointed(model):
    return any(hasattr(m, "_melora_forward") for m in model.modules())


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
def test_peak_estimate_follows_the_tensors_autograd_saves(name):
    cfg = auto_cfg(name, "memory_optimization.hessian_approximation.method=none",
                   "memory_optimization.checkpointing.enabled=false",
                   "memory_optimization.gradient_accumulation.default_micro_batch=4")
    model, tok = M.build_model(cfg, torch.device("cpu"))
    batch = make_batch(tok, [" ".join(["word"] * 40)] * 4, [0, 1, 2, 0])
    batch = {k: v[:, :16] if v.dim() == 2 else v for k, v in batch.items()}  # max_length tokens
    saved, weights = {}, {p.data_ptr() for p in model.parameters()}

    def pack(t):
        saved[t.data_ptr()] = t.numel() * t.element_size()
        return t
    leaves = {n: p.detach().requires_grad_() for n, p in M.lora_parameters(model).items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(M.forward(model, leaves, batch), batch["labels"])
    measured = sum(b for ptr, b in saved.items() if ptr not in weights) / 2**20
    estimate = M.estimate_peak_activation_mb(cfg, model)
    assert 0.6 < estimate / measured < 1.6, (estimate, measured)
    # second order holds more, kept graphs more still, smaller micro-batches less
    more = [M.estimate_peak_activation_mb(auto_cfg(name, *o), model) for o in (
        ["memory_optimization.hessian_approximation.method=full"],
        ["memory_optimization.hessian_approximation.method=full",
         "memory_optimization.hessian_approximation.keep_graphs=2"],
        ["memory_optimization.hessian_approximation.method=none",
         "memory_optimization.gradient_accumulation.default_micro_batch=1"])]
    assert more[1] > more[0] > estimate > more[2]


def test_auto_checkpointing_turns_on_only_over_the_budget(caplog):
    device = torch.device("cpu")
    with caplog.at_level("INFO", logger="melora"):
        tight, _ = M.build_model(auto_cfg("tiny-bert", "memory_optimization.checkpointing.cpu_budget_mb=1",
                                                "models.max_length=128"), device)
    assert checkpointed(tight)
    assert "gradient checkpointing on (auto)" in caplog.text and "exceeds the CPU budget of 1 MiB" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="melora"):
        roomy, _ = M.build_model(auto_cfg("tiny-bert"), device)  # default: the OS's available memory
    assert not checkpointed(roomy)
    assert "gradient checkpointing off (auto)" in caplog.text
    assert config.load_config().memory_optimization.checkpointing.enabled == "auto"
    # true and false are obeyed whatever the budget
    forced, _ = M.build_model(auto_cfg("tiny-bert", "memory_optimization.checkpointing.enabled=true"), device)
    assert checkpointed(forced)
    off, _ = M.build_model(auto_cfg("tiny-bert", "memory_optimization.checkpointing.enabled=false",
                                          "memory_optimization.checkpointing.cpu_budget_mb=1",
                                          "models.max_length=128"), device)
    assert not checkpointed(off)
    with pytest.raises(utils.ConfigError, match="must be true, false or auto"):
        auto_cfg("tiny-bert", "memory_optimization.checkpointing.enabled=sometimes")


# ---- LoRA on the top blocks and the frozen-prefix cache -------------------------------

@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
def test_prefix_cache_gives_the_same_meta_gradient(name):
    import trainer
    from test_meta_gradient import QUERY, Q_LABELS, S_LABELS, SUPPORT, flat, relative_error
    model, tok = M.load_model(name, num_labels=3, dtype=torch.float64, dropout=0.0)
    torch.manual_seed(0)
    wrapped = M.inject_lora(model, rank=2, alpha=4.0, dropout=0.0, target_modules=targets(name), layers=[1])
    assert wrapped and all(M._block_index(model, n) == 1 for n in wrapped)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    theta = {n: p.detach() + torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3
             for n, p in M.lora_parameters(model).items()}
    support, query = make_batch(tok, SUPPORT, S_LABELS), make_batch(tok, QUERY, Q_LABELS)
    episodes = [(support, query), (query, support)]
    rates = torch.tensor([0.5, 0.3], dtype=torch.float64, requires_grad=True)

    def gradients():
        out = [trainer.compute_meta_gradient(model, theta, support, query, rates, 2, method, mb,
                                             head_init="zero")
               for method, mb in (("full", 0), ("full", 4), ("none", 2))]
        return out + [trainer.compute_batched_meta_gradient(model, theta, episodes, rates, 2, "full", 4,
                                                            head_init="zero")]
    plain = gradients()
    assert M.enable_prefix_cache(model) == 1
    try:
        cached = gradients()
        cache = model._prefix_cache
        assert cache.misses == len(SUPPORT) + len(QUERY)  # every distinct example ran once
        assert cache.hits > 10 * cache.misses
        assert M.enable_checkpointing(model, lora_only=True) == 1
        try:
            cached.append(trainer.compute_meta_gradient(model, theta, support, query, rates, 2, "full", 4,
                                                        head_init="zero"))
        finally:
            M.disable_checkpointing(model)
    finally:
        M.disable_prefix_cache(model)
    assert not hasattr(model, "_prefix_cache")
    plain.append(plain[1])
    for (loss_a, a), (loss_b, b) in zip(plain, cached):
        assert abs(loss_a.item() - loss_b.item()) < 1e-10
        assert relative_error(flat(b, theta), flat(a, theta)) < 1e-8
        assert relative_error(b["inner_lr"], a["inner_lr"]) < 1e-8


def test_lora_layers_from_the_config(caplog, monkeypatch):
    import logging
    # utils.setup_logging (run by earlier tests) stops propagation to the root logger caplog reads
    monkeypatch.setattr(logging.getLogger("melora"), "propagate", True)
    with caplog.at_level("INFO", logger="melora"):
        model, _ = M.build_model(auto_cfg("tiny-bert", "lora.layers=[1]"), torch.device("cpu"))
    assert model._prefix_cache.first == 1 and "prefix cache" in caplog.text
    assert all(".layer.1." in n for n in M.lora_parameters(model) if not n.startswith("head"))
    plain, _ = M.build_model(auto_cfg("tiny-bert", "lora.layers=[1]",
                                            "memory_optimization.prefix_cache=false"), torch.device("cpu"))
    assert not hasattr(plain, "_prefix_cache")
    with pytest.raises(utils.ConfigError, match=r"lora.layers \[2\] names blocks \[2\].*0..1"):
        M.build_model(auto_cfg("tiny-bert", "lora.layers=[2]"), torch.device("cpu"))


def test_tapped_sees_every_lora_layer_and_the_head_and_cleans_up():
    """`model.tapped` calls the LoRA taps with A x and the LoRA output of each layer, the head
    tap with features and logits, and removes every tap on exit, also after an error."""
    model, tok, _ = build("tiny-gpt2")
    batch = {k: v for k, v in make_batch(tok, TEXTS, LABELS).items() if k != "labels"}
    calls, head = {}, []

    def lora_tap(prefix):
        def tap(layer, x_d, h, out):
            calls[prefix] = (h.shape[-1], out.shape == layer.base_layer(x_d).shape)
        return tap

    with M.tapped(model, lora_tap, lambda f, logits: head.append(logits.shape)):
        model(**batch)
    lora_paths = {f"{p}." for p, m in model.named_modules() if isinstance(m, M.LoRALayer)}
    assert set(calls) == lora_paths and all(v == (4, True) for v in calls.values())
    assert head == [torch.Size([len(TEXTS), 3])]
    with pytest.raises(RuntimeError):
        with M.tapped(model, lora_tap, lambda f, logits: None):
            raise RuntimeError("boom")
    calls.clear()
    model(**batch)
    assert calls == {} and model._head_tap is None
