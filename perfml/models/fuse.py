"""Fused input projections for a perfml Llama: q_proj/k_proj/v_proj -> one `qkv_proj`, and the
MLP's gate_proj/up_proj -> one `gate_up_proj`.

Projections that read the same input can be one matmul over their weights stacked along the
output dim N: at batch-1 decode each projection is its own GEMV launch (two for the split-K
quantized GEMV), and inside a CUDA graph every kernel costs a launch gap, so a layer goes from
five projection launches to two. The forwards of LlamaAttention, EagerMLP and SwiGLUMLP call the
fused module when it is present and split its output along the last dim with views.

    fuse_projections(model)        # in place, every layer; a second call does nothing
    unfuse_projections(model)      # back to the separate projections (copies of the slices)

What gets fused: an nn.Linear (with or without bias) or any of perfml's quantized linears
(Int8WeightOnlyLinear, Int4WeightOnlyLinear, Int8DynamicLinear, Float8Linear). Every buffer of a
quantized linear has N first (int8/int4 weights, per-row or per-row-and-group scales and zero
points), so each is concatenated along dim 0. The parts must agree: one module type, one config
(int4: one group size), the same in_features, dtypes, device and bias presence; anything else
is refused with a FusionError naming the modules. o_proj, down_proj and lm_head are not touched.

Order with quantization: either works. A fused nn.Linear is an nn.Linear, so perfml.quantize
converts it as one module; the scales are per row (int8, fp8) or per row and K-group (int4), so
the quantized weights are the same bits as quantizing each projection separately, and so are
fusing after quantizing and quantizing after fusing. So are the outputs on CPU, except that on
a GPU the split-K GEMV of decode rows picks its K split from N (perfml/quant/kernels.py): the
wider fused matrix may sum K in other chunks than a separate projection, and a float GEMM of
another N may pick another cuBLAS kernel, so expect last-bit differences there.

State dicts keep the separate, HF-like names. A state_dict post-hook on the attention / MLP
module splits every qkv_proj.* and gate_up_proj.* tensor along dim 0 into q_proj.*, k_proj.*,
v_proj.* (gate_proj.*, up_proj.*), in the unfused model's key order, as contiguous copies (no
shared storage, which safetensors refuses; the copies cost the size of the fused weights while
the state_dict lives). A load_state_dict pre-hook concatenates them back. So a fused model
saves, loads and round-trips through safetensors (save_model / load_model, perfml.quant's
save_model_dir / load_model_dir) interchangeably with an unfused one; with keep_vars=True the
split entries are copies, not the parameters. A model directory does not record the fusion:
load_model_dir returns the unfused model (fuse it again). An optimizer's state follows the
parameters it was built on (the fused ones after fusing).

A fused-away name stays as a stand-in that is no module (hasattr(attn, "q_proj") stays true;
"qkv_proj" in attn._modules tells a fused layer): code that reaches for it (`attn.q_proj.weight`)
gets a FusedProjectionError (an AttributeError) saying so. Structured pruning (perfml.prune with
StructuredConfig) refuses a fused model that way: unfuse first, prune, fuse again. Unstructured
magnitude pruning at scope="layer" ranks the fused matrix as one layer (a different selection
than per projection); 2:4 pruning is row-local and unaffected. Fuse before creating the
optimizer, before sharding (FSDP) and before 2:4 acceleration: the fused weight is a new
Parameter, and sharded or sparse-semi-structured weights are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

QKV = ("qkv_proj", ("q_proj", "k_proj", "v_proj"))
GATE_UP = ("gate_up_proj", ("gate_proj", "up_proj"))

# A module whose forward reads a fused projection when it is present declares the fused names it
# handles in a class attribute `fusible_projections` (perfml's LlamaAttention: ("qkv_proj",);
# EagerMLP and SwiGLUMLP: ("gate_up_proj",)). Declared rather than matched by class, so this
# module imports none of them, and a module that merely looks alike (an HF attention has q_proj,
# k_proj and v_proj, but its forward would ignore a qkv_proj) is never fused.
FUSIBLE = "fusible_projections"


def _row_buffers(module: nn.Module) -> tuple[str, ...] | None:
    """The N-first buffers of a module that can be stacked along N (perfml's quantized linears
    declare them as `row_buffers` and rebuild with `with_rows`), None for any other module."""
    names = getattr(type(module), "row_buffers", None)
    return tuple(names) if names and hasattr(module, "with_rows") else None


# attributes of a quantized linear that describe its format and must agree between the parts
_QUANT_ATTRS = ("group_size", "config")  # group size first: the clearer message
# the module attribute holding {fused name: ((part name, rows), ...)}, read by the hooks
_FUSED_ATTR = "_fused_projections"


class FusionError(ValueError):
    """Projections that cannot be fused (or unfused) as asked; the message names them."""


class FusedProjectionError(AttributeError):
    """Use of a projection that fuse_projections folded into a fused module."""


class _FusedAway:
    """Stands where a fused projection was: any use of it says where it went. Not a module, so
    it takes no part in parameters(), state_dict() or named_modules()."""

    def __init__(self, owner: str, name: str, fused: str) -> None:
        self._where = (owner, name, fused)

    def _error(self) -> FusedProjectionError:
        owner, name, fused = self._where
        return FusedProjectionError(
            f"{owner}.{name} was fused into {owner}.{fused} by perfml.models.fuse_projections; "
            "code that needs the separate projections (structured pruning, for one) must run on "
            "the unfused model: call perfml.models.unfuse_projections(model) first"
        )

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or attr == "_where":  # copy / pickle probing, unset state
            raise AttributeError(attr)
        raise self._error()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._error()

    def __repr__(self) -> str:
        owner, name, fused = self._where
        return f"<{name}: fused into {fused}>"


# --- one fused module from several -------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    name: str
    module: nn.Module


def _plain(t: Tensor) -> bool:
    """A dense strided tensor (not a tensor subclass: 2:4 sparse, DTensor shards, ...)."""
    return type(t.detach()) is torch.Tensor and t.layout == torch.strided


def _check_parts(parts: Sequence[_Part]) -> None:
    """Raise FusionError unless the parts can be stacked along N into one module of their type."""
    if len(parts) < 2:
        raise FusionError(f"fuse: need at least two modules, got {len(parts)}")
    names = ", ".join(p.name for p in parts)
    first = parts[0]
    kind = type(first.module)
    for p in parts:
        if type(p.module) is not nn.Linear and _row_buffers(p.module) is None:
            raise FusionError(
                f"fuse: {p.name} is a {type(p.module).__name__}, which cannot be fused (an "
                "nn.Linear or a perfml quantized linear can)"
            )
        if type(p.module) is not kind:
            raise FusionError(
                f"fuse: {names} mix module types ({first.name} is a {kind.__name__}, {p.name} a "
                f"{type(p.module).__name__}); quantize all of them or none"
            )
        if p.module.in_features != first.module.in_features:
            raise FusionError(
                f"fuse: {names} differ in in_features ({first.name}: "
                f"{first.module.in_features}, {p.name}: {p.module.in_features})"
            )
        if (p.module.bias is None) != (first.module.bias is None):
            raise FusionError(f"fuse: {names}: some have a bias and some do not")
    if kind is not nn.Linear:
        for attr in _QUANT_ATTRS:
            values = [getattr(p.module, attr, None) for p in parts]
            if any(v != values[0] for v in values):
                detail = ", ".join(f"{p.name}: {v}" for p, v in zip(parts, values, strict=True))
                what = "group size" if attr == "group_size" else attr
                raise FusionError(f"fuse: {names} differ in {what} ({detail})")
    tensors = [_tensors(p) for p in parts]
    for p, named in zip(parts, tensors, strict=True):
        for key, t in named.items():
            ref = tensors[0][key]
            if not _plain(t):
                raise FusionError(
                    f"fuse: {p.name}.{key} is a {type(t.detach()).__name__}, not a plain dense "
                    "tensor (fuse before sharding or 2:4 acceleration)"
                )
            if t.dim() == 0 or t.shape[0] != p.module.out_features:
                raise FusionError(
                    f"fuse: {p.name}.{key} has shape {tuple(t.shape)}, not out_features "
                    f"({p.module.out_features}) first"
                )
            if t.dtype != ref.dtype or t.device != ref.device or t.shape[1:] != ref.shape[1:]:
                raise FusionError(
                    f"fuse: {names} differ in {key}: {first.name}.{key} is {ref.dtype} "
                    f"{tuple(ref.shape)} on {ref.device}, {p.name}.{key} is {t.dtype} "
                    f"{tuple(t.shape)} on {t.device}"
                )
            if t.requires_grad != ref.requires_grad:
                raise FusionError(f"fuse: {names} differ in {key}.requires_grad")


def _tensors(part: _Part) -> dict[str, Tensor]:
    """The tensors to stack: weight (and bias) of an nn.Linear; every buffer (and the bias) of
    a quantized linear, whose buffer names must be the ones its type is known to have."""
    m = part.module
    if type(m) is nn.Linear:
        out = {"weight": m.weight}
    else:
        buffers = dict(m.named_buffers(recurse=False))
        expected = _row_buffers(m)
        if tuple(buffers) != expected:
            raise FusionError(
                f"fuse: {part.name} ({type(m).__name__}) has buffers {tuple(buffers)}, expected "
                f"{expected}"
            )
        out = buffers
    if m.bias is not None:
        out["bias"] = m.bias
    return out


def _build(template: nn.Module, out_features: int, tensors: dict[str, Tensor]) -> nn.Module:
    """A module of template's type and format with out_features rows, holding `tensors`."""
    if type(template) is nn.Linear:
        weight = tensors["weight"]
        has_bias = "bias" in tensors
        linear = nn.Linear(
            template.in_features, out_features, bias=has_bias, device="meta", dtype=weight.dtype
        )
        linear.weight = nn.Parameter(weight, requires_grad=template.weight.requires_grad)
        if has_bias:
            linear.bias = nn.Parameter(tensors["bias"], requires_grad=template.bias.requires_grad)
        linear.train(template.training)
        return linear
    return template.with_rows(out_features, tensors, tensors.get("bias"))


