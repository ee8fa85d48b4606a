"""perfml.patch / perfml.unpatch: swap perfml's fused kernels into an existing model, in place.

    report = perfml.patch(model)      # any nn.Module; Hugging Face transformers v5 models too
    print(report)                     # what was replaced, what was left and why
    perfml.unpatch(model)             # back to the original code, bit for bit

How: every swap replaces the `forward` of one module INSTANCE (an entry in its __dict__, which
Python finds before the class's method). No class, no transformers module global and no other
model in the process changes; the module objects, their Parameters (the same objects), buffers,
hooks and state_dict keys stay exactly as they were, so optimizers, PEFT/LoRA wrappers and
checkpoints keep working; unpatch deletes the entries. A module whose forward is already
overridden per instance (accelerate's device-map hooks do that) is left alone and reported.

What (each switch of `patch` turns one kind off):
  rms_norm     torch.nn.RMSNorm (F.rms_norm's casting) in any model; the RMSNorms of the HF
               families of the table below (`families()`), each with its cast: "llama" (normalize
               in fp32, round to the input dtype, then scale: Llama, Mistral, Qwen, Phi-3, ...),
               "gemma" (offset 1: weight stored as 1 + w, fp32 throughout: Gemma 1/2/3) or
               "fp32-weight" (fp32 times w, one rounding: OLMo 2/3, Helium; perfml's "gemma"
               cast with offset 0); a cast perfml.ops.rms_norm lacks is reported, not swapped
  layer_norm   torch.nn.LayerNorm over the last dimension, in any model (GPT-2's ln_1, ln_2, ln_f);
               OLMo's LayerNorm (no weight) and Cohere's (no bias)
  swiglu       HF gated MLPs: down(act(gate(x)) * up(x)) with act silu -> perfml.ops.swiglu, gelu
               tanh (Gemma's gelu_pytorch_tanh) -> geglu(approximate="tanh"), exact gelu ->
               geglu(approximate="none"); Phi-3's fused gate_up_proj is split by views, not copies
  rope         HF attention modules: the attention forward runs with `apply_rotary_pos_emb` bound
               to perfml.ops.rope (a copy of the same code object whose globals differ only in
               that name: the transformers module itself is not touched). The interleaved
               rotary of Cohere, GLM-4 (partial), Helium and DeepSeek-V3 (both of its functions)
               runs perfml.ops.rope(interleaved=True) with HF's tables made per feature, and
               DeepSeek-V3's output in HF's order. Layers that apply none (SmolLM3 and Exaone 4
               NoPE layers) are reported as left; at run time a layout the kernel (or HF's
               function) does not take runs HF's function
  cross_entropy, linear_cross_entropy
               HF causal-LM heads (XForCausalLM, GPT2LMHeadModel): see "The loss" below; an MoE
               head runs HF's loss when router logits are requested (its aux loss joins the loss)
MoE expert banks (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3) are reported as left: perfml has no
grouped kernel; their dense and shared-expert MLPs are swapped.

The loss. HF computes logits = lm_head(hidden) for every token, upcasts them to fp32 and then
takes the cross-entropy of logits[:, t] against labels[:, t + 1]. Patched, when labels are given:
  - logits skipped (linear_cross_entropy=True): perfml.ops.linear_cross_entropy(hidden,
    lm_head.weight, shifted labels) never materializes the [tokens, vocab] logits; the output's
    `logits` is None. This is the default in training mode (module.training), as in Liger-Kernel.
  - logits kept: in eval mode (evaluation loops compute metrics from the logits), or when the
    call passes return_logits=True (a keyword the patched forward accepts; return_logits=False
    skips them in eval mode too). The logits come from HF's own forward and, with
    cross_entropy=True, the loss from perfml.ops.cross_entropy on them.
Without labels nothing about the loss changes (generation runs HF's forward with the patched
norms, MLPs and rotary). The loss follows HF's ForCausalLMLoss: ignore_index, shift_labels and
num_items_in_batch (sum / num_items_in_batch, the gradient-accumulation normalization) keyword
arguments, Gemma2's final_logit_softcapping (the loss's softcap option), the scaled heads
(Granite divides the logits by logits_scaling, Cohere multiplies them by logit_scale: the fused
loss's logit_scale, applied before the softcap), a loss in fp32 (its value
rounded through the compute dtype: the fused losses return bf16 for bf16 inputs). HF's path runs
unchanged when the model has a custom loss_function, when lm_head is not a plain nn.Linear (a
LoRA-wrapped head: its weight alone would miss the adapter) or when logits_to_keep is set.

Numerics: the fused kernels compute in fp32 and round once, so results match HF's eager code
within the tolerance policy, not bit for bit (HF's RoPE and SwiGLU round every intermediate to
bf16); in fp32 they agree to ~1e-6. Under CUDA autocast, torch's own layer_norm / rms_norm run in
fp32, and so do the swapped torch.nn modules. The patched linear cross-entropy under autocast
casts hidden and lm_head.weight to the autocast dtype first, as the lm_head matmul would.

torch.compile: patch before or after compiling. A compiled model's `_orig_mod` is patched; if it
already ran, Dynamo's guards see the new forward and retrace (and see the old one again after
unpatch). The perfml ops are custom ops, so fullgraph=True holds where HF's own code allows it.

Limits: the attention forward sees the module's globals as of patch time (names rebound in the
transformers module later are not seen); pickling a whole patched model (torch.save(model)) fails
on the per-instance functions: save the state_dict, or unpatch first.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perfml.ops._norm import CASTS as _NORM_CASTS
from perfml.ops.cross_entropy import cross_entropy
from perfml.ops.layer_norm import layer_norm
from perfml.ops.linear_cross_entropy import linear_cross_entropy
from perfml.ops.rms_norm import rms_norm
from perfml.ops.rope import rope
from perfml.ops.swiglu import geglu, swiglu

SWITCHES = ("rms_norm", "layer_norm", "swiglu", "rope", "cross_entropy", "linear_cross_entropy")
_MARK = "_perfml_patch"  # instance attribute on every patched module: the kind(s) swapped in
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


# --- the report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchEntry:
    """One module: where it is, its class, which kind of swap, and a note (the detail of a
    replacement, or why a module was left as it was)."""

    path: str
    module: str
    kind: str
    note: str = ""


@dataclass
class PatchReport:
    """What `patch` did. `replaced`: modules whose forward now runs perfml kernels; `left`:
    modules it recognized but did not touch, each with the reason; `already_patched`: modules
    an earlier patch had swapped (a second patch changes nothing)."""

    architectures: list[str] = field(default_factory=list)
    replaced: list[PatchEntry] = field(default_factory=list)
    left: list[PatchEntry] = field(default_factory=list)
    already_patched: list[PatchEntry] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Replaced modules per kind."""
        out: dict[str, int] = defaultdict(int)
        for entry in self.replaced:
            out[entry.kind] += 1
        return dict(out)

    @property
    def noop(self) -> bool:
        """True when this call changed nothing because everything was already patched."""
        return not self.replaced and bool(self.already_patched)

    def __str__(self) -> str:
        arch = ", ".join(self.architectures) or "no Hugging Face model found"
        lines = [f"perfml.patch: {arch}"]
        if self.already_patched:
            changed = "nothing changed" if self.noop else "kept as they are"
            lines.append(
                f"  already patched: {len(self.already_patched)} swaps, {changed} "
                "(perfml.unpatch first to turn a kind off)"
            )
        lines += _section("replaced", self.replaced)
        lines += _section("left", self.left)
        if not self.replaced and not self.already_patched:
            lines.append("  nothing replaced")
        return "\n".join(lines)


