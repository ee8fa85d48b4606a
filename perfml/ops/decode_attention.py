"""Attention of one new token over a static KV cache, the cache write included (inference only).

    out[b, h] = softmax(scale * q[b, h] . K[b, h // G, 0..position]^T) . V[b, h // G, 0..position]

for query head h of Hq = G * Hkv heads (grouped-query attention: query head h reads kv head
h // G), after k and v (the new token's key and value) are written into slot `position` of
k_cache and v_cache. `position` is an int64 tensor on the device: 0-dim, the same slot for the
whole batch, or 1-D [B], one slot per batch row (continuous batching: every sequence of the batch
is at its own length, and row b attends over its slots 0..position[b]). Either way a decode step
is the same launches on the same buffers at every position and a CUDA graph can replay it (no
host synchronization anywhere). Math in fp32 whatever the dtype.

This replaces, per layer and step, an index_copy_ of k and v into the cache followed by
F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=slots <= position,
enable_gqa=True): about 8 small kernels on CUDA.

Kernel (flash-decoding): memory-bound, so the design counts bytes. The grid is (B * Hkv * head
blocks, splits). A program takes every query head of its kv head (up to 64 at once, 32 for fp32,
padded to at least 16 rows for tl.dot), so each K/V tile is read once for the whole group (a
larger group takes several head blocks, each reading the tiles again), and walks its share of the
cached slots 0..position-1 in BLOCK_L tiles with an online softmax (running max, sum and
accumulator per query head, in fp32, base-2 exponentials). The new token is never read back from
the cache: its score q . k and its value v come from registers, folded into split 0's initial
state, and split 0 (head block 0) writes k and v into slot `position`. No program reads that slot
(every program reads slots < position only), so the write and the reads cannot race, and one
launch does both. Slots after `position` are never read (masked loads touch no memory, so stale or
NaN contents cannot reach the result) and never written.

Splits: the cached slots 0..position-1 are divided, on the device, into `splits` equal chunks of
whole BLOCK_L tiles, so all splits share the work at every position (a split with no slots left
writes an empty partial). With per-row positions each program loads its own row's position, so
the chunks are per row; the split count itself depends on L only, never on a position. `splits` is fixed per shape on the host from L and the program count:
enough programs for about two per SM (132 SMs assumed off CUDA), never more splits than BLOCK_L
tiles in L, at most _MAX_SPLITS. With one split the kernel writes the output directly (one
launch); with several, each writes fp32 partials (max, sum, unnormalized accumulator) and a second
small kernel combines them in a fixed order, so results are deterministic (no atomics).

Precision: scores are fp32 (16-bit q . k products are exact in fp32); as in flash attention, the
probabilities are rounded to the input dtype for the tensor-core P.V product of bf16/fp16 inputs
(fp32 inputs keep fp32 everywhere, tl.dot in IEEE mode).

Position range: a CPU position (any row's) outside [0, L) raises IndexError (checked on the host: free on
the CPU). On CUDA there is no host check (it would synchronize) and no extra device-assert kernels
in the decode step: the kernel itself checks the position it loads, and an out-of-range one makes
every output value of that row NaN and leaves its caches untouched (never an out-of-bounds
access). The
decoder that owns the cache keeps the position in range on the host. (The reference path,
PERFML_BACKEND=reference, writes with index_copy_, whose own device assert fires instead.)

Layouts: q [B, Hq, 1, D], k and v [B, Hkv, 1, D] and the caches [B, Hkv, L, D] are read through
their own strides (q, k, v usually arrive as transposed views of [B, 1, H * D] projections; no
copy is made); the caches are written in place through theirs. The output is a new contiguous
[B, Hq, 1, D] tensor (for T = 1 its transpose(1, 2).reshape(B, 1, Hq * D) is a free view).

Autograd: none. This is an inference op; calling it with grad mode on and any input requiring
grad raises a ValueError (use decode_attention_ref to differentiate); the registered op
torch.ops.perfml.decode_attention has no autograd formula, so a backward through it raises. Block
sizes are untuned on a GPU: picked from the sm_90 compiler reports of tests/gpu_compile_check.py
only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from perfml import _backend
from perfml._kernel_config import kernel_config

MAX_HEAD_DIM = 256
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_LOG2E = 1.4426950408889634
# SM count assumed when no CUDA device says (interpret mode, the compile check): an H100/H200 SXM.
DEFAULT_SMS = 132
_PROGRAMS_PER_SM = 2
_MAX_SPLITS = 32
_MAX_BLOCK_G = 64  # query heads per program; larger groups take several head blocks


# --- 1. reference ----------------------------------------------------------------------------


def decode_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    position: Tensor,
    scale: float | None = None,
) -> Tensor:
    """Plain PyTorch, the definition of correct: writes k, v into slot `position` of the caches
    (index_copy_; per row with a [B] position), then attends q over slots 0..position in fp32
    (fp64 for fp64 inputs) and returns [B, Hq, 1, D] in q's dtype. Slots after `position` are
    masked out before any arithmetic, so their contents (NaN included) never reach the result.
    No host sync."""
    b, hq, _, d = q.shape
    hkv, length = k_cache.shape[1], k_cache.shape[2]
    if scale is None:
        scale = d**-0.5
    if position.dim() == 0:
        index = position.reshape(1)
        k_cache.index_copy_(2, index, k)
        v_cache.index_copy_(2, index, v)
    else:  # row r's token goes to slot position[r] of row r
        rows = torch.arange(b, device=position.device)
        k_cache[rows, :, position] = k[:, :, 0]
        v_cache[rows, :, position] = v[:, :, 0]
    compute = torch.promote_types(q.dtype, torch.float32)
    slots = torch.arange(length, device=position.device)
    seen = (slots <= position.reshape(-1, 1))[:, None, :]  # [B or 1, 1, L]
    keys = torch.where(seen[..., None], k_cache.to(compute), 0.0)
    values = torch.where(seen[..., None], v_cache.to(compute), 0.0)
    qg = q.to(compute).reshape(b, hkv, hq // hkv, d)  # query head h = kv head h // G
    scores = torch.einsum("bhgd,bhld->bhgl", qg, keys) * scale
    scores = scores.masked_fill(~seen[:, :, None, :], float("-inf"))
    out = torch.einsum("bhgl,bhld->bhgd", torch.softmax(scores, dim=-1), values)
    return out.reshape(b, hq, 1, d).to(q.dtype)


# --- 2. Triton kernels -----------------------------------------------------------------------

if _backend.has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        if UPCAST:
            # the interpreter's dot misreads 16-bit floats; their products are exact in fp32,
            # so the fp32 dot of the same operands gives what the GPU's tensor cores give
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _decode_attention_fwd_kernel(
        Q,  # [B, Hq, 1, D] (strides)
        K,  # [B, Hkv, 1, D]: the new token's key
        V,  # [B, Hkv, 1, D]: its value
        KC,  # [B, Hkv, L, D] key cache, slot POS written here
        VC,  # [B, Hkv, L, D] value cache
        POS,  # int64, 0-dim or [B]: the new token's slot (row b's at POS + b * stride_pb)
        OUT,  # [B, Hq, 1, D] (used when SPLITS == 1)
        MID_ACC,  # [B * Hq, SPLITS, HEAD_DIM] fp32 partials (used when SPLITS > 1)
        MID_M,  # [B * Hq, SPLITS] fp32 running max (base 2)
        MID_L,  # [B * Hq, SPLITS] fp32 running sum
        qk_scale,  # scale * log2(e)
        L,
        HQ,
        HKV,
        stride_pb,  # 0 for one position shared by the batch
        stride_qb,
        stride_qh,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vd,
        stride_kcb,
        stride_kch,
        stride_kcl,
        stride_kcd,
        stride_vcb,
        stride_vch,
        stride_vcl,
        stride_vcd,
        stride_ob,
        stride_oh,
        stride_od,
        G: tl.constexpr,  # query heads per kv head
        HEAD_BLOCKS: tl.constexpr,  # cdiv(G, BLOCK_G)
        HEAD_DIM: tl.constexpr,
        SPLITS: tl.constexpr,
        IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dots
        UPCAST: tl.constexpr,  # interpreter: 16-bit dots through fp32
        BLOCK_G: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        head_block = pid % HEAD_BLOCKS
        bkv = pid // HEAD_BLOCKS
        hkv = bkv % HKV
        b = bkv // HKV
        g = head_block * BLOCK_G + tl.arange(0, BLOCK_G)
        g_mask = g < G
        h = hkv * G + g  # query heads of this program
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        qd_mask = g_mask[:, None] & d_mask[None, :]

        pos = tl.load(POS + b * stride_pb)
        valid = (pos >= 0) & (pos < L)
        n = tl.where(valid, pos, 0)  # cached slots 0..n-1 are read; none when out of range
        # this split's share of the cached slots: equal chunks of whole tiles
        chunk = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_L) * BLOCK_L
        lo = split * chunk
        hi = tl.minimum(lo + chunk, n)

        q = tl.load(
            Q + b * stride_qb + h[:, None] * stride_qh + d[None, :] * stride_qd,
            mask=qd_mask,
            other=0.0,
        )
        # The new token, from registers: split 0 starts from it (score, weight 1, its value).
        k_new = tl.load(K + b * stride_kb + hkv * stride_kh + d * stride_kd, mask=d_mask, other=0.0)
        v_new = tl.load(V + b * stride_vb + hkv * stride_vh + d * stride_vd, mask=d_mask, other=0.0)
        first = split == 0
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * qk_scale
        m_i = tl.where(first, s_new, float("-inf"))
        l_i = tl.where(first, 1.0, 0.0) + tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.where(first, v_new.to(tl.float32), 0.0)[None, :] + tl.zeros(
            [BLOCK_G, BLOCK_D], dtype=tl.float32
        )
        write = d_mask & valid & first & (head_block == 0)
        tl.store(
            KC + b * stride_kcb + hkv * stride_kch + n * stride_kcl + d * stride_kcd,
            k_new.to(KC.dtype.element_ty),
            mask=write,
        )
        tl.store(
            VC + b * stride_vcb + hkv * stride_vch + n * stride_vcl + d * stride_vcd,
            v_new.to(VC.dtype.element_ty),
            mask=write,
        )

        kc = KC + b * stride_kcb + hkv * stride_kch + d[None, :] * stride_kcd
        vc = VC + b * stride_vcb + hkv * stride_vch + d[None, :] * stride_vcd
        for start in range(lo, hi, BLOCK_L):
            slots = start + tl.arange(0, BLOCK_L)
            s_mask = slots < hi
            kv_mask = s_mask[:, None] & d_mask[None, :]
            k = tl.load(kc + slots[:, None] * stride_kcl, mask=kv_mask, other=0.0)
            scores = _dot(q, tl.trans(k), IEEE, UPCAST) * qk_scale  # [BLOCK_G, BLOCK_L]
            scores = tl.where(s_mask[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)  # 0 while m_i is -inf (m_new is finite here)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(vc + slots[:, None] * stride_vcl, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, UPCAST)
            m_i = m_new

        if SPLITS == 1:
            out = acc / l_i[:, None]
            out = tl.where(valid, out, float("nan"))
            tl.store(
                OUT + b * stride_ob + h[:, None] * stride_oh + d[None, :] * stride_od,
                out.to(OUT.dtype.element_ty),
                mask=qd_mask,
            )
        else:
            row = b * HQ + h  # [BLOCK_G]
            l_i = tl.where(valid, l_i, float("nan"))  # an out-of-range position: NaN output
            tl.store(MID_M + row * SPLITS + split, m_i, mask=g_mask)
            tl.store(MID_L + row * SPLITS + split, l_i, mask=g_mask)
            tl.store(
                MID_ACC + (row * SPLITS + split)[:, None] * HEAD_DIM + d[None, :],
                acc,
                mask=qd_mask,
            )

    @triton.jit
    def _decode_attention_combine_kernel(
        MID_ACC,  # [B * Hq, SPLITS, HEAD_DIM] fp32
        MID_M,  # [B * Hq, SPLITS] fp32
        MID_L,  # [B * Hq, SPLITS] fp32
        OUT,  # [B, Hq, 1, D]
        HQ,
        stride_ob,
        stride_oh,
        stride_od,
        HEAD_DIM: tl.constexpr,
        SPLITS: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        b = row // HQ
        h = row % HQ
        s = tl.arange(0, BLOCK_S)
        s_mask = s < SPLITS
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        m = tl.load(MID_M + row * SPLITS + s, mask=s_mask, other=float("-inf"))
        l_s = tl.load(MID_L + row * SPLITS + s, mask=s_mask, other=0.0)
        acc = tl.load(
            MID_ACC + (row * SPLITS + s)[:, None] * HEAD_DIM + d[None, :],
            mask=s_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        # split 0 holds the new token, so the max is finite; empty splits (-inf) weigh 0
        w = tl.exp2(m - tl.max(m, axis=0))
        total = tl.sum(w * l_s, axis=0)
        out = tl.sum(w[:, None] * acc, axis=0) / total
        tl.store(
            OUT + b * stride_ob + h * stride_oh + d * stride_od,
            out.to(OUT.dtype.element_ty),
            mask=d_mask,
        )


# --- 3. launcher -----------------------------------------------------------------------------


def _interpreted(t: Tensor) -> bool:
    """Whether this launch runs in Triton's interpreter: CPU tensors reach the Triton path only
    in interpret mode, CUDA tensors always compile for the GPU."""
    return t.device.type == "cpu"


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def _config(g: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_G, BLOCK_L, num_warps) for a group of g query heads. Untuned on a GPU: sized from
    ptxas's sm_90 reports (no spills, under 170 registers per thread). 16-bit inputs: K and V
    tiles of 64 slots (32 at D = 256), 8 warps for 64-head groups (168 registers on 4). fp32
    inputs run their IEEE dots on the FMA units with the operands in registers, so half the
    slots and at most 32 heads per program (64 slots or 64 heads spilled kilobytes)."""
    fp32 = dtype == torch.float32
    block_g = min(max(16, triton.next_power_of_2(g)), 32 if fp32 else _MAX_BLOCK_G)
    block_l = (32 if fp32 else 64) // (2 if head_dim > 128 else 1)
    return block_g, block_l, 8 if block_g >= 64 else 4


