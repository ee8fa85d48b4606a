"""AdamW with fused multi-tensor kernels: C++/CUDA (perfml._C), Triton, and C++ for CPU.

One step, per parameter with a grad (decoupled weight decay, torch.optim.AdamW's math):
    step += 1
    g = grad / grad_scale (written back to grad, torch's fused contract); g = -g with maximize
    p = p * (1 - lr * weight_decay)
    exp_avg    = beta1 * exp_avg    + (1 - beta1) * g
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
    p = p - lr / (1 - beta1**step) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2**step) + eps)
and nothing at all (step counters included) when GradScaler's found_inf is set. Math in fp32
whatever the storage dtype; state in the parameter's dtype (torch's layout), or with
master_weights=True, bf16/fp16 parameters get an fp32 master copy and fp32 state in the optimizer,
and the parameter receives the rounded master after each step.

Kernels (see _common.py for how the backend is chosen):
  cuda_ext  csrc/multi_tensor_apply.cuh + csrc/adamw_cuda_kernel.cuh: a persistent grid over
            fixed-size chunks of all tensors of a dtype group, the tensor list passed by value in
            the launch, 16-byte vector loads; one launch per dtype group (more only past ~70
            tensors per group).
  triton    _adamw_kernel below: the same chunked work over a table of raw addresses in device
            memory (one launch per dtype group whatever the tensor count), cached by content:
            a new table is copied only when some tensor's storage moved.
  cpu_ext   csrc/adamw_cpu*.cpp: one parallel region over 64K-element pieces of all tensors,
            at::vec vectorized (AVX2 build picked at run time).
Step counters live on the parameter's device as fp32 tensors (torch's fused layout) and the
kernels compute the bias corrections from them, so a CUDA step never synchronizes and is safe
inside a CUDA graph. Trade-off of the Triton design: a table read per program instead of
per-launch kernel arguments (which Triton cannot vary in length), bought back by launching once
per dtype group rather than once per tensor (Triton's per-launch host overhead is tens of
microseconds, which for the ~150 tensors of a small transformer would cost more than the
update itself).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from perfml import _backend
from perfml.optim._common import (
    Backends,
    FusedOptimizer,
    PointerTables,
    check_hyperparameters,
    compiler_disable,
    kernel_eligible,
    on_device,
    step_tensor,
)

# --- 1. reference ----------------------------------------------------------------------------


def adamw_ref(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: list[Tensor | None] | None = None,
) -> None:
    """One AdamW step in plain PyTorch, tensor by tensor, in place: the definition of correct.

    Math in fp32 (fp64 for fp64 tensors); each tensor rounds once per array at the end. steps[i]
    is a 1-element tensor, incremented here. master_params[i], when given, is the fp32 copy that
    is updated in place of params[i], which then receives its rounding.
    """
    if found_inf is not None and float(found_inf) != 0.0:
        return
    lr = float(lr)
    scale = float(grad_scale) if grad_scale is not None else None
    for i, p in enumerate(params):
        steps[i].add_(1)
        k = float(steps[i])
        master = master_params[i] if master_params is not None else None
        compute = torch.promote_types(p.dtype, torch.float32)
        g = grads[i].to(compute)
        if scale is not None:
            g = g / scale
            grads[i].copy_(g)
        if maximize:
            g = -g
        w = (master if master is not None else p).to(compute)
        m = exp_avgs[i].to(compute)
        v = exp_avg_sqs[i].to(compute)
        w = w * (1.0 - lr * weight_decay)
        m = m * beta1 + g * (1.0 - beta1)
        v = v * beta2 + g * g * (1.0 - beta2)
        denom = v.sqrt() / math.sqrt(1.0 - beta2**k) + eps
        w = w - lr / (1.0 - beta1**k) * (m / denom)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        if master is not None:
            master.copy_(w)
        p.copy_(w)


# --- 2. Triton kernels -----------------------------------------------------------------------

if _backend.has_triton():
    import triton
    import triton.language as tl

    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

    @triton.jit
    def _one_minus_pow(log_beta, step):
        # 1 - beta**step from log(beta), as -expm1(step * log(beta)): at step 1 with beta2 = 0.999,
        # 1 - exp(...) would cancel 3 of fp32's 7 digits. Taylor series near 0 (degree 7: relative
        # error < 2e-8 for |x| < 0.35), exp beyond, where nothing cancels.
        x = tl.maximum(step * log_beta, -100.0)  # beta = 0 passes log(beta) = -1e30; exp(-100) ~ 0
        taylor = x * (
            1.0
            + x
            * (0.5 + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x * (1.0 / 720 + x / 5040)))))
        )
        return -tl.where(x > -0.35, taylor, tl.exp(x) - 1.0)

    @triton.jit
    def _load_f32(ptr, offs, n, MASKED: tl.constexpr):
        if MASKED:
            return tl.load(ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        else:
            return tl.load(ptr + offs).to(tl.float32)

    @triton.jit
    def _store_as(ptr, offs, n, x, MASKED: tl.constexpr):
        if MASKED:
            tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=offs < n)
        else:
            tl.store(ptr + offs, x.to(ptr.dtype.element_ty))

    @triton.jit
    def _adamw_tile(
        P,
        G,
        M,
        V,
        W,
        offs,
        n,
        decay,
        beta1,
        beta2,
        one_minus_beta1,
        one_minus_beta2,
        eps,
        step_size,
        inv_bc2_sqrt,
        scale,
        MASTER: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        UNSCALE: tl.constexpr,
        MASKED: tl.constexpr,
    ):
        g = _load_f32(G, offs, n, MASKED)
        if UNSCALE:
            g = tl.div_rn(g, scale)
            _store_as(G, offs, n, g, MASKED)
        if MAXIMIZE:
            g = -g
        w = _load_f32(W, offs, n, MASKED)
        m = _load_f32(M, offs, n, MASKED)
        v = _load_f32(V, offs, n, MASKED)
        w = w * decay
        m = beta1 * m + one_minus_beta1 * g
        v = beta2 * v + one_minus_beta2 * (g * g)
        denom = tl.sqrt_rn(v) * inv_bc2_sqrt + eps
        w = w - step_size * tl.div_rn(m, denom)
        _store_as(W, offs, n, w, MASKED)
        if MASTER:
            _store_as(P, offs, n, w, MASKED)
        _store_as(M, offs, n, m, MASKED)
        _store_as(V, offs, n, v, MASKED)

    @triton.jit
    def _adamw_chunk(
        TABLE,
        NUMELS,
        CHUNK_TENSOR,
        CHUNK_INDEX,
        LR_PTR,
        SCALE_PTR,
        lr,
        weight_decay,
        beta1,
        beta2,
        one_minus_beta1,
        one_minus_beta2,
        log_beta1,
        log_beta2,
        eps,
        P_DTYPE: tl.constexpr,
        S_DTYPE: tl.constexpr,
        K: tl.constexpr,
        MASTER: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        HAS_LR_PTR: tl.constexpr,
        UNSCALE: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(CHUNK_TENSOR + pid)
        start = tl.load(CHUNK_INDEX + pid) * BLOCK
        n = tl.load(NUMELS + t)
        row = TABLE + t * K
        P = tl.load(row).to(tl.pointer_type(P_DTYPE))
        G = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
        M = tl.load(row + 2).to(tl.pointer_type(S_DTYPE))
        V = tl.load(row + 3).to(tl.pointer_type(S_DTYPE))
        step = tl.load(tl.load(row + 4).to(tl.pointer_type(tl.float32)))
        if ALIGNED:  # every array starts on 16 bytes: full chunks take vector loads
            P = tl.multiple_of(P, 16)
            G = tl.multiple_of(G, 16)
            M = tl.multiple_of(M, 16)
            V = tl.multiple_of(V, 16)
        W = P  # the fp32 values that are updated: the master copy, or the param itself
        if MASTER:
            W = tl.load(row + 5).to(tl.pointer_type(tl.float32))
            if ALIGNED:
                W = tl.multiple_of(W, 16)
        if HAS_LR_PTR:
            lr = tl.load(LR_PTR)
        scale = 1.0
        if UNSCALE:
            scale = tl.load(SCALE_PTR)
        step_size = lr / _one_minus_pow(log_beta1, step)
        inv_bc2_sqrt = 1.0 / tl.sqrt_rn(_one_minus_pow(log_beta2, step))
        decay = 1.0 - lr * weight_decay
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:
            _adamw_tile(
                P,
                G,
                M,
                V,
                W,
                offs,
                n,
                decay,
                beta1,
                beta2,
                one_minus_beta1,
                one_minus_beta2,
                eps,
                step_size,
                inv_bc2_sqrt,
                scale,
                MASTER,
                MAXIMIZE,
                UNSCALE,
                False,
            )
        else:
            _adamw_tile(
                P,
                G,
                M,
                V,
                W,
                offs,
                n,
                decay,
                beta1,
                beta2,
                one_minus_beta1,
                one_minus_beta2,
                eps,
                step_size,
                inv_bc2_sqrt,
                scale,
                MASTER,
                MAXIMIZE,
                UNSCALE,
                True,
            )

    @triton.jit
    def _adamw_kernel(
        TABLE,  # int64 [T, K]: per tensor the addresses of param, grad, exp_avg, exp_avg_sq,
        #         step (fp32, 1 element) and, with MASTER, the fp32 master copy
        NUMELS,  # int64 [T]: elements per tensor
        CHUNK_TENSOR,  # int64 [C]: the tensor program c updates
        CHUNK_INDEX,  # int64 [C]: which BLOCK-sized chunk of it
        LR_PTR,  # fp32 [1]: the learning rate when HAS_LR_PTR (a tensor lr), else unused
        SCALE_PTR,  # fp32 [1]: GradScaler's scale when UNSCALE, else unused
        FOUND_INF_PTR,  # fp32 [1]: GradScaler's found_inf when HAS_FOUND_INF, else unused
        lr,
        weight_decay,
        beta1,
        beta2,
        one_minus_beta1,  # 1 - beta1 computed in double on the host, then rounded
        one_minus_beta2,
        log_beta1,  # log(beta1), for the bias corrections of each tensor's own step
        log_beta2,
        eps,
        P_DTYPE: tl.constexpr,  # param and grad
        S_DTYPE: tl.constexpr,  # exp_avg and exp_avg_sq
        K: tl.constexpr,  # addresses per table row: 5, or 6 with MASTER
        MASTER: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        HAS_LR_PTR: tl.constexpr,
        UNSCALE: tl.constexpr,
        HAS_FOUND_INF: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # GradScaler found an inf or NaN: the whole step is skipped, step counters included.
        skip = False
        if HAS_FOUND_INF:
            skip = tl.load(FOUND_INF_PTR) != 0
        if not skip:
            _adamw_chunk(
                TABLE,
                NUMELS,
                CHUNK_TENSOR,
                CHUNK_INDEX,
                LR_PTR,
                SCALE_PTR,
                lr,
                weight_decay,
                beta1,
                beta2,
                one_minus_beta1,
                one_minus_beta2,
                log_beta1,
                log_beta2,
                eps,
                P_DTYPE,
                S_DTYPE,
                K,
                MASTER,
                MAXIMIZE,
                HAS_LR_PTR,
                UNSCALE,
                ALIGNED,
                BLOCK,
            )


# --- 3. launchers ----------------------------------------------------------------------------

# Elements per Triton program: 8 per thread per array at 8 warps (two 16-byte loads per fp32
# array). On sm_90 that compiles to 63 registers for fp32 (128 for bf16 with master weights), so
# several programs share an SM and one's stores overlap the next one's loads; 4096 per program
# took 190-250 registers, one program per SM.
_BLOCK = 2048
_NUM_WARPS = 8
_TABLES = PointerTables()


class _Hyper:
    """One param group's scalars, prepared once per step."""

    def __init__(self, group: dict[str, Any]) -> None:
        self.lr = group["lr"]
        self.beta1, self.beta2 = (float(b) for b in group["betas"])
        self.eps = float(group["eps"])
        self.weight_decay = float(group["weight_decay"])
        self.maximize = bool(group["maximize"])