def _fuse(parts: Sequence[_Part]) -> nn.Module:
    """One module whose output is the concatenation of the parts' outputs (checked first)."""
    _check_parts(parts)
    named = [_tensors(p) for p in parts]
    with torch.no_grad():
        stacked = {k: torch.cat([n[k].detach() for n in named]) for k in named[0]}
    out_features = sum(p.module.out_features for p in parts)
    return _build(parts[0].module, out_features, stacked)


def _split(fused: nn.Module, rows: Sequence[int], name: str) -> list[nn.Module]:
    """The inverse of _fuse: one module per row count, holding copies of its rows."""
    part = _Part(name, fused)
    if type(fused) is not nn.Linear and _row_buffers(fused) is None:
        raise FusionError(f"unfuse: {name} is a {type(fused).__name__}, which cannot be split")
    if sum(rows) != fused.out_features:
        raise FusionError(
            f"unfuse: {name} has {fused.out_features} output rows, the parts {list(rows)} sum to "
            f"{sum(rows)}"
        )
    named = _tensors(part)
    with torch.no_grad():
        pieces = {k: [s.clone() for s in t.detach().split(list(rows))] for k, t in named.items()}
    return [_build(fused, n, {k: v[i] for k, v in pieces.items()}) for i, n in enumerate(rows)]


