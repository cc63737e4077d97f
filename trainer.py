"""Meta-learning over LoRA: the exact, memory-lean meta-gradient and the training loop.

theta = {LoRA factors, head}. For each task, K inner steps on the support set,
phi_{k+1} = phi_k - a_k grad L_S(phi_k), then the query loss L_Q(phi_K). The exact
meta-gradient (Finn et al., 2017, MAML) is

    g = (I - a_0 H_0) ... (I - a_{K-1} H_{K-1}) grad L_Q(phi_K),   H_k = hessian of L_S at phi_k

computed in reverse without keeping the inner graphs (see DESIGN.md).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

import model as M

log = logging.getLogger("melora")

HESSIAN_METHODS = ("full", "gauss_newton", "block_diagonal", "diagonal", "none")

# ====================================================================================
# Meta-gradient
# ====================================================================================

Params = dict  # name -> tensor (LoRA factors and head), as in `model.lora_parameters`


@dataclass(frozen=True)
class HessianOptions:
    """How `diagonal` estimates curvature (memory_optimization.hessian_approximation)."""
    diagonal_estimator: str = "fisher"   # fisher (micro-batch gradients) or hutchinson
    hutchinson_probes: int = 1


def compute_meta_gradient(model: M.MELoRAModel, theta: Mapping[str, torch.Tensor],
                          support: Mapping[str, torch.Tensor], query: Mapping[str, torch.Tensor],
                          inner_lr: float | torch.Tensor, inner_steps: int, method: str = "full",
                          micro_batch: int = 0, *, metrics: dict | None = None,
                          hessian: HessianOptions = HessianOptions(), seed: int | None = None,
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Meta-gradient of one task's query loss after `inner_steps` adaptation steps.

    Reverse recomputation (DESIGN.md): the forward sweep keeps only phi_0..phi_K; the
    backward sweep recomputes one inner step at a time and applies (I - a_k H_k) to the
    adjoint v with one Hessian-vector product (or its approximation, by `method`), so
    peak memory is one step's graph whatever K is.

    Args:
        model: a LoRA-wrapped `model.MELoRAModel`; its own parameters are not touched.
        theta: LoRA and head tensors keyed by their `named_parameters` names.
        support, query: dicts with `input_ids`, `attention_mask` (right-padded), `labels`.
        inner_lr: a float a, or a tensor (inner_steps,) of learned per-step rates a_k.
        inner_steps: K >= 0.
        method: full (exact), gauss_newton, block_diagonal, diagonal or none (first order).
        micro_batch: examples per micro-batch; 0 or >= the set size = the whole set.
            Gradients and curvature products accumulate, so results do not depend on it
            (except `diagonal` with the fisher estimator, which is built from them).
        metrics: when a dict, filled with `query_acc_before` (at theta), `query_acc_after`
            (at phi_K) and `support_loss` (at theta).
        hessian: options of the `diagonal` estimator.
        seed: seeds dropout; every recomputation of a step replays the same masks. None
            draws one from torch's global generator.

    Returns:
        (query_loss at phi_K, {name: d query_loss / d theta[name]}); with a tensor
        `inner_lr`, the dict also holds `"inner_lr"`, the gradient for the rates.

    Example:
        >>> loss, grads = compute_meta_gradient(model, lora_parameters(model), support,
        ...                                     query, inner_lr=0.01, inner_steps=3)
    """
    if method not in HESSIAN_METHODS:
        raise ValueError(f"method must be one of {', '.join(HESSIAN_METHODS)}, got {method!r}")
    names = list(theta)
    lrs = _step_rates(inner_lr, inner_steps)
    seed = int(torch.randint(0, 2**62, ())) if seed is None else seed
    task = _Task(model, names, support, query, micro_batch, seed)

    # 1. Forward sweep: phi_{k+1} = phi_k - a_k grad L_S(phi_k); keep phi_k only.
    phis, grads_s, diags = [[t.detach() for t in theta.values()]], [], []
    for k in range(inner_steps):
        g, loss, diag = task.support_grad(phis[k], k, fisher=method == "diagonal"
                                          and hessian.diagonal_estimator == "fisher")
        if k == 0 and metrics is not None:
            metrics["support_loss"] = loss
        phis.append([p - lrs[k] * gi for p, gi in zip(phis[k], g)])
        grads_s.append(g if torch.is_tensor(inner_lr) else None)
        diags.append(diag)

    # 2. Outer loss and its gradient at phi_K: the adjoint v = dL_Q / dphi_K.
    query_loss, v, acc_after = task.query_grad(phis[-1])

    # 3. Backward sweep: v <- (I - a_k H_k) v, one step's graph at a time.
    lr_grad = torch.zeros(inner_steps, dtype=phis[0][0].dtype) if torch.is_tensor(inner_lr) else None
    for k in reversed(range(inner_steps)):
        if lr_grad is not None:
            lr_grad[k] = -sum((gi * vi).sum() for gi, vi in zip(grads_s[k], v))  # dL/da_k
        if method != "none":
            hv = task.curvature_product(method, phis[k], v, k, diags[k], hessian)
            v = [vi - lrs[k] * hvi for vi, hvi in zip(v, hv)]

    if metrics is not None:
        metrics["query_acc_after"] = acc_after
        metrics["query_acc_before"] = task.accuracy(phis[0], query)
    grads = dict(zip(names, v))
    if lr_grad is not None:
        grads["inner_lr"] = lr_grad.to(inner_lr.device)
    return query_loss, grads


