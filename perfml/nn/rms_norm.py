"""perfml.nn.RMSNorm: the fused kernel behind the torch.nn.RMSNorm / HF LlamaRMSNorm interface."""

from __future__ import annotations

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
        hidden_size: int,
        eps: float = 1e-6,
        offset: float = 0.0,
        cast: str = "llama",
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"RMSNorm: hidden_size must be positive, got {hidden_size}")
        if cast not in CASTS:
            raise ValueError(f"RMSNorm: cast must be one of {sorted(CASTS)}, got {cast!r}")
        if offset != 0.0 and not elementwise_affine:
            raise ValueError("RMSNorm: offset needs elementwise_affine=True")
        self.hidden_size = hidden_size
        self.eps = eps
        self.offset = offset
        self.cast = cast
        if elementwise_affine:
            init = torch.zeros if offset != 0.0 else torch.ones
            self.weight = nn.Parameter(init(hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset, self.cast)

    def extra_repr(self) -> str:
        return (
            f"{self.hidden_size}, eps={self.eps}, offset={self.offset}, cast={self.cast!r}, "
            f"elementwise_affine={self.weight is not None}"
        )
