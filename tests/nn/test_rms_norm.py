"""perfml.nn.RMSNorm as a drop-in for torch.nn.RMSNorm and HF's Llama / Gemma RMSNorm."""

import pytest
import torch
from torch import nn

from perfml.nn import RMSNorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class HFLlamaRMSNorm(nn.Module):
    """The computation of transformers' LlamaRMSNorm, written out (no download, no dependency)."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class HFGemmaRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = x.float()
        output = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (output * (1.0 + self.weight.float())).type_as(x)


@pytest.mark.parametrize(
    "theirs,ours",
    [
        (lambda: HFLlamaRMSNorm(96), lambda: RMSNorm(96, cast="llama")),
        (lambda: HFGemmaRMSNorm(96), lambda: RMSNorm(96, offset=1.0, cast="gemma")),
        (lambda: nn.RMSNorm(96, eps=1e-6), lambda: RMSNorm(96, cast="none")),
    ],
    ids=["llama", "gemma", "torch"],
)
def test_state_dict_round_trip_and_same_outputs(theirs, ours):
    a, b = theirs().to(DEVICE), ours().to(DEVICE)
    with torch.no_grad():
        a.weight.normal_(0, 0.2).add_(0 if isinstance(a, HFGemmaRMSNorm) else 1)
    assert set(a.state_dict()) == set(b.state_dict()) == {"weight"}
    b.load_state_dict(a.state_dict())
    a.load_state_dict(b.state_dict())
    x = torch.randn(2, 7, 96, device=DEVICE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ya, yb = a(x), b(x2)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.weight.grad, a.weight.grad, rtol=1e-5, atol=1e-4)


def test_bf16_module_matches_hf_llama_in_bf16():
    a = HFLlamaRMSNorm(128).to(DEVICE, torch.bfloat16)
    b = RMSNorm(128).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        a.weight.normal_(1, 0.2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 128, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(b(x), a(x), rtol=2**-7, atol=1e-6)


def test_no_affine():
    norm = RMSNorm(32, elementwise_affine=False).to(DEVICE)
    assert norm.weight is None and len(norm.state_dict()) == 0
    x = torch.randn(4, 32, device=DEVICE)
    torch.testing.assert_close(norm(x), nn.RMSNorm(32, eps=1e-6, elementwise_affine=False)(x))


def test_gemma_initializes_to_identity_scale():
    norm = RMSNorm(16, offset=1.0, cast="gemma")
    assert torch.equal(norm.weight, torch.zeros(16))


def test_bad_construction():
    with pytest.raises(ValueError, match="hidden_size"):
        RMSNorm(0)
    with pytest.raises(ValueError, match="cast"):
        RMSNorm(8, cast="bogus")
    with pytest.raises(ValueError, match="offset needs elementwise_affine"):
        RMSNorm(8, offset=1.0, elementwise_affine=False)


def test_wrong_input_width_names_the_weight():
    with pytest.raises(ValueError, match="weight must have shape"):
        RMSNorm(8).to(DEVICE)(torch.randn(2, 9, device=DEVICE))


@pytest.mark.parametrize("shape", [(5,), [5], torch.Size([5])])
def test_normalized_shape_as_a_sequence_like_torch(shape):
    # torch.nn.RMSNorm((5,), eps=1e-3): a tuple/list normalized_shape used to raise a TypeError
    ours, theirs = RMSNorm(shape, eps=1e-3, cast="none"), torch.nn.RMSNorm(shape, eps=1e-3)
    assert ours.normalized_shape == (5,) == tuple(theirs.normalized_shape)
    x = torch.randn(3, 5)
    torch.testing.assert_close(ours(x), theirs(x))


def test_eps_none_is_the_dtype_epsilon_like_torch():
    x = torch.randn(4, 6) * 1e-4
    torch.testing.assert_close(RMSNorm(6, eps=None, cast="none")(x), torch.nn.RMSNorm(6)(x))


def test_multi_dim_normalized_shape_is_refused_clearly():
    with pytest.raises(NotImplementedError, match="only normalization over the last dimension"):
        RMSNorm((2, 5))
    with pytest.raises(TypeError, match="must be an int or a sequence of ints"):
        RMSNorm("5")


def test_no_affine_checks_the_input_width():
    with pytest.raises(ValueError, match="expected input with last dimension 8"):
        RMSNorm(8, elementwise_affine=False)(torch.randn(2, 9))
