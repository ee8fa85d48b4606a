"""Residual add + RMSNorm in one pass: s = x + residual, y = rms_norm(s) * weight ("llama" cast).

The pre-norm block of every Llama-style decoder runs `residual = x + residual` and then normalizes
the new residual. Run separately that is two kernels and an extra round trip of s through memory
(the add writes s, the norm reads it back); fused, the forward reads x and residual once and
writes s and y, and the backward reads dy, ds and s once and writes one gradient, which is both
d_x and d_residual.

Rounding is that of the unfused code, so a swap changes nothing beyond the tolerance policy:
s is x + residual computed in fp32 and rounded once to x.dtype (what `x + residual` does in
torch), the norm reads the rounded s, normalizes in fp32, rounds to x.dtype and multiplies by the
weight (HF LlamaRMSNorm; output dtype promote(x.dtype, weight.dtype)). The forward saves one fp32
rstd per row; dweight is reduced deterministically as in rms_norm (per-program fp32 partial rows,
then one torch.sum, no float atomics).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from perfml import _backend
from perfml._kernel_config import kernel_config
from perfml.ops._launch import bwd_num_warps, bwd_programs, num_warps, rows
from perfml.ops._norm import (
    CASTS,
    MAX_HIDDEN,
    _compute_dtype,
    _out_dtype,
    _rms_norm_bwd_ref,
    _rms_norm_fwd_ref,
)
from perfml.ops.rms_norm import rms_norm, rms_norm_ref

_LLAMA = CASTS["llama"]
_FWD_ONE_TILE_MAX = 16384  # widest row kept in registers in the forward
_BWD_ONE_TILE_MAX = 8192  # the backward holds s, dy, ds, w and the dweight partial
_FWD_TILE_ELEMS = 4096  # short rows are batched up to this many elements per program
_LOOP_BLOCK = 4096


# --- 1. reference ----------------------------------------------------------------------------


def add_rms_norm_ref(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Plain PyTorch: (rms_norm_ref(x + residual, weight, eps, cast="llama"), x + residual)."""
    s = x + residual
    return rms_norm_ref(s, weight, eps, cast="llama"), s


