"""Numbers out of a torch.profiler run: step times, the compute / memory / idle split, the top
kernels (CUDA) or ops (CPU), and the memory timeline. Inputs are the Chrome trace the profiler
wrote (its documented JSON: "X" events with ts/dur in microseconds, "[memory]" instant events)
and the profiler's aggregated FunctionEvents.

The time split, defined from the trace of the profiled (active) steps:
  CUDA  window  from the start of the first profiled step to the end of the last step or the
                last GPU activity, whichever is later
        compute time covered by at least one kernel
        memory  time covered by memcpy / memset activity and no kernel (copies overlapped by
                a kernel count as compute: the GPU was computing)
        idle    the rest of the window: no kernel and no copy on the GPU (launch gaps, host
                syncs, Python, data loading)
  CPU   window  the sum of the profiled steps' wall times
        memory  time inside top-level ops that only move or allocate bytes (copy_, to,
                contiguous, clone, cat, empty, zeros, fill_, ...: MEMORY_OPS)
        compute time inside any other top-level op (an op not nested in another op; the
                union over threads)
        idle    the rest: Python between ops, the profiler's own step bookkeeping
A memory-BOUND kernel (a norm, an elementwise op) is compute time here: this split says what
the device was doing, the roofline says how close each kernel came to the memory bandwidth.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MEMORY_OPS = frozenset(
    {
        "aten::copy_",
        "aten::to",
        "aten::_to_copy",
        "aten::contiguous",
        "aten::clone",
        "aten::cat",
        "aten::stack",
        "aten::empty",
        "aten::empty_like",
        "aten::empty_strided",
        "aten::new_empty",
        "aten::new_empty_strided",
        "aten::zeros",
        "aten::zeros_like",
        "aten::new_zeros",
        "aten::ones",
        "aten::ones_like",
        "aten::full",
        "aten::fill_",
        "aten::zero_",
        "aten::resize_",
    }
)
_DEVICE_COPY = ("gpu_memcpy", "gpu_memset")


def load_trace(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _events(trace: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in trace.get("traceEvents", []) if isinstance(e, dict)]


def step_windows(trace: dict[str, Any]) -> list[tuple[float, float]]:
    """(start, end) in microseconds of each profiled step (the ProfilerStep#N annotations)."""
    steps = [
        (e["ts"], e["ts"] + e["dur"])
        for e in _events(trace)
        if e.get("ph") == "X"
        and e.get("cat") == "user_annotation"
        and str(e.get("name", "")).startswith("ProfilerStep#")
    ]
    return sorted(steps)


def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _length(intervals: Sequence[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _clip(intervals: Iterable[tuple[float, float]], windows: Sequence[tuple[float, float]]):
    for a, b in intervals:
        for wa, wb in windows:
            lo, hi = max(a, wa), min(b, wb)
            if hi > lo:
                yield (lo, hi)


def _subtract(
    intervals: Sequence[tuple[float, float]], cut: Sequence[tuple[float, float]]
) -> list[tuple[float, float]]:
    """intervals minus cut (both unions of disjoint intervals)."""
    out = []
    for a, b in intervals:
        start = a
        for ca, cb in cut:
            if cb <= start or ca >= b:
                continue
            if ca > start:
                out.append((start, ca))
            start = max(start, cb)
        if start < b:
            out.append((start, b))
    return out


@dataclass
class TimeSplit:
    window_ms: float
    compute_ms: float
    memory_ms: float
    idle_ms: float

    def fractions(self) -> dict[str, float]:
        total = self.window_ms or 1.0
        return {
            "compute": self.compute_ms / total,
            "memory": self.memory_ms / total,
            "idle": self.idle_ms / total,
        }


def _top_level_ops(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """cpu_op events not nested inside another cpu_op of their thread."""
    by_thread: dict[Any, list[dict[str, Any]]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "cpu_op":
            by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    top = []
    for ops in by_thread.values():
        ops.sort(key=lambda e: (e["ts"], -e["dur"]))
        end = float("-inf")
        for e in ops:
            if e["ts"] >= end:  # not inside the last top-level op
                top.append(e)
                end = e["ts"] + e["dur"]
    return top


def time_split(trace: dict[str, Any], device: torch.device) -> TimeSplit:
    """The compute / memory / idle split of the profiled steps (module docstring)."""
    events = _events(trace)
    steps = step_windows(trace)
    if not steps:
        return TimeSplit(0.0, 0.0, 0.0, 0.0)
    if device.type == "cuda":
        kernels = [
            (e["ts"], e["ts"] + e["dur"])
            for e in events
            if e.get("ph") == "X" and e.get("cat") == "kernel"
        ]
        copies = [
            (e["ts"], e["ts"] + e["dur"])
            for e in events
            if e.get("ph") == "X" and e.get("cat") in _DEVICE_COPY
        ]
        end = max([steps[-1][1], *(b for _, b in kernels + copies)])
        windows = [(steps[0][0], end)]
        compute = _union(_clip(kernels, windows))
        memory = _subtract(_union(_clip(copies, windows)), compute)
    else:
        windows = steps
        top = _top_level_ops(events)
        spans = [(e["ts"], e["ts"] + e["dur"], e.get("name") in MEMORY_OPS) for e in top]
        memory = _union(_clip([(a, b) for a, b, m in spans if m], windows))
        compute = _subtract(_union(_clip([(a, b) for a, b, m in spans if not m], windows)), memory)
    window = _length(windows)
    busy = _length(compute) + _length(memory)
    return TimeSplit(
        window_ms=window / 1e3,
        compute_ms=_length(compute) / 1e3,
        memory_ms=_length(memory) / 1e3,
        idle_ms=max(window - busy, 0.0) / 1e3,
    )


@dataclass
class TopEntry:
    name: str
    calls: int
    total_ms: float
    pct: float  # of the summed self time of all entries of its kind


def top_entries(averages: Sequence[Any], device: torch.device, n: int = 15) -> list[TopEntry]:
    """The kernels (CUDA) or ops (CPU) with the most self time in the profiled steps."""
    if device.type == "cuda":
        chosen = [
            (a.key, a.count, a.self_device_time_total)
            for a in averages
            if getattr(a, "device_type", None) == torch.autograd.DeviceType.CUDA
        ]
    else:
        chosen = [
            (a.key, a.count, a.self_cpu_time_total)
            for a in averages
            if not a.key.startswith("ProfilerStep") and a.self_cpu_time_total > 0
        ]
    total = sum(us for _, _, us in chosen) or 1.0
    chosen.sort(key=lambda c: -c[2])
    return [TopEntry(k, c, us / 1e3, 100 * us / total) for k, c, us in chosen[:n]]


def memory_timeline(trace: dict[str, Any], device: torch.device) -> tuple[list[float], list[float]]:
    """(ms since the first profiled step, MiB allocated) from the profiler's [memory] events of
    `device`. CUDA: the caching allocator's allocated total (weights included). CPU: the bytes
    allocated during the profiled steps net of frees (tensors alive before the window, such as
    the weights, are not in it)."""
    steps = step_windows(trace)
    t0 = steps[0][0] if steps else 0.0
    device_type = 1 if device.type == "cuda" else 0
    index = device.index if device.index is not None else 0
    points = []
    for e in _events(trace):
        if e.get("name") != "[memory]":
            continue
        args = e.get("args", {})
        if args.get("Device Type") != device_type:
            continue
        if device_type == 1 and args.get("Device Id", index) != index:
            continue
        points.append(((e["ts"] - t0) / 1e3, args.get("Total Allocated", 0) / 2**20))
    points.sort()
    return [p[0] for p in points], [p[1] for p in points]
