"""Compile every Triton kernel of perfml.ops (and perfml.quant.kernels) for Hopper (sm_90a) on a
machine without a GPU.

The interpreter that runs the kernels in CI (TRITON_INTERPRET=1) executes them as numpy code, so
it accepts programs the GPU compiler rejects (a plain Python global read inside a kernel, a loop
variable that changes type) and it says nothing about registers, spills or shared memory. This
script runs the public ops the way a user would, on CPU tensors of real LLM widths, but each
kernel launch is replaced by a record of exactly what Triton would compile on a GPU (argument
types and their 16-byte divisibility, ints specialized as i32 / i64 / the constant 1,
constexprs, num_warps, num_stages), and each distinct record is compiled to a cubin for sm_90a
with Triton's own CUDA backend and ptxas. Nothing executes: kernel outputs stay uninitialized,
which is fine because only the compiler is under test.

Coverage is checked, not assumed: every @triton.jit function defined in a perfml.ops module or in
one of KERNEL_MODULES must be launched by some call below, or called from a launched kernel; a
kernel no call reaches is a failure, so a new op's kernels fail this check until the table covers
them.

Output: a JSON report on stdout (one entry per compiled variant: kernel, constexprs, num_warps,
ok / error, registers, spills, shared memory), a readable summary on stderr. Exit status 0 when
everything compiled and fits the hardware, 1 when not, 77 when this machine cannot compile for
NVIDIA GPUs (no CUDA backend or no ptxas in the Triton install). Run from the repository root:
    .venv/bin/python tests/gpu_compile_check.py > report.json

To cover a new op, add rows to CASES: row(op name in perfml.ops, label, call, **options), where
call(op, dtype, **options) runs one forward and backward; each row runs in bf16, fp16 and fp32
unless it says otherwise. Functions outside perfml.ops are named by their path under perfml
("quant.w8a16_mm"). Rows of ops missing from perfml.ops.__all__ (or of functions that do not
exist) are skipped, so the table may name ops that are still being written.

Hardware limits checked per variant (violations fail at launch on a GPU, after compiling fine):
registers x threads <= 65536 (one block must fit an SM's register file) and shared memory <= 227
KiB (sm_90's largest opt-in block). Spills are reported, and fail the run above SPILL_FAIL_BYTES
per thread: a few spilled registers cost little, hundreds mean a tile too large for its warps.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

# Before triton is imported: real JITFunctions (not the interpreter), and a private, empty cache so
# that every variant really goes through ptxas, whose log is where the register counts come from.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.pop("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", None)  # a user's GPU will not have it set
_CACHE_DIR = tempfile.TemporaryDirectory(prefix="perfml-gpu-compile-")
os.environ["TRITON_CACHE_DIR"] = _CACHE_DIR.name
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import torch  # noqa: E402

UNAVAILABLE = 77
SM = 90
MAX_REGISTERS_PER_BLOCK = 65536
MAX_SHARED_BYTES = 232448  # 227 KiB: the per-block opt-in maximum of sm_90
SPILL_FAIL_BYTES = 1024  # spill stores per thread above which a variant fails
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Modules outside perfml.ops whose Triton kernels are checked too (their rows name the functions
# by path under perfml, "quant.w8a16_mm").
KERNEL_MODULES = ("perfml.quant.kernels",)
# Rows of x for the quantized matmuls: each BLOCK_M of the decode GEMV (1, 2, 4, 8 rows), then
# the tiled kernel's three row blocks (16, 32, 64).
QUANT_ROWS = (1, 2, 3, 8, 16, 32, 256)
# Rows (tokens) of the row-wise ops: enough that no block size shrinks to fit the input and that
# no per-program row count is 1 (Triton would compile that as a constant).
ROWS = 48


# --- the calls -------------------------------------------------------------------------------


def _input(*shape: int, dtype: torch.dtype, grad: bool = True) -> torch.Tensor:
    """Zeros: no kernel reads them, only host-side checks might, and zeros are deterministic."""
    return torch.zeros(shape, dtype=dtype).requires_grad_(grad)


def _lazy(*shape: int, dtype: torch.dtype, grad: bool = True) -> torch.Tensor:
    """Uninitialized: the pages of a tensor nobody reads are never touched, so inputs of more
    than 2**31 elements cost no memory here."""
    return torch.empty(shape, dtype=dtype).requires_grad_(grad)


def _fwd_bwd(out, inputs, grad_like: Callable = torch.ones_like) -> None:
    """Backward of `out` (a tensor or a tuple of them) with respect to the inputs needing grad;
    torch.autograd.grad returns the gradients instead of accumulating them into .grad."""
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
    wrt = [t for t in inputs if t is not None and t.requires_grad]
    if outs and wrt:
        torch.autograd.grad(outs, wrt, [grad_like(o) for o in outs])


def _rms_norm(fn, dtype, n, cast="llama", offset=0.0, weight="same", weight_grad=True):
    x = _input(ROWS, n, dtype=dtype)
    w = None
    if weight is not None:
        w = _input(n, dtype=dtype if weight == "same" else weight, grad=weight_grad)
    _fwd_bwd(fn(x, w, offset=offset, cast=cast), [x, w])


def _add_rms_norm(fn, dtype, n):
    x, r, w = _input(ROWS, n, dtype=dtype), _input(ROWS, n, dtype=dtype), _input(n, dtype=dtype)
    _fwd_bwd(fn(x, r, w), [x, r, w])


def _layer_norm(fn, dtype, n, weight=True, bias=True):
    x = _input(ROWS, n, dtype=dtype)
    w = _input(n, dtype=dtype) if weight else None
    b = _input(n, dtype=dtype) if bias else None
    _fwd_bwd(fn(x, w, b), [x, w, b])


def _glu(fn, dtype, n, layout="contiguous", inplace=False, **options):
    if layout == "contiguous":
        gate, up = _input(ROWS, n, dtype=dtype), _input(ROWS, n, dtype=dtype)
        inputs = [gate, up]
    else:  # the two halves of one fused gate/up projection: strided rows
        proj = _input(ROWS, 2 * n, dtype=dtype)
        gate, up = proj.chunk(2, dim=-1)
        inputs = [proj]
    _fwd_bwd(fn(gate, up, inplace_backward=inplace, **options), inputs)


def _glu_huge(fn, dtype, **options):
    # [2, 65536, 16448]: 2.16e9 elements, so the flat element count is specialized as i64
    gate, up = _lazy(2, 65536, 16448, dtype=dtype), _lazy(2, 65536, 16448, dtype=dtype)
    _fwd_bwd(fn(gate, up, **options), [gate, up], grad_like=torch.empty_like)


def _rope(fn, dtype, hq, hk, d, r=None, layout=1, positions=None, tables=None, strided=False):
    b, t, r = 2, 16, r or d
    tables = tables or dtype
    if layout == 1 and strided:  # HF: q_proj(x).view(B, T, H, D).transpose(1, 2)
        q = _input(b, t, hq, d, dtype=dtype).transpose(1, 2)
        k = _input(b, t, hk, d, dtype=dtype).transpose(1, 2)
    else:
        shape = (b, hq, t, d) if layout == 1 else (b, t, hq, d)
        q = _input(*shape, dtype=dtype)
        k = _input(*(shape[:1] + ((hk, t) if layout == 1 else (t, hk)) + shape[3:]), dtype=dtype)
    if positions is None:
        cos, sin = torch.randn(1, t, r, dtype=tables), torch.randn(1, t, r, dtype=tables)
        pos = None
    else:
        cos, sin = torch.randn(4096, r, dtype=tables), torch.randn(4096, r, dtype=tables)
        pos = torch.randint(0, 4096, (b if positions == "batch" else 1, t))
    _fwd_bwd(fn(q, k, cos, sin, pos, unsqueeze_dim=layout), [q, k])


def _softmax(fn, dtype, n, dim=-1):
    x = _input(ROWS, n, dtype=dtype) if dim == -1 else _input(n, 4, dtype=dtype)
    _fwd_bwd(fn(x, dim=dim), [x])


def _targets(n: int, v: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    t = torch.randint(0, v, (n,), dtype=dtype)
    t[::7] = -100  # some ignored tokens, as in padded batches
    return t


def _cross_entropy(fn, dtype, v, reduction="mean", inplace=False, target_dtype=torch.int64, **kw):
    leaf = _input(ROWS, v, dtype=dtype)
    logits = leaf.clone() if inplace else leaf  # in place needs logits that are not a leaf
    target = _targets(ROWS, v, target_dtype)
    _fwd_bwd(fn(logits, target, reduction=reduction, inplace_backward=inplace, **kw), [leaf])


def _cross_entropy_huge(fn, dtype):
    # [17000, 128256] logits: 2.18e9 elements, so the gradient-scaling kernel gets an i64 count.
    # In place (on a view, which is not a leaf): no gradient buffer, nothing touches the pages.
    leaf = _lazy(17000, 128256, dtype=dtype)
    loss = fn(leaf.view_as(leaf), _targets(17000, 128256), inplace_backward=True)
    _fwd_bwd(loss, [leaf])


def _linear_cross_entropy(fn, dtype, v, bias=False, reduction="mean", **kw):
    # hidden is small: it sizes CPU matmuls that really run, not any kernel
    n, h = 16, 64
    hidden, weight = _input(n, h, dtype=dtype), _input(v, h, dtype=dtype)
    b = _input(v, dtype=dtype) if bias else None
    loss = fn(hidden, weight, _targets(n, v), b, reduction=reduction, **kw)
    _fwd_bwd(loss, [hidden, weight, b])


def _quant_mm(fn, dtype, m, n, group=None, k=4096):
    """One weight-only quantized matmul, int8 (group None) or int4 with that group size. The
    launcher would compile the interpreter's variant of the tiled kernel for CPU tensors (an
    fp32 dot standing in for the 16-bit one): it is told these launches are for the GPU."""
    from unittest import mock

    from perfml.quant import kernels

    x = _input(m, k, dtype=dtype, grad=False)
    with mock.patch.object(kernels, "_interpreted", lambda x: False):
        if group is None:
            fn(x, torch.zeros(n, k, dtype=torch.int8), torch.ones(n, dtype=dtype))
        else:
            packed = torch.zeros(n, k // 2, dtype=torch.uint8)
            scale = torch.ones(n, k // group, dtype=dtype)
            fn(x, packed, scale, torch.zeros(n, k // group, dtype=torch.uint8), group)


def _decode_attention(fn, dtype, shape):
    """One decode step at the last slot of a [B, Hkv, L, D] cache, shape = (B, Hq, Hkv, D, L),
    q/k/v as the model makes them (views of [B, 1, H * D] projections). Launches on CPU tensors
    would compile the interpreter's variant (16-bit dots through fp32): the op is told these
    are for the GPU."""
    from unittest import mock

    b, hq, hkv, d, length = shape
    module = importlib.import_module("perfml.ops.decode_attention")

    def heads(h: int) -> torch.Tensor:
        return _input(b, 1, h * d, dtype=dtype, grad=False).view(b, 1, h, d).transpose(1, 2)

    q, k, v = heads(hq), heads(hkv), heads(hkv)
    k_cache = _input(b, hkv, length, d, dtype=dtype, grad=False)
    v_cache = _input(b, hkv, length, d, dtype=dtype, grad=False)
    with mock.patch.object(module, "_interpreted", lambda t: False):
        fn(q, k, v, k_cache, v_cache, torch.tensor(length - 1))


NORM_WIDTHS = (128, 2048, 4096, 5120, 8192, 16384, 32768)  # QK-norm, 1B ... 405B, past one tile
GLU_WIDTHS = (1536, 11008, 14336, 28672)
SOFTMAX_WIDTHS = (128, 1000, 4096, 32768, 50257, 131072)  # up to rows past any one-tile limit
VOCABS = (1000, 32000, 50257, 128256, 151936, 262144)

# decode attention (B, Hq, Hkv, D, L): llama-1b at a short and a long cache, llama-3-8b's heads;
# one split (the kernel writes the output itself); MHA; non-power-of-2 and 256-wide heads; MQA
DECODE_SHAPES = (
    (1, 16, 8, 128, 256),
    (1, 16, 8, 128, 2048),
    (1, 32, 8, 128, 2048),
    (1, 16, 8, 128, 32),
    (4, 16, 16, 64, 1024),
    (1, 32, 32, 80, 512),
    (1, 8, 4, 256, 1024),
    (1, 64, 1, 128, 4096),
)

Case = tuple[str, str, Callable, tuple[torch.dtype, ...]]


def row(op: str, label: str, call: Callable, dtypes=DTYPES, **options) -> Case:
    """One row of CASES: call(perfml.ops.<op>, dtype, **options) for each dtype, which runs one
    forward and backward."""
    return (op, label, partial(call, **options), dtypes)


CASES: list[Case] = [
    *[row("rms_norm", f"n={n}", _rms_norm, n=n) for n in NORM_WIDTHS],
    row("rms_norm", "fp32 weight", _rms_norm, n=4096, weight=torch.float32),
    *[
        row("rms_norm", f"{cast} n={n}", _rms_norm, n=n, cast=cast, offset=offset)
        for cast, offset in (("gemma", 1.0), ("none", 0.0))
        for n in (4096, 32768)
    ],
    *[row("rms_norm", f"no weight n={n}", _rms_norm, n=n, weight=None) for n in (4096, 32768)],
    *[
        row("rms_norm", f"frozen weight n={n}", _rms_norm, n=n, weight_grad=False)
        for n in (4096, 16384)
    ],
    *[row("add_rms_norm", f"n={n}", _add_rms_norm, n=n) for n in NORM_WIDTHS],
    *[row("layer_norm", f"n={n}", _layer_norm, n=n) for n in NORM_WIDTHS],
    *[
        row("layer_norm", f"{label} n={n}", _layer_norm, n=n, weight=w, bias=b)
        for label, w, b in (("no bias", True, False), ("no params", False, False))
        for n in (4096, 32768)
    ],
    *[
        row(op, f"{layout} n={n} {kw}", _glu, n=n, layout=layout, **kw)
        for op, kw in (
            ("swiglu", {}),
            ("geglu", {"approximate": "tanh"}),
            ("geglu", {"approximate": "none"}),
        )
        for layout in ("contiguous", "chunked")
        for n in GLU_WIDTHS
    ],
    row("swiglu", "inplace backward", _glu, n=14336, inplace=True),
    row("swiglu", "2**31+ elements", _glu_huge, dtypes=(torch.bfloat16,)),
    row("geglu", "2**31+ elements", _glu_huge, dtypes=(torch.bfloat16,), approximate="none"),
    row("rope", "llama-3-8b", _rope, hq=32, hk=8, d=128),
    row("rope", "llama-3-70b strided", _rope, hq=64, hk=8, d=128, strided=True),
    row("rope", "mha d=64", _rope, hq=16, hk=16, d=64),
    row("rope", "gemma d=256", _rope, hq=8, hk=4, d=256),
    row("rope", "partial rotary", _rope, hq=32, hk=32, d=80, r=32),
    row("rope", "partial rotary r=64", _rope, hq=32, hk=2, d=128, r=64),
    row("rope", "[B, T, H, D]", _rope, hq=32, hk=8, d=128, layout=2),
    row("rope", "fp32 tables", _rope, hq=32, hk=8, d=128, tables=torch.float32),
    row("rope", "position_ids", _rope, hq=32, hk=8, d=128, positions="shared"),
    row("rope", "position_ids per batch", _rope, hq=32, hk=8, d=128, positions="batch"),
    *[row("softmax", f"n={n}", _softmax, n=n) for n in SOFTMAX_WIDTHS],
    row("softmax", "dim=0", _softmax, n=4096, dim=0),
    *[row("cross_entropy", f"V={v}", _cross_entropy, v=v) for v in VOCABS],
    *[
        row("cross_entropy", f"V=128256 {kw}", _cross_entropy, v=128256, **kw)
        for kw in (
            {"reduction": "sum"},
            {"reduction": "none"},
            {"label_smoothing": 0.1},
            {"z_loss": 1e-4},
            {"softcap": 30.0},
            {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0, "reduction": "none"},
            {"inplace": True},
            {"target_dtype": torch.int32},
        )
    ],
    row("cross_entropy", "2**31+ elements", _cross_entropy_huge, dtypes=(torch.bfloat16,)),
    # N = 4096 at decode splits K (partials + the reduction kernel); N = 14336 fills the GPU
    # without a split at M = 1 and 8 (the GEMV writes the output itself)
    *[
        row(f"quant.{op}", f"M={m} N={n} group={group}", _quant_mm, m=m, n=n, group=group)
        for op, groups in (("w8a16_mm", (None,)), ("w4a16_mm", (32, 64, 128)))
        for group in groups
        for m in QUANT_ROWS
        for n in ((4096, 14336) if m in (1, 8) else (4096,))
    ],
    *[
        row("linear_cross_entropy", f"V={v} {kw}", _linear_cross_entropy, v=v, **kw)
        for v, kw in (
            (128256, {}),
            (50257, {"bias": True}),
            (32000, {"reduction": "sum", "chunk_size": 4}),
            (32000, {"reduction": "none", "softcap": 30.0}),
            (32000, {"label_smoothing": 0.1, "z_loss": 1e-4}),
            (32000, {"fp32_accumulation": False}),
        )
    ],
    *[
        row(
            "decode_attention", "B={} Hq={} Hkv={} D={} L={}".format(*s), _decode_attention, shape=s
        )
        for s in DECODE_SHAPES
    ],
]


# --- recording launches ----------------------------------------------------------------------


@dataclass
class Variant:
    """One compilation a GPU would do: a kernel under one specialization and option set."""

    kernel: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: object  # triton's CUDAOptions
    case: str  # the first call that launched it

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def constexpr_values(self) -> dict:
        names = [p.name for p in self.kernel.params]
        return {names[path[0]]: _plain(value) for path, value in self.constexprs.items()}


def _plain(value):
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


class Recorder:
    """Stands in for JITFunction.run: binds the arguments exactly as Triton's launcher does,
    for an sm_90 target, and keeps each distinct variant instead of launching it."""

    def __init__(self, backend) -> None:
        from triton.runtime.jit import create_function_from_signature

        self.backend = backend
        self._make_binder = create_function_from_signature
        self._binders: dict[int, Callable] = {}
        self.variants: dict[tuple, Variant] = {}
        self.launched: set = set()
        self.case = ""

    def run(self, kernel, *args, grid, warmup, **kwargs):
        from triton import knobs

        # the two options JITFunction.run adds before binding
        kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = self._binders.get(id(kernel))
        if binder is None:
            binder = self._make_binder(kernel.signature, kernel.params, self.backend)
            self._binders[id(kernel)] = binder
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(
            self.backend, kwargs, bound, specialization, options
        )
        key = (id(kernel), repr(signature), repr(constexprs), repr(attrs), options.hash())
        if key not in self.variants:
            self.variants[key] = Variant(kernel, signature, constexprs, attrs, options, self.case)
        self.launched.add(kernel)
        return None


def _bench_once(kernel_call, quantiles=None, **_):
    """An autotuner's benchmark: launch (that is, record) each config once, time nothing."""
    kernel_call()
    return [0.0, 0.0, 0.0]


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[None]:
    """Route perfml's CPU tensors to the Triton launchers and record their launches."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from perfml import _backend

    saved = (JITFunction.run, Autotuner.do_bench, _backend.interpret_mode)
    JITFunction.run = lambda self, *a, **k: recorder.run(self, *a, **k)
    Autotuner.do_bench = property(lambda self: _bench_once)  # every config gets recorded
    _backend.interpret_mode = lambda: True
    try:
        with _backend.force("triton"):
            yield
    finally:
        JITFunction.run, Autotuner.do_bench, _backend.interpret_mode = saved


def resolve(op: str, ops):
    """The function a row names: an op of perfml.ops, or a path under perfml ("quant.w8a16_mm");
    None when it does not exist (yet), or when its module does not import (defined_kernels
    reports that)."""
    if "." not in op:
        return getattr(ops, op) if op in ops.__all__ else None
    module, name = op.rsplit(".", 1)
    try:
        return getattr(importlib.import_module(f"perfml.{module}"), name, None)
    except ImportError:
        return None


def run_cases(recorder: Recorder, ops) -> tuple[list[str], list[str], list[dict]]:
    """(ops run, ops absent, call errors): every row of CASES whose function exists."""
    present, absent, errors = [], [], []
    torch.manual_seed(0)  # targets and positions: the same variants on every run
    for op, label, call, dtypes in CASES:
        fn = resolve(op, ops)
        seen = present if fn is not None else absent
        if op not in seen:
            seen.append(op)
        if seen is absent:
            continue
        for dtype in dtypes:
            recorder.case = f"{op} {label} {str(dtype).removeprefix('torch.')}"
            try:
                call(fn, dtype)
            except Exception as exc:
                tail = "".join(traceback.format_exception(exc)[-3:])
                errors.append({"case": recorder.case, "error": tail.strip()[-2000:]})
    return present, absent, errors


# --- compiling -------------------------------------------------------------------------------


@contextlib.contextmanager
def captured_output() -> Iterator[Callable[[], str]]:
    """Capture file descriptors 1 and 2: ptxas's log is printed by Triton, and MLIR diagnostics
    are written by C++ straight to stderr."""
    with tempfile.TemporaryFile(mode="w+") as sink:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        text: list[str] = []
        try:
            yield lambda: "".join(text)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            text.append(sink.read())


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
}


def _chain(exc: BaseException) -> list[BaseException]:
    """exc and its explicit causes (`raise ... from`), outermost first: Triton re-raises a
    helper's error once per caller that way. Implicit contexts are left out: for a ptxas failure
    that is the bare CalledProcessError behind Triton's far more telling PTXASError."""
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 8:
        chain.append(chain[-1].__cause__)
    return chain


