"""perfml.ops.swiglu / geglu against the float64 reference and plain PyTorch.

On machines without CUDA the Triton kernels run in interpret mode (tests/conftest.py).
"""

import pytest
import torch
import torch.nn.functional as F

from perfml import _backend
from perfml.ops import geglu, geglu_ref, swiglu, swiglu_ref
from perfml.ops.swiglu import ACTIVATIONS
from tests.utils import assert_matches_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# name -> (fused, float64-capable reference, plain PyTorch as users write it)
OPS = {
    "swiglu": (swiglu, swiglu_ref, lambda g, u: F.silu(g) * u),
    "geglu-tanh": (
        lambda g, u, **kw: geglu(g, u, "tanh", **kw),
        lambda g, u: geglu_ref(g, u, "tanh"),
        lambda g, u: F.gelu(g, approximate="tanh") * u,
    ),
    "geglu-none": (
        lambda g, u, **kw: geglu(g, u, "none", **kw),
        lambda g, u: geglu_ref(g, u, "none"),
        lambda g, u: F.gelu(g) * u,
    ),
}


def _pair(shape, dtype, layout):
    """(gate, up) of `shape` in the given memory layout, values ~N(0, 2) to reach the tails."""

    def rnd(*s):
        return torch.randn(s, device=DEVICE, dtype=dtype) * 2

    if layout == "contiguous":
        return rnd(*shape), rnd(*shape)
    if layout == "strided":  # every other column: no unit stride, the launcher copies
        return rnd(*shape[:-1], 2 * shape[-1])[..., ::2], rnd(*shape[:-1], 2 * shape[-1])[..., 1::2]
    if layout == "row-padded":  # unit column stride, row stride 2N: read in place
        wide = rnd(*shape[:-1], 2 * shape[-1] + 3)
        return wide[..., : shape[-1]], rnd(*shape)
    if layout == "chunked":  # the two halves of one fused [.., 2N] projection
        return rnd(*shape[:-1], 2 * shape[-1]).chunk(2, dim=-1)
    if layout == "transposed":
        return rnd(*reversed(shape)).transpose(0, 1), rnd(*reversed(shape)).transpose(0, 1)
    raise AssertionError(layout)


def _grads(fn, gate, up, dy):
    """(y, dgate, dup) of fn on fresh leaves with the given values."""
    g = gate.detach().requires_grad_()
    u = up.detach().requires_grad_()
    y = fn(g, u)
    dg, du = torch.autograd.grad(y, (g, u), dy)
    return y.detach(), dg, du


