"""perfml.ops.add_rms_norm against the float64 reference and the unfused code it replaces.

On machines without CUDA the Triton kernels run in interpret mode (tests/conftest.py), so these
tests cover the kernel code itself.
"""

import pytest
import torch

from perfml import _backend
from perfml.ops import add_rms_norm, add_rms_norm_ref, rms_norm
from perfml.ops.rms_norm import MAX_HIDDEN
from tests.utils import assert_matches_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _make(shape, dtype, layout):
    """A tensor of `shape`; the non-contiguous layouts read it out of bigger storage."""
    if layout == "contiguous":
        return torch.randn(shape, device=DEVICE, dtype=dtype)
    if layout == "strided":  # every other column of a wider tensor: no unit stride
        return torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE, dtype=dtype)[..., 1::2]
    if layout == "row-padded":  # rows of a wider tensor: unit stride, row stride 2N
        return torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE, dtype=dtype)[..., : shape[-1]]
    if layout == "transposed":  # [N, M] storage read as [M, N]: no unit stride anywhere
        return torch.randn(tuple(reversed(shape)), device=DEVICE, dtype=dtype).transpose(0, 1)
    raise AssertionError(layout)


def _weight(n, dtype):
    return (torch.randn(n, device=DEVICE) * 0.5 + 1).to(dtype)


def _run_and_grad(fn, x, r, w, dy, ds):
    """(y, s, dx, dresidual, dw) of fn(x, r, w) with upstream gradients dy (of y), ds (of s)."""
    x, r, w = (t.detach().requires_grad_() for t in (x, r, w))
    y, s = fn(x, r, w)
    torch.autograd.backward((y, s), (dy.to(y.dtype), ds.to(s.dtype)))
    return y.detach(), s.detach(), x.grad, r.grad, w.grad


def _check_against_reference(x, r, w, eps=1e-6):
    dy = torch.randn(x.shape, device=DEVICE, dtype=torch.float64)
    ds = torch.randn(x.shape, device=DEVICE, dtype=torch.float64)

    def fused(x, r, w):
        return add_rms_norm(x, r, w, eps)

    def ref(x, r, w):
        return add_rms_norm_ref(x, r, w, eps)

    got = _run_and_grad(fused, x, r, w, dy, ds)
    # The float64 reference starts from the sum rounded to x's dtype, which is part of the op's
    # contract (s is bit-identical to x + residual, checked below): x64 = x + residual as
    # rounded, residual64 = 0, so dx64 is the gradient of s and equally that of the residual.
    s64, zero = (x + r).double(), torch.zeros(x.shape, device=DEVICE, dtype=torch.float64)
    want = _run_and_grad(ref, s64, zero, w.double(), dy, ds)
    base = _run_and_grad(ref, x, r, w, dy, ds)  # the unfused code in plain PyTorch, x's dtype
    assert torch.equal(got[1], x + r), "s must be bit-identical to x + residual"
    assert got[0].dtype == torch.promote_types(x.dtype, w.dtype) and got[1].dtype == x.dtype
    for name, g, want_g, b in zip(
        ("y", "s", "dx", "dresidual", "dw"), got, want, base, strict=True
    ):
        assert_matches_reference(g, want_g, b, name=name)


