"""What `perfml quantize` and `perfml prune` share: open a run or model directory (perfml.runs),
measure validation perplexity on the run's own batches (those `perfml eval` uses), apply the
pass, measure again, and write a new model directory (perfml/quant/model_dir.py) with the report:
method, config, perplexity before/after, weight bytes, where the model came from, and for
pruning the per-layer sparsity.

The input may be a model directory written by an earlier pass, so passes chain (prune, then
quantize): the new directory lists every pass in order and names the training run whose data
measures it. The output is written into a hidden temporary directory next to --out and renamed
into place once complete; an existing --out is refused unless --overwrite, and --out may not be
the input (or hold it).

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

from perfml.cli._common import (
    CHECKPOINT_HELP,
    MODEL_PATH_HELP,
    UsageError,
    add_device,
    add_no_verify,
    add_overwrite,
    device,
    load_model,
    model_errors,
    positive_int,
)

FINETUNE_LR_FRACTION = 0.1  # default fine-tune lr: this fraction of the run's own lr
FINETUNE_DIR = "finetune"  # the fine-tune's run directory inside the model directory


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help=MODEL_PATH_HELP)
    p.add_argument("--checkpoint", default="latest", help=CHECKPOINT_HELP)
    p.add_argument(
        "--out",
        metavar="DIR",
        help="the new model directory (default: RUN_DIR/NAME for a run directory, "
        "MODEL_DIR-NAME next to a model directory; NAME e.g. quantized-int8)",
    )
    add_overwrite(p)
    p.add_argument(
        "--batches",
        type=positive_int,
        metavar="N",
        help="validation batches for perplexity (default: the run's eval_batches)",
    )
    add_device(p)
    add_no_verify(p)


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


def weight_bytes(model: Any) -> int:
    """Bytes of the parameters and buffers (what the state_dict stores, tied weights once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def check_finetune_arguments(args: argparse.Namespace) -> None:
    steps, lr = args.finetune_steps, args.finetune_lr
    if steps < 0:
        raise UsageError(f"--finetune-steps must be >= 0, got {steps}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--finetune-lr must be a positive number, got {lr}")
    if lr is not None and steps == 0:
        raise UsageError("--finetune-lr needs --finetune-steps N > 0")


def output_path(args: argparse.Namespace, name: str) -> Path:
    """--out (or its default), checked: not the input, not holding it, not existing unless
    --overwrite."""
    from perfml import runs
    from perfml._files import OutputExistsError, check_output

    source = Path(args.path)
    try:
        kind = runs.kind_of(source)
    except runs.RunError as exc:
        raise UsageError(str(exc)) from None
    if args.out:
        out = Path(args.out)
    elif kind == runs.RUN:
        out = source / name
    else:
        out = source.with_name(f"{source.name}-{name}")
    resolved, src = out.resolve(), source.resolve()
    if resolved == src:
        raise UsageError(
            f"--out {out}: is the input directory; write the new model directory elsewhere"
        )
    if src.is_relative_to(resolved):
        raise UsageError(
            f"--out {out}: holds the input {source}; write the new model directory elsewhere"
        )
    try:
        check_output(out, overwrite=args.overwrite)
    except OutputExistsError as exc:
        raise UsageError(str(exc)) from None
    return out


def run_pass(args: argparse.Namespace, pass_name: str, config_fn: Any) -> int:
    """Open, measure, apply (`config_fn()` builds the pass's config), measure, write."""
    from perfml import quant, runs, sparsity
    from perfml._files import staged_output
    from perfml.quant import model_dir
    from perfml.train.config import save_config
    from perfml.train.trainer import CONFIG_FILE

    dev = device(args.device)
    steps = getattr(args, "finetune_steps", 0)
    if pass_name == "prune":
        check_finetune_arguments(args)
    out = output_path(args, f"{pass_name}d-{args.method.replace(':', '')}")
    try:
        config = config_fn()
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    loaded = load_model(args.path, args.checkpoint, args.verify)
    model = loaded.model
    include_head = pass_name == "quantize" and args.include_head
    head_note = None
    if include_head and model.lm_head is None:
        include_head = False  # nothing to quantize: the head is the embedding's weight
        head_note = "tied to the embedding (tie_embeddings): stays float"
        print(
            "perfml quantize: --include-head: this model's output head is tied to the embedding, "
            "so it stays float (quantizing it would quantize the embedding); recorded as such",
            file=sys.stderr,
        )

    def perplexity() -> dict[str, Any]:
        result = runs.evaluate(loaded, batches=args.batches, device=dev, model=model)
        return {k: result[k] for k in ("val_loss", "ppl", "tokens")}

    finetuned = result = tuned_config = None
    try:
        with staged_output(out, overwrite=args.overwrite) as tmp:
            before = perplexity()
            bytes_before = weight_bytes(model)
            start = time.perf_counter()
            if pass_name == "quantize":
                quant.quantize(model, config, filter_fn=model_dir.pass_filter(include_head))
            else:
                sparsity.prune(model, config)
            seconds = time.perf_counter() - start
            after = perplexity()
            if steps:
                tuned_config = finetune_config(
                    loaded.train_config(), tmp / FINETUNE_DIR, steps, args.finetune_lr, dev.type
                )
                print(
                    f"prune {args.method}: fine-tuning {steps} steps at lr {tuned_config.lr:g} "
                    f"into {out / FINETUNE_DIR}",
                    flush=True,
                )
                result = sparsity.finetune(model, tuned_config)
                finetuned = perplexity()
                # the run trained in the temporary directory: its config names its final place
                tuned_config = dataclasses.replace(tuned_config, out_dir=str(out / FINETUNE_DIR))
                save_config(tuned_config, tmp / FINETUNE_DIR / CONFIG_FILE)
            entry = model_dir.describe_config(
                pass_name, config, include_head=include_head, model=model
            )
            report = _report(args, loaded, entry, before, after, bytes_before, model, seconds)
            if head_note is not None:
                report["head"] = head_note
            if result is not None:
                report["after_finetune"] = finetuned
                report["finetune"] = {
                    "steps": result.step,
                    "requested_steps": steps,
                    "stop_reason": result.stop_reason,
                    "lr": tuned_config.lr,
                    "warmup_steps": tuned_config.warmup_steps,
                    "train_loss": result.train_loss,
                    "run_dir": str(out / FINETUNE_DIR),
                    "seconds": result.elapsed_s,
                }
            if pass_name == "prune":
                report["sparsity"] = sparsity.sparsity_report(model)
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            tokenizer = loaded.tokenizer_file
            if tokenizer is not None:  # perfml generate reads it next to the model
                shutil.copyfile(tokenizer, tmp / "tokenizer.json")
            model_dir.save_model_dir(  # last: its manifest covers the files above
                model.cpu(),
                tmp,
                model_config=loaded.model_config,
                passes=[*loaded.passes, entry],
                report=report,
            )
    except (*model_errors(), quant.QuantizationError, sparsity.PruningError) as exc:
        raise UsageError(str(exc)) from None
    except KeyboardInterrupt:  # a second Ctrl-C during the fine-tune
        print(f"perfml {pass_name}: interrupted; no model directory written", file=sys.stderr)
        return 130
    _print_result(pass_name, args.method, report, result, steps, out)
    return 0


def _report(
    args: argparse.Namespace,
    loaded: Any,
    entry: dict[str, Any],
    before: dict[str, Any],
    after: dict[str, Any],
    bytes_before: int,
    model: Any,
    seconds: float,
) -> dict[str, Any]:
    from perfml import runs

    return {
        "method": args.method,
        "config": entry,
        **runs.lineage(loaded),
        "before": before,
        "after": after,
        "weight_bytes_before": bytes_before,
        "weight_bytes_after": weight_bytes(model),
        "pass_seconds": seconds,
    }


def _print_result(
    pass_name: str, method: str, report: dict[str, Any], result: Any, steps: int, out: Path
) -> None:
    before, after = report["before"], report["after"]
    if result is None:
        change = (
            f"perplexity {before['ppl']:.3f} -> {after['ppl']:.3f} "
            f"(val loss {before['val_loss']:.4f} -> {after['val_loss']:.4f})"
        )
    else:
        tuned = report["after_finetune"]
        done = f"{result.step} steps"
        if result.stop_reason != "max_steps":
            done = f"{result.step} of {steps} steps, {result.stop_reason}"
        change = (
            f"perplexity {before['ppl']:.3f} -> {after['ppl']:.3f} pruned -> "
            f"{tuned['ppl']:.3f} fine-tuned ({done}) (val loss {before['val_loss']:.4f} -> "
            f"{after['val_loss']:.4f} -> {tuned['val_loss']:.4f})"
        )
    print(
        f"{pass_name} {method}: {change}; weights "
        f"{report['weight_bytes_before'] / 2**20:.2f} -> "
        f"{report['weight_bytes_after'] / 2**20:.2f} MiB; written to {out}"
    )
