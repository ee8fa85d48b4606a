"""Weight-only quantized matmuls: out = x @ dequant(w).T with the dequantization inside the GEMM.

Two weight formats, one Triton kernel (the INT4 constexpr picks the load):
  int8  w_q [N, K] int8, scale [N]: per-output-channel symmetric. The scale does not depend on k,
        so it factors out of the K sum: the kernel accumulates x @ w_q.T in fp32 and multiplies
        by the scale once per output (exact algebra, one multiply per output instead of per
        weight).
  int4  w_q [N, Kp / 2] uint8, two 4-bit values per byte (k even in the low nibble, k odd in the
        high one), scale and zero [N, Kp / group] per group (asymmetric: w = (q - zero) * scale).
        The scale changes along k, so each weight tile is dequantized to the activation dtype
        before tl.dot; BLOCK_K divides the group size so a tile lies inside one group and needs
        one scale/zero per column. Kp is K padded up to a multiple of the group size (the pad
        quantizes to exactly zero and the x loads are masked at K anyway).

Why this shape: decode (M = 1..16) is bound by reading the weight, so the win is reading 1 or 0.5
byte per weight instead of 2, and never writing a dequantized copy to memory. A dedicated
split-K GEMV would fill an H100 better at M = 1 than this tiled kernel with a small BLOCK_M and
narrow BLOCK_N (more programs); that is left as the next step, measured by the bench cases.
The references define the math the kernel follows (fp32 accumulation; int4 tiles rounded to the
activation dtype before the dot) and are the CPU path. Inference only: no autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from perfml import _backend

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


# --- 3. launcher -------------------------------------------------------------------------------


def _blocks(m: int, int4_group: int | None) -> tuple[int, int, int, int]:
    """BLOCK_M, BLOCK_N, BLOCK_K, num_warps. Small M (decode) takes narrow N tiles so more
    programs share the weight read; BLOCK_K divides every supported int4 group size."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 32 if m <= 16 else 64
    block_k = 64 if int4_group is None else min(64, int4_group)
    return block_m, block_n, block_k, 4


def _launch(x: Tensor, w: Tensor, s: Tensor, z: Tensor | None, n: int, group: int | None) -> Tensor:
    m, k = x.shape
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    block_m, block_n, block_k, warps = _blocks(m, group)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
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
        UPCAST_DOT=_backend.interpret_mode(),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
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
    kp = packed.shape[1] * 2
    k = x.shape[-1]
    x2 = _check(x, packed, scale, k <= kp < k + group_size, "w4a16_mm")
    return _w4a16_mm_op(x2, packed, scale, zero, group_size).view(*x.shape[:-1], packed.shape[0])