def _aligned(addresses: Iterable[int]) -> bool:
    return all(a % 16 == 0 for a in addresses)


def _adamw_triton(lists: _Lists, hp: _Hyper, grad_scale: Tensor | None, found_inf: Tensor | None):
    device = lists.params[0].device
    torch._foreach_add_(lists.steps, 1)
    groups: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
    for p, g, m, v, w, s in lists.rows():
        if p.numel() == 0:
            continue
        row = [p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), s.data_ptr()]
        if w is not None:
            row.append(w.data_ptr())
        aligned = _aligned(row[:4] + row[5:])
        rows, numels = groups[(p.dtype, m.dtype, w is not None, aligned)]
        rows.append(row)
        numels.append(p.numel())
    lr_tensor = hp.lr if isinstance(hp.lr, Tensor) else None
    for (p_dtype, s_dtype, master, aligned), (rows, numels) in groups.items():
        table, numel_t, chunk_tensor, chunk_index, chunks = _TABLES.get(
            device, rows, numels, _BLOCK
        )
        unused = numel_t  # stands in for the pointer arguments a flag turns off
        _adamw_kernel[(chunks,)](
            table, numel_t, chunk_tensor, chunk_index,
            lr_tensor if lr_tensor is not None else unused,
            grad_scale if grad_scale is not None else unused,
            found_inf if found_inf is not None else unused,
            0.0 if lr_tensor is not None else float(hp.lr), hp.weight_decay, hp.beta1, hp.beta2,
            1.0 - hp.beta1, 1.0 - hp.beta2, _log(hp.beta1), _log(hp.beta2), hp.eps,
            P_DTYPE=_TL_DTYPES[p_dtype], S_DTYPE=_TL_DTYPES[s_dtype], K=len(rows[0]),
            MASTER=master, MAXIMIZE=hp.maximize, HAS_LR_PTR=lr_tensor is not None,
            UNSCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            ALIGNED=aligned, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        )  # fmt: skip
    if found_inf is not None:  # the kernels skipped the update; undo the count, on the device
        torch._foreach_sub_(lists.steps, [found_inf] * len(lists.steps))


