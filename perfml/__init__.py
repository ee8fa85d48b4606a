"""perfml: fused Triton and C++/CUDA kernels for PyTorch training and deployment."""

from perfml import nn, ops

__version__ = "0.1.0"

__all__ = ["nn", "ops", "__version__"]
