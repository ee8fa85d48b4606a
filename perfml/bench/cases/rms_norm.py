"""RMSNorm benchmark case: HF LlamaRMSNorm's eager code vs F.rms_norm, torch.compile, Liger and
perfml, all with the llama casting convention (normalize in fp32, round, then scale).

Anchor (ANCHORS.md, H200, bf16 16384x4096): best so far F.rms_norm, 2765 GB/s fwd and 1784 GB/s
fwd+bwd; perfml's target is 90% / 85% of the card's copy bandwidth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from perfml.bench import impls
from perfml.bench.cost import rms_norm_bytes
from perfml.bench.registry import Case, Shape, Sizes, register
from perfml.ops.rms_norm import rms_norm, rms_norm_ref

EPS = 1e-6


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    x = torch.randn(shape, device=device, dtype=dtype)
    weight = (1.0 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype)
    return x, weight


def _llama_rms_norm(x: Tensor, weight: Tensor) -> Tensor:
    # transformers' LlamaRMSNorm.forward, verbatim apart from the names
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + EPS)
    return weight * x.to(input_dtype)


def _torch_rms_norm(x: Tensor, weight: Tensor) -> Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, EPS)


def _liger_rms_norm():
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # in_place=False: the in-place variant overwrites dy with dx, and the benchmark reuses dy
    # across repetitions (and checks the gradients against the reference's).
    return lambda x, weight: LigerRMSNormFunction.apply(x, weight, EPS, 0.0, "llama", False)


def _perfml_rms_norm(x: Tensor, weight: Tensor) -> Tensor:
    return rms_norm(x, weight, EPS)


def _reference(x: Tensor, weight: Tensor) -> Tensor:
    return rms_norm_ref(x, weight, EPS)


register(
    Case(
        name="rms_norm",
        family="norm",
        description="RMSNorm over the last dim with a weight (llama casting), x: [M, N]",
        sizes=Sizes(
            cuda=((16384, 4096), (16384, 1024), (16384, 2048), (16384, 8192), (16384, 16384)),
            cpu=((4096, 1024), (1024, 4096)),
            quick_cuda=((16384, 4096),),
            quick_cpu=((1024, 1024),),
        ),
        make_inputs=_inputs,
        reference=_reference,
        bytes=rms_norm_bytes,
        impls=(
            impls.eager(_llama_rms_norm),
            impls.native(_torch_rms_norm),
            impls.compiled(_llama_rms_norm),
            impls.liger(_liger_rms_norm),
            *impls.perfml_impls(_perfml_rms_norm, "rms_norm", has_cpp=True),
        ),
    )
)
