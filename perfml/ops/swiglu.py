"""Gated activations of a transformer MLP: swiglu = silu(gate) * up, geglu = gelu(gate) * up.

Both run through the same elementwise kernels, picked by a constexpr ACTIVATION flag. The math is
fp32 (fp64 inputs take the exact reference); the result is rounded once to the input dtype, where
eager `F.silu(gate) * up` in bf16 rounds twice.

Memory: the forward saves only its inputs (gate and up, which the caller holds anyway) and the
backward recomputes the activation from gate: no activation tensor is stored. The backward reads
gate, up and dy once and writes dgate and dup:
  default                 into new buffers. Safe for any caller; fwd+bwd allocates y, dgate, dup.
  inplace_backward=True   into gate's and up's own storage (Liger's trick), so fwd+bwd allocates
                          only y. The caller promises that nothing reads gate or up after the
                          forward: true of fresh Linear outputs (perfml.nn.SwiGLUMLP uses it),
                          false of anything the caller keeps. Other autograd nodes that saved gate
                          or up are protected by autograd's version counter (they raise instead of
                          reading gradients). It falls back to new buffers when gate or up is not
                          contiguous or both share one storage (a chunked [.., 2I] projection),
                          where overwriting would be unsafe or save nothing.

Layout: contiguous tensors are treated as one flat row (a 1-D grid over all elements); others as
[M, N] rows with a unit last-dim stride and any row stride, so chunked views are read in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from perfml import _backend
from perfml._kernel_config import kernel_config

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
GELU_APPROXIMATIONS = {"none": "gelu", "tanh": "gelu_tanh"}
_BLOCK = 4096  # elements per program: 16 per thread at 8 warps, bf16 loads 2x16 bytes each


# --- 1. reference ----------------------------------------------------------------------------


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _activation_ref(g: Tensor, activation: int) -> Tensor:
    if activation == ACTIVATIONS["silu"]:
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if activation == ACTIVATIONS["gelu_tanh"] else "none")


def _glu_ref(gate: Tensor, up: Tensor, activation: int) -> Tensor:
    compute = _compute_dtype(gate)
    return (_activation_ref(gate.to(compute), activation) * up.to(compute)).to(gate.dtype)


def swiglu_ref(gate: Tensor, up: Tensor) -> Tensor:
    """Plain-PyTorch silu(gate) * up in fp32 (fp64 for fp64 inputs), rounded once to the input
    dtype: the definition of correct."""
    return _glu_ref(gate, up, ACTIVATIONS["silu"])


def geglu_ref(gate: Tensor, up: Tensor, approximate: str = "tanh") -> Tensor:
    """Plain-PyTorch gelu(gate, approximate) * up in fp32, rounded once to the input dtype."""
    return _glu_ref(gate, up, ACTIVATIONS[GELU_APPROXIMATIONS[approximate]])


def _glu_bwd_ref(dy: Tensor, gate: Tensor, up: Tensor, activation: int) -> tuple[Tensor, Tensor]:
    # ATen's own activation backward kernels: autograd is off inside a custom op's body.
    compute = _compute_dtype(gate)
    g, u, dyf = gate.to(compute), up.to(compute), dy.to(compute)
    if activation == ACTIVATIONS["silu"]:
        dgate = torch.ops.aten.silu_backward(dyf * u, g)
    else:
        approximate = "tanh" if activation == ACTIVATIONS["gelu_tanh"] else "none"
        dgate = torch.ops.aten.gelu_backward(dyf * u, g, approximate=approximate)
    dup = dyf * _activation_ref(g, activation)
    return dgate.to(gate.dtype), dup.to(up.dtype)


def _glu_aten(gate: Tensor, up: Tensor, activation: int) -> Tensor:
    """The CPU path without a C++ kernel: eager's composite, autograd by ATen (it saves the
    activation instead of recomputing it). bf16/fp16 gate is upcast so that the product is fp32
    (up is promoted inside the multiply) and the result is rounded once, as the kernels do."""
    g = gate.float() if gate.dtype != torch.float32 else gate
    return (_activation_ref(g, activation) * up).to(gate.dtype)


# --- 2. Triton kernels -----------------------------------------------------------------------

if _backend.has_triton():
    import triton
    import triton.language as tl

    _SQRT_HALF = tl.constexpr(0.7071067811865476)
    _INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
    _SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
    _GELU_CUBIC = tl.constexpr(0.044715)

    @triton.jit
    def _act_and_grad(g, ACTIVATION: tl.constexpr):
        """(act(g), d act / d g) in fp32."""
        if ACTIVATION == 0:  # silu
            s = tl.sigmoid(g)
            act = g * s
            dact = s * (1.0 + g * (1.0 - s))
        elif ACTIVATION == 1:  # exact gelu: g * Phi(g)
            cdf = 0.5 * (1.0 + tl.erf(g * _SQRT_HALF))
            act = g * cdf
            dact = cdf + g * _INV_SQRT_2PI * tl.exp(-0.5 * g * g)
        else:
            # tanh gelu: 0.5 g (1 + tanh(u)) == g * sigmoid(2u). The sigmoid form needs no tanh
            # (absent from triton.language) and 1 - tanh(u)^2 == 4 s (1 - s) does not cancel.
            inner = _SQRT_2_OVER_PI * (g + _GELU_CUBIC * g * g * g)
            s = tl.sigmoid(2.0 * inner)
            act = g * s
            dinner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * g * g)
            dact = s + g * 2.0 * s * (1.0 - s) * dinner
        return act, dact

    @triton.jit
    def _tile(pid, M, N, col_blocks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's rows, columns (int64) and mask in the [M, N] view."""
        pid_m = pid // col_blocks
        pid_n = pid - pid_m * col_blocks
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        return rows[:, None], cols[None, :], mask

    @triton.jit
    def _glu_fwd_kernel(
        G,  # [M, N] gate (unit column stride)
        U,  # [M, N] up
        Y,  # [M, N] act(gate) * up
        M,
        N,
        g_row_stride,
        u_row_stride,
        y_row_stride,
        col_blocks,  # programs per row of tiles: cdiv(N, BLOCK_N)
        ACTIVATION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows, cols, mask = _tile(pid, M, N, col_blocks, BLOCK_M, BLOCK_N)
        g = tl.load(G + rows * g_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + rows * u_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        act, _ = _act_and_grad(g, ACTIVATION)
        tl.store(Y + rows * y_row_stride + cols, (act * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _glu_bwd_kernel(
        DY,  # [M, N] gradient of the output
        G,  # [M, N] gate from the forward
        U,  # [M, N] up from the forward
        DG,  # [M, N] gradient of gate (may be G itself: each element is read before written)
        DU,  # [M, N] gradient of up (may be U itself)
        M,
        N,
        dy_row_stride,
        g_row_stride,
        u_row_stride,
        dg_row_stride,
        du_row_stride,
        col_blocks,
        ACTIVATION: tl.constexpr,
        NEED_DG: tl.constexpr,
        NEED_DU: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows, cols, mask = _tile(pid, M, N, col_blocks, BLOCK_M, BLOCK_N)
        dy = tl.load(DY + rows * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + rows * g_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        act, dact = _act_and_grad(g, ACTIVATION)
        if NEED_DG:
            u = tl.load(U + rows * u_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
            dg = dy * u * dact
            tl.store(DG + rows * dg_row_stride + cols, dg.to(DG.dtype.element_ty), mask=mask)
        if NEED_DU:
            du = dy * act
            tl.store(DU + rows * du_row_stride + cols, du.to(DU.dtype.element_ty), mask=mask)


# --- 3. launchers ----------------------------------------------------------------------------


def _views(*tensors: Tensor) -> tuple[list[Tensor], int, int]:
    """2-D views [M, N] of same-shaped tensors, each with a unit column stride.

    All contiguous: one flat row [1, numel], so the whole tensor is one elementwise sweep.
    Otherwise rows of the last dim, read through their row strides (a view when the strides
    allow it, e.g. the halves of a chunked projection; a contiguous copy when they do not).
    """
    shape = tensors[0].shape
    numel = tensors[0].numel()
    if all(t.is_contiguous() for t in tensors):
        return [t.view(1, numel) for t in tensors], 1, numel
    n = shape[-1] if len(shape) else 1
    views = []
    for t in tensors:
        t2 = t.reshape(-1, n)
        views.append(t2 if t2.stride(-1) == 1 or n == 1 else t2.contiguous())
    return views, views[0].shape[0], n


def _launch_config(m: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, programs, col_blocks): tiles of about _BLOCK elements."""
    block_n = min(triton.next_power_of_2(n), _BLOCK)
    block_m = max(1, min(_BLOCK // block_n, triton.next_power_of_2(m)))
    col_blocks = triton.cdiv(n, block_n)
    return block_m, block_n, triton.cdiv(m, block_m) * col_blocks, col_blocks


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _tuned_launch(name: str, m: int, n: int) -> tuple[dict, int, int]:
    """(launch config after any override, programs, col_blocks) of kernel `name`."""
    block_m, block_n, _, _ = _launch_config(m, n)
    cfg = kernel_config(
        name, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_num_warps(block_m * block_n)
    )
    col_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    return cfg, triton.cdiv(m, cfg["BLOCK_M"]) * col_blocks, col_blocks


def _glu_fwd_triton(gate: Tensor, up: Tensor, activation: int) -> Tensor:
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if y.numel() == 0:
        return y
    (g2, u2, y2), m, n = _views(gate, up, y)
    cfg, programs, col_blocks = _tuned_launch("glu_fwd", m, n)
    _glu_fwd_kernel[(programs,)](
        g2,
        u2,
        y2,
        m,
        n,
        g2.stride(0),
        u2.stride(0),
        y2.stride(0),
        col_blocks,
        ACTIVATION=activation,
        **cfg,
    )
    return y


def _glu_bwd_triton(
    dy: Tensor,
    gate: Tensor,
    up: Tensor,
    dgate: Tensor,
    dup: Tensor,
    activation: int,
    need_dgate: bool,
    need_dup: bool,
) -> None:
    """Writes into dgate / dup, which may be gate / up themselves (same layout, so each element
    is read and written by the same program)."""
    if gate.numel() == 0 or not (need_dgate or need_dup):
        return
    (dy2, g2, u2, dg2, du2), m, n = _views(dy, gate, up, dgate, dup)
    cfg, programs, col_blocks = _tuned_launch("glu_bwd", m, n)
    _glu_bwd_kernel[(programs,)](
        dy2,
        g2,
        u2,
        dg2,
        du2,
        m,
        n,
        dy2.stride(0),
        g2.stride(0),
        u2.stride(0),
        dg2.stride(0),
        du2.stride(0),
        col_blocks,
        ACTIVATION=activation,
        NEED_DG=need_dgate,
        NEED_DU=need_dup,
        **cfg,
    )


# --- 4. torch.library registration -----------------------------------------------------------


@torch.library.custom_op("perfml::glu_fwd", mutates_args=())
def _glu_fwd_op(gate: Tensor, up: Tensor, activation: int, inplace_backward: bool) -> Tensor:
    if _backend.select("swiglu", gate.device) == "triton":
        return _glu_fwd_triton(gate, up, activation)
    return _glu_ref(gate, up, activation).contiguous()


@_glu_fwd_op.register_fake
def _(gate, up, activation, inplace_backward):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@torch.library.custom_op("perfml::glu_bwd", mutates_args=())
def _glu_bwd_op(
    dy: Tensor, gate: Tensor, up: Tensor, activation: int, need_dgate: bool, need_dup: bool
) -> tuple[Tensor, Tensor]:
    if _backend.select("swiglu", gate.device) == "triton":
        # A gradient not asked for gets no buffer: its input stands in, and is never written.
        dgate = (
            torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if need_dgate else gate
        )
        dup = torch.empty(up.shape, dtype=up.dtype, device=up.device) if need_dup else up
        _glu_bwd_triton(dy, gate, up, dgate, dup, activation, need_dgate, need_dup)
    else:
        dgate, dup = (t.contiguous() for t in _glu_bwd_ref(dy, gate, up, activation))
    return (dgate if need_dgate else gate.new_empty(0)), (dup if need_dup else up.new_empty(0))


@_glu_bwd_op.register_fake
def _(dy, gate, up, activation, need_dgate, need_dup):
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    return (dgate if need_dgate else gate.new_empty(0)), (dup if need_dup else up.new_empty(0))


@torch.library.custom_op("perfml::glu_bwd_inplace", mutates_args=("gate", "up"))
def _glu_bwd_inplace_op(
    dy: Tensor, gate: Tensor, up: Tensor, activation: int, need_dgate: bool, need_dup: bool
) -> None:
    """Overwrites gate with dgate and up with dup (only those asked for)."""
    if _backend.select("swiglu", gate.device) == "triton":
        _glu_bwd_triton(dy, gate, up, gate, up, activation, need_dgate, need_dup)
        return
    dgate, dup = _glu_bwd_ref(dy, gate, up, activation)
    if need_dgate:
        gate.copy_(dgate)
    if need_dup:
        up.copy_(dup)


@_glu_bwd_inplace_op.register_fake
def _(dy, gate, up, activation, need_dgate, need_dup):
    return None


def _can_overwrite(gate: Tensor, up: Tensor) -> bool:
    """Whether the backward may write dgate / dup over gate / up: each must be contiguous (the
    kernel writes exactly the bytes it read) and the two must not share a storage (halves of
    one chunked projection: the gradient of the whole is a new tensor anyway)."""
    if not (gate.is_contiguous() and up.is_contiguous()):
        return False
    return not torch._C._is_alias_of(gate, up)  # storage identity; also answers for fake tensors


def _setup_context(ctx, inputs, output):
    gate, up, activation, inplace_backward = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation
    ctx.inplace_backward = inplace_backward


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    need_dgate, need_dup = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if ctx.inplace_backward and _can_overwrite(gate, up):
        torch.ops.perfml.glu_bwd_inplace(dy, gate, up, ctx.activation, need_dgate, need_dup)
        # Fresh aliases, not the saved tensors: AccumulateGrad adopts a gradient nothing else
        # holds as a leaf's .grad, and copies one that something does.
        dgate, dup = gate.view_as(gate), up.view_as(up)
    else:
        dgate, dup = torch.ops.perfml.glu_bwd(dy, gate, up, ctx.activation, need_dgate, need_dup)
    return (dgate if need_dgate else None), (dup if need_dup else None), None, None


_glu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --- 5. public API ---------------------------------------------------------------------------


def _check(op: str, gate: Tensor, up: Tensor) -> None:
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(
                f"{op}: {name} must be a floating tensor (fp32/bf16/fp16 run the kernels, fp64 the exact reference), got {t.dtype}"
            )
    if gate.shape != up.shape:
        raise ValueError(
            f"{op}: gate and up must have the same shape, got gate {tuple(gate.shape)} "
            f"and up {tuple(up.shape)}"
        )
    if gate.dtype != up.dtype:
        raise TypeError(
            f"{op}: gate and up must have the same dtype, got {gate.dtype} and {up.dtype}"
        )
    if gate.device != up.device:
        raise ValueError(f"{op}: gate is on {gate.device} but up is on {up.device}")


def _glu(gate: Tensor, up: Tensor, activation: int, inplace_backward: bool) -> Tensor:
    if gate.dtype == torch.float64:  # no kernel computes in fp64: the reference is exact there
        return _glu_ref(gate, up, activation)
    # inplace_backward keeps the custom op on every path: its promise is the memory (no saved
    # activation, gradients written over gate and up), which ATen's autograd cannot keep
    if not inplace_backward and _backend.select("swiglu", gate.device) == "aten":
        return _glu_aten(gate, up, activation)
    return torch.ops.perfml.glu_fwd(gate, up, activation, inplace_backward)


def swiglu(gate: Tensor, up: Tensor, *, inplace_backward: bool = False) -> Tensor:
    """silu(gate) * up, fused and differentiable; gate and up of one shape (any), dtype, device.

    inplace_backward=True lets the backward overwrite gate and up with their gradients, saving
    two activation-sized buffers; use it only when nothing reads gate or up after this call
    (see the module docstring).
    """
    _check("swiglu", gate, up)
    return _glu(gate, up, ACTIVATIONS["silu"], inplace_backward)


def geglu(
    gate: Tensor, up: Tensor, approximate: str = "tanh", *, inplace_backward: bool = False
) -> Tensor:
    """gelu(gate, approximate) * up, fused and differentiable; approximate is "tanh" or "none"
    (torch.nn.functional.gelu's meaning). inplace_backward as in `swiglu`."""
    _check("geglu", gate, up)
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(
            f"geglu: approximate must be one of {sorted(GELU_APPROXIMATIONS)}, got {approximate!r}"
        )
    return _glu(gate, up, ACTIVATIONS[GELU_APPROXIMATIONS[approximate]], inplace_backward)
