"""Cross-entropy over a vocabulary: one pass that yields the loss and the gradient together.

loss_i = (1 - eps) * (lse_i - x_i[t_i]) + eps * (lse_i - mean_j x_ij) + z_loss * lse_i**2
where x = softcap * tanh(s / softcap) when softcap is set (else s), s = logit_scale * logits,
lse_i the logsumexp of row i, t_i its target and eps the label smoothing:
torch.nn.functional.cross_entropy exactly where it is defined (label smoothing, ignore_index, all
three reductions, the all-ignored batch: mean -> nan, sum -> 0), plus z_loss, softcap and
logit_scale (the scaled LM heads: Cohere multiplies the logits by its logit_scale, Granite divides
them by its logits_scaling, i.e. logit_scale = 1 / logits_scaling). The kernel multiplies each
logit by logit_scale as it loads it, and folds the factor into the gradient's per-row scale. Math in fp32 whatever the logits dtype;
the loss comes back in the logits dtype (as F.cross_entropy's does), the gradient too.

The kernel: one program per row. The first loop over the vocab in tiles keeps an online
logsumexp (running max and rescaled sum; with label smoothing also the running sum of the row);
the second loop, in the same launch, re-reads the row in reverse tile order (the tiles read last
are the likeliest still in L2) and writes d(loss)/d(logits) already multiplied by the reduction's
scale (1 / number of non-ignored tokens for "mean", counted on the device). So for "mean" and
"sum" the forward reads the logits and writes the gradient, and the backward only multiplies the
stored gradient by the upstream gradient: a kernel that returns without touching memory when that
is exactly 1.0 (loss.backward()), decided on the device, so no host synchronization anywhere.
Any other upstream value rounds a bf16/fp16 gradient a second time (at most 1 ulp off instead of
0.5; an upstream power of two is exact). reduction="none" has one upstream value per token, known
only in the backward: its forward writes no gradient and its backward runs the same kernel with
those values folded into the per-row scale (one rounding; it re-reads the logits, which the
caller holds anyway).

Memory: the gradient buffer ([N, V], logits dtype) is the only large allocation, made only when
the logits require grad. inplace_backward=True writes the gradient over the logits instead (zero
extra memory). That is unsafe whenever anything reads the logits after the loss (a second loss
term, accuracy logging, a kernel that saved them for its own backward). Autograd's version
counter catches the last case (that backward raises); the others it cannot see. It is refused for
leaf tensors and non-contiguous logits. For "mean" and "sum" the stored gradient is consumed by
the first backward: a second backward through the same graph (retain_graph=True) raises.

Target checks: a target outside [0, V) that is not ignore_index raises ValueError naming the
value on CPU. On CUDA a device-side assertion (torch._assert_async: a few tiny kernels over the
[N] targets, tens of microseconds, no host sync) fails the next synchronizing call with a CUDA
error, and (as with any device-side assert) the CUDA context is unusable afterwards: the process
has to restart. PERFML_CHECKS=0 turns the check off; such a row's loss is then NaN (the kernel
never reads out of bounds).

Shapes: logits [..., V] with target [...] (the class dim is last, as in LM heads; unlike
F.cross_entropy's [N, C, d1, ...]); target int64 or int32 class indices. Class weights and
probability targets are not supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from perfml import _backend
from perfml._kernel_config import kernel_config
from perfml.ops._launch import rows

REDUCTIONS = ("mean", "sum", "none")
_MAX_BLOCK_V = 16384  # vocab tile: 32 fp32 values per thread at 16 warps
_SCALE_BLOCK = 4096
_SCALE_SPAN = 16 * _SCALE_BLOCK  # elements per program of the gradient-scaling kernel


# --- 1. reference ----------------------------------------------------------------------------


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _softcap_ref(x: Tensor, softcap: float | None) -> Tensor:
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def _scaled(x: Tensor, logit_scale: float) -> Tensor:
    return x if logit_scale == 1.0 else x * logit_scale


def _reduce(
    loss_rows: Tensor, count: Tensor, reduction: str, shape: torch.Size, dtype: torch.dtype
) -> Tensor:
    """Per-row losses (0 at ignored rows, compute dtype) -> the reduced loss in `dtype`."""
    if reduction == "none":
        return loss_rows.reshape(shape).to(dtype)
    total = loss_rows.sum()
    if reduction == "sum":
        return total.to(dtype)
    # 0 / 0 = nan for an all-ignored batch, as F.cross_entropy; where() keeps its gradient 0.
    mean = torch.where(count > 0, total / count.clamp(min=1), torch.nan)
    return mean.to(dtype)


def cross_entropy_ref(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> Tensor:
    """Plain-PyTorch cross-entropy (fp32 math, fp64 for fp64 logits): the definition of correct.

    logits [..., V], target [...]; differentiable through autograd. The logits are multiplied by
    logit_scale first (in the compute dtype), then softcapped.
    """
    v = logits.shape[-1]
    x = logits.reshape(-1, v).to(_compute_dtype(logits))
    x = _softcap_ref(_scaled(x, logit_scale), softcap)
    t = target.reshape(-1).long()
    valid = t != ignore_index
    lse = torch.logsumexp(x, dim=-1)
    loss = lse - x.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - x.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    loss = torch.where(valid, loss, 0.0)
    return _reduce(loss, valid.sum(), reduction, target.shape, logits.dtype)


def _cross_entropy_aten(
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
) -> Tensor:
    """The CPU path without a C++ kernel: F.cross_entropy in fp32 (bf16/fp16 logits upcast: in
    their own dtype ATen rounds the log-probabilities, and its gradient is several ulps off),
    logit_scale, softcap and z_loss as extra ATen ops, autograd by ATen."""
    v = logits.shape[-1]
    x = logits.reshape(-1, v)
    x = x if x.dtype == torch.float32 else x.float()
    x = _softcap_ref(_scaled(x, logit_scale), softcap)
    t = target.reshape(-1).long()
    check_targets(t, v, ignore_index, "cross_entropy")
    if not z_loss:
        loss = F.cross_entropy(
            x, t, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
        )
        return (loss.reshape(target.shape) if reduction == "none" else loss).to(logits.dtype)
    valid = t != ignore_index
    loss = F.cross_entropy(
        x, t, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    loss = loss + torch.where(valid, z_loss * torch.logsumexp(x, dim=-1).square(), 0.0)
    return _reduce(loss, valid.sum(), reduction, target.shape, logits.dtype)


def _ce_rows_ref(
    x2: Tensor,
    t: Tensor,
    loss_out: Tensor,
    grad_out: Tensor | None,
    scale: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float = 1.0,
) -> None:
    """The kernel's contract in plain PyTorch: per-row losses into loss_out and, when grad_out is
    given, d(loss_i)/d(logits_i) * scale (one value or one per row) into grad_out (may be x2)."""
    v = x2.shape[1]
    compute = _compute_dtype(x2)
    x = _softcap_ref(_scaled(x2.to(compute), logit_scale), softcap)
    t = t.long()
    valid = t != ignore_index
    in_range = (t >= 0) & (t < v)
    safe_t = torch.where(in_range, t, 0).unsqueeze(1)
    lse = torch.logsumexp(x, dim=-1)
    loss = lse - x.gather(1, safe_t).squeeze(1)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - x.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    loss = torch.where(valid, torch.where(in_range, loss, torch.nan), 0.0)
    loss_out.copy_(loss)
    if grad_out is None:
        return
    # in place where it is safe, so the CPU fallback makes no [N, V] temporaries beyond one
    g = grad_out if grad_out.dtype == compute else torch.empty_like(x)
    torch.sub(x, lse.unsqueeze(1), out=g).exp_()
    if z_loss:
        g.mul_((1 + 2 * z_loss * lse).unsqueeze(1))
    if label_smoothing:
        g.sub_(label_smoothing / v)
    g.scatter_add_(1, safe_t, -(1 - label_smoothing) * in_range.to(compute).unsqueeze(1))
    if softcap is not None:
        g.mul_(1 - (x / softcap).square())
    row_scale = scale.to(compute).expand(t.shape[0]) if scale.numel() == 1 else scale.to(compute)
    g.mul_(torch.where(valid, row_scale * logit_scale, 0.0).unsqueeze(1))
    if g is not grad_out:
        grad_out.copy_(g)


# --- 2. Triton kernels -----------------------------------------------------------------------

if _backend.has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _softcap_tile(x, softcap):
        # softcap * tanh(x / softcap), with tanh from exp(-2|y|) <= 1: no overflow for any x
        y = x / softcap
        e = tl.exp(-2.0 * tl.abs(y))
        th = (1.0 - e) / (1.0 + e)
        return softcap * tl.where(y < 0, -th, th)

    @triton.jit
    def _cross_entropy_fwd_kernel(
        LOGITS,  # [N, V] logits, unit column stride
        GRAD,  # [N, V] d(loss)/d(logits) * scale, may alias LOGITS (unused unless COMPUTE_GRAD)
        TARGET,  # [N] int32 / int64 class indices
        LOSS,  # [N] fp32 per-row loss (0 at ignored rows, NaN at out-of-range targets)
        SCALE,  # fp32 gradient multiplier: SCALE[row * scale_stride]
        logits_row_stride,
        grad_row_stride,
        scale_stride,
        V,
        num_tiles,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,  # every logit is multiplied by it on load (before the softcap)
        HAS_SOFTCAP: tl.constexpr,
        HAS_SMOOTHING: tl.constexpr,
        HAS_Z_LOSS: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        LOGITS += row * logits_row_stride
        GRAD += row * grad_row_stride
        target = tl.load(TARGET + row).to(tl.int64)
        if target == ignore_index:  # no read of the row at all: its gradient is zero
            tl.store(LOSS + row, 0.0)
            if COMPUTE_GRAD:
                zero = tl.zeros([BLOCK_V], dtype=tl.float32).to(GRAD.dtype.element_ty)
                for i in range(0, num_tiles):
                    cols = i * BLOCK_V + tl.arange(0, BLOCK_V)
                    tl.store(GRAD + cols, zero, mask=cols < V)
        else:
            m = float("-inf")  # running max
            d = 0.0  # running sum of exp(x - m)
            row_sum = 0.0  # running sum of x (label smoothing)
            for i in range(0, num_tiles):
                cols = i * BLOCK_V + tl.arange(0, BLOCK_V)
                mask = cols < V
                x = tl.load(LOGITS + cols, mask=mask, other=float("-inf")).to(tl.float32)
                x = x * logit_scale  # logit_scale > 0: the -inf padding stays -inf
                if HAS_SOFTCAP:
                    x = tl.where(mask, _softcap_tile(x, softcap), float("-inf"))
                m_new = tl.maximum(m, tl.max(x, axis=0))
                # a prefix of -inf logits (masked vocab entries) must leave d at 0, not NaN
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
                m = m_new
                if HAS_SMOOTHING:
                    row_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
            lse = m + tl.log(d)
            in_range = (target >= 0) & (target < V)
            x_t = tl.load(LOGITS + target, mask=in_range, other=0.0).to(tl.float32)
            x_t = x_t * logit_scale
            if HAS_SOFTCAP:
                x_t = _softcap_tile(x_t, softcap)
            loss = lse - x_t
            if HAS_SMOOTHING:
                loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - row_sum / V)
            if HAS_Z_LOSS:
                loss += z_loss * lse * lse
            tl.store(LOSS + row, tl.where(in_range, loss, float("nan")))
            if COMPUTE_GRAD:
                # d(scaled logit)/d(logit) = logit_scale, folded into the row's scale
                scale = tl.load(SCALE + row * scale_stride).to(tl.float32) * logit_scale
                coef = scale
                if HAS_Z_LOSS:
                    coef = scale * (1.0 + 2.0 * z_loss * lse)
                hit = (1.0 - label_smoothing) * scale
                smooth = label_smoothing / V * scale
                for j in range(0, num_tiles):
                    cols = (num_tiles - 1 - j) * BLOCK_V + tl.arange(0, BLOCK_V)
                    mask = cols < V
                    x = tl.load(LOGITS + cols, mask=mask, other=0.0).to(tl.float32)
                    x = x * logit_scale
                    if HAS_SOFTCAP:
                        x = _softcap_tile(x, softcap)
                    g = tl.exp(x - lse) * coef
                    if HAS_SMOOTHING:
                        g -= smooth
                    g = tl.where(cols == target, g - hit, g)
                    if HAS_SOFTCAP:
                        c = x / softcap
                        g = g * (1.0 - c * c)
                    tl.store(GRAD + cols, g.to(GRAD.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_span(SRC, DST, start, n, s, SPAN: tl.constexpr, BLOCK: tl.constexpr):
        for off in range(0, SPAN, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < n
            x = tl.load(SRC + idx, mask=mask).to(tl.float32)
            tl.store(DST + idx, (x * s).to(DST.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_kernel(
        SRC,  # [n] contiguous values to scale
        DST,  # [n] result (SRC itself for in place), any float dtype
        SCALE,  # the one multiplier
        n,
        SKIP_UNIT: tl.constexpr,
        SPAN: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # A span of SPAN elements per program keeps the grid small: when the multiplier is 1 each
        # program returns after one scalar load, and the whole launch costs microseconds.
        start = tl.program_id(0).to(tl.int64) * SPAN
        s = tl.load(SCALE).to(tl.float32)
        if SKIP_UNIT:
            if s != 1.0:
                _scale_span(SRC, DST, start, n, s, SPAN, BLOCK)
        else:
            _scale_span(SRC, DST, start, n, s, SPAN, BLOCK)


# --- 3. launchers ----------------------------------------------------------------------------


def _fwd_config(v: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocab of v."""
    block = min(triton.next_power_of_2(v), _MAX_BLOCK_V)
    return block, 4 if block <= 1024 else 8 if block <= 4096 else 16


