"""perfml.patch / perfml.unpatch on plain modules and tiny Hugging Face models built locally.

Each family's patched model (fp32, Triton kernels in the interpreter) is compared with a float64
copy of the unpatched model under the tolerance policy (tests/utils.py), with the unpatched fp32
model as the plain-PyTorch baseline: logits, loss and every parameter gradient.
"""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import perfml
from perfml.patch import SWITCHES
from tests.utils import assert_matches_reference

transformers = pytest.importorskip("transformers")

B, T, V = 2, 16, 257
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=V)
_HEADS = dict(num_attention_heads=4, num_key_value_heads=2)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**_SMALL, **_HEADS}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_SMALL, **_HEADS}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**_SMALL, **_HEADS}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_SMALL, **_HEADS, "head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_SMALL, **_HEADS, "head_dim": 16}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        # a final logit softcap small enough to change the loss (the default 30 never would)
        {**_SMALL, **_HEADS, "head_dim": 16, "sliding_window": 8, "final_logit_softcapping": 0.5},
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {
            **_SMALL,
            **_HEADS,
            "pad_token_id": 0,
            # partial rotary: half of each head rotates, half passes through
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e4,
                "partial_rotary_factor": 0.5,
            },
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
            vocab_size=V,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
}

_LLAMA_LIKE = {"rms_norm": 5, "swiglu": 2, "rope": 2, "linear_cross_entropy": 1, "cross_entropy": 1}
EXPECTED = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": {**_LLAMA_LIKE, "rms_norm": 9},  # + q_norm and k_norm per layer
    "gemma": _LLAMA_LIKE,
    "gemma2": {**_LLAMA_LIKE, "rms_norm": 9},  # pre/post feed-forward norms too
    "phi3": _LLAMA_LIKE,
    "gpt2": {"layer_norm": 5, "linear_cross_entropy": 1, "cross_entropy": 1},
}


_LLAMA_OPS = {"rms_norm_fwd", "glu_fwd", "rope_fwd", "linear_cross_entropy_fwd"}
FORWARD_OPS = {f: _LLAMA_OPS for f in FAMILIES} | {
    "gpt2": {"layer_norm_fwd", "linear_cross_entropy_fwd"}
}
# the gated MLPs' backward writes over gate and up, except Phi-3's halves of one projection
_LLAMA_BWD = {"rms_norm_bwd", "glu_bwd_inplace", "rope_bwd", "loss_grad_scale_"}
BACKWARD_OPS = {f: _LLAMA_BWD for f in FAMILIES} | {
    "phi3": _LLAMA_BWD - {"glu_bwd_inplace"} | {"glu_bwd"},
    "gpt2": {"layer_norm_bwd", "loss_grad_scale_"},
}


class OpRecorder(TorchDispatchMode):
    """Records the perfml custom ops that run (forward and backward) while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, name = func.name().partition("::")
        if namespace == "perfml":
            self.ops.add(name)
        return func(*args, **(kwargs or {}))


def tiny(family: str, seed: int = 0) -> nn.Module:
    config_name, model_name, kwargs = FAMILIES[family]
    config = getattr(transformers, config_name)(**kwargs)
    config._attn_implementation = "eager"  # one attention path for every family (Gemma2 needs it)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():  # Gemma's zero-initialized norm weights would hide the offset
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(b: int = B, t: int = T, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a masked prompt: ignored tokens must stay ignored
    return ids, labels


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _three(family: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(patched fp32, unpatched fp32 baseline, unpatched fp64 reference), same weights."""
    model = tiny(family)
    base = copy.deepcopy(model)
    ref = copy.deepcopy(model).double()
    return model, base, ref


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_hf(family):
    model, base, ref = _three(family)
    report = perfml.patch(model)
    assert report.counts() == EXPECTED[family], str(report)
    assert report.architectures == [f"{family} ({type(model).__name__})"]
    ids, labels = batch()

    # eval mode: logits kept, loss from the fused cross-entropy on them
    for m in (model, base, ref):
        m.eval()
    with torch.no_grad(), OpRecorder() as recorder:
        got = model(ids, labels=labels)
    assert recorder.ops == FORWARD_OPS[family] - {"linear_cross_entropy_fwd"} | {
        "cross_entropy_fwd"
    }
    with torch.no_grad():
        want, ref_out = base(ids, labels=labels), ref(ids, labels=labels)
    assert_matches_reference(got.logits, ref_out.logits, want.logits, name=f"{family} logits")
    assert_matches_reference(got.loss, ref_out.loss, want.loss, name=f"{family} eval loss")

    # training mode: the linear cross-entropy, no logits; every gradient
    for m in (model, base, ref):
        m.train()
    with OpRecorder() as recorder:
        got = model(ids, labels=labels)
        assert recorder.ops == FORWARD_OPS[family]
        got.loss.backward()
    assert recorder.ops == FORWARD_OPS[family] | BACKWARD_OPS[family]
    want, ref_out = base(ids, labels=labels), ref(ids, labels=labels)
    assert got.logits is None and want.logits is not None
    assert got.loss.dtype == torch.float32
    assert_matches_reference(got.loss, ref_out.loss, want.loss, name=f"{family} loss")
    for out in (want, ref_out):
        out.loss.backward()
    grads, base_grads, ref_grads = _grads(model), _grads(base), _grads(ref)
    assert grads.keys() == ref_grads.keys() == base_grads.keys()
    for name in grads:
        assert_matches_reference(grads[name], ref_grads[name], base_grads[name], name=name)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt2"])
