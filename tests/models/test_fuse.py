"""perfml.models.fuse: q/k/v -> qkv_proj and gate/up -> gate_up_proj against the separate
projections (outputs, gradients, quantized before and after fusing, state_dicts under the
unfused names, safetensors, the static-cache Decoder), unfusing, and the refusals.

Fused (fused=True) models run their Triton kernels in the interpreter on CPU, as do the int8 and
int4 matmuls: models here are tiny (2 layers, hidden 64) and sequences short."""

import copy
import io
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from perfml import quant, sparsity
from perfml.models import Decoder, Llama, LlamaConfig, fuse_projections, unfuse_projections
from perfml.models.fuse import FusedProjectionError, FusionError, fuse_linears

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V = 97
QUANT_CONFIGS = {
    "int8": quant.Int8WeightOnlyConfig(),
    "int4": quant.Int4WeightOnlyConfig(group_size=32),
    "fp8": quant.Float8Config(),
    "int8dyn": quant.Int8DynamicConfig(),
}


def small(seed: int = 0, **overrides) -> Llama:
    # tiny's heads: 4 query heads over 2 kv heads, head_dim 16; unfused layers unless asked
    base = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        max_seq_len=32,
        fused=False,
    )
    torch.manual_seed(seed)
    return Llama(LlamaConfig.preset("tiny", **{**base, **overrides})).eval()


def fused_copy(model: nn.Module) -> nn.Module:
    return fuse_projections(copy.deepcopy(model))


def ids(*shape: int) -> torch.Tensor:
    return torch.randint(0, V, shape)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def assert_same_state(got: dict, expected: dict) -> None:
    """Same keys in the same order, bit-identical values."""
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


# --- outputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fused, heads, kv_heads",
    [(False, 4, 2), (False, 4, 4), (False, 4, 1), (False, 8, 2), (True, 4, 2)],
)
def test_fused_projections_give_the_unfused_outputs(fused, heads, kv_heads, poison_empty):
    model = small(fused=fused, num_heads=heads, num_kv_heads=kv_heads, tie_embeddings=False)
    fused_model = fused_copy(model)
    attn, mlp = fused_model.layers[0].self_attn, fused_model.layers[0].mlp
    head_dim = 64 // heads
    assert attn.qkv_proj.weight.shape == ((heads + 2 * kv_heads) * head_dim, 64)
    assert mlp.gate_up_proj.weight.shape == (2 * 96, 64)
    separate = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    assert not any(n.split(".")[-1] in separate for n, _ in fused_model.named_modules())
    x, labels = ids(2, 11), ids(2, 11)
    expected = logits(model, x)
    got = logits(fused_model, x)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(fused_model(x, labels), model(x, labels), rtol=1e-6, atol=0)
    if not fused:  # and both near the float64 model
        reference = logits(copy.deepcopy(model).double(), x)
        torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5)


def test_fuse_linears_concatenates_outputs_with_bias_and_strided_input():
    torch.manual_seed(1)
    parts = [nn.Linear(37, n) for n in (24, 8, 8)]  # awkward K, unequal N
    fused = fuse_linears(parts)
    assert isinstance(fused, nn.Linear) and fused.out_features == 40
    x = torch.randn(37, 5, 3).transpose(0, 2)  # [3, 5, 37], not contiguous
    reference = torch.cat(
        [x.double() @ p.weight.double().T + p.bias.double() for p in parts], dim=-1
    )
    got = fused(x)
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, torch.cat([p(x) for p in parts], -1), rtol=1e-6, atol=1e-6)
    # quantized with a bias: the same bits as the separate modules' outputs
    q_parts = [quant.quantize(p, quant.Int8WeightOnlyConfig()) for p in parts]
    q_fused = fuse_linears(q_parts)
    assert isinstance(q_fused, quant.Int8WeightOnlyLinear) and q_fused.bias is not None
    assert torch.equal(q_fused(x), torch.cat([p(x) for p in q_parts], -1))


# --- fusing and quantizing, either order ------------------------------------------------------