def _log(beta: float) -> float:
    # beta = 0 (no momentum): beta**step is 0 for every step >= 1; a very negative log gives that
    return math.log(beta) if beta > 0.0 else -1e30


def _adamw_cpu_ext(
    fn: Callable[..., Any],
    lists: _Lists,
    hp: _Hyper,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
):
    fn(
        lists.params, lists.grads, lists.exp_avgs, lists.exp_avg_sqs, lists.masters_or_empty(),
        lists.steps, float(hp.lr), hp.beta1, hp.beta2, hp.eps, hp.weight_decay, hp.maximize,
        grad_scale, found_inf,
    )  # fmt: skip


def _adamw_cuda_ext(
    fn: Callable[..., Any],
    lists: _Lists,
    hp: _Hyper,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
):
    lr_tensor = hp.lr if isinstance(hp.lr, Tensor) else None
    fn(
        lists.params, lists.grads, lists.exp_avgs, lists.exp_avg_sqs, lists.masters_or_empty(),
        lists.steps, 0.0 if lr_tensor is not None else float(hp.lr), lr_tensor, hp.beta1,
        hp.beta2, hp.eps, hp.weight_decay, hp.maximize, grad_scale, found_inf,
    )  # fmt: skip


def _adamw_reference(
    lists: _Lists, hp: _Hyper, grad_scale: Tensor | None, found_inf: Tensor | None
):
    adamw_ref(
        lists.params, lists.grads, lists.exp_avgs, lists.exp_avg_sqs, lists.steps,
        lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps, weight_decay=hp.weight_decay,
        maximize=hp.maximize, grad_scale=grad_scale, found_inf=found_inf,
        master_params=lists.masters,
    )  # fmt: skip


