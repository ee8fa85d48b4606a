"""What perfml's fused optimizers share: the backend choice, hyperparameter checks, the GradScaler
contract, a state_dict loader that keeps state dtypes, and the tables of the multi-tensor Triton
kernels.

Backends (the `backend=` argument):
  auto       CUDA tensors: cuda_ext when perfml._C has its CUDA kernels, else triton, else
             reference; CPU tensors: cpu_ext when perfml._C is built, else reference. The first
             fallback logs one line saying why. PERFML_BACKEND=reference|triton|cpp (or
             perfml._backend.force) overrides the automatic choice, as it does for the ops.
  cuda_ext   the C++/CUDA multi-tensor kernels of perfml._C (CUDA tensors)
  triton     the multi-tensor Triton kernels (CUDA tensors; CPU tensors in interpret mode only)
  cpu_ext    the C++ CPU kernels of perfml._C (CPU tensors)
  reference  plain PyTorch, tensor by tensor: the definition of correct, any device
An explicit backend that cannot run here fails with the reason, at construction when the machine
lacks it (no extension, no Triton) and at step() when the parameters are on a device it does not
serve. Parameters a kernel cannot take (float64, non-contiguous, tensor subclasses such as DTensor)
take the reference path whatever the backend: it is exact for them.

Multi-tensor Triton kernels read a table of raw addresses: row t holds the data pointers of
tensor t's arrays, and program c works on chunk CHUNK_INDEX[c] of tensor CHUNK_TENSOR[c]. The
tables are built on the host and cached by their content (the addresses themselves), so a
training loop whose tensors keep their storage pays one host-to-device copy on its first step and
none after; that also makes a Triton step capturable in a CUDA graph once warmed up on the same
tensors. The host copy is pinned and kept alive with the device copy, so a copy recorded into a
graph stays valid.
"""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from perfml import _backend

BACKENDS = ("auto", "cuda_ext", "triton", "cpu_ext", "reference")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --- hyperparameters and backends ------------------------------------------------------------


