"""The reference decoder-only LM: Llama architecture (pre-norm RMSNorm, RoPE, SwiGLU MLP,
grouped-query attention), built twice over the same parameters.

fused=True   perfml's kernels: RMSNorm, residual add + RMSNorm, RoPE, SwiGLU, and for the loss
             linear + cross-entropy, which never builds the [tokens, vocab] logits (at Llama-3's
             128256-entry vocabulary those are the largest activation of the whole model).
fused=False  plain PyTorch with the math of HF transformers' LlamaForCausalLM (fp32 RMSNorm
             rounded before the weight, rotate_half RoPE, F.silu(gate) * up, the loss over
             logits upcast to fp32): the baseline the fused path is measured and tested against.

Both paths have the same parameter names (HF-like: embed_tokens, layers.{i}.self_attn.q_proj, ...,
norm, lm_head) and shapes, so a state_dict moves between them, and both use
F.scaled_dot_product_attention (flash attention on CUDA) with enable_gqa, so the k/v heads are
never repeated in memory.

Labels are ALREADY aligned with the positions: labels[b, t] is the target of position t (the
next token of input_ids[b, t]), -100 ignored. The data loader does the shift (perfml.data), not the
model, so a packed window of T + 1 tokens yields T predictions with no wasted position.

Tied embeddings: the output head reuses embed_tokens.weight and no lm_head module exists, so the
state_dict holds each tensor once (safetensors refuses shared tensors). The fused loss reads the
head weight directly instead of calling lm_head: with FSDP2 keep embed_tokens, lm_head and norm in
the root module's group (fully_shard each layer, then the model).

Mixed precision: the fused ops are custom ops, which autocast does not cast; the model casts the
hidden states and head weight of the loss to the autocast dtype itself (what autocast does to
lm_head in the unfused path) and gives the RoPE kernel q, k in their projection dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from perfml.nn.rms_norm import RMSNorm
from perfml.nn.rope import RotaryEmbedding
from perfml.nn.swiglu import SwiGLUMLP
from perfml.ops.add_rms_norm import add_rms_norm
from perfml.ops.decode_attention import MAX_HEAD_DIM, decode_attention
from perfml.ops.linear_cross_entropy import linear_cross_entropy
from perfml.ops.rope import rope

IGNORE_INDEX = -100
INIT_STD = 0.02

_PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the demo: ~0.8M parameters at the byte vocabulary
    "tiny": {
        "vocab_size": 257,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "max_seq_len": 256,
        "rope_theta": 10000.0,
        "tie_embeddings": True,
    },
    # ~45M parameters: a model that learns something on one GPU in minutes
    "small": {
        "vocab_size": 32768,
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_layers": 8,
        "num_heads": 8,
        "num_kv_heads": 4,
        "max_seq_len": 1024,
        "rope_theta": 10000.0,
        "tie_embeddings": True,
    },
    # GPT-2 small's size (124M with tied embeddings): 4x-wide GELU MLP -> SwiGLU of equal
    # parameter count (3 x 768 x 2048), vocab 50257 padded to a multiple of 128
    "gpt2-124m": {
        "vocab_size": 50304,
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_layers": 12,
        "num_heads": 12,
        "num_kv_heads": 12,
        "max_seq_len": 1024,
        "rope_theta": 10000.0,
        "tie_embeddings": True,
    },
    # Llama-3 tokenizer, TinyLlama-like body: 1.09B parameters (untied head)
    "llama-1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_layers": 12,
        "num_heads": 16,
        "num_kv_heads": 8,
        "max_seq_len": 2048,
        "rope_theta": 500000.0,
        "tie_embeddings": False,
    },
}


# the sampling default of every generate() (Llama.generate, Decoder.generate, `perfml generate`):
# greedy, so that a continuation is reproducible unless sampling is asked for
DEFAULT_TEMPERATURE = 0.0


@dataclass
class LlamaConfig:
    """Architecture of a Llama model; `LlamaConfig.preset(name, **overrides)` for the named sizes.

    head_dim = hidden_size // num_heads (even, for RoPE); num_heads must be a multiple of
    num_kv_heads (num_kv_heads == num_heads is plain multi-head attention).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_seq_len: int
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    fused: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"LlamaConfig: {f.name} must be an int, got {value!r}")
            if f.type == "int" and value <= 0:
                raise ValueError(f"LlamaConfig: {f.name} must be positive, got {value}")
            if f.type == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"LlamaConfig: {f.name} must be a number, got {value!r}")
                setattr(self, f.name, float(value))
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"LlamaConfig: {f.name} must be true or false, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"LlamaConfig: hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                f"({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"LlamaConfig: head_dim = hidden_size / num_heads must be even for RoPE, "
                f"got {self.head_dim}"
            )
        if self.rope_theta <= 1:
            raise ValueError(f"LlamaConfig: rope_theta must be > 1, got {self.rope_theta}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"LlamaConfig: rms_norm_eps must be positive, got {self.rms_norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def presets(cls) -> tuple[str, ...]:
        return tuple(_PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """The named size ("tiny", "small", "gpt2-124m", "llama-1b") with fields overridden."""
        if name not in _PRESETS:
            raise ValueError(
                f"LlamaConfig: unknown preset {name!r}; known presets: {', '.join(_PRESETS)}"
            )
        return cls.from_dict({**_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Inverse of to_dict; an unknown or missing key raises a ValueError naming it."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            raise ValueError(
                f"LlamaConfig: unknown key {unknown[0]!r}; known keys: {', '.join(names)}"
            )
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"LlamaConfig: missing key {missing[0]!r}")
        return cls(**d)


# --- the unfused (HF-equivalent) building blocks -----------------------------------------------


class EagerRMSNorm(nn.Module):
    """HF LlamaRMSNorm: normalize in fp32, round to the input dtype, then scale by the weight."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class EagerMLP(nn.Module):
    """HF LlamaMLP: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    fusible_projections = ("gate_up_proj",)  # the forward reads it (perfml.models.fuse)

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate_up_proj = self._modules.get("gate_up_proj")  # set by perfml.models.fuse
        if gate_up_proj is not None:
            gate, up = gate_up_proj(x).chunk(2, dim=-1)  # views of one [.., 2I] output
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def eager_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """HF apply_rotary_pos_emb on q [B, Hq, T, D], k [B, Hk, T, D] with cos, sin [B or 1, T, D];
    the result is rounded back to q's dtype (HF leaves it promoted to cos's dtype, which under
    autocast is fp32 and costs SDPA a cast)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q_out = q * cos + _rotate_half(q) * sin
    k_out = k * cos + _rotate_half(k) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


# --- the model ---------------------------------------------------------------------------------


class KVCache:
    """Keys and values of the tokens seen so far, per layer [B, Hkv, max_len, D], preallocated on
    the first update in that layer's dtype; `length` tokens are filled. The attention reads the
    filled part only, so the shapes grow with every token (eager decoding; see StaticKVCache for
    the CUDA-graph-friendly form)."""

    def __init__(self, num_layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self._k: list[Tensor | None] = [None] * num_layers
        self._v: list[Tensor | None] = [None] * num_layers

    def positions(self, t: int, device: torch.device) -> Tensor:
        """Positions [1, t] of the next t tokens."""
        return torch.arange(self.length, self.length + t, device=device).unsqueeze(0)

    def attention_mask(self, t: int) -> Tensor | None:
        return None  # _attention masks the last t of the filled positions causally itself

    def advance(self, t: int) -> None:
        self.length += t

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v [B, Hkv, T, D] after the filled positions; returns all keys and values."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache: {end} positions exceed the cache's max_len {self.max_len}")
        if self._k[layer] is None:
            shape = (*k.shape[:2], self.max_len, k.shape[3])
            self._k[layer] = k.new_zeros(shape)
            self._v[layer] = v.new_zeros(shape)
        cache_k, cache_v = self._k[layer], self._v[layer]
        cache_k[:, :, self.length : end] = k
        cache_v[:, :, self.length : end] = v
        return cache_k[:, :, :end], cache_v[:, :, :end]


class StaticKVCache:
    """A KV cache whose shapes never change: the write position is a device tensor, every step
    attends over all max_len slots with a mask hiding the unwritten ones. One decode step is then
    the same kernels on the same buffers every time, which a CUDA graph can capture and replay
    (perfml.models.decode.Decoder does). `length` is the host's count of filled positions: it
    moves with advance() in eager use; whoever replays a captured step moves it with sync().

    Buffers per layer [B, Hkv, max_len, D] are allocated on the first update in k's dtype and
    head count (a structurally pruned layer may have fewer heads)."""

    def __init__(self, num_layers: int, max_len: int, device: torch.device | str = "cpu") -> None:
        if max_len < 1:
            raise ValueError(f"StaticKVCache: max_len must be >= 1, got {max_len}")
        self.max_len = max_len
        self.length = 0
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self._slots = torch.arange(max_len, device=device)
        self._step: tuple[int, Tensor, Tensor] | None = None  # see _indices
        self._k: list[Tensor | None] = [None] * num_layers
        self._v: list[Tensor | None] = [None] * num_layers

    def reset(self, length: int = 0) -> None:
        """Rewind to `length` filled positions (the keys and values before it stay valid)."""
        if not 0 <= length <= self.max_len:
            raise ValueError(f"StaticKVCache: cannot rewind to {length} of {self.max_len}")
        self.length = length
        self.position.fill_(length)
        self._step = None

    def sync(self, t: int) -> None:
        """Record on the host that a replayed step advanced the device position by t."""
        self.length += t

    def _indices(self, t: int) -> tuple[Tensor, Tensor]:
        """(the slots [t] the next t tokens go to, their attention mask [t, max_len]), computed
        once per forward and shared by every layer (fewer kernels in a decode step)."""
        if self._step is None or self._step[0] != t:
            index = self.position + torch.arange(t, device=self._slots.device)
            mask = self._slots.unsqueeze(0) <= index.unsqueeze(1)
            self._step = (t, index, mask)
        return self._step[1], self._step[2]

    def positions(self, t: int, device: torch.device) -> Tensor:
        return self._indices(t)[0].unsqueeze(0)

    def attention_mask(self, t: int) -> Tensor:
        """[t, max_len] bool: query i (at position + i) sees the slots up to its own position."""
        return self._indices(t)[1]

    def advance(self, t: int) -> None:
        self.length += t
        self.position.add_(t)
        self._step = None

    def _buffers(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.length + k.shape[2] > self.max_len:
            raise ValueError(
                f"StaticKVCache: {self.length + k.shape[2]} positions exceed max_len {self.max_len}"
            )
        if self._k[layer] is None:
            shape = (*k.shape[:2], self.max_len, k.shape[3])
            self._k[layer] = k.new_zeros(shape)
            self._v[layer] = v.new_zeros(shape)
        return self._k[layer], self._v[layer]

    def decode_attention(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """One token per sequence (q [B, Hq, 1, D], k, v [B, Hkv, 1, D]): write k, v at the
        device position and attend over the slots up to it, in one perfml kernel; [B, Hq, 1, D]."""
        k_cache, v_cache = self._buffers(layer, k, v)
        return decode_attention(q, k, v, k_cache, v_cache, self.position)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, Hkv, T, D] at the device position; returns the whole buffers."""
        self._buffers(layer, k, v)
        index = self._indices(k.shape[2])[0]
        self._k[layer].index_copy_(2, index, k)
        self._v[layer].index_copy_(2, index, v)
        return self._k[layer], self._v[layer]


class BatchedKVCache:
    """The KV cache of continuous batching: `max_batch` slots of `max_len` positions each, one
    sequence per slot, every slot at its own length. Buffers per layer [max_batch, Hkv, max_len,
    D] are allocated once, here, for the layer shapes given (`BatchedKVCache.for_model`); the
    per-slot position (the slot of each sequence's next token) is a device tensor [max_batch],
    and `active` [max_batch] (1 for a slot holding a sequence) says which slots a decode step
    advances, so a step never synchronizes with the host and a CUDA graph can replay it.

    slot(i) is the cache a prompt's prefill runs with (Llama.hidden_states(ids [1, T],
    cache.slot(i)): the ordinary causal forward of that prompt alone, writing its keys and values
    into slot i from position 0). rows(n) is the cache of one batched decode step over slots
    0..n-1 (input_ids [n, 1]): row r's token goes to position[r] and attends over its slots
    0..position[r] (perfml.ops.decode_attention with per-row positions in a fused model, SDPA
    with a per-row mask otherwise); rows not active compute on whatever they hold and change
    nothing that a later prefill does not overwrite. free(i) empties a slot at once."""

    def __init__(
        self,
        max_batch: int,
        max_len: int,
        layer_shapes: list[tuple[int, int]],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if max_batch < 1 or max_len < 1:
            raise ValueError(
                f"BatchedKVCache: max_batch and max_len must be >= 1, got {max_batch}, {max_len}"
            )
        self.max_batch = max_batch
        self.max_len = max_len
        self.position = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.active = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.lengths = [0] * max_batch  # the host's count of filled positions per slot
        self.occupied = [False] * max_batch  # the host's copy of `active`
        shapes = [(max_batch, hkv, max_len, d) for hkv, d in layer_shapes]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self._slots = torch.arange(max_len, device=device)
        self._rows: dict[int, _BatchedRows] = {}

    @classmethod
    def for_model(
        cls, model: nn.Module, max_batch: int, max_len: int, dtype: torch.dtype | None = None
    ) -> BatchedKVCache:
        """The cache for a perfml Llama's layers (their own kv head counts: a structurally
        pruned layer may have fewer), in the embedding's dtype unless given, on its device."""
        weight = model.embed_tokens.weight
        shapes = [
            (layer.self_attn.num_kv_heads, layer.self_attn.head_dim) for layer in model.layers
        ]
        return cls(max_batch, max_len, shapes, dtype or weight.dtype, weight.device)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_batch:
            raise IndexError(f"BatchedKVCache: slot {slot} is not in 0..{self.max_batch - 1}")

    def slot(self, slot: int) -> _BatchedSlot:
        """The cache of a prefill of one sequence into `slot` (its earlier contents dropped)."""
        self._check_slot(slot)
        self.free(slot)
        return _BatchedSlot(self, slot)

    def rows(self, n: int) -> _BatchedRows:
        """The cache of a decode step over slots 0..n-1 (one object per n, reused)."""
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"BatchedKVCache: rows must be in 1..{self.max_batch}, got {n}")
        if n not in self._rows:
            self._rows[n] = _BatchedRows(self, n)
        return self._rows[n]

    def free(self, slot: int) -> None:
        """Empty `slot` (position 0, inactive): it is ready for the next prefill at once."""
        self._check_slot(slot)
        self.lengths[slot] = 0
        self.occupied[slot] = False
        self.position[slot] = 0
        self.active[slot] = 0


class _BatchedSlot:
    """BatchedKVCache.slot(i): the KVCache interface for a prompt's prefill into slot i."""

    length = 0

    def __init__(self, cache: BatchedKVCache, slot: int) -> None:
        self.cache = cache
        self.slot = slot

    def positions(self, t: int, device: torch.device) -> Tensor:
        return torch.arange(t, device=device).unsqueeze(0)

    def attention_mask(self, t: int) -> None:
        return None  # update returns exactly the prompt's positions: causal SDPA

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v [1, Hkv, T, D] into positions 0..T-1 of the slot; those positions come back."""
        t = k.shape[2]
        if k.shape[0] != 1 or t > self.cache.max_len:
            raise ValueError(
                f"BatchedKVCache: a prefill is one sequence of at most {self.cache.max_len} "
                f"tokens, got k of shape {tuple(k.shape)}"
            )
        k_slot = self.cache.k[layer][self.slot : self.slot + 1, :, :t]
        v_slot = self.cache.v[layer][self.slot : self.slot + 1, :, :t]
        k_slot.copy_(k)
        v_slot.copy_(v)
        return k_slot, v_slot

    def advance(self, t: int) -> None:
        cache = self.cache
        cache.lengths[self.slot] = t
        cache.occupied[self.slot] = True
        cache.position[self.slot] = t
        cache.active[self.slot] = 1


class _BatchedRows:
    """BatchedKVCache.rows(n): the cache interface for one decode step over slots 0..n-1."""

    def __init__(self, cache: BatchedKVCache, n: int) -> None:
        self.cache = cache
        self.n = n
        self.position = cache.position[:n]  # views: the step reads the live positions
        self.active = cache.active[:n]
        self._rows = torch.arange(n, device=cache.position.device)

    @property
    def length(self) -> int:
        """The longest filled slot among the rows (Llama.hidden_states checks it)."""
        return max(self.cache.lengths[: self.n])

    def positions(self, t: int, device: torch.device) -> Tensor:
        if t != 1:
            raise ValueError(f"BatchedKVCache: a decode step feeds one token per row, got {t}")
        return self.position.unsqueeze(1)  # [n, 1]

    def attention_mask(self, t: int) -> Tensor:
        """[n, 1, 1, max_len] bool: row r sees its slots 0..position[r]."""
        return (self.cache._slots <= self.position.unsqueeze(1))[:, None, None, :]

    def decode_attention(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The fused path: k, v into each row's own slot and attention over it, one kernel."""
        k_cache, v_cache = self.cache.k[layer][: self.n], self.cache.v[layer][: self.n]
        return decode_attention(q, k, v, k_cache, v_cache, self.position)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v [n, Hkv, 1, D] into slot position[r] of row r; the rows' whole buffers."""
        k_cache, v_cache = self.cache.k[layer][: self.n], self.cache.v[layer][: self.n]
        k_cache[self._rows, :, self.position] = k[:, :, 0]
        v_cache[self._rows, :, self.position] = v[:, :, 0]
        return k_cache, v_cache

    def advance(self, t: int) -> None:
        self.position.add_(self.active)  # inactive rows stay where they are
        lengths = self.cache.lengths
        for row in range(self.n):
            if self.cache.occupied[row]:
                lengths[row] += t


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Causal SDPA of q [B, Hq, T, D] over k, v [B, Hk, S, D] whose last T positions are q's, or
    over the slots `mask` [T, S] allows (a static cache)."""
    gqa = q.shape[1] != k.shape[1]
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    t, s = q.shape[2], k.shape[2]
    if t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if t == 1:  # one new token attends to everything cached
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    # SDPA's is_causal aligns the mask top-left; with a cache the queries are the last T keys
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class LlamaAttention(nn.Module):
    fusible_projections = ("qkv_proj",)  # the forward reads it (perfml.models.fuse)

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.fused = config.fused
        hidden, kv_dim = config.hidden_size, config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(hidden, config.num_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, hidden, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | StaticKVCache | _BatchedSlot | _BatchedRows | None,
    ) -> Tensor:
        b, t, _ = x.shape
        qkv_proj = self._modules.get("qkv_proj")  # set by perfml.models.fuse
        if qkv_proj is not None:
            kv_dim = self.num_kv_heads * self.head_dim
            q, k, v = qkv_proj(x).split((self.num_heads * self.head_dim, kv_dim, kv_dim), -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # [B, T, H * D] -> [B, H, T, D] views; RoPE and SDPA read the strides as they are
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, k, cos, sin) if self.fused else eager_rope(q, k, cos, sin)
        if (
            self.fused
            and t == 1
            and isinstance(cache, (StaticKVCache, _BatchedRows))
            and self.head_dim <= MAX_HEAD_DIM
            and not (torch.is_grad_enabled() and q.requires_grad)
        ):
            # one kernel: the new k, v into the cache and the token's attention over it
            out = cache.decode_attention(self.layer_idx, q, k, v)
        else:
            mask = None
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)
                mask = cache.attention_mask(t)
            out = _attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


def _norm(config: LlamaConfig) -> nn.Module:
    if config.fused:
        return RMSNorm(config.hidden_size, eps=config.rms_norm_eps, cast="llama")
    return EagerRMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.fused = config.fused
        self.input_layernorm = _norm(config)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = _norm(config)
        mlp = SwiGLUMLP if config.fused else EagerMLP
        self.mlp = mlp(config.hidden_size, config.intermediate_size)

    def forward(
        self, h: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | StaticKVCache | None = None
    ) -> Tensor:
        attn = self.self_attn(self.input_layernorm(h), cos, sin, cache)
        if self.fused:
            norm = self.post_attention_layernorm
            # under autocast attn is bf16 while the residual stream stays fp32: `h + attn`
            # promotes, so the fused add takes attn in h's dtype to round identically
            x, h = add_rms_norm(attn.to(h.dtype), h, norm.weight, norm.eps)
        else:
            h = h + attn
            x = self.post_attention_layernorm(h)
        return h + self.mlp(x)


def _dense_head(lm_head: nn.Module | None) -> bool:
    """A tied head or a plain nn.Linear (the fused loss reads its weight); False for a quantized
    head, whose loss goes through its own kernel and F.cross_entropy."""
    return lm_head is None or isinstance(lm_head, nn.Linear)


class Llama(nn.Module):
    """Decoder-only LM. model(ids) -> logits [B, T, V] in the compute dtype; model(ids, labels)
    -> the loss (labels aligned with positions, -100 ignored; see the module docstring)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = _norm(config)
        self.lm_head = (
            None
            if config.tie_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_seq_len, base=config.rope_theta
        )
        # torch.utils.checkpoint around each layer in training: the activations of a layer are
        # recomputed in the backward instead of being kept
        self.activation_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights, residual projections (o_proj, down_proj) scaled by
        1/sqrt(2 * num_layers) as in GPT-2, norms at 1. Deterministic given the torch seed."""
        resid_std = INIT_STD / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, resid_std)
            else:
                p.normal_(0.0, INIT_STD)

    @property
    def output_weight(self) -> Tensor:
        """The head's [V, H] weight: lm_head's, or embed_tokens' when tied."""
        if not _dense_head(self.lm_head):
            raise TypeError(
                f"Llama.output_weight: lm_head is a {type(self.lm_head).__name__} with no float "
                "weight; use Llama.logits()"
            )
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters (a tied weight counted once); exclude_embeddings drops the input table
        (the untied output head stays: it is a matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.lm_head is not None:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM's appendix-B count used for MFU:
        6 x the matmul parameters (every weight but the embedding lookup and the norms) plus
        12 x (query heads x head_dim, summed over the layers) x seq_len for attention's two
        matmuls, without the causal discount. seq_len defaults to max_seq_len."""
        seq_len = self.config.max_seq_len if seq_len is None else seq_len
        norms = sum(p.numel() for p in self.parameters() if p.dim() == 1)
        matmul_params = self.num_params(exclude_embeddings=True) - norms
        # per layer: structured pruning may leave layers with fewer heads than the config's
        heads = sum(layer.self_attn.num_heads for layer in self.layers)
        return 6 * matmul_params + 12 * heads * self.config.head_dim * seq_len

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.activation_checkpointing = enabled

    def fuse_projections(self, *, qkv: bool = True, gate_up: bool = True) -> Llama:
        """perfml.models.fuse_projections(self): q/k/v -> qkv_proj, gate/up -> gate_up_proj in
        every layer, in place (the state_dict keeps the separate names)."""
        from perfml.models.fuse import fuse_projections

        return fuse_projections(self, qkv=qkv, gate_up=gate_up)

    def hidden_states(
        self, input_ids: Tensor, kv_cache: KVCache | StaticKVCache | None = None
    ) -> Tensor:
        """The final normed hidden states [B, T, H]; with a cache, input_ids continue it."""
        if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(
                f"Llama: input_ids must be an integer tensor [B, T], got {input_ids.dtype} "
                f"{tuple(input_ids.shape)}"
            )
        past = kv_cache.length if kv_cache is not None else 0
        t = input_ids.shape[1]
        if past + t > self.config.max_seq_len:
            raise ValueError(
                f"Llama: {past + t} positions exceed max_seq_len {self.config.max_seq_len}"
            )
        h = self.embed_tokens(input_ids)
        if kv_cache is None:
            positions = torch.arange(t, device=input_ids.device).unsqueeze(0)
        else:
            positions = kv_cache.positions(t, input_ids.device)
        cos, sin = self.rotary_emb(h, positions)  # [1, T, D] each
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                h = checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(t)
        return self.norm(h)

    def logits(self, hidden: Tensor) -> Tensor:
        """The output head on hidden states [..., H] -> [..., V] (a quantized lm_head runs its
        own kernel)."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return F.linear(hidden, self.embed_tokens.weight)

    def forward(
        self, input_ids: Tensor, labels: Tensor | None = None, *, reduction: str = "mean"
    ) -> Tensor:
        """Logits [B, T, V] without labels; with labels [B, T] (target of each position, -100
        ignored) the loss: "mean" over the non-ignored tokens or their "sum"."""
        hidden = self.hidden_states(input_ids)
        if labels is None:
            return self.logits(hidden)
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"Llama: labels must have input_ids' shape {tuple(input_ids.shape)} (aligned with "
                f"the positions, already shifted), got {tuple(labels.shape)}"
            )
        if reduction not in ("mean", "sum"):
            raise ValueError(f"Llama: reduction must be 'mean' or 'sum', got {reduction!r}")
        hidden, labels = hidden.flatten(0, 1), labels.flatten()
        if not self.config.fused or not _dense_head(self.lm_head):
            logits = self.logits(hidden).float()
            return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction=reduction)
        weight = self.output_weight
        device = hidden.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        # the op returns the loss in its input dtype (F.cross_entropy's rule): under bf16 the
        # value is rounded to bf16 (the gradients are not); fp32 for both paths' callers
        loss = linear_cross_entropy(
            hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction=reduction
        )
        return loss.float()

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = DEFAULT_TEMPERATURE,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue input_ids [B, T] by up to max_new_tokens tokens with a KV cache; returns
        [B, T + n]. temperature=0 (the default, as in Decoder.generate and `perfml generate`)
        is greedy; temperature > 0 samples (with `generator`), top_k keeping the k most likely
        tokens. A row that produced eos_token_id is padded with it; generation stops when every
        row has."""
        check_sampling("Llama.generate", max_new_tokens, temperature, top_k)
        total = input_ids.shape[-1] + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(
                f"Llama.generate: prompt + max_new_tokens = {total} exceeds max_seq_len "
                f"{self.config.max_seq_len}"
            )
        cache = KVCache(self.config.num_layers, total)
        return sample_tokens(
            input_ids,
            max_new_tokens,
            lambda: self.logits(self.hidden_states(input_ids, cache)[:, -1]),
            lambda token: self.logits(self.hidden_states(token.unsqueeze(1), cache)[:, -1]),
            temperature,
            top_k,
            eos_token_id,
            generator,
        )


def check_sampling(who: str, max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    """The generation arguments every generate() shares; a ValueError naming the bad one."""
    if max_new_tokens < 0:
        raise ValueError(f"{who}: max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"{who}: temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"{who}: top_k must be None or >= 1, got {top_k}")


def sample_tokens(
    input_ids: Tensor,
    max_new_tokens: int,
    first_logits: Callable[[], Tensor],
    next_logits: Callable[[Tensor], Tensor],
    temperature: float,
    top_k: int | None,
    eos_token_id: int | None,
    generator: torch.Generator | None,
) -> Tensor:
    """The sampling loop of every generate(): first_logits() runs the prompt, next_logits(token
    [B]) feeds one token per row; both return the logits [B, V] of the last position. A row that
    produced eos_token_id is padded with it; the loop stops when every row has. [B, T + n]."""
    new: list[Tensor] = []
    if max_new_tokens:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        logits = first_logits()
        for step in range(max_new_tokens):
            token = _sample(logits.float(), temperature, top_k, generator)
            if eos_token_id is not None:
                token = torch.where(done, eos_token_id, token)
                done |= token == eos_token_id
            new.append(token)
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits = next_logits(token)
    return torch.cat([input_ids, *(t.unsqueeze(1) for t in new)], dim=1)


def _sample(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """One token per row of logits [B, V]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
