"""The lean training loop: TrainConfig (YAML + --set overrides), Trainer (mixed precision, gradient
accumulation, schedules, evaluation, early stopping, exact-resume checkpoints, SIGTERM handling),
loggers (metrics.jsonl, TensorBoard, MLflow), callbacks, and DDP / FSDP2 under torchrun.

    from perfml.train import Trainer, load_config
    result = Trainer(load_config("configs/tiny.yaml", ["max_steps=200"])).fit()
"""

from perfml.train.callbacks import Callback, EarlyStopping
from perfml.train.checkpoint import Checkpoint, CheckpointError, load_checkpoint, resolve_checkpoint
from perfml.train.config import ConfigError, TrainConfig, load_config
from perfml.train.trainer import Trainer, TrainResult, validation_metrics

__all__ = [
    "Callback",
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "EarlyStopping",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "load_checkpoint",
    "load_config",
    "resolve_checkpoint",
    "validation_metrics",
]
