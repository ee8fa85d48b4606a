"""perfml.ops.linear_cross_entropy against the float64 reference (full logits, then
cross_entropy_ref), for every reduction, option, dtype and gradient.

Small chunk sizes force several chunks per call; upstream gradients of scalar losses are powers of
two in the bf16/fp16 comparisons (see tests/ops/test_cross_entropy.py for why).
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from perfml import _backend
from perfml.ops import linear_cross_entropy, linear_cross_entropy_ref
from tests.utils import assert_matches_reference

lce_module = importlib.import_module("perfml.ops.linear_cross_entropy")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]
ALL_OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0}


def _inputs(n, h, v, dtype, bias=False, ignore_every=5, lead=()):
    hidden = torch.randn(*lead, n, h, device=DEVICE).to(dtype)
    weight = (torch.randn(v, h, device=DEVICE) / h**0.5 * 2).to(dtype)
    b = (torch.randn(v, device=DEVICE) * 0.5).to(dtype) if bias else None
    target = torch.randint(0, v, (*lead, n), device=DEVICE)
    if ignore_every:
        target.view(-1)[1::ignore_every] = -100
    return hidden, weight, target, b


def _upstream(shape, dtype):
    if dtype == torch.float32:
        return torch.randn(shape, device=DEVICE, dtype=torch.float64)
    k = torch.randint(-2, 3, shape, device=DEVICE).double()
    sign = torch.where(torch.rand(shape, device=DEVICE) < 0.5, -1.0, 1.0).double()
    return sign * torch.exp2(k)


def _unit(value=1.0):
    """A scalar upstream gradient on the test device."""
    return torch.tensor(value, dtype=torch.float64, device=DEVICE)


def _run(fn, hidden, weight, target, bias, dy, **kw):
    """(loss, dhidden, dweight[, dbias]) with every floating input requiring grad."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    loss = fn(h, w, target, b, **kw)
    loss.backward(dy.to(loss.dtype))
    return [loss.detach(), h.grad, w.grad] + ([b.grad] if b is not None else [])


