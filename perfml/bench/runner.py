"""The runner: measures every (case, dtype, shape, mode, impl) and returns one row for each.

Per (case, dtype, shape, mode) the inputs are made once (seeded, so every impl sees the same
numbers) and the case's reference computes the expected outputs, and in fwd+bwd the expected
gradients for fixed output gradients dy. Each impl then runs once and is compared against them
(the correctness guard: a fast wrong answer is flagged, never reported as a win), is timed, and
on CUDA has its peak memory taken. An impl that raises gets a row with `error` instead of
stopping the run; an impl that cannot run on the device gets a row with `skipped`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import torch
from torch import Tensor

from perfml.bench.ceilings import measure_ceilings
from perfml.bench.env import environment
from perfml.bench.registry import MODES, Case, Impl, Shape
from perfml.bench.timing import Timer, make_timer

SCHEMA = 1
# max |impl - reference| / max |reference|: loose enough for rounding-order differences (a bf16
# ulp is 0.8% near the top of a binade), tight enough that a wrong kernel cannot pass
DEFAULT_TOLERANCE = {
    torch.float64: 1e-3,
    torch.float32: 1e-3,
    torch.bfloat16: 5e-2,
    torch.float16: 5e-2,
}
_MATMUL_CEILING = {torch.bfloat16: "matmul_bf16_tflops", torch.float32: "matmul_fp32_tflops"}


@dataclass(frozen=True)
class RunConfig:
    """What to run. None means the case's own choice (its modes, impls and device sizes)."""

    device: torch.device
    quick: bool = False
    modes: tuple[str, ...] | None = None
    impls: tuple[str, ...] | None = None
    shapes: tuple[Shape, ...] | None = None
    cpu_budget_s: float | None = None
    seed: int = 0


@dataclass
class Problem:
    """One (case, shape, dtype, mode) with its inputs and the reference's answers."""

    case: Case
    shape: Shape
    dtype: torch.dtype
    mode: str
    device: torch.device
    inputs: tuple[Any, ...]
    grad_index: tuple[int, ...]
    dys: list[Tensor]
    expected: list[Tensor]


@dataclass
class Prepared:
    """An impl bound to a problem: `step` is what gets timed, `outputs` runs it once for the
    correctness check (outputs, then in fwd+bwd the input gradients)."""

    step: Callable[[], object]
    leaves: list[Tensor]
    outputs: Callable[[], list[Tensor]]


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, Tensor)]
    raise TypeError(f"an impl returned {type(out).__name__}, expected a Tensor or a tuple of them")


