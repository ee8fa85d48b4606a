"""Timers: the median of many repetitions after warm-up, plus peak memory where it is honest.

CUDA: one pair of CUDA events per repetition, a 256 MiB buffer written before each one so no
repetition starts with its inputs in L2, and gradients set to None outside the timed region (the
same recipe as triton.testing.do_bench, kept here so the harness works without Triton). Peak
memory is the max_memory_allocated delta over one call.
CPU: time.perf_counter around each repetition, repetitions until a time budget is spent, so a
whole --quick run stays short on two cores. Peak memory is not reported on CPU: torch keeps no
peak counter for the CPU allocator, and process RSS mixes in the allocator's cache and everything
else the process holds, so any number would be a guess.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

Step = Callable[[], object]


@dataclass(frozen=True)
class Timing:
    ms: float  # median per call: the number every report uses
    ms_min: float  # the fastest call: shows how much a shared, noisy machine inflated the median
    reps: int


def _clear_grads(leaves: Sequence[torch.Tensor]) -> None:
    for t in leaves:
        t.grad = None


class Timer(Protocol):
    def time(self, step: Step, leaves: Sequence[torch.Tensor] = ()) -> Timing:
        """Time `step` over many calls; `leaves` get .grad = None before each one."""
        ...

    def peak_mib(self, step: Step, leaves: Sequence[torch.Tensor] = ()) -> float | None: ...


class CpuTimer:
    def __init__(self, budget_s: float, min_reps: int = 3, max_reps: int = 10_000) -> None:
        self.budget_s = budget_s
        self.min_reps = min_reps
        self.max_reps = max_reps

    def time(self, step: Step, leaves: Sequence[torch.Tensor] = ()) -> Timing:
        warm_until = time.perf_counter() + 0.2 * self.budget_s
        while True:  # at least one call: the first one pays lazy initialization
            _clear_grads(leaves)
            step()
            if time.perf_counter() >= warm_until:
                break
        times: list[float] = []
        stop = time.perf_counter() + self.budget_s
        while len(times) < self.min_reps or (
            len(times) < self.max_reps and time.perf_counter() < stop
        ):
            _clear_grads(leaves)
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return Timing(statistics.median(times) * 1e3, min(times) * 1e3, len(times))

    def peak_mib(self, step: Step, leaves: Sequence[torch.Tensor] = ()) -> float | None:
        return None


class CudaTimer:
    def __init__(
        self,
        device: torch.device,
        rep_ms: float = 100.0,
        warmup_ms: float = 25.0,
        min_reps: int = 10,
        max_reps: int = 1000,
    ) -> None:
        self.device = device
        self.rep_ms = rep_ms
        self.warmup_ms = warmup_ms
        self.min_reps = min_reps
        self.max_reps = max_reps
        self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def _estimate_ms(self, step: Step, leaves: Sequence[torch.Tensor], calls: int) -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            _clear_grads(leaves)
            self._flush.zero_()
            step()
        end.record()
        torch.cuda.synchronize(self.device)
        return start.elapsed_time(end) / calls

    def time(self, step: Step, leaves: Sequence[torch.Tensor] = ()) -> Timing:
        estimate = self._estimate_ms(step, leaves, 5)
        warmup = max(1, int(self.warmup_ms / max(estimate, 1e-3)))
        reps = int(self.rep_ms / max(estimate, 1e-3))
        reps = max(self.min_reps, min(self.max_reps, reps))
        self._estimate_ms(step, leaves, warmup)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends, strict=True):
            _clear_grads(leaves)
            self._flush.zero_()
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(self.device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
        return Timing(statistics.median(times), min(times), reps)

    def peak_mib(self, step: Step, leaves: Sequence[torch.Tensor] = ()) -> float | None:
        _clear_grads(leaves)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        step()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        _clear_grads(leaves)
        return peak / 2**20


def make_timer(device: torch.device, quick: bool, cpu_budget_s: float | None = None) -> Timer:
    """The timer for `device`: CUDA events on CUDA, a perf_counter budget on CPU."""
    if device.type == "cuda":
        return CudaTimer(device, rep_ms=40.0 if quick else 100.0)
    if cpu_budget_s is None:
        cpu_budget_s = 0.15 if quick else 0.5
    return CpuTimer(cpu_budget_s)
