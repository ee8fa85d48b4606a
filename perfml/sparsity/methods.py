"""Unstructured magnitude pruning and 2:4 semi-structured pruning (values only; shapes stay).

MagnitudeConfig zeroes exactly round(amount x numel) weights: the smallest |w| of each layer
("layer") or of all selected layers together ("global", one threshold for the model, so layers
with small weights lose more). Ties are broken by position (torch.topk), so the count is exact.

SemiStructured24Config keeps the 2 largest |w| of every 4 consecutive weights along K (the input
dim), the pattern NVIDIA's sparse tensor cores skip. K must be a multiple of 4 (an error names the
layer otherwise). With accelerate=True, CUDA fp16/bf16 weights are converted with
torch.sparse.to_sparse_semi_structured (cuSPARSELt / CUTLASS) when the shape allows it; otherwise
the masked dense weight stays (same results, no speedup) and the reason is logged once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from perfml import _backend
from perfml.sparsity.api import FilterFn, PruningError, register_prune_transform, selected_linears


@dataclass(frozen=True)
class MagnitudeConfig:
    """Zero the `amount` fraction (0..1) of weights with the smallest magnitude."""

    amount: float = 0.5
    scope: str = "layer"  # "layer" | "global"

    def __post_init__(self) -> None:
        if not 0.0 <= self.amount <= 1.0:
            raise PruningError(f"MagnitudeConfig: amount must be in [0, 1], got {self.amount}")
        if self.scope not in ("layer", "global"):
            raise PruningError(
                f"MagnitudeConfig: scope must be 'layer' or 'global', got {self.scope!r}"
            )


def _zero_smallest(flat_abs: Tensor, count: int) -> Tensor:
    """Boolean keep-mask of flat_abs with exactly `count` False entries (the smallest)."""
    keep = torch.ones_like(flat_abs, dtype=torch.bool)
    if count > 0:
        keep[torch.topk(flat_abs, count, largest=False).indices] = False
    return keep


@register_prune_transform(MagnitudeConfig)
def _magnitude(model: nn.Module, config: MagnitudeConfig, filter_fn: FilterFn) -> None:
    linears = selected_linears(model, filter_fn)
    if config.scope == "layer":
        for _, linear in linears:
            w = linear.weight
            keep = _zero_smallest(
                w.detach().abs().flatten().float(), round(config.amount * w.numel())
            )
            w.mul_(keep.view_as(w))
        return
    flat = torch.cat([m.weight.detach().abs().flatten().float() for _, m in linears])
    keep = _zero_smallest(flat, round(config.amount * flat.numel()))
    offset = 0
    for _, linear in linears:
        w = linear.weight
        w.mul_(keep[offset : offset + w.numel()].view_as(w).to(w.device))
        offset += w.numel()


@dataclass(frozen=True)
class SemiStructured24Config:
    """2:4 sparsity along the input dim; accelerate=True converts CUDA fp16/bf16 weights to
    torch's semi-structured sparse tensors."""

    accelerate: bool = True


def mask_2_4(weight: Tensor) -> Tensor:
    """[N, K] -> bool mask keeping the 2 largest |w| of each 4 consecutive along K."""
    n, k = weight.shape
    groups = weight.detach().abs().float().view(n, k // 4, 4)
    top2 = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top2, True)
    return mask.view(n, k)


def _semi_structured_unavailable(linear: nn.Linear) -> str | None:
    w = linear.weight
    if w.device.type != "cuda":
        return "the weight is not on CUDA"
    if w.dtype not in (torch.float16, torch.bfloat16):
        return f"the weight is {w.dtype} (fp16/bf16 needed)"
    if not _backend.is_sm_at_least_80(w.device):
        return "the GPU is older than sm_80"
    n, k = w.shape
    if n % 64 or k % 64:
        return f"the shape {n}x{k} is not a multiple of 64"
    return None


@register_prune_transform(SemiStructured24Config)
def _semi_structured(model: nn.Module, config: SemiStructured24Config, filter_fn: FilterFn) -> None:
    linears = selected_linears(model, filter_fn)
    for fqn, linear in linears:
        if linear.in_features % 4:
            raise PruningError(
                f"prune 2:4: {fqn} has in_features {linear.in_features}, not a multiple of 4"
            )
    for fqn, linear in linears:
        linear.weight.mul_(mask_2_4(linear.weight))
        if not config.accelerate:
            continue
        reason = _semi_structured_unavailable(linear)
        if reason is not None:
            _backend.say_once(
                f"2:4-{reason}", f"prune 2:4: {fqn} keeps a masked dense weight: {reason}"
            )
            continue
        sparse = torch.sparse.to_sparse_semi_structured(linear.weight.detach())
        linear.weight = nn.Parameter(sparse, requires_grad=False)