def _ce_rows_triton(
    x2: Tensor,
    t: Tensor,
    loss_out: Tensor,
    grad_out: Tensor | None,
    scale: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float = 1.0,
) -> None:
    n, v = x2.shape
    if n == 0:
        return
    # The kernel reads target `row` at TARGET + row: a strided view (labels[:, ::2], a column)
    # must be made dense first, or every row past the first reads another row's target.
    t = t.contiguous()
    block, num_warps = _fwd_config(v)
    cfg = kernel_config("cross_entropy_fwd", BLOCK_V=block, num_warps=num_warps)
    grad = grad_out if grad_out is not None else x2
    _cross_entropy_fwd_kernel[(n,)](
        x2,
        grad,
        t,
        loss_out,
        scale,
        x2.stride(0),
        grad.stride(0),
        0 if scale.numel() == 1 else scale.stride(0),
        v,
        triton.cdiv(v, cfg["BLOCK_V"]),
        ignore_index,
        label_smoothing,
        z_loss,
        softcap if softcap is not None else 1.0,
        float(logit_scale),
        HAS_SOFTCAP=softcap is not None,
        HAS_SMOOTHING=label_smoothing != 0.0,
        HAS_Z_LOSS=z_loss != 0.0,
        COMPUTE_GRAD=grad_out is not None,
        **cfg,
    )


