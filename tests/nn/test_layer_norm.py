"""perfml.nn.LayerNorm as a drop-in for torch.nn.LayerNorm."""

import pytest
import torch
from torch import nn

from perfml.nn import LayerNorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"bias": False}, {"elementwise_affine": False}, {"eps": 1e-6}],
    ids=["affine", "no-bias", "no-affine", "eps"],
)
@pytest.mark.parametrize("normalized_shape", [96, (96,)], ids=["int", "tuple"])
def test_state_dict_round_trip_and_same_outputs(normalized_shape, kwargs):
    theirs = nn.LayerNorm(normalized_shape, device=DEVICE, **kwargs)
    ours = LayerNorm(normalized_shape, device=DEVICE, **kwargs)
    assert set(theirs.state_dict()) == set(ours.state_dict())
    assert ours.normalized_shape == theirs.normalized_shape == (96,)
    assert ours.eps == theirs.eps and ours.elementwise_affine == theirs.elementwise_affine
    assert (ours.weight is None) == (theirs.weight is None)
    assert (ours.bias is None) == (theirs.bias is None)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(1, 0.3)
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, 96, device=DEVICE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ya, yb = theirs(x), ours(x2)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    for pa, pb in zip(theirs.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-4)


def test_initialization_matches_torch():
    ours, theirs = LayerNorm(40, device=DEVICE), nn.LayerNorm(40, device=DEVICE)
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)


def test_bf16_module_matches_torch_in_bf16():
    theirs = nn.LayerNorm(128).to(DEVICE, torch.bfloat16)
    ours = LayerNorm(128, dtype=torch.bfloat16, device=DEVICE)
    with torch.no_grad():
        theirs.weight.normal_(1, 0.2)
        theirs.bias.normal_(0, 0.2)
    ours.load_state_dict(theirs.state_dict())
    assert ours.weight.dtype == torch.bfloat16
    x = torch.randn(3, 128, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=2**-7, atol=1e-5)


def test_multi_dim_normalized_shape_is_refused():
    with pytest.raises(NotImplementedError, match="last dimension"):
        LayerNorm((4, 96))


def test_wrong_input_width():
    with pytest.raises(ValueError, match="expected input with last dimension 96"):
        LayerNorm(96, elementwise_affine=False, device=DEVICE)(torch.randn(2, 95, device=DEVICE))


def test_non_positive_size():
    with pytest.raises(ValueError, match="must be positive"):
        LayerNorm(0)


def test_repr_names_the_shape():
    assert "(96,), eps=1e-05, elementwise_affine=True" in repr(LayerNorm(96))
