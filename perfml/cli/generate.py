"""`perfml generate PATH`: continue a prompt with a run's or a model directory's model through
the Decoder (static KV cache, fused projections, CUDA graph), tokens/s reported."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from perfml.cli._common import (
    CHECKPOINT_HELP,
    MODEL_PATH_HELP,
    UsageError,
    add_device,
    add_dtype,
    add_no_verify,
    device,
    dtype,
    load_model,
    model_errors,
)

HELP = "continue a prompt with a run's or a model directory's model (KV cache, CUDA graphs)"
# the sampling default of Llama.generate and Decoder.generate (perfml.models.llama
# DEFAULT_TEMPERATURE): greedy
DEFAULT_TEMPERATURE = 0.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help=MODEL_PATH_HELP)
    p.add_argument("--prompt", default="def ", help="the text to continue")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        metavar="N",
        help="tokens to generate; prompt + N must fit in the model's max_seq_len",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        help="0 is greedy (the default, as in Llama.generate and Decoder.generate); > 0 samples",
    )
    p.add_argument(
        "--top-k",
        type=int,
        metavar="K",
        help="sample from the K most likely tokens (default: from all of them)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--checkpoint", default="latest", help=CHECKPOINT_HELP)
    add_no_verify(p)
    add_dtype(p)
    p.add_argument(
        "--no-cuda-graph", action="store_true", help="launch each step's kernels eagerly"
    )
    add_device(p)


def cast_floats(model: Any, to: Any) -> None:
    """The float weights to `to`; a quantized linear keeps its buffers (packed weights and
    scales as quantized), only its bias follows."""
    from perfml.quant.api import QuantizedLinear

    for module in model.modules():
        quantized = isinstance(module, QuantizedLinear)
        for name, t in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            if t.is_floating_point() and (not quantized or name == "bias"):
                t.data = t.data.to(to)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from perfml.models import Decoder

    dev = device(args.device)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    loaded = load_model(args.path, args.checkpoint, args.verify)
    try:
        tokenizer = loaded.tokenizer()
    except (*model_errors(), ValueError) as exc:
        raise UsageError(str(exc)) from None
    model = loaded.model
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise UsageError("--prompt is empty")
    limit = model.config.max_seq_len
    if len(prompt_ids) + args.max_new_tokens > limit:
        raise UsageError(
            f"the prompt ({len(prompt_ids)} tokens) + --max-new-tokens {args.max_new_tokens} = "
            f"{len(prompt_ids) + args.max_new_tokens} exceeds the model's max_seq_len {limit}"
            + (
                f"; at most --max-new-tokens {limit - len(prompt_ids)} with this prompt"
                if len(prompt_ids) < limit
                else ""
            )
        )
    to = dtype(args.dtype, dev)
    cast_floats(model, to)
    model = model.to(dev).eval()
    model.fuse_projections()
    new_tokens = args.max_new_tokens
    prompt = torch.tensor([prompt_ids], device=dev)
    decoder = Decoder(
        model,
        len(prompt_ids) + new_tokens,
        cuda_graph=dev.type == "cuda" and not args.no_cuda_graph,
    )

    def generate(n: int) -> torch.Tensor:
        generator = torch.Generator(device=dev).manual_seed(args.seed)
        return decoder.generate(
            prompt, n, temperature=args.temperature, top_k=args.top_k, generator=generator
        )

    if dev.type == "cuda":  # compile the kernels and capture the step graph untimed
        generate(min(2, new_tokens))
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    out = generate(new_tokens)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    print(tokenizer.decode(out[0].tolist()))
    made = out.shape[1] - prompt.shape[1]
    graph = "CUDA graph" if decoder.cuda_graph else "eager"
    print(
        f"perfml generate: {made} tokens in {seconds:.3f} s ({made / seconds:.1f} tokens/s, "
        f"prefill of {prompt.shape[1]} tokens included; {str(to).removeprefix('torch.')}, "
        f"{graph}, {dev})",
        file=sys.stderr,
    )
    return 0