def ce_rows(
    x2: Tensor,
    t: Tensor,
    loss_out: Tensor,
    grad_out: Tensor | None,
    scale: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float = 1.0,
    op: str = "cross_entropy",
) -> None:
    """Per-row losses of x2 [N, V] (unit column stride) into loss_out [N] fp32 and, if grad_out
    [N, V] is given (it may be x2 itself), the gradient times `scale` (a 1-element fp32 tensor, or
    [N]) into it. Shared with linear_cross_entropy, which calls it on each chunk of logits."""
    path = _backend.select(op, x2.device)
    impl = {"triton": _ce_rows_triton, "aten": _ce_rows_aten}.get(path, _ce_rows_ref)
    impl(
        x2,
        t,
        loss_out,
        grad_out,
        scale,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
    )


def check_targets(t: Tensor, v: int, ignore_index: int, op: str) -> None:
    """Out-of-range targets: ValueError on CPU; an async device assertion elsewhere."""
    if t.numel() == 0:
        return
    bad = (t != ignore_index) & ((t < 0) | (t >= v))
    if t.device.type != "cpu":
        if _backend.checks_enabled():
            torch._assert_async(
                bad.logical_not().all(),
                f"perfml.{op}: a target is outside [0, {v}) and is not ignore_index "
                f"({ignore_index}); PERFML_CHECKS=0 turns this check off",
            )
        return
    if bad.any():
        value = int(t[bad][0])
        raise ValueError(
            f"{op}: target value {value} is out of range for {v} classes "
            f"(valid: 0..{v - 1}, or ignore_index={ignore_index})"
        )