def _num_splits(length: int, block_l: int, programs: int, sms: int) -> int:
    """Splits of the slot range: about _PROGRAMS_PER_SM programs per SM in all, never more
    splits than BLOCK_L tiles in L (a longer context only gives each split more tiles)."""
    want = triton.cdiv(_PROGRAMS_PER_SM * sms, programs)
    return max(1, min(want, triton.cdiv(length, block_l), _MAX_SPLITS))


def _decode_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    position: Tensor,
    scale: float,
) -> Tensor:
    b, hq, _, d = q.shape
    hkv, length = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty((b, hq, 1, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    g = hq // hkv
    block_g, block_l, num_warps = _config(g, d, q.dtype)
    cfg = kernel_config(
        "decode_attention_fwd",
        {"BLOCK_G": (16, None), "BLOCK_L": (16, None), "BLOCK_D": (max(16, d), None)},
        BLOCK_G=block_g, BLOCK_L=block_l, BLOCK_D=max(16, triton.next_power_of_2(d)),
        num_warps=num_warps, num_stages=2,
    )  # fmt: skip
    head_blocks = triton.cdiv(g, cfg["BLOCK_G"])
    block_d = cfg["BLOCK_D"]
    programs = b * hkv * head_blocks
    splits = _num_splits(length, cfg["BLOCK_L"], programs, _sm_count(q.device))
    if splits > 1:
        mid_acc = torch.empty((b * hq, splits, d), dtype=torch.float32, device=q.device)
        mid_m = torch.empty((b * hq, splits), dtype=torch.float32, device=q.device)
        mid_l = torch.empty((b * hq, splits), dtype=torch.float32, device=q.device)
    else:
        mid_acc = mid_m = mid_l = out  # never touched
    _decode_attention_fwd_kernel[(programs, splits)](
        q, k, v, k_cache, v_cache, position, out, mid_acc, mid_m, mid_l,
        scale * _LOG2E, length, hq, hkv, position.stride(0) if position.dim() else 0,
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(3),
        v.stride(0), v.stride(1), v.stride(3),
        *k_cache.stride(),
        *v_cache.stride(),
        out.stride(0), out.stride(1), out.stride(3),
        G=g, HEAD_BLOCKS=head_blocks, HEAD_DIM=d, SPLITS=splits,
        IEEE=q.dtype == torch.float32, UPCAST=_interpreted(q) and q.dtype != torch.float32,
        **cfg,
    )  # fmt: skip
    if splits > 1:
        block_s = triton.next_power_of_2(splits)
        combine = kernel_config(
            "decode_attention_combine", {"BLOCK_S": (splits, None), "BLOCK_D": (d, None)},
            BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4 if block_s * block_d <= 4096 else 8,
        )  # fmt: skip
        _decode_attention_combine_kernel[(b * hq,)](
            mid_acc, mid_m, mid_l, out, hq,
            out.stride(0), out.stride(1), out.stride(3),
            HEAD_DIM=d, SPLITS=splits, **combine,
        )  # fmt: skip
    return out


# --- 4. torch.library registration -----------------------------------------------------------


def _check_on_host(k_cache: Tensor, v_cache: Tensor, position: Tensor) -> None:
    """Checks that need the real tensors (not traceable by torch.compile, so they run inside
    the op). CPU positions are checked here (free on the CPU); CUDA ones in the kernel."""
    if k_cache.untyped_storage().data_ptr() == v_cache.untyped_storage().data_ptr():
        raise ValueError("decode_attention: k_cache and v_cache must be separate tensors")
    length = k_cache.shape[2]
    if position.device.type == "cpu":
        for row, value in enumerate(position.reshape(-1).tolist()):
            if not 0 <= value < length:
                which = f"position[{row}]" if position.dim() else "position"
                raise IndexError(
                    f"decode_attention: {which} {value} is out of range for a cache of {length} "
                    f"slots (valid: 0..{length - 1})"
                )


@torch.library.custom_op("perfml::decode_attention", mutates_args=("k_cache", "v_cache"))
def _decode_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    position: Tensor,
    scale: float,
) -> Tensor:
    """Writes k, v into slot `position` of the caches; returns the attention output."""
    _check_on_host(k_cache, v_cache, position)
    if _backend.select("decode_attention", q.device) == "triton":
        return _decode_attention_triton(q, k, v, k_cache, v_cache, position, scale)
    return decode_attention_ref(q, k, v, k_cache, v_cache, position, scale).contiguous()


@_decode_attention_op.register_fake
def _(q, k, v, k_cache, v_cache, position, scale):
    b, hq, _, d = q.shape
    return torch.empty((b, hq, 1, d), dtype=q.dtype, device=q.device)


# No register_autograd: inference only (the public function refuses inputs that need grad).


# --- 5. public API ---------------------------------------------------------------------------


def _check(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    position: Tensor,
    scale: float | None,
) -> None:
    named = (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache))
    for name, t in (*named, ("position", position)):
        if not isinstance(t, Tensor):
            raise TypeError(f"decode_attention: {name} must be a Tensor, got {type(t).__name__}")
    layouts = ("[B, Hq, 1, D]", "[B, Hkv, 1, D]", "[B, Hkv, 1, D]", "[B, Hkv, L, D]")
    for (name, t), layout in zip(named, (*layouts, layouts[-1]), strict=True):
        if t.dim() != 4:
            raise ValueError(
                f"decode_attention: {name} must be 4-D {layout}, got shape {tuple(t.shape)}"
            )
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"decode_attention: q must be fp32, bf16 or fp16, got {q.dtype}")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise TypeError(
                f"decode_attention: {name} must have q's dtype {q.dtype}, got {t.dtype}"
            )
    for name, t in (*named[1:], ("position", position)):
        if t.device != q.device:
            raise ValueError(f"decode_attention: q is on {q.device} but {name} is on {t.device}")
    b, hq, t, d = q.shape
    if position.dtype != torch.int64 or position.dim() > 1:
        raise TypeError(
            "decode_attention: position must be a 0-dim int64 tensor (one slot for the whole "
            "batch) or a 1-D one of B entries (one slot per row), got "
            f"{position.dtype} of shape {tuple(position.shape)}"
        )
    if position.dim() == 1 and position.shape[0] != b:
        raise ValueError(
            f"decode_attention: a per-row position must have B={b} entries (q's batch), got "
            f"{position.shape[0]}"
        )
    if t != 1:
        raise ValueError(f"decode_attention: q must hold one token ([B, Hq, 1, D]), got T={t}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"decode_attention: head_dim must be in 1..{MAX_HEAD_DIM}, got {d}")
    hkv = k_cache.shape[1]
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            "decode_attention: k_cache and v_cache must have the same shape, "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.shape[0] != b or k_cache.shape[3] != d or k_cache.shape[2] < 1 or hkv < 1:
        raise ValueError(
            f"decode_attention: the caches must be [B, Hkv, L, D] with B={b}, D={d} (q's) and "
            f"L >= 1, got {tuple(k_cache.shape)}"
        )
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape) != (b, hkv, 1, d):
            raise ValueError(
                f"decode_attention: {name} must be [B, Hkv, 1, D] = {(b, hkv, 1, d)} (the "
                f"caches' heads), got {tuple(x.shape)}"
            )
    if hq % hkv:
        raise ValueError(
            f"decode_attention: q's {hq} heads must be a multiple of the caches' {hkv} kv heads"
        )
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise TypeError(f"decode_attention: scale must be a finite float or None, got {scale!r}")
    if torch.is_grad_enabled() and any(t.requires_grad for _, t in named):
        raise ValueError(
            "decode_attention: is inference only (no backward); an input requires grad. Call it "
            "under torch.no_grad() / torch.inference_mode(), detach the inputs, or use "
            "decode_attention_ref to differentiate"
        )


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    position: Tensor,
    scale: float | None = None,
) -> Tensor:
    """One decode step of attention over a static KV cache, in one fused kernel (two when the
    slot range is split). Inference only (no autograd).

    q [B, Hq, 1, D]; k, v [B, Hkv, 1, D] (the new token's key, already rotated, and value);
    k_cache, v_cache [B, Hkv, L, D], written in place: k, v go into slot `position`, no other
    slot changes; position: int64 tensor on q's device, in [0, L): 0-dim (the same slot for
    every row) or [B] (row b writes slot position[b] and attends over its slots 0..position[b];
    the other rows' positions never touch it). Hq must be a multiple
    of Hkv (query head h uses kv head h // (Hq // Hkv)); D <= 256; fp32, bf16 or fp16, all of
    one dtype. Returns softmax(scale * q . K[0..position]^T) . V[0..position], [B, Hq, 1, D]
    contiguous in q's dtype; scale defaults to D ** -0.5. An out-of-range position raises on
    the CPU and gives a NaN output for its rows (their caches untouched) on CUDA, where it is
    never checked on the
    host (no sync: the step stays CUDA-graph capturable).
    """
    _check(q, k, v, k_cache, v_cache, position, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.dtype == torch.float64:  # no kernel computes in fp64: the reference is exact there
        _check_on_host(k_cache, v_cache, position)
        return decode_attention_ref(q, k, v, k_cache, v_cache, position, scale)
    return torch.ops.perfml.decode_attention(q, k, v, k_cache, v_cache, position, scale)
