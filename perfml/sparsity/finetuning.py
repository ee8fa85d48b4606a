"""Fine-tuning after pruning: train a pruned model for a few steps with its sparsity kept.

    perfml.prune(model, MagnitudeConfig(amount=0.5))
    result = perfml.sparsity.finetune(model, train_config)     # a TrainResult; model trained

Unstructured and 2:4 pruning leave zeros in dense weights, and an optimizer step would make them
nonzero again. KeepSparsity, a Trainer callback, records at train start which entries of the
selected linear weights are exactly zero (the prune's masks: nothing else is exactly zero in a
trained float weight) and

  - zeroes those entries of the gradients in every step, after the backward and before clipping
    and the optimizer step (mask_grads=True, the default): the global gradient norm that clipping
    and the logged grad_norm use is then the norm over the weights that are trained, instead of
    being inflated by gradients of weights that are zeroed again anyway (which would clip the kept
    weights' update harder than the config asks), and AdamW's moments of pruned entries stay zero;
  - sets the same entries of the weights back to exactly zero after every optimizer step, before
    any evaluation, checkpoint or later callback sees the model. With masked gradients AdamW
    already leaves them at zero (zero moments give a zero update, decay keeps zero), so this is
    the guarantee rather than the mechanism, and it holds for any optimizer or mask_grads=False.

Structured pruning shrinks the matrices instead: they hold no zeros, KeepSparsity records nothing
and fine-tuning is plain training of the smaller model. The masks cost one bool per entry of each
weight that has zeros. A torch semi-structured sparse weight (SemiStructured24Config with
accelerate=True on CUDA) cannot be trained: prune with accelerate=False, fine-tune, then prune
again with accelerate=True to convert (the 2:4 pattern is kept, so the conversion changes nothing).

Under FSDP the masks are taken of each rank's shards (the weights' local tensors), under DDP of the
full weights; resuming (finetune(..., resume=RUN_DIR)) records them again from the checkpoint's
weights, whose pruned entries are exactly zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from perfml.sparsity.api import FilterFn, PruningError, selected_linears
from perfml.train.callbacks import Callback

if TYPE_CHECKING:
    from perfml.train.config import TrainConfig
    from perfml.train.trainer import Trainer, TrainResult


def _is_semi_structured(tensor: Tensor) -> bool:
    semi = getattr(torch.sparse, "SparseSemiStructuredTensor", None)
    return semi is not None and isinstance(tensor, semi)


def check_trainable(model: nn.Module) -> None:
    """Raise PruningError naming the first weight that is a torch semi-structured sparse tensor."""
    for name, p in model.named_parameters():
        if _is_semi_structured(p):
            raise PruningError(
                f"finetune: {name} is a torch semi-structured sparse tensor, which cannot be "
                "trained; prune with SemiStructured24Config(accelerate=False) (a masked dense "
                "weight), fine-tune, then prune again with accelerate=True to convert"
            )


def _local(tensor: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP2), else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class KeepSparsity(Callback):
    """Trainer callback: the selected linear weights' zeros at train start stay exactly zero.

    `filter_fn(module, fqn)` picks the linears as in perfml.prune (default: every nn.Linear but
    lm_head); mask_grads=True also zeroes their gradients before clipping and the optimizer step.
    After on_train_start, `masks` maps each weight holding zeros ("layers.0.mlp.up_proj.weight")
    to its bool tensor of pruned entries (True = pruned).
    """

    def __init__(self, filter_fn: FilterFn | None = None, *, mask_grads: bool = True) -> None:
        self.filter_fn = filter_fn
        self.mask_grads = mask_grads
        self.masks: dict[str, Tensor] = {}
        self._weights: list[tuple[nn.Parameter, Tensor]] = []

    @torch.no_grad()
    def on_train_start(self, trainer: Trainer) -> None:
        model = trainer.model
        check_trainable(model)
        self.masks, self._weights = {}, []
        for fqn, linear in selected_linears(model, self.filter_fn):
            weight = linear.weight
            pruned = _local(weight.detach()) == 0
            if bool(pruned.any()):
                self.masks[f"{fqn}.weight" if fqn else "weight"] = pruned
                self._weights.append((weight, pruned))

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        if not self.mask_grads:
            return
        for weight, pruned in self._weights:
            if weight.grad is not None:
                # a fill, not a product: an inf gradient (fp16 overflow, the scaler skips the
                # step) must not become NaN
                _local(weight.grad).masked_fill_(pruned, 0.0)

    @torch.no_grad()
    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Set the recorded entries of the weights to zero."""
        for weight, pruned in self._weights:
            _local(weight.detach()).masked_fill_(pruned, 0.0)


def finetune(
    model: nn.Module,
    config: TrainConfig,
    *,
    filter_fn: FilterFn | None = None,
    mask_grads: bool = True,
    callbacks: Sequence[Callback] = (),
    resume: str | Path | None = None,
) -> TrainResult:
    """Fine-tune a pruned perfml Llama in place with the Trainer (config's data, optimizer,
    schedule, max_steps; run directory config.out_dir) while KeepSparsity keeps the zeros of the
    weights `filter_fn` selects (the same filter as the prune; default every linear but lm_head).
    Returns the Trainer's TrainResult; the model ends on config's device with the trained weights.
    `resume`: continue an interrupted fine-tune from its run directory (the model must have the
    pruned structure; its values are replaced by the checkpoint's)."""
    from perfml.train.trainer import Trainer

    check_trainable(model)
    keep = KeepSparsity(filter_fn, mask_grads=mask_grads)
    # first in the list: later callbacks' on_step_end see the weights with their zeros back
    trainer = Trainer(config, model=model, callbacks=[keep, *callbacks], resume=resume)
    return trainer.fit()
