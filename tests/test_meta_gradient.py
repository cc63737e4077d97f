"""compute_meta_gradient against plain autograd through the unrolled inner loop (float64)."""

import pytest
import torch
import torch.nn.functional as F

import config
import model as M
import trainer
from conftest import make_batch

SUPPORT = ["book a flight to paris", "cancel my hotel room", "what is the weather today",
           "will it rain tomorrow", "play a song by queen", "turn the music up", ]
QUERY = ["reserve a seat on the train", "is it sunny outside", "skip this track",
         "find me a cheap flight", "how cold is it", "put on some jazz"]
S_LABELS, Q_LABELS = [0, 0, 1, 1, 2, 2], [0, 1, 2, 0, 1, 2]


def setup_task(name, seed=0, dropout=0.0, scale=0.3):
    model, tok = M.load_model(name, num_labels=3, dtype=torch.float64, dropout=dropout)
    targets = config.load_config().lora.target_modules[M.family_of(name)]
    torch.manual_seed(seed)  # lora_A's kaiming init draws from the global generator
    M.inject_lora(model, rank=2, alpha=4.0, dropout=dropout, target_modules=targets)
    model.train() if dropout else model.eval()
    gen = torch.Generator().manual_seed(seed)
    theta = {n: (p.detach() + torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
             for n, p in M.lora_parameters(model).items()}
    return model, theta, make_batch(tok, SUPPORT, S_LABELS), make_batch(tok, QUERY, Q_LABELS)


def unrolled_meta_gradient(model, theta, support, query, inner_lr, steps):
    """The textbook MAML meta-gradient: autograd through the whole inner loop."""
    params = {n: t.detach().clone().requires_grad_() for n, t in theta.items()}
    lrs = inner_lr if torch.is_tensor(inner_lr) else [inner_lr] * steps
    phi = dict(params)
    with M.second_order_attention():
        for k in range(steps):
            loss = F.cross_entropy(M.forward(model, phi, support), support["labels"])
            grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
            phi = {n: p - lrs[k] * g for (n, p), g in zip(phi.items(), grads)}
        query_loss = F.cross_entropy(M.forward(model, phi, query), query["labels"])
        inputs = list(params.values()) + ([inner_lr] if torch.is_tensor(inner_lr) else [])
        grads = torch.autograd.grad(query_loss, inputs)
    out = dict(zip(params, grads))
    if torch.is_tensor(inner_lr):
        out["inner_lr"] = grads[-1]
    return query_loss.detach(), out


def flat(grads, names):
    return torch.cat([grads[n].flatten() for n in names])


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert"])
@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_full_equals_unrolled_autograd(name, steps):
    model, theta, support, query = setup_task(name)
    loss, grads = trainer.compute_meta_gradient(model, theta, support, query, 0.5, steps, "full",
                                                head_init="zero")
    ref_loss, ref = unrolled_meta_gradient(model, theta, support, query, 0.5, steps)
    assert abs(loss.item() - ref_loss.item()) < 1e-10
    assert relative_error(flat(grads, theta), flat(ref, theta)) < 1e-6
    # the second-order terms matter here, so first order cannot pass by accident
    _, first = trainer.compute_meta_gradient(model, theta, support, query, 0.5, steps, "none",
                                             head_init="zero")
    assert relative_error(flat(first, theta), flat(ref, theta)) > 1e-3


@pytest.mark.parametrize("name", ["tiny-distilbert", "tiny-t5", "tiny-gpt2", "tiny-bert"])
def test_second_order_with_checkpointing_on_every_family(name):
    model, theta, support, query = setup_task(name, seed=1)
    _, ref = unrolled_meta_gradient(model, theta, support, query, 0.5, 2)
    plain = {m: trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, m, 2, head_init="zero")[1]
             for m in ("gauss_newton", "block_diagonal")}
    assert M.enable_checkpointing(model, lora_only=True) > 0
    try:
        for method in ("full", "gauss_newton", "block_diagonal"):
            _, grads = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, method, 2,
                                                     head_init="zero")
            assert torch.isfinite(flat(grads, theta)).all(), method
            expected = ref if method == "full" else plain[method]
            assert relative_error(flat(grads, theta), flat(expected, theta)) < 1e-6, method
    finally:
        M.disable_checkpointing(model)


@pytest.mark.parametrize("method", ["full", "gauss_newton", "block_diagonal", "none"])
def test_micro_batches_do_not_change_the_result(method):
    model, theta, support, query = setup_task("tiny-gpt2", seed=2)
    results = [trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, method, mb,
                                             head_init="zero")
               for mb in (1, 2, 0)]
    whole = flat(results[-1][1], theta)
    for loss, grads in results[:-1]:
        assert abs(loss.item() - results[-1][0].item()) < 1e-10
        assert relative_error(flat(grads, theta), whole) < 1e-6


