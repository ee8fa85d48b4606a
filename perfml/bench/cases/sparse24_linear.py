"""2:4 semi-structured sparse linear: y = x @ W.T with W pruned 2:4 along K (two of every four
consecutive weights are zero); shape (M, N, K), x [M, K], W [N, K].

  dense   F.linear on the masked weight stored dense (cuBLAS does every multiply, zeros included)
  perfml  the nn.Linear after perfml.prune(SemiStructured24Config()): on CUDA (sm_80+, fp16/bf16,
          N and K multiples of 64) the weight becomes a torch semi-structured sparse tensor and
          cuSPARSELt (CUTLASS where it is missing) multiplies only the kept half; elsewhere the
          masked dense weight stays, so CPU rows time the same matmul twice

The weight conversion happens once, when the impl is first called, outside the timed calls. The
headline shapes are Llama-3-8B's MLP: 4096 -> 14336 (gate/up) and 14336 -> 4096 (down) at
M = 2048 and 4096 tokens, where the matmul is compute-bound and skipping half the multiplies can
pay; at decode sizes it cannot (the sparse format's metadata is read on top of the values).
FLOPs count the dense product (2 M N K), so TFLOP/s is dense-equivalent. Target (ISSUES, H200):
perfml >= 1.1x dense at 4096x14336 for M >= 2048.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perfml import _backend
from perfml.bench.cost import matmul_flops
from perfml.bench.registry import Case, Impl, Shape, Sizes, register
from perfml.sparsity import SemiStructured24Config, mask_2_4, prune


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    m, n, k = shape
    if k % 4:
        raise ValueError(f"sparse24_linear: K must be a multiple of 4, got {k}")
    w = torch.randn(n, k, device=device, dtype=dtype) * k**-0.5
    w = w * mask_2_4(w)
    return torch.randn(m, k, device=device, dtype=dtype), w


def _reference(x: Tensor, w: Tensor) -> Tensor:
    return (x.float() @ w.float().T).to(x.dtype)


def _dense(x: Tensor, w: Tensor) -> Tensor:
    return F.linear(x, w)


class _Pruned:
    """fn(x, w): the perfml-pruned linear holding w, built on the first call."""

    def __init__(self) -> None:
        self.linear: nn.Linear | None = None

    def __call__(self, x: Tensor, w: Tensor) -> Tensor:
        if self.linear is None:
            n, k = w.shape
            linear = nn.Linear(k, n, bias=False, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                linear.weight.copy_(w)
            model = nn.Sequential(linear)
            prune(model, SemiStructured24Config(), filter_fn=lambda m, fqn: True)
            self.linear = model[0]
        return self.linear(x)


def _path(device: torch.device) -> str:
    if device.type == "cuda" and _backend.is_sm_at_least_80(device):
        return "semi-structured"
    return "masked-dense"


_DENSE: Callable[[], Callable[..., Tensor]] = lambda: _dense  # noqa: E731

register(
    Case(
        name="sparse24_linear",
        family="sparsity",
        description="x [M, K] @ W.T with W [N, K] 2:4-sparse along K; shape MxNxK",
        sizes=Sizes(
            cuda=(
                (4096, 14336, 4096),
                (2048, 14336, 4096),
                (4096, 4096, 14336),
                (2048, 4096, 14336),
            ),
            cpu=((256, 512, 512),),
            quick_cuda=((4096, 14336, 4096),),
            quick_cpu=((64, 256, 256),),
        ),
        make_inputs=_inputs,
        reference=_reference,
        flops=matmul_flops,
        modes=("fwd",),
        cuda_dtypes=(torch.bfloat16,),
        impls=(
            Impl("dense", make=_DENSE),
            Impl("perfml", make=_Pruned, path=_path),
        ),
    )
)