def grad_scale(t: Tensor, ignore_index: int, reduction: str) -> tuple[Tensor, Tensor]:
    """(gradient multiplier of each non-ignored row, number of non-ignored rows), both on the
    device: 1 / count for "mean" (1 when nothing counts: those gradients are all zero), else 1."""
    count = (t != ignore_index).sum()
    if reduction == "mean":
        return (1.0 / count.clamp(min=1).to(torch.float32)).reshape(1), count
    return torch.ones(1, dtype=torch.float32, device=t.device), count


def _cross_entropy_fwd_impl(
    logits: Tensor,
    target: Tensor,
    grad: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
) -> Tensor:
    x2 = rows(logits)
    t = target.reshape(-1)
    check_targets(t, x2.shape[1], ignore_index, "cross_entropy")
    loss_rows = torch.empty(t.shape[0], dtype=torch.float32, device=logits.device)
    scale, count = grad_scale(t, ignore_index, reduction)
    ce_rows(
        x2, t, loss_rows, grad, scale, ignore_index, label_smoothing, z_loss, softcap, logit_scale
    )
    return _reduce(loss_rows, count, reduction, target.shape, logits.dtype)


def _launch_scale(src: Tensor, dst: Tensor, s: Tensor, skip_unit: bool) -> None:
    n = src.numel()
    cfg = kernel_config(
        "cross_entropy_scale", {"BLOCK": (None, _SCALE_SPAN)}, BLOCK=_SCALE_BLOCK, num_warps=8
    )
    _scale_kernel[(triton.cdiv(n, _SCALE_SPAN),)](
        src, dst, s, n, SKIP_UNIT=skip_unit, SPAN=_SCALE_SPAN, **cfg
    )


