"""The speed gate behind `perfml bench --fail-if-slower-than IMPL[:RATIO]`.

For every (case, shape, dtype, mode) a run measures, perfml is timed against IMPL a second time,
interleaved in the same process: rounds of perfml, IMPL, perfml, IMPL, ..., each round the
harness's timer over a short batch of calls. The verdict is the median of the per-round ratios
perfml ms / IMPL ms, with their interquartile range as the spread: a burst of load on a shared
machine lands on the two neighbouring rounds alike instead of on one impl's whole measurement,
so the ratio is steadier than the ratio of two separately taken medians. A row fails when that
median is above RATIO (default 1.0), or when perfml raised or disagreed with the reference (a
fast wrong answer is never a pass).

Only the impl named "perfml" is gated: it is what `perfml.ops` runs by default (on CPU the C++
kernel when the extension is built). The variants (perfml-cpp, perfml-inplace, perfml-lowmem,
perfml-8bit, perfml-unfused, perfml-compile, ...) force one path or trade speed for memory on
purpose, so they are in the table but not in the gate. Rows where perfml or IMPL cannot run on
this device or was left out of the run (--quick leaves compile out on CPU), where IMPL raised or
disagreed with the reference, and cases without one of the two, are "not compared": listed,
never failures.

The gate hooks into runner.run (GroupHook): it reuses each group's inputs and the prepared steps
the run already built and checked (a compiled function is not compiled again, unless a later
impl of the same group reset Dynamo's cache, as train_step's perfml-compile does: then it compiles
again in the first round's warm-up, which costs time but is not timed).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, TextIO

import torch

from perfml.bench.runner import Prepared, Problem
from perfml.bench.timing import CpuTimer, CudaTimer, Step, Timer

SUBJECT = "perfml"
DEFAULT_RATIO = 1.0
ROUNDS = 9
MIN_ROUNDS = 5
BUDGET_S = 3.0  # per comparison: a slow step stops after MIN_ROUNDS once this is spent

Row = dict[str, Any]


@dataclass(frozen=True)
class Threshold:
    """Fail when perfml's time is more than `ratio` times `impl`'s."""

    impl: str
    ratio: float = DEFAULT_RATIO

    def __str__(self) -> str:
        if self.ratio == DEFAULT_RATIO:
            return self.impl
        return f"{self.impl} by more than {self.ratio:g}x"


@dataclass(frozen=True)
class Verdict:
    ratio: float  # median over rounds of perfml ms / impl ms
    q1: float  # quartiles of the per-round ratios: the spread
    q3: float
    perfml_ms: float  # median over rounds of each one's per-round time
    impl_ms: float
    rounds: int
    slower: bool


def decide(perfml_ms: Sequence[float], impl_ms: Sequence[float], limit: float) -> Verdict:
    """The verdict from per-round times (round i of each was taken back to back): the median of
    the per-round ratios decides, not the ratio of the two medians."""
    if not perfml_ms or len(perfml_ms) != len(impl_ms):
        raise ValueError(
            f"need the same positive number of rounds, got {len(perfml_ms)} and {len(impl_ms)}"
        )
    ratios = [p / b for p, b in zip(perfml_ms, impl_ms, strict=True)]
    median = statistics.median(ratios)
    if len(ratios) > 1:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    else:
        q1 = q3 = median
    return Verdict(
        ratio=median,
        q1=q1,
        q3=q3,
        perfml_ms=statistics.median(perfml_ms),
        impl_ms=statistics.median(impl_ms),
        rounds=len(ratios),
        slower=median > limit,
    )


@dataclass(frozen=True)
class Contender:
    """One side of a comparison: the step to time, its gradient leaves, the impl's context."""

    name: str
    step: Step
    leaves: Sequence[torch.Tensor]
    context: Callable[[], AbstractContextManager[Any]]


def interleave(
    first: Contender,
    second: Contender,
    timer: Timer,
    rounds: int = ROUNDS,
    min_rounds: int = MIN_ROUNDS,
    budget_s: float = BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[float], list[float]]:
    """Per-round median ms of `first` and `second`, timed alternately (first, second, first,
    ...): `rounds` rounds, or fewer (never under `min_rounds`) once `budget_s` is spent."""
    times: tuple[list[float], list[float]] = ([], [])
    start = clock()
    while len(times[0]) < rounds:
        for contender, out in zip((first, second), times, strict=True):
            with contender.context():
                out.append(timer.time(contender.step, contender.leaves).ms)
        if len(times[0]) >= min_rounds and clock() - start > budget_s:
            break
    return times


def round_timer(device: torch.device) -> Timer:
    """The harness's timer, sized for one round: a few milliseconds of calls after a warm-up."""
    if device.type == "cuda":
        return CudaTimer(device, rep_ms=10.0, warmup_ms=2.0, min_reps=3)
    return CpuTimer(budget_s=0.025, min_reps=3)


