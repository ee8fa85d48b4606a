"""Which implementation of an op runs, decided once per call at the op boundary.

Paths:
  triton     the Triton kernels: CUDA tensors, or CPU tensors in interpret mode
             (TRITON_INTERPRET=1 set before triton is imported: how CI tests kernel code)
  cpp        the C++ CPU kernels of the optional extension perfml._C (CPU tensors, outside
             interpret mode, when the extension was built)
  aten       the fastest composite of ATen ops with the op's semantics (F.layer_norm,
             torch.softmax, ...), autograd by ATen: what `auto` runs on CPU outside interpret
             mode for an op without a C++ kernel (or when the extension is not built), and where
             no other path exists (CUDA without triton, other devices)
  reference  the plain-PyTorch `<op>_ref` functions: the definition of correct, written for
             clarity, not speed; only when asked for, never the default

PERFML_BACKEND=auto|triton|cpp|aten|reference forces a path for every op (auto is the default);
`force()` does the same for a block of code (tests and benchmarks use it). When a path that
was not asked for explicitly is unavailable, the next one is taken and the reason is logged
once; when it was asked for explicitly, the call fails with the reason.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Iterator

import torch

log = logging.getLogger("perfml")

BACKENDS = ("auto", "triton", "cpp", "aten", "reference")

_local = threading.local()
_said: set[str] = set()


def say_once(key: str, message: str) -> None:
    """Log `message` at WARNING level the first time `key` is seen in this process."""
    if key not in _said:
        _said.add(key)
        log.warning(message)


def checks_enabled() -> bool:
    """Whether CUDA calls run their device-side input checks (index ranges: cross-entropy
    targets, rope position_ids). PERFML_CHECKS=0 turns them off; CPU inputs are always checked."""
    return os.environ.get("PERFML_CHECKS", "1").strip() != "0"


def interpret_mode() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_setting() -> str:
    """The requested path: force() wins over PERFML_BACKEND; validated."""
    forced = getattr(_local, "forced", None)
    if forced is not None:
        return forced
    value = os.environ.get("PERFML_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"PERFML_BACKEND={value!r} is not one of {', '.join(BACKENDS)}")
    return value


@contextlib.contextmanager
def force(backend: str) -> Iterator[None]:
    """Run the enclosed block with every op on `backend` (one of BACKENDS)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    previous = getattr(_local, "forced", None)
    _local.forced = backend
    try:
        yield
    finally:
        _local.forced = previous


# --- Triton ----------------------------------------------------------------------------------


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"{type(exc).__name__}: {exc}"
    if interpret_mode():
        _round_bf16_to_nearest_even_in_interpreter()
    return None


def _round_bf16_to_nearest_even_in_interpreter() -> None:
    """Make the Triton interpreter round fp32 -> bf16 to nearest even, as the GPU does.

    Triton 3.6's interpreter truncates on `.to(tl.bfloat16)` (and its "rtne" mode rounds half
    up, ignoring ties and mantissa carries), so bf16 kernels on CPU would be up to one ulp off
    what the same kernel gives on a GPU, and the tolerance tests would measure the interpreter
    rather than the kernel. Other conversions keep the interpreter's own code.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float
    if getattr(original, "_perfml_rtne", False):
        return

    def convert(input, input_dtype, output_dtype, rounding_mode):
        rtz = rounding_mode is not None and "RTZ" in str(rounding_mode)
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and not rtz:
            bits = np.ascontiguousarray(input).view(np.uint32)
            rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
            quiet_nan = (bits >> 16) | 0x0040  # keep NaN a NaN even if its payload is low
            out = np.where(np.isnan(input.view(np.float32)), quiet_nan, rounded)
            return out.astype(np.uint16).reshape(input.shape)
        return original(input, input_dtype, output_dtype, rounding_mode)

    convert._perfml_rtne = True
    interpreter._convert_float = convert


def has_triton() -> bool:
    return _triton_import_error() is None


# --- the C++/CUDA extension ------------------------------------------------------------------


@functools.cache
def _load_extension():
    try:
        from perfml import _C
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return _C, None


def extension():
    """The compiled module perfml._C, or None (extension_error() says why)."""
    return _load_extension()[0]


def extension_error() -> str | None:
    """Why perfml._C could not be imported (the kept ImportError), or None when it loaded."""
    return _load_extension()[1]


def has_extension() -> bool:
    return extension() is not None


# --- capabilities ----------------------------------------------------------------------------


def cuda_capability(device: torch.device | int | None = None) -> tuple[int, int] | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def is_sm_at_least(major: int, minor: int = 0, device: torch.device | int | None = None) -> bool:
    cap = cuda_capability(device)
    return cap is not None and cap >= (major, minor)


def is_sm_at_least_80(device: torch.device | int | None = None) -> bool:
    return is_sm_at_least(8, 0, device)


def is_sm_at_least_89(device: torch.device | int | None = None) -> bool:
    return is_sm_at_least(8, 9, device)


def is_sm_at_least_90(device: torch.device | int | None = None) -> bool:
    return is_sm_at_least(9, 0, device)


# --- the decision ----------------------------------------------------------------------------


def select(op: str, device: torch.device, *, has_cpp: bool = False) -> str:
    """The path that runs `op` for tensors on `device`: "triton", "cpp", "aten" or "reference".

    `has_cpp` says whether the op has a C++ CPU kernel in perfml._C. "reference" comes back only
    when it was asked for; "aten" runs on any device.
    """
    setting = backend_setting()
    if setting in ("reference", "aten"):
        return setting
    if device.type == "cuda":
        if setting == "cpp":
            raise RuntimeError(f"perfml.{op}: PERFML_BACKEND=cpp runs CPU tensors only")
        if has_triton():
            return "triton"
        reason = f"triton is not importable ({_triton_import_error()})"
        if setting == "triton":
            raise RuntimeError(f"perfml.{op}: the triton backend was requested but {reason}")
        say_once(f"no-triton-{op}", f"perfml.{op}: {reason}; using the aten path")
        return "aten"
    if device.type != "cpu":
        if setting != "auto":
            raise RuntimeError(f"perfml.{op}: no {setting} path for {device.type} tensors")
        return "aten"
    # CPU tensors.
    if setting == "triton" or (setting == "auto" and interpret_mode()):
        if not interpret_mode():
            raise RuntimeError(
                f"perfml.{op}: the triton backend runs CPU tensors only in interpret mode; "
                "set TRITON_INTERPRET=1 before triton is imported"
            )
        if has_triton():
            return "triton"
        reason = f"triton is not importable ({_triton_import_error()})"
        if setting == "triton":
            raise RuntimeError(f"perfml.{op}: the triton backend was requested but {reason}")
        say_once(f"no-triton-{op}", f"perfml.{op}: {reason}; using the aten path")
        return "aten"
    if not has_cpp:
        if setting == "cpp":
            raise RuntimeError(
                f"perfml.{op}: PERFML_BACKEND=cpp, but this op has no C++ CPU kernel; for it use "
                "PERFML_BACKEND=auto (the default), aten or reference, or triton in interpret "
                "mode (TRITON_INTERPRET=1)"
            )
        return "aten"
    if has_extension():
        return "cpp"
    reason = f"the extension perfml._C is not available ({extension_error()})"
    if setting == "cpp":
        raise RuntimeError(f"perfml.{op}: the cpp backend was requested but {reason}")
    say_once("no-extension", f"perfml: {reason}; CPU ops use the aten path")
    return "aten"