class _Lists:
    """The tensors of one step on one device, as parallel lists."""

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.exp_avgs: list[Tensor] = []
        self.exp_avg_sqs: list[Tensor] = []
        self.masters: list[Tensor | None] = []
        self.steps: list[Tensor] = []

    def add(self, p: Tensor, g: Tensor, m: Tensor, v: Tensor, w: Tensor | None, s: Tensor) -> None:
        self.params.append(p)
        self.grads.append(g)
        self.exp_avgs.append(m)
        self.exp_avg_sqs.append(v)
        self.masters.append(w)
        self.steps.append(s)

    def rows(self) -> Iterable[tuple]:
        return zip(
            self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.masters, self.steps,
            strict=True,
        )  # fmt: skip

    def masters_or_empty(self) -> list[Tensor | None]:
        return self.masters if any(w is not None for w in self.masters) else []


# --- 4. the optimizer ------------------------------------------------------------------------


class AdamW(FusedOptimizer):
    """AdamW (decoupled weight decay) with fused multi-tensor kernels.

    A drop-in for torch.optim.AdamW: the same param_groups keys and state (step, exp_avg,
    exp_avg_sq), so state_dicts load into either optimizer and torch LR schedulers work.

    maximize: ascend the objective. capturable: promise that step() never synchronizes with the
        host, so it can run inside a CUDA graph (the cuda_ext and triton paths never do; a step
        that would need the reference path on CUDA raises instead). lr may be a 1-element tensor
        (update it in place to change the rate inside a captured graph).
    master_weights: bf16/fp16 parameters get an fp32 master copy and fp32 exp_avg/exp_avg_sq
        (state keys master_param, exp_avg, exp_avg_sq), made at their first step from the
        parameter; the parameter gets the rounded master after each step.
    backend: "auto" | "cuda_ext" | "triton" | "cpu_ext" | "reference" (see perfml/optim/_common.py).
    GradScaler: works as with torch's fused AdamW (the scale and found_inf are applied inside
    the kernel, no host synchronization); step(grad_scale=..., found_inf=...) does the same by hand.
    """

    _NAME = "perfml.optim.AdamW"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        capturable: bool = False,
        master_weights: bool = False,
        backend: str = "auto",
    ) -> None:
        check_hyperparameters(self._NAME, lr, betas, eps, weight_decay)
        self._backends = Backends(self._NAME, backend, cuda_fn="adamw_cuda", cpu_fn="adamw_cpu")
        self.master_weights = bool(master_weights)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            # torch.optim.AdamW's keys, so either optimizer loads the other's state_dict
            "amsgrad": False,
            "maximize": maximize,
            "foreach": None,
            "capturable": capturable,
            "differentiable": False,
            "fused": None,
            "decoupled_weight_decay": True,
        }
        super().__init__(params, defaults)

    @property
    def backend(self) -> str:
        """The backend asked for at construction ("auto" unless one was named)."""
        return self._backends.requested

    def backend_for(self, device: torch.device | str) -> str:
        """The backend that runs this optimizer's parameters on `device`."""
        return self._backends.resolve(torch.device(device))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group["decoupled_weight_decay"] = True

    @compiler_disable  # raw pointers and extension calls: a clean graph break
    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> Any:
        """One optimization step. grad_scale / found_inf: a GradScaler's scale and overflow flag
        (by default the attributes GradScaler sets on the optimizer)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = self.amp_args(grad_scale, found_inf)
        moved: dict = {}
        for group in self.param_groups:
            self._step_group(group, grad_scale, found_inf, moved)
        return loss

    def _state_of(self, p: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """(exp_avg, exp_avg_sq, master or None, step) of p, created or converted as needed."""
        state = self.state[p]
        master_wanted = self.master_weights and p.dtype in (torch.bfloat16, torch.float16)
        state_dtype = torch.float32 if master_wanted else p.dtype
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(
                p, dtype=state_dtype, memory_format=torch.preserve_format
            )
            state["exp_avg_sq"] = torch.zeros_like(
                p, dtype=state_dtype, memory_format=torch.preserve_format
            )
        master = None
        if master_wanted:
            master = state.get("master_param")
            if master is None or master.device != p.device or master.shape != p.shape:
                master = p.detach().to(dtype=torch.float32, copy=True)
                state["master_param"] = master
        else:
            state.pop("master_param", None)
        for key in ("exp_avg", "exp_avg_sq"):
            t = state[key]
            if t.dtype != state_dtype or t.device != p.device:
                state[key] = t.to(device=p.device, dtype=state_dtype)
        return state["exp_avg"], state["exp_avg_sq"], master, step_tensor(state, p.device)

    def _step_group(
        self,
        group: dict[str, Any],
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        moved: dict,
    ) -> None:
        if group["amsgrad"]:
            raise RuntimeError(
                f"{self._NAME} does not implement amsgrad (the group has amsgrad=True)"
            )
        hp = _Hyper(group)
        fused: dict[torch.device, _Lists] = defaultdict(_Lists)
        plain: dict[torch.device, _Lists] = defaultdict(_Lists)
        for p, g in self.grads_of(group, self._NAME):
            m, v, w, s = self._state_of(p)
            arrays = (g, m, v) if w is None else (g, m, v, w)
            (fused if kernel_eligible(p, *arrays) else plain)[p.device].add(p, g, m, v, w, s)
        for device in fused.keys() | plain.keys():
            backend = self._backends.resolve(device)
            on_cuda = device.type == "cuda"
            if group["capturable"] and on_cuda and (backend == "reference" or device in plain):
                raise RuntimeError(
                    f"{self._NAME}: capturable=True, but parameters on {device} need the reference "
                    "path, which synchronizes (float64, non-contiguous or subclass parameters, or "
                    "backend='reference')"
                )
            scale = on_device(grad_scale, device, moved)
            inf = on_device(found_inf, device, moved)
            dev_hp = hp
            if isinstance(hp.lr, Tensor) and backend in ("triton", "cuda_ext"):
                dev_hp = _Hyper(group)  # the kernels read a tensor lr on the device
                dev_hp.lr = on_device(hp.lr, device, moved)
            if device in fused:
                lists = fused[device]
                if backend == "triton":
                    _adamw_triton(lists, dev_hp, scale, inf)
                elif backend == "cuda_ext":
                    _adamw_cuda_ext(self._backends.function(backend), lists, dev_hp, scale, inf)
                elif backend == "cpu_ext":
                    _adamw_cpu_ext(self._backends.function(backend), lists, dev_hp, scale, inf)
                else:
                    _adamw_reference(lists, hp, scale, inf)
            if device in plain:
                _adamw_reference(plain[device], hp, scale, inf)
