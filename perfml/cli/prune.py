"""`perfml prune PATH --method ...`: a pruned model directory with perplexity before and after,
optionally fine-tuned (see perfml/cli/_passes.py)."""

from __future__ import annotations

import argparse
from typing import Any

from perfml.cli._passes import FINETUNE_DIR, FINETUNE_LR_FRACTION, add_common_arguments, run_pass

HELP = "prune a model (magnitude|structured|2:4): new model directory + report"
DESCRIPTION = (
    "Prune the model of a run directory or a model directory and write a new model directory "
    "with the perplexity before and after (and after fine-tuning, with --finetune-steps). Prune "
    "before quantizing: quantize the pruned model directory."
)
METHODS = ("magnitude", "structured", "2:4")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument(
        "--method",
        required=True,
        choices=METHODS,
        help="magnitude (unstructured zeros), structured (MLP channels and attention head "
        "groups removed), 2:4 (two zeros in every four weights)",
    )
    p.add_argument(
        "--amount",
        type=float,
        default=0.5,
        metavar="FRACTION",
        help="magnitude: the fraction zeroed",
    )
    p.add_argument(
        "--scope",
        choices=("layer", "global"),
        default="layer",
        help="magnitude: the fraction per layer, or over all the layers together",
    )
    p.add_argument(
        "--mlp-amount",
        type=float,
        default=0.25,
        metavar="FRACTION",
        help="structured: the fraction of MLP channels cut",
    )
    p.add_argument(
        "--head-amount",
        type=float,
        metavar="FRACTION",
        default=0.0,
        help="structured: the fraction of attention head groups (KV heads) cut",
    )
    p.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        metavar="N",
        help="after pruning, fine-tune N optimizer steps on the run's data with the pruned "
        f"weights kept at zero, in OUT/{FINETUNE_DIR} (0: no fine-tune)",
    )
    p.add_argument(
        "--finetune-lr",
        type=float,
        metavar="LR",
        help=f"peak lr of the fine-tune (default {FINETUNE_LR_FRACTION} x the run's lr)",
    )


def _config(args: argparse.Namespace) -> Any:
    from perfml import sparsity

    if args.method == "magnitude":
        return sparsity.MagnitudeConfig(amount=args.amount, scope=args.scope)
    if args.method == "structured":
        return sparsity.StructuredConfig(mlp_amount=args.mlp_amount, head_amount=args.head_amount)
    return sparsity.SemiStructured24Config(accelerate=False)  # saved dense; convert on load


def run(args: argparse.Namespace) -> int:
    return run_pass(args, "prune", lambda: _config(args))