def _describe(exc: BaseException) -> str:
    """The full story, root cause first (a helper's NameError; ptxas's stderr and repro command),
    then each kernel line it was raised through."""
    parts = [f"{type(e).__name__}: {str(e).strip()[-2000:]}" for e in reversed(_chain(exc))]
    return "\n--- raised through ---\n".join(parts)


def _headline(exc: BaseException) -> str:
    """One line: the root cause and the kernel source line it points at."""
    chain = _chain(exc)
    root, where = chain[-1], ""
    what = next((line.strip() for line in str(root).splitlines() if line.strip()), "")
    for e in reversed(chain):  # the innermost error that carries a source excerpt
        lines = str(e).splitlines()
        caret = next((i for i, line in enumerate(lines) if line.strip().startswith("^")), 0)
        if caret:
            where = f" [{lines[0].strip()} `{lines[caret - 1].strip()}`]"
            if e is root:  # Triton's own error: the message follows the excerpt
                what = " ".join(line.strip() for line in lines[caret + 1 :] if line.strip())
            break
    details = [line.strip() for line in str(root).splitlines()[1:] if "error" in line.lower()]
    if details and not where:  # ptxas and MLIR: the first line that names the error
        what += " " + details[0]
    return f"{type(root).__name__}: {what[:300]}{where}"


