"""RoPE benchmark case: HF apply_rotary_pos_emb's eager code vs torch.compile of it, Liger and
perfml, on q and k as HF hands them over (transposed views of the [B, T, H, D] projections) with
cos/sin in the model dtype, shared by the batch ([1, T, D], as HF's training forward makes them).

Shapes are (B, Hq, Hk, T, D). Anchor (ANCHORS.md, H200, bf16, q 4x32x4096x128 and k 8 heads):
best so far torch.compile, 2723 GB/s fwd and 1947 GB/s fwd+bwd; perfml's target is >= 3600 / 3400.
"""

from __future__ import annotations

import torch
from torch import Tensor

from perfml.bench import impls
from perfml.bench.cost import rope_bytes
from perfml.bench.registry import Case, Shape, Sizes, register
from perfml.nn.rope import RotaryEmbedding
from perfml.ops.rope import rope, rope_ref


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    b, hq, hk, t, d = shape
    q = torch.randn(b, t, hq, d, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, t, hk, d, device=device, dtype=dtype).transpose(1, 2)
    rotary = RotaryEmbedding(d, max_position_embeddings=t, base=500000.0, device=device)
    cos, sin = rotary(q, torch.arange(t, device=device)[None])
    return q, k, cos, sin


def _rotate_half(x: Tensor) -> Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _hf_apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor):
    # transformers' apply_rotary_pos_emb (Llama), verbatim apart from the names
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    q_embed = (q * cos) + (_rotate_half(q) * sin)
    k_embed = (k * cos) + (_rotate_half(k) * sin)
    return q_embed, k_embed


def _liger_rope():
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    # some Liger versions also return cos and sin
    return lambda q, k, cos, sin: tuple(liger_rotary_pos_emb(q, k, cos, sin)[:2])


register(
    Case(
        name="rope",
        family="position",
        description="rotary embedding of q and k (HF layout, GQA), shape (B, Hq, Hk, T, D)",
        sizes=Sizes(
            cuda=(
                (4, 32, 8, 4096, 128),  # Llama-3-8B
                (4, 64, 8, 4096, 128),  # Llama-3-70B
                (4, 28, 4, 4096, 128),  # Qwen2.5-7B
                (16, 32, 8, 1024, 128),
                (4, 16, 16, 4096, 64),
            ),
            cpu=((1, 8, 2, 512, 64), (2, 4, 4, 256, 128)),
            quick_cuda=((4, 32, 8, 4096, 128),),
            quick_cpu=((1, 8, 2, 256, 64),),
        ),
        make_inputs=_inputs,
        reference=rope_ref,
        bytes=rope_bytes,
        grad_inputs=(0, 1),
        impls=(
            impls.eager(_hf_apply_rotary_pos_emb),
            impls.compiled(_hf_apply_rotary_pos_emb),
            *impls.perfml_impls(rope, "rope", has_cpp=False),
            # last: Liger rotates q and k (and, in the backward, the incoming gradients) in
            # place, so it must run after every other impl has used the shared inputs
            impls.liger(_liger_rope),
        ),
    )
)