@pytest.mark.parametrize("method", list(QUANT_CONFIGS))
def test_quantizing_and_fusing_commute(method, poison_empty):
    config = QUANT_CONFIGS[method]
    model = small(seed=2)
    separate = quant.quantize(copy.deepcopy(model), config)
    fuse_then_quantize = quant.quantize(fused_copy(model), config)
    quantize_then_fuse = fused_copy(separate)
    cls = type(separate.layers[0].self_attn.q_proj)
    for fused_model in (fuse_then_quantize, quantize_then_fuse):
        assert type(fused_model.layers[1].self_attn.qkv_proj) is cls
        assert type(fused_model.layers[1].mlp.gate_up_proj) is cls
        assert_same_state(fused_model.state_dict(), separate.state_dict())
    # decode rows (M <= 8: the split-K GEMV) and prefill rows (the tiled kernel)
    for x in (ids(1, 5), ids(2, 7)):
        expected = logits(separate, x)
        assert torch.equal(logits(fuse_then_quantize, x), expected)
        assert torch.equal(logits(quantize_then_fuse, x), expected)


# --- state dicts --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [None, "int4"])
def test_state_dict_has_the_unfused_names_values_and_no_shared_storage(method):
    model = small(seed=3, tie_embeddings=False)
    if method is not None:
        quant.quantize(model, QUANT_CONFIGS[method])
    fused_model = fused_copy(model)
    state = fused_model.state_dict()
    assert_same_state(state, model.state_dict())
    assert "layers.0.self_attn.q_proj.weight" in state or "layers.0.self_attn.q_proj.scale" in state
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in state)
    assert set(state._metadata) == set(model.state_dict()._metadata)
    storages = [t.untyped_storage().data_ptr() for t in state.values()]
    assert len(set(storages)) == len(storages)
    assert all(t.is_contiguous() for t in state.values())
    # copies: writing into the state_dict leaves the model alone
    key = next(k for k in state if k.startswith("layers.0.self_attn.k_proj"))
    before = fused_model.layers[0].self_attn.qkv_proj.state_dict()
    state[key].zero_()
    assert_same_state(fused_model.layers[0].self_attn.qkv_proj.state_dict(), before)


@pytest.mark.parametrize("method", [None, "int8dyn"])
def test_state_dicts_load_across_fused_and_unfused(method):
    def build(seed: int, fuse: bool) -> Llama:
        m = small(seed=seed)
        if method is not None:
            quant.quantize(m, QUANT_CONFIGS[method])
        return fuse_projections(m) if fuse else m

    source, fused_target, unfused_target = build(4, False), build(5, True), build(6, False)
    x = ids(1, 6)
    fused_target.load_state_dict(source.state_dict())  # unfused -> fused
    assert torch.equal(logits(fused_target, x), logits(source, x))
    assert_same_state(fused_target.state_dict(), source.state_dict())
    unfused_target.load_state_dict(fused_target.state_dict())  # fused -> unfused
    assert torch.equal(logits(unfused_target, x), logits(source, x))
    other = build(7, True)
    other.load_state_dict(fused_target.state_dict())  # fused -> fused
    assert torch.equal(logits(other, x), logits(source, x))


def test_bad_state_dicts_are_reported():
    model = fused_copy(small())
    state = model.state_dict()
    del state["layers.1.self_attn.v_proj.weight"]
    with pytest.raises(RuntimeError, match=r"layers\.1\.self_attn\.qkv_proj\.weight"):
        model.load_state_dict(state)
    state = model.state_dict()
    state["layers.0.mlp.up_proj.weight"] = torch.zeros(96, 63)
    with pytest.raises(RuntimeError, match=r"cannot concatenate .*layers\.0\.mlp\.gate_up_proj"):
        model.load_state_dict(state)


