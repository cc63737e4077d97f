"""Few-shot methods behind one interface: MELoRA and the baselines it is compared with.

Every method is built from the same pretrained model and is run on the same episodes
with the same adaptation budget (number of steps), from the same head initialisation
(`head_init`: support-set prototypes computed with dropout off, or zero):

    method = build_baseline("maml", cfg, device, inner_lr=0.05, outer_lr=1e-3)
    method.meta_train(loader, iterations=100)         # no-op for methods without one
    accuracies = method.adapt(episode, steps=10)      # query accuracy after 0..10 steps

| name | what adapts at test time | meta-training |
| --- | --- | --- |
| `melora` | LoRA + head from the checkpoint's theta | the checkpoint (trainer.py) |
| `proto_lora` | LoRA + head | MELoRA with K = 0: LoRA meta-trained through the proto head, no inner loop (control) |
| `fomaml_lora` | LoRA + head | first-order MAML over the same LoRA + head (MELoRA with Hessian `none`; control) |
| `maml` | all weights | second order, unrolled autograd through the inner loop |
| `fomaml` | all weights | first order (inner gradients detached) |
| `reptile` | all weights | theta <- theta + eps (phi_K - theta), via Adam |
| `reptile_lora` | LoRA + head | Reptile over LoRA + head |
| `finetune` | a fresh LoRA + head init | none |
| `finetune_multitask` | LoRA (multitask) + head init | LoRA + a classifier over the pooled meta-train classes |
| `protonet` | nothing (0 steps) | none; nearest class prototype of frozen mean-pooled features |

With `head_init: proto` every gradient-based method's head starts each episode from its
own features' support prototypes c_n (Proto-MAML, Triantafillou et al. 2020): W = c_n, b = 0
for the LoRA methods' cosine head (`meta_learning.head`, the default), W = 2 c_n,
b = -|c_n|^2 for a Euclidean head, which the full-weight baselines always use, and the meta-learners meta-train through them; with `zero`
the head starts at theta's head (zero unless meta-learned).

References: MAML/FOMAML, Finn et al. (2017), "Model-Agnostic Meta-Learning"; the
unrolled second-order graph is how learn2learn (`algorithms/maml.py`) and `higher` do
it, so `maml` is the memory reference of MELoRA's claim. Reptile, Nichol et al. (2018),
"On First-Order Meta-Learning Algorithms". Prototypical networks, Snell et al. (2017).
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

import model as M
import trainer as T
from config import Config, Rules, register_rules
from trainer import HEAD_INIT
from utils import ConfigError, set_seed, to_device

log = logging.getLogger("melora")

# evaluation.baselines may name these (build_baseline builds them); "melora" is always evaluated.
BASELINES = ("proto_lora", "fomaml_lora", "maml", "fomaml", "reptile", "reptile_lora", "finetune",
             "finetune_multitask", "protonet")
# Methods with a meta-training phase (tuned inner + outer rate, one training per seed).
META_LEARNED = ("proto_lora", "fomaml_lora", "maml", "fomaml", "reptile", "reptile_lora",
                "finetune_multitask")
# Methods that adapt by gradient steps (they take `head_init`, and a tuned inner rate).
GRADIENT_BASED = ("melora",) + tuple(n for n in BASELINES if n != "protonet")

Params = dict  # name -> tensor; names as in `named_parameters` of the model


def _check_baseline_names(data: dict) -> None:
    """evaluation.baselines names only methods this module builds (at load time, not after
    hours of training in full mode)."""
    unknown = [n for n in data["evaluation"]["baselines"] if n not in BASELINES]
    if unknown:
        raise ConfigError(f"evaluation.baselines names unknown method(s) {unknown}; choose "
                          f"from {', '.join(BASELINES)}")


register_rules("baseline", Rules(check=_check_baseline_names, whole_run=True))


# ------------------------------------------------------------------------------------
# The interface
# ------------------------------------------------------------------------------------

class FewShotMethod:
    """A few-shot learner: optional meta-training, then adapt-and-predict per episode.

    Subclasses set `theta` (the tensors adapted at test time, from their initialisation)
    and may override `meta_step` (one meta-training iteration).

    Args:
        model: a `model.MELoRAModel` (LoRA-wrapped or not).
        theta: the tensors adapted at test time, keyed as in `model.named_parameters()`.
        inner_lr: the inner SGD rate; a float, or a tensor of per-step rates a_k (the
            last rate is used for steps beyond it).

    Attributes:
        name: the method's name in results.
        second_order: whether `meta_step` differentiates through the inner loop.
        optimizer_copies: trainable-sized buffers kept besides the weights while
            (meta-)training: gradient + Adam's two moments = 3, SGD only = 1, none = 0.
    """

    name = "method"
    second_order = False
    optimizer_copies = 1
    head_init = HEAD_INIT  # zero: the head starts at theta's; proto: at support prototypes
    micro_batch = 0      # examples per pass when computing prototypes (0 = all)
    outer_lr: float | None = None  # the meta-training rate, for methods that meta-train
    hessian = "-"        # the curvature of meta_step's meta-gradient (memory tables)

    def __init__(self, model: M.MELoRAModel, theta: Params, inner_lr: float | torch.Tensor,
                 head_init: str = HEAD_INIT):
        self.model, self.theta, self.inner_lr, self.head_init = model, theta, inner_lr, head_init

    # -- verbs ------------------------------------------------------------------------

    def meta_train(self, loader, iterations: int, meta_batch_size: int) -> None:
        """Meta-train on `meta_train` episodes it * B + t (as trainer.py samples them)."""
        for it in range(iterations):
            tasks = [loader.episode("meta_train", it * meta_batch_size + t)
                     for t in range(meta_batch_size)]
            self.iteration = it
            self.meta_step(tasks)

    def meta_step(self, tasks: Sequence, update: bool = True, first_order: bool = False) -> float:
        """One meta-training iteration on `tasks`; returns the mean loss (0 if none).

        Args:
            tasks: episodes (moved to the model's device here).
            update: False computes the step without changing theta (a memory probe).
            first_order: drop the second-order terms (memory breakdown of `maml`/`melora`).
        """
        return 0.0

    def adapt(self, episode, steps: int) -> list[float]:
        """SGD on theta over the support set; query accuracy after 0..`steps` steps.

        Dropout is on for the gradient steps (as in training) and off for predictions.

        Returns:
            `steps + 1` accuracies, fractions in [0, 1].
        """
        support, query = self.to_device(episode.support), self.to_device(episode.query)
        return [self.accuracy(phi, query) for phi in self.fast_weights(support, steps)]

    def fast_weights(self, support: Mapping[str, torch.Tensor], steps: int):
        """phi_0, phi_1, ..., phi_steps: SGD on theta over `support` (on the model's device).

        The adaptation of `adapt`, also used by adapt.py to fit a user's task.
        """
        phi = {n: t.detach() for n, t in self.start(support).items()}
        yield phi
        for k in range(steps):
            grads = self.support_gradient(phi, support)
            phi = {n: p - self.rate(k) * g for n, p, g in zip(phi, phi.values(), grads)}
            yield phi

    # -- building blocks --------------------------------------------------------------

    def start(self, support: Mapping[str, torch.Tensor]) -> Params:
        """phi_0 of a new episode: theta, with the head from support prototypes (proto).

        The same computation for every method (trainer.initial_fast_weights: features
        with dropout off, W = c, b = 0 for the cosine head, W = 2 c, b = -|c|^2 for the
        Euclidean one), on the method's own weights.
        """
        return T.initial_fast_weights(self.model, self.theta, support, self.head_init, self.micro_batch)

    def rate(self, k: int) -> float | torch.Tensor:
        """a_k; beyond the learned rates, the last one."""
        lr = self.inner_lr
        if torch.is_tensor(lr) and lr.numel() > 0:
            return lr.reshape(-1)[min(k, lr.numel() - 1)].detach()
        return float(lr)

    def support_gradient(self, phi: Params, support) -> list[torch.Tensor]:
        """grad of the support loss at phi (first order, no graph kept)."""
        leaves = {n: p.detach().requires_grad_() for n, p in phi.items()}
        loss = self.loss(leaves, support)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(leaves.values(), grads)]

    def loss(self, params: Params, batch) -> torch.Tensor:
        """Mean cross-entropy of the model with `params` swapped in."""
        return F.cross_entropy(M.forward(self.model, params, batch), batch["labels"])

    @torch.no_grad()
    def accuracy(self, params: Params, batch) -> float:
        """Query accuracy with dropout off."""
        with T.dropout_off(self.model):
            logits = M.forward(self.model, params, batch)
        return (logits.argmax(-1) == batch["labels"]).float().mean().item()

    def to_device(self, batch: Mapping[str, torch.Tensor]) -> dict:
        return to_device(batch, next(self.model.parameters()).device)

    def trainable_numel(self) -> int:
        """Elements of theta (what gradients and optimizer state are sized by)."""
        return sum(t.numel() for t in self.theta.values())


# ------------------------------------------------------------------------------------
# MELoRA (from a checkpoint) and fine-tuning
# ------------------------------------------------------------------------------------

class MELoRA(FewShotMethod):
    """MELoRA at meta-test time: SGD on LoRA + head from the meta-learned theta.

    Args:
        model: the LoRA-wrapped model with the checkpoint's theta loaded.
        inner_lr: the checkpoint's inner rate (float) or learned per-step rates.
        inner_steps: K, the meta-training inner steps (for `meta_step`).
        hessian_method: the meta-gradient's curvature method (for `meta_step`).
        micro_batch: micro-batch size of the meta-gradient.

    Example:
        >>> model, tok, cfg, inner_lr = trainer.restore_model("checkpoint_iter_100.pt")
        >>> accuracies = MELoRA(model, inner_lr, 3, "diagonal").adapt(episode, steps=10)
    """

    name = "melora"
    optimizer_copies = 3

    def __init__(self, model, inner_lr, inner_steps: int, hessian_method: str, micro_batch: int = 0,
                 head_init: str = HEAD_INIT):
        super().__init__(model, M.lora_parameters(model), inner_lr, head_init)
        self.inner_steps, self.hessian_method, self.micro_batch = inner_steps, hessian_method, micro_batch
        self.hessian = hessian_method
        self.second_order = hessian_method != "none" and inner_steps > 0

    def meta_step(self, tasks, update=True, first_order=False, method: str | None = None) -> float:
        """One meta-gradient per task as in training; never updates (theta is the checkpoint's).

        `method` overrides the Hessian method (evaluation probes `full` beside the configured one).
        """
        assert not update, "MELoRA is meta-trained by trainer.py; meta_step only probes memory"
        method = "none" if first_order else (method or self.hessian_method)
        losses = []
        for ep in tasks:
            loss, _ = T.compute_meta_gradient(
                self.model, self.theta, self.to_device(ep.support), self.to_device(ep.query),
                self.inner_lr, self.inner_steps, method, self.micro_batch, head_init=self.head_init)
            losses.append(float(loss))
        return sum(losses) / len(losses)


class LoRAMetaLearner(FewShotMethod):
    """MELoRA's own meta-training over LoRA + head, for the controls `proto_lora` and
    `fomaml_lora`: the trainer's meta-gradient (same engine, head_init, micro-batch,
    dropout seeding per task) and an outer Adam with clipping, as trainer.MetaTrainer.

    Args:
        model: a LoRA-wrapped model (model.build_model).
        inner_lr: a, the inner SGD rate (meta-training and adaptation).
        inner_steps: K during meta-training: 0 for proto_lora (no inner loop; theta is
            trained only through the prototype head's query loss).
        hessian_method: the meta-gradient's curvature; `none` = first-order MAML.
        outer_lr, grad_clip: the outer Adam's rate and max global gradient norm.
        micro_batch: examples per micro-batch.
        head_init: zero or proto.
        seed: seeds each task's dropout, from (seed, iteration, task).
        batched: run a meta-batch's inner loops together (`trainer.compute_batched_meta_gradient`,
            `meta_learning.batched_tasks`): the same meta-gradient up to dropout masks, fewer
            and larger kernels (faster on GPU); tasks must have equal set sizes.
    """

    optimizer_copies = 3

    def __init__(self, model, inner_lr: float, inner_steps: int, hessian_method: str,
                 outer_lr: float, grad_clip: float, micro_batch: int = 0, head_init: str = HEAD_INIT,
                 seed: int = 0, batched: bool = False):
        super().__init__(model, M.lora_parameters(model), inner_lr, head_init)
        self.batched = batched
        self.inner_steps, self.hessian, self.micro_batch = inner_steps, hessian_method, micro_batch
        self.outer_lr, self.grad_clip, self.seed, self.iteration = outer_lr, grad_clip, seed, 0
        self.second_order = hessian_method != "none" and inner_steps > 0
        self.optimizer = torch.optim.Adam(list(self.theta.values()), lr=outer_lr)

    def meta_step(self, tasks, update=True, first_order=False) -> float:
        """One outer step; `last_metrics` then holds the tasks' mean `query_acc_before`
        (at theta), `query_acc_after` (at phi_K) and `support_loss` (at theta), the
        trainer's per-iteration metrics (learning curves of the accuracy study)."""
        method = "none" if first_order else self.hessian
        if self.batched and len(tasks) > 1:
            return self._batched_step(tasks, method, update)
        total, grads, metrics = 0.0, [torch.zeros_like(t) for t in self.theta.values()], []
        for t, ep in enumerate(tasks):
            metrics.append({})
            loss, g = T.compute_meta_gradient(
                self.model, self.theta, self.to_device(ep.support), self.to_device(ep.query),
                self.inner_lr, self.inner_steps, method, self.micro_batch, metrics=metrics[-1],
                seed=T.task_seed(self.seed, self.iteration, t), head_init=self.head_init)
            grads = [a + g[n] / len(tasks) for a, n in zip(grads, self.theta)]
            total += float(loss) / len(tasks)
        self.last_metrics = {k: sum(float(m[k]) for m in metrics) / len(metrics)
                             for k in metrics[0] if all(k in m for m in metrics)} if metrics else {}
        if update:
            T.outer_update(list(self.theta.values()), grads, self.optimizer, self.grad_clip)
        return total


    def _batched_step(self, tasks, method: str, update: bool) -> float:
        """meta_step with the tasks' inner loops run together (dropout seeded by task 0's seed)."""
        pairs = [(self.to_device(ep.support), self.to_device(ep.query)) for ep in tasks]
        metrics = {}
        loss, g = T.compute_batched_meta_gradient(
            self.model, self.theta, pairs, self.inner_lr, self.inner_steps, method, self.micro_batch,
            metrics=metrics, seed=T.task_seed(self.seed, self.iteration, 0), head_init=self.head_init)
        self.last_metrics = {k: float(v) for k, v in metrics.items()}
        if update:
            T.outer_update(list(self.theta.values()), [g[n] for n in self.theta], self.optimizer, self.grad_clip)
        return float(loss)


class FineTune(FewShotMethod):
    """No meta-learning: a fresh LoRA and the head init fitted on each support set.

    theta is the LoRA initialisation MELoRA itself started from (same seed), and the head
    starts where every method's starts (prototypes or zero), so only meta-learning
    separates the two.
    """

    name = "finetune"
    optimizer_copies = 1

    def __init__(self, model, inner_lr, head_init: str = HEAD_INIT):
        super().__init__(model, M.lora_parameters(model), inner_lr, head_init)


class MultitaskFineTune(FineTune):
    """LoRA trained as an ordinary classifier over the pooled meta-train classes, then
    fine-tuned per episode with a fresh N-way head (prototypes or zero; theta's N-way
    head is never trained).

    Meta-training sees the same episodes as the meta-learners (support + query of every
    task, labelled by their class names) and takes one Adam step per meta-batch.
    """

    name = "finetune_multitask"
    optimizer_copies = 3
    hessian = "none"  # its meta-step is one first-order classifier step

    def __init__(self, model, inner_lr, outer_lr: float, grad_clip: float, head_init: str = HEAD_INIT):
        super().__init__(model, inner_lr, head_init)
        self.outer_lr, self.grad_clip = outer_lr, grad_clip
        self.classes: dict[str, int] = {}
        self.pooled_head: torch.nn.Linear | None = None

    def meta_train(self, loader, iterations, meta_batch_size) -> None:
        batches = [[loader.episode("meta_train", it * meta_batch_size + t)
                    for t in range(meta_batch_size)] for it in range(iterations)]
        for ep in (e for batch in batches for e in batch):
            for name in ep.classes:
                self.classes.setdefault(f"{ep.source}/{name}", len(self.classes))
        self._make_head(max(len(self.classes), 1))
        for tasks in batches:
            self.meta_step(tasks)

    def meta_step(self, tasks, update=True, first_order=False) -> float:
        """One Adam step of the pooled classifier on the tasks' support + query examples."""
        if self.pooled_head is None:  # a memory probe before meta_train
            self._make_head(self.model.num_labels)
        losses = [self._pooled_loss(ep, split) for ep in tasks for split in ("support", "query")]
        loss = torch.stack(losses).mean()
        loss.backward()
        params = self.optimizer_params()
        if update:
            T.outer_update(params, [p.grad for p in params], self.optimizer, self.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def optimizer_params(self) -> list[torch.Tensor]:
        lora = [t for n, t in self.theta.items() if not n.startswith(M.HEAD_PREFIX)]
        return lora + list(self.pooled_head.parameters())

    def _make_head(self, num_classes: int) -> None:
        hidden = self.model.head.in_features
        ref = self.model.head.weight
        self.pooled_head = torch.nn.Linear(hidden, num_classes, device=ref.device, dtype=ref.dtype)
        self.optimizer = torch.optim.Adam(self.optimizer_params(), lr=self.outer_lr)

    def _pooled_loss(self, ep, split: str) -> torch.Tensor:
        batch = self.to_device(getattr(ep, split))
        ids = torch.tensor([self.classes.get(f"{ep.source}/{c}", i % self.pooled_head.out_features)
                            for i, c in enumerate(ep.classes)], device=batch["labels"].device)
        features = self.model.embed(batch["input_ids"], batch["attention_mask"])  # (B, hidden)
        return F.cross_entropy(self.pooled_head(features), ids[batch["labels"]])


# ------------------------------------------------------------------------------------
# MAML, FOMAML, Reptile
# ------------------------------------------------------------------------------------

class MAML(FewShotMethod):
    """MAML over `theta` (all weights for the `maml` baseline), with an outer Adam.

    Inner loop phi_{k+1} = phi_k - a grad L_S(phi_k) built with `create_graph=True`, so
    the query loss L_Q(phi_K) back-propagates through every inner step to theta: the
    exact second-order meta-gradient by unrolled autograd (learn2learn, higher). With
    `first_order=True` the inner gradients are detached (FOMAML).

    Args:
        model: the model; `theta` are its tensors to meta-learn (requires_grad set).
        theta: the meta-parameters.
        inner_lr: a, the inner SGD rate.
        inner_steps: K.
        outer_lr: Adam's rate for theta.
        grad_clip: max global norm of the meta-gradient; 0 disables clipping.
        first_order: FOMAML.

    Example:
        >>> maml = MAML(model, dict(model.named_parameters()), 0.01, 3, 5e-4, 1.0)
        >>> loss = maml.meta_step(tasks)   # theta <- Adam(theta, mean_i grad L_Q_i(phi_K))
    """

    name = "maml"
    optimizer_copies = 3

    def __init__(self, model, theta, inner_lr: float, inner_steps: int, outer_lr: float,
                 grad_clip: float, first_order: bool = False, head_init: str = HEAD_INIT):
        super().__init__(model, theta, inner_lr, head_init)
        self.inner_steps, self.grad_clip, self.first_order = inner_steps, grad_clip, first_order
        self.second_order = not first_order
        self.hessian = "none" if first_order else "full"
        self.outer_lr = outer_lr
        self.optimizer = torch.optim.Adam(list(theta.values()), lr=outer_lr)

    def task_loss(self, episode, first_order: bool) -> torch.Tensor:
        """L_Q(phi_K), differentiable with respect to theta (through the prototypes too)."""
        support, query = self.to_device(episode.support), self.to_device(episode.query)
        phi = dict(self.theta)
        if self.head_init == "proto":
            phi.update(proto_head(self.model, phi, support))
        for _ in range(self.inner_steps):
            # first order: the inner gradient at a detached copy (no graph back to theta)
            at = {n: p.detach().requires_grad_() for n, p in phi.items()} if first_order else phi
            grads = torch.autograd.grad(self.loss(at, support), list(at.values()),
                                        create_graph=not first_order, allow_unused=True)
            phi = {n: p if g is None else p - self.inner_lr * (g.detach() if first_order else g)
                   for (n, p), g in zip(phi.items(), grads)}
        return self.loss(phi, query)

    def meta_gradient(self, tasks, first_order: bool | None = None) -> tuple[float, list]:
        """Mean query loss and its gradient for theta, one task's graph at a time."""
        first_order = self.first_order if first_order is None else first_order
        total, grads = 0.0, [torch.zeros_like(t) for t in self.theta.values()]
        with M.second_order_attention():
            for ep in tasks:
                loss = self.task_loss(ep, first_order) / len(tasks)
                g = torch.autograd.grad(loss, list(self.theta.values()), allow_unused=True)
                grads = [a if b is None else a + b for a, b in zip(grads, g)]
                total += float(loss.detach())
        return total, grads

    def meta_step(self, tasks, update=True, first_order=False) -> float:
        loss, grads = self.meta_gradient(tasks, self.first_order or first_order)
        if update:
            T.outer_update(list(self.theta.values()), grads, self.optimizer, self.grad_clip)
        return loss


class FOMAML(MAML):
    """First-order MAML (Finn et al. 2017, sec. 5.2): inner gradients detached."""

    name = "fomaml"

    def __init__(self, model, theta, inner_lr, inner_steps, outer_lr, grad_clip, head_init=HEAD_INIT):
        super().__init__(model, theta, inner_lr, inner_steps, outer_lr, grad_clip, first_order=True,
                         head_init=head_init)


class Reptile(FewShotMethod):
    """Reptile: K SGD steps per task, then theta moves towards the adapted weights.

    The meta-gradient theta - mean_i phi_K^i is handed to Adam (as learn2learn's Reptile
    example does), so the outer rate is `meta_learning.outer.default_lr` like MELoRA's.
    With the proto head init the head restarts from prototypes every task, so it gets
    no Reptile update (phi_K's head is compared with phi_0's, whose difference is the
    task's own adaptation, not a direction for theta's unused head).
    """

    name = "reptile"
    optimizer_copies = 3
    hessian = "none"

    def __init__(self, model, theta, inner_lr: float, inner_steps: int, outer_lr: float,
                 grad_clip: float, head_init: str = HEAD_INIT):
        super().__init__(model, theta, inner_lr, head_init)
        self.inner_steps, self.grad_clip, self.outer_lr = inner_steps, grad_clip, outer_lr
        self.optimizer = torch.optim.Adam(list(theta.values()), lr=outer_lr)

    def meta_step(self, tasks, update=True, first_order=False) -> float:
        deltas = [torch.zeros_like(t) for t in self.theta.values()]
        for ep in tasks:
            support = self.to_device(ep.support)
            phi = {n: t.detach() for n, t in self.start(support).items()}
            phi_0 = dict(phi)
            for k in range(self.inner_steps):
                grads = self.support_gradient(phi, support)
                phi = {n: p - self.inner_lr * g for (n, p), g in zip(phi.items(), grads)}
            frozen = self.head_init == "proto"  # theta's head is unused: no update
            deltas = [d if frozen and n.startswith(M.HEAD_PREFIX) else d + (phi_0[n] - p) / len(tasks)
                      for d, (n, p) in zip(deltas, phi.items())]
        if update:
            T.outer_update(list(self.theta.values()), deltas, self.optimizer, self.grad_clip)
        return 0.0


# ------------------------------------------------------------------------------------
# Prototypical network
# ------------------------------------------------------------------------------------

class ProtoNet(FewShotMethod):
    """Nearest class prototype of frozen, mean-pooled encoder features (no adaptation).

    Prototypes c_n are the mean support feature of class n; a query x is assigned to
    argmin_n ||f(x) - c_n||^2 (Snell et al., 2017). Every "step" has the same accuracy.
    """

    name = "protonet"
    optimizer_copies = 0

    def __init__(self, model):
        super().__init__(model, {}, 0.0)
        self.head_init = "-"  # no head: nearest prototype of mean-pooled features
        model.requires_grad_(False)

    def adapt(self, episode, steps: int) -> list[float]:
        support, query = self.to_device(episode.support), self.to_device(episode.query)
        with torch.no_grad(), T.dropout_off(self.model):
            s, q = self.features(support), self.features(query)  # (N*K, d), (N*Q, d)
            n_way = int(support["labels"].max()) + 1
            prototypes = torch.stack([s[support["labels"] == c].mean(0) for c in range(n_way)])
            predictions = torch.cdist(q, prototypes).argmin(-1)  # squared distance, same argmin
        accuracy = (predictions == query["labels"]).float().mean().item()
        return [accuracy] * (steps + 1)

    def features(self, batch) -> torch.Tensor:
        """Masked mean of the last hidden states, (B, hidden)."""
        hidden = self.model.backbone(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def support_gradient(self, phi, support):
        return []


# ------------------------------------------------------------------------------------
# Construction from the config
# ------------------------------------------------------------------------------------

def build_baseline(name: str, cfg: Config, device: torch.device, inner_lr: float | None = None,
                   outer_lr: float | None = None) -> tuple[FewShotMethod, object]:
    """A baseline on the pretrained model of `cfg` (the checkpoint's model), on `device`.

    Hyperparameters are MELoRA's unless given: inner rate and steps
    (`meta_learning.inner`), outer rate and clipping (`meta_learning.outer`), micro-batch;
    the head init is `evaluation.head_init`. LoRA variants use `build_model`, so their
    LoRA starts where MELoRA's started (for the same `training.seed`).

    Args:
        name: one of `BASELINES`.
        cfg: the validated config (`training.seed` seeds the initialisation and dropout).
        device: where the model lives.
        inner_lr, outer_lr: the rates to use (evaluation passes each method's tuned ones).

    Returns:
        (method, tokenizer).

    Raises:
        ConfigError: an unknown name.
    """
    if name not in BASELINES:
        raise ConfigError(f"evaluation.baselines names unknown method {name!r}; "
                          f"choose from {', '.join(BASELINES)}")
    set_seed(cfg.training.seed)
    inner, outer = cfg.meta_learning.inner, cfg.meta_learning.outer
    a = inner.default_lr if inner_lr is None else inner_lr
    beta = outer.default_lr if outer_lr is None else outer_lr
    steps, head = inner.default_num_steps, cfg.evaluation.head_init
    micro = cfg.memory_optimization.gradient_accumulation.default_micro_batch
    if name in ("finetune", "finetune_multitask", "reptile_lora", "proto_lora", "fomaml_lora"):
        model, tokenizer = M.build_model(cfg, device)
        method = {"finetune": lambda: FineTune(model, a, head),
                  "finetune_multitask": lambda: MultitaskFineTune(model, a, beta, outer.grad_clip, head),
                  "reptile_lora": lambda: _named(Reptile(
                      model, M.lora_parameters(model), a, steps, beta, outer.grad_clip, head),
                      "reptile_lora"),
                  "proto_lora": lambda: _named(LoRAMetaLearner(
                      model, a, 0, "none", beta, outer.grad_clip, micro, head, cfg.training.seed),
                      "proto_lora"),
                  "fomaml_lora": lambda: _named(LoRAMetaLearner(
                      model, a, steps, "none", beta, outer.grad_clip, micro, head, cfg.training.seed),
                      "fomaml_lora")}[name]()
        method.micro_batch = micro
        return method, tokenizer
    model, tokenizer = full_model(cfg, device)
    if name == "protonet":
        return ProtoNet(model), tokenizer
    theta = dict(model.named_parameters())
    cls = {"maml": MAML, "fomaml": FOMAML, "reptile": Reptile}[name]
    method = cls(model, theta, a, steps, beta, outer.grad_clip, head_init=head)
    method.micro_batch = micro
    return method, tokenizer


def proto_head(model: M.MELoRAModel, params: Params, support) -> Params:
    """The head from the support prototypes c at `params` (`model.prototype_head`: cosine
    W = c, b = 0; Euclidean W = 2c, b = -|c|^2), dropout off, differentiable (MAML/FOMAML
    meta-train through it); the values equal trainer.initial_fast_weights'."""
    with T.dropout_off(model):
        features = M.forward(model, params, support, features_only=True)  # (N*K, hidden)
    labels = support["labels"]
    n_way = model.num_labels
    onehot = F.one_hot(labels, n_way).to(features.dtype)  # (N*K, N)
    c = onehot.T @ features / onehot.sum(0).clamp(min=1).unsqueeze(1)  # (N, hidden)
    weight, bias = M.prototype_head(model, c)
    if torch.is_grad_enabled() and not bias.requires_grad:  # the cosine head's b = 0: a constant,
        bias = bias.requires_grad_()                        # but a fast weight the inner loop adapts
    return {M.HEAD_WEIGHT: weight, M.HEAD_BIAS: bias}


def full_model(cfg: Config, device: torch.device) -> tuple[M.MELoRAModel, object]:
    """The pretrained model of `cfg` with its zero N-way head of `meta_learning.head` (as
    MELoRA's) and no LoRA, all weights trainable."""
    model, tokenizer = M.load_model(cfg.models.selected_model, cfg.tasks.n_way,
                                    pooling=cfg.models.pooling,
                                    dtype=M.PARAM_DTYPE[cfg.training.precision],
                                    **M.head_options(cfg.meta_learning))
    return model.to(device).train(), tokenizer


# -- helpers ---------------------------------------------------------------------------

def _named(method: FewShotMethod, name: str) -> FewShotMethod:
    method.name = name
    return method
