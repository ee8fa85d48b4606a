"""`perfml eval PATH`: validation loss and perplexity of a run's checkpoint or of a model
directory's model, on the run's own validation batches (perfml.runs.evaluate)."""

from __future__ import annotations

import argparse
import json

from perfml.cli._common import (
    CHECKPOINT_HELP,
    MODEL_PATH_HELP,
    UsageError,
    add_device,
    add_no_verify,
    device,
    load_model,
    model_errors,
    positive_int,
)

HELP = "validation loss and perplexity of a run's checkpoint or a model directory's model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help=MODEL_PATH_HELP)
    p.add_argument("--checkpoint", default="latest", help=CHECKPOINT_HELP)
    add_no_verify(p)
    p.add_argument(
        "--batches",
        type=positive_int,
        metavar="N",
        help="validation batches (default: the run's eval_batches)",
    )
    add_device(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    from perfml import runs

    dev = device(args.device)
    loaded = load_model(args.path, args.checkpoint, args.verify)
    try:
        result = runs.evaluate(loaded, batches=args.batches, device=dev)
    except model_errors() as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(result))
    else:
        step = "" if loaded.step is None else f" (step {loaded.step})"
        print(
            f"{loaded.describe()}{step}: val loss {result['val_loss']:.4f}, "
            f"perplexity {result['ppl']:.2f} over {result['tokens']:,} tokens"
        )
    return 0
