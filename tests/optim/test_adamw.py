"""perfml.optim.AdamW against torch.optim.AdamW run in float64, on every backend this machine has.

Each trajectory is 30 steps on random parameters and fresh random grads. The float64 torch run is
the truth; the same-dtype torch fused run is the baseline of tests/utils.py's tolerance policy
(fp32: 1e-5 relative or 2x torch's own fp32 error; bf16/fp16: at most 2x torch's error), since
30 steps of fp32 rounding are what torch itself accumulates. Backends: reference and cpu_ext on
CPU, triton in interpret mode on CPU; on a GPU machine triton, cuda_ext and reference on CUDA.
"""

from __future__ import annotations

import io

import pytest
import torch

from perfml import _backend
from perfml.optim import AdamW
from tests.utils import assert_matches_reference

CUDA = torch.cuda.is_available()
STEPS = 30
SHAPES = [(1,), (97,), (33, 31), (1025,), (2, 3, 700)]


def _ext_has(name: str) -> bool:
    ext = _backend.extension()
    return ext is not None and hasattr(ext, name)


def _backend_cases() -> list:
    cases = [pytest.param("reference", "cpu", id="reference-cpu")]
    cases.append(
        pytest.param(
            "cpu_ext",
            "cpu",
            id="cpu_ext-cpu",
            marks=pytest.mark.skipif(not _ext_has("adamw_cpu"), reason="perfml._C is not built"),
        )
    )
    if _backend.interpret_mode():
        cases.append(pytest.param("triton", "cpu", id="triton-interpret"))
    if CUDA:
        cases.append(pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu))
        cases.append(
            pytest.param(
                "cuda_ext",
                "cuda",
                id="cuda_ext-cuda",
                marks=[
                    pytest.mark.gpu,
                    pytest.mark.skipif(not _ext_has("adamw_cuda"), reason="no CUDA build of _C"),
                ],
            )
        )
        cases.append(pytest.param("reference", "cuda", id="reference-cuda", marks=pytest.mark.gpu))
    return cases


BACKENDS = _backend_cases()


def _params(shapes, dtypes, device):
    out = []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        out.append(torch.randn(shape, dtype=torch.float32, device=device).to(dtype))
    return out


def _leaves(values, dtype=None):
    return [torch.nn.Parameter(v.clone() if dtype is None else v.to(dtype)) for v in values]