def compile_variant(v: Variant, target) -> dict:
    import triton
    from triton.compiler import ASTSource

    threads = 32 * v.options.num_warps
    result = {
        "kernel": v.name,
        "module": v.kernel.__module__,
        "case": v.case,
        "constexprs": v.constexpr_values(),
        "signature": {k: t for k, t in v.signature.items() if t != "constexpr"},
        "num_warps": v.options.num_warps,
        "num_stages": v.options.num_stages,
    }
    start = time.perf_counter()
    try:
        with captured_output() as log:
            compiled = triton.compile(
                ASTSource(v.kernel, v.signature, v.constexprs, v.attrs),
                target=target,
                options=v.options.__dict__,
            )
    except Exception as exc:
        diagnostics = "\n".join(line for line in log().splitlines() if "error" in line.lower())
        result.update(
            ok=False,
            problem=_headline(exc),
            error=(_describe(exc) + "\n" + diagnostics).strip()[:6000],
        )
        return result
    finally:
        result["compile_s"] = round(time.perf_counter() - start, 2)
    text = log()
    for key, pattern in _PTXAS.items():
        found = pattern.search(text)
        result[key] = int(found.group(1)) if found else None
    result["shared_bytes"] = compiled.metadata.shared
    problems = []
    if result["registers"] is None:
        problems.append("ptxas printed no resource report")
    elif result["registers"] * threads > MAX_REGISTERS_PER_BLOCK:
        problems.append(
            f"{result['registers']} registers x {threads} threads > {MAX_REGISTERS_PER_BLOCK}"
        )
    if compiled.metadata.shared > MAX_SHARED_BYTES:
        problems.append(f"{compiled.metadata.shared} B shared memory > {MAX_SHARED_BYTES}")
    if (result["spill_stores"] or 0) > SPILL_FAIL_BYTES:
        problems.append(f"{result['spill_stores']} B spill stores > {SPILL_FAIL_BYTES} per thread")
    result.update(ok=not problems, problem="; ".join(problems) or None, error=None)
    return result


