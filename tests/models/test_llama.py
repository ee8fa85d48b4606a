"""perfml.models.llama: config and presets, the fused path against the unfused (HF-math) one and
both against the float64 model, loss semantics, attention masking, generation with a KV cache.

In interpret mode every fused kernel runs in the Triton interpreter, so the fused models here are
small (2 layers, hidden 64, T <= 16)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from perfml.models.llama import KVCache, Llama, LlamaConfig, _attention
from tests.utils import assert_matches_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V = 97


def small_config(**overrides) -> LlamaConfig:
    base = dict(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_layers=2, max_seq_len=32
    )  # tiny's heads: 4 query heads over 2 kv heads, head_dim 16
    return LlamaConfig.preset("tiny", **{**base, **overrides})


def twin_models(seed: int = 0, **overrides) -> tuple[Llama, Llama]:
    """(unfused, fused) with the same weights."""
    torch.manual_seed(seed)
    eager = Llama(small_config(fused=False, **overrides)).to(DEVICE)
    fused = Llama(small_config(fused=True, **overrides)).to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def batch(b: int = 2, t: int = 16, ignore: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, V, (b, t + 1), device=DEVICE)
    labels = ids[:, 1:].clone()
    if ignore:
        labels[0, :3] = -100
    return ids[:, :-1], labels


def loss_and_grads(model: Llama, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels, **kwargs)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params",
    [("tiny", 771_328), ("small", 41_951_744), ("gpt2-124m", 123_587_328)]
    + [("llama-1b", 1_091_618_816)],
)
def test_preset_sizes(name, params):
    config = LlamaConfig.preset(name)
    with torch.device("meta"):
        model = Llama(config)
    assert model.num_params() == params
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_kv_heads * config.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    heads = 1 if config.tie_embeddings else 2
    assert params == config.num_layers * per_layer + heads * config.vocab_size * h + h


def test_llama_1b_preset_is_the_issue_shape():
    c = LlamaConfig.preset("llama-1b")
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads) == (2048, 12, 16, 8)
    assert (c.intermediate_size, c.vocab_size, c.head_dim) == (5632, 128256, 128)
    c = LlamaConfig.preset("gpt2-124m")
    assert (c.num_layers, c.hidden_size, c.num_heads, c.vocab_size) == (12, 768, 12, 50304)


def test_preset_overrides_and_round_trip():
    config = LlamaConfig.preset("tiny", vocab_size=4096, fused=False, rope_theta=20000)
    assert config.vocab_size == 4096 and config.fused is False and config.rope_theta == 20000.0
    d = json.loads(json.dumps(config.to_dict()))
    assert LlamaConfig.from_dict(d) == config


def test_unknown_preset_or_key_is_named():
    with pytest.raises(ValueError, match="'huge'"):
        LlamaConfig.preset("huge")
    with pytest.raises(ValueError, match="'hidden'"):
        LlamaConfig.preset("tiny", hidden=32)
    with pytest.raises(ValueError, match="'n_layer'"):
        LlamaConfig.from_dict({**LlamaConfig.preset("tiny").to_dict(), "n_layer": 2})
    d = LlamaConfig.preset("tiny").to_dict()
    del d["num_heads"]
    with pytest.raises(ValueError, match="'num_heads'"):
        LlamaConfig.from_dict(d)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"hidden_size": 130}, "hidden_size .* multiple of num_heads"),
        ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"hidden_size": 36, "num_heads": 4, "num_kv_heads": 2}, "head_dim .* even"),
        ({"num_layers": 0}, "num_layers must be positive"),
        ({"vocab_size": "257"}, "vocab_size must be an int"),
        ({"num_layers": True}, "num_layers must be an int"),
        ({"fused": "yes"}, "fused must be true or false"),
        ({"rope_theta": 1.0}, "rope_theta"),
        ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ],
)
def test_invalid_config_is_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.preset("tiny", **overrides)


# --- structure and init ------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
def test_parameter_names(fused):
    model = Llama(small_config(fused=fused, tie_embeddings=False))
    per_layer = [
        "input_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]
    want = {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    want |= {f"layers.{i}.{name}" for i in range(2) for name in per_layer}
    assert set(model.state_dict()) == want
    assert model.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)


def test_tied_embeddings_share_one_tensor():
    model = Llama(small_config(tie_embeddings=True, fused=False))
    assert "lm_head.weight" not in model.state_dict()
    assert model.output_weight is model.embed_tokens.weight
    untied = Llama(small_config(tie_embeddings=False, fused=False))
    assert untied.num_params() - model.num_params() == V * 64
    ids = torch.randint(0, V, (1, 5))
    model(ids, ids).backward()
    assert model.embed_tokens.weight.grad is not None


def test_init_is_deterministic_and_scaled():
    torch.manual_seed(3)
    a = Llama(small_config(fused=False, num_layers=8))
    torch.manual_seed(3)
    b = Llama(small_config(fused=False, num_layers=8))
    torch.manual_seed(4)
    c = Llama(small_config(fused=False, num_layers=8))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.embed_tokens.weight, c.embed_tokens.weight)
    assert abs(a.embed_tokens.weight.std().item() - 0.02) < 0.002
    resid = torch.cat([layer.mlp.down_proj.weight.flatten() for layer in a.layers])
    assert abs(resid.std().item() - 0.02 / math.sqrt(16)) < 0.0005
    assert torch.equal(a.norm.weight, torch.ones(64))


def test_flops_per_token():
    model = Llama(small_config(fused=False, tie_embeddings=True))
    h, i, kv, layers = 64, 96, 32, 2
    matmul = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + V * h  # the tied head is a matmul
    assert model.flops_per_token(16) == 6 * matmul + 12 * layers * h * 16
    assert model.flops_per_token() == model.flops_per_token(32)
    with torch.device("meta"):
        big = Llama(LlamaConfig.preset("llama-1b"))
    # 6N of the 1.09B parameters less the input embedding, plus attention at T=2048
    assert big.flops_per_token(2048) == 6 * (1_091_618_816 - 128256 * 2048 - 25 * 2048) + (
        12 * 12 * 2048 * 2048
    )


# --- attention ---------------------------------------------------------------------------------


def _naive_attention(q, k, v):
    """Softmax attention with the queries at the last T of S positions, k/v heads repeated."""
    t, s = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    query_pos = torch.arange(s - t, s).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(s) > query_pos, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("t, s", [(7, 7), (1, 9), (4, 9)])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_is_causal_gqa(t, s, kv_heads):
    q = torch.randn(2, 4, t, 8, dtype=torch.float64)
    k = torch.randn(2, kv_heads, s, 8, dtype=torch.float64)
    v = torch.randn(2, kv_heads, s, 8, dtype=torch.float64)
    torch.testing.assert_close(_attention(q, k, v), _naive_attention(q, k, v))


def test_future_tokens_do_not_change_the_past():
    model = Llama(small_config(fused=False)).to(DEVICE)
    ids, _ = batch(1, 12)
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % V
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def assert_bf16_loss_close(loss, want, base):
    """The fused loss op returns its value in its input dtype, so in bf16 the loss is rounded
    once to bf16 (gradients are not): allowed that half ulp on top of 2x the eager error."""
    half_ulp = torch.finfo(torch.bfloat16).eps * 2 ** math.floor(math.log2(abs(want))) / 2
    err, base_err = abs(loss.item() - want.item()), abs(base.item() - want.item())
    assert err <= 2 * base_err + half_ulp, f"loss error {err:.3e}, eager {base_err:.3e}"


# --- fused vs unfused vs float64 ---------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_fused_matches_unfused_fp32(tie, poison_empty):
    eager, fused = twin_models(tie_embeddings=tie)
    ids, labels = batch()
    ref = Llama(eager.config).to(DEVICE).double()
    ref.load_state_dict(eager.state_dict())
    with torch.no_grad():
        want = ref(ids)
        assert_matches_reference(fused(ids), want, eager(ids), name="logits")
    want_loss, want_grads = loss_and_grads(ref, ids, labels)
    base_loss, base_grads = loss_and_grads(eager, ids, labels)
    loss, grads = loss_and_grads(fused, ids, labels)
    assert_matches_reference(loss, want_loss, base_loss, name="loss")
    for name, grad in want_grads.items():
        assert_matches_reference(grads[name], grad, base_grads[name], name=name)


def test_fused_matches_unfused_bf16_weights():
    eager, fused = twin_models(tie_embeddings=False)
    ids, labels = batch()
    ref = Llama(eager.config).to(DEVICE).double()
    ref.load_state_dict(eager.state_dict())
    want_loss, want_grads = loss_and_grads(ref, ids, labels)
    base_loss, base_grads = loss_and_grads(eager.bfloat16(), ids, labels)
    loss, grads = loss_and_grads(fused.bfloat16(), ids, labels)
    assert loss.dtype == torch.float32 and base_loss.dtype == torch.float32
    assert_bf16_loss_close(loss, want_loss, base_loss)
    for name in ("lm_head.weight", "layers.0.self_attn.q_proj.weight", "embed_tokens.weight"):
        assert_matches_reference(grads[name], want_grads[name], base_grads[name], name=name)


def test_fused_matches_unfused_under_autocast():
    # the trainer's bf16 mode: fp32 parameters, autocast matmuls
    eager, fused = twin_models(tie_embeddings=False)
    ids, labels = batch()
    ref = Llama(eager.config).to(DEVICE).double()
    ref.load_state_dict(eager.state_dict())
    want_loss, want_grads = loss_and_grads(ref, ids, labels)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        base_loss, base_grads = loss_and_grads(eager, ids, labels)
        loss, grads = loss_and_grads(fused, ids, labels)
        logits = fused(ids[:1, :4])
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    assert_bf16_loss_close(loss, want_loss, base_loss)
    for name, grad in want_grads.items():
        assert grads[name].dtype == torch.float32
        assert_matches_reference(grads[name], grad, base_grads[name], name=name)


# --- loss semantics ----------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
def test_loss_is_cross_entropy_of_the_logits(fused):
    model = twin_models()[int(fused)]
    ids, labels = batch(2, 8)
    with torch.no_grad():
        logits = model(ids)
        mean = model(ids, labels)
        total = model(ids, labels, reduction="sum")
    want = F.cross_entropy(logits.flatten(0, 1).double(), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(mean.double(), want, rtol=1e-5, atol=0)
    n_valid = int((labels != -100).sum())
    assert n_valid == 2 * 8 - 3
    torch.testing.assert_close(total, mean * n_valid, rtol=1e-5, atol=0)


def test_bad_inputs_are_named():
    model = Llama(small_config(fused=False))
    ids = torch.randint(0, V, (2, 8))
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        model(ids, ids[:, 1:])
    with pytest.raises(ValueError, match="reduction"):
        model(ids, ids, reduction="none")
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(ids.float())
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(ids[0])
    with pytest.raises(ValueError, match="33 positions exceed max_seq_len 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = Llama(small_config(fused=False)).to(DEVICE)
    ids, labels = batch()
    loss, grads = loss_and_grads(model, ids, labels)
    model.set_activation_checkpointing(True)
    loss_ckpt, grads_ckpt = loss_and_grads(model, ids, labels)
    assert torch.equal(loss, loss_ckpt)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-9)


def test_compiles_without_graph_breaks():
    _, fused = twin_models()
    ids, labels = batch(1, 8)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    loss = compiled(ids, labels)
    loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(loss, fused(ids, labels), rtol=1e-5, atol=1e-6)


# --- generation --------------------------------------------------------------------------------


def lively(model: Llama) -> Llama:
    """At init a small model repeats the current token forever, which would hide a wrong cache
    or wrong positions; 20x larger weights make every step's choice depend on the context."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20)
    return model


