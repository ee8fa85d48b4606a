"""perfml.nn.CrossEntropyLoss and LinearCrossEntropyLoss: the fused losses as criterion modules.

CrossEntropyLoss replaces torch.nn.CrossEntropyLoss for class-index targets, with torch's shape
convention: input [N, C] with target [N], input [C] with target [] (one sample), and input
[N, C, d1, ...] with target [N, d1, ...] (classes on dim 1). The functional perfml.ops.cross_entropy
takes the class dimension last instead (logits [..., V], target [...]: the LM-head layout); for
[B, T, V] LM logits use it, or flatten them to [B * T, V] for this module. Class weights and
probability targets are refused with an error rather than ignored.

LinearCrossEntropyLoss holds no parameters: forward(hidden, weight, target, bias=None) takes the
LM head's weight (and bias) from the model that owns it, so tied embeddings and state_dicts stay
where they are; it returns cross_entropy(hidden @ weight.T + bias, target) without the logits.
"""

from __future__ import annotations

from torch import Tensor, nn

from perfml.ops.cross_entropy import check_options, cross_entropy
from perfml.ops.linear_cross_entropy import linear_cross_entropy


def _classes_last(input: Tensor, target: Tensor) -> Tensor:
    """torch.nn.CrossEntropyLoss's layout (classes on dim 1 of a K-dim input) -> classes last."""
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            "CrossEntropyLoss: input and target must be Tensors, got "
            f"{type(input).__name__} and {type(target).__name__}"
        )
    if target.is_floating_point():
        raise TypeError(
            "CrossEntropyLoss: target holds floating values (class probabilities); only class "
            "indices (int64 or int32) are supported: use torch.nn.CrossEntropyLoss for soft targets"
        )
    if input.dim() <= 2:  # [N, C] with [N], or [C] with []: the class dim is already last
        return input
    expected = (input.shape[0], *input.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            "CrossEntropyLoss: follows torch.nn.CrossEntropyLoss, classes on dim 1: input "
            f"{tuple(input.shape)} = [N, C, d1, ...] needs target [N, d1, ...] = {expected}, got "
            f"{tuple(target.shape)}. For LM logits [B, T, V] with target [B, T] use "
            "perfml.ops.cross_entropy (classes last) or flatten to [B * T, V]"
        )
    return input.movedim(1, -1)


class CrossEntropyLoss(nn.Module):
    """Fused cross-entropy; options as perfml.ops.cross_entropy.

    `weight` is accepted only as None, so that torch.nn.CrossEntropyLoss(None, ...)-style calls
    fail loudly instead of silently dropping class weights.
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        if weight is not None:
            raise ValueError(
                "CrossEntropyLoss: class weights are not supported; use torch.nn.CrossEntropyLoss"
            )
        check_options(
            "CrossEntropyLoss",
            ignore_index,
            reduction,
            label_smoothing,
            z_loss,
            softcap,
            logit_scale,
        )
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        logits = _classes_last(input, target)
        return cross_entropy(
            logits,
            target,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            logit_scale=self.logit_scale,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
            f"softcap={self.softcap}, logit_scale={self.logit_scale}, "
            f"inplace_backward={self.inplace_backward}"
        )


class LinearCrossEntropyLoss(nn.Module):
    """Fused LM head + cross-entropy; options as perfml.ops.linear_cross_entropy."""

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        chunk_size: int | None = None,
        fp32_accumulation: bool = True,
    ) -> None:
        super().__init__()
        check_options(
            "LinearCrossEntropyLoss",
            ignore_index,
            reduction,
            label_smoothing,
            z_loss,
            softcap,
            logit_scale,
        )
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(
                f"LinearCrossEntropyLoss: chunk_size must be None or >= 1, got {chunk_size}"
            )
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.chunk_size = chunk_size
        self.fp32_accumulation = fp32_accumulation

    def forward(
        self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None
    ) -> Tensor:
        return linear_cross_entropy(
            hidden,
            weight,
            target,
            bias,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            logit_scale=self.logit_scale,
            chunk_size=self.chunk_size,
            fp32_accumulation=self.fp32_accumulation,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
            f"softcap={self.softcap}, logit_scale={self.logit_scale}, "
            f"chunk_size={self.chunk_size}, "
            f"fp32_accumulation={self.fp32_accumulation}"
        )
