"""Meta-learning over LoRA: the exact, memory-lean meta-gradient and the training loop.

theta = {LoRA factors, head}. For each task, K inner steps on the support set,
phi_{k+1} = phi_k - a_k grad L_S(phi_k), then the query loss L_Q(phi_K). The exact
meta-gradient (Finn et al., 2017, MAML) is

    g = (I - a_0 H_0) ... (I - a_{K-1} H_{K-1}) grad L_Q(phi_K),   H_k = hessian of L_S at phi_k

computed in reverse without keeping the inner graphs (see docs/design.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

import model as M
from config import Config, Rules, checkpoint_config, register_rules
from dataset_loader import DatasetLoader
from metrics import MetricsSink
from runs import load_checkpoint, save_checkpoint, saved_config
from utils import (ConfigError, RunInterrupted, UserError, all_reduce_max, all_reduce_sum,
                   atomic_write_json, atomic_write_text, is_main_process, peak_memory_mb, rank,
                   rank_device, reset_peak_memory, resolve_device, set_seed, to_device, world_size)

log = logging.getLogger("melora")

HESSIAN_METHODS = ("full", "gauss_newton", "block_diagonal", "diagonal", "none")  # the curvature products
DIAGONAL_ESTIMATORS = ("fisher", "hutchinson")  # hessian_approximation.diagonal_estimator
HEAD_INITS = ("zero", "proto")   # how the N-way head starts on an episode (initial_fast_weights)
PRECISIONS = ("fp32", "bf16", "fp16", "fp64")  # training.precision (_autocast_context)
# The library's defaults (here and in baseline) are config.yml's (tests/test_config.py checks):
HESSIAN_METHOD = "none"      # memory_optimization.hessian_approximation.method
HEAD_INIT = "proto"          # meta_learning.head_init and evaluation.head_init
# What to lower when CUDA runs out of memory, largest saving first (README: Troubleshooting).
OOM_ADVICE = ("lower --meta_batch_size, memory_optimization.gradient_accumulation."
              "default_micro_batch (--set ...=2), --lora_rank or --inner_steps, or set "
              "memory_optimization.auto_micro_batch=true to halve the micro-batch automatically")


def _check_meta_learning(data: dict) -> None:
    """Cross-key checks of the meta_learning section: the cosine head, learned rates."""
    meta = data["meta_learning"]
    if meta["head"] == "cosine" and meta["head_init"] != "proto":
        raise ConfigError("meta_learning.head: cosine needs meta_learning.head_init: proto (a zero "
                          "head weight has no direction to take a cosine with); set "
                          "meta_learning.head_init=proto or meta_learning.head=euclidean")
    if meta["head"] == "cosine" and not meta["head_scale"] > 0:
        raise ConfigError(f"config key 'meta_learning.head_scale' must be > 0, got {meta['head_scale']!r}")
    inner = meta["inner"]
    if inner["learn_lr"] and inner["default_num_steps"] == 0:
        raise ConfigError("meta_learning.inner.learn_lr learns one rate per inner step, but "
                          "meta_learning.inner.default_num_steps is 0; set learn_lr=false or K >= 1")


register_rules("trainer", Rules(choices={
    "meta_learning.head_init": HEAD_INITS, "evaluation.head_init": HEAD_INITS,
    "memory_optimization.hessian_approximation.method": HESSIAN_METHODS,
    "memory_optimization.hessian_approximation.diagonal_estimator": DIAGONAL_ESTIMATORS,
    "training.precision": PRECISIONS}, check=_check_meta_learning))


@dataclasses.dataclass(frozen=True)
class HessianOptions:
    """Options of the curvature products (memory_optimization.hessian_approximation);
    the meta-gradient (trainer) and the memory estimate (model) read them.

    Attributes:
        diagonal_estimator: how `diagonal` estimates curvature: fisher (micro-batch
            gradients) or hutchinson.
        hutchinson_probes: Rademacher probes per inner step for hutchinson.
        keep_graphs: `full` only: how many inner steps (the last ones, 0..K; more = K)
            build their support gradient with its graph during the forward sweep and
            keep it until the backward sweep's Hessian-vector product, instead of
            recomputing it. Each kept step saves a forward+backward per task (its
            product then costs one double backward only) and adds one step's graph to
            peak memory (peak = the kept graphs + the query pass). K keeps them all,
            as unrolled autograd does. Same meta-gradient for every value. The config's
            `auto` is decided by `model.plan_memory` (as many as fit the memory budget).
        keep_last_step: the older spelling of keep_graphs=1 (the larger of the two wins).
    """
    diagonal_estimator: str = "fisher"
    hutchinson_probes: int = 1
    keep_last_step: bool = False
    keep_graphs: int = 0

    @classmethod
    def from_config(cls, section, planned_keep_graphs: int | None = None) -> "HessianOptions":
        """From the config's `memory_optimization.hessian_approximation` section.

        Args:
            section: that section.
            planned_keep_graphs: what `model.plan_memory` chose; used when the section's
                `keep_graphs` is `auto` (required then).

        Raises:
            ValueError: `keep_graphs` is auto and no plan is given.
        """
        keep = section.keep_graphs
        if keep == "auto":
            if planned_keep_graphs is None:
                raise ValueError("hessian_approximation.keep_graphs=auto is decided by "
                                 "model.build_model (model.memory_plan); pass its keep_graphs")
            keep = planned_keep_graphs
        return cls(diagonal_estimator=section.diagonal_estimator,
                   hutchinson_probes=section.hutchinson_probes,
                   keep_last_step=section.keep_last_step, keep_graphs=keep)

    def graphs_kept(self, method: str, inner_steps: int) -> int:
        """How many of the last inner steps keep their gradient graph (0 unless `full`):
        `model.graphs_kept`'s rule, which the memory plan uses too."""
        return M.graphs_kept(method, max(int(self.keep_graphs), int(bool(self.keep_last_step))), inner_steps)


# ====================================================================================
# Meta-gradient
# ====================================================================================

