"""The byte and FLOP formulas of the benchmark cases: one home, imported by the case files
(perfml/bench/cases/*) and by the profiler's roofline (perfml/profile/roofline.py).

Each is a pure function of the case's shape, dtype and mode ("fwd" or "fwd+bwd"). Bytes are the
minimum traffic: each input read once, each output written once; what a kernel saves between
its forward and backward (an fp32 rstd, say) is the kernel's choice and not counted. FLOPs count
the multiply-adds of the matmuls (2 per multiply-add), nothing else.

This module imports no case module (importing one registers its case) and nothing of
perfml.profile.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

Shape = tuple[int, ...]
BytesFormula = Callable[[Shape, torch.dtype, str], int]

# --- normalization -------------------------------------------------------------------------------


def rms_norm_bytes(shape: Shape, dtype: torch.dtype, mode: str) -> int:
    """RMSNorm of x [..., N] with a weight [N] (M = the product of the leading dims).

    fwd reads x [M, N] and w [N] and writes y [M, N]; the backward reads x, w and dy and writes
    dx and dw (the saved fp32 rstd is the kernel's choice, not minimum traffic)."""
    m, n, size = math.prod(shape[:-1]), shape[-1], dtype.itemsize
    fwd = (2 * m * n + n) * size
    if mode == "fwd":
        return fwd
    return fwd + (3 * m * n + 2 * n) * size


def add_rms_norm_bytes(shape: Shape, dtype: torch.dtype, mode: str) -> int:
    """s = x + residual, then RMSNorm of s, returning (y, s); x [M, N].

    fwd reads x and residual [M, N] and w [N] and writes y and s [M, N]; the backward reads dy,
    ds and s and w and writes one [M, N] gradient (d_x and d_residual are the same values) and
    dw."""
    m, n, size = math.prod(shape[:-1]), shape[-1], dtype.itemsize
    fwd = (4 * m * n + n) * size
    if mode == "fwd":
        return fwd
    return fwd + (4 * m * n + 2 * n) * size


def layer_norm_bytes(shape: Shape, dtype: torch.dtype, mode: str) -> int:
    """LayerNorm of x [..., N] with a weight and a bias [N].

    fwd reads x [M, N], w and b [N] and writes y [M, N]; the backward reads x, w and dy and
    writes dx, dw and db (the saved fp32 mean and rstd are the kernel's choice, not minimum
    traffic)."""
    m, n, size = math.prod(shape[:-1]), shape[-1], dtype.itemsize
    fwd = (2 * m * n + 2 * n) * size
    if mode == "fwd":
        return fwd
    return fwd + (3 * m * n + 3 * n) * size


# --- activations and losses ----------------------------------------------------------------------


def softmax_bytes(shape: Shape, dtype: torch.dtype, mode: str) -> int:
    """Softmax over the last dim of x.

    fwd reads x and writes y; the backward reads y and dy and writes dx."""
    elems = math.prod(shape) * dtype.itemsize
    return 2 * elems if mode == "fwd" else (2 + 3) * elems


def glu_bytes(shape: Shape, dtype: torch.dtype, mode: str) -> int:
    """act(gate) * up (SwiGLU, GeGLU) on gate and up of the same shape.

    fwd reads gate and up and writes y; the backward reads gate, up and dy and writes dgate and
    dup (the activation is recomputed, not stored)."""
    elems = math.prod(shape) * dtype.itemsize
    return 3 * elems if mode == "fwd" else (3 + 5) * elems


def cross_entropy_bytes(shape: Shape, dtype: torch.dtype, mode: str) -> int:
    """Cross-entropy of logits [N, V] against int64 targets [N], one scalar loss.

    fwd reads the logits and the int64 targets; fwd+bwd also writes the logits' gradient (the
    scalar loss and its upstream gradient are not counted)."""
    n, v = shape
    logits = n * v * dtype.itemsize
    return logits + 8 * n if mode == "fwd" else 2 * logits + 8 * n


def linear_cross_entropy_flops(shape: Shape, mode: str) -> int:
    """hidden [N, H] @ weight [V, H].T, then cross-entropy; shape (N, H, V).

    2*N*H*V for the logits matmul; fwd+bwd adds the two gradient matmuls (grad_hidden and
    grad_weight), 3 matmuls in all. The softmax's own arithmetic is not counted."""
    n, h, v = shape
    matmul = 2 * n * h * v
    return matmul if mode == "fwd" else 3 * matmul


# --- position ------------------------------------------------------------------------------------


def rope_bytes(shape: Shape, dtype: torch.dtype, mode: str) -> int:
    """Rotary embedding of q [B, Hq, T, D] and k [B, Hk, T, D]; shape (B, Hq, Hk, T, D).

    fwd reads q and k and writes q_embed and k_embed, and reads cos and sin ([1, T, D]); the
    backward reads dq_embed, dk_embed, cos and sin and writes dq and dk: the same traffic
    again."""
    b, hq, hk, t, d = shape
    size = dtype.itemsize
    fwd = 2 * b * t * (hq + hk) * d * size + 2 * t * d * size
    return fwd if mode == "fwd" else 2 * fwd


# --- matmuls -------------------------------------------------------------------------------------


def matmul_flops(shape: Shape, mode: str) -> int:
    """y = x [M, K] @ W [N, K].T; shape (M, N, K): 2*M*N*K (dense-equivalent for a sparse W)."""
    m, n, k = shape
    return 2 * m * n * k


def weight_only_matmul_bytes(weight_bytes_per_elem: float, group: int | None) -> BytesFormula:
    """The bytes formula of x [M, K] @ W.T with W [N, K] stored quantized; shape (M, N, K).

    Reads x [M, K] and the packed weight (weight_bytes_per_elem per element: 1 for int8, 0.5 for
    int4) with its scales, writes y [M, N]. Scales: one per row in x.dtype when `group` is None
    (int8 per channel); otherwise a scale (x.dtype) and a uint8 zero point per group of `group`
    along K (int4 per group)."""

    def count(shape: Shape, dtype: torch.dtype, mode: str) -> int:
        m, n, k = shape
        if group is None:
            scales = n * dtype.itemsize
        else:
            scales = n * -(-k // group) * (dtype.itemsize + 1)
        weight = int(n * k * weight_bytes_per_elem) + scales
        return (m * k + m * n) * dtype.itemsize + weight

    return count


# --- optimizers ----------------------------------------------------------------------------------


@functools.cache
def gpt2_shapes(layers: int = 12) -> list[tuple[int, ...]]:
    """The parameter shapes of the gpt2-124m preset with `layers` blocks, in model order."""
    from perfml.models.llama import Llama, LlamaConfig

    with torch.device("meta"):
        model = Llama(LlamaConfig.preset("gpt2-124m", num_layers=layers))
    return [tuple(p.shape) for p in model.parameters()]


def adamw_bytes(shape: Shape, dtype: torch.dtype, mode: str) -> int:
    """One AdamW step over the gpt2-124m parameters; shape (layers, copies): the shapes of
    `layers` blocks, repeated `copies` times.

    With the state in the parameter dtype, each parameter reads param, grad, exp_avg and
    exp_avg_sq and writes param, exp_avg and exp_avg_sq: 7 x itemsize bytes."""
    layers, copies = shape
    numel = copies * sum(math.prod(s) for s in gpt2_shapes(layers))
    return 7 * dtype.itemsize * numel


# --- whole models --------------------------------------------------------------------------------

_PRESETS_BY_CONTEXT = ("tiny", "small", "llama-1b")  # ascending max_seq_len


def preset_for(seq_len: int) -> str:
    """The smallest llama preset whose max_seq_len is at least seq_len (the model a train-step
    case of T = seq_len tokens runs)."""
    from perfml.models.llama import LlamaConfig

    for name in _PRESETS_BY_CONTEXT:
        if LlamaConfig.preset(name).max_seq_len >= seq_len:
            return name
    raise ValueError(f"train_step: no preset takes sequences of {seq_len} tokens")


def train_step_flops(shape: Shape, mode: str) -> int:
    """One train step of B sequences of T tokens on preset_for(T); shape (B, T).

    PaLM's model FLOPs: Llama.flops_per_token(T) (6 x matmul parameters + attention's
    12 x layers x hidden x T) times the B * T tokens."""
    from perfml.models.llama import Llama, LlamaConfig

    b, t = shape
    with torch.device("meta"):
        model = Llama(LlamaConfig.preset(preset_for(t)))
    return model.flops_per_token(t) * b * t
