"""Structured pruning of a perfml Llama: whole MLP channels and whole attention head groups go,
and the matrices shrink, so the pruned model does less work (no sparse kernels needed).

MLP: channel j of gate_proj/up_proj rows and down_proj column j is scored by the product of the
three vectors' L2 norms (the channel's contribution is silu(gate_j . x) * (up_j . x) * down[:, j],
so a small factor anywhere makes it small); the lowest `mlp_amount` fraction is removed per layer.
Attention: grouped-query attention ties each k/v head to num_heads / num_kv_heads query heads, so
the unit removed is one k/v head with its query heads (a "group"), scored by the sum of the squared
norms of its q/k/v rows and o_proj columns; the lowest `head_amount` fraction of groups is removed
per layer (at least one kept). Rounding: kept = max(1, round(size x (1 - amount))).

The pruned model equals the original with the removed rows/columns zeroed (a zero MLP channel
adds silu(0) * 0 = 0; a head with zero v rows outputs 0) - the tests check exactly that. Layers end
up with their own sizes, so LlamaConfig no longer describes them; `resize_like` rebuilds the shapes
from a saved state_dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from perfml.sparsity.api import FilterFn, PruningError, register_prune_transform


@dataclass(frozen=True)
class StructuredConfig:
    """Remove `mlp_amount` of each layer's MLP channels and `head_amount` of its k/v head groups."""

    mlp_amount: float = 0.25
    head_amount: float = 0.0

    def __post_init__(self) -> None:
        for name in ("mlp_amount", "head_amount"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise PruningError(f"StructuredConfig: {name} must be in [0, 1), got {value}")


def _kept(size: int, amount: float) -> int:
    return max(1, round(size * (1 - amount)))


def _linear(weight: Tensor) -> nn.Linear:
    out_f, in_f = weight.shape
    linear = nn.Linear(in_f, out_f, bias=False, device=weight.device, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    return linear


def _top(scores: Tensor, keep: int) -> Tensor:
    """Indices of the `keep` largest scores, in their original order."""
    return scores.topk(keep).indices.sort().values


def mlp_channel_scores(mlp: nn.Module) -> Tensor:
    g = mlp.gate_proj.weight.float().norm(dim=1)
    u = mlp.up_proj.weight.float().norm(dim=1)
    d = mlp.down_proj.weight.float().norm(dim=0)
    return g * u * d


def head_group_scores(attn: nn.Module) -> Tensor:
    d, kv = attn.head_dim, attn.num_kv_heads
    r = attn.num_heads // kv
    q = attn.q_proj.weight.float().view(kv, r * d, -1).pow(2).sum((1, 2))
    o = attn.o_proj.weight.float().view(-1, kv, r * d).pow(2).sum((0, 2))
    k = attn.k_proj.weight.float().view(kv, d, -1).pow(2).sum((1, 2))
    v = attn.v_proj.weight.float().view(kv, d, -1).pow(2).sum((1, 2))
    return q + o + k + v


def shrink_mlp(mlp: nn.Module, channels: Tensor) -> None:
    mlp.gate_proj = _linear(mlp.gate_proj.weight[channels])
    mlp.up_proj = _linear(mlp.up_proj.weight[channels])
    mlp.down_proj = _linear(mlp.down_proj.weight[:, channels])
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(channels)


def shrink_attention(attn: nn.Module, groups: Tensor) -> None:
    d, kv = attn.head_dim, attn.num_kv_heads
    r = attn.num_heads // kv
    q_rows = (groups[:, None] * r * d + torch.arange(r * d, device=groups.device)).flatten()
    kv_rows = (groups[:, None] * d + torch.arange(d, device=groups.device)).flatten()
    attn.q_proj = _linear(attn.q_proj.weight[q_rows])
    attn.k_proj = _linear(attn.k_proj.weight[kv_rows])
    attn.v_proj = _linear(attn.v_proj.weight[kv_rows])
    attn.o_proj = _linear(attn.o_proj.weight[:, q_rows])
    attn.num_kv_heads = len(groups)
    attn.num_heads = len(groups) * r


def _llama_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    if layers is None or not all(hasattr(m, "mlp") and hasattr(m, "self_attn") for m in layers):
        raise PruningError(
            "prune structured: the model must be a perfml Llama (layers[i].mlp, .self_attn)"
        )
    for i, layer in enumerate(layers):
        if "qkv_proj" in layer.self_attn._modules or "gate_up_proj" in layer.mlp._modules:
            raise PruningError(
                f"prune structured: layer {i} has fused projections; call "
                "perfml.models.unfuse_projections(model) first (and fuse again after pruning)"
            )
    return list(layers)


@register_prune_transform(StructuredConfig)
def _structured(model: nn.Module, config: StructuredConfig, filter_fn: FilterFn) -> None:
    for layer in _llama_layers(model):
        if config.mlp_amount > 0:
            scores = mlp_channel_scores(layer.mlp)
            shrink_mlp(layer.mlp, _top(scores, _kept(len(scores), config.mlp_amount)))
        if config.head_amount > 0:
            scores = head_group_scores(layer.self_attn)
            shrink_attention(layer.self_attn, _top(scores, _kept(len(scores), config.head_amount)))


def resize_like(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Give each layer of a freshly built Llama the pruned sizes stored in `state` (values are
    loaded afterwards)."""
    for i, layer in enumerate(_llama_layers(model)):
        prefix = f"layers.{i}"
        channels = state[f"{prefix}.mlp.gate_proj.weight"].shape[0]
        shrink_mlp(layer.mlp, torch.arange(channels))
        attn = layer.self_attn
        groups = state[f"{prefix}.self_attn.k_proj.weight"].shape[0] // attn.head_dim
        shrink_attention(attn, torch.arange(groups))