_PENDING: list[Variant] = []  # what forked compile workers inherit


def _compile_pending(index: int, target) -> dict:
    return compile_variant(_PENDING[index], target)


def compile_all(variants: list[Variant], target) -> list[dict]:
    """Compile each variant, in forked worker processes (one per CPU): ptxas and LLVM dominate
    the run time, and a fork inherits the recorded kernels without pickling them."""
    _PENDING[:] = variants
    workers = min(len(os.sched_getaffinity(0)), 8)
    context = multiprocessing.get_context("fork")
    with context.Pool(workers) as pool:
        return pool.starmap(_compile_pending, [(i, target) for i in range(len(variants))])


# --- coverage --------------------------------------------------------------------------------


def _unwrap(obj):
    """The JITFunction inside an autotune / heuristics wrapper (or obj itself)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
        obj = obj.fn
    return obj if isinstance(obj, JITFunction) else None


def defined_kernels(package, extra: tuple[str, ...] = ()) -> tuple[dict[str, object], list[dict]]:
    """{"module.name": JITFunction} for every @triton.jit function a module of the package (or
    one of the `extra` modules) defines, and the modules that failed to import."""
    found, errors = {}, []
    names = [info.name for info in pkgutil.iter_modules(package.__path__, package.__name__ + ".")]
    for name in names + list(extra):
        try:
            module = importlib.import_module(name)
        except Exception as exc:
            errors.append({"module": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        for value in vars(module).values():
            fn = _unwrap(value)
            if fn is not None and fn.__module__ == module.__name__:
                found[f"{fn.__module__}.{fn.__name__}"] = fn
    return found, errors


def _callees(fn) -> set:
    """JITFunctions named in fn's body (helpers it calls), resolved in its module globals."""
    out = set()
    for node in ast.walk(ast.parse(fn.src)):
        if isinstance(node, ast.Name):
            callee = _unwrap(fn.__globals__.get(node.id))
            if callee is not None:
                out.add(callee)
    return out