CASES = [
    # (shape, layout of x, layout of residual)
    ((1, 97), "contiguous", "contiguous"),
    ((4, 1), "contiguous", "contiguous"),
    ((5, 1025), "contiguous", "contiguous"),
    ((3, 4099), "contiguous", "contiguous"),
    ((2, 3, 97), "contiguous", "contiguous"),
    ((70, 33), "contiguous", "contiguous"),  # two programs of 64 short rows, the second masked
    ((6, 256), "strided", "contiguous"),
    ((5, 130), "row-padded", "transposed"),
    ((7, 97), "transposed", "row-padded"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,x_layout,r_layout", CASES, ids=lambda v: str(v))
def test_matches_float64_reference(shape, x_layout, r_layout, dtype, poison_empty):
    x, r = _make(shape, dtype, x_layout), _make(shape, dtype, r_layout)
    _check_against_reference(x, r, _weight(shape[-1], dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_rows_take_the_looped_kernel(dtype, poison_empty):
    # Rows wider than one register tile (16384 forward, 8192 backward) are processed in chunks.
    n = 20011
    x, r = _make((3, n), dtype, "contiguous"), _make((3, n), dtype, "contiguous")
    _check_against_reference(x, r, _weight(n, dtype))


def test_fp32_weight_with_bf16_input_promotes_like_hf(poison_empty):
    x, r = (
        _make((6, 200), torch.bfloat16, "contiguous"),
        _make((6, 200), torch.bfloat16, "contiguous"),
    )
    w = _weight(200, torch.float32)
    _check_against_reference(x, r, w)
    y, _ = add_rms_norm(x, r, w)
    assert y.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matches_the_unfused_hf_code(dtype):
    # What a Llama decoder layer runs today: the residual add, then LlamaRMSNorm's forward.
    x, r = _make((8, 512), dtype, "contiguous"), _make((8, 512), dtype, "contiguous")
    w = _weight(512, dtype)
    s = x + r
    sf = s.float()
    hf = w * (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    y, s_fused = add_rms_norm(x, r, w, eps=1e-6)
    assert torch.equal(s_fused, s)
    # One ulp at most: fp32 sums in another order may flip one rounding.
    torch.testing.assert_close(y, hf, rtol=2**-7 if dtype == torch.bfloat16 else 2**-10, atol=1e-6)
    torch.testing.assert_close(y, rms_norm(s, w, eps=1e-6), rtol=0, atol=0)


def test_gradients_of_x_and_residual_do_not_share_storage():
    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    r = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(64, device=DEVICE, requires_grad=True)
    y, s = add_rms_norm(x, r, w)
    (y.sum() + s.sum()).backward()
    assert torch.equal(x.grad, r.grad)
    before = r.grad.clone()
    x.grad.zero_()  # what an optimizer's in-place update would do
    assert torch.equal(r.grad, before)


def test_same_tensor_as_x_and_residual():
    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(64, device=DEVICE)
    dy, ds = torch.randn(4, 64, device=DEVICE), torch.randn(4, 64, device=DEVICE)
    torch.autograd.backward(add_rms_norm(x, x, w), (dy, ds))
    xr = x.detach().double().requires_grad_()
    torch.autograd.backward(add_rms_norm_ref(xr, xr, w.double()), (dy.double(), ds.double()))
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)


def test_only_the_normalized_output_used():
    # s's gradient is zero: dx must be exactly rms_norm's gradient on s.
    x = torch.randn(5, 96, device=DEVICE, requires_grad=True)
    r = torch.randn(5, 96, device=DEVICE)
    w = torch.randn(96, device=DEVICE, requires_grad=True)
    dy = torch.randn(5, 96, device=DEVICE)
    add_rms_norm(x, r, w)[0].backward(dy)
    assert r.grad is None
    s = (x + r).detach().requires_grad_()
    w2 = w.detach().requires_grad_()
    rms_norm(s, w2).backward(dy)
    torch.testing.assert_close(x.grad, s.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)


def test_dweight_is_deterministic():
    x = torch.randn(64, 300, device=DEVICE, requires_grad=True)
    r = torch.randn(64, 300, device=DEVICE)
    w = torch.randn(300, device=DEVICE, requires_grad=True)
    dy = torch.randn(64, 300, device=DEVICE)
    grads = []
    for _ in range(2):
        w.grad = None
        add_rms_norm(x, r, w)[0].backward(dy)
        grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_large_magnitude_bf16_stays_finite():
    x = torch.randn(4, 512, device=DEVICE).mul(1e4).bfloat16().requires_grad_()
    r = torch.randn(4, 512, device=DEVICE).mul(1e4).bfloat16().requires_grad_()
    w = torch.ones(512, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y, s = add_rms_norm(x, r, w)
    torch.autograd.backward((y, s), (torch.randn_like(y), torch.randn_like(s)))
    for t in (y, s, x.grad, r.grad, w.grad):
        assert torch.isfinite(t).all()


def test_empty_batch():
    x = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    r = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(64, device=DEVICE, requires_grad=True)
    y, s = add_rms_norm(x, r, w)
    (y.sum() + s.sum()).backward()
    assert y.shape == s.shape == (0, 64) and torch.equal(w.grad, torch.zeros_like(w))


def test_float64_input_uses_the_exact_reference():
    x, r = (torch.randn(3, 33, device=DEVICE, dtype=torch.float64) for _ in range(2))
    w = torch.randn(33, device=DEVICE, dtype=torch.float64)
    for got, want in zip(add_rms_norm(x, r, w), add_rms_norm_ref(x, r, w), strict=True):
        assert torch.equal(got, want)


def test_reference_backend_agrees():
    x = torch.randn(5, 200, device=DEVICE, requires_grad=True)
    r = torch.randn(5, 200, device=DEVICE, requires_grad=True)
    w = torch.randn(200, device=DEVICE, requires_grad=True)
    dy, ds = torch.randn(5, 200, device=DEVICE), torch.randn(5, 200, device=DEVICE)
    with _backend.force("reference"):
        ref = add_rms_norm(x, r, w)
        ref_grads = torch.autograd.grad(ref, (x, r, w), (dy, ds))
    got = add_rms_norm(x, r, w)
    for g, want in zip(
        (*got, *torch.autograd.grad(got, (x, r, w), (dy, ds))), (*ref, *ref_grads), strict=True
    ):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)


# --- bad input -------------------------------------------------------------------------------


def test_residual_shape_mismatch():
    with pytest.raises(ValueError, match=r"residual must have x's shape \(2, 64\)"):
        add_rms_norm(
            torch.randn(2, 64, device=DEVICE),
            torch.randn(1, 64, device=DEVICE),
            torch.ones(64, device=DEVICE),
        )


def test_residual_dtype_mismatch():
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        add_rms_norm(
            torch.randn(2, 8, device=DEVICE),
            torch.randn(2, 8, device=DEVICE, dtype=torch.bfloat16),
            torch.ones(8, device=DEVICE),
        )


def test_residual_on_another_device():
    with pytest.raises(ValueError, match="x is on .* but residual is on meta"):
        add_rms_norm(
            torch.randn(2, 8, device=DEVICE),
            torch.randn(2, 8, device="meta"),
            torch.ones(8, device=DEVICE),
        )


def test_wrong_weight_shape():
    with pytest.raises(ValueError, match=r"weight must have shape \(64,\)"):
        x = torch.randn(2, 64, device=DEVICE)
        add_rms_norm(x, x, torch.randn(63, device=DEVICE))


def test_weight_on_another_device():
    with pytest.raises(ValueError, match="x is on .* but weight is on meta"):
        x = torch.randn(2, 8, device=DEVICE)
        add_rms_norm(x, x, torch.randn(8, device="meta"))


def test_integer_input():
    x = torch.ones(2, 8, dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        add_rms_norm(x, x, torch.ones(8, device=DEVICE))


def test_integer_weight():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(TypeError, match="weight must be a floating tensor"):
        add_rms_norm(x, x, torch.ones(8, dtype=torch.int64, device=DEVICE))


def test_missing_weight():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(TypeError, match="weight must be a Tensor"):
        add_rms_norm(x, x, None)


def test_hidden_size_limit():
    x = torch.empty(1, MAX_HIDDEN + 1, device=DEVICE)
    with pytest.raises(ValueError, match="hidden size"):
        add_rms_norm(x, x, torch.empty(MAX_HIDDEN + 1, device=DEVICE))


# --- torch.library integration ---------------------------------------------------------------


@pytest.mark.parametrize("needs_dw", [True, False])
def test_opcheck(needs_dw):
    x = torch.randn(3, 5, 40, device=DEVICE, requires_grad=True)
    r = torch.randn(3, 5, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(40, device=DEVICE, requires_grad=needs_dw)
    torch.library.opcheck(torch.ops.perfml.add_rms_norm_fwd.default, (x, r, w, 1e-6))
    x2, r2, w2 = x.detach(), r.detach(), w.detach()
    y, s, rstd = torch.ops.perfml.add_rms_norm_fwd(x2, r2, w2, 1e-6)
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    torch.library.opcheck(
        torch.ops.perfml.add_rms_norm_bwd.default, (dy, ds, s, w2, rstd, needs_dw)
    )


def test_compile_fullgraph_has_no_graph_break():
    torch._dynamo.reset()
    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    r = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(64, device=DEVICE, requires_grad=True)

    def f(x, r, w):
        y, s = add_rms_norm(x * 2, r, w)
        return (y * s).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(x, r, w).backward()
    grads = [t.grad.clone() for t in (x, r, w)]
    x.grad = r.grad = w.grad = None
    f(x, r, w).backward()
    for g, t in zip(grads, (x, r, w), strict=True):
        torch.testing.assert_close(g, t.grad)


@pytest.mark.slow
def test_compile_inductor_forward_and_backward():
    torch._dynamo.reset()
    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    r = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(64, device=DEVICE, requires_grad=True)

    def f(x, r, w):
        return add_rms_norm(x + 1, r, w)

    y, s = torch.compile(f, fullgraph=True)(x, r, w)
    want_y, want_s = f(x, r, w)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(s, want_s)
    (y.sum() + s.sum()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (x, r, w))


# --- GPU-only: real sizes and int64 offsets --------------------------------------------------


@pytest.mark.gpu
def test_llm_shape_on_gpu():
    x = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
    _check_against_reference(x, r, _weight(4096, torch.bfloat16))


@pytest.mark.gpu
def test_more_than_2_to_the_31_elements():
    n = 4096
    m = (2**31) // n + 3  # the last rows start past element 2**31
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = _weight(n, torch.bfloat16)
    y, s = add_rms_norm(x, r, w)
    tail = slice(m - 5, m)
    assert torch.equal(s[tail], x[tail].detach() + r[tail])
    want, _ = add_rms_norm_ref(x[tail].detach().double(), r[tail].double(), w.double())
    base, _ = add_rms_norm_ref(x[tail].detach(), r[tail], w)
    assert_matches_reference(y[tail], want, base, name="y tail")
    dy = torch.randn_like(y)
    y.backward(dy)  # s unused: its gradient is zero
    xr = x[tail].detach().double().requires_grad_()
    add_rms_norm_ref(xr, r[tail].double(), w.double())[0].backward(dy[tail].double())
    assert torch.isfinite(x.grad[tail]).all()
    torch.testing.assert_close(x.grad[tail].double(), xr.grad, rtol=0.05, atol=0.05)


def _autograd_names(t):
    """The class names of every node of t's autograd graph: which ops ran."""
    names, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None:
            names.add(type(fn).__name__)
            stack.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("path", ["aten", "cpp"])
@pytest.mark.parametrize(
    "dtype,w_dtype,layout",
    [
        (torch.float32, torch.float32, "contiguous"),
        (torch.bfloat16, torch.bfloat16, "transposed"),
        (torch.bfloat16, torch.float32, "row-padded"),
    ],
)
def test_cpu_paths_match_float64_reference(path, dtype, w_dtype, layout):
    # CPU without interpret mode: x + residual as one ATen op, then the C++ rms_norm (cpp) or
    # an ATen composite (aten, when the extension is not built)
    if path == "cpp" and not _backend.has_extension():
        pytest.skip(f"perfml._C is not built: {_backend.extension_error()}")
    x, r = _make((37, 96), dtype, layout), _make((37, 96), dtype, "contiguous")
    w = _weight(96, w_dtype)
    with _backend.force(path):
        y, _ = add_rms_norm(x.requires_grad_(), r, w)
        names = _autograd_names(y)
        assert "AddBackward0" in names and ("RsqrtBackward0" in names) == (path == "aten")
        _check_against_reference(x.detach(), r, w)
