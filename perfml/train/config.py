"""TrainConfig: every knob of a training run, read from YAML and `--set key=value` overrides.

One flat dataclass rather than nested sections: a run is described by a short YAML file whose keys
are exactly the field names, `--set` addresses them the same way, and the resolved config is
written back to RUN_DIR/config.yaml so a run can be reproduced or resumed from its directory alone.
`model_args` (a dict) is the one nested key: overrides of the model preset, addressed on the command
line as `--set model_args.hidden_size=64`.

Values are converted and checked against the field's type annotation (bool, int, float, str,
Literal choices, optional values, lists, dicts), so a typo or a bad value fails before any work is
done, with an error that names the key and where it came from (file or --set).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Schedule = Literal["cosine", "wsd", "constant"]
LOGGERS = ("jsonl", "tensorboard", "mlflow")
# top-level YAML sections that other commands read and a run ignores (`tune:`: perfml tune's
# search space)
SECTIONS = ("tune",)


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and its source."""


@dataclass
class TrainConfig:
    """Every setting of a training run; the field names are the YAML keys and --set keys."""

    # model: a preset of perfml.models.llama.LlamaConfig, optionally overridden field by field
    model: str = "tiny"
    model_args: dict[str, Any] = field(default_factory=dict)
    fused: bool = True  # perfml kernels (True) or plain PyTorch (False)

    # data: a text file or a folder of them; None is the running Python's standard-library source
    data: str | None = None
    tokenizer: Literal["byte", "bpe"] = "byte"
    vocab_size: int | None = None  # BPE vocabulary size (default 4096); no effect on "byte"
    seq_len: int = 256
    val_fraction: float = 0.05
    cache_dir: str | None = None  # tokenizer / token cache (default: ~/.cache/perfml)

    # optimisation: batch_size is per process and per micro-batch; one optimizer step sees
    # batch_size * grad_accum * world_size sequences
    max_steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    optimizer: Literal["adamw", "perfml"] = "adamw"
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr of cosine / wsd as a fraction of lr
    schedule: Schedule = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the share of max_steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip_grad: float | None = 1.0  # max global grad norm; None or 0 disables clipping

    # numerics and speed
    precision: Precision = "auto"  # auto: bf16 on a CUDA device that has it, else fp32
    compile: bool = False
    activation_checkpointing: bool = False
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    parallel: Literal["ddp", "fsdp"] = "ddp"  # strategy when launched by torchrun on >1 process

    # evaluation, checkpoints, stopping
    out_dir: str = "runs/tiny"
    eval_every: int = 100  # 0: evaluate only at the end
    eval_batches: int | None = 20  # None: the whole validation split
    ckpt_every: int = 500  # 0: checkpoint only at the end (and on SIGTERM/SIGINT)
    keep_last: int = 2  # step checkpoints kept (the best one is kept besides); 0 keeps all
    save_best: bool = True
    early_stop_patience: int = 0  # evaluations without improvement before stopping; 0 disables
    min_delta: float = 0.0  # an improvement is a val loss below best - min_delta

    # logging: metrics.jsonl is always written
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    mlflow_uri: str | None = None  # default: a file store in RUN_DIR/mlruns
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Range and consistency checks (types are checked when values are parsed)."""
        positive = ("max_steps", "batch_size", "grad_accum", "seq_len")
        for name in positive:
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        non_negative = (
            "warmup_steps",
            "eval_every",
            "ckpt_every",
            "keep_last",
            "early_stop_patience",
            "weight_decay",
            "min_delta",
        )
        for name in non_negative:
            _require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(
            0 < self.val_fraction < 1, "val_fraction", f"must be in (0, 1), got {self.val_fraction}"
        )
        _require(
            0 <= self.min_lr_ratio <= 1,
            "min_lr_ratio",
            f"must be in [0, 1], got {self.min_lr_ratio}",
        )
        _require(
            0 <= self.decay_fraction <= 1,
            "decay_fraction",
            f"must be in [0, 1], got {self.decay_fraction}",
        )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _require(0 <= value < 1, name, f"must be in [0, 1), got {value}")
        _require(
            self.clip_grad is None or self.clip_grad >= 0,
            "clip_grad",
            f"must be >= 0, got {self.clip_grad}",
        )
        _require(
            self.eval_batches is None or self.eval_batches >= 1,
            "eval_batches",
            f"must be >= 1 or null, got {self.eval_batches}",
        )
        for name in self.loggers:
            _require(
                name in LOGGERS, "loggers", f"unknown logger {name!r} (known: {', '.join(LOGGERS)})"
            )
        _require(
            self.early_stop_patience == 0 or self.eval_every > 0,
            "early_stop_patience",
            "needs eval_every > 0",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from plain values (YAML-typed); unknown keys and bad values name the key."""
        if not isinstance(values, dict):
            raise ConfigError(
                f"{source}: expected a mapping of config keys, got {type(values).__name__}"
            )
        hints = _field_types()
        parsed = {}
        for key, value in values.items():
            if key in SECTIONS:
                continue
            if key not in hints:
                raise ConfigError(f"{source}: unknown key {key!r}{_suggest(str(key))}")
            parsed[key] = _convert(value, hints[key], key, source, from_text=False)
        try:
            return cls(**parsed)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> TrainConfig:
        """A copy with `key=value` strings applied (values parsed by the key's type)."""
        values = self.to_dict()
        hints = _field_types()
        for item in overrides:
            source = f"--set {item}"
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"{source}: expected key=value")
            head, _, sub = key.partition(".")
            if head not in hints:
                raise ConfigError(f"{source}: unknown key {head!r}{_suggest(head)}")
            if sub:
                if _origin(hints[head]) is not dict:
                    raise ConfigError(f"{source}: {head!r} has no sub-keys")
                values[head] = {**values[head], sub: _yaml_scalar(text, key, source)}
            else:
                values[head] = _convert(text, hints[head], key, source, from_text=True)
        try:
            return TrainConfig(**values)
        except ConfigError as exc:
            raise ConfigError(f"{', '.join(f'--set {o}' for o in overrides)}: {exc}") from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """TrainConfig from a YAML file (or the defaults when path is None), then `key=value`
    overrides. Raises ConfigError naming the file or override and the key."""
    config = TrainConfig()
    if path is not None:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        config = TrainConfig.from_dict(values or {}, source=str(path))
    return config.with_overrides(list(overrides))


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


