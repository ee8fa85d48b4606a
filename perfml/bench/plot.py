"""Plots of benchmark rows, and the one matplotlib style perfml's plots share.

`plot_rows(rows, out_dir)` writes one PNG per (case, dtype, mode): achieved GB/s against the
problem size (the case's minimum-traffic bytes), one line per implementation, with the copy
bandwidth measured in the same run as a dashed ceiling. Rows that errored, were skipped or did
not match the reference are left out: a fast wrong answer is not a point on a speed plot.

The profiling report (perfml.profile) draws its figures with the same `style` / `new_figure` /
`png` helpers, so bench plots and report plots look alike. Figures are made through matplotlib's
object API (matplotlib.figure.Figure), not pyplot: no display, no global backend switch, nothing
to close.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

# one color per implementation across every plot, so "perfml" is always the same green
IMPL_COLORS = {
    "perfml": "#1b9e77",
    "perfml-cpp": "#66a61e",
    "perfml-inplace": "#0f6b50",
    "perfml-lowmem": "#0f6b50",
    "perfml-compile": "#4daf4a",
    "eager": "#d95f02",
    "torch": "#7570b3",
    "compile": "#e7298a",
    "liger": "#e6ab02",
    "reference": "#999999",
}
PALETTE = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")
STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 110,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 8,
    "legend.frameon": False,
}


def color_of(name: str, index: int) -> str:
    return IMPL_COLORS.get(name, PALETTE[index % len(PALETTE)])


@contextlib.contextmanager
def style() -> Iterator[None]:
    """perfml's rcParams, for everything drawn inside (matplotlib reads them at creation)."""
    with matplotlib.rc_context(STYLE):
        yield


def new_figure(
    width: float = 7.0, height: float = 3.6, ncols: int = 1, nrows: int = 1
) -> tuple[Figure, Any]:
    """A figure with a grid of axes; call inside `style()`. Returns (figure, axes) with axes as
    matplotlib's subplots gives them (one Axes, or an array)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(nrows, ncols)


def png(fig: Figure, path: str | Path | None = None) -> bytes:
    """The figure as PNG bytes, also written to `path` when given."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def _usable(row: dict[str, Any]) -> bool:
    return (
        not row.get("error")
        and not row.get("skipped")
        and row.get("mismatch") is False
        and bool(row.get("gbps"))
        and bool(row.get("bytes"))
    )


def _file_name(case: str, dtype: str, mode: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", f"{case}-{dtype}-{mode}") + ".png"


def plot_rows(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """One PNG per (case, dtype, mode) of `rows` (as `perfml bench` returns or writes them) in
    `out_dir`; returns the paths written. Groups without a measured GB/s are skipped."""
    out_dir = Path(out_dir)
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if _usable(row):
            groups.setdefault((row["case"], row["dtype"], row["mode"]), []).append(row)
    written = []
    for (case, dtype, mode), group in groups.items():
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / _file_name(case, dtype, mode)
        with style():
            _plot_group(case, dtype, mode, group, path)
        written.append(path)
    return written


def _plot_group(case: str, dtype: str, mode: str, rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = new_figure()
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    for i, impl in enumerate(impls):
        points = sorted(
            (r["bytes"] / 2**20, r["gbps"], r["shape"]) for r in rows if r["impl"] == impl
        )
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker="o", label=impl, color=color_of(impl, i), linewidth=1.5)
    first = rows[0]
    if first.get("copy_gbps"):
        ceiling = first["copy_gbps"]
        ax.axhline(ceiling, color="#333333", linestyle="--", linewidth=1)
        ax.annotate(
            f"copy {ceiling:.0f} GB/s (measured)",
            (0.01, ceiling),
            xycoords=("axes fraction", "data"),
            va="bottom",
            fontsize=8,
        )
    sizes = sorted({(r["bytes"] / 2**20, "x".join(map(str, r["shape"]))) for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks([s[0] for s in sizes], [f"{s[1]}\n{s[0]:.3g} MiB" for s in sizes], fontsize=7)
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("problem size (shape, minimum traffic)")
    ax.set_ylabel("GB/s (minimum traffic / median time)")
    ax.set_title(f"{case} {dtype} {mode} on {first.get('card', '?')}")
    ax.legend(loc="best")
    png(fig, path)
