"""Launch-config sweep of perfml's Triton kernels: the data to set their heuristics from.

    python -m perfml.bench.autotune --out tune.json [--budget-s 90] [--device cuda]
    python -m perfml.bench.autotune --out tune.json --dry-run   # tiny shapes, interpret mode

For each kernel at its headline shape (the bench cases' CUDA quick shape where there is one) the
tuner runs the launcher once under `capture()` to learn what its heuristic picks, times that, then
times a small grid around it (block sizes halved and doubled, num_warps in {2, 4, 8, 16},
num_stages in {1, 2, 3, 4} where the kernel pipelines) through `override()`. Every candidate's
output is compared with the heuristic's (max |diff| / max |reference| within the dtype's
tolerance); a candidate that the launcher rejects, that fails to compile or to run, or that
gives another result is recorded with that status and never chosen.

Timing: CUDA events around each call, after warm-up, the median of the repetitions, with a
256 MiB buffer written before every repetition so that each starts with L2 flushed (the bench
harness's CudaTimer). The time includes the launcher's host work (a few microseconds), the same
for every candidate. The budget is shared out over the kernels left: each gets the time that
remains divided by the number of kernels still to tune, and candidates past that share are
recorded as skipped. Progress goes to stderr, one line per kernel.

tune.json: {"device", "torch", "triton", "date", "mode", "budget_s", "timing", "kernels": [...]},
each kernel {"id", "kernel", "shape", "dtype", "heuristic": {"config", "ms", "gb_s"},
"candidates": [{"config", "status", "ms", "gb_s", "error"}], "best": {"config", "ms", "gb_s",
"speedup"}, "note"}; gb_s only for the memory-bound kernels (minimum traffic / time).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from perfml._kernel_config import capture, override

WARPS = (2, 4, 8, 16)
STAGES = (1, 2, 3, 4)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}

Step = Callable[[], Any]


@dataclass(frozen=True)
class KernelSpec:
    """One kernel to tune.

    setup(shape, dtype, device) -> step: builds the inputs once and returns a function that runs
        the launcher and returns its output tensors (compared across candidates).
    bytes(shape, dtype) -> minimum traffic of one step, for memory-bound kernels (None: no GB/s).
    vary: the block keys to halve and double around the heuristic's pick (those the launcher
        lets change at this shape: a block that must cover a row is not listed).
    extra: further candidates tried as given (after the grid).
    """

    id: str
    kernel: str
    shape: tuple[int, ...]
    tiny: tuple[int, ...]
    dtype: torch.dtype
    setup: Callable[[tuple[int, ...], torch.dtype, torch.device], Step]
    bytes: Callable[[tuple[int, ...], torch.dtype], int] | None = None
    vary: tuple[str, ...] = ()
    pipelines: bool = False
    extra: tuple[dict[str, Any], ...] = field(default_factory=tuple)


def candidates(spec: KernelSpec, picked: dict[str, Any]) -> list[dict[str, Any]]:
    """The overrides to try: num_warps first (at the picked blocks), then each varied block
    halved and doubled with every num_warps, then num_stages, then spec.extra; no duplicates
    and never the heuristic's own config."""
    out: list[dict[str, Any]] = []
    seen = {tuple(sorted(picked.items()))}

    def add(config: dict[str, Any]) -> None:
        key = tuple(sorted({**picked, **config}.items()))
        if key not in seen:
            seen.add(key)
            out.append(config)

    for warps in WARPS:
        add({"num_warps": warps})
    for key in spec.vary:
        value = picked[key]
        for scaled, warps in itertools.product((value // 2, value * 2), WARPS):
            if scaled >= 1:
                add({key: scaled, "num_warps": warps})
    if spec.pipelines:
        for stages in STAGES:
            add({"num_stages": stages})
    for config in spec.extra:
        add(dict(config))
    return out


# --- the kernels ------------------------------------------------------------------------------


def _rand(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.randn(*shape, device=device).to(dtype)


def _rows_bytes(reads: int, writes: int) -> Callable[[tuple[int, ...], torch.dtype], int]:
    def count(shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return (reads + writes) * math.prod(shape) * dtype.itemsize

    return count


def _rms_norm_fwd(shape, dtype, device):
    from perfml.ops.rms_norm import _rms_norm_fwd_triton

    x, w = _rand(shape, dtype, device), _rand(shape[-1:], dtype, device)
    return lambda: _rms_norm_fwd_triton(x, w, 1e-6, 0.0, 0)


def _rms_norm_bwd(shape, dtype, device):
    from perfml.ops.rms_norm import _rms_norm_bwd_triton, _rms_norm_fwd_triton

    x, w, dy = (
        _rand(shape, dtype, device),
        _rand(shape[-1:], dtype, device),
        _rand(shape, dtype, device),
    )
    _, rstd = _rms_norm_fwd_triton(x, w, 1e-6, 0.0, 0)
    return lambda: _rms_norm_bwd_triton(dy, x, w, rstd, 0.0, True)


def _add_rms_norm_fwd(shape, dtype, device):
    from perfml.ops.add_rms_norm import _add_rms_norm_fwd_triton

    x, r, w = (
        _rand(shape, dtype, device),
        _rand(shape, dtype, device),
        _rand(shape[-1:], dtype, device),
    )
    return lambda: _add_rms_norm_fwd_triton(x, r, w, 1e-6)


def _add_rms_norm_bwd(shape, dtype, device):
    from perfml.ops.add_rms_norm import _add_rms_norm_bwd_triton, _add_rms_norm_fwd_triton

    x, r, w = (
        _rand(shape, dtype, device),
        _rand(shape, dtype, device),
        _rand(shape[-1:], dtype, device),
    )
    dy, ds = _rand(shape, dtype, device), _rand(shape, dtype, device)
    _, s, rstd = _add_rms_norm_fwd_triton(x, r, w, 1e-6)
    return lambda: _add_rms_norm_bwd_triton(dy, ds, s, w, rstd, True)


def _layer_norm_fwd(shape, dtype, device):
    from perfml.ops.layer_norm import _layer_norm_fwd_triton

    x, w, b = (
        _rand(shape, dtype, device),
        _rand(shape[-1:], dtype, device),
        _rand(shape[-1:], dtype, device),
    )
    return lambda: _layer_norm_fwd_triton(x, w, b, 1e-5)


def _layer_norm_bwd(shape, dtype, device):
    from perfml.ops.layer_norm import _layer_norm_bwd_triton, _layer_norm_fwd_triton

    x, w, b = (
        _rand(shape, dtype, device),
        _rand(shape[-1:], dtype, device),
        _rand(shape[-1:], dtype, device),
    )
    dy = _rand(shape, dtype, device)
    _, mean, rstd = _layer_norm_fwd_triton(x, w, b, 1e-5)
    return lambda: _layer_norm_bwd_triton(dy, x, w, b, mean, rstd, True, True)


def _softmax_fwd(shape, dtype, device):
    from perfml.ops.softmax import _softmax_fwd_triton

    x = _rand(shape, dtype, device)
    return lambda: _softmax_fwd_triton(x)


def _softmax_bwd(shape, dtype, device):
    from perfml.ops.softmax import _softmax_bwd_triton, _softmax_fwd_triton

    x, dy = _rand(shape, dtype, device), _rand(shape, dtype, device)
    y = _softmax_fwd_triton(x)
    return lambda: _softmax_bwd_triton(dy, y)


def _cross_entropy_fwd(shape, dtype, device):
    from perfml.ops.cross_entropy import _ce_rows_triton

    n, v = shape
    x = _rand(shape, dtype, device)
    t = torch.randint(0, v, (n,), device=device)
    scale = torch.full((1,), 1.0 / n, device=device)

    def step():
        loss = torch.empty(n, dtype=torch.float32, device=device)
        grad = torch.empty_like(x)
        _ce_rows_triton(x, t, loss, grad, scale, -100, 0.0, 0.0, None)
        return loss, grad

    return step


def _cross_entropy_scale(shape, dtype, device):
    from perfml.ops.cross_entropy import _launch_scale

    src = _rand(shape, dtype, device)
    dst = torch.empty_like(src)
    s = torch.full((1,), 0.5, device=device)

    def step():
        _launch_scale(src, dst, s, False)
        return dst

    return step


def _glu_fwd(shape, dtype, device):
    from perfml.ops.swiglu import _glu_fwd_triton

    gate, up = _rand(shape, dtype, device), _rand(shape, dtype, device)
    return lambda: _glu_fwd_triton(gate, up, 0)


def _glu_bwd(shape, dtype, device):
    from perfml.ops.swiglu import _glu_bwd_triton

    gate, up, dy = (_rand(shape, dtype, device) for _ in range(3))
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)

    def step():
        _glu_bwd_triton(dy, gate, up, dgate, dup, 0, True, True)
        return dgate, dup

    return step


def _rope_inputs(shape, dtype, device):
    b, hq, hk, t, d = shape
    q, k = _rand((b, hq, t, d), dtype, device), _rand((b, hk, t, d), dtype, device)
    angle = torch.rand(t, d // 2, device=device) * 6.0
    emb = torch.cat((angle, angle), dim=-1)
    cos = emb.cos().to(dtype).expand(b, t, d)
    sin = emb.sin().to(dtype).expand(b, t, d)
    return q, k, cos, sin


def _rope(shape, dtype, device):
    from perfml.ops.rope import _rope_triton

    q, k, cos, sin = _rope_inputs(shape, dtype, device)
    return lambda: _rope_triton(q, k, cos, sin, None, 1, False)


def _rope_bytes(shape, dtype):
    b, hq, hk, t, d = shape
    return (2 * b * (hq + hk) * t * d + 2 * t * d) * dtype.itemsize


def _decode(shape, dtype, device):
    from perfml.ops.decode_attention import _decode_attention_triton

    b, hq, hkv, length, d = shape
    q = _rand((b, hq, 1, d), dtype, device)
    k, v = _rand((b, hkv, 1, d), dtype, device), _rand((b, hkv, 1, d), dtype, device)
    k_cache, v_cache = (
        _rand((b, hkv, length, d), dtype, device),
        _rand((b, hkv, length, d), dtype, device),
    )
    position = torch.tensor(length - 1, device=device)
    return lambda: _decode_attention_triton(q, k, v, k_cache, v_cache, position, d**-0.5)


def _decode_bytes(shape, dtype):
    b, hq, hkv, length, d = shape
    return (2 * b * hkv * length * d + 2 * b * hq * d) * dtype.itemsize


def _wq(group: int | None):
    def setup(shape, dtype, device):
        from perfml.quant.kernels import _launch, pack_int4

        m, n, k = shape
        x = _rand((m, k), dtype, device)
        if group is None:
            w = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8)
            s = torch.rand(n, device=device).to(dtype) * 0.01
            return lambda: _launch(x, w, s, None, n, None)
        w = pack_int4(torch.randint(0, 16, (n, k), device=device))
        s = torch.rand(n, k // group, device=device).to(dtype) * 0.01
        z = torch.full((n, k // group), 8.0, device=device).to(dtype)
        return lambda: _launch(x, w, s, z, n, group)

    return setup


def _wq_bytes(group: int | None):
    def count(shape, dtype):
        m, n, k = shape
        weight = n * k if group is None else n * k // 2 + 2 * n * (k // group) * dtype.itemsize
        return weight + (m * k + m * n) * dtype.itemsize

    return count


BF16 = torch.bfloat16
# Headline shapes: the bench cases' CUDA quick shapes (rms_norm, add_rms_norm, layer_norm 16384 x
# 4096; softmax 4096 x 131072; cross_entropy 8192 x 128256; swiglu 16384 x 8192; rope
# 4 x 32 x 8 x 4096 x 128; quant_matmul 1 x 4096 x 4096 and 16 x 14336 x 4096); decode attention
# has no case of its own: Llama-3-8B's heads at batch 16 and 4096 cached slots. softmax's one-tile
# kernels take a 16384 x 4096 shape (the headline's rows are too wide for them).
ROWS, TINY_ROWS = (16384, 4096), (8, 64)
DECODE, TINY_DECODE = (16, 32, 8, 4096, 128), (1, 4, 2, 256, 16)


def _spec(id: str, shape, tiny, setup, nbytes=None, kernel: str | None = None, **kw) -> KernelSpec:
    return KernelSpec(id, kernel or id, shape, tiny, BF16, setup, nbytes, **kw)


KERNELS: tuple[KernelSpec, ...] = (
    _spec("rms_norm_fwd", ROWS, TINY_ROWS, _rms_norm_fwd, _rows_bytes(1, 1)),
    _spec("rms_norm_bwd", ROWS, TINY_ROWS, _rms_norm_bwd, _rows_bytes(2, 1)),
    _spec("add_rms_norm_fwd", ROWS, TINY_ROWS, _add_rms_norm_fwd, _rows_bytes(2, 2),
          vary=("BLOCK_M",)),
    _spec("add_rms_norm_bwd", ROWS, TINY_ROWS, _add_rms_norm_bwd, _rows_bytes(3, 1)),
    _spec("layer_norm_fwd", ROWS, TINY_ROWS, _layer_norm_fwd, _rows_bytes(1, 1), vary=("BLOCK_M",)),
    _spec("layer_norm_bwd", ROWS, TINY_ROWS, _layer_norm_bwd, _rows_bytes(2, 1)),
    _spec("softmax_fwd_loop", (4096, 131072), (4, 40000), _softmax_fwd, _rows_bytes(1, 1),
          vary=("BLOCK_N",)),
    _spec("softmax_bwd_loop", (4096, 131072), (4, 20000), _softmax_bwd, _rows_bytes(2, 1),
          vary=("BLOCK_N",)),
    _spec("softmax_fwd_tile", ROWS, TINY_ROWS, _softmax_fwd, _rows_bytes(1, 1), vary=("BLOCK_M",)),
    _spec("softmax_bwd_tile", ROWS, TINY_ROWS, _softmax_bwd, _rows_bytes(2, 1), vary=("BLOCK_M",)),
    _spec("cross_entropy_fwd", (8192, 128256), (4, 300), _cross_entropy_fwd, _rows_bytes(1, 1),
          vary=("BLOCK_V",)),
    _spec("cross_entropy_scale", (8192, 128256), (4, 300), _cross_entropy_scale,
          _rows_bytes(1, 1), vary=("BLOCK",)),
    _spec("glu_fwd", (16384, 8192), TINY_ROWS, _glu_fwd, _rows_bytes(2, 1),
          vary=("BLOCK_M", "BLOCK_N")),
    _spec("glu_bwd", (16384, 8192), TINY_ROWS, _glu_bwd, _rows_bytes(3, 2),
          vary=("BLOCK_M", "BLOCK_N")),
    _spec("rope", (4, 32, 8, 4096, 128), (1, 4, 2, 8, 16), _rope, _rope_bytes,
          vary=("BLOCK_T", "BLOCK_HQ")),
    _spec("decode_attention_fwd", DECODE, TINY_DECODE, _decode, _decode_bytes, vary=("BLOCK_L",),
          pipelines=True),
    _spec("decode_attention_combine", DECODE, TINY_DECODE, _decode),
    _spec("wq_gemv_int8", (1, 4096, 4096), (1, 64, 512), _wq(None), _wq_bytes(None),
          kernel="wq_gemv", vary=("BLOCK_N", "BLOCK_K"), pipelines=True),
    _spec("wq_gemv_int4", (1, 4096, 4096), (1, 64, 256), _wq(128), _wq_bytes(128),
          kernel="wq_gemv", vary=("BLOCK_N",), pipelines=True),
    _spec("wq_gemv_reduce", (1, 4096, 4096), (1, 64, 512), _wq(None), vary=("BLOCK",)),
    _spec("wq_mm_int8", (16, 14336, 4096), (16, 32, 64), _wq(None), kernel="wq_mm",
          vary=("BLOCK_N", "BLOCK_K"), pipelines=True),
    _spec("wq_mm_int4", (16, 14336, 4096), (16, 32, 128), _wq(128), kernel="wq_mm",
          vary=("BLOCK_N",), pipelines=True),
)  # fmt: skip


# --- measuring -------------------------------------------------------------------------------


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def _mismatch(out: Any, reference: list[Tensor], dtype: torch.dtype) -> str | None:
    """None when `out` matches `reference` within the dtype's tolerance, else what differs."""
    got = _tensors(out)
    if len(got) != len(reference):
        return f"{len(got)} outputs, the heuristic's config gave {len(reference)}"
    tol = TOLERANCE.get(dtype, 1e-4)
    for i, (a, b) in enumerate(zip(got, reference, strict=True)):
        if a.shape != b.shape:
            return f"output {i}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        a, b = a.double(), b.double()
        if not torch.equal(a.isnan(), b.isnan()):
            return f"output {i}: NaN where the heuristic's config gave none (or the reverse)"
        a, b = a.nan_to_num(), b.nan_to_num()
        scale = max(b.abs().max().item(), 1e-30) if b.numel() else 1.0
        err = (a - b).abs().max().item() / scale if b.numel() else 0.0
        if err > tol:
            return f"output {i}: max |diff| / max |ref| = {err:.3g} > {tol:g}"
    return None


def _copy(out: Any) -> list[Tensor]:
    return [t.detach().clone() for t in _tensors(out)]


def _timer(device: torch.device):
    from perfml.bench.timing import CpuTimer, CudaTimer

    if device.type == "cuda":
        return CudaTimer(device, rep_ms=20.0, warmup_ms=5.0, min_reps=5, max_reps=200)
    return CpuTimer(0.0, min_reps=1, max_reps=1)  # dry run: one interpreted call proves the path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gb_s(spec: KernelSpec, shape: tuple[int, ...], ms: float | None) -> float | None:
    if spec.bytes is None or not ms:
        return None
    return float(f"{spec.bytes(shape, spec.dtype) / (ms * 1e-3) / 1e9:.4g}")


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def tune_kernel(
    spec: KernelSpec, device: torch.device, shape: tuple[int, ...], deadline: float
) -> dict[str, Any]:
    """Time the heuristic's config and the candidates around it until `deadline` (monotonic)."""
    entry: dict[str, Any] = {
        "id": spec.id,
        "kernel": spec.kernel,
        "shape": list(shape),
        "dtype": str(spec.dtype).removeprefix("torch."),
        "heuristic": None,
        "candidates": [],
        "best": None,
        "note": "",
    }
    timer = _timer(device)
    step = spec.setup(shape, spec.dtype, device)
    with capture() as record:
        reference = _copy(step())
    _sync(device)
    if spec.kernel not in record:
        entry["note"] = f"the launcher did not launch {spec.kernel} at this shape"
        return entry
    picked = record[spec.kernel]
    base_ms = timer.time(step).ms
    entry["heuristic"] = {
        "config": picked,
        "ms": round(base_ms, 5),
        "gb_s": _gb_s(spec, shape, base_ms),
    }
    best = (base_ms, picked)
    for config in candidates(spec, picked):
        result: dict[str, Any] = {"config": {**picked, **config}, "status": "", "ms": None}
        entry["candidates"].append(result)
        if time.monotonic() >= deadline:
            result["status"] = "skipped"
            continue
        try:
            with override(spec.kernel, **config):
                out = step()
                _sync(device)
                wrong = _mismatch(out, reference, spec.dtype)
                if wrong is not None:
                    result["status"] = "wrong"
                    result["error"] = wrong
                    continue
                ms = timer.time(step).ms
        except (ValueError, KeyError) as e:
            result["status"] = "invalid" if "override of kernel" in str(e) else "failed"
            result["error"] = _short(e)
            continue
        except Exception as e:  # compile errors, out of resources, launch failures
            result["status"] = "failed"
            result["error"] = _short(e)
            _sync_quietly(device)
            continue
        result["status"] = "ok"
        result["ms"] = round(ms, 5)
        result["gb_s"] = _gb_s(spec, shape, ms)
        if ms < best[0]:
            best = (ms, result["config"])
    skipped = sum(c["status"] == "skipped" for c in entry["candidates"])
    if skipped:
        entry["note"] = f"{skipped} candidates skipped: the time budget was spent"
    entry["best"] = {
        "config": best[1],
        "ms": round(best[0], 5),
        "gb_s": _gb_s(spec, shape, best[0]),
        "speedup": round(base_ms / best[0], 3) if best[0] > 0 else None,
    }
    return entry


def _sync_quietly(device: torch.device) -> None:
    try:
        _sync(device)
    except Exception:  # a failed launch can leave an error on the stream; the next check sees it
        pass


def tune(
    specs: Sequence[KernelSpec],
    device: torch.device,
    budget_s: float,
    dry_run: bool = False,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Tune `specs` on `device` within about `budget_s` seconds; the tune.json document.
    `checkpoint` gets the document so far after each kernel (so a killed run still leaves one)."""
    import triton

    start = time.monotonic()
    stop = start + budget_s
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else "cpu (interpret)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "dry-run (tiny shapes, Triton interpret mode; times mean nothing)"
        if dry_run
        else "headline shapes",
        "budget_s": budget_s,
        "timing": "CUDA events, warm-up then the median of the repetitions, L2 flushed before "
        "each (a 256 MiB buffer written); launcher host work included"
        if device.type == "cuda"
        else "one call timed with perf_counter",
        "kernels": [],
    }
    for i, spec in enumerate(specs):
        now = time.monotonic()
        shape = spec.tiny if dry_run else spec.shape
        if now >= stop:
            result["kernels"].append(
                {"id": spec.id, "kernel": spec.kernel, "shape": list(shape),
                 "note": "skipped: the time budget was spent"}
            )  # fmt: skip
            log(f"[tune] {spec.id}: skipped (budget spent)")
            continue
        deadline = now + (stop - now) / (len(specs) - i)
        try:
            entry = tune_kernel(spec, device, shape, deadline)
        except Exception as e:  # the heuristic's own config failed: worth knowing, not fatal
            entry = {"id": spec.id, "kernel": spec.kernel, "shape": list(shape),
                     "note": f"the heuristic's config failed: {_short(e)}"}  # fmt: skip
            _sync_quietly(device)
        result["kernels"].append(entry)
        log(_summary(entry, time.monotonic() - now))
        if checkpoint is not None:
            result["elapsed_s"] = round(time.monotonic() - start, 1)
            checkpoint(result)
    result["elapsed_s"] = round(time.monotonic() - start, 1)
    return result


def _summary(entry: dict[str, Any], seconds: float) -> str:
    best, base = entry.get("best"), entry.get("heuristic")
    if not best or not base:
        return f"[tune] {entry['id']}: {entry.get('note', '')} ({seconds:.1f} s)"
    statuses = [c["status"] for c in entry["candidates"]]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in sorted(set(statuses)))
    return (
        f"[tune] {entry['id']} {entry['shape']}: heuristic {base['ms']:.4f} ms, best "
        f"{best['ms']:.4f} ms (x{best['speedup']}) {best['config']}; {counts} ({seconds:.1f} s)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perfml.bench.autotune", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write tune.json")
    parser.add_argument("--budget-s", type=float, default=90.0, help="total seconds (default 90)")
    parser.add_argument("--device", default="cuda", help="the CUDA device (default cuda)")
    parser.add_argument("--kernels", default="", help="comma-separated ids (default: all)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny shapes in Triton interpret mode on CPU: tests the code path, times mean nothing",
    )
    args = parser.parse_args(argv)
    specs = list(KERNELS)
    if args.kernels:
        wanted = [k.strip() for k in args.kernels.split(",") if k.strip()]
        unknown = sorted(set(wanted) - {s.id for s in KERNELS})
        if unknown:
            print(f"autotune: unknown kernel ids {unknown}; known: {[s.id for s in KERNELS]}",
                  file=sys.stderr)  # fmt: skip
            return 2
        specs = [s for s in KERNELS if s.id in wanted]
    if args.dry_run:
        from perfml import _backend

        if "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
        elif not _backend.interpret_mode():
            print("autotune: --dry-run needs TRITON_INTERPRET=1 set before triton is imported",
                  file=sys.stderr)  # fmt: skip
            return 2
        device = torch.device("cpu")
    else:
        device = torch.device(args.device)
        if device.type != "cuda" or not torch.cuda.is_available():
            print(
                f"autotune: needs a CUDA GPU (device {args.device!r}, CUDA available: "
                f"{torch.cuda.is_available()}); --dry-run runs tiny shapes in interpret mode",
                file=sys.stderr,
            )
            return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(doc: dict[str, Any]) -> None:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")

    result = tune(specs, device, args.budget_s, dry_run=args.dry_run, checkpoint=write)
    write(result)
    print(f"[tune] wrote {args.out} ({len(result['kernels'])} kernels, {result['elapsed_s']} s)",
          file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
