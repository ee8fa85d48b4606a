"""The `perfml` command (also `python -m perfml`).

Each subcommand is one entry of COMMANDS (help line, argument setup, handler returning the exit
code), so later ones (profile, quantize, prune, export) plug in without touching main().
Exit codes: 0 success (a training stopped by SIGTERM/SIGINT after writing its checkpoint
included), 2 bad usage (unknown case/mode/impl, a device that is missing, a bad config key or
value, a missing or damaged checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    p.add_argument(
        "--plot",
        nargs="?",
        const="bench-results/plots",
        metavar="DIR",
        help="write one GB/s-vs-size PNG per op (default DIR: bench-results/plots)",
    )


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
    if args.plot:
        from perfml.bench.plot import plot_rows

        for path in plot_rows(rows, args.plot):
            print(f"plot: {path}", file=sys.stderr)
    return 0


# --- train / eval ---------------------------------------------------------------------------


def _train_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--config", metavar="FILE.yaml", help="the run's settings (default: built-in)"
    )
    source.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR (its config.yaml) from its latest checkpoint, or "
        "from the checkpoint directory given",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable), e.g. --set lr=1e-3",
    )


def _train_errors() -> tuple[type[Exception], ...]:
    from perfml.train import CheckpointError, ConfigError

    return ConfigError, CheckpointError


def _train(args: argparse.Namespace) -> int:
    from perfml import train

    try:
        if args.resume:
            run_dir = Path(args.resume)
            if (
                not (run_dir / "config.yaml").is_file()
                and (run_dir.parent.parent / "config.yaml").is_file()
            ):
                run_dir = run_dir.parent.parent  # a checkpoint directory: RUN/checkpoints/step-N
            config = train.load_config(
                run_dir / "config.yaml", [*args.overrides, f"out_dir={run_dir}"]
            )
            result = train.Trainer(config, resume=args.resume).fit()
        else:
            config = train.load_config(args.config, args.overrides)
            result = train.Trainer(config).fit()
    except _train_errors() as exc:
        raise UsageError(str(exc)) from None
    except KeyboardInterrupt:  # a second Ctrl-C: the user gave up on the checkpoint
        print("perfml train: interrupted without a checkpoint", file=sys.stderr)
        return 130
    if _rank() == 0:
        _print_run_summary(result)
    return 0


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _print_run_summary(result: Any) -> None:
    run_dir = result.run_dir
    losses = f"train loss {result.train_loss:.4f}" if result.train_loss is not None else ""
    if result.val_loss is not None:
        losses += f", val loss {result.val_loss:.4f} (ppl {_ppl(result.val_loss):.2f})"
    stopped = {"max_steps": "reached max_steps", "early_stop": "early stopping"}.get(
        result.stop_reason, f"stopped by {result.stop_reason}"
    )
    done = f"{result.tokens:,} tokens in {result.elapsed_s:.1f} s"
    print(f"step {result.step}: {stopped}; {losses}; {done}")
    print(f"run directory    {run_dir}")
    for label, name in (
        ("config", "config.yaml"),
        ("metrics", "metrics.jsonl"),
        ("loss curve", "loss.png"),
        ("tensorboard", "tensorboard"),
    ):
        if (run_dir / name).exists():
            print(f"  {label:<15}{run_dir / name}")
    if result.last_checkpoint is not None:
        print(f"  {'checkpoint':<15}{result.last_checkpoint}")
    if result.best_checkpoint is not None:
        print(f"  {'best':<15}{result.best_checkpoint}")
    if result.stop_reason not in ("max_steps", "early_stop"):
        print(f"resume with: perfml train --resume {run_dir}")


def _ppl(loss: float) -> float:
    import math

    return math.exp(min(loss, 50.0))


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by perfml train")
    p.add_argument(
        "--checkpoint", default="latest", help="latest (default), best, or a checkpoint directory"
    )
    p.add_argument(
        "--batches",
        type=int,
        metavar="N",
        help="validation batches (default: the run's eval_batches)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _eval(args: argparse.Namespace) -> int:
    from perfml import train

    device = _device(args.device).type
    try:
        result = train.evaluate_run(
            args.run_dir, args.checkpoint, batches=args.batches, device=device
        )
    except _train_errors() as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['checkpoint']} (step {result['step']}): val loss {result['val_loss']:.4f}, "
            f"perplexity {result['ppl']:.2f} over {result['tokens']:,} tokens"
        )
    return 0


# --- generate ---------------------------------------------------------------------------------


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path",
        metavar="PATH",
        help="a run directory (perfml train) or a model directory (perfml quantize / prune)",
    )
    p.add_argument("--prompt", default="def ", help='the text to continue (default "def ")')
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="default 64")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, metavar="K", help="sample from the K most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--checkpoint", default="latest", help="for a run: latest, best or a directory")
    p.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), help="default: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument(
        "--no-cuda-graph", action="store_true", help="launch each step's kernels eagerly"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _load_for_generation(path: Path, checkpoint: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a run directory or a model directory."""
    from perfml import data
    from perfml.quant import model_dir

    if (path / model_dir.META_FILE).exists():
        model = model_dir.load_model_dir(path)
        meta = json.loads((path / model_dir.META_FILE).read_text())
        source = Path(meta.get("report", {}).get("source", path))
        candidates = [path / "tokenizer.json", source / "tokenizer.json"]
    else:
        model, _ = model_dir.load_run(path, checkpoint)
        candidates = [path / "tokenizer.json"]
    tokenizer_file = next((c for c in candidates if c.exists()), None)
    if tokenizer_file is None:
        raise UsageError(f"{path}: no tokenizer.json (looked in {', '.join(map(str, candidates))})")
    return model, data.load_tokenizer(tokenizer_file)


