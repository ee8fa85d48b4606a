"""Profiling reports: N steps under torch.profiler (wait / warmup / active schedule), NVML samples
from a background thread on a GPU, then a self-contained HTML page and a Markdown summary beside
the Chrome trace: top kernels, the compute / memory / idle split, a roofline of perfml ops
against the machine's measured ceilings, peak memory and its timeline.

    from perfml.profile import profile_forward
    report = profile_forward("tiny", "profile-out", steps=5)   # writes report.html, summary.md

The pieces (perfml.profile.capture.StepProfiler around any loop, report.build_report /
write_report) are importable on their own; this package imports them only when called, so the
`perfml` command stays quick to start.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from perfml.profile.report import ProfileReport

__all__ = ["profile_forward", "profile_training"]


def profile_forward(
    preset: str,
    out_dir: str | Path,
    *,
    steps: int = 5,
    wait: int = 1,
    warmup: int = 1,
    device: str | torch.device | None = None,
    batch: int = 4,
    seq: int = 128,
    dtype: torch.dtype | None = None,
    fused: bool = True,
    model_args: dict[str, Any] | None = None,
) -> ProfileReport:
    """Profile `steps` forward passes of the Llama `preset` (fields overridden by model_args)
    on random ids [batch, seq] and write the report into out_dir. dtype defaults to bf16 on
    CUDA, fp32 on CPU."""
    from perfml.profile.capture import run_forward
    from perfml.profile.report import build_report, write_report

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_dir = Path(out_dir)
    profiler, workload = run_forward(
        preset, out_dir, steps=steps, wait=wait, warmup=warmup, device=device, batch=batch,
        seq=seq, dtype=dtype, fused=fused, model_args=model_args,
    )  # fmt: skip
    report = build_report(profiler, workload)
    write_report(report, out_dir)
    return report


def profile_training(
    config: Any, out_dir: str | Path, *, steps: int = 5, wait: int = 1, warmup: int = 1
) -> ProfileReport:
    """Profile `steps` optimizer steps of the training run `config` (perfml.train.TrainConfig;
    its run goes to out_dir/run) and write the report into out_dir."""
    from perfml.profile.capture import run_training
    from perfml.profile.report import build_report, write_report

    out_dir = Path(out_dir)
    profiler, workload = run_training(config, out_dir, steps=steps, wait=wait, warmup=warmup)
    report = build_report(profiler, workload)
    write_report(report, out_dir)
    return report
