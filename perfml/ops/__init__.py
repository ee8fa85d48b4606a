"""Functional fused kernels, one op per file: `<op>_ref`, Triton kernels, launcher, custom op."""

from perfml.ops.rms_norm import rms_norm, rms_norm_ref
from perfml.ops.swiglu import geglu, geglu_ref, swiglu, swiglu_ref

__all__ = [
    "rms_norm",
    "rms_norm_ref",
    "geglu",
    "geglu_ref",
    "swiglu",
    "swiglu_ref",
]
