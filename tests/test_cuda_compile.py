"""The CUDA kernels of perfml._C compile with nvcc, on machines without a GPU too.

setup.py builds the .cu sources only where torch is a CUDA build, so on CI and dev machines (CPU
torch) the CUDA code would never be compiled at all. The kernel translation units include no
torch header on purpose (csrc/adamw_cuda_kernel.cu: the launcher, the AdamW functor and an
explicit instantiation of every variant the dispatch can launch), so plain nvcc compiles them here
for sm_90, with the flags torch's extension build adds (no implicit half/bf16 conversions,
relaxed constexpr) and every warning an error. ptxas's report is then checked: each functor
variant is a kernel, none spills, and each fits the 64 registers the launch bounds promise (two
512-thread blocks per SM). The torch-side binding (csrc/adamw_cuda.cu) needs a CUDA build of
torch and is compiled by scripts/gpu_check.sh on a GPU machine.

Skipped only when nvcc is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_FREE_SOURCES = ["csrc/adamw_cuda_kernel.cu"]
# torch.utils.cpp_extension's nvcc flags that change what compiles
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
# (param type, master copy) of every AdamWFunctor the dispatch launches, as Itanium-mangled
ADAMW_VARIANTS = {
    "fp32": "AdamWFunctorIfLb0E",
    "bf16": "AdamWFunctorI13__nv_bfloat16Lb0E",
    "bf16+master": "AdamWFunctorI13__nv_bfloat16Lb1E",
    "fp16": "AdamWFunctorI6__halfLb0E",
    "fp16+master": "AdamWFunctorI6__halfLb1E",
}
MAX_REGISTERS = 64  # 65536 registers / (2 blocks x 512 threads)


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


@pytest.fixture(scope="module")
def ptxas_reports(tmp_path_factory) -> dict[str, str]:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME): the CUDA sources cannot be compiled here")
    out_dir = tmp_path_factory.mktemp("nvcc")
    reports = {}
    for source in TORCH_FREE_SOURCES:
        cmd = [
            nvcc, "-c", "-std=c++17", "-arch=sm_90", "-O3", "-Xptxas", "-v",
            "--Werror", "all-warnings", *TORCH_NVCC_FLAGS,
            str(ROOT / source), "-o", str(out_dir / (Path(source).stem + ".o")),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"nvcc failed on {source}:\n{proc.stderr[-6000:]}"
        reports[source] = proc.stderr
    return reports


def _kernels(report: str) -> dict[str, dict[str, int]]:
    """{mangled kernel name: {"registers": n, "spill_stores": n, "spill_loads": n}}."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in report.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)'", line)
        if entry:
            current = entry.group(1)
            kernels[current] = {}
            continue
        if current is None:
            continue
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills:
            kernels[current]["spill_stores"] = int(spills.group(1))
            kernels[current]["spill_loads"] = int(spills.group(2))
        regs = re.search(r"Used (\d+) registers", line)
        if regs:
            kernels[current]["registers"] = int(regs.group(1))
    return kernels


def test_every_adamw_variant_compiles_to_a_kernel(ptxas_reports):
    kernels = _kernels(ptxas_reports["csrc/adamw_cuda_kernel.cu"])
    for variant, mangled in ADAMW_VARIANTS.items():
        found = [k for k in kernels if "multi_tensor_apply_kernel" in k and mangled in k]
        assert len(found) == 1, f"AdamW {variant}: no kernel {mangled} in {sorted(kernels)}"


def test_kernels_fit_the_register_budget_without_spills(ptxas_reports):
    kernels = _kernels(ptxas_reports["csrc/adamw_cuda_kernel.cu"])
    assert kernels, "ptxas reported no kernel"
    for name, info in kernels.items():
        assert info.get("spill_stores") == 0 and info.get("spill_loads") == 0, (name, info)
        assert info.get("registers", 0) <= MAX_REGISTERS, (name, info)