def _greedy_without_cache(model: Llama, ids: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        with torch.no_grad():
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("fused", [False, True])
def test_greedy_generation_with_cache_equals_recomputing(fused):
    model = lively(twin_models(seed=1)[int(fused)])
    prompt = torch.randint(0, V, (2, 5), device=DEVICE)
    got = model.generate(prompt, 6, temperature=0)
    assert got.shape == (2, 11) and torch.equal(got[:, :5], prompt)
    assert len(set(got[:, 5:].flatten().tolist())) > 4
    assert torch.equal(got, _greedy_without_cache(model, prompt, 6))


def test_sampling_is_reproducible_and_top_k_one_is_greedy():
    torch.manual_seed(0)
    model = Llama(small_config(fused=False)).to(DEVICE)
    prompt = torch.randint(0, V, (3, 4), device=DEVICE)

    def sample(seed, **kwargs):
        gen = torch.Generator(DEVICE).manual_seed(seed)
        return model.generate(prompt, 8, temperature=1.0, generator=gen, **kwargs)

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    assert torch.equal(sample(1, top_k=1), model.generate(prompt, 8, temperature=0))


def _expected_with_eos(free: torch.Tensor, prompt_len: int, eos: int) -> torch.Tensor:
    """What eos handling must make of the free-running greedy output `free`."""
    rows, ends = [], []
    for row in free:
        hits = (row[prompt_len:] == eos).nonzero()
        end = prompt_len + int(hits[0]) + 1 if len(hits) else len(row)
        rows.append(torch.cat([row[:end], row.new_full((len(row) - end,), eos)]))
        ends.append(end)
    return torch.stack(rows)[:, : max(ends)]


@pytest.mark.parametrize("which", [(0, 5), (0, 4), (1, 4)])
def test_generation_stops_at_eos_and_pads(which):
    torch.manual_seed(0)
    model = lively(Llama(small_config(fused=False)).to(DEVICE))
    prompt = torch.randint(0, V, (2, 4), device=DEVICE)
    free = model.generate(prompt, 6, temperature=0)
    eos = int(free[which])
    out = model.generate(prompt, 6, temperature=0, eos_token_id=eos)
    assert torch.equal(out, _expected_with_eos(free, 4, eos))
    assert (out[which[0], which[1] + 1 :] == eos).all()


def test_generation_errors():
    model = Llama(small_config(fused=False))
    prompt = torch.zeros(1, 30, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds max_seq_len 32"):
        model.generate(prompt, 3)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt[:, :2], 3, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt[:, :2], 3, top_k=0)
    cache = KVCache(num_layers=2, max_len=4)
    with pytest.raises(ValueError, match="exceed the cache's max_len 4"):
        model.hidden_states(prompt[:, :5], cache)


# --- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_llama_1b_train_step_fused_matches_unfused_and_saves_memory():
    """The issue's shape (llama-1b, bf16 autocast) at batch 2 x 2048: fused and unfused losses
    agree and the fused step peaks lower (no [4096, 128256] logits, no fp32 copy of them)."""
    config = LlamaConfig.preset("llama-1b", fused=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        eager = Llama(config)
    ids = torch.randint(0, config.vocab_size, (2, 2049), device="cuda")
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step(model):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(inputs, labels)
        loss.backward()
        torch.cuda.synchronize()
        return loss.item(), torch.cuda.max_memory_allocated() - start

    eager_loss, eager_peak = step(eager)
    state = eager.state_dict()
    del eager
    with torch.device("cuda"):
        fused = Llama(LlamaConfig.preset("llama-1b", fused=True))
    fused.load_state_dict(state)
    del state
    fused_loss, fused_peak = step(fused)
    assert math.isfinite(fused_loss)
    assert abs(fused_loss - eager_loss) < 2e-2 * eager_loss
    assert fused_peak < eager_peak
