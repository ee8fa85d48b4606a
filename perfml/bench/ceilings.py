"""The measured ceilings of the machine the benchmark runs on, in the same run as the cases:
device-to-device copy bandwidth (what a memory-bound kernel is judged against) and dense matmul
rate in bf16 and fp32 (for cases with a FLOP formula).

Sizes: CUDA copies 1 GiB (far beyond L2) and multiplies 8192^3; CPU copies 64 MiB (32 MiB with
--quick), beyond the last-level cache of most machines, and multiplies 1024^3 (512^3 with --quick)
because CPU matmul, bf16 especially, is slow and a ceiling must not dominate the run.
"""

from __future__ import annotations

import time

import torch

from perfml._dtypes import torch_dtype
from perfml.bench.timing import Timer

MATMUL_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def copy_gbps(timer: Timer, device: torch.device, nbytes: int) -> float:
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = timer.time(lambda: dst.copy_(src)).ms
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9  # read once, written once


def matmul_tflops(timer: Timer, device: torch.device, n: int, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    ms = timer.time(lambda: torch.mm(a, b, out=c)).ms
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure_ceilings(timer: Timer, device: torch.device, quick: bool) -> dict[str, float | None]:
    """{"copy_gbps", "matmul_bf16_tflops", "matmul_fp32_tflops", "matmul_n"}; a ceiling that
    cannot be measured on this machine is None rather than a guess."""
    if device.type == "cuda":
        copy_bytes, n = 2**30, 8192
    else:
        copy_bytes, n = (32 if quick else 64) * 2**20, 512 if quick else 1024
    out: dict[str, float | None] = {"copy_gbps": copy_gbps(timer, device, copy_bytes)}
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
