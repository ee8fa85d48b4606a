"""perfml: fused Triton and C++/CUDA kernels for PyTorch training and deployment."""

from perfml import nn, ops, optim
from perfml.patch import PatchReport, patch, unpatch
from perfml.quant import quantize
from perfml.sparsity import prune

__version__ = "0.1.0"

__all__ = [
    "nn",
    "ops",
    "optim",
    "patch",
    "unpatch",
    "PatchReport",
    "prune",
    "quantize",
    "__version__",
]
