"""Launch-config overrides and the tuner (perfml.bench.autotune): tiny shapes, interpret mode."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch

from perfml import _backend
from perfml._kernel_config import capture, kernel_config, known_kernels, override
from perfml.bench import autotune
from perfml.ops.rms_norm import rms_norm, rms_norm_ref
from perfml.ops.softmax import softmax

pytestmark = pytest.mark.skipif(
    not (_backend.interpret_mode() and _backend.has_triton()), reason="needs Triton interpret mode"
)


def test_override_changes_the_launch_and_the_output_stays_correct():
    x = torch.randn(6, 48)
    w = torch.randn(48)
    with capture() as picked:
        expected = rms_norm(x, w)
    assert "rms_norm_fwd" in known_kernels()
    base = picked["rms_norm_fwd"]
    assert base == {"BLOCK_N": 64, "num_warps": 4}
    with override("rms_norm_fwd", BLOCK_N=128, num_warps=2):
        with capture() as heuristic, capture(launched=True) as launched:
            y = rms_norm(x, w)
    assert heuristic["rms_norm_fwd"] == base  # the record of the pick ignores the override
    assert launched["rms_norm_fwd"] == {"BLOCK_N": 128, "num_warps": 2}
    torch.testing.assert_close(y, rms_norm_ref(x.double(), w.double()).float())
    torch.testing.assert_close(y, expected)
    with capture(launched=True) as after:
        rms_norm(x, w)
    assert after["rms_norm_fwd"] == base  # the override ends with its block


def test_override_reaches_the_grid():
    # softmax's one-tile kernel packs BLOCK_M rows per program; a single row per program must
    # still cover every row (the grid follows the overridden block).
    x = torch.randn(37, 20)
    expected = torch.softmax(x, dim=-1)
    for block_m in (1, 4, 64):
        with override("softmax_fwd_tile", BLOCK_M=block_m), capture(launched=True) as record:
            y = softmax(x)
        assert record["softmax_fwd_tile"]["BLOCK_M"] == block_m
        torch.testing.assert_close(y, expected)


def test_unknown_override_key_names_the_kernel():
    with override("rms_norm_fwd", BLOCK_Q=4), pytest.raises(KeyError, match="rms_norm_fwd"):
        rms_norm(torch.randn(2, 8), torch.randn(8))


def test_override_outside_the_limits_is_rejected():
    # a one-tile block smaller than the row would normalize part of it: refused, not wrong
    with override("rms_norm_fwd", BLOCK_N=16), pytest.raises(ValueError, match="BLOCK_N=16"):
        rms_norm(torch.randn(2, 40), torch.randn(40))
    with override("rms_norm_fwd", num_warps=3), pytest.raises(ValueError, match="power of two"):
        rms_norm(torch.randn(2, 8), torch.randn(8))


def _fake_setup(shape, dtype, device):
    """A launcher whose BLOCK=8 config is the fastest and gives a wrong result, and whose BLOCK=16
    config fails like a kernel that does not compile."""
    x = torch.arange(float(shape[0]))

    def step():
        cfg = kernel_config("fake_kernel", BLOCK=4, num_warps=4)
        if cfg["BLOCK"] == 16:
            raise RuntimeError("compilation failed: out of shared memory")
        if cfg["BLOCK"] == 8:
            return x * 2.0
        time.sleep(0.002)
        return x.clone()

    return step


FAKE = autotune.KernelSpec(
    "fake", "fake_kernel", (8,), (8,), torch.float32, _fake_setup, vary=("BLOCK",),
    extra=({"BLOCK": 16},),
)  # fmt: skip


def test_tuner_records_wrong_and_failed_candidates_and_never_picks_them():
    rms = next(s for s in autotune.KERNELS if s.id == "rms_norm_fwd")
    rms = dataclasses.replace(rms, extra=({"BLOCK_N": 16},))  # too small for the 64-wide row
    result = autotune.tune([FAKE, rms], torch.device("cpu"), budget_s=120, dry_run=True)
    fake, norm = result["kernels"]
    statuses = {c["config"]["BLOCK"]: set() for c in fake["candidates"]}
    for c in fake["candidates"]:
        statuses[c["config"]["BLOCK"]].add(c["status"])
    assert statuses[8] == {"wrong"} and statuses[16] == {"failed"} and statuses[2] == {"ok"}
    assert fake["best"]["config"]["BLOCK"] in (2, 4)
    assert all(c["ms"] is None for c in fake["candidates"] if c["status"] != "ok")
    invalid = [c for c in norm["candidates"] if c["config"]["BLOCK_N"] == 16]
    assert [c["status"] for c in invalid] == ["invalid"]
    assert "BLOCK_N=16" in invalid[0]["error"]
    assert norm["best"]["config"]["BLOCK_N"] == 64
    assert norm["heuristic"]["config"] == {"BLOCK_N": 64, "num_warps": 4}


def test_tuner_skips_what_the_budget_does_not_cover():
    result = autotune.tune([FAKE, FAKE], torch.device("cpu"), budget_s=0.0, dry_run=True)
    assert all("budget" in k["note"] for k in result["kernels"])


def test_cli_dry_run_writes_tune_json(tmp_path, capsys):
    out = tmp_path / "tune.json"
    rc = autotune.main(["--dry-run", "--kernels", "glu_fwd", "--out", str(out), "--budget-s", "60"])
    assert rc == 0
    doc = json.loads(out.read_text())
    for key in ("device", "torch", "triton", "date", "timing", "kernels"):
        assert key in doc
    (entry,) = doc["kernels"]
    assert entry["id"] == "glu_fwd" and entry["dtype"] == "bfloat16"
    assert set(entry["heuristic"]) == {"config", "ms", "gb_s"}
    assert entry["heuristic"]["gb_s"] > 0
    assert entry["candidates"] and all(c["status"] == "ok" for c in entry["candidates"])
    assert {"config", "ms", "gb_s", "speedup"} <= set(entry["best"])
    assert "[tune] glu_fwd" in capsys.readouterr().err


def test_cli_refuses_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = tmp_path / "tune.json"
    assert autotune.main(["--out", str(out)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not out.exists()


def test_cli_rejects_unknown_kernel_ids(tmp_path, capsys):
    assert autotune.main(["--dry-run", "--kernels", "nope", "--out", str(tmp_path / "t")]) == 2
    assert "nope" in capsys.readouterr().err
