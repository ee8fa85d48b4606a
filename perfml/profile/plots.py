"""The report's figures, as PNG bytes, in the style of the bench plots (perfml.bench.plot)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from perfml.bench.plot import PALETTE, new_figure, png, style
from perfml.profile.analysis import TimeSplit, TopEntry
from perfml.profile.nvml import FIELDS
from perfml.profile.roofline import RooflineRow

SPLIT_COLORS = {"compute": "#1b9e77", "memory": "#7570b3", "idle": "#bbbbbb"}


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def time_split_png(split: TimeSplit) -> bytes:
    with style():
        fig, ax = new_figure(7.0, 1.6)
        left = 0.0
        for part, ms in (
            ("compute", split.compute_ms),
            ("memory", split.memory_ms),
            ("idle", split.idle_ms),
        ):
            share = ms / split.window_ms if split.window_ms else 0.0
            ax.barh([0], [share], left=left, color=SPLIT_COLORS[part], label=f"{part} {share:.0%}")
            left += share
        ax.set_xlim(0, 1)
        ax.set_yticks([])
        ax.set_xlabel(f"share of the profiled steps' {split.window_ms:.1f} ms")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.grid(False)
        return png(fig)


def top_entries_png(entries: Sequence[TopEntry], what: str) -> bytes:
    with style():
        shown = list(entries)[:12][::-1]
        fig, ax = new_figure(7.0, 0.32 * len(shown) + 1.0)
        # numeric positions: two names cut to the same label must stay two bars
        ax.barh(range(len(shown)), [e.total_ms for e in shown], color=PALETTE[0])
        ax.set_yticks(range(len(shown)), [_short(e.name) for e in shown])
        for i, e in enumerate(shown):
            ax.annotate(f" {e.pct:.1f}%", (e.total_ms, i), va="center", fontsize=7)
        ax.set_xlabel(f"self time of the profiled steps (ms), {what}")
        ax.tick_params(axis="y", labelsize=7)
        return png(fig)


def roofline_png(rows: Sequence[RooflineRow], ceilings: dict[str, Any], dtype_note: str) -> bytes:
    """Left: perfml ops' GB/s against the copy roof. Right: matmul-like ops' TFLOP/s against the
    matmul roof. Bars are labeled with their share of the roof."""
    memory = [r for r in rows if r.gbps is not None][:12][::-1]
    compute = [r for r in rows if r.tflops is not None][:12][::-1]
    with style():
        fig, (left, right) = new_figure(10.0, 0.3 * max(len(memory), len(compute), 3) + 1.6, 2)
        copy = ceilings.get("copy_gbps")
        if memory:
            labels = [_short(f"{r.op.removeprefix('perfml::')} {r.shape}", 40) for r in memory]
            left.barh(range(len(memory)), [r.gbps for r in memory], color=PALETTE[0])
            left.set_yticks(range(len(memory)), labels)
            for i, r in enumerate(memory):
                if r.pct_of_copy is not None:
                    left.annotate(f" {r.pct_of_copy:.0f}%", (r.gbps, i), va="center", fontsize=7)
        else:
            left.text(0.5, 0.5, "no perfml op in the profiled steps", ha="center", va="center")
        if copy:
            left.axvline(copy, color="#333333", linestyle="--", linewidth=1)
            left.set_title(f"copy bandwidth roof {copy:.3g} GB/s")
        left.set_xlabel("GB/s (minimum traffic / time)")
        left.tick_params(axis="y", labelsize=7)
        if compute:
            labels = [_short(f"{r.op.split('::')[-1]} {r.shape}", 40) for r in compute]
            right.barh(range(len(compute)), [r.tflops for r in compute], color=PALETTE[2])
            right.set_yticks(range(len(compute)), labels)
            for i, r in enumerate(compute):
                if r.pct_of_matmul is not None:
                    right.annotate(
                        f" {r.pct_of_matmul:.0f}%", (r.tflops, i), va="center", fontsize=7
                    )
        else:
            right.text(0.5, 0.5, "no matmul in the profiled steps", ha="center", va="center")
        roof = ceilings.get("matmul_roof")
        if roof:
            right.axvline(roof, color="#333333", linestyle="--", linewidth=1)
            right.set_title(f"{dtype_note} matmul roof {roof:.3g} TFLOP/s")
        right.set_xlabel("TFLOP/s")
        right.tick_params(axis="y", labelsize=7)
        return png(fig)


def memory_png(times_ms: Sequence[float], mib: Sequence[float], peak_mib: float | None) -> bytes:
    with style():
        fig, ax = new_figure(7.0, 2.8)
        if times_ms:
            ax.step(times_ms, mib, where="post", color=PALETTE[2], linewidth=1.2)
            ax.fill_between(times_ms, mib, step="post", alpha=0.15, color=PALETTE[2])
        if peak_mib is not None:
            ax.axhline(peak_mib, color="#d95f02", linestyle="--", linewidth=1)
            ax.annotate(
                f"peak {peak_mib:.1f} MiB",
                (0.01, peak_mib),
                xycoords=("axes fraction", "data"),
                va="bottom",
                fontsize=8,
            )
        ax.set_xlabel("time since the first profiled step (ms)")
        ax.set_ylabel("allocated (MiB)")
        ax.set_ylim(bottom=0)
        return png(fig)


def nvml_png(samples: Sequence[dict[str, Any]], step_marks_s: Sequence[float]) -> bytes:
    """One small panel per NVML field over time; dotted lines mark the step boundaries."""
    fields = [(k, label) for k, label in FIELDS if any(s.get(k) is not None for s in samples)]
    rows = (len(fields) + 1) // 2
    with style():
        fig, grid = new_figure(10.0, 1.9 * rows, ncols=2, nrows=rows)
        axes = np.atleast_1d(grid).ravel()
        for ax, (key, label), color in zip(axes, fields, PALETTE * 2, strict=False):
            points = [(s["t"], s[key]) for s in samples if s.get(key) is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], color=color, linewidth=1.2)
            for mark in step_marks_s:
                ax.axvline(mark, color="#999999", linestyle=":", linewidth=0.6)
            ax.set_title(label, fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in axes[len(fields) :]:
            ax.set_visible(False)
        axes[-1].set_xlabel("seconds")
        return png(fig)
