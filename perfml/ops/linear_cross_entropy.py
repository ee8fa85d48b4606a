"""Linear + cross-entropy (an LM head and its loss) without the [tokens, vocab] logits.

loss = cross_entropy(hidden @ weight.T + bias, target, ...) with every option of
perfml.ops.cross_entropy (logit_scale included: it multiplies the chunk's logits inside the
cross-entropy kernel, so the matmuls are those of the unscaled head). The tokens are processed in chunks: for each chunk the logits come from
one cuBLAS (or CPU BLAS) matmul into a reused [chunk, V] buffer, the fused cross-entropy kernel
turns them into the loss and, in place, the gradient w.r.t. the logits, and two more matmuls turn
that into the chunk's rows of grad_hidden and its term of grad_weight. So the forward computes
the gradients (three matmuls in all, the floor) and, for "mean" and "sum", the backward only
multiplies them by the upstream gradient, on the device, skipping the work when it is 1.

reduction="none": the upstream gradient is one value per token, and grad_weight = sum_r dy_r *
g_r^T h_r cannot be rescaled per row after the sum. Its forward computes only the loss (one
matmul per chunk); the backward recomputes the chunk logits and folds dy_r into the kernel's
per-row scale (four matmuls in all, exact gradients).

Ignored tokens cost no compute: the non-ignored rows are gathered (torch.nonzero, the op's one
host synchronization) and only they are chunked; their rows of grad_hidden are zero.

Precision (fp32_accumulation=True, the default): grad_weight and grad_bias are summed over chunks
in fp32, and grad_hidden is kept in fp32 until the backward; with bf16/fp16 weights each chunk's
products come out of cuBLAS in fp32 (mm with out_dtype; grad_weight's through a reused fp32 staging
slab), and the backward rounds each gradient once, with the upstream gradient folded in. That
costs V * H * 4 bytes for the accumulator (2 GiB for a 128256 x 4096 head), N * H * 4 for
grad_hidden, and an fp32 read-modify-write of the accumulator per chunk. fp32_accumulation=False
keeps everything in the weight dtype and accumulates with addmm (beta=1), as Liger and torch's own
chunked path do: no accumulator, but one rounding per chunk, so the grad_weight error grows with
the number of chunks (measured on CPU: 2.2x the plain bf16 error at 16 chunks, 1.1x at 4).

Chunk size: chunk_size tokens, or by default as many as keep one chunk's logits under 256 MiB of
fp32 (512 tokens at V=128256: a 125 MiB bf16 buffer), rounded down to a multiple of 128.
Peak extra memory is about the chunk buffer + grad_hidden + grad_weight (+ its fp32 accumulator).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from perfml.ops.cross_entropy import (
    ce_rows,
    check_options,
    check_target,
    check_targets,
    cross_entropy_ref,
    row_upstream,
)

_CHUNK_BUDGET_BYTES = 256 * 2**20  # fp32-equivalent logits of one chunk
_ACC_SLAB_BYTES = 128 * 2**20  # fp32 staging for one slab of a chunk's grad_weight term
_CHUNK_ALIGN = 128  # keep matmul M a multiple of cuBLAS's tile


# --- 1. reference ----------------------------------------------------------------------------


def linear_cross_entropy_ref(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> Tensor:
    """Plain PyTorch: the full logits in the input dtype, then cross_entropy_ref (fp32 math)."""
    return cross_entropy_ref(
        F.linear(hidden, weight, bias),
        target,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
    )


# --- 2./3. the chunked computation -----------------------------------------------------------


def _chunk_rows(v: int, n_valid: int, chunk_size: int) -> int:
    if chunk_size > 0:
        c = chunk_size
    else:
        c = max(1, _CHUNK_BUDGET_BYTES // (4 * v))
        if c >= _CHUNK_ALIGN:
            c -= c % _CHUNK_ALIGN
    return max(1, min(c, n_valid))


def _mm(a: Tensor, b: Tensor, out: Tensor) -> None:
    """out = a @ b; for bf16/fp16 a, b and an fp32 out, without rounding the product to the
    input dtype on the way."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif a.device.type == "cuda":
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:  # CPU BLAS has no mixed-precision mm; low-precision CPU matmuls are emulated anyway
        torch.mm(a.float(), b.float(), out=out)


