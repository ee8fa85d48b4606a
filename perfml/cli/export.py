"""`perfml export PATH --out model.onnx`: the model of a run or model directory to ONNX
(perfml.export.to_onnx), checked against PyTorch in onnxruntime.

The file is written into a hidden temporary directory next to --out and moved into place (with
its `.data` file when the weights are stored outside it) once complete; an existing --out is
refused unless --overwrite. Exit codes: 0 exported (and verified unless --no-verify), 1 the
export or its parity check failed (the message says why; a model that failed parity is kept at
--out for inspection), 2 bad usage (a missing run or checkpoint, a bad option value, an existing
--out).
"""

from __future__ import annotations

import argparse
import sys

from perfml.cli._common import (
    CHECKPOINT_HELP,
    MODEL_PATH_HELP,
    UsageError,
    add_overwrite,
    load_model,
)

HELP = "export a model to ONNX, checked against PyTorch in onnxruntime"
# perfml.export.onnx's MIN_OPSET, PREFERRED_OPSET and FALLBACK_OPSET (a test keeps them equal;
# the command line does not import onnx before a command runs)
MIN_OPSET, PREFERRED_OPSET, FALLBACK_OPSET = 18, 23, 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help=MODEL_PATH_HELP)
    p.add_argument("--out", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    add_overwrite(p)
    p.add_argument("--checkpoint", default="latest", help=CHECKPOINT_HELP)
    p.add_argument(
        "--opset",
        type=int,
        metavar="N",
        help=f"ONNX opset, {MIN_OPSET} up to the newest the installed onnx knows (default: "
        f"{PREFERRED_OPSET} when onnxruntime runs it, else {FALLBACK_OPSET})",
    )
    p.add_argument("--batch", type=int, default=2, help="example batch size (>= 2)")
    p.add_argument("--seq", type=int, default=16, help="example sequence length (2 to max_seq_len)")
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the onnxruntime parity check and the check of the model's files against "
        "their manifest",
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from perfml import runs
    from perfml._files import OutputExistsError, check_output, staged_output
    from perfml.export.onnx import ExportError, ParityError, to_onnx

    out = Path(args.out)
    try:
        check_output(out, overwrite=args.overwrite)
    except OutputExistsError as exc:
        raise UsageError(str(exc)) from None
    loaded = load_model(args.path, args.checkpoint, args.verify)
    model = loaded.model
    config = model.config
    if not 2 <= args.seq <= config.max_seq_len or args.batch < 2:
        raise UsageError(
            f"the example needs --batch >= 2 and 2 <= --seq <= max_seq_len "
            f"({config.max_seq_len}), got --batch {args.batch}, --seq {args.seq}"
        )
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator)
    failed = None
    with staged_output(out, overwrite=args.overwrite, is_dir=False) as tmp:
        staged = tmp / out.name
        try:
            report = to_onnx(
                model,
                (ids,),
                staged,
                verify=args.verify,
                opset=args.opset,
                source=runs.parent_of(loaded),
            )
        except ParityError as exc:  # kept for inspection: moved into place like a good one
            failed = str(exc).replace(str(staged), str(out))
        except ExportError as exc:
            print(f"perfml export: failed: {exc}", file=sys.stderr)
            for item in tmp.iterdir():  # nothing half made reaches --out
                item.unlink()
            return 1
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if failed is not None:
        print(f"perfml export: failed: {failed}", file=sys.stderr)
        return 1
    report.path = out
    if report.external_data is not None:
        report.external_data = out.with_name(out.name + ".data")
    print(report.summary())
    return 0