def test_rms_norm_casting_matches_hf_bit_for_bit_in_bf16(family):
    """In fp32 the "llama" and "gemma" casts agree; in bf16 the rounding points differ (a wrong
    cast matches HF on only ~74% of the elements). The fused kernel rounds where HF does."""
    norm = tiny(family).model.norm.bfloat16()
    fused = copy.deepcopy(norm)
    assert perfml.patch(fused).counts() == {"rms_norm": 1}
    x = 3 * torch.randn(4, 32, 64, dtype=torch.bfloat16)
    got, want = fused(x), norm(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert (got == want).float().mean().item() >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_curves_match(family):
    """20 AdamW steps from one seed, patched vs unpatched: the loss curves stay together.

    Two families: Llama (RMSNorm, SwiGLU, RoPE, linear cross-entropy) and GPT-2 (LayerNorm, tied
    head); each other family's kernels are covered for one step by test_family_matches_hf. fp32,
    one 1 x 8 batch memorized for 20 steps: few tokens keep the interpreter's cost down, and a
    fixed batch makes the loss fall (random tokens teach nothing). Measured: at most 3e-7
    relative difference over the 20 steps; the tolerance, rtol 1e-5 at every step, leaves room
    for Adam, whose division by the root of the second moment amplifies rounding differences in
    small gradients.
    """
    model, base, _ = _three(family)
    perfml.patch(model)
    ids, labels = batch(1, 8)
    curves = []
    for m in (model, base):
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        losses = []
        for _ in range(20):
            loss = m(ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    assert curves[1][-1] < curves[1][0] - 1.0  # it does learn
    torch.testing.assert_close(curves[0], curves[1], rtol=1e-5, atol=0)


def test_bf16_llama_within_twice_the_eager_error():
    model, base, ref = _three("llama")
    model, base = model.bfloat16(), base.bfloat16()
    perfml.patch(model)
    ids, labels = batch()
    got, want, ref_out = (m(ids, labels=labels) for m in (model, base, ref))
    assert got.loss.dtype == torch.float32
    # the fused loss comes back in bf16 (then upcast): allow one bf16 rounding of the value
    assert_matches_reference(got.loss, ref_out.loss, want.loss, name="bf16 loss")
    for out in (got, want, ref_out):
        out.loss.backward()
    grads, base_grads, ref_grads = _grads(model), _grads(base), _grads(ref)
    for name in grads:
        assert_matches_reference(grads[name], ref_grads[name], base_grads[name], name=name)


def test_loss_options_follow_hf():
    """num_items_in_batch (sum / count), return_dict=False ordering, return_logits, and a custom
    loss_function (left to HF)."""
    model, base, _ = _three("llama")
    perfml.patch(model)
    ids, labels = batch()
    with torch.no_grad():
        kwargs = dict(labels=labels, num_items_in_batch=torch.tensor(7))
        got, want = model(ids, **kwargs).loss, base(ids, **kwargs).loss
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)

        loss, *rest = model(ids, labels=labels, return_dict=False)
        assert loss.dim() == 0 and len(rest) == 1  # (loss, past_key_values): no logits
        out = model(ids, labels=labels, return_logits=True)  # training mode, logits asked for
        hf = base(ids, labels=labels)
        torch.testing.assert_close(out.logits, hf.logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.loss, hf.loss, rtol=1e-5, atol=0)

        model.loss_function = base.loss_function = lambda logits, labels, **kw: logits.mean()
        out = model(ids, labels=labels)
        assert out.logits is not None  # HF's own path: the custom loss sees the logits
        torch.testing.assert_close(out.loss, base(ids, labels=labels).loss)


def test_generate_with_kv_cache():
    """No labels: HF's forward with the patched modules; the rotary of later tokens reads
    positions past the prompt from the cache's offset."""
    model, base, ref = _three("llama")
    perfml.patch(model)
    assert "logits_to_keep" in inspect.signature(model.forward).parameters  # generation reads it
    ids, _ = batch(1, 6)
    kwargs = dict(
        max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    got, want, ref_out = (m.eval().generate(ids, **kwargs) for m in (model, base, ref))
    assert torch.equal(got.sequences, want.sequences)
    for step, (g, w, r) in enumerate(zip(got.logits, want.logits, ref_out.logits, strict=True)):
        assert_matches_reference(g, r, w, name=f"logits of generated token {step}")


def test_gemma2_softcap_reaches_the_loss():
    model = tiny("gemma2")
    with torch.no_grad():
        model.model.norm.weight.add_(4.0)  # logits x5, so that the cap of 0.5 bites
    base = copy.deepcopy(model)
    perfml.patch(model)
    ids, labels = batch()
    with torch.no_grad():
        capped = model(ids, labels=labels).loss
        torch.testing.assert_close(capped, base(ids, labels=labels).loss, rtol=1e-5, atol=0)
        model.config.final_logit_softcapping = None
        assert abs(model(ids, labels=labels).loss.item() - capped.item()) > 0.05


def test_state_dict_and_parameters_unchanged():
    model = tiny("llama")
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    perfml.patch(model)
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert {type(m) for m in model.modules()} == {type(m) for m in tiny("llama").modules()}
    model.load_state_dict(state)  # checkpoints load into a patched model


def test_idempotent_and_unpatch_is_bit_identical():
    model = tiny("llama")
    ids, labels = batch()

    def run() -> tuple[torch.Tensor, ...]:
        model.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            logits = model(ids).logits
        model.train()
        loss = model(ids, labels=labels).loss
        loss.backward()
        return (logits, loss.detach(), *(p.grad for p in model.parameters()))

    before = run()
    first = perfml.patch(model)
    second = perfml.patch(model, rope=False)
    assert first.replaced and not second.replaced and second.noop
    assert len(second.already_patched) == len(first.replaced)
    assert "already patched" in str(second)
    patched = run()
    assert not all(
        torch.equal(a, b) for a, b in zip(before, patched, strict=True)
    )  # the kernels did run
    assert perfml.unpatch(model) == 10  # 5 norms, 2 MLPs, 2 attentions, the head
    after = run()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert perfml.unpatch(model) == 0
    assert perfml.patch(model).counts() == first.counts()  # patchable again


def test_patch_is_per_instance():
    model, other = tiny("llama"), tiny("llama")
    ids, _ = batch()
    with torch.no_grad():
        want = other(ids).logits
        perfml.patch(model)
        assert torch.equal(other(ids).logits, want)  # same classes, untouched instance
    assert "forward" not in vars(other.model.layers[0].self_attn)
    assert "forward" in vars(model.model.layers[0].self_attn)


def test_switches_and_report():
    model = tiny("llama")
    report = perfml.patch(model, rms_norm=False, swiglu=False, cross_entropy=False)
    assert report.counts() == {"rope": 2, "linear_cross_entropy": 1}
    reasons = {(e.kind, e.note) for e in report.left}
    assert reasons == {
        ("rms_norm", "rms_norm=False"),
        ("swiglu", "swiglu=False"),
        ("cross_entropy", "cross_entropy=False"),
    }
    text = str(report)
    assert text.startswith("perfml.patch: llama (LlamaForCausalLM)")
    assert re.search(r"rope\s+2 x LlamaAttention: model\.layers\.0\.self_attn", text)
    assert "rms_norm=False" in text
    more = perfml.patch(model)  # modules left before are swapped now, the others are kept
    assert more.counts() == {"rms_norm": 5, "swiglu": 2}
    assert {e.kind for e in more.already_patched} == {"rope", "linear_cross_entropy"}
    assert "kept as they are" in str(more)
    perfml.unpatch(model)
    nothing = perfml.patch(model, **dict.fromkeys(SWITCHES, False))
    assert not nothing.replaced and "nothing replaced" in str(nothing)


def test_gpt2_mlp_left_with_reason():
    report = perfml.patch(tiny("gpt2"))
    left = {(e.module, e.kind): e.note for e in report.left}
    assert left == {("GPT2MLP", "swiglu"): "not a gated MLP (no gate and up projections)"}


class _Norms(nn.Module):
    """A plain model with every torch norm variant, including one perfml does not take."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 48)
        self.ln = nn.LayerNorm(48)
        self.rms = nn.RMSNorm(48)
        self.rms_plain = nn.RMSNorm(48, eps=1e-5, elementwise_affine=False)
        self.ln_no_bias = nn.LayerNorm(48, bias=False)
        self.ln_2d = nn.LayerNorm([2, 24])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_no_bias(self.rms_plain(self.rms(self.ln(self.proj(x)))))
        return self.ln_2d(h.unflatten(-1, (2, 24)))


def test_generic_torch_norms_in_any_module():
    torch.manual_seed(0)
    net = _Norms()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    base, ref = copy.deepcopy(net), copy.deepcopy(net).double()
    report = perfml.patch(net)
    assert report.counts() == {"layer_norm": 2, "rms_norm": 2}
    left = [(e.path, e.note) for e in report.left]
    assert left == [("ln_2d", "normalizes over several dimensions")]
    assert report.architectures == []
    x = torch.randn(3, 5, 8)
    got, want, ref_out = net(x), base(x), ref(x.double())
    assert_matches_reference(got, ref_out, want)
    for out in (got, want, ref_out):
        out.square().sum().backward()
    for (name, p), q, r in zip(
        net.named_parameters(), base.parameters(), ref.parameters(), strict=True
    ):
        assert_matches_reference(p.grad, r.grad, q.grad, name=name)


def test_unknown_architecture_is_reported_generic_swaps_apply():
    config = transformers.GPTNeoXConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=V,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config)
    base = copy.deepcopy(model)
    report = perfml.patch(model)
    assert report.architectures == ["unknown architecture gpt_neox (GPTNeoXForCausalLM)"]
    assert report.counts() == {"layer_norm": 5}  # 2 per layer + the final one
    assert {(e.module, e.note) for e in report.left} == {
        (name, "architecture 'gpt_neox' is not supported")
        for name in ("GPTNeoXForCausalLM", "GPTNeoXAttention", "GPTNeoXMLP")
    }
    ids, labels = batch()
    with torch.no_grad():
        got, want = model(ids, labels=labels), base(ids, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    model, base, ref = _three("llama")
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = []
    for m in (model, base, ref):
        torch.manual_seed(3)  # the same random adapter weights in each copy
        wrapped.append(peft.get_peft_model(m, peft.LoraConfig(**lora)))
    ref_peft = wrapped[2].double()
    report = perfml.patch(wrapped[0])
    assert report.counts() == EXPECTED["llama"]
    assert {e.path for e in report.replaced if e.kind == "cross_entropy"} == {"base_model.model"}
    ids, labels = batch()
    outs = [w(input_ids=ids, labels=labels) for w in (wrapped[0], wrapped[1], ref_peft)]
    assert outs[0].logits is None
    assert_matches_reference(outs[0].loss, outs[2].loss, outs[1].loss, name="lora loss")
    for out in outs:
        out.loss.backward()
    lora_grads = [
        {n: p.grad for n, p in w.named_parameters() if "lora_" in n}
        for w in (*wrapped[:2], ref_peft)
    ]
    assert len(lora_grads[0]) == 8 and all(g is not None for g in lora_grads[0].values())
    for name, g in lora_grads[0].items():
        assert_matches_reference(g, lora_grads[2][name], lora_grads[1][name], name=name)
    assert all(p.grad is None for n, p in wrapped[0].named_parameters() if "lora_" not in n)


def _recording_backend(graphs: list[set[str]]):
    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    return backend


@pytest.mark.parametrize("order", ["patch-then-compile", "compile-then-patch"])
def test_torch_compile_fullgraph(order):
    model, base = tiny("llama"), tiny("llama")
    perfml.patch(base)
    ids, labels = batch()
    graphs: list[set[str]] = []
    if order == "patch-then-compile":
        perfml.patch(model)
        compiled = torch.compile(model, backend=_recording_backend(graphs), fullgraph=True)
    else:
        compiled = torch.compile(model, backend=_recording_backend(graphs), fullgraph=True)
        with torch.no_grad():
            compiled(ids)  # traced before the patch: the guards must see the swap
        assert not any("perfml" in t for t in graphs[-1])
        assert perfml.patch(compiled).counts() == EXPECTED["llama"]
    loss = compiled(ids, labels=labels).loss
    perfml_ops = {t.split(".")[1] for t in graphs[-1] if t.startswith("perfml.")}
    assert perfml_ops == {"rms_norm_fwd", "glu_fwd", "rope_fwd", "linear_cross_entropy_fwd"}
    loss.backward()
    want = base(ids, labels=labels).loss
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    for (name, p), q in zip(model.named_parameters(), base.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        perfml.patch("llama")
    with pytest.raises(TypeError, match="rope must be True or False"):
        perfml.patch(nn.Linear(2, 2), rope="yes")
    model = tiny("llama")
    perfml.patch(model)
    with pytest.raises(TypeError, match="multiple values for 'input_ids'"):
        model(batch()[0], input_ids=batch()[0], labels=batch()[1])


# --- the hf_train_step benchmark case ------------------------------------------------------------


def test_hf_train_step_case_patched_step():
    """One call of the perfml impl is one optimizer step, and its loss is the eager model's."""
    from perfml import bench
    from perfml.bench.cases import hf_train_step as case

    impls = [impl.name for impl in bench.get_case("hf_train_step").impls]
    assert impls == ["eager", "compile", "liger", "perfml", "perfml-compile"]

    spec, ids = case._inputs((1, 8), torch.float32, torch.device("cpu"))
    step = case._TrainStep(case._perfml, compiled=False)
    loss = step(spec, ids)
    model = step.forward
    assert model.model.layers[0].mlp.__dict__["_perfml_patch"] == ("swiglu",)
    want = case._reference(spec, ids)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss.backward(torch.tensor(-3.0))  # the harness's random upstream gradient is ignored
    for name, p in model.named_parameters():
        assert p.grad is None, name  # zero_grad(set_to_none=True) ran after the backward
        assert not torch.equal(p.detach(), before[name]), name


def test_hf_train_step_liger_context_restores_modeling_llama():
    from transformers.models.llama import modeling_llama

    from perfml.bench.cases.hf_train_step import _modeling_llama_restored

    rotary, norm = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm
    forward = modeling_llama.LlamaForCausalLM.forward
    with _modeling_llama_restored():  # what a process-wide monkey patch does
        modeling_llama.apply_rotary_pos_emb = modeling_llama.LlamaRMSNorm = None
        modeling_llama.LlamaForCausalLM.forward = None
        modeling_llama.added_by_a_patch = 1
    assert modeling_llama.apply_rotary_pos_emb is rotary and modeling_llama.LlamaRMSNorm is norm
    assert modeling_llama.LlamaForCausalLM.forward is forward
    assert not hasattr(modeling_llama, "added_by_a_patch")


@pytest.mark.gpu
def test_llama_1b_bf16_train_step_on_gpu():
    """The benchmark's headline: HF Llama with llama-1b dims (1.09e9 parameters), bf16, 4 x 2048
    tokens. The patched step's loss and gradients stay within bf16 rounding of eager's, and it
    adds far less memory (no [8192, 128256] logits, no fp32 copy of them, no logits gradient)."""
    from perfml.bench.cases.hf_train_step import hf_config

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(hf_config("llama-1b")).to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (4, 2048), device="cuda")
    watched = (
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.11.mlp.down_proj.weight",
        "model.norm.weight",
    )

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        peak = torch.cuda.max_memory_allocated() - start
        grads = {n: p.grad.float() for n, p in model.named_parameters() if n in watched}
        return loss.detach().float(), grads, peak

    loss, grads, peak = step()
    report = perfml.patch(model)
    assert report.counts() == {
        "rms_norm": 25,
        "swiglu": 12,
        "rope": 12,
        "linear_cross_entropy": 1,
        "cross_entropy": 1,
    }
    fused_loss, fused_grads, fused_peak = step()
    torch.testing.assert_close(fused_loss, loss, rtol=1e-2, atol=0)  # bf16 loss: 2**-9 apart
    for name in watched:
        err = ((fused_grads[name] - grads[name]).norm() / grads[name].norm()).item()
        assert err < 5e-2, f"{name}: relative gradient error {err:.3g}"
    assert fused_peak < 0.5 * peak, (
        f"patched step adds {fused_peak / 2**30:.1f} GiB, eager {peak / 2**30:.1f}"
    )
