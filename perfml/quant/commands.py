"""`perfml quantize RUN_DIR --method ...` and `perfml prune RUN_DIR --method ...`.

Each loads the run's checkpoint, measures validation perplexity (the trainer's own evaluate(), the
batches `perfml eval` uses), applies the pass, measures again, and writes a model directory
(perfml/quant/model_dir.py) with the report: method, config, perplexity before/after, weight bytes,
and for pruning the per-layer sparsity. `perfml.quant.model_dir.load_model_dir(DIR)` loads it.

`perfml prune ... --finetune-steps N` then fine-tunes the pruned model N steps on the run's own
data and config (perfml.sparsity.finetune: the Trainer with the pruned weights kept exactly zero),
in the run directory OUT/finetune, at --finetune-lr (default FINETUNE_LR_FRACTION x the run's lr)
with a short warmup; the report gains the perplexity after fine-tuning and the model directory
holds the fine-tuned weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from torch import nn

QUANT_METHODS = ("int8", "int4", "int8dyn", "fp8")
PRUNE_METHODS = ("magnitude", "structured", "2:4")
FINETUNE_LR_FRACTION = 0.1  # default fine-tune lr: this fraction of the run's own lr
FINETUNE_DIR = "finetune"  # the fine-tune's run directory inside the model directory


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by perfml train")
    p.add_argument("--checkpoint", default="latest", help="latest (default), best, or a directory")
    p.add_argument("--out", metavar="DIR", help="the new model directory (default: RUN_DIR/NAME)")
    p.add_argument("--batches", type=int, metavar="N", help="validation batches for perplexity")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")


def quantize_arguments(p: argparse.ArgumentParser) -> None:
    _common_arguments(p)
    p.add_argument("--method", required=True, choices=QUANT_METHODS)
    p.add_argument("--group-size", type=int, default=64, help="int4 group size (32, 64, 128)")
    p.add_argument(
        "--include-head",
        action="store_true",
        help="quantize the output head (lm_head) too: a large share of what each decode step "
        "reads (a head tied to the embedding stays float)",
    )


def prune_arguments(p: argparse.ArgumentParser) -> None:
    _common_arguments(p)
    p.add_argument("--method", required=True, choices=PRUNE_METHODS)
    p.add_argument("--amount", type=float, default=0.5, help="magnitude: fraction zeroed")
    p.add_argument("--scope", choices=("layer", "global"), default="layer")
    p.add_argument("--mlp-amount", type=float, default=0.25, help="structured: MLP channels cut")
    p.add_argument("--head-amount", type=float, default=0.0, help="structured: head groups cut")
    p.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        metavar="N",
        help="after pruning, fine-tune N optimizer steps on the run's data with the pruned "
        f"weights kept at zero, in OUT/{FINETUNE_DIR} (default 0: no fine-tune)",
    )
    p.add_argument(
        "--finetune-lr",
        type=float,
        metavar="LR",
        help=f"peak lr of the fine-tune (default {FINETUNE_LR_FRACTION} x the run's lr)",
    )


def _quant_config(args: argparse.Namespace) -> Any:
    from perfml import quant

    return {
        "int8": quant.Int8WeightOnlyConfig,
        "int4": lambda: quant.Int4WeightOnlyConfig(group_size=args.group_size),
        "int8dyn": quant.Int8DynamicConfig,
        "fp8": quant.Float8Config,
    }[args.method]()


def _prune_config(args: argparse.Namespace) -> Any:
    from perfml import sparsity

    if args.method == "magnitude":
        return sparsity.MagnitudeConfig(amount=args.amount, scope=args.scope)
    if args.method == "structured":
        return sparsity.StructuredConfig(mlp_amount=args.mlp_amount, head_amount=args.head_amount)
    return sparsity.SemiStructured24Config(accelerate=False)  # saved dense; convert on load


def _check_finetune_arguments(args: argparse.Namespace, out: Path) -> None:
    from perfml.cli import UsageError
    from perfml.train.trainer import CONFIG_FILE

    steps, lr = args.finetune_steps, args.finetune_lr
    if steps < 0:
        raise UsageError(f"--finetune-steps must be >= 0, got {steps}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--finetune-lr must be a positive number, got {lr}")
    if lr is not None and steps == 0:
        raise UsageError("--finetune-lr needs --finetune-steps N > 0")
    if steps and (out / FINETUNE_DIR / CONFIG_FILE).exists():
        raise UsageError(
            f"{out / FINETUNE_DIR} already holds a fine-tune run; choose another --out or remove it"
        )


def finetune_config(
    run_config: Any, out_dir: str | Path, steps: int, lr: float | None, device: str
) -> Any:
    """The run's TrainConfig for a fine-tune of `steps` steps into `out_dir`: lr (default
    FINETUNE_LR_FRACTION x the run's), a warmup of at most a tenth of the steps, on `device`."""
    return dataclasses.replace(
        run_config,
        out_dir=str(out_dir),
        max_steps=steps,
        lr=lr if lr is not None else FINETUNE_LR_FRACTION * run_config.lr,
        warmup_steps=min(run_config.warmup_steps, steps // 10),
        device=device,
    )


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers (what the state_dict stores, tied weights once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _run(args: argparse.Namespace, pass_name: str) -> int:
    from perfml import quant, sparsity
    from perfml.cli import UsageError, _device, _train_errors
    from perfml.quant import model_dir

    device = _device(args.device)
    name = f"{pass_name}d-{args.method.replace(':', '')}"
    out = Path(args.out) if args.out else Path(args.run_dir) / name
    steps = getattr(args, "finetune_steps", 0)
    if pass_name == "prune":
        _check_finetune_arguments(args, out)
    finetuned = result = tuned_config = None
    try:
        config = _quant_config(args) if pass_name == "quantize" else _prune_config(args)
        model, meta = model_dir.load_run(args.run_dir, args.checkpoint)
        before = model_dir.run_perplexity(model, args.run_dir, device=device, batches=args.batches)
        bytes_before = weight_bytes(model)
        start = time.perf_counter()
        include_head = pass_name == "quantize" and args.include_head
        if pass_name == "quantize":
            quant.quantize(model, config, filter_fn=model_dir.pass_filter(include_head))
        else:
            sparsity.prune(model, config)
        seconds = time.perf_counter() - start
        after = model_dir.run_perplexity(model, args.run_dir, device=device, batches=args.batches)
        if steps:
            from perfml.train.config import load_config
            from perfml.train.trainer import CONFIG_FILE

            tuned_config = finetune_config(
                load_config(Path(args.run_dir) / CONFIG_FILE),
                out / FINETUNE_DIR,
                steps,
                args.finetune_lr,
                device.type,
            )
            print(
                f"prune {args.method}: fine-tuning {steps} steps at lr {tuned_config.lr:g} "
                f"into {tuned_config.out_dir}",
                flush=True,
            )
            result = sparsity.finetune(model, tuned_config)
            finetuned = model_dir.run_perplexity(
                model, args.run_dir, device=device, batches=args.batches
            )
    except (*_train_errors(), quant.QuantizationError, sparsity.PruningError) as exc:
        raise UsageError(str(exc)) from None
    except KeyboardInterrupt:  # a second Ctrl-C during the fine-tune
        print(f"perfml {pass_name}: interrupted; no model directory written", file=sys.stderr)
        return 130
    report: dict[str, Any] = {
        "method": args.method,
        "config": model_dir.describe_config(pass_name, config, include_head=include_head),
        "source": str(Path(args.run_dir)),
        "step": meta.get("step"),
        "before": before,
        "after": after,
        "weight_bytes_before": bytes_before,
        "weight_bytes_after": weight_bytes(model),
        "pass_seconds": seconds,
    }
    if result is not None:
        report["after_finetune"] = finetuned
        report["finetune"] = {
            "steps": result.step,
            "requested_steps": steps,
            "stop_reason": result.stop_reason,
            "lr": tuned_config.lr,
            "warmup_steps": tuned_config.warmup_steps,
            "train_loss": result.train_loss,
            "run_dir": str(result.run_dir),
            "seconds": result.elapsed_s,
        }
    if pass_name == "prune":
        report["sparsity"] = sparsity.sparsity_report(model)
    model_dir.save_model_dir(
        model.cpu(),
        out,
        model_config=meta["model_config"],
        passes=[report["config"]],
        report=report,
    )
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    tokenizer = Path(args.run_dir) / "tokenizer.json"
    if tokenizer.exists():  # perfml generate reads it next to the model
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    if result is None:
        change = (
            f"perplexity {before['ppl']:.3f} -> {after['ppl']:.3f} "
            f"(val loss {before['val_loss']:.4f} -> {after['val_loss']:.4f})"
        )
    else:
        done = f"{result.step} steps"
        if result.stop_reason != "max_steps":
            done = f"{result.step} of {steps} steps, {result.stop_reason}"
        change = (
            f"perplexity {before['ppl']:.3f} -> {after['ppl']:.3f} pruned -> "
            f"{finetuned['ppl']:.3f} fine-tuned ({done}) (val loss {before['val_loss']:.4f} -> "
            f"{after['val_loss']:.4f} -> {finetuned['val_loss']:.4f})"
        )
    print(
        f"{pass_name} {args.method}: {change}; weights "
        f"{bytes_before / 2**20:.2f} -> {report['weight_bytes_after'] / 2**20:.2f} MiB; "
        f"written to {out}"
    )
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    return _run(args, "quantize")


def run_prune(args: argparse.Namespace) -> int:
    return _run(args, "prune")
