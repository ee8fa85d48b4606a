"""Reference models built from perfml's layers, each runnable fused (perfml kernels) or unfused
(plain PyTorch) over the same parameters."""

from perfml.models.decode import Decoder
from perfml.models.fuse import fuse_projections, unfuse_projections
from perfml.models.llama import KVCache, Llama, LlamaConfig, StaticKVCache

__all__ = [
    "Decoder",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "StaticKVCache",
    "fuse_projections",
    "unfuse_projections",
]