def _section(title: str, entries: list[PatchEntry]) -> list[str]:
    if not entries:
        return []
    groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for e in entries:
        groups[(e.kind, e.module, e.note)].append(e.path or "(root)")
    lines = [f"  {title} ({len(entries)}):"]
    for (kind, module, note), paths in groups.items():
        shown = ", ".join(paths[:3]) + (f", ... ({len(paths)} in all)" if len(paths) > 3 else "")
        lines.append(
            f"    {kind:<21} {len(paths):>3} x {module}: {shown}" + (f" -- {note}" if note else "")
        )
    return lines


# --- replacement forwards: norms --------------------------------------------------------------


def _cuda_autocast(x: Tensor) -> bool:
    # CUDA autocast runs layer_norm and rms_norm in fp32; CPU autocast leaves them alone
    return x.device.type == "cuda" and torch.is_autocast_enabled("cuda")


def _hf_rms_norm_forward(cast: str, offset: float, eps_attr: str) -> Callable[..., Tensor]:
    def forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
        if hidden_states.dtype not in _FLOATS:
            return type(self).forward(self, hidden_states)
        return rms_norm(hidden_states, self.weight, getattr(self, eps_attr), offset, cast)

    return forward


@functools.cache
def _hf_norm_forward(
    op: str, cast: str | None, offset: float, eps_attr: str | None, eps: float | None
) -> Callable[..., Tensor]:
    """One forward per norm kind of the family table, shared by the modules that use it."""
    if op == "rms_norm":
        assert cast is not None and eps_attr is not None
        return _hf_rms_norm_forward(cast, offset, eps_attr)

    def forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
        weight = getattr(self, "weight", None)
        if hidden_states.dtype not in _FLOATS or (
            weight is not None and weight.dtype != hidden_states.dtype
        ):
            return type(self).forward(self, hidden_states)
        return layer_norm(hidden_states, weight, None, getattr(self, eps_attr) if eps_attr else eps)

    return forward


def _torch_rms_norm_forward(self: nn.RMSNorm, x: Tensor) -> Tensor:
    if x.dtype not in _FLOATS or x.dim() == 0 or x.shape[-1] != self.normalized_shape[0]:
        return nn.RMSNorm.forward(self, x)  # torch's own error for a wrong shape
    weight = self.weight
    if _cuda_autocast(x):
        x, weight = x.float(), weight.float() if weight is not None else None
    elif weight is not None and weight.dtype != x.dtype:
        return nn.RMSNorm.forward(self, x)  # torch's mixed-dtype result has its own rounding
    eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
    return rms_norm(x, weight, eps, 0.0, "none")


def _torch_layer_norm_forward(self: nn.LayerNorm, x: Tensor) -> Tensor:
    if x.dtype not in _FLOATS or x.dim() == 0 or x.shape[-1] != self.normalized_shape[0]:
        return nn.LayerNorm.forward(self, x)
    weight, bias = self.weight, self.bias
    if _cuda_autocast(x):
        x = x.float()
        weight = weight.float() if weight is not None else None
        bias = bias.float() if bias is not None else None
    return layer_norm(x, weight, bias, self.eps)


# --- replacement forwards: gated MLPs ---------------------------------------------------------


def _glu_for(act: nn.Module) -> tuple[str, Callable[[Tensor, Tensor], Tensor]] | None:
    """The fused gated activation equal to act(gate) * up, or None. Activations are recognized
    by class (transformers' by name, so this module never imports transformers)."""
    name = type(act).__name__
    from_hf = type(act).__module__.startswith("transformers.")
    # Gate and up are fresh projection outputs that only the activation reads, so its backward
    # may write the gradients over them (perfml.nn.SwiGLUMLP does the same)
    if isinstance(act, nn.SiLU) or (from_hf and name == "SiLUActivation"):
        return "swiglu", functools.partial(swiglu, inplace_backward=True)
    tanh = isinstance(act, nn.GELU) and act.approximate == "tanh"
    if tanh or (from_hf and name in ("GELUTanh", "NewGELUActivation", "FastGELUActivation")):
        return "geglu(tanh)", functools.partial(geglu, approximate="tanh", inplace_backward=True)
    exact = isinstance(act, nn.GELU) and act.approximate == "none"
    if exact or (from_hf and name == "GELUActivation"):
        return "geglu", functools.partial(geglu, approximate="none", inplace_backward=True)
    return None


