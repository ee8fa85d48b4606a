"""perfml.ops.rope against the float64 reference and HF's apply_rotary_pos_emb code.

On machines without CUDA the Triton kernel runs in interpret mode (tests/conftest.py). cos/sin are
random here (their two halves differ), so the backward is checked as the true transpose of the
rotation, not only in the special case HF models produce.
"""

import pytest
import torch

from perfml import _backend
from perfml.ops import rope, rope_ref
from perfml.ops.rope import MAX_HEAD_DIM
from tests.utils import assert_matches_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    # transformers' apply_rotary_pos_emb (Llama), with the partial-rotary split of GPT-NeoX / Phi
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    r = cos.shape[-1]
    q_rot, q_pass = q[..., :r], q[..., r:]
    k_rot, k_pass = k[..., :r], k[..., r:]
    q_embed = (q_rot * cos) + (_rotate_half(q_rot) * sin)
    k_embed = (k_rot * cos) + (_rotate_half(k_rot) * sin)
    return torch.cat((q_embed, q_pass), dim=-1), torch.cat((k_embed, k_pass), dim=-1)


def _make_qk(b, hq, hk, t, d, dtype, layout):
    """(q, k, unsqueeze_dim) in one of the layouts q and k arrive in."""
    if layout == "hf":  # HF: q_proj(x).view(B, T, H, D).transpose(1, 2)
        q = torch.randn(b, t, hq, d, device=DEVICE, dtype=dtype).transpose(1, 2)
        k = torch.randn(b, t, hk, d, device=DEVICE, dtype=dtype).transpose(1, 2)
        return q, k, 1
    if layout == "contiguous":
        q = torch.randn(b, hq, t, d, device=DEVICE, dtype=dtype)
        k = torch.randn(b, hk, t, d, device=DEVICE, dtype=dtype)
        return q, k, 1
    if layout == "bthd":  # unsqueeze_dim=2
        q = torch.randn(b, t, hq, d, device=DEVICE, dtype=dtype)
        k = torch.randn(b, t, hk, d, device=DEVICE, dtype=dtype)
        return q, k, 2
    if layout == "fused-qkv":  # slices of one [B, T, (Hq + 2 Hk) D] projection: not dense
        qkv = torch.randn(b, t, (hq + 2 * hk) * d, device=DEVICE, dtype=dtype)
        q = qkv[..., : hq * d].view(b, t, hq, d).transpose(1, 2)
        k = qkv[..., hq * d : (hq + hk) * d].view(b, t, hk, d).transpose(1, 2)
        return q, k, 1
    if layout == "strided-last":  # no unit stride on the head dim: the launcher copies
        q = torch.randn(b, hq, t, 2 * d, device=DEVICE, dtype=dtype)[..., ::2]
        k = torch.randn(b, hk, t, 2 * d, device=DEVICE, dtype=dtype)[..., 1::2]
        return q, k, 1
    raise AssertionError(layout)


def _make_cos_sin(batch, t, r, dtype=torch.float32):
    cos = torch.randn(batch, t, r, device=DEVICE, dtype=dtype)
    sin = torch.randn(batch, t, r, device=DEVICE, dtype=dtype)
    return cos, sin


def _run_and_grad(fn, q, k, cos, sin, dq, dk, **kwargs):
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    q_embed, k_embed = fn(q, k, cos, sin, **kwargs)
    torch.autograd.backward((q_embed, k_embed), (dq.to(q_embed.dtype), dk.to(k_embed.dtype)))
    return q_embed.detach(), k_embed.detach(), q.grad, k.grad


def _check_against_reference(q, k, cos, sin, **kwargs):
    dq = torch.randn(q.shape, device=DEVICE, dtype=torch.float64)
    dk = torch.randn(k.shape, device=DEVICE, dtype=torch.float64)
    got = _run_and_grad(rope, q, k, cos, sin, dq, dk, **kwargs)
    want = _run_and_grad(
        rope_ref, q.double(), k.double(), cos.double(), sin.double(), dq, dk, **kwargs
    )
    base = _run_and_grad(rope_ref, q, k, cos, sin, dq, dk, **kwargs)
    for name, g, r, b in zip(("q_embed", "k_embed", "dq", "dk"), got, want, base, strict=True):
        assert g.dtype == q.dtype, name
        assert_matches_reference(g, r, b, name=name)
    return got


