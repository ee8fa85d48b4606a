"""Optimizers with fused kernels: AdamW (C++/CUDA multi-tensor, Triton, C++ CPU) and AdamW8bit."""

from perfml.optim.adamw import AdamW, adamw_ref
from perfml.optim.adamw8bit import AdamW8bit, adamw8bit_ref

__all__ = ["AdamW", "AdamW8bit", "adamw_ref", "adamw8bit_ref"]
