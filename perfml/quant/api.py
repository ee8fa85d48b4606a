"""`perfml.quantize(model, config)`: config dataclass -> registered transform -> quantized module.

Each config class registers a transform (nn.Linear -> quantized module) with
`@register_quantize_transform(ConfigClass)`. `quantize` walks the model, asks `filter_fn` which
linears to convert (default: every nn.Linear except one named `lm_head`, whose weight the fused
loss reads directly), and swaps each for the transform's module, in place. The quantized modules
keep their weights as integer / float8 buffers, so `state_dict()` holds the packed tensors and
safetensors saves them as they are.

Quantizing a module that is already quantized raises QuantizationError naming it: a second pass
would quantize the quantization error, silently, which is never what a caller meant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

FilterFn = Callable[[nn.Module, str], bool]
_TRANSFORMS: dict[type, Callable[[nn.Linear, Any], nn.Module]] = {}


class QuantizationError(ValueError):
    """A module or config that cannot be quantized as asked; the message names it."""


class QuantizedLinear(nn.Module):
    """Base of the quantized linear modules (isinstance checks, the repr, bias handling)."""

    config: Any
    # the buffers whose first dim is out_features, in registration order: stacking two modules'
    # buffers along dim 0 stacks their outputs (perfml.models.fuse relies on it)
    row_buffers: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias: nn.Parameter | None = None

    def with_rows(
        self, out_features: int, buffers: dict[str, Tensor], bias: Tensor | None = None
    ) -> QuantizedLinear:
        """A module of this type and format (config, group size) over `buffers` (its
        row_buffers, out_features rows each) and `bias`: how stacked linears are rebuilt."""
        cls = type(self)
        module = cls.__new__(cls)
        QuantizedLinear.__init__(module, self.in_features, out_features)
        for attr in ("config", "group_size"):
            if hasattr(self, attr):
                setattr(module, attr, getattr(self, attr))
        for name in self.row_buffers:
            module.register_buffer(name, buffers[name])
        if bias is not None:
            module.bias = nn.Parameter(bias, requires_grad=False)
        module.train(self.training)
        return module

    def _set_bias(self, linear: nn.Linear) -> None:
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, config={self.config}"
        )


def register_quantize_transform(
    config_cls: type,
) -> Callable[[Callable[[nn.Linear, Any], nn.Module]], Callable[[nn.Linear, Any], nn.Module]]:
    """Decorator: `fn(linear, config) -> module` becomes the transform of `config_cls`."""

    def register(
        fn: Callable[[nn.Linear, Any], nn.Module],
    ) -> Callable[[nn.Linear, Any], nn.Module]:
        _TRANSFORMS[config_cls] = fn
        return fn

    return register


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Every nn.Linear except the output head (`lm_head`): the fused loss reads its weight."""
    return isinstance(module, nn.Linear) and fqn.split(".")[-1] != "lm_head"


def quantize(model: nn.Module, config: Any, *, filter_fn: FilterFn | None = None) -> nn.Module:
    """Replace the linears of `model` selected by `filter_fn(module, fqn)` (default
    `default_filter`) with quantized modules, in place; returns the model (the new module when
    `model` itself is a selected nn.Linear, which cannot be replaced in place).

    Raises QuantizationError for an unregistered config, or when a selected module (or, with the
    default filter, any module) is already quantized.
    """
    transform = _TRANSFORMS.get(type(config))
    if transform is None:
        known = ", ".join(sorted(c.__name__ for c in _TRANSFORMS))
        raise QuantizationError(
            f"quantize: no transform for {type(config).__name__}; known: {known}"
        )
    select = filter_fn or default_filter
    for fqn, module in model.named_modules():
        if isinstance(module, QuantizedLinear) and (filter_fn is None or select(module, fqn)):
            raise QuantizationError(
                f"quantize: {fqn or 'the model'} is already quantized ({module.config}); "
                "quantize the float model instead"
            )
    if isinstance(model, nn.Linear) and select(model, ""):
        return transform(model, config)
    targets = [
        (fqn, module)
        for fqn, module in model.named_modules()
        if fqn and isinstance(module, nn.Linear) and select(module, fqn)
    ]
    for fqn, module in targets:
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, transform(module, config))
    return model
