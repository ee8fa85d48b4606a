"""Cross-entropy benchmark case: logits [N, V] and int64 targets [N], reduction "mean".

eager    HF's causal-LM loss: the logits upcast to fp32, then F.cross_entropy (12 GiB at the issue
         shape in the anchor run)
torch    F.cross_entropy on the logits' own dtype, no upcast
compile  torch.compile of eager
liger    LigerCrossEntropyLoss (writes its gradient over the input logits; listed last so that no
         impl after it reads overwritten inputs)
perfml   perfml.ops.cross_entropy (gradient into a new buffer)

A training loss is differentiated with an upstream gradient of 1 (loss.backward()). The harness
feeds a random one, so every impl's loss, the reference's included, passes through an identity
whose backward hands 1 on (the same for all, so the comparison stays fair and the check against
the reference exact).

Anchor (ANCHORS.md, H200, bf16 8192x128256 fwd+bwd): Liger 1948 GB/s; perfml's target 3600 GB/s
counting the logits read once and the gradient written once, with no memory beyond the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from perfml.bench import impls
from perfml.bench.cost import cross_entropy_bytes
from perfml.bench.registry import Case, Shape, Sizes, register
from perfml.ops.cross_entropy import cross_entropy, cross_entropy_ref


class _UnitUpstream(torch.autograd.Function):
    """Identity whose backward passes 1 upstream, whatever gradient it is given."""

    @staticmethod
    def forward(ctx, loss: Tensor) -> Tensor:
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return torch.ones_like(grad)


def unit_upstream(loss: Tensor) -> Tensor:
    return _UnitUpstream.apply(loss)


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    n, v = shape
    logits = (torch.randn(n, v, device=device) * 2).to(dtype)
    return logits, torch.randint(0, v, (n,), device=device)


def _eager(logits: Tensor, target: Tensor) -> Tensor:
    return unit_upstream(F.cross_entropy(logits.float(), target))


def _torch(logits: Tensor, target: Tensor) -> Tensor:
    return unit_upstream(F.cross_entropy(logits, target))


def _liger():
    from liger_kernel.transformers import LigerCrossEntropyLoss

    loss = LigerCrossEntropyLoss()
    return lambda logits, target: unit_upstream(loss(logits, target))


def _perfml(logits: Tensor, target: Tensor) -> Tensor:
    return unit_upstream(cross_entropy(logits, target))


def _reference(logits: Tensor, target: Tensor) -> Tensor:
    return unit_upstream(cross_entropy_ref(logits, target))


register(
    Case(
        name="cross_entropy",
        family="loss",
        description="cross-entropy, logits [N, V], int64 targets, reduction mean, dloss = 1",
        sizes=Sizes(
            cuda=((8192, 128256), (8192, 32000), (4096, 50257), (4096, 256000)),
            cpu=((256, 32000),),
            quick_cuda=((8192, 128256),),
            quick_cpu=((128, 8192),),
        ),
        make_inputs=_inputs,
        reference=_reference,
        bytes=cross_entropy_bytes,
        grad_inputs=(0,),
        impls=(
            impls.eager(_eager),
            impls.native(_torch),
            impls.compiled(_eager),
            *impls.perfml_impls(_perfml, "cross_entropy", has_cpp=False),
            impls.liger(_liger),
        ),
    )
)
