"""The peer: what a user writes instead of MELoRA, for the speed benchmark.

PEFT LoRA (query and value projections, rank 8, alpha 16) on a Hugging Face encoder,
mean pooling and a linear N-way head, meta-trained by MAML written with `torch.func`:
`functional_call` over the LoRA + head tensors, the inner loop unrolled with
`create_graph=True` (second order) or without it (first order), the query loss
differentiated through it by autograd. Its own implementation, independent of
`baseline.MAML` and of MELoRA's model code, so the benchmark compares against what a
user gets from the standard libraries.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


class PeerModel(nn.Module):
    """A PEFT-wrapped encoder, masked mean pooling and a linear head."""

    def __init__(self, backbone: nn.Module, num_labels: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, num_labels)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))


def build_peer(path: str, num_labels: int, rank: int = 8, alpha: float = 16.0,
               targets=("query", "value"), dropout: float = 0.0,
               device: str | torch.device = "cpu") -> tuple[PeerModel, dict[str, torch.Tensor]]:
    """The peer model from a local Hugging Face directory and its meta-learned tensors.

    Returns:
        (model in train mode, theta: the LoRA factors and the head by name).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel
    backbone = AutoModel.from_pretrained(path)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                        lora_dropout=dropout, bias="none")
    model = PeerModel(get_peft_model(backbone, config), num_labels).to(device).train()
    theta = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return model, theta


def maml_meta_gradient(model: PeerModel, theta: dict[str, torch.Tensor], support: dict,
                       query: dict, inner_lr: float, inner_steps: int,
                       first_order: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MAML's meta-gradient of one task by unrolled autograd over `torch.func.functional_call`.

    Second order (default): the inner gradients keep their graphs (`create_graph=True`),
    so the query loss differentiates through the whole inner loop. First order: the
    inner gradients are constants and the query gradient at phi_K is the meta-gradient.

    Returns:
        (query loss at phi_K, {name: d query loss / d theta[name]}).
    """
    params = {n: t.detach().requires_grad_() for n, t in theta.items()}

    def loss(phi, batch):
        logits = torch.func.functional_call(model, phi, (batch["input_ids"], batch["attention_mask"]))
        return F.cross_entropy(logits, batch["labels"])

    phi = dict(params)
    # second order differentiates attention twice: only the math SDPA kernel can
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with contextlib.nullcontext() if first_order else sdpa_kernel([SDPBackend.MATH]):
        return _unrolled(loss, params, phi, support, query, inner_lr, inner_steps, first_order)


def _unrolled(loss, params, phi, support, query, inner_lr, inner_steps, first_order):
    for _ in range(inner_steps):
        grads = torch.autograd.grad(loss(phi, support), list(phi.values()),
                                    create_graph=not first_order)
        phi = {n: p - inner_lr * g for (n, p), g in zip(phi.items(), grads)}
    if first_order:  # the inner gradients were constants: differentiate at phi_K
        phi = {n: p.detach().requires_grad_() for n, p in phi.items()}
    query_loss = loss(phi, query)
    grads = torch.autograd.grad(query_loss, list(phi.values()) if first_order else list(params.values()))
    return query_loss.detach(), dict(zip(params, grads))
