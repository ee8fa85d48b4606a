"""`perfml.prune(model, config)`: config dataclass -> registered transform, like perfml.quantize.

Unstructured (MagnitudeConfig) and 2:4 (SemiStructured24Config) pruning zero weights in place (the
mask is the zeros; the shapes stay); on CUDA a 2:4 weight in fp16/bf16 also becomes a
torch.sparse semi-structured tensor, which cuSPARSELt multiplies faster. StructuredConfig removes
whole MLP channels / attention head groups of a perfml Llama and shrinks the matrices.
`sparsity_report(model)` gives the per-layer sparsity the CLI writes next to the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

FilterFn = Callable[[nn.Module, str], bool]
_TRANSFORMS: dict[type, Callable[[nn.Module, Any, FilterFn], None]] = {}


class PruningError(ValueError):
    """A model or config that cannot be pruned as asked; the message names it."""


def register_prune_transform(
    config_cls: type,
) -> Callable[[Callable[[nn.Module, Any, FilterFn], None]], Callable[..., None]]:
    """Decorator: `fn(model, config, filter_fn)` (in place) becomes the transform of config_cls."""

    def register(fn: Callable[[nn.Module, Any, FilterFn], None]) -> Callable[..., None]:
        _TRANSFORMS[config_cls] = fn
        return fn

    return register


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Every nn.Linear except the output head (`lm_head`)."""
    return isinstance(module, nn.Linear) and fqn.split(".")[-1] != "lm_head"


def selected_linears(model: nn.Module, filter_fn: FilterFn | None) -> list[tuple[str, nn.Linear]]:
    select = filter_fn or default_filter
    return [
        (fqn, m) for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and select(m, fqn)
    ]


def prune(model: nn.Module, config: Any, *, filter_fn: FilterFn | None = None) -> nn.Module:
    """Prune `model` in place as `config` says; returns the model. `filter_fn(module, fqn)`
    picks the linears for the unstructured and 2:4 configs (default `default_filter`)."""
    transform = _TRANSFORMS.get(type(config))
    if transform is None:
        known = ", ".join(sorted(c.__name__ for c in _TRANSFORMS))
        raise PruningError(f"prune: no transform for {type(config).__name__}; known: {known}")
    with torch.no_grad():
        transform(model, config, filter_fn or default_filter)
    return model


def _dense(weight: torch.Tensor) -> torch.Tensor:
    semi = getattr(torch.sparse, "SparseSemiStructuredTensor", None)
    return weight.to_dense() if semi is not None and isinstance(weight, semi) else weight


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """{"layers": {fqn: {"shape", "nonzero", "sparsity"}}, "total": {...}} over the nn.Linear
    weights (the lm_head included, so the totals describe the whole matmul budget)."""
    layers: dict[str, Any] = {}
    numel = nonzero = 0
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        w = _dense(module.weight.detach())
        n, nz = w.numel(), int(torch.count_nonzero(w))
        layers[fqn] = {"shape": list(w.shape), "nonzero": nz, "sparsity": 1 - nz / max(n, 1)}
        numel += n
        nonzero += nz
    total = {"numel": numel, "nonzero": nonzero, "sparsity": 1 - nonzero / max(numel, 1)}
    return {"layers": layers, "total": total}