CASES = [
    # (B, Hq, Hk, T, D, rotary_dim, cos batch, layout)
    ((2, 4, 2, 7, 16, 16, 1), "hf"),
    ((1, 3, 1, 97, 64, 64, 1), "hf"),
    ((2, 6, 2, 13, 128, 128, 2), "hf"),
    ((1, 1, 1, 1, 2, 2, 1), "hf"),
    ((2, 2, 2, 5, 24, 24, 2), "contiguous"),
    ((1, 2, 1, 1025, 8, 8, 1), "contiguous"),
    ((2, 4, 1, 9, 32, 16, 1), "bthd"),
    ((3, 5, 5, 4, 80, 48, 3), "fused-qkv"),
    ((2, 2, 1, 3, 16, 10, 1), "strided-last"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims,layout", CASES, ids=lambda v: str(v))
def test_matches_float64_reference(dims, layout, dtype, poison_empty):
    b, hq, hk, t, d, r, cos_batch = dims
    q, k, unsqueeze_dim = _make_qk(b, hq, hk, t, d, dtype, layout)
    cos, sin = _make_cos_sin(cos_batch, t, r, dtype)
    _check_against_reference(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_cos_sin_with_half_precision_q(dtype, poison_empty):
    q, k, _ = _make_qk(2, 4, 2, 11, 32, dtype, "hf")
    cos, sin = _make_cos_sin(1, 11, 32, torch.float32)
    got = _check_against_reference(q, k, cos, sin)
    assert got[0].dtype == got[1].dtype == dtype  # outputs in q's dtype, not promoted


def test_cos_sin_with_their_own_strides(poison_empty):
    # cos expanded over the batch (stride 0) and sin a slice of a wider table (row stride 2R)
    q, k, _ = _make_qk(3, 2, 1, 6, 16, torch.float32, "hf")
    cos = torch.randn(1, 6, 16, device=DEVICE).expand(3, -1, -1)
    sin = torch.randn(3, 6, 32, device=DEVICE)[..., :16]
    _check_against_reference(q, k, cos, sin)


def test_matches_hf_apply_rotary_pos_emb():
    q, k, _ = _make_qk(2, 8, 2, 17, 64, torch.float32, "hf")
    pos = torch.arange(17, device=DEVICE)[None]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, device=DEVICE).float() / 64))
    freqs = pos[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    for got, want in zip(
        rope(q, k, cos, sin), _hf_apply_rotary_pos_emb(q, k, cos, sin), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_partial_rotary_passes_the_rest_through_bit_for_bit(poison_empty):
    q, k, _ = _make_qk(2, 4, 2, 5, 40, torch.bfloat16, "hf")
    cos, sin = _make_cos_sin(1, 5, 16, torch.bfloat16)
    q_embed, k_embed = rope(q, k, cos, sin)
    assert torch.equal(q_embed[..., 16:], q[..., 16:])
    assert torch.equal(k_embed[..., 16:], k[..., 16:])
    want = _hf_apply_rotary_pos_emb(q.double(), k.double(), cos.double(), sin.double())
    torch.testing.assert_close(q_embed.double(), want[0], rtol=2**-7, atol=1e-2)


def test_output_keeps_the_input_layout(poison_empty):
    q, k, _ = _make_qk(2, 4, 2, 5, 16, torch.float32, "hf")
    cos, sin = _make_cos_sin(1, 5, 16)
    q_embed, k_embed = rope(q, k, cos, sin)
    assert q_embed.stride() == q.stride() and k_embed.stride() == k.stride()


def test_reference_backend_agrees_in_values_and_layout(poison_empty):
    q, k, _ = _make_qk(2, 4, 2, 9, 32, torch.float32, "fused-qkv")
    cos, sin = _make_cos_sin(2, 9, 24)
    with _backend.force("reference"):
        ref = rope(q, k, cos, sin)
    got = rope(q, k, cos, sin)
    for g, r in zip(got, ref, strict=True):
        assert g.stride() == r.stride()
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


# --- position_ids: cos/sin as tables ---------------------------------------------------------


@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("table_dims", [2, 3])
@pytest.mark.parametrize("pos_batch", [1, 3])
def test_position_ids_index_the_table(pos_dtype, table_dims, pos_batch, poison_empty):
    b, t, p, r = 3, 7, 50, 16
    q, k, _ = _make_qk(b, 4, 2, t, 24, torch.bfloat16, "hf")
    cos, sin = _make_cos_sin(1, p, r)
    if table_dims == 2:
        cos, sin = cos[0], sin[0]
    pos = torch.randint(0, p, (pos_batch, t), device=DEVICE, dtype=pos_dtype)
    _check_against_reference(q, k, cos, sin, position_ids=pos)
    # the same as gathering the rows first and passing no position_ids
    rows = pos.long()
    gathered = rope(q, k, cos.reshape(p, r)[rows], sin.reshape(p, r)[rows])
    for got, want in zip(rope(q, k, cos, sin, position_ids=pos), gathered, strict=True):
        assert torch.equal(got, want)


@pytest.mark.skipif(
    DEVICE != "cpu", reason="on CUDA the check is a device-side assert, which ends the CUDA context"
)
@pytest.mark.parametrize("bad", [-1, 50])
def test_position_out_of_range(bad):
    q, k, _ = _make_qk(1, 2, 1, 4, 8, torch.float32, "hf")
    cos, sin = _make_cos_sin(1, 50, 8)
    pos = torch.tensor([[0, 1, bad, 3]], device=DEVICE)
    with pytest.raises(IndexError, match=r"position_ids must lie in \[0, 50\)"):
        rope(q, k, cos, sin, position_ids=pos)


# --- autograd details ------------------------------------------------------------------------


def test_only_q_embed_used():
    q, k, _ = _make_qk(2, 4, 2, 5, 16, torch.float32, "hf")
    q, k = q.requires_grad_(), k.requires_grad_()
    cos, sin = _make_cos_sin(1, 5, 16)
    dq = torch.randn(q.shape, device=DEVICE)
    q_embed, _ = rope(q, k, cos, sin)
    q_embed.backward(dq)
    qr = q.detach().double().requires_grad_()
    rope_ref(qr, k.detach().double(), cos.double(), sin.double())[0].backward(dq.double())
    assert_matches_reference(q.grad, qr.grad, name="dq")
    assert torch.equal(k.grad, torch.zeros_like(k))


def test_only_k_requires_grad():
    q, k, _ = _make_qk(1, 2, 1, 3, 8, torch.float32, "hf")
    k = k.requires_grad_()
    cos, sin = _make_cos_sin(1, 3, 8)
    q_embed, k_embed = rope(q, k, cos, sin)
    assert not q_embed.requires_grad
    k_embed.sum().backward()
    assert k.grad is not None and torch.isfinite(k.grad).all()


def test_cos_requiring_grad_is_refused():
    q, k, _ = _make_qk(1, 2, 1, 3, 8, torch.float32, "hf")
    cos, sin = _make_cos_sin(1, 3, 8)
    with pytest.raises(ValueError, match="cos requires grad"):
        rope(q, k, cos.requires_grad_(), sin)
    with torch.no_grad():  # no gradient is asked for here: fine
        rope(q, k, cos, sin)


def test_large_magnitude_bf16_stays_finite():
    q, k, _ = _make_qk(2, 4, 2, 8, 64, torch.bfloat16, "hf")
    cos, sin = _make_cos_sin(1, 8, 64, torch.bfloat16)
    q, k = q * 1e4, k * 1e4
    for out in rope(q, k, cos.clamp(-1, 1), sin.clamp(-1, 1)):
        assert torch.isfinite(out).all()


def test_empty_sequence():
    q, k, _ = _make_qk(2, 4, 2, 0, 16, torch.float32, "hf")
    q, k = q.requires_grad_(), k.requires_grad_()
    cos, sin = _make_cos_sin(1, 0, 16)
    q_embed, k_embed = rope(q, k, cos, sin)
    (q_embed.sum() + k_embed.sum()).backward()
    assert q_embed.shape == q.shape and k.grad.shape == k.shape


def test_float64_input_uses_the_exact_reference():
    q, k, _ = _make_qk(2, 2, 1, 3, 8, torch.float64, "hf")
    cos, sin = _make_cos_sin(1, 3, 8, torch.float64)
    for got, want in zip(rope(q, k, cos, sin), rope_ref(q, k, cos, sin), strict=True):
        assert torch.equal(got, want)


# --- bad input -------------------------------------------------------------------------------


def _good():
    q, k, _ = _make_qk(2, 4, 2, 5, 16, torch.bfloat16, "hf")
    cos, sin = _make_cos_sin(1, 5, 16, torch.bfloat16)
    return q, k, cos, sin


@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda q, k, c, s: (q[0], k, c, s), ValueError, r"q must be 4-D \[B, H, T, D\]"),
        (lambda q, k, c, s: (q, k.float(), c, s), TypeError, "q and k must share a dtype"),
        (lambda q, k, c, s: (q.int(), k.int(), c, s), TypeError, "q must be a floating tensor"),
        (lambda q, k, c, s: (q, k.to("meta"), c, s), ValueError, "q is on .* but k is on meta"),
        (lambda q, k, c, s: (q, k[:, :, :4], c, s), ValueError, "k must match q in batch, tokens"),
        (lambda q, k, c, s: (q, k[..., :8], c, s), ValueError, "k must match q in batch, tokens"),
        (lambda q, k, c, s: (q, k, c.half(), s), TypeError, "cos must be float32 or q's dtype"),
        (lambda q, k, c, s: (q, k, c, s.to("meta")), ValueError, "q is on .* but sin is on meta"),
        (
            lambda q, k, c, s: (q, k, c, s[..., :8]),
            ValueError,
            "cos and sin must have the same shape",
        ),
        (
            lambda q, k, c, s: (q, k, c[..., :7], s[..., :7]),
            ValueError,
            "rotary_dim .* must be even",
        ),
        (lambda q, k, c, s: (q, k, c.repeat(1, 1, 2), s.repeat(1, 1, 2)), ValueError, "rotary_dim"),
        (
            lambda q, k, c, s: (q, k, c[:, :4], s[:, :4]),
            ValueError,
            r"shape \[1 or 2, 5, rotary_dim\]",
        ),
        (
            lambda q, k, c, s: (q, k, c.repeat(3, 1, 1), s.repeat(3, 1, 1)),
            ValueError,
            "cos and sin must have shape",
        ),
        (lambda q, k, c, s: (q, k, c[0], s[0]), ValueError, "cos and sin must have shape"),
    ],
)
def test_bad_input(change, error, message):
    with pytest.raises(error, match=message):
        rope(*change(*_good()))


