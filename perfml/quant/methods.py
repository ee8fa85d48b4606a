"""The quantization recipes: one config dataclass, its quantized linear module and its registered
transform each.

  Int8WeightOnlyConfig  int8 weights, per-output-channel symmetric scale; activations stay
                        bf16/fp16/fp32 (W8A16). Triton kernel on CUDA and in interpret mode.
  Int4WeightOnlyConfig  4-bit weights, two per byte, per-group (32/64/128 along K) scale and
                        zero point (asymmetric). K is padded up to a multiple of the group size
                        (the pad is stored as exact zeros; the kernel never reads x there).
  Int8DynamicConfig     int8 weights per channel x int8 activations per token, quantized on the
                        fly; torch._int_mm on CUDA (M > 16, K and N multiples of 8), an int32
                        matmul elsewhere (same integers, exact).
  Float8Config          float8 e4m3 weights and activations with row-wise (per-channel /
                        per-token) fp32 scales; torch._scaled_mm on sm_89+ CUDA, an emulated
                        path elsewhere (fp8 values upcast, fp32 matmul) so CPU covers the logic.

Scales are stored in the linear's weight dtype for the weight-only modes (what the kernel reads
alongside bf16 activations) and in fp32 for the dynamic modes (torch._int_mm/_scaled_mm epilogue).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perfml import _backend
from perfml.quant.api import QuantizationError, QuantizedLinear, register_quantize_transform
from perfml.quant.kernels import pack_int4, w4a16_mm, w8a16_mm

INT8_MAX = 127
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_EPS = 1e-12  # floor of a scale: an all-zero row quantizes to zeros, not NaN


def _no_grad_weight(linear: nn.Linear) -> Tensor:
    return linear.weight.detach()


# --- int8 weight-only ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Int8WeightOnlyConfig:
    """int8 weights, one symmetric scale per output channel (W8A16)."""


def quantize_int8_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """[N, K] float -> (int8 [N, K], fp32 scale [N]) with w ~= q * scale, |q| <= 127."""
    w32 = w.float()
    scale = (w32.abs().amax(dim=1) / INT8_MAX).clamp_min(_EPS)
    q = torch.round(w32 / scale.unsqueeze(1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


class Int8WeightOnlyLinear(QuantizedLinear):
    row_buffers = ("weight_int8", "scale")

    def __init__(self, linear: nn.Linear, config: Int8WeightOnlyConfig) -> None:
        super().__init__(linear.in_features, linear.out_features)
        self.config = config
        q, scale = quantize_int8_per_channel(_no_grad_weight(linear))
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self._set_bias(linear)

    def dequantize(self) -> Tensor:
        return self.weight_int8.float() * self.scale.float().unsqueeze(1)

    def forward(self, x: Tensor) -> Tensor:
        out = w8a16_mm(x, self.weight_int8, self.scale)
        return out if self.bias is None else out + self.bias.to(out.dtype)


@register_quantize_transform(Int8WeightOnlyConfig)
def _int8_weight_only(linear: nn.Linear, config: Int8WeightOnlyConfig) -> nn.Module:
    return Int8WeightOnlyLinear(linear, config)


# --- int4 weight-only ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """4-bit weights (two per byte), per-group asymmetric scale and zero point along K."""

    group_size: int = 64

    def __post_init__(self) -> None:
        if self.group_size not in (32, 64, 128):
            raise QuantizationError(
                f"Int4WeightOnlyConfig: group_size must be 32, 64 or 128, got {self.group_size}"
            )


def quantize_int4_per_group(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """[N, K] float -> (packed uint8 [N, Kp/2], fp32 scale [N, Kp/g], uint8 zero [N, Kp/g]),
    Kp = K rounded up to the group size; w ~= (q - zero) * scale with q in 0..15. Each group's
    range is widened to include 0 so that zero (and the padding) is exact."""
    n, k = w.shape
    kp = -(-k // group_size) * group_size
    w32 = F.pad(w.float(), (0, kp - k)).view(n, kp // group_size, group_size)
    lo = w32.amin(dim=-1).clamp_max(0.0)
    hi = w32.amax(dim=-1).clamp_min(0.0)
    scale = ((hi - lo) / 15).clamp_min(_EPS)
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.round(w32 / scale.unsqueeze(-1) + zero.unsqueeze(-1)).clamp(0, 15)
    return pack_int4(q.view(n, kp)), scale, zero.to(torch.uint8)


class Int4WeightOnlyLinear(QuantizedLinear):
    row_buffers = ("weight_int4", "scale", "zero")

    def __init__(self, linear: nn.Linear, config: Int4WeightOnlyConfig) -> None:
        super().__init__(linear.in_features, linear.out_features)
        self.config = config
        self.group_size = config.group_size
        packed, scale, zero = quantize_int4_per_group(_no_grad_weight(linear), config.group_size)
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.register_buffer("zero", zero)
        self._set_bias(linear)

    def dequantize(self) -> Tensor:
        from perfml.quant.kernels import dequantize_int4_ref

        w = dequantize_int4_ref(self.weight_int4, self.scale, self.zero, self.group_size)
        return w[:, : self.in_features]

    def forward(self, x: Tensor) -> Tensor:
        out = w4a16_mm(x, self.weight_int4, self.scale, self.zero, self.group_size)
        return out if self.bias is None else out + self.bias.to(out.dtype)


@register_quantize_transform(Int4WeightOnlyConfig)
def _int4_weight_only(linear: nn.Linear, config: Int4WeightOnlyConfig) -> nn.Module:
    return Int4WeightOnlyLinear(linear, config)


# --- int8 dynamic (W8A8) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Int8DynamicConfig:
    """int8 weights per channel x int8 activations per token (quantized at run time)."""


def quantize_int8_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """[M, K] float -> (int8 [M, K], fp32 scale [M, 1])."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp_min(_EPS)
    return torch.round(x32 / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def int8_dynamic_mm(x: Tensor, w_q: Tensor, w_scale: Tensor) -> Tensor:
    """x [..., K] float @ (w_q [N, K] int8 * w_scale [N]).T with x quantized per token."""
    x2 = x.reshape(-1, x.shape[-1])
    x_q, x_scale = quantize_int8_per_token(x2)
    m, k = x2.shape
    n = w_q.shape[0]
    if x.device.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0:
        acc = torch._int_mm(x_q, w_q.t())
    else:
        acc = x_q.to(torch.int32) @ w_q.to(torch.int32).T  # exact: |acc| <= 127**2 * K < 2**31
    out = acc.float() * x_scale * w_scale.float()
    return out.to(x.dtype).view(*x.shape[:-1], n)


class Int8DynamicLinear(QuantizedLinear):
    row_buffers = ("weight_int8", "scale")

    def __init__(self, linear: nn.Linear, config: Int8DynamicConfig) -> None:
        super().__init__(linear.in_features, linear.out_features)
        self.config = config
        q, scale = quantize_int8_per_channel(_no_grad_weight(linear))
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self._set_bias(linear)

    def dequantize(self) -> Tensor:
        return self.weight_int8.float() * self.scale.unsqueeze(1)

    def forward(self, x: Tensor) -> Tensor:
        out = int8_dynamic_mm(x, self.weight_int8, self.scale)
        return out if self.bias is None else out + self.bias.to(out.dtype)


@register_quantize_transform(Int8DynamicConfig)
def _int8_dynamic(linear: nn.Linear, config: Int8DynamicConfig) -> nn.Module:
    return Int8DynamicLinear(linear, config)


# --- float8 -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Float8Config:
    """float8 e4m3 weights and activations, row-wise fp32 scales (per channel / per token)."""


def quantize_fp8_rowwise(t: Tensor) -> tuple[Tensor, Tensor]:
    """[R, K] float -> (float8_e4m3fn [R, K], fp32 scale [R, 1]): each row's amax maps to 448."""
    t32 = t.float()
    scale = (t32.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(_EPS)
    return (t32 / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _scaled_mm_ok(x: Tensor, k: int, n: int) -> bool:
    return (
        x.device.type == "cuda"
        and _backend.is_sm_at_least_89(x.device)
        and k % 16 == 0
        and n % 16 == 0
    )


def float8_mm(x: Tensor, w_f8: Tensor, w_scale: Tensor) -> Tensor:
    """x [..., K] @ (w_f8 [N, K] * w_scale [N]).T with x quantized to e4m3 per token."""
    x2 = x.reshape(-1, x.shape[-1])
    x_f8, x_scale = quantize_fp8_rowwise(x2)
    n, k = w_f8.shape
    if _scaled_mm_ok(x, k, n):
        # row-wise scaling wants bf16 output; w_f8.t() is the column-major operand it requires
        out = torch._scaled_mm(
            x_f8,
            w_f8.t(),
            scale_a=x_scale,
            scale_b=w_scale.float().view(1, n),
            out_dtype=torch.bfloat16,
        )
    else:
        out = (x_f8.float() @ w_f8.float().T) * x_scale * w_scale.float().view(1, n)
    return out.to(x.dtype).view(*x.shape[:-1], n)


class Float8Linear(QuantizedLinear):
    row_buffers = ("weight_fp8", "scale")

    def __init__(self, linear: nn.Linear, config: Float8Config) -> None:
        super().__init__(linear.in_features, linear.out_features)
        self.config = config
        w_f8, scale = quantize_fp8_rowwise(_no_grad_weight(linear))
        self.register_buffer("weight_fp8", w_f8)
        self.register_buffer("scale", scale.view(-1))
        self._set_bias(linear)

    def dequantize(self) -> Tensor:
        return self.weight_fp8.float() * self.scale.unsqueeze(1)

    def forward(self, x: Tensor) -> Tensor:
        out = float8_mm(x, self.weight_fp8, self.scale)
        return out if self.bias is None else out + self.bias.to(out.dtype)


@register_quantize_transform(Float8Config)
def _float8(linear: nn.Linear, config: Float8Config) -> nn.Module:
    return Float8Linear(linear, config)
