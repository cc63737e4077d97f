"""The task heads (meta_learning.head): euclidean (linear / Proto-MAML) and scaled cosine.

The cosine head's exact meta-gradient (temperature included) is checked against plain
autograd through the unrolled inner loop in float64, as tests/test_meta_gradient.py does
for the linear head.
"""

import pytest
import torch
import torch.nn.functional as F

import config
import evaluation
import main
import model as M
import trainer
import utils
from conftest import make_batch
from test_meta_gradient import QUERY, Q_LABELS, SUPPORT, S_LABELS, flat, relative_error


def cosine_task(name, seed=0, scale=0.3, head_scale=4.0):
    model, tok = M.load_model(name, num_labels=3, dtype=torch.float64, dropout=0.0,
                              head="cosine", head_scale=head_scale)
    targets = config.load_config().lora.target_modules[M.family_of(name)]
    torch.manual_seed(seed)
    M.inject_lora(model, rank=2, alpha=4.0, dropout=0.0, target_modules=targets)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    theta = {n: (p.detach() + torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
             for n, p in M.lora_parameters(model).items()}
    return model, theta, make_batch(tok, SUPPORT, S_LABELS), make_batch(tok, QUERY, Q_LABELS)


def cosine_proto_unrolled(model, theta, support, query, inner_lr, steps):
    """Cosine Proto-MAML by plain autograd: W = prototypes, b = 0, temperature from theta."""
    params = {n: t.detach().clone().requires_grad_() for n, t in theta.items()}
    lrs = inner_lr if torch.is_tensor(inner_lr) else [inner_lr] * steps
    with M.second_order_attention():
        features = M.forward(model, params, support, features_only=True)
        c = torch.stack([features[support["labels"] == n].mean(0) for n in range(3)])
        phi = dict(params, **{"head.weight": c, "head.bias": torch.zeros_like(params["head.bias"])})
        support_loss = lambda p: F.cross_entropy(M.forward(model, p, support), support["labels"])  # noqa: E731
        for k in range(steps):
            grads = torch.func.grad(support_loss)(phi)  # partials in every fast weight
            phi = {n: p - lrs[k] * grads[n] for n, p in phi.items()}
        query_loss = F.cross_entropy(M.forward(model, phi, query), query["labels"])
        inputs = list(params.values()) + ([inner_lr] if torch.is_tensor(inner_lr) else [])
        grads = torch.autograd.grad(query_loss, inputs, allow_unused=True)
    out = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}
    if torch.is_tensor(inner_lr):
        out["inner_lr"] = grads[-1]
    return query_loss.detach(), out


def test_cosine_logits_are_scaled_cosines_and_the_scale_is_in_theta():
    model, theta, support, _ = cosine_task("tiny-bert", seed=1)
    assert "head.scale" in theta and theta["head.scale"].shape == ()
    features = M.forward(model, theta, support, features_only=True)
    logits = M.forward(model, theta, support)
    expected = theta["head.scale"] * F.cosine_similarity(
        features.unsqueeze(1), theta["head.weight"].unsqueeze(0), dim=-1) + theta["head.bias"]
    torch.testing.assert_close(logits, expected)
    # the euclidean head keeps its two tensors (checkpoints of earlier runs still load)
    plain, _ = M.load_model("tiny-bert", num_labels=3)
    assert sorted(M.lora_parameters(plain)) == ["head.bias", "head.weight"]
    with pytest.raises(ValueError, match="euclidean, cosine"):
        M.load_model("tiny-bert", num_labels=3, head="dot")


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert"])
@pytest.mark.parametrize("steps", [1, 3])
def test_cosine_head_full_meta_gradient_equals_unrolled_autograd(name, steps):
    model, theta, support, query = cosine_task(name, seed=2)
    metrics = {}
    loss, grads = trainer.compute_meta_gradient(model, theta, support, query, 0.5, steps, "full", 4,
                                                head_init="proto", metrics=metrics)
    ref_loss, ref = cosine_proto_unrolled(model, theta, support, query, 0.5, steps)
    assert abs(loss.item() - ref_loss.item()) < 1e-10
    assert relative_error(flat(grads, theta), flat(ref, theta)) < 1e-6
    # the temperature is meta-learned: its gradient is exact and not zero; theta's W, b are unused
    assert abs(grads["head.scale"].item()) > 1e-6
    assert abs(grads["head.scale"].item() - ref["head.scale"].item()) < 1e-6 * abs(ref["head.scale"].item())
    assert torch.count_nonzero(grads["head.weight"]) == 0 and torch.count_nonzero(grads["head.bias"]) == 0
    # second order matters here, so first order cannot pass by accident
    _, first = trainer.compute_meta_gradient(model, theta, support, query, 0.5, steps, "none", 4,
                                             head_init="proto")
    assert relative_error(flat(first, theta), flat(ref, theta)) > 1e-3