class _Runs:
    """The same training trajectory in perfml (ours), torch float64 (truth) and torch fused in
    each parameter's own dtype (baseline)."""

    def __init__(self, values, make_ours, torch_kwargs, master=False, groups=None):
        self.ours = _leaves(values)
        self.truth = _leaves(values, torch.float64)
        # master weights are fp32 params in all but storage: the baseline runs fp32 params
        self.base = _leaves(values, torch.float32) if master else _leaves(values)
        self.opt = make_ours(self._grouped(self.ours, groups))
        self.opt_truth = torch.optim.AdamW(
            self._grouped(self.truth, groups), foreach=False, **torch_kwargs
        )
        self.opt_base = torch.optim.AdamW(
            self._grouped(self.base, groups), fused=True, **torch_kwargs
        )
        self.all = (self.opt, self.opt_truth, self.opt_base)

    @staticmethod
    def _grouped(params, groups):
        if groups is None:
            return params
        return [{**extra, "params": [params[i] for i in idx]} for idx, extra in groups]

    def set_grads(self, step, skip=()):
        for i, p in enumerate(self.ours):
            if i in skip:
                for ps in (self.ours, self.truth, self.base):
                    ps[i].grad = None
                continue
            g = torch.randn(p.shape, device=p.device).to(p.dtype)
            if step % 7 == 3:  # now and then, grads far from 1: the eps and small-v regime
                g = g * 1e-4
            self.ours[i].grad = g.clone()
            self.truth[i].grad = g.double()
            self.base[i].grad = g.to(self.base[i].dtype)

    def step(self):
        for opt in self.all:
            opt.step()

    def check(self, name=""):
        for i, (p, t, b) in enumerate(zip(self.ours, self.truth, self.base, strict=True)):
            got = p.detach()
            if self.opt.master_weights and p.dtype != torch.float32 and self.opt.state[p]:
                master = self.opt.state[p]["master_param"]
                assert torch.equal(master.to(p.dtype), got), f"{name} param {i}: not bf16(master)"
                got = master
            assert_matches_reference(got, t.detach(), b.detach(), name=f"{name} param {i}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32,),
        (torch.bfloat16,),
        (torch.float16,),
        (torch.float32, torch.bfloat16, torch.float16),
    ],
    ids=["fp32", "bf16", "fp16", "mixed"],
)
def test_matches_torch_float64(backend, device, dtypes, poison_empty):
    kw = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    values = _params(SHAPES, dtypes, device)
    runs = _Runs(values, lambda ps: AdamW(ps, backend=backend, **kw), kw)
    for step in range(STEPS):
        # param 1 gets a grad on even steps only: per-tensor step counts differ within a launch
        runs.set_grads(step, skip=(1,) if step % 2 else ())
        runs.step()
    runs.check(f"{backend} {dtypes}")
    assert runs.opt.state[runs.ours[1]]["step"].item() == STEPS // 2
    assert runs.opt.state[runs.ours[0]]["step"].item() == STEPS
    assert runs.opt.backend_for(device) == backend


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", ["maximize+tensor-lr", "schedule+groups", "no-decay+no-momentum"])
def test_options_match_torch(backend, device, case):
    kw = {"lr": 3e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.05}
    groups = None
    if "maximize" in case:
        kw["maximize"] = True
    if "groups" in case:  # the trainer's layout: decay on matrices, none on vectors, another lr
        groups = [([2, 3, 4], {}), ([0, 1], {"weight_decay": 0.0, "lr": 1e-2})]
    if "no-decay" in case:
        kw["weight_decay"] = 0.0
    if "no-momentum" in case:
        kw["betas"] = (0.0, 0.5)
    ours_kw = {**kw, "lr": torch.tensor(kw["lr"])} if "tensor-lr" in case else kw
    values = _params(SHAPES, (torch.float32,), device)
    runs = _Runs(values, lambda ps: AdamW(ps, backend=backend, **ours_kw), kw, groups=groups)
    schedulers = []
    if "schedule" in case:
        schedulers = [
            torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=STEPS)
            for opt in runs.all
        ]
    lrs, torch_lrs = [], []
    for step in range(STEPS):
        runs.set_grads(step)
        runs.step()
        for s in schedulers:
            s.step()
        lrs.append(runs.opt.param_groups[-1]["lr"])
        torch_lrs.append(runs.opt_truth.param_groups[-1]["lr"])
    runs.check(f"{backend} {case}")
    if schedulers:  # the scheduler drove our optimizer's lr as it drove torch's
        assert len(set(lrs)) > 10 and lrs == torch_lrs


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights(backend, device, dtype):
    kw = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
    values = _params(SHAPES + [(64,)], (dtype,), device)
    values[-1] = values[-1].float()  # an fp32 param in the same optimizer gets no master copy
    runs = _Runs(
        values, lambda ps: AdamW(ps, backend=backend, master_weights=True, **kw), kw, master=True
    )
    for step in range(STEPS):
        runs.set_grads(step)
        runs.step()
    runs.check(f"{backend} master {dtype}")
    state = runs.opt.state[runs.ours[0]]
    assert state["exp_avg"].dtype == torch.float32 and state["master_param"].dtype == torch.float32
    assert "master_param" not in runs.opt.state[runs.ours[-1]]
    # lr 1e-3 moves params by less than a bf16 ulp per step: only the master copy accumulates it
    moved = (runs.ours[0].detach().float() - values[0].float()).abs().max()
    assert moved > 0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_params_without_grads_and_odd_layouts(backend, device):
    kw = {"lr": 1e-2, "weight_decay": 0.1}
    frozen = torch.nn.Parameter(torch.randn(50, device=device))
    never = torch.nn.Parameter(torch.randn(40, device=device))  # requires grad, never gets one
    transposed = torch.nn.Parameter(torch.randn(31, 33, device=device).t())  # reference path
    wide = torch.nn.Parameter(torch.randn(300, device=device, dtype=torch.float64))  # reference
    frozen.requires_grad_(False)
    params = [frozen, never, transposed, wide]
    before = [p.detach().clone() for p in params]
    twins = [torch.nn.Parameter(p.detach().double().clone()) for p in params]
    opt = AdamW(params, backend=backend, **kw)
    ref = torch.optim.AdamW(twins, foreach=False, **kw)
    for _ in range(5):
        for p, q in zip(params[2:], twins[2:], strict=True):
            g = torch.randn(p.shape, device=device, dtype=p.dtype)
            p.grad, q.grad = g.clone(), g.double()
        opt.step()
        ref.step()
    assert torch.equal(frozen, before[0]) and torch.equal(never, before[1])
    assert frozen not in opt.state and never not in opt.state
    assert_matches_reference(transposed.detach(), twins[2].detach(), name="transposed")
    assert torch.allclose(wide.detach(), twins[3].detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_grad_scale_and_found_inf(backend, device):
    """torch's fused contract: grads divided by the scale and written back; found_inf skips the
    whole step, step counters included."""
    torch.manual_seed(1)
    values = _params(SHAPES, (torch.float32, torch.bfloat16), device)
    grads = [torch.randn(v.shape, device=device).to(v.dtype) for v in values]
    ours = _leaves(values)
    plain = _leaves(values)
    opt = AdamW(ours, lr=1e-2, backend=backend)
    opt_plain = AdamW(plain, lr=1e-2, backend=backend)
    for p, q, g in zip(ours, plain, grads, strict=True):
        p.grad, q.grad = (g * 8).to(g.dtype), g.clone()
    scale = torch.tensor(8.0, device=device)
    opt.step(grad_scale=scale, found_inf=torch.tensor(0.0, device=device))
    opt_plain.step()
    for p, q, g in zip(ours, plain, grads, strict=True):
        assert torch.equal(p.grad, g), "the grad was not written back unscaled"
        assert torch.equal(p, q), "a scaled step differs from the unscaled one"
    snapshot = [p.detach().clone() for p in ours]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in ours]
    for p in ours:
        p.grad = torch.full_like(p, float("nan"))
    opt.step(grad_scale=scale, found_inf=torch.tensor(1.0, device=device))
    for p, before, state in zip(ours, snapshot, states, strict=True):
        assert torch.equal(p, before)
        assert torch.isnan(p.grad).all(), "a skipped step touched the grads"
        for k, v in state.items():
            assert torch.equal(opt.state[p][k], v), f"a skipped step changed state {k}"


