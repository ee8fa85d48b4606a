"""The `perfml` command (also `python -m perfml`).

Each subcommand is one entry of COMMANDS (help line, argument setup, handler returning the exit
code), so later ones (train, profile, eval, quantize, prune, export) plug in without touching
main(). Exit codes: 0 success, 2 bad usage (unknown case/mode/impl, a device that is missing).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


class UsageError(Exception):
    """Bad command-line input: reported on one line, exit code 2."""


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device cuda: no CUDA device is available (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda or 'none'}); use --device cpu"
        )
    return torch.device(name)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _shapes(text: str) -> tuple[tuple[int, ...], ...]:
    try:
        shapes = tuple(tuple(int(d) for d in part.split("x")) for part in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shapes look like 1024x4096,2048x4096; got {text!r}"
        ) from None
    if not shapes or any(d <= 0 for shape in shapes for d in shape):
        raise argparse.ArgumentTypeError(f"shapes need positive sizes; got {text!r}")
    return shapes


# --- bench ------------------------------------------------------------------------------------


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cases", nargs="*", metavar="CASE", help="cases to run (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="small sizes, short timings")
    p.add_argument("--out", metavar="FILE.jsonl", help="append one JSON row per measurement")
    p.add_argument("--modes", type=_csv, help="comma-separated: fwd,fwd+bwd (default: both)")
    p.add_argument("--impls", type=_csv, help="comma-separated impl names (default: all)")
    p.add_argument("--shapes", type=_shapes, help="override the case sizes, e.g. 4096x4096")
    p.add_argument("--list", action="store_true", help="list the cases and exit")


def _list_cases(device: torch.device) -> None:
    from perfml import bench

    for case in bench.all_cases():
        shapes = ", ".join("x".join(map(str, s)) for s in case.sizes.for_device(device, False))
        print(f"{case.name:<16} {case.family:<10} {case.description}")
        print(
            f"{'':<16} modes {', '.join(case.modes)}; impls "
            f"{', '.join(i.name for i in case.impls)}; {device.type} sizes {shapes}"
        )


def _bench(args: argparse.Namespace) -> int:
    from perfml import bench

    device = _device(args.device)
    if args.list:
        _list_cases(device)
        return 0
    try:
        cases = bench.select_cases(args.cases)
    except bench.UnknownCaseError as exc:
        raise UsageError(str(exc)) from None
    config = bench.RunConfig(
        device=device, quick=args.quick, modes=args.modes, impls=args.impls, shapes=args.shapes
    )
    try:
        rows = bench.run(cases, config, out=args.out, progress=sys.stderr)
    except ValueError as exc:  # an unknown mode or impl, found before anything is measured
        raise UsageError(str(exc)) from None
    if args.out:
        print(f"appended {len(rows)} rows to {args.out}", file=sys.stderr)
    print(bench.render_table(rows))
    return 0


# --- demo -------------------------------------------------------------------------------------


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")


def _demo(args: argparse.Namespace) -> int:
    device = _device(args.device)
    print(
        f"perfml demo: a quick benchmark of every op on {device.type}, perfml against eager "
        "PyTorch and the native op (the full run is `perfml bench`).",
        flush=True,
    )
    return _bench(build_parser().parse_args(["bench", "--quick", "--device", device.type]))


COMMANDS: dict[str, Command] = {
    "bench": Command(
        "time perfml's ops against eager/torch/compile/liger", _bench_arguments, _bench
    ),
    "demo": Command("a quick benchmark of every op on this machine", _demo_arguments, _demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perfml", description="perfml: fused kernels for PyTorch, and the proof of their speed"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `perfml` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except UsageError as exc:
        print(f"perfml {args.command}: error: {exc}", file=sys.stderr)
        return 2
