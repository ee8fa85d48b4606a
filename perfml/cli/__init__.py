"""The `perfml` command (also `python -m perfml`).

One module per subcommand, listed in COMMANDS: each defines HELP, add_arguments(parser) and
run(args) -> exit code, and imports its library code inside run(), so that building the parsers
(--help, usage errors) imports no torch. A new command is a module and one line here. Library
packages never import from perfml.cli.

Exit codes: 0 success (a training stopped by SIGTERM/SIGINT after writing its checkpoint
included), 1 a command that ran and failed its check (export parity), 2 bad usage (unknown
case/mode/impl, a device that is missing, a bad config key or value, a missing or damaged
checkpoint, an output that exists without --overwrite), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from perfml.cli._common import HelpFormatter, UsageError

# name -> module under perfml.cli (serve, tune, info and register join here)
COMMANDS: dict[str, str] = {
    "bench": "perfml.cli.bench",
    "train": "perfml.cli.train",
    "eval": "perfml.cli.eval",
    "generate": "perfml.cli.generate",
    "demo": "perfml.cli.demo",
    "quantize": "perfml.cli.quantize",
    "prune": "perfml.cli.prune",
    "export": "perfml.cli.export",
    "info": "perfml.cli.info",
    "register": "perfml.cli.register",
    "profile": "perfml.cli.profile",
    "serve": "perfml.cli.serve",
    "ab-report": "perfml.cli.ab_report",
    "tune": "perfml.cli.tune",
}

DESCRIPTION = "perfml: fused kernels for PyTorch, and the proof of their speed"

__all__ = ["COMMANDS", "UsageError", "build_parser", "command_module", "main"]


def command_module(name: str) -> ModuleType:
    return importlib.import_module(COMMANDS[name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perfml", description=DESCRIPTION, formatter_class=HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = command_module(name)
        module.add_arguments(
            sub.add_parser(
                name,
                help=module.HELP,
                description=getattr(module, "DESCRIPTION", module.HELP),
                formatter_class=HelpFormatter,
            )
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `perfml` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return command_module(args.command).run(args)
    except UsageError as exc:
        print(f"perfml {args.command}: error: {exc}", file=sys.stderr)
        return 2