def _tiny_model(device):
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).to(
        device
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_grad_scaler(backend, device):
    """torch.amp.GradScaler drives our step through _step_supports_amp_scaling exactly as it
    drives torch's fused AdamW: same parameters, same skipped steps, same scale."""
    models = [_tiny_model(device), _tiny_model(device)]
    opts = [
        AdamW(models[0].parameters(), lr=1e-2, backend=backend),
        torch.optim.AdamW(models[1].parameters(), lr=1e-2, fused=True),
    ]
    scalers = [torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=3) for _ in opts]
    x = torch.randn(64, 16, device=device)
    y = torch.randn(64, 4, device=device)
    for step in range(12):
        for model, opt, scaler in zip(models, opts, scalers, strict=True):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            if step == 5:  # an overflow: the step must be skipped and the scale backed off
                next(model.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
    assert scalers[0].get_scale() == scalers[1].get_scale()
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (p - q).abs().max()
        # unscaled grads written back, as torch's fused step does
        assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-7)
    steps = {opts[0].state[p]["step"].item() for p in models[0].parameters()}
    assert steps == {11.0}


def _save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("direction", ["perfml-to-torch", "torch-to-perfml"])
def test_state_dict_interchange(backend, device, direction):
    """A run saved by one optimizer and resumed by the other continues as the uninterrupted run."""
    kw = {"lr": 1e-2, "weight_decay": 0.1}
    values = _params(SHAPES, (torch.float32,), device)
    grads = [[torch.randn(v.shape, device=device) for v in values] for _ in range(10)]

    def make(kind, params):
        if kind == "perfml":
            return AdamW(params, backend=backend, **kw)
        return torch.optim.AdamW(params, foreach=False, **kw)

    def run(opt, params, steps):
        for gs in steps:
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step()

    first, second = direction.split("-to-")
    straight = _leaves(values)
    opt = make(second, straight)
    run(opt, straight, grads)

    a = _leaves(values)
    opt_a = make(first, a)
    run(opt_a, a, grads[:5])
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = make(second, b)
    opt_b.load_state_dict(_save_load(opt_a.state_dict()))
    for p, q in zip(a, b, strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a.state[p][key], opt_b.state[q][key])
        assert float(opt_b.state[q]["step"]) == 5
    run(opt_b, b, grads[5:])
    for p, q in zip(b, straight, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_master_weights_state_dict_round_trip_is_exact(backend, device):
    values = _params(SHAPES, (torch.bfloat16,), device)
    grads = [[torch.randn(v.shape, device=device).bfloat16() for v in values] for _ in range(8)]
    a = _leaves(values)
    opt_a = AdamW(a, lr=1e-3, master_weights=True, backend=backend)
    for gs in grads[:4]:
        for p, g in zip(a, gs, strict=True):
            p.grad = g.clone()
        opt_a.step()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = AdamW(b, lr=1e-3, master_weights=True, backend=backend)
    opt_b.load_state_dict(_save_load(opt_a.state_dict()))
    for p, q in zip(a, b, strict=True):
        for key in ("exp_avg", "exp_avg_sq", "master_param", "step"):
            assert opt_b.state[q][key].dtype == opt_a.state[p][key].dtype
            assert torch.equal(opt_b.state[q][key], opt_a.state[p][key]), key
    for gs in grads[4:]:
        for p, q, g in zip(a, b, gs, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)
    # torch loads the master-weights state too: its states become the params' bf16
    t = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_t = torch.optim.AdamW(t, lr=1e-3)
    opt_t.load_state_dict(_save_load(opt_a.state_dict()))
    for p in t:
        p.grad = torch.randn_like(p)
    opt_t.step()
    assert all(torch.isfinite(p).all() for p in t)


def test_lbfgs_style_closure():
    p = torch.nn.Parameter(torch.tensor([3.0]))
    opt = AdamW([p], lr=0.1, weight_decay=0.0, backend="reference")

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(50)]
    assert losses[-1] < losses[0] / 4


