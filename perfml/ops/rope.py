"""Rotary position embedding, HF `apply_rotary_pos_emb` semantics, q and k in one pass.

    q_embed = q * cos + rotate_half(q) * sin,   rotate_half([x1, x2]) = [-x2, x1]

over the first `rotary_dim = cos.shape[-1]` features of each head; the remaining
head_dim - rotary_dim features pass through unchanged (partial rotary, as in GPT-NeoX / Phi).
Layouts follow HF: unsqueeze_dim=1 takes q, k as [B, H, T, D], unsqueeze_dim=2 as [B, T, H, D];
k may have fewer heads (GQA); cos/sin are [B or 1, T, rotary_dim].

Interleaved (interleaved=True; GPT-J, GLM, Cohere): the pairs (x[2i], x[2i+1]) rotate by angle
i instead of the halves (x[i], x[i + R/2]):

    q_embed = q * cos + rotate_pairs(q) * sin,   rotate_pairs(x)[2i] = -x[2i+1], [2i+1] = x[2i]

cos/sin keep one value per feature (width D, or rotary_dim with partial rotary: the first
rotary_dim features rotate, the rest pass through): HF's Cohere tables (repeat_interleave of the
frequencies) go in unchanged; GLM's cat(freqs, freqs) tables become per feature with
cos[..., :R // 2].repeat_interleave(2, dim=-1), the line GLM's own apply_rotary_pos_emb runs.
Because half-width tables of one angle per pair are common for interleaved RoPE, a table narrower
than D is taken for partial rotary only when rotary_dim declares it. The kernel reads the even and
odd features as two stride-2 loads; the rest is the same code.

position_ids (deprecated in HF, accepted here with one precise meaning): when given, cos and sin
are tables of P rows, [P, rotary_dim] or [1, P, rotary_dim], and token (b, t) uses row
position_ids[b, t] (position_ids is [B or 1, T], int32/int64, values in [0, P)). That is the old
HF behaviour (`cos[position_ids]`). Modern HF passes cos/sin already gathered per token and no
position_ids; do the same here. Out-of-range positions raise an IndexError on CPU and trip an
asynchronous device assert on CUDA (no host sync).

Kernel: one program takes a block of tokens (one token at LLM sizes) and rotates every head of q AND
k for them, so cos/sin are read once per token and the traffic is the minimum: q and k read once and
written once, cos and sin read once. Strides are passed as they are (HF's q is a transposed view of
[B, T, H, D]), so no copy is made unless the last dim itself is strided. Math in fp32, outputs in
q's dtype (also when cos/sin are fp32, where HF eager would promote to fp32); outputs take the
memory layout of the inputs (torch.empty_like). The backward applies the transpose of the rotation,
dx = dy * cos + rotate_half^T(dy * sin), in the same kernel (TRANSPOSE=True) for dq and dk; it
needs only cos and sin, not q or k. When the two halves of cos/sin are equal (every HF model), that
is the forward with sin negated.

cos and sin get no gradient (HF computes them under torch.no_grad); calling rope with cos or sin
requiring grad raises an error rather than silently dropping their gradient (use rope_ref there).
"""

from __future__ import annotations

import torch
from torch import Tensor

from perfml import _backend
from perfml._kernel_config import kernel_config

MAX_HEAD_DIM = 4096  # widest head; wider ones get a clear error
_TILE = 2048  # elements of one half-tile [tokens, heads, rotary_dim / 2] held in registers
_MAX_TOKENS_PER_PROGRAM = 16
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# --- 1. reference ----------------------------------------------------------------------------


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_half_transposed(x: Tensor) -> Tensor:
    # the adjoint of rotate_half: [y1, y2] -> [y2, -y1]
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], -x[..., :half]), dim=-1)


def _rotate_pairs(x: Tensor) -> Tensor:
    # GPT-J: each pair (x[2i], x[2i+1]) -> (-x[2i+1], x[2i])
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _rotate_pairs_transposed(x: Tensor) -> Tensor:
    # the adjoint of rotate_pairs: (y[2i], y[2i+1]) -> (y[2i+1], -y[2i])
    return torch.stack((x[..., 1::2], -x[..., 0::2]), dim=-1).flatten(-2)