def reached(launched: set) -> set:
    """The launched kernels and every helper they call, transitively."""
    seen, todo = set(), list(launched)
    while todo:
        fn = todo.pop()
        if fn not in seen:
            seen.add(fn)
            todo.extend(_callees(fn))
    return seen


# --- main ------------------------------------------------------------------------------------


def nvidia_unavailable() -> str | None:
    """Why this Triton install cannot compile for NVIDIA GPUs, or None when it can."""
    try:
        from triton import knobs
        from triton.backends import backends
    except Exception as exc:
        return f"triton is not importable: {type(exc).__name__}: {exc}"
    if "nvidia" not in backends:
        return "triton has no NVIDIA backend"
    try:
        ptxas = knobs.nvidia.ptxas.path
    except Exception as exc:
        return f"no usable ptxas: {type(exc).__name__}: {exc}"
    if not (ptxas and os.access(ptxas, os.X_OK)):
        return f"ptxas not found (looked at {ptxas!r})"
    return None


def _summary(report: dict) -> str:
    lines = [
        f"{len(report['variants'])} variants of {len(report['kernels_launched'])} kernels "
        f"compiled for sm_{SM}a in {report['seconds']:.0f} s "
        f"(ops: {', '.join(report['ops_run'])}; absent: {', '.join(report['ops_absent']) or '-'})",
        f"{'kernel':<36} {'variants':>8} {'regs max':>8} {'spills max':>10} {'failed':>6}",
    ]
    by_kernel: dict[str, list[dict]] = {}
    for v in report["variants"]:
        by_kernel.setdefault(v["kernel"], []).append(v)
    for name, vs in sorted(by_kernel.items()):
        regs = max((v.get("registers") or 0) for v in vs)
        spills = max((v.get("spill_stores") or 0) for v in vs)
        failed = sum(not v["ok"] for v in vs)
        lines.append(f"{name:<36} {len(vs):>8} {regs:>8} {spills:>10} {failed:>6}")
    for v in report["variants"]:
        if v.get("spill_stores"):
            lines.append(
                f"spills: {v['kernel']} {v['constexprs']} num_warps={v['num_warps']}: "
                f"{v['spill_stores']} B stores / {v['spill_loads']} B loads per thread "
                f"({v['case']})"
            )
    if report["ops_not_in_table"]:
        lines.append(f"note: ops with no row in CASES: {', '.join(report['ops_not_in_table'])}")
    lines += [f"PROBLEM: {p}" for p in report["problems"]]
    return "\n".join(lines)