# --- parsing ----------------------------------------------------------------------------------


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _suggest(key: str) -> str:
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(known)})"


def _origin(tp: Any) -> Any:
    return typing.get_origin(tp) or tp


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~", ""}


def _yaml_scalar(text: str, key: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{source}: {key} is not a valid value: {text!r}") from None


def _convert(value: Any, tp: Any, key: str, source: str, *, from_text: bool) -> Any:
    """`value` as type `tp`; text (from --set) is parsed, YAML values only checked/widened."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args:
            if value is None or (from_text and str(value).strip().lower() in _NONE):
                return None
            (inner,) = [a for a in args if a is not type(None)]
            return _convert(value, inner, key, source, from_text=from_text)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(map(str, args))
            raise ConfigError(f"{source}: {key} must be one of {choices}; got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{source}: {key} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text:
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key} expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key} expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: {key} expects a string, got {value!r}")
    if origin is list:
        if from_text:
            text = value.strip()
            value = (
                _yaml_scalar(text, key, source)
                if text.startswith("[")
                else [part.strip() for part in text.split(",") if part.strip()]
            )
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} expects a list, got {value!r}")
        (inner,) = args
        return [_convert(v, inner, key, source, from_text=False) for v in value]
    if origin is dict:
        if from_text:
            value = _yaml_scalar(value, key, source)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} expects a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"TrainConfig.{key}: unsupported annotation {tp!r}")
