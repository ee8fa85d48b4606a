"""The C++ extension perfml._C: its CPU RMSNorm kernel against the float64 reference.

The kernel is reached the way users reach it, through perfml.ops.rms_norm (custom op + autograd)
with the cpp path forced, because the suite runs in Triton interpret mode where the automatic
choice on CPU is Triton. The tolerance policy is tests/utils.py's. The only skip is a missing
extension; CI builds it (pip install --no-build-isolation -e .).
"""

import functools
import os
import subprocess
import sys

import pytest
import torch

import perfml
from perfml import _backend
from perfml.ops import rms_norm, rms_norm_ref
from tests.utils import assert_matches_reference, max_err

if not _backend.has_extension():
    pytest.skip(
        f"perfml._C is not built ({_backend.extension_error()}); "
        "build it with: pip install --no-build-isolation --no-deps -e .",
        allow_module_level=True,
    )

from perfml import _C  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CAST_OFFSETS = [("llama", 0.0), ("gemma", 1.0), ("none", 0.0)]
LOW = (torch.bfloat16, torch.float16)


def _make_x(shape, dtype, layout):
    if layout == "contiguous":
        return torch.randn(shape, dtype=dtype)
    if layout == "column-sliced":  # every other column of a wider tensor: no unit stride
        return torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., 1::2]
    if layout == "transposed":  # [N, M] storage read as [M, N]
        return torch.randn(tuple(reversed(shape)), dtype=dtype).transpose(0, 1)
    raise AssertionError(layout)


def _run_and_grad(fn, x, w, dy):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_() if w is not None else None
    y = fn(x, w)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, (w.grad if w is not None else None)


def _assert_close(got, want64, base, x_dtype, name):
    """tests/utils.py's policy, judged by the dtype the math ran in: an fp32 tensor that came out
    of a bf16/fp16 computation (llama's promoted output, an fp32 weight's gradient) carries that
    computation's rounding, so it gets the 2x rule, not the fp32 one."""
    if x_dtype in LOW and got.dtype == torch.float32:
        assert torch.isfinite(got).all(), f"{name}: non-finite values"
        scale = want64.abs().max().item() if want64.numel() else 0.0
        limit = 2 * max_err(base, want64) + 1e-6 * max(scale, 1e-30)
        assert max_err(got, want64) <= limit, (
            f"{name}: error {max_err(got, want64):.3e} > {limit:.3e}"
        )
    else:
        assert_matches_reference(got, want64, base, name=name)


def _compare(x, w, dy, cast, offset, eps=1e-6):
    def cpp(x, w):
        with _backend.force("cpp"):
            return rms_norm(x, w, eps=eps, offset=offset, cast=cast)

    def ref(x, w):
        return rms_norm_ref(x, w, eps=eps, offset=offset, cast=cast)

    got = _run_and_grad(cpp, x, w, dy)
    want = _run_and_grad(ref, x.double(), w.double() if w is not None else None, dy)
    base = _run_and_grad(ref, x, w, dy)  # the same math in plain PyTorch, in x's dtype
    out_dtype = (
        torch.promote_types(x.dtype, w.dtype) if w is not None and cast == "llama" else x.dtype
    )
    expected_dtypes = (out_dtype, x.dtype, w.dtype if w is not None else None)
    for name, g, r, b, dt in zip(("y", "dx", "dw"), got, want, base, expected_dtypes, strict=True):
        if r is None:
            assert g is None, name
            continue
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert g.dtype == dt, f"{name}: dtype {g.dtype} != {dt}"
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        _assert_close(g, r, b, x.dtype, name)


CASES = [
    # (shape, layout, has_weight)
    ((1, 97), "contiguous", True),  # one row
    ((4, 1), "contiguous", True),
    ((5, 97), "contiguous", True),
    ((4, 1025), "contiguous", True),
    ((3, 4099), "contiguous", True),
    ((300, 130), "contiguous", True),  # several dweight chunks, the last one short
    ((2, 3, 97), "contiguous", True),  # leading batch dims
    ((6, 256), "column-sliced", True),
    ((7, 97), "transposed", True),
    ((4, 1025), "contiguous", False),
]


def test_cpp_path_is_the_one_forced():
    with _backend.force("cpp"):
        assert _backend.select("rms_norm", torch.device("cpu"), has_cpp=True) == "cpp"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cast,offset", CAST_OFFSETS)
