"""Pruning passes: `perfml.prune(model, perfml.sparsity.MagnitudeConfig(amount=0.5))`.

MagnitudeConfig (unstructured, per layer or global), SemiStructured24Config (2:4 along K; torch
semi-structured sparse tensors on CUDA), StructuredConfig (removes MLP channels and attention head
groups of a perfml Llama, shrinking the matrices); `sparsity_report(model)` per layer.
`finetune(model, train_config)` trains a pruned model with the Trainer while its KeepSparsity
callback keeps the pruned weights exactly zero.
"""

from perfml.sparsity.api import (
    PruningError,
    default_filter,
    prune,
    register_prune_transform,
    sparsity_report,
)
from perfml.sparsity.finetuning import KeepSparsity, finetune
from perfml.sparsity.methods import MagnitudeConfig, SemiStructured24Config, mask_2_4
from perfml.sparsity.structured import StructuredConfig

__all__ = [
    "KeepSparsity",
    "MagnitudeConfig",
    "PruningError",
    "SemiStructured24Config",
    "StructuredConfig",
    "default_filter",
    "finetune",
    "mask_2_4",
    "prune",
    "register_prune_transform",
    "sparsity_report",
]
