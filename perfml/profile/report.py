"""The profiling report: numbers from a finished StepProfiler, rendered as one self-contained HTML
page (inline CSS, plots as base64 PNG data URIs, no script, no network) and a Markdown summary,
written beside the Chrome trace the profiler exported.

    out_dir/report.html   the page
    out_dir/summary.md    the same numbers as tables
    out_dir/trace.json    the profiled steps, for chrome://tracing or ui.perfetto.dev
"""

from __future__ import annotations

import base64
import datetime
import html
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import perfml
from perfml.profile import plots
from perfml.profile.analysis import (
    TimeSplit,
    TopEntry,
    load_trace,
    memory_timeline,
    step_windows,
    time_split,
    top_entries,
)
from perfml.profile.capture import StepProfiler, Workload
from perfml.profile.nvml import FIELDS
from perfml.profile.roofline import RooflineRow, measure_ceilings, roofline_rows

HTML_FILE = "report.html"
MARKDOWN_FILE = "summary.md"

SPLIT_DEFINITIONS = {
    "cuda": (
        "compute: GPU time covered by at least one kernel; memory: time with only memcpy / "
        "memset activity on the GPU; idle: no GPU activity (launch gaps, host syncs, Python, "
        "data loading). Window: first profiled step's start to the later of its last step's "
        "end and the last GPU activity."
    ),
    "cpu": (
        "compute: time inside top-level ops other than data movement; memory: time inside "
        "top-level copy / allocation / fill ops (aten::copy_, to, clone, cat, empty, zeros, "
        "fill_, ...); idle: the rest of the steps' wall time (Python between ops). Window: the "
        "sum of the profiled steps' wall times."
    ),
}
MEMORY_NOTES = {
    "cuda": "the caching allocator's allocated bytes (weights included); peak from "
    "torch.cuda.max_memory_allocated over the profiled loop",
    "cpu": "bytes allocated during the profiled steps, net of frees; tensors alive before "
    "the window, such as the weights, are not counted; peak is the highest point",
}


@dataclass
class ProfileReport:
    workload: Workload
    device: str
    card: str
    wait: int
    warmup: int
    active: int
    step_ms: list[float]
    split: TimeSplit
    top: list[TopEntry]
    roofline: list[RooflineRow]
    ceilings: dict[str, Any]
    peak_mib: float | None
    memory_ms: list[float]
    memory_mib: list[float]
    nvml_samples: list[dict[str, Any]]
    nvml_unavailable: str | None
    nvml_gpu: str | None
    step_marks_s: list[float]
    trace_path: Path
    created: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        )
    )

    @property
    def mean_step_ms(self) -> float:
        return statistics.fmean(self.step_ms) if self.step_ms else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.workload.tokens_per_step / (self.mean_step_ms / 1e3)


def _matmul_roof(ceilings: dict[str, Any], dtype: torch.dtype) -> tuple[float | None, str]:
    if dtype in (torch.bfloat16, torch.float16):
        return ceilings.get("matmul_bf16_tflops"), "bf16"
    return ceilings.get("matmul_fp32_tflops"), "fp32"


def build_report(profiler: StepProfiler, workload: Workload) -> ProfileReport:
    """Analyze a stopped StepProfiler (its trace is on disk) and measure the ceilings."""
    from perfml.bench.env import card_name

    device = profiler.device
    trace = load_trace(profiler.trace_path)
    averages = profiler.profiler.key_averages()
    events = profiler.profiler.events()
    ceilings = dict(measure_ceilings(device))
    ceilings["matmul_roof"], ceilings["matmul_roof_dtype"] = _matmul_roof(ceilings, workload.dtype)
    times, mib = memory_timeline(trace, device)
    peak = profiler.peak_mib if device.type == "cuda" else (max(mib) if mib else None)
    steps = step_windows(trace)
    return ProfileReport(
        workload=workload,
        device=device.type,
        card=card_name(device),
        wait=profiler.wait,
        warmup=profiler.warmup,
        active=profiler.active,
        step_ms=[(b - a) / 1e3 for a, b in steps],
        split=time_split(trace, device),
        top=top_entries(averages, device),
        roofline=roofline_rows(events, device, ceilings),
        ceilings=ceilings,
        peak_mib=peak,
        memory_ms=times,
        memory_mib=mib,
        nvml_samples=profiler.nvml.samples,
        nvml_unavailable=profiler.nvml.unavailable,
        nvml_gpu=profiler.nvml.gpu_name,
        step_marks_s=profiler.step_marks_s,
        trace_path=profiler.trace_path,
    )