def _accumulate_grad_weight(
    acc: Tensor, g: Tensor, h: Tensor, first: bool, staging: Tensor | None
) -> Tensor | None:
    """acc [V, H] (+)= g.T @ h for one chunk (g [C, V], h [C, H]); returns the staging slab to
    reuse for the next chunk."""
    gt = g.t()
    if acc.dtype == g.dtype:
        if first:
            torch.mm(gt, h, out=acc)
        else:
            acc.addmm_(gt, h)
        return staging
    v, hdim = acc.shape
    slab = max(1, min(v, _ACC_SLAB_BYTES // (4 * hdim)))
    if not first and staging is None:
        staging = torch.empty((slab, hdim), dtype=torch.float32, device=acc.device)
    for v0 in range(0, v, slab):
        v1 = min(v0 + slab, v)
        if first:
            _mm(gt[v0:v1], h, acc[v0:v1])
        else:
            part = staging[: v1 - v0]
            _mm(gt[v0:v1], h, part)
            acc[v0:v1] += part
    return staging


def _run_chunks(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    chunk_size: int,
    fp32_accumulation: bool,
    *,
    mean: bool,
    row_scale: Tensor | None,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(loss of each non-ignored token [Nv] fp32, their row indices [Nv], grad_hidden [N, H],
    grad_weight accumulator [V, H], grad_bias accumulator [V] fp32); a gradient is None when not
    asked for. Gradients are multiplied by 1/Nv when `mean`, or by row_scale [N] when given."""
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t = target.reshape(-1)
    n, v = t.shape[0], weight.shape[0]
    check_targets(t, v, ignore_index, "linear_cross_entropy")
    idx = (t != ignore_index).nonzero().squeeze(1)  # the one host synchronization
    nv = idx.shape[0]
    compact = nv < n
    device = hidden.device
    any_grad = need_h or need_w or need_b
    loss = torch.empty(nv, dtype=torch.float32, device=device)
    grad_h = grad_w = grad_b = None
    acc_dtype = torch.float32 if fp32_accumulation else weight.dtype
    if need_h:
        grad_h = (torch.zeros if compact else torch.empty)(h2.shape, dtype=acc_dtype, device=device)
    if need_w:
        grad_w = (torch.empty if nv else torch.zeros)(weight.shape, dtype=acc_dtype, device=device)
    if need_b:
        grad_b = torch.zeros(v, dtype=torch.float32, device=device)
    scale = torch.full((1,), 1.0 / nv if mean and nv else 1.0, dtype=torch.float32, device=device)
    c = _chunk_rows(v, nv, chunk_size)
    logits = torch.empty((c, v), dtype=hidden.dtype, device=device)
    wt = weight.t()
    staging = None
    for s in range(0, nv, c):
        e = min(s + c, nv)
        rows = idx[s:e]
        h_c = h2.index_select(0, rows) if compact else h2[s:e]
        t_c = t.index_select(0, rows) if compact else t[s:e]
        lg = logits[: e - s]
        if bias is None:
            torch.mm(h_c, wt, out=lg)
        else:
            torch.addmm(bias, h_c, wt, out=lg)
        sc = scale if row_scale is None else row_scale.index_select(0, rows)
        ce_rows(
            lg,
            t_c,
            loss[s:e],
            lg if any_grad else None,
            sc,
            ignore_index,
            label_smoothing,
            z_loss,
            softcap,
            logit_scale,
            op="linear_cross_entropy",
        )
        if need_h:
            if compact:
                part = torch.empty((e - s, h2.shape[1]), dtype=acc_dtype, device=device)
                _mm(lg, weight, part)
                grad_h.index_copy_(0, rows, part)
            else:
                _mm(lg, weight, grad_h[s:e])
        if need_w:
            staging = _accumulate_grad_weight(grad_w, lg, h_c, s == 0, staging)
        if need_b:
            grad_b += lg.sum(0, dtype=torch.float32)
    return loss, idx, grad_h, grad_w, grad_b


# --- 4. torch.library registration -----------------------------------------------------------


@torch.library.custom_op("perfml::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd_op(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    chunk_size: int,
    fp32_accumulation: bool,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_hidden, grad_weight accumulator, grad_bias fp32 accumulator), the gradients
    already scaled for "mean"; an empty tensor for each gradient not asked for."""
    loss_rows, idx, gh, gw, gb = _run_chunks(
        hidden,
        weight,
        target,
        bias,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
        chunk_size,
        fp32_accumulation,
        mean=reduction == "mean",
        row_scale=None,
        need_h=need_h,
        need_w=need_w,
        need_b=need_b,
    )
    nv = idx.shape[0]
    if reduction == "none":
        full = torch.zeros(target.numel(), dtype=torch.float32, device=hidden.device)
        full.index_copy_(0, idx, loss_rows)
        loss = full.reshape(target.shape).to(hidden.dtype)
    else:
        total = loss_rows.sum()
        loss = (total / nv if reduction == "mean" else total).to(hidden.dtype)  # 0/0: nan
    return (  # fresh empties: outputs of a custom op may not alias one another
        loss,
        gh.view(hidden.shape) if gh is not None else hidden.new_empty(0),
        gw if gw is not None else hidden.new_empty(0),
        gb if gb is not None else hidden.new_empty(0, dtype=torch.float32),
    )


def _grad_shapes(hidden, weight, bias, fp32_accumulation, need_h, need_w, need_b):
    acc = torch.float32 if fp32_accumulation else weight.dtype
    gh = hidden.new_empty(hidden.shape if need_h else (0,), dtype=acc if need_h else hidden.dtype)
    gw = weight.new_empty(weight.shape if need_w else (0,), dtype=acc if need_w else hidden.dtype)
    gb = hidden.new_empty((weight.shape[0],) if need_b else (0,), dtype=torch.float32)
    return gh, gw, gb


@_lce_fwd_op.register_fake
def _(
    hidden,
    weight,
    target,
    bias,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    logit_scale,
    chunk_size,
    fp32_accumulation,
    need_h,
    need_w,
    need_b,
):
    loss = hidden.new_empty(tuple(target.shape) if reduction == "none" else ())
    return loss, *_grad_shapes(hidden, weight, bias, fp32_accumulation, need_h, need_w, need_b)


@torch.library.custom_op("perfml::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd_op(
    dloss: Tensor,
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    chunk_size: int,
    fp32_accumulation: bool,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """reduction="none": recompute each chunk with dloss (one value per token) folded into the
    kernel's row scale; (grad_hidden, grad_weight, grad_bias) in their parameters' dtypes."""
    row_scale = dloss.reshape(-1).to(torch.float32).contiguous()
    _, _, gh, gw, gb = _run_chunks(
        hidden,
        weight,
        target,
        bias,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
        chunk_size,
        fp32_accumulation,
        mean=False,
        row_scale=row_scale,
        need_h=need_h,
        need_w=need_w,
        need_b=need_b,
    )
    return (
        gh.view(hidden.shape).to(hidden.dtype) if gh is not None else hidden.new_empty(0),
        gw.to(weight.dtype) if gw is not None else hidden.new_empty(0),
        gb.to(bias.dtype) if gb is not None else hidden.new_empty(0),
    )


@_lce_bwd_op.register_fake
def _(
    dloss,
    hidden,
    weight,
    target,
    bias,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    logit_scale,
    chunk_size,
    fp32_accumulation,
    need_h,
    need_w,
    need_b,
):
    gh = hidden.new_empty(hidden.shape if need_h else (0,))
    gw = weight.new_empty(weight.shape) if need_w else hidden.new_empty(0)
    gb = bias.new_empty(bias.shape) if need_b else hidden.new_empty(0)
    return gh, gw, gb


def _setup_context(ctx, inputs, output):
    hidden, weight, target, bias, ignore_index, reduction, *opts = inputs
    ctx.reduction = reduction
    ctx.options = (ignore_index, *opts[:6])  # label_smoothing .. fp32_accumulation
    ctx.hidden_dtype = hidden.dtype
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None
    stored = opts[6:]  # need_h, need_w, need_b: what the forward computed
    wanted = [ctx.needs_input_grad[i] for i in (0, 1, 3)]
    ctx.recompute = reduction == "none" or any(
        w and not s for w, s in zip(wanted, stored, strict=True)
    )
    if ctx.recompute:
        ctx.save_for_backward(hidden, weight, target, bias)
    else:  # only the gradients: nothing of the forward's inputs is held for the backward
        ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])
    # Without this autograd feeds zeros shaped like hidden, weight and bias into the backward as
    # the stored gradients' "gradients": a weight-sized allocation and memset on every backward.
    ctx.set_materialize_grads(False)


def _scale(grad: Tensor, dloss: Tensor, dtype: torch.dtype) -> Tensor:
    """The stored gradient times the upstream one, in `dtype`: in place when it already has it
    (a no-op on the device for dloss == 1), else rounded once from the fp32 accumulator."""
    if grad.dtype == dtype:
        torch.ops.perfml.loss_grad_scale_(grad, dloss)
        return grad
    return torch.ops.perfml.loss_grad_scale_cast(grad, dloss, dtype)


def _backward(ctx, dloss, _gh, _gw, _gb):
    if dloss is None:  # the loss took no part in what was differentiated
        return (None,) * 15
    need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
    if ctx.recompute:
        hidden, weight, target, bias = ctx.saved_tensors
        if ctx.reduction != "none":  # a forward that computed no gradients (grad mode was off)
            dloss = row_upstream(dloss, target, ctx.reduction, ctx.options[0])
        gh, gw, gb = torch.ops.perfml.linear_cross_entropy_bwd(
            dloss, hidden, weight, target, bias, *ctx.options, need_h, need_w, need_b
        )
    else:
        gh, gw, gb = ctx.saved_tensors
        if need_h:
            gh = _scale(gh, dloss, ctx.hidden_dtype)
        if need_w:
            gw = _scale(gw, dloss, ctx.weight_dtype)
        if need_b:
            gb = (gb * dloss.float()).to(ctx.bias_dtype)
    return (
        gh if need_h else None,
        gw if need_w else None,
        None,
        gb if need_b else None,
        *([None] * 11),
    )


_lce_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --- 5. public API ---------------------------------------------------------------------------


def _check(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None) -> None:
    op = "linear_cross_entropy"
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(
                f"{op}: {name} must be a floating tensor (fp32/bf16/fp16 run the kernels, fp64 the exact reference), got {t.dtype}"
            )
    if hidden.dim() == 0:
        raise ValueError(f"{op}: hidden must be [..., H], got a 0-dim tensor")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"{op}: weight must be [V, H] with V >= 1, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{op}: weight must be [V, {hidden.shape[-1]}] to match hidden.shape[-1], "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: hidden is {hidden.dtype} but weight is {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{op}: hidden is on {hidden.device} but weight is on {weight.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"{op}: bias must have shape ({weight.shape[0]},) to match weight.shape[0], "
                f"got {tuple(bias.shape)}"
            )
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{op}: hidden is {hidden.dtype} but bias is {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"{op}: hidden is on {hidden.device} but bias is on {bias.device}")
    check_target(op, target, hidden.shape[:-1], "hidden.shape[:-1]", hidden.device)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    fp32_accumulation: bool = True,
) -> Tensor:
    """cross_entropy(hidden @ weight.T + bias, target, ...) without materializing the logits.

    hidden [..., H], weight [V, H], bias [V] or None (one dtype, one device), target [...] int64
    or int32. Options as perfml.ops.cross_entropy (logit_scale multiplies the logits before the
    softcap and everything else); chunk_size (tokens per chunk, default from a
    256 MiB fp32 budget) and fp32_accumulation as in the module docstring.
    """
    _check(hidden, weight, target, bias)
    check_options(
        "linear_cross_entropy",
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
    )
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ValueError(f"linear_cross_entropy: chunk_size must be None or >= 1, got {chunk_size}")
    opts = (int(ignore_index), reduction, float(label_smoothing), float(z_loss))
    softcap = float(softcap) if softcap is not None else None
    logit_scale = float(logit_scale)
    if hidden.dtype == torch.float64:  # no kernel computes in fp64: the reference is exact there
        check_targets(target.reshape(-1), weight.shape[0], ignore_index, "linear_cross_entropy")
        return linear_cross_entropy_ref(
            hidden,
            weight,
            target,
            bias,
            ignore_index=opts[0],
            reduction=reduction,
            label_smoothing=opts[2],
            z_loss=opts[3],
            softcap=softcap,
            logit_scale=logit_scale,
        )
    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    if reduction == "none":  # the backward recomputes (see the module docstring)
        need = (False, False, False)
    return torch.ops.perfml.linear_cross_entropy_fwd(
        hidden,
        weight,
        target,
        bias,
        *opts,
        softcap,
        logit_scale,
        int(chunk_size or 0),
        bool(fp32_accumulation),
        *need,
    )[0]