def test_cosine_head_learned_rates_and_batched_tasks():
    model, theta, support, query = cosine_task("tiny-bert", seed=3)
    rates = torch.tensor([0.5, 0.2], dtype=torch.float64, requires_grad=True)
    _, grads = trainer.compute_meta_gradient(model, theta, support, query, rates, 2, "full",
                                             head_init="proto")
    _, ref = cosine_proto_unrolled(model, theta, support, query, rates, 2)
    assert relative_error(grads["inner_lr"], ref["inner_lr"]) < 1e-6
    assert relative_error(flat(grads, theta), flat(ref, theta)) < 1e-6
    # batched tasks: per-task heads and temperatures (T, ...), the mean of the tasks' gradients
    episodes = [(support, query), (query, support)]
    batched = trainer.compute_batched_meta_gradient(model, theta, episodes, 0.5, 2, "full", 0,
                                                    head_init="proto")[1]
    refs = [cosine_proto_unrolled(model, theta, s, q, 0.5, 2)[1] for s, q in episodes]
    mean = {n: (refs[0][n] + refs[1][n]) / 2 for n in theta}
    assert relative_error(flat(batched, theta), flat(mean, theta)) < 1e-6


def test_cosine_head_block_diagonal_keeps_the_lora_blocks():
    """K-FAC models linear maps: with the cosine head it drops the head's curvature only."""
    model, theta, support, query = cosine_task("tiny-gpt2", seed=5)
    kfac = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, "block_diagonal", 2,
                                         head_init="proto")[1]
    none = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, "none", 2,
                                         head_init="proto")[1]
    assert torch.isfinite(flat(kfac, theta)).all()
    assert relative_error(flat(kfac, theta), flat(none, theta)) > 1e-3  # the LoRA blocks act
    config.load_config(overrides=["meta_learning.head=cosine", "meta_learning.head_init=proto",
                                 "memory_optimization.hessian_approximation.method=block_diagonal"])


def test_cosine_head_starts_at_prototypes():
    model, theta, support, _ = cosine_task("tiny-gpt2", seed=4)
    phi_0 = trainer.initial_fast_weights(model, theta, support, "proto")
    features = M.forward(model, theta, support, features_only=True)
    torch.testing.assert_close(phi_0["head.weight"][2], features[support["labels"] == 2].mean(0))
    assert torch.count_nonzero(phi_0["head.bias"]) == 0
    assert phi_0["head.scale"].item() == theta["head.scale"].item()


@pytest.mark.parametrize("override,match", [
    (["meta_learning.head_init=zero"], "head_init: proto"),
    (["meta_learning.head_scale=0.0"], "head_scale"),
])
def test_cosine_head_config_errors(override, match):
    with pytest.raises(utils.ConfigError, match=match):
        config.load_config(overrides=["meta_learning.head=cosine", "meta_learning.head_init=proto",
                                     *override])
    with pytest.raises(utils.ConfigError, match="euclidean, cosine"):
        config.load_config(overrides=["meta_learning.head=dot"])


def test_cosine_head_trains_and_evaluates_through_the_cli(tmp_path):
    """meta_learning.head=cosine: training learns the temperature, evaluation rebuilds the head."""
    tiny = ["datasets.synthetic_only=true", "tasks.n_way=3", "tasks.k_shot=2", "tasks.q_query=2",
            "models.max_length=16", "meta_learning.default_meta_batch_size=2",
            "meta_learning.inner.default_num_steps=2", "meta_learning.inner.default_lr=0.5",
            "tracking.mlflow=false", "tracking.tensorboard=false", "meta_learning.head=cosine",
            "meta_learning.head_init=proto", "memory_optimization.hessian_approximation.method=full",
            "synthetic.keyword_prob=0.9", "synthetic.class_overlap=0.0", "synthetic.noise=0.0",
            "meta_learning.outer.default_lr=0.01"]
    sets = [arg for item in tiny for arg in ("--set", item)]
    out = tmp_path / "train"
    assert main.main(["--mode", "train", "--model", "tiny-bert", "--num_iterations", "2",
                      "--output_dir", str(out), "--experiment_name", "run", *sets]) == 0
    checkpoint = out / "run" / "checkpoints" / "checkpoint_iter_2.pt"
    state = torch.load(checkpoint, weights_only=True)
    assert state["theta"]["head.scale"].item() != 10.0  # the outer step moved the temperature
    cfg = config.load_config(overrides=[f"training.output_dir={tmp_path}", "evaluation.num_episodes=4",
                                       "evaluation.adaptation_steps=2", "evaluation.child_process=false",
                                       "tracking.mlflow=false", "tracking.tensorboard=false"])
    results = evaluation.run_evaluation(cfg, checkpoint, True, tmp_path)
    assert results["config"]["meta_learning"]["head"] == "cosine"
    curve = results["methods"]["melora"]["accuracy_per_step"]["mean"]
    assert len(curve) == 3 and curve[0] > 0.6  # prototypes of an easy task, not chance (1/3)


def test_configs_saved_before_the_head_key_build_the_euclidean_head():
    """trainer.restore_model reads a checkpoint's saved config as is: older ones lack the key."""
    data = config.load_config(overrides=["models.selected_model=tiny-bert"]).to_dict()
    del data["meta_learning"]["head"], data["meta_learning"]["head_scale"]
    model, _ = M.build_model(config.Config(data), torch.device("cpu"))
    assert model.head_kind == "euclidean" and "head.scale" not in M.lora_parameters(model)
