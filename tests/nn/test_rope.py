"""perfml.nn.RotaryEmbedding against HF LlamaRotaryEmbedding's arithmetic and the published Llama 3
frequency scaling, and end to end with perfml.ops.rope."""

import math

import pytest
import torch

from perfml.nn import RotaryEmbedding
from perfml.ops import rope, rope_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _hf_cos_sin(inv_freq, x, position_ids):
    # transformers' LlamaRotaryEmbedding.forward (attention_scaling: 1 for default/linear/llama3)
    inv_freq_expanded = inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    position_ids_expanded = position_ids[:, None, :].float()
    freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _published_llama3(freqs, factor, low_freq_factor, high_freq_factor, old_context_len):
    """Meta's `apply_scaling` (llama-models, Llama 3.1), one frequency at a time in float64."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return out


def test_default_inv_freq_is_hf_bit_for_bit():
    m = RotaryEmbedding(128, base=10000.0, device=DEVICE)
    hf = 1.0 / (
        10000.0 ** (torch.arange(0, 128, 2, dtype=torch.int64, device=DEVICE).float() / 128)
    )
    assert m.inv_freq.dtype == torch.float32
    assert torch.equal(m.inv_freq, hf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3])
def test_forward_is_hf_bit_for_bit(scaling, dtype):
    m = RotaryEmbedding(64, base=500000.0, rope_scaling=scaling, device=DEVICE)
    x = torch.randn(2, 9, 64, device=DEVICE, dtype=dtype)
    position_ids = torch.stack([torch.arange(9), torch.arange(100, 109)]).to(DEVICE)
    cos, sin = m(x, position_ids)
    want_cos, want_sin = _hf_cos_sin(m.inv_freq, x, position_ids)
    assert cos.shape == sin.shape == (2, 9, 64) and cos.dtype == sin.dtype == dtype
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)


def test_forward_values_in_float64():
    m = RotaryEmbedding(32, base=10000.0, device=DEVICE)
    pos = torch.tensor([[0, 1, 7, 2047]], device=DEVICE)
    cos, sin = m(torch.empty(0, device=DEVICE), pos)
    inv = 1.0 / 10000.0 ** (torch.arange(0, 32, 2, dtype=torch.float64, device=DEVICE) / 32)
    angles = pos[..., None].double() * inv
    torch.testing.assert_close(cos.double(), angles.cos().repeat(1, 1, 2), rtol=0, atol=1e-4)
    torch.testing.assert_close(sin.double(), angles.sin().repeat(1, 1, 2), rtol=0, atol=1e-4)


def test_llama3_scaling_matches_the_published_formula():
    m = RotaryEmbedding(128, base=500000.0, rope_scaling=LLAMA3)
    plain = RotaryEmbedding(128, base=500000.0).inv_freq
    want = _published_llama3(plain.double().tolist(), 8.0, 1.0, 4.0, 8192)
    torch.testing.assert_close(
        m.inv_freq.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0
    )
    # the three regimes all occur for Llama 3.1's head_dim and base
    wavelen = 2 * math.pi / plain
    short, long = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert short.any() and long.any() and (~short & ~long).any()
    assert torch.equal(m.inv_freq[short], plain[short])
    assert torch.equal(m.inv_freq[long], plain[long] / 8.0)


def test_linear_scaling_divides_positions():
    scaled = RotaryEmbedding(16, rope_scaling={"type": "linear", "factor": 2.0})  # legacy key
    plain = RotaryEmbedding(16)
    x = torch.empty(0)
    cos, sin = scaled(x, torch.tensor([[0, 2, 4, 6]]))
    want_cos, want_sin = plain(x, torch.tensor([[0, 1, 2, 3]]))
    torch.testing.assert_close(cos, want_cos)
    torch.testing.assert_close(sin, want_sin)


def test_state_dict_is_empty_and_buffer_follows_the_module():
    m = RotaryEmbedding(64)
    assert m.state_dict() == {} and "inv_freq" in dict(m.named_buffers())
    m.load_state_dict({})
    assert m.to("meta").inv_freq.device.type == "meta"


def test_cos_sin_never_require_grad():
    m = RotaryEmbedding(16)
    x = torch.randn(1, 4, 16, requires_grad=True)
    cos, sin = m(x, torch.arange(4)[None])
    assert not cos.requires_grad and not sin.requires_grad


def test_partial_rotary_end_to_end_matches_hf():
    # GPT-NeoX / Phi: rotary_dim = head_dim * partial_rotary_factor, the rest passes through
    m = RotaryEmbedding(80, partial_rotary_factor=0.4)
    assert m.rotary_dim == 32
    q = torch.randn(2, 5, 4, 80).transpose(1, 2)
    k = torch.randn(2, 5, 2, 80).transpose(1, 2)
    cos, sin = m(q, torch.arange(5)[None])
    assert cos.shape == (1, 5, 32)
    q_embed, k_embed = rope(q, k, cos, sin)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    for x, got in ((q, q_embed), (k, k_embed)):
        rot, rest = x[..., :32], x[..., 32:]
        half = torch.cat((-rot[..., 16:], rot[..., :16]), dim=-1)
        want = torch.cat((rot * c + half * s, rest), dim=-1)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_table_with_position_ids_equals_per_token_cos_sin(poison_empty):
    m = RotaryEmbedding(32, max_position_embeddings=64, rope_scaling=LLAMA3 | {"factor": 2.0})
    cos_table, sin_table = m.cos_sin_table(torch.bfloat16)
    assert cos_table.shape == (64, 32) and cos_table.dtype == torch.bfloat16
    q = torch.randn(2, 7, 4, 32, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(2, 7, 1, 32, dtype=torch.bfloat16).transpose(1, 2)
    pos = torch.randint(0, 64, (2, 7))
    cos, sin = m(q, pos)
    for got, want in zip(
        rope(q, k, cos_table, sin_table, position_ids=pos), rope(q, k, cos, sin), strict=True
    ):
        assert torch.equal(got, want)
    for got, want in zip(rope(q, k, cos, sin), rope_ref(q, k, cos, sin), strict=True):
        torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"head_dim": 63}, "must be even"),
        ({"head_dim": 64, "partial_rotary_factor": 0.0}, r"partial_rotary_factor in \(0, 1\]"),
        ({"head_dim": 64, "partial_rotary_factor": 0.3}, "must be even"),
        ({"head_dim": 64, "base": 1.0}, "base must be > 1"),
        (
            {"head_dim": 64, "max_position_embeddings": 0},
            "max_position_embeddings must be positive",
        ),
        (
            {"head_dim": 64, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "'yarn' is not supported",
        ),
        ({"head_dim": 64, "rope_scaling": {"rope_type": "linear"}}, r"needs the keys \['factor'\]"),
        (
            {"head_dim": 64, "rope_scaling": {"rope_type": "linear", "factor": 0}},
            "factor must be positive",
        ),
        (
            {"head_dim": 64, "rope_scaling": LLAMA3 | {"high_freq_factor": 1.0}},
            "low_freq_factor < high",
        ),
        (
            {"head_dim": 64, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            "needs the keys",
        ),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RotaryEmbedding(**kwargs)
