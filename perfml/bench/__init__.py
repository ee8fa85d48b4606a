"""Benchmark harness: a registry of cases (perfml/bench/cases/, one file per op), the runner that
times every implementation against the machine's measured ceilings, and the printed table.

Used by `perfml bench` (perfml/cli.py) and by `pytest benchmarks`.
"""

from perfml.bench.registry import (
    MODES,
    Case,
    Impl,
    Shape,
    Sizes,
    UnknownCaseError,
    all_cases,
    get_case,
    register,
    select_cases,
    unregister,
)
from perfml.bench.runner import RunConfig, compare, make_problem, measure, prepare, run
from perfml.bench.table import render_table

__all__ = [
    "MODES",
    "Case",
    "Impl",
    "RunConfig",
    "Shape",
    "Sizes",
    "UnknownCaseError",
    "all_cases",
    "compare",
    "get_case",
    "make_problem",
    "measure",
    "prepare",
    "register",
    "render_table",
    "run",
    "select_cases",
    "unregister",
]
