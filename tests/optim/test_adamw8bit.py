"""perfml.optim.AdamW8bit: the 8-bit codes, the Triton kernel against the reference, the state
size, exact state_dict round trips, and a small model trained to fp32 AdamW's loss."""

from __future__ import annotations

import io
import math

import pytest
import torch

from perfml import _backend
from perfml.optim import AdamW, AdamW8bit
from perfml.optim import adamw8bit as q8

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# awkward sizes around the quantization threshold and block size, plus a 2-D one
SHAPES = [(4095,), (4096,), (4097,), (97, 131), (300,), (1,)]


def _backends():
    found = ["reference"]
    if _backend.has_triton() and (CUDA or _backend.interpret_mode()):
        found.append("triton")
    return found


# --- the codes -------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_codes_round_trip_within_half_a_step(signed):
    # every code decodes to a value that encodes back to it, and values in range come back
    # within half a code step: 1/16 relative (3 mantissa bits)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = q8.decode(codes, signed)
    used = values != 0
    assert torch.equal(q8.encode(values[used], signed), codes[used])
    lowest = 2.0**-15 if signed else 2.0**-31
    x = torch.logspace(math.log10(lowest) + 0.01, 0, 20001)
    if signed:
        x = torch.cat([x, -x])
    back = q8.decode(q8.encode(x, signed), signed)
    assert ((back - x).abs() / x.abs()).max() <= 1 / 16
    # the map is monotonic
    order = x.argsort()
    assert (back[order].diff() >= 0).all()


def test_code_edges():
    zero = torch.tensor([0.0])
    assert q8.encode(zero, True).item() == 0 and q8.encode(zero, False).item() == 0
    assert q8.decode(q8.encode(torch.tensor([1.0]), True), True).item() == 1.0
    assert q8.decode(q8.encode(torch.tensor([-1.0]), True), True).item() == -1.0
    assert q8.decode(q8.encode(torch.tensor([1.0]), False), False).item() == 1.0
    # a positive second moment never becomes 0 (its element's denominator would become eps)
    tiny = torch.tensor([1e-30, 1e-12])
    assert (q8.decode(q8.encode(tiny, False), False) > 0).all()
    # the signed map flushes what lies below 2**-15 of the block max to 0
    assert q8.decode(q8.encode(torch.tensor([1e-6]), True), True).item() == 0.0
    assert torch.equal(
        q8.encode(torch.tensor([-0.3]), True), q8.encode(torch.tensor([0.3]), True) | 128
    )


def test_blockwise_quantization_keeps_each_block_relative():
    # blocks of very different magnitude each keep their own precision
    x = torch.randn(3 * q8.BLOCK_SIZE + 5)
    x[: q8.BLOCK_SIZE] *= 1e-6
    codes, absmax = q8.quantize_blockwise(x, signed=True)
    assert codes.dtype == torch.uint8 and codes.shape == (x.numel(),)
    assert absmax.shape == (4,) and torch.equal(absmax[0], x[: q8.BLOCK_SIZE].abs().max())
    back = q8.dequantize_blockwise(codes, absmax, signed=True)
    big = x.abs() > 2.0**-14 * absmax.repeat_interleave(q8.BLOCK_SIZE)[: x.numel()]
    assert ((back - x).abs() / x.abs())[big].max() <= 1 / 16


# --- the optimizer ---------------------------------------------------------------------------


def _leaves(values):
    return [torch.nn.Parameter(v.clone()) for v in values]


def _run(params, opt, grads):
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()


def _grads(values, steps, device=DEVICE):
    return [[torch.randn(v.shape, device=device).to(v.dtype) for v in values] for _ in range(steps)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_matches_reference(dtype, poison_empty):
    if "triton" not in _backends():
        pytest.skip("triton is not available (or not in interpret mode on CPU)")
    values = [torch.randn(s, device=DEVICE).to(dtype) for s in SHAPES]
    grads = _grads(values, 6)
    kw = {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.9, 0.99)}
    ref, tri = _leaves(values), _leaves(values)
    opt_ref = AdamW8bit(ref, backend="reference", **kw)
    opt_tri = AdamW8bit(tri, backend="triton", **kw)
    _run(ref, opt_ref, grads)
    _run(tri, opt_tri, grads)
    for i, (p, t) in enumerate(zip(ref, tri, strict=True)):
        # same math in a different order: an fp32 rounding here and there, so a few codes may
        # land one step apart; the parameters agree to the dtype's rounding
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
        torch.testing.assert_close(t, p, **tol, msg=f"param {i}")
        sr, st = opt_ref.state[p], opt_tri.state[t]
        assert sr.keys() == st.keys()
        for key in sr:
            if key.endswith("_q"):
                diff = (sr[key].int() - st[key].int()).abs()
                assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (i, key)
            else:
                torch.testing.assert_close(st[key], sr[key], rtol=1e-4, atol=1e-12)