def test_safetensors_and_model_directories_round_trip(tmp_path):
    from safetensors.torch import load_file, load_model, save_model

    from perfml.quant.model_dir import describe_config, load_model_dir, save_model_dir

    model = small(seed=8)
    fused_model = fused_copy(model)
    x = ids(1, 7)
    save_model(fused_model, str(tmp_path / "fused.safetensors"))
    stored = load_file(str(tmp_path / "fused.safetensors"))  # safetensors sorts the keys
    assert_same_state(dict(sorted(stored.items())), dict(sorted(model.state_dict().items())))
    for target in (small(seed=9), fuse_projections(small(seed=10))):
        load_model(target, str(tmp_path / "fused.safetensors"))
        assert torch.equal(logits(target, x), logits(model, x))
    # a quantized fused model through perfml quantize's model directory: loads as unfused
    config = QUANT_CONFIGS["int4"]
    quantized = quant.quantize(copy.deepcopy(model), config)
    fused_quantized = fused_copy(quantized)
    save_model_dir(
        fused_quantized,
        tmp_path / "dir",
        model_config=model.config.to_dict(),
        passes=[describe_config("quantize", config)],
        report={},
    )
    loaded = load_model_dir(tmp_path / "dir")
    assert torch.equal(logits(loaded, x), logits(fused_quantized, x))
    assert_same_state(loaded.state_dict(), quantized.state_dict())


# --- decoding, training -------------------------------------------------------------------------


def teacher_forced(decoder: Decoder, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    out = [decoder.prefill(prompt).clone()]
    out += [decoder.step(tokens[:, i]).clone() for i in range(tokens.shape[1])]
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("method, fused", [(None, True), ("int4", False)])
def test_decoder_on_a_fused_model_matches_the_unfused_one(method, fused):
    model = small(seed=11, fused=fused)
    if method is not None:
        quant.quantize(model, QUANT_CONFIGS[method])
    fused_model = fused_copy(model)
    prompt, tokens = ids(2, 4), ids(2, 3)
    expected = teacher_forced(Decoder(model, 7, batch_size=2), prompt, tokens)
    got = teacher_forced(Decoder(fused_model, 7, batch_size=2), prompt, tokens)
    if method is None:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, expected)
    full = logits(fused_model, torch.cat([prompt, tokens], dim=1))[:, prompt.shape[1] - 1 :]
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


