"""RMSNorm: y = x / sqrt(mean(x**2) + eps) * (offset + weight), one row of x per program.

Three casting conventions, because the models people run disagree:
  "llama"  normalize in fp32, round to x.dtype, then multiply by the weight (HF LlamaRMSNorm);
           the output dtype is promote(x.dtype, weight.dtype)
  "gemma"  fp32 throughout with (offset + weight), round once at the end (HF Gemma RMSNorm)
  "none"   torch.nn.functional.rms_norm: fp32 throughout, output in x.dtype
The forward saves one fp32 rstd per row; the backward reads x and dy once, writes dx, and reduces
dweight deterministically: each program sums its own block of rows into a private fp32 row of a
[programs, N] buffer, then one torch.sum over programs (no float atomics, so results repeat
bit for bit). Rows longer than one register tile (ONE_TILE=False) take two passes over x.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from perfml import _backend
from perfml._kernel_config import kernel_config
from perfml.ops._launch import bwd_num_warps, bwd_programs, num_warps, rows
from perfml.ops._norm import (
    CASTS,
    MAX_HIDDEN,
    _out_dtype,
    _rms_norm_bwd_ref,
    _rms_norm_fwd_ref,
)

_FWD_ONE_TILE_MAX = 16384  # widest row kept in registers in the forward
_BWD_ONE_TILE_MAX = 8192  # the backward holds x, dy and the dweight partial: a smaller tile
_LOOP_BLOCK = 4096


# --- 1. reference ----------------------------------------------------------------------------


def rms_norm_ref(
    x: Tensor,
    weight: Tensor | None = None,
    eps: float = 1e-6,
    offset: float = 0.0,
    cast: str = "llama",
) -> Tensor:
    """Plain-PyTorch RMSNorm: the definition of correct (fp32 math, or fp64 for fp64 inputs)."""
    return _rms_norm_fwd_ref(x, weight, eps, offset, CASTS[cast])[0]


# --- 2. Triton kernels -----------------------------------------------------------------------

if _backend.has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_scale(
        x, rstd, w, X_DTYPE: tl.constexpr, HAS_WEIGHT: tl.constexpr, CAST: tl.constexpr
    ):
        normed = x * rstd
        if HAS_WEIGHT:
            if CAST == 0:  # llama: round the normalized row to x's dtype before the weight
                normed = normed.to(X_DTYPE).to(tl.float32)
            normed = normed * w
        return normed

    @triton.jit
    def _rms_norm_fwd_kernel(
        X,  # [M, N] input rows (last dim contiguous)
        Y,  # [M, N] output
        W,  # [N] weight (unused when not HAS_WEIGHT)
        RSTD,  # [M] fp32: 1 / sqrt(mean(x**2) + eps), saved for the backward
        x_row_stride,
        y_row_stride,
        N,
        eps,
        offset,
        HAS_WEIGHT: tl.constexpr,
        CAST: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ONE_TILE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        X += row * x_row_stride
        Y += row * y_row_stride
        X_DTYPE: tl.constexpr = X.dtype.element_ty
        if ONE_TILE:
            cols = tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
            w = 0.0
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
            y = _rms_norm_scale(x, rstd, w, X_DTYPE, HAS_WEIGHT, CAST)
            tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
        else:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                x = tl.load(X + cols, mask=cols < N, other=0.0).to(tl.float32)
                acc += x * x
            rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                w = 0.0
                if HAS_WEIGHT:
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
                y = _rms_norm_scale(x, rstd, w, X_DTYPE, HAS_WEIGHT, CAST)
                tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY,  # [M, N] gradient of the output
        X,  # [M, N] forward input
        W,  # [N] weight (unused when not HAS_WEIGHT)
        RSTD,  # [M] fp32 from the forward
        DX,  # [M, N] gradient of x
        DW_PARTIAL,  # [programs, N] fp32: this program's sum of dy * x * rstd over its rows
        dy_row_stride,
        x_row_stride,
        dx_row_stride,
        M,
        N,
        offset,
        rows_per_program,
        HAS_WEIGHT: tl.constexpr,
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
            w = 0.0
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
            dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for i in range(0, rows_per_program):
                row = row_start + i
                row_mask = mask & (row < M)  # the last program's block may run past M
                x = tl.load(X + row * x_row_stride + cols, mask=row_mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * dy_row_stride + cols, mask=row_mask, other=0.0).to(
                    tl.float32
                )
                rstd = tl.load(RSTD + row, mask=row < M, other=0.0)
                wdy = dy
                if HAS_WEIGHT:
                    wdy = dy * w
                c = tl.sum(wdy * x, axis=0) / N
                dx = (wdy - x * (rstd * rstd * c)) * rstd
                tl.store(DX + row * dx_row_stride + cols, dx.to(DX.dtype.element_ty), mask=row_mask)
                if COMPUTE_DW:
                    dw_acc += dy * x * rstd
            if COMPUTE_DW:
                tl.store(DW_PARTIAL + cols, dw_acc, mask=mask)
        else:
            for i in range(0, rows_per_program):
                row = row_start + i
                rstd = tl.load(RSTD + row, mask=row < M, other=0.0)
                acc = tl.zeros([BLOCK_N], dtype=tl.float32)
                for start in range(0, N, BLOCK_N):
                    cols = start + tl.arange(0, BLOCK_N)
                    mask = (cols < N) & (row < M)
                    x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(
                        tl.float32
                    )
                    if HAS_WEIGHT:
                        dy = dy * (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset)
                    acc += dy * x
                c = tl.sum(acc, axis=0) / N
                for start in range(0, N, BLOCK_N):
                    cols = start + tl.arange(0, BLOCK_N)
                    mask = (cols < N) & (row < M)
                    x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(
                        tl.float32
                    )
                    wdy = dy
                    if HAS_WEIGHT:
                        wdy = dy * (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset)
                    dx = (wdy - x * (rstd * rstd * c)) * rstd
                    tl.store(DX + row * dx_row_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
                    if COMPUTE_DW:
                        part = tl.load(DW_PARTIAL + cols, mask=mask, other=0.0)
                        tl.store(DW_PARTIAL + cols, part + dy * x * rstd, mask=mask)


# --- 3. launchers ----------------------------------------------------------------------------


def _rms_norm_fwd_triton(
    x: Tensor, weight: Tensor | None, eps: float, offset: float, cast: int
) -> tuple[Tensor, Tensor]:
    n = x.shape[-1]
    x2 = rows(x)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=_out_dtype(x, weight, cast), device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m > 0:
        one_tile = triton.next_power_of_2(n) <= _FWD_ONE_TILE_MAX
        block = triton.next_power_of_2(n) if one_tile else _LOOP_BLOCK
        cfg = kernel_config(
            "rms_norm_fwd",
            {"BLOCK_N": (n if one_tile else None, None)},
            BLOCK_N=block,
            num_warps=num_warps(block),
        )
        _rms_norm_fwd_kernel[(m,)](
            x2,
            y,
            weight if weight is not None else x2,
            rstd,
            x2.stride(0),
            y.stride(0),
            n,
            eps,
            offset,
            HAS_WEIGHT=weight is not None,
            CAST=cast,
            ONE_TILE=one_tile,
            **cfg,
        )
    return y.view(x.shape), rstd.view(x.shape[:-1])


def _rms_norm_bwd_triton(
    dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, offset: float, needs_dw: bool
) -> tuple[Tensor, Tensor]:
    n = x.shape[-1]
    x2, dy2 = rows(x), rows(dy)
    m = x2.shape[0]
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    compute_dw = weight is not None and needs_dw
    if m == 0:
        dw = torch.zeros(n, dtype=weight.dtype, device=x.device) if compute_dw else x.new_empty(0)
        return dx.view(x.shape), dw
    one_tile = triton.next_power_of_2(n) <= _BWD_ONE_TILE_MAX
    block = triton.next_power_of_2(n) if one_tile else _LOOP_BLOCK
    cfg = kernel_config(
        "rms_norm_bwd",
        {"BLOCK_N": (n if one_tile else None, None)},
        BLOCK_N=block,
        num_warps=bwd_num_warps(block),
    )
    rows_per_program = math.ceil(m / bwd_programs(m, x.device, cfg["num_warps"]))
    programs = math.ceil(m / rows_per_program)
    alloc = torch.empty if one_tile else torch.zeros
    partial = alloc((programs, n) if compute_dw else (1, 1), dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](
        dy2,
        x2,
        weight if weight is not None else x2,
        rstd.reshape(-1).contiguous(),
        dx,
        partial,
        dy2.stride(0),
        x2.stride(0),
        dx.stride(0),
        m,
        n,
        offset,
        rows_per_program,
        HAS_WEIGHT=weight is not None,
        COMPUTE_DW=compute_dw,
        ONE_TILE=one_tile,
        **cfg,
    )
    dw = partial.sum(0).to(weight.dtype) if compute_dw else x.new_empty(0)
    return dx.view(x.shape), dw


def _rms_norm_fwd_cpp(
    x: Tensor, weight: Tensor | None, eps: float, offset: float, cast: int
) -> tuple[Tensor, Tensor]:
    x2 = rows(x).contiguous()
    y, rstd = _backend.extension().rms_norm_fwd(x2, weight, eps, offset, cast)
    return y.view(x.shape), rstd.view(x.shape[:-1])


def _rms_norm_bwd_cpp(
    dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, offset: float, needs_dw: bool
) -> tuple[Tensor, Tensor]:
    x2 = rows(x).contiguous()
    dy2 = rows(dy).contiguous()
    dx, dw = _backend.extension().rms_norm_bwd(
        dy2, x2, weight, rstd.reshape(-1).contiguous(), offset, needs_dw
    )
    return dx.view(x.shape), dw


# --- 4. torch.library registration -----------------------------------------------------------


@torch.library.custom_op("perfml::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(
    x: Tensor, weight: Tensor | None, eps: float, offset: float, cast: int
) -> tuple[Tensor, Tensor]:
    path = _backend.select("rms_norm", x.device, has_cpp=True)
    if path == "triton":
        return _rms_norm_fwd_triton(x, weight, eps, offset, cast)
    if path == "cpp":
        return _rms_norm_fwd_cpp(x, weight, eps, offset, cast)
    y, rstd = _rms_norm_fwd_ref(x, weight, eps, offset, cast)
    return y.contiguous(), rstd.float().contiguous()


@_rms_norm_fwd_op.register_fake
def _(x, weight, eps, offset, cast):
    y = torch.empty(x.shape, dtype=_out_dtype(x, weight, cast), device=x.device)
    return y, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("perfml::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(
    dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, offset: float, needs_dw: bool
) -> tuple[Tensor, Tensor]:
    path = _backend.select("rms_norm", x.device, has_cpp=True)
    if path == "triton":
        return _rms_norm_bwd_triton(dy, x, weight, rstd, offset, needs_dw)
    if path == "cpp":
        return _rms_norm_bwd_cpp(dy, x, weight, rstd, offset, needs_dw)
    dx, dw = _rms_norm_bwd_ref(dy, x, weight, rstd, offset, needs_dw)
    return dx.contiguous(), dw


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd, offset, needs_dw):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if weight is not None and needs_dw:
        return dx, weight.new_empty(weight.shape)
    return dx, x.new_empty(0)


def _setup_context(ctx, inputs, output):
    x, weight, eps, offset, cast = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.offset = offset


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    needs_dw = weight is not None and ctx.needs_input_grad[1]
    dx, dw = torch.ops.perfml.rms_norm_bwd(dy, x, weight, rstd, ctx.offset, needs_dw)
    return dx, (dw if needs_dw else None), None, None, None


_rms_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --- 5. public API ---------------------------------------------------------------------------


def _check(x: Tensor, weight: Tensor | None, offset: float, cast: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"rms_norm: x must be a Tensor, got {type(x).__name__}")
    if cast not in CASTS:
        raise ValueError(f"rms_norm: cast must be one of {sorted(CASTS)}, got {cast!r}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(
            f"rms_norm: x must be a floating tensor (fp32/bf16/fp16 run the kernels, fp64 the exact reference), got {x.dtype}"
        )
    if x.dim() == 0:
        raise ValueError("rms_norm: x must have at least one dimension (the hidden size)")
    n = x.shape[-1]
    if n == 0 or n > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size (x.shape[-1]) must be in 1..{MAX_HIDDEN}, got {n}")
    if weight is None:
        if offset != 0.0:
            raise ValueError("rms_norm: offset needs a weight (offset + weight scales the output)")
        return
    if not isinstance(weight, Tensor):
        raise TypeError(f"rms_norm: weight must be a Tensor or None, got {type(weight).__name__}")
    if weight.shape != (n,):
        raise ValueError(
            f"rms_norm: weight must have shape ({n},) to match x.shape[-1], got {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"rms_norm: weight must be a floating tensor, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: x is on {x.device} but weight is on {weight.device}")


def rms_norm(
    x: Tensor,
    weight: Tensor | None = None,
    eps: float = 1e-6,
    offset: float = 0.0,
    cast: str = "llama",
) -> Tensor:
    """Fused RMSNorm over the last dimension of `x` (any leading dims), differentiable.

    cast="llama" (HF LlamaRMSNorm), "gemma" (HF Gemma RMSNorm, use offset=1.0), or "none"
    (torch.nn.functional.rms_norm). See the module docstring for the exact rounding of each.
    """
    _check(x, weight, offset, cast)
    # the C++ kernel's contract, checked here so that every path refuses the same calls
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < math.inf:
        raise ValueError(f"rms_norm: eps must be a finite number >= 0, got {eps!r}")
    if x.dtype == torch.float64:  # no kernel computes in fp64: the reference is exact there
        return rms_norm_ref(x, weight, eps, offset, cast)
    weight = weight.contiguous() if weight is not None else None
    return torch.ops.perfml.rms_norm_fwd(x, weight, float(eps), float(offset), CASTS[cast])[0]
