"""perfml.quantize and the quantized matmul kernels: SQNR floors, kernels vs float64 references,
packed storage, safetensors round trips, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from perfml import _backend, quant
from perfml.quant import kernels
from tests.utils import assert_matches_reference

# SQNR floors on N(0, 1) weights [256, 512]. int8 per channel: a step of amax/127 with amax ~3.5
# sigma gives ~42 dB; int4 per group: 15 steps over a group's range, ~20-22 dB (32/64/128 all
# above 15); int8 dynamic: the weight's ~42 dB plus per-token activation rounding, ~39 dB at the
# output; float8 e4m3: 3 mantissa bits give a relative error of at most 2**-4 per value, ~31 dB,
# so 25 dB leaves room for the subnormals at the small end of a row.
FLOORS = [
    (quant.Int8WeightOnlyConfig(), 30.0),
    (quant.Int4WeightOnlyConfig(group_size=32), 15.0),
    (quant.Int4WeightOnlyConfig(group_size=64), 15.0),
    (quant.Int4WeightOnlyConfig(group_size=128), 15.0),
    (quant.Int8DynamicConfig(), 30.0),
    (quant.Float8Config(), 25.0),
]


def sqnr(ref: torch.Tensor, actual: torch.Tensor) -> float:
    ref, actual = ref.double(), actual.double()
    return (10 * torch.log10(ref.pow(2).sum() / (ref - actual).pow(2).sum())).item()


def gaussian_linear(k: int = 512, n: int = 256, bias: bool = False) -> nn.Linear:
    linear = nn.Linear(k, n, bias=bias)
    nn.init.normal_(linear.weight)
    return linear


@pytest.mark.parametrize("config,floor", FLOORS, ids=lambda v: repr(v))
def test_sqnr_floor_weight_and_output(config, floor):
    linear = gaussian_linear()
    x = torch.randn(8, 512)
    with torch.no_grad():
        ref = linear(x)
        q = quant.quantize(linear, config)
        out = q(x)
    assert sqnr(linear.weight, q.dequantize()) >= floor
    assert sqnr(ref, out) >= floor


@pytest.mark.parametrize("config", [c for c, _ in FLOORS], ids=repr)
def test_state_dict_holds_packed_integer_weights(config):
    q = quant.quantize(gaussian_linear(130, 24), config)
    state = q.state_dict()
    assert "weight" not in state
    packed = {k: v for k, v in state.items() if k.startswith("weight_")}
    ((name, tensor),) = packed.items()
    expected = {
        "weight_int8": (torch.int8, (24, 130)),
        "weight_int4": (
            torch.uint8,
            (
                24,
                -(-130 // getattr(config, "group_size", 1)) * getattr(config, "group_size", 1) // 2,
            ),
        ),
        "weight_fp8": (torch.float8_e4m3fn, (24, 130)),
    }[name]
    assert (tensor.dtype, tuple(tensor.shape)) == expected


def test_int4_packs_two_values_per_byte_and_pads_k():
    w = torch.randn(3, 70)
    packed, scale, zero = quant.methods.quantize_int4_per_group(w, 32)
    assert packed.shape == (3, 48) and scale.shape == (3, 3) and zero.shape == (3, 3)
    q = kernels.unpack_int4(packed)
    assert q.max() <= 15
    torch.testing.assert_close(kernels.pack_int4(q), packed, rtol=0, atol=0)
    deq = kernels.dequantize_int4_ref(packed, scale, zero, 32)
    assert (deq[:, 70:] == 0).all(), "the K padding must dequantize to exact zeros"
    assert (deq[:, :70] - w).abs().max() <= scale.max() / 2 + 1e-6


# --- kernels vs float64 ---------------------------------------------------------------------------

SHAPES = [(1, 64, 32), (5, 97, 33), (17, 130, 64), (33, 200, 72)]  # (M, K, N), awkward on purpose


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_w8a16_kernel_matches_float64(m, k, n, dtype, poison_empty):
    w_q, scale = quant.methods.quantize_int8_per_channel(torch.randn(n, k))
    scale = scale.to(dtype)
    x = torch.randn(m, k).to(dtype)
    with _backend.force("triton"):
        out = kernels.w8a16_mm(x, w_q, scale)
    ref64 = x.double() @ (w_q.double() * scale.double()[:, None]).T
    baseline = F.linear(x, (w_q.float() * scale.float()[:, None]).to(dtype))
    assert_matches_reference(out, ref64, baseline)
    assert_matches_reference(kernels.w8a16_mm_ref(x, w_q, scale), ref64, baseline)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_w4a16_kernel_matches_float64(m, k, n, group, dtype, poison_empty):
    packed, scale, zero = quant.methods.quantize_int4_per_group(torch.randn(n, k), group)
    scale = scale.to(dtype)
    x = torch.randn(m, k).to(dtype)
    with _backend.force("triton"):
        out = kernels.w4a16_mm(x, packed, scale, zero, group)
    w64 = kernels.dequantize_int4_ref(packed, scale, zero, group).double()[:, :k]
    if dtype != torch.float32:
        w64 = w64.to(dtype).double()  # the kernel's tiles are in x's dtype, by design
    ref64 = x.double() @ w64.T
    baseline = F.linear(x, w64.to(dtype))
    assert_matches_reference(out, ref64, baseline)


def test_kernels_take_non_contiguous_and_batched_inputs():
    w_q, scale = quant.methods.quantize_int8_per_channel(torch.randn(40, 48))
    x = torch.randn(2, 48, 3).transpose(1, 2)  # [2, 3, 48], last dim strided
    with _backend.force("triton"):
        out = kernels.w8a16_mm(x, w_q, scale)
    assert out.shape == (2, 3, 40)
    torch.testing.assert_close(
        out, kernels.w8a16_mm_ref(x.reshape(-1, 48), w_q, scale).view(2, 3, 40)
    )


def test_kernel_catches_a_wrong_scale_per_group():
    """The int4 kernel must apply each group's own scale: a model with one scale per row would
    pass a single-group test, so K spans several groups here with very different scales."""
    w = torch.randn(16, 128) * torch.tensor([1.0, 100.0, 0.01, 10.0]).repeat_interleave(32)
    packed, scale, zero = quant.methods.quantize_int4_per_group(w, 32)
    x = torch.randn(3, 128)
    with _backend.force("triton"):
        out = kernels.w4a16_mm(x, packed, scale, zero, 32)
    ref = x.double() @ kernels.dequantize_int4_ref(packed, scale, zero, 32).double().T
    assert (out.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_opcheck_and_compile_without_graph_break():
    w_q, scale = quant.methods.quantize_int8_per_channel(torch.randn(32, 64))
    packed, s4, z4 = quant.methods.quantize_int4_per_group(torch.randn(32, 64), 32)
    x = torch.randn(4, 64)
    torch.library.opcheck(kernels._w8a16_mm_op, (x, w_q, scale))
    torch.library.opcheck(kernels._w4a16_mm_op, (x, packed, s4, z4, 32))
    model = quant.quantize(
        nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)), quant.Int8WeightOnlyConfig()
    )
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))


# --- dynamic int8 and float8 ---------------------------------------------------------------


def test_int8_dynamic_reference_is_the_exact_integer_product():
    linear = gaussian_linear(96, 24)
    q = quant.quantize(linear, quant.Int8DynamicConfig())
    x = torch.randn(5, 96)
    x_q, x_scale = quant.methods.quantize_int8_per_token(x)
    expected = (x_q.double() @ q.weight_int8.double().T) * x_scale.double() * q.scale.double()
    torch.testing.assert_close(q(x).double(), expected, rtol=1e-6, atol=0)


def test_float8_emulation_rounds_each_operand_to_e4m3():
    linear = gaussian_linear(64, 16)
    q = quant.quantize(linear, quant.Float8Config())
    x = torch.randn(3, 64) * 10
    x_f8, x_scale = quant.methods.quantize_fp8_rowwise(x)
    assert x_f8.float().abs().max() <= 448
    expected = (x_f8.double() @ q.weight_fp8.double().T) * x_scale.double() * q.scale.double()
    torch.testing.assert_close(q(x).double(), expected, rtol=1e-5, atol=1e-5)
    # every weight value is representable in e4m3: the round trip is exact
    assert torch.equal(q.weight_fp8.float().to(torch.float8_e4m3fn).float(), q.weight_fp8.float())


# --- the pass ------------------------------------------------------------------------------


def _tiny_llama():
    from perfml.models.llama import Llama, LlamaConfig

    return Llama(LlamaConfig.preset("tiny", fused=False, num_layers=2)).eval()


def test_quantize_swaps_every_linear_but_the_head_and_keeps_the_model_close():
    model = _tiny_llama()
    ids = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        ref = model(ids)
        quant.quantize(model, quant.Int8WeightOnlyConfig())
        out = model(ids)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears == [], f"left unquantized: {linears}"
    assert sum(isinstance(m, quant.Int8WeightOnlyLinear) for m in model.modules()) == 14
    assert sqnr(ref, out) >= 25


def test_quantizing_twice_is_a_clear_error():
    model = quant.quantize(_tiny_llama(), quant.Int4WeightOnlyConfig())
    with pytest.raises(quant.QuantizationError, match="already quantized"):
        quant.quantize(model, quant.Int8WeightOnlyConfig())


def test_filter_fn_selects_modules():
    model = _tiny_llama()
    quant.quantize(
        model, quant.Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn.endswith("mlp.up_proj")
    )
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith("proj")}
    assert kinds["layers.0.mlp.up_proj"] == "Int8WeightOnlyLinear"
    assert kinds["layers.0.mlp.down_proj"] == "Linear"


def test_bad_configs_and_inputs_are_clear_errors():
    with pytest.raises(quant.QuantizationError, match="group_size"):
        quant.Int4WeightOnlyConfig(group_size=48)
    with pytest.raises(quant.QuantizationError, match="no transform"):
        quant.quantize(nn.Linear(4, 4), object())
    q = quant.quantize(nn.Linear(64, 8), quant.Int8WeightOnlyConfig())
    with pytest.raises(ValueError, match="in_features"):
        q(torch.randn(2, 65))
    with pytest.raises(TypeError, match="x must be"):
        q(torch.randn(2, 64).double())


@pytest.mark.parametrize(
    "config", [c for c, _ in FLOORS[:2]] + [c for c, _ in FLOORS[4:]], ids=repr
)
def test_safetensors_round_trip(config, tmp_path):
    from safetensors.torch import load_file, save_file

    model = nn.Sequential(nn.Linear(96, 40, bias=True), nn.GELU(), nn.Linear(40, 8))
    quant.quantize(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    fresh = quant.quantize(
        nn.Sequential(nn.Linear(96, 40, bias=True), nn.GELU(), nn.Linear(40, 8)),
        config,
        filter_fn=lambda m, fqn: isinstance(m, nn.Linear),
    )
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    x = torch.randn(3, 96)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_model_dir_round_trip(tmp_path):
    from perfml.quant import model_dir

    model = quant.quantize(_tiny_llama(), quant.Int4WeightOnlyConfig(group_size=32))
    model_dir.save_model_dir(
        model,
        tmp_path / "q",
        model_config=model.config.to_dict(),
        passes=[model_dir.describe_config("quantize", quant.Int4WeightOnlyConfig(32))],
        report={},
    )
    loaded = model_dir.load_model_dir(tmp_path / "q")
    ids = torch.randint(0, 257, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 256])
def test_gpu_kernels_at_llama_shapes(m):
    torch.manual_seed(0)
    w = torch.randn(4096, 4096, device="cuda")
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    w_q, scale = quant.methods.quantize_int8_per_channel(w)
    out = kernels.w8a16_mm(x, w_q, scale.bfloat16())
    ref = kernels.w8a16_mm_ref(x.float(), w_q, scale.bfloat16())
    assert sqnr(ref, out) >= 40
    packed, s4, z4 = quant.methods.quantize_int4_per_group(w, 64)
    out4 = kernels.w4a16_mm(x, packed, s4.bfloat16(), z4, 64)
    ref4 = kernels.w4a16_mm_ref(x, packed, s4.bfloat16(), z4, 64)
    assert sqnr(ref4, out4) >= 40


def test_a_filter_that_accepts_everything_converts_only_the_linears():
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    quant.quantize(model, quant.Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: True)
    assert isinstance(model[0], quant.Int8WeightOnlyLinear)
    assert isinstance(model[1], nn.ReLU)
    assert isinstance(model[2], quant.Int8WeightOnlyLinear)
