"""LayerNorm benchmark case: F.layer_norm (ATen) vs torch.compile of it, Liger and perfml, with a
weight and a bias.

What HF models and torch.nn.LayerNorm run is F.layer_norm itself, so the eager row is also the
best native op (no separate `torch` row). Anchor (ANCHORS.md, H200, bf16 16384x4096): best so
far ATen, 2268 GB/s fwd and 1876 GB/s fwd+bwd; perfml's target is >= 3800 / 3600 GB/s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from perfml.bench import impls
from perfml.bench.cost import layer_norm_bytes
from perfml.bench.registry import Case, Shape, Sizes, register
from perfml.ops.layer_norm import layer_norm, layer_norm_ref

EPS = 1e-5


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    x = torch.randn(shape, device=device, dtype=dtype)
    weight = (1.0 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype)
    bias = (0.1 * torch.randn(shape[-1], device=device)).to(dtype)
    return x, weight, bias


def _torch_layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, EPS)


def _liger_layer_norm():
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    return lambda x, weight, bias: LigerLayerNormFunction.apply(x, weight, bias, EPS)


def _perfml_layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return layer_norm(x, weight, bias, EPS)


def _reference(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return layer_norm_ref(x, weight, bias, EPS)


register(
    Case(
        name="layer_norm",
        family="norm",
        description="LayerNorm over the last dim with weight and bias, x: [M, N]",
        sizes=Sizes(
            cuda=((16384, 4096), (16384, 1024), (16384, 2048), (16384, 8192), (16384, 16384)),
            cpu=((4096, 1024), (1024, 4096)),
            quick_cuda=((16384, 4096),),
            quick_cpu=((1024, 1024),),
        ),
        make_inputs=_inputs,
        reference=_reference,
        bytes=layer_norm_bytes,
        impls=(
            impls.eager(_torch_layer_norm),
            impls.compiled(_torch_layer_norm),
            impls.liger(_liger_layer_norm),
            *impls.perfml_impls(_perfml_layer_norm, "layer_norm", has_cpp=False),
        ),
    )
)