CASES = [
    # (shape, layout)
    ((1, 97), "contiguous"),
    ((4, 1), "contiguous"),
    ((5, 1025), "contiguous"),
    ((3, 4099), "contiguous"),  # several programs per row of tiles
    ((2, 3, 97), "contiguous"),
    ((6, 96), "strided"),
    ((5, 130), "row-padded"),
    ((3, 2, 1030), "chunked"),
    ((7, 97), "transposed"),
    ((), "contiguous"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
def test_matches_float64_reference(shape, layout, op, dtype, poison_empty):
    fused, ref, plain = OPS[op]
    gate, up = _pair(shape, dtype, layout)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    got = _grads(fused, gate, up, dy)
    want = _grads(ref, gate.double(), up.double(), dy.double())
    base = _grads(plain, gate, up, dy)
    for name, g, r, b in zip(("y", "dgate", "dup"), got, want, base, strict=True):
        assert g.dtype == dtype, name
        assert_matches_reference(g, r, b, name=name)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_writes_gradients_over_the_inputs(op, dtype, poison_empty):
    fused, ref, plain = OPS[op]
    gate, up = _pair((3, 2, 333), dtype, "contiguous")
    dy = torch.randn(3, 2, 333, device=DEVICE).to(dtype)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    y = fused(g, u, inplace_backward=True)
    dg, du = torch.autograd.grad(y, (g, u), dy)
    # No new buffers: the gradients live in the inputs' memory.
    assert dg.data_ptr() == g.data_ptr() and du.data_ptr() == u.data_ptr()
    want = _grads(ref, gate.double(), up.double(), dy.double())
    base = _grads(plain, gate, up, dy)
    assert_matches_reference(y.detach(), want[0], base[0], name="y")
    assert_matches_reference(dg, want[1], base[1], name="dgate")
    assert_matches_reference(du, want[2], base[2], name="dup")


def test_inplace_backward_gradients_become_leaf_grads_without_a_copy():
    # AccumulateGrad adopts the returned gradient as .grad only when nothing else holds it;
    # otherwise it copies, and overwriting the inputs would save nothing.
    gate, up = _pair((4, 64), torch.float32, "contiguous")
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    swiglu(g, u, inplace_backward=True).backward(torch.ones(4, 64, device=DEVICE))
    assert g.grad.data_ptr() == g.data_ptr() and u.grad.data_ptr() == u.data_ptr()
    want = _grads(swiglu_ref, gate.double(), up.double(), torch.ones(4, 64, device=DEVICE).double())
    assert_matches_reference(g.grad, want[1], name="dgate")
    assert_matches_reference(u.grad, want[2], name="dup")


@pytest.mark.parametrize("layout", ["chunked", "row-padded"])
def test_inplace_backward_falls_back_where_overwriting_is_unsafe(layout, poison_empty):
    # Halves of one storage, or a non-contiguous gate: the gradients go to new buffers and the
    # inputs keep their values.
    gate, up = _pair((4, 130), torch.float32, layout)
    keep_g, keep_u = gate.clone(), up.clone()
    dy = torch.randn(4, 130, device=DEVICE)
    got = _grads(lambda g, u: swiglu(g, u, inplace_backward=True), gate, up, dy)
    want = _grads(swiglu_ref, gate.double(), up.double(), dy.double())
    assert torch.equal(gate, keep_g) and torch.equal(up, keep_u)
    for name, g, r in zip(("y", "dgate", "dup"), got, want, strict=True):
        assert_matches_reference(g, r, name=name)


def test_inplace_backward_is_caught_when_another_node_saved_the_input():
    # swiglu's backward runs first (it was recorded last) and overwrites gate, which the
    # multiplication saved: autograd's version counter must refuse, not read the gradient.
    lin = torch.nn.Linear(8, 16, device=DEVICE)
    x = torch.randn(3, 8, device=DEVICE)
    gate, up = lin(x), lin(x)
    square = gate * gate
    loss = (square + swiglu(gate, up, inplace_backward=True)).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_backward_twice_through_a_retained_graph_raises():
    lin = torch.nn.Linear(8, 16, device=DEVICE)
    x = torch.randn(3, 8, device=DEVICE)
    loss = swiglu(lin(x), lin(x) + 1, inplace_backward=True).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("which", ["gate", "up"])
@pytest.mark.parametrize("inplace", [False, True])
def test_only_one_input_requires_grad(which, inplace, poison_empty):
    gate, up = _pair((3, 50), torch.float32, "contiguous")
    keep = (gate.clone(), up.clone())
    g = gate.requires_grad_(which == "gate")
    u = up.requires_grad_(which == "up")
    y = swiglu(g, u, inplace_backward=inplace)
    dy = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, g if which == "gate" else u, dy)
    want = _grads(swiglu_ref, keep[0].double(), keep[1].double(), dy.double())
    assert_matches_reference(grad, want[1] if which == "gate" else want[2], name=f"d{which}")
    # The input without a gradient is never overwritten.
    assert torch.equal(up if which == "gate" else gate, keep[1] if which == "gate" else keep[0])


def test_gradient_of_a_sum_reads_an_expanded_dy():
    # y.sum().backward() hands the backward a dy with zero strides.
    gate, up = _pair((4, 33), torch.float32, "contiguous")
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    swiglu(g, u).sum().backward()
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    swiglu_ref(g64, u64).sum().backward()
    assert_matches_reference(g.grad, g64.grad, name="dgate")
    assert_matches_reference(u.grad, u64.grad, name="dup")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter: exp(1e4) = inf
@pytest.mark.parametrize("op", OPS)
def test_large_magnitude_bf16_stays_finite(op):
    fused, ref, _ = OPS[op]
    gate = (torch.randn(4, 256, device=DEVICE) * 1e4).bfloat16()
    up = (torch.randn(4, 256, device=DEVICE) * 1e4).bfloat16()
    dy = torch.randn(4, 256, device=DEVICE).bfloat16()
    y, dg, du = _grads(fused, gate, up, dy)
    want = _grads(ref, gate.double(), up.double(), dy.double())
    for name, t, r in zip(("y", "dgate", "dup"), (y, dg, du), want, strict=True):
        finite = torch.isfinite(r)
        assert torch.isfinite(t[finite]).all(), name


def test_empty_input():
    g = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    u = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    y = swiglu(g, u)
    y.sum().backward()
    assert y.shape == (0, 64) and g.grad.shape == (0, 64) and u.grad.shape == (0, 64)


def test_float64_input_uses_the_exact_reference():
    g = torch.randn(3, 33, device=DEVICE, dtype=torch.float64)
    u = torch.randn(3, 33, device=DEVICE, dtype=torch.float64)
    assert torch.equal(swiglu(g, u), swiglu_ref(g, u))
    assert torch.equal(geglu(g, u, "none"), geglu_ref(g, u, "none"))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("op", OPS)
def test_reference_backend_forward_and_backward(op, inplace):
    # The path CPU tensors take outside interpret mode.
    fused, ref, _ = OPS[op]
    gate, up = _pair((5, 200), torch.float32, "contiguous")
    dy = torch.randn(5, 200, device=DEVICE)
    with _backend.force("reference"):
        got = _grads(
            lambda g, u: fused(g, u, inplace_backward=inplace), gate.clone(), up.clone(), dy
        )
    want = _grads(ref, gate.double(), up.double(), dy.double())
    for name, g, r in zip(("y", "dgate", "dup"), got, want, strict=True):
        assert_matches_reference(g, r, name=name)


def test_geglu_defaults_to_tanh_like_hf_gelu_pytorch_tanh():
    g, u = _pair((3, 40), torch.float32, "contiguous")
    torch.testing.assert_close(geglu(g, u), F.gelu(g, approximate="tanh") * u)


# --- bad input -------------------------------------------------------------------------------


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"same shape, got gate \(2, 8\) and up \(2, 9\)"):
        swiglu(torch.randn(2, 8, device=DEVICE), torch.randn(2, 9, device=DEVICE))