def test_close_to_fp32_adamw_over_30_steps():
    """The quantized trajectory stays within a few percent of fp32 AdamW's displacement (the
    codes' relative step is 1/8, their error at most half of it); fp32-state tensors follow
    AdamW exactly. The Triton path is held to the reference by test_triton_matches_reference."""
    values = [torch.randn(s, device=DEVICE) for s in SHAPES]
    grads = _grads(values, 30)
    kw = {"lr": 1e-3, "weight_decay": 0.1}
    ours, base = _leaves(values), _leaves(values)
    _run(ours, AdamW8bit(ours, backend="reference", **kw), grads)
    _run(base, AdamW(base, backend="reference", **kw), grads)
    for i, (p, b) in enumerate(zip(ours, base, strict=True)):
        if values[i].numel() < q8.MIN_QUANTIZED_NUMEL:
            assert torch.equal(p, b), i
        else:
            ratio = (p - b).norm() / (b - values[i]).norm()
            assert ratio <= 0.06, (i, ratio)


def test_state_layout_and_size():
    """<= 27% of fp32 AdamW's state, measured on the tiny Llama (its norm weights and other small
    tensors keep fp32 state)."""
    from perfml.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig.preset("tiny", fused=False))
    params = list(model.parameters())
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt8 = AdamW8bit(params)
    opt32 = torch.optim.AdamW(twins)
    for p, t in zip(params, twins, strict=True):
        p.grad = torch.randn_like(p)
        t.grad = p.grad.clone()
    opt8.step()
    opt32.step()

    def state_bytes(opt):
        return sum(
            v.numel() * v.element_size()
            for s in opt.state.values()
            for v in s.values()
            if torch.is_tensor(v)
        )

    ratio = state_bytes(opt8) / state_bytes(opt32)
    assert ratio <= 0.27, ratio
    for p in params:
        state = opt8.state[p]
        if p.numel() >= q8.MIN_QUANTIZED_NUMEL:
            assert state["exp_avg_q"].dtype == torch.uint8 and "exp_avg" not in state
            assert state["exp_avg_absmax"].numel() == math.ceil(p.numel() / q8.BLOCK_SIZE)
        else:
            assert state["exp_avg"].dtype == torch.float32 and "exp_avg_q" not in state


def _save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("backend", _backends())
def test_state_dict_round_trip_is_exact(backend):
    values = [torch.randn(s, device=DEVICE) for s in SHAPES]
    grads = _grads(values, 8)
    a = _leaves(values)
    opt_a = AdamW8bit(a, lr=1e-2, backend=backend)
    _run(a, opt_a, grads[:4])
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = AdamW8bit(b, lr=1e-2, backend=backend)
    opt_b.load_state_dict(_save_load(opt_a.state_dict()))
    for p, q in zip(a, b, strict=True):
        assert opt_a.state[p].keys() == opt_b.state[q].keys()
        for key, v in opt_a.state[p].items():
            assert opt_b.state[q][key].dtype == v.dtype and torch.equal(opt_b.state[q][key], v)
    _run(a, opt_a, grads[4:])
    _run(b, opt_b, grads[4:])
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)
        for key, v in opt_a.state[p].items():
            assert torch.equal(opt_b.state[q][key], v), key