class _CountOps(TorchDispatchMode):
    """Counts the ops dispatched inside the `with` block, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", [None, "int8"])
def test_a_decode_step_runs_three_fewer_matmuls_per_layer(method):
    model = small(seed=18)
    if method is not None:
        quant.quantize(model, QUANT_CONFIGS[method])
    matmuls = []
    for m in (model, fused_copy(model)):
        decoder = Decoder(m, 8)
        decoder.prefill(ids(1, 3))
        with _CountOps() as counter:
            decoder.step(ids(1))
        matmuls.append(sum(n for op, n in counter.counts.items() if op.endswith("mm")))
    layers = model.config.num_layers
    assert matmuls[0] == 7 * layers + 1  # q, k, v, o, gate, up, down per layer, the head
    assert matmuls[1] == 4 * layers + 1  # qkv, o, gate_up, down


def test_a_fused_model_compiles_without_graph_breaks():
    model = small(seed=19, num_layers=1)
    fused_model = fused_copy(model)
    x = ids(1, 8)
    compiled = torch.compile(fused_model, fullgraph=True, backend="aot_eager")
    loss = compiled(x, x)
    loss.backward()
    torch.testing.assert_close(loss, model(x, x), rtol=1e-6, atol=1e-6)
    assert fused_model.layers[0].self_attn.qkv_proj.weight.grad is not None


@pytest.mark.parametrize("fused, checkpointing", [(False, False), (False, True), (True, False)])
def test_gradients_equal_the_unfused_models(fused, checkpointing):
    model = small(seed=12, fused=fused).train()
    fused_model = fused_copy(model)
    x, labels = ids(2, 9), ids(2, 9)
    for m in (model, fused_model):
        m.set_activation_checkpointing(checkpointing)
        m(x, labels).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name, p in fused_model.named_parameters():
        if ".qkv_proj." in name or ".gate_up_proj." in name:
            fused_name = "qkv_proj" if ".qkv_proj." in name else "gate_up_proj"
            parts = (
                ("q_proj", "k_proj", "v_proj")
                if fused_name == "qkv_proj"
                else ("gate_proj", "up_proj")
            )
            expected = torch.cat([grads[name.replace(fused_name, part)] for part in parts])
        else:
            expected = grads[name]
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)
    # a training step keeps the two models equal
    for m in (model, fused_model):
        torch.optim.SGD(m.parameters(), lr=0.5).step()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fused_model.state_dict()[key], value, rtol=1e-5, atol=1e-7)


# --- idempotence, unfusing, copies ---------------------------------------------------------------


def test_fusing_is_idempotent_and_leaves_the_other_projections_alone():
    model = small(seed=13, tie_embeddings=False)
    keep = [model.lm_head, model.layers[0].self_attn.o_proj, model.layers[1].mlp.down_proj]
    n_params = model.num_params()
    model.fuse_projections()
    qkv, gate_up = model.layers[0].self_attn.qkv_proj, model.layers[0].mlp.gate_up_proj
    state = model.state_dict()
    assert model.fuse_projections() is model
    assert model.layers[0].self_attn.qkv_proj is qkv and model.layers[0].mlp.gate_up_proj is gate_up
    assert [model.lm_head, model.layers[0].self_attn.o_proj, model.layers[1].mlp.down_proj] == keep
    assert model.num_params() == n_params
    assert_same_state(model.state_dict(), state)
    # children keep the unfused order: the fused module sits where its first part was
    assert list(model.layers[0].self_attn._modules) == ["qkv_proj", "o_proj"]
    assert list(model.layers[0].mlp._modules) == ["gate_up_proj", "down_proj"]
    # only the MLPs, then the attention as well
    partial = small(seed=13).fuse_projections(qkv=False)
    assert "gate_up_proj" in partial.layers[0].mlp._modules
    assert "qkv_proj" not in partial.layers[0].self_attn._modules
    partial.fuse_projections()
    assert_same_state(partial.state_dict(), small(seed=13).state_dict())


def test_deepcopy_and_pickle_keep_the_fusion():
    model = fused_copy(small(seed=14))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert "qkv_proj" in clone.layers[0].self_attn._modules
        assert_same_state(clone.state_dict(), model.state_dict())
        with pytest.raises(FusedProjectionError, match="fused into layers.0.self_attn.qkv_proj"):
            _ = clone.layers[0].self_attn.q_proj.weight


@pytest.mark.parametrize("method", [None, "fp8"])
def test_unfuse_restores_the_separate_projections(method):
    model = small(seed=15)
    if method is not None:
        quant.quantize(model, QUANT_CONFIGS[method])
    round_trip = unfuse_projections(fused_copy(model))
    attn = round_trip.layers[1].self_attn
    assert list(attn._modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert list(round_trip.layers[1].mlp._modules) == ["gate_proj", "up_proj", "down_proj"]
    assert type(attn.k_proj) is type(model.layers[1].self_attn.k_proj)
    assert attn.k_proj.out_features == model.layers[1].self_attn.k_proj.out_features
    assert_same_state(round_trip.state_dict(), model.state_dict())
    x = ids(1, 6)
    assert torch.equal(logits(round_trip, x), logits(model, x))
    fuse_projections(round_trip)  # and fused again
    assert torch.equal(logits(round_trip, x), logits(model, x))


# --- refusals -----------------------------------------------------------------------------------


def test_structured_pruning_of_a_fused_model_is_refused_and_works_after_unfusing():
    model = small(seed=16, num_kv_heads=4)
    config = sparsity.StructuredConfig(mlp_amount=0.25, head_amount=0.5)
    fused_model = fused_copy(model)
    with pytest.raises(sparsity.PruningError, match=r"layer 0 has fused projections.*first"):
        sparsity.prune(fused_model, config)
    sparsity.prune(unfuse_projections(fused_model), config)
    sparsity.prune(model, config)
    assert_same_state(fused_model.state_dict(), model.state_dict())
    fuse_projections(fused_model)  # the pruned sizes fuse too
    x = ids(1, 5)
    torch.testing.assert_close(logits(fused_model, x), logits(model, x), rtol=1e-6, atol=1e-6)


def test_mismatched_projections_are_refused():
    torch.manual_seed(0)
    a, b = nn.Linear(16, 8), nn.Linear(16, 8)
    with pytest.raises(FusionError, match="mix module types"):
        fuse_linears([a, quant.quantize(nn.Linear(16, 8), quant.Int8WeightOnlyConfig())])
    int4 = [quant.Int4WeightOnlyConfig(group_size=g) for g in (32, 64)]
    with pytest.raises(FusionError, match=r"differ in group size \(linears\[0\]: 32"):
        fuse_linears([quant.quantize(nn.Linear(64, 8), c) for c in int4])
    with pytest.raises(FusionError, match="differ in weight: .* torch.float32 .* torch.bfloat16"):
        fuse_linears([a, b.to(torch.bfloat16)])
    with pytest.raises(FusionError, match="some have a bias and some do not"):
        fuse_linears([a, nn.Linear(16, 8, bias=False)])
    with pytest.raises(FusionError, match="differ in in_features"):
        fuse_linears([a, nn.Linear(12, 8)])
    with pytest.raises(FusionError, match="is a Conv1d, which cannot be fused"):
        fuse_linears([a, nn.Conv1d(16, 8, 1)])
    with pytest.raises(FusionError, match="at least two"):
        fuse_linears([a])
    frozen = nn.Linear(16, 8).requires_grad_(False)
    with pytest.raises(FusionError, match="requires_grad"):
        fuse_linears([a, frozen])
    with pytest.raises(FusionError, match="holds no LlamaAttention"):
        fuse_projections(nn.Sequential(nn.Linear(4, 4)))


def test_a_refused_model_is_left_untouched():
    model = small(seed=17)
    layer1 = model.layers[1].self_attn
    layer1.k_proj = quant.quantize(layer1.k_proj, quant.Int8WeightOnlyConfig())
    state = model.state_dict()
    with pytest.raises(FusionError, match=r"layers\.1\.self_attn\.q_proj, layers\.1\.self_attn"):
        fuse_projections(model)
    for layer in model.layers:
        assert "qkv_proj" not in layer.self_attn._modules
        assert "gate_up_proj" not in layer.mlp._modules
    assert_same_state(model.state_dict(), state)
    # projection sizes the forward cannot split
    model = small(seed=17)
    model.layers[0].self_attn.num_kv_heads = 1
    with pytest.raises(FusionError, match="the forward needs"):
        fuse_projections(model)


@pytest.mark.gpu
@pytest.mark.parametrize("method", [None, "int8", "int4"])
def test_cuda_graph_decode_of_a_fused_bf16_model(method):
    """Graph replay of the fused step equals its eager steps bit for bit, and stays near the
    unfused model (cuBLAS and the split-K GEMV may sum the wider N in another order)."""
    torch.manual_seed(20)
    model = small(seed=20, fused=True, tie_embeddings=False).to(DEVICE, torch.bfloat16)
    if method is not None:
        quant.quantize(model, QUANT_CONFIGS[method])
    fused_model = fused_copy(model)
    prompt = torch.randint(0, V, (1, 5), device=DEVICE)
    tokens = torch.randint(0, V, (1, 6), device=DEVICE)
    eager = teacher_forced(Decoder(fused_model, 11, cuda_graph=False), prompt, tokens)
    graphed = Decoder(fused_model, 11, cuda_graph=True)
    got = teacher_forced(graphed, prompt, tokens)
    assert graphed._graph is not None
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    unfused = teacher_forced(Decoder(model, 11, cuda_graph=True), prompt, tokens)
    torch.testing.assert_close(got.float(), unfused.float(), rtol=3e-2, atol=3e-2)