def test_dtype_mismatch():
    with pytest.raises(TypeError, match="gate and up must have the same dtype"):
        geglu(torch.randn(2, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE).half())


def test_device_mismatch():
    with pytest.raises(ValueError, match="gate is on .* but up is on meta"):
        swiglu(torch.randn(2, 8, device=DEVICE), torch.randn(2, 8, device="meta"))


def test_integer_input():
    with pytest.raises(TypeError, match="up must be a floating tensor"):
        swiglu(torch.randn(2, 8, device=DEVICE), torch.ones(2, 8, dtype=torch.int32, device=DEVICE))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="gate must be a Tensor"):
        swiglu([1.0, 2.0], torch.randn(2, device=DEVICE))


def test_unknown_gelu_approximation():
    with pytest.raises(ValueError, match="approximate must be one of"):
        geglu(torch.randn(2, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE), "erf")


# --- torch.library integration ---------------------------------------------------------------


@pytest.mark.parametrize("activation", list(ACTIVATIONS.values()))
def test_opcheck(activation):
    g = torch.randn(3, 5, 40, device=DEVICE, requires_grad=True)
    u = torch.randn(3, 5, 40, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.perfml.glu_fwd.default, (g, u, activation, False))
    dy = torch.randn(3, 5, 40, device=DEVICE)
    g, u = g.detach(), u.detach()
    torch.library.opcheck(torch.ops.perfml.glu_bwd.default, (dy, g, u, activation, True, True))
    torch.library.opcheck(torch.ops.perfml.glu_bwd.default, (dy, g, u, activation, False, True))
    torch.library.opcheck(
        torch.ops.perfml.glu_bwd_inplace.default, (dy, g.clone(), u.clone(), activation, True, True)
    )


