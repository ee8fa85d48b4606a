"""perfml's ops and modules on PyTorch's own test inputs: OpInfo and ModuleInfo samples.

Each sample of torch's `op_db` / `module_db` entry for an op perfml replaces is run through an
adapter (perfml's call with torch's semantics), in its original layout and `.noncontiguous()`,
in fp32 / bf16 / fp16 (those the OpInfo supports on CPU), on the default CPU path (the C++
extension or the reference: TRITON_INTERPRET=0 with auto) and on the Triton kernels (interpret
mode). Output and gradients are checked against torch's own function run in float64, with
torch in the sample's dtype as the error baseline (tests/utils.py). A sample is either within
tolerance, a declared expected refusal (an argument perfml does not support: perfml must raise an
error whose message names it), or skipped because torch itself rejects it in float64; anything
else is a failure. Failures are collected per op and path and reported together.

Adapters: softmax <- "softmax" (both variants); rms_norm (cast="none") <- "nn.functional.rms_norm";
layer_norm <- "nn.functional.layer_norm" (a multi-dim normalized_shape is flattened into the last
dim); cross_entropy and linear_cross_entropy (identity weight) <- "nn.functional.cross_entropy";
swiglu <- "nn.functional.silu" and geglu <- "nn.functional.gelu" (up: a random tensor of gate's
shape). Modules: RMSNorm, LayerNorm, CrossEntropyLoss <- their ModuleInfos.

rope, add_rms_norm (llama casting) and decode_attention have no torch OpInfo: they are covered by
tests/ops only.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import module_db
from torch.testing._internal.common_utils import noncontiguous_like
from torch.testing._internal.opinfo.core import SampleInput

import perfml.nn as pnn
import perfml.ops as P
from perfml import _backend
from tests.utils import FP32_RTOL, assert_matches_reference, max_err

# importing torch's test utilities freezes the torch.backends flags for the whole process
# (common_utils calls torch.backends.disable_global_flags()); other tests in the same process set
# them (the Trainer's deterministic mode sets cudnn.deterministic), so they are unfrozen again
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("original", "noncontiguous")
# interpret mode is slow: at most this many samples per op (each run in every dtype and layout)
MAX_SAMPLES = 24
MAX_MODULE_SAMPLES = 14


class Skip(Exception):
    """The sample has no meaning for this adapter (the reason is counted in the summary)."""


# --- tensor trees ------------------------------------------------------------------------------


def _map(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple | list):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _leaves(obj) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map(obj, lambda t: found.append(t) if t.requires_grad else None)
    return found


def _as_leaf(dtype: torch.dtype | None, device=None):
    """A fresh copy of each tensor, cast to `dtype` if floating and `dtype` is given (strides kept
    otherwise): an autograd leaf where the sample's tensor requires grad."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        if device is not None:
            t = t.to(device)
        if not t.is_floating_point():
            return t
        grad = t.requires_grad
        t = t.detach()
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t.requires_grad_(grad)

    return fn


def _compare(actual, ref, baseline, name: str, term_scale: float | None = None) -> None:
    """assert_matches_reference, with the reference's NaNs required as NaNs in `actual`.

    `term_scale`: the size of the terms a gradient formula subtracts from each other. Where they
    cancel (a LayerNorm over 2 elements has dx = O(eps)), an fp32 result within FP32_RTOL of that
    size is as exact as fp32 arithmetic on those terms allows."""
    assert isinstance(actual, torch.Tensor), f"{name}: perfml gave {type(actual).__name__}"
    assert actual.shape == ref.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    nan = torch.isnan(ref)
    if nan.any():
        missing = int((nan & ~torch.isnan(actual.detach().double())).sum())
        assert not missing, f"{name}: {missing} finite values where the reference is NaN"
        keep = ~nan
        actual, ref, baseline = actual[keep], ref[keep], baseline[keep]
    if term_scale is not None and actual.dtype == torch.float32 and actual.shape == ref.shape:
        finite = bool(torch.isfinite(actual.detach()).all())
        if finite and max_err(actual.detach(), ref.detach()) <= FP32_RTOL * term_scale:
            return
    assert_matches_reference(actual.detach(), ref.detach(), baseline.detach(), name=name)


