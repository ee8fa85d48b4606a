"""logit_scale on perfml.nn.CrossEntropyLoss and LinearCrossEntropyLoss: passed to the ops,
shown in the repr, checked at construction."""

import pytest
import torch

from perfml.nn import CrossEntropyLoss, LinearCrossEntropyLoss
from perfml.ops import cross_entropy_ref, linear_cross_entropy_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_cross_entropy_loss_applies_logit_scale():
    logits = torch.randn(10, 30, device=DEVICE, dtype=torch.float64)
    target = torch.randint(0, 30, (10,), device=DEVICE)
    module = CrossEntropyLoss(softcap=5.0, logit_scale=2.5)
    assert "logit_scale=2.5" in repr(module)
    want = cross_entropy_ref(logits, target, softcap=5.0, logit_scale=2.5)
    torch.testing.assert_close(module(logits, target), want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(want, cross_entropy_ref(logits, target, softcap=5.0))


def test_linear_cross_entropy_loss_applies_logit_scale():
    hidden = torch.randn(9, 16, device=DEVICE, dtype=torch.float64)
    weight = torch.randn(41, 16, device=DEVICE, dtype=torch.float64)
    target = torch.randint(0, 41, (9,), device=DEVICE)
    module = LinearCrossEntropyLoss(logit_scale=1 / 8)
    assert "logit_scale=0.125" in repr(module)
    want = linear_cross_entropy_ref(hidden, weight, target, logit_scale=1 / 8)
    torch.testing.assert_close(module(hidden, weight, target), want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(want, linear_cross_entropy_ref(hidden, weight, target))


@pytest.mark.parametrize("cls", [CrossEntropyLoss, LinearCrossEntropyLoss])
@pytest.mark.parametrize("value", [0.0, -3.0, float("nan")], ids=str)
def test_bad_logit_scale_is_refused_at_construction(cls, value):
    with pytest.raises(ValueError, match=f"{cls.__name__}: logit_scale must be finite and > 0"):
        cls(logit_scale=value)