def _step_rates(inner_lr, inner_steps: int) -> list:
    if torch.is_tensor(inner_lr):
        if inner_lr.numel() != inner_steps:
            raise ValueError(f"inner_lr has {inner_lr.numel()} rates for {inner_steps} inner steps")
        return [a for a in inner_lr.detach().reshape(-1)]
    return [float(inner_lr)] * inner_steps


class _Task:
    """One task's support/query sets, split into micro-batches, with replayable dropout."""

    def __init__(self, model, names, support, query, micro_batch, seed):
        self.model, self.names, self.seed = model, names, seed
        self.support = _micro_batches(support, micro_batch)
        self.query = _micro_batches(query, micro_batch)
        self.n_support = int(support["labels"].numel())
        self.n_query = int(query["labels"].numel())
        self.device = support["input_ids"].device

    # -- losses ---------------------------------------------------------------------
    def _loss(self, phi, chunk, n_total, step, index):
        """Sum of the chunk's cross-entropies / n_total, so chunks add up to the mean loss."""
        with self._dropout_rng(step, index):
            logits = M.forward(self.model, dict(zip(self.names, phi)), chunk)
        return F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16)
                               else logits, chunk["labels"], reduction="sum") / n_total, logits

    @contextlib.contextmanager
    def _dropout_rng(self, step, index):
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((self.seed + 1_000_003 * step + 7919 * index) % 2**63)
            yield

    def _leaves(self, phi):
        return [p.detach().requires_grad_() for p in phi]

    # -- first order ----------------------------------------------------------------
    def support_grad(self, phi, step, fisher=False):
        """grad L_S(phi), L_S(phi), and the empirical-Fisher diagonal when asked."""
        leaves, grad, total, diag = self._leaves(phi), None, 0.0, None
        for i, chunk in enumerate(self.support):
            loss, _ = self._loss(leaves, chunk, self.n_support, step, i)
            g = torch.autograd.grad(loss, leaves)
            grad = list(g) if grad is None else [a + b for a, b in zip(grad, g)]
            total += loss.item()
            if fisher:
                # Chunk m's mean gradient gbar_m = g * N / n_m; n_m * gbar_m^2 estimates the
                # per-example second moment; weighted by n_m / N that sums to N * g^2.
                # With micro_batch 1 this is the empirical Fisher (1/N) sum_i grad l_i^2.
                share = [self.n_support * gi ** 2 for gi in g]
                diag = share if diag is None else [a + b for a, b in zip(diag, share)]
        return grad, total, diag

    def query_grad(self, phi):
        """(L_Q(phi), grad L_Q(phi), accuracy at phi)."""
        leaves, grad, total, correct = self._leaves(phi), None, 0.0, 0
        for i, chunk in enumerate(self.query):
            loss, logits = self._loss(leaves, chunk, self.n_query, QUERY_STEP, i)
            g = torch.autograd.grad(loss, leaves)
            grad = list(g) if grad is None else [a + b for a, b in zip(grad, g)]
            total += loss.detach()
            correct += int((logits.argmax(-1) == chunk["labels"]).sum())
        return total, grad, correct / self.n_query

    @torch.no_grad()
    def accuracy(self, phi, batch):
        logits = M.forward(self.model, dict(zip(self.names, phi)), batch)
        return (logits.argmax(-1) == batch["labels"]).float().mean().item()

    # -- second order ---------------------------------------------------------------
    def curvature_product(self, method, phi, v, step, diag, hessian):
        """H_k v (or its approximation) at phi_k for the support loss."""
        if method == "diagonal":
            if hessian.diagonal_estimator == "hutchinson":
                diag = self.hutchinson_diagonal(phi, step, hessian.hutchinson_probes)
            return [d * vi for d, vi in zip(diag, v)]
        product = {"full": self._hvp, "gauss_newton": self._gnvp,
                   "block_diagonal": self._kfac_product}[method]
        with M.second_order_attention():
            return product(phi, v, step)

    def _hvp(self, phi, v, step):
        """Exact Hessian-vector product: one double backward per micro-batch."""
        leaves, out = self._leaves(phi), [torch.zeros_like(p) for p in phi]
        for i, chunk in enumerate(self.support):
            loss, _ = self._loss(leaves, chunk, self.n_support, step, i)
            g = torch.autograd.grad(loss, leaves, create_graph=True)
            hv = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), leaves)
            out = [a + b for a, b in zip(out, hv)]
        return out

    def _gnvp(self, phi, v, step):
        """Gauss-Newton-vector product J^T H_logits J v, H_logits = (diag(p) - p p^T) / n."""
        leaves, out = self._leaves(phi), [torch.zeros_like(p) for p in phi]
        for i, chunk in enumerate(self.support):
            with self._dropout_rng(step, i):
                logits = M.forward(self.model, dict(zip(self.names, leaves)), chunk)  # (B, N)
            # J v by the double-vjp trick: u -> J^T u is linear, its vjp with v is J v.
            u = torch.zeros_like(logits, requires_grad=True)
            jt_u = torch.autograd.grad(logits, leaves, u, create_graph=True)
            jv = torch.autograd.grad(jt_u, u, v)[0]  # (B, N)
            p = logits.detach().softmax(-1)
            h_jv = (p * jv - p * (p * jv).sum(-1, keepdim=True)) / self.n_support
            gv = torch.autograd.grad(logits, leaves, h_jv)
            out = [a + b for a, b in zip(out, gv)]
        return out

    def hutchinson_diagonal(self, phi, step, probes):
        """diag(H) ~ E[z * Hz], z Rademacher (Bekas et al., 2007)."""
        gen = torch.Generator(device="cpu").manual_seed((self.seed + step) % 2**63)
        diag = [torch.zeros_like(p) for p in phi]
        for _ in range(probes):
            z = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in phi]
            with M.second_order_attention():
                hz = self._hvp(phi, z, step)
            diag = [d + zi * h / probes for d, zi, h in zip(diag, z, hz)]
        return diag

    def _kfac_product(self, phi, v, step):
        """Per-module K-FAC blocks (A (x) G) applied to v, cross-module terms dropped."""
        recorder = _KFACRecorder(self.model, self.names, v, self.n_support)
        leaves = self._leaves(phi)
        with recorder:
            for i, chunk in enumerate(self.support):
                recorder.new_chunk(chunk["attention_mask"])
                loss, _ = self._loss(leaves, chunk, self.n_support, step, i)
                torch.autograd.grad(loss, leaves)  # fills the recorder through tensor hooks
        return recorder.products(phi)


