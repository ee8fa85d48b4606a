"""An exported LM is never silently wrong outside its limits: the graph itself fails in
onnxruntime past max_seq_len and for token ids outside the vocabulary, the limits are in the
model's metadata and perfml's runner names them; the graph's inputs/outputs are named; bf16 is
refused before any work; a failed export leaves no file; the export prints no warning noise."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from perfml.export import ExportError, OnnxInputError, OnnxRunner, run_onnx, to_onnx
from perfml.export import onnx as export_onnx
from perfml.models.llama import Llama, LlamaConfig

MAX_SEQ_LEN, VOCAB = 256, 257


def small_llama(**overrides) -> Llama:
    torch.manual_seed(0)
    settings = {"num_layers": 1, "hidden_size": 32, "intermediate_size": 64, **overrides}
    return Llama(LlamaConfig.preset("tiny", **settings)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = small_llama()
    assert (model.config.max_seq_len, model.config.vocab_size) == (MAX_SEQ_LEN, VOCAB)
    path = tmp_path_factory.mktemp("limits") / "lm.onnx"
    report = to_onnx(model, (torch.randint(0, VOCAB, (2, 16)),), path)
    return model, report


def _raw_session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_inputs_outputs_are_named_with_dynamic_batch_and_sequence(exported):
    _, report = exported
    assert report.input_names == ["input_ids"] and report.output_names == ["logits"]
    graph = onnx.load(str(report.path)).graph
    assert [i.name for i in graph.input] == ["input_ids"]
    assert [o.name for o in graph.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]
    out_dims = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == ["batch", "seq", VOCAB]


def test_the_limits_are_in_the_metadata(exported):
    _, report = exported
    props = {p.key: p.value for p in onnx.load(str(report.path)).metadata_props}
    assert props["max_seq_len"] == str(MAX_SEQ_LEN) and props["vocab_size"] == str(VOCAB)
    assert report.max_seq_len == MAX_SEQ_LEN and report.vocab_size == VOCAB


@pytest.mark.parametrize("seq", [257, 400])
def test_plain_onnxruntime_fails_past_max_seq_len(exported, seq):
    model, report = exported
    ids = torch.randint(0, VOCAB, (1, seq))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(ids)  # what PyTorch does
    with pytest.raises(Exception, match=f"max_seq_len_{MAX_SEQ_LEN}"):
        _raw_session(report.path).run(None, {"input_ids": ids.numpy()})


@pytest.mark.parametrize("token", [-1, -VOCAB, VOCAB, 10**6])
def test_plain_onnxruntime_fails_for_a_token_id_outside_the_vocabulary(exported, token):
    model, report = exported
    ids = torch.tensor([[1, token, 2]])
    with pytest.raises(IndexError):
        model(ids)
    with pytest.raises(Exception, match=f"vocab_size_{VOCAB}"):
        _raw_session(report.path).run(None, {"input_ids": ids.numpy()})


def test_the_full_length_and_every_token_id_still_run(exported):
    model, report = exported
    ids = torch.arange(MAX_SEQ_LEN).remainder(VOCAB)[None]
    ids[0, -1] = VOCAB - 1
    (got,) = _raw_session(report.path).run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        want = model(ids)
    err = np.abs(got - want.numpy()).max() / want.abs().max().item()
    assert got.shape == (1, MAX_SEQ_LEN, VOCAB) and err < export_onnx.TOLERANCE[torch.float32]


def test_the_runner_names_the_limits(exported):
    model, report = exported
    runner = OnnxRunner(report.path)
    assert (runner.max_seq_len, runner.vocab_size) == (MAX_SEQ_LEN, VOCAB)
    assert runner.input_names == ["input_ids"] and runner.output_names == ["logits"]
    with pytest.raises(OnnxInputError, match=r"257 tokens.*max_seq_len 256"):
        runner(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(OnnxInputError, match=r"token id -1.*vocab_size 257"):
        runner(np.array([[3, -1]]))
    with pytest.raises(OnnxInputError, match=r"token id 257.*vocab_size 257"):
        run_onnx(report.path, input_ids=np.array([[257, 3]]))
    with pytest.raises(OnnxInputError, match=r"input_ids must be an integer array \[batch, seq\]"):
        runner(np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(OnnxInputError, match="takes 1 input"):
        runner(np.zeros((1, 4), dtype=np.int64), np.zeros((1, 4), dtype=np.int64))
    ids = torch.randint(0, VOCAB, (3, 9))
    (logits,) = runner(ids)
    with torch.no_grad():
        want = model(ids)
    assert np.abs(logits - want.numpy()).max() / want.abs().max().item() < 1e-4


def test_bf16_is_refused_before_any_work(tmp_path, monkeypatch):
    def no_capture(*args, **kwargs):
        raise AssertionError("the export started")

    monkeypatch.setattr(export_onnx, "_capture", no_capture)
    model = small_llama().to(torch.bfloat16)
    with pytest.raises(ExportError, match=r"bfloat16.*embed_tokens\.weight.*model\.float\(\)"):
        to_onnx(model, (torch.randint(0, VOCAB, (2, 8)),), tmp_path / "bf16.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_verification_leaves_no_file_and_keeps_an_earlier_one(tmp_path, monkeypatch):
    path = tmp_path / "lm.onnx"
    path.write_bytes(b"an earlier model")

    def broken_runtime(*args, **kwargs):
        raise ExportError("verify: onnxruntime could not run it")

    monkeypatch.setattr(export_onnx, "_run_onnx", broken_runtime)
    with pytest.raises(ExportError, match="could not run"):
        to_onnx(small_llama(), (torch.randint(0, VOCAB, (2, 8)),), path)
    assert path.read_bytes() == b"an earlier model"
    assert [p.name for p in tmp_path.iterdir()] == ["lm.onnx"]


def test_a_failed_conversion_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "out" / "lm.onnx"

    def failing_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        to_onnx(small_llama(), (torch.randint(0, VOCAB, (2, 8)),), path, verify=False)
    assert list(path.parent.iterdir()) == []


def test_the_export_prints_no_warning_noise(tmp_path, capfd):
    class TwoInputs(nn.Module):  # two inputs sharing the batch and seq dims
        def forward(self, a, b):
            return a * b

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        to_onnx(small_llama(), (torch.randint(0, VOCAB, (2, 8)),), tmp_path / "lm.onnx")
        to_onnx(TwoInputs(), (torch.randn(2, 3, 4), torch.randn(2, 3, 4)), tmp_path / "two.onnx")
    out, err = capfd.readouterr()
    assert [str(w.message) for w in caught] == []
    assert out == "" and err == ""


def test_a_real_warning_still_shows(tmp_path):
    class Warns(nn.Module):
        def forward(self, x):
            warnings.warn("a warning of the model's own", UserWarning, stacklevel=1)
            return x * 2

    with pytest.warns(UserWarning, match="of the model's own"):
        to_onnx(Warns(), (torch.randn(2, 3),), tmp_path / "w.onnx", dynamic_seq=False)