def _own_copy(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """A private copy of the tensor inputs for one impl: in-place impls (Liger's, perfml's
    inplace_backward) overwrite their inputs, which must not reach the impls measured after."""
    return tuple(t.detach().clone() if isinstance(t, Tensor) else t for t in inputs)


def _leaves(inputs: tuple[Any, ...], grad_index: tuple[int, ...]) -> tuple[list[Any], list[Tensor]]:
    args = list(_own_copy(inputs))
    leaves = []
    for i in grad_index:
        args[i] = args[i].requires_grad_()
        leaves.append(args[i])
    return args, leaves


def _grads(leaves: list[Tensor]) -> list[Tensor]:
    return [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


def make_problem(
    case: Case, shape: Shape, dtype: torch.dtype, mode: str, device: torch.device, seed: int = 0
) -> Problem:
    torch.manual_seed(seed)
    inputs = tuple(case.make_inputs(shape, dtype, device))
    grad_index = case.grad_inputs
    if grad_index is None:
        grad_index = tuple(
            i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.is_floating_point()
        )
    if mode == "fwd":
        with torch.no_grad():
            expected = [t.detach() for t in _tensors(case.reference(*inputs))]
        return Problem(case, shape, dtype, mode, device, inputs, grad_index, [], expected)
    args, leaves = _leaves(inputs, grad_index)
    outs = _tensors(case.reference(*args))
    dys = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, dys)
    expected = [o.detach() for o in outs] + _grads(leaves)
    return Problem(case, shape, dtype, mode, device, inputs, grad_index, dys, expected)


def prepare(problem: Problem, fn: Callable[..., Any]) -> Prepared:
    if problem.mode == "fwd":
        inputs = _own_copy(problem.inputs)
        return Prepared(
            step=lambda: fn(*inputs),
            leaves=[],
            outputs=lambda: [t.detach() for t in _tensors(fn(*inputs))],
        )
    args, leaves = _leaves(problem.inputs, problem.grad_index)
    dys = problem.dys

    def step() -> None:
        torch.autograd.backward(_tensors(fn(*args)), dys)

    def outputs() -> list[Tensor]:
        outs = _tensors(fn(*args))
        torch.autograd.backward(outs, dys)
        got = [o.detach() for o in outs] + _grads(leaves)
        for t in leaves:
            t.grad = None
        return got

    return Prepared(step, leaves, outputs)


def compare(problem: Problem, got: Sequence[Tensor]) -> tuple[bool, float | None]:
    """(mismatch, max relative error) of an impl's results against the reference's; the error
    is None when it has no meaning (a shape differs, or a non-finite value where the reference
    is finite)."""
    expected = problem.expected
    if [g.shape for g in got] != [e.shape for e in expected]:
        return True, None
    tol = problem.case.tolerance.get(problem.dtype, DEFAULT_TOLERANCE.get(problem.dtype, 1e-3))
    worst = 0.0
    for g, e in zip(got, expected, strict=True):
        g, e = g.double(), e.double()
        finite = torch.isfinite(e)
        if (finite & ~torch.isfinite(g)).any():
            return True, None
        if not finite.any():
            continue
        scale = e[finite].abs().max().clamp_min(1e-12)
        worst = max(worst, ((g - e)[finite].abs().max() / scale).item())
    return worst > tol, worst


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _blank(case: Case, shape: Shape, dtype: torch.dtype, mode: str, impl: str) -> dict[str, Any]:
    return {
        "case": case.name,
        "family": case.family,
        "shape": list(shape),
        "dtype": _dtype_name(dtype),
        "mode": mode,
        "impl": impl,
        "path": None,
        "ms": None,
        "ms_min": None,
        "reps": None,
        "bytes": None,
        "gbps": None,
        "pct_of_copy": None,
        "cache_resident": None,
        "flops": None,
        "tflops": None,
        "pct_of_matmul": None,
        "speedup_perfml": None,
        "tokens_per_s": None,
        "baseline": case.baseline,
        "speedup_vs_baseline": None,
        "peak_mib": None,
        "mismatch": None,
        "max_rel_err": None,
        "error": None,
        "skipped": None,
    }


class GroupHook(Protocol):
    """Called by run after each (case, shape, dtype, mode) is measured, while its inputs and the
    prepared steps of the impls named in `keep` (those that ran without error) are still alive,
    so a second measurement reuses them instead of building them again (perfml.bench.gate).
    `problem` is None when making the inputs failed."""

    keep: Collection[str]

    def __call__(
        self, problem: Problem | None, prepared: dict[str, Prepared], rows: list[dict[str, Any]]
    ) -> None: ...


def measure(
    problem: Problem, impl: Impl, timer: Timer, keep: dict[str, Prepared] | None = None
) -> dict[str, Any]:
    """One impl on one problem: the row's measured fields (derived ones are filled by run).
    When `keep` is given, the prepared step is stored there under the impl's name."""
    row = _blank(problem.case, problem.shape, problem.dtype, problem.mode, impl.name)
    try:
        with impl.context():
            if impl.path is not None:
                row["path"] = impl.path(problem.device)
            prepared = prepare(problem, impl.make())
            row["mismatch"], row["max_rel_err"] = compare(problem, prepared.outputs())
            timing = timer.time(prepared.step, prepared.leaves)
            row["ms"], row["ms_min"], row["reps"] = timing.ms, timing.ms_min, timing.reps
            row["peak_mib"] = timer.peak_mib(prepared.step, prepared.leaves)
            if keep is not None:
                keep[impl.name] = prepared
    except Exception as exc:  # one broken impl must not stop the run
        row["error"] = _error_text(exc)
    return row


def cache_resident(nbytes: int | None, cache_mib: float | None) -> bool | None:
    """Whether a row's minimum traffic fits in the cache that keeps data between timed calls
    (ceilings.cache_bytes: the CPU's last-level cache; none on CUDA). Such a row runs from that
    cache, not from memory, so its GB/s may pass the copy ceiling. The traffic is at least the
    bytes the call touches, so a row marked True is certain to fit. None where either is
    unknown."""
    if nbytes is None or not cache_mib:
        return None
    return nbytes <= cache_mib * 2**20


def _derive(
    row: dict[str, Any],
    dtype: torch.dtype,
    nbytes: int | None,
    flops: int | None,
    tokens: int | None = None,
) -> None:
    row["bytes"], row["flops"] = nbytes, flops
    row["cache_resident"] = cache_resident(nbytes, row.get("cache_mib"))
    ms = row["ms"]
    if ms is None or ms <= 0:
        return
    if tokens is not None:
        row["tokens_per_s"] = tokens / ms * 1e3
    if nbytes is not None:
        row["gbps"] = nbytes / ms / 1e6
        if row["copy_gbps"]:
            row["pct_of_copy"] = 100 * row["gbps"] / row["copy_gbps"]
    if flops is not None:
        row["tflops"] = flops / ms / 1e9
        ceiling = row.get(_MATMUL_CEILING.get(dtype, ""))
        if ceiling:
            row["pct_of_matmul"] = 100 * row["tflops"] / ceiling


def _fill_speedups(rows: list[dict[str, Any]]) -> None:
    """speedup_perfml = this impl's ms / perfml's ms, only between rows that both ran and both
    matched the reference."""
    ok = [r for r in rows if r["ms"] and r["mismatch"] is False]
    perfml = next((r for r in ok if r["impl"] == "perfml"), None)
    if perfml is not None:
        for r in ok:
            r["speedup_perfml"] = r["ms"] / perfml["ms"]
    base = next((r for r in ok if r["baseline"] and r["impl"] == r["baseline"]), None)
    if base is not None:
        for r in ok:
            r["speedup_vs_baseline"] = base["ms"] / r["ms"]


def validate(cases: Sequence[Case], config: RunConfig) -> None:
    """Raise ValueError naming the bad value when a mode or impl asked for exists nowhere."""
    for mode in config.modes or ():
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known modes: {', '.join(MODES)}")
    if config.impls:
        known = {impl.name for case in cases for impl in case.impls}
        for name in config.impls:
            if name not in known:
                raise ValueError(f"unknown impl {name!r}; known impls: {', '.join(sorted(known))}")


def _plan(case: Case, config: RunConfig) -> tuple[list[Impl], dict[str, str]]:
    """The impls to measure for `case` on this run, and {impl: why not} for the rest."""
    measured, skipped = [], {}
    for impl in case.impls:
        if config.impls and impl.name not in config.impls:
            continue
        reason = impl.unavailable(config.device)
        if reason is None and impl.compiles and config.quick and config.device.type == "cpu":
            reason = "compilation is slow on CPU; left out of --quick"
        if reason is None:
            measured.append(impl)
        else:
            skipped[impl.name] = reason
    return measured, skipped


def run(
    cases: Sequence[Case],
    config: RunConfig,
    out: str | Path | None = None,
    progress: TextIO | None = None,
    on_group: GroupHook | None = None,
) -> list[dict[str, Any]]:
    """Measure `cases`; return the rows and, when `out` is given, append them to that JSONL file
    as each (case, dtype, shape, mode) finishes (a crash keeps what was measured). Progress lines
    go to `progress` (the CLI passes stderr); `on_group` is called after each group."""
    validate(cases, config)

    def say(message: str) -> None:
        if progress is not None:
            print(message, file=progress, flush=True)

    device = config.device
    timer = make_timer(device, config.quick, config.cpu_budget_s)
    meta = {"schema": SCHEMA, **environment(device)}
    say(f"perfml bench: {meta['card']}, torch {meta['torch']}; measuring the ceilings")
    meta.update(measure_ceilings(timer, device, config.quick))
    matmul = ", ".join(
        f"{k.split('_')[1]} {meta[k]:.3g} TFLOP/s" for k in _MATMUL_CEILING.values() if meta[k]
    )
    say(f"  copy {meta['copy_gbps']:.1f} GB/s; matmul {matmul}")

    groups = []
    for case in cases:
        impls, skipped = _plan(case, config)
        modes = [m for m in case.modes if not config.modes or m in config.modes]
        shapes = config.shapes or case.sizes.for_device(device, config.quick)
        for dtype in case.dtypes_for(device):
            for shape in shapes:
                for mode in modes:
                    groups.append((case, dtype, tuple(shape), mode, impls, skipped))
    total = sum(len(g[4]) for g in groups)

    rows: list[dict[str, Any]] = []
    done = 0
    for case, dtype, shape, mode, impls, skipped in groups:
        label = f"{case.name} {'x'.join(map(str, shape))} {_dtype_name(dtype)} {mode}"
        nbytes = flops = tokens = None
        try:
            problem = make_problem(case, shape, dtype, mode, device, config.seed)
            nbytes = case.bytes(shape, dtype, mode) if case.bytes else None
            flops = case.flops(shape, mode) if case.flops else None
            tokens = case.tokens(shape) if case.tokens else None
        except Exception as exc:  # e.g. a --shapes override of the wrong rank for this case
            problem, setup_error = None, _error_text(exc)
        group = []
        prepared: dict[str, Prepared] = {}
        for impl in impls:
            done += 1
            if problem is None:
                row = _blank(case, shape, dtype, mode, impl.name)
                row["error"] = f"making the inputs failed: {setup_error}"
            else:
                wanted = on_group is not None and impl.name in on_group.keep
                row = measure(problem, impl, timer, prepared if wanted else None)
            result = row["error"] or f"{row['ms']:.4g} ms" + (
                "  MISMATCH" if row["mismatch"] else ""
            )
            say(f"[{done}/{total}] {label} {impl.name}: {result}")
            group.append(row)
        for name, reason in skipped.items():
            row = _blank(case, shape, dtype, mode, name)
            row["skipped"] = reason
            group.append(row)
        full = [{**meta, **row} for row in group]
        for row in full:
            _derive(row, dtype, nbytes, flops, tokens)
        _fill_speedups(full)
        if out is not None:
            with open(out, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in full)
        if on_group is not None:
            on_group(problem, prepared, full)
        del problem, prepared  # free this group's inputs before the next group allocates its own
        rows.extend(full)
    return rows