# --- errors ----------------------------------------------------------------------------------


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of auto, cuda_ext, triton"):
        AdamW([torch.nn.Parameter(torch.zeros(2))], backend="cuda")


@pytest.mark.skipif(_ext_has("adamw_cuda"), reason="this machine has the CUDA kernels")
def test_cuda_ext_unavailable_names_what_is_missing():
    with pytest.raises(RuntimeError, match="backend='cuda_ext' is not available: .*perfml._C"):
        AdamW([torch.nn.Parameter(torch.zeros(2))], backend="cuda_ext")


def test_cpu_ext_unavailable_names_the_import_error(monkeypatch):
    monkeypatch.setattr(_backend, "_load_extension", lambda: (None, "ImportError: no _C here"))
    with pytest.raises(RuntimeError, match="cpu_ext.*not available.*ImportError: no _C here"):
        AdamW([torch.nn.Parameter(torch.zeros(2))], backend="cpu_ext")
    # auto falls back to the reference path instead
    p = torch.nn.Parameter(torch.zeros(2))
    opt = AdamW([p])
    p.grad = torch.ones(2)
    with _backend.force("auto"):
        opt.step()
        assert opt.backend_for("cpu") == "reference"


def test_triton_on_cpu_outside_interpret_mode(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(_backend, "interpret_mode", lambda: False)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    opt = AdamW([p], backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        opt.step()


@pytest.mark.skipif(not _ext_has("adamw_cpu"), reason="perfml._C is not built")
def test_cpu_ext_refuses_other_devices():
    p = torch.nn.Parameter(torch.zeros(2, device="meta"))
    p.grad = torch.zeros(2, device="meta")
    opt = AdamW([p], backend="cpu_ext")
    with pytest.raises(RuntimeError, match="cpu_ext' runs CPU tensors; got parameters on meta"):
        opt.step()


def test_sparse_grads_are_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = AdamW(emb.parameters())
    with pytest.raises(RuntimeError, match="does not support sparse gradients.*SparseAdam"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": -1.0}, "invalid learning rate"),
        ({"betas": (0.9, 1.0)}, r"invalid betas\[1\]"),
        ({"betas": (-0.1, 0.9)}, r"invalid betas\[0\]"),
        ({"eps": -1e-8}, "invalid eps"),
        ({"weight_decay": -0.1}, "invalid weight_decay"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_amsgrad_state_from_torch_is_refused():
    p = torch.nn.Parameter(torch.zeros(3))
    t = torch.optim.AdamW([p], amsgrad=True)
    opt = AdamW([p])
    opt.load_state_dict(t.state_dict())
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="amsgrad"):
        opt.step()


def test_mismatched_grad_dtype_is_refused():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    p.grad = torch.zeros(3, dtype=torch.bfloat16)
    opt = AdamW([p])
    p.grad.data = torch.zeros(3)  # .data sidesteps autograd's own dtype check
    with pytest.raises(RuntimeError, match="grad of parameter 0 of its group is torch.float32"):
        opt.step()


@pytest.mark.skipif(not _ext_has("adamw_cpu"), reason="perfml._C is not built")
def test_extension_checks_its_arguments():
    ext = _backend.extension()
    p, g = torch.zeros(4), torch.zeros(4)
    m, v, s = torch.zeros(4), torch.zeros(3), torch.zeros(())
    args = (0.1, 0.9, 0.999, 1e-8, 0.0, False, None, None)
    with pytest.raises(
        RuntimeError, match=r"exp_avg_sqs\[0\] has 3 elements but params\[0\] has 4"
    ):
        ext.adamw_cpu([p], [g], [m], [v], [], [s], *args)
    assert s.item() == 0, "a refused call must not count a step"
    with pytest.raises(RuntimeError, match="same length"):
        ext.adamw_cpu([p], [g], [m], [], [], [s], *args)


# --- GPU: the real shape, more than 2**31 elements, CUDA graphs -------------------------------


def _gpu_backends():
    found = ["triton"]
    if _ext_has("adamw_cuda"):
        found.append("cuda_ext")
    return found


@pytest.mark.gpu
def test_cuda_build_has_the_cuda_kernels():
    assert _ext_has("adamw_cuda"), (
        f"perfml._C lacks adamw_cuda on a CUDA machine: {_backend.extension_error()}"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda_ext"])
def test_gpt2_124m_shapes_on_gpu(backend):
    if backend not in _gpu_backends():
        pytest.skip("no CUDA build of perfml._C")
    from perfml.models.llama import Llama, LlamaConfig

    with torch.device("meta"):
        shapes = [tuple(p.shape) for p in Llama(LlamaConfig.preset("gpt2-124m")).parameters()]
    kw = {"lr": 1e-3, "weight_decay": 0.1}
    values = [torch.randn(s, device="cuda") * 0.02 for s in shapes]
    runs = _Runs(values, lambda ps: AdamW(ps, backend=backend, **kw), kw)
    for step in range(3):
        runs.set_grads(step)
        runs.step()
    runs.check(f"{backend} gpt2-124m")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda_ext"])
def test_more_than_2_pow_31_elements(backend):
    if backend not in _gpu_backends():
        pytest.skip("no CUDA build of perfml._C")
    n = 2**31 + 4099  # offsets past int32, and a tail chunk
    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16, device="cuda"))
    p.grad = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    p.grad[-5:] = -2.0
    opt = AdamW([p], lr=0.5, weight_decay=0.0, backend=backend)
    opt.step()
    # step 1: the update is lr * sign(g) (bias-corrected moments), everywhere
    assert (p[:4] == -0.5).all() and (p[2**31 - 2 : 2**31 + 2] == -0.5).all()
    assert (p[-5:] == 0.5).all() and (p[-10:-5] == -0.5).all()
    del p, opt
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda_ext"])
def test_capturable_step_in_a_cuda_graph(backend):
    if backend not in _gpu_backends():
        pytest.skip("no CUDA build of perfml._C")
    values = _params(SHAPES, (torch.float32, torch.bfloat16), "cuda")
    grads = [[torch.randn(v.shape, device="cuda").to(v.dtype) for v in values] for _ in range(6)]
    eager, graphed = _leaves(values), _leaves(values)
    lr = torch.tensor(1e-2, device="cuda")
    opt_e = AdamW(eager, lr=1e-2, backend=backend)
    opt_g = AdamW(graphed, lr=lr, capturable=True, backend=backend)
    for p, g in zip(graphed, grads[0], strict=True):
        p.grad = g.clone()  # static grads: the graph reads these tensors
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt_g.step()  # warm-up: state, tables and compilation happen outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    for p, g in zip(eager, grads[0], strict=True):
        p.grad = g.clone()
    opt_e.step()
    for gs in grads[1:]:
        for p, q, g in zip(eager, graphed, gs, strict=True):
            p.grad = g.clone()
            q.grad.copy_(g)
        opt_e.step()
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(eager, graphed, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert opt_g.state[graphed[0]]["step"].item() == len(grads)


@pytest.mark.gpu
def test_capturable_refuses_the_synchronizing_path():
    p = torch.nn.Parameter(torch.zeros(4, device="cuda"))
    p.grad = torch.ones(4, device="cuda")
    opt = AdamW([p], capturable=True, backend="reference")
    with pytest.raises(RuntimeError, match="capturable=True"):
        opt.step()


def test_step_inside_torch_compile():
    """A compiled training step may call our step(): it runs eagerly behind a clean graph break,
    and the training matches the uncompiled one."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        opt = AdamW(model.parameters(), lr=1e-2)

        def train_step(x, model=model, opt=opt):
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        fn = torch.compile(train_step, backend="eager") if compiled else train_step
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
        results.append([fn(x).item() for _ in range(5)])
    assert results[0] == results[1] and results[0][-1] < results[0][0]
