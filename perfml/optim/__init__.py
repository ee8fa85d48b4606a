"""Optimizers with fused kernels: AdamW (C++/CUDA multi-tensor, Triton, C++ CPU) and AdamW8bit."""

from perfml.optim.adamw import AdamW, adamw_ref

__all__ = ["AdamW", "adamw_ref"]