@pytest.mark.parametrize("backend", _backends())
def test_grad_scale_and_found_inf(backend):
    values = [torch.randn(s, device=DEVICE) for s in SHAPES]
    grads = [torch.randn(v.shape, device=DEVICE) for v in values]
    ours, plain = _leaves(values), _leaves(values)
    opt = AdamW8bit(ours, lr=1e-2, backend=backend)
    opt_plain = AdamW8bit(plain, lr=1e-2, backend=backend)
    for p, q, g in zip(ours, plain, grads, strict=True):
        p.grad, q.grad = g * 4, g.clone()
    opt.step(grad_scale=torch.tensor(4.0, device=DEVICE))
    opt_plain.step()
    for p, q, g in zip(ours, plain, grads, strict=True):
        assert torch.equal(p.grad, g) and torch.equal(p, q)
    before = [p.detach().clone() for p in ours]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in ours]
    opt.step(found_inf=torch.tensor(1.0, device=DEVICE))
    for p, b, s in zip(ours, before, states, strict=True):
        assert torch.equal(p, b)
        for k, v in s.items():
            assert torch.equal(opt.state[p][k], v), k


def _classification(seed: int):
    """A 10-class problem from a random teacher, with 20% label noise so the loss stays away
    from 0 (a relative comparison of near-zero losses would measure noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 32, generator=g)
    w1, w2 = torch.randn(32, 64, generator=g), torch.randn(64, 10, generator=g)
    y = (torch.tanh(x @ w1) @ w2).argmax(-1)
    noisy = torch.rand(1024, generator=g) < 0.2
    return x, torch.where(noisy, torch.randint(0, 10, (1024,), generator=g), y)


def test_trains_a_small_model_to_fp32_adamw_loss():
    """200 steps: the final loss within 2% of fp32 AdamW's. The model's matrices (4096 and 16384
    elements) are quantized; its biases and the 1280-element head keep fp32 state."""
    x, y = _classification(0)

    def train(make_opt):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(32, 128),
            torch.nn.GELU(),
            torch.nn.Linear(128, 128),
            torch.nn.GELU(),
            torch.nn.Linear(128, 10),
        )
        opt = make_opt(model.parameters())
        for step in range(200):
            idx = torch.randint(0, 1024, (128,), generator=torch.Generator().manual_seed(step))
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(x), y).item(), opt

    loss32, _ = train(lambda ps: AdamW(ps, lr=2e-3, weight_decay=0.01))
    loss8, opt8 = train(lambda ps: AdamW8bit(ps, lr=2e-3, weight_decay=0.01))
    assert sum("exp_avg_q" in s for s in opt8.state.values()) == 2
    assert loss8 < 1.5  # it learned (chance is ln 10 = 2.3)
    assert abs(loss8 - loss32) <= 0.02 * loss32, (loss8, loss32)


def test_backends_without_kernels_are_refused():
    p = torch.nn.Parameter(torch.zeros(8))
    for backend in ("cpu_ext", "cuda_ext"):
        with pytest.raises(RuntimeError, match=f"AdamW8bit has no {backend} kernels"):
            AdamW8bit([p], backend=backend)


def test_foreign_state_is_refused():
    p = torch.nn.Parameter(torch.zeros(5000))
    torch_opt = torch.optim.AdamW([p])
    p.grad = torch.ones_like(p)
    torch_opt.step()
    opt = AdamW8bit([p])
    opt.load_state_dict(torch_opt.state_dict())
    with pytest.raises(RuntimeError, match="does not match its size"):
        opt.step()


def test_lr_scheduler_drives_it():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([p], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    deltas = []
    for _ in range(4):
        before = p.detach().clone()
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
        deltas.append((p - before).abs().mean().item())
    assert deltas[2] < 0.2 * deltas[1]  # the tenfold lr cut shows in the update


@pytest.mark.gpu
def test_gpt2_shapes_triton_on_gpu():
    from perfml.models.llama import Llama, LlamaConfig

    with torch.device("meta"):
        shapes = [tuple(p.shape) for p in Llama(LlamaConfig.preset("gpt2-124m")).parameters()]
    values = [torch.randn(s, device="cuda") * 0.02 for s in shapes]
    grads = _grads(values, 3, device="cuda")
    ref, tri = _leaves(values), _leaves(values)
    _run(ref, AdamW8bit(ref, backend="reference"), grads)
    _run(tri, AdamW8bit(tri, backend="triton"), grads)
    for p, t in zip(ref, tri, strict=True):
        # a moment code one step apart moves a parameter by a fraction of one update (lr 1e-3)
        torch.testing.assert_close(t, p, rtol=0, atol=1e-4)