def test_hutchinson_diagonal_does_not_depend_on_micro_batches():
    model, theta, support, query = setup_task("tiny-bert", seed=3)
    options = trainer.HessianOptions(diagonal_estimator="hutchinson", hutchinson_probes=2)
    a = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, "diagonal", 1,
                                      hessian=options, seed=5, head_init="zero")[1]
    b = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, "diagonal", 0,
                                      hessian=options, seed=5, head_init="zero")[1]
    assert relative_error(flat(a, theta), flat(b, theta)) < 1e-6


def test_approximations_point_towards_the_exact_meta_gradient():
    # theta near a trained state (small LoRA/head), inner steps large enough for curvature to matter
    model, theta, support, query = setup_task("tiny-bert", seed=4, scale=0.05)
    exact = flat(trainer.compute_meta_gradient(model, theta, support, query, 0.5, 3, "full",
                                               head_init="zero")[1], theta)
    cosine = {}
    for method in ("gauss_newton", "block_diagonal", "diagonal", "none"):
        approx = flat(trainer.compute_meta_gradient(model, theta, support, query, 0.5, 3, method, 1,
                                                    head_init="zero")[1], theta)
        cosine[method] = F.cosine_similarity(approx, exact, dim=0).item()
    print("cosine similarity to the exact meta-gradient:", cosine)
    assert all(c == c for c in cosine.values()), cosine  # no NaN
    assert cosine["gauss_newton"] > 0.9 and cosine["gauss_newton"] > cosine["none"], cosine
    assert cosine["block_diagonal"] > cosine["none"] + 0.5, cosine


def test_learned_inner_rates_get_their_exact_gradient():
    model, theta, support, query = setup_task("tiny-bert", seed=5)
    rates = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64, requires_grad=True)
    _, grads = trainer.compute_meta_gradient(model, theta, support, query, rates, 3, "full", head_init="zero")
    _, ref = unrolled_meta_gradient(model, theta, support, query, rates, 3)
    assert relative_error(grads["inner_lr"], ref["inner_lr"]) < 1e-6
    assert relative_error(flat(grads, theta), flat(ref, theta)) < 1e-6


@pytest.mark.parametrize("steps,micro_batch,head_init", [(1, 0, "zero"), (3, 2, "zero"),
                                                        (2, 4, "proto")])
def test_keeping_graphs_gives_the_same_meta_gradient(steps, micro_batch, head_init):
    # dropout on: a kept graph must hold the same masks the recomputation would replay
    model, theta, support, query = setup_task("tiny-gpt2", seed=13, dropout=0.2)
    rates = torch.tensor([0.5, 0.3, 0.2][:steps], dtype=torch.float64, requires_grad=True)
    options = [trainer.HessianOptions(keep_graphs=n) for n in range(steps + 2)]  # K+1 = all
    options.append(trainer.HessianOptions(keep_last_step=True))  # the alias of keep_graphs=1
    results = [trainer.compute_meta_gradient(model, theta, support, query, rates, steps, "full",
                                             micro_batch, hessian=h, seed=3, head_init=head_init)
               for h in options]
    loss_a, a = results[0]
    for h, (loss_b, b) in zip(options[1:], results[1:]):
        assert abs(loss_a.item() - loss_b.item()) < 1e-12, h
        assert relative_error(flat(b, theta), flat(a, theta)) < 1e-10, h
        assert relative_error(b["inner_lr"], a["inner_lr"]) < 1e-10, h
    assert [h.graphs_kept("full", steps) for h in options] == [*range(steps + 1), steps, min(1, steps)]
    assert options[-2].graphs_kept("diagonal", steps) == 0  # first-order methods keep none


