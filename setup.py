"""Builds the optional extension perfml._C from csrc/ (project metadata lives in pyproject.toml).

    pip install --no-build-isolation --no-deps -e .     # or: python setup.py build_ext --inplace

The C++ sources (csrc/**/*.cpp) are always built; the CUDA sources (csrc/**/*.cu) only when torch
is a CUDA build and nvcc is found (CUDA_HOME). perfml works without the extension (Triton and the
plain-PyTorch reference cover every op): PERFML_BUILD_EXT=0 installs it on a machine without a
compiler.

Knobs (environment):
  PERFML_BUILD_EXT   "0": Python-only install; "1": the extension must build (torch must be
                     importable); unset: build it when torch is importable
  PERFML_CUDA_ARCHS  CUDA archs, e.g. "9.0;10.0" (default: 9.0 plus the local GPU's, if any);
                     becomes TORCH_CUDA_ARCH_LIST

C++ flags: -O3 and no instruction-set flags (no -march=native, no -mavx2), because one build must
run on any x86-64. Kernels that want AVX2 get it per translation unit from a pragma and are picked
at run time (csrc/rms_norm_cpu_avx2.cpp says how); on the 2-core AVX-512 dev machine that made the
RMSNorm kernel ~5x faster on cached rows than at::vec's portable code. -fopenmp: at::parallel_for
runs its OpenMP loop from ATen's headers, so without the flag the extension runs on one thread.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(message: str) -> None:
    print(f"perfml setup: {message}", flush=True)


def _sources(pattern: str) -> list[str]:
    # setuptools wants paths relative to setup.py; sorted so the build is reproducible
    return sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
    )


def _cuda_archs(torch) -> str:
    archs = os.environ.get("PERFML_CUDA_ARCHS", "").strip()
    if archs:
        return archs
    found = ["9.0"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            if f"{major}.{minor}" not in found:
                found.append(f"{major}.{minor}")
    return ";".join(found)


def _extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup(); both empty for a Python-only install."""
    setting = os.environ.get("PERFML_BUILD_EXT", "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"PERFML_BUILD_EXT must be 0, 1 or unset, got {setting!r}")
    if setting == "0":
        _say("building nothing (PERFML_BUILD_EXT=0): Python-only install, no perfml._C")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if setting == "1":
            raise RuntimeError(f"PERFML_BUILD_EXT=1 but torch is not importable: {exc}") from exc
        _say(
            f"building nothing (torch is not importable at build time: {exc}); "
            "install torch and use --no-build-isolation to get perfml._C"
        )
        return [], {}

    # ninja (a dev dependency) sits next to this interpreter; put it on PATH so torch finds it
    # even when the venv is not activated, or the build falls back to serial compiles.
    scripts = sysconfig.get_path("scripts")
    os.environ["PATH"] = os.pathsep.join(
        [scripts, os.path.dirname(sys.executable), os.environ.get("PATH", "")]
    )

    cpp = _sources("csrc/**/*.cpp")
    cu = _sources("csrc/**/*.cu")
    # -g0: Python's CFLAGS carry -g, which doubles compile time and .so size.
    # -Wno-unknown-pragmas: torch's headers carry CUDA's "#pragma unroll", one warning per use.
    cxx = ["-O3", "-g0", "-Wno-unknown-pragmas"]
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")

    if torch.version.cuda is None:
        why_not_cuda = "torch is a CPU build"
    elif cpp_extension.CUDA_HOME is None:
        why_not_cuda = "nvcc not found (set CUDA_HOME)"
    elif not cu:
        why_not_cuda = "no csrc/**/*.cu sources"
    else:
        why_not_cuda = None

    if why_not_cuda is None:
        archs = _cuda_archs(torch)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        ext = cpp_extension.CUDAExtension(
            "perfml._C",
            cpp + cu,
            define_macros=[("PERFML_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link,
        )
        _say(f"building perfml._C: C++ + CUDA for archs {archs} ({len(cpp)} .cpp, {len(cu)} .cu)")
    else:
        ext = cpp_extension.CppExtension(
            "perfml._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
        _say(f"building perfml._C: C++ only ({why_not_cuda}; {len(cpp)} .cpp)")
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
