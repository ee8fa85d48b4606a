"""perfml.optim's Triton kernels compile for Hopper (sm_90a), checked without a GPU: see
tests/optim/triton_sm90_check.py. Run in a subprocess (this process imported triton in interpret
mode); skipped only when the Triton install cannot target NVIDIA GPUs. About a minute on two
cores, hence `slow` (it stays in the default run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNAVAILABLE = 77

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report() -> dict:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.optim.triton_sm90_check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode == UNAVAILABLE:
        pytest.skip(f"cannot compile for NVIDIA GPUs: {json.loads(proc.stdout)['unavailable']}")
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"no report (exit {proc.returncode}); stderr:\n{proc.stderr[-6000:]}")
    result["returncode"] = proc.returncode
    return result


def test_every_optim_kernel_variant_compiles_for_sm90(report):
    assert not report["problems"] and report["returncode"] == 0, "\n".join(report["problems"])
    kernels = {v["kernel"] for v in report["variants"]}
    assert {"_adamw_kernel", "_adamw8bit_kernel"} <= kernels, kernels


def test_no_spills(report):
    spilled = [v for v in report["variants"] if v.get("spill_stores")]
    assert not spilled, [(v["kernel"], v["constexprs"], v["spill_stores"]) for v in spilled]