def scale_(x: Tensor, s: Tensor) -> None:
    """Contiguous x *= s (one value) in place; skipped on the device when s is exactly 1."""
    if x.numel() == 0:
        return
    if _backend.select("cross_entropy", x.device) == "triton":
        _launch_scale(x, x, s, True)
    else:
        x.copy_(x.to(_compute_dtype(x)) * s.to(_compute_dtype(x)))


def scale_cast(x: Tensor, s: Tensor, dtype: torch.dtype) -> Tensor:
    """A new tensor of `dtype`: contiguous x * s (one value), read once and written once."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if x.numel() == 0:
        return out
    if _backend.select("cross_entropy", x.device) == "triton":
        _launch_scale(x, out, s, False)
    else:
        out.copy_(x.to(_compute_dtype(x)) * s.to(_compute_dtype(x)))
    return out


# --- 4. torch.library registration -----------------------------------------------------------


@torch.library.custom_op("perfml::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd_op(
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    """(loss, gradient of the loss w.r.t. the logits as [N, V], or an empty tensor)."""
    n, v = target.numel(), logits.shape[-1]
    grad = torch.empty((n, v), dtype=logits.dtype, device=logits.device) if compute_grad else None
    loss = _cross_entropy_fwd_impl(
        logits, target, grad, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale
    )
    return loss, grad if grad is not None else logits.new_empty(0)


def _loss_shape(target: Tensor, reduction: str) -> tuple[int, ...]:
    return tuple(target.shape) if reduction == "none" else ()


@_cross_entropy_fwd_op.register_fake
def _(
    logits,
    target,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    logit_scale,
    compute_grad,
):
    loss = logits.new_empty(_loss_shape(target, reduction))
    grad = logits.new_empty((target.numel(), logits.shape[-1]) if compute_grad else (0,))
    return loss, grad


@torch.library.custom_op("perfml::cross_entropy_fwd_inplace", mutates_args=("logits",))
def _cross_entropy_fwd_inplace_op(
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
) -> Tensor:
    """The loss; the gradient w.r.t. the logits overwrites the (contiguous) logits."""
    return _cross_entropy_fwd_impl(
        logits,
        target,
        logits.view(-1, logits.shape[-1]),
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
    )


@_cross_entropy_fwd_inplace_op.register_fake
def _(logits, target, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale):
    return logits.new_empty(_loss_shape(target, reduction))


def _cross_entropy_bwd_none(
    dloss: Tensor,
    logits: Tensor,
    target: Tensor,
    grad: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
) -> None:
    """reduction="none": the gradient recomputed from the logits with each row's upstream
    gradient folded into the kernel's scale (one rounding, where scaling a stored low-precision
    gradient would round twice)."""
    x2, t = rows(logits), target.reshape(-1)
    row_scale = dloss.reshape(-1).to(torch.float32).contiguous()
    loss_rows = torch.empty(t.shape[0], dtype=torch.float32, device=logits.device)
    ce_rows(
        x2,
        t,
        loss_rows,
        grad,
        row_scale,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
    )


@torch.library.custom_op("perfml::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd_op(
    dloss: Tensor,
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
) -> Tensor:
    grad = torch.empty((target.numel(), logits.shape[-1]), dtype=logits.dtype, device=logits.device)
    _cross_entropy_bwd_none(
        dloss, logits, target, grad, ignore_index, label_smoothing, z_loss, softcap, logit_scale
    )
    return grad


@_cross_entropy_bwd_op.register_fake
def _(dloss, logits, target, ignore_index, label_smoothing, z_loss, softcap, logit_scale):
    return logits.new_empty((target.numel(), logits.shape[-1]))


@torch.library.custom_op("perfml::cross_entropy_bwd_inplace", mutates_args=("logits",))
def _cross_entropy_bwd_inplace_op(
    dloss: Tensor,
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
) -> None:
    _cross_entropy_bwd_none(
        dloss,
        logits,
        target,
        logits.view(-1, logits.shape[-1]),
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
    )


@_cross_entropy_bwd_inplace_op.register_fake
def _(dloss, logits, target, ignore_index, label_smoothing, z_loss, softcap, logit_scale):
    return None


@torch.library.custom_op("perfml::loss_grad_scale_", mutates_args=("grad",))
def _loss_grad_scale_op(grad: Tensor, scale: Tensor) -> None:
    """Contiguous grad *= scale (one value), in place; a no-op on the device when it is 1."""
    scale_(grad, scale)


@_loss_grad_scale_op.register_fake
def _(grad, scale):
    return None


@torch.library.custom_op("perfml::loss_grad_scale_cast", mutates_args=())
def _loss_grad_scale_cast_op(grad: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """grad * scale (one value) as a new tensor of `dtype`: fp32 accumulators -> parameter dtype."""
    return scale_cast(grad, scale, dtype)


@_loss_grad_scale_cast_op.register_fake
def _(grad, scale, dtype):
    return torch.empty(grad.shape, dtype=dtype, device=grad.device)


def _setup_context(ctx, inputs, output):
    logits, target, ignore_index, reduction, *options, compute_grad = inputs
    ctx.reduction = reduction
    ctx.options = (ignore_index, *options)  # label_smoothing, z_loss, softcap, logit_scale
    ctx.logits_shape = logits.shape
    ctx.recompute = reduction == "none" or not compute_grad
    if ctx.recompute:
        ctx.save_for_backward(logits, target)
    else:  # only the gradient: the logits can be freed right after the forward
        ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    # The stored gradient is an output autograd would otherwise feed a [N, V] zeros tensor into
    # the backward as "its" gradient: an allocation and a memset the size of the logits.
    ctx.set_materialize_grads(False)


def row_upstream(dloss: Tensor, target: Tensor, reduction: str, ignore_index: int) -> Tensor:
    """The upstream gradient of each token's loss, for a scalar loss whose forward stored no
    gradient (the op called with compute_grad=False on logits that require grad)."""
    rows = dloss.float().expand(target.numel())
    if reduction == "mean":
        rows = rows / (target != ignore_index).sum().clamp(min=1)
    return rows


def _backward(ctx, dloss, _dgrad):
    if dloss is None:  # the loss took no part in what was differentiated
        return (None,) * 9
    if ctx.recompute:
        logits, target = ctx.saved_tensors
        if ctx.reduction != "none":
            dloss = row_upstream(dloss, target, ctx.reduction, ctx.options[0])
        grad = torch.ops.perfml.cross_entropy_bwd(dloss, logits, target, *ctx.options)
    else:
        (grad,) = ctx.saved_tensors
        torch.ops.perfml.loss_grad_scale_(grad, dloss)
    return grad.view(ctx.logits_shape), *([None] * 8)


_cross_entropy_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _CrossEntropyInplace(torch.autograd.Function):
    """inplace_backward=True: the gradient is written over the logits (by the forward for "mean"
    and "sum", by the backward for "none") and the logits' own storage is handed back as their
    gradient."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction, *options):
        # options: label_smoothing, z_loss, softcap, logit_scale
        ctx.reduction = reduction
        ctx.options = (ignore_index, *options)
        if reduction == "none":
            ctx.save_for_backward(logits, target)
            return torch.ops.perfml.cross_entropy_fwd(
                logits, target, ignore_index, reduction, *options, False
            )[0]
        loss = torch.ops.perfml.cross_entropy_fwd_inplace(
            logits, target, ignore_index, reduction, *options
        )
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        if ctx.reduction == "none":
            logits, target = ctx.saved_tensors
            torch.ops.perfml.cross_entropy_bwd_inplace(dloss, logits, target, *ctx.options)
        else:
            (logits,) = ctx.saved_tensors
            torch.ops.perfml.loss_grad_scale_(logits, dloss)
        return logits, *([None] * 7)


