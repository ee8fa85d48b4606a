"""perfml.nn.SwiGLUMLP against the HF LlamaMLP computation (written out here, no transformers)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from perfml.nn import SwiGLUMLP
from tests.utils import assert_matches_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class LlamaMLP(nn.Module):
    """transformers' LlamaMLP with hidden_act="silu", as in modeling_llama.py."""

    def __init__(self, hidden_size, intermediate_size, mlp_bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=mlp_bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=mlp_bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _run(module, x, dy):
    x = x.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(dy)
    grads = {name: p.grad for name, p in module.named_parameters()}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("bias", [False, True])
def test_state_dict_is_interchangeable_with_llama_mlp(bias):
    hf = LlamaMLP(24, 40, mlp_bias=bias).to(DEVICE)
    ours = SwiGLUMLP(24, 40, bias=bias, device=DEVICE)
    assert ours.state_dict().keys() == hf.state_dict().keys()
    for key, value in hf.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key
    ours.load_state_dict(hf.state_dict())
    hf.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_llama_mlp(dtype, bias, poison_empty):
    hf = LlamaMLP(48, 97, mlp_bias=bias).to(DEVICE)
    ours = SwiGLUMLP(48, 97, bias=bias, device=DEVICE)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 5, 48, device=DEVICE)
    dy = torch.randn(2, 5, 48, device=DEVICE)
    want = _run(hf.double(), x.double(), dy.double())
    base = _run(hf.to(dtype), x.to(dtype), dy.to(dtype))  # HF's own code in `dtype`
    got = _run(ours.to(dtype), x.to(dtype), dy.to(dtype))
    assert_matches_reference(got[0], want[0], base[0], name="y")
    assert_matches_reference(got[1], want[1], base[1], name="dx")
    for name in want[2]:
        assert_matches_reference(got[2][name], want[2][name], base[2][name], name=name)


def test_factory_kwargs():
    m = SwiGLUMLP(16, 32, device=DEVICE, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.gate_proj.weight.shape == (32, 16) and m.down_proj.weight.shape == (16, 32)
    assert m.gate_proj.bias is None


def test_gradients_accumulate_over_two_steps():
    # The activation's backward overwrites the projections' outputs, which must be fresh on
    # every forward: two backward passes give twice one.
    m = SwiGLUMLP(16, 32, device=DEVICE)
    x = torch.randn(3, 16, device=DEVICE)
    m(x).sum().backward()
    once = m.gate_proj.weight.grad.clone()
    m(x).sum().backward()
    torch.testing.assert_close(m.gate_proj.weight.grad, 2 * once)


def test_frozen_input_and_no_grad():
    m = SwiGLUMLP(16, 32, device=DEVICE)
    x = torch.randn(3, 16, device=DEVICE)
    with torch.no_grad():
        y = m(x)
    ref = m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_has_no_graph_break(backend):
    # The backward overwrites saved activations: the compiled graph must keep that correct.
    torch._dynamo.reset()
    m = SwiGLUMLP(16, 40, device=DEVICE)
    x = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    compiled(x).sum().backward()
    gx, gw = x.grad.clone(), m.up_proj.weight.grad.clone()
    x.grad = None
    m.zero_grad(set_to_none=True)
    m(x).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, m.up_proj.weight.grad)


def test_bad_sizes():
    with pytest.raises(ValueError, match="must be positive"):
        SwiGLUMLP(0, 8)