@pytest.mark.parametrize("keep", [0, 1, 2, 3])
def test_every_kept_graph_count_equals_unrolled_autograd(keep):
    # without dropout: every keep_graphs value equals unrolled autograd, alone, with
    # micro-batches, under checkpointing, with the proto head and for batched tasks
    model, theta, support, query = setup_task("tiny-bert", seed=14)
    h = trainer.HessianOptions(keep_graphs=keep)
    _, ref = unrolled_meta_gradient(model, theta, support, query, 0.5, 3)
    for micro_batch in (0, 4):
        _, g = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 3, "full",
                                             micro_batch, hessian=h, head_init="zero")
        assert relative_error(flat(g, theta), flat(ref, theta)) < 1e-6, micro_batch
    assert M.enable_checkpointing(model, lora_only=True) > 0
    try:
        _, g = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 3, "full", 2,
                                             hessian=h, head_init="zero")
    finally:
        M.disable_checkpointing(model)
    assert relative_error(flat(g, theta), flat(ref, theta)) < 1e-6
    _, proto_ref = proto_unrolled(model, theta, support, query, 0.5, 3)
    _, proto = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 3, "full", 4,
                                             hessian=h, head_init="proto")
    assert relative_error(flat(proto, theta), flat(proto_ref, theta)) < 1e-6
    episodes = [(support, query), (query, support)]
    plain = trainer.compute_batched_meta_gradient(model, theta, episodes, 0.5, 3, "full", 4,
                                                  head_init="zero")[1]
    kept = trainer.compute_batched_meta_gradient(model, theta, episodes, 0.5, 3, "full", 4,
                                                 hessian=h, head_init="zero")[1]
    assert relative_error(flat(kept, theta), flat(plain, theta)) < 1e-10


def test_dropout_masks_replay_and_seed_controls_them():
    model, theta, support, query = setup_task("tiny-bert", seed=6, dropout=0.2)
    a = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, "full", seed=11,
                                      head_init="zero")[1]
    b = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, "full", seed=11,
                                      head_init="zero")[1]
    c = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, "full", seed=12,
                                      head_init="zero")[1]
    assert torch.equal(flat(a, theta), flat(b, theta))
    assert not torch.equal(flat(a, theta), flat(c, theta))


def test_metrics_and_zero_steps():
    model, theta, support, query = setup_task("tiny-gpt2", seed=7)
    metrics = {}
    loss, grads = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 0, "full",
                                                metrics=metrics, head_init="zero")
    expected = F.cross_entropy(M.forward(model, theta, query), query["labels"])
    assert abs(loss.item() - expected.item()) < 1e-10
    assert metrics["query_acc_before"] == metrics["query_acc_after"]
    with pytest.raises(ValueError, match="gauss_newton"):
        trainer.compute_meta_gradient(model, theta, support, query, 0.5, 1, "exact", head_init="zero")


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert"])
@pytest.mark.parametrize("method", ["full", "gauss_newton", "diagonal", "none"])
def test_batched_tasks_equal_sequential(name, method):
    model, theta, support, query = setup_task(name, seed=8)
    order = [3, 1, 4, 0, 5, 2]
    other = ({k: v[order] for k, v in support.items()}, {k: v[order[::-1]] for k, v in query.items()})
    episodes = [(support, query), other, (query, support)]  # three different tasks
    rates = torch.tensor([0.5, 0.3], dtype=torch.float64, requires_grad=True)
    m_batched = {}
    loss, grads = trainer.compute_batched_meta_gradient(model, theta, episodes, rates, 2, method, 4,
                                                        metrics=m_batched, head_init="zero")
    ref_loss, ref, m_seq = 0.0, {}, []
    for s, q in episodes:
        m = {}
        l_t, g_t = trainer.compute_meta_gradient(model, theta, s, q, rates, 2, method, 4, metrics=m,
                                                 head_init="zero")
        ref_loss += l_t / 3
        ref = {n: ref.get(n, 0) + g / 3 for n, g in g_t.items()}
        m_seq.append(m)
    assert abs(loss.item() - ref_loss.item()) < 1e-10
    assert relative_error(flat(grads, theta), flat(ref, theta)) < 1e-6
    assert relative_error(grads["inner_lr"], ref["inner_lr"]) < 1e-6
    for key in ("query_acc_after", "query_acc_before"):
        assert abs(m_batched[key] - sum(m[key] for m in m_seq) / 3) < 1e-12


