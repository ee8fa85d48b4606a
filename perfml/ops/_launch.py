"""Launch heuristics shared by the row-wise kernels (norms, residual norms).

Kept in one place so that a tuning finding (say, a register-pressure limit seen in ptxas output)
reaches every kernel of the family instead of the one where it was found.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rows(t: Tensor) -> Tensor:
    """[..., N] -> [M, N] with a unit stride along N (a view when the strides allow it; the
    stride of a size-1 last dim is never used, so such a view is kept too)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def num_warps(block: int) -> int:
    """Warps for a forward kernel holding `block` elements of a row in registers."""
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def bwd_num_warps(block: int) -> int:
    """Warps for the row-looped backward kernels: 4 to 8 row elements per thread.

    Triton prefetches the next row's loads while reducing this one, which doubles the live
    registers: at 4096 columns 8 warps need 173 registers per thread (one program per SM),
    32 warps 64 (ptxas, sm_90), so wide rows get many warps to keep loads in flight.
    """
    return max(4, min(32, block // 128))


def bwd_programs(m: int, device: torch.device, warps: int) -> int:
    """Programs of a row-looped backward: one wave of 32 warps per SM.

    More programs than fit on the GPU at once add no concurrency, only weight-gradient partial
    rows ([programs, N] fp32, written and read back once more by the final sum).
    """
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return min(m, sms * max(1, 32 // warps))
    return min(m, 8)  # interpret mode: few programs keep the partial buffers small