# --- 5. public API ---------------------------------------------------------------------------


def check_options(
    op: str,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float = 1.0,
) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not 0.0 <= z_loss < float("inf"):
        raise ValueError(f"{op}: z_loss must be finite and >= 0, got {z_loss}")
    if softcap is not None and not 0.0 < softcap < float("inf"):
        raise ValueError(f"{op}: softcap must be None or a finite value > 0, got {softcap}")
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
        raise TypeError(f"{op}: logit_scale must be a float, got {type(logit_scale).__name__}")
    if not 0.0 < logit_scale < float("inf"):
        raise ValueError(f"{op}: logit_scale must be finite and > 0, got {logit_scale}")


def check_target(
    op: str, target: Tensor, batch_shape: torch.Size, batch_name: str, device: torch.device
) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"{op}: target must be a Tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"{op}: target must hold class indices as int64 or int32, got {target.dtype} "
            "(probability targets are not supported)"
        )
    if target.shape != batch_shape:
        raise ValueError(
            f"{op}: target must have shape {tuple(batch_shape)} ({batch_name}), "
            f"got {tuple(target.shape)}"
        )
    if target.device != device:
        raise ValueError(
            f"{op}: {batch_name.split('.')[0]} is on {device} but target is on {target.device}"
        )


def _check(logits: Tensor, target: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"cross_entropy: logits must be a Tensor, got {type(logits).__name__}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(
            f"cross_entropy: logits must be a floating tensor (fp32/bf16/fp16 run the kernels, fp64 the exact reference), got {logits.dtype}"
        )
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(
            f"cross_entropy: logits must be [..., V] with V >= 1 classes, got {tuple(logits.shape)}"
        )
    check_target("cross_entropy", target, logits.shape[:-1], "logits.shape[:-1]", logits.device)


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    inplace_backward: bool = False,
) -> Tensor:
    """Fused cross-entropy of logits [..., V] against class indices target [...] (int64/int32).

    Same result as F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), ...) for the
    options it has; z_loss adds z_loss * logsumexp**2 per non-ignored token, softcap replaces the
    logits by softcap * tanh(logits / softcap) first. logit_scale (finite, > 0) multiplies the
    logits before everything else, softcap included: cross_entropy(x * s, t) without the [N, V]
    product (Cohere: its logit_scale; Granite: 1 / logits_scaling). reduction "none" returns target's shape
    (0 at ignored tokens). inplace_backward=True writes the gradient over the logits (see the
    module docstring for when that is unsafe).
    """
    _check(logits, target)
    check_options(
        "cross_entropy", ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale
    )
    opts = (int(ignore_index), reduction, float(label_smoothing), float(z_loss))
    softcap = float(softcap) if softcap is not None else None
    logit_scale = float(logit_scale)
    if logits.dtype == torch.float64:  # no kernel computes in fp64: the reference is exact there
        check_targets(target.reshape(-1), logits.shape[-1], ignore_index, "cross_entropy")
        return cross_entropy_ref(
            logits,
            target,
            ignore_index=opts[0],
            reduction=reduction,
            label_smoothing=opts[2],
            z_loss=opts[3],
            softcap=softcap,
            logit_scale=logit_scale,
        )
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    if inplace_backward and compute_grad:
        if logits.is_leaf:
            raise ValueError(
                "cross_entropy: inplace_backward=True would overwrite a leaf tensor that requires "
                "grad; pass the logits produced by the model, or inplace_backward=False"
            )
        if not logits.is_contiguous():
            raise ValueError(
                "cross_entropy: inplace_backward=True needs contiguous logits (the gradient is "
                "written over them); call .contiguous() or use inplace_backward=False"
            )
        return _CrossEntropyInplace.apply(logits, target, *opts, softcap, logit_scale)
    if _backend.select("cross_entropy", logits.device) == "aten":
        return _cross_entropy_aten(logits, target, *opts, softcap, logit_scale)
    # "none" computes its gradient in the backward, where each row's upstream gradient is known
    precompute = compute_grad and reduction != "none"
    return torch.ops.perfml.cross_entropy_fwd(
        logits, target, *opts, softcap, logit_scale, precompute
    )[0]


