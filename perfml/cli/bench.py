"""`perfml bench [CASE ...]`: time perfml's ops against the baselines (perfml.bench).

`perfml bench serve MODEL_DIR ...` (the first positional `serve`) is the load benchmark of
`perfml serve` (perfml.bench.serve_load), with its own options and help."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from perfml.cli._common import (
    MODEL_PATH_HELP,
    HelpFormatter,
    UsageError,
    add_device,
    csv,
    device,
    positive_int,
    shapes,
)

HELP = "time perfml's ops against eager/torch/compile/liger"
DEFAULT_PLOTS = "bench-results/plots"
GATED = "perfml"  # perfml.bench.gate.SUBJECT, named here so parsing imports no torch


def _threshold(text: str) -> tuple[str, float]:
    """IMPL[:RATIO] -> (IMPL, RATIO); RATIO defaults to 1.0 and must be a positive number."""
    name, sep, ratio_text = text.partition(":")
    name = name.strip()
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r}: give IMPL or IMPL:RATIO, e.g. compile:1.1")
    if name == GATED:
        raise argparse.ArgumentTypeError(f"{text!r}: the gate times perfml against another impl")
    if not sep:
        return name, 1.0
    try:
        ratio = float(ratio_text)
    except ValueError:
        ratio = float("nan")
    if not math.isfinite(ratio) or ratio <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: RATIO must be a positive number, e.g. {name}:1.1"
        )
    return name, ratio


SERVE_MODE = "serve"
SERVE_PROG = "perfml bench serve"
SERVE_DESCRIPTION = (
    "load-test `perfml serve`: start the real server on a free loopback port, drive it with "
    "streamed greedy requests at each concurrency level, and compare it with the same server at "
    "--max-batch 1 (batch1) and with Llama.generate one request at a time (hf)"
)


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels look like 1,4,16; got {text!r}") from None
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError(f"levels must be whole numbers >= 1; got {text!r}")
    return levels


def _baselines(text: str) -> tuple[str, ...]:
    known = ("batch1", "hf")
    names = csv(text)
    if text.strip() in ("none", ""):
        return ()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown baseline(s) {', '.join(unknown)}; known: {', '.join(known)} (or none)"
        )
    return names


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=SERVE_PROG, description=SERVE_DESCRIPTION, formatter_class=HelpFormatter
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help=MODEL_PATH_HELP)
    p.add_argument(
        "--concurrency",
        type=_levels,
        default="1,4,16",
        help="comma-separated levels: requests in flight at once",
    )
    p.add_argument(
        "--requests", type=positive_int, default=64, help="requests sent in all at each level"
    )
    p.add_argument(
        "--max-tokens", type=positive_int, default=32, help="completion tokens per request"
    )
    p.add_argument("--prompt-len", type=positive_int, default=16, help="prompt tokens per request")
    add_device(p)
    p.add_argument("--out", metavar="FILE.jsonl", help="append one JSON row per level and system")
    p.add_argument(
        "--baselines",
        type=_baselines,
        default="batch1,hf",
        help="comma-separated: batch1 (the server at --max-batch 1), hf (Llama.generate per "
        "request, no server), or none",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="torch threads of the servers (OMP_NUM_THREADS) and of hf (default: torch's own)",
    )
    p.add_argument(
        "--port",
        type=int,
        help="the port of the first server (default: a free one)",
    )
    return p


class _BenchParser(argparse.ArgumentParser):
    """The `bench` subparser: `serve` as the first argument hands the rest to serve_parser()."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        if args and args[0] == SERVE_MODE:
            namespace = serve_parser().parse_args(args[1:], namespace)
            namespace.mode = SERVE_MODE
            return namespace, []
        return super().parse_known_args(args, namespace)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.__class__ = type("BenchParser", (_BenchParser, type(p)), {})
    p.add_argument(
        "cases",
        nargs="*",
        metavar="CASE",
        help="cases to run (default: all); `perfml bench serve MODEL_DIR ...` load-tests "
        "perfml serve instead (see `perfml bench serve --help`)",
    )
    add_device(p)
    p.add_argument("--quick", action="store_true", help="small sizes, short timings")
    p.add_argument(
        "--out",
        metavar="FILE.jsonl",
        help="append one JSON row per measurement, as each is measured (missing folders are "
        "created; default: none, the table only)",
    )
    p.add_argument("--modes", type=csv, help="comma-separated: fwd,fwd+bwd (default: both)")
    p.add_argument("--impls", type=csv, help="comma-separated impl names (default: all)")
    p.add_argument(
        "--shapes",
        type=shapes,
        help="override the case sizes, e.g. 4096x4096 (default: each case's own)",
    )
    p.add_argument(
        "--fail-if-slower-than",
        dest="gates",
        metavar="IMPL[:RATIO]",
        type=_threshold,
        action="append",
        default=[],
        help="after the table, time perfml (the impl named perfml; its variants are not gated) "
        "against IMPL again in interleaved rounds and exit 1 "
        "when the median of the per-round ratios perfml/IMPL is above RATIO (default 1.0) or "
        "perfml failed; rows where IMPL did not run are not compared; repeatable (default: no "
        "gate)",
    )
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument(
        "--plot",
        action="store_true",
        help="write one GB/s-vs-size PNG per op into --plot-dir",
    )
    p.add_argument(
        "--plot-dir",
        metavar="DIR",
        default=DEFAULT_PLOTS,
        help="where --plot writes (setting it implies --plot)",
    )


