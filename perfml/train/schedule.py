"""Learning-rate schedules as multipliers of the peak lr, driven by torch's LambdaLR.

- constant: linear warmup, then the peak lr.
- cosine:   linear warmup, then a half cosine from the peak down to min_lr_ratio * peak at the
            last step.
- wsd:      warmup-stable-decay: linear warmup, the peak lr, then a linear decay to
            min_lr_ratio * peak over the last decay_fraction of the steps (the schedule of
            MiniCPM / DeepSeek-style runs: a stable phase that can be extended without restarting).

Step s (0-based, the optimizer step about to run) gets multiplier(s); warmup reaches the peak at
step warmup_steps - 1 so no step runs at lr 0. LambdaLR keeps only plain numbers in its state dict
(the multiplier is a closure, rebuilt from the config on resume), so checkpoints stay loadable with
torch.load(weights_only=True).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def lr_multiplier(
    schedule: str,
    *,
    max_steps: int,
    warmup_steps: int,
    min_lr_ratio: float = 0.0,
    decay_fraction: float = 0.2,
) -> Callable[[int], float]:
    """The multiplier of the peak lr at optimizer step s (0-based)."""
    if schedule not in ("constant", "cosine", "wsd"):
        raise ValueError(f"schedule must be constant, cosine or wsd; got {schedule!r}")
    warmup_steps = min(warmup_steps, max_steps)
    decay_steps = max(1, round(decay_fraction * max_steps))
    decay_start = max(warmup_steps, max_steps - decay_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        if schedule == "cosine":
            span = max(1, max_steps - 1 - warmup_steps)
            progress = min(1.0, (step - warmup_steps) / span)
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if step < decay_start:
            return 1.0
        span = max(1, max_steps - 1 - decay_start)
        progress = min(1.0, (step - decay_start) / span)
        return 1.0 - (1.0 - min_lr_ratio) * progress

    return multiplier


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    *,
    max_steps: int,
    warmup_steps: int,
    min_lr_ratio: float,
    decay_fraction: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    fn = lr_multiplier(
        schedule,
        max_steps=max_steps,
        warmup_steps=warmup_steps,
        min_lr_ratio=min_lr_ratio,
        decay_fraction=decay_fraction,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
