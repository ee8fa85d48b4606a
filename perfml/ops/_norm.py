"""Helpers shared by the normalization ops (rms_norm, add_rms_norm, layer_norm).

The cast conventions, the row-length limit, the compute dtype rule and the plain-PyTorch RMSNorm
forward/backward that add_rms_norm builds on. Op files import from here, never from each other.
"""

from __future__ import annotations

import torch
from torch import Tensor

CASTS = {"llama": 0, "gemma": 1, "none": 2}
MAX_HIDDEN = 1 << 20  # longest row supported; longer rows get a clear error


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _rstd_ref(x: Tensor, eps: float) -> Tensor:
    xf = x.to(_compute_dtype(x))
    return torch.rsqrt(xf.pow(2).mean(-1) + eps)


def _rms_norm_fwd_ref(
    x: Tensor, weight: Tensor | None, eps: float, offset: float, cast: int
) -> tuple[Tensor, Tensor]:
    compute = _compute_dtype(x)
    rstd = _rstd_ref(x, eps)
    normed = x.to(compute) * rstd.unsqueeze(-1)
    if weight is None:
        return normed.to(x.dtype), rstd.float() if compute != torch.float64 else rstd
    w = weight.to(compute) + offset
    if cast == CASTS["llama"]:
        y = (normed.to(x.dtype).to(compute) * w).to(_out_dtype(x, weight, cast))
    else:
        y = (normed * w).to(x.dtype)
    return y, rstd.float() if compute != torch.float64 else rstd


def _rms_norm_bwd_ref(
    dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, offset: float, needs_dw: bool
) -> tuple[Tensor, Tensor]:
    compute = _compute_dtype(x)
    n = x.shape[-1]
    xf, dyf = x.to(compute), dy.to(compute)
    r = rstd.to(compute).unsqueeze(-1)
    wdy = dyf * (weight.to(compute) + offset) if weight is not None else dyf
    c = (wdy * xf).sum(-1, keepdim=True) / n
    dx = ((wdy - xf * r * r * c) * r).to(x.dtype)
    if weight is None or not needs_dw:
        return dx, x.new_empty(0)
    dw = (dyf * xf * r).reshape(-1, n).sum(0).to(weight.dtype)
    return dx, dw


def _out_dtype(x: Tensor, weight: Tensor | None, cast: int) -> torch.dtype:
    if weight is not None and cast == CASTS["llama"]:
        return torch.promote_types(x.dtype, weight.dtype)
    return x.dtype