def fuse_linears(linears: Sequence[nn.Module]) -> nn.Module:
    """One module computing `torch.cat([m(x) for m in linears], dim=-1)` in one matmul: nn.Linear
    or one of perfml's quantized linears, all of one type and format (else FusionError). The
    fused tensors are new (copies); the inputs are left as they are."""
    return _fuse([_Part(f"linears[{i}]", m) for i, m in enumerate(linears)])


# --- the model pass ----------------------------------------------------------------------------


def _targets(
    model: nn.Module, qkv: bool, gate_up: bool
) -> list[tuple[str, nn.Module, str, tuple[str, ...]]]:
    """(fqn, module, fused name, part names) of every attention / MLP to fuse, in model order."""
    found = []
    for fqn, module in model.named_modules():
        declared = getattr(type(module), FUSIBLE, ())
        if qkv and QKV[0] in declared:
            found.append((fqn, module, *QKV))
        if gate_up and GATE_UP[0] in declared:
            found.append((fqn, module, *GATE_UP))
    if not found and not any(getattr(type(m), FUSIBLE, ()) for m in model.modules()):
        raise FusionError(
            f"fuse_projections: {type(model).__name__} holds no LlamaAttention, EagerMLP or "
            "SwiGLUMLP (a perfml Llama or one of its layers; a module whose forward reads a "
            f"fused projection names it in its class attribute {FUSIBLE})"
        )
    return found


