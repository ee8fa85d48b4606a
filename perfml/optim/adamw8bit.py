"""AdamW8bit: AdamW whose moments are stored in 8 bits, blockwise, with a logarithmic code.

State per parameter of at least MIN_QUANTIZED_NUMEL (4096) elements, in blocks of BLOCK_SIZE (256):
  exp_avg_q       uint8 [numel]    signed code of exp_avg / the block's absmax
  exp_avg_absmax  fp32 [blocks]    max |exp_avg| of each block
  exp_avg_sq_q    uint8 [numel]    unsigned code of exp_avg_sq / the block's max
  exp_avg_sq_absmax fp32 [blocks]
  step            fp32, as in AdamW
2 + 8/256 bytes per parameter instead of fp32 AdamW's 8: 25.4% of its state. Smaller tensors
(norm weights, biases) keep fp32 exp_avg / exp_avg_sq (they are a rounding error of the total, and
the ones whose statistics matter most per element).

The codes are tiny floating-point numbers relative to the block's absmax (a non-linear, "dynamic
exponent" map in closed form, so encoding needs no table search):
  signed (exp_avg):      sign bit + 7 bits: 0, or 2**e * (1 + f/8) for e in [-15, -1], f in 0..7,
                         and 1: 15 binades below the block max at a relative step of 1/8
  unsigned (exp_avg_sq): 8 bits: 0, or ~2**-32 .. 1 in steps of 1/8 of a binade: the second
                         moment spans the square of the first's range; a positive value never
                         rounds to 0 (it would turn its element's denominator into eps)
Both round to nearest (ties to even) on the fp32 bit pattern. Each step dequantizes, runs the
fp32 AdamW update (the same math as adamw_ref, the parameter updated from the fresh moments),
and quantizes the new moments with the new block maxima.

Paths: triton (CUDA, and CPU in interpret mode) is one multi-tensor launch per parameter dtype
over a pointer table (as perfml.optim.AdamW's), each program doing 8 quantization blocks;
reference is plain PyTorch per tensor and is the CPU path (trade-off: the 8-bit optimizer exists
to save GPU memory, so its CPU path is kept simple rather than fast). The fp32-state tensors go
through AdamW's kernels.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from perfml import _backend
from perfml.optim import adamw as _adamw
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

BLOCK_SIZE = 256
MIN_QUANTIZED_NUMEL = 4096
_SIGNED_OFFSET = 895  # code 1 <-> fp32 bits (896 << 20) = 2**-15
_UNSIGNED_OFFSET = 761  # code 255 <-> (1016 << 20) = 1.0
_QUANTIZED_KEYS = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")
_REF_SLICE = 1 << 20  # elements per slice of the reference update (a multiple of BLOCK_SIZE)


# --- 1. reference ----------------------------------------------------------------------------


def _round_bits(x: Tensor) -> Tensor:
    """|x|'s fp32 bits rounded to 3 mantissa bits (ties to even), as (exponent << 3) | mantissa."""
    bits = x.abs().view(torch.int32)
    return (bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20


def encode(x: Tensor, signed: bool) -> Tensor:
    """fp32 x in [-1, 1] (in [0, 1] when not signed) -> uint8 codes (see the module doc)."""
    r = _round_bits(x.float())
    if signed:
        mag = torch.where(r >= _SIGNED_OFFSET + 1, r - _SIGNED_OFFSET, 0).clamp_(max=127)
        return (mag | torch.where(x < 0, 128, 0)).to(torch.uint8)
    mag = torch.where(r >= _UNSIGNED_OFFSET + 1, r - _UNSIGNED_OFFSET, (x > 0).to(torch.int32))
    return mag.clamp_(max=255).to(torch.uint8)


def decode(codes: Tensor, signed: bool) -> Tensor:
    """uint8 codes -> fp32 values in [-1, 1] (in [0, 1] when not signed)."""
    c = codes.to(torch.int32)
    mag = c & 127 if signed else c
    offset = _SIGNED_OFFSET if signed else _UNSIGNED_OFFSET
    val = torch.where(mag == 0, 0.0, ((mag + offset) << 20).view(torch.float32))
    return torch.where(c >= 128, -val, val) if signed else val


def quantize_blockwise(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """x (any shape, fp32) -> (codes uint8 [numel], absmax fp32 [ceil(numel / BLOCK_SIZE)])."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = math.ceil(n / BLOCK_SIZE)
    padded = torch.nn.functional.pad(flat, (0, blocks * BLOCK_SIZE - n)).view(blocks, BLOCK_SIZE)
    absmax = padded.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, 0.0)
    codes = encode(padded * inv[:, None], signed).view(-1)[:n]
    return codes, absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The inverse of quantize_blockwise, up to the code's rounding: fp32 [numel]."""
    n = codes.numel()
    blocks = absmax.numel()
    padded = torch.nn.functional.pad(codes, (0, blocks * BLOCK_SIZE - n)).view(blocks, BLOCK_SIZE)
    return (decode(padded, signed) * absmax[:, None]).view(-1)[:n]


def adamw8bit_ref(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One AdamW8bit step of one quantized parameter, in place, in plain PyTorch: the definition
    of correct. state holds step and the four quantized tensors (see the module doc).

    The update runs over slices of _REF_SLICE elements (whole quantization blocks, so the result
    is the same as in one piece), which bounds its fp32 temporaries to a few MiB whatever the
    tensor's size and writes the state in place."""
    if found_inf is not None and float(found_inf) != 0.0:
        return
    lr = float(lr)
    state["step"].add_(1)
    k = float(state["step"])
    g_all = grad.detach().reshape(-1).float()
    if grad_scale is not None:
        g_all = g_all / float(grad_scale)
        grad.copy_(g_all.view(grad.shape))
    w_all = param.detach().reshape(-1).float()  # a view of an fp32 contiguous param
    decay, step_size = 1.0 - lr * weight_decay, lr / (1.0 - beta1**k)
    bc2_sqrt = math.sqrt(1.0 - beta2**k)
    qm, am = state["exp_avg_q"], state["exp_avg_absmax"]
    qv, av = state["exp_avg_sq_q"], state["exp_avg_sq_absmax"]
    n = w_all.numel()
    for start in range(0, n, _REF_SLICE):
        end = min(n, start + _REF_SLICE)
        blocks = slice(start // BLOCK_SIZE, math.ceil(end / BLOCK_SIZE))
        g = -g_all[start:end] if maximize else g_all[start:end]
        m = dequantize_blockwise(qm[start:end], am[blocks], signed=True)
        v = dequantize_blockwise(qv[start:end], av[blocks], signed=False)
        w = w_all[start:end] * decay
        m = m * beta1 + g * (1.0 - beta1)
        v = v * beta2 + g * g * (1.0 - beta2)
        w_all[start:end] = w - step_size * (m / (v.sqrt() / bc2_sqrt + eps))
        codes, absmax = quantize_blockwise(m, signed=True)
        qm[start:end], am[blocks] = codes, absmax
        codes, absmax = quantize_blockwise(v, signed=False)
        qv[start:end], av[blocks] = codes, absmax
    if w_all.data_ptr() != param.data_ptr():
        param.copy_(w_all.view(param.shape))


# --- 2. Triton kernels -----------------------------------------------------------------------

if _backend.has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _round_bits_tl(x):
        bits = tl.abs(x).to(tl.int32, bitcast=True)
        return (bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20

    @triton.jit
    def _encode_signed(x):
        r = _round_bits_tl(x)
        mag = tl.minimum(tl.where(r >= 896, r - 895, 0), 127)
        return (mag | tl.where(x < 0, 128, 0)).to(tl.uint8)

    @triton.jit
    def _encode_unsigned(x):
        r = _round_bits_tl(x)
        mag = tl.where(r >= 762, r - 761, tl.where(x > 0, 1, 0))
        return tl.minimum(mag, 255).to(tl.uint8)

    @triton.jit
    def _decode_signed(q):
        c = q.to(tl.int32)
        mag = c & 127
        val = tl.where(mag == 0, 0.0, ((mag + 895) << 20).to(tl.float32, bitcast=True))
        return tl.where(c >= 128, -val, val)

    @triton.jit
    def _decode_unsigned(q):
        c = q.to(tl.int32)
        return tl.where(c == 0, 0.0, ((c + 761) << 20).to(tl.float32, bitcast=True))

    @triton.jit
    def _load2d(ptr, offs, mask, other, MASKED: tl.constexpr):
        if MASKED:
            return tl.load(ptr + offs, mask=mask, other=other)
        else:
            return tl.load(ptr + offs)

    @triton.jit
    def _store2d(ptr, offs, mask, x, MASKED: tl.constexpr):
        if MASKED:
            tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(ptr + offs, x.to(ptr.dtype.element_ty))

    @triton.jit
    def _adamw8bit_tile(
        P, G, QM, QV, AM, AV, rows, offs, n,
        decay, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, step_size, inv_bc2_sqrt, scale,
        MAXIMIZE: tl.constexpr, UNSCALE: tl.constexpr, MASKED: tl.constexpr, QBLOCK: tl.constexpr,
    ):  # fmt: skip
        mask = offs < n  # [QBLOCKS, QBLOCK]
        row_mask = rows * QBLOCK < n  # [QBLOCKS]
        g = _load2d(G, offs, mask, 0.0, MASKED).to(tl.float32)
        if UNSCALE:
            g = tl.div_rn(g, scale)
            _store2d(G, offs, mask, g, MASKED)
        if MAXIMIZE:
            g = -g
        w = _load2d(P, offs, mask, 0.0, MASKED).to(tl.float32)
        am = _load2d(AM, rows, row_mask, 0.0, MASKED)
        av = _load2d(AV, rows, row_mask, 0.0, MASKED)
        m = _decode_signed(_load2d(QM, offs, mask, 0, MASKED)) * am[:, None]
        v = _decode_unsigned(_load2d(QV, offs, mask, 0, MASKED)) * av[:, None]
        w = w * decay
        m = beta1 * m + one_minus_beta1 * g
        v = beta2 * v + one_minus_beta2 * (g * g)
        denom = tl.sqrt_rn(v) * inv_bc2_sqrt + eps
        w = w - step_size * tl.div_rn(m, denom)
        _store2d(P, offs, mask, w, MASKED)
        # masked lanes hold m = v = 0, so the block maxima cover the real elements only
        am = tl.max(tl.abs(m), axis=1)
        av = tl.max(v, axis=1)
        one = tl.full(am.shape, 1.0, tl.float32)
        inv_am = tl.where(am > 0, tl.div_rn(one, tl.where(am > 0, am, one)), 0.0)
        inv_av = tl.where(av > 0, tl.div_rn(one, tl.where(av > 0, av, one)), 0.0)
        _store2d(QM, offs, mask, _encode_signed(m * inv_am[:, None]), MASKED)
        _store2d(QV, offs, mask, _encode_unsigned(v * inv_av[:, None]), MASKED)
        _store2d(AM, rows, row_mask, am, MASKED)
        _store2d(AV, rows, row_mask, av, MASKED)

    @triton.jit
    def _adamw8bit_chunk(
        TABLE, NUMELS, CHUNK_TENSOR, CHUNK_INDEX, LR_PTR, SCALE_PTR,
        lr, weight_decay, beta1, beta2, one_minus_beta1, one_minus_beta2, log_beta1, log_beta2, eps,
        P_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_LR_PTR: tl.constexpr,
        UNSCALE: tl.constexpr, ALIGNED: tl.constexpr, QBLOCK: tl.constexpr, QBLOCKS: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        t = tl.load(CHUNK_TENSOR + pid)
        first_row = tl.load(CHUNK_INDEX + pid) * QBLOCKS
        n = tl.load(NUMELS + t)
        row = TABLE + t * 7
        P = tl.load(row).to(tl.pointer_type(P_DTYPE))
        G = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
        QM = tl.load(row + 2).to(tl.pointer_type(tl.uint8))
        QV = tl.load(row + 3).to(tl.pointer_type(tl.uint8))
        AM = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        AV = tl.load(row + 5).to(tl.pointer_type(tl.float32))
        step = tl.load(tl.load(row + 6).to(tl.pointer_type(tl.float32)))
        if ALIGNED:
            P = tl.multiple_of(P, 16)
            G = tl.multiple_of(G, 16)
            QM = tl.multiple_of(QM, 16)
            QV = tl.multiple_of(QV, 16)
        if HAS_LR_PTR:
            lr = tl.load(LR_PTR)
        scale = 1.0
        if UNSCALE:
            scale = tl.load(SCALE_PTR)
        step_size = lr / _adamw._one_minus_pow(log_beta1, step)
        inv_bc2_sqrt = 1.0 / tl.sqrt_rn(_adamw._one_minus_pow(log_beta2, step))
        decay = 1.0 - lr * weight_decay
        rows = first_row + tl.arange(0, QBLOCKS)
        offs = rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
        if (first_row + QBLOCKS) * QBLOCK <= n:
            _adamw8bit_tile(
                P, G, QM, QV, AM, AV, rows, offs, n, decay, beta1, beta2, one_minus_beta1,
                one_minus_beta2, eps, step_size, inv_bc2_sqrt, scale, MAXIMIZE, UNSCALE, False,
                QBLOCK,
            )  # fmt: skip
        else:
            _adamw8bit_tile(
                P, G, QM, QV, AM, AV, rows, offs, n, decay, beta1, beta2, one_minus_beta1,
                one_minus_beta2, eps, step_size, inv_bc2_sqrt, scale, MAXIMIZE, UNSCALE, True,
                QBLOCK,
            )  # fmt: skip

    @triton.jit
    def _adamw8bit_kernel(
        TABLE,  # int64 [T, 7]: per tensor the addresses of param, grad, exp_avg_q, exp_avg_sq_q,
        #         exp_avg_absmax, exp_avg_sq_absmax, step
        NUMELS,  # int64 [T]
        CHUNK_TENSOR,  # int64 [C]: the tensor program c updates
        CHUNK_INDEX,  # int64 [C]: which QBLOCKS x QBLOCK chunk of it
        LR_PTR,  # fp32 [1] when HAS_LR_PTR
        SCALE_PTR,  # fp32 [1] when UNSCALE
        FOUND_INF_PTR,  # fp32 [1] when HAS_FOUND_INF
        lr, weight_decay, beta1, beta2, one_minus_beta1, one_minus_beta2, log_beta1, log_beta2,
        eps,
        P_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_LR_PTR: tl.constexpr,
        UNSCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr,
        QBLOCK: tl.constexpr,  # elements per quantization block (256)
        QBLOCKS: tl.constexpr,  # quantization blocks per program
    ):  # fmt: skip
        if HAS_FOUND_INF:
            if tl.load(FOUND_INF_PTR) == 0:
                _adamw8bit_chunk(
                    TABLE, NUMELS, CHUNK_TENSOR, CHUNK_INDEX, LR_PTR, SCALE_PTR, lr, weight_decay,
                    beta1, beta2, one_minus_beta1, one_minus_beta2, log_beta1, log_beta2, eps,
                    P_DTYPE, MAXIMIZE, HAS_LR_PTR, UNSCALE, ALIGNED, QBLOCK, QBLOCKS,
                )  # fmt: skip
        else:
            _adamw8bit_chunk(
                TABLE, NUMELS, CHUNK_TENSOR, CHUNK_INDEX, LR_PTR, SCALE_PTR, lr, weight_decay,
                beta1, beta2, one_minus_beta1, one_minus_beta2, log_beta1, log_beta2, eps,
                P_DTYPE, MAXIMIZE, HAS_LR_PTR, UNSCALE, ALIGNED, QBLOCK, QBLOCKS,
            )  # fmt: skip


# --- 3. launchers ----------------------------------------------------------------------------

# Quantization blocks per Triton program: 2048 elements, as AdamW's programs.
_QBLOCKS = 8
_NUM_WARPS = 8
_TABLES = PointerTables()


def _adamw8bit_triton(
    items: list[tuple[Tensor, Tensor, dict]],
    hp: _adamw._Hyper,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    device = items[0][0].device
    steps = [state["step"] for _, _, state in items]
    torch._foreach_add_(steps, 1)
    groups: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
    for p, g, state in items:
        row = [p.data_ptr(), g.data_ptr()] + [state[k].data_ptr() for k in _QUANTIZED_KEYS[::2]]
        row += [state[k].data_ptr() for k in _QUANTIZED_KEYS[1::2]] + [state["step"].data_ptr()]
        rows, numels = groups[(p.dtype, _adamw._aligned(row[:4]))]
        rows.append(row)
        numels.append(p.numel())
    lr_tensor = hp.lr if isinstance(hp.lr, Tensor) else None
    for (p_dtype, aligned), (rows, numels) in groups.items():
        table, numel_t, chunk_tensor, chunk_index, chunks = _TABLES.get(
            device, rows, numels, BLOCK_SIZE * _QBLOCKS
        )
        unused = numel_t
        _adamw8bit_kernel[(chunks,)](
            table, numel_t, chunk_tensor, chunk_index,
            lr_tensor if lr_tensor is not None else unused,
            grad_scale if grad_scale is not None else unused,
            found_inf if found_inf is not None else unused,
            0.0 if lr_tensor is not None else float(hp.lr), hp.weight_decay, hp.beta1, hp.beta2,
            1.0 - hp.beta1, 1.0 - hp.beta2, _adamw._log(hp.beta1), _adamw._log(hp.beta2), hp.eps,
            P_DTYPE=_adamw._TL_DTYPES[p_dtype], MAXIMIZE=hp.maximize,
            HAS_LR_PTR=lr_tensor is not None, UNSCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None, ALIGNED=aligned, QBLOCK=BLOCK_SIZE,
            QBLOCKS=_QBLOCKS, num_warps=_NUM_WARPS,
        )  # fmt: skip
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))


def _adamw8bit_reference(
    items: list[tuple[Tensor, Tensor, dict]],
    hp: _adamw._Hyper,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    for p, g, state in items:
        adamw8bit_ref(
            p, g, state, lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps,
            weight_decay=hp.weight_decay, maximize=hp.maximize, grad_scale=grad_scale,
            found_inf=found_inf,
        )  # fmt: skip


# --- 4. the optimizer ------------------------------------------------------------------------


class AdamW8bit(FusedOptimizer):
    """AdamW with 8-bit blockwise-quantized moments (see the module doc for the format).

    The same constructor and param_groups as perfml.optim.AdamW / torch.optim.AdamW (torch LR
    schedulers work; GradScaler works as with a fused optimizer), but its own state layout: its
    state_dict round-trips exactly through itself, not through torch.optim.AdamW.
    backend: "auto" (triton on CUDA, reference on CPU) | "triton" | "reference".
    """

    _NAME = "perfml.optim.AdamW8bit"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        backend: str = "auto",
    ) -> None:
        check_hyperparameters(self._NAME, lr, betas, eps, weight_decay)
        self._backends = Backends(self._NAME, backend, cuda_fn=None, cpu_fn=None)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": False,
            "maximize": maximize,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "decoupled_weight_decay": True,
        }
        super().__init__(params, defaults)

    def backend_for(self, device: torch.device | str) -> str:
        """The backend that runs this optimizer's parameters on `device`."""
        return self._backends.resolve(torch.device(device))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("amsgrad", False)

    @compiler_disable  # raw pointers and extension calls: a clean graph break
    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> Any:
        """One optimization step; grad_scale / found_inf as in perfml.optim.AdamW.step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = self.amp_args(grad_scale, found_inf)
        moved: dict = {}
        for group in self.param_groups:
            self._step_group(group, grad_scale, found_inf, moved)
        return loss

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if p.numel() >= MIN_QUANTIZED_NUMEL:
            blocks = math.ceil(p.numel() / BLOCK_SIZE)
            for key in ("exp_avg", "exp_avg_sq"):
                state[f"{key}_q"] = torch.zeros(p.numel(), dtype=torch.uint8, device=p.device)
                state[f"{key}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)

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
        hp = _adamw._Hyper(group)
        quantized: dict[torch.device, list] = defaultdict(list)
        plain_q: dict[torch.device, list] = defaultdict(list)
        small: dict[torch.device, _adamw._Lists] = defaultdict(_adamw._Lists)
        small_ref: dict[torch.device, _adamw._Lists] = defaultdict(_adamw._Lists)
        for p, g in self.grads_of(group, self._NAME):
            state = self.state[p]
            if len(state) == 0:
                self._init_state(p, state)
            elif ("exp_avg_q" in state) != (p.numel() >= MIN_QUANTIZED_NUMEL):
                raise RuntimeError(
                    f"{self._NAME}: the state of a parameter of shape {tuple(p.shape)} does not "
                    "match its size (a state_dict from another optimizer or model?)"
                )
            step = step_tensor(state, p.device)
            if "exp_avg_q" in state:
                for key in _QUANTIZED_KEYS:
                    if state[key].device != p.device:
                        state[key] = state[key].to(p.device)
                (quantized if kernel_eligible(p, g) else plain_q)[p.device].append((p, g, state))
            else:
                for key in ("exp_avg", "exp_avg_sq"):
                    if state[key].dtype != torch.float32 or state[key].device != p.device:
                        state[key] = state[key].to(device=p.device, dtype=torch.float32)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                (small if kernel_eligible(p, g, m, v) else small_ref)[p.device].add(
                    p, g, m, v, None, step
                )
        devices = quantized.keys() | plain_q.keys() | small.keys() | small_ref.keys()
        for device in devices:
            backend = self._backends.resolve(device)
            scale = on_device(grad_scale, device, moved)
            inf = on_device(found_inf, device, moved)
            dev_hp = hp
            if isinstance(hp.lr, Tensor) and backend == "triton":
                dev_hp = _adamw._Hyper(group)
                dev_hp.lr = on_device(hp.lr, device, moved)
            if backend == "triton":
                if quantized.get(device):
                    _adamw8bit_triton(quantized[device], dev_hp, scale, inf)
                if device in small:
                    _adamw._adamw_triton(small[device], dev_hp, scale, inf)
            else:
                _adamw8bit_reference(quantized.get(device, []), hp, scale, inf)
                if device in small:
                    _adamw._adamw_reference(small[device], hp, scale, inf)
            _adamw8bit_reference(plain_q.get(device, []), hp, scale, inf)
            if device in small_ref:
                _adamw._adamw_reference(small_ref[device], hp, scale, inf)