# --- shared pieces ---------------------------------------------------------------------------


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _sig(value: float | None) -> str:
    """Three significant digits without exponents for big numbers (2765, 41.2, 0.0123)."""
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _header_rows(r: ProfileReport) -> list[tuple[str, str]]:
    from perfml.bench.env import git_commit

    sha, dirty = git_commit()
    commit = f"{perfml.__version__} ({sha}{'+dirty' if dirty else ''})"
    return [
        ("workload", r.workload.description),
        ("parameters", f"{r.workload.params:,}"),
        ("device", f"{r.device}: {r.card}"),
        (
            "steps",
            f"{r.active} profiled (after {r.wait} unprofiled and {r.warmup} warm-up steps)",
        ),
        (
            "step time",
            f"{r.mean_step_ms:.2f} ms mean over the profiled steps "
            f"({', '.join(f'{ms:.2f}' for ms in r.step_ms)})",
        ),
        ("throughput", f"{r.tokens_per_s:,.0f} tokens/s"),
        ("peak memory", f"{_num(r.peak_mib, '.1f')} MiB ({MEMORY_NOTES[r.device]})"),
        ("versions", f"torch {torch.__version__}, perfml {commit}"),
        ("created", r.created),
    ]


def _ceiling_text(c: dict[str, Any]) -> str:
    parts = [f"copy {_num(c.get('copy_gbps'), '.1f')} GB/s"]
    for name in ("bf16", "fp32"):
        value = c.get(f"matmul_{name}_tflops")
        if value:
            parts.append(f"{name} matmul {value:.3g} TFLOP/s ({c.get('matmul_n')}^3)")
    return "; ".join(parts)


def _nvml_stats(samples: list[dict[str, Any]]) -> list[tuple[str, float, float, float]]:
    out = []
    for key, label in FIELDS:
        values = [s[key] for s in samples if s.get(key) is not None]
        if values:
            out.append((label, min(values), statistics.fmean(values), max(values)))
    return out


def _roofline_cells(r: RooflineRow) -> list[str]:
    return [
        r.op,
        r.shape,
        r.dtype,
        str(r.calls),
        f"{r.ms_per_call:.4g}",
        _sig(r.bytes_per_call / 2**20 if r.bytes_per_call is not None else None),
        _sig(r.gbps),
        _sig(r.pct_of_copy),
        _sig(r.tflops),
        _sig(r.pct_of_matmul),
    ]


ROOFLINE_HEADER = [
    "op",
    "input shapes",
    "dtype",
    "calls",
    "ms/call",
    "MiB/call",
    "GB/s",
    "% copy",
    "TFLOP/s",
    "% matmul",
]


# --- Markdown --------------------------------------------------------------------------------


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def render_markdown(r: ProfileReport) -> str:
    lines = [f"# perfml profile: {r.workload.kind}", ""]
    lines += [f"- **{k}**: {v}" for k, v in _header_rows(r)]
    f = r.split.fractions()
    lines += ["", "## Time split", ""]
    lines += _md_table(
        ["compute", "memory", "idle", "window"],
        [
            [
                f"{r.split.compute_ms:.2f} ms ({f['compute']:.0%})",
                f"{r.split.memory_ms:.2f} ms ({f['memory']:.0%})",
                f"{r.split.idle_ms:.2f} ms ({f['idle']:.0%})",
                f"{r.split.window_ms:.2f} ms",
            ]
        ],
    )
    lines += ["", SPLIT_DEFINITIONS[r.device], ""]
    kind = "kernels" if r.device == "cuda" else "ops"
    lines += [f"## Top {kind} by self time", ""]
    lines += _md_table(
        ["name", "calls", "total ms", "%"],
        [[e.name, str(e.calls), f"{e.total_ms:.3f}", f"{e.pct:.1f}"] for e in r.top],
    )
    lines += ["", "## Roofline of perfml ops and matmuls", ""]
    lines += [f"Ceilings measured in this run: {_ceiling_text(r.ceilings)}.", ""]
    lines += _md_table(ROOFLINE_HEADER, [_roofline_cells(row) for row in r.roofline])
    lines += ["", "## NVML", ""]
    if r.nvml_unavailable:
        lines.append(f"not available: {r.nvml_unavailable}")
    else:
        lines += _md_table(
            ["field", "min", "mean", "max"],
            [[n, f"{a:.1f}", f"{m:.1f}", f"{b:.1f}"] for n, a, m, b in _nvml_stats(r.nvml_samples)],
        )
    lines += ["", f"Chrome trace: `{r.trace_path.name}` (chrome://tracing or ui.perfetto.dev)", ""]
    return "\n".join(lines)


