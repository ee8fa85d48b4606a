"""perfml.prune: exact sparsity patterns, structured pruning equal to its masked equivalent,
reports, model-directory round trips, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from perfml import sparsity
from perfml.models.llama import Llama, LlamaConfig


def tiny(**overrides) -> Llama:
    settings = {"fused": False, "num_layers": 2, **overrides}
    return Llama(LlamaConfig.preset("tiny", **settings)).eval()


def linears(model):
    return [(n, m) for n, m in model.named_modules() if sparsity.default_filter(m, n)]


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_layer_zeroes_exact_count_of_smallest(amount):
    model = tiny()
    before = {n: m.weight.detach().clone() for n, m in linears(model)}
    sparsity.prune(model, sparsity.MagnitudeConfig(amount, "layer"))
    for name, module in linears(model):
        w, w0 = module.weight, before[name]
        zeros = w == 0
        assert int(zeros.sum()) == round(amount * w.numel()), name
        assert torch.equal(w[~zeros], w0[~zeros]), "kept weights must be unchanged"
        if zeros.any() and (~zeros).any():
            assert w0[zeros].abs().max() <= w0[~zeros].abs().min()


def test_magnitude_global_uses_one_threshold():
    model = tiny()
    before = torch.cat([m.weight.detach().abs().flatten() for _, m in linears(model)])
    sparsity.prune(model, sparsity.MagnitudeConfig(0.6, "global"))
    after = torch.cat([m.weight.detach().flatten() for _, m in linears(model)])
    assert int((after == 0).sum()) == round(0.6 * after.numel())
    assert before[after == 0].max() <= before[after != 0].min()
    per_layer = {n: (m.weight == 0).float().mean().item() for n, m in linears(model)}
    # o_proj/down_proj start 2x smaller (residual init): a global threshold prunes them more
    assert per_layer["layers.0.self_attn.o_proj"] > per_layer["layers.0.self_attn.q_proj"]
    assert model.embed_tokens.weight.count_nonzero() == model.embed_tokens.weight.numel()


def test_2_4_keeps_exactly_two_largest_of_every_four_along_k():
    model = tiny()
    before = {n: m.weight.detach().clone() for n, m in linears(model)}
    sparsity.prune(model, sparsity.SemiStructured24Config())
    for name, module in linears(model):
        w = module.weight.detach()
        n, k = w.shape
        groups = w.view(n, k // 4, 4)
        assert ((groups != 0).sum(-1) == 2).all(), name
        g0 = before[name].view(n, k // 4, 4).abs()
        kept_min = torch.where(groups != 0, g0, torch.inf).amin(-1)
        dropped_max = torch.where(groups == 0, g0, -torch.inf).amax(-1)
        assert (dropped_max <= kept_min).all()


def test_2_4_needs_k_divisible_by_4():
    with pytest.raises(sparsity.PruningError, match="multiple of 4"):
        sparsity.prune(nn.Sequential(nn.Linear(6, 8)), sparsity.SemiStructured24Config())


def test_report_counts_per_layer():
    model = tiny(tie_embeddings=False)
    sparsity.prune(model, sparsity.MagnitudeConfig(0.5))
    report = sparsity.sparsity_report(model)
    assert report["layers"]["layers.1.mlp.up_proj"]["sparsity"] == pytest.approx(0.5)
    assert report["layers"]["lm_head"]["sparsity"] == 0  # the head is left out by default
    assert 0.4 < report["total"]["sparsity"] < 0.5


def _masked_equivalent(model, pruned):
    """The original model with the removed MLP channels / head groups zeroed."""
    masked = copy.deepcopy(model)
    for layer, small in zip(masked.layers, pruned.layers, strict=True):
        mlp = layer.mlp
        keep = torch.zeros(mlp.gate_proj.out_features, dtype=torch.bool)
        for row in small.mlp.gate_proj.weight:
            keep |= (mlp.gate_proj.weight == row).all(1)
        mlp.gate_proj.weight.data[~keep] = 0
        mlp.up_proj.weight.data[~keep] = 0
        mlp.down_proj.weight.data[:, ~keep] = 0
        attn = layer.self_attn
        rows = torch.zeros(attn.v_proj.out_features, dtype=torch.bool)
        for row in small.self_attn.v_proj.weight:
            rows |= (attn.v_proj.weight == row).all(1)
        attn.v_proj.weight.data[~rows] = 0
    return masked


@pytest.mark.parametrize("fused", [False, True])
def test_structured_shrinks_and_equals_the_masked_model(fused):
    model = tiny(fused=fused)
    pruned = sparsity.prune(
        copy.deepcopy(model), sparsity.StructuredConfig(mlp_amount=0.25, head_amount=0.5)
    )
    layer = pruned.layers[0]
    assert layer.mlp.gate_proj.weight.shape == (264, 128)
    assert layer.mlp.down_proj.weight.shape == (128, 264)
    assert layer.self_attn.q_proj.weight.shape == (64, 128)
    assert layer.self_attn.k_proj.weight.shape == (32, 128)
    assert layer.self_attn.o_proj.weight.shape == (128, 64)
    assert (layer.self_attn.num_heads, layer.self_attn.num_kv_heads) == (2, 1)
    ids = torch.randint(0, 257, (2, 24))
    with torch.no_grad():
        out = pruned(ids)
        expected = _masked_equivalent(model, pruned)(ids)
        loss = pruned(ids, labels=ids)
        generated = pruned.generate(ids[:, :4], 3, temperature=0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(loss) and generated.shape == (2, 7)


def test_structured_removes_the_lowest_norm_channels():
    model = tiny()
    mlp = model.layers[0].mlp
    with torch.no_grad():
        mlp.up_proj.weight[:88] *= 1e-3  # the 88 weakest channels
    sparsity.prune(model, sparsity.StructuredConfig(mlp_amount=0.25))
    assert (model.layers[0].mlp.up_proj.weight.abs().amax(1) > 1e-3).all()


def test_bad_configs():
    with pytest.raises(sparsity.PruningError, match="amount"):
        sparsity.MagnitudeConfig(1.5)
    with pytest.raises(sparsity.PruningError, match="scope"):
        sparsity.MagnitudeConfig(0.5, scope="model")
    with pytest.raises(sparsity.PruningError, match="head_amount"):
        sparsity.StructuredConfig(head_amount=1.0)
    with pytest.raises(sparsity.PruningError, match="perfml Llama"):
        sparsity.prune(nn.Linear(4, 4), sparsity.StructuredConfig())


@pytest.mark.parametrize(
    "config",
    [
        sparsity.StructuredConfig(0.5, 0.5),
        sparsity.MagnitudeConfig(0.5),
        sparsity.SemiStructured24Config(),
    ],
    ids=repr,
)
def test_model_dir_round_trip(config, tmp_path):
    from perfml.quant import model_dir

    model = sparsity.prune(tiny(), config)
    model_dir.save_model_dir(
        model,
        tmp_path / "p",
        model_config=model.config.to_dict(),
        passes=[model_dir.describe_config("prune", config)],
        report=sparsity.sparsity_report(model),
    )
    loaded = model_dir.load_model_dir(tmp_path / "p")
    ids = torch.randint(0, 257, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


@pytest.mark.gpu
def test_2_4_semi_structured_on_cuda_matches_the_masked_dense():
    linear = nn.Linear(512, 256, bias=False, device="cuda", dtype=torch.float16)
    dense = copy.deepcopy(linear)
    sparsity.prune(nn.Sequential(linear), sparsity.SemiStructured24Config())
    dense.weight.data.mul_(sparsity.mask_2_4(dense.weight))
    x = torch.randn(64, 512, device="cuda", dtype=torch.float16)
    assert type(linear.weight.data) is not torch.Tensor
    torch.testing.assert_close(linear(x), dense(x), rtol=2e-2, atol=2e-2)
