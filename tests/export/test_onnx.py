"""perfml.export.to_onnx: the reference LM (fused and unfused) with dynamic batch and sequence,
every forward op's translation against PyTorch in onnxruntime (fp32 and fp16, standard fused
nodes and decompositions), Int8 weight-only as QDQ, external data, clear errors, the CLI."""

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

import perfml.ops as P
from perfml.export import ExportError, ParityError, to_onnx, translations
from perfml.export import onnx as export_onnx
from perfml.models.llama import Llama, LlamaConfig


def _run_ort(path, *inputs):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {n: t.numpy() for n, t in zip(names, inputs, strict=True)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def _rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def _standard_domains_only(path):
    graph = onnx.load(str(path)).graph
    return {node.domain for node in graph.node} <= {"", "ai.onnx"}


# --- the reference LM -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fused_export(tmp_path_factory):
    torch.manual_seed(0)
    model = Llama(LlamaConfig.preset("tiny", fused=True))
    path = tmp_path_factory.mktemp("fused") / "tiny.onnx"
    ids = torch.randint(0, 257, (2, 16))
    return model, to_onnx(model, (ids,), path)


def test_fused_llama_matches_pytorch_at_a_new_batch_and_length(fused_export):
    _, report = fused_export
    parity = report.parity
    assert parity.ok and parity.max_rel_err <= export_onnx.TOLERANCE[torch.float32]
    assert parity.example_shapes == [[2, 16]]
    ((batch, seq),) = parity.input_shapes
    assert batch != 2 and seq != 16
    assert report.dynamic_axes == {"input_ids": {0: "batch", 1: "seq"}}
    # every perfml op of the forward became standard ONNX
    assert report.perfml_ops == {
        "perfml::rms_norm_fwd": 5,
        "perfml::add_rms_norm_fwd": 4,
        "perfml::glu_fwd": 4,
        "perfml::rope_fwd": 4,
    }
    assert _standard_domains_only(report.path)


def test_fused_llama_uses_rms_normalization_where_the_runtime_runs_it(fused_export):
    _, report = fused_export
    if export_onnx.onnxruntime_runs_rms_normalization():
        assert report.opset == 23 and report.rms_normalization
        assert report.op_counts["RMSNormalization"] == 9  # 4 x 2 per layer + the final norm
    else:
        assert report.opset == 20 and "RMSNormalization" not in report.op_counts


def test_exported_llama_runs_a_single_short_sequence(fused_export):
    model, report = fused_export
    assert report.external_data is None and not report.path.with_suffix(".onnx.data").exists()
    ids = torch.randint(0, 257, (1, 5))  # below the example's batch: the graph is general
    (got,) = _run_ort(report.path, ids)
    with torch.no_grad():
        want = model(ids)
    assert got.shape == want.shape == (1, 5, 257)
    assert _rel_err(got, want) < 1e-4


def test_unfused_llama_matches_pytorch(tmp_path):
    model = Llama(LlamaConfig.preset("tiny", fused=False))
    report = to_onnx(model, (torch.randint(0, 257, (3, 12)),), tmp_path / "eager.onnx")
    assert report.parity.ok and report.parity.max_rel_err < 1e-4
    ((batch, seq),) = report.parity.input_shapes
    assert batch != 3 and seq != 12
    assert report.perfml_ops == {}


# --- every forward op's translation -----------------------------------------------------------

B, T, H, HQ, HK, D, P_ROWS = 2, 6, 40, 4, 2, 16, 64


class AllOps(nn.Module):
    """Each perfml forward op (and variant) once; one output per call."""

    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = nn.Parameter((1 + 0.1 * torch.randn(H, generator=g)).to(dtype))
        self.b = nn.Parameter((0.1 * torch.randn(H, generator=g)).to(dtype))
        self.w32 = nn.Parameter(1 + 0.1 * torch.randn(H, generator=g))
        angles = torch.arange(P_ROWS).float()[:, None] * torch.rand(D // 2, generator=g)
        emb = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos_table", emb.cos().to(dtype))
        self.register_buffer("sin_table", emb.sin().to(dtype))

    def forward(self, x, residual, q, k, cos, sin, positions):
        y, s = P.add_rms_norm(x, residual, self.w)
        q_hf, k_hf = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, D], HF's layout
        return (
            P.rms_norm(x, self.w, cast="llama"),
            P.rms_norm(x, self.w, offset=1.0, cast="gemma"),
            P.rms_norm(x, self.w, cast="none"),
            P.rms_norm(x),
            P.rms_norm(x, self.w32, cast="llama"),  # output promoted to fp32
            y,
            s,
            P.layer_norm(x, self.w, self.b),
            P.layer_norm(x, None, self.b),
            P.layer_norm(x),
            P.swiglu(x, residual),
            P.geglu(x, residual, approximate="tanh"),
            P.geglu(x, residual, approximate="none"),
            *P.rope(q_hf, k_hf, cos, sin),
            *P.rope(q, k, cos[..., : D // 2], sin[..., : D // 2], unsqueeze_dim=2),  # partial
            *P.rope(q, k, self.cos_table, self.sin_table, position_ids=positions, unsqueeze_dim=2),
            P.softmax(x),
        )


def _all_ops_inputs(dtype, b=B, t=T):
    g = torch.Generator().manual_seed(2)
    angles = torch.arange(t).float()[None, :, None] * torch.rand(b, 1, D // 2, generator=g)
    emb = torch.cat((angles, angles), dim=-1)
    return (
        (torch.randn(b, t, H, generator=g) * 2 + 0.5).to(dtype),
        torch.randn(b, t, H, generator=g).to(dtype),
        torch.randn(b, t, HQ, D, generator=g).to(dtype),
        torch.randn(b, t, HK, D, generator=g).to(dtype),
        emb.cos().to(dtype),
        emb.sin().to(dtype),
        torch.randint(0, P_ROWS, (b, t), generator=g),
    )


def _ulp(want):
    """The spacing of want's dtype at each element's magnitude."""
    mantissa = {torch.float16: 10, torch.float32: 23}[want.dtype]
    mag = want.double().abs().clamp_min(torch.finfo(want.dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - mantissa)


@pytest.mark.parametrize(
    ("dtype", "opset"),
    [(torch.float32, 23), (torch.float16, 18)],
    ids=["fp32-opset23", "fp16-opset18"],
)
def test_every_op_translation_matches_pytorch(tmp_path, dtype, opset):
    """fp32 at opset 23 takes the standard fused nodes (RMSNormalization, LayerNormalization,
    Gelu); fp16 at opset 18 every decomposition, Gelu's formula included. The decompositions
    round exactly where the kernels do: fp16 outputs are almost all
    bit-identical to PyTorch's (a missing or misplaced cast changes about a third of them by an
    ulp), and the rest within one fp16 ulp or the fp32 noise of the runtime's own math (its
    Gelu and Softmax differ from torch's by ~1e-7 of the output's scale)."""
    model = AllOps(dtype)
    report = to_onnx(model, _all_ops_inputs(dtype), tmp_path / "ops.onnx", opset=opset)
    assert report.parity.ok
    assert _standard_domains_only(report.path)
    fused_norms = opset >= 23 and report.rms_normalization and dtype == torch.float32
    # RMSNormalization for the fp32 weighted norms: llama, gemma (scale w + 1), w32 and the
    # add_rms_norm one; "none" is llama's very node in fp32 (merged as a common subexpression)
    assert report.op_counts.get("RMSNormalization", 0) == (4 if fused_norms else 0)
    assert ("LayerNormalization" in report.op_counts) == (dtype == torch.float32)
    assert ("Gelu" in report.op_counts) == (opset >= 20)

    inputs = _all_ops_inputs(dtype, b=3, t=9)  # another batch and length than the export's
    got = _run_ort(report.path, *inputs)
    with torch.no_grad():
        want = model(*inputs)
    assert len(got) == len(want)
    for i, (o, w) in enumerate(zip(got, want, strict=True)):
        assert o.dtype == w.dtype and o.shape == w.shape, i
        if w.dtype == torch.float32:
            assert _rel_err(o, w) < 2e-6, i
        else:
            diff = (o.double() - w.double()).abs()
            assert (diff <= _ulp(w) + 1e-6 * w.double().abs().max()).all(), i
            assert (diff == 0).float().mean() > 0.97, i


# --- Int8 weight-only as QDQ ------------------------------------------------------------------


def test_int8_weight_only_llama_exports_as_dequantize_linear_matmul(tmp_path):
    """A model directory written after `perfml quantize` (int8 weight-only) exports through
    the same loader as `perfml export`, its matmuls as QDQ, and runs in onnxruntime."""
    from perfml import quant
    from perfml.quant.model_dir import describe_config, save_model_dir

    config = LlamaConfig.preset("tiny", num_layers=1)
    model = Llama(config)
    quant.quantize(model, quant.Int8WeightOnlyConfig())
    passes = [describe_config("quantize", quant.Int8WeightOnlyConfig())]
    model_dir = save_model_dir(
        model, tmp_path / "int8", model_config=config.to_dict(), passes=passes, report={}
    )
    report = export_onnx.export_run(model_dir, tmp_path / "q.onnx", batch=2, seq=8)
    assert report.perfml_ops["perfml::w8a16_mm"] == 7
    assert report.parity.ok
    graph = onnx.load(str(report.path)).graph
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 7
    initializers = {i.name: i for i in graph.initializer}
    for node in dq:
        weight = initializers[node.input[0]]
        assert weight.data_type == onnx.TensorProto.INT8  # the weights stay int8 in the file
        consumers = [n.op_type for n in graph.node if node.output[0] in n.input]
        assert consumers == ["MatMul"]
    assert any("MatMulNBits" in note for note in report.notes)


@pytest.mark.parametrize("group_size,hidden", [(64, 128), (32, 80)])
def test_int4_weight_only_llama_exports_with_packed_weights(tmp_path, group_size, hidden):
    """Int4 weight-only (K padded to the group when hidden is not a multiple of it) exports with
    its uint8 nibble pairs as initializers and matches PyTorch in onnxruntime."""
    from perfml import quant
    from perfml.quant.model_dir import describe_config, save_model_dir

    config = LlamaConfig.preset(
        "tiny", num_layers=1, hidden_size=hidden, intermediate_size=2 * hidden, num_heads=4
    )
    model = Llama(config)
    q = quant.Int4WeightOnlyConfig(group_size=group_size)
    quant.quantize(model, q)
    passes = [describe_config("quantize", q)]
    model_dir = save_model_dir(
        model, tmp_path / "int4", model_config=config.to_dict(), passes=passes, report={}
    )
    report = export_onnx.export_run(model_dir, tmp_path / "q4.onnx", batch=2, seq=8)
    assert report.perfml_ops["perfml::w4a16_mm"] == 7
    assert report.parity.ok, report.parity
    graph = onnx.load(str(report.path)).graph
    packed = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.UINT8}
    linears = [m for m in model.modules() if isinstance(m, quant.Int4WeightOnlyLinear)]
    assert len(packed) == len(linears) == 7  # the nibble pairs stay packed in the file
    assert all(name.endswith(".weight_int4") for name in packed)
    # and no dequantized copy of any of them was folded into a float initializer
    dense_shapes = {(m.out_features, m.in_features) for m in linears}
    dense_shapes |= {(k, n) for n, k in dense_shapes}
    floats = [tuple(i.dims) for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert not dense_shapes & set(floats)


def test_int4_translation_rounds_the_weight_like_the_kernel_in_fp16(tmp_path):
    """fp16: the dequantized weight is rounded to fp16 before the fp32 matmul, as the kernel
    does; outputs within an fp16 ulp of PyTorch's at a new batch size (K = 80 pads to 96)."""
    from perfml import quant

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(80, 48, bias=False).half())
    quant.quantize(model, quant.Int4WeightOnlyConfig(group_size=32), filter_fn=lambda m, f: True)
    x = torch.randn(4, 80).half()
    report = to_onnx(model, (x,), tmp_path / "q4.onnx", dynamic_seq=False)
    assert report.parity.ok
    fresh = torch.randn(7, 80).half()
    (got,) = _run_ort(report.path, fresh)
    with torch.no_grad():
        want = model(fresh)
    assert got.dtype == torch.float16 and got.shape == want.shape
    diff = (got.double() - want.double()).abs()
    assert (diff <= _ulp(want) + 1e-6 * want.double().abs().max()).all()


@pytest.mark.parametrize("config", ["Int8DynamicConfig", "Float8Config"])
def test_dynamic_int8_and_float8_models_export_through_their_torch_ops(tmp_path, config):
    from perfml import quant

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    quant.quantize(model, getattr(quant, config)(), filter_fn=lambda m, f: True)
    report = to_onnx(model, (torch.randn(4, 64),), tmp_path / "q.onnx", dynamic_seq=False)
    assert report.parity.ok and report.parity.max_rel_err < 1e-5


# --- external data ----------------------------------------------------------------------------


def test_weights_over_the_threshold_go_to_external_data(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 8))
    model.train()
    example = (torch.randn(4, 64),)
    monkeypatch.setattr(export_onnx, "EXTERNAL_DATA_THRESHOLD", 1024)
    report = to_onnx(model, example, tmp_path / "big.onnx", dynamic_seq=False)
    assert report.external_data == tmp_path / "big.onnx.data"
    # the saver leaves tiny tensors (a 32-byte bias) inline
    assert report.external_data.stat().st_size >= 0.99 * report.weights_bytes
    assert (tmp_path / "big.onnx").stat().st_size < report.weights_bytes / 10
    assert report.parity.ok  # onnxruntime loaded the weights from the data file
    assert model.training  # the export ran in eval mode and restored the flag


# --- errors -----------------------------------------------------------------------------------


@torch.library.custom_op("perfml_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x.sin()


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


class Mystery(nn.Module):
    def forward(self, x):
        return torch.ops.perfml_test.mystery(x)


def test_an_op_without_translation_is_named_with_its_module(tmp_path):
    model = nn.Module()
    model.blocks = nn.Sequential(nn.Linear(8, 8), Mystery())
    model.forward = lambda x: model.blocks(x)
    with pytest.raises(ExportError) as info:
        to_onnx(model, (torch.randn(2, 8),), tmp_path / "m.onnx", dynamic_seq=False)
    message = str(info.value)
    assert "perfml_test::mystery" in message
    assert "'blocks.1'" in message and "Mystery" in message
    assert not (tmp_path / "m.onnx").exists()


class Eigenvalues(nn.Module):
    def forward(self, x):
        return torch.linalg.eigh(x @ x.mT).eigenvalues  # ONNX has no eigensolver


def test_an_aten_op_without_onnx_form_is_named_with_its_module(tmp_path):
    model = nn.Module()
    model.head = Eigenvalues()
    model.forward = lambda x: model.head(x)
    with pytest.raises(ExportError) as info:
        to_onnx(model, (torch.randn(2, 4, 4),), tmp_path / "m.onnx", dynamic_seq=False)
    message = str(info.value)
    opset, _ = export_onnx.resolve_opset(None)
    assert "aten::_linalg_eigh" in message and f"at opset {opset}" in message
    assert "'head'" in message and "Eigenvalues" in message


class LossOf(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(ids, labels=ids)


def test_a_training_only_loss_op_says_to_export_the_logits(tmp_path):
    model = LossOf(Llama(LlamaConfig.preset("tiny", num_layers=1)))
    with pytest.raises(ExportError, match="training-only") as info:
        to_onnx(model, (torch.randint(0, 257, (2, 8)),), tmp_path / "m.onnx")
    assert "perfml::linear_cross_entropy_fwd" in str(info.value)
    assert "'lm' (perfml.models.llama.Llama)" in str(info.value)
    assert "logits" in str(info.value)


def test_a_wrong_translation_fails_the_parity_check_with_the_numbers(tmp_path, monkeypatch):
    real = translations.build_table

    def broken(opset, rms_normalization):
        table = real(opset, rms_normalization)
        op = __import__("onnxscript").opset18
        # silu dropped: gate * up instead of silu(gate) * up
        table[torch.ops.perfml.glu_fwd.default] = lambda gate, up, activation=0, inp=False: op.Mul(
            gate, up
        )
        return table

    monkeypatch.setattr(translations, "build_table", broken)

    class MLP(nn.Module):
        def forward(self, gate, up):
            return P.swiglu(gate, up)

    path = tmp_path / "bad.onnx"
    with pytest.raises(ParityError) as info:
        to_onnx(MLP(), (torch.randn(2, 3, 16), torch.randn(2, 3, 16)), path)
    parity = info.value.report.parity
    assert parity.max_rel_err > 0.1 and not parity.ok
    assert f"max rel err {parity.max_rel_err:.3g}" in str(info.value)
    # nothing half-made at the path asked for; the rejected model is kept aside for inspection
    assert not path.exists()
    kept = Path(info.value.report.path)
    assert kept != path and kept.exists() and str(kept) in str(info.value)


def test_bad_arguments_are_named(tmp_path):
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"size 1 along the dynamic 'batch' dim 0"):
        to_onnx(model, (torch.randn(1, 4),), tmp_path / "a.onnx")
    with pytest.raises(TypeError, match=r"example_inputs\[1\] must be a Tensor"):
        to_onnx(model, (torch.randn(2, 4), 3), tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="opset must be an int in 18.."):
        to_onnx(model, (torch.randn(2, 4),), tmp_path / "a.onnx", opset=12)
    # dim 1 is the Linear's feature dim, not a sequence
    with pytest.raises(
        ExportError, match=r"example_inputs\[0\] dim 1 \('seq'\).*dynamic_seq=False"
    ):
        to_onnx(model, (torch.randn(2, 4, 4)[:, 0],), tmp_path / "a.onnx")


# --- the command ------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path):
    """A run directory holding one checkpoint of a small fused Llama, as perfml train writes."""
    from perfml.train.checkpoint import checkpoint_name, save_checkpoint

    config = LlamaConfig.preset("tiny", hidden_size=32, intermediate_size=64, num_layers=1)
    model = Llama(config)
    run = tmp_path / "run"
    meta = {"model_config": config.to_dict(), "step": 1}
    save_checkpoint(run / "checkpoints" / checkpoint_name(1), model.state_dict(), {}, meta)
    return run


def test_cli_export_writes_a_verified_model(run_dir, tmp_path, capsys):
    from perfml import cli

    out = tmp_path / "model.onnx"
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "parity vs PyTorch" in printed and ") ok" in printed
    ids = np.random.default_rng(0).integers(0, 257, (3, 7))
    (logits,) = _run_ort(out, torch.from_numpy(ids))
    assert logits.shape == (3, 7, 257) and math.isfinite(float(logits.abs().max()))


def test_cli_export_of_a_missing_run_exits_2(tmp_path, capsys):
    from perfml import cli

    code = cli.main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "m.onnx")])
    assert code == 2
    assert (
        "nope: no such directory (a run directory or a model directory" in capsys.readouterr().err
    )


@pytest.mark.gpu
def test_cuda_model_exports_and_matches_onnxruntime_cpu(tmp_path):
    model = Llama(LlamaConfig.preset("tiny", fused=True)).cuda()
    ids = torch.randint(0, 257, (2, 16), device="cuda")
    report = to_onnx(model, (ids,), tmp_path / "cuda.onnx")
    assert report.parity.ok and report.perfml_ops["perfml::rope_fwd"] == 4
