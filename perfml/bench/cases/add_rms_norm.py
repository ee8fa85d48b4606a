"""Residual add + RMSNorm benchmark case: the pre-norm block of a Llama decoder layer,
`s = x + residual; y = rms_norm(s)`, returning (y, s), with the llama casting convention.

Rows: eager (the add, then HF LlamaRMSNorm's code), torch (the add, then F.rms_norm),
compile (torch.compile of the eager code), perfml-unfused (the add, then perfml.ops.rms_norm),
liger (LigerFusedAddRMSNormFunction, when the installed liger-kernel has it) and perfml (the
fused op). Target (issue 3): perfml >= 1.3x faster than the best of the unfused rows, at the
rms_norm anchor shape (bf16 16384x4096).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

from perfml.bench import impls
from perfml.bench.cost import add_rms_norm_bytes
from perfml.bench.registry import Case, Impl, Shape, Sizes, register
from perfml.ops.add_rms_norm import add_rms_norm, add_rms_norm_ref
from perfml.ops.rms_norm import rms_norm

EPS = 1e-6


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    x = torch.randn(shape, device=device, dtype=dtype)
    residual = torch.randn(shape, device=device, dtype=dtype)
    weight = (1.0 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype)
    return x, residual, weight


def _hf_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    # the residual add of a transformers decoder layer, then LlamaRMSNorm.forward verbatim
    residual = x + residual
    input_dtype = residual.dtype
    hidden = residual.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + EPS)
    return weight * hidden.to(input_dtype), residual


def _torch_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    s = x + residual
    return F.rms_norm(s, (s.shape[-1],), weight, EPS), s


def _perfml_unfused(x: Tensor, residual: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    s = x + residual
    return rms_norm(s, weight, EPS), s


def _liger_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "liger runs CUDA tensors only"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not installed"
    if importlib.util.find_spec("liger_kernel.ops.fused_add_rms_norm") is None:
        return "this liger_kernel has no fused add + RMSNorm"
    return None


def _liger_add_rms_norm():
    from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

    # in_place=False: the in-place variant overwrites dy, which the benchmark reuses
    return lambda x, residual, weight: tuple(
        LigerFusedAddRMSNormFunction.apply(x, residual, weight, EPS, 0.0, "llama", False)
    )


def _perfml_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    return add_rms_norm(x, residual, weight, EPS)


def _reference(x: Tensor, residual: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    return add_rms_norm_ref(x, residual, weight, EPS)


register(
    Case(
        name="add_rms_norm",
        family="norm",
        description="s = x + residual, then RMSNorm of s with a weight (llama casting); (y, s)",
        sizes=Sizes(
            cuda=((16384, 4096), (16384, 1024), (16384, 2048), (16384, 8192)),
            cpu=((4096, 1024), (1024, 4096)),
            quick_cuda=((16384, 4096),),
            quick_cpu=((1024, 1024),),
        ),
        make_inputs=_inputs,
        reference=_reference,
        bytes=add_rms_norm_bytes,
        impls=(
            impls.eager(_hf_add_rms_norm),
            impls.native(_torch_add_rms_norm),
            impls.compiled(_hf_add_rms_norm),
            Impl("perfml-unfused", make=lambda: _perfml_unfused),
            Impl("liger", make=_liger_add_rms_norm, unavailable=_liger_unavailable),
            *impls.perfml_impls(_perfml_add_rms_norm, "add_rms_norm", has_cpp=False),
        ),
    )
)
