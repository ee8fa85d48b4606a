"""ONNX translations of perfml's forward custom ops: torch.onnx.export's custom_translation_table.

torch.export keeps each perfml op as one opaque node (`perfml::rms_norm_fwd`, ...); onnxruntime
knows nothing of them, so every forward op is rewritten here into standard ONNX operators with
the op's exact rounding, the one defined by its `*_ref` in perfml/ops:

  rms_norm_fwd      RMSNormalization (opset >= 23, where onnxruntime runs it) for fp32 inputs;
                    otherwise ReduceMean / Sqrt / Div / Mul with the casts of each casting mode
  add_rms_norm_fwd  Add rounded to x's dtype, then the rms_norm translation ("llama" cast)
  layer_norm_fwd    LayerNormalization for fp32 x, weight and bias; otherwise its decomposition
  glu_fwd           Sigmoid / Gelu (opset >= 20) or the erf / tanh formula, times up
  rope_fwd          HF rotate_half arithmetic (Slice / Neg / Concat / Mul / Add), Gather for
                    position_ids tables, partial rotary through a pass-through Concat
  softmax_fwd       Softmax in fp32
  w8a16_mm          (perfml.quant Int8WeightOnly) QDQ: DequantizeLinear of the int8 weight with
                    its per-channel scale (axis 1 of the transposed weight) -> MatMul in fp32, the
                    form onnxruntime's quantization tooling emits and its runtime recognizes
  w4a16_mm          (perfml.quant Int4WeightOnly) the packed uint8 weight stays packed: a
                    DequantizeLinear (scale 1) reads the bytes, Floor / Sub split the nibbles,
                    each group's zero point and scale apply, K's padding goes, the weight is
                    rounded to x's dtype like the kernel -> MatMul in fp32

Why the fused standard ops only for fp32: RMSNormalization and LayerNormalization round the
normalized value to the input type before the scale (their ONNX function bodies) or not (some
runtime kernels), so for bf16/fp16 the result would depend on the runtime; in fp32 every perfml
casting mode is the same arithmetic and any order of these ops agrees to an ulp. The
decompositions compute in fp32 (fp64 for fp64 inputs) and round where the reference rounds.

The backward ops never appear in an inference export; the loss ops (cross_entropy,
linear_cross_entropy) are training-only and get no translation: perfml.export names them in a
clear error instead (export the logits path).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx_ir as ir
import onnxscript
import torch

import perfml.quant.kernels  # noqa: F401  (registers perfml::w8a16_mm and w4a16_mm)
from perfml.ops.rms_norm import CASTS
from perfml.ops.swiglu import ACTIVATIONS

RMS_NORMALIZATION_OPSET = 23  # the first opset with a standard RMSNormalization
GELU_OPSET = 20  # the first opset with a standard Gelu

# the loss ops: a model exported with them has to export its logits path instead
TRAINING_ONLY_OPS = (
    "perfml::cross_entropy_fwd",
    "perfml::cross_entropy_fwd_inplace",
    "perfml::linear_cross_entropy_fwd",
)

_TORCH_DTYPES = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16,
}
_IR_DTYPES = {v: k for k, v in _TORCH_DTYPES.items()}


def _promote(a: ir.DataType, b: ir.DataType) -> ir.DataType:
    return _IR_DTYPES[torch.promote_types(_TORCH_DTYPES[a], _TORCH_DTYPES[b])]


def _compute(dtype: ir.DataType) -> ir.DataType:
    """The kernels' arithmetic type: fp32, or fp64 for fp64 inputs."""
    return _promote(dtype, ir.DataType.FLOAT)


