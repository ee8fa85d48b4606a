"""perfml.ops.rms_norm against the float64 reference and the modules it mimics.

On machines without CUDA the Triton kernels run in interpret mode (tests/conftest.py), so these
tests cover the kernel code itself; the C++ CPU kernel has its own tests in tests/test_csrc.py.
"""

import pytest
import torch
import torch.nn.functional as F

from perfml import _backend
from perfml.ops import rms_norm, rms_norm_ref
from perfml.ops.rms_norm import MAX_HIDDEN
from tests.utils import assert_matches_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CAST_OFFSETS = [("llama", 0.0), ("gemma", 1.0), ("none", 0.0)]


def _make_x(shape, dtype, layout):
    """x of `shape`; "strided" gives a non-contiguous view with the same values layout."""
    if layout == "contiguous":
        return torch.randn(shape, device=DEVICE, dtype=dtype)
    if layout == "strided":  # every other column of a wider tensor: no unit stride
        return torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE, dtype=dtype)[..., 1::2]
    if layout == "row-padded":  # rows of a wider tensor: unit stride, row stride 2N
        return torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE, dtype=dtype)[..., : shape[-1]]
    if layout == "transposed":  # [N, M] storage read as [M, N]: no unit stride anywhere
        return torch.randn(tuple(reversed(shape)), device=DEVICE, dtype=dtype).transpose(0, 1)
    raise AssertionError(layout)


def _run_and_grad(fn, x, w, dy):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_() if w is not None else None
    y = fn(x, w)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, (w.grad if w is not None else None)


