"""perfml.models.decode.Decoder and StaticKVCache: the static-shape decode step against the model's
own forward and generate, float and quantized, after structured pruning, rewinding, bad input.
The CUDA-graph path is compared with the eager static path on a GPU (gpu marker)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from perfml import quant, sparsity
from perfml.models import Decoder, Llama, LlamaConfig, StaticKVCache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V = 97


def small(seed: int = 0, **overrides) -> Llama:
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_layers=2, max_seq_len=32)
    torch.manual_seed(seed)
    return Llama(LlamaConfig.preset("tiny", **{**base, **overrides})).to(DEVICE).eval()


def teacher_forced(decoder: Decoder, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, 1 + N, V]: the prefill's last position, then one step per token."""
    out = [decoder.prefill(prompt).clone()]
    out += [decoder.step(tokens[:, i]).clone() for i in range(tokens.shape[1])]
    return torch.stack(out, dim=1)


def forward_logits(model: Llama, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.cat([prompt, tokens], dim=1))[:, prompt.shape[1] - 1 :]


def ids(*shape: int) -> torch.Tensor:
    return torch.randint(0, V, shape, device=DEVICE)


@pytest.mark.parametrize("fused", [False, True])
def test_teacher_forced_logits_match_the_forward(fused):
    model = small(fused=fused)
    prompt, tokens = ids(2, 5), ids(2, 4)
    got = teacher_forced(Decoder(model, 9, batch_size=2, cuda_graph=False), prompt, tokens)
    torch.testing.assert_close(got, forward_logits(model, prompt, tokens), rtol=1e-5, atol=1e-5)


def test_greedy_generate_matches_llama_generate():
    model = small(seed=1)
    prompt = ids(2, 6)
    expected = model.generate(prompt, 10, temperature=0)
    got = Decoder(model, 16, batch_size=2).generate(prompt, 10)
    assert torch.equal(got, expected)
    assert torch.equal(Decoder(model, 6, batch_size=2).generate(prompt, 0), prompt)


def test_rewinding_to_the_prompt_replays_the_same_steps():
    model = small(seed=2)
    prompt, tokens = ids(1, 4), ids(1, 3)
    decoder = Decoder(model, 7)
    first = teacher_forced(decoder, prompt, tokens)[:, 1:]
    assert decoder.length == 7
    decoder.reset(4)  # the prompt's keys and values stay
    again = torch.stack([decoder.step(tokens[:, i]).clone() for i in range(3)], dim=1)
    assert torch.equal(first, again)
    # a different continuation after the rewind overwrites the slots it reuses
    decoder.reset(4)
    other = ids(1, 3)
    got = torch.stack([decoder.step(other[:, i]).clone() for i in range(3)], dim=1)
    torch.testing.assert_close(got, forward_logits(model, prompt, other)[:, 1:])


def test_quantized_model_with_quantized_head_decodes_like_its_forward():
    model = small(seed=3, tie_embeddings=False)
    every_linear = lambda m, fqn: isinstance(m, nn.Linear)  # noqa: E731
    quant.quantize(model, quant.Int8WeightOnlyConfig(), filter_fn=every_linear)
    assert isinstance(model.lm_head, quant.Int8WeightOnlyLinear)
    prompt, tokens = ids(1, 5), ids(1, 3)
    got = teacher_forced(Decoder(model, 8), prompt, tokens)
    torch.testing.assert_close(got, forward_logits(model, prompt, tokens), rtol=1e-4, atol=1e-4)
    # the loss of a quantized head goes through its kernel and F.cross_entropy
    labels = ids(1, 8)
    with torch.no_grad():
        logits = model(torch.cat([prompt, tokens], dim=1))
        loss = model(torch.cat([prompt, tokens], dim=1), labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits[0].float(), labels[0]))
    with pytest.raises(TypeError, match="lm_head is a Int8WeightOnlyLinear"):
        _ = model.output_weight


def test_structurally_pruned_model_decodes():
    """Layers with fewer kv heads than the config says: the cache sizes each layer's buffers."""
    model = small(seed=4, num_heads=4, num_kv_heads=4)
    sparsity.prune(model, sparsity.StructuredConfig(mlp_amount=0.25, head_amount=0.5))
    assert model.layers[0].self_attn.num_kv_heads == 2
    # attention FLOPs follow the layers' own head counts (2 of 4 query heads kept, head_dim 16)
    matmul = sum(p.numel() for p in model.parameters() if p.dim() == 2)  # the tied head counts
    assert model.flops_per_token(8) == 6 * matmul + 12 * (2 * 2 * 16) * 8
    prompt, tokens = ids(1, 5), ids(1, 4)
    got = teacher_forced(Decoder(model, 9), prompt, tokens)
    torch.testing.assert_close(got, forward_logits(model, prompt, tokens), rtol=1e-5, atol=1e-5)


