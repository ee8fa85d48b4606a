"""The case registry: lookup, errors, sizes per device, and the rms_norm case's formulas."""

import pytest
import torch

from perfml import _backend
from perfml.bench import Case, Sizes, UnknownCaseError, all_cases, get_case, register
from perfml.bench.cost import rms_norm_bytes
from tests.bench.helpers import TINY, tiny_case

CPU = torch.device("cpu")


def test_rms_norm_bytes_by_hand():
    # x [4, 8] fp32: fwd reads x (128 B) and w (32 B), writes y (128 B)
    assert rms_norm_bytes((4, 8), torch.float32, "fwd") == 128 + 32 + 128
    # backward: reads x, w, dy (128 + 32 + 128), writes dx (128) and dw (32)
    assert rms_norm_bytes((4, 8), torch.float32, "fwd+bwd") == 288 + 448
    # the headline shape, bf16; leading dims multiply into rows
    m, n = 16384, 4096
    assert rms_norm_bytes((m, n), torch.bfloat16, "fwd") == (2 * m * n + n) * 2
    assert rms_norm_bytes((4, m // 4, n), torch.bfloat16, "fwd+bwd") == (5 * m * n + 3 * n) * 2


def test_builtin_cases_are_registered():
    assert "rms_norm" in [c.name for c in all_cases()]
    case = get_case("rms_norm")
    assert case.family == "norm" and case.modes == ("fwd", "fwd+bwd")
    assert case.sizes.for_device(torch.device("cuda"), quick=False)[0] == (16384, 4096)
    assert case.dtypes_for(torch.device("cuda")) == (torch.bfloat16,)
    names = [i.name for i in case.impls]
    assert names == ["eager", "torch", "compile", "liger", "perfml", "perfml-cpp", "reference"]


def test_impl_availability_on_cpu():
    case = get_case("rms_norm")
    assert case.impl("liger").unavailable(CPU) is not None
    assert case.impl("reference").unavailable(CPU) is None
    assert case.impl("reference").unavailable(torch.device("cuda")) is not None
    cpp_reason = case.impl("perfml-cpp").unavailable(CPU)
    assert (cpp_reason is None) == _backend.has_extension()


def test_perfml_path_is_labelled():
    perfml, reference = get_case("rms_norm").impl("perfml"), get_case("rms_norm").impl("reference")
    # tests run in interpret mode on machines without CUDA (tests/conftest.py)
    if _backend.interpret_mode():
        expected = "triton-interpret"
    else:
        expected = "cpp" if _backend.has_extension() else "reference"
    assert perfml.path(CPU) == expected
    with reference.context():
        assert reference.path(CPU) == "reference"


def test_unknown_case_lists_known_ones():
    with pytest.raises(UnknownCaseError, match=r"'nope'.*known cases: .*rms_norm"):
        get_case("nope")


def test_register_rejects_duplicates_and_bad_modes(tiny):
    assert get_case(TINY) is tiny
    with pytest.raises(ValueError, match="already registered"):
        register(tiny_case())
    bad = Case(
        name="bad_modes",
        family="test",
        sizes=Sizes((), (), (), ()),
        make_inputs=lambda shape, dtype, device: (),
        reference=lambda: None,
        impls=(),
        modes=("fwd", "step"),
    )
    with pytest.raises(ValueError, match="unknown modes"):
        register(bad)


def test_sizes_per_device():
    sizes = Sizes(cuda=((1,),), cpu=((2,),), quick_cuda=((3,),), quick_cpu=((4,),))
    assert sizes.for_device(torch.device("cuda"), quick=False) == ((1,),)
    assert sizes.for_device(CPU, quick=False) == ((2,),)
    assert sizes.for_device(torch.device("cuda"), quick=True) == ((3,),)
    assert sizes.for_device(CPU, quick=True) == ((4,),)
