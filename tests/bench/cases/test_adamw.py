"""The `adamw` benchmark case (perfml/bench/cases/adamw.py): registration, byte formula, and every
impl available here agreeing with the case's reference on small inputs (the real sizes are
GPT-2-124M's, too large for a unit test)."""

import math

import pytest
import torch

from perfml.bench import get_case
from perfml.bench.cases import adamw as adamw_case

GPT2_PARAMS = 123_587_328  # ANCHORS.md's "123.6M"


def test_gpt2_shapes_and_bytes():
    shapes = adamw_case.gpt2_shapes(12)
    assert len(shapes) == 110 and sum(math.prod(s) for s in shapes) == GPT2_PARAMS
    case = get_case("adamw")
    assert case.family == "optim" and case.modes == ("fwd",)
    # read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq
    assert case.bytes((12, 1), torch.float32, "fwd") == 28 * GPT2_PARAMS
    assert case.bytes((12, 4), torch.bfloat16, "fwd") == 14 * 4 * GPT2_PARAMS


def test_impls_agree_with_the_reference():
    case = get_case("adamw")
    shapes = [(64, 33), (100,), (5000,), (1,)]
    params = [torch.randn(s) * 0.02 for s in shapes]
    grads = [torch.randn(s) * 1e-3 for s in shapes]
    inputs = (adamw_case._Spec(len(shapes)), *params, *grads)
    want = case.reference(*inputs)
    ran = []
    for impl in case.impls:
        if impl.unavailable(torch.device("cpu")) is not None:
            continue
        fn = impl.make()
        copies = [t.clone() for t in inputs[1:]]
        got = fn(inputs[0], *copies)
        assert got[0] is copies[0], f"{impl.name}: the step must update the harness's tensors"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7, msg=f"{impl.name} param {i}")
        before = copies[0].clone()
        fn(inputs[0], *copies)  # later calls keep stepping the same optimizer
        assert not torch.equal(copies[0], before), impl.name
        ran.append(impl.name)
    assert {"perfml", "perfml-8bit", "torch", "torch-foreach"} <= set(ran)


@pytest.mark.gpu
def test_triton_impl_is_offered_on_cuda():
    case = get_case("adamw")
    assert case.impl("perfml-triton").unavailable(torch.device("cuda")) is None
