"""Every op's dtype rule as its error states it: fp32/bf16/fp16 run the kernels, fp64 the exact
reference (accepted and computed in fp64), anything else is refused with that sentence."""

import pytest
import torch

import perfml.ops as P

X = (4, 8)


def _calls(dtype):
    x = torch.randn(*X).to(dtype)
    w = torch.ones(X[-1]).to(dtype)
    t = torch.randint(0, X[-1], (X[0],))
    q = torch.randn(1, 2, 3, 8).to(dtype)
    cos = torch.ones(1, 3, 8).to(dtype)
    return {
        "rms_norm": lambda: P.rms_norm(x, w),
        "add_rms_norm": lambda: P.add_rms_norm(x, x.clone(), w),
        "layer_norm": lambda: P.layer_norm(x, w),
        "softmax": lambda: P.softmax(x, -1),
        "swiglu": lambda: P.swiglu(x, x.clone()),
        "cross_entropy": lambda: P.cross_entropy(x, t),
        "linear_cross_entropy": lambda: P.linear_cross_entropy(x, w.expand(5, -1).clone(), t % 5),
        "rope": lambda: P.rope(q, q.clone(), cos, cos.clone()),
    }


@pytest.mark.parametrize("op", sorted(_calls(torch.float32)))
def test_an_integer_input_is_refused_naming_what_runs(op):
    with pytest.raises(
        TypeError, match=r"fp32/bf16/fp16 run the kernels, fp64 the exact reference"
    ):
        _calls(torch.int32)[op]()


@pytest.mark.parametrize("op", sorted(_calls(torch.float32)))
def test_fp64_runs_the_reference_in_fp64(op):
    out = _calls(torch.float64)[op]()
    first = out[0] if isinstance(out, tuple) else out
    assert first.dtype == torch.float64 and torch.isfinite(first).all()
