"""Path selection: PERFML_BACKEND, force(), interpret mode and the kept extension error."""

import pytest
import torch

from perfml import _backend

CPU, META = torch.device("cpu"), torch.device("meta")


def test_invalid_env_value(monkeypatch):
    monkeypatch.setenv("PERFML_BACKEND", "cuda-fast")
    with pytest.raises(ValueError, match="PERFML_BACKEND='cuda-fast' is not one of") as info:
        _backend.select("rms_norm", CPU)
    for name in ("auto", "triton", "cpp", "aten", "reference"):
        assert name in str(info.value)


def test_aten_env_value(monkeypatch):
    monkeypatch.setenv("PERFML_BACKEND", "aten")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # an explicit aten wins over interpret mode
    assert _backend.select("rms_norm", CPU, has_cpp=True) == "aten"
    assert _backend.select("softmax", CPU) == "aten"
    assert _backend.select("softmax", torch.device("cuda")) == "aten"
    with _backend.force("aten"):
        assert _backend.backend_setting() == "aten"


def test_reference_wins_everywhere(monkeypatch):
    monkeypatch.setenv("PERFML_BACKEND", "reference")
    assert _backend.select("rms_norm", CPU, has_cpp=True) == "reference"


def test_force_overrides_env_and_restores(monkeypatch):
    monkeypatch.setenv("PERFML_BACKEND", "reference")
    with _backend.force("auto"):
        assert _backend.backend_setting() == "auto"
    assert _backend.backend_setting() == "reference"
    with pytest.raises(ValueError, match="not one of auto, triton, cpp, aten, reference"):
        with _backend.force("fast"):
            pass


def test_cpu_in_interpret_mode_runs_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("PERFML_BACKEND", raising=False)
    assert _backend.select("rms_norm", CPU, has_cpp=True) == "triton"


def test_cpu_outside_interpret_mode(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("PERFML_BACKEND", raising=False)
    # the C++ kernel when built, else the ATen composite: never the reference
    want = "cpp" if _backend.has_extension() else "aten"
    assert _backend.select("rms_norm", CPU, has_cpp=True) == want
    assert _backend.select("softmax", CPU, has_cpp=False) == "aten"
    assert _backend.select("softmax", META) == "aten"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with _backend.force("triton"):
            _backend.select("rms_norm", CPU)


def test_cpp_requested_without_a_cpp_kernel():
    # the error says which settings do work for that op
    with (
        _backend.force("cpp"),
        pytest.raises(RuntimeError, match=r"softmax: .*no C\+\+ CPU kernel.*auto.*aten.*reference"),
    ):
        _backend.select("softmax", CPU, has_cpp=False)


def test_cpp_requested_but_extension_missing(monkeypatch):
    monkeypatch.setattr(_backend, "_load_extension", lambda: (None, "ImportError: no _C"))
    with _backend.force("cpp"), pytest.raises(RuntimeError, match="ImportError: no _C"):
        _backend.select("rms_norm", CPU, has_cpp=True)


def test_missing_extension_falls_back_and_says_why_once(monkeypatch, caplog):
    monkeypatch.setattr(_backend, "_load_extension", lambda: (None, "ImportError: no _C"))
    monkeypatch.setattr(_backend, "_said", set())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with caplog.at_level("WARNING", logger="perfml"):
        for _ in range(3):
            assert _backend.select("rms_norm", CPU, has_cpp=True) == "aten"
    messages = [r.getMessage() for r in caplog.records if "perfml._C" in r.getMessage()]
    assert len(messages) == 1 and "ImportError: no _C" in messages[0]


def test_missing_triton_on_cuda(monkeypatch):
    monkeypatch.setattr(_backend, "_triton_import_error", lambda: "ImportError: no triton")
    cuda = torch.device("cuda")
    assert _backend.select("rms_norm", cuda) == "aten"
    with _backend.force("triton"), pytest.raises(RuntimeError, match="no triton"):
        _backend.select("rms_norm", cuda)
    with _backend.force("cpp"), pytest.raises(RuntimeError, match="CPU tensors only"):
        _backend.select("rms_norm", cuda)


def test_capability_helpers_are_false_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only answer")
    assert _backend.cuda_capability() is None
    assert not _backend.is_sm_at_least_90()
