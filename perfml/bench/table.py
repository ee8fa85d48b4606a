"""The printed table: per case/shape/dtype/mode, one line per impl. Rendered from result rows
alone, so rows read back from a JSONL file print the same way."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Row = dict[str, Any]


def _num(fmt: str) -> Callable[[Any], str]:
    return lambda v: "-" if v is None else format(v, fmt)


# (header, row key, formatter); a column whose values are all None in a block is left out
_COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("path", "path", lambda v: v or "-"),
    ("ms", "ms", _num(".4g")),
    ("GB/s", "gbps", _num(".1f")),
    ("% copy", "pct_of_copy", _num(".1f")),
    ("TFLOP/s", "tflops", _num(".3g")),
    ("% matmul", "pct_of_matmul", _num(".1f")),
    ("peak MiB", "peak_mib", _num(".1f")),
    ("perfml x", "speedup_perfml", _num(".2f")),
    ("tokens/s", "tokens_per_s", _num(".4g")),
    ("x baseline", "speedup_vs_baseline", _num(".2f")),
]


NOISY = 1.5  # median / fastest call above this: the machine was busy while this row was timed


def _note(row: Row) -> str:
    if row["error"]:
        return f"error: {row['error']}"
    notes = []
    if row["mismatch"]:
        err = row["max_rel_err"]
        detail = f"max rel err {err:.2g}" if err is not None else "shape or non-finite values"
        notes.append(f"MISMATCH vs reference ({detail})")
    if row["ms"] and row["ms_min"] and row["ms"] > NOISY * row["ms_min"]:
        notes.append(f"noisy: fastest call {row['ms_min']:.4g} ms")
    if row.get("cache_resident") and row.get("gbps") is not None:
        notes.append("cache-resident")
    return "; ".join(notes)


def _block(rows: list[Row]) -> list[str]:
    first = rows[0]
    title = f"{first['case']}  {'x'.join(map(str, first['shape']))}  {first['dtype']}  "
    title += first["mode"]
    columns = [c for c in _COLUMNS if any(r.get(c[1]) is not None for r in rows)]
    table = [["impl"] + [c[0] for c in columns] + [""]]
    for r in rows:
        table.append([r["impl"]] + [fmt(r.get(key)) for _, key, fmt in columns] + [_note(r)])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = [title]
    for line in table:
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(w) for cell, w in zip(line[1:-1], widths[1:-1], strict=True)]
        lines.append(("  " + "  ".join(cells) + "  " + line[-1]).rstrip())
    return lines


def _header(row: Row) -> list[str]:
    commit = row["commit"] + ("+dirty" if row.get("dirty") else "")
    lines = [
        f"perfml bench  {row['device']}: {row['card']}  torch {row['torch']}  "
        f"triton {row['triton'] or '-'}  commit {commit}  {row['time']}"
    ]
    copy = f"copy {row['copy_gbps']:.1f} GB/s"
    if row.get("copy_method") and row.get("copy_mib"):
        copy += f" ({row['copy_method']}, {row['copy_mib']:.0f} MiB)"
    ceilings = [copy]
    for name in ("bf16", "fp32"):
        value = row.get(f"matmul_{name}_tflops")
        if value:
            ceilings.append(f"{name} matmul {value:.3g} TFLOP/s ({row['matmul_n']}^3)")
    lines.append("ceilings (this run): " + "; ".join(ceilings))
    return lines


def render_table(rows: Sequence[Row]) -> str:
    """The table for `rows` (one run's rows; the header comes from the first)."""
    if not rows:
        return "no results"
    lines = _header(rows[0])
    blocks: dict[tuple[Any, ...], list[Row]] = {}
    skipped: dict[tuple[str, str], None] = {}
    for r in rows:
        if r["skipped"]:
            skipped[(r["impl"], r["skipped"])] = None
            continue
        key = (r["case"], tuple(r["shape"]), r["dtype"], r["mode"])
        blocks.setdefault(key, []).append(r)
    for block in blocks.values():
        lines += [""] + _block(block)
    lines.append("")
    lines.append("perfml x: this impl's time / perfml's time (above 1: perfml is faster); only")
    lines.append("between rows that both match the reference. GB/s counts minimum traffic; ms is")
    lines.append(f"the median call; 'noisy' marks a median over {NOISY}x the fastest call.")
    resident = [r for r in rows if r.get("cache_resident") and r.get("gbps") is not None]
    if resident:
        lines.append(
            "cache-resident: the row's minimum traffic fits in the "
            f"{resident[0]['cache_mib']:.0f} MiB last-level cache: it runs"
        )
        lines.append(
            "from cache, so its % copy (a copy through memory, beyond that cache) can pass 100."
        )
    baselines = sorted({r["baseline"] for r in rows if r.get("baseline")})
    if baselines:
        lines.append(
            "x baseline: the baseline impl's time / this impl's time (above 1: faster than "
            f"{' / '.join(baselines)})."
        )
    for impl, reason in skipped:
        lines.append(f"not run: {impl}: {reason}")
    return "\n".join(lines)