def test_bad_unsqueeze_dim():
    with pytest.raises(ValueError, match="unsqueeze_dim must be 1"):
        rope(*_good(), unsqueeze_dim=3)


def test_wrong_layout_for_unsqueeze_dim_2():
    q, k, cos, sin = _good()  # [B, H, T, D] read as [B, T, H, D]: q's T is 4, k's 2, cos's 5
    with pytest.raises(ValueError, match="k must match q in batch, tokens"):
        rope(q, k, cos, sin, unsqueeze_dim=2)


def test_head_dim_limit():
    q = torch.empty(1, 1, 1, MAX_HEAD_DIM + 2, device=DEVICE)
    cos = torch.empty(1, 1, 2, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim must be at most"):
        rope(q, q, cos, cos)


@pytest.mark.parametrize(
    "pos,table,message",
    [
        (torch.zeros(2, 5), (50, 16), "position_ids must be int32 or int64"),
        (
            torch.zeros(2, 4, dtype=torch.long),
            (50, 16),
            r"position_ids must have shape \[1 or 2, 5\]",
        ),
        (torch.zeros(5, dtype=torch.long), (50, 16), "position_ids must have shape"),
        (torch.zeros(2, 5, dtype=torch.long), (2, 5, 16), "already gathered per token"),
        (torch.zeros(2, 5, dtype=torch.long), (0, 16), "tables of shape"),
    ],
)
def test_bad_position_ids(pos, table, message):
    q, k, _, _ = _good()
    cos = torch.randn(table, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises((TypeError, ValueError), match=message):
        rope(q, k, cos, cos, position_ids=pos.to(DEVICE))


# --- torch.library integration ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("with_positions", [False, True])
def test_opcheck(backend, with_positions):
    q, k, _ = _make_qk(2, 4, 2, 5, 16, torch.float32, "hf")
    if with_positions:
        cos, sin = _make_cos_sin(1, 20, 12)
        pos = torch.randint(0, 20, (2, 5), device=DEVICE)
    else:
        cos, sin = _make_cos_sin(2, 5, 12)
        pos = None
    with _backend.force(backend):
        args = (q.requires_grad_(), k.requires_grad_(), cos, sin, pos, 1)
        torch.library.opcheck(torch.ops.perfml.rope_fwd.default, args)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        torch.library.opcheck(torch.ops.perfml.rope_bwd.default, (dq, dk, cos, sin, pos, 1))


@pytest.mark.parametrize("grads", ["q and k", "k only"])
def test_compile_fullgraph_has_no_graph_break(grads):
    torch._dynamo.reset()
    q, k, _ = _make_qk(2, 4, 2, 6, 16, torch.float32, "hf")
    q, k = q.requires_grad_(grads == "q and k"), k.requires_grad_()
    cos, sin = _make_cos_sin(1, 6, 16)

    def f(q, k, cos, sin):
        q_embed, k_embed = rope(q * 2, k, cos, sin)
        return (q_embed * k_embed.repeat(1, 2, 1, 1)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(q, k, cos, sin).backward()
    got = q.grad, k.grad
    q.grad = k.grad = None
    f(q, k, cos, sin).backward()
    assert (got[0] is None) == (q.grad is None) == (grads == "k only")
    if got[0] is not None:
        torch.testing.assert_close(got[0], q.grad)
    torch.testing.assert_close(got[1], k.grad)


# --- GPU-only: the real shape and int64 offsets ----------------------------------------------


@pytest.mark.gpu
def test_llm_shape_on_gpu():
    # the benchmark's shape: Llama-3-8B attention at B=4, T=4096 (32 q heads, 8 kv heads)
    q, k, _ = _make_qk(4, 32, 8, 4096, 128, torch.bfloat16, "hf")
    pos = torch.arange(4096, device="cuda")[None].float()
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    emb = (pos[..., None] * inv_freq).repeat(1, 1, 2)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    _check_against_reference(q, k, cos, sin)


@pytest.mark.gpu
def test_more_than_2_to_the_31_elements():
    # q [1, 32, T, 128] contiguous: the last head starts past element 2**31 (head and token
    # offsets both need int64)
    hq, hk, d = 32, 8, 128
    t = 2**31 // (hq * d) + 5
    q = torch.randn(1, hq, t, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hk, t, d, device="cuda", dtype=torch.bfloat16)
    cos, sin = _make_cos_sin(1, t, d, torch.bfloat16)
    q.requires_grad_()
    k.requires_grad_()
    q_embed, k_embed = rope(q, k, cos, sin)
    dq, dk = torch.randn_like(q_embed), torch.randn_like(k_embed)
    torch.autograd.backward((q_embed, k_embed), (dq, dk))

    def tail(x):
        return x[:, :, t - 5 :].detach()

    got = (tail(q_embed), tail(k_embed), tail(q.grad), tail(k.grad))
    inputs = (tail(q), tail(k), cos[:, t - 5 :], sin[:, t - 5 :], tail(dq), tail(dk))
    want = _run_and_grad(rope_ref, *(x.double() for x in inputs))
    base = _run_and_grad(rope_ref, *inputs)
    for name, g, r, b in zip(("q_embed", "k_embed", "dq", "dk"), got, want, base, strict=True):
        assert_matches_reference(g, r, b, name=f"{name} past element 2**31")


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
    "dtype,dims,layout,positions",
    [
        (torch.float32, (2, 4, 2, 7, 16, 16, 1), "hf", False),
        (torch.bfloat16, (3, 5, 5, 4, 80, 48, 3), "fused-qkv", False),  # partial rotary
        (torch.float32, (2, 4, 1, 9, 32, 32, 1), "bthd", True),
    ],
)
def test_aten_path_matches_float64_reference(dtype, dims, layout, positions):
    # the CPU path without a C++ kernel: HF's formula with ATen's autograd
    b, hq, hk, t, d, r, cos_batch = dims
    q, k, unsqueeze_dim = _make_qk(b, hq, hk, t, d, dtype, layout)
    kw = {"unsqueeze_dim": unsqueeze_dim}
    if positions:
        cos, sin = _make_cos_sin(1, 3 * t, r)
        kw["position_ids"] = torch.randint(0, 3 * t, (b, t), device=DEVICE)
    else:
        cos, sin = _make_cos_sin(cos_batch, t, r)
    with _backend.force("aten"):
        q_embed, k_embed = rope(q.detach().requires_grad_(), k, cos, sin, **kw)
        assert "CatBackward0" in _autograd_names(q_embed) and not k_embed.requires_grad
        _check_against_reference(q, k, cos, sin, **kw)


# --- interleaved (GPT-J pairs) ---------------------------------------------------------------


def _make_cos_sin_pairs(batch, t, r, dtype=torch.float32):
    """Random per-feature tables whose two entries of a pair differ: the general definition (and
    the true transpose in the backward), not only HF's repeated-angle tables."""
    return _make_cos_sin(batch, t, r, dtype)


INTERLEAVED_CASES = [
    # (B, Hq, Hk, T, D, rotary_dim, cos batch, layout, positions)
    ((2, 4, 2, 7, 16, 16, 1), "hf", False),  # GQA, HF's transposed q/k
    ((3, 5, 5, 4, 80, 48, 3), "fused-qkv", False),  # partial rotary, non-contiguous q/k
    ((2, 4, 1, 9, 32, 24, 1), "bthd", True),  # partial rotary with position_ids
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dims,layout,positions", INTERLEAVED_CASES, ids=lambda v: str(v))
def test_interleaved_matches_float64_reference(dims, layout, positions, dtype, poison_empty):
    b, hq, hk, t, d, r, cos_batch = dims
    q, k, unsqueeze_dim = _make_qk(b, hq, hk, t, d, dtype, layout)
    kw = {"unsqueeze_dim": unsqueeze_dim, "interleaved": True}
    if positions:
        cos, sin = _make_cos_sin_pairs(1, 3 * t, r, dtype)
        kw["position_ids"] = torch.randint(0, 3 * t, (b, t), device=DEVICE)
    else:
        cos, sin = _make_cos_sin_pairs(cos_batch, t, r, dtype)
    got = _check_against_reference(q, k, cos, sin, rotary_dim=r, **kw)
    assert torch.equal(got[0][..., r:], q[..., r:]) and torch.equal(got[1][..., r:], k[..., r:])
    # not the rotate-half result: the flag reaches the kernel
    plain = rope(q, k, cos, sin, kw.get("position_ids"), unsqueeze_dim)
    assert not torch.allclose(plain[0].float(), got[0].float(), atol=1e-2)


def test_interleaved_reference_is_rotate_half_of_the_deinterleaved_features():
    # the definition, checked against a second one: rotating the pairs (2i, 2i + 1) is rotating
    # the halves after moving the even features first and the odd ones second
    q, k, _ = _make_qk(2, 3, 1, 5, 12, torch.float64, "contiguous")
    cos, sin = _make_cos_sin_pairs(1, 5, 12, torch.float64)
    perm = torch.cat((torch.arange(0, 12, 2), torch.arange(1, 12, 2))).to(DEVICE)
    inverse = torch.argsort(perm)
    got = rope_ref(q, k, cos, sin, interleaved=True)
    want = rope_ref(q[..., perm], k[..., perm], cos[..., perm], sin[..., perm])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w[..., inverse], rtol=1e-12, atol=1e-12)


def _hf_freqs(t, r, base=10000.0):
    pos = torch.arange(t, device=DEVICE)[None].float()
    inv_freq = 1.0 / (base ** (torch.arange(0, r, 2, device=DEVICE).float() / r))
    return pos[..., None] * inv_freq  # [1, T, R / 2]


def _hf_interleaved(family):
    """(HF's apply function, its cos/sin construction from the frequencies, how perfml.ops.rope is
    called with those tables, rotary_dim of a 64-wide head)."""
    if family == "glm":  # GLM and GLM-4: cat(freqs, freqs) tables, partial_rotary_factor 0.5
        mod = pytest.importorskip("transformers.models.glm.modeling_glm")

        def ours(q, k, cos, sin):
            r = cos.shape[-1]
            per_feature = [c[..., : r // 2].repeat_interleave(2, dim=-1) for c in (cos, sin)]
            return rope(q, k, *per_feature, interleaved=True, rotary_dim=r)

        return mod.apply_rotary_pos_emb, lambda f: torch.cat((f, f), dim=-1), ours, 32
    mod = pytest.importorskip("transformers.models.cohere.modeling_cohere")

    def ours(q, k, cos, sin):  # Cohere's tables go in unchanged
        return rope(q, k, cos, sin, interleaved=True)

    return mod.apply_rotary_pos_emb, lambda f: f.repeat_interleave(2, dim=-1), ours, 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", ["glm", "cohere"])
def test_interleaved_matches_transformers(family, dtype):
    hf_apply, tables, ours, r = _hf_interleaved(family)
    q, k, _ = _make_qk(2, 8, 2, 17, 64, dtype, "hf")
    emb = tables(_hf_freqs(17, r))
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)  # HF's rotary returns them in x's dtype
    got = ours(q, k, cos, sin)
    want = hf_apply(q.double(), k.double(), cos.double(), sin.double())
    base = hf_apply(q, k, cos, sin)
    for name, g, w, b in zip(("q_embed", "k_embed"), got, want, base, strict=True):
        assert g.dtype == dtype
        assert_matches_reference(g, w, b, name=f"{family} {name}")
        if dtype == torch.float32:
            torch.testing.assert_close(g, b, rtol=1e-6, atol=1e-6)


def test_interleaved_matches_deepseek_v3_up_to_its_output_order():
    # DeepSeek-V3 rotates the same pairs but writes the even results first, the odd ones second
    mod = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    q, k, _ = _make_qk(2, 4, 1, 9, 16, torch.float32, "hf")
    emb = _hf_freqs(9, 16)
    emb = torch.cat((emb, emb), dim=-1)  # DeepSeek's cat(freqs, freqs)
    cos, sin = emb.cos(), emb.sin()
    want = mod.apply_rotary_pos_emb_interleave(q, k, cos, sin)
    per_feature = [c[..., :8].repeat_interleave(2, dim=-1) for c in (cos, sin)]
    got = rope(q, k, *per_feature, interleaved=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(torch.cat((g[..., 0::2], g[..., 1::2]), -1), w)


def test_interleaved_aten_path_matches_float64_reference():
    q, k, _ = _make_qk(2, 4, 2, 6, 24, torch.bfloat16, "fused-qkv")
    cos, sin = _make_cos_sin_pairs(1, 20, 16)
    pos = torch.randint(0, 20, (2, 6), device=DEVICE)
    kw = {"position_ids": pos, "interleaved": True, "rotary_dim": 16}
    with _backend.force("aten"):
        q_embed, _ = rope(q.detach().requires_grad_(), k, cos, sin, **kw)
        assert "StackBackward0" in _autograd_names(q_embed)
        _check_against_reference(q, k, cos, sin, **kw)


def test_interleaved_has_no_cpp_path():
    with _backend.force("cpp"), pytest.raises(RuntimeError, match="no C\\+\\+ CPU kernel"):
        q, k, _ = _make_qk(1, 2, 1, 3, 8, torch.float32, "hf")
        cos, sin = _make_cos_sin_pairs(1, 3, 8)
        rope(q.cpu(), k.cpu(), cos.cpu(), sin.cpu(), interleaved=True)


@pytest.mark.parametrize(
    "width,kw,message",
    [
        (8, {"interleaved": True}, r"width head_dim=16 \(full rotary.*got width 8; a table of one"),
        (12, {"interleaved": True}, "width head_dim=16 .*got width 12$"),
        (8, {"interleaved": True, "rotary_dim": 12}, r"rotary_dim=12 \(declared\), got width 8"),
        (8, {"rotary_dim": 12}, "cos/sin have width 8 but rotary_dim=12 was declared"),
        (8, {"interleaved": True, "rotary_dim": 7}, "rotary_dim must be even"),
        (8, {"interleaved": True, "rotary_dim": 8.0}, "rotary_dim must be an int or None"),
        (16, {"interleaved": 1}, "interleaved must be a bool"),
    ],
)
def test_interleaved_bad_table_width(width, kw, message):
    q, k, cos, sin = _good()  # head_dim 16
    with pytest.raises((TypeError, ValueError), match=message):
        rope(q, k, cos[..., :width], sin[..., :width], **kw)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_opcheck_interleaved(backend):
    q, k, _ = _make_qk(2, 4, 2, 5, 16, torch.float32, "hf")
    cos, sin = _make_cos_sin_pairs(1, 20, 12)
    pos = torch.randint(0, 20, (2, 5), device=DEVICE)
    with _backend.force(backend):
        args = (q.requires_grad_(), k.requires_grad_(), cos, sin, pos, 1, True)
        torch.library.opcheck(torch.ops.perfml.rope_fwd.default, args)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        torch.library.opcheck(torch.ops.perfml.rope_bwd.default, (dq, dk, cos, sin, pos, 1, True))
