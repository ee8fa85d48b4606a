"""What a training run returns (Trainer.fit, perfml.sparsity.finetune), in a module of its own so
that callbacks.py and trainer.py both use it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stop_reason: str  # "max_steps" | "early_stop" | "SIGTERM" | "SIGINT" | a callback's reason
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    tokens: int
    elapsed_s: float