def _gated_mlp_forward(glu: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., Tensor]:
    def forward(self: nn.Module, x: Tensor) -> Tensor:
        return self.down_proj(glu(self.gate_proj(x), self.up_proj(x)))

    return forward


def _fused_gate_up_mlp_forward(glu: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., Tensor]:
    def forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
        # [.., 2I] -> two [.., I] views read in place by the kernel (no copy)
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(glu(gate, up))

    return forward


# --- replacement forwards: rotary -------------------------------------------------------------


def _rope_fits(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int) -> bool:
    """Whether perfml.ops.rope takes these arguments; anything else runs HF's function."""
    if unsqueeze_dim not in (1, 2) or q.dim() != 4 or k.dim() != 4:
        return False
    if q.dtype not in _FLOATS or k.dtype != q.dtype:
        return False
    if cos.dim() != 3 or cos.shape != sin.shape or cos.dtype != sin.dtype:
        return False
    if (
        cos.dtype not in (torch.float32, q.dtype)
        or not q.device == k.device == cos.device == sin.device
    ):
        return False
    r = cos.shape[-1]
    if r % 2 or not 2 <= r <= q.shape[-1]:
        return False
    return not (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))


# Rotary layouts of the HF families: how the tables come (cos / sin as HF's rotary embedding
# builds them) and which pairs rotate. "halves": rotate_half over cat(freqs, freqs) tables, any
# width <= head_dim (partial rotary). "interleaved": pairs (2i, 2i+1) with one value per
# feature (Cohere's repeat_interleave'd tables), full width. "interleaved-cat": pairs (2i, 2i+1)
# over cat(freqs, freqs) tables, which HF turns into per-feature ones with
# t[..., :r // 2].repeat_interleave(2) (GLM-4: partial rotary over the first r features);
# "interleaved-cat-full": the same, full width only (Helium: HF's function has no partial
# rotary); "interleaved-cat-split": the same, full width, the output in HF's order: the rotated
# even features, then the rotated odd ones (DeepSeek-V3's apply_rotary_pos_emb_interleave).
_ROPE_LAYOUTS = (
    "halves",
    "interleaved",
    "interleaved-cat",
    "interleaved-cat-full",
    "interleaved-cat-split",
)
_ROPE_PARAMS = ["q", "k", "cos", "sin", "unsqueeze_dim"]
_ROPE_PARAMS_WITH_POSITIONS = ["q", "k", "cos", "sin", "position_ids", "unsqueeze_dim"]


def _per_feature(t: Tensor) -> Tensor:
    # cat(freqs, freqs) -> one value per feature of the pairs (2i, 2i+1): HF's own line
    return t[..., : t.shape[-1] // 2].repeat_interleave(2, dim=-1)


def _rope_interleaved_cat(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, u: int
) -> tuple[Tensor, Tensor]:
    r = cos.shape[-1]  # rotates the first r features (GLM-4's partial rotary)
    c, s = _per_feature(cos), _per_feature(sin)
    return rope(q, k, c, s, unsqueeze_dim=u, interleaved=True, rotary_dim=r)


def _fused_rotary(
    original: Callable[..., Any], layout: str
) -> Callable[..., tuple[Tensor, Tensor]]:
    """HF's rotary function `original` of `layout` computed by perfml.ops.rope; arguments the
    kernel (or HF's function) does not take run `original`.

    One wrapper per layout, each calling its layout's module-level function by name: the traced
    path must not read the closure variable `original` (Dynamo guards a closure through the
    module's own name, where the function is still HF's), so torch.compile(fullgraph=True) traces
    the patched model; `original` is reached only on the fallback path."""
    if layout not in _ROPE_LAYOUTS:
        raise ValueError(f"unknown rope layout {layout!r}; known: {', '.join(_ROPE_LAYOUTS)}")

    if layout == "interleaved-cat-split":  # HF's signature takes (and ignores) position_ids

        def apply_rotary_pos_emb_interleave(
            q: Tensor,
            k: Tensor,
            cos: Tensor,
            sin: Tensor,
            position_ids: Tensor | None = None,
            unsqueeze_dim: int = 1,
        ) -> tuple[Tensor, Tensor]:
            if (
                position_ids is None
                and cos.shape[-1] == q.shape[-1]
                and _rope_fits(q, k, cos, sin, unsqueeze_dim)
            ):
                q_out, k_out = _rope_interleaved_cat(q, k, cos, sin, unsqueeze_dim)
                # HF's order: the rotated even features, then the rotated odd ones
                return (
                    torch.cat([q_out[..., 0::2], q_out[..., 1::2]], dim=-1),
                    torch.cat([k_out[..., 0::2], k_out[..., 1::2]], dim=-1),
                )
            return original(q, k, cos, sin, position_ids, unsqueeze_dim)

        return apply_rotary_pos_emb_interleave

    if layout == "halves":

        def apply_rotary_pos_emb(
            q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
        ) -> tuple[Tensor, Tensor]:
            if _rope_fits(q, k, cos, sin, unsqueeze_dim):
                return rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
            return original(q, k, cos, sin, unsqueeze_dim)

        return apply_rotary_pos_emb

    if layout == "interleaved":  # a table per feature already (Cohere), full width only

        def apply_rotary_pos_emb_pairs(
            q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
        ) -> tuple[Tensor, Tensor]:
            if cos.shape[-1] == q.shape[-1] and _rope_fits(q, k, cos, sin, unsqueeze_dim):
                return rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, interleaved=True)
            return original(q, k, cos, sin, unsqueeze_dim)

        return apply_rotary_pos_emb_pairs

    if layout == "interleaved-cat":  # cat(freqs, freqs), partial rotary allowed (GLM-4)

        def apply_rotary_pos_emb_pairs_cat(
            q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
        ) -> tuple[Tensor, Tensor]:
            if _rope_fits(q, k, cos, sin, unsqueeze_dim):
                return _rope_interleaved_cat(q, k, cos, sin, unsqueeze_dim)
            return original(q, k, cos, sin, unsqueeze_dim)

        return apply_rotary_pos_emb_pairs_cat

    # "interleaved-cat-full": cat(freqs, freqs), full width only (Helium)
    def apply_rotary_pos_emb_pairs_cat_full(
        q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
    ) -> tuple[Tensor, Tensor]:
        if cos.shape[-1] == q.shape[-1] and _rope_fits(q, k, cos, sin, unsqueeze_dim):
            return _rope_interleaved_cat(q, k, cos, sin, unsqueeze_dim)
        return original(q, k, cos, sin, unsqueeze_dim)

    return apply_rotary_pos_emb_pairs_cat_full


