"""perfml.nn.RotaryEmbedding: the cos/sin that perfml.ops.rope (and HF apply_rotary_pos_emb) take.

Computes exactly what HF LlamaRotaryEmbedding computes: inv_freq = 1 / base**(arange(0, R, 2) / R)
(R = rotary_dim = int(head_dim * partial_rotary_factor)), optionally rescaled ("linear" or
Llama-3 scaling), freqs = position x inv_freq in fp32, emb = cat(freqs, freqs), then cos/sin cast to
x's dtype. HF forms freqs with a K=1 matmul; the elementwise product here gives the same fp32 values
without depending on TF32 settings. inv_freq is a non-persistent buffer, so the state_dict stays
empty (as in HF) and checkpoints load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _default_inv_freq(rotary_dim: int, base: float, device: torch.device | str | None) -> Tensor:
    exponents = (
        torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    )
    return 1.0 / (base**exponents)


def _llama3_inv_freq(inv_freq: Tensor, scaling: Mapping[str, Any]) -> Tensor:
    """Llama 3.1's frequency scaling: wavelengths shorter than original_context / high_freq_factor
    keep their frequency, those longer than original_context / low_freq_factor are divided by
    `factor`, and the band between blends the two linearly in original_context / wavelength."""
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    long_wave = wavelen > context / low
    short_wave = wavelen < context / high
    outer = torch.where(long_wave, inv_freq / factor, inv_freq)
    blend = (context / wavelen - low) / (high - low)
    between = (1 - blend) * inv_freq / factor + blend * inv_freq
    return torch.where(~long_wave & ~short_wave, between, outer)


def _scaling_type(rope_scaling: Mapping[str, Any]) -> str:
    # HF configs spell it "rope_type"; older ones "type"
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def _check_scaling(rope_scaling: Mapping[str, Any]) -> None:
    kind = _scaling_type(rope_scaling)
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(
            f"RotaryEmbedding: rope_scaling type {kind!r} is not supported "
            "(supported: 'default', 'linear', 'llama3')"
        )
    needed = {"default": (), "linear": ("factor",), "llama3": _LLAMA3_KEYS}[kind]
    missing = [key for key in needed if key not in rope_scaling]
    if missing:
        raise ValueError(f"RotaryEmbedding: {kind} rope_scaling needs the keys {missing}")
    if kind != "default" and float(rope_scaling["factor"]) <= 0:
        raise ValueError(
            f"RotaryEmbedding: rope_scaling factor must be positive, got {rope_scaling['factor']}"
        )
    if kind == "llama3":
        low, high = float(rope_scaling["low_freq_factor"]), float(rope_scaling["high_freq_factor"])
        if not 0 < low < high:
            raise ValueError(
                "RotaryEmbedding: llama3 rope_scaling needs "
                f"0 < low_freq_factor < high_freq_factor, got {low} and {high}"
            )


class RotaryEmbedding(nn.Module):
    """cos/sin for rotary embeddings, HF LlamaRotaryEmbedding's forward(x, position_ids).

    rope_scaling: None, {"rope_type": "linear", "factor": f} (positions divided by f), or
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}. partial_rotary_factor < 1 rotates only the first
    int(head_dim * partial_rotary_factor) features (GPT-NeoX / Phi); perfml.ops.rope reads that
    rotary_dim from cos.shape[-1].
    """

    inv_freq: Tensor

    def __init__(
        self,
        head_dim: int,
        max_position_embeddings: int = 2048,
        base: float = 10000.0,
        rope_scaling: Mapping[str, Any] | None = None,
        partial_rotary_factor: float = 1.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        rotary_dim = int(head_dim * partial_rotary_factor)
        if head_dim <= 0 or not 0 < partial_rotary_factor <= 1:
            raise ValueError(
                "RotaryEmbedding: head_dim must be positive and partial_rotary_factor in (0, 1], "
                f"got {head_dim} and {partial_rotary_factor}"
            )
        if rotary_dim < 2 or rotary_dim % 2:
            raise ValueError(
                "RotaryEmbedding: rotary_dim = int(head_dim * partial_rotary_factor) must be even "
                f"and at least 2, got {rotary_dim}"
            )
        if max_position_embeddings <= 0:
            raise ValueError(
                "RotaryEmbedding: max_position_embeddings must be positive, "
                f"got {max_position_embeddings}"
            )
        if base <= 1:
            raise ValueError(f"RotaryEmbedding: base must be > 1, got {base}")
        if rope_scaling is not None:
            _check_scaling(rope_scaling)
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        self.rope_scaling = dict(rope_scaling) if rope_scaling is not None else None
        inv_freq = _default_inv_freq(rotary_dim, base, device)
        kind = _scaling_type(rope_scaling) if rope_scaling is not None else "default"
        if kind == "linear":
            inv_freq = inv_freq / float(rope_scaling["factor"])
        elif kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin of shape [*position_ids.shape, rotary_dim] ([B, T, R] for HF's [B, T]
        position_ids) in x.dtype on x.device; x is read for its dtype and device only."""
        positions = position_ids.to(device=x.device, dtype=torch.float32)
        freqs = positions.unsqueeze(-1) * self.inv_freq.to(device=x.device, dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def cos_sin_table(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """cos, sin for positions 0..max_position_embeddings-1, [P, rotary_dim] each: the tables
        perfml.ops.rope indexes when it is given position_ids."""
        positions = torch.arange(self.max_position_embeddings, device=self.inv_freq.device)
        x = torch.empty(0, dtype=dtype, device=self.inv_freq.device)
        return self(x, positions)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, "
            f"max_position_embeddings={self.max_position_embeddings}, "
            f"rope_scaling={self.rope_scaling}"
        )
