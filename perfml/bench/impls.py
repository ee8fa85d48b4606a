"""Builders for the implementations every case compares, so a case file names its functions
and gets the standard set:

  eager      the plain code users run today (e.g. HF LlamaRMSNorm's forward)
  torch      the best native PyTorch op (e.g. torch.nn.functional.rms_norm)
  compile    torch.compile of the eager code (left out of --quick on CPU: compiling is slow there)
  liger      Liger-Kernel's version, when liger_kernel is importable and the device is CUDA
  perfml     perfml's public op on whatever path auto selection picks (its row says which)
  perfml-cpp perfml's op forced onto the C++ CPU kernels (CPU, only when perfml._C is built)
  reference  perfml's op forced onto the plain-PyTorch reference path (CPU only)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from perfml import _backend
from perfml.bench.registry import Impl


def eager(fn: Callable[..., Any]) -> Impl:
    return Impl("eager", make=lambda: fn)


def native(fn: Callable[..., Any]) -> Impl:
    return Impl("torch", make=lambda: fn)


def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    # Dynamo caches compiled graphs per code object and silently falls back to eager after its
    # recompile limit; a sweep over shapes, dtypes and modes would hit it. Starting from an empty
    # cache for every measurement keeps each timing a real compiled one.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def compiled(fn: Callable[..., Any]) -> Impl:
    return Impl("compile", make=lambda: _compile(fn), compiles=True)


def _liger_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "liger runs CUDA tensors only"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not installed"
    return None


def liger(make: Callable[[], Callable[..., Any]]) -> Impl:
    """`make` imports liger_kernel and returns the callable (the import happens only when used)."""
    return Impl("liger", make=make, unavailable=_liger_unavailable)


def _cpu_only(device: torch.device) -> str | None:
    return None if device.type == "cpu" else "CPU only"


def _cpp_unavailable(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "the C++ kernels run CPU tensors only"
    if not _backend.has_extension():
        return f"the extension perfml._C is not built ({_backend.extension_error()})"
    return None


def perfml_impls(fn: Callable[..., Any], op: str, *, has_cpp: bool) -> tuple[Impl, ...]:
    """perfml's op as it runs by default, plus (on CPU) its C++ and reference paths forced.

    `op` and `has_cpp` are what the op passes to _backend.select, so each row can name the path
    that really ran: on CPU outside interpret mode plain `perfml` is the C++ kernel when the
    extension is built and the reference otherwise.
    """

    def path(device: torch.device) -> str:
        chosen = _backend.select(op, device, has_cpp=has_cpp)
        if chosen == "triton" and device.type == "cpu":
            return "triton-interpret"
        return chosen

    impls = [Impl("perfml", make=lambda: fn, path=path)]
    if has_cpp:
        impls.append(
            Impl(
                "perfml-cpp",
                make=lambda: fn,
                unavailable=_cpp_unavailable,
                context=lambda: _backend.force("cpp"),
                path=path,
            )
        )
    impls.append(
        Impl(
            "reference",
            make=lambda: fn,
            unavailable=_cpu_only,
            context=lambda: _backend.force("reference"),
            path=path,
        )
    )
    return tuple(impls)
