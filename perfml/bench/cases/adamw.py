"""AdamW benchmark case: one optimizer step over GPT-2-124M's parameter shapes (and 4x that).

Shape (layers, copies): the parameters of perfml.models.llama's "gpt2-124m" preset (a 50304 x 768
tied embedding, `layers` transformer blocks of 768-wide attention and 2048-wide SwiGLU, RMSNorm
weights; layers = 12 is the whole 123.6M-parameter model, 110 tensors), repeated `copies` times as
separate tensors (copies = 4: 494M parameters in 440 tensors). Each timed call is one step() with
the same grads; the optimizer is built and its state created on the impl's first call, so the
timing is the steady state. The correctness guard compares that first step against adamw_ref.

Impls:
  perfml         perfml.optim.AdamW, automatic backend: cuda_ext on CUDA when perfml._C has its
                 CUDA kernels (else triton), cpu_ext on CPU (the row's path says which)
  perfml-triton  perfml.optim.AdamW(backend="triton") (CUDA only)
  perfml-8bit    perfml.optim.AdamW8bit (triton on CUDA, its PyTorch reference on CPU)
  torch          torch.optim.AdamW(fused=True): the best native step
  torch-foreach  torch.optim.AdamW(foreach=True): torch's default on CUDA

Bytes: the minimum traffic of AdamW with its state in the parameter dtype: read param, grad,
exp_avg, exp_avg_sq, write param, exp_avg, exp_avg_sq: 7 x itemsize per parameter (28 bytes in
fp32, 14 in bf16). Every row uses it, so the 8-bit row's GB/s is an AdamW-equivalent rate (it
really moves 3 x itemsize + ~4.06 bytes per parameter) and its speedup is the comparable number.

Anchors (ANCHORS.md): H200, 123.6M fp32 parameters: foreach 3.34 ms, fused 1.50 ms (2312 GB/s);
perfml's target <= 0.95 ms (>= 85% of copy bandwidth). 2-core CPU: fused 31 ms; perfml's target
is to match it. AdamW8bit on CUDA: no slower than torch fused at 4x the parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from perfml import _backend
from perfml.bench.cost import adamw_bytes, gpt2_shapes
from perfml.bench.registry import Case, Impl, Shape, Sizes, register
from perfml.optim import AdamW, AdamW8bit, adamw_ref

_HYPER = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}


@dataclass(frozen=True)
class _Spec:
    """How the flat input tuple splits: `count` params, then their `count` grads."""

    count: int


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    layers, copies = shape
    shapes = list(gpt2_shapes(layers)) * copies
    params = [(torch.randn(s, device=device) * 0.02).to(dtype) for s in shapes]
    grads = [(torch.randn(s, device=device) * 1e-3).to(dtype) for s in shapes]
    return (_Spec(len(shapes)), *params, *grads)


def _split(spec: _Spec, tensors: tuple[Tensor, ...]) -> tuple[list[Tensor], list[Tensor]]:
    return list(tensors[: spec.count]), list(tensors[spec.count :])


def _reference(spec: _Spec, *tensors: Tensor) -> tuple[Tensor, ...]:
    """One AdamW step from a fresh state, in plain PyTorch, on copies."""
    params, grads = _split(spec, tensors)
    params = [p.clone() for p in params]
    zeros = [torch.zeros_like(p) for p in params]
    adamw_ref(
        params, grads, zeros, [torch.zeros_like(p) for p in params],
        [torch.zeros((), device=p.device) for p in params],
        lr=_HYPER["lr"], beta1=_HYPER["betas"][0], beta2=_HYPER["betas"][1],
        eps=_HYPER["eps"], weight_decay=_HYPER["weight_decay"],
    )  # fmt: skip
    return tuple(params)


class _Step:
    """fn(spec, *params, *grads) -> params after one step; the optimizer is built on the first
    call, over the tensors the harness hands this impl (its own copies)."""

    def __init__(self, make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer]) -> None:
        self.make_optimizer = make_optimizer
        self.optimizer: torch.optim.Optimizer | None = None

    def __call__(self, spec: _Spec, *tensors: Tensor) -> tuple[Tensor, ...]:
        params, grads = _split(spec, tensors)
        if self.optimizer is None:
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            self.optimizer = self.make_optimizer(params)
        self.optimizer.step()
        return tuple(params)


def _triton_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "the Triton path runs CUDA tensors (interpret mode is not a benchmark)"
    if not _backend.has_triton():
        return "triton is not importable"
    return None


def _perfml_path(device: torch.device) -> str:
    return AdamW([torch.zeros(1, device=device)]).backend_for(device)


def _perfml_8bit_path(device: torch.device) -> str:
    return AdamW8bit([torch.zeros(1, device=device)]).backend_for(device)


def _impl(name: str, make_optimizer: Callable[[list[Tensor]], Any], **kw: Any) -> Impl:
    return Impl(name, make=lambda: _Step(make_optimizer), **kw)


register(
    Case(
        name="adamw",
        family="optim",
        description=(
            "one AdamW step over GPT-2-124M's parameter shapes; shape (layers, copies): "
            "`layers` blocks of the gpt2-124m preset, repeated `copies` times"
        ),
        sizes=Sizes(
            cuda=((12, 1), (12, 4)),
            cpu=((12, 1),),
            quick_cuda=((12, 1), (12, 4)),
            quick_cpu=((1, 1),),
        ),
        make_inputs=_inputs,
        reference=_reference,
        bytes=adamw_bytes,
        impls=(
            _impl("perfml", lambda ps: AdamW(ps, **_HYPER), path=_perfml_path),
            _impl(
                "perfml-triton",
                lambda ps: AdamW(ps, backend="triton", **_HYPER),
                unavailable=_triton_unavailable,
            ),
            _impl("perfml-8bit", lambda ps: AdamW8bit(ps, **_HYPER), path=_perfml_8bit_path),
            _impl("torch", lambda ps: torch.optim.AdamW(ps, fused=True, **_HYPER)),
            _impl("torch-foreach", lambda ps: torch.optim.AdamW(ps, foreach=True, **_HYPER)),
        ),
        modes=("fwd",),
        cuda_dtypes=(torch.float32,),
        cpu_dtypes=(torch.float32,),
    )
)
