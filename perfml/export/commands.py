"""`perfml export PATH --out model.onnx`: the command-line side of perfml.export.

Exit codes: 0 exported (and verified unless --no-verify), 1 the export or its parity check failed
(the message says why; a model that failed parity is kept for inspection), 2 bad usage (a missing
run or checkpoint, a bad option value).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path",
        metavar="RUN_DIR",
        help="a run directory written by perfml train, or a model directory written by "
        "perfml quantize / prune",
    )
    p.add_argument("--out", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    p.add_argument(
        "--checkpoint", default="latest", help="latest (default), best, or a checkpoint directory"
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default: 23 when onnxruntime runs it)")
    p.add_argument("--batch", type=int, default=2, help="example batch size (default 2)")
    p.add_argument("--seq", type=int, default=16, help="example sequence length (default 16)")
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the onnxruntime parity check",
    )


def run(args: argparse.Namespace) -> int:
    from perfml.cli import UsageError
    from perfml.export.onnx import ExportError, export_run
    from perfml.train import CheckpointError

    try:
        report = export_run(
            args.path,
            args.out,
            checkpoint=args.checkpoint,
            batch=args.batch,
            seq=args.seq,
            verify=args.verify,
            opset=args.opset,
        )
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    except ExportError as exc:
        print(f"perfml export: failed: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0
