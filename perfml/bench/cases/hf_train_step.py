"""End-to-end train step of a Hugging Face LlamaForCausalLM: forward with labels, backward and a
fused AdamW step on a batch of B sequences of T tokens; shape (B, T).

eager           the HF model as users run it (SDPA attention, logits upcast to fp32 for the loss)
compile         torch.compile of that model
liger           Liger-Kernel patched into the instance (apply_liger_kernel_to_llama(model=...):
                RMSNorm, SwiGLU, RoPE, fused linear cross-entropy), CUDA and liger_kernel only
perfml          perfml.patch(model): RMSNorm, SwiGLU, RoPE and linear cross-entropy, so the
                [B*T, vocab] logits never exist
perfml-compile  torch.compile of the patched model

The model dims are those of perfml's own train_step case (perfml.models.llama presets, the smallest
whose max_seq_len holds T), so the two cases compare directly: the headline is llama-1b (hidden
2048, 12 layers, 16 heads, 8 KV heads, intermediate 5632, vocab 128256, untied head, 1.09e9
parameters) on 4 x 2048 tokens; the CPU sizes use the tiny preset. Weights in the case dtype (bf16
on CUDA) with torch's fused AdamW (lr 1e-5); every impl starts from the same seeded init, and its
first loss is checked against the eager model's.

Each timed call is one whole optimizer step, as in train_step: the loss passes through an identity
whose backward hands 1 upstream and queues optimizer.step() and zero_grad(set_to_none=True) for the
end of the backward. "peak MiB" is what one step adds on top of the weights and optimizer state
(for llama-1b in bf16 add 1.09e9 x 6 bytes = 6.1 GiB for the whole-step peak of the anchor table).
Throughput: tokens/s = B * T / (ms / 1000); TFLOP/s counts PaLM's model FLOPs (train_step's).

Liger patches module globals of transformers' modeling_llama for the whole process (the rotary
function, the norm and MLP classes); its impl runs inside a context that puts them back, so the
impls and shapes measured after it run the code they name.

Anchor (ANCHORS.md, H200, bf16, 4 x 2048): HF eager 68.7k tokens/s at 28.3 GiB, torch.compile
85.5k at 19.5 GiB, Liger 89.3k at 12.5 GiB; the perfml.patch target is >= 1.4x eager (>= 96k
tokens/s) with a peak <= Liger's 12.5 GiB.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from perfml import _backend
from perfml.bench.cases.train_step import _StepAfterBackward
from perfml.bench.cost import preset_for, train_step_flops
from perfml.bench.registry import Case, Impl, Shape, Sizes, register
from perfml.models.llama import LlamaConfig
from perfml.patch import patch

_LR = 1e-5  # small: the timed steps must not walk the weights into overflow
_SEED = 0


def hf_config(preset: str) -> Any:
    """transformers.LlamaConfig with the dims of perfml's preset `preset`."""
    import transformers

    c = LlamaConfig.preset(preset)
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_embeddings,
    )
    config._attn_implementation = "sdpa"
    return config


@dataclass(frozen=True)
class _Spec:
    """The model an input batch is for (the token tensor alone cannot say the dtype)."""

    preset: str
    dtype: torch.dtype


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    b, t = shape
    preset = preset_for(t)
    ids = torch.randint(0, LlamaConfig.preset(preset).vocab_size, (b, t), device=device)
    return _Spec(preset, dtype), ids  # labels = ids: HF shifts them inside the loss


def _build(spec: _Spec, device: torch.device) -> nn.Module:
    import transformers

    gc.collect()  # the previous impl's model and optimizer state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(_SEED)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_config(spec.preset))
    return model.to(spec.dtype).train()


def _liger(model: nn.Module) -> None:
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(
        rope=True,
        swiglu=True,
        rms_norm=True,
        cross_entropy=False,
        fused_linear_cross_entropy=True,
        model=model,
    )


def _perfml(model: nn.Module) -> None:
    patch(model)


class _TrainStep:
    """fn(spec, input_ids) -> loss; builds, patches and compiles the model on its first call."""

    def __init__(self, apply: Callable[[nn.Module], None] | None, compiled: bool) -> None:
        self.apply = apply
        self.compiled = compiled
        self.forward: Callable[..., Any] | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def _optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, spec: _Spec, input_ids: Tensor) -> Tensor:
        if self.forward is None:
            model = _build(spec, input_ids.device)
            if self.apply is not None:
                self.apply(model)
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=_LR, fused=True)
            self.forward = torch.compile(model, dynamic=False) if self.compiled else model
        loss = self.forward(input_ids=input_ids, labels=input_ids).loss
        return _StepAfterBackward.apply(loss, self._optimizer_step)


def _reference(spec: _Spec, input_ids: Tensor) -> Tensor:
    """The eager model's first loss (its backward runs too, as the harness asks)."""
    model = _build(spec, input_ids.device)
    return _StepAfterBackward.apply(model(input_ids=input_ids, labels=input_ids).loss, lambda: None)


@contextlib.contextmanager
def _modeling_llama_restored() -> Iterator[None]:
    """Put back the module globals of transformers' modeling_llama and loss code (and the
    LlamaForCausalLM forward) that a patch applied inside the block replaced."""
    from transformers.loss import loss_utils
    from transformers.models.llama import modeling_llama

    saved = [(module, dict(vars(module))) for module in (modeling_llama, loss_utils)]
    forward = modeling_llama.LlamaForCausalLM.forward
    try:
        yield
    finally:
        for module, names in saved:
            for name in set(vars(module)) - set(names):
                delattr(module, name)
            for name, value in names.items():
                setattr(module, name, value)
        modeling_llama.LlamaForCausalLM.forward = forward


def _no_transformers(device: torch.device) -> str | None:
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install perfml[hf])"
    return None


def _liger_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "liger runs CUDA tensors only"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not installed"
    return _no_transformers(device)


def _impl(
    name: str,
    apply: Callable[[nn.Module], None] | None,
    compiled: bool,
    unavailable: Callable[[torch.device], str | None] = _no_transformers,
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> Impl:
    def make() -> Callable[..., Any]:
        if compiled:
            torch._dynamo.reset()  # a fresh cache: no previous model's graphs, no recompile limit
        return _TrainStep(apply, compiled)

    def path(device: torch.device) -> str:
        chosen = _backend.select("rms_norm", device)
        return "triton-interpret" if chosen == "triton" and device.type == "cpu" else chosen

    return Impl(
        name,
        make=make,
        unavailable=unavailable,
        context=context,
        path=path if apply is _perfml else None,
        compiles=compiled,
    )


register(
    Case(
        name="hf_train_step",
        family="model",
        description=(
            "HF LlamaForCausalLM train step (forward with labels, backward, fused AdamW) on "
            "B x T tokens, train_step's dims (llama-1b for T 2048); eager, compile, Liger, "
            "perfml.patch; shape (B, T)"
        ),
        sizes=Sizes(
            cuda=((4, 2048),),
            cpu=((2, 128),),
            quick_cuda=((4, 2048),),
            quick_cpu=((2, 64),),
        ),
        make_inputs=_inputs,
        reference=_reference,
        impls=(
            _impl("eager", None, compiled=False),
            _impl("compile", None, compiled=True),
            _impl(
                "liger",
                _liger,
                compiled=False,
                unavailable=_liger_unavailable,
                context=_modeling_llama_restored,
            ),
            _impl("perfml", _perfml, compiled=False),
            _impl("perfml-compile", _perfml, compiled=True),
        ),
        flops=train_step_flops,
        modes=("fwd+bwd",),
    )
)