def _per_token_ref(
    table: Tensor, position_ids: Tensor | None, unsqueeze_dim: int, compute: torch.dtype
) -> Tensor:
    """cos or sin as [B or 1, T, R] (gathered from the table when position_ids is given),
    unsqueezed at the head dim so it broadcasts against q and k."""
    if position_ids is not None:
        rows = table[0] if table.dim() == 3 else table  # [P, R]
        table = rows[position_ids]  # [B or 1, T, R]
    return table.to(compute).unsqueeze(unsqueeze_dim)


def _rotate_ref(
    x: Tensor, cos: Tensor, sin: Tensor, transpose: bool, interleaved: bool = False
) -> Tensor:
    r = cos.shape[-1]
    xf = x.to(cos.dtype)
    rot, rest = xf[..., :r], xf[..., r:]
    if transpose:
        adjoint = _rotate_pairs_transposed if interleaved else _rotate_half_transposed
        y = rot * cos + adjoint(rot * sin)
    else:
        y = rot * cos + (_rotate_pairs if interleaved else _rotate_half)(rot) * sin
    return torch.cat((y, rest), dim=-1).to(x.dtype)


def _rope_apply_ref(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Tensor | None,
    unsqueeze_dim: int,
    transpose: bool,
    interleaved: bool = False,
) -> tuple[Tensor, Tensor]:
    compute = torch.promote_types(q.dtype, torch.float32)
    c = _per_token_ref(cos, position_ids, unsqueeze_dim, compute)
    s = _per_token_ref(sin, position_ids, unsqueeze_dim, compute)
    return (
        _rotate_ref(q, c, s, transpose, interleaved),
        _rotate_ref(k, c, s, transpose, interleaved),
    )