def check_hyperparameters(
    owner: str, lr: float | Tensor, betas: tuple[float, float], eps: float, weight_decay: float
) -> None:
    """torch.optim.AdamW's checks, with the optimizer's name in the message."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{owner}: a Tensor lr must have one element, got {lr.numel()}")
        if not lr.is_floating_point():
            raise ValueError(f"{owner}: a Tensor lr must be floating point, got {lr.dtype}")
    elif not 0.0 <= lr:
        raise ValueError(f"{owner}: invalid learning rate lr={lr} (must be >= 0)")
    if not 0.0 <= eps:
        raise ValueError(f"{owner}: invalid eps={eps} (must be >= 0)")
    if len(betas) != 2:
        raise ValueError(f"{owner}: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            raise ValueError(f"{owner}: betas must be floats, got a Tensor for betas[{i}]")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{owner}: invalid betas[{i}]={beta} (must be in [0, 1))")
    if not 0.0 <= weight_decay:
        raise ValueError(f"{owner}: invalid weight_decay={weight_decay} (must be >= 0)")


def _extension_function(name: str) -> tuple[Callable[..., Any] | None, str | None]:
    """perfml._C.<name>, or (None, why it is missing)."""
    ext = _backend.extension()
    if ext is None:
        return None, f"the extension perfml._C is not available ({_backend.extension_error()})"
    fn = getattr(ext, name, None)
    if fn is None:
        if name.endswith("_cuda"):
            return None, (
                "perfml._C was built without its CUDA kernels (torch was a CPU build or nvcc was "
                "not found when it was built; rebuild on a CUDA machine: "
                "pip install --no-build-isolation --no-deps -e .)"
            )
        return None, f"perfml._C has no {name} (rebuild it: pip install --no-build-isolation -e .)"
    return fn, None


class Backends:
    """The backend choice of one optimizer: validated at construction, resolved per device.

    cuda_fn / cpu_fn: the names of the optimizer's entry points in perfml._C (None: it has none,
    so cuda_ext / cpu_ext are not offered).
    """

    def __init__(self, owner: str, requested: str, cuda_fn: str | None, cpu_fn: str | None):
        if requested not in BACKENDS:
            raise ValueError(
                f"{owner}: backend must be one of {', '.join(BACKENDS)}, got {requested!r}"
            )
        self.owner = owner
        self.requested = requested
        self.cuda_fn = cuda_fn
        self.cpu_fn = cpu_fn
        why = self.unavailable(requested)
        if why is not None:
            raise RuntimeError(f"{owner}: backend={requested!r} is not available: {why}")
        self._resolved: dict[tuple[torch.device, str], str] = {}

    def unavailable(self, backend: str) -> str | None:
        """Why `backend` cannot run on this machine at all, or None."""
        if backend in ("auto", "reference"):
            return None
        if backend == "triton":
            if not _backend.has_triton():
                return f"triton is not importable ({_backend._triton_import_error()})"
            return None
        fn_name = self.cuda_fn if backend == "cuda_ext" else self.cpu_fn
        if fn_name is None:
            return f"{self.owner} has no {backend} kernels"
        return _extension_function(fn_name)[1]

    def function(self, backend: str) -> Callable[..., Any]:
        fn = _extension_function(self.cuda_fn if backend == "cuda_ext" else self.cpu_fn)[0]
        assert fn is not None  # resolve() only returns ext backends that are present
        return fn

    def resolve(self, device: torch.device) -> str:
        """The backend that runs this optimizer's kernel-eligible tensors on `device`."""
        setting = _backend.backend_setting()
        key = (device, setting)
        found = self._resolved.get(key)
        if found is None:
            found = self._resolve(device, setting)
            self._resolved[key] = found
        return found

    def _resolve(self, device: torch.device, setting: str) -> str:
        owner, requested = self.owner, self.requested
        if requested != "auto":
            return self._check_device(requested, device)
        if setting == "reference":
            return "reference"
        if setting == "triton":
            return self._check_device("triton", device)
        if setting == "cpp":
            return self._check_device("cuda_ext" if device.type == "cuda" else "cpu_ext", device)
        if device.type == "cuda":
            if self.cuda_fn is not None:
                why = self.unavailable("cuda_ext")
                if why is None:
                    return "cuda_ext"
                _backend.say_once(
                    f"{owner}-cuda_ext", f"{owner}: no cuda_ext ({why}); trying triton"
                )
            why = self.unavailable("triton")
            if why is None:
                return "triton"
            _backend.say_once(f"{owner}-triton", f"{owner}: {why}; using the reference path")
            return "reference"
        if device.type == "cpu" and self.cpu_fn is not None:
            why = self.unavailable("cpu_ext")
            if why is None:
                return "cpu_ext"
            _backend.say_once(
                f"{owner}-cpu_ext", f"{owner}: {why}; CPU tensors use the reference path"
            )
        return "reference"

    def _check_device(self, backend: str, device: torch.device) -> str:
        why = self.unavailable(backend)
        if why is not None:
            raise RuntimeError(f"{self.owner}: backend={backend!r} is not available: {why}")
        if backend == "cuda_ext" and device.type != "cuda":
            raise RuntimeError(
                f"{self.owner}: backend='cuda_ext' runs CUDA tensors; got parameters on {device}"
            )
        if backend == "cpu_ext" and device.type != "cpu":
            raise RuntimeError(
                f"{self.owner}: backend='cpu_ext' runs CPU tensors; got parameters on {device}"
            )
        if backend == "triton" and device.type != "cuda":
            if device.type != "cpu" or not _backend.interpret_mode():
                raise RuntimeError(
                    f"{self.owner}: backend='triton' runs CUDA tensors, or CPU tensors in "
                    "interpret mode (TRITON_INTERPRET=1 set before triton is imported); got "
                    f"parameters on {device}"
                )
        return backend


def kernel_eligible(p: Tensor, *others: Tensor) -> bool:
    """Whether the fused kernels can take this parameter: a plain dense tensor of a kernel dtype,
    with contiguous state and grad (anything else takes the reference path)."""
    return (
        type(p) in (Tensor, torch.nn.Parameter)
        and p.dtype in KERNEL_DTYPES
        and p.is_contiguous()
        and all(type(t) is Tensor and t.is_contiguous() for t in others)
    )


def on_device(t: Tensor | None, device: torch.device, cache: dict) -> Tensor | None:
    """`t` (a GradScaler scale or found_inf, an lr tensor) as a 0-dim fp32 tensor on `device`, one
    copy per step (none when it is one already)."""
    if t is None:
        return None
    key = (id(t), device)
    if key not in cache:
        cache[key] = t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
    return cache[key]


# --- the optimizer base ----------------------------------------------------------------------