def _check_split(owner: str, module: nn.Module, fused: str, parts: Sequence[_Part]) -> None:
    """The forward splits the fused output by head counts (attention) or in halves (MLP): the
    parts' sizes must be those."""
    rows = [p.module.out_features for p in parts]
    if fused == QKV[0]:
        kv = module.num_kv_heads * module.head_dim
        expected = [module.num_heads * module.head_dim, kv, kv]
        what = "num_heads x head_dim, then num_kv_heads x head_dim twice"
    else:
        expected = [rows[0], rows[0]]
        what = "gate_proj's and up_proj's equal"
    if rows != expected:
        raise FusionError(
            f"fuse_projections: {owner} projections have {rows} output rows, the forward needs "
            f"{expected} ({what})"
        )


def _ensure_hooks(module: nn.Module) -> dict[str, tuple[tuple[str, int], ...]]:
    """The module's fusion record, registering its state_dict hooks on first use."""
    record = module.__dict__.get(_FUSED_ATTR)
    if record is None:
        record = {}
        setattr(module, _FUSED_ATTR, record)
        module.register_state_dict_post_hook(_split_state_dict)
        module.register_load_state_dict_pre_hook(_concat_state_dict)
    return record


@torch.no_grad()
def fuse_projections(model: nn.Module, *, qkv: bool = True, gate_up: bool = True) -> nn.Module:
    """Fuse every layer's q/k/v projections into `qkv_proj` (qkv=True) and gate/up into
    `gate_up_proj` (gate_up=True), in place; returns the model. Works on a perfml Llama or any
    module holding its attention / MLP modules, float or quantized; layers already fused are
    left as they are (a second call is a no-op). Every layer is checked before any changes, so
    a FusionError leaves the model untouched."""
    plan = []
    for fqn, module, fused, names in _targets(model, qkv, gate_up):
        if fused in module._modules:
            continue
        owner = fqn or type(module).__name__
        parts = []
        for name in names:
            child = getattr(module, name, None)
            if isinstance(child, _FusedAway) or not isinstance(child, nn.Module):
                raise FusionError(f"fuse_projections: {owner} has no {name} module")
            parts.append(_Part(f"{owner}.{name}", child))
        _check_parts(parts)
        _check_split(owner, module, fused, parts)
        plan.append((owner, module, fused, names, parts))
    for owner, module, fused, names, parts in plan:  # one layer at a time: peak memory + 1 layer
        record = _ensure_hooks(module)
        fused_module = _fuse(parts)
        position = list(module._modules).index(names[0])
        for name in names:
            delattr(module, name)
        _insert(module, fused, fused_module, position)
        for name in names:
            module.__dict__[name] = _FusedAway(owner, name, fused)
        record[fused] = tuple(
            (name, p.module.out_features) for name, p in zip(names, parts, strict=True)
        )
    return model