def compute_meta_gradient(model: M.MELoRAModel, theta: Mapping[str, torch.Tensor],
                          support: Mapping[str, torch.Tensor], query: Mapping[str, torch.Tensor],
                          inner_lr: float | torch.Tensor, inner_steps: int,
                          method: str = HESSIAN_METHOD, micro_batch: int = 0, *,
                          metrics: dict | None = None,
                          hessian: HessianOptions = HessianOptions(), seed: int | None = None,
                          head_init: str = HEAD_INIT, acc_before: bool = True,
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Meta-gradient of one task's query loss after `inner_steps` adaptation steps.

    Reverse recomputation (docs/design.md): the forward sweep keeps only phi_0..phi_K; the
    backward sweep recomputes one inner step at a time and applies (I - a_k H_k) to the
    adjoint v with one Hessian-vector product (or its approximation, by `method`), so
    peak memory is one step's graph whatever K is. `MetaGradient(...)(theta, support,
    query)` in one call.

    Args:
        model: a LoRA-wrapped `model.MELoRAModel`; its own parameters are not touched.
        theta: LoRA and head tensors keyed by their `named_parameters` names.
        support, query: dicts with `input_ids`, `attention_mask` (right-padded), `labels`.
        inner_lr: a float a, or a tensor (inner_steps,) of learned per-step rates a_k.
        inner_steps: K >= 0.
        method: full (exact), gauss_newton, block_diagonal, diagonal or none (first order);
            default config.yml's (`trainer.HESSIAN_METHOD`).
        micro_batch: examples per micro-batch; 0 or >= the set size = the whole set.
            Gradients and curvature products accumulate, so results do not depend on it
            (except `diagonal` with the fisher estimator, which is built from them).
        metrics: when a dict, filled with `query_acc_before` (at theta; unless
            `acc_before` is False, which saves a query forward per task),
            `query_acc_after` (at phi_K) and `support_loss` (at theta).
        hessian: options of the `diagonal` estimator and of `full`'s kept graphs.
        seed: seeds dropout; every recomputation of a step replays the same masks. None
            draws one from torch's global generator.
        head_init: zero (the head starts at theta's head) or proto (Proto-MAML,
            Triantafillou et al., 2020: the head starts from the support-set class
            prototypes c_n at theta, W = c_n, b = 0 for the cosine head (the default) and
            W = 2 c_n, b = -|c_n|^2 for the Euclidean one; the meta-gradient flows through
            the prototypes into the LoRA factors, and theta's head gets zero gradient);
            default config.yml's (`trainer.HEAD_INIT`).

    Returns:
        (query_loss at phi_K, {name: d query_loss / d theta[name]}); with a tensor
        `inner_lr`, the dict also holds `"inner_lr"`, the gradient for the rates.

    Example:
        >>> loss, grads = compute_meta_gradient(model, lora_parameters(model), support,
        ...                                     query, inner_lr=0.01, inner_steps=3)
    """
    engine = MetaGradient(model, inner_lr, inner_steps, method, micro_batch, hessian=hessian,
                          head_init=head_init)
    return engine(theta, support, query, metrics=metrics, seed=seed, acc_before=acc_before)


def compute_batched_meta_gradient(model: M.MELoRAModel, theta: Mapping[str, torch.Tensor],
                                  episodes: list[tuple[Mapping, Mapping]],
                                  inner_lr: float | torch.Tensor, inner_steps: int,
                                  method: str = HESSIAN_METHOD, micro_batch: int = 0, *,
                                  metrics: dict | None = None,
                                  hessian: HessianOptions = HessianOptions(),
                                  seed: int | None = None, head_init: str = HEAD_INIT,
                                  acc_before: bool = True,
                                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean meta-gradient of several tasks whose inner loops run together.

    Each task gets its own copy of theta (LoRA factors stacked to (T, ...), a batched
    matmul on the LoRA path) while the frozen base runs one large matmul over all tasks'
    examples. The tasks' losses are summed, their parameters are separate, so gradients
    and Hessian-vector products separate by task exactly: the result equals the mean of
    `compute_meta_gradient` over the tasks (without dropout, whose masks differ).
    `MetaGradient(...).batched(theta, episodes)` in one call.

    Args:
        episodes: [(support, query), ...]; every task has as many support (and query)
            examples as the others (N*K and N*Q).
        The rest as in `compute_meta_gradient`; `block_diagonal` runs tasks one by one.

    Returns:
        (mean query loss, {name: mean meta-gradient}) (and "inner_lr" for learned rates);
        `metrics` gets accuracies averaged over the tasks.
    """
    engine = MetaGradient(model, inner_lr, inner_steps, method, micro_batch, hessian=hessian,
                          head_init=head_init)
    return engine.batched(theta, episodes, metrics=metrics, seed=seed, acc_before=acc_before)


class MetaGradient:
    """The meta-gradient engine: one task's inner loop and its exact (or approximated)
    meta-gradient by reverse recomputation, for one setting of the method.

    Verbs: `start` (phi_0), `adapt` (the inner loop: phi_K), calling it (the
    meta-gradient of one task) and `batched` (the mean over tasks run together).

    Args:
        model: a LoRA-wrapped `model.MELoRAModel`; its own parameters are not touched.
        inner_lr: a float a, or a tensor (inner_steps,) of learned per-step rates a_k
            (read at every call, so a learned tensor may change between calls).
        inner_steps: K >= 0.
        method: a `CURVATURE_PRODUCTS` name, or none (first order).
        micro_batch, hessian, head_init: as in `compute_meta_gradient`.

    Example:
        >>> engine = MetaGradient(model, 0.01, 3, "full", head_init="proto")
        >>> phi = engine.adapt(theta, support)                 # fast weights phi_K
        >>> loss, grads = engine(theta, support, query)        # the meta-gradient
    """

    def __init__(self, model: M.MELoRAModel, inner_lr: float | torch.Tensor, inner_steps: int,
                 method: str = HESSIAN_METHOD, micro_batch: int = 0, *,
                 hessian: HessianOptions = HessianOptions(), head_init: str = HEAD_INIT):
        if method not in HESSIAN_METHODS:
            raise ValueError(f"method must be one of {', '.join(HESSIAN_METHODS)}, got {method!r}")
        _check_head_init(head_init)
        self.model, self.inner_lr, self.inner_steps = model, inner_lr, inner_steps
        self.method, self.micro_batch, self.hessian = method, micro_batch, hessian
        self.head_init = head_init

    def start(self, theta: Mapping[str, torch.Tensor], support: Mapping[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        """phi_0 of a task: theta, with the head from support prototypes when `head_init` is proto."""
        task = _Task(self.model, list(theta), support, support, self.micro_batch, seed=0)
        return dict(zip(theta, self._phi_0(task, theta)))

    def adapt(self, theta: Mapping[str, torch.Tensor], support: Mapping[str, torch.Tensor],
              seed: int | None = None) -> dict[str, torch.Tensor]:
        """The fast weights phi_K after the inner loop on `support` (detached): the
        meta-gradient's forward sweep with the same `seed` (same kernels, dropout masks)."""
        seed = int(torch.randint(0, 2**62, ())) if seed is None else seed
        task = _Task(self.model, list(theta), support, support, self.micro_batch, seed)
        phis = self._forward_sweep(task, self._phi_0(task, theta),
                                   _step_rates(self.inner_lr, self.inner_steps))[0]
        return dict(zip(theta, phis[-1]))

    def _phi_0(self, task: "_Task", theta: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """theta detached, its head from the task's support prototypes with head_init proto."""
        phi = [t.detach() for t in theta.values()]
        return task.with_proto_head(phi)[0] if self.head_init == "proto" else phi

    @property
    def _fisher(self) -> bool:
        """`diagonal` built from micro-batch gradients (the forward sweep collects them)."""
        return self.method == "diagonal" and self.hessian.diagonal_estimator == "fisher"

    def __call__(self, theta: Mapping[str, torch.Tensor], support: Mapping[str, torch.Tensor],
                 query: Mapping[str, torch.Tensor], *, metrics: dict | None = None,
                 seed: int | None = None, acc_before: bool = True
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(query loss at phi_K, meta-gradient), as `compute_meta_gradient` describes."""
        seed = int(torch.randint(0, 2**62, ())) if seed is None else seed
        task = _Task(self.model, list(theta), support, query, self.micro_batch, seed, tasks=1)
        phi_0 = [t.detach() for t in theta.values()]
        return self._meta_gradient(task, phi_0, metrics, acc_before)

    def batched(self, theta: Mapping[str, torch.Tensor], episodes: list[tuple[Mapping, Mapping]],
                *, metrics: dict | None = None, seed: int | None = None, acc_before: bool = True
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean over `episodes`, as `compute_batched_meta_gradient` describes."""
        seed = int(torch.randint(0, 2**62, ())) if seed is None else seed
        if self.method == "block_diagonal" or len(episodes) == 1:  # K-FAC statistics are per task
            return self._mean_of_tasks(theta, episodes, metrics, seed, acc_before)
        T = len(episodes)
        support, query = _stack_sets([e[0] for e in episodes]), _stack_sets([e[1] for e in episodes])
        task = _Task(self.model, list(theta), support, query, self.micro_batch, seed, tasks=T)
        phi_0 = [t.detach().unsqueeze(0).repeat(T, *([1] * t.dim())) for t in theta.values()]  # (T, ...)
        query_loss, grads = self._meta_gradient(task, phi_0, metrics, acc_before)
        mean = {n: g.mean(0) if n != "inner_lr" else g / T for n, g in grads.items()}
        return query_loss / T, mean

    def _mean_of_tasks(self, theta, episodes, metrics, seed, acc_before):
        total, summed, per_task = 0.0, {}, []
        for t, (support, query) in enumerate(episodes):
            m = {}
            loss, grads = self(theta, support, query, metrics=m, seed=seed + t, acc_before=acc_before)
            total = total + loss
            summed = {n: summed.get(n, 0) + g for n, g in grads.items()}
            per_task.append(m)
        if metrics is not None:
            metrics.update({k: sum(m[k] for m in per_task) / len(per_task) for k in per_task[0]})
        return total / len(episodes), {n: g / len(episodes) for n, g in summed.items()}

    def _forward_sweep(self, task: "_Task", phi_0: list[torch.Tensor], lrs: list,
                       fisher: bool = False, first_kept: int | None = None):
        """phi_{k+1} = phi_k - a_k grad L_S(phi_k); keeps phi_k only (and, from step
        `first_kept` on, the steps' gradient graphs for their Hessian products).

        Returns:
            (phis, support gradients (None unless rates are learned), Fisher diagonals,
            kept graphs, support loss at phi_0 or None).
        """
        # Without curvature products or checkpointed blocks nothing recomputes a support
        # pass, so the support passes may use the fused attention kernel (query passes do).
        task.fused_support = (self.method == "none" or self._fisher) and not M.is_checkpointed(task.model)
        first_kept = self.inner_steps if first_kept is None else first_kept
        learn_lr = torch.is_tensor(self.inner_lr)
        phis, grads_s, diags, support_loss = [phi_0], [], [], None
        kept: list = [None] * self.inner_steps
        for k in range(self.inner_steps):
            if k >= first_kept:
                g, loss, stepped, kept[k] = task.step_with_graph(phis[k], k, lrs[k])
                diag = None
            else:
                g, loss, diag = task.support_grad(phis[k], k, fisher=fisher)
                stepped = [p - lrs[k] * gi for p, gi in zip(phis[k], g)]
            if k == 0:
                support_loss = loss / task.tasks
            phis.append(stepped)
            grads_s.append(g if learn_lr else None)
            diags.append(diag)
        return phis, grads_s, diags, kept, support_loss

    def _meta_gradient(self, task: "_Task", phi_0: list[torch.Tensor], metrics: dict | None,
                       acc_before: bool = True):
        """The phases of the reverse-recomputed meta-gradient (see compute_meta_gradient)."""
        method, hessian, inner_lr, inner_steps = self.method, self.hessian, self.inner_lr, self.inner_steps
        # 0. Proto-MAML: the head starts at the support prototypes computed at theta.
        if self.head_init == "proto":
            phi_0, prototypes = task.with_proto_head(phi_0)
        lrs = _step_rates(inner_lr, inner_steps)
        learn_lr = torch.is_tensor(inner_lr)

        # 1. Forward sweep: keep phi_k only (and, with keep_graphs, the last steps'
        #    gradient graphs for their Hessian products).
        first_kept = inner_steps - hessian.graphs_kept(method, inner_steps)
        phis, grads_s, diags, kept, support_loss = self._forward_sweep(task, phi_0, lrs, self._fisher,
                                                                       first_kept)
        if support_loss is not None and metrics is not None:
            metrics["support_loss"] = support_loss

        # 2. Outer loss and its gradient at phi_K: the adjoint v = dL_Q / dphi_K.
        query_loss, v, acc_after = task.query_grad(phis[-1])

        # 3. Backward sweep: v <- (I - a_k H_k) v, one step's graph at a time.
        lr_grad = torch.zeros(inner_steps, dtype=phi_0[0].dtype, device=phi_0[0].device) if learn_lr else None
        for k in reversed(range(inner_steps)):
            if learn_lr:
                lr_grad[k] = -sum((gi * vi).sum() for gi, vi in zip(grads_s[k], v))  # dL/da_k
            if kept[k] is not None:  # its graph kept from the forward sweep (then freed)
                v, kept[k] = task.kept_step_vjp(kept[k], v), None
            elif method != "none":
                hv = CURVATURE_PRODUCTS[method](task, phis[k], v, k, diags[k], hessian)
                v = [vi - lrs[k] * hvi for vi, hvi in zip(v, hv)]

        # 4. Proto-MAML: carry the head's adjoint through the prototypes into the LoRA factors.
        if self.head_init == "proto":
            v = task.proto_backward(phi_0, v, prototypes)
        if metrics is not None:
            metrics["query_acc_after"] = acc_after
            if acc_before:  # one more query forward per task, at phi_0
                metrics["query_acc_before"] = acc_after if inner_steps == 0 else task.accuracy(phis[0])
        grads = dict(zip(task.names, v))
        if learn_lr:
            grads["inner_lr"] = lr_grad.to(inner_lr.device)
        return query_loss, grads


def _stack_sets(sets: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate tasks' sets task-major, right-padded to the longest example of all."""
    sizes = {s["labels"].shape[0] for s in sets}
    if len(sizes) != 1:
        raise ValueError(f"batched tasks need equal set sizes (N*K, N*Q), got {sorted(sizes)}")
    length = max(s["input_ids"].shape[1] for s in sets)
    pad = lambda t: F.pad(t, (0, length - t.shape[1]))  # noqa: E731  (pad id is masked out)
    return {"input_ids": torch.cat([pad(s["input_ids"]) for s in sets]),
            "attention_mask": torch.cat([pad(s["attention_mask"]) for s in sets]),
            "labels": torch.cat([s["labels"] for s in sets])}


@contextlib.contextmanager
def dropout_off(model: torch.nn.Module):
    """Every dropout of `model` off inside the block (prototypes); the mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_head_init(head_init: str) -> None:
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}")


def initial_fast_weights(model: M.MELoRAModel, theta: Mapping[str, torch.Tensor],
                         support: Mapping[str, torch.Tensor], head_init: str = HEAD_INIT,
                         micro_batch: int = 0) -> dict[str, torch.Tensor]:
    """phi_0 of a task: theta, with the head from support prototypes when `head_init` is proto.

    Evaluation starts adaptation here, as meta-training does (`MetaGradient.start`).
    """
    return MetaGradient(model, 0.0, 0, "none", micro_batch, head_init=head_init).start(theta, support)


def _step_rates(inner_lr, inner_steps: int) -> list:
    if torch.is_tensor(inner_lr):
        if inner_lr.numel() != inner_steps:
            raise ValueError(f"inner_lr has {inner_lr.numel()} rates for {inner_steps} inner steps")
        return [a for a in inner_lr.detach().reshape(-1)]
    return [float(inner_lr)] * inner_steps


class _Task:
    """One task's support/query sets, split into micro-batches, with replayable dropout."""

    def __init__(self, model, names, support, query, micro_batch, seed, tasks=1):
        self.model, self.names, self.seed, self.tasks = model, names, seed, tasks
        self.support = _micro_batches(support, micro_batch, tasks)
        self.query = _micro_batches(query, micro_batch, tasks)
        self.n_support = int(support["labels"].numel()) // tasks  # per task: losses are per-task means
        self.n_query = int(query["labels"].numel()) // tasks
        self.device = support["input_ids"].device
        self.fused_support = False  # see MetaGradient._forward_sweep

    # -- losses ---------------------------------------------------------------------
    def loss(self, phi, chunk, n_total, step, index):
        """Sum of the chunk's cross-entropies / n_total, so chunks add up to the mean loss."""
        with self.dropout_rng(step, index):
            logits = M.forward(self.model, dict(zip(self.names, phi)), chunk)
        return F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16)
                               else logits, chunk["labels"], reduction="sum") / n_total, logits

    @contextlib.contextmanager
    def dropout_rng(self, step, index):
        """Dropout masks of pass (step, micro-batch index), the same at every recomputation."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((self.seed + 1_000_003 * step + 7919 * index) % 2**63)
            yield

    @staticmethod
    def leaves(phi):
        return [p.detach().requires_grad_() for p in phi]

    # -- first order ----------------------------------------------------------------
    def support_grad(self, phi, step, fisher=False):
        """grad L_S(phi), L_S(phi), and the empirical-Fisher diagonal when asked.

        Support passes run on the math attention kernel, as their recomputations for
        curvature products must: a fused kernel would draw other attention-dropout masks.
        Where nothing recomputes them (`fused_support`), the default kernel runs.
        """
        leaves, grad, total, diag = self.leaves(phi), None, 0.0, None
        kernel = contextlib.nullcontext if self.fused_support else M.second_order_attention
        for i, chunk in enumerate(self.support):
            with kernel():  # checkpointed blocks recompute in backward
                loss, _ = self.loss(leaves, chunk, self.n_support, step, i)
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

    def step_with_graph(self, phi, step, lr):
        """One inner step that keeps its graph: (gradient, loss, phi_next), all detached,
        and kept = (leaves, phi_next with its graph) for `kept_step_vjp`.

        The step phi - lr g, not the gradient g, is what is kept: the tensor held per step
        is then the next step's fast weights (whose storage the sweep keeps anyway), as in
        unrolled autograd, instead of another adapter-sized gradient.
        """
        leaves, grads, total = self.leaves(phi), [], 0.0
        with M.second_order_attention():
            for i, chunk in enumerate(self.support):
                loss, _ = self.loss(leaves, chunk, self.n_support, step, i)
                grads.append(torch.autograd.grad(loss, leaves, create_graph=True))
                total += loss.item()
        # one chunk: its gradient as is (a sum from 0 would hold another adapter-sized copy)
        grad = list(grads[0]) if len(grads) == 1 else [sum(parts) for parts in zip(*grads)]
        stepped = [p - lr * g for p, g in zip(leaves, grad)]
        return [g.detach() for g in grad], total, [p.detach() for p in stepped], (leaves, stepped)

    @staticmethod
    def kept_step_vjp(kept, v):
        """v (I - lr H) = v - lr H v through a kept step (one double backward; the graph is
        freed). H is symmetric, so this is the backward sweep's update of the adjoint."""
        leaves, stepped = kept
        with M.second_order_attention():
            return list(torch.autograd.grad(stepped, leaves, v))

    def query_grad(self, phi):
        """(L_Q(phi), grad L_Q(phi), accuracy at phi)."""
        leaves, grad, total, correct = self.leaves(phi), None, 0.0, 0
        for i, chunk in enumerate(self.query):
            loss, logits = self.loss(leaves, chunk, self.n_query, QUERY_STEP, i)
            g = torch.autograd.grad(loss, leaves)
            grad = list(g) if grad is None else [a + b for a, b in zip(grad, g)]
            total += loss.detach()
            correct += int((logits.argmax(-1) == chunk["labels"]).sum())
        return total, grad, correct / (self.n_query * self.tasks)

    # -- Proto-MAML head ------------------------------------------------------------
    def _class_rows(self, chunk, n_way):
        """Row of each example in the (tasks * N) prototype table: task * N + label."""
        b = chunk["labels"].shape[0]
        task = torch.arange(b, device=chunk["labels"].device) // (b // self.tasks)
        return task * n_way + chunk["labels"]

    def _features(self, phi, chunk, index):
        """Pooled support features for the prototypes, dropout off (callers that
        differentiate them stay inside `dropout_off`, so recomputations match)."""
        with dropout_off(self.model), M.second_order_attention():
            return M.forward(self.model, dict(zip(self.names, phi)), chunk, features_only=True)

    def with_proto_head(self, phi):
        """phi with head W = 2 c, b = -|c|^2 from support prototypes c (B x hidden sums);
        the cosine head gets W = c, b = 0 (its temperature stays theta's)."""
        w_index, b_index = self.names.index(HEAD_WEIGHT), self.names.index(HEAD_BIAS)
        n_way, hidden = phi[w_index].shape[-2:]
        sums = phi[w_index].new_zeros(self.tasks * n_way, hidden)
        counts = phi[w_index].new_zeros(self.tasks * n_way)
        with torch.no_grad():
            for i, chunk in enumerate(self.support):
                rows = self._class_rows(chunk, n_way)
                sums.index_add_(0, rows, self._features(phi, chunk, i).to(sums.dtype))
                counts.index_add_(0, rows, torch.ones_like(rows, dtype=counts.dtype))
        c = sums / counts.clamp(min=1).unsqueeze(1)  # (T*N, hidden)
        weight, bias = M.prototype_head(self.model, c)
        phi = list(phi)
        phi[w_index] = weight.reshape(phi[w_index].shape)
        phi[b_index] = bias.reshape(phi[b_index].shape).to(phi[b_index].dtype)
        return phi, (c, counts)

    def proto_backward(self, phi_0, v, prototypes):
        """Add the prototypes' vjp to the LoRA adjoints; theta's head is unused (zero grad)."""
        c, counts = prototypes
        w_index, b_index = self.names.index(HEAD_WEIGHT), self.names.index(HEAD_BIAS)
        n_way = phi_0[w_index].shape[-2]
        # dL/dc = 2 v_W - 2 c v_b (cosine head: v_W), spread over each class's support
        # examples (c is their mean)
        if _cosine_head(self.model):
            u = v[w_index].reshape(c.shape)
        else:
            u = 2 * v[w_index].reshape(c.shape) - 2 * c * v[b_index].reshape(-1, 1)
        u = u / counts.clamp(min=1).unsqueeze(1)
        leaves = self.leaves(phi_0)
        v = list(v)
        for i, chunk in enumerate(self.support):
            with dropout_off(self.model), M.second_order_attention():  # as _features; checkpointed blocks recompute
                features = self._features(leaves, chunk, i)
                weights = u[self._class_rows(chunk, n_way)].to(features.dtype)
                grads = torch.autograd.grad((features * weights).sum(), leaves, allow_unused=True)
            v = [vi + g if g is not None else vi for vi, g in zip(v, grads)]
        v[w_index], v[b_index] = torch.zeros_like(v[w_index]), torch.zeros_like(v[b_index])
        return v

    @torch.no_grad()
    def accuracy(self, phi):
        """Query accuracy at phi (micro-batched, dropout replayed from the query stream)."""
        correct = 0
        for i, chunk in enumerate(self.query):
            with self.dropout_rng(QUERY_STEP, i):
                logits = M.forward(self.model, dict(zip(self.names, phi)), chunk)
            correct += int((logits.argmax(-1) == chunk["labels"]).sum())
        return correct / (self.n_query * self.tasks)


# -- curvature products: H_k v (or its approximation) at phi_k for the support loss ------
# Each takes (task, phi_k, v, k, the forward sweep's Fisher diagonal or None, HessianOptions).

def _hvp(task, phi, v, step):
    """Exact Hessian-vector product: one double backward per micro-batch."""
    leaves, out = task.leaves(phi), [torch.zeros_like(p) for p in phi]
    for i, chunk in enumerate(task.support):
        loss, _ = task.loss(leaves, chunk, task.n_support, step, i)
        g = torch.autograd.grad(loss, leaves, create_graph=True)
        hv = torch.autograd.grad(g, leaves, v)  # the vjp of grad with v: H v
        out = [a + b for a, b in zip(out, hv)]
    return out


def _gnvp(task, phi, v, step):
    """Gauss-Newton-vector product J^T H_logits J v, H_logits = (diag(p) - p p^T) / n."""
    leaves, out = task.leaves(phi), [torch.zeros_like(p) for p in phi]
    for i, chunk in enumerate(task.support):
        with task.dropout_rng(step, i):
            logits = M.forward(task.model, dict(zip(task.names, leaves)), chunk)  # (B, N)
        # J v by the double-vjp trick: u -> J^T u is linear, its vjp with v is J v.
        u = torch.zeros_like(logits, requires_grad=True)
        jt_u = torch.autograd.grad(logits, leaves, u, create_graph=True)
        jv = torch.autograd.grad(jt_u, u, v)[0]  # (B, N)
        p = logits.detach().softmax(-1)
        h_jv = (p * jv - p * (p * jv).sum(-1, keepdim=True)) / task.n_support
        gv = torch.autograd.grad(logits, leaves, h_jv)
        out = [a + b for a, b in zip(out, gv)]
    return out


def _kfac(task, phi, v, step):
    """Per-module K-FAC blocks (A (x) G) applied to v, cross-module terms dropped."""
    recorder = _KFACRecorder(task.names, v, task.n_support)
    leaves = task.leaves(phi)
    with M.tapped(task.model, recorder.lora_tap, recorder.head_tap):
        for i, chunk in enumerate(task.support):
            recorder.new_chunk(chunk["attention_mask"])
            loss, _ = task.loss(leaves, chunk, task.n_support, step, i)
            torch.autograd.grad(loss, leaves)  # fills the recorder through tensor hooks
    return recorder.products(phi)


def hutchinson_diagonal(task, phi, step, probes):
    """diag(H) ~ E[z * Hz], z Rademacher (Bekas et al., 2007)."""
    gen = torch.Generator(device="cpu").manual_seed((task.seed + step) % 2**63)
    diag = [torch.zeros_like(p) for p in phi]
    for _ in range(probes):
        z = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in phi]
        with M.second_order_attention():
            hz = _hvp(task, phi, z, step)
        diag = [d + zi * h / probes for d, zi, h in zip(diag, z, hz)]
    return diag


def _diagonal_product(task, phi, v, step, diag, hessian):
    """diag(H) * v: the forward sweep's Fisher diagonal, or Hutchinson's estimate."""
    if hessian.diagonal_estimator == "hutchinson":
        diag = hutchinson_diagonal(task, phi, step, hessian.hutchinson_probes)
    return [d * vi for d, vi in zip(diag, v)]


def _on_math_kernel(product):
    """A (task, phi, v, step) product as a curvature product, its passes on the math
    attention kernel (double backward, exact dropout replay)."""
    def curvature_product(task, phi, v, step, diag, hessian):
        with M.second_order_attention():
            return product(task, phi, v, step)
    curvature_product.__doc__ = product.__doc__
    return curvature_product


# Hessian method -> its curvature product ("none", first order, has none).
CURVATURE_PRODUCTS = {"full": _on_math_kernel(_hvp), "gauss_newton": _on_math_kernel(_gnvp),
                      "block_diagonal": _on_math_kernel(_kfac), "diagonal": _diagonal_product}


def _cosine_head(model) -> bool:
    return getattr(model, "head_kind", "euclidean") == "cosine"


QUERY_STEP = -1  # dropout-stream id of the query pass
PROTO_STEP = -2  # dropout-stream id of the prototype pass
HEAD_WEIGHT, HEAD_BIAS = M.HEAD_WEIGHT, M.HEAD_BIAS


def _micro_batches(batch: Mapping[str, torch.Tensor], size: int, tasks: int = 1) -> list[dict]:
    """Split a right-padded batch into chunks, each trimmed to its own longest example.

    With `tasks` > 1 the batch is task-major and every chunk takes the same slice of
    each task, so chunks stay task-major too.
    """
    n = batch["labels"].shape[0] // tasks  # examples per task
    size = n if size <= 0 else min(size, n)
    chunks = []
    for start in range(0, n, size):
        stop = min(start + size, n)
        rows = slice(start, stop) if tasks == 1 else torch.cat(
            [torch.arange(t * n + start, t * n + stop) for t in range(tasks)]).to(batch["labels"].device)
        chunk = {k: v[rows] for k, v in batch.items()}
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

    def __init__(self, names, v, n_examples):
        self.n = n_examples
        self.v = dict(zip(names, v))
        self.names = names
        self.stats: dict[str, list] = {}
        self.seen: set[int] = set()
        self.mask = None

    def new_chunk(self, attention_mask):
        self.seen, self.mask = set(), attention_mask.bool()

    def lora_tap(self, prefix):
        def tap(layer, x_d, h, out):
            if id(layer) in self.seen:  # a checkpointed block recomputing its forward
                return
            self.seen.add(id(layer))
            a_x, a_h = self._tokens(x_d), self._tokens(h.detach() * layer.scaling)
            h.register_hook(lambda g: self._accumulate(prefix + "lora_A", a_x, self._tokens(g)))
            out.register_hook(lambda g: self._accumulate(prefix + "lora_B", a_h, self._tokens(g)))
        return tap

    def head_tap(self, features, logits):
        features = features.detach()  # (B, hidden)
        a = torch.cat([features, torch.ones_like(features[:, :1])], 1)  # bias as a constant input
        logits.register_hook(lambda g: self._accumulate("head", a, g))

    def _tokens(self, t):
        """(B, T, d) -> (real tokens, d); pads carry no statistics."""
        return t.detach()[self.mask] if t.dim() == 3 else t.detach()

    def _block(self, name):
        if name == "head":
            w, b = self.v[HEAD_WEIGHT], self.v[HEAD_BIAS]
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
# Run plumbing: checkpoint files, signals, out-of-memory and non-finite guards, resume
# (the training loop below calls these)
# ====================================================================================

# What a checkpoint records of model selection on meta-val (training.val_every).
VAL_KEYS = ("frozen_val_accuracy", "val_accuracy", "val_iteration")
_AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteError(UserError):
    """Too many meta-batches in a row had a non-finite loss or meta-gradient."""


class OutOfMemory(UserError):
    """CUDA ran out of memory and the micro-batch could not (or may not) be halved."""


def checkpoint_path(run_dir: str | os.PathLike, iteration: int) -> Path:
    """`<run_dir>/checkpoints/checkpoint_iter_<iteration>.pt`."""
    return Path(run_dir) / "checkpoints" / f"checkpoint_iter_{iteration}.pt"


def best_checkpoint_path(run_dir: str | os.PathLike) -> Path:
    """`<run_dir>/checkpoints/best.pt`: the checkpoint with the best meta-val accuracy
    (`training.val_every`)."""
    return Path(run_dir) / "checkpoints" / "best.pt"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint of `run_dir` with the highest iteration, or None."""
    found = [(int(m.group(1)), p) for p in (Path(run_dir) / "checkpoints").glob("checkpoint_iter_*.pt")
             if (m := re.fullmatch(r"checkpoint_iter_(\d+)\.pt", p.name))]
    return max(found)[1] if found else None


class StopOnSignal:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current iteration.

    The first signal only records itself in `signum` (the loop then checkpoints and
    raises `RunInterrupted`); a second one raises KeyboardInterrupt at once, leaving the
    last complete checkpoint. Outside the main thread it does nothing (Python delivers
    signals to the main thread only). The previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (0: none), the same on every rank, so that every
        rank stops at the same iteration (torchrun may signal them apart)."""
        return int(all_reduce_max(float(self.signum or 0), device))

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(signum)  # main names the signal and what is left
        self.signum = signum
        log.warning("%s received: finishing this iteration, then writing a checkpoint "
                    "(send it again to stop at once)", signal.Signals(signum).name)


def remove_partial_writes(run_dir: str | os.PathLike) -> None:
    """Delete the `.*.tmp` files a killed atomic write leaves among the checkpoints."""
    for tmp in (Path(run_dir) / "checkpoints").glob(".checkpoint_iter_*.tmp"):
        tmp.unlink(missing_ok=True)
        log.info("removed %s, left by a checkpoint write that was cut short", tmp.name)


def resume_command(checkpoint: str | os.PathLike, mode_args: tuple[str, ...] = ()) -> str:
    """The command that continues a run from `checkpoint`: `python main.py --resume CKPT`,
    with `mode_args` (e.g. `("--mode", "full")`) before `--resume`."""
    import shlex
    return shlex.join(["python", "main.py", *mode_args, "--resume", str(checkpoint)])


def _interrupted(signum: int, done: int, total: int, path: Path, saved: list, save,
                 mode_args: tuple[str, ...] = ()) -> RunInterrupted:
    """Checkpoint iteration `done` to `path` with `save` (unless just written); the error
    says how to resume (`resume_command` with `mode_args`)."""
    if not saved or Path(saved[-1]) != path:
        saved.append(save(path))
    name = signal.Signals(signum).name
    log.info("stopped by %s after iteration %d; checkpoint %s", name, done, path)
    return RunInterrupted(f"{name} stopped training after iteration {done} of "
                          f"{total}; checkpoint {path} holds it. "
                          f"Continue with: {resume_command(path, mode_args)}", signum)


def _halved_micro_batch(trainer: "MetaTrainer", tasks: list, iteration: int, error: str) -> int:
    """The micro-batch to retry with after CUDA ran out of memory (logged).

    Raises:
        OutOfMemory: `auto_micro_batch` is off or the micro-batch is 1 already; the
            message names the settings to lower.
    """
    # micro_batch 0 means each whole set at once: halve from the larger set's size.
    current = trainer.micro_batch or max(max(len(e.support["labels"]), len(e.query["labels"]))
                                         for e in tasks)
    if not trainer.memory.auto_micro_batch or current <= 1:
        raise OutOfMemory(
            f"CUDA out of memory at iteration {iteration + 1} ({error}) with meta-batch "
            f"{trainer.meta.default_meta_batch_size}, micro-batch {current}, LoRA rank "
            f"{trainer.identity['lora']['rank']}, {trainer.inner_steps} inner steps; " + OOM_ADVICE)
    if trainer.device.type == "cuda":
        torch.cuda.empty_cache()
    smaller = current // 2
    log.warning("iteration %d: CUDA out of memory with micro-batch %d; retrying with "
                "micro-batch %d, kept for the rest of this run (start there with --set "
                "memory_optimization.gradient_accumulation.default_micro_batch=%d)",
                iteration + 1, current, smaller, smaller)
    return smaller


def _with_micro_batch(config_json: str, micro_batch: int) -> str:
    """A recorded config (JSON) with `gradient_accumulation.default_micro_batch` replaced."""
    recorded = json.loads(config_json)
    recorded["memory_optimization"]["gradient_accumulation"]["default_micro_batch"] = micro_batch
    return json.dumps(recorded)


def _skip_nonfinite(iteration: int, meta_loss: float, grad_norm: float, streak: int, limit: int,
                    last_checkpoint: Path | None) -> None:
    """Warn that the meta-batch was skipped, the `streak`-th in a row.

    Raises:
        NonFiniteError: `limit` (`training.max_nonfinite`) skipped in a row.
    """
    if streak >= limit:
        kept = (f"the last checkpoint, {last_checkpoint}, holds the last finite theta"
                if last_checkpoint is not None else "no checkpoint was written yet")
        raise NonFiniteError(
            f"training stopped at iteration {iteration + 1}: {limit} meta-batches in a row "
            f"had a non-finite query loss or meta-gradient (loss {meta_loss}, gradient norm "
            f"{grad_norm}); {kept}. Lower "
            "meta_learning.inner.default_lr or meta_learning.outer.default_lr, set "
            "meta_learning.outer.grad_clip, or use training.precision=fp32")
    warnings.warn(f"iteration {iteration + 1}: non-finite query loss or meta-gradient "
                  f"(loss {meta_loss}, gradient norm {grad_norm}); meta-batch skipped "
                  f"({streak} in a row, stopping at {limit})", RuntimeWarning, stacklevel=2)


# -- resume: a checkpoint's config and theta ------------------------------------------

def resume_config(checkpoint: str | os.PathLike, config_path: str | os.PathLike | None,
                  overrides: Mapping | None) -> Config:
    """The config of a resumed run: the checkpoint's, then a `--config` file, then flags.

    So `--resume CKPT` alone continues the run as it was configured, and only the
    settings the user names change (`config.checkpoint_config`'s rule, applied again with
    its warnings by `run_training`).

    Args:
        checkpoint: the checkpoint to resume.
        config_path: a YAML file, or None.
        overrides: `{"section.key": value}` from the command line.
    """
    saved = saved_config(load_checkpoint(checkpoint), checkpoint)
    return checkpoint_config(saved, config_path, overrides or {}, "train", checkpoint, quiet=True)


def reconcile_config(cfg: Config, state: Mapping, checkpoint, config_file=None,
                     explicit_overrides: Mapping | None = None) -> Config:
    """`cfg` for resuming `state` by `config.checkpoint_config`'s rule: model-defining keys
    take the checkpoint's values (warned about), other changes are warned about.

    Raises:
        UserError: the checkpoint holds another model or LoRA rank (both are named).
    """
    return checkpoint_config(saved_config(state, checkpoint), config_file, explicit_overrides,
                             "train", checkpoint, current=cfg)


def restore_model(checkpoint: str | os.PathLike, device: str | torch.device = "cpu",
                  cfg: Config | None = None, state: Mapping | None = None
                  ) -> tuple[M.MELoRAModel, object, Config, float | torch.Tensor]:
    """Rebuild the meta-trained model of a checkpoint (for evaluation and fidelity).

    Args:
        checkpoint: the checkpoint (read unless `state` is given).
        device: where the model goes.
        cfg: the config to build it with; default the checkpoint's own, as saved.
        state: the checkpoint's state when the caller has read it already.

    Returns:
        (model with theta loaded, tokenizer, the config, inner_lr: a float or the learned
        per-step rates, on `device`).
    """
    state = load_checkpoint(checkpoint) if state is None else state
    cfg = Config(saved_config(state, checkpoint)) if cfg is None else cfg
    device = torch.device(device)
    model, tokenizer = M.build_model(cfg, device)
    load_theta(model, state["theta"], checkpoint)
    inner_lr = state["inner_lr"].to(device) if state["inner_lr"] is not None \
        else cfg.meta_learning.inner.default_lr
    return model, tokenizer, cfg, inner_lr


def load_theta(model: M.MELoRAModel, theta: Mapping[str, torch.Tensor], checkpoint) -> None:
    """Copy a checkpoint's theta into `model`'s LoRA and head parameters.

    Raises:
        UserError: names or shapes differ (another model, LoRA setting, or an edited file).
    """
    ours = M.lora_parameters(model)
    differ = sorted(set(ours) ^ set(theta)) + sorted(
        n for n in set(ours) & set(theta) if ours[n].shape != theta[n].shape)
    if differ:
        raise UserError(f"checkpoint {str(checkpoint)!r} holds tensors that do not fit this "
                        f"model (differ: {', '.join(differ[:5])}); it belongs to another "
                        "model or LoRA setting, or was edited")
    with torch.no_grad():
        for name, param in ours.items():
            param.copy_(theta[name])


# ====================================================================================
# Training loop
# ====================================================================================

class MetaTrainer:
    """MAML over LoRA: Algorithm 1 of Finn et al. (2017) with theta = LoRA factors + head.

    One meta-iteration reads like the paper (see `train_step`):

        tasks = trainer.sample_tasks(iteration)          # sample a batch of tasks T_i
        loss, grads, stats = trainer.meta_gradient(tasks, iteration)  # adapt, evaluate
        trainer.outer_step(grads, grad_norm)  # grad_norm: global L2 norm of grads (for clipping)
                                              # theta <- theta - beta * grad

    Args:
        model: a LoRA-wrapped `model.MELoRAModel` (from `model.build_model`).
        loader: a `dataset_loader.DatasetLoader` (episodes are pure functions of the index).
        meta: the `meta_learning` config section.
        memory: the `memory_optimization` config section.
        training: the `training` config section.
        device: where batches go.
        identity: what a checkpoint must record to rebuild this model: `model`, `n_way`,
            `lora` (rank, alpha, dropout, target_modules) and `config` (a JSON string).
        selection: model selection on meta-val (`ModelSelection`; None: training.val_every 0).

    Example:
        >>> trainer = MetaTrainer.from_config(load_config(overrides=["models.selected_model=tiny-bert",
        ...                                   "datasets.synthetic_only=true"]), cache_dir="cache")
        >>> stats = trainer.train_step(0)
    """

    def __init__(self, model, loader, meta, memory, training, device, identity: Mapping, selection=None):
        self.model, self.loader, self.device, self.selection = model, loader, device, selection or ModelSelection()
        self.meta, self.memory, self.training = meta, memory, training
        self.identity = dict(identity)
        self.seed = training.seed
        self.inner_steps = meta.inner.default_num_steps
        self.method = memory.hessian_approximation.method
        self.micro_batch = memory.gradient_accumulation.default_micro_batch
        self.theta = M.lora_parameters(model)
        # Under torchrun each rank adapts to its share of the meta-batch (global indices t).
        self.local_tasks = _rank_tasks(meta.default_meta_batch_size, rank(), world_size())
        self.inner_lr = _initial_inner_lr(meta.inner, self.inner_steps, self.theta, device)
        self.optimizer = torch.optim.Adam(self.outer_parameters(), lr=meta.outer.default_lr)
        self.iteration = 0          # meta-iterations completed
        self.nonfinite_streak = 0   # non-finite meta-batches in a row
        self.last_checkpoint: Path | None = None  # the newest checkpoint of this run
        self._autocast = _autocast_context(training.precision, device)
        plan = getattr(model, "memory_plan", None)  # build_model's schedule (keep_graphs: auto)
        self.hessian = HessianOptions.from_config(memory.hessian_approximation,
                                                  plan.keep_graphs if plan is not None else None)

    @classmethod
    def from_config(cls, cfg: Config, cache_dir: str | os.PathLike | None = None) -> "MetaTrainer":
        """Set everything up in dependency order: device, model, episodes, optimizer.

        Args:
            cfg: the validated config.
            cache_dir: tokenisation cache; default `datasets.cache_dir`, or
                `<training.output_dir>/cache` when that is "".
        """
        _rank_tasks(cfg.meta_learning.default_meta_batch_size, rank(), world_size())  # fail fast
        device = rank_device(resolve_device(cfg.training.device))
        model, tokenizer = M.build_model(cfg, device)
        selection = ModelSelection.from_config(cfg, tokenizer, cache_dir)  # before the long loading
        loader = DatasetLoader.from_config(cfg, tokenizer, ("meta_train",), cache_dir)
        return cls(model, loader, cfg.meta_learning, cfg.memory_optimization, cfg.training,
                   device, _identity(cfg), selection)

    # -- the verbs of Algorithm 1 -------------------------------------------------------

    def outer_parameters(self) -> list[torch.Tensor]:
        """What the outer Adam optimises: theta, then the learned inner rates if any."""
        learned = [self.inner_lr] if isinstance(self.inner_lr, torch.Tensor) else []
        return list(self.theta.values()) + learned

    def sample_tasks(self, iteration: int) -> list:
        """This rank's share of the meta-batch of `iteration`: episodes iteration * B + t
        for t in `self.local_tasks` (all t < B in one process)."""
        size = self.meta.default_meta_batch_size
        return [self.loader.episode("meta_train", iteration * size + t) for t in self.local_tasks]

    def meta_gradient(self, tasks: list, iteration: int) -> tuple[float, dict, dict]:
        """Adapt to every task and average the meta-gradients over the whole meta-batch.

        Each rank sums its own tasks' losses, meta-gradients and metrics; one all-reduce
        of the theta-sized gradients (communication stays adapter-sized) and one of a few
        scalars add the ranks' sums, so every rank holds the mean over all B tasks: the
        one-process result. A non-finite value on any rank makes the sums non-finite on
        every rank, so the non-finite guard skips on all ranks together.

        Args:
            tasks: this rank's episodes (from `sample_tasks`).
            iteration: the 0-based meta-iteration (seeds each task's dropout).

        Returns:
            (mean query loss, {name: mean gradient}, mean per-task metrics).
        """
        size = self.meta.default_meta_batch_size
        # 1. This rank's sums over its tasks, each seeded by its global index t.
        loss, grads, stats = task_sums(
            self.model, self.theta, tasks, [task_seed(self.seed, iteration, t) for t in self.local_tasks],
            self.inner_lr, self.inner_steps, self.device, self.meta.batched_tasks, self._autocast,
            method=self.method, micro_batch=self.micro_batch, head_init=self.meta.head_init,
            hessian=self.hessian,
            acc_before=self.training.log_query_acc_before)
        # 2. Sums over ranks (nothing to do in one process), divided by the meta-batch size.
        grads = {n: g / size for n, g in zip(grads, all_reduce_sum(list(grads.values())))}
        scalars = torch.tensor([loss, *stats.values()], dtype=torch.float64, device=self.device)
        loss, *values = (float(x) / size for x in all_reduce_sum([scalars])[0])
        return loss, grads, dict(zip(stats, values))

    def outer_step(self, grads: Mapping[str, torch.Tensor], grad_norm: float) -> None:
        """Clip the meta-gradient to `outer.grad_clip` (global norm) and take an Adam step."""
        params = list(self.theta.values())
        step = [None if _frozen(self.meta, name) else grads[name] for name in self.theta]
        if isinstance(self.inner_lr, torch.Tensor):
            params.append(self.inner_lr)
            step.append(grads.get("inner_lr"))  # absent when the meta-gradient does not learn rates
        outer_update(params, step, self.optimizer, self.meta.outer.grad_clip, grad_norm)

    # -- one iteration ------------------------------------------------------------------

    def train_step(self, iteration: int) -> dict[str, float]:
        """One meta-iteration; returns its metrics (see `metrics.jsonl` in the README).

        Raises:
            NonFiniteError: `training.max_nonfinite` meta-batches in a row were non-finite.
        """
        start = time.perf_counter()
        reset_peak_memory(self.device)
        # 1. Seed torch from (seed, iteration): a resumed run replays this iteration exactly.
        set_seed(_iteration_seed(self.seed, iteration))
        # 2. Sample a meta-batch of tasks T_i ~ p(T).
        tasks = self.sample_tasks(iteration)
        # 3. Inner loop per task, then the meta-gradient of its query loss at phi_K (on CUDA
        #    out-of-memory, retried with half the micro-batch), plus any anchor term (L2-SP).
        meta_loss, grads, stats = _anchored(self, *self._meta_gradient_in_memory(tasks, iteration))
        # 4. Guard: a non-finite loss or gradient skips the meta-batch; theta stays finite.
        grad_norm = _global_norm(grads.values())
        finite = math.isfinite(meta_loss) and math.isfinite(grad_norm)
        if finite:
            # 5. Outer update: clip, then Adam on theta (and the learned inner rates).
            self.outer_step(grads, grad_norm)
            self.nonfinite_streak = 0
        else:
            self.nonfinite_streak += 1
            _skip_nonfinite(iteration, meta_loss, grad_norm, self.nonfinite_streak,
                            self.training.max_nonfinite, self.last_checkpoint)
        self.iteration = iteration + 1
        # 6. Metrics of this iteration.
        return {"meta_loss": meta_loss, **stats, "grad_norm": grad_norm,
                "outer_lr": self.optimizer.param_groups[0]["lr"],
                "peak_memory_mb": all_reduce_max(peak_memory_mb(self.device), self.device),
                "seconds": time.perf_counter() - start, "skipped": int(not finite),
                **_inner_lr_metrics(self.inner_lr)}

    def train(self, sink: MetricsSink, run_dir: Path, mode_args: tuple[str, ...] = ()) -> list[Path]:
        """Meta-train from `self.iteration` to `meta_learning.num_iterations`; `mode_args`:
        the flags the resume command printed on a stop needs (`resume_command`).

        Logs every `training.log_every` iterations to `sink`, checkpoints every
        `training.save_every` iterations and at the end. Under torchrun only rank 0 logs,
        shows the progress bar and writes checkpoints (the others pass `sink=None`).
        Returns the checkpoints written (by rank 0; the same paths on every rank).

        Raises:
            utils.RunInterrupted: SIGINT or SIGTERM arrived; the iteration under way was
                finished and checkpointed first (a second signal stops at once).
        """
        end, saved = self.meta.num_iterations, []
        remove_partial_writes(run_dir)  # .tmp files of a write cut short by a kill
        bar = tqdm(range(self.iteration, end), initial=self.iteration, total=end,
                   desc="meta-train", unit="it", mininterval=1.0, dynamic_ncols=True,
                   disable=not is_main_process())
        self.selection.start(self)  # meta-val of the frozen encoder, when selecting on meta-val
        with StopOnSignal() as stop:  # SIGINT/SIGTERM: finish the iteration, checkpoint, stop
            for iteration in bar:
                metrics = self.train_step(iteration)
                done = iteration + 1
                metrics.update(self.selection.after_step(self, done, end, run_dir))  # best.pt
                bar.set_postfix(loss=f"{metrics['meta_loss']:.3f}",
                                acc=f"{metrics.get('query_acc_after', float('nan')):.3f}", refresh=False)
                if sink is not None and (done % self.training.log_every == 0 or done == end):
                    sink.log(done, metrics)
                if done % self.training.save_every == 0 or done == end:
                    saved.append(self.save_checkpoint(checkpoint_path(run_dir, done)))
                signum = stop.agreed(self.device)
                if signum:
                    bar.close()
                    raise _interrupted(signum, done, end, checkpoint_path(run_dir, done), saved,
                                       self.save_checkpoint, mode_args)
        bar.close()
        return saved

    # -- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything an exact resume needs, as tensors and plain data (see README)."""
        learned = isinstance(self.inner_lr, torch.Tensor)
        return {"iteration": self.iteration, "seed": self.seed,
                **self.identity,
                "theta": {n: p.detach().cpu().clone() for n, p in self.theta.items()},
                "inner_lr": self.inner_lr.detach().cpu().clone() if learned else None,
                "optimizer": self.optimizer.state_dict(),
                "nonfinite_streak": self.nonfinite_streak, **self.selection.record,
                "data": self.loader.data_fingerprint}  # compared on resume (_check_same_data)

    def load_state_dict(self, state: Mapping) -> None:
        """Restore theta, the learned inner rates, Adam and progress from a checkpoint."""
        learned = isinstance(self.inner_lr, torch.Tensor)
        _check_learned_rates(state["inner_lr"], self.inner_lr, self.inner_steps)
        load_theta(self.model, state["theta"], "the checkpoint")
        if learned and state["inner_lr"] is not None:
            with torch.no_grad():
                self.inner_lr.copy_(state["inner_lr"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        self.nonfinite_streak = int(state["nonfinite_streak"])
        self.selection.record = {k: state[k] for k in VAL_KEYS if k in state}

    def save_checkpoint(self, path: Path) -> Path:
        """Write the checkpoint atomically; a non-finite theta is never written.

        Under torchrun rank 0 writes it (theta is the same on every rank) and every rank
        returns the path.
        """
        bad = [n for n, p in self.theta.items() if not torch.isfinite(p).all()]
        assert not bad, f"theta became non-finite ({bad[:3]}); refusing to checkpoint"
        if not is_main_process():
            return Path(path)
        path = save_checkpoint(path, self.state_dict())
        self.last_checkpoint = path
        log.debug("checkpoint %s", path)
        return path

    # -- helpers ------------------------------------------------------------------------

    def _meta_gradient_in_memory(self, tasks: list, iteration: int) -> tuple[float, dict, dict]:
        """`meta_gradient`, retried with half the micro-batch on CUDA out-of-memory while
        `memory_optimization.auto_micro_batch` is on; the smaller size is kept for the run."""
        while True:
            try:
                return self.meta_gradient(tasks, iteration)
            except torch.OutOfMemoryError as e:
                error = (str(e) or "out of memory").splitlines()[0]
            # Outside the except block: the traceback's frames (and their tensors) are freed.
            self.micro_batch = _halved_micro_batch(self, tasks, iteration, error)
            # The checkpoints record it, so a resumed run (and the Fisher diagonal, which
            # depends on it) continues with the micro-batch this run actually used.
            self.identity["config"] = _with_micro_batch(self.identity["config"], self.micro_batch)


def _check_learned_rates(saved, inner_lr, inner_steps: int) -> None:
    """A checkpoint's learned inner rates (one per step) must fit this run's inner steps."""
    if isinstance(inner_lr, torch.Tensor) and saved is not None and saved.shape != inner_lr.shape:
        raise UserError(f"the checkpoint learned {saved.numel()} inner rates, one per inner step, "
                        f"but this run has {inner_steps} inner steps; resume without --inner_steps")


class ModelSelection:
    """Model selection on meta-val (`training.val_every`): the best theta kept as best.pt.

    Training may overfit its source: the checkpoint with the best meta-val accuracy, not
    the last, is the one to carry to another domain (issue 30). Before the first
    iteration it scores the frozen encoder (theta at its initialisation: LoRA B = 0), then
    every `every` iterations and at the end the current theta; `record` (checkpointed)
    holds frozen_val_accuracy, val_accuracy and val_iteration, which adapt and evaluate
    print side by side (`val_summary`). Without a meta-val loader it does nothing.

    Args:
        loader: a `DatasetLoader` of the `meta_val` split, or None (off).
        every: iterations between evaluations (training.val_every).
        episodes: meta-val episodes 0..episodes-1 per evaluation (training.val_episodes).
    """

    def __init__(self, loader=None, every: int = 0, episodes: int = 0):
        self.loader, self.every, self.episodes = loader, every, episodes
        self.record: dict = {}

    @classmethod
    def from_config(cls, cfg: Config, tokenizer, cache_dir=None) -> "ModelSelection":
        """On when training.val_every > 0 (then datasets.meta_val must name a source)."""
        if cfg.training.val_every <= 0:
            return cls()
        _check_meta_val(cfg)
        loader = DatasetLoader.from_config(cfg, tokenizer, ("meta_val",), cache_dir)
        return cls(loader, cfg.training.val_every, cfg.training.val_episodes)

    def start(self, trainer: MetaTrainer) -> None:
        """Score the frozen encoder before a fresh run's first iteration."""
        if self.loader is not None and trainer.iteration == 0:
            self.record["frozen_val_accuracy"] = self.validate(trainer)

    def after_step(self, trainer: MetaTrainer, done: int, end: int, run_dir: Path) -> dict:
        """When due, score meta-val and keep theta as best.pt if it is the best so far;
        returns {"val_accuracy": score} then, {} otherwise."""
        if self.loader is None or (done % self.every and done != end):
            return {}
        return {"val_accuracy": self.keep_best(trainer, run_dir)}

    def validate(self, trainer: MetaTrainer) -> float:
        """Mean query accuracy after K adaptation steps from theta (`meta_val_accuracy`)."""
        episodes = [self.loader.episode("meta_val", i) for i in range(self.episodes)]
        return meta_val_accuracy(trainer.model, trainer.theta, episodes, trainer.inner_lr,
                                 trainer.inner_steps, trainer.meta.head_init, trainer.micro_batch,
                                 trainer.seed, trainer.device)

    def keep_best(self, trainer: MetaTrainer, run_dir: Path) -> float:
        """Score meta-val; when it beats `best.pt`'s score (or there is none), write this
        theta as `best.pt` (atomically, the score inside) and `best.json`. Returns the score."""
        accuracy = self.validate(trainer)
        self.record.update(val_accuracy=accuracy, val_iteration=trainer.iteration)
        path = best_checkpoint_path(run_dir)
        if is_main_process() and accuracy > _best_score(path):
            _write_best(path, trainer.state_dict(), self.episodes)
        return accuracy


def _anchored(trainer: MetaTrainer, meta_loss: float, grads: dict, stats: dict) -> tuple[float, dict, dict]:
    """The meta-batch's loss and gradient plus the proximal anchor (meta_learning.anchor)."""
    if trainer.meta.anchor <= 0:
        return meta_loss, grads, stats
    penalty, extra = anchor_gradient(trainer.model, trainer.theta, trainer.meta.anchor)
    grads = {n: g + extra[n] if n in extra else g for n, g in grads.items()}
    return meta_loss + penalty, grads, {**stats, "anchor_penalty": penalty}


def _frozen(meta, name: str) -> bool:
    """Whether the outer loop leaves theta[name] alone: LoRA factors under
    meta_learning.outer.learn_lora false keep their initialisation (Adam skips a None grad)."""
    return not meta.outer.learn_lora and _is_lora_factor(name)


def task_sums(model: M.MELoRAModel, theta: Mapping[str, torch.Tensor], episodes: list,
              seeds: list[int], inner_lr: float | torch.Tensor, inner_steps: int,
              device: torch.device, batched: bool = False, autocast=contextlib.nullcontext(),
              **options) -> tuple[float, dict, dict]:
    """Sums over `episodes` of query loss, meta-gradient and metrics (a rank's meta-batch share).

    One task at a time, torch's global generator restarts at each task's seed, which
    also seeds its dropout (so results do not depend on how tasks split over ranks);
    `batched` runs the inner loops together (`compute_batched_meta_gradient`, seeded
    by the first task's seed).

    Args:
        episodes: `dataset_loader.Episode`s (their sets go to `device`).
        seeds: one per episode.
        autocast: the context each meta-gradient runs in (mixed precision).
        options: keywords of `compute_meta_gradient` (method, micro_batch, hessian, ...).
    """
    if batched:
        pairs = [(to_device(e.support, device), to_device(e.query, device)) for e in episodes]
        metrics: dict = {}
        with autocast:
            loss, grads = compute_batched_meta_gradient(model, theta, pairs, inner_lr, inner_steps,
                                                        metrics=metrics, seed=seeds[0], **options)
        n = len(episodes)  # the call returns means over its tasks
        return (float(loss) * n, {name: g * n for name, g in grads.items()},
                {k: float(v) * n for k, v in metrics.items()})
    loss, grads, stats = 0.0, {}, {}
    for seed, episode in zip(seeds, episodes):
        torch.manual_seed(seed)
        support, query = to_device(episode.support, device), to_device(episode.query, device)
        metrics = {}
        with autocast:
            task_loss, task_grads = compute_meta_gradient(model, theta, support, query, inner_lr,
                                                          inner_steps, metrics=metrics, seed=seed,
                                                          **options)
        loss += float(task_loss)
        grads = {n: grads[n] + g if n in grads else g for n, g in task_grads.items()}
        stats = {k: stats.get(k, 0.0) + float(v) for k, v in metrics.items()}
    return loss, grads, stats


def meta_val_accuracy(model: M.MELoRAModel, theta: Mapping[str, torch.Tensor], episodes: list,
                      inner_lr: float | torch.Tensor, inner_steps: int, head_init: str,
                      micro_batch: int, seed: int, device: torch.device) -> float:
    """Mean query accuracy after `inner_steps` SGD steps from theta over `episodes`.

    Adaptation as `baseline.FewShotMethod.adapt` (so model selection sees what evaluation
    reports): phi_0 = `initial_fast_weights`, first-order steps on the support loss with
    dropout on (seeded per episode: `utils.episode_seed(seed, i)`), prediction with dropout off.
    """
    from utils import episode_seed
    accuracies = []
    for i, episode in enumerate(episodes):
        set_seed(episode_seed(seed, i))
        support, query = to_device(episode.support, device), to_device(episode.query, device)
        phi = {n: t.detach() for n, t in initial_fast_weights(model, theta, support, head_init,
                                                              micro_batch).items()}
        for rate in _step_rates(inner_lr, inner_steps):
            leaves = {n: t.requires_grad_() for n, t in phi.items()}
            loss = F.cross_entropy(M.forward(model, leaves, support), support["labels"])
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            phi = {n: (t - rate * g).detach() if g is not None else t.detach()
                   for (n, t), g in zip(leaves.items(), grads)}
        with torch.no_grad(), dropout_off(model):
            predictions = M.forward(model, phi, query).argmax(-1)
        accuracies.append(float((predictions == query["labels"]).float().mean()))
    return float(np.mean(accuracies))


def _write_best(path: Path, state: dict, val_episodes: int) -> None:
    """best.pt (atomically) and best.json beside it, from a state holding val_accuracy."""
    save_checkpoint(path, state)
    atomic_write_json(path.with_suffix(".json"), {
        "iteration": state["iteration"], **{k: state[k] for k in VAL_KEYS if k in state},
        "val_episodes": val_episodes, "checkpoint": str(path)})
    log.info("meta-val accuracy %.4f at iteration %d: the best so far, kept as %s",
             state["val_accuracy"], state["iteration"], path)


def anchor_gradient(model: M.MELoRAModel, theta: Mapping[str, torch.Tensor],
                    strength: float) -> tuple[float, dict[str, torch.Tensor]]:
    """The proximal anchor (strength/2) sum_l ||scaling_l B_l A_l||_F^2 and its gradient.

    A penalty on the LoRA update Delta W = scaling B A itself, so it pulls the adapted
    weights toward the pretrained ones (L2-SP: Li, Grandvalet & Davoine, 2018, "Explicit
    Inductive Bias for Transfer Learning") whatever the factors' parametrisation.

    Returns:
        (penalty, {theta name of every LoRA factor: its gradient}).
    """
    names = {id(p): n for n, p in theta.items()}
    factors, penalty = [], 0.0
    with torch.enable_grad():
        for layer in M.lora_layers(model):
            delta = layer.scaling * (layer.lora_B @ layer.lora_A)  # (out, in)
            penalty = penalty + delta.pow(2).sum()
            factors += [layer.lora_A, layer.lora_B]
        if not factors:
            return 0.0, {}
        penalty = 0.5 * strength * penalty
        grads = torch.autograd.grad(penalty, factors)
    return float(penalty.detach()), {names[id(p)]: g.detach() for p, g in zip(factors, grads)}


def run_training(cfg: Config, run_dir: str | os.PathLike,
                 resume: str | os.PathLike | None = None, config_file: str | os.PathLike | None = None,
                 explicit_overrides: Mapping | None = None, mode_args: tuple[str, ...] = ()) -> dict:
    """Meta-train as `cfg` says, writing checkpoints, metrics and logs under `run_dir`.

    Args:
        cfg: the validated config.
        run_dir: the run folder (from `runs.prepare_run_dir`).
        resume: a checkpoint to continue from exactly; model-defining settings are taken
            from it (see `resume_config`).
        config_file, explicit_overrides: on resume, the `--config` file and the flags the
            user gave (`config.checkpoint_config`); None: every key of `cfg` counts as given.
        mode_args: the flags of the command that continues this run after a stop, e.g.
            `("--mode", "full")` (`resume_command`).

    Under torchrun (`utils.init_distributed` called first) every rank runs this with the
    same arguments and reads `resume` itself; the meta-batch is split across ranks and
    rank 0 alone writes files.

    Returns:
        A summary: iterations, final metrics, checkpoint paths, metric locations (on
        ranks other than 0: run folder, iterations, rank and checkpoint paths).

    Raises:
        UserError: a bad checkpoint, a checkpoint of another model or LoRA rank, a
            checkpoint already at `num_iterations`, a meta-batch that does not split
            evenly over the processes, or non-finite training.
    """
    run_dir = Path(run_dir)
    state = load_checkpoint(resume) if resume is not None else None
    if state is not None:
        cfg = reconcile_config(cfg, state, resume, config_file, explicit_overrides)
    # 1. Set up in dependency order: model, episodes, optimizer; then restore progress.
    trainer = MetaTrainer.from_config(cfg)
    if state is not None:
        trainer.load_state_dict(state)
        trainer.last_checkpoint = Path(resume)
        _check_same_data(state.get("data"), trainer.loader.data_fingerprint, resume)
        _check_not_done(trainer.iteration, cfg, resume)
    main = is_main_process()  # under torchrun, rank 0 alone writes files and metrics
    if main:
        _log_setup(trainer, cfg, run_dir, resume)
        atomic_write_text(run_dir / "config.yml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    # 2. Train, logging every step to the sink; the MLflow run ends FAILED on any error.
    sink = MetricsSink(run_dir, cfg.tracking, cfg.training.experiment_name, cfg.flat(),
                       start_iteration=trainer.iteration) if main else None
    status = "FAILED"
    try:
        saved = trainer.train(sink, run_dir, mode_args)
        status = "FINISHED"
    except RunInterrupted:
        status = "KILLED"  # stopped cleanly by a signal, resumable
        raise
    finally:
        if sink is not None:
            sink.close(status)
    if not main:
        return {"run_dir": str(run_dir), "iterations": trainer.iteration, "rank": rank(),
                "checkpoints": [str(p) for p in saved]}
    # 3. Summary: where everything went and how to open it.
    summary = _summary(trainer, run_dir, saved, sink)
    atomic_write_json(run_dir / "summary.json", summary)
    log.info(_summary_text(summary))
    return summary


# -- helpers ---------------------------------------------------------------------------

def _initial_inner_lr(inner, inner_steps: int, theta: Mapping[str, torch.Tensor],
                      device: torch.device) -> float | torch.Tensor:
    """`inner.default_lr`, or with `inner.learn_lr` one rate per inner step a_k
    (Meta-SGD / MAML++ style), a parameter the outer Adam learns."""
    if not inner.learn_lr:
        return inner.default_lr
    dtype = next(iter(theta.values())).dtype
    return torch.nn.Parameter(torch.full((inner_steps,), inner.default_lr, dtype=dtype,
                                         device=device))


def _inner_lr_metrics(inner_lr: float | torch.Tensor) -> dict[str, float]:
    """The learned inner rates as metrics inner_lr_k (none when the rate is fixed)."""
    if not isinstance(inner_lr, torch.Tensor):
        return {}
    return {f"inner_lr_{k}": float(a) for k, a in enumerate(inner_lr.detach())}


def _identity(cfg: Config) -> dict:
    """What a checkpoint records to rebuild the model: model, n_way, LoRA, the config (JSON)."""
    lora, family = cfg.lora, M.family_of(cfg.models.selected_model)
    return {"model": cfg.models.selected_model, "n_way": cfg.tasks.n_way,
            "lora": {"rank": lora.default_rank, "alpha": lora.alpha, "dropout": lora.dropout,
                     "target_modules": list(lora.target_modules[family])},
            "config": json.dumps(cfg.to_dict())}


def val_summary(state: Mapping) -> str | None:
    """One line comparing a checkpoint's meta-val accuracy with the frozen encoder's, both
    measured by its training run (training.val_every); None when it measured neither.

    Example: "meta-val accuracy at iteration 40: 84.00%; frozen encoder 88.80% (no
    meta-training, same adaptation): meta-training changed it by -4.80 points"
    """
    if state.get("val_accuracy") is None or state.get("frozen_val_accuracy") is None:
        return None
    mine, frozen = 100 * float(state["val_accuracy"]), 100 * float(state["frozen_val_accuracy"])
    line = (f"meta-val accuracy at iteration {state.get('val_iteration')}: {mine:.2f}%; frozen encoder "
            f"{frozen:.2f}% (no meta-training, same adaptation): meta-training changed it by "
            f"{mine - frozen:+.2f} points")
    if mine < frozen:
        line += ("; it hurt here: use checkpoints/best.pt, or configs/cross_domain.yml (README, "
                 "When meta-training helps, and when it hurts)")
    return line


def _check_meta_val(cfg: Config) -> None:
    """training.val_every needs meta-val episodes."""
    if not cfg.datasets.meta_val and not cfg.datasets.synthetic_only:
        raise ConfigError(f"training.val_every is {cfg.training.val_every}, but datasets.meta_val "
                          "lists no source to validate on; add a meta_val source (a held-out "
                          "domain, e.g. --eval_dataset) or set training.val_every=0")


def _is_lora_factor(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith(M.LORA_PREFIX)


def _best_score(path: Path) -> float:
    """The meta-val accuracy stored in `best.pt` (-inf when there is none yet)."""
    if not path.is_file():
        return -math.inf
    return float(load_checkpoint(path).get("val_accuracy", -math.inf))


def _rank_tasks(meta_batch_size: int, rank: int, world: int) -> range:
    """The global task indices t of `rank`'s contiguous share of a meta-batch.

    Raises:
        ConfigError: the meta-batch does not split evenly over the processes (the
            all-reduced mean equals the one-process mean only for equal shares).
    """
    if meta_batch_size % world:
        raise ConfigError(f"meta_learning.default_meta_batch_size ({meta_batch_size}) must be "
                          f"divisible by the number of processes ({world}) so that each takes "
                          "the same number of tasks; pass --meta_batch_size "
                          f"{max(world, meta_batch_size // world * world)} or change --nproc_per_node")
    share = meta_batch_size // world
    return range(rank * share, (rank + 1) * share)


def _iteration_seed(seed: int, iteration: int) -> int:
    return int(np.random.SeedSequence([seed, iteration]).generate_state(1)[0])


def task_seed(seed: int, iteration: int, task: int) -> int:
    return int(np.random.SeedSequence([seed, iteration, task]).generate_state(2, np.uint64)[0] % 2**62)


def outer_update(params: list[torch.Tensor], grads: list[torch.Tensor | None],
                 optimizer: torch.optim.Optimizer, max_norm: float, grad_norm: float | None = None) -> None:
    """The outer update of every meta-learner: scale `grads` to global norm `max_norm`
    (0: no clipping), make them the parameters' .grad (None: no gradient) and step.

    Args:
        params: the parameters, in `grads`' order.
        grads: their meta-gradients.
        optimizer: the outer optimizer over `params` (Adam).
        max_norm: `meta_learning.outer.grad_clip`.
        grad_norm: the global norm the clip is measured by; default that of `grads`.
    """
    if grad_norm is None:
        grad_norm = _global_norm([g for g in grads if g is not None])
    scale = min(1.0, max_norm / (grad_norm + 1e-12)) if max_norm > 0 else 1.0
    for param, g in zip(params, grads):
        param.grad = None if g is None else (g * scale).to(param.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _global_norm(tensors) -> float:
    norms = [t.detach().float().norm() for t in tensors]
    return float(torch.stack(norms).norm()) if norms else 0.0


def _autocast_context(precision: str, device: torch.device):
    if precision not in _AUTOCAST_DTYPE:
        return contextlib.nullcontext()
    if device.type != "cuda":
        warnings.warn(f"training.precision={precision} uses autocast on CUDA only; this run "
                      f"is on {device} and uses fp32", UserWarning, stacklevel=3)
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=_AUTOCAST_DTYPE[precision])


def _check_same_data(saved: Mapping | None, current: Mapping, checkpoint) -> None:
    """Warn when the meta-training data differs from what the checkpoint trained on
    (None: a checkpoint older than the record, nothing to compare)."""
    if saved is None or dict(saved) == dict(current):
        return
    changed = sorted(n for n in set(saved) | set(current) if saved.get(n) != current.get(n))
    warnings.warn(f"the meta-training data changed since the checkpoint {str(checkpoint)!r} was "
                  f"written ({', '.join(changed)}); the run continues on the new data. To continue "
                  "exactly, restore the data the checkpoint trained on", UserWarning, stacklevel=2)


def _check_not_done(iteration: int, cfg: Config, checkpoint) -> None:
    if iteration >= cfg.meta_learning.num_iterations:
        raise UserError(f"checkpoint {str(checkpoint)!r} is at iteration {iteration}, and "
                        f"meta_learning.num_iterations is {cfg.meta_learning.num_iterations}; "
                        "pass a larger --num_iterations to continue")


def _log_setup(trainer: MetaTrainer, cfg: Config, run_dir: Path, resume) -> None:
    trainable, total = M.count_parameters(trainer.model)
    log.info("run folder %s; model %s on %s; theta %d of %d parameters (%.2f%%)",
             run_dir, cfg.models.selected_model, trainer.device, trainable, total,
             100 * trainable / total)
    if resume is not None:
        log.info("resuming from %s at iteration %d", resume, trainer.iteration)
    attention = getattr(trainer.model.backbone.config, "_attn_implementation", "eager")
    log.info("hessian method %s: support-set passes%s run scaled-dot-product attention on "
             "its math kernel (model.second_order_attention), which has a double backward "
             "and replays dropout masks exactly; attention implementation: %s", trainer.method,
             "" if trainer.method == "none" else " and second-order graphs", attention)


def _summary(trainer: MetaTrainer, run_dir: Path, saved: list[Path], sink: MetricsSink) -> dict:
    last = {}
    lines = sink.jsonl_path.read_text().splitlines()
    if lines:
        last = json.loads(lines[-1])
    best = best_checkpoint_path(run_dir)
    return {"run_dir": str(run_dir), "iterations": trainer.iteration,
            "checkpoints": [str(p) for p in saved],
            "best_checkpoint": str(best) if best.is_file() else None,
            "last_checkpoint": str(saved[-1]) if saved else None,
            "config": str(run_dir / "config.yml"), "final_metrics": last, **sink.locations()}


def _summary_text(summary: Mapping) -> str:
    lines = [f"training done: {summary['iterations']} iterations",
             f"  checkpoints   {Path(summary['run_dir']) / 'checkpoints'} "
             f"(last: {summary['last_checkpoint']})",
             *([f"  best meta-val {summary['best_checkpoint']}"] if summary.get("best_checkpoint") else []),
             f"  metrics       {summary['metrics']}"]
    if "mlflow" in summary:
        lines.append(f"  MLflow        {summary['mlflow_command']}")
    if "tensorboard" in summary:
        lines.append(f"  TensorBoard   {summary['tensorboard_command']}")
    return "\n".join(lines)


