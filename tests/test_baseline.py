"""Baselines: each learns an easy synthetic task; MAML's meta-gradient is the exact one."""

import numpy as np
import pytest
import torch

import baseline as B
import config
import evaluation
import model as M
import trainer
import utils

EASY = ["models.selected_model=tiny-bert", "datasets.synthetic_only=true", "tasks.n_way=3",
        "tasks.k_shot=4", "tasks.q_query=4", "models.max_length=16",
        "synthetic.keyword_prob=0.9", "synthetic.class_overlap=0.0", "synthetic.noise=0.0",
        "synthetic.words_per_example=6", "synthetic.keywords_per_class=2", "lora.dropout=0.0",
        "meta_learning.inner.default_num_steps=3", "meta_learning.default_meta_batch_size=2"]
# Full-weight SGD needs a smaller rate than LoRA + head (from a proto head, large steps on
# every weight overshoot; evaluation tunes each rate on meta-val).
INNER_LR = {"maml": 0.002, "fomaml": 0.002, "reptile": 0.002}
CHANCE = 1 / 3



@pytest.mark.parametrize("name", B.BASELINES)
def test_each_baseline_learns_an_easy_task(name, tmp_path):
    cfg = config.load_config(overrides=EASY + [f"training.output_dir={tmp_path}",
                                              f"meta_learning.inner.default_lr={INNER_LR.get(name, 0.5)}"])
    method, tokenizer = B.build_baseline(name, cfg, torch.device("cpu"))
    loader = evaluation._loader(cfg, tokenizer, baselines=True)
    method.meta_train(loader, iterations=2, meta_batch_size=2)
    curves = np.array([method.adapt(loader.episode("meta_test", i), 3) for i in range(4)])
    assert curves.shape == (4, 4) and ((0 <= curves) & (curves <= 1)).all()
    assert curves[:, 3].mean() > CHANCE + 0.3, curves


def test_unknown_baseline_is_named(tmp_path):
    cfg = config.load_config(overrides=EASY + [f"training.output_dir={tmp_path}"])
    with pytest.raises(utils.ConfigError, match="'mamlx'.*protonet"):
        B.build_baseline("mamlx", cfg, torch.device("cpu"))


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile"])
@pytest.mark.parametrize("head", ["cosine", "euclidean"])
def test_full_weight_baselines_use_the_configured_head(name, head, tmp_path):
    """Every method adapts with `meta_learning.head`, as MELoRA and the LoRA baselines do
    (issue 25: the full-weight baselines were Euclidean whatever the config said), and
    their proto head starts where trainer.initial_fast_weights starts it."""
    cfg = config.load_config(overrides=EASY + [f"training.output_dir={tmp_path}",
                                              f"meta_learning.head={head}"])
    method, tokenizer = B.build_baseline(name, cfg, torch.device("cpu"))
    assert method.model.head_kind == head
    support = evaluation._loader(cfg, tokenizer, baselines=True).episode("meta_test", 0).support
    start = method.start(support)
    if head == "cosine":
        assert torch.count_nonzero(start[M.HEAD_BIAS]) == 0
    if name != "reptile":  # MAML's differentiable head equals the evaluation-time one
        proto = B.proto_head(method.model, method.theta, support)
        for key in (M.HEAD_WEIGHT, M.HEAD_BIAS):
            assert torch.allclose(proto[key], start[key], atol=1e-5), key


# ---- MAML against an independent meta-gradient -----------------------------------------

@pytest.fixture(scope="module")
def task64():
    """A float64 tiny BERT without dropout and one 3-way task."""
    model, tokenizer = M.load_model("tiny-bert", 3, dtype=torch.float64, dropout=0.0)
    texts = ["kabo tesu", "kabo rimo", "tesu dafe", "lumi sana", "sana pofi", "lumi kero"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    data = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    support = {k: v[:3] for k, v in data.items()} | {"labels": torch.tensor([0, 1, 2])}
    query = {k: v[3:] for k, v in data.items()} | {"labels": torch.tensor([2, 0, 1])}
    with torch.no_grad():  # a non-zero head, so every path of the graph carries gradient
        model.head.weight.normal_(0, 0.1)
    return model, support, query


def used_parameters(model):
    """Every weight but BERT's pooler (unused by the head; the reference needs all used)."""
    return {n: p for n, p in model.named_parameters() if ".pooler." not in n}


class _Episode:
    def __init__(self, support, query):
        self.support, self.query = support, query


@pytest.mark.parametrize("first_order,method", [(False, "full"), (True, "none")])
def test_maml_meta_gradient_equals_reverse_recomputation(task64, first_order, method):
    """Unrolled autograd over ALL weights == trainer's reverse-mode HVP recomputation."""
    model, support, query = task64
    theta = used_parameters(model)
    maml = B.MAML(model, theta, inner_lr=0.1, inner_steps=2, outer_lr=1e-3, grad_clip=0.0,
                  first_order=first_order, head_init="zero")
    loss, grads = maml.meta_gradient([_Episode(support, query)])
    ref_loss, ref = trainer.compute_meta_gradient(model, theta, support, query, 0.1, 2, method=method,
                                                  head_init="zero")
    assert loss == pytest.approx(float(ref_loss), rel=1e-10)
    ours = torch.cat([g.reshape(-1) for g in grads])
    theirs = torch.cat([ref[n].reshape(-1) for n in theta])
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-12)
    assert ours.norm() > 0


