"""LayerNorm: y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias over the last dimension.

The semantics of torch.nn.functional.layer_norm: statistics and the affine step in fp32, one
rounding to x.dtype at the end; weight and bias are each optional and may have another floating
dtype than x (dweight / dbias come back in their own dtypes).

Forward: rows no wider than one register tile are processed as a [BLOCK_M, BLOCK_N] tile per
program (several short rows per program, so small hidden sizes still move enough bytes per
program), with a two-pass mean / centered variance on the registers: as exact as the reference
and no extra memory traffic. Wider rows (ONE_TILE=False) take three passes over x (mean,
centered variance, output); at those sizes one row is still L2-resident, and the sum / sum of
squares shortcut would lose the variance to cancellation when |mean| >> std.
The forward saves fp32 mean and rstd per row. The backward reads x, dy (and the weight) once,
writes dx, and reduces dweight and dbias deterministically: each program accumulates its block of
rows into private fp32 rows of [programs, N] buffers, then one torch.sum over programs (no float
atomics, so results repeat bit for bit).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from perfml import _backend
from perfml._kernel_config import kernel_config
from perfml.ops._launch import bwd_num_warps, bwd_programs, num_warps, rows
from perfml.ops._norm import MAX_HIDDEN, _compute_dtype

_FWD_ONE_TILE_MAX = 16384  # widest row kept in registers in the forward
_BWD_ONE_TILE_MAX = 8192  # the backward holds x, dy, w and two partial sums: a smaller tile
_FWD_TILE_ELEMS = 4096  # short rows are batched up to this many elements per program
_LOOP_BLOCK = 4096


# --- 1. reference ----------------------------------------------------------------------------


def layer_norm_ref(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """Plain-PyTorch LayerNorm: the definition of correct (fp32 math, or fp64 for fp64 inputs)."""
    return _layer_norm_fwd_ref(x, weight, bias, eps)[0]


def _layer_norm_fwd_ref(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    compute = _compute_dtype(x)
    xf = x.to(compute)
    mean = xf.mean(-1)
    xc = xf - mean.unsqueeze(-1)
    rstd = torch.rsqrt(xc.pow(2).mean(-1) + eps)
    y = xc * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    stats = torch.float64 if compute == torch.float64 else torch.float32
    return y.to(x.dtype), mean.to(stats), rstd.to(stats)


def _layer_norm_bwd_ref(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    needs_dw: bool,
    needs_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    compute = _compute_dtype(x)
    n = x.shape[-1]
    dyf = dy.to(compute)
    r = rstd.to(compute).unsqueeze(-1)
    xhat = (x.to(compute) - mean.to(compute).unsqueeze(-1)) * r
    wdy = dyf * weight.to(compute) if weight is not None else dyf
    c1 = (xhat * wdy).mean(-1, keepdim=True)
    c2 = wdy.mean(-1, keepdim=True)
    dx = ((wdy - xhat * c1 - c2) * r).to(x.dtype)
    # two distinct empties: outputs of a custom op may not alias each other or an input
    dw, db = x.new_empty(0), x.new_empty(0)
    if weight is not None and needs_dw:
        dw = (dyf * xhat).reshape(-1, n).sum(0).to(weight.dtype)
    if bias is not None and needs_db:
        db = dyf.reshape(-1, n).sum(0).to(bias.dtype)
    return dx, dw, db


def _layer_norm_aten(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """The CPU path without a C++ kernel: F.layer_norm in fp32, autograd by ATen. bf16/fp16 x
    are upcast first and the output rounded once: ATen's own reduced-precision CPU kernel
    reduces dweight / dbias with errors several times the tolerance. Parameters go in as fp32
    (an exact upcast); the casts' backwards return each gradient in its own dtype."""

    def f32(p: Tensor | None) -> Tensor | None:
        return p if p is None or p.dtype == torch.float32 else p.float()

    y = torch.nn.functional.layer_norm(f32(x), (x.shape[-1],), f32(weight), f32(bias), eps)
    return y.to(x.dtype)


# --- 2. Triton kernels -----------------------------------------------------------------------