def _cast_floats(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The float weights to `dtype`; a quantized linear keeps its buffers (packed weights and
    scales as quantized), only its bias follows."""
    from perfml.quant.api import QuantizedLinear

    for module in model.modules():
        quantized = isinstance(module, QuantizedLinear)
        for name, t in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            if t.is_floating_point() and (not quantized or name == "bias"):
                t.data = t.data.to(dtype)


def _generate(args: argparse.Namespace) -> int:
    import time

    from perfml.models import Decoder

    device = _device(args.device)
    path = Path(args.path)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if not path.is_dir():
        raise UsageError(f"{path}: not a directory")
    try:
        model, tokenizer = _load_for_generation(path, args.checkpoint)
    except (*_train_errors(), ValueError) as exc:
        raise UsageError(str(exc)) from None
    dtype = (
        _DTYPES[args.dtype]
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    _cast_floats(model, dtype)
    model = model.to(device).eval()
    model.fuse_projections()
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise UsageError("--prompt is empty")
    room = model.config.max_seq_len - len(prompt_ids)
    if room < 1:
        raise UsageError(
            f"the prompt has {len(prompt_ids)} tokens; max_seq_len is {room + len(prompt_ids)}"
        )
    new_tokens = min(args.max_new_tokens, room)
    if new_tokens < args.max_new_tokens:
        print(f"perfml generate: {new_tokens} new tokens fit in max_seq_len", file=sys.stderr)
    prompt = torch.tensor([prompt_ids], device=device)
    decoder = Decoder(
        model,
        len(prompt_ids) + new_tokens,
        cuda_graph=device.type == "cuda" and not args.no_cuda_graph,
    )

    def run(n: int) -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(args.seed)
        return decoder.generate(
            prompt, n, temperature=args.temperature, top_k=args.top_k, generator=generator
        )

    if device.type == "cuda":  # compile the kernels and capture the step graph untimed
        run(min(2, new_tokens))
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = run(new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    print(tokenizer.decode(out[0].tolist()))
    made = out.shape[1] - prompt.shape[1]
    graph = "CUDA graph" if decoder.cuda_graph else "eager"
    print(
        f"perfml generate: {made} tokens in {seconds:.3f} s ({made / seconds:.1f} tokens/s, "
        f"prefill of {prompt.shape[1]} tokens included; {str(dtype).removeprefix('torch.')}, "
        f"{graph}, {device})",
        file=sys.stderr,
    )
    return 0


# --- demo -------------------------------------------------------------------------------------

# The demo run, the same settings as configs/tiny.yaml: the tiny preset on the standard library's
# source, byte-level, 300 steps of 16 x 128 tokens: 71 s of CPU time, 142 s of wall time on a
# 2-core machine that other jobs kept busy (load 6); loss 5.28 at step 1, val loss 1.74 at the
# end. On CPU it trains with one intra-op thread (--threads) so its time stays predictable: on
# that busy machine OpenMP's spinning workers made a two-thread step of this 128-wide model 2.5x
# slower than a one-thread one (0.49 s against 0.20 s).
DEMO_SETTINGS: dict[str, Any] = {
    "model": "tiny",
    "fused": True,
    "seq_len": 128,
    "batch_size": 16,
    "max_steps": 300,
    "lr": 3e-3,
    "warmup_steps": 30,
    "schedule": "cosine",
    "min_lr_ratio": 0.1,
    "weight_decay": 0.1,
    "precision": "fp32",
    "eval_every": 50,
    "eval_batches": 8,
    "ckpt_every": 100,
    "keep_last": 2,
    "loggers": ["jsonl", "tensorboard"],
}


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--out-dir", metavar="DIR", help="the run directory (default: runs/demo-TIME)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a demo setting, e.g. --set max_steps=100",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="intra-op CPU threads of the training (default 1: steadiest on a busy machine)",
    )
    p.add_argument(
        "--bench",
        action="store_true",
        help="then time the ops, perfml against eager PyTorch (perfml bench --quick)",
    )


def _demo(args: argparse.Namespace) -> int:
    from perfml import train

    device = _device(args.device)
    out_dir = args.out_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [f"device={device.type}", f"out_dir={out_dir}", *args.overrides]
    try:
        config = train.TrainConfig.from_dict(DEMO_SETTINGS, "demo").with_overrides(overrides)
    except train.ConfigError as exc:
        raise UsageError(str(exc)) from None
    print(
        f"perfml demo: training the {config.model} Llama preset (fused={config.fused}) on "
        f"{config.data or 'the Python standard library source'} for {config.max_steps} steps on "
        f"{device.type}; the run directory is {out_dir}",
        flush=True,
    )
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        result = train.Trainer(config).fit()
    except _train_errors() as exc:
        raise UsageError(str(exc)) from None
    finally:
        torch.set_num_threads(threads)
    print(f"trained in {time.perf_counter() - start:.0f} s")
    _print_run_summary(result)
    print(f"sample: {_sample(result.run_dir, device)!r}")
    print("next:")
    print(f"  perfml eval {out_dir}")
    print(f"  perfml train --resume {out_dir} --set max_steps={2 * config.max_steps}")
    if (result.run_dir / "tensorboard").is_dir():
        print(f"  tensorboard --logdir {out_dir}/tensorboard")
    if not args.bench:
        print("  perfml demo --bench    (this, then the ops timed against eager PyTorch)")
        return 0
    print("\nthe ops: perfml against eager PyTorch and the native op (all of it: perfml bench)")
    return _bench(build_parser().parse_args(["bench", "--quick", "--device", device.type]))


def _sample(run_dir: Path, device: torch.device) -> str:
    """A sampled continuation of "def " (temperature 0.7, top 20), to see what the model learned."""
    from perfml import data
    from perfml.models.llama import Llama, LlamaConfig
    from perfml.train import load_checkpoint, resolve_checkpoint

    ckpt = load_checkpoint(resolve_checkpoint(run_dir), model_only=True)
    model = Llama(LlamaConfig.from_dict(ckpt.meta["model_config"])).to(device).eval()
    model.load_state_dict(ckpt.model)
    tokenizer = data.load_tokenizer(run_dir / "tokenizer.json")
    prompt = torch.tensor([tokenizer.encode("def ")], device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    length = min(80, model.config.max_seq_len - prompt.shape[1])
    out = model.generate(prompt, length, temperature=0.7, top_k=20, generator=generator)
    return tokenizer.decode(out[0].tolist())


COMMANDS: dict[str, Command] = {
    "bench": Command(
        "time perfml's ops against eager/torch/compile/liger", _bench_arguments, _bench
    ),
    "train": Command(
        "train a model (a YAML config, --set overrides, --resume)", _train_arguments, _train
    ),
    "eval": Command("validation loss and perplexity of a run's checkpoint", _eval_arguments, _eval),
    "generate": Command(
        "continue a prompt with a run's or a model directory's model (KV cache, CUDA graphs)",
        _generate_arguments,
        _generate,
    ),
    "demo": Command(
        "train the tiny model on this machine (--bench: then time the ops)", _demo_arguments, _demo
    ),
    "quantize": Command(
        "quantize a run's model (int8|int4|int8dyn|fp8): new model directory + perplexity report",
        lambda p: _quant_commands().quantize_arguments(p),
        lambda args: _quant_commands().run_quantize(args),
    ),
    "prune": Command(
        "prune a run's model (magnitude|structured|2:4): new model directory + report",
        lambda p: _quant_commands().prune_arguments(p),
        lambda args: _quant_commands().run_prune(args),
    ),
    "export": Command(
        "export a run's model to ONNX, checked against PyTorch in onnxruntime",
        lambda p: _export_commands().add_arguments(p),
        lambda args: _export_commands().run(args),
    ),
    "profile": Command(
        "profile forward passes (--model) or training steps (--config): HTML report + trace",
        lambda p: _profile_commands().add_arguments(p),
        lambda args: _profile_commands().run(args),
    ),
}


def _export_commands():
    from perfml.export import commands

    return commands


def _profile_commands():
    from perfml.profile import commands

    return commands


def _quant_commands():
    from perfml.quant import commands

    return commands


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
