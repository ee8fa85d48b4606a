"""`perfml demo`: train the tiny model on this machine, sample from it, then (--bench) time the
ops against eager PyTorch."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from perfml.cli._common import (
    UsageError,
    add_device,
    add_overrides,
    device,
    print_run_summary,
    train_errors,
)

HELP = "train the tiny model on this machine (--bench: then time the ops)"

# The demo run, the same settings as configs/tiny.yaml: the tiny preset on the standard library's
# source, byte-level, 300 steps of 16 x 128 tokens: 71 s of CPU time, 142 s of wall time on a
# 2-core machine that other jobs kept busy (load 6); loss 5.28 at step 1, val loss 1.74 at the
# end. On CPU it trains with one intra-op thread (--threads) so its time stays predictable: on
# that busy machine OpenMP's spinning workers made a two-thread step of this 128-wide model 2.5x
# slower than a one-thread one (0.49 s against 0.20 s).
DEMO_SETTINGS: dict[str, Any] = {
    "model": "tiny",
    "fused": True,
    "seq_len": 128,
    "batch_size": 16,
    "max_steps": 300,
    "lr": 3e-3,
    "warmup_steps": 30,
    "schedule": "cosine",
    "min_lr_ratio": 0.1,
    "weight_decay": 0.1,
    "precision": "fp32",
    "eval_every": 50,
    "eval_batches": 8,
    "ckpt_every": 100,
    "keep_last": 2,
    "loggers": ["jsonl", "tensorboard"],
}
SAMPLE_PROMPT = "def "


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_device(p)
    p.add_argument(
        "--out", metavar="DIR", help="the run directory (default: runs/demo-YYYYMMDD-HHMMSS)"
    )
    p.add_argument("--out-dir", dest="out_dir", metavar="DIR", help=argparse.SUPPRESS)
    add_overrides(p, "override a demo setting, e.g. --set max_steps=100")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="intra-op CPU threads of the training (1 is steadiest on a busy machine)",
    )
    p.add_argument(
        "--bench",
        action="store_true",
        help="then time the ops, perfml against eager PyTorch (perfml bench --quick)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from perfml import train

    dev = device(args.device)
    if args.out and args.out_dir and args.out != args.out_dir:
        raise UsageError("--out-dir is the old name of --out: give one of them")
    if args.out_dir:
        print("perfml demo: --out-dir is deprecated; use --out", file=sys.stderr)
    out_dir = args.out or args.out_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [f"device={dev.type}", f"out_dir={out_dir}", *args.overrides]
    try:
        config = train.TrainConfig.from_dict(DEMO_SETTINGS, "demo").with_overrides(overrides)
    except train.ConfigError as exc:
        raise UsageError(str(exc)) from None
    print(
        f"perfml demo: training the {config.model} Llama preset (fused={config.fused}) on "
        f"{config.data or 'the Python standard library source'} for {config.max_steps} steps on "
        f"{dev.type}; the run directory is {out_dir}",
        flush=True,
    )
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        result = train.Trainer(config).fit()
    except train_errors() as exc:
        raise UsageError(str(exc)) from None
    finally:
        torch.set_num_threads(threads)
    print(f"trained in {time.perf_counter() - start:.0f} s")
    print_run_summary(result)
    print(f"sample: {sample(result.run_dir, dev)!r}")
    print("next:")
    print(f"  perfml eval {out_dir}")
    print(f"  perfml train --resume {out_dir} --set max_steps={2 * config.max_steps}")
    if (result.run_dir / "tensorboard").is_dir():
        print(f"  tensorboard --logdir {out_dir}/tensorboard")
    if not args.bench:
        print("  perfml demo --bench    (this, then the ops timed against eager PyTorch)")
        return 0
    print("\nthe ops: perfml against eager PyTorch and the native op (all of it: perfml bench)")
    from perfml.cli import bench, build_parser

    return bench.run(build_parser().parse_args(["bench", "--quick", "--device", dev.type]))


def sample(run_dir: Path, dev: Any) -> str:
    """A sampled continuation of "def " (temperature 0.7, top 20), to see what the model
    learned."""
    import torch

    from perfml import runs

    loaded = runs.load_model(run_dir)
    model = loaded.model.to(dev).eval()
    tokenizer = loaded.tokenizer()
    prompt = torch.tensor([tokenizer.encode(SAMPLE_PROMPT)], device=dev)
    generator = torch.Generator(device=dev).manual_seed(0)
    length = min(80, model.config.max_seq_len - prompt.shape[1])
    out = model.generate(prompt, length, temperature=0.7, top_k=20, generator=generator)
    return tokenizer.decode(out[0].tolist())
