"""perfml.nn.RMSNorm: the fused kernel behind the torch.nn.RMSNorm / HF LlamaRMSNorm interface."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn

from perfml.ops.rms_norm import CASTS, rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension; the state_dict key is `weight`, as in torch and HF.

    cast="llama" mimics HF LlamaRMSNorm, cast="gemma" with offset=1.0 HF GemmaRMSNorm (whose
    weight is stored as zeros-initialized deltas), cast="none" torch.nn.RMSNorm.
    """

    def __init__(
        self,
        hidden_size: int | Sequence[int],
        eps: float | None = 1e-6,
        offset: float = 0.0,
        cast: str = "llama",
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        # torch.nn.RMSNorm's normalized_shape: an int or a sequence; only the last dim is fused
        if isinstance(hidden_size, numbers.Integral) and not isinstance(hidden_size, bool):
            shape = (int(hidden_size),)
        elif isinstance(hidden_size, Sequence) and all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in hidden_size
        ):
            shape = tuple(int(d) for d in hidden_size)
        else:
            raise TypeError(
                "RMSNorm: hidden_size (normalized_shape) must be an int or a sequence of ints, "
                f"got {hidden_size!r}"
            )
        if len(shape) != 1:
            raise NotImplementedError(
                "RMSNorm: only normalization over the last dimension is fused; got "
                f"normalized_shape={shape} (use torch.nn.RMSNorm for that)"
            )
        if shape[0] <= 0:
            raise ValueError(f"RMSNorm: hidden_size must be positive, got {shape[0]}")
        if eps is not None and not (isinstance(eps, numbers.Real) and math.isfinite(eps)):
            raise ValueError(f"RMSNorm: eps must be a finite number or None, got {eps!r}")
        if cast not in CASTS:
            raise ValueError(f"RMSNorm: cast must be one of {sorted(CASTS)}, got {cast!r}")
        if offset != 0.0 and not elementwise_affine:
            raise ValueError("RMSNorm: offset needs elementwise_affine=True")
        self.hidden_size = shape[0]
        self.normalized_shape = shape
        self.eps = None if eps is None else float(eps)
        self.offset = offset
        self.cast = cast
        if elementwise_affine:
            init = torch.zeros if offset != 0.0 else torch.ones
            self.weight = nn.Parameter(init(shape[0], device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # with a weight the op names the mismatch (the weight's shape); without one, check here
        if self.weight is None and (x.dim() == 0 or x.shape[-1] != self.hidden_size):
            raise ValueError(
                f"RMSNorm: expected input with last dimension {self.hidden_size} "
                f"(normalized_shape), got shape {tuple(x.shape)}"
            )
        # eps=None is torch.nn.RMSNorm's default: the machine epsilon of the input's dtype
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return rms_norm(x, self.weight, eps, self.offset, self.cast)

    def extra_repr(self) -> str:
        return (
            f"{self.hidden_size}, eps={self.eps}, offset={self.offset}, cast={self.cast!r}, "
            f"elementwise_affine={self.weight is not None}"
        )
