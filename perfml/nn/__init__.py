"""Drop-in nn.Modules built on perfml.ops, state_dict-compatible with the modules they replace."""

from perfml.nn.layer_norm import LayerNorm
from perfml.nn.loss import CrossEntropyLoss, LinearCrossEntropyLoss
from perfml.nn.rms_norm import RMSNorm
from perfml.nn.rope import RotaryEmbedding
from perfml.nn.swiglu import SwiGLUMLP

__all__ = [
    "LayerNorm",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLUMLP",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
]