QUERY_STEP = -1  # dropout-stream id of the query pass


def _micro_batches(batch: Mapping[str, torch.Tensor], size: int) -> list[dict]:
    """Split a right-padded batch into chunks, each trimmed to its own longest example."""
    n = batch["labels"].shape[0]
    size = n if size <= 0 else min(size, n)
    chunks = []
    for start in range(0, n, size):
        chunk = {k: v[start:start + size] for k, v in batch.items()}
        length = int(chunk["attention_mask"].sum(1).max())
        chunk["input_ids"] = chunk["input_ids"][:, :length]
        chunk["attention_mask"] = chunk["attention_mask"][:, :length]
        chunks.append(chunk)
    return chunks


class _KFACRecorder:
    """K-FAC statistics of every LoRA factor and the head, applied to v as they arrive.

    A linear map out = a W^T with weight W (out, in) gets the block A (x) G, A = E[a a^T]
    over tokens and G = (1/N) sum_tokens g g^T with g the per-example-loss gradient of
    `out` (Martens & Grosse, 2015). Block times V is G V A. One factor is accumulated
    whole (the small one: r x r for LoRA) and the other already multiplied by V, so
    nothing larger than V is stored and micro-batches add up exactly.
    For lora_A: a = dropout(x), out = h (r). For lora_B: a = scaling * h, out = LoRA output.
    For the head: a = [pooled features, 1], out = logits.
    """

    def __init__(self, model, names, v, n_examples):
        self.model, self.n = model, n_examples
        self.v = dict(zip(names, v))
        self.names = names
        self.layers = {f"{path}.": m for path, m in model.named_modules() if isinstance(m, M.LoRALayer)}
        self.stats: dict[str, list] = {}
        self.seen: set[int] = set()
        self.mask = None

    def __enter__(self):
        for prefix, layer in self.layers.items():
            layer._tap = self._lora_tap(prefix)
        self.handle = self.model.head.register_forward_hook(self._head_tap)
        return self

    def __exit__(self, *exc):
        for layer in self.layers.values():
            layer._tap = None
        self.handle.remove()

    def new_chunk(self, attention_mask):
        self.seen, self.mask = set(), attention_mask.bool()

    def _lora_tap(self, prefix):
        def tap(layer, x_d, h, out):
            if id(layer) in self.seen:  # a checkpointed block recomputing its forward
                return
            self.seen.add(id(layer))
            a_x, a_h = self._tokens(x_d), self._tokens(h.detach() * layer.scaling)
            h.register_hook(lambda g: self._accumulate(prefix + "lora_A", a_x, self._tokens(g)))
            out.register_hook(lambda g: self._accumulate(prefix + "lora_B", a_h, self._tokens(g)))
        return tap

    def _head_tap(self, head, inputs, logits):
        features = inputs[0].detach()  # (B, hidden)
        a = torch.cat([features, torch.ones_like(features[:, :1])], 1)  # bias as a constant input
        logits.register_hook(lambda g: self._accumulate("head", a, g))

    def _tokens(self, t):
        """(B, T, d) -> (real tokens, d); pads carry no statistics."""
        return t.detach()[self.mask] if t.dim() == 3 else t.detach()

    def _block(self, name):
        if name == "head":
            w, b = self.v["head.weight"], self.v["head.bias"]
            return torch.cat([w, b.unsqueeze(1)], 1)  # (N, hidden + 1)
        return self.v[name]

    def _accumulate(self, name, a, g):
        V = self._block(name)  # (out, in)
        g = g * self.n  # per-example-loss gradients (the loss is a mean over N)
        stats = self.stats.setdefault(name, [0, 0, 0])
        if V.shape[0] <= V.shape[1]:  # keep G whole, V A multiplied
            stats[0] = stats[0] + g.t() @ g / self.n
            stats[1] = stats[1] + (V @ a.t()) @ a
        else:  # keep A whole, G V multiplied
            stats[0] = stats[0] + g.t() @ (g @ V) / self.n
            stats[1] = stats[1] + a.t() @ a
        stats[2] += a.shape[0]

    def products(self, phi):
        out = {}
        for name, (left, right, count) in self.stats.items():
            out[name] = (left @ right) / count
        result = []
        for n, p in zip(self.names, phi):
            if n.startswith("head."):
                block = out.get("head")
                if block is None:
                    result.append(torch.zeros_like(p))
                else:
                    result.append(block[:, :-1] if n.endswith("weight") else block[:, -1])
            else:
                result.append(out.get(n, torch.zeros_like(p)))
        return result


# ====================================================================================
# Training loop
# ====================================================================================
