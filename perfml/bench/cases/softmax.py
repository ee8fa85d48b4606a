"""Softmax benchmark case: torch.softmax over the last dim (the native ATen kernel, which is also
what eager code calls, so there is no separate `torch` row) vs torch.compile of it, Liger's
LigerSoftmaxFunction and perfml, on x: [M, N].

Target (issue 3, H200): >= 3800 GB/s forward at 4096x131072 bf16, rows of 256 KiB that no
one-tile kernel holds, so the sweep also covers rows that fit one tile (4096, 32768).
"""

from __future__ import annotations

import torch
from torch import Tensor

from perfml.bench import impls
from perfml.bench.cost import softmax_bytes
from perfml.bench.registry import Case, Shape, Sizes, register
from perfml.ops.softmax import softmax, softmax_ref


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[Tensor]:
    return (torch.randn(shape, device=device, dtype=dtype) * 4,)


def _torch_softmax(x: Tensor) -> Tensor:
    return torch.softmax(x, dim=-1)


def _liger_softmax():
    from liger_kernel.ops.softmax import LigerSoftmaxFunction

    return LigerSoftmaxFunction.apply


def _reference(x: Tensor) -> Tensor:
    return softmax_ref(x, -1)


register(
    Case(
        name="softmax",
        family="activation",
        description="softmax over the last dim, x: [M, N]",
        sizes=Sizes(
            cuda=((4096, 131072), (16384, 4096), (8192, 32768), (1024, 524288), (262144, 256)),
            cpu=((2048, 1024), (16, 65536)),
            quick_cuda=((4096, 131072),),
            quick_cpu=((1024, 1024),),
        ),
        make_inputs=_inputs,
        reference=_reference,
        bytes=softmax_bytes,
        impls=(
            impls.eager(_torch_softmax),
            impls.compiled(_torch_softmax),
            impls.liger(_liger_softmax),
            *impls.perfml_impls(softmax, "softmax", has_cpp=False),
        ),
    )
)