_rope_forwards: dict[
    tuple[Callable[..., Any], tuple[tuple[str, str], ...]], Callable[..., Any]
] = {}


def _rope_attention_forward(
    cls: type, bindings: tuple[tuple[str, str], ...]
) -> tuple[Callable[..., Any] | None, str]:
    """cls.forward rebuilt with each rotary function name of `bindings` ((name, layout) pairs)
    that it calls bound to the fused rotary of that layout, or the reason it cannot be. One
    function per class, shared by its instances."""
    fn = cls.forward
    if inspect.unwrap(fn) is not fn:
        return None, "the attention forward is wrapped by a decorator"
    called = tuple((n, layout) for n, layout in bindings if n in fn.__code__.co_names)
    if not called:
        names = " or ".join(n for n, _ in bindings)
        return None, f"the attention forward does not call {names}"
    for name, layout in called:
        original = fn.__globals__.get(name)
        if not callable(original):
            return None, f"{name} is not a function in {fn.__module__}"
        params = _ROPE_PARAMS_WITH_POSITIONS if layout == "interleaved-cat-split" else _ROPE_PARAMS
        if list(inspect.signature(original).parameters) != params:
            return None, f"{name} has an unexpected signature"
    if (fn, called) not in _rope_forwards:
        scope = dict(fn.__globals__)
        for name, layout in called:
            scope[name] = _fused_rotary(fn.__globals__[name], layout)
        rebuilt = types.FunctionType(
            fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__
        )
        rebuilt.__kwdefaults__ = fn.__kwdefaults__
        _rope_forwards[fn, called] = functools.update_wrapper(rebuilt, fn)
    return _rope_forwards[fn, called], ""


# --- replacement forward: the causal-LM loss --------------------------------------------------


@dataclass(frozen=True)
class _CausalLMSpec:
    """What the patched causal-LM forward needs, found once at patch time."""

    names: tuple[str, ...]  # the original forward's named parameters after self, in order
    output: type  # its ModelOutput class
    fields: tuple[str, ...]  # that class's fields, in order (Dynamo cannot list them itself)
    softcap_attr: str | None  # config attribute of a final logit softcap (Gemma2)
    fuse_linear: bool  # linear_cross_entropy switch
    fuse_logits: bool  # cross_entropy switch
    router_logits: bool = False  # HF's loss runs when router logits are requested (MoE)
    # the factor HF's head multiplies the logits by, read from the module (Granite, Cohere)
    logit_scale: Callable[[nn.Module], float] | None = None


def _shifted_labels(labels: Tensor, ignore_index: int, shift_labels: Tensor | None) -> Tensor:
    # HF's ForCausalLMLoss: position t predicts labels[t + 1]; the last position is ignored
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _normalize(loss: Tensor, num_items_in_batch: Tensor | int | None) -> Tensor:
    loss = loss.float()
    if num_items_in_batch is None:
        return loss
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _loss_options(extra: dict[str, Any]) -> tuple[int, Tensor | None, Any]:
    return (
        extra.get("ignore_index", -100),
        extra.get("shift_labels"),
        extra.get("num_items_in_batch"),
    )


def _head_linear_loss(
    model: nn.Module,
    hidden: Tensor,
    labels: Tensor,
    softcap: float | None,
    extra: dict[str, Any],
    logit_scale: float = 1.0,
) -> Tensor:
    ignore_index, shift_labels, num_items = _loss_options(extra)
    head = model.lm_head
    weight, bias = head.weight, head.bias
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    target = _shifted_labels(labels, ignore_index, shift_labels).to(hidden.device)
    loss = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        target,
        bias,
        ignore_index=ignore_index,
        reduction="mean" if num_items is None else "sum",
        softcap=softcap,
        logit_scale=logit_scale,
    )
    return _normalize(loss, num_items)


def _logits_loss(logits: Tensor, labels: Tensor, extra: dict[str, Any]) -> Tensor:
    # HF's forward made these logits, already scaled (Granite, Cohere): no logit_scale here
    ignore_index, shift_labels, num_items = _loss_options(extra)
    target = _shifted_labels(labels, ignore_index, shift_labels).to(logits.device)
    loss = cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        target,
        ignore_index=ignore_index,
        reduction="mean" if num_items is None else "sum",
    )
    return _normalize(loss, num_items)


def _router_logits_requested(model: nn.Module, call: dict[str, Any]) -> bool:
    """Whether this call of an MoE head computes router logits, whose aux loss HF adds to the
    loss (its own forward then runs: the patched loss would miss it)."""
    want = call.get("output_router_logits")
    if want is None:
        want = getattr(model.config, "output_router_logits", False)
    return bool(want)