def _check(hidden, weight, target, bias, dy, fused_kw=None, **kw):
    got = _run(linear_cross_entropy, hidden, weight, target, bias, dy, **kw, **(fused_kw or {}))
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    want = _run(linear_cross_entropy_ref, d(hidden), d(weight), target, d(bias), dy, **kw)
    base = _run(linear_cross_entropy_ref, hidden, weight, target, bias, dy, **kw)
    names = ("loss", "dhidden", "dweight", "dbias")
    for name, g, r, b in zip(names, got, want, base, strict=False):
        assert g.dtype == hidden.dtype, name
        assert_matches_reference(g, r, b, name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias,options", [(False, {}), (True, ALL_OPTIONS)], ids=["plain", "all"])
def test_matches_float64_reference(bias, options, reduction, dtype, poison_empty):
    hidden, weight, target, b = _inputs(37, 24, 97, dtype, bias=bias)
    dy = _upstream(() if reduction != "none" else (37,), dtype)
    _check(hidden, weight, target, b, dy, {"chunk_size": 8}, reduction=reduction, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("v", [1, 1025, 4099, 32001])
def test_vocab_sizes(v, dtype, poison_empty):
    hidden, weight, target, b = _inputs(6, 16, v, dtype, bias=True, ignore_every=4)
    _check(hidden, weight, target, b, _upstream((), dtype), {"chunk_size": 4}, **ALL_OPTIONS)


def test_leading_dims_and_reduction_none_shape(poison_empty):
    hidden, weight, target, _ = _inputs(5, 16, 70, torch.float32, lead=(2,))
    loss = linear_cross_entropy(hidden, weight, target, reduction="none")
    assert loss.shape == (2, 5)
    _check(hidden, weight, target, None, _upstream((2, 5), torch.float32), reduction="none")


@pytest.mark.parametrize("chunk_size", [1, 7, 64, None])
def test_chunk_size_does_not_change_the_result(chunk_size):
    hidden, weight, target, b = _inputs(23, 16, 300, torch.float32, bias=True)
    dy = _unit(0.7)
    one = _run(linear_cross_entropy, hidden, weight, target, b, dy, chunk_size=10**6)
    got = _run(linear_cross_entropy, hidden, weight, target, b, dy, chunk_size=chunk_size)
    for g, r in zip(got, one, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_default_chunk_size_follows_the_memory_budget():
    assert lce_module._chunk_rows(128256, 8192, 0) == 512  # 256 MiB of fp32 logits, aligned
    assert lce_module._chunk_rows(97, 37, 0) == 37  # never more than the tokens
    assert lce_module._chunk_rows(128256, 8192, 100) == 100  # chunk_size wins


def test_ignored_tokens_cost_no_compute(monkeypatch):
    hidden, weight, target, _ = _inputs(40, 16, 50, torch.float32, ignore_every=0)
    target[::3] = -100
    rows = []
    real = lce_module.ce_rows
    monkeypatch.setattr(
        lce_module, "ce_rows", lambda x2, *a, **k: (rows.append(x2.shape[0]), real(x2, *a, **k))
    )
    h = hidden.requires_grad_()
    linear_cross_entropy(h, weight, target, chunk_size=8).backward()
    assert sum(rows) == int((target != -100).sum())  # only non-ignored rows reach the kernel
    assert torch.equal(h.grad[::3], torch.zeros_like(h.grad[::3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_ignored(dtype, poison_empty):
    hidden, weight, target, b = _inputs(6, 8, 30, dtype, bias=True, ignore_every=0)
    target.fill_(-100)
    for reduction, expected in (("mean", float("nan")), ("sum", 0.0)):
        got = _run(linear_cross_entropy, hidden, weight, target, b, _unit(), reduction=reduction)
        torch.testing.assert_close(got[0].float().cpu(), torch.tensor(expected), equal_nan=True)
        for grad in got[1:]:
            assert torch.equal(grad, torch.zeros_like(grad))
    got = _run(
        linear_cross_entropy,
        hidden,
        weight,
        target,
        b,
        torch.ones(6, device=DEVICE),
        reduction="none",
    )
    assert torch.equal(got[0], torch.zeros(6, dtype=dtype, device=DEVICE))


def test_gradient_accumulation_equals_one_big_batch():
    # micro-batches with reduction="sum" divided by the whole batch's token count
    hidden, weight, target, b = _inputs(48, 16, 120, torch.float32, bias=True, ignore_every=3)
    big = _run(linear_cross_entropy, hidden, weight, target, b, _unit(), chunk_size=7)
    tokens = int((target != -100).sum())
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    bb = b.clone().requires_grad_()
    total = 0.0
    for part in torch.arange(48, device=DEVICE).chunk(3):
        loss = linear_cross_entropy(h[part], w, target[part], bb, reduction="sum", chunk_size=7)
        (loss / tokens).backward()
        total += loss.detach() / tokens
    torch.testing.assert_close(total, big[0], rtol=1e-6, atol=1e-7)
    for got, want in zip((h.grad, w.grad, bb.grad), big[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


def _chunked_low_precision_baseline(hidden, weight, target, bias, chunk):
    """grad_weight the way fp32_accumulation=False computes it, in plain PyTorch: each chunk's
    gradient of the logits rounded to the weight dtype, accumulated by addmm in that dtype."""
    valid = (target != -100).nonzero().squeeze(1)
    acc = torch.zeros_like(weight)
    for rows in valid.split(chunk):
        logits = F.linear(hidden[rows], weight, bias).detach().requires_grad_()
        F.cross_entropy(logits.float(), target[rows], reduction="sum").backward()
        acc.addmm_(logits.grad.t(), hidden[rows])
    return acc


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_weight_dtype_accumulation(dtype, poison_empty):
    # fp32_accumulation=False rounds grad_weight once per chunk: within 2x of that algorithm done
    # in plain PyTorch, and never better than the fp32 accumulation
    hidden, weight, target, b = _inputs(40, 16, 200, dtype, bias=True)
    dy = _unit()
    got = _run(
        linear_cross_entropy,
        hidden,
        weight,
        target,
        b,
        dy,
        reduction="sum",
        chunk_size=8,
        fp32_accumulation=False,
    )
    d = lambda t: t.double()  # noqa: E731
    want = _run(linear_cross_entropy_ref, d(hidden), d(weight), target, d(b), dy, reduction="sum")
    base = _chunked_low_precision_baseline(hidden, weight, target, b, 8)
    assert_matches_reference(got[2], want[2], base, name="dweight")
    plain = _run(linear_cross_entropy_ref, hidden, weight, target, b, dy, reduction="sum")
    for name, g, r, p in zip(
        ("loss", "dhidden", "dweight", "dbias"), got, want, plain, strict=True
    ):
        if name != "dweight":
            assert_matches_reference(g, r, p, name=name)


def test_several_accumulator_slabs(monkeypatch, poison_empty):
    # the fp32 accumulation of a bf16 grad_weight goes through slabs of the vocab
    monkeypatch.setattr(lce_module, "_ACC_SLAB_BYTES", 16 * 4 * 7)  # 7 rows of H=16 per slab
    hidden, weight, target, b = _inputs(30, 16, 50, torch.bfloat16, bias=True)
    _check(hidden, weight, target, b, _upstream((), torch.bfloat16), {"chunk_size": 8})


@pytest.mark.parametrize("which", ["hidden", "weight", "bias"])
def test_one_input_requires_grad(which):
    hidden, weight, target, b = _inputs(9, 16, 40, torch.float32, bias=True)
    args = {"hidden": hidden, "weight": weight, "bias": b}
    args[which] = args[which].clone().requires_grad_()
    for reduction in ("mean", "none"):
        args[which].grad = None
        loss = linear_cross_entropy(
            args["hidden"], args["weight"], target, args["bias"], reduction=reduction
        )
        loss.sum().backward()
        ref = {k: v.detach().double().requires_grad_(k == which) for k, v in args.items()}
        linear_cross_entropy_ref(
            ref["hidden"], ref["weight"], target, ref["bias"], reduction=reduction
        ).sum().backward()
        torch.testing.assert_close(args[which].grad.double(), ref[which].grad, rtol=1e-5, atol=1e-7)


def test_no_grad_forward_matches():
    hidden, weight, target, b = _inputs(9, 16, 40, torch.float32, bias=True)
    w = weight.requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, w, target, b)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, linear_cross_entropy_ref(hidden, weight, target, b).detach())


def test_matches_torch_linear_cross_entropy():
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("this torch has no F.linear_cross_entropy")
    hidden, weight, target, b = _inputs(20, 16, 64, torch.float32, bias=True)
    ours = linear_cross_entropy(hidden, weight, target, b, label_smoothing=0.1)
    theirs = F.linear_cross_entropy(hidden, weight, target, linear_bias=b, label_smoothing=0.1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_float64_uses_the_exact_reference():
    hidden, weight, target, b = _inputs(5, 8, 20, torch.float64, bias=True)
    assert torch.equal(
        linear_cross_entropy(hidden, weight, target, b, **ALL_OPTIONS),
        linear_cross_entropy_ref(hidden, weight, target, b, **ALL_OPTIONS),
    )


def test_reference_backend_agrees():
    hidden, weight, target, b = _inputs(11, 16, 90, torch.float32, bias=True)
    dy = _unit(0.3)
    with _backend.force("reference"):
        ref = _run(linear_cross_entropy, hidden, weight, target, b, dy, chunk_size=4, **ALL_OPTIONS)
    got = _run(linear_cross_entropy, hidden, weight, target, b, dy, chunk_size=4, **ALL_OPTIONS)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_second_backward_of_a_scalar_loss_raises():
    hidden, weight, target, _ = _inputs(5, 8, 20, torch.float32)
    loss = linear_cross_entropy(hidden.requires_grad_(), weight, target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# --- bad input -------------------------------------------------------------------------------


def test_hidden_size_mismatch():
    with pytest.raises(ValueError, match=r"weight must be \[V, 16\]"):
        linear_cross_entropy(
            torch.randn(4, 16), torch.randn(10, 15), torch.zeros(4, dtype=torch.long)
        )


def test_dtype_mismatch():
    with pytest.raises(TypeError, match="hidden is torch.bfloat16 but weight is torch.float32"):
        linear_cross_entropy(
            torch.randn(4, 8).bfloat16(), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
        )


def test_bias_shape_and_dtype():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\)"):
        linear_cross_entropy(h, w, t, torch.randn(9))
    with pytest.raises(TypeError, match="but bias is torch.float16"):
        linear_cross_entropy(h, w, t, torch.randn(10).half())


def test_target_shape_and_dtype():
    h, w = torch.randn(2, 4, 8), torch.randn(10, 8)
    with pytest.raises(
        ValueError, match=r"target must have shape \(2, 4\) \(hidden.shape\[:-1\]\)"
    ):
        linear_cross_entropy(h, w, torch.zeros(8, dtype=torch.long))
    with pytest.raises(TypeError, match="int64 or int32"):
        linear_cross_entropy(h, w, torch.zeros(2, 4))


def test_mixed_devices():
    with pytest.raises(ValueError, match="hidden is on .* but weight is on meta"):
        linear_cross_entropy(
            torch.randn(4, 8), torch.randn(10, 8, device="meta"), torch.zeros(4, dtype=torch.long)
        )


def test_out_of_range_target():
    with pytest.raises(ValueError, match="target value 10 is out of range for 10 classes"):
        linear_cross_entropy(torch.randn(3, 8), torch.randn(10, 8), torch.tensor([0, 10, 2]))


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size must be None or >= 1"):
        linear_cross_entropy(
            torch.randn(3, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long), chunk_size=0
        )


# --- torch.library integration ---------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck(reduction):
    hidden, weight, target, b = _inputs(7, 8, 30, torch.float32, bias=True, lead=(2,))
    args = [t.clone().requires_grad_() for t in (hidden, weight)]
    bias = b.clone().requires_grad_()
    opts = (-100, reduction, 0.1, 1e-3, 4.0, 0.5, 3, True)
    for need in ((True, True, True), (False, False, False)):
        # As in test_cross_entropy.test_opcheck: gradients computed by the forward are outputs the
        # backward scales in place, which test_aot_dispatch_dynamic cannot return to its caller.
        tests = ["test_schema", "test_autograd_registration", "test_faketensor"]
        if not any(need) or reduction == "none":
            tests.append("test_aot_dispatch_dynamic")
        fwd_need = need if reduction != "none" else (False, False, False)
        torch.library.opcheck(
            torch.ops.perfml.linear_cross_entropy_fwd.default,
            (*args, target, bias, *opts, *fwd_need),
            test_utils=tests,
        )
    dloss = torch.randn(target.shape, device=DEVICE)
    torch.library.opcheck(
        torch.ops.perfml.linear_cross_entropy_bwd.default,
        (dloss, hidden, weight, target, b, -100, 0.1, 1e-3, 4.0, 0.5, 3, True, True, True, True),
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_has_no_graph_break(reduction):
    torch._dynamo.reset()
    hidden, weight, target, b = _inputs(9, 16, 40, torch.float32, bias=True)
    h, w, bb = (t.clone().requires_grad_() for t in (hidden, weight, b))

    def f(h, w, bb):
        return linear_cross_entropy(h * 2, w, target, bb, reduction=reduction, chunk_size=4).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(h, w, bb).backward()
    grads = [t.grad.clone() for t in (h, w, bb)]
    for t in (h, w, bb):
        t.grad = None
    f(h, w, bb).backward()
    for got, t in zip(grads, (h, w, bb), strict=True):
        torch.testing.assert_close(got, t.grad)


# --- GPU-only: the issue's shape, peak memory, int64 offsets ---------------------------------


def _peak_extra_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.mark.gpu
@pytest.mark.parametrize("fp32_accumulation", [True, False])
def test_issue_shape_on_gpu(fp32_accumulation):
    n, h, v = 8192, 4096, 128256
    hidden, weight, target, _ = _inputs(n, h, v, torch.bfloat16, ignore_every=0)
    target[:100] = -100
    hl, wl = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    def step():
        linear_cross_entropy(hl, wl, target, fp32_accumulation=fp32_accumulation).backward()

    peak = _peak_extra_mib(step)
    # the full logits alone would be 2004 MiB; grad_weight 1002 MiB (+ 2004 for the fp32 sum)
    assert peak < (3600 if fp32_accumulation else 1400), peak
    got = [hl.grad, wl.grad]
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want_loss = linear_cross_entropy_ref(hd, wd, target)
    want_loss.backward()
    hb, wb = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    base_loss = linear_cross_entropy_ref(hb, wb, target)
    base_loss.backward()
    loss = linear_cross_entropy(hidden, weight, target, fp32_accumulation=fp32_accumulation)
    assert_matches_reference(loss, want_loss.detach(), base_loss.detach(), name="loss")
    assert_matches_reference(got[0], hd.grad, hb.grad, name="dhidden")
    if fp32_accumulation:
        assert_matches_reference(got[1], wd.grad, wb.grad, name="dweight")
    else:  # rounded once per chunk: 16 chunks at this shape
        assert (got[1].double() - wd.grad).abs().max() <= 4 * (
            wb.grad.double() - wd.grad
        ).abs().max()


@pytest.mark.gpu
def test_more_than_2_to_the_31_logits_in_one_chunk():
    n, h, v = 2**31 // 128256 + 8, 64, 128256
    hidden, weight, target, _ = _inputs(n, h, v, torch.bfloat16, ignore_every=0)
    hl = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(hl, weight, target, reduction="sum", chunk_size=n)
    loss.backward()
    tail = slice(n - 8, n)
    hd = hidden[tail].double().requires_grad_()
    ref = linear_cross_entropy_ref(hd, weight.double(), target[tail], reduction="sum")
    ref.backward()
    hb = hidden[tail].clone().requires_grad_()
    linear_cross_entropy_ref(hb, weight, target[tail], reduction="sum").backward()
    assert torch.isfinite(loss)
    assert_matches_reference(hl.grad[tail], hd.grad, hb.grad, name="dhidden tail")


@pytest.mark.slow
def test_compile_inductor_with_backward():
    # gradients computed by the forward and scaled in place by the backward, through Inductor
    torch._dynamo.reset()
    hidden, weight, target, b = _inputs(9, 16, 40, torch.float32, bias=True)
    h, w, bb = (t.clone().requires_grad_() for t in (hidden, weight, b))

    def f(h, w, bb):
        return linear_cross_entropy(h, w, target, bb, chunk_size=4) * 0.5

    compiled = torch.compile(f, fullgraph=True)
    compiled(h, w, bb).backward()
    grads = [t.grad.clone() for t in (h, w, bb)]
    for t in (h, w, bb):
        t.grad = None
    f(h, w, bb).backward()
    for got, t in zip(grads, (h, w, bb), strict=True):
        torch.testing.assert_close(got, t.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk_size", [3, None])
def test_strided_target(chunk_size, reduction, dtype, poison_empty):
    # a target that is a strided view (every other label): each chunk reads its own rows'
    # targets, not the dense offsets
    hidden, weight, _, b = _inputs(9, 16, 41, dtype, bias=True)
    target = torch.randint(0, 41, (18,), device=DEVICE)[::2]
    assert not target.is_contiguous()
    dy = _upstream(() if reduction != "none" else (9,), dtype)
    _check(hidden, weight, target, b, dy, {"chunk_size": chunk_size}, reduction=reduction)


@pytest.mark.parametrize(
    "dtype,reduction,bias,options",
    [
        (torch.float32, "mean", False, {}),
        (torch.float32, "none", True, ALL_OPTIONS),
        (torch.bfloat16, "sum", True, ALL_OPTIONS),
    ],
)
def test_aten_path_matches_float64_reference(dtype, reduction, bias, options, monkeypatch):
    # the CPU path without a C++ kernel: the chunked matmuls with ATen's log_softmax per chunk
    ce = importlib.import_module("perfml.ops.cross_entropy")
    calls = []
    aten_rows = ce._ce_rows_aten
    monkeypatch.setattr(ce, "_ce_rows_aten", lambda *a: calls.append(1) or aten_rows(*a))
    hidden, weight, target, b = _inputs(37, 24, 97, dtype, bias=bias, ignore_every=5)
    dy = _upstream(() if reduction != "none" else (37,), dtype)
    with _backend.force("aten"):
        _check(hidden, weight, target, b, dy, fused_kw={"chunk_size": 16}, reduction=reduction,
               **options)  # fmt: skip
    assert calls


# --- logit_scale -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["triton", "aten", "reference"])
@pytest.mark.parametrize(
    "logit_scale,dtype,reduction,bias,options",
    [
        pytest.param(0.5, torch.float32, "mean", True, ALL_OPTIONS, id="0.5-fp32-mean-all"),
        pytest.param(3.0, torch.bfloat16, "none", False, {"softcap": 4.0}, id="3-bf16-none-cap"),
        pytest.param(3.0, torch.bfloat16, "sum", True, {"label_smoothing": 0.1}, id="3-bf16-sum"),
    ],
)
def test_logit_scale_matches_float64_reference(
    logit_scale, dtype, reduction, bias, options, path, poison_empty
):
    if path == "triton" and not _backend.has_triton():
        pytest.skip("triton is not importable")
    hidden, weight, target, b = _inputs(37, 24, 97, dtype, bias=bias)
    dy = _upstream(() if reduction != "none" else (37,), dtype)
    kw = {"reduction": reduction, "logit_scale": logit_scale, **options}
    with _backend.force(path):
        _check(hidden, weight, target, b, dy, {"chunk_size": 8}, **kw)


def test_logit_scale_is_scaling_the_head():
    # hidden @ (s * W).T + s * b are the scaled logits: the same loss and grad_hidden
    hidden, weight, target, b = _inputs(9, 16, 41, torch.float64, bias=True)
    s, kw = 1 / 8, {"softcap": 3.0, "label_smoothing": 0.1}
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    scaled = linear_cross_entropy(h1, weight, target, b, logit_scale=s, **kw)
    plain = linear_cross_entropy(h2, weight * s, target, b * s, **kw)
    torch.testing.assert_close(scaled, plain, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(scaled, linear_cross_entropy(hidden, weight, target, b, **kw))
    scaled.backward()
    plain.backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")], ids=str)
def test_bad_logit_scale(value):
    hidden, weight, target, _ = _inputs(3, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="logit_scale must be finite and > 0"):
        linear_cross_entropy(hidden, weight, target, logit_scale=value)