def _grads(out: torch.Tensor, leaves: list[torch.Tensor], dy: torch.Tensor):
    if not leaves or not out.requires_grad:
        return [None] * len(leaves)
    return torch.autograd.grad(out, leaves, dy.to(out.dtype), allow_unused=True)


# --- op adapters ------------------------------------------------------------------------------


def _bind(fn, sample: SampleInput) -> dict:
    return inspect.signature(fn).bind(sample.input, *sample.args, **sample.kwargs).arguments


def _torch_rms_norm(input, normalized_shape, weight=None, eps=None):
    pass


def _torch_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    pass


def _torch_cross_entropy(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
):
    pass


def _flat(x: torch.Tensor, k: int) -> torch.Tensor:
    """x with its last k dims flattened into one."""
    return x.reshape(*x.shape[: x.dim() - k], math.prod(x.shape[x.dim() - k :]))


def _fill_eps(sample: SampleInput) -> SampleInput:
    """eps=None is finfo(x.dtype).eps in torch: made explicit, so the float64 reference uses the
    sample dtype's eps as well."""
    a = _bind(_torch_rms_norm, sample)
    if a.get("eps") is not None:
        return sample
    eps = torch.finfo(sample.input.dtype).eps
    args = (a["normalized_shape"], a.get("weight"))
    return SampleInput(sample.input, args=args, kwargs={"eps": eps})
    return sample


def _norm_term_scale(x, w, dy, k: int, rstd_of) -> dict[int, float]:
    """{0: max over rows of max|dy * w| * rstd}: the size of the terms in dx (float64)."""
    wdy = _flat(dy, k) * (_flat(w, k) if w is not None else 1.0)
    rstd = torch.nan_to_num(rstd_of(_flat(x, k).double()), nan=0.0, posinf=0.0)
    return {0: (wdy.abs().amax(-1) * rstd).max().item() if wdy.numel() else 0.0}


def _rms_norm_terms(x, args, kwargs, dy):
    a = inspect.signature(_torch_rms_norm).bind(x, *args, **kwargs).arguments
    eps = a["eps"]
    rstd = lambda x2: torch.rsqrt(x2.pow(2).mean(-1) + eps)  # noqa: E731
    return _norm_term_scale(x, a.get("weight"), dy, len(a["normalized_shape"]), rstd)


def _layer_norm_terms(x, args, kwargs, dy):
    a = inspect.signature(_torch_layer_norm).bind(x, *args, **kwargs).arguments
    eps = a.get("eps", 1e-5)
    rstd = lambda x2: torch.rsqrt(x2.var(-1, unbiased=False) + eps)  # noqa: E731
    return _norm_term_scale(x, a.get("weight"), dy, len(a["normalized_shape"]), rstd)


def _rms_norm_refusal(sample: SampleInput) -> tuple[str, ...]:
    eps = _bind(_torch_rms_norm, sample)["eps"]
    return ("eps",) if eps < 0 else ()  # refused on every path (the C++ kernel's contract)


def _perfml_rms_norm(x, args, kwargs):
    a = inspect.signature(_torch_rms_norm).bind(x, *args, **kwargs).arguments
    k = len(a["normalized_shape"])
    w = a.get("weight")
    y = P.rms_norm(_flat(x, k), _flat(w, k) if w is not None else None, a["eps"], cast="none")
    return y.reshape(x.shape)


def _perfml_layer_norm(x, args, kwargs):
    a = inspect.signature(_torch_layer_norm).bind(x, *args, **kwargs).arguments
    k = len(a["normalized_shape"])
    w, b = a.get("weight"), a.get("bias")
    y = P.layer_norm(
        _flat(x, k),
        _flat(w, k) if w is not None else None,
        _flat(b, k) if b is not None else None,
        a.get("eps", 1e-5),
    )
    return y.reshape(x.shape)


def _classes_last(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1) if x.dim() > 2 else x


