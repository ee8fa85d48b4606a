"""Weight-only quantized matmuls: out = x @ dequant(w).T with the dequantization inside the GEMM.

Two weight formats:
  int8  w_q [N, K] int8, scale [N]: per-output-channel symmetric. The scale does not depend on k,
        so it factors out of the K sum: the kernels accumulate x @ w_q.T in fp32 and multiply
        by the scale once per output (exact algebra, one multiply per output instead of per
        weight).
  int4  w_q [N, Kp / 2] uint8, two 4-bit values per byte (k even in the low nibble, k odd in the
        high one), scale and zero [N, Kp / group] per group (asymmetric: w = (q - zero) * scale).
        The scale changes along k, so each weight tile is dequantized to the activation dtype
        before it is multiplied; BLOCK_K divides the group size so a tile lies inside one group
        and needs one scale/zero per row. Kp is K padded up to a multiple of the group size (the
        pad quantizes to exactly zero and the x loads are masked at K anyway).

Two kernels, picked by the number of rows M (x is [M, K]):
  M <= GEMV_MAX_M (8, decode)  `_wq_gemv_kernel`, a split-K GEMV. Decode is bound by reading the
        weight (1 or 0.5 byte per weight instead of 2, never a dequantized copy in memory), so
        what matters is spreading that read over every SM: the grid is (N / BLOCK_N, SPLIT)
        with SPLIT chosen for 2 to 4 programs per SM (`_gemv_split`; N = 4096 alone gives 128
        blocks of 32 rows, under one per SM of an H100). Each program reads a [BLOCK_N,
        BLOCK_K] weight tile per step with 16-byte loads along K, dequantizes it in registers,
        multiplies it by the chunk of every x row (all M rows at once: the weight is read once)
        and sums along K with tl.sum in fp32; no tl.dot, whose 16-row minimum would be mostly
        padding. With SPLIT > 1 the programs write fp32 partials [SPLIT, M, N] and
        `_wq_gemv_reduce_kernel` sums them in a fixed order, then applies the int8 scale and
        casts: deterministic (no atomics) and free of host synchronization, so CUDA graphs can
        capture it. The threshold is a judgment, not a measurement: at M = 8 the tiled
        kernel's 16-row MMA tile is still half padding, and the x rows each GEMV thread holds
        still fit its registers. Block sizes and the threshold come from ptxas's sm_90
        register reports, not from timings on a GPU: tune them with the bench cases.
  M > GEMV_MAX_M  `_wq_mm_kernel`, tiled with tl.dot (BLOCK_M >= 16), for prefill and batches.

The references define the math both kernels follow (fp32 accumulation; int4 weights rounded to
the activation dtype before they are multiplied) and are the CPU path. Inference only: no
autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from perfml import _backend
from perfml._kernel_config import kernel_config

# --- 1. references -----------------------------------------------------------------------------


def dequantize_int8_ref(w_q: Tensor, scale: Tensor) -> Tensor:
    """[N, K] int8 x [N] scale -> [N, K] fp32 weight."""
    return w_q.float() * scale.float().unsqueeze(1)


def unpack_int4(packed: Tensor) -> Tensor:
    """[N, Kp / 2] uint8 -> [N, Kp] uint8 values in 0..15 (low nibble first)."""
    low = packed & 0xF
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def pack_int4(q: Tensor) -> Tensor:
    """[N, Kp] integers in 0..15 (Kp even) -> [N, Kp / 2] uint8."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def dequantize_int4_ref(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """Packed int4 [N, Kp / 2] with per-group scale/zero [N, Kp / group] -> [N, Kp] fp32."""
    q = unpack_int4(packed).float()
    n, kp = q.shape
    q = q.view(n, kp // group_size, group_size)
    w = (q - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return w.view(n, kp)


def w8a16_mm_ref(x: Tensor, w_q: Tensor, scale: Tensor) -> Tensor:
    """x [M, K] @ (w_q * scale).T -> [M, N] in x.dtype; fp32 math with the scale applied last
    (the kernel's order), float64 for float64 inputs."""
    compute = torch.promote_types(x.dtype, torch.float32)
    acc = x.to(compute) @ w_q.to(compute).T
    return (acc * scale.to(compute)).to(x.dtype)


def w4a16_mm_ref(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """x [M, K] @ dequant(packed)[:, :K].T -> [M, N] in x.dtype. The dequantized weight is
    rounded to x.dtype first (what the kernel feeds tl.dot), then fp32 math."""
    compute = torch.promote_types(x.dtype, torch.float32)
    n, k = packed.shape[0], x.shape[-1]
    q = unpack_int4(packed).to(compute).view(n, -1, group_size)
    w = ((q - zero.to(compute).unsqueeze(-1)) * scale.to(compute).unsqueeze(-1)).flatten(1)[:, :k]
    if compute != torch.float64:
        w = w.to(x.dtype).to(compute)
    return (x.to(compute) @ w.T).to(x.dtype)


# --- 2. Triton kernel --------------------------------------------------------------------------

if _backend.has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _wq_mm_kernel(
        X,  # [M, K] activations (fp32 / bf16 / fp16)
        W,  # int8: [N, K] int8; int4: [N, Kp / 2] uint8, two values per byte
        S,  # int8: [N] scale; int4: [N, Kp / GROUP] scale
        Z,  # int4: [N, Kp / GROUP] zero points (uint8); unused for int8
        OUT,  # [M, N] in X's dtype
        M,
        N,
        K,
        stride_xm,
        stride_xk,
        stride_wn,
        stride_wk,
        stride_sn,
        stride_om,
        INT4: tl.constexpr,
        GROUP: tl.constexpr,
        IEEE: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0).to(tl.int64)
        pid_n = tl.program_id(1).to(tl.int64)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            x = tl.load(
                X + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                mask=m_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            w_mask = k_ok[:, None] & n_ok[None, :]
            if INT4:
                # each byte is read for its two k's; the second read hits L1
                packed = tl.load(
                    W + rn[None, :] * stride_wn + (kk // 2)[:, None] * stride_wk,
                    mask=w_mask,
                    other=0,
                ).to(tl.int32)
                q = ((packed >> ((kk % 2) * 4)[:, None]) & 0xF).to(tl.float32)
                group = k0 // GROUP  # a BLOCK_K tile lies inside one group
                s = tl.load(S + rn * stride_sn + group, mask=n_ok, other=0.0).to(tl.float32)
                z = tl.load(Z + rn * stride_sn + group, mask=n_ok, other=0).to(tl.float32)
                w = ((q - z[None, :]) * s[None, :]).to(X.dtype.element_ty)
            else:
                w = tl.load(
                    W + rn[None, :] * stride_wn + kk[:, None] * stride_wk, mask=w_mask, other=0
                )
                # through fp32: exact for int8, and the interpreter has no int -> bf16 cast
                w = w.to(tl.float32).to(X.dtype.element_ty)
            if UPCAST_DOT:
                # the interpreter's dot misreads 16-bit floats; bf16/fp16 products are exact in
                # fp32, so the fp32 dot of the same rounded operands gives the GPU's result
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            elif IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        if not INT4:
            s = tl.load(S + rn * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
            acc = acc * s[None, :]
        tl.store(
            OUT + rm[:, None] * stride_om + rn[None, :],
            acc.to(OUT.dtype.element_ty),
            mask=m_ok[:, None] & n_ok[None, :],
        )

    @triton.jit
    def _wq_gemv_kernel(
        X,  # [M, K] activations, M <= BLOCK_M
        W,  # int8: [N, K] int8; int4: [N, Kp / 2] uint8, two values per byte
        S,  # int8: [N] scale; int4: [N, Kp / GROUP] scale
        Z,  # int4: [N, Kp / GROUP] zero points (uint8); unused for int8
        OUT,  # PARTIAL: [SPLIT, M, N] fp32 workspace; else [M, N] in X's dtype
        M,
        N,
        K,
        KB,  # int4: bytes per packed row (Kp / 2); unused for int8
        tiles_per_split,  # BLOCK_K tiles of K per split (the last split may have fewer)
        stride_xm,
        stride_xk,
        stride_wn,
        stride_wk,
        stride_sn,
        stride_os,
        stride_om,
        INT4: tl.constexpr,
        GROUP: tl.constexpr,
        PARTIAL: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """One [BLOCK_N] slice of the outputs of all M rows over one K range: the weight tile is
        read once for every row, products summed along K in registers (no MMA: M is tiny)."""
        pid_n = tl.program_id(0).to(tl.int64)
        pid_s = tl.program_id(1).to(tl.int64)
        # everything is built in 3-D, [rows of x, rows of W, k], from the pointers on: the
        # weight load's own (vectorized) layout then carries through the product and the sum,
        # where 2-D tiles broadcast to 3-D would be shuffled through shared memory every tile
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm3 = rm[:, None, None]
        rn3 = rn[None, :, None]
        m_ok3 = rm3 < M
        n_ok3 = rn3 < N
        first = pid_s * tiles_per_split
        tiles = tl.minimum(tiles_per_split, tl.cdiv(K, BLOCK_K) - first)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(0, tiles):
            # offsets built from tile counts, not divided down, so that the compiler sees their
            # alignment and issues 16-byte loads
            k0 = (first + t) * BLOCK_K
            kk3 = (k0 + tl.arange(0, BLOCK_K))[None, None, :]
            x = tl.load(
                X + rm3 * stride_xm + kk3 * stride_xk, mask=m_ok3 & (kk3 < K), other=0.0
            ).to(tl.float32)
            if INT4:
                # byte j of the tile holds k0 + 2j (low nibble) and k0 + 2j + 1 (high); bytes
                # past K but inside the row are the zero padding, and x is 0 there
                kb3 = ((first + t) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2))[None, None, :]
                packed = tl.load(
                    W + rn3 * stride_wn + kb3 * stride_wk, mask=n_ok3 & (kb3 < KB), other=0
                ).to(tl.int32)
                group = k0 // GROUP  # BLOCK_K divides GROUP: the tile lies inside one group
                s = tl.load(S + rn3 * stride_sn + group, mask=n_ok3, other=0.0).to(tl.float32)
                z = tl.load(Z + rn3 * stride_sn + group, mask=n_ok3, other=0).to(tl.float32)
                # dequantized, then rounded to the activation dtype like the tiled kernel's tile
                w_lo = (((packed & 0xF).to(tl.float32) - z) * s).to(X.dtype.element_ty)
                w_hi = (((packed >> 4).to(tl.float32) - z) * s).to(X.dtype.element_ty)
                # x's even and odd k, to meet the two nibbles of each byte
                x_lo, x_hi = tl.split(tl.reshape(x, (BLOCK_M, 1, BLOCK_K // 2, 2)))
                prod = x_lo * w_lo.to(tl.float32) + x_hi * w_hi.to(tl.float32)
            else:
                # int8 -> fp32 is exact; the scale waits until the K sum is done
                w = tl.load(
                    W + rn3 * stride_wn + kk3 * stride_wk, mask=n_ok3 & (kk3 < K), other=0
                ).to(tl.float32)
                prod = x * w
            acc += tl.sum(prod, axis=2)
        rm2 = rm[:, None]
        rn2 = rn[None, :]
        out_mask = (rm2 < M) & (rn2 < N)
        if PARTIAL:
            tl.store(OUT + pid_s * stride_os + rm2 * stride_om + rn2, acc, mask=out_mask)
        else:
            if not INT4:
                s = tl.load(S + rn2 * stride_sn, mask=rn2 < N, other=0.0).to(tl.float32)
                acc = acc * s
            tl.store(OUT + rm2 * stride_om + rn2, acc.to(OUT.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _wq_gemv_reduce_kernel(
        WS,  # [SPLIT, M, N] fp32 partial sums
        S,  # int8: [N] scale; unused for int4
        OUT,  # [M, N] contiguous, X's dtype
        N,
        MN,
        SPLIT,
        stride_sn,
        SCALE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """OUT = sum over the splits in a fixed order (0, 1, ...), times the int8 scale: the
        same bits on every run, unlike atomics."""
        pid = tl.program_id(0).to(tl.int64)
        idx = pid * BLOCK + tl.arange(0, BLOCK)
        ok = idx < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        partial = WS + idx  # int64 offsets; each split is MN further on
        for _ in range(SPLIT):
            acc += tl.load(partial, mask=ok, other=0.0)
            partial += MN
        if SCALE:
            acc = acc * tl.load(S + (idx % N) * stride_sn, mask=ok, other=0.0).to(tl.float32)
        tl.store(OUT + idx, acc.to(OUT.dtype.element_ty), mask=ok)


# --- 3. launcher -------------------------------------------------------------------------------


def _interpreted(x: Tensor) -> bool:
    """Whether this launch runs in Triton's interpreter: CPU tensors reach the Triton path only
    in interpret mode, CUDA tensors always compile for the GPU."""
    return x.device.type == "cpu"


def _blocks(m: int, int4_group: int | None, fp32: bool) -> tuple[int, int, int, int]:
    """BLOCK_M, BLOCK_N, BLOCK_K, num_warps of the tiled kernel (M > GEMV_MAX_M). BLOCK_K
    divides every supported int4 group size. Sized from ptxas's sm_90 reports: 64-wide K
    tiles spill for fp32 x (its dot runs on FMA units, operands in registers), for int4 (the
    dequantized tile) and above 16 rows, so those take 32, and 32- and 64-row tiles take 8
    warps (4 warps spilled kilobytes per thread)."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 32 if m <= 16 else 64
    block_k = 32 if fp32 or int4_group is not None or block_m >= 32 else 64
    return block_m, block_n, block_k, 4 if block_m == 16 else 8


def _launch(x: Tensor, w: Tensor, s: Tensor, z: Tensor | None, n: int, group: int | None) -> Tensor:
    m, k = x.shape
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    if m <= GEMV_MAX_M:
        return _launch_gemv(x, w, s, z, out, group)
    block_m, block_n, block_k, warps = _blocks(m, group, x.dtype == torch.float32)
    cfg = kernel_config(
        "wq_mm",
        {"BLOCK_K": (None, group)} if group is not None else None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
    )
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _wq_mm_kernel[grid](
        x,
        w,
        s,
        z if z is not None else s,
        out,
        m,
        n,
        k,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        s.stride(0),
        out.stride(0),
        INT4=group is not None,
        GROUP=group or 1,
        IEEE=x.dtype == torch.float32,
        UPCAST_DOT=_interpreted(x),
        **cfg,
    )
    return out


# Decode rows (M <= GEMV_MAX_M) take the split-K GEMV; more rows take the tiled tl.dot kernel.
GEMV_MAX_M = 8
# SM count assumed when no CUDA device says (interpret mode): an H100 / H200 SXM.
DEFAULT_SMS = 132
_REDUCE_BLOCK = 1024


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def _gemv_blocks(m: int, int4_group: int | None) -> tuple[int, int, int, int]:
    """BLOCK_M, BLOCK_N, BLOCK_K, num_warps of the GEMV. BLOCK_M holds every row (1, 2, 4 or 8).
    Untuned on a GPU: picked from ptxas's sm_90 reports (no spills; 16-byte weight loads;
    64 to 130 registers per thread for 16-bit x, up to 170 for fp32 x at M = 8) so that a
    program reads 2 to 8 KB of weight per K step:
      int8  BLOCK_K = 256 bytes of a row; 32 rows for M <= 2, 16 rows on 8 warps above (the x
            rows each thread holds grow with M).
      int4  BLOCK_K = min(group, 128) values, inside one group; 4 KB per step for M <= 2,
            then 2 KB (M = 4) and 1 KB (M = 8) on 8 warps."""
    block_m = triton.next_power_of_2(m)
    warps = 4 if block_m <= 2 else 8
    if int4_group is None:
        return block_m, 32 if block_m <= 2 else 16, 256, warps
    block_k = min(int4_group, 128)
    values = 8192 if block_m <= 2 else 4096 if block_m == 4 else 2048
    return block_m, values // block_k, block_k, warps


def _gemv_split(n_blocks: int, k_tiles: int, sms: int) -> int:
    """K splits so that the grid has 2 to 4 programs per SM: the weight read is spread over
    the whole GPU even when N alone gives few blocks (N = 4096 and BLOCK_N = 32 is 128
    programs, under one per SM of an H100). Never more splits than BLOCK_K tiles of K."""
    if n_blocks >= 2 * sms:
        return 1
    return max(1, min(k_tiles, (4 * sms) // n_blocks))


class _GemvPlan(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    n_blocks: int
    split_k: int  # grid = (n_blocks, split_k)
    tiles_per_split: int  # BLOCK_K tiles of K per split; the last split may have fewer


def _gemv_plan(m: int, n: int, k: int, int4_group: int | None, sms: int) -> _GemvPlan:
    """Blocks and grid of the split-K GEMV for x [m, k] @ w [n, k].T on a GPU with `sms` SMs
    (blocks and warps from kernel_config("wq_gemv"): the heuristic's, or an override)."""
    block_m, block_n, block_k, warps = _gemv_blocks(m, int4_group)
    limits = {"BLOCK_M": (m, None)}
    if int4_group is not None:
        limits["BLOCK_K"] = (None, int4_group)
    cfg = kernel_config(
        "wq_gemv", limits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps
    )
    block_m, block_n, block_k, warps = (
        cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps")
    )
    n_blocks = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    split_k = max(1, min(_gemv_split(n_blocks, k_tiles, sms), k_tiles))
    tiles_per_split = triton.cdiv(k_tiles, split_k)
    split_k = triton.cdiv(k_tiles, tiles_per_split)  # every split gets at least one tile
    return _GemvPlan(block_m, block_n, block_k, warps, n_blocks, split_k, tiles_per_split)


def _launch_gemv(
    x: Tensor, w: Tensor, s: Tensor, z: Tensor | None, out: Tensor, group: int | None
) -> Tensor:
    """Split-K GEMV into `out` [M, N] (M <= GEMV_MAX_M, K > 0). One split: the kernel writes
    `out` itself. Several: fp32 partials [SPLIT, M, N], then a fixed-order sum (no atomics, so
    the result is deterministic). No host synchronization: CUDA-graph capturable."""
    m, k = x.shape
    n = out.shape[1]
    plan = _gemv_plan(m, n, k, group, _sm_count(x.device))
    block_m, block_n, block_k, warps, n_blocks, split_k, tiles_per_split = plan
    partial = split_k > 1
    dest = torch.empty((split_k, m, n), device=x.device, dtype=torch.float32) if partial else out
    _wq_gemv_kernel[(n_blocks, split_k)](
        x,
        w,
        s,
        z if z is not None else s,
        dest,
        m,
        n,
        k,
        w.shape[1],
        tiles_per_split,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        s.stride(0),
        m * n,
        n,
        INT4=group is not None,
        GROUP=group or 1,
        PARTIAL=partial,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
    )
    if partial:
        reduce = kernel_config("wq_gemv_reduce", BLOCK=_REDUCE_BLOCK, num_warps=4)
        _wq_gemv_reduce_kernel[(triton.cdiv(m * n, reduce["BLOCK"]),)](
            dest,
            s,
            out,
            n,
            m * n,
            split_k,
            s.stride(0),
            SCALE=group is None,
            **reduce,
        )
    return out


# --- 4. torch.library ops ----------------------------------------------------------------------


@torch.library.custom_op("perfml::w8a16_mm", mutates_args=())
def _w8a16_mm_op(x: Tensor, w_q: Tensor, scale: Tensor) -> Tensor:
    if _backend.select("w8a16_mm", x.device) == "triton":
        return _launch(x, w_q, scale.contiguous(), None, w_q.shape[0], None)
    return w8a16_mm_ref(x, w_q, scale)


@_w8a16_mm_op.register_fake
def _(x: Tensor, w_q: Tensor, scale: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], w_q.shape[0]))


@torch.library.custom_op("perfml::w4a16_mm", mutates_args=())
def _w4a16_mm_op(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    if _backend.select("w4a16_mm", x.device) == "triton":
        return _launch(
            x, packed, scale.contiguous(), zero.contiguous(), packed.shape[0], group_size
        )
    return w4a16_mm_ref(x, packed, scale, zero, group_size)


@_w4a16_mm_op.register_fake
def _(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    return x.new_empty((x.shape[0], packed.shape[0]))


# --- 5. public functions -----------------------------------------------------------------------


def _check(x: Tensor, w: Tensor, scale: Tensor, k_ok: bool, what: str) -> Tensor:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{what}: x must be fp32, bf16 or fp16, got {x.dtype}")
    if x.device != w.device or x.device != scale.device:
        raise ValueError(
            f"{what}: x ({x.device}), the weight ({w.device}) and scale ({scale.device}) must "
            "be on one device"
        )
    if not k_ok:
        raise ValueError(
            f"{what}: x's last dim {x.shape[-1]} does not match the weight's in_features"
        )
    return x.reshape(-1, x.shape[-1])


def w8a16_mm(x: Tensor, w_q: Tensor, scale: Tensor) -> Tensor:
    """x [..., K] @ (w_q [N, K] int8 * scale [N]).T -> [..., N] in x.dtype."""
    if w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise TypeError(f"w8a16_mm: w_q must be a 2-D int8 tensor, got {w_q.dtype} {w_q.dim()}-D")
    x2 = _check(x, w_q, scale, x.shape[-1] == w_q.shape[1], "w8a16_mm")
    return _w8a16_mm_op(x2, w_q, scale).view(*x.shape[:-1], w_q.shape[0])


def w4a16_mm(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """x [..., K] @ dequant(packed [N, Kp/2] uint8, scale/zero [N, Kp/group]).T -> [..., N]."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"w4a16_mm: packed must be a 2-D uint8 tensor, got {packed.dtype}")
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"w4a16_mm: group_size must be a power of two >= 16, got {group_size}")
    kp = packed.shape[1] * 2
    if kp % group_size:
        raise ValueError(
            f"w4a16_mm: packed holds {kp} values per row, not a multiple of group_size "
            f"{group_size} (K is padded up to whole groups)"
        )
    k = x.shape[-1]
    x2 = _check(x, packed, scale, k <= kp < k + group_size, "w4a16_mm")
    return _w4a16_mm_op(x2, packed, scale, zero, group_size).view(*x.shape[:-1], packed.shape[0])