if _backend.has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _layer_norm_fwd_kernel(
        X,  # [M, N] input rows (last dim contiguous)
        Y,  # [M, N] output, x's dtype
        W,  # [N] weight (unused when not HAS_WEIGHT)
        B,  # [N] bias (unused when not HAS_BIAS)
        MEAN,  # [M] fp32, saved for the backward
        RSTD,  # [M] fp32: 1 / sqrt(var + eps), saved for the backward
        x_row_stride,
        y_row_stride,
        M,
        N,
        eps,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ONE_TILE: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        if ONE_TILE:
            rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
            cols = tl.arange(0, BLOCK_N)
            row_mask = rows < M
            col_mask = cols < N
            mask = row_mask[:, None] & col_mask[None, :]
            x_ptrs = X + rows[:, None] * x_row_stride + cols[None, :]
            x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=1) / N
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
            y = xc * rstd[:, None]
            if HAS_WEIGHT:
                y = y * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_BIAS:
                y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            y_ptrs = Y + rows[:, None] * y_row_stride + cols[None, :]
            tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=mask)
            tl.store(MEAN + rows, mean, mask=row_mask)
            tl.store(RSTD + rows, rstd, mask=row_mask)
        else:  # one row per program (BLOCK_M == 1), in chunks of BLOCK_N
            X += pid * x_row_stride
            Y += pid * y_row_stride
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                acc += tl.load(X + cols, mask=cols < N, other=0.0).to(tl.float32)
            mean = tl.sum(acc, axis=0) / N
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                xc = tl.where(mask, x - mean, 0.0)
                acc += xc * xc
            rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                y = (x - mean) * rstd
                if HAS_WEIGHT:
                    y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
            tl.store(MEAN + pid, mean)
            tl.store(RSTD + pid, rstd)

    @triton.jit
    def _layer_norm_bwd_kernel(
        DY,  # [M, N] gradient of the output
        X,  # [M, N] forward input
        W,  # [N] weight (unused when not HAS_WEIGHT)
        MEAN,  # [M] fp32 from the forward
        RSTD,  # [M] fp32 from the forward
        DX,  # [M, N] gradient of x
        DW_PARTIAL,  # [programs, N] fp32: this program's sum of dy * xhat over its rows
        DB_PARTIAL,  # [programs, N] fp32: this program's sum of dy over its rows
        dy_row_stride,
        x_row_stride,
        dx_row_stride,
        M,
        N,
        rows_per_program,
        HAS_WEIGHT: tl.constexpr,
        COMPUTE_DW: tl.constexpr,
        COMPUTE_DB: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ONE_TILE: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        row_start = pid * rows_per_program
        DW_PARTIAL += pid * N
        DB_PARTIAL += pid * N
        if ONE_TILE:
            cols = tl.arange(0, BLOCK_N)
            mask = cols < N
            w = 1.0
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for i in range(0, rows_per_program):
                row = row_start + i
                row_mask = mask & (row < M)  # the last program's block may run past M
                x = tl.load(X + row * x_row_stride + cols, mask=row_mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * dy_row_stride + cols, mask=row_mask, other=0.0).to(
                    tl.float32
                )
                mean = tl.load(MEAN + row, mask=row < M, other=0.0)
                rstd = tl.load(RSTD + row, mask=row < M, other=0.0)
                xhat = tl.where(row_mask, (x - mean) * rstd, 0.0)
                wdy = dy * w
                c1 = tl.sum(xhat * wdy, axis=0) / N
                c2 = tl.sum(wdy, axis=0) / N
                dx = (wdy - (xhat * c1 + c2)) * rstd
                tl.store(DX + row * dx_row_stride + cols, dx.to(DX.dtype.element_ty), mask=row_mask)
                if COMPUTE_DW:
                    dw_acc += dy * xhat
                if COMPUTE_DB:
                    db_acc += dy
            if COMPUTE_DW:
                tl.store(DW_PARTIAL + cols, dw_acc, mask=mask)
            if COMPUTE_DB:
                tl.store(DB_PARTIAL + cols, db_acc, mask=mask)
        else:  # rows in chunks; the partial rows were zeroed by the launcher
            for i in range(0, rows_per_program):
                row = row_start + i
                mean = tl.load(MEAN + row, mask=row < M, other=0.0)
                rstd = tl.load(RSTD + row, mask=row < M, other=0.0)
                acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
                acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
                for start in range(0, N, BLOCK_N):
                    cols = start + tl.arange(0, BLOCK_N)
                    mask = (cols < N) & (row < M)
                    x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(
                        tl.float32
                    )
                    if HAS_WEIGHT:
                        dy = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                    acc1 += xhat * dy
                    acc2 += dy
                c1 = tl.sum(acc1, axis=0) / N
                c2 = tl.sum(acc2, axis=0) / N
                for start in range(0, N, BLOCK_N):
                    cols = start + tl.arange(0, BLOCK_N)
                    mask = (cols < N) & (row < M)
                    x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(
                        tl.float32
                    )
                    wdy = dy
                    if HAS_WEIGHT:
                        wdy = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                    dx = (wdy - (xhat * c1 + c2)) * rstd
                    tl.store(DX + row * dx_row_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
                    if COMPUTE_DW:
                        part = tl.load(DW_PARTIAL + cols, mask=mask, other=0.0)
                        tl.store(DW_PARTIAL + cols, part + dy * xhat, mask=mask)
                    if COMPUTE_DB:
                        part = tl.load(DB_PARTIAL + cols, mask=mask, other=0.0)
                        tl.store(DB_PARTIAL + cols, part + dy, mask=mask)


# --- 3. launchers ----------------------------------------------------------------------------


def _layer_norm_fwd_triton(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    n = x.shape[-1]
    x2 = rows(x)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m > 0:
        block_n = triton.next_power_of_2(n)
        one_tile = block_n <= _FWD_ONE_TILE_MAX
        block_m = max(1, _FWD_TILE_ELEMS // block_n) if one_tile else 1
        block_n = block_n if one_tile else _LOOP_BLOCK
        cfg = kernel_config(
            "layer_norm_fwd",
            {"BLOCK_N": (n, None)} if one_tile else {"BLOCK_M": (1, 1)},
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps(block_m * block_n),
        )  # fmt: skip
        _layer_norm_fwd_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
            x2, y, weight if weight is not None else x2, bias if bias is not None else x2,
            mean, rstd, x2.stride(0), y.stride(0), m, n, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            ONE_TILE=one_tile, **cfg,
        )  # fmt: skip
    stats_shape = x.shape[:-1]
    return y.view(x.shape), mean.view(stats_shape), rstd.view(stats_shape)


def _layer_norm_bwd_triton(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    needs_dw: bool,
    needs_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    n = x.shape[-1]
    x2, dy2 = rows(x), rows(dy)
    m = x2.shape[0]
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    compute_dw = weight is not None and needs_dw
    compute_db = bias is not None and needs_db
    if m == 0:
        dw = torch.zeros(n, dtype=weight.dtype, device=x.device) if compute_dw else x.new_empty(0)
        db = torch.zeros(n, dtype=bias.dtype, device=x.device) if compute_db else x.new_empty(0)
        return dx.view(x.shape), dw, db
    one_tile = triton.next_power_of_2(n) <= _BWD_ONE_TILE_MAX
    block = triton.next_power_of_2(n) if one_tile else _LOOP_BLOCK
    cfg = kernel_config(
        "layer_norm_bwd",
        {"BLOCK_N": (n if one_tile else None, None)},
        BLOCK_N=block,
        num_warps=bwd_num_warps(block),
    )
    rows_per_program = math.ceil(m / bwd_programs(m, x.device, cfg["num_warps"]))
    programs = math.ceil(m / rows_per_program)
    # The looped kernel accumulates into the partial rows in memory, so they start at zero; the
    # one-tile kernel overwrites them whole.
    alloc = torch.empty if one_tile else torch.zeros

    def partial(needed: bool) -> Tensor:
        return alloc((programs, n) if needed else (1, 1), dtype=torch.float32, device=x.device)

    dw_partial, db_partial = partial(compute_dw), partial(compute_db)
    _layer_norm_bwd_kernel[(programs,)](
        dy2, x2, weight if weight is not None else x2,
        mean.reshape(-1).contiguous(), rstd.reshape(-1).contiguous(), dx, dw_partial, db_partial,
        dy2.stride(0), x2.stride(0), dx.stride(0), m, n, rows_per_program,
        HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
        ONE_TILE=one_tile, **cfg,
    )  # fmt: skip
    dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else x.new_empty(0)
    db = db_partial.sum(0).to(bias.dtype) if compute_db else x.new_empty(0)
    return dx.view(x.shape), dw, db


# --- 4. torch.library registration -----------------------------------------------------------


@torch.library.custom_op("perfml::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    if _backend.select("layer_norm", x.device) == "triton":
        return _layer_norm_fwd_triton(x, weight, bias, eps)
    y, mean, rstd = _layer_norm_fwd_ref(x, weight, bias, eps)
    return y.contiguous(), mean.float(), rstd.float()


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, stats.clone()


@torch.library.custom_op("perfml::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    needs_dw: bool,
    needs_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if _backend.select("layer_norm", x.device) == "triton":
        return _layer_norm_bwd_triton(dy, x, weight, bias, mean, rstd, needs_dw, needs_db)
    dx, dw, db = _layer_norm_bwd_ref(dy, x, weight, bias, mean, rstd, needs_dw, needs_db)
    return dx.contiguous(), dw, db


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, bias, mean, rstd, needs_dw, needs_db):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = weight.new_empty(weight.shape) if weight is not None and needs_dw else x.new_empty(0)
    db = bias.new_empty(bias.shape) if bias is not None and needs_db else x.new_empty(0)
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight, bias, output[1], output[2])


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    needs_dw = weight is not None and ctx.needs_input_grad[1]
    needs_db = bias is not None and ctx.needs_input_grad[2]
    dx, dw, db = torch.ops.perfml.layer_norm_bwd(
        dy, x, weight, bias, mean, rstd, needs_dw, needs_db
    )
    return dx, (dw if needs_dw else None), (db if needs_db else None), None


_layer_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --- 5. public API ---------------------------------------------------------------------------


def _check_param(name: str, p: Tensor | None, x: Tensor) -> None:
    if p is None:
        return
    n = x.shape[-1]
    if not isinstance(p, Tensor):
        raise TypeError(f"layer_norm: {name} must be a Tensor or None, got {type(p).__name__}")
    if p.shape != (n,):
        raise ValueError(
            f"layer_norm: {name} must have shape ({n},) to match x.shape[-1], got {tuple(p.shape)}"
        )
    if not p.is_floating_point():
        raise TypeError(f"layer_norm: {name} must be a floating tensor, got {p.dtype}")
    if p.device != x.device:
        raise ValueError(f"layer_norm: x is on {x.device} but {name} is on {p.device}")


def _check(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"layer_norm: x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(
            f"layer_norm: x must be a floating tensor (fp32/bf16/fp16 run the kernels, fp64 the exact reference), got {x.dtype}"
        )
    if x.dim() == 0:
        raise ValueError("layer_norm: x must have at least one dimension (the hidden size)")
    n = x.shape[-1]
    if n == 0 or n > MAX_HIDDEN:
        raise ValueError(
            f"layer_norm: hidden size (x.shape[-1]) must be in 1..{MAX_HIDDEN}, got {n}"
        )
    _check_param("weight", weight, x)
    _check_param("bias", bias, x)


def layer_norm(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """Fused LayerNorm over the last dimension of `x` (any leading dims), differentiable.

    Matches torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps): fp32 math,
    output in x.dtype; weight and bias are each optional.
    """
    _check(x, weight, bias)
    if x.dtype == torch.float64:  # no kernel computes in fp64: the reference is exact there
        return layer_norm_ref(x, weight, bias, eps)
    # rows of one element normalize to exactly 0, but ATen's backward gets its dweight as the
    # difference of two large terms (dy * x * rstd - dy * mean * rstd) and leaves rounding noise
    # of |x| * rstd ulps where the answer is 0; the reference is exact there, and as cheap
    if _backend.select("layer_norm", x.device) == "aten":
        if x.shape[-1] == 1:
            return layer_norm_ref(x, weight, bias, eps)
        return _layer_norm_aten(x, weight, bias, eps)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    return torch.ops.perfml.layer_norm_fwd(x, weight, bias, float(eps))[0]
