"""Quantization passes: `perfml.quantize(model, perfml.quant.Int8WeightOnlyConfig())`.

Configs (dataclasses) name the recipe; each has a registered transform that swaps nn.Linear
modules for quantized ones holding packed integer / float8 weights (see perfml/quant/methods.py).
"""

from perfml.quant.api import (
    QuantizationError,
    QuantizedLinear,
    default_filter,
    quantize,
    register_quantize_transform,
)
from perfml.quant.kernels import w4a16_mm, w8a16_mm
from perfml.quant.methods import (
    Float8Config,
    Float8Linear,
    Int4WeightOnlyConfig,
    Int4WeightOnlyLinear,
    Int8DynamicConfig,
    Int8DynamicLinear,
    Int8WeightOnlyConfig,
    Int8WeightOnlyLinear,
)

__all__ = [
    "Float8Config",
    "Float8Linear",
    "Int4WeightOnlyConfig",
    "Int4WeightOnlyLinear",
    "Int8DynamicConfig",
    "Int8DynamicLinear",
    "Int8WeightOnlyConfig",
    "Int8WeightOnlyLinear",
    "QuantizationError",
    "QuantizedLinear",
    "default_filter",
    "quantize",
    "register_quantize_transform",
    "w4a16_mm",
    "w8a16_mm",
]
