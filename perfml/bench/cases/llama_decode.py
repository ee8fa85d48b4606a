"""Batch-1 decode of the llama-1b preset with a KV cache: tokens/s of the float model against its
weight-only int8, int4 (group 64) and float8 versions; shape (prompt tokens P, decoded tokens N).

Every impl decodes with perfml.models.Decoder (static KV cache; on CUDA each one-token step is a
CUDA graph replay, so the kernels, not Python, set the pace), after the same seeded init:
  dense   the model in the case dtype (bf16 on CUDA): the baseline of the "x baseline" column
  int8    perfml.quantize(Int8WeightOnlyConfig): W8A16 Triton kernels
  int4    perfml.quantize(Int4WeightOnlyConfig(group_size=64)): W4A16 Triton kernels
  fp8     perfml.quantize(Float8Config): e4m3 weights and activations, torch._scaled_mm on sm_89+
  eager   the dense, unfused model through Llama.hidden_states with the growing KVCache, no
          CUDA graph: what decoding costs when every kernel is launched from Python
The Decoder impls run with fused projections (Llama.fuse_projections: q/k/v one matmul, gate/up
one matmul, so 4 per layer instead of 7). Every linear is quantized, the output head included
(at llama-1b the 128256 x 2048 head is a third of the weights a step reads), as torchao's decode
benchmarks do.

A call is one decode of N tokens teacher-forced from a fixed continuation (the work per token is
that of greedy decoding, and every impl sees the same tokens, so their logits can be compared):
the prompt is prefilled once when the impl is built, and each call rewinds the cache to the
prompt's end and steps N times (feeding continuation token i at position P + i), so
tokens/s = N / (ms / 1000) counts decode steps only. The reference is the float model's forward
over prompt + continuation in the case dtype (its logits at positions P .. P + N - 1); a quantized
model differs from it by its quantization error, so the tolerance (0.25 of the largest logit;
int4 measures ~0.05 on the tiny preset) only catches broken output - tests/models/test_decode.py
and tests/quant hold the tight checks.

On CPU the model is the tiny preset (llama-1b's 1.1e9 parameters are minutes per token there)
and the quantized kernels run their reference paths: the rows check that everything runs, not
how fast a GPU would be. Targets (the issue tracker, H200): int8 >= 1.6x and int4 >= 1.9x the
dense model's tokens/s.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from perfml import _backend
from perfml.bench.registry import Case, Impl, Shape, Sizes, register
from perfml.models.decode import Decoder
from perfml.models.llama import KVCache, Llama, LlamaConfig

_SEED = 0
_GROUP = 64


@dataclass(frozen=True)
class _Spec:
    """What the token tensors alone cannot say: the preset and the weights' dtype."""

    preset: str
    dtype: torch.dtype


def preset_for(device: torch.device) -> str:
    return "llama-1b" if device.type == "cuda" else "tiny"


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    p, n = shape
    preset = preset_for(device)
    config = LlamaConfig.preset(preset)
    if p < 1 or n < 1 or p + n > config.max_seq_len:
        raise ValueError(
            f"llama_decode: shape (P, N) needs P, N >= 1 and P + N <= {config.max_seq_len}, "
            f"got {shape}"
        )
    ids = torch.randint(0, config.vocab_size, (1, p + n), device=device)
    return _Spec(preset, dtype), ids[:, :p].contiguous(), ids[:, p:].contiguous()


def _build(spec: _Spec, device: torch.device) -> Llama:
    gc.collect()  # the previous impl's model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(_SEED)
    with torch.device(device):
        model = Llama(LlamaConfig.preset(spec.preset))
    return model.to(spec.dtype).eval()


def _every_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def _quantized(spec: _Spec, device: torch.device, method: str | None) -> Llama:
    from perfml import quant

    model = _build(spec, device)
    model.fuse_projections()  # q/k/v and gate/up: one matmul each (then quantized as one)
    if method is None:
        return model
    config = {
        "int8": quant.Int8WeightOnlyConfig(),
        "int4": quant.Int4WeightOnlyConfig(group_size=_GROUP),
        "fp8": quant.Float8Config(),
    }[method]
    quant.quantize(model, config, filter_fn=_every_linear)
    return model