@pytest.mark.parametrize("shape,layout,has_weight", CASES, ids=str)
def test_matches_float64_reference(shape, layout, has_weight, cast, offset, dtype):
    if not has_weight:
        offset = 0.0
    x = _make_x(shape, dtype, layout)
    w = (torch.randn(shape[-1], dtype=dtype) * 0.5 + 1) if has_weight else None
    dy = torch.randn(shape, dtype=torch.float64)
    _compare(x, w, dy, cast, offset)


@pytest.mark.parametrize("cast,offset", CAST_OFFSETS)
@pytest.mark.parametrize("x_dtype", LOW, ids=str)
def test_fp32_weight_with_low_precision_x(x_dtype, cast, offset):
    # Mixed-precision training keeps the weight in fp32; llama then promotes y (and so dy) to fp32.
    x = torch.randn(9, 1025, dtype=x_dtype)
    w = torch.randn(1025, dtype=torch.float32) * 0.5 + 1
    dy = torch.randn(9, 1025, dtype=torch.float64)
    _compare(x, w, dy, cast, offset)


def test_empty_batch():
    x = torch.randn(0, 97)
    w = torch.randn(97)
    with _backend.force("cpp"):
        y, dx, dw = _run_and_grad(rms_norm, x, w, torch.randn(0, 97))
    assert y.shape == dx.shape == (0, 97) and torch.equal(dw, torch.zeros(97))


def test_direct_call_matches_reference_internals():
    # The contract the Python launcher relies on: (y, rstd) and (dx, dw) of the *_ref functions.
    from perfml.ops.rms_norm import _rms_norm_bwd_ref, _rms_norm_fwd_ref

    x = torch.randn(33, 515, dtype=torch.bfloat16)
    w = torch.randn(515, dtype=torch.bfloat16)
    y, rstd = _C.rms_norm_fwd(x, w, 1e-6, 0.0, 0)
    y_ref, rstd_ref = _rms_norm_fwd_ref(x, w, 1e-6, 0.0, 0)
    assert rstd.dtype == torch.float32 and rstd.shape == (33,)
    torch.testing.assert_close(rstd, rstd_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=2**-7, atol=1e-6)  # at most one bf16 rounding flip
    dy = torch.randn(33, 515, dtype=torch.bfloat16)
    dx, dw = _C.rms_norm_bwd(dy, x, w, rstd, 0.0, True)
    dx_ref, dw_ref = _rms_norm_bwd_ref(dy, x, w, rstd, 0.0, True)
    torch.testing.assert_close(dx, dx_ref, rtol=2**-7, atol=1e-5)
    torch.testing.assert_close(dw, dw_ref, rtol=2**-7, atol=1e-4)
    dx2, dw2 = _C.rms_norm_bwd(dy, x, w, rstd, 0.0, False)
    assert torch.equal(dx2, dx) and dw2.numel() == 0
    dx3, dw3 = _C.rms_norm_bwd(dy, x, None, rstd, 0.0, True)
    assert dx3.dtype == torch.bfloat16 and dw3.numel() == 0


def test_dweight_is_deterministic_and_independent_of_thread_count():
    x = torch.randn(515, 1031)
    w = torch.randn(1031)
    dy = torch.randn(515, 1031)
    _, rstd = _C.rms_norm_fwd(x, w, 1e-6, 0.0, 0)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, threads, 1, 3):
            torch.set_num_threads(n)
            results.append(_C.rms_norm_bwd(dy, x, w, rstd, 0.0, True))
    finally:
        torch.set_num_threads(threads)
    for dx, dw in results[1:]:
        assert torch.equal(dx, results[0][0]) and torch.equal(dw, results[0][1])


_RUN_KERNELS = """
import sys, torch, perfml._C as C
cases = torch.load(sys.argv[1])
out = {"isa": C.cpu_kernel_isa()}
for key, (x, w, dy, offset, cast) in cases.items():
    y, rstd = C.rms_norm_fwd(x, w, 1e-6, offset, cast)
    dx, dw = C.rms_norm_bwd(dy.to(y.dtype), x, w, rstd, offset, True)
    out[key] = (y, dx, dw)
torch.save(out, sys.argv[2])
"""


