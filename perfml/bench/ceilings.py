"""The measured ceilings of the machine the benchmark runs on, in the same run as the cases:
device-to-device copy bandwidth (what a memory-bound kernel is judged against) and dense matmul
rate in bf16 and fp32 (for cases with a FLOP formula).

Copy: CUDA copies 1 GiB with `dst.copy_(src)` (far beyond L2; the CUDA timer also flushes L2
before each call). A CPU copies buffers of 4x its last-level cache (at least 64 MiB, at most
1 GiB each), so the copy streams from and to memory, and the ceiling is the best of a few
streaming copies (`copy_`, `torch.add(out=)`, numpy's copyto): on a small shared CPU a single
`copy_` is often not the fastest way through memory. A case whose minimum traffic fits in the
last-level cache runs from that cache on CPU (the CPU timer does not flush it) and may beat the
copy ceiling; the runner marks such rows cache-resident (see cache_bytes).

Matmul: CUDA multiplies 8192^3; CPU 1024^3 (512^3 with --quick) because CPU matmul, bf16
especially, is slow and a ceiling must not dominate the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from perfml._dtypes import torch_dtype
from perfml.bench.timing import Timer

MATMUL_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


_CACHE_ROOT = Path("/sys/devices/system/cpu/cpu0/cache")
_SUFFIX = {"K": 2**10, "M": 2**20, "G": 2**30}
CPU_COPY_MIN_BYTES = 64 * 2**20
CPU_COPY_MAX_BYTES = 2**30
CPU_COPY_UNKNOWN_CACHE_BYTES = 256 * 2**20


def _parse_size(text: str) -> int | None:
    text = text.strip().upper()
    if not text:
        return None
    scale = _SUFFIX.get(text[-1], 1)
    digits = text[:-1] if text[-1] in _SUFFIX else text
    return int(digits) * scale if digits.isdigit() else None


def cpu_cache_bytes(root: Path = _CACHE_ROOT) -> int | None:
    """The size of the CPU's last-level cache as the first CPU sees it (the largest data or
    unified cache in sysfs); None where sysfs does not say (not Linux, a sandbox)."""
    sizes = []
    try:
        for index in sorted(root.glob("index*")):
            if (index / "type").read_text().strip() not in ("Data", "Unified"):
                continue
            size = _parse_size((index / "size").read_text())
            if size:
                sizes.append(size)
    except OSError:
        return None
    return max(sizes) if sizes else None


def cache_bytes(device: torch.device) -> int | None:
    """The cache a case's data can stay in between timed calls: the CPU's last-level cache on
    CPU; None on CUDA, whose timer flushes L2 before each call."""
    return cpu_cache_bytes() if device.type == "cpu" else None


def cpu_copy_bytes(cache: int | None) -> int:
    """The size of each CPU copy buffer: 4x the last-level cache, within [64 MiB, 1 GiB]."""
    if cache is None:
        return CPU_COPY_UNKNOWN_CACHE_BYTES
    return min(CPU_COPY_MAX_BYTES, max(CPU_COPY_MIN_BYTES, 4 * cache))


def _copies(src: torch.Tensor, dst: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Ways to stream src into dst, each reading src once and writing dst once."""
    methods: dict[str, Callable[[], object]] = {"copy_": lambda: dst.copy_(src)}
    if src.device.type == "cpu":
        methods["add_out"] = lambda: torch.add(src, 0.0, out=dst)
        try:
            import numpy as np

            src_np, dst_np = src.numpy(), dst.numpy()
            methods["numpy"] = lambda: np.copyto(dst_np, src_np)
        except (ImportError, RuntimeError):  # torch built without numpy support
            pass
    return methods


def copy_ceiling(timer: Timer, device: torch.device, nbytes: int) -> tuple[float, str]:
    """(GB/s, method): the fastest of the streaming copies of an nbytes buffer, counting the
    read and the write (median call of each method)."""
    src = torch.empty(nbytes // 4, device=device)
    src.fill_(1.0)  # touch every page before timing
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * src.element_size()  # read once, written once
    rates = {
        name: moved / (timer.time(step).ms * 1e-3) / 1e9 for name, step in _copies(src, dst).items()
    }
    best = max(rates, key=rates.__getitem__)
    return rates[best], best


def copy_gbps(timer: Timer, device: torch.device, nbytes: int) -> float:
    return copy_ceiling(timer, device, nbytes)[0]


def matmul_tflops(timer: Timer, device: torch.device, n: int, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    ms = timer.time(lambda: torch.mm(a, b, out=c)).ms
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure_ceilings(
    timer: Timer, device: torch.device, quick: bool
) -> dict[str, float | str | None]:
    """{"copy_gbps", "copy_method", "copy_mib", "cache_mib", "matmul_bf16_tflops",
    "matmul_fp32_tflops", "matmul_n"}; a ceiling that cannot be measured on this machine is None
    rather than a guess. cache_mib: see cache_bytes (None on CUDA and where unknown)."""
    cache = cache_bytes(device)
    if device.type == "cuda":
        copy_bytes, n = 2**30, 8192
    else:
        copy_bytes, n = cpu_copy_bytes(cpu_cache_bytes()), 512 if quick else 1024
    gbps, method = copy_ceiling(timer, device, copy_bytes)
    out: dict[str, float | str | None] = {
        "copy_gbps": gbps,
        "copy_method": method,
        "copy_mib": copy_bytes / 2**20,
        "cache_mib": None if cache is None else cache / 2**20,
    }
    for name, dtype in MATMUL_DTYPES.items():
        try:
            out[f"matmul_{name}_tflops"] = matmul_tflops(timer, device, n, dtype)
        except RuntimeError:  # a dtype with no matmul kernel on this device
            out[f"matmul_{name}_tflops"] = None
    out["matmul_n"] = n
    return out


# --- peak FLOP/s, for the trainer's MFU ---------------------------------------------------

# dense bf16/fp16 tensor-core peaks from the datasheets (SXM parts)
_PEAK_TFLOPS = {
    "H200": 989.4,
    "H100": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from): the datasheet peak of a known GPU in bf16/fp16, else
    the dense matmul rate measured here in the training dtype (CPUs, other GPUs, fp32)."""
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        name = torch.cuda.get_device_name(device)
        for key, tflops in _PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name} datasheet"
    n = 2048 if device.type == "cuda" else 512
    # values from no generator: measuring must not move the RNG streams a resume restores
    a = torch.linspace(-1, 1, n * n, device=device, dtype=torch_dtype(precision)).reshape(n, n)
    b = a.T.contiguous()
    for _ in range(2):
        a @ b
    reps = 5
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = 2 * n**3 * reps / (time.perf_counter() - start)
    return rate, f"measured {n}^3 {precision} matmul"