def _variant_problems(results: list[dict]) -> list[str]:
    """One line per kernel and distinct problem (a broken helper fails every dtype and width
    alike), naming the first failing variant and the call that launched it."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        if not r["ok"]:
            groups.setdefault((r["kernel"], r["problem"]), []).append(r)
    return [
        f"{kernel}: {len(rs)} variant(s), first {rs[0]['constexprs']} "
        f"num_warps={rs[0]['num_warps']} ({rs[0]['case']}): {problem}"
        for (kernel, problem), rs in groups.items()
    ]


def main() -> int:
    started = time.perf_counter()
    reason = nvidia_unavailable()
    if reason is not None:
        print(json.dumps({"unavailable": reason}))
        return UNAVAILABLE
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    import perfml.ops

    target = GPUTarget("cuda", SM, 32)
    recorder = Recorder(make_backend(target))
    defined, module_errors = defined_kernels(perfml.ops, KERNEL_MODULES)
    with recording(recorder):
        ops_run, ops_absent, case_errors = run_cases(recorder, perfml.ops)
    calls_s = time.perf_counter() - started
    results = compile_all(list(recorder.variants.values()), target)

    names = {fn: name for name, fn in defined.items()}
    covered = reached(recorder.launched)
    missing = sorted(name for name, fn in defined.items() if fn not in covered)
    problems = [f"cannot import {e['module']}: {e['error']}" for e in module_errors]
    problems += [f"call failed: {e['case']}: {e['error']}" for e in case_errors]
    problems += [f"never compiled (no call in CASES reaches it): {name}" for name in missing]
    problems += _variant_problems(results)
    if not results:
        problems.append("no kernel was launched: nothing was compiled")
    report = {
        "triton": triton.__version__,
        "target": f"cuda sm_{SM}a",
        "seconds": round(time.perf_counter() - started, 1),
        "seconds_calls": round(calls_s, 1),
        "ops_run": ops_run,
        "ops_absent": ops_absent,
        "ops_not_in_table": [
            op
            for op in perfml.ops.__all__
            if not op.endswith("_ref") and op not in {row[0] for row in CASES}
        ],
        "kernels_defined": sorted(defined),
        "kernels_launched": sorted(names.get(fn, fn.__name__) for fn in recorder.launched),
        "kernels_missing": missing,
        "variants": results,
        "problems": problems,
        "ok": not problems,
    }
    print(_summary(report), file=sys.stderr)
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