def _hf_loss_is_default(model: nn.Module) -> bool:
    """True when the model computes HF's ForCausalLMLoss (no custom loss_function)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return getattr(model, "_loss_function", None) is None and model.loss_function is ForCausalLMLoss


def _output(spec: _CausalLMSpec, source: Any, **values: Any) -> Any:
    # A fresh output, so that `loss` takes its place first in to_tuple(), as in HF's
    return spec.output(**{**{name: getattr(source, name, None) for name in spec.fields}, **values})


def _causal_lm_forward_for(cls: type) -> Callable[..., Any]:
    """The patched forward for one causal-LM class, carrying the original's signature
    (generation inspects it, e.g. for logits_to_keep)."""
    if cls not in _causal_lm_forwards:

        @functools.wraps(cls.forward)
        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return _causal_lm_forward(self, *args, **kwargs)

        _causal_lm_forwards[cls] = forward
    return _causal_lm_forwards[cls]


_causal_lm_forwards: dict[type, Callable[..., Any]] = {}


def _causal_lm_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    spec: _CausalLMSpec = self._perfml_causal_lm
    return_logits = kwargs.pop("return_logits", None)
    if len(args) > len(spec.names):
        raise TypeError(f"{type(self).__name__}.forward got {len(args)} positional arguments")
    call = dict(zip(spec.names[: len(args)], args, strict=True))
    for name, value in kwargs.items():
        if name in call:
            raise TypeError(f"{type(self).__name__}.forward got multiple values for {name!r}")
        call[name] = value
    labels = call.get("labels")
    if labels is None or (spec.router_logits and _router_logits_requested(self, call)):
        return type(self).forward(self, *args, **kwargs)
    return_dict = call.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    keep_logits = (not self.training) if return_logits is None else bool(return_logits)
    logits_to_keep = call.get("logits_to_keep", 0)
    hf_loss = _hf_loss_is_default(self)
    extra = {k: v for k, v in call.items() if k not in spec.names}
    if (
        spec.fuse_linear
        and not keep_logits
        and hf_loss
        and type(self.lm_head) is nn.Linear
        and isinstance(logits_to_keep, int)
        and logits_to_keep == 0
    ):
        base_args = {k: v for k, v in call.items() if k not in ("labels", "logits_to_keep")}
        outputs = getattr(self, self.base_model_prefix)(**base_args)
        softcap = getattr(self.config, spec.softcap_attr) if spec.softcap_attr else None
        scale = spec.logit_scale(self) if spec.logit_scale else 1.0
        loss = _head_linear_loss(self, outputs.last_hidden_state, labels, softcap, extra, scale)
        out = _output(spec, outputs, loss=loss, logits=None)
    elif spec.fuse_logits and hf_loss:
        out = type(self).forward(self, **{**call, "labels": None, "return_dict": True})
        out = _output(spec, out, loss=_logits_loss(out.logits, labels, extra))
    else:
        out = type(self).forward(self, **call, return_dict=True)
    return out if return_dict else out.to_tuple()


# --- recognizing modules: the family table --------------------------------------------------


def _no_rope_when(attr: str, why: str) -> Callable[[nn.Module], str | None]:
    """A per-layer check: the reason this attention layer applies no rotary, when `attr` of the
    module is false."""

    def check(module: nn.Module) -> str | None:
        return None if getattr(module, attr, True) else why

    return check


def _exaone4_rope(module: nn.Module) -> str | None:
    # Exaone 4 rotates only in its sliding-window layers when a window is configured
    if getattr(module, "sliding_window", None) is None or getattr(module, "is_sliding", False):
        return None
    return "no rotary in this layer (a global-attention NoPE layer)"


def _granite_logit_scale(head: nn.Module) -> float:
    return 1.0 / head.config.logits_scaling  # HF: logits = lm_head(h) / config.logits_scaling


def _cohere_logit_scale(head: nn.Module) -> float:
    # HF: logits = lm_head(h) * self.logit_scale (the head's copy of config.logit_scale)
    return head.logit_scale


@dataclass(frozen=True)
class HFFamily:
    """What `patch` knows of one Hugging Face decoder family (transformers.models.<package>):
    the class name of each kind of module (prefix + suffix), how its norm rounds, where its
    eps and activation live, which rotary function its attention calls, and what is left as
    HF's code and why."""

    package: str
    prefix: str
    # norm: "llama" (normalize in fp32, round to the input dtype, times w), "gemma" (fp32
    # throughout, times 1 + w), "fp32-weight" (fp32 normalized times w, one rounding: OLMo 2/3),
    # "layer_norm" (fp32 LayerNorm, optional weight, no bias: OLMo, Cohere) or None (no family
    # norm: torch.nn.LayerNorm modules are swapped as in any model)
    norm: str | None = "llama"
    norm_suffixes: tuple[str, ...] = ("RMSNorm",)
    eps_attr: str | None = "variance_epsilon"
    eps: float | None = None  # the fixed eps of a norm without an eps attribute (OLMo)
    mlp_suffixes: tuple[str, ...] = ("MLP",)
    act_attr: str = "act_fn"
    fused_gate_up: bool = False  # one gate_up_proj (Phi-3, GLM-4) instead of gate_proj, up_proj
    attention_suffixes: tuple[str, ...] = ("Attention",)
    rope: str = "apply_rotary_pos_emb"  # the rotary function the attention forward calls
    rope_layout: str = "halves"  # its layout (_ROPE_LAYOUTS)
    # other rotary functions the attention forward may call instead, each with its layout
    rope_also: tuple[tuple[str, str], ...] = ()
    rope_unsupported: str | None = None  # why the rotary stays HF's in every layer
    rope_skip: Callable[[nn.Module], str | None] | None = None  # per layer: why no rotary there
    experts_suffixes: tuple[str, ...] = ()  # MoE expert banks: left as HF's, reported
    causal_lm: str | None = None  # class name of the causal-LM head (default <prefix>ForCausalLM)
    softcap: str | None = None  # config attribute of a final logit softcap (Gemma2)
    loss_unsupported: str | None = None  # why the loss stays HF's
    # the factor HF's head multiplies the logits by, read from the causal-LM module at each
    # call (Granite divides them by config.logits_scaling, Cohere multiplies them by logit_scale)
    logit_scale: Callable[[nn.Module], float] | None = None
    router_aux_loss: bool = False  # HF adds a router aux loss when router logits are requested


