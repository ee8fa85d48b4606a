"""Launch configs of the Triton kernels: each launcher's heuristic, with an override on top.

Every Triton launcher passes what its heuristic picked (block sizes, num_warps, and num_stages
where it sets one) through `kernel_config(name, **picked)` and launches with the dict it gets
back. Normally that is `picked` itself. `override(name, **config)` replaces some of those values
for the launches inside its `with` block, so that `perfml.bench.autotune` can time and check a
kernel under configs the heuristic would not choose, without a copy of the launcher. `capture()`
records what each heuristic picked, which is how the tuner reports the current choice (or, with
`launched=True`, what was launched).

Names are "<op>_<kernel>" ("rms_norm_fwd", "wq_gemv"); `known_kernels()` lists those seen so far.
An override may set the launcher's own keys and the launch options num_warps and num_stages; any
other key is an error, so a renamed constexpr cannot make a stale override silently do nothing.
Some values also decide correctness (a block that must hold a whole row, a single row per program
on a looped path): the launcher states those as `limits`, and an override outside them is a
ValueError naming the kernel and the key, never a wrong result. num_warps must be a power of two.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

LAUNCH_OPTIONS = frozenset({"num_warps", "num_stages"})

_overrides: dict[str, dict[str, Any]] = {}
_captures: list[tuple[dict[str, dict[str, Any]], bool]] = []
_seen: set[str] = set()


def kernel_config(
    name: str, limits: Mapping[str, tuple[int | None, int | None]] | None = None, **picked: Any
) -> dict[str, Any]:
    """The launch parameters of kernel `name`: the heuristic's `picked` values, with any active
    override applied on top. Launchers launch with `**` of the result.

    `limits` maps a key to the (lowest, highest) value it may take for this launch (None: no
    bound); it is checked against overridden values only (the heuristic's own picks obey it)."""
    _seen.add(name)
    config = _overrides.get(name)
    if config is None:
        _record(name, picked, picked)
        return picked
    unknown = set(config) - set(picked) - LAUNCH_OPTIONS
    if unknown:
        raise KeyError(
            f"override of kernel {name!r}: unknown keys {sorted(unknown)}; its launcher sets "
            f"{sorted(picked)} (and the launch options {sorted(LAUNCH_OPTIONS)})"
        )
    merged = {**picked, **config}
    for key, (low, high) in (limits or {}).items():
        value = merged.get(key)
        if key in config and (
            (low is not None and value < low) or (high is not None and value > high)
        ):
            raise ValueError(
                f"override of kernel {name!r}: {key}={value} is outside [{low}, {high}] for this "
                f"launch (the heuristic picked {picked.get(key)})"
            )
    for key in LAUNCH_OPTIONS & set(config):
        value = config[key]
        if not isinstance(value, int) or value < 1 or (key == "num_warps" and value & (value - 1)):
            raise ValueError(
                f"override of kernel {name!r}: {key} must be a positive integer"
                f"{' power of two' if key == 'num_warps' else ''}, got {value!r}"
            )
    _record(name, picked, merged)
    return merged


def _record(name: str, picked: dict[str, Any], launched: dict[str, Any]) -> None:
    for record, want_launched in _captures:
        record[name] = dict(launched if want_launched else picked)


@contextlib.contextmanager
def override(name: str, **config: Any) -> Iterator[None]:
    """Launch kernel `name` with `config` replacing its heuristic's values inside the block."""
    previous = _overrides.get(name)
    _overrides[name] = dict(config)
    try:
        yield
    finally:
        if previous is None:
            _overrides.pop(name, None)
        else:
            _overrides[name] = previous


@contextlib.contextmanager
def capture(launched: bool = False) -> Iterator[dict[str, dict[str, Any]]]:
    """Inside the block, record per kernel name what its heuristic picked (the last launch wins),
    or with `launched=True` what it was launched with (the pick with any override applied)."""
    record: dict[str, dict[str, Any]] = {}
    entry = (record, launched)
    _captures.append(entry)
    try:
        yield record
    finally:
        _captures[:] = [c for c in _captures if c is not entry]


def known_kernels() -> list[str]:
    """Kernel names launched so far in this process."""
    return sorted(_seen)