def _ce_options(x, args, kwargs) -> tuple[torch.Tensor, dict]:
    """(target, every option the sample sets, under torch's name: perfml must take or refuse it)."""
    a = inspect.signature(_torch_cross_entropy).bind(x, *args, **kwargs).arguments
    a.pop("input")
    return a.pop("target"), a


def _ce_refusal(sample: SampleInput) -> tuple[str, ...]:
    """The unsupported arguments the sample uses: class probabilities as target, class weights,
    the deprecated size_average / reduce."""
    a = _bind(_torch_cross_entropy, sample)
    names = ("target",) if a["target"].is_floating_point() else ()
    return names + tuple(n for n in ("weight", "size_average", "reduce") if a.get(n) is not None)


def _perfml_cross_entropy(x, args, kwargs):
    target, options = _ce_options(x, args, kwargs)
    return P.cross_entropy(_classes_last(x), target, **options)


def _lce_prepare(sample: SampleInput) -> SampleInput:
    if _bind(_torch_cross_entropy, sample).get("weight") is not None:
        raise Skip("class weights (refusal checked by the cross_entropy adapter)")
    return sample


def _perfml_linear_cross_entropy(x, args, kwargs):
    target, options = _ce_options(x, args, kwargs)
    hidden = _classes_last(x)
    eye = torch.eye(hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    return P.linear_cross_entropy(hidden, eye, target, **options)


def _with_up(sample: SampleInput) -> SampleInput:
    gate = sample.input
    g = torch.Generator().manual_seed(gate.numel())
    up = torch.randn(gate.shape, generator=g, dtype=torch.float64).to(gate.dtype).to(gate.device)
    up.requires_grad_(gate.requires_grad)
    return SampleInput(gate, args=(up,), kwargs=dict(sample.kwargs))


def _torch_swiglu(gate, args, kwargs):
    (up,) = args
    assert not kwargs, kwargs
    return F.silu(gate) * up


def _perfml_swiglu(gate, args, kwargs):
    return P.swiglu(gate, *args)


def _torch_geglu(gate, args, kwargs):
    (up,) = args
    return F.gelu(gate, approximate=kwargs.get("approximate", "none")) * up


def _perfml_geglu(gate, args, kwargs):
    (up,) = args
    return P.geglu(gate, up, approximate=kwargs.get("approximate", "none"))


@dataclass
class OpAdapter:
    opinfo: str  # the op_db name; every variant of it is used
    perfml: Callable  # (input, args, kwargs) -> output, with torch's semantics
    torch: Callable | None = None  # (input, args, kwargs) -> output; None: the OpInfo's op
    prepare: Callable[[SampleInput], SampleInput] = field(default=lambda s: s)
    # the unsupported arguments a sample uses: perfml must raise an error naming one of them
    refusal: Callable[[SampleInput], tuple[str, ...]] = field(default=lambda s: ())
    # (input, args, kwargs, dy) in float64 -> {leaf index: term scale} (see _compare)
    term_scale: Callable | None = None


def _opinfo_call(opinfo):
    return lambda x, args, kwargs: opinfo.op(x, *args, **kwargs)


OPS = {
    "softmax": OpAdapter("softmax", lambda x, a, k: P.softmax(x, *a, **k)),
    "rms_norm": OpAdapter(
        "nn.functional.rms_norm",
        _perfml_rms_norm,
        prepare=_fill_eps,
        refusal=_rms_norm_refusal,
        term_scale=_rms_norm_terms,
    ),
    "layer_norm": OpAdapter(
        "nn.functional.layer_norm", _perfml_layer_norm, term_scale=_layer_norm_terms
    ),
    "cross_entropy": OpAdapter(
        "nn.functional.cross_entropy", _perfml_cross_entropy, refusal=_ce_refusal
    ),
    "linear_cross_entropy": OpAdapter(
        "nn.functional.cross_entropy",
        _perfml_linear_cross_entropy,
        prepare=_lce_prepare,
        refusal=_ce_refusal,
    ),
    "swiglu": OpAdapter("nn.functional.silu", _perfml_swiglu, _torch_swiglu, prepare=_with_up),
    "geglu": OpAdapter("nn.functional.gelu", _perfml_geglu, _torch_geglu, prepare=_with_up),
}

_OPINFOS = {name: [o for o in op_db if o.name == a.opinfo] for name, a in OPS.items()}


# --- running one sample -----------------------------------------------------------------------


def _expect_refusal(call, refusal: tuple[str, ...]) -> str:
    try:
        call()
    except Exception as exc:
        assert any(name in str(exc) for name in refusal), (
            f"refused unsupported {refusal} with a message that names none of them: "
            f"{type(exc).__name__}: {exc}"
        )
        return "refused"
    raise AssertionError(f"accepted unsupported {refusal} without an error")


def _check_call(adapter: OpAdapter, torch_fn, inputs, refusal: tuple[str, ...], device) -> str:
    """Run one sample (inputs = (x, args, kwargs)); 'ok', 'refused' or 'skipped', or raise."""
    ref_in = _map(inputs, _as_leaf(torch.float64, device))
    try:
        ref = torch_fn(*ref_in)
    except Exception:
        return "skipped"  # torch itself rejects the sample
    perfml_fn = adapter.perfml
    if refusal:
        return _expect_refusal(lambda: perfml_fn(*_map(inputs, _as_leaf(None, device))), refusal)
    base_in = _map(inputs, _as_leaf(None, device))
    baseline = torch_fn(*base_in)
    mine_in = _map(inputs, _as_leaf(None, device))
    out = perfml_fn(*mine_in)
    _compare(out, ref, baseline, "output")
    ref_leaves = _leaves(ref_in)
    if ref.requires_grad and ref_leaves:
        g = torch.Generator().manual_seed(ref.numel() + 1)
        dy = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(ref.device)
        ref_g = _grads(ref, ref_leaves, dy)
        base_g = _grads(baseline, _leaves(base_in), dy)
        mine_g = _grads(out, _leaves(mine_in), dy)
        terms = adapter.term_scale(*ref_in, dy) if adapter.term_scale else {}
        for i, (r, b, m) in enumerate(zip(ref_g, base_g, mine_g, strict=True)):
            if r is None:
                continue
            assert m is not None, f"grad of input {i}: none from perfml"
            _compare(m, r, b, f"grad of input {i}", terms.get(i))
    return "ok"


@contextlib.contextmanager
def _on_path(path: str, monkeypatch):
    if path == "default":  # what a CPU user gets: the C++ extension or the reference
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with _backend.force("auto"):
            yield
    else:
        with _backend.force("triton"):
            yield


def _summary(what: str, path: str, counts: dict, failures: list[str]) -> str:
    line = (
        f"{what} [{path}]: {counts['ok']} checked, {counts['refused']} refused, "
        f"{counts['skipped']} skipped, {len(failures)} failed"
    )
    print(line)
    return line


def _run_op(name: str, path: str, device: str, monkeypatch) -> tuple[dict, list[str]]:
    adapter = OPS[name]
    counts = {"ok": 0, "refused": 0, "skipped": 0}
    failures: list[str] = []
    for opinfo in _OPINFOS[name]:
        torch_fn = adapter.torch or _opinfo_call(opinfo)
        label = ".".join(filter(None, (opinfo.name, opinfo.variant_test_name)))
        supported = opinfo.supported_dtypes(device)
        for dtype in (d for d in DTYPES if d in supported):
            samples = list(
                opinfo.sample_inputs(device, dtype, requires_grad=opinfo.supports_autograd)
            )
            step = max(1, math.ceil(len(samples) / MAX_SAMPLES))
            for idx, sample in enumerate(samples[::step]):
                try:
                    sample = adapter.prepare(sample)
                except Skip:
                    counts["skipped"] += len(LAYOUTS)
                    continue
                for layout in LAYOUTS:
                    s = sample.noncontiguous() if layout == "noncontiguous" else sample
                    where = (
                        f"{label} #{idx * step} {dtype} {layout} input {tuple(s.input.shape)} "
                        f"args {_describe(s.args)} kwargs {_describe(s.kwargs)}"
                    )
                    try:
                        with _on_path(path, monkeypatch):
                            status = _check_call(
                                adapter,
                                torch_fn,
                                (s.input, s.args, s.kwargs),
                                adapter.refusal(s),
                                device,
                            )
                        counts[status] += 1
                    except Exception as exc:
                        failures.append(f"{where}: {type(exc).__name__}: {exc}")
    return counts, failures


def _describe(obj) -> str:
    return str(
        _map(obj, lambda t: f"<{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}>")
    ).replace("'", "")


def _paths():
    cases = [pytest.param("default", id="default")]
    cases.append(
        pytest.param(
            "triton",
            id="triton",
            marks=pytest.mark.skipif(
                not _backend.interpret_mode(), reason="CPU Triton needs interpret mode"
            ),
        )
    )
    return cases


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("name", list(OPS))
def test_op_on_opinfo_samples(name, path, monkeypatch, poison_empty):
    counts, failures = _run_op(name, path, "cpu", monkeypatch)
    line = _summary(name, path, counts, failures)
    assert not failures, line + "\n" + "\n".join(failures)
    assert counts["ok"], f"{line}: no sample was checked"


# --- modules ----------------------------------------------------------------------------------


def _norm_kwargs(bound: dict) -> dict:
    kw = dict(bound)
    kw["hidden_size"] = kw.pop("normalized_shape")
    kw["cast"] = "none"  # torch.nn.RMSNorm's rounding
    kw.setdefault("eps", None)  # torch.nn.RMSNorm's default: finfo(x.dtype).eps
    return kw


def _norm_refusal(bound: dict, forward_args) -> tuple[str, ...]:
    shape = bound["normalized_shape"]
    if not isinstance(shape, int) and len(shape) != 1:
        return ("normalized_shape",)  # only the last dimension is fused
    return ()


def _ce_module_refusal(bound: dict, forward_args) -> tuple[str, ...]:
    names = ("target",) if forward_args[1].is_floating_point() else ()
    return names + tuple(
        n for n in ("weight", "size_average", "reduce") if bound.get(n) is not None
    )


@dataclass
class ModuleAdapter:
    torch_cls: type
    perfml_cls: type
    kwargs: Callable[[dict], dict] = field(default=dict)  # torch's bound ctor args -> perfml's
    refusal: Callable = field(default=lambda bound, forward_args: ())
    # constructor arguments each sample is also run with (beyond the sample's own)
    variants: tuple[dict, ...] = ()


MODULES = {
    # eps=None (torch's default, finfo(x.dtype).eps) as well: the ModuleInfo samples all set eps
    "RMSNorm": ModuleAdapter(
        nn.RMSNorm, pnn.RMSNorm, _norm_kwargs, _norm_refusal, variants=({"eps": None},)
    ),
    "LayerNorm": ModuleAdapter(nn.LayerNorm, pnn.LayerNorm, refusal=_norm_refusal),
    "CrossEntropyLoss": ModuleAdapter(
        nn.CrossEntropyLoss, pnn.CrossEntropyLoss, refusal=_ce_module_refusal
    ),
}

_MODULEINFOS = {
    name: [m for m in module_db if m.module_cls is a.torch_cls] for name, a in MODULES.items()
}


def _module_call(module):
    return lambda *inputs: module(*inputs)


def _check_module(adapter: ModuleAdapter, sample, layout, dtype, device, variant) -> str:
    cargs, ckwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    fargs = sample.forward_input.args
    assert not sample.forward_input.kwargs, sample.forward_input.kwargs
    if layout == "noncontiguous":
        fargs = _map(fargs, noncontiguous_like)
    bound = dict(inspect.signature(adapter.torch_cls).bind(*cargs, **ckwargs).arguments)
    bound.update(variant)
    torch_mod = adapter.torch_cls(**bound).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for p in torch_mod.parameters():  # away from the ones/zeros init, so grads mean something
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    ref_mod = copy.deepcopy(torch_mod).to(torch.float64)
    if getattr(ref_mod, "eps", 0.0) is None:  # finfo(x.dtype).eps of the sample's dtype
        ref_mod.eps = torch.finfo(dtype).eps
    ref_in = _map(fargs, _as_leaf(torch.float64, device))
    try:
        ref = ref_mod(*ref_in)
    except Exception:
        return "skipped"
    refusal = adapter.refusal(bound, fargs)

    def build():
        mod = adapter.perfml_cls(**adapter.kwargs(bound)).to(device=device, dtype=dtype)
        mod.load_state_dict(torch_mod.state_dict())
        return mod

    mine_in = _map(fargs, _as_leaf(None, device))
    if refusal:  # refused by the constructor or by forward
        return _expect_refusal(lambda: build()(*mine_in), refusal)
    mine_mod = build()
    base_in = _map(fargs, _as_leaf(None, device))
    baseline = torch_mod(*base_in)
    out = mine_mod(*mine_in)
    _compare(out, ref, baseline, "output")
    g = torch.Generator().manual_seed(ref.numel() + 1)
    dy = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(ref.device)
    names = [n for n, _ in ref_mod.named_parameters()]
    mine_params = dict(mine_mod.named_parameters())
    assert set(mine_params) == set(names), f"parameters {sorted(mine_params)} != {sorted(names)}"
    ref_g = _grads(ref, _leaves(ref_in) + list(ref_mod.parameters()), dy)
    base_g = _grads(baseline, _leaves(base_in) + list(torch_mod.parameters()), dy)
    mine_g = _grads(out, _leaves(mine_in) + [mine_params[n] for n in names], dy)
    labels = [f"grad of input {i}" for i in range(len(_leaves(ref_in)))] + [
        f"grad of {n}" for n in names
    ]
    for label, r, b, m in zip(labels, ref_g, base_g, mine_g, strict=True):
        if r is None:
            continue
        assert m is not None, f"{label}: none from perfml"
        _compare(m, r, b, label)
    return "ok"


def _run_module(name: str, path: str, device: str, monkeypatch) -> tuple[dict, list[str]]:
    adapter = MODULES[name]
    counts = {"ok": 0, "refused": 0, "skipped": 0}
    failures: list[str] = []
    for info in _MODULEINFOS[name]:
        for dtype in (d for d in DTYPES if d in info.dtypes):
            samples = list(
                info.module_inputs_func(
                    info, device=device, dtype=dtype, requires_grad=True, training=True
                )
            )
            step = max(1, math.ceil(len(samples) / MAX_MODULE_SAMPLES))
            for (idx, sample), variant, layout in itertools.product(
                enumerate(samples[::step]), ({}, *adapter.variants), LAYOUTS
            ):
                where = (
                    f"{name} #{idx * step} {sample.desc} {variant or ''} {dtype} {layout} "
                    f"ctor {_describe(sample.constructor_input.args)} "
                    f"{_describe(sample.constructor_input.kwargs)} "
                    f"forward {_describe(sample.forward_input.args)}"
                )
                try:
                    with _on_path(path, monkeypatch):
                        status = _check_module(adapter, sample, layout, dtype, device, variant)
                    counts[status] += 1
                except Exception as exc:
                    failures.append(f"{where}: {type(exc).__name__}: {exc}")
    return counts, failures


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("name", list(MODULES))
def test_module_on_moduleinfo_samples(name, path, monkeypatch, poison_empty):
    counts, failures = _run_module(name, path, "cpu", monkeypatch)
    line = _summary(f"nn.{name}", path, counts, failures)
    assert not failures, line + "\n" + "\n".join(failures)
    assert counts["ok"], f"{line}: no sample was checked"


# --- CUDA -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", [*OPS, *(f"nn.{m}" for m in MODULES)])
def test_opinfo_samples_on_cuda(name, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if name.startswith("nn."):
        counts, failures = _run_module(name[3:], "triton", "cuda", monkeypatch)
    else:
        counts, failures = _run_op(name, "triton", "cuda", monkeypatch)
    line = _summary(name, "triton-cuda", counts, failures)
    assert not failures, line + "\n" + "\n".join(failures)
    assert counts["ok"], f"{line}: no sample was checked"


def test_importing_torch_test_utilities_leaves_the_backend_flags_settable():
    assert not torch.backends.flags_frozen()
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = deterministic  # raises while the flags are frozen
