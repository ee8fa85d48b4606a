"""`perfml profile`: a profiling report (perfml.profile).

    perfml profile --model tiny --steps 5 --out prof/       forward passes of a Llama preset
    perfml profile --config configs/tiny.yaml --steps 5     optimizer steps of a training run

The report directory holds report.html, summary.md, the trace and plots; with --config it also
holds run/, the profiled training run (its config, metrics and final checkpoint).
Exit codes: 0 the report was written, 2 bad usage (unknown preset, bad config key or value, a
device that is missing).
"""

from __future__ import annotations

import argparse
import time

from perfml.cli._common import (
    UsageError,
    add_device,
    add_dtype,
    add_overrides,
    device,
    dtype,
    model_errors,
)

HELP = "profile forward passes (--model) or training steps (--config): HTML report + trace"
DESCRIPTION = (
    "Profile forward passes of a Llama preset (--model) or optimizer steps of a training run "
    "(--config): an HTML and Markdown report, a trace and plots in --out; with --config the "
    "profiled run itself goes to OUT/run."
)
RUN_SUBDIR = "run"  # perfml.profile.capture.run_training's run directory inside the report's


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", metavar="PRESET", help="forward passes of this Llama preset")
    what.add_argument(
        "--config",
        metavar="FILE.yaml",
        help=f"steps of this training run config (the run is written to OUT/{RUN_SUBDIR})",
    )
    add_overrides(p, "override a training config key (with --config)")
    p.add_argument("--steps", type=int, default=5, metavar="N", help="profiled steps")
    p.add_argument("--wait", type=int, default=1, metavar="N", help="unprofiled steps first")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="warm-up steps, discarded")
    p.add_argument(
        "--out", metavar="DIR", help="report directory (default: runs/profile-YYYYMMDD-HHMMSS)"
    )
    add_device(p, "--model: ")
    p.add_argument("--batch", type=int, default=4, help="--model: sequences per step")
    p.add_argument("--seq", type=int, default=128, help="--model: tokens per sequence")
    add_dtype(p, "--model: ")
    p.add_argument(
        "--unfused", action="store_true", help="--model: plain PyTorch layers (fused=False)"
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from perfml import profile
    from perfml.profile.report import HTML_FILE, MARKDOWN_FILE
    from perfml.train import load_config

    if args.overrides and not args.config:
        raise UsageError("--set overrides keys of a training config: use it with --config")
    out = args.out or f"runs/profile-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        if args.model:
            dev = device(args.device)
            report = profile.profile_forward(
                args.model, out, steps=args.steps, wait=args.wait, warmup=args.warmup,
                device=dev, batch=args.batch, seq=args.seq,
                dtype=dtype(args.dtype, dev) if args.dtype else None, fused=not args.unfused,
            )  # fmt: skip
        else:
            config = load_config(args.config, args.overrides)
            report = profile.profile_training(
                config, out, steps=args.steps, wait=args.wait, warmup=args.warmup
            )
    except (*model_errors(), ValueError) as exc:
        raise UsageError(str(exc)) from None
    split = report.split.fractions()
    print(
        f"{report.workload.description}: {report.mean_step_ms:.2f} ms/step, "
        f"{report.tokens_per_s:,.0f} tokens/s; compute {split['compute']:.0%}, memory "
        f"{split['memory']:.0%}, idle {split['idle']:.0%}"
    )
    folder = report.trace_path.parent
    print(f"report   {folder / HTML_FILE}")
    print(f"summary  {folder / MARKDOWN_FILE}")
    print(f"trace    {report.trace_path}")
    if args.config and (Path(out) / RUN_SUBDIR).is_dir():
        print(f"run      {Path(out) / RUN_SUBDIR}  (the profiled training run)")
    return 0
