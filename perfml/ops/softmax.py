"""Softmax over one dimension, any row length: y = exp(x - max(x)) / sum(exp(x - max(x))).

The math is fp32 (fp64 inputs take the exact reference), the output is in x's dtype. The forward
saves y; the backward reads y and dy and writes dx = y * (dy - sum(dy * y)).

Two kernels per direction, chosen by the row length N:
  one tile   rows up to _FWD_ONE_TILE_MAX (forward) / _BWD_ONE_TILE_MAX (backward) elements sit in
             registers: one read and one write per element, the minimum. Short rows are packed
             several to a program so that every program moves a few thousand elements.
  looped     longer rows (no upper limit) take two passes. Pass 1 is an online softmax: a running
             max per row and a per-lane sum of exp(x - max), rescaled whenever the max grows, so
             x is read once to get both. Pass 2 reads x again and writes y. The minimum traffic is
             one read and one write; the second read is kept off HBM by L2 instead:
             - the grid is persistent, _LONG_ROW_CTAS_PER_SM programs per SM each walking over
               rows, so the rows in flight are bounded (an H200, 132 SMs x one 256 KiB bf16 row
               of 131072 elements = 33 MiB, inside its 50 MiB L2);
             - pass 1 loads with evict_last, pass 2 loads and all stores with evict_first, so
               the row waiting for its second read is what L2 keeps;
             - pass 2 walks the row backwards: the tiles read last in pass 1 are re-read first.
             The backward does the same with y and dy (twice the bytes per row, so less of its
             second read hits L2). Rows whose two passes do not fit L2 (fp32 rows of 131072, or
             rows of millions) pay up to 1.5x the minimum traffic; with fewer rows than SMs the
             looped kernel leaves SMs idle (one row is never split across programs).
dim != -1: x is moved so that `dim` is last and made contiguous (one extra read and write of x),
and y is moved back and, when x was contiguous, made contiguous again (another), so such calls
move about 3x the bytes of a softmax over the last dim; the backward likewise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from perfml import _backend
from perfml._kernel_config import kernel_config
from perfml.ops._launch import rows

_FWD_ONE_TILE_MAX = 32768  # widest row kept in registers by the forward
_BWD_ONE_TILE_MAX = 16384  # the backward holds two rows (y and dy)
_ROWS_BLOCK = 4096  # short rows: pack rows until a tile holds about this many elements
_LOOP_BLOCK = 16384  # looped kernels: elements per tile
_LONG_ROW_CTAS_PER_SM = 1  # bounds the rows in flight so their second read hits L2 (see above)
_INTERPRET_PROGRAMS = 3  # interpret mode: few programs, so each walks over several rows


# --- 1. reference ----------------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def softmax_ref(x: Tensor, dim: int = -1) -> Tensor:
    """Plain-PyTorch softmax in fp32 (fp64 for fp64 inputs), rounded once to x.dtype: the
    definition of correct."""
    return torch.softmax(x.to(_compute_dtype(x)), dim).to(x.dtype)


def _softmax_bwd_ref(dy: Tensor, y: Tensor) -> Tensor:
    compute = _compute_dtype(y)
    yf, dyf = y.to(compute), dy.to(compute)
    return (yf * (dyf - (dyf * yf).sum(-1, keepdim=True))).to(y.dtype)


# --- 2. Triton kernels -----------------------------------------------------------------------

if _backend.has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _softmax_fwd_tile_kernel(
        X,  # [M, N] input rows (unit column stride)
        Y,  # [M, N] output
        M,
        N,
        x_row_stride,
        y_row_stride,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        x_ptrs = X + rows[:, None] * x_row_stride + cols[None, :]
        x = tl.load(x_ptrs, mask=mask, other=float("-inf")).to(tl.float32)
        # A row of -inf gives exp(-inf - -inf) = NaN, as torch does.
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        y = e * (1.0 / tl.sum(e, axis=1))[:, None]
        y_ptrs = Y + rows[:, None] * y_row_stride + cols[None, :]
        tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _softmax_fwd_loop_kernel(
        X,  # [M, N] input rows (unit column stride)
        Y,  # [M, N] output
        M,
        N,
        x_row_stride,
        y_row_stride,
        BLOCK_N: tl.constexpr,
    ):
        last_start = ((N - 1) // BLOCK_N) * BLOCK_N
        for row in range(tl.program_id(0), M, tl.num_programs(0)):
            x_row = X + tl.cast(row, tl.int64) * x_row_stride
            y_row = Y + tl.cast(row, tl.int64) * y_row_stride
            # Pass 1: running max m and per-lane sums of exp(x - m), rescaled when m grows.
            m = float("-inf")
            s = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                x = tl.load(
                    x_row + cols, mask=cols < N, other=float("-inf"), eviction_policy="evict_last"
                ).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=0))
                # While the max is -inf (a leading run of -inf) exp(-inf - -inf) would be NaN.
                shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                s = s * tl.exp(m - shift) + tl.exp(x - shift)
                m = m_new
            inv_sum = 1.0 / tl.sum(s, axis=0)
            # Pass 2, last tile first: it is the likeliest still to be in L2.
            for start in range(0, N, BLOCK_N):
                cols = (last_start - start) + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(
                    x_row + cols, mask=mask, other=float("-inf"), eviction_policy="evict_first"
                ).to(tl.float32)
                y = tl.exp(x - m) * inv_sum  # m = -inf only for a row of -inf: NaN, as torch
                tl.store(
                    y_row + cols, y.to(Y.dtype.element_ty), mask=mask, eviction_policy="evict_first"
                )

    @triton.jit
    def _softmax_bwd_tile_kernel(
        DY,  # [M, N] gradient of y
        Y,  # [M, N] the forward's output
        DX,  # [M, N] gradient of x
        M,
        N,
        dy_row_stride,
        y_row_stride,
        dx_row_stride,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        dy = tl.load(DY + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0)
        y = tl.load(Y + rows[:, None] * y_row_stride + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        y = y.to(tl.float32)
        dot = tl.sum(dy * y, axis=1)
        dx = y * (dy - dot[:, None])
        dx_ptrs = DX + rows[:, None] * dx_row_stride + cols[None, :]
        tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _softmax_bwd_loop_kernel(
        DY,  # [M, N] gradient of y
        Y,  # [M, N] the forward's output
        DX,  # [M, N] gradient of x
        M,
        N,
        dy_row_stride,
        y_row_stride,
        dx_row_stride,
        BLOCK_N: tl.constexpr,
    ):
        last_start = ((N - 1) // BLOCK_N) * BLOCK_N
        for row in range(tl.program_id(0), M, tl.num_programs(0)):
            dy_row = DY + tl.cast(row, tl.int64) * dy_row_stride
            y_row = Y + tl.cast(row, tl.int64) * y_row_stride
            dx_row = DX + tl.cast(row, tl.int64) * dx_row_stride
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                dy = tl.load(dy_row + cols, mask=mask, other=0.0, eviction_policy="evict_last")
                y = tl.load(y_row + cols, mask=mask, other=0.0, eviction_policy="evict_last")
                acc += dy.to(tl.float32) * y.to(tl.float32)
            dot = tl.sum(acc, axis=0)
            for start in range(0, N, BLOCK_N):
                cols = (last_start - start) + tl.arange(0, BLOCK_N)
                mask = cols < N
                dy = tl.load(dy_row + cols, mask=mask, other=0.0, eviction_policy="evict_first")
                y = tl.load(y_row + cols, mask=mask, other=0.0, eviction_policy="evict_first")
                y = y.to(tl.float32)
                dx = y * (dy.to(tl.float32) - dot)
                tl.store(
                    dx_row + cols,
                    dx.to(DX.dtype.element_ty),
                    mask=mask,
                    eviction_policy="evict_first",
                )


# --- 3. launchers ----------------------------------------------------------------------------


def _tile_config(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the one-tile kernels."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, _ROWS_BLOCK // block_n)
    tile = block_m * block_n
    num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16 if tile <= 16384 else 32
    return block_m, block_n, num_warps


def _loop_programs(m: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return min(m, sms * _LONG_ROW_CTAS_PER_SM)
    return min(m, _INTERPRET_PROGRAMS)


def _softmax_fwd_triton(x: Tensor) -> Tensor:
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = x.shape[-1]
    x2 = rows(x)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if n <= _FWD_ONE_TILE_MAX:
        block_m, block_n, num_warps = _tile_config(n)
        cfg = kernel_config(
            "softmax_fwd_tile", {"BLOCK_N": (n, None)},
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
        _softmax_fwd_tile_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
            x2, y, m, n, x2.stride(0), y.stride(0), **cfg,
        )  # fmt: skip
    else:
        cfg = kernel_config("softmax_fwd_loop", BLOCK_N=_LOOP_BLOCK, num_warps=32)
        _softmax_fwd_loop_kernel[(_loop_programs(m, x.device),)](
            x2, y, m, n, x2.stride(0), y.stride(0), **cfg
        )
    return y.view(x.shape)


def _softmax_bwd_triton(dy: Tensor, y: Tensor) -> Tensor:
    if y.numel() == 0:
        return torch.empty(y.shape, dtype=y.dtype, device=y.device)
    n = y.shape[-1]
    dy2, y2 = rows(dy), rows(y)
    m = y2.shape[0]
    dx = torch.empty((m, n), dtype=y.dtype, device=y.device)
    if n <= _BWD_ONE_TILE_MAX:
        block_m, block_n, num_warps = _tile_config(n)
        cfg = kernel_config(
            "softmax_bwd_tile", {"BLOCK_N": (n, None)},
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
        _softmax_bwd_tile_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
            dy2, y2, dx, m, n, dy2.stride(0), y2.stride(0), dx.stride(0), **cfg,
        )  # fmt: skip
    else:
        cfg = kernel_config("softmax_bwd_loop", BLOCK_N=_LOOP_BLOCK, num_warps=32)
        _softmax_bwd_loop_kernel[(_loop_programs(m, y.device),)](
            dy2, y2, dx, m, n, dy2.stride(0), y2.stride(0), dx.stride(0), **cfg,
        )  # fmt: skip
    return dx.view(y.shape)


# --- 4. torch.library registration -----------------------------------------------------------


@torch.library.custom_op("perfml::softmax_fwd", mutates_args=())
def _softmax_fwd_op(x: Tensor) -> Tensor:
    """Softmax over the last dim of x."""
    if _backend.select("softmax", x.device) == "triton":
        return _softmax_fwd_triton(x)
    return softmax_ref(x, -1).contiguous()


@_softmax_fwd_op.register_fake
def _(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("perfml::softmax_bwd", mutates_args=())
def _softmax_bwd_op(dy: Tensor, y: Tensor) -> Tensor:
    if _backend.select("softmax", y.device) == "triton":
        return _softmax_bwd_triton(dy, y)
    return _softmax_bwd_ref(dy, y).contiguous()


@_softmax_bwd_op.register_fake
def _(dy, y):
    return torch.empty(y.shape, dtype=y.dtype, device=y.device)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return torch.ops.perfml.softmax_bwd(dy, y)


_softmax_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --- 5. public API ---------------------------------------------------------------------------


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_DTYPE_NAMES = "float32, bfloat16, float16, float64"


def _check(x: Tensor, dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"softmax: x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(
            f"softmax: x must be a floating tensor (fp32/bf16/fp16 run the kernels, fp64 the exact reference), got {x.dtype}"
        )
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"softmax: dim must be an int, got {type(dim).__name__}")
    ndim = max(x.dim(), 1)
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"softmax: dim {dim} is out of range for x with {x.dim()} dimensions "
            f"(expected -{ndim} <= dim < {ndim})"
        )


def softmax(x: Tensor, dim: int = -1, *, dtype: torch.dtype | None = None) -> Tensor:
    """torch.softmax(x, dim, dtype=dtype) computed in fp32 and returned in x.dtype, differentiable.

    `dtype`, as in torch: x is cast to it first and the result has that dtype (one of fp32,
    bf16, fp16, fp64). Any row length. A `dim` other than the last costs a transposing copy each
    way (see the module docstring).
    """
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or dtype not in _DTYPES:
            raise TypeError(f"softmax: dtype must be None or one of {_DTYPE_NAMES}, got {dtype!r}")
        if isinstance(x, Tensor) and x.dtype != dtype:
            x = x.to(dtype)
    _check(x, dim)
    if x.dtype == torch.float64:  # no kernel computes in fp64: the reference is exact there
        return softmax_ref(x, dim)
    if _backend.select("softmax", x.device) == "aten":
        # ATen's softmax: fp32 math for bf16/fp16 (one rounding), any dim without a copy, and
        # its backward is the same y * (dy - sum(dy * y)) as the kernels'
        return torch.softmax(x, dim)
    if x.dim() == 0:
        return torch.ops.perfml.softmax_fwd(x.reshape(1)).reshape(())
    dim = dim % x.dim()
    if dim == x.dim() - 1:
        return torch.ops.perfml.softmax_fwd(x)
    y = torch.ops.perfml.softmax_fwd(x.movedim(dim, -1)).movedim(-1, dim)
    return y.contiguous() if x.is_contiguous() else y