def proto_unrolled(model, theta, support, query, inner_lr, steps):
    """Proto-MAML by plain autograd: head from support prototypes, inside the graph."""
    params = {n: t.detach().clone().requires_grad_() for n, t in theta.items()}
    with M.second_order_attention():
        features = M.forward(model, params, support, features_only=True)
        c = torch.stack([features[support["labels"] == n].mean(0) for n in range(3)])
        phi = dict(params, **{"head.weight": 2 * c, "head.bias": -(c * c).sum(1)})
        # inner steps take partial derivatives in (LoRA, head), the head held as a variable
        # though it depends on the LoRA factors: torch.func.grad treats phi's entries so
        support_loss = lambda p: F.cross_entropy(M.forward(model, p, support), support["labels"])  # noqa: E731
        for _ in range(steps):
            grads = torch.func.grad(support_loss)(phi)
            phi = {n: p - inner_lr * grads[n] for n, p in phi.items()}
        query_loss = F.cross_entropy(M.forward(model, phi, query), query["labels"])
        grads = torch.autograd.grad(query_loss, list(params.values()), allow_unused=True)
    return query_loss.detach(), {n: torch.zeros_like(p) if g is None else g
                                 for (n, p), g in zip(params.items(), grads)}


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert"])
def test_proto_head_init_equals_unrolled_autograd(name):
    model, theta, support, query = setup_task(name, seed=9)
    loss, grads = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, "full", 4,
                                                head_init="proto")
    ref_loss, ref = proto_unrolled(model, theta, support, query, 0.5, 2)
    assert abs(loss.item() - ref_loss.item()) < 1e-10
    assert relative_error(flat(grads, theta), flat(ref, theta)) < 1e-6
    assert torch.count_nonzero(grads["head.weight"]) == 0
    phi_0 = trainer.initial_fast_weights(model, theta, support, "proto")
    features = M.forward(model, theta, support, features_only=True)
    torch.testing.assert_close(phi_0["head.weight"][1], 2 * features[support["labels"] == 1].mean(0))
    # batched tasks build one prototype table per task
    episodes = [(support, query), (query, support)]
    batched = trainer.compute_batched_meta_gradient(model, theta, episodes, 0.5, 2, "full", 0,
                                                    head_init="proto")[1]
    ref_b = [proto_unrolled(model, theta, s, q, 0.5, 2)[1] for s, q in episodes]
    mean = {n: (ref_b[0][n] + ref_b[1][n]) / 2 for n in theta}
    assert relative_error(flat(batched, theta), flat(mean, theta)) < 1e-6


@pytest.mark.parametrize("method", ["none", "diagonal"])
def test_pre_adaptation_accuracy_is_optional_and_changes_nothing_else(method):
    model, theta, support, query = setup_task("tiny-gpt2", seed=15, dropout=0.1)
    with_before, without = {}, {}
    a = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, method, 4, seed=1,
                                      metrics=with_before, head_init="zero")
    b = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, method, 4, seed=1,
                                      metrics=without, acc_before=False, head_init="zero")
    assert "query_acc_before" in with_before and "query_acc_before" not in without
    assert without == {k: v for k, v in with_before.items() if k != "query_acc_before"}
    assert torch.equal(a[0], b[0]) and torch.equal(flat(a[1], theta), flat(b[1], theta))
    # first-order support passes (fused attention kernel) equal the math kernel's, which
    # checkpointed blocks keep
    assert M.enable_checkpointing(model, lora_only=True) > 0
    try:
        c = trainer.compute_meta_gradient(model, theta, support, query, 0.5, 2, method, 4, seed=1,
                                          head_init="zero")
    finally:
        M.disable_checkpointing(model)
    assert relative_error(flat(c[1], theta), flat(a[1], theta)) < 1e-10


@pytest.mark.parametrize("method", ["full", "none"])
@pytest.mark.parametrize("head_init", ["zero", "proto"])
def test_engine_adapt_gives_the_inner_loops_fast_weights(method, head_init):
    """MetaGradient.adapt: phi_K of plain SGD on the support loss from `start` (float64),
    at which the engine's own call evaluates the query loss."""
    model, theta, support, query = setup_task("tiny-bert", seed=4)
    rates = torch.tensor([0.5, 0.3], dtype=torch.float64)
    engine = trainer.MetaGradient(model, rates, 2, method, 4, head_init=head_init)
    phi = engine.start(theta, support)
    for k in range(2):
        leaves = {n: p.detach().requires_grad_() for n, p in phi.items()}
        loss = F.cross_entropy(M.forward(model, leaves, support), support["labels"])
        grads = torch.autograd.grad(loss, list(leaves.values()))
        phi = {n: p.detach() - rates[k] * g for (n, p), g in zip(leaves.items(), grads)}
    fast = engine.adapt(theta, support, seed=0)
    assert list(fast) == list(theta)
    assert relative_error(flat(fast, theta), flat(phi, theta)) < 1e-10
    query_loss, _ = engine(theta, support, query, seed=0)
    expected = F.cross_entropy(M.forward(model, fast, query), query["labels"])
    assert abs(query_loss.item() - expected.item()) < 1e-10


def test_every_second_order_method_has_a_curvature_product():
    assert set(trainer.CURVATURE_PRODUCTS) == set(trainer.HESSIAN_METHODS) - {"none"}
    with pytest.raises(ValueError, match="block_diagonal"):
        trainer.MetaGradient(None, 0.5, 1, "kfac")
