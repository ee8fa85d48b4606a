"""A throwaway benchmark case for the harness tests: y = 2 * x on tiny tensors, with impls that
are right, wrong in the forward, wrong only in the backward, raising, and unavailable."""

from __future__ import annotations

import torch

from perfml.bench import Case, Impl, Sizes

TINY = "tiny_double"


def _double_wrong_grad(x: torch.Tensor) -> torch.Tensor:
    class _WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, dy):
            return dy * 3  # the forward is right, the gradient is not

    return _WrongGrad.apply(x)


def _raise(x: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("kernel exploded")


def tiny_bytes(shape: tuple[int, ...], dtype: torch.dtype, mode: str) -> int:
    n = shape[0] * shape[1] * dtype.itemsize
    return 2 * n if mode == "fwd" else 4 * n  # fwd: read x, write y; bwd: read dy, write dx


def tiny_case(*impl_names: str) -> Case:
    impls = {
        "eager": Impl("eager", make=lambda: lambda x: x * 2),
        "perfml": Impl("perfml", make=lambda: lambda x: x.mul(2.0), path=lambda d: "reference"),
        "wrong": Impl("wrong", make=lambda: lambda x: x * 3),
        "wrong-grad": Impl("wrong-grad", make=lambda: _double_wrong_grad),
        "raises": Impl("raises", make=lambda: _raise),
        "absent": Impl("absent", make=lambda: _raise, unavailable=lambda d: "not on this machine"),
    }
    return Case(
        name=TINY,
        family="test",
        sizes=Sizes(cuda=((8, 16),), cpu=((8, 16),), quick_cuda=((8, 16),), quick_cpu=((4, 16),)),
        make_inputs=lambda shape, dtype, device: (torch.randn(shape, dtype=dtype, device=device),),
        reference=lambda x: x * 2,
        impls=tuple(impls[n] for n in impl_names or impls),
        bytes=tiny_bytes,
        flops=lambda shape, mode: shape[0] * shape[1],
    )
