"""`perfml.prune(model, config)`: config dataclass -> registered transform, like perfml.quantize.

Unstructured (MagnitudeConfig) and 2:4 (SemiStructured24Config) pruning zero weights in place (the
mask is the zeros; the shapes stay); on CUDA a 2:4 weight in fp16/bf16 also becomes a
torch.sparse semi-structured tensor, which cuSPARSELt multiplies faster. StructuredConfig removes
whole MLP channels / attention head groups of a perfml Llama and shrinks the matrices.
`sparsity_report(model)` gives the per-layer sparsity the CLI writes next to the model.

Order: prune, then quantize. Every pass masks or scores float weights, and a quantized linear has
none (integer / float8 buffers, computed from the unpruned weights), so `prune` refuses a model
holding any quantized linear and names the first. Quantized linears are recognised by the
attribute that perfml.quant's modules declare (`row_buffers`, the same marker perfml.models.fuse
reads), so this package does not import perfml.quant.
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


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether `module` is one of perfml.quant's quantized linears (they declare the buffers
    that hold their rows as `row_buffers` and rebuild their float weight with `dequantize`)."""
    return (
        getattr(type(module), "row_buffers", None) is not None
        and callable(getattr(module, "dequantize", None))
        and not isinstance(module, nn.Linear)
    )


def _refuse_quantized(model: nn.Module) -> None:
    for fqn, module in model.named_modules():
        if is_quantized_linear(module):
            raise PruningError(
                f"prune: '{fqn or '<root>'}' is a quantized {type(module).__name__}; pruning "
                "needs the float weights, which quantization replaced. prune before quantizing: "
                "perfml.prune the float model, then perfml.quantize it"
            )


def prune(model: nn.Module, config: Any, *, filter_fn: FilterFn | None = None) -> nn.Module:
    """Prune `model` in place as `config` says; returns the model. `filter_fn(module, fqn)`
    picks the linears for the unstructured and 2:4 configs (default `default_filter`).
    A model holding a quantized linear (perfml.quantize) raises PruningError naming it: prune
    the float model first, then quantize."""
    transform = _TRANSFORMS.get(type(config))
    if transform is None:
        known = ", ".join(sorted(c.__name__ for c in _TRANSFORMS))
        raise PruningError(f"prune: no transform for {type(config).__name__}; known: {known}")
    _refuse_quantized(model)
    with torch.no_grad():
        transform(model, config, filter_fn or default_filter)
    return model


def _dense(weight: torch.Tensor) -> torch.Tensor:
    semi = getattr(torch.sparse, "SparseSemiStructuredTensor", None)
    return weight.to_dense() if semi is not None and isinstance(weight, semi) else weight


def _sparsity(numel: int, nonzero: int) -> float:
    """The zero fraction; 0.0 for no elements (nothing was zeroed)."""
    return 1 - nonzero / numel if numel else 0.0


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """{"layers": {fqn: {"shape", "nonzero", "sparsity"}}, "total": {...}} over the nn.Linear
    weights (the lm_head included, so the totals describe the whole matmul budget). A quantized
    linear (pruned, then quantized) counts its dequantized weight, whose pruned zeros stay zero.
    A model with no linear weight at all raises PruningError: it has nothing to measure."""
    layers: dict[str, Any] = {}
    numel = nonzero = 0
    for fqn, module in model.named_modules():
        if isinstance(module, nn.Linear):
            w = _dense(module.weight.detach())
        elif is_quantized_linear(module):
            w = module.dequantize().detach()
        else:
            continue
        n, nz = w.numel(), int(torch.count_nonzero(w))
        layers[fqn] = {"shape": list(w.shape), "nonzero": nz, "sparsity": _sparsity(n, nz)}
        numel += n
        nonzero += nz
    if numel == 0:
        raise PruningError(
            f"sparsity_report: {type(model).__name__} has no linear weights to measure "
            f"({len(layers)} linear layers, 0 weights)"
        )
    total = {"numel": numel, "nonzero": nonzero, "sparsity": _sparsity(numel, nonzero)}
    return {"layers": layers, "total": total}