def _reference(spec: _Spec, prompt: Tensor, continuation: Tensor) -> Tensor:
    model = _build(spec, prompt.device)
    logits = model(torch.cat([prompt, continuation], dim=1))
    return logits[0, prompt.shape[1] :]


class _Decode:
    """fn(spec, prompt, continuation) -> the logits [N, V] of the N decode steps."""

    def __init__(self, method: str | None) -> None:
        self.method = method
        self.decoder: Decoder | None = None
        self.out: Tensor | None = None

    def __call__(self, spec: _Spec, prompt: Tensor, continuation: Tensor) -> Tensor:
        p, n = prompt.shape[1], continuation.shape[1]
        if self.decoder is None:
            model = _quantized(spec, prompt.device, self.method)
            self.decoder = Decoder(model, p + n)
            self.decoder.prefill(prompt)
            self.out = torch.empty(n, model.config.vocab_size, device=prompt.device)
        decoder, out = self.decoder, self.out
        decoder.reset(p)  # the prompt's keys and values stay; decode from its end again
        for i in range(n):
            out[i].copy_(decoder.step(continuation[:, i])[0])
        return out.to(spec.dtype)


class _EagerDecode:
    """The dense model's own KVCache loop (shapes grow each step; no CUDA graph)."""

    def __init__(self) -> None:
        self.model: Llama | None = None
        self.cache: KVCache | None = None

    @torch.no_grad()
    def __call__(self, spec: _Spec, prompt: Tensor, continuation: Tensor) -> Tensor:
        p, n = prompt.shape[1], continuation.shape[1]
        if self.model is None:
            self.model = _build(spec, prompt.device)
            self.cache = KVCache(self.model.config.num_layers, p + n)
            self.model.hidden_states(prompt, self.cache)
        model, cache = self.model, self.cache
        cache.length = p
        logits = []
        for i in range(n):
            hidden = model.hidden_states(continuation[:, i : i + 1], cache)[0, -1]
            logits.append(model.logits(hidden))
        return torch.stack(logits)


def _path(method: str | None) -> Callable[[torch.device], str]:
    def path(device: torch.device) -> str:
        graph = "cuda-graph" if device.type == "cuda" else "eager"
        if method is None:
            return graph
        if method == "fp8":
            from perfml.quant.methods import _scaled_mm_ok

            probe = torch.empty(1, 16, device=device)
            return f"{graph}+{'scaled_mm' if _scaled_mm_ok(probe, 16, 16) else 'emulated'}"
        op = "w8a16_mm" if method == "int8" else "w4a16_mm"
        return f"{graph}+{_backend.select(op, device)}"

    return path


def _impl(name: str, method: str | None) -> Impl:
    return Impl(name, make=lambda: _Decode(method), path=_path(method))


register(
    Case(
        name="llama_decode",
        family="model",
        description=(
            "batch-1 decode with a KV cache (llama-1b on CUDA, tiny on CPU): dense vs int8 / "
            "int4 / fp8 weights; shape (prompt tokens, decoded tokens)"
        ),
        sizes=Sizes(
            cuda=((128, 128), (1024, 128)),
            cpu=((32, 32),),
            quick_cuda=((128, 128),),
            quick_cpu=((16, 8),),
        ),
        make_inputs=_inputs,
        reference=_reference,
        impls=(
            _impl("dense", None),
            _impl("int8", "int8"),
            _impl("int4", "int4"),
            _impl("fp8", "fp8"),
            Impl("eager", make=_EagerDecode),
        ),
        modes=("fwd",),
        tolerance={torch.bfloat16: 0.25, torch.float32: 0.25},
        tokens=lambda shape: shape[1],
        baseline="dense",
    )
)