def _add_rms_norm_fwd_ref(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    s = x + residual
    y, rstd = _rms_norm_fwd_ref(s, weight, eps, 0.0, _LLAMA)
    return y, s, rstd


def _add_rms_norm_bwd_ref(
    dy: Tensor, ds: Tensor, s: Tensor, weight: Tensor, rstd: Tensor, needs_dw: bool
) -> tuple[Tensor, Tensor]:
    compute = _compute_dtype(s)
    # rms_norm's backward on s in the compute dtype leaves dx unrounded, so adding ds rounds once
    dx, dw = _rms_norm_bwd_ref(dy, s.to(compute), weight, rstd, 0.0, needs_dw)
    return (dx + ds.to(compute)).to(s.dtype), dw


def _rms_norm_llama_aten(s: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF LlamaRMSNorm as ATen ops (the "llama" cast: fp32 statistics, the normalized s rounded
    to s.dtype, then times the weight), autograd by ATen."""
    sf = s if s.dtype == torch.float32 else s.float()
    h = sf * torch.rsqrt(sf.square().mean(-1, keepdim=True) + eps)
    return weight * h.to(s.dtype)


# --- 2. Triton kernels -----------------------------------------------------------------------

if _backend.has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _add_rms_norm_fwd_kernel(
        X,  # [M, N] input rows (last dim contiguous)
        R,  # [M, N] residual rows, x's dtype
        Y,  # [M, N] normalized output, promote(x.dtype, w.dtype)
        S,  # [M, N] x + residual, x's dtype
        W,  # [N] weight
        RSTD,  # [M] fp32: 1 / sqrt(mean(s**2) + eps), saved for the backward
        x_row_stride,
        r_row_stride,
        y_row_stride,
        s_row_stride,
        M,
        N,
        eps,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ONE_TILE: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        S_DTYPE: tl.constexpr = S.dtype.element_ty
        if ONE_TILE:
            rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
            cols = tl.arange(0, BLOCK_N)
            col_mask = cols < N
            mask = (rows < M) & col_mask[None, :]
            x = tl.load(X + rows * x_row_stride + cols[None, :], mask=mask, other=0.0)
            r = tl.load(R + rows * r_row_stride + cols[None, :], mask=mask, other=0.0)
            s = (x.to(tl.float32) + r.to(tl.float32)).to(S_DTYPE)
            tl.store(S + rows * s_row_stride + cols[None, :], s, mask=mask)
            sf = s.to(tl.float32)
            rstd = tl.rsqrt(tl.sum(sf * sf, axis=1) / N + eps)
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
            y = (sf * rstd[:, None]).to(S_DTYPE).to(tl.float32) * w[None, :]
            tl.store(Y + rows * y_row_stride + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
            tl.store(RSTD + rows, rstd[:, None], mask=rows < M)
        else:  # one row per program (BLOCK_M == 1), in chunks of BLOCK_N
            X += pid * x_row_stride
            R += pid * r_row_stride
            Y += pid * y_row_stride
            S += pid * s_row_stride
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                r = tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
                s = (x + r).to(S_DTYPE)
                tl.store(S + cols, s, mask=mask)
                sf = s.to(tl.float32)
                acc += sf * sf
            rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                # s again from x and residual rather than from S: no read-after-write on memory
                # this program stored through a possibly different thread layout
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                r = tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
                sf = (x + r).to(S_DTYPE).to(tl.float32)
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                y = (sf * rstd).to(S_DTYPE).to(tl.float32) * w
                tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
            tl.store(RSTD + pid, rstd)

    @triton.jit
    def _add_rms_norm_bwd_kernel(
        DY,  # [M, N] gradient of the normalized output
        DS,  # [M, N] gradient of the sum output
        S,  # [M, N] the sum saved by the forward
        W,  # [N] weight
        RSTD,  # [M] fp32 from the forward
        DX,  # [M, N] gradient of s, which is the gradient of x and of residual
        DW_PARTIAL,  # [programs, N] fp32: this program's sum of dy * s * rstd over its rows
        dy_row_stride,
        ds_row_stride,
        s_row_stride,
        dx_row_stride,
        M,
        N,
        rows_per_program,
        COMPUTE_DW: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ONE_TILE: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        row_start = pid * rows_per_program
        DW_PARTIAL += pid * N
        if ONE_TILE:
            cols = tl.arange(0, BLOCK_N)
            mask = cols < N
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for i in range(0, rows_per_program):
                row = row_start + i
                row_mask = mask & (row < M)  # the last program's block may run past M
                s = tl.load(S + row * s_row_stride + cols, mask=row_mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * dy_row_stride + cols, mask=row_mask, other=0.0).to(
                    tl.float32
                )
                ds = tl.load(DS + row * ds_row_stride + cols, mask=row_mask, other=0.0).to(
                    tl.float32
                )
                rstd = tl.load(RSTD + row, mask=row < M, other=0.0)
                wdy = dy * w
                c = tl.sum(wdy * s, axis=0) / N
                dx = (wdy - s * (rstd * rstd * c)) * rstd + ds
                tl.store(DX + row * dx_row_stride + cols, dx.to(DX.dtype.element_ty), mask=row_mask)
                if COMPUTE_DW:
                    dw_acc += dy * s * rstd
            if COMPUTE_DW:
                tl.store(DW_PARTIAL + cols, dw_acc, mask=mask)
        else:  # rows in chunks; the partial rows were zeroed by the launcher
            for i in range(0, rows_per_program):
                row = row_start + i
                rstd = tl.load(RSTD + row, mask=row < M, other=0.0)
                acc = tl.zeros([BLOCK_N], dtype=tl.float32)
                for start in range(0, N, BLOCK_N):
                    cols = start + tl.arange(0, BLOCK_N)
                    mask = (cols < N) & (row < M)
                    s = tl.load(S + row * s_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(
                        tl.float32
                    )
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    acc += dy * w * s
                c = tl.sum(acc, axis=0) / N
                for start in range(0, N, BLOCK_N):
                    cols = start + tl.arange(0, BLOCK_N)
                    mask = (cols < N) & (row < M)
                    s = tl.load(S + row * s_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(
                        tl.float32
                    )
                    ds = tl.load(DS + row * ds_row_stride + cols, mask=mask, other=0.0).to(
                        tl.float32
                    )
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    dx = (dy * w - s * (rstd * rstd * c)) * rstd + ds
                    tl.store(DX + row * dx_row_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
                    if COMPUTE_DW:
                        part = tl.load(DW_PARTIAL + cols, mask=mask, other=0.0)
                        tl.store(DW_PARTIAL + cols, part + dy * s * rstd, mask=mask)


# --- 3. launchers ----------------------------------------------------------------------------


def _add_rms_norm_fwd_triton(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    n = x.shape[-1]
    x2, r2 = rows(x), rows(residual)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=_out_dtype(x, weight, _LLAMA), device=x.device)
    s = torch.empty((m, n), dtype=x.dtype, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m > 0:
        block_n = triton.next_power_of_2(n)
        one_tile = block_n <= _FWD_ONE_TILE_MAX
        block_m = max(1, _FWD_TILE_ELEMS // block_n) if one_tile else 1
        block_n = block_n if one_tile else _LOOP_BLOCK
        cfg = kernel_config(
            "add_rms_norm_fwd",
            {"BLOCK_N": (n, None)} if one_tile else {"BLOCK_M": (1, 1)},
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps(block_m * block_n),
        )  # fmt: skip
        _add_rms_norm_fwd_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
            x2, r2, y, s, weight, rstd,
            x2.stride(0), r2.stride(0), y.stride(0), s.stride(0), m, n, eps,
            ONE_TILE=one_tile, **cfg,
        )  # fmt: skip
    return y.view(x.shape), s.view(x.shape), rstd.view(x.shape[:-1])


def _add_rms_norm_bwd_triton(
    dy: Tensor, ds: Tensor, s: Tensor, weight: Tensor, rstd: Tensor, needs_dw: bool
) -> tuple[Tensor, Tensor]:
    n = s.shape[-1]
    s2, dy2, ds2 = rows(s), rows(dy), rows(ds)
    m = s2.shape[0]
    dx = torch.empty((m, n), dtype=s.dtype, device=s.device)
    if m == 0:
        dw = torch.zeros(n, dtype=weight.dtype, device=s.device) if needs_dw else s.new_empty(0)
        return dx.view(s.shape), dw
    one_tile = triton.next_power_of_2(n) <= _BWD_ONE_TILE_MAX
    block = triton.next_power_of_2(n) if one_tile else _LOOP_BLOCK
    cfg = kernel_config(
        "add_rms_norm_bwd",
        {"BLOCK_N": (n if one_tile else None, None)},
        BLOCK_N=block,
        num_warps=bwd_num_warps(block),
    )
    rows_per_program = math.ceil(m / bwd_programs(m, s.device, cfg["num_warps"]))
    programs = math.ceil(m / rows_per_program)
    # The looped kernel accumulates into the partial rows in memory, so they start at zero.
    alloc = torch.empty if one_tile else torch.zeros
    partial = alloc((programs, n) if needs_dw else (1, 1), dtype=torch.float32, device=s.device)
    _add_rms_norm_bwd_kernel[(programs,)](
        dy2, ds2, s2, weight, rstd.reshape(-1).contiguous(), dx, partial,
        dy2.stride(0), ds2.stride(0), s2.stride(0), dx.stride(0), m, n, rows_per_program,
        COMPUTE_DW=needs_dw, ONE_TILE=one_tile, **cfg,
    )  # fmt: skip
    dw = partial.sum(0).to(weight.dtype) if needs_dw else s.new_empty(0)
    return dx.view(s.shape), dw


# --- 4. torch.library registration -----------------------------------------------------------


@torch.library.custom_op("perfml::add_rms_norm_fwd", mutates_args=())
def _add_rms_norm_fwd_op(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    if _backend.select("add_rms_norm", x.device) == "triton":
        return _add_rms_norm_fwd_triton(x, residual, weight, eps)
    y, s, rstd = _add_rms_norm_fwd_ref(x, residual, weight, eps)
    return y.contiguous(), s.contiguous(), rstd.float()


@_add_rms_norm_fwd_op.register_fake
def _(x, residual, weight, eps):
    y = torch.empty(x.shape, dtype=_out_dtype(x, weight, _LLAMA), device=x.device)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return y, s, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("perfml::add_rms_norm_bwd", mutates_args=())
def _add_rms_norm_bwd_op(
    dy: Tensor, ds: Tensor, s: Tensor, weight: Tensor, rstd: Tensor, needs_dw: bool
) -> tuple[Tensor, Tensor]:
    if _backend.select("add_rms_norm", s.device) == "triton":
        return _add_rms_norm_bwd_triton(dy, ds, s, weight, rstd, needs_dw)
    dx, dw = _add_rms_norm_bwd_ref(dy, ds, s, weight, rstd, needs_dw)
    return dx.contiguous(), dw


@_add_rms_norm_bwd_op.register_fake
def _(dy, ds, s, weight, rstd, needs_dw):
    dx = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    return dx, (weight.new_empty(weight.shape) if needs_dw else s.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, residual, weight, eps = inputs
    ctx.save_for_backward(output[1], weight, output[2])


def _backward(ctx, dy, ds, _drstd):
    s, weight, rstd = ctx.saved_tensors
    needs_dw = ctx.needs_input_grad[2]
    dx, dw = torch.ops.perfml.add_rms_norm_bwd(dy, ds, s, weight, rstd, needs_dw)
    # d(x + residual)/dx = d(x + residual)/dresidual = 1: both get the same gradient. Handing
    # autograd one tensor for both is safe; it never lets two .grad fields share storage.
    dres = dx if ctx.needs_input_grad[1] else None
    return (dx if ctx.needs_input_grad[0] else None), dres, (dw if needs_dw else None), None


_add_rms_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --- 5. public API ---------------------------------------------------------------------------


def _check(x: Tensor, residual: Tensor, weight: Tensor) -> None:
    for name, t in (("x", x), ("residual", residual), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"add_rms_norm: {name} must be a Tensor, got {type(t).__name__}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(
            f"add_rms_norm: x must be a floating tensor (fp32/bf16/fp16 run the kernels, fp64 the exact reference), got {x.dtype}"
        )
    if residual.dtype != x.dtype:
        raise TypeError(
            f"add_rms_norm: residual must have x's dtype {x.dtype}, got {residual.dtype}"
        )
    if residual.shape != x.shape:
        raise ValueError(
            f"add_rms_norm: residual must have x's shape {tuple(x.shape)}, "
            f"got {tuple(residual.shape)}"
        )
    if residual.device != x.device:
        raise ValueError(f"add_rms_norm: x is on {x.device} but residual is on {residual.device}")
    if x.dim() == 0:
        raise ValueError("add_rms_norm: x must have at least one dimension (the hidden size)")
    n = x.shape[-1]
    if n == 0 or n > MAX_HIDDEN:
        raise ValueError(
            f"add_rms_norm: hidden size (x.shape[-1]) must be in 1..{MAX_HIDDEN}, got {n}"
        )
    if weight.shape != (n,):
        raise ValueError(
            f"add_rms_norm: weight must have shape ({n},) to match x.shape[-1], "
            f"got {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"add_rms_norm: weight must be a floating tensor, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"add_rms_norm: x is on {x.device} but weight is on {weight.device}")


def add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual, weight, eps, cast="llama"), x + residual) in one fused pass.

    x and residual: same shape and dtype (any leading dims); both outputs are differentiable.
    The sum is bit-identical to `x + residual`; the norm rounds like HF LlamaRMSNorm.
    """
    _check(x, residual, weight)
    if x.dtype == torch.float64:  # no kernel computes in fp64: the reference is exact there
        return add_rms_norm_ref(x, residual, weight, eps)
    # On CPU the add is one ATen op and the norm the C++ rms_norm kernel when it is built (the
    # sum is written once either way), else an ATen composite; autograd joins the two.
    path = _backend.select("add_rms_norm", x.device, has_cpp=True)
    if path == "cpp":
        s = x + residual
        return rms_norm(s, weight, eps, cast="llama"), s
    if path == "aten":
        s = x + residual
        return _rms_norm_llama_aten(s, weight, eps), s
    y, s, _ = torch.ops.perfml.add_rms_norm_fwd(x, residual, weight.contiguous(), float(eps))
    return y, s
