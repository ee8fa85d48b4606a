"""The benchmark case registry: what to measure, shared by `perfml bench` and `pytest benchmarks`.

A Case describes one op: how to make its inputs for a shape and dtype, the plain-PyTorch reference
that defines a correct answer, its minimum-traffic byte formula and/or FLOP formula, the sizes to
run on each device, and the implementations (Impl) to compare. Each op registers its case from a
file of its own under perfml/bench/cases/, imported lazily on first lookup so that the case files
may import this module (and perfml.ops) freely.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

Shape = tuple[int, ...]
MODES = ("fwd", "fwd+bwd")


def _always(device: torch.device) -> str | None:
    return None


@dataclass(frozen=True)
class Impl:
    """One implementation of a case.

    make: returns the callable to time, called once per measurement, so an impl that specializes
        (torch.compile) starts fresh for every shape, dtype and mode.
    unavailable: None when the impl can run on the device, else the reason it cannot.
    context: entered around the whole measurement, backward included (autograd runs the backward
        after the forward's `with` block would have exited, so a backend switch must wrap both).
    path: what actually runs, for impls whose path depends on the machine (perfml's backends).
    compiles: slow to start (compilation); left out of --quick runs on CPU.
    """

    name: str
    make: Callable[[], Callable[..., Any]]
    unavailable: Callable[[torch.device], str | None] = _always
    context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
    path: Callable[[torch.device], str] | None = None
    compiles: bool = False


@dataclass(frozen=True)
class Sizes:
    """Shapes per device: CUDA sizes are the real ones (headline first, then the sweep); CPU sizes
    are small enough for a laptop; the quick sets are what --quick runs."""

    cuda: tuple[Shape, ...]
    cpu: tuple[Shape, ...]
    quick_cuda: tuple[Shape, ...]
    quick_cpu: tuple[Shape, ...]

    def for_device(self, device: torch.device, quick: bool) -> tuple[Shape, ...]:
        if device.type == "cuda":
            return self.quick_cuda if quick else self.cuda
        return self.quick_cpu if quick else self.cpu


@dataclass(frozen=True)
class Case:
    """One benchmarked op.

    make_inputs(shape, dtype, device): the op's positional inputs (fresh, not requiring grad).
    reference(*inputs): the definition of a correct output; every impl is checked against it.
    bytes(shape, dtype, mode): minimum traffic, each input read once and each output written once;
        fwd+bwd counts the forward's traffic plus the backward's.
    flops(shape, mode): useful floating-point operations, for compute-bound ops.
    grad_inputs: indices of the inputs that get gradients in fwd+bwd (None: every floating input).
    tolerance: max |impl - reference| / max |reference| allowed per dtype (None: the defaults).
    tokens(shape): tokens one call processes, for model-level cases (rows get tokens/s).
    baseline: the impl the others are compared with as `baseline ms / impl ms` (rows get
        speedup_vs_baseline), for cases whose impls are variants rather than perfml vs others
        (decode in bf16 vs int8 vs int4).
    """

    name: str
    family: str
    sizes: Sizes
    make_inputs: Callable[[Shape, torch.dtype, torch.device], tuple[Any, ...]]
    reference: Callable[..., Any]
    impls: tuple[Impl, ...]
    bytes: Callable[[Shape, torch.dtype, str], int] | None = None
    flops: Callable[[Shape, str], int] | None = None
    modes: tuple[str, ...] = MODES
    cuda_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)
    cpu_dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    grad_inputs: tuple[int, ...] | None = None
    tolerance: dict[torch.dtype, float] = field(default_factory=dict)
    description: str = ""
    tokens: Callable[[Shape], int] | None = None
    baseline: str | None = None

    def dtypes_for(self, device: torch.device) -> tuple[torch.dtype, ...]:
        return self.cuda_dtypes if device.type == "cuda" else self.cpu_dtypes

    def impl(self, name: str) -> Impl:
        for impl in self.impls:
            if impl.name == name:
                return impl
        raise KeyError(f"case {self.name!r} has no impl {name!r}")


class UnknownCaseError(LookupError):
    """A case name that is not registered; the message lists the known ones."""


_CASES: dict[str, Case] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("perfml.bench.cases")


def register(case: Case) -> Case:
    """Add `case` to the registry (names are unique); returns it."""
    if case.name in _CASES:
        raise ValueError(f"benchmark case {case.name!r} is already registered")
    unknown = set(case.modes) - set(MODES)
    if unknown:
        raise ValueError(f"case {case.name!r}: unknown modes {sorted(unknown)}; known: {MODES}")
    if case.baseline is not None and case.baseline not in {impl.name for impl in case.impls}:
        raise ValueError(f"case {case.name!r}: baseline {case.baseline!r} is not one of its impls")
    _CASES[case.name] = case
    return case


def unregister(name: str) -> None:
    """Remove a case (tests register throwaway cases)."""
    _CASES.pop(name, None)


def all_cases() -> list[Case]:
    _load_builtins()
    return list(_CASES.values())


def get_case(name: str) -> Case:
    _load_builtins()
    if name not in _CASES:
        known = ", ".join(sorted(_CASES)) or "(none)"
        raise UnknownCaseError(f"unknown benchmark case {name!r}; known cases: {known}")
    return _CASES[name]


def select_cases(names: Sequence[str]) -> list[Case]:
    """The named cases in the order given, or every case when `names` is empty."""
    return [get_case(n) for n in names] if names else all_cases()