def test_portable_kernel_build(tmp_path):
    # Machines without AVX2 run the DEFAULT build of the kernels; ATEN_CPU_CAPABILITY=default makes
    # this one run it too. The choice is made once per process, hence the subprocess.
    casts = ("llama", "gemma", "none")
    cases = {}
    for dtype in (torch.float32, torch.bfloat16):
        for cast, offset in CAST_OFFSETS:
            x = torch.randn(7, 1031, dtype=dtype)
            w = torch.randn(1031, dtype=dtype) * 0.5 + 1
            dy = torch.randn(7, 1031, dtype=torch.float64)
            cases[f"{dtype}-{cast}"] = (x, w, dy, offset, casts.index(cast))
    torch.save(cases, tmp_path / "in.pt")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run(
        [sys.executable, "-c", _RUN_KERNELS, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        env=env,
        check=True,
        timeout=300,
    )
    out = torch.load(tmp_path / "out.pt")
    assert out.pop("isa") == "default"
    for key, (x, w, dy, offset, cast_id) in cases.items():
        ref = functools.partial(rms_norm_ref, eps=1e-6, offset=offset, cast=casts[cast_id])
        want = _run_and_grad(ref, x.double(), w.double(), dy)
        base = _run_and_grad(ref, x, w, dy)
        for name, g, r, b in zip(("y", "dx", "dw"), out[key], want, base, strict=True):
            _assert_close(g, r, b, x.dtype, f"{key} {name}")


def test_opcheck_on_the_cpp_path():
    # The fake (meta) functions of the custom ops must describe what the C++ kernel returns,
    # including llama's promoted output dtype.
    x = torch.randn(3, 5, 40, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(40, dtype=torch.float32, requires_grad=True)
    with _backend.force("cpp"):
        torch.library.opcheck(torch.ops.perfml.rms_norm_fwd.default, (x, w, 1e-6, 0.0, 0))
        y, rstd = torch.ops.perfml.rms_norm_fwd(x.detach(), w.detach(), 1e-6, 0.0, 0)
        dy = torch.randn_like(y)
        torch.library.opcheck(
            torch.ops.perfml.rms_norm_bwd.default, (dy, x.detach(), w.detach(), rstd, 0.0, True)
        )


# --- bad input to the extension itself -------------------------------------------------------


def _fwd_args(**change):
    args = {"x": torch.randn(4, 8), "weight": torch.randn(8), "eps": 1e-6, "offset": 0.0, "cast": 0}
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change,message",
    [
        ({"x": torch.randn(2, 4, 8)}, "x must be 2-D"),
        ({"x": torch.randn(8, 4).t()}, "x must be contiguous"),
        ({"x": torch.ones(4, 8, dtype=torch.int32)}, "x must be float32, bfloat16, float16"),
        ({"x": torch.empty(4, 8, device="meta")}, "x must be a CPU tensor"),
        ({"x": torch.randn(4, 0), "weight": None}, "x must have a hidden size"),
        ({"weight": torch.randn(7)}, r"weight must have shape \[8\]"),
        ({"weight": torch.ones(8, dtype=torch.int64)}, "weight must be float32"),
        ({"cast": 3}, "cast must be 0 \\(llama\\), 1 \\(gemma\\) or 2 \\(none\\)"),
        ({"eps": -1.0}, "eps must be finite and >= 0"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_fwd_rejects_bad_input(change, message):
    with pytest.raises(RuntimeError, match=f"perfml._C.rms_norm_fwd: {message}"):
        _C.rms_norm_fwd(**_fwd_args(**change))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"dy": torch.randn(4, 9)}, "dy must have x's shape"),
        ({"rstd": torch.ones(4, dtype=torch.float64)}, "rstd must be float32"),
        ({"rstd": torch.ones(5)}, r"rstd must be a contiguous \[4\] tensor"),
        ({"dy": torch.randn(8, 4).t()}, "dy must be contiguous"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bwd_rejects_bad_input(change, message):
    args = {
        "dy": torch.randn(4, 8),
        "x": torch.randn(4, 8),
        "weight": torch.randn(8),
        "rstd": torch.ones(4),
        "offset": 0.0,
        "needs_dw": True,
    }
    args.update(change)
    with pytest.raises(RuntimeError, match=f"perfml._C.rms_norm_bwd: {message}"):
        _C.rms_norm_bwd(**args)


# --- the Python side of loading ------------------------------------------------------------------


def test_extension_loads_without_a_kept_error():
    assert _backend.extension_error() is None
    assert _backend.extension() is _C
    assert perfml._C is _C
