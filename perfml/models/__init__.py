"""Reference models built from perfml's layers, each runnable fused (perfml kernels) or unfused
(plain PyTorch) over the same parameters."""

from perfml.models.llama import KVCache, Llama, LlamaConfig

__all__ = ["KVCache", "Llama", "LlamaConfig"]
