"""Hooks into the training loop, and the early-stopping rule the loop applies at each evaluation.

A callback subclasses Callback and overrides the hooks it needs; they run on every rank (check
`trainer.env.is_main` before writing files). `trainer.request_stop(reason)` from a hook ends the
run after the current step, with a checkpoint, like a SIGTERM does.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

from perfml.train.result import TrainResult


class Trainer(Protocol):
    """What a hook may use of the Trainer that calls it (perfml.train.Trainer); declared here so
    that this module does not import trainer.py, which imports it."""

    model: Any  # the model being trained (DDP/FSDP-wrapped under torchrun)
    env: Any  # perfml.train.distributed.DistEnv: rank, world_size, is_main, device
    step: int  # optimizer steps taken so far

    def request_stop(self, reason: str) -> None: ...


class Callback:
    def on_train_start(self, trainer: Trainer) -> None:
        """After setup (and the restore, when resuming), before the first step."""

    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        """Inside each step, after the backward passes (gradients complete: summed over the
        micro-batches and ranks, unscaled under fp16), before gradient clipping and the optimizer
        step: the place to edit `p.grad` of `trainer.model`'s parameters."""

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """After each optimizer step; `metrics` is the row written to metrics.jsonl."""

    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """After each evaluation on the validation split (`metrics["loss"]`, `["ppl"]`)."""

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        """After a checkpoint is complete on disk (called on every rank once it is)."""

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        """After the last step and final checkpoint, whatever ended the run."""


class EarlyStopping:
    """Stop after `patience` evaluations in a row without a val loss below best - min_delta.
    patience=0 only tracks the best (for the best checkpoint) and never stops."""

    def __init__(self, patience: int = 0, min_delta: float = 0.0) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf
        self.best_step = -1
        self.bad_evals = 0

    def update(self, loss: float, step: int) -> bool:
        """Record an evaluation; True when it improved on the best."""
        if loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad_evals = loss, step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.best_step = int(state["best_step"])
        self.bad_evals = int(state["bad_evals"])
