"""End-to-end train step of perfml.models.llama: forward, loss, backward and a fused AdamW step
on a batch of B sequences of T tokens; shape (B, T).

eager           fused=False: the plain-PyTorch model (HF LlamaForCausalLM's math, logits upcast
                to fp32 for the loss)
compile         torch.compile of that model
perfml          fused=True: perfml's RMSNorm, add + RMSNorm, RoPE, SwiGLU and linear
                cross-entropy (the [B*T, vocab] logits never exist)
perfml-compile  torch.compile of the fused model (the perfml ops stay opaque custom ops; Inductor
                fuses what lies between them)

The model is the smallest preset whose max_seq_len holds T: T <= 256 tiny (the CPU sizes),
T <= 1024 small, T <= 2048 llama-1b (the headline: 4 x 2048 tokens, the anchor's shape). Weights
are in the case dtype (bf16 on CUDA, as the anchor's runs), with torch's fused AdamW (lr 1e-5)
over them; every impl starts from the same seeded init, and its first step's loss is checked
against the eager model's.

Each timed call is one whole optimizer step: the loss passes through an identity whose backward
hands 1 upstream (the harness's random upstream gradient is ignored) and queues the optimizer step
and zero_grad(set_to_none=True) to run when the backward finishes. So between calls the device
holds only the weights and the optimizer state, and "peak MiB" is what one step adds on top of
them: activations, gradients and the optimizer's temporaries. The whole-step peak of the anchor
table is that plus weights and AdamW state (for llama-1b in bf16: 1.09e9 x 6 bytes = 6.1 GiB).

Throughput: tokens/s = B * T / (ms / 1000). TFLOP/s counts PaLM's model FLOPs per token
(Llama.flops_per_token: 6 x matmul parameters + attention's 12 x layers x hidden x T), so
"% matmul" is the model-FLOPs utilization against this card's measured bf16 matmul rate.

Anchor (ANCHORS.md, H200, llama-1b bf16, 4 x 2048, fused AdamW): HF eager 68.7k tokens/s at
28.3 GiB, torch.compile 85.5k at 19.5 GiB, Liger 89.3k at 12.5 GiB; perfml's target >= 100k
tokens/s with <= 12 GiB.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from perfml import _backend
from perfml.bench.cost import preset_for, train_step_flops
from perfml.bench.registry import Case, Impl, Shape, Sizes, register
from perfml.models.llama import Llama, LlamaConfig

_LR = 1e-5  # small: the timed steps must not walk the weights into overflow
_SEED = 0


@dataclass(frozen=True)
class _Spec:
    """The model an input batch is for (the token tensors alone cannot say the dtype)."""

    preset: str
    dtype: torch.dtype


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    b, t = shape
    preset = preset_for(t)
    ids = torch.randint(0, LlamaConfig.preset(preset).vocab_size, (b, t + 1), device=device)
    return _Spec(preset, dtype), ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _build(spec: _Spec, fused: bool, device: torch.device) -> Llama:
    gc.collect()  # the previous impl's model and optimizer state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(_SEED)
    with torch.device(device):
        model = Llama(LlamaConfig.preset(spec.preset, fused=fused))
    return model.to(spec.dtype)


class _StepAfterBackward(torch.autograd.Function):
    """Identity on the loss; its backward hands 1 upstream and queues `step` for the end of the
    backward pass (after every gradient has been accumulated)."""

    @staticmethod
    def forward(ctx: Any, loss: Tensor, step: Callable[[], None]) -> Tensor:
        ctx.step = step
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        torch.autograd.Variable._execution_engine.queue_callback(ctx.step)
        return torch.ones_like(grad), None


class _TrainStep:
    """fn(spec, input_ids, labels) -> loss; builds the model and optimizer on its first call."""

    def __init__(self, fused: bool, compiled: bool) -> None:
        self.fused = fused
        self.compiled = compiled
        self.forward: Callable[[Tensor, Tensor], Tensor] | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def _optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, spec: _Spec, input_ids: Tensor, labels: Tensor) -> Tensor:
        if self.forward is None:
            model = _build(spec, self.fused, input_ids.device)
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=_LR, fused=True)
            self.forward = torch.compile(model, dynamic=False) if self.compiled else model
        loss = self.forward(input_ids, labels)
        return _StepAfterBackward.apply(loss, self._optimizer_step)


def _reference(spec: _Spec, input_ids: Tensor, labels: Tensor) -> Tensor:
    """The eager model's first loss (its backward runs too, as the harness asks)."""
    model = _build(spec, False, input_ids.device)
    return _StepAfterBackward.apply(model(input_ids, labels), lambda: None)


def _impl(name: str, fused: bool, compiled: bool) -> Impl:
    def make() -> Callable[..., Any]:
        if compiled:
            torch._dynamo.reset()  # a fresh cache: no previous model's graphs, no recompile limit
        return _TrainStep(fused, compiled)

    def path(device: torch.device) -> str:
        chosen = _backend.select("rms_norm", device)
        return "triton-interpret" if chosen == "triton" and device.type == "cpu" else chosen

    return Impl(name, make=make, compiles=compiled, path=path if fused else None)


register(
    Case(
        name="train_step",
        family="model",
        description=(
            "Llama train step (forward, loss, backward, fused AdamW) on B x T tokens: llama-1b "
            "for T 2048, small for T <= 1024, tiny for T <= 256; shape (B, T)"
        ),
        sizes=Sizes(
            cuda=((4, 2048), (16, 1024)),
            cpu=((4, 128),),
            quick_cuda=((4, 2048),),
            quick_cpu=((2, 64),),
        ),
        make_inputs=_inputs,
        reference=_reference,
        impls=(
            _impl("eager", fused=False, compiled=False),
            _impl("compile", fused=False, compiled=True),
            _impl("perfml", fused=True, compiled=False),
            _impl("perfml-compile", fused=True, compiled=True),
        ),
        flops=train_step_flops,
        modes=("fwd+bwd",),
    )
)
