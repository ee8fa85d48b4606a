"""perfml.nn.LayerNorm: the fused kernel behind the torch.nn.LayerNorm interface.

Same constructor, attributes and state_dict keys (weight, bias) as torch.nn.LayerNorm, so
checkpoints load either way. Only normalization over the last dimension is fused (every
transformer uses that); a multi-dimensional normalized_shape is refused rather than emulated.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import nn

from perfml.ops.layer_norm import layer_norm


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension, a drop-in for torch.nn.LayerNorm(hidden_size)."""

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        normalized_shape = tuple(int(d) for d in normalized_shape)
        if len(normalized_shape) != 1:
            raise NotImplementedError(
                "LayerNorm: only normalization over the last dimension is fused; got "
                f"normalized_shape={normalized_shape} (use torch.nn.LayerNorm for that)"
            )
        if normalized_shape[0] <= 0:
            raise ValueError(
                f"LayerNorm: normalized_shape must be positive, got {normalized_shape}"
            )
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(normalized_shape, device=device, dtype=dtype))
            if bias:
                self.bias = nn.Parameter(torch.empty(normalized_shape, device=device, dtype=dtype))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.normalized_shape[0]
        if x.dim() == 0 or x.shape[-1] != n:
            raise ValueError(
                f"LayerNorm: expected input with last dimension {n} (normalized_shape), "
                f"got shape {tuple(x.shape)}"
            )
        return layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )
