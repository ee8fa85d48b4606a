"""perfml.patch over the whole family table: one tiny random model per Hugging Face family.

Each case (fp32 on CPU, the default CPU path: interpret mode off, so the ops run their C++ or
ATen paths) checks that the patched model's loss, eval logits and every parameter gradient match
the unpatched one; that every component the report lists as swapped really runs a perfml op
during the forward (the ops are wrapped with counters) and none it lists as left does; that
greedy generation agrees; and that unpatch restores the model bit for bit.
"""

from __future__ import annotations

import collections
import copy
import functools
import importlib

import pytest
import torch
from torch import nn

import perfml

patch_module = importlib.import_module("perfml.patch")  # the module, not the function

transformers = pytest.importorskip("transformers")

V, B, T = 128, 2, 12
_SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=V,
    max_position_embeddings=64,
    pad_token_id=0,
)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=128)

CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "ministral": ("MinistralConfig", "MinistralForCausalLM", {"head_dim": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 16, "sliding_window": 8, "final_logit_softcapping": 0.5},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 16, "sliding_window": 8, "final_logit_softcapping": 0.5},
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e4,
                "partial_rotary_factor": 0.5,
            }
        },
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    # layer 1 is a NoPE layer
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {"no_rope_layers": [1, 0]}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", {"sliding_window": 8}),
    "stablelm": (
        "StableLmConfig",
        "StableLmForCausalLM",
        {"qk_layernorm": True, "hidden_dropout": 0.0},
    ),
    # the full-attention layer of a sliding-window model applies no rotary
    "exaone4": (
        "Exaone4Config",
        "Exaone4ForCausalLM",
        {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    "hunyuan_v1_dense": ("HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM", {"head_dim": 16}),
    "helium": ("HeliumConfig", "HeliumForCausalLM", {"head_dim": 16}),
    "seed_oss": (
        "SeedOssConfig",
        "SeedOssForCausalLM",
        {"head_dim": 16, "attention_dropout": 0.0, "residual_dropout": 0.0},
    ),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 2.0}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.5}),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {"head_dim": 16}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, **_MOE}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {"num_experts": 4, "shared_expert_intermediate_size": 128, **_MOE},
    ),
    # layer 0 keeps a dense MLP
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"num_experts": 4, "mlp_only_layers": [0], "head_dim": 16, **_MOE},
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4, **_MOE}),
    # MLA attention, layer 0 dense, one shared expert
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            n_routed_experts=4,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            num_key_value_heads=4,
            **_MOE,
        ),
    ),
}

# the perfml functions perfml.patch calls, and the report kind each one serves
OPS = {
    "rms_norm": "rms_norm",
    "layer_norm": "layer_norm",
    "swiglu": "swiglu",
    "geglu": "swiglu",
    "rope": "rope",
    "linear_cross_entropy": "linear_cross_entropy",
    "cross_entropy": "cross_entropy",
}
_NORM_KINDS = {"rms_norm", "layer_norm"}
_LOSS_KINDS = {"linear_cross_entropy", "cross_entropy"}


@pytest.fixture(autouse=True)
def _default_cpu_path(monkeypatch):
    # the ops' default CPU path (C++ / ATen), not the Triton interpreter the root conftest sets
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def calls(monkeypatch):
    """Counts calls into the perfml ops, by report kind."""
    counts: collections.Counter[str] = collections.Counter()

    def counted(kind, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            counts[kind] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name, kind in OPS.items():
        monkeypatch.setattr(patch_module, name, counted(kind, getattr(patch_module, name)))
    return counts


def tiny(family: str) -> nn.Module:
    config_name, model_name, kwargs = CASES[family]
    config = getattr(transformers, config_name)(
        **({} if family == "gpt2" else _SMALL)
        | ({"vocab_size": V} if family == "gpt2" else {})
        | kwargs
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():  # zero or one initialized norm weights would hide an offset or a cast
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def _expected_calls(report: perfml.PatchReport) -> collections.Counter[str]:
    """Calls of one forward with labels in training mode: one per swapped norm, MLP and
    attention module, and the one fused loss."""
    want = collections.Counter(e.kind for e in report.replaced if e.kind not in _LOSS_KINDS)
    if any(e.kind == "linear_cross_entropy" for e in report.replaced):
        want["linear_cross_entropy"] = 1
    return want


def test_the_table_is_covered_and_installed():
    packages = [f.package for f in patch_module.families()]
    assert len(packages) == len(set(packages))
    assert set(packages) == set(CASES)
    for family in patch_module.families():
        config_name, model_name, _ = CASES[family.package]
        cls = getattr(transformers, model_name)
        assert cls.__module__ == f"transformers.models.{family.package}.modeling_{family.package}"
        assert cls.__name__ == (family.causal_lm or f"{family.prefix}ForCausalLM")


@pytest.mark.parametrize("family", CASES)
def test_family(family, calls):
    model = tiny(family)
    base = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, labels = batch()
    with torch.no_grad():
        base.eval()
        want_eval = base(ids, labels=labels)

    report = perfml.patch(model)
    assert report.architectures == [f"{family} ({type(model).__name__})"]
    kinds = {e.kind for e in report.replaced} | {e.kind for e in report.left}
    assert kinds & _NORM_KINDS, "norms neither swapped nor reported"
    assert "swiglu" in kinds, "MLP / experts neither swapped nor reported"
    assert _LOSS_KINDS <= kinds, "loss neither swapped nor reported"
    if family != "gpt2":  # GPT-2's positions are learned: no rotary to report
        assert "rope" in kinds, "rope neither swapped nor reported"
    for entry in report.left:
        assert entry.note, f"{entry.path} left without a reason"
    spec = patch_module._HF_FAMILIES[family]
    if spec.loss_unsupported:
        assert not kinds & {e.kind for e in report.replaced} & _LOSS_KINDS
    if spec.rope_unsupported:
        assert "rope" not in {e.kind for e in report.replaced}

    # training mode with labels: loss and every gradient; each swapped module runs its op
    model.train(), base.train()
    calls.clear()
    got = model(ids, labels=labels)
    assert calls == _expected_calls(report), str(report)
    want = base(ids, labels=labels)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-4)
    got.loss.backward()
    want.loss.backward()
    for (name, p), q in zip(model.named_parameters(), base.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name
            continue
        scale = q.grad.abs().max().clamp_min(1e-12)
        err = (p.grad - q.grad).abs().max() / scale
        assert err < 1e-3, f"{name}: gradient off by {err:.2e} of its max"

    # eval mode: the logits and the loss from them
    model.eval()
    calls.clear()
    with torch.no_grad():
        got_eval = model(ids, labels=labels)
    swapped_ce = any(e.kind == "cross_entropy" for e in report.replaced)
    assert calls["cross_entropy"] == int(swapped_ce)
    assert calls["linear_cross_entropy"] == 0
    torch.testing.assert_close(got_eval.logits, want_eval.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(got_eval.loss, want_eval.loss, rtol=0, atol=1e-4)

    if spec.router_aux_loss:  # the router's aux loss joins HF's loss unchanged
        with torch.no_grad():
            got_moe = model(ids, labels=labels, output_router_logits=True)
            want_moe = base(ids, labels=labels, output_router_logits=True)
        assert got_moe.aux_loss is not None
        torch.testing.assert_close(got_moe.aux_loss, want_moe.aux_loss, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_moe.loss, want_moe.loss, rtol=0, atol=1e-4)

    # greedy generation with the KV cache
    prompt = ids[:1, :5]
    with torch.no_grad():
        kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(prompt, **kw), base.generate(prompt, **kw))

    # unpatch: the state and the forward exactly as before patching
    swapped = {e.path for e in report.replaced}
    assert perfml.unpatch(model) == len(swapped)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    calls.clear()
    with torch.no_grad():
        assert torch.equal(model(ids, labels=labels).logits, want_eval.logits)
    assert not calls


@pytest.mark.parametrize("family", ["granite", "cohere"])
def test_scaled_head_uses_the_config_scale(family, calls):
    """The fused loss reads the head's scale where HF's forward does (Granite: the config's
    logits_scaling; Cohere: the head's own logit_scale, copied from the config) at each call,
    and a scale it cannot use leaves HF's loss, reported."""
    model = tiny(family)
    base = copy.deepcopy(model)
    # the object HF's forward reads the scale from
    attr = "logits_scaling" if family == "granite" else "logit_scale"
    owner = (lambda m: m.config) if family == "granite" else (lambda m: m)
    report = perfml.patch(model)
    assert _LOSS_KINDS <= {e.kind for e in report.replaced}
    ids, labels = batch()
    model.train(), base.train()
    losses = []
    for value in (3.0, 0.25):
        setattr(owner(model), attr, value)
        setattr(owner(base), attr, value)
        calls.clear()
        with torch.no_grad():
            got, want = model(ids, labels=labels).loss, base(ids, labels=labels).loss
        assert calls["linear_cross_entropy"] == 1
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        losses.append(got)
    assert not torch.allclose(losses[0], losses[1])  # the scale really changed the loss

    bad = tiny(family)
    setattr(owner(bad), attr, 0.0 if family == "granite" else -1.0)
    report = perfml.patch(bad)
    left = {e.kind: e.note for e in report.left if e.kind in _LOSS_KINDS}
    assert set(left) == _LOSS_KINDS, str(report)
    assert all("logit scale" in note for note in left.values()), left


_INTERLEAVED_ROPES = {  # family -> (HF function name, its layout in the family table)
    "cohere": ("apply_rotary_pos_emb", "interleaved"),
    "glm4": ("apply_rotary_pos_emb", "interleaved-cat"),
    "helium": ("apply_rotary_pos_emb", "interleaved-cat-full"),
    "deepseek_v3": ("apply_rotary_pos_emb_interleave", "interleaved-cat-split"),
}


def _tables(family: str, b: int, t: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    # as HF's rotary embedding of the family builds them
    angles = torch.randn(b, t, r // 2)
    emb = angles.repeat_interleave(2, -1) if family == "cohere" else torch.cat([angles] * 2, -1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("family", _INTERLEAVED_ROPES)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_interleaved_rotary_matches_hf(family, unsqueeze_dim, calls):
    """The rebound rotary of each interleaved family against HF's own function on random
    inputs (full width, and GLM-4's partial rotary), with gradients; a layout the kernel or
    HF's function does not take runs HF's function."""
    name, layout = _INTERLEAVED_ROPES[family]
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    original = getattr(modeling, name)
    fused = patch_module._fused_rotary(original, layout)
    spec = patch_module._HF_FAMILIES[family]
    assert (name, layout) in ((spec.rope, spec.rope_layout), *spec.rope_also)
    torch.manual_seed(0)
    b, h, t, d = 2, 3, 5, 16
    shape = (b, h, t, d) if unsqueeze_dim == 1 else (b, t, h, d)
    for r in (d, 8) if family == "glm4" else (d,):
        q, k = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
        cos, sin = _tables(family, b, t, r)
        calls.clear()
        got = fused(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        assert calls["rope"] == 1
        want = original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
        grads = torch.autograd.grad(sum((x * x.detach()).sum() for x in got), (q, k))
        wants = torch.autograd.grad(sum((x * x.detach()).sum() for x in want), (q, k))
        for g, w in zip(grads, wants, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)

    # fallbacks: a table narrower than the head where HF has no partial rotary (HF's own error),
    # tables that require grad (the kernel gives them none)
    q, k = torch.randn(shape), torch.randn(shape)
    if family != "glm4":
        cos, sin = _tables(family, b, t, 8)
        calls.clear()
        with pytest.raises(RuntimeError):
            fused(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        assert not calls
    cos, sin = _tables(family, b, t, d)
    cos.requires_grad_()
    calls.clear()
    got = fused(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    assert not calls
    for g, w in zip(got, original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim), strict=True):
        assert torch.equal(g, w)


def test_deepseek_v3_rotary_halves_too(calls):
    """DeepSeek-V3 with rope_interleave=False calls apply_rotary_pos_emb (rotate-half): the
    same rebound forward swaps it, with parity."""
    config_name, model_name, kwargs = CASES["deepseek_v3"]
    config = getattr(transformers, config_name)(**_SMALL | kwargs | {"rope_interleave": False})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    base = copy.deepcopy(model)
    report = perfml.patch(model)
    rope_entries = [e for e in report.replaced if e.kind == "rope"]
    assert len(rope_entries) == config.num_hidden_layers, str(report)
    ids, labels = batch()
    calls.clear()
    got = model(ids, labels=labels).loss
    assert calls["rope"] == config.num_hidden_layers
    torch.testing.assert_close(got, base(ids, labels=labels).loss, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["cohere", "glm4", "helium", "deepseek_v3"])
def test_interleaved_rope_families_compile_with_fullgraph(family):
    """The interleaved-rope wrappers trace under torch.compile(fullgraph=True) (their traced path
    reads no closure variable, which Dynamo would guard through the transformers module where the
    name still holds HF's function), and the compiled loss is the unpatched model's."""
    model, base = tiny(family), tiny(family)
    perfml.patch(model)
    ids, labels = batch()
    targets: list[set[str]] = []

    def recording(gm: torch.fx.GraphModule, example_inputs):
        targets.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    compiled = torch.compile(model, backend=recording, fullgraph=True)
    loss = compiled(ids, labels=labels).loss
    assert targets  # one full graph, no fallback to eager
    torch.testing.assert_close(loss, base(ids, labels=labels).loss, rtol=1e-5, atol=1e-5)
