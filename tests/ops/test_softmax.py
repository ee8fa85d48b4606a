"""perfml.ops.softmax against the float64 reference and torch.softmax.

On machines without CUDA the Triton kernels run in interpret mode (tests/conftest.py). The looped
(long-row) kernels are reached two ways: rows longer than the real one-tile limits, and, for
awkward tilings, with the limits and the tile shrunk.
"""

import sys

import pytest
import torch

from perfml import _backend
from perfml.ops import softmax, softmax_ref
from tests.utils import assert_matches_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
softmax_module = sys.modules["perfml.ops.softmax"]

# Rows of -inf, and the padding rows of a partly filled tile, compute 0 / 0 = NaN on purpose (and
# never store it in the padding case); numpy, under the interpreter, warns about each one.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def _make_x(shape, dtype, layout, scale=3.0):
    if layout == "contiguous":
        return torch.randn(shape, device=DEVICE, dtype=dtype) * scale
    if layout == "strided":  # every other column: no unit stride, the launcher copies
        wide = torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE, dtype=dtype) * scale
        return wide[..., 1::2]
    if layout == "row-padded":  # unit column stride, row stride N + 5: read in place
        wide = torch.randn(*shape[:-1], shape[-1] + 5, device=DEVICE, dtype=dtype) * scale
        return wide[..., : shape[-1]]
    if layout == "transposed":
        return torch.randn(tuple(reversed(shape)), device=DEVICE, dtype=dtype).transpose(0, 1)
    raise AssertionError(layout)


def _run(fn, x, dy, dim=-1):
    x = x.detach().requires_grad_()
    y = fn(x, dim)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y.detach(), dx


def _check(x, dim=-1):
    dy = torch.randn(x.shape, device=DEVICE).to(x.dtype)
    got = _run(softmax, x, dy, dim)
    want = _run(softmax_ref, x.double(), dy.double(), dim)
    base = _run(torch.softmax, x, dy, dim)  # torch's own kernel in x.dtype
    for name, g, r, b in zip(("y", "dx"), got, want, base, strict=True):
        assert g.dtype == x.dtype, name
        assert_matches_reference(g, r, b, name=name)