CASES = [
    # (shape, layout, has_weight)
    ((1, 97), "contiguous", True),
    ((4, 1), "contiguous", True),
    ((5, 1025), "contiguous", True),
    ((3, 4099), "contiguous", True),
    ((2, 3, 97), "contiguous", True),
    ((6, 256), "strided", True),
    ((5, 130), "row-padded", True),
    ((7, 97), "transposed", True),
    ((4, 1025), "contiguous", False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cast,offset", CAST_OFFSETS)
@pytest.mark.parametrize("shape,layout,has_weight", CASES, ids=lambda v: str(v))
def test_matches_float64_reference(shape, layout, has_weight, cast, offset, dtype, poison_empty):
    if not has_weight:
        offset = 0.0
    x = _make_x(shape, dtype, layout)
    n = shape[-1]
    w = (torch.randn(n, device=DEVICE, dtype=dtype) * 0.5 + 1) if has_weight else None
    dy = torch.randn(shape, device=DEVICE, dtype=torch.float64)

    def fused(x, w):
        return rms_norm(x, w, eps=1e-6, offset=offset, cast=cast)

    def ref(x, w):
        return rms_norm_ref(x, w, eps=1e-6, offset=offset, cast=cast)

    got = _run_and_grad(fused, x, w, dy)
    want = _run_and_grad(ref, x.double(), w.double() if w is not None else None, dy)
    base = _run_and_grad(ref, x, w, dy)  # the same math in plain PyTorch, in `dtype`
    assert got[0].dtype == dtype
    for name, g, r, b in zip(("y", "dx", "dw"), got, want, base, strict=True):
        if r is None:
            assert g is None
            continue
        assert g.dtype == dtype, name
        assert_matches_reference(g, r, b, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_rows_take_the_looped_kernel(dtype, poison_empty):
    # Rows wider than one register tile (16384 forward, 8192 backward) are processed in chunks.
    n = 20011
    x = torch.randn(3, n, device=DEVICE, dtype=dtype)
    w = torch.randn(n, device=DEVICE, dtype=dtype)
    dy = torch.randn(3, n, device=DEVICE, dtype=torch.float64)
    got = _run_and_grad(rms_norm, x, w, dy)
    want = _run_and_grad(rms_norm_ref, x.double(), w.double(), dy)
    base = _run_and_grad(rms_norm_ref, x, w, dy)
    for name, g, r, b in zip(("y", "dx", "dw"), got, want, base, strict=True):
        assert_matches_reference(g, r, b, name=name)


def test_llama_cast_matches_hf_code_bit_for_bit_in_bf16():
    # HF LlamaRMSNorm: normalize in fp32, cast to the input dtype, multiply by the weight.
    x = torch.randn(8, 512, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(512, device=DEVICE, dtype=torch.bfloat16)
    xf = x.float()
    hf = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    y = rms_norm(x, w, eps=1e-6, cast="llama")
    # One bf16 ulp at most: fp32 sums in a different order may flip a rounding.
    torch.testing.assert_close(y, hf, rtol=2**-7, atol=1e-6)


def test_llama_cast_promotes_like_hf_with_fp32_weight():
    x = torch.randn(4, 64, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(64, device=DEVICE, dtype=torch.float32)
    xf = x.float()
    hf = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    y = rms_norm(x, w, cast="llama")
    assert y.dtype == torch.float32 == hf.dtype
    torch.testing.assert_close(y, hf, rtol=1e-5, atol=1e-6)


def test_gemma_cast_matches_hf_gemma_code():
    x = torch.randn(4, 96, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(96, device=DEVICE, dtype=torch.bfloat16) * 0.1
    xf = x.float()
    hf = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w.float())).type_as(x)
    torch.testing.assert_close(rms_norm(x, w, offset=1.0, cast="gemma"), hf, rtol=2**-7, atol=1e-6)


def test_none_cast_matches_functional_rms_norm():
    x = torch.randn(4, 3, 80, device=DEVICE, dtype=torch.float16)
    w = torch.randn(80, device=DEVICE, dtype=torch.float16)
    torch.testing.assert_close(
        rms_norm(x, w, eps=1e-5, cast="none"),
        F.rms_norm(x, (80,), w, eps=1e-5),
        rtol=2e-3,
        atol=1e-5,
    )


def test_dweight_is_deterministic():
    x = torch.randn(64, 300, device=DEVICE, requires_grad=True)
    w = torch.randn(300, device=DEVICE, requires_grad=True)
    dy = torch.randn(64, 300, device=DEVICE)
    grads = []
    for _ in range(2):
        w.grad = None
        rms_norm(x, w).backward(dy)
        grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_only_x_requires_grad():
    x = torch.randn(3, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(40, device=DEVICE)
    rms_norm(x, w).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_large_magnitude_bf16_stays_finite():
    x = torch.randn(4, 512, device=DEVICE).mul(1e4).bfloat16()
    w = torch.ones(512, device=DEVICE, dtype=torch.bfloat16)
    assert torch.isfinite(rms_norm(x, w)).all()


def test_empty_batch():
    x = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(64, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w)
    y.sum().backward()
    assert y.shape == (0, 64) and torch.equal(w.grad, torch.zeros_like(w))


def test_float64_input_uses_the_exact_reference():
    x = torch.randn(3, 33, device=DEVICE, dtype=torch.float64)
    w = torch.randn(33, device=DEVICE, dtype=torch.float64)
    assert torch.equal(rms_norm(x, w), rms_norm_ref(x, w))


def test_reference_backend_agrees():
    x = torch.randn(5, 200, device=DEVICE)
    w = torch.randn(200, device=DEVICE)
    with _backend.force("reference"):
        ref = rms_norm(x, w)
    torch.testing.assert_close(rms_norm(x, w), ref, rtol=1e-5, atol=1e-6)


# --- bad input -------------------------------------------------------------------------------


def test_wrong_weight_shape():
    with pytest.raises(ValueError, match=r"weight must have shape \(64,\)"):
        rms_norm(torch.randn(2, 64, device=DEVICE), torch.randn(63, device=DEVICE))


def test_integer_input():
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        rms_norm(torch.ones(2, 8, dtype=torch.int32, device=DEVICE))


def test_integer_weight():
    with pytest.raises(TypeError, match="weight must be a floating tensor"):
        rms_norm(torch.randn(2, 8, device=DEVICE), torch.ones(8, dtype=torch.int64, device=DEVICE))


def test_mixed_devices():
    with pytest.raises(ValueError, match="x is on .* but weight is on meta"):
        rms_norm(torch.randn(2, 8, device=DEVICE), torch.randn(8, device="meta"))


def test_unknown_cast():
    with pytest.raises(ValueError, match="cast must be one of"):
        rms_norm(torch.randn(2, 8, device=DEVICE), cast="t5")


@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
@pytest.mark.parametrize("eps", [-0.5, float("nan"), float("inf"), None])
def test_eps_must_be_finite_and_not_negative_on_every_path(backend, eps):
    # the C++ kernel refused a negative eps while the Triton and reference paths returned NaN
    x = torch.randn(2, 8, device=DEVICE)
    with _backend.force(backend), pytest.raises(ValueError, match="eps must be a finite number"):
        rms_norm(x, torch.ones(8, device=DEVICE), eps=eps, cast="none")


def test_hidden_size_limit():
    with pytest.raises(ValueError, match="hidden size"):
        rms_norm(torch.empty(1, MAX_HIDDEN + 1, device=DEVICE))


def test_offset_without_weight():
    with pytest.raises(ValueError, match="offset needs a weight"):
        rms_norm(torch.randn(2, 8, device=DEVICE), offset=1.0)


# --- torch.library integration ---------------------------------------------------------------


@pytest.mark.parametrize("has_weight", [True, False])
def test_opcheck(has_weight):
    x = torch.randn(3, 5, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(40, device=DEVICE, requires_grad=True) if has_weight else None
    torch.library.opcheck(torch.ops.perfml.rms_norm_fwd.default, (x, w, 1e-6, 0.0, 0))
    x2 = x.detach()
    _, rstd = torch.ops.perfml.rms_norm_fwd(x2, w.detach() if has_weight else None, 1e-6, 0.0, 0)
    dy = torch.randn_like(x2)
    torch.library.opcheck(
        torch.ops.perfml.rms_norm_bwd.default,
        (dy, x2, w.detach() if has_weight else None, rstd, 0.0, has_weight),
    )


def test_compile_fullgraph_has_no_graph_break():
    torch._dynamo.reset()
    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(64, device=DEVICE, requires_grad=True)

    def f(x, w):
        return rms_norm(x * 2, w, cast="gemma", offset=1.0).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(x, w).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    f(x, w).backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


@pytest.mark.slow
def test_compile_inductor():
    torch._dynamo.reset()
    x = torch.randn(4, 64, device=DEVICE)
    w = torch.randn(64, device=DEVICE)
    compiled = torch.compile(lambda x, w: rms_norm(x + 1, w), fullgraph=True)
    torch.testing.assert_close(compiled(x, w), rms_norm(x + 1, w))


# --- GPU-only: real sizes and int64 offsets --------------------------------------------------


@pytest.mark.gpu
def test_llm_shape_on_gpu():
    x = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(16384, 4096, device="cuda", dtype=torch.float64)
    got = _run_and_grad(rms_norm, x, w, dy)
    want = _run_and_grad(rms_norm_ref, x.double(), w.double(), dy)
    base = _run_and_grad(rms_norm_ref, x, w, dy)
    for name, g, r, b in zip(("y", "dx", "dw"), got, want, base, strict=True):
        assert_matches_reference(g, r, b, name=name)


@pytest.mark.gpu
def test_more_than_2_to_the_31_elements():
    n = 4096
    m = (2**31) // n + 3  # the last rows start past element 2**31
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = rms_norm(x, w)
    tail = slice(m - 5, m)
    want = rms_norm_ref(x[tail].double(), w.double())
    assert_matches_reference(y[tail], want, rms_norm_ref(x[tail], w), name="y tail")
    dy = torch.randn_like(x)
    xg = x.requires_grad_()
    rms_norm(xg, w).backward(dy)
    xr = x[tail].detach().double().requires_grad_()
    rms_norm_ref(xr, w.double()).backward(dy[tail].double())
    assert torch.isfinite(xg.grad[tail]).all()
    torch.testing.assert_close(xg.grad[tail].double(), xr.grad, rtol=0.05, atol=0.05)
