"""Weight-only quantized matmul cases: y = x @ W.T with W in int8 (per channel) or int4 (per group
of 64), at decode sizes M = 1, 16 and a prefill-ish 256, for Llama's 4096x4096 (q/o proj) and
14336x4096 (gate/up proj).

Impls: `eager` is the bf16 matmul on the float weight (what an unquantized model runs), `dequant`
the naive quantized path (dequantize the weight to bf16, then F.linear: an extra weight-sized
write and read per call), `perfml` the fused kernel. The reference is dequantize-then-matmul in
fp32, so `eager` differs from it by the quantization error: the tolerance covers that (int8:
SQNR ~40 dB, int4 ~20 dB).
Bytes: x read once, the quantized weight and its scales read once, y written once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from perfml.bench import impls
from perfml.bench.cost import matmul_flops, weight_only_matmul_bytes
from perfml.bench.registry import Case, Impl, Shape, Sizes, register
from perfml.quant import kernels
from perfml.quant.methods import quantize_int4_per_group, quantize_int8_per_channel

GROUP = 64

_SIZES = Sizes(
    cuda=tuple((m, n, 4096) for n in (4096, 14336) for m in (1, 16, 256)),
    cpu=((1, 512, 512), (16, 512, 512)),
    quick_cuda=((1, 4096, 4096), (16, 14336, 4096)),
    quick_cpu=((1, 256, 256),),
)


def _int8_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    m, n, k = shape
    w = torch.randn(n, k, device=device) * 0.02
    w_q, scale = quantize_int8_per_channel(w)
    return torch.randn(m, k, device=device, dtype=dtype), w.to(dtype), w_q, scale.to(dtype)


def _int4_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    m, n, k = shape
    w = torch.randn(n, k, device=device) * 0.02
    packed, scale, zero = quantize_int4_per_group(w, GROUP)
    x = torch.randn(m, k, device=device, dtype=dtype)
    return x, w.to(dtype), packed, scale.to(dtype), zero


def _int8_ref(x: Tensor, w: Tensor, w_q: Tensor, scale: Tensor) -> Tensor:
    return kernels.w8a16_mm_ref(x.float(), w_q, scale).to(x.dtype)


def _int4_ref(x: Tensor, w: Tensor, packed: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    deq = kernels.dequantize_int4_ref(packed, scale, zero, GROUP)[:, : x.shape[1]]
    return (x.float() @ deq.T).to(x.dtype)


def _bf16_matmul(x: Tensor, w: Tensor, *quantized: Tensor) -> Tensor:
    return F.linear(x, w)


def _dequant_int8(x: Tensor, w: Tensor, w_q: Tensor, scale: Tensor) -> Tensor:
    return F.linear(x, w_q.to(x.dtype) * scale.unsqueeze(1))


def _dequant_int4(x: Tensor, w: Tensor, packed: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    deq = kernels.dequantize_int4_ref(packed, scale, zero, GROUP).to(x.dtype)
    return F.linear(x, deq[:, : x.shape[1]])


def _perfml_int8(x: Tensor, w: Tensor, w_q: Tensor, scale: Tensor) -> Tensor:
    return kernels.w8a16_mm(x, w_q, scale)


def _perfml_int4(x: Tensor, w: Tensor, packed: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return kernels.w4a16_mm(x, packed, scale, zero, GROUP)


for name, make_inputs, reference, dequant, perfml_fn, op, per_byte, tol in (
    (
        "quant_int8_matmul",
        _int8_inputs,
        _int8_ref,
        _dequant_int8,
        _perfml_int8,
        "w8a16_mm",
        1.0,
        0.05,
    ),
    (
        "quant_int4_matmul",
        _int4_inputs,
        _int4_ref,
        _dequant_int4,
        _perfml_int4,
        "w4a16_mm",
        0.5,
        0.3,
    ),
):
    register(
        Case(
            name=name,
            family="quantization",
            description=f"x [M, K] @ W.T, W [N, K] {name.split('_')[1]} weight-only; shape MxNxK",
            sizes=_SIZES,
            make_inputs=make_inputs,
            reference=reference,
            bytes=weight_only_matmul_bytes(per_byte, None if per_byte == 1.0 else GROUP),
            flops=matmul_flops,
            modes=("fwd",),
            tolerance={torch.bfloat16: tol, torch.float32: tol},
            impls=(
                impls.eager(_bf16_matmul),
                Impl("dequant", make=lambda fn=dequant: fn),
                impls.perfml_impls(perfml_fn, op, has_cpp=False)[0],
            ),
        )
    )
