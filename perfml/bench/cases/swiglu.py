"""SwiGLU and GeGLU benchmark cases: act(gate) * up as HF MLPs write it (eager), torch.compile of
that, Liger's fused kernels and perfml, on gate and up of shape [M, N] (N = intermediate size).

Two perfml rows: `perfml` (the default: the backward writes dgate and dup to new buffers) and
`perfml-inplace` (inplace_backward=True, what perfml.nn.SwiGLUMLP runs: the gradients overwrite
gate and up, as Liger's kernels always do), so the peak-memory column compares like with like.
Anchor (ANCHORS.md, H200, bf16 16384x8192): best so far compile 3325 GB/s fwd, Liger 3682 GB/s
fwd+bwd at 256 MiB peak; perfml's target is >= 3800 GB/s both ways at <= 256 MiB.

The runner hands every impl of a (shape, dtype, mode) the same input tensors, so an impl whose
backward overwrites them would feed gradients to the impls measured after it. Such impls are
wrapped: their first call (the runner's untimed correctness run) snapshots the inputs, and the
end of their measurement writes the snapshot back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from perfml.bench import impls
from perfml.bench.cost import glu_bytes
from perfml.bench.registry import Case, Impl, Shape, Sizes, register
from perfml.ops.swiglu import geglu, geglu_ref, swiglu, swiglu_ref


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.randn(shape, device=device, dtype=dtype), torch.randn(
        shape, device=device, dtype=dtype
    )


class _RestoresInputs:
    """make/context pair for an impl whose backward overwrites its inputs (see the docstring)."""

    def __init__(self, make: Callable[[], Callable[..., Any]]) -> None:
        self._make = make
        self._saved: list[tuple[Tensor, Tensor]] = []

    def make(self) -> Callable[..., Any]:
        fn = self._make()

        def call(*args: Tensor) -> Any:
            if not self._saved and any(t.requires_grad for t in args):
                self._saved = [(t, t.detach().clone()) for t in args]
            return fn(*args)

        return call

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        try:
            yield
        finally:
            with torch.no_grad():
                for t, value in self._saved:
                    t.copy_(value)
            self._saved = []


def _overwriting(name: str, make: Callable[[], Callable[..., Any]], **kwargs: Any) -> Impl:
    wrapped = _RestoresInputs(make)
    return Impl(name, make=wrapped.make, context=wrapped.context, **kwargs)


def _perfml_impls(fn: Callable[..., Any], inplace_fn: Callable[..., Any]) -> tuple[Impl, ...]:
    perfml, *rest = impls.perfml_impls(fn, "swiglu", has_cpp=False)
    inplace = _overwriting("perfml-inplace", lambda: inplace_fn, path=perfml.path)
    return (perfml, inplace, *rest)


def _eager_swiglu(gate: Tensor, up: Tensor) -> Tensor:
    # transformers' LlamaMLP: self.act_fn(self.gate_proj(x)) * self.up_proj(x), act_fn = SiLU
    return F.silu(gate) * up


def _liger_swiglu():
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply


def _eager_geglu(gate: Tensor, up: Tensor) -> Tensor:
    # transformers' GemmaMLP with hidden_activation="gelu_pytorch_tanh"
    return F.gelu(gate, approximate="tanh") * up


def _liger_geglu():
    from liger_kernel.ops.geglu import LigerGELUMulFunction

    return LigerGELUMulFunction.apply


_SIZES = Sizes(
    cuda=((16384, 8192), (16384, 14336), (8192, 28672), (16384, 4096)),
    cpu=((2048, 2048),),
    quick_cuda=((16384, 8192),),
    quick_cpu=((512, 1024),),
)

register(
    Case(
        name="swiglu",
        family="activation",
        description="silu(gate) * up, gate and up: [M, N]",
        sizes=_SIZES,
        make_inputs=_inputs,
        reference=swiglu_ref,
        bytes=glu_bytes,
        impls=(
            impls.eager(_eager_swiglu),
            impls.compiled(_eager_swiglu),
            _overwriting(
                "liger", _liger_swiglu, unavailable=impls.liger(_liger_swiglu).unavailable
            ),
            *_perfml_impls(swiglu, lambda g, u: swiglu(g, u, inplace_backward=True)),
        ),
    )
)

register(
    Case(
        name="geglu",
        family="activation",
        description="gelu(gate, approximate='tanh') * up, gate and up: [M, N]",
        sizes=_SIZES,
        make_inputs=_inputs,
        reference=geglu_ref,
        bytes=glu_bytes,
        impls=(
            impls.eager(_eager_geglu),
            impls.compiled(_eager_geglu),
            _overwriting("liger", _liger_geglu, unavailable=impls.liger(_liger_geglu).unavailable),
            *_perfml_impls(geglu, lambda g, u: geglu(g, u, inplace_backward=True)),
        ),
    )
)