def _ce_rows_aten(
    x2: Tensor,
    t: Tensor,
    loss_out: Tensor,
    grad_out: Tensor | None,
    scale: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float = 1.0,
) -> None:
    """ce_rows on the aten path: the reference's contract from one fused log_softmax per row
    instead of torch.logsumexp (max, subtract, exp, sum, log as separate passes), and the
    gradient as exp(log_softmax) written in place. lse = x_t - log_softmax(x)_t is formed only
    for z_loss."""
    v = x2.shape[1]
    x = x2 if x2.dtype == torch.float32 else x2.float()
    x = _softcap_ref(_scaled(x, logit_scale), softcap)
    t = t.long()
    valid = t != ignore_index
    in_range = (t >= 0) & (t < v)
    safe_t = torch.where(in_range, t, 0).unsqueeze(1)
    lp = torch.log_softmax(x, dim=-1)
    lp_t = lp.gather(1, safe_t).squeeze(1)
    loss = -lp_t
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * lp.mean(dim=-1)
    lse = None
    if z_loss:
        lse = x.gather(1, safe_t).squeeze(1) - lp_t
        loss = loss + z_loss * lse.square()
    loss_out.copy_(torch.where(valid, torch.where(in_range, loss, torch.nan), 0.0))
    if grad_out is None:
        return
    g = lp.exp_()  # softmax, in log_softmax's own buffer
    if lse is not None:
        g.mul_((1 + 2 * z_loss * lse).unsqueeze(1))
    if label_smoothing:
        g.sub_(label_smoothing / v)
    g.scatter_add_(1, safe_t, -(1 - label_smoothing) * in_range.float().unsqueeze(1))
    if softcap is not None:
        g.mul_(1 - (x / softcap).square())
    row_scale = scale.float().expand(t.shape[0]) if scale.numel() == 1 else scale.float()
    g.mul_(torch.where(valid, row_scale * logit_scale, 0.0).unsqueeze(1))
    grad_out.copy_(g)