def rope_ref(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Tensor | None = None,
    unsqueeze_dim: int = 1,
    *,
    interleaved: bool = False,
    rotary_dim: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch RoPE: the definition of correct (fp32 math, or fp64 for fp64 inputs; outputs
    in q's dtype). Differentiable in q, k, cos and sin. interleaved=True rotates the pairs
    (x[2i], x[2i+1]) (rotate_pairs) instead of the halves, with the same per-feature cos/sin;
    the table width follows the same rule as rope() (see rotary_dim there)."""
    _check_width(q.shape[-1], cos.shape[-1], interleaved, rotary_dim)
    return _rope_apply_ref(
        q, k, cos, sin, position_ids, unsqueeze_dim, transpose=False, interleaved=interleaved
    )


def _rope_aten(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Tensor | None,
    unsqueeze_dim: int,
    interleaved: bool = False,
) -> tuple[Tensor, Tensor]:
    """The CPU path without a C++ kernel: HF's formula (rotate-half with cat, or rotate-pairs with
    stack, then mul) in fp32, autograd by ATen (rope() refuses cos / sin that require grad, as on
    the other paths)."""
    if position_ids is not None:
        _check_positions(position_ids, cos.shape[-2])
    c = _per_token_ref(cos, position_ids, unsqueeze_dim, torch.float32)
    s = _per_token_ref(sin, position_ids, unsqueeze_dim, torch.float32)
    rotate = _rotate_pairs if interleaved else _rotate_half
    return _rotate_aten(q, c, s, rotate), _rotate_aten(k, c, s, rotate)


def _rotate_aten(x: Tensor, cos: Tensor, sin: Tensor, rotate=_rotate_half) -> Tensor:
    # unlike the reference, no split and re-cat of the features when all of them rotate
    r = cos.shape[-1]
    xf = x if x.dtype == torch.float32 else x.float()
    if r == x.shape[-1]:
        return (xf * cos + rotate(xf) * sin).to(x.dtype)
    rot = xf[..., :r]
    return torch.cat((rot * cos + rotate(rot) * sin, xf[..., r:]), dim=-1).to(x.dtype)


# --- 2. Triton kernels -----------------------------------------------------------------------

if _backend.has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_heads(
        X,  # q or k (or their gradients): [.., H, .., D] with a unit stride along D
        Y,  # the output, same shape, its own strides
        x_tok,  # [BLOCK_T] int64: offset of each token's head 0 in X
        y_tok,  # [BLOCK_T] int64: the same in Y
        x_head_stride,
        y_head_stride,
        tok_mask,  # [BLOCK_T]
        c1,  # [BLOCK_T, 1, BLOCK_HALF] fp32: cos of the first feature of each rotated pair
        c2,  # cos of the second feature
        s1,
        s2,
        H: tl.constexpr,
        HALF: tl.constexpr,
        N_PASS: tl.constexpr,
        TRANSPOSE: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        BLOCK_PASS: tl.constexpr,
    ):
        # pair i is (i, i + HALF) (rotate-half) or (2i, 2i + 1) (interleaved, GPT-J)
        i = tl.arange(0, BLOCK_HALF)[None, None, :]
        if INTERLEAVED:
            d = 2 * i
            second = 1
        else:
            d = i
            second = HALF
        for h0 in tl.static_range(0, H, BLOCK_H):
            h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)[None, :, None]
            mask = tok_mask[:, None, None] & (h < H) & (i < HALF)
            x_off = x_tok[:, None, None] + h * x_head_stride + d
            y_off = y_tok[:, None, None] + h * y_head_stride + d
            x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(X + x_off + second, mask=mask, other=0.0).to(tl.float32)
            if TRANSPOSE:  # dx = dy * cos + rotate_half^T(dy * sin)
                y1 = x1 * c1 + x2 * s2
                y2 = x2 * c2 - x1 * s1
            else:  # y = x * cos + rotate_half(x) * sin
                y1 = x1 * c1 - x2 * s1
                y2 = x2 * c2 + x1 * s2
            tl.store(Y + y_off, y1.to(Y.dtype.element_ty), mask=mask)
            tl.store(Y + y_off + second, y2.to(Y.dtype.element_ty), mask=mask)
            if N_PASS > 0:  # partial rotary: the features past rotary_dim are copied unchanged
                p = tl.arange(0, BLOCK_PASS)[None, None, :]
                p_mask = tok_mask[:, None, None] & (h < H) & (p < N_PASS)
                p_x = x_tok[:, None, None] + h * x_head_stride + 2 * HALF + p
                p_y = y_tok[:, None, None] + h * y_head_stride + 2 * HALF + p
                tl.store(Y + p_y, tl.load(X + p_x, mask=p_mask), mask=p_mask)

    @triton.jit
    def _rope_kernel(
        Q,  # [B, T, HQ, D] as strides (any order of the three leading dims), unit stride on D
        K,  # [B, T, HK, D]
        QO,  # rotated q, its own strides
        KO,  # rotated k
        COS,  # [B or 1, T, R] per token, or a [P, R] table when HAS_POS; unit stride on R
        SIN,
        POS,  # [B or 1, T] int32/int64 rows of the cos/sin table (unused when not HAS_POS)
        n_tokens,  # B * T
        T,
        q_sb,  # strides of q along batch, token and head (1 along D)
        q_st,
        q_sh,
        k_sb,
        k_st,
        k_sh,
        qo_sb,
        qo_st,
        qo_sh,
        ko_sb,
        ko_st,
        ko_sh,
        cos_sb,  # 0 when cos is shared by the batch (or is a table)
        cos_st,
        sin_sb,
        sin_st,
        pos_sb,  # 0 when position_ids is shared by the batch
        pos_st,
        HQ: tl.constexpr,
        HK: tl.constexpr,
        HALF: tl.constexpr,  # rotary_dim // 2
        N_PASS: tl.constexpr,  # head_dim - rotary_dim
        HAS_POS: tl.constexpr,
        TRANSPOSE: tl.constexpr,
        INTERLEAVED: tl.constexpr,  # pairs (2i, 2i + 1) instead of (i, i + HALF)
        BLOCK_T: tl.constexpr,
        BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        BLOCK_PASS: tl.constexpr,
    ):
        tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        tok_mask = tok < n_tokens
        b = tok // T
        t = tok - b * T
        if HAS_POS:
            row = tl.load(POS + b * pos_sb + t * pos_st, mask=tok_mask, other=0).to(tl.int64)
            cos_tok = row * cos_st
            sin_tok = row * sin_st
        else:
            cos_tok = b * cos_sb + t * cos_st
            sin_tok = b * sin_sb + t * sin_st
        # cos/sin of these tokens, read once and shared by every head of q and k; the tables are
        # per feature, so their pairs are laid out as q's: (i, i + HALF) or (2i, 2i + 1)
        i = tl.arange(0, BLOCK_HALF)[None, :]
        if INTERLEAVED:
            d = 2 * i
            second = 1
        else:
            d = i
            second = HALF
        cs_mask = tok_mask[:, None] & (i < HALF)
        cos_off = cos_tok[:, None] + d
        sin_off = sin_tok[:, None] + d
        c1 = tl.load(COS + cos_off, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
        c2 = tl.load(COS + cos_off + second, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
        s1 = tl.load(SIN + sin_off, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
        s2 = tl.load(SIN + sin_off + second, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
        _rope_heads(
            Q,
            QO,
            b * q_sb + t * q_st,
            b * qo_sb + t * qo_st,
            q_sh,
            qo_sh,
            tok_mask,
            c1,
            c2,
            s1,
            s2,
            HQ,
            HALF,
            N_PASS,
            TRANSPOSE,
            INTERLEAVED,
            BLOCK_HQ,
            BLOCK_HALF,
            BLOCK_PASS,
        )
        _rope_heads(
            K,
            KO,
            b * k_sb + t * k_st,
            b * ko_sb + t * ko_st,
            k_sh,
            ko_sh,
            tok_mask,
            c1,
            c2,
            s1,
            s2,
            HK,
            HALF,
            N_PASS,
            TRANSPOSE,
            INTERLEAVED,
            BLOCK_HK,
            BLOCK_HALF,
            BLOCK_PASS,
        )


# --- 3. launcher -----------------------------------------------------------------------------


def _unit_last(t: Tensor) -> Tensor:
    """The kernel takes any strides but a unit one on the last dim; copy only when that fails."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _out_like(x: Tensor) -> Tensor:
    """The output buffer for x: x's own memory layout when it is dense (HF's transposed q stays
    transposed), row-major otherwise. The fake kernel uses the same rule."""
    out = torch.empty_like(x)
    return out if out.stride(-1) == 1 else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _bth_strides(x: Tensor, unsqueeze_dim: int) -> tuple[int, int, int]:
    """(batch, token, head) strides of a [B, H, T, D] (unsqueeze_dim=1) or [B, T, H, D] tensor."""
    if unsqueeze_dim == 1:
        return x.stride(0), x.stride(2), x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


def _heads_tokens(x: Tensor, unsqueeze_dim: int) -> tuple[int, int]:
    if unsqueeze_dim == 1:
        return x.shape[1], x.shape[2]
    return x.shape[2], x.shape[1]


def _batch_stride(t: Tensor, dim: int, batch: int) -> int:
    # a batch dim of size 1 is shared by every batch element
    return t.stride(dim) if t.shape[dim] == batch and batch > 1 else 0


def _check_positions(position_ids: Tensor, rows: int) -> None:
    valid = ((position_ids >= 0) & (position_ids < rows)).all()
    message = f"rope: position_ids must lie in [0, {rows}), the rows of the cos/sin table"
    if position_ids.device.type == "cpu":
        if not bool(valid):
            raise IndexError(message)
    elif _backend.checks_enabled():
        torch._assert_async(valid, message)  # no host sync on the GPU path


def _rope_triton(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Tensor | None,
    unsqueeze_dim: int,
    transpose: bool,
    interleaved: bool = False,
) -> tuple[Tensor, Tensor]:
    q_out, k_out = _out_like(q), _out_like(k)
    hq, t = _heads_tokens(q, unsqueeze_dim)
    hk = _heads_tokens(k, unsqueeze_dim)[0]
    b, d = q.shape[0], q.shape[-1]
    n_tokens = b * t
    if n_tokens == 0 or q.numel() + k.numel() == 0:
        return q_out, k_out
    q, k = _unit_last(q), _unit_last(k)
    cos, sin = _unit_last(cos), _unit_last(sin)
    r = cos.shape[-1]
    half = r // 2
    if position_ids is not None:
        cos, sin = (c[0] if c.dim() == 3 else c for c in (cos, sin))  # [P, R] tables
        cos_sb = sin_sb = 0
        cos_st, sin_st = cos.stride(0), sin.stride(0)
        pos = position_ids
        pos_sb, pos_st = _batch_stride(position_ids, 0, b), position_ids.stride(1)
    else:
        cos_sb, cos_st = _batch_stride(cos, 0, b), cos.stride(1)
        sin_sb, sin_st = _batch_stride(sin, 0, b), sin.stride(1)
        pos, pos_sb, pos_st = cos, 0, 0
    block_half = triton.next_power_of_2(half)
    block_hq = min(triton.next_power_of_2(max(hq, 1)), max(1, _TILE // block_half))
    block_hk = min(triton.next_power_of_2(max(hk, 1)), max(1, _TILE // block_half))
    # small heads: several tokens per program, so each program still moves a useful amount
    block_t = max(1, _TILE // (block_half * max(block_hq, block_hk)))
    block_t = min(block_t, _MAX_TOKENS_PER_PROGRAM, triton.next_power_of_2(n_tokens))
    # about 512 elements of a q-plus-k half-tile per warp: 4 warps at Llama sizes (32 + 8 heads)
    elems = block_t * (block_hq + block_hk) * block_half
    num_warps = min(8, 1 << max(0, (elems // 512).bit_length() - 1))
    cfg = kernel_config(
        "rope",
        {"BLOCK_HALF": (half, None), "BLOCK_PASS": (d - r, None)},
        BLOCK_T=block_t,
        BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk,
        BLOCK_HALF=block_half,
        BLOCK_PASS=triton.next_power_of_2(max(d - r, 1)),
        num_warps=num_warps,
    )
    grid = (triton.cdiv(n_tokens, cfg["BLOCK_T"]),)
    _rope_kernel[grid](
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        pos,
        n_tokens,
        t,
        *_bth_strides(q, unsqueeze_dim),
        *_bth_strides(k, unsqueeze_dim),
        *_bth_strides(q_out, unsqueeze_dim),
        *_bth_strides(k_out, unsqueeze_dim),
        cos_sb,
        cos_st,
        sin_sb,
        sin_st,
        pos_sb,  # 0 when position_ids is shared by the batch
        pos_st,
        HQ=hq,
        HK=hk,
        HALF=half,
        N_PASS=d - r,
        HAS_POS=position_ids is not None,
        TRANSPOSE=transpose,
        INTERLEAVED=interleaved,
        **cfg,
    )
    return q_out, k_out


def _rope_dispatch(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Tensor | None,
    unsqueeze_dim: int,
    transpose: bool,
    interleaved: bool,
) -> tuple[Tensor, Tensor]:
    if position_ids is not None:
        _check_positions(position_ids, cos.shape[-2])
    if _backend.select("rope", q.device) == "triton":
        return _rope_triton(q, k, cos, sin, position_ids, unsqueeze_dim, transpose, interleaved)
    q_ref, k_ref = _rope_apply_ref(
        q, k, cos, sin, position_ids, unsqueeze_dim, transpose, interleaved
    )
    # the same output layout as the Triton path and the fake kernel
    return _out_like(q).copy_(q_ref), _out_like(k).copy_(k_ref)


# --- 4. torch.library registration -----------------------------------------------------------


# interleaved is the last argument, with a default: graphs of the rotate-half form keep their
# six-argument calls (the ONNX translation and the roofline read those)
@torch.library.custom_op("perfml::rope_fwd", mutates_args=())
def _rope_fwd_op(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Tensor | None,
    unsqueeze_dim: int,
    interleaved: bool = False,
) -> tuple[Tensor, Tensor]:
    return _rope_dispatch(
        q, k, cos, sin, position_ids, unsqueeze_dim, transpose=False, interleaved=interleaved
    )


@_rope_fwd_op.register_fake
def _(q, k, cos, sin, position_ids, unsqueeze_dim, interleaved=False):
    return _out_like(q), _out_like(k)


@torch.library.custom_op("perfml::rope_bwd", mutates_args=())
def _rope_bwd_op(
    dq: Tensor,
    dk: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Tensor | None,
    unsqueeze_dim: int,
    interleaved: bool = False,
) -> tuple[Tensor, Tensor]:
    return _rope_dispatch(
        dq, dk, cos, sin, position_ids, unsqueeze_dim, transpose=True, interleaved=interleaved
    )


@_rope_bwd_op.register_fake
def _(dq, dk, cos, sin, position_ids, unsqueeze_dim, interleaved=False):
    return _out_like(dq), _out_like(dk)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, position_ids, unsqueeze_dim = inputs[:6]
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.unsqueeze_dim = unsqueeze_dim
    ctx.interleaved = bool(inputs[6]) if len(inputs) > 6 else False
    # as in eager PyTorch, an output whose input needs no gradient does not require one
    ctx.mark_non_differentiable(
        *(out for out, x in zip(output, (q, k), strict=True) if not x.requires_grad)
    )


def _backward(ctx, dq_embed, dk_embed):
    cos, sin, position_ids = ctx.saved_tensors
    args = (dq_embed, dk_embed, cos, sin, position_ids, ctx.unsqueeze_dim)
    if ctx.interleaved:
        dq, dk = torch.ops.perfml.rope_bwd(*args, True)
    else:
        dq, dk = torch.ops.perfml.rope_bwd(*args)
    return dq, dk, None, None, None, None, None


_rope_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --- 5. public API ---------------------------------------------------------------------------


def _layout(unsqueeze_dim: int) -> str:
    return "[B, H, T, D]" if unsqueeze_dim == 1 else "[B, T, H, D]"


def _check_width(d: int, r: int, interleaved: bool, rotary_dim: int | None) -> None:
    """The table width against the declared layout: rotate-half reads rotary_dim from the width
    (the HF convention); interleaved takes width head_dim unless rotary_dim declares a partial
    rotary, since a width of half the head is ambiguous there (half-width tables of one angle per
    pair are common for interleaved RoPE)."""
    if rotary_dim is not None:
        if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
            raise TypeError(f"rope: rotary_dim must be an int or None, got {rotary_dim!r}")
        if rotary_dim % 2 or not 2 <= rotary_dim <= d:
            raise ValueError(
                f"rope: rotary_dim must be even and in 2..head_dim={d}, got {rotary_dim}"
            )
    if not interleaved:
        if rotary_dim is not None and r != rotary_dim:
            raise ValueError(
                f"rope: cos/sin have width {r} but rotary_dim={rotary_dim} was declared; the "
                "tables are [.., rotary_dim], one value per rotated feature"
            )
        return
    want = d if rotary_dim is None else rotary_dim
    if r == want:
        return
    declared = (
        f"rotary_dim={rotary_dim} (declared)"
        if rotary_dim is not None
        else f"head_dim={d} (full rotary; pass rotary_dim=R for partial rotary over the first R "
        "features)"
    )
    hint = ""
    if 2 * r == want:
        hint = (
            "; a table of one angle per pair must be repeated per feature first: "
            "cos[..., :R // 2].repeat_interleave(2, dim=-1) for cat(freqs, freqs) tables, "
            "cos.repeat_interleave(2, dim=-1) for half-width ones"
        )
    raise ValueError(
        f"rope: interleaved=True takes cos/sin with one value per feature, width {declared}, "
        f"got width {r}{hint}"
    )


def _check_tables(
    q: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None, b: int, t: int
) -> None:
    for name, c in (("cos", cos), ("sin", sin)):
        if not isinstance(c, Tensor):
            raise TypeError(f"rope: {name} must be a Tensor, got {type(c).__name__}")
        if c.dtype not in (torch.float32, q.dtype):
            raise TypeError(f"rope: {name} must be float32 or q's dtype {q.dtype}, got {c.dtype}")
        if c.device != q.device:
            raise ValueError(f"rope: q is on {q.device} but {name} is on {c.device}")
        if c.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"rope: {name} requires grad, but the fused kernel gives cos/sin no gradient; "
                "detach it (HF computes cos/sin under torch.no_grad) or use rope_ref"
            )
    if cos.shape != sin.shape:
        raise ValueError(
            "rope: cos and sin must have the same shape, "
            f"got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    d = q.shape[-1]
    r = cos.shape[-1] if cos.dim() else 0
    if r % 2 or not 2 <= r <= d:
        raise ValueError(
            f"rope: rotary_dim (cos.shape[-1]) must be even and in 2..head_dim={d}, got {r}"
        )
    if position_ids is None:
        if cos.dim() != 3 or cos.shape[0] not in (1, b) or cos.shape[1] != t:
            raise ValueError(
                f"rope: cos and sin must have shape [1 or {b}, {t}, rotary_dim] "
                f"([1 or B, T, rotary_dim]), got {tuple(cos.shape)}"
            )
        return
    if not isinstance(position_ids, Tensor):
        raise TypeError(
            f"rope: position_ids must be a Tensor or None, got {type(position_ids).__name__}"
        )
    if position_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"rope: position_ids must be int32 or int64, got {position_ids.dtype}")
    if position_ids.device != q.device:
        raise ValueError(f"rope: q is on {q.device} but position_ids is on {position_ids.device}")
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, b) or position_ids.shape[1] != t:
        raise ValueError(
            f"rope: position_ids must have shape [1 or {b}, {t}] ([1 or B, T]), "
            f"got {tuple(position_ids.shape)}"
        )
    if not (cos.dim() == 2 or (cos.dim() == 3 and cos.shape[0] == 1)) or cos.shape[-2] == 0:
        raise ValueError(
            "rope: with position_ids, cos and sin are tables of shape [P, rotary_dim] or "
            f"[1, P, rotary_dim] indexed by position_ids, got {tuple(cos.shape)}; cos/sin "
            "already gathered per token ([B, T, rotary_dim]) take position_ids=None"
        )


def _check(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Tensor | None,
    unsqueeze_dim: int,
    interleaved: bool = False,
    rotary_dim: int | None = None,
) -> None:
    if not isinstance(interleaved, bool):
        raise TypeError(f"rope: interleaved must be a bool, got {interleaved!r}")
    if unsqueeze_dim not in (1, 2):
        raise ValueError(
            "rope: unsqueeze_dim must be 1 (q, k as [B, H, T, D]) or 2 (q, k as [B, T, H, D]), "
            f"got {unsqueeze_dim}"
        )
    layout = _layout(unsqueeze_dim)
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, Tensor):
            raise TypeError(f"rope: {name} must be a Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"rope: {name} must be 4-D {layout} (unsqueeze_dim={unsqueeze_dim}), "
                f"got shape {tuple(x.shape)}"
            )
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"rope: q must be a floating tensor (fp32/bf16/fp16 run the kernels, fp64 the exact reference), got {q.dtype}"
        )
    if k.dtype != q.dtype:
        raise TypeError(f"rope: q and k must share a dtype, got q {q.dtype} and k {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"rope: q is on {q.device} but k is on {k.device}")
    hq, t = _heads_tokens(q, unsqueeze_dim)
    hk, tk = _heads_tokens(k, unsqueeze_dim)
    b, d = q.shape[0], q.shape[-1]
    if (k.shape[0], tk, k.shape[-1]) != (b, t, d):
        raise ValueError(
            f"rope: k must match q in batch, tokens and head_dim ({layout}: B={b}, T={t}, D={d}), "
            f"got k of shape {tuple(k.shape)}"
        )
    if d > MAX_HEAD_DIM:
        raise ValueError(f"rope: head_dim must be at most {MAX_HEAD_DIM}, got {d}")
    _check_tables(q, cos, sin, position_ids, b, t)
    _check_width(d, cos.shape[-1], interleaved, rotary_dim)


def rope(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Tensor | None = None,
    unsqueeze_dim: int = 1,
    *,
    interleaved: bool = False,
    rotary_dim: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused rotary embedding of q and k (HF `apply_rotary_pos_emb`), differentiable in q and k.

    q: [B, Hq, T, D], k: [B, Hk, T, D] (unsqueeze_dim=1) or [B, T, Hq, D], [B, T, Hk, D]
    (unsqueeze_dim=2); cos, sin: [B or 1, T, R] with R = rotary_dim <= D, even (features past R
    pass through). With position_ids ([B or 1, T] ints), cos and sin are [P, R] or [1, P, R]
    tables and token (b, t) uses row position_ids[b, t]. Returns (q_embed, k_embed) in q's dtype.

    interleaved=True (GPT-J / GLM / Cohere): the pairs (x[2i], x[2i+1]) rotate instead of the
    halves, y = x * cos + rotate_pairs(x) * sin with rotate_pairs(x)[2i] = -x[2i+1],
    rotate_pairs(x)[2i+1] = x[2i]. cos/sin keep one value per feature (HF models repeat each
    pair's angle: cos[..., 2i] == cos[..., 2i+1], as Cohere's repeat_interleave tables), of
    width D, or of width rotary_dim when partial rotary is declared by passing rotary_dim.
    rotary_dim (optional) states the rotary width; a table of another width is an error.
    """
    _check(q, k, cos, sin, position_ids, unsqueeze_dim, interleaved, rotary_dim)
    if q.dtype == torch.float64:  # no kernel computes in fp64: the reference is exact there
        return rope_ref(
            q,
            k,
            cos,
            sin,
            position_ids,
            unsqueeze_dim,
            interleaved=interleaved,
            rotary_dim=rotary_dim,
        )
    if _backend.select("rope", q.device) == "aten":
        return _rope_aten(q, k, cos, sin, position_ids, unsqueeze_dim, interleaved)
    if interleaved:
        return torch.ops.perfml.rope_fwd(q, k, cos, sin, position_ids, unsqueeze_dim, True)
    return torch.ops.perfml.rope_fwd(q, k, cos, sin, position_ids, unsqueeze_dim)
