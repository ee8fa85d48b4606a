"""perfml.prune on a quantized model is refused (prune the float model, then quantize), and
sparsity_report never calls zero weights fully sparse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from perfml import quant, sparsity
from perfml.models.llama import Llama, LlamaConfig

QUANT_CONFIGS = {
    "int8": quant.Int8WeightOnlyConfig(),
    "int4": quant.Int4WeightOnlyConfig(group_size=32),
    "fp8": quant.Float8Config(),
}
PRUNE_CONFIGS = {
    "magnitude-layer": sparsity.MagnitudeConfig(0.5),
    "magnitude-global": sparsity.MagnitudeConfig(0.5, scope="global"),
    "2:4": sparsity.SemiStructured24Config(),
    "structured": sparsity.StructuredConfig(mlp_amount=0.25, head_amount=0.5),
}


def tiny() -> Llama:
    config = LlamaConfig.preset("tiny", fused=False, num_layers=1, hidden_size=64, num_heads=2)
    return Llama(config).eval()


def quantized(name: str) -> Llama:
    torch.manual_seed(0)
    return quant.quantize(tiny(), QUANT_CONFIGS[name])


@pytest.mark.parametrize("quant_name", list(QUANT_CONFIGS))
@pytest.mark.parametrize("prune_name", list(PRUNE_CONFIGS))
def test_pruning_a_quantized_model_is_refused_naming_the_layer(prune_name, quant_name):
    model = quantized(quant_name)
    first = next(
        fqn for fqn, m in model.named_modules() if isinstance(m, quant.api.QuantizedLinear)
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sparsity.PruningError) as info:
        sparsity.prune(model, PRUNE_CONFIGS[prune_name])
    message = str(info.value)
    assert first == "layers.0.self_attn.q_proj"
    assert f"'{first}'" in message and type(model.get_submodule(first)).__name__ in message
    assert "prune before quantizing" in message
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), "the model must be untouched"


def test_a_quantized_layer_outside_the_filter_still_refuses():
    """A filter that leaves the quantized layers out does not make the order right: the
    quantized layers were computed from the unpruned weights."""
    model = tiny()
    quant.quantize(model, quant.Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: "mlp" in fqn)
    with pytest.raises(sparsity.PruningError, match="layers.0.mlp.gate_proj"):
        sparsity.prune(
            model, sparsity.MagnitudeConfig(0.5), filter_fn=lambda m, fqn: "self_attn" in fqn
        )


@pytest.mark.parametrize("quant_name", list(QUANT_CONFIGS))
def test_report_of_a_pruned_then_quantized_model_counts_the_quantized_weights(quant_name):
    """The right order: prune, then quantize; the report reads the dequantized weights, whose
    zeros survive quantization, so it matches the report made before quantizing."""
    torch.manual_seed(0)
    model = sparsity.prune(tiny(), sparsity.SemiStructured24Config())
    before = sparsity.sparsity_report(model)
    quant.quantize(model, QUANT_CONFIGS[quant_name])
    after = sparsity.sparsity_report(model)
    assert after["layers"].keys() == before["layers"].keys()
    assert after["total"]["numel"] == before["total"]["numel"] > 0
    for fqn, layer in before["layers"].items():
        assert after["layers"][fqn]["shape"] == layer["shape"], fqn
        # a weight that rounds to zero adds a zero; none of the pruned zeros become nonzero
        assert after["layers"][fqn]["nonzero"] <= layer["nonzero"], fqn
    assert after["layers"]["layers.0.mlp.up_proj"]["sparsity"] >= 0.5


def test_report_without_any_linear_weight_is_an_error_not_full_sparsity():
    with pytest.raises(sparsity.PruningError, match="no linear weights"):
        sparsity.sparsity_report(nn.Sequential(nn.Embedding(10, 4), nn.ReLU()))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_an_empty_layer_reports_zero_sparsity():
    model = nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 4))
    report = sparsity.sparsity_report(model)
    assert report["layers"]["0"] == {"shape": [4, 0], "nonzero": 0, "sparsity": 0.0}
    assert report["total"]["numel"] == 16