def test_second_order_terms_matter(task64):
    """MAML and FOMAML differ on the same task (the test above is not vacuous)."""
    model, support, query = task64
    theta = used_parameters(model)
    ep = [_Episode(support, query)]
    g2 = B.MAML(model, theta, 0.1, 2, 1e-3, 0.0, head_init="zero").meta_gradient(ep)[1]
    g1 = B.FOMAML(model, theta, 0.1, 2, 1e-3, 0.0, head_init="zero").meta_gradient(ep)[1]
    assert not all(torch.allclose(a, b) for a, b in zip(g1, g2))


def test_meta_step_without_update_leaves_theta(task64):
    model, support, query = task64
    theta = dict(model.named_parameters())
    before = {n: t.detach().clone() for n, t in theta.items()}
    for method in (B.MAML(model, theta, 0.1, 2, 1e-3, 1.0, head_init="zero"),
                   B.Reptile(model, theta, 0.1, 2, 1e-3, 1.0, head_init="zero")):
        method.meta_step([_Episode(support, query)], update=False)
    assert all(torch.equal(before[n], t) for n, t in theta.items())


def test_protonet_is_nearest_prototype(task64):
    """Against a direct numpy computation on the same features."""
    model, support, query = task64
    proto = B.ProtoNet(model)
    ep = _Episode(support, query)
    with torch.no_grad():
        s, q = proto.features(support).numpy(), proto.features(query).numpy()
    centres = np.stack([s[support["labels"].numpy() == c].mean(0) for c in range(3)])
    expected = (((q[:, None] - centres[None]) ** 2).sum(-1).argmin(1) == query["labels"].numpy()).mean()
    assert proto.adapt(ep, 2) == [pytest.approx(expected)] * 3


# ---- one head init for every method; the controls ----------------------------------------

def test_proto_head_init_is_the_same_tensor_for_every_method(tmp_path):
    """Before meta-training every method's features are the pretrained model's (LoRA B = 0),
    so every gradient-based method starts the episode from the same prototype head,
    computed with dropout off (LoRA dropout 0.3 here, model in train mode)."""
    cfg = config.load_config(overrides=EASY + [f"training.output_dir={tmp_path}", "lora.dropout=0.3",
                                              "evaluation.head_init=proto", "meta_learning.head=euclidean"])
    heads = {}
    for name in B.GRADIENT_BASED:
        if name == "melora":
            model, tokenizer = M.build_model(cfg, torch.device("cpu"))
            method = B.MELoRA(model, 0.1, 3, "full", head_init="proto")
        else:
            method, tokenizer = B.build_baseline(name, cfg, torch.device("cpu"))
        assert method.head_init == "proto" and method.model.training
        episode = evaluation._loader(cfg, tokenizer, baselines=False).episode("meta_test", 0)
        torch.manual_seed(123)
        first = method.start(episode.support)
        torch.manual_seed(456)  # another dropout stream: no effect, dropout is off
        second = method.start(episode.support)
        assert torch.equal(first["head.weight"], second["head.weight"]), name
        heads[name] = (first["head.weight"], first["head.bias"])
    model, _ = M.load_model("tiny-bert", 3)
    with torch.no_grad(), trainer.dropout_off(model):
        features = model.embed(episode.support["input_ids"], episode.support["attention_mask"])
    labels = episode.support["labels"]
    c = torch.stack([features[labels == k].mean(0) for k in range(3)])
    for name, (w, b) in heads.items():
        assert torch.allclose(w, 2 * c, atol=1e-5), name
        assert torch.allclose(b, -(c * c).sum(1), atol=1e-5), name


def test_maml_meta_trains_through_the_proto_head(task64):
    """MAML's differentiable prototype head equals the evaluation-time one, and its
    meta-gradient reaches the backbone through the prototypes (head grad is zero)."""
    model, support, query = task64
    theta = {n: p.detach().clone().requires_grad_() for n, p in used_parameters(model).items()}
    maml = B.MAML(model, theta, 0.1, 1, 1e-3, 0.0, head_init="proto")
    head = B.proto_head(model, theta, support)
    start = maml.start(support)
    assert torch.allclose(head["head.weight"], start["head.weight"], atol=1e-10)
    _, grads = maml.meta_gradient([_Episode(support, query)])
    by_name = dict(zip(theta, grads))
    assert torch.count_nonzero(by_name["head.weight"]) == 0
    assert by_name["backbone.embeddings.word_embeddings.weight"].norm() > 0


@pytest.mark.parametrize("name", ["proto_lora", "fomaml_lora"])
def test_controls_meta_training_lowers_the_query_loss(name, tmp_path):
    """proto_lora (K = 0) and fomaml_lora meta-train theta with MELoRA's engine."""
    cfg = config.load_config(overrides=EASY + [f"training.output_dir={tmp_path}",
                                              "synthetic.keyword_prob=0.5", "synthetic.noise=0.0"])
    method, tokenizer = B.build_baseline(name, cfg, torch.device("cpu"), inner_lr=0.02, outer_lr=0.005)
    assert method.inner_steps == (0 if name == "proto_lora" else 3) and method.hessian == "none"
    loader = evaluation._loader(cfg, tokenizer, baselines=True)
    tasks = [loader.episode("meta_train", i) for i in range(4)]
    before = {n: t.detach().clone() for n, t in method.theta.items()}
    loss_before = method.meta_step(tasks, update=False)
    method.meta_train(loader, iterations=4, meta_batch_size=2)
    assert any(not torch.equal(before[n], t) for n, t in method.theta.items())
    assert method.meta_step(tasks, update=False) < loss_before