@dataclass(frozen=True)
class Comparison:
    """perfml against one threshold's impl on one (case, shape, dtype, mode)."""

    case: str
    shape: tuple[int, ...]
    dtype: str
    mode: str
    threshold: Threshold
    verdict: Verdict | None = None
    failure: str | None = None  # perfml itself failed (raised, wrong answer)
    not_compared: str | None = None

    @property
    def label(self) -> str:
        return f"{self.case} {'x'.join(map(str, self.shape))} {self.dtype} {self.mode}"

    @property
    def failed(self) -> bool:
        return self.failure is not None or (self.verdict is not None and self.verdict.slower)

    def describe(self) -> str:
        impl = self.threshold.impl
        if self.not_compared is not None:
            return f"{self.label}  vs {impl}: not compared ({self.not_compared})"
        if self.failure is not None:
            return f"{self.label}  vs {impl}: FAILED ({self.failure})"
        v = self.verdict
        assert v is not None
        status = f"SLOWER (limit {self.threshold.ratio:.2f})" if v.slower else "ok"
        return (
            f"{self.label}  perfml {v.perfml_ms:.4g} ms  {impl} {v.impl_ms:.4g} ms  "
            f"ratio {v.ratio:.3f} (IQR {v.q1:.3f}-{v.q3:.3f}, {v.rounds} rounds)  {status}"
        )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class Gate:
    """The runner's GroupHook: compares perfml with each threshold's impl after every group and
    keeps the comparisons (in run order) for the report."""

    def __init__(
        self,
        thresholds: Sequence[Threshold],
        device: torch.device,
        *,
        timer: Timer | None = None,
        rounds: int = ROUNDS,
        min_rounds: int = MIN_ROUNDS,
        budget_s: float = BUDGET_S,
        clock: Callable[[], float] = time.perf_counter,
        progress: TextIO | None = None,
    ) -> None:
        if not thresholds:
            raise ValueError("a gate needs at least one threshold")
        self.thresholds = tuple(thresholds)
        self.keep = frozenset({SUBJECT, *(t.impl for t in self.thresholds)})
        self.device = device
        self.rounds, self.min_rounds, self.budget_s = rounds, min_rounds, budget_s
        self.clock = clock
        self.progress = progress
        self._timer = timer
        self.comparisons: list[Comparison] = []

    @property
    def timer(self) -> Timer:
        if self._timer is None:  # made on first use: on CUDA it allocates the L2 flush buffer
            self._timer = round_timer(self.device)
        return self._timer

    def __call__(
        self, problem: Problem | None, prepared: dict[str, Prepared], rows: list[Row]
    ) -> None:
        if not rows:
            return
        by_impl = {row["impl"]: row for row in rows}
        first = rows[0]
        for threshold in self.thresholds:
            comparison = Comparison(
                first["case"], tuple(first["shape"]), first["dtype"], first["mode"], threshold
            )
            reason = _why_not_compared(by_impl, threshold.impl, problem)
            failure = None if reason else _perfml_failure(by_impl[SUBJECT])
            if reason is not None:
                comparison = replace(comparison, not_compared=reason)
            elif failure is not None:
                comparison = replace(comparison, failure=failure)
            else:
                assert problem is not None
                comparison = self._compare(comparison, problem, prepared)
            self.comparisons.append(comparison)
            if self.progress is not None:
                print(f"gate: {comparison.describe()}", file=self.progress, flush=True)

    def _compare(
        self, comparison: Comparison, problem: Problem, prepared: dict[str, Prepared]
    ) -> Comparison:
        sides = []
        for name in (SUBJECT, comparison.threshold.impl):
            impl, steps = problem.case.impl(name), prepared[name]
            sides.append(Contender(name, steps.step, steps.leaves, impl.context))
        try:
            perfml_ms, impl_ms = interleave(
                *sides, self.timer, self.rounds, self.min_rounds, self.budget_s, self.clock
            )
        except Exception as exc:  # the run goes on; the gate cannot vouch for this row
            return replace(comparison, failure=f"the interleaved timing raised {exc!r}")
        return replace(comparison, verdict=decide(perfml_ms, impl_ms, comparison.threshold.ratio))

    @property
    def failed(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.failed]

    def report(self) -> list[str]:
        """The comparison lines, then the one-line verdict."""
        lines = [
            "gate: perfml vs " + ", ".join(map(str, self.thresholds)) + " (ratio = median of "
            "per-round perfml ms / IMPL ms, interleaved rounds)"
        ]
        lines += [f"  {c.describe()}" for c in self.comparisons]
        lines.append(self.verdict_line())
        return lines

    def verdict_line(self) -> str:
        parts, failed = [], bool(self.failed)
        for t in self.thresholds:
            mine = [c for c in self.comparisons if c.threshold == t]
            compared = [(c, c.verdict) for c in mine if c.verdict is not None]
            slower = [f"{c.label} ({v.ratio:.2f}x)" for c, v in compared if v.slower]
            broken = [c for c in mine if c.failure is not None]
            skipped = len(mine) - len(compared) - len(broken)
            if not failed:
                part = f"{_plural(len(compared), 'row')} compared, 0 slower than {t}"
                parts.append(part + (f", {skipped} not compared" if skipped else ""))
                continue
            if slower:
                parts.append(f"{_plural(len(slower), 'row')} slower than {t}: {', '.join(slower)}")
            if broken:
                names = ", ".join(f"{c.label} ({c.failure})" for c in broken)
                parts.append(f"{_plural(len(broken), 'row')} where perfml failed vs {t}: {names}")
        return ("gate: FAILED: " if failed else "gate: ") + "; ".join(parts)


def _why_not_compared(by_impl: dict[str, Row], impl: str, problem: Problem | None) -> str | None:
    for name in (SUBJECT, impl):
        if name not in by_impl:
            return f"no {name} impl in this run"
    for name in (SUBJECT, impl):
        if by_impl[name]["skipped"]:
            return f"{name}: {by_impl[name]['skipped']}"
    if problem is None:
        return by_impl[SUBJECT]["error"]
    other = by_impl[impl]
    if other["error"]:
        return f"{impl} raised: {other['error']}"
    if other["mismatch"]:
        return f"{impl} does not match the reference"
    return None


def _perfml_failure(row: Row) -> str | None:
    if row["error"]:
        return f"perfml raised: {row['error']}"
    if row["mismatch"]:
        return "perfml does not match the reference"
    return None