def _list_cases(dev) -> None:
    from perfml import bench

    for case in bench.all_cases():
        sizes = ", ".join("x".join(map(str, s)) for s in case.sizes.for_device(dev, False))
        print(f"{case.name:<16} {case.family:<10} {case.description}")
        print(
            f"{'':<16} modes {', '.join(case.modes)}; impls "
            f"{', '.join(i.name for i in case.impls)}; {dev.type} sizes {sizes}"
        )


def _open_out(out: str) -> None:
    """Create --out's folders and check it can be appended to, before anything is measured."""
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--out {out}: is a directory; give a file (e.g. {path / 'bench.jsonl'})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write: {exc.strerror or exc}") from None


def run_serve(args: argparse.Namespace) -> int:
    from perfml.bench import serve_load

    dev = device(args.device)
    if args.port is not None and not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be in [1, 65535], got {args.port}")
    if args.out:
        _open_out(args.out)
    config = serve_load.LoadConfig(
        concurrency=args.concurrency,
        requests=args.requests,
        max_tokens=args.max_tokens,
        prompt_len=args.prompt_len,
        device=dev.type,
        baselines=args.baselines,
        port=args.port,
        threads=args.threads,
    )
    from perfml.cli._common import model_errors

    try:
        rows = serve_load.run(args.model_dir, config, out=args.out, progress=sys.stderr)
    except (serve_load.ServeLoadError, *model_errors()) as exc:
        raise UsageError(str(exc)) from None
    except serve_load.ServerFailed as exc:
        print(f"perfml bench serve: error: {exc}", file=sys.stderr)
        return 1
    if args.out:
        print(f"appended {len(rows)} rows to {args.out}", file=sys.stderr)
    print(serve_load.render_table(rows))
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "mode", None) == SERVE_MODE:
        return run_serve(args)
    from perfml import bench

    dev = device(args.device)
    if args.list:
        _list_cases(dev)
        return 0
    try:
        cases = bench.select_cases(args.cases)
    except bench.UnknownCaseError as exc:
        raise UsageError(str(exc)) from None
    gate = _make_gate(args.gates, cases, dev)
    impls = args.impls
    if impls and gate is not None:  # the gated impls are measured even when --impls omits them
        known = {impl.name for case in cases for impl in case.impls}
        impls = (*impls, *(name for name in sorted(gate.keep & known) if name not in impls))
    config = bench.RunConfig(
        device=dev, quick=args.quick, modes=args.modes, impls=impls, shapes=args.shapes
    )
    if args.out:
        _open_out(args.out)
    try:
        rows = bench.run(cases, config, out=args.out, progress=sys.stderr, on_group=gate)
    except ValueError as exc:  # an unknown mode or impl, found before anything is measured
        raise UsageError(str(exc)) from None
    if args.out:
        print(f"appended {len(rows)} rows to {args.out}", file=sys.stderr)
    print(bench.render_table(rows))
    if args.plot or args.plot_dir != DEFAULT_PLOTS:
        from perfml.bench.plot import plot_rows

        for path in plot_rows(rows, args.plot_dir):
            print(f"plot: {path}", file=sys.stderr)
    if gate is None:
        return 0
    print("\n".join(gate.report()))
    return 1 if gate.failed else 0


def _make_gate(gates: list[tuple[str, float]], cases, dev):
    """The gate for --fail-if-slower-than, or None; an impl no selected case has is a usage
    error, and so is one impl given twice."""
    if not gates:
        return None
    from perfml.bench.gate import Gate, Threshold

    known = sorted({impl.name for case in cases for impl in case.impls} - {GATED})
    names = [name for name, _ in gates]
    for name in names:
        if name not in known:
            raise UsageError(
                f"--fail-if-slower-than {name}: unknown impl; known impls: {', '.join(known)}"
            )
        if names.count(name) > 1:
            raise UsageError(f"--fail-if-slower-than {name}: given more than once")
    return Gate([Threshold(name, ratio) for name, ratio in gates], dev, progress=sys.stderr)