def test_static_cache_mask_and_writes():
    cache = StaticKVCache(num_layers=1, max_len=5, device=DEVICE)
    cache.reset(2)
    mask = cache.attention_mask(2)
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool, device=DEVICE)
    assert torch.equal(mask, expected)
    k = torch.randn(1, 2, 2, 4, device=DEVICE)
    full_k, full_v = cache.update(0, k, -k)
    assert full_k.shape == (1, 2, 5, 4)
    assert torch.equal(full_k[:, :, 2:4], k) and torch.equal(full_v[:, :, 2:4], -k)
    assert not full_k[:, :, [0, 1, 4]].any()
    cache.advance(2)
    assert cache.length == 4 and int(cache.position) == 4
    with pytest.raises(ValueError, match="6 positions exceed max_len 5"):
        cache.update(0, k, k)
    with pytest.raises(ValueError, match="cannot rewind to 6"):
        cache.reset(6)


def test_bad_input_is_named():
    model = small()
    with pytest.raises(ValueError, match=r"max_len must be in \[1, 32\]"):
        Decoder(model, 33)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Decoder(model, 8, batch_size=0)
    with pytest.raises(TypeError, match="must be a perfml Llama"):
        Decoder(nn.Linear(2, 2), 8)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
            Decoder(model, 8, cuda_graph=True)
    decoder = Decoder(model, 6, batch_size=2)
    with pytest.raises(ValueError, match="batch of 1 sequences, the decoder was built for 2"):
        decoder.prefill(ids(1, 3))
    with pytest.raises(TypeError, match="token ids must be integers"):
        decoder.prefill(torch.zeros(2, 3, device=DEVICE))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\] with T >= 1"):
        decoder.prefill(ids(2, 0))
    decoder.prefill(ids(2, 5))
    decoder.step(ids(2))
    with pytest.raises(ValueError, match="7 positions exceed max_len 6"):
        decoder.step(ids(2))
    with pytest.raises(ValueError, match="one token per sequence"):
        decoder.step(ids(2, 2))
    with pytest.raises(ValueError, match="exceeds max_len 6"):
        decoder.generate(ids(2, 4), 3)


@pytest.mark.gpu
@pytest.mark.parametrize("method", [None, "int8", "int4"])
def test_cuda_graph_replay_matches_eager_steps(method):
    model = small(seed=5, tie_embeddings=False).to(torch.bfloat16)
    if method is not None:
        config = quant.Int8WeightOnlyConfig() if method == "int8" else quant.Int4WeightOnlyConfig()
        quant.quantize(model, config, filter_fn=lambda m, f: isinstance(m, nn.Linear))
    prompt, tokens = ids(1, 5), ids(1, 6)
    eager = teacher_forced(Decoder(model, 11, cuda_graph=False), prompt, tokens)
    graphed = Decoder(model, 11, cuda_graph=True)
    got = teacher_forced(graphed, prompt, tokens)
    assert graphed._graph is not None
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    graphed.reset(5)  # replays after a rewind give the same logits
    again = torch.stack([graphed.step(tokens[:, i]).clone() for i in range(6)], dim=1)
    torch.testing.assert_close(again, got[:, 1:], rtol=0, atol=0)


def test_sampling_and_eos_follow_llama_generate():
    model = small(seed=6)
    prompt = ids(2, 4)
    decoder = Decoder(model, 16, batch_size=2)
    for kwargs in ({"temperature": 0.8, "top_k": 5}, {"temperature": 1.3}):
        expected = model.generate(
            prompt, 9, generator=torch.Generator(DEVICE).manual_seed(3), **kwargs
        )
        got = decoder.generate(
            prompt, 9, generator=torch.Generator(DEVICE).manual_seed(3), **kwargs
        )
        assert torch.equal(got, expected), kwargs
    # eos: rows that produced it are padded with it; all rows done -> stop early
    greedy = model.generate(prompt, 9, temperature=0)
    eos = int(greedy[0, 5])
    expected = model.generate(prompt, 9, temperature=0, eos_token_id=eos)
    assert torch.equal(decoder.generate(prompt, 9, eos_token_id=eos), expected)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        decoder.generate(prompt, 2, temperature=-1)
    with pytest.raises(ValueError, match="top_k must be None or >= 1"):
        decoder.generate(prompt, 2, top_k=0)


def test_prefill_after_generate_says_to_reset():
    """generate() leaves the cache full; a second prefill must say how to start over."""
    model = small(seed=5)
    prompt = ids(1, 4)
    decoder = Decoder(model, 8)
    decoder.generate(prompt, 4, temperature=0)
    with pytest.raises(ValueError, match=r"7 of 8 positions are already filled.*reset\(\)"):
        decoder.prefill(prompt)
    decoder.reset()
    with torch.no_grad():
        expected = model(prompt)[:, -1]
    torch.testing.assert_close(decoder.prefill(prompt), expected, rtol=1e-5, atol=1e-5)