@pytest.mark.parametrize("inplace", [False, True])
def test_compile_fullgraph_has_no_graph_break(inplace):
    torch._dynamo.reset()
    lin = torch.nn.Linear(16, 64, device=DEVICE)
    x = torch.randn(4, 16, device=DEVICE, requires_grad=True)

    def f(x):
        return swiglu(lin(x), lin(x * 2), inplace_backward=inplace).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(x).backward()
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    x.grad = lin.weight.grad = lin.bias.grad = None
    f(x).backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, lin.weight.grad)


# --- GPU-only: real sizes, memory and int64 offsets ------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_llm_shape_on_gpu(op):
    fused, ref, plain = OPS[op]
    gate, up = _pair((16384, 8192), torch.bfloat16, "contiguous")
    dy = torch.randn(16384, 8192, device="cuda").bfloat16()
    got = _grads(fused, gate, up, dy)
    want = _grads(ref, gate.double(), up.double(), dy.double())
    base = _grads(plain, gate, up, dy)
    for name, g, r, b in zip(("y", "dgate", "dup"), got, want, base, strict=True):
        assert_matches_reference(g, r, b, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("inplace,new_buffers", [(True, 1), (False, 3)])
def test_peak_memory_of_fwd_and_bwd(inplace, new_buffers):
    # 16384x8192 bf16 = 256 MiB per tensor. With inplace_backward the only allocation is y;
    # otherwise y, dgate and dup. Nothing activation-sized is saved for the backward.
    gate, up = _pair((16384, 8192), torch.bfloat16, "contiguous")
    dy = torch.randn_like(gate)
    g, u = gate.requires_grad_(), up.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y = swiglu(g, u, inplace_backward=inplace)
    grads = torch.autograd.grad(y, (g, u), dy)
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    assert peak_mib <= new_buffers * 256 + 1, peak_mib
    assert all(torch.isfinite(t).all() for t in grads)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "row-padded"])
def test_more_than_2_to_the_31_elements(layout):
    # contiguous: one flat sweep whose column offsets pass 2**31; row-padded: rows whose
    # starting offsets pass 2**31 (row stride 2N + 3).
    n = 4096
    m = 2**31 // n + 3
    gate, up = _pair((m, n), torch.bfloat16, layout)
    dy = torch.randn(m, n, device="cuda").bfloat16()
    y, dg, du = _grads(swiglu, gate, up, dy)
    tail = slice(m - 4, m)
    want = _grads(swiglu_ref, gate[tail].double(), up[tail].double(), dy[tail].double())
    base = _grads(OPS["swiglu"][2], gate[tail], up[tail], dy[tail])
    for name, g, r, b in zip(
        ("y", "dgate", "dup"), (y[tail], dg[tail], du[tail]), want, base, strict=True
    ):
        assert_matches_reference(g, r, b, name=name)


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
    "op,dtype,layout",
    [
        ("swiglu", torch.float32, "contiguous"),
        ("swiglu", torch.bfloat16, "chunked"),
        ("geglu-tanh", torch.float32, "transposed"),
        ("geglu-none", torch.bfloat16, "strided"),
    ],
)
def test_aten_path_matches_float64_reference(op, dtype, layout):
    # the CPU path without a C++ kernel: ATen ops and ATen's autograd
    fused, ref, plain = OPS[op]
    gate, up = _pair((5, 130), dtype, layout)
    dy = torch.randn(5, 130, device=DEVICE).to(dtype)
    with _backend.force("aten"):
        names = _autograd_names(fused(gate.detach().requires_grad_(), up))
        assert ("SiluBackward0" if op == "swiglu" else "GeluBackward0") in names
        got = _grads(fused, gate, up, dy)
    want = _grads(ref, gate.double(), up.double(), dy.double())
    base = _grads(plain, gate, up, dy)
    for name, g, r, b in zip(("y", "dgate", "dup"), got, want, base, strict=True):
        assert g.dtype == dtype, name
        assert_matches_reference(g, r, b, name=name)
