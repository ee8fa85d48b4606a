"""One pytest-benchmark test per (case, dtype, shape, mode, impl) of the perfml.bench registry:
real sizes on CUDA, small ones on CPU (the same sizes as `perfml bench`).

Each test first checks the impl against the case's reference, so a broken impl fails instead of
posting a fast time. pytest-benchmark times with perf_counter, so on CUDA every timed call ends
with a synchronize; `perfml bench` (CUDA events, L2 flushed) is the tool for the headline numbers.
"""

from __future__ import annotations

import pytest
import torch

from perfml import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pytest_generate_tests(metafunc):
    if "impl_name" not in metafunc.fixturenames:
        return
    quick = metafunc.config.getoption("--perfml-quick")
    params = []
    for case in bench.all_cases():
        for dtype in case.dtypes_for(DEVICE):
            for shape in case.sizes.for_device(DEVICE, quick):
                for mode in case.modes:
                    for impl in case.impls:
                        reason = impl.unavailable(DEVICE)
                        marks = [pytest.mark.skip(reason=reason)] if reason else []
                        test_id = "-".join(
                            [
                                case.name,
                                "x".join(map(str, shape)),
                                _dtype_name(dtype),
                                mode,
                                impl.name,
                            ]
                        )
                        params.append(
                            pytest.param(
                                case.name, shape, dtype, mode, impl.name, id=test_id, marks=marks
                            )
                        )
    metafunc.parametrize("case_name,shape,dtype,mode,impl_name", params)


def test_case(benchmark, case_name, shape, dtype, mode, impl_name):
    case = bench.get_case(case_name)
    impl = case.impl(impl_name)
    problem = bench.make_problem(case, shape, dtype, mode, DEVICE)
    with impl.context():
        prepared = bench.prepare(problem, impl.make())
        try:
            got = prepared.outputs()
        except Exception as exc:
            if impl.compiles:  # a machine that cannot compile is not a broken benchmark
                pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {exc}")
            raise
        mismatch, err = bench.compare(problem, got)
        assert not mismatch, f"{impl_name} differs from the reference (max rel err {err})"

        def timed() -> None:
            for leaf in prepared.leaves:
                leaf.grad = None
            prepared.step()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize(DEVICE)

        benchmark.extra_info.update(
            case=case_name,
            shape=list(shape),
            dtype=_dtype_name(dtype),
            mode=mode,
            impl=impl_name,
            path=impl.path(DEVICE) if impl.path else None,
            bytes=case.bytes(shape, dtype, mode) if case.bytes else None,
            flops=case.flops(shape, mode) if case.flops else None,
        )
        benchmark(timed)