# --- HTML ------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 1100px; margin: 24px auto; padding: 0 16px; line-height: 1.45; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 32px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td.name, th.name { text-align: left; font-family: monospace; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; font-size: 14px; }
dt { font-weight: 600; } dd { margin: 0; }
img { max-width: 100%; display: block; margin: 8px 0; }
.note { color: #555; font-size: 13px; }
.unavailable { background: #f7f7f7; border-left: 4px solid #bbb; padding: 8px 12px; }
"""


def _img(data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _html_table(header: list[str], rows: list[list[str]], name_cols: int = 1) -> str:
    def cell(tag: str, i: int, text: str) -> str:
        cls = ' class="name"' if i < name_cols else ""
        return f"<{tag}{cls}>{html.escape(text)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(r: ProfileReport) -> str:
    esc = html.escape
    kind = "kernels" if r.device == "cuda" else "ops"
    f = r.split.fractions()
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>perfml profile: {esc(r.workload.description)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>perfml profile: {esc(r.workload.kind)}</h1>",
        "<dl>"
        + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in _header_rows(r))
        + "</dl>",
        '<h2 id="split">Time split</h2>',
        _img(plots.time_split_png(r.split), "time split"),
        _html_table(
            ["", "compute", "memory", "idle", "window"],
            [
                [
                    "ms",
                    f"{r.split.compute_ms:.2f}",
                    f"{r.split.memory_ms:.2f}",
                    f"{r.split.idle_ms:.2f}",
                    f"{r.split.window_ms:.2f}",
                ],
                ["share", f"{f['compute']:.1%}", f"{f['memory']:.1%}", f"{f['idle']:.1%}", ""],
            ],
        ),
        f'<p class="note">{esc(SPLIT_DEFINITIONS[r.device])}</p>',
        f'<h2 id="top">Top {kind} by self time</h2>',
    ]
    if r.top:
        parts.append(_img(plots.top_entries_png(r.top, kind), f"top {kind}"))
    parts.append(
        _html_table(
            ["name", "calls", "total ms", "% of all"],
            [[e.name, str(e.calls), f"{e.total_ms:.3f}", f"{e.pct:.1f}"] for e in r.top],
        )
    )
    roof_dtype = r.ceilings.get("matmul_roof_dtype", "fp32")
    parts += [
        '<h2 id="roofline">Roofline of perfml ops and matmuls</h2>',
        f'<p class="note">Ceilings measured on this machine in this run: '
        f"{esc(_ceiling_text(r.ceilings))}. Bytes per call: the benchmark cases' minimum-"
        "traffic formulas (each input read once, each output written once) at the recorded "
        "shapes; a backward kernel is charged fwd+bwd minus fwd traffic. FLOPs: the "
        "profiler's count for matmuls, the bench formula for linear_cross_entropy. Time: "
        f"{'device (kernel) time' if r.device == 'cuda' else 'wall time'} per call.</p>",
        _img(plots.roofline_png(r.roofline, r.ceilings, roof_dtype), "roofline"),
        _html_table(ROOFLINE_HEADER, [_roofline_cells(row) for row in r.roofline], name_cols=2),
        '<h2 id="memory">Memory</h2>',
        f"<p>Peak: <b>{_num(r.peak_mib, '.1f')} MiB</b>. "
        f'<span class="note">{esc(MEMORY_NOTES[r.device])}.</span></p>',
        _img(plots.memory_png(r.memory_ms, r.memory_mib, r.peak_mib), "memory timeline"),
        '<h2 id="nvml">NVML samples</h2>',
    ]
    stats = _nvml_stats(r.nvml_samples)
    if r.nvml_unavailable or not stats:
        reason = r.nvml_unavailable or "NVML returned no readable field on this board"
        parts.append(f'<p class="unavailable">not available: {esc(reason)}</p>')
    else:
        parts += [
            f'<p class="note">{len(r.nvml_samples)} samples of {esc(r.nvml_gpu or "the GPU")} '
            "(found by UUID) from a background thread; dotted lines mark the end of each step "
            "(unprofiled and warm-up steps included).</p>",
            _img(plots.nvml_png(r.nvml_samples, r.step_marks_s), "NVML samples"),
            _html_table(
                ["field", "min", "mean", "max"],
                [[n, f"{a:.1f}", f"{m:.1f}", f"{b:.1f}"] for n, a, m, b in stats],
            ),
        ]
    parts += [
        '<h2 id="files">Files</h2>',
        f'<p><a href="{esc(r.trace_path.name)}">{esc(r.trace_path.name)}</a>: the Chrome trace '
        "of the profiled steps (open it in chrome://tracing or ui.perfetto.dev); "
        f'<a href="{MARKDOWN_FILE}">{MARKDOWN_FILE}</a>: these numbers as Markdown.</p>',
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(report: ProfileReport, out_dir: Path) -> tuple[Path, Path]:
    """Write report.html and summary.md into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    page, summary = out_dir / HTML_FILE, out_dir / MARKDOWN_FILE
    page.write_text(render_html(report), encoding="utf-8")
    summary.write_text(render_markdown(report), encoding="utf-8")
    return page, summary
