"""`perfml quantize PATH --method ...`: a quantized model directory with perplexity before and
after (see perfml/cli/_passes.py)."""

from __future__ import annotations

import argparse
from typing import Any

from perfml.cli._passes import add_common_arguments, run_pass

HELP = "quantize a model (int8|int4|int8dyn|fp8): new model directory + perplexity report"
DESCRIPTION = (
    "Quantize the model of a run directory or a model directory (e.g. a pruned one) and write a "
    "new model directory with the perplexity before and after."
)
METHODS = ("int8", "int4", "int8dyn", "fp8")
GROUP_SIZES = (32, 64, 128)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument(
        "--method",
        required=True,
        choices=METHODS,
        help="int8 / int4 weight-only, int8 dynamic (weights and activations), float8",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=64,
        choices=GROUP_SIZES,
        help="int4: weights per scale and zero point",
    )
    p.add_argument(
        "--include-head",
        action="store_true",
        help="quantize the output head (lm_head) too: a large share of what each decode step "
        "reads (a head tied to the embedding stays float, and the report says so)",
    )


def _config(args: argparse.Namespace) -> Any:
    from perfml import quant

    return {
        "int8": quant.Int8WeightOnlyConfig,
        "int4": lambda: quant.Int4WeightOnlyConfig(group_size=args.group_size),
        "int8dyn": quant.Int8DynamicConfig,
        "fp8": quant.Float8Config,
    }[args.method]()


def run(args: argparse.Namespace) -> int:
    return run_pass(args, "quantize", lambda: _config(args))