def compiler_disable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compiler.disable(fn), applied on fn's first call rather than when it is decorated.

    torch.compiler.disable imports torch._dynamo (seconds of import time) the moment it decorates,
    so decorating step() with it made `import perfml` pay for the compiler. torch's own optimizers
    defer it the same way (torch._disable_dynamo): a compiled region that calls step() still sees
    a function dynamo will not trace, and breaks the graph cleanly around it.
    """
    lazy = getattr(torch, "_disable_dynamo", None)
    return lazy(fn) if lazy is not None else torch.compiler.disable(fn)


class FusedOptimizer(torch.optim.Optimizer):
    """torch.optim.Optimizer plus the parts perfml's fused optimizers share.

    GradScaler: `_step_supports_amp_scaling` tells torch.amp.GradScaler to hand the step its scale
    and found_inf (as attributes grad_scale / found_inf, the contract of torch's fused AdamW) rather
    than unscaling the grads itself; step() also takes them as keyword arguments. The kernels then
    divide the grads by the scale (writing them back unscaled) and skip the step on found_inf != 0
    without a host synchronization.

    load_state_dict keeps every state tensor's dtype (torch's casts all floating state to the
    parameter's dtype, which would round fp32 states of bf16 parameters and destroy quantized
    ones); the step() that follows converts whatever it needs.
    """

    _step_supports_amp_scaling = True

    def amp_args(
        self, grad_scale: Tensor | None, found_inf: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        return grad_scale, found_inf

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["state"]
        held = {
            pid: {k: v for k, v in s.items() if isinstance(v, Tensor) and k != "step"}
            for pid, s in saved.items()
        }
        stripped = {
            pid: {k: v for k, v in s.items() if k not in held[pid]} for pid, s in saved.items()
        }
        super().load_state_dict({**state_dict, "state": stripped})
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
                chain.from_iterable(g["params"] for g in self.param_groups),
                strict=True,
            )
        )
        for pid, tensors in held.items():
            param = id_map.get(pid)
            for k, v in tensors.items():
                if param is None:  # state of no parameter: torch keeps it as it is
                    self.state[pid][k] = v
                else:
                    self.state[param][k] = v.to(device=param.device)

    @staticmethod
    def grads_of(group: dict[str, Any], owner: str) -> Iterable[tuple[Tensor, Tensor]]:
        """(param, grad) for the group's parameters that have a grad; sparse grads and complex
        parameters get a clear error."""
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(
                    f"{owner} does not support sparse gradients (parameter {i} of its group, "
                    f"shape {tuple(p.shape)}); use torch.optim.SparseAdam for sparse embeddings"
                )
            if p.is_complex() or not p.is_floating_point():
                raise RuntimeError(
                    f"{owner} supports real floating-point parameters only; parameter {i} of its "
                    f"group is {p.dtype}"
                )
            if g.dtype != p.dtype or g.shape != p.shape:
                raise RuntimeError(
                    f"{owner}: the grad of parameter {i} of its group is {g.dtype} "
                    f"{tuple(g.shape)}, but the parameter is {p.dtype} {tuple(p.shape)}"
                )
            yield p, g


def step_tensor(state: dict[str, Any], device: torch.device) -> Tensor:
    """The state's step counter as a 1-element fp32 tensor on the parameter's device (torch's
    fused layout), converted once from whatever a loaded state_dict held."""
    step = state["step"]
    if not isinstance(step, Tensor) or step.device != device or step.dtype != torch.float32:
        step = torch.as_tensor(float(step), dtype=torch.float32).to(device)
        state["step"] = step
    return step


def group_by_device(items: Iterable[tuple[Tensor, ...]]) -> dict[torch.device, list]:
    groups: dict[torch.device, list] = defaultdict(list)
    for item in items:
        groups[item[0].device].append(item)
    return groups


# --- pointer tables of the multi-tensor Triton kernels ---------------------------------------


class PointerTables:
    """Device tables for multi-tensor Triton launches, cached by content (see the module doc).

    get(device, rows, numels, block) -> (table [T, K] int64 addresses, numels [T] int64,
    chunk_tensor [C] int64, chunk_index [C] int64, C), C = sum(ceil(numel / block)).
    """

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._cache: OrderedDict[tuple, tuple] = OrderedDict()

    def get(
        self, device: torch.device, rows: list[list[int]], numels: list[int], block: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        key = (device, block, tuple(chain.from_iterable(rows)), tuple(numels))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit[1]
        t, k = len(rows), len(rows[0])
        counts = torch.tensor([math.ceil(n / block) for n in numels], dtype=torch.int64)
        chunks = int(counts.sum())
        chunk_tensor = torch.repeat_interleave(torch.arange(t), counts)
        first_chunk = torch.cumsum(counts, 0) - counts
        chunk_index = torch.arange(chunks) - torch.repeat_interleave(first_chunk, counts)
        host = torch.cat(
            [
                torch.tensor(key[2], dtype=torch.int64),
                torch.tensor(numels, dtype=torch.int64),
                chunk_tensor,
                chunk_index,
            ]
        )
        if device.type == "cuda":
            host = host.pin_memory()
        dev = host.to(device, non_blocking=True)
        views = (
            dev[: t * k].view(t, k),
            dev[t * k : t * k + t],
            dev[t * k + t : t * k + t + chunks],
            dev[t * k + t + chunks :],
            chunks,
        )
        self._cache[key] = (host, views)
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return views
