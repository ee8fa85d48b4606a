"""`perfml profile`: the command-line side of perfml.profile.

    perfml profile --model tiny --steps 5 --out prof/       forward passes of a Llama preset
    perfml profile --config configs/tiny.yaml --steps 5     optimizer steps of a training run

Exit codes: 0 the report was written, 2 bad usage (unknown preset, bad config key or value, a
device that is missing).
"""

from __future__ import annotations

import argparse
import time

_DTYPES = ("fp32", "bf16", "fp16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", metavar="PRESET", help="forward passes of this Llama preset")
    what.add_argument("--config", metavar="FILE.yaml", help="steps of this training run config")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training config key (with --config; repeatable)",
    )
    p.add_argument("--steps", type=int, default=5, metavar="N", help="profiled steps (default 5)")
    p.add_argument("--wait", type=int, default=1, help="unprofiled steps first (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps, discarded (default 1)")
    p.add_argument("--out", metavar="DIR", help="report directory (default runs/profile-TIME)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="--model: default cuda if available")
    p.add_argument("--batch", type=int, default=4, help="--model: sequences per step (default 4)")
    p.add_argument("--seq", type=int, default=128, help="--model: tokens per sequence (128)")
    p.add_argument("--dtype", choices=_DTYPES, help="--model: default bf16 on CUDA, fp32 on CPU")
    p.add_argument(
        "--unfused", action="store_true", help="--model: plain PyTorch layers (fused=False)"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from perfml import profile
    from perfml.cli import UsageError, _device
    from perfml.profile.report import HTML_FILE, MARKDOWN_FILE
    from perfml.train import CheckpointError, ConfigError, load_config

    if args.overrides and not args.config:
        raise UsageError("--set overrides keys of a training config: use it with --config")
    out = args.out or f"runs/profile-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        if args.model:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
            report = profile.profile_forward(
                args.model, out, steps=args.steps, wait=args.wait, warmup=args.warmup,
                device=_device(args.device), batch=args.batch, seq=args.seq,
                dtype=dtype[args.dtype] if args.dtype else None, fused=not args.unfused,
            )  # fmt: skip
        else:
            config = load_config(args.config, args.overrides)
            report = profile.profile_training(
                config, out, steps=args.steps, wait=args.wait, warmup=args.warmup
            )
    except (ConfigError, CheckpointError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    split = report.split.fractions()
    print(
        f"{report.workload.description}: {report.mean_step_ms:.2f} ms/step, "
        f"{report.tokens_per_s:,.0f} tokens/s; compute {split['compute']:.0%}, memory "
        f"{split['memory']:.0%}, idle {split['idle']:.0%}"
    )
    print(f"report   {report.trace_path.parent / HTML_FILE}")
    print(f"summary  {report.trace_path.parent / MARKDOWN_FILE}")
    print(f"trace    {report.trace_path}")
    return 0
