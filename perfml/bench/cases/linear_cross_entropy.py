"""Linear + cross-entropy benchmark case (an LM head and its loss): hidden [N, H], weight [V, H],
int64 targets [N], no bias, reduction "mean"; shape (N, H, V). Compute-bound: FLOPs 2*N*H*V per
matmul, one in the forward and two more in the backward (fwd+bwd counts all three).

eager          HF's path: logits = hidden @ weight.T, upcast to fp32, F.cross_entropy
torch          F.linear_cross_entropy with its chunked options (torch versions that have it)
compile        torch.compile of eager
liger          LigerFusedLinearCrossEntropyLoss
perfml         perfml.ops.linear_cross_entropy, grad_weight summed over chunks in fp32
perfml-lowmem  the same with fp32_accumulation=False (summed in the weight dtype, like Liger)

The upstream gradient is 1, as in cross_entropy's case (see there).

Anchor (ANCHORS.md, H200, bf16 8192 x 4096 x 128256 fwd+bwd): matmul floor 32.6 ms; compile
39.6 ms / 3.0 GiB, Liger 53.8 ms / 1.1 GiB; perfml's target <= 36 ms with <= 1.1 GiB peak extra.
The fp32 accumulator alone is V * H * 4 bytes (2 GiB there), so only perfml-lowmem can meet the
memory half of that target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from perfml.bench import impls
from perfml.bench.cases.cross_entropy import unit_upstream
from perfml.bench.cost import linear_cross_entropy_flops
from perfml.bench.registry import Case, Impl, Shape, Sizes, register
from perfml.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    n, h, v = shape
    hidden = torch.randn(n, h, device=device).to(dtype)
    weight = (torch.randn(v, h, device=device) * h**-0.5).to(dtype)
    return hidden, weight, torch.randint(0, v, (n,), device=device)


def _eager(hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    return unit_upstream(F.cross_entropy((hidden @ weight.t()).float(), target))


def _torch_unavailable(device: torch.device) -> str | None:
    if not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy"
    return None


def _torch():
    options = torch.nn.LinearCrossEntropyOptions()  # the chunked path (None: full logits)
    return lambda hidden, weight, target: unit_upstream(
        F.linear_cross_entropy(hidden, weight, target, options=options)
    )


def _liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda hidden, weight, target: unit_upstream(loss(weight, hidden, target))


def _perfml(hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    return unit_upstream(linear_cross_entropy(hidden, weight, target))


def _perfml_lowmem(hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    return unit_upstream(linear_cross_entropy(hidden, weight, target, fp32_accumulation=False))


def _reference(hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    return unit_upstream(linear_cross_entropy_ref(hidden, weight, target))


register(
    Case(
        name="linear_cross_entropy",
        family="loss",
        description="LM head + cross-entropy, hidden [N, H], weight [V, H], shape (N, H, V)",
        sizes=Sizes(
            cuda=((8192, 4096, 128256), (4096, 2048, 128256), (8192, 4096, 32000)),
            cpu=((256, 256, 8192),),
            quick_cuda=((8192, 4096, 128256),),
            quick_cpu=((128, 64, 2048),),
        ),
        make_inputs=_inputs,
        reference=_reference,
        flops=linear_cross_entropy_flops,
        grad_inputs=(0, 1),
        impls=(
            impls.eager(_eager),
            Impl("torch", make=_torch, unavailable=_torch_unavailable),
            impls.compiled(_eager),
            *impls.perfml_impls(_perfml, "linear_cross_entropy", has_cpp=False),
            Impl("perfml-lowmem", make=lambda: _perfml_lowmem),
            impls.liger(_liger),
        ),
    )
)
