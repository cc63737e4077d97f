"""Meta-learning over LoRA: the exact, memory-lean meta-gradient and the training loop.

theta = {LoRA factors, head}. For each task, K inner steps on the support set,
phi_{k+1} = phi_k - a_k grad L_S(phi_k), then the query loss L_Q(phi_K). The exact
meta-gradient (Finn et al., 2017, MAML) is

    g = (I - a_0 H_0) ... (I - a_{K-1} H_{K-1}) grad L_Q(phi_K),   H_k = hessian of L_S at phi_k

computed in reverse without keeping the inner graphs (see DESIGN.md).
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch
import torch.nn.functional as F

import model as M

log = logging.getLogger("melora")

HESSIAN_METHODS = ("full", "gauss_newton", "block_diagonal", "diagonal", "none")

# ====================================================================================
# Meta-gradient (reserved section: being replaced by the exact implementation)
# ====================================================================================


def compute_meta_gradient(model, theta: Mapping[str, torch.Tensor], support: Mapping[str, torch.Tensor],
                          query: Mapping[str, torch.Tensor], inner_lr, inner_steps: int,
                          method: str = "full", micro_batch: int = 0, *,
                          metrics: dict | None = None, **options):
    """Meta-gradient of one task. TEMPORARY first-order stub with the final signature.

    Args:
        model: a LoRA-wrapped `model.MELoRAModel`.
        theta: LoRA and head tensors keyed by their `named_parameters` names.
        support, query: dicts with `input_ids`, `attention_mask`, `labels`.
        inner_lr: a float, or a tensor of shape (inner_steps,) of learned per-step rates.
        inner_steps: K.
        method: full, gauss_newton, block_diagonal, diagonal or none.
        micro_batch: examples per micro-batch (0 = whole set).
        metrics: when a dict is given, filled with `query_acc_before`, `query_acc_after`
            (accuracy on the query set at theta and at phi_K) and `support_loss`.

    Returns:
        (query_loss, {name: gradient}); with a tensor `inner_lr`, the dict also holds
        `"inner_lr"`: its gradient.
    """
    phi = {n: t.detach() for n, t in theta.items()}
    for _ in range(inner_steps):
        phi_req = {n: t.requires_grad_() for n, t in ((n, t.clone()) for n, t in phi.items())}
        loss = F.cross_entropy(M.forward(model, phi_req, support), support["labels"])
        grads = torch.autograd.grad(loss, list(phi_req.values()))
        phi = {n: (phi[n] - float(inner_lr) * g).detach() for n, g in zip(phi, grads)}
    phi_req = {n: t.clone().requires_grad_() for n, t in phi.items()}
    logits = M.forward(model, phi_req, query)
    query_loss = F.cross_entropy(logits, query["labels"])
    grads = torch.autograd.grad(query_loss, list(phi_req.values()))
    if metrics is not None:
        metrics["query_acc_after"] = (logits.argmax(-1) == query["labels"]).float().mean().item()
        with torch.no_grad():
            before = M.forward(model, theta, query).argmax(-1)
        metrics["query_acc_before"] = (before == query["labels"]).float().mean().item()
    return query_loss.detach(), dict(zip(phi, grads))


# ====================================================================================
# Training loop
# ====================================================================================