# norm kind -> the perfml op, its cast and its offset
_NORMS: dict[str, tuple[str, str | None, float]] = {
    "llama": ("rms_norm", "llama", 0.0),
    "gemma": ("rms_norm", "gemma", 1.0),
    # perfml's "gemma" cast is fp32 throughout with one rounding; offset 0 leaves w as it is
    "fp32-weight": ("rms_norm", "gemma", 0.0),
    "layer_norm": ("layer_norm", None, 0.0),
}

_MOE_EXPERTS = "MoE experts (3-D expert weights, routed tokens): no grouped kernel in perfml"

_FAMILY_TABLE: tuple[HFFamily, ...] = (
    HFFamily("llama", "Llama"),
    HFFamily("mistral", "Mistral"),
    HFFamily("ministral", "Ministral"),
    HFFamily("qwen2", "Qwen2"),
    HFFamily("qwen3", "Qwen3"),
    HFFamily("gemma", "Gemma", norm="gemma", eps_attr="eps"),
    HFFamily("gemma2", "Gemma2", norm="gemma", eps_attr="eps", softcap="final_logit_softcapping"),
    HFFamily("gemma3", "Gemma3", norm="gemma", eps_attr="eps", softcap="final_logit_softcapping"),
    HFFamily("phi3", "Phi3", act_attr="activation_fn", fused_gate_up=True),
    HFFamily("gpt2", "GPT2", norm=None, causal_lm="GPT2LMHeadModel"),
    HFFamily(
        "smollm3",
        "SmolLM3",
        rope_skip=_no_rope_when("use_rope", "no rotary in this layer (a NoPE layer)"),
    ),
    HFFamily(
        "olmo", "Olmo", norm="layer_norm", norm_suffixes=("LayerNorm",), eps_attr=None, eps=1e-5
    ),
    HFFamily("olmo2", "Olmo2", norm="fp32-weight"),
    HFFamily("olmo3", "Olmo3", norm="fp32-weight"),
    HFFamily("stablelm", "StableLm", norm=None),
    HFFamily("exaone4", "Exaone4", rope_skip=_exaone4_rope),
    HFFamily("hunyuan_v1_dense", "HunYuanDenseV1"),
    HFFamily("helium", "Helium", norm="fp32-weight", rope_layout="interleaved-cat-full"),
    HFFamily("seed_oss", "SeedOss"),
    HFFamily("granite", "Granite", logit_scale=_granite_logit_scale),
    HFFamily(
        "cohere",
        "Cohere",
        norm="layer_norm",
        norm_suffixes=("LayerNorm",),
        rope_layout="interleaved",
        logit_scale=_cohere_logit_scale,
    ),
    HFFamily(
        "glm4",
        "Glm4",
        act_attr="activation_fn",
        fused_gate_up=True,
        rope_layout="interleaved-cat",
    ),
    HFFamily("mixtral", "Mixtral", experts_suffixes=("Experts",), router_aux_loss=True),
    HFFamily("qwen2_moe", "Qwen2Moe", experts_suffixes=("Experts",), router_aux_loss=True),
    HFFamily("qwen3_moe", "Qwen3Moe", experts_suffixes=("Experts",), router_aux_loss=True),
    HFFamily("olmoe", "Olmoe", experts_suffixes=("Experts",), router_aux_loss=True),
    HFFamily(
        "deepseek_v3",
        "DeepseekV3",
        experts_suffixes=("Experts",),
        # rope_interleave=True (the default) calls the interleaved function
        rope_also=(("apply_rotary_pos_emb_interleave", "interleaved-cat-split"),),
    ),
)


# Hugging Face families by the name of their transformers.models.<family> package
_HF_FAMILIES: dict[str, HFFamily] = {f.package: f for f in _FAMILY_TABLE}


def families() -> tuple[HFFamily, ...]:
    """The family table: every Hugging Face decoder family `patch` knows."""
    return _FAMILY_TABLE


def _hf_family(cls: type) -> str | None:
    """'llama' for transformers.models.llama.modeling_llama.*, else None."""
    parts = cls.__module__.split(".")
    if (
        len(parts) == 4
        and parts[:2] == ["transformers", "models"]
        and parts[3].startswith("modeling_")
    ):
        return parts[2]
    return None


def _hf_role(cls: type, family: str) -> str | None:
    """Which kind of module cls is within a known family: 'norm', 'mlp', 'experts',
    'attention', 'causal_lm', or None."""
    spec = _HF_FAMILIES[family]
    p = spec.prefix
    name = cls.__name__
    if name == (spec.causal_lm or f"{p}ForCausalLM"):
        return "causal_lm"
    for role, suffixes in (
        ("norm", spec.norm_suffixes if spec.norm else ()),
        ("mlp", spec.mlp_suffixes),
        ("experts", spec.experts_suffixes),
        ("attention", spec.attention_suffixes),
    ):
        if any(name == p + suffix for suffix in suffixes):
            return role
    return None


def _unknown_role(cls: type) -> str | None:
    name = cls.__name__
    for suffix, role in (
        ("RMSNorm", "rms_norm"),
        ("LayerNorm", "layer_norm"),
        ("MLP", "mlp"),
        ("Attention", "attention"),
    ):
        if name.endswith(suffix):
            return role
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal_lm"
    return None


