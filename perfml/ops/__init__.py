"""Functional fused kernels, one op per file: `<op>_ref`, Triton kernels, launcher, custom op."""

from perfml.ops.add_rms_norm import add_rms_norm, add_rms_norm_ref
from perfml.ops.cross_entropy import cross_entropy, cross_entropy_ref
from perfml.ops.decode_attention import decode_attention, decode_attention_ref
from perfml.ops.layer_norm import layer_norm, layer_norm_ref
from perfml.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from perfml.ops.rms_norm import rms_norm, rms_norm_ref
from perfml.ops.rope import rope, rope_ref
from perfml.ops.softmax import softmax, softmax_ref
from perfml.ops.swiglu import geglu, geglu_ref, swiglu, swiglu_ref

__all__ = [
    "add_rms_norm",
    "add_rms_norm_ref",
    "layer_norm",
    "layer_norm_ref",
    "rms_norm",
    "rms_norm_ref",
    "rope",
    "rope_ref",
    "geglu",
    "geglu_ref",
    "swiglu",
    "swiglu_ref",
    "softmax",
    "softmax_ref",
    "cross_entropy",
    "cross_entropy_ref",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "decode_attention",
    "decode_attention_ref",
]