CASES = [
    # (shape, layout)
    ((1, 97), "contiguous"),
    ((4, 1), "contiguous"),
    ((5, 1025), "contiguous"),
    ((37, 33), "contiguous"),  # several rows per program, the last block partial
    ((3, 4099), "contiguous"),
    ((2, 3, 97), "contiguous"),
    ((6, 96), "strided"),
    ((5, 130), "row-padded"),
    ((7, 97), "transposed"),
    ((2, 20011), "contiguous"),  # forward in one tile, backward looped
    ((5, 40009), "contiguous"),  # both looped; more rows than programs in interpret mode
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
def test_matches_float64_reference(shape, layout, dtype, poison_empty):
    _check(_make_x(shape, dtype, layout))


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Looped kernels with 32-element tiles: many tiles per row, a partial last one."""
    monkeypatch.setattr(softmax_module, "_FWD_ONE_TILE_MAX", 16)
    monkeypatch.setattr(softmax_module, "_BWD_ONE_TILE_MAX", 16)
    monkeypatch.setattr(softmax_module, "_LOOP_BLOCK", 32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 97), (3, 32), (4, 33), (2, 1025)], ids=str)
def test_looped_kernels_over_many_tiles(shape, dtype, tiny_tiles, poison_empty):
    _check(_make_x(shape, dtype, "contiguous"))


def test_looped_kernel_rescales_when_the_max_grows(tiny_tiles):
    # An increasing row makes every tile raise the running max.
    x = torch.linspace(-30, 30, 300, device=DEVICE).repeat(3, 1)
    x[1] = x[1].flip(0)
    _check(x)


@pytest.mark.parametrize("dim", [0, 1, -2, 2])
@pytest.mark.parametrize("layout", ["contiguous", "transposed-batch"])
def test_any_dim(dim, layout, poison_empty):
    x = torch.randn(5, 6, 7, device=DEVICE) * 3
    if layout == "transposed-batch":
        x = torch.randn(6, 5, 7, device=DEVICE).transpose(0, 1) * 3
    _check(x, dim)
    if layout == "contiguous":  # like torch: a contiguous input gives a contiguous output
        assert softmax(x, dim).is_contiguous()


@pytest.mark.parametrize("tiles", ["one-tile", "looped"])
def test_rows_of_minus_inf_match_torch(tiles, monkeypatch):
    if tiles == "looped":
        monkeypatch.setattr(softmax_module, "_FWD_ONE_TILE_MAX", 16)
        monkeypatch.setattr(softmax_module, "_LOOP_BLOCK", 32)
    x = torch.randn(6, 100, device=DEVICE)
    x[0] = float("-inf")  # all masked: NaN, as torch gives
    x[1, :70] = float("-inf")  # a leading run longer than a tile, as in a causal mask
    x[2, 30:] = float("-inf")
    x[3, 5] = float("inf")  # +inf: NaN, as torch gives
    x[4, ::2] = float("-inf")
    x[5, 50] = float("nan")  # a NaN anywhere makes the row NaN, as in torch
    got, want = softmax(x), torch.softmax(x, -1)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert torch.isnan(got[[0, 3, 5]]).all()
    assert torch.isfinite(got[[1, 2, 4]]).all()


def test_large_magnitude_bf16_stays_finite():
    x = (torch.randn(4, 512, device=DEVICE) * 1e4).bfloat16()
    dy = torch.randn(4, 512, device=DEVICE).bfloat16()
    y, dx = _run(softmax, x, dy)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    torch.testing.assert_close(y, torch.softmax(x, -1), atol=1e-2, rtol=0)


def test_scalar_and_empty_inputs():
    assert softmax(torch.tensor(3.0, device=DEVICE)).item() == 1.0
    for shape in [(0, 5), (3, 0)]:
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        y = softmax(x)
        y.sum().backward()
        assert y.shape == shape and x.grad.shape == shape


def test_float64_input_uses_the_exact_reference():
    x = torch.randn(3, 33, device=DEVICE, dtype=torch.float64)
    assert torch.equal(softmax(x, 0), softmax_ref(x, 0))


def test_reference_backend_forward_and_backward():
    # The reference path, when asked for.
    x = torch.randn(5, 200, device=DEVICE) * 3
    dy = torch.randn(5, 200, device=DEVICE)
    with _backend.force("reference"):
        got = _run(softmax, x, dy, 0)
    want = _run(softmax_ref, x.double(), dy.double(), 0)
    for name, g, r in zip(("y", "dx"), got, want, strict=True):
        assert_matches_reference(g, r, name=name)


def test_gradient_of_a_weighted_sum_reads_an_expanded_dy():
    x = torch.randn(4, 33, device=DEVICE, requires_grad=True)
    w = torch.randn(33, device=DEVICE)
    (softmax(x) * w).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (softmax_ref(x64) * w.double()).sum().backward()
    assert_matches_reference(x.grad, x64.grad, name="dx")


# --- bad input -------------------------------------------------------------------------------


def test_integer_input():
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        softmax(torch.ones(2, 8, dtype=torch.int64, device=DEVICE))


def test_dim_out_of_range():
    with pytest.raises(IndexError, match="dim 2 is out of range for x with 2 dimensions"):
        softmax(torch.randn(2, 8, device=DEVICE), dim=2)


def test_dim_not_an_int():
    with pytest.raises(TypeError, match="dim must be an int"):
        softmax(torch.randn(2, 8, device=DEVICE), dim=(0, 1))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a Tensor"):
        softmax([1.0, 2.0])


# --- torch.library integration ---------------------------------------------------------------


def test_opcheck():
    x = torch.randn(3, 5, 40, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.perfml.softmax_fwd.default, (x,))
    y = torch.ops.perfml.softmax_fwd(x.detach())
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.perfml.softmax_bwd.default, (dy, y))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_has_no_graph_break(backend):
    torch._dynamo.reset()
    x = torch.randn(4, 6, 64, device=DEVICE, requires_grad=True)

    def f(x):
        return (softmax(x * 2, dim=1) * softmax(x, dim=-1)).sum()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    compiled(x).backward()
    gx = x.grad.clone()
    x.grad = None
    f(x).backward()
    torch.testing.assert_close(gx, x.grad)


# --- GPU-only: real sizes and int64 offsets --------------------------------------------------


@pytest.mark.gpu
def test_long_rows_at_the_target_shape_on_gpu():
    _check(torch.randn(4096, 131072, device="cuda", dtype=torch.bfloat16) * 3)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 131072])
def test_more_than_2_to_the_31_elements(n):
    # n=4096: one-tile kernels; n=131072: looped kernels. The last rows start past 2**31.
    m = 2**31 // n + 3
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    y, dx = _run(softmax, x, dy)
    tail = slice(m - 3, m)
    want = _run(softmax_ref, x[tail].double(), dy[tail].double())
    base = _run(torch.softmax, x[tail], dy[tail])
    for name, g, r, b in zip(("y", "dx"), (y[tail], dx[tail]), want, base, strict=True):
        assert_matches_reference(g, r, b, name=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dtype_keyword_like_torch(dtype):
    # torch.softmax(x, dim, dtype=...) casts x first and returns that dtype
    x = torch.randn(3, 17, device=DEVICE, dtype=torch.float16, requires_grad=True)
    y = softmax(x, 1, dtype=dtype)
    assert y.dtype == dtype
    want = torch.softmax(x.detach().double(), 1)
    base = torch.softmax(x.detach(), 1, dtype=dtype)
    assert_matches_reference(y.detach(), want, base)
    y.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float16
    with pytest.raises(TypeError, match="dtype must be None or one of"):
        softmax(x, 1, dtype=torch.int32)


def _autograd_names(t):
    """The class names of every node of t's autograd graph: which ops ran."""
    names, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None:
            names.add(type(fn).__name__)
            stack.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize(
    "dtype,layout,dim",
    [
        (torch.float32, "contiguous", -1),
        (torch.bfloat16, "transposed", -1),
        (torch.float32, "strided", 0),
    ],
)
def test_aten_path_matches_float64_reference(dtype, layout, dim):
    # the CPU path without a C++ kernel
    x = _make_x((37, 96), dtype, layout)
    with _backend.force("aten"):
        assert "SoftmaxBackward0" in _autograd_names(softmax(x.requires_grad_(), dim))
        _check(x, dim)