class _Patcher:
    def __init__(self, switches: dict[str, bool]) -> None:
        self.on = switches
        self.report = PatchReport()
        self.families: set[str] = set()

    def leave(self, path: str, module: nn.Module, kind: str, why: str) -> None:
        self.report.left.append(PatchEntry(path, type(module).__name__, kind, why))

    def swap(
        self, path: str, module: nn.Module, kinds: tuple[str, ...], forward: Callable, note: str
    ) -> None:
        if "forward" in module.__dict__:
            for kind in kinds:
                self.leave(path, module, kind, "its forward is already overridden on the instance")
            return
        module.forward = types.MethodType(forward, module)
        module.__dict__[_MARK] = kinds
        for kind in kinds:
            self.report.replaced.append(PatchEntry(path, type(module).__name__, kind, note))

    def visit(self, path: str, module: nn.Module) -> None:
        cls = type(module)
        family = _hf_family(cls)
        known = family in _HF_FAMILIES
        if (
            family is not None
            and hasattr(module, "base_model_prefix")
            and family not in self.families
        ):
            self.families.add(family)  # the outermost model of the family comes first
            arch = f"{family} ({cls.__name__})"
            self.report.architectures.append(arch if known else f"unknown architecture {arch}")
        if _MARK in module.__dict__:
            for kind in module.__dict__[_MARK]:
                self.report.already_patched.append(PatchEntry(path, cls.__name__, kind))
            return
        if cls.forward is nn.RMSNorm.forward and isinstance(module, nn.RMSNorm):
            self.torch_norm(path, module, "rms_norm", _torch_rms_norm_forward)
        elif cls.forward is nn.LayerNorm.forward and isinstance(module, nn.LayerNorm):
            self.torch_norm(path, module, "layer_norm", _torch_layer_norm_forward)
        elif family is not None and not known:
            role = _unknown_role(cls)
            if role is not None:
                self.leave(path, module, role, f"architecture {family!r} is not supported")
        elif family is not None:
            self.hf_module(path, module, family)

    def hf_module(self, path: str, module: nn.Module, family: str) -> None:
        spec = _HF_FAMILIES[family]
        role = _hf_role(type(module), family)
        if role == "causal_lm":
            self.causal_lm(path, module, spec)
        elif role == "norm":
            self.hf_norm(path, module, spec)
        elif role == "mlp":
            self.mlp(path, module, spec)
        elif role == "experts":
            self.leave(path, module, "swiglu", _MOE_EXPERTS)
        elif role == "attention":
            self.attention(path, module, spec)

    def torch_norm(self, path: str, module: nn.Module, kind: str, forward: Callable) -> None:
        if not self.on[kind]:
            self.leave(path, module, kind, f"{kind}=False")
        elif len(module.normalized_shape) != 1:
            self.leave(path, module, kind, "normalizes over several dimensions")
        else:
            self.swap(path, module, (kind,), forward, f"torch.nn.{type(module).__name__}")

    def hf_norm(self, path: str, module: nn.Module, spec: HFFamily) -> None:
        assert spec.norm is not None
        op, cast, offset = _NORMS.get(spec.norm, ("rms_norm", spec.norm, 0.0))
        weight = getattr(module, "weight", None)
        eps = getattr(module, spec.eps_attr, None) if spec.eps_attr else spec.eps
        if not self.on[op]:
            self.leave(path, module, op, f"{op}=False")
        elif op == "rms_norm" and cast not in _NORM_CASTS:
            self.leave(path, module, op, f"norm not swapped: cast {spec.norm} unsupported")
        elif weight is None and op == "layer_norm" and "weight" not in module._parameters:
            # a LayerNorm without a learnable weight (OLMo)
            if not isinstance(eps, float):
                self.leave(path, module, op, f"no float {spec.eps_attr}")
            else:
                self.swap(
                    path,
                    module,
                    (op,),
                    _hf_norm_forward(op, cast, offset, spec.eps_attr, eps),
                    "no weight, no bias",
                )
        elif not isinstance(weight, nn.Parameter) or weight.dim() != 1:
            self.leave(path, module, op, "no 1-D weight")
        elif not isinstance(eps, float):
            self.leave(path, module, op, f"no float {spec.eps_attr}")
        else:
            note = {
                "llama": "cast=llama",
                "gemma": "cast=gemma, offset=1",
                "fp32-weight": "cast=gemma, offset=0 (fp32 times w, one rounding)",
                "layer_norm": "no bias",
            }.get(spec.norm, f"cast={cast}")
            forward = _hf_norm_forward(op, cast, offset, spec.eps_attr, eps)
            self.swap(path, module, (op,), forward, note)

    def mlp(self, path: str, module: nn.Module, spec: HFFamily) -> None:
        act = getattr(module, spec.act_attr, None)
        projections = (
            ("gate_up_proj", "down_proj")
            if spec.fused_gate_up
            else ("gate_proj", "up_proj", "down_proj")
        )
        glu = _glu_for(act) if isinstance(act, nn.Module) else None
        if not all(isinstance(getattr(module, p, None), nn.Module) for p in projections):
            self.leave(path, module, "swiglu", "not a gated MLP (no gate and up projections)")
        elif not self.on["swiglu"]:
            self.leave(path, module, "swiglu", "swiglu=False")
        elif glu is None:
            self.leave(path, module, "swiglu", f"no fused kernel for {type(act).__name__}")
        else:
            make = _fused_gate_up_mlp_forward if spec.fused_gate_up else _gated_mlp_forward
            self.swap(path, module, ("swiglu",), make(glu[1]), glu[0])

    def attention(self, path: str, module: nn.Module, spec: HFFamily) -> None:
        if spec.rope not in type(module).forward.__code__.co_names:
            return  # no rotary in this attention (GPT-2): nothing to report
        why = spec.rope_unsupported or (spec.rope_skip(module) if spec.rope_skip else None)
        if why:
            self.leave(path, module, "rope", why)
            return
        if not self.on["rope"]:
            self.leave(path, module, "rope", "rope=False")
            return
        bindings = ((spec.rope, spec.rope_layout), *spec.rope_also)
        forward, why = _rope_attention_forward(type(module), bindings)
        if forward is None:
            self.leave(path, module, "rope", why)
        else:
            code = type(module).forward.__code__.co_names
            note = ", ".join(
                f"{n} -> perfml.ops.rope" + ("" if layout == "halves" else "(interleaved=True)")
                for n, layout in bindings
                if n in code
            )
            self.swap(path, module, ("rope",), forward, note)

    def causal_lm(self, path: str, module: nn.Module, family: HFFamily) -> None:
        kinds = tuple(k for k in ("linear_cross_entropy", "cross_entropy") if self.on[k])
        for kind in ("linear_cross_entropy", "cross_entropy"):
            if not self.on[kind]:
                self.leave(path, module, kind, f"{kind}=False")
            elif family.loss_unsupported:
                self.leave(path, module, kind, f"loss not swapped: {family.loss_unsupported}")
        if not kinds or family.loss_unsupported:
            return
        spec, why = _causal_lm_spec(module, family)
        if spec is None:
            for kind in kinds:
                self.leave(path, module, kind, why)
            return
        spec = dataclasses.replace(
            spec,
            fuse_linear="linear_cross_entropy" in kinds,
            fuse_logits="cross_entropy" in kinds,
        )
        notes = {
            "linear_cross_entropy": "labels given in training mode: no logits",
            "cross_entropy": "labels given with logits kept (eval mode, return_logits=True)",
        }
        if family.router_aux_loss:
            notes = {
                k: v + "; HF's loss when router logits are requested (the aux loss joins it)"
                for k, v in notes.items()
            }
        before = len(self.report.replaced)
        self.swap(path, module, kinds, _causal_lm_forward_for(type(module)), "")
        if len(self.report.replaced) > before:
            module.__dict__["_perfml_causal_lm"] = spec
            self.report.replaced[before:] = [
                dataclasses.replace(e, note=notes[e.kind]) for e in self.report.replaced[before:]
            ]


