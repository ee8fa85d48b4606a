"""Compile every Triton kernel of perfml.optim for Hopper (sm_90a) on a machine without a GPU.

The optimizer tests run these kernels through Triton's interpreter, which accepts programs the
GPU compiler rejects and says nothing about registers. This script drives perfml.optim.AdamW and
AdamW8bit the way a user would, on CPU tensors, with every kernel launch recorded instead of run
and each distinct variant compiled by Triton's CUDA backend and ptxas: the machinery of
tests/gpu_compile_check.py (which does the same for perfml.ops), imported first so that it
clears TRITON_INTERPRET before triton loads. Every @triton.jit function of perfml.optim must be
launched or called by a launched kernel.

Output: a JSON report on stdout; exit 0 when everything compiled and fits an H100/H200, 1 when
not, 77 when this machine cannot compile for NVIDIA GPUs. Run from the repository root:
    .venv/bin/python -m tests.optim.triton_sm90_check
"""

from __future__ import annotations

import json
import sys

import torch

# before anything imports triton: it clears TRITON_INTERPRET and sets a private kernel cache
from tests import gpu_compile_check as gc

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    buf = torch.zeros(5001, dtype=dtype)
    params = [
        torch.nn.Parameter(torch.zeros(5000, dtype=dtype)),  # full chunks and a tail
        torch.nn.Parameter(torch.zeros(77, dtype=dtype)),  # under one chunk, fp32 8-bit state
        torch.nn.Parameter(buf[1:]),  # starts off 16 bytes: the ALIGNED=False variants
    ]
    for p in params:
        p.grad = torch.zeros_like(p)
    return params


def _steps(opt) -> None:
    opt.step()
    opt.step(grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0))


def run_calls() -> None:
    from perfml.optim import AdamW, AdamW8bit

    for dtype in DTYPES:
        for master in (False, True) if dtype != torch.float32 else (False,):
            _steps(AdamW(_params(dtype), backend="triton", master_weights=master))
        _steps(AdamW8bit(_params(dtype), backend="triton"))
    opt = AdamW(_params(torch.float32), lr=torch.tensor(1e-3), maximize=True, backend="triton")
    opt.step()


def main() -> int:
    reason = gc.nvidia_unavailable()
    if reason is not None:
        print(json.dumps({"unavailable": reason}))
        return gc.UNAVAILABLE
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    import perfml.optim

    target = GPUTarget("cuda", gc.SM, 32)
    recorder = gc.Recorder(make_backend(target))
    defined, module_errors = gc.defined_kernels(perfml.optim)
    with gc.recording(recorder):
        run_calls()
    results = gc.compile_all(list(recorder.variants.values()), target)
    covered = gc.reached(recorder.launched)
    problems = [f"cannot import {e['module']}: {e['error']}" for e in module_errors]
    problems += [f"never compiled: {name}" for name, fn in defined.items() if fn not in covered]
    problems += gc._variant_problems(results)
    if not results:
        problems.append("no kernel was launched")
    print(json.dumps({"variants": results, "problems": problems}, default=str))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