@torch.no_grad()
def unfuse_projections(model: nn.Module) -> nn.Module:
    """The inverse of fuse_projections, in place: each fused module becomes its separate
    projections again (copies of its rows, float or quantized alike); returns the model."""
    for fqn, module, fused, _ in _targets(model, True, True):
        record = module.__dict__.get(_FUSED_ATTR) or {}
        if fused not in record or fused not in module._modules:
            continue
        owner = fqn or type(module).__name__
        names = [name for name, _ in record[fused]]
        rows = [n for _, n in record[fused]]
        pieces = _split(module._modules[fused], rows, f"{owner}.{fused}")
        position = list(module._modules).index(fused)
        delattr(module, fused)
        for i, (name, piece) in enumerate(zip(names, pieces, strict=True)):
            module.__dict__.pop(name, None)
            _insert(module, name, piece, position + i)
        del record[fused]
    return model


def _insert(module: nn.Module, name: str, child: nn.Module, position: int) -> None:
    """Register `child` as `name` at `position` among the module's children (parameters,
    state_dict keys and repr keep the order of the unfused module)."""
    setattr(module, name, child)
    children = module._modules
    items = [(k, v) for k, v in children.items() if k != name]
    items.insert(position, (name, child))
    children.clear()
    children.update(items)


# --- state_dict hooks ----------------------------------------------------------------------------


def _split_state_dict(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]
) -> None:
    """state_dict post-hook: every `{fused}.{key}` tensor becomes `{part}.{key}` slices (copies)
    along dim 0, in the position the fused module's keys had."""
    record = module.__dict__.get(_FUSED_ATTR)
    if not record:
        return
    fused_prefixes = {prefix + fused + ".": fused for fused in record}
    # this module's keys are the last ones written (its own, then its children's)
    local = []
    for key in reversed(state_dict):
        if not key.startswith(prefix):
            break
        local.append(key)
    local.reverse()
    if not any(k.startswith(tuple(fused_prefixes)) for k in local):
        return
    entries = [(k, state_dict.pop(k)) for k in local]
    done: set[str] = set()
    for key, value in entries:
        fused = next((f for p, f in fused_prefixes.items() if key.startswith(p)), None)
        if fused is None:
            state_dict[key] = value
            continue
        if fused in done:
            continue
        done.add(fused)
        head = prefix + fused + "."
        names = [n for n, _ in record[fused]]
        rows = [r for _, r in record[fused]]
        tensors = [(k[len(head) :], v) for k, v in entries if k.startswith(head)]
        pieces = {}
        for tail, t in tensors:
            if t.dim() == 0 or t.shape[0] != sum(rows):
                raise RuntimeError(
                    f"state_dict: {head}{tail} has shape {tuple(t.shape)}, not the "
                    f"{sum(rows)} rows of {', '.join(names)} first"
                )
            pieces[tail] = [s.clone() for s in t.detach().split(rows)]
        for i, name in enumerate(names):
            for tail, _ in tensors:
                state_dict[f"{prefix}{name}.{tail}"] = pieces[tail][i]
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for fused, parts in record.items():
            meta = metadata.pop(prefix + fused, None)
            if meta is not None:
                for name, _ in parts:
                    metadata[prefix + name] = dict(meta)


def _concat_state_dict(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """load_state_dict pre-hook: `{part}.{key}` tensors of every part become one
    `{fused}.{key}` tensor (concatenated along dim 0). A key some parts lack is left alone, for
    load_state_dict to report."""
    record = module.__dict__.get(_FUSED_ATTR)
    if not record:
        return
    for fused, parts in record.items():
        names = [n for n, _ in parts]
        head = f"{prefix}{names[0]}."
        tails = [k[len(head) :] for k in state_dict if k.startswith(head)]
        for tail in tails:
            keys = [f"{prefix}{name}.{tail}" for name in names]
            if not all(k in state_dict for k in keys):
                continue
            tensors = [state_dict[k] for k in keys]
            if any(t.dim() == 0 or t.shape[1:] != tensors[0].shape[1:] for t in tensors):
                shapes = ", ".join(
                    f"{k}: {tuple(t.shape)}" for k, t in zip(keys, tensors, strict=True)
                )
                error_msgs.append(
                    f"cannot concatenate {shapes} into the fused {prefix}{fused}.{tail} "
                    "(their dims after the first differ)"
                )
                continue
            for k in keys:
                del state_dict[k]
            state_dict[f"{prefix}{fused}.{tail}"] = torch.cat(tensors)