def _causal_lm_spec(module: nn.Module, family: HFFamily) -> tuple[_CausalLMSpec | None, str]:
    """Checks that the head is what the patched forward expects; the reason when it is not."""
    params = inspect.signature(type(module).forward).parameters
    names = [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD][1:]
    if "labels" not in names or not isinstance(getattr(module, "lm_head", None), nn.Linear):
        return None, "no labels argument or no nn.Linear lm_head"
    base = getattr(module, getattr(module, "base_model_prefix", ""), None)
    if not isinstance(base, nn.Module):
        return None, "no base model"
    base_params = inspect.signature(base.forward).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in base_params.values())
    missing = [n for n in names if n not in ("labels", "logits_to_keep") and n not in base_params]
    if missing and not takes_any:
        return None, f"the base model takes no {', '.join(missing)}"
    output = inspect.signature(type(module).forward).return_annotation
    if isinstance(output, types.UnionType):  # `tuple | CausalLMOutputWithPast` (GLM-4)
        members = [t for t in output.__args__ if dataclasses.is_dataclass(t)]
        output = members[0] if len(members) == 1 else None
    if not dataclasses.is_dataclass(output):
        return None, "unexpected output type"
    fields = tuple(f.name for f in dataclasses.fields(output))
    if not {"loss", "logits"} <= set(fields):
        return None, "unexpected output type"
    router = family.router_aux_loss and "output_router_logits" in names
    if family.logit_scale is not None:
        try:
            scale = family.logit_scale(module)
        except (AttributeError, TypeError, ZeroDivisionError) as e:
            return None, f"no usable logit scale ({e})"
        if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            return None, f"logit scale {scale!r} is not a finite number > 0"
    spec = _CausalLMSpec(tuple(names), output, fields, family.softcap, True, True, router)
    return dataclasses.replace(spec, logit_scale=family.logit_scale), ""


# --- public API -------------------------------------------------------------------------------


def _target(model: nn.Module) -> nn.Module:
    """The module to patch: a torch.compile wrapper's original module, else the model itself."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"perfml.patch: model must be a torch.nn.Module, got {type(model).__name__}"
        )
    from torch._dynamo.eval_frame import OptimizedModule

    while isinstance(model, OptimizedModule):
        model = model._orig_mod
    return model


def patch(
    model: nn.Module,
    *,
    rms_norm: bool = True,
    layer_norm: bool = True,
    swiglu: bool = True,
    rope: bool = True,
    cross_entropy: bool = True,
    linear_cross_entropy: bool = True,
) -> PatchReport:
    """Swap perfml's fused kernels into `model` in place (see the module docstring); returns the
    report of what was replaced and what was left. A module swapped before stays as it is, so
    the same call twice changes nothing (the report says so) and a later call with more
    switches on swaps only the modules earlier calls left alone; `unpatch` restores the
    original."""
    switches = dict(
        rms_norm=rms_norm,
        layer_norm=layer_norm,
        swiglu=swiglu,
        rope=rope,
        cross_entropy=cross_entropy,
        linear_cross_entropy=linear_cross_entropy,
    )
    for name, value in switches.items():
        if not isinstance(value, bool):
            raise TypeError(f"perfml.patch: {name} must be True or False, got {value!r}")
    patcher = _Patcher(switches)
    for path, module in _target(model).named_modules():
        patcher.visit(path, module)
    return patcher.report


def unpatch(model: nn.Module) -> int:
    """Restore every module `patch` swapped in `model` (the class's own forward runs again);
    returns how many modules were restored."""
    restored = 0
    for module in _target(model).modules():
        if module.__dict__.pop(_MARK, None) is not None:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_perfml_causal_lm", None)
            restored += 1
    return restored
