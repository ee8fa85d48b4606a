"""Pruning passes: `perfml.prune(model, perfml.sparsity.MagnitudeConfig(amount=0.5))`.

MagnitudeConfig (unstructured, per layer or global), SemiStructured24Config (2:4 along K; torch
semi-structured sparse tensors on CUDA), StructuredConfig (removes MLP channels and attention head
groups of a perfml Llama, shrinking the matrices); `sparsity_report(model)` per layer.
"""

from perfml.sparsity.api import (
    PruningError,
    default_filter,
    prune,
    register_prune_transform,
    sparsity_report,
)
from perfml.sparsity.methods import MagnitudeConfig, SemiStructured24Config, mask_2_4
from perfml.sparsity.structured import StructuredConfig

__all__ = [
    "MagnitudeConfig",
    "PruningError",
    "SemiStructured24Config",
    "StructuredConfig",
    "default_filter",
    "mask_2_4",
    "prune",
    "register_prune_transform",
    "sparsity_report",
]