def build_table(opset: int, rms_normalization: bool) -> dict[Any, Callable[..., Any]]:
    """{torch op overload: onnxscript translation} for the ONNX `opset`; `rms_normalization`
    says whether RMSNormalization may be emitted (opset >= 23 and the runtime runs it)."""
    op = onnxscript.opset18  # emitted at the model's opset; these ops are unchanged up to 25
    op23 = onnxscript.opset23

    def to(v: Any, src: ir.DataType, dst: ir.DataType) -> Any:
        # traced intermediates carry no dtype, so the caller states the source type
        return v if src == dst else op.Cast(v, to=dst)

    def last_axis() -> Any:
        return op.Constant(value_ints=[-1])

    def rms_norm(
        x: Any, x_dtype: ir.DataType, weight: Any, eps: float, offset: float, mode: int
    ) -> tuple[Any, Any]:
        fp32 = ir.DataType.FLOAT
        compute = _compute(x_dtype)
        xc = to(x, x_dtype, compute)
        mean_sq = op.ReduceMean(op.Mul(xc, xc), last_axis(), keepdims=1)
        denom = op.Sqrt(op.Add(mean_sq, eps))
        rstd = to(op.Squeeze(op.Reciprocal(denom), last_axis()), compute, fp32)
        if rms_normalization and weight is not None and x_dtype == weight.dtype == fp32:
            # fp32 in and out: every casting mode is this one arithmetic
            scale = op.Add(weight, offset) if offset else weight
            y = op23.RMSNormalization(x, scale, axis=-1, epsilon=eps, stash_type=1)
            return y, rstd
        normed = op.Div(xc, denom)
        if weight is None:
            return to(normed, compute, x_dtype), rstd
        w = to(weight, weight.dtype, compute)
        if offset:
            w = op.Add(w, offset)
        if mode == CASTS["llama"]:
            # HF LlamaRMSNorm: round the normalized row to x's dtype before the weight
            rounded = to(to(normed, compute, x_dtype), x_dtype, compute)
            return to(op.Mul(rounded, w), compute, _promote(x_dtype, weight.dtype)), rstd
        return to(op.Mul(normed, w), compute, x_dtype), rstd

    def rms_norm_fwd(x, weight=None, eps: float = 1e-6, offset: float = 0.0, cast: int = 0):
        return rms_norm(x, x.dtype, weight, eps, offset, cast)

    def add_rms_norm_fwd(x, residual, weight, eps: float = 1e-6):
        # `x + residual` in torch: the exact sum in fp32, one rounding to x's dtype
        compute = _compute(x.dtype)
        total = op.Add(to(x, x.dtype, compute), to(residual, residual.dtype, compute))
        s = to(total, compute, x.dtype)
        y, rstd = rms_norm(s, x.dtype, weight, eps, 0.0, CASTS["llama"])
        return y, s, rstd

    def layer_norm_fwd(x, weight=None, bias=None, eps: float = 1e-5):
        fp32 = ir.DataType.FLOAT
        params = [p for p in (weight, bias) if p is not None]
        if weight is not None and x.dtype == fp32 and all(p.dtype == fp32 for p in params):
            y, mean, rstd = op.LayerNormalization(x, *params, axis=-1, epsilon=eps, stash_type=1)
            return y, op.Squeeze(mean, last_axis()), op.Squeeze(rstd, last_axis())
        compute = _compute(x.dtype)
        xc = to(x, x.dtype, compute)
        mean = op.ReduceMean(xc, last_axis(), keepdims=1)
        centered = op.Sub(xc, mean)
        var = op.ReduceMean(op.Mul(centered, centered), last_axis(), keepdims=1)
        rstd = op.Reciprocal(op.Sqrt(op.Add(var, eps)))
        y = op.Mul(centered, rstd)
        if weight is not None:
            y = op.Mul(y, to(weight, weight.dtype, compute))
        if bias is not None:
            y = op.Add(y, to(bias, bias.dtype, compute))
        stats = (to(op.Squeeze(t, last_axis()), compute, fp32) for t in (mean, rstd))
        return to(y, compute, x.dtype), *stats

    def apply_activation(g: Any, kind: int) -> Any:
        if kind == ACTIVATIONS["silu"]:
            return op.Mul(g, op.Sigmoid(g))
        approximate = "tanh" if kind == ACTIVATIONS["gelu_tanh"] else "none"
        if opset >= GELU_OPSET:
            return onnxscript.opset20.Gelu(g, approximate=approximate)
        if approximate == "none":  # 0.5 * g * (1 + erf(g / sqrt(2)))
            inner = op.Add(op.Erf(op.Mul(g, 0.7071067811865476)), 1.0)
        else:  # 0.5 * g * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 * g**3)))
            cube = op.Mul(op.Mul(g, g), g)
            arg = op.Mul(op.Add(g, op.Mul(cube, 0.044715)), 0.7978845608028654)
            inner = op.Add(op.Tanh(arg), 1.0)
        return op.Mul(op.Mul(g, inner), 0.5)

    def glu_fwd(gate, up, activation: int = 0, inplace_backward: bool = False):
        compute = _compute(gate.dtype)
        act = apply_activation(to(gate, gate.dtype, compute), activation)
        return to(op.Mul(act, to(up, up.dtype, compute)), compute, gate.dtype)

    def rotate(x: Any, cos: Any, sin: Any, compute: ir.DataType, rotary: int) -> Any:
        """x * cos + rotate_half(x) * sin over the first `rotary` features, the rest passed."""
        xc = to(x, x.dtype, compute)
        axis = last_axis()

        def piece(start: int, end: int) -> Any:
            starts, ends = op.Constant(value_ints=[start]), op.Constant(value_ints=[end])
            return op.Slice(xc, starts, ends, axis)

        half = rotary // 2
        rotated = op.Concat(op.Neg(piece(half, rotary)), piece(0, half), axis=-1)
        y = op.Add(op.Mul(piece(0, rotary), cos), op.Mul(rotated, sin))
        head_dim = x.shape[-1]
        if head_dim != rotary:  # partial rotary: the last features pass through
            y = op.Concat(y, piece(rotary, head_dim), axis=-1)
        return to(y, compute, x.dtype)

    def rope_fwd(q, k, cos, sin, position_ids=None, unsqueeze_dim: int = 1):
        compute = _compute(q.dtype)
        rotary, head_dim = cos.shape[-1], q.shape[-1]
        if not isinstance(rotary, int) or not isinstance(head_dim, int):
            raise ValueError("rope: the head dim and rotary dim must be static to export")

        def per_token(table: Any) -> Any:
            values = to(table, table.dtype, compute)
            if position_ids is not None:  # a [P, R] or [1, P, R] table indexed per token
                if len(table.shape) == 3:
                    values = op.Squeeze(values, op.Constant(value_ints=[0]))
                values = op.Gather(values, position_ids, axis=0)  # [B or 1, T, R]
            return op.Unsqueeze(values, op.Constant(value_ints=[unsqueeze_dim]))

        c, s = per_token(cos), per_token(sin)
        return rotate(q, c, s, compute, rotary), rotate(k, c, s, compute, rotary)

    def softmax_fwd(x):
        compute = _compute(x.dtype)
        return to(op.Softmax(to(x, x.dtype, compute), axis=-1), compute, x.dtype)

    def w8a16_mm(x, w_q, scale):
        # x [M, K] @ (w_q [N, K] * scale [N]).T: the int8 transpose is folded into a transposed
        # initializer by the runtime, leaving DequantizeLinear -> MatMul
        compute = _compute(x.dtype)
        w = op.DequantizeLinear(
            op.Transpose(w_q, perm=[1, 0]), to(scale, scale.dtype, compute), axis=1
        )
        return to(op.MatMul(to(x, x.dtype, compute), w), compute, x.dtype)

    def w4a16_mm(x, packed, scale, zero, group_size):
        # x [M, K] @ dequant(packed)[:, :K].T. The packed uint8 weight stays in the file: a
        # DequantizeLinear with scale 1 reads its bytes as floats (the exporter's constant
        # folding stops at DequantizeLinear, as for int8, so the weights are not stored
        # dequantized), the nibbles are split exactly in fp32 (low = even k, high = odd k),
        # each group's zero point and scale applied, K's padding dropped, the weight rounded to
        # x's dtype like the kernel before its dot, and the MatMul done in fp32
        compute = _compute(x.dtype)
        byte = op.DequantizeLinear(packed, op.Constant(value_float=1.0))  # [N, Kp / 2] fp32
        high = op.Floor(op.Mul(byte, op.Constant(value_float=1.0 / 16)))
        low = op.Sub(byte, op.Mul(high, op.Constant(value_float=16.0)))
        last = last_axis()
        nibbles = op.Concat(op.Unsqueeze(low, last), op.Unsqueeze(high, last), axis=-1)
        q = to(
            op.Reshape(nibbles, op.Constant(value_ints=[0, -1, group_size])),
            ir.DataType.FLOAT,
            compute,
        )  # [N, Kp / group, group]
        z = op.Unsqueeze(op.Cast(zero, to=compute), last)
        s = op.Unsqueeze(to(scale, scale.dtype, compute), last)
        w = op.Reshape(op.Mul(op.Sub(q, z), s), op.Constant(value_ints=[0, -1]))  # [N, Kp]
        w = op.Slice(
            w, op.Constant(value_ints=[0]), op.Shape(x, start=-1), op.Constant(value_ints=[1])
        )
        if compute != x.dtype:
            w = to(to(w, compute, x.dtype), x.dtype, compute)
        out = op.MatMul(to(x, x.dtype, compute), op.Transpose(w, perm=[1, 0]))
        return to(out, compute, x.dtype)

    ops = torch.ops.perfml
    return {
        ops.rms_norm_fwd.default: rms_norm_fwd,
        ops.add_rms_norm_fwd.default: add_rms_norm_fwd,
        ops.layer_norm_fwd.default: layer_norm_fwd,
        ops.glu_fwd.default: glu_fwd,
        ops.rope_fwd.default: rope_fwd,
        ops.softmax_fwd.default: softmax_fwd,
        ops.w8a16_mm.default: w8a16_mm,
        ops.w4a16_mm.default: w4a16_mm,
    }
