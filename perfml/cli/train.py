"""`perfml train`: a run from a YAML config (or the built-in one) with --set overrides, or a
resumed one (perfml.train)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from perfml.cli._common import (
    UsageError,
    add_device,
    add_overrides,
    device,
    print_run_summary,
    train_errors,
)

HELP = "train a model (a YAML config, --set overrides, --resume)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--config", metavar="FILE.yaml", help="the run's settings (default: built-in)"
    )
    source.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR (its config.yaml) from its latest checkpoint, or from the "
        "checkpoint directory given (RUN_DIR/checkpoints/step-NNNNNNNN); default: a new run",
    )
    add_overrides(p, "override a config key, e.g. --set lr=1e-3 max_steps=200")
    add_device(p, "the config's device key (--set device=...); ")


def run(args: argparse.Namespace) -> int:
    from perfml import train

    overrides = list(args.overrides)
    if args.device is not None:
        overrides.append(f"device={device(args.device).type}")
    try:
        if args.resume:
            run_dir = Path(args.resume)
            if (
                not (run_dir / "config.yaml").is_file()
                and (run_dir.parent.parent / "config.yaml").is_file()
            ):
                run_dir = run_dir.parent.parent  # a checkpoint directory: RUN/checkpoints/step-N
            config = train.load_config(run_dir / "config.yaml", [*overrides, f"out_dir={run_dir}"])
            result = train.Trainer(config, resume=args.resume).fit()
        else:
            config = train.load_config(args.config, overrides)
            result = train.Trainer(config).fit()
    except train_errors() as exc:
        raise UsageError(str(exc)) from None
    except KeyboardInterrupt:  # a second Ctrl-C: the user gave up on the checkpoint
        print("perfml train: interrupted without a checkpoint", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        print_run_summary(result)
    return 0
