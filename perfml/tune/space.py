"""The search space of `perfml tune`: the `tune:` block of a training config, checked up front.

    tune:
      lr: {type: loguniform, low: 1.0e-4, high: 3.0e-2}
      warmup_steps: {type: int, low: 0, high: 50}          # optional: step, log
      weight_decay: {type: uniform, low: 0.0, high: 0.2}   # optional: step
      batch_size: {type: categorical, choices: [8, 16]}
      model_args.num_layers: {type: int, low: 2, high: 4}

Each key is a TrainConfig field (or `model_args.NAME`, a field of the model preset). A float field
takes loguniform, uniform, int or categorical; an int field int or categorical; any other field
(bool, text, a choice among names) categorical. Lists and mappings (loggers, model_args as a
whole) and out_dir (each trial has its own) are not searchable. Every bound and every choice must
make a valid TrainConfig with the base config; a value the model or the data refuse later (a
seq_len above the model's max_seq_len) fails only the trial that drew it.

This module does not import optuna: the space is validated (and `perfml train` reads the same
file) without it; `suggest(trial)` takes an optuna trial.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from perfml.train.config import ConfigError, TrainConfig

KINDS = ("loguniform", "uniform", "int", "categorical")
_KEYS = {
    "loguniform": {"type", "low", "high"},
    "uniform": {"type", "low", "high", "step"},
    "int": {"type", "low", "high", "step", "log"},
    "categorical": {"type", "choices"},
}
NOT_SEARCHABLE = ("out_dir",)


class SpaceError(ConfigError):
    """A bad `tune:` block; the message names the key."""


@dataclass(frozen=True)
class Param:
    """One searched key: `name` is a TrainConfig field or `model_args.NAME`."""

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(
            self.name,
            float(self.low),
            float(self.high),
            step=None if self.step is None else float(self.step),
            log=self.kind == "loguniform",
        )

    def values_to_check(self) -> tuple[Any, ...]:
        return self.choices if self.kind == "categorical" else (self.low, self.high)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"type": self.kind, "choices": list(self.choices)}
        out: dict[str, Any] = {"type": self.kind, "low": self.low, "high": self.high}
        if self.step is not None:
            out["step"] = self.step
        if self.log:
            out["log"] = True
        return out


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def suggest(self, trial: Any) -> dict[str, Any]:
        return {p.name: p.suggest(trial) for p in self.params}

    def to_dict(self) -> dict[str, Any]:
        return {p.name: p.to_dict() for p in self.params}

    def check(self, base: TrainConfig, source: str = "tune") -> None:
        """Every bound and choice gives a valid TrainConfig on top of `base`."""
        for param in self.params:
            for value in param.values_to_check():
                try:
                    apply_params(base, {param.name: value})
                except ConfigError as exc:
                    raise SpaceError(
                        f"{source}.{param.name}: the value {value!r} is not valid: {exc}"
                    ) from None


def apply_params(base: TrainConfig, params: dict[str, Any], **fixed: Any) -> TrainConfig:
    """`base` with the sampled `params` (and `fixed` fields such as out_dir) set; ConfigError
    for a value TrainConfig refuses."""
    values = base.to_dict()
    for name, value in params.items():
        head, _, sub = name.partition(".")
        if sub:
            values[head] = {**values[head], sub: value}
        else:
            values[name] = value
    values.update(fixed)
    return TrainConfig(**values)


def read_space(path: str | Path) -> SearchSpace:
    """The `tune:` block of the YAML file at `path` (SpaceError when it has none)."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(values, dict) or "tune" not in values:
        raise SpaceError(
            f"{path}: no `tune:` block; add one mapping TrainConfig keys to search ranges, e.g. "
            "tune: {lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}}"
        )
    return parse_space(values["tune"], source=f"{path}: tune")


def parse_space(block: Any, source: str = "tune") -> SearchSpace:
    """A SearchSpace from the plain values of a `tune:` block; SpaceError naming the key."""
    if not isinstance(block, dict) or not block:
        raise SpaceError(
            f"{source}: expected a mapping of TrainConfig keys to search ranges, got {block!r}"
        )
    return SearchSpace(tuple(_parse_param(str(k), v, f"{source}.{k}") for k, v in block.items()))


def _parse_param(name: str, spec: Any, where: str) -> Param:
    field_type = _field_type(name, where)
    if not isinstance(spec, dict):
        raise SpaceError(
            f"{where}: expected a mapping like {{type: uniform, low: 0.0, high: 1.0}}, got {spec!r}"
        )
    kind = spec.get("type")
    if kind not in KINDS:
        raise SpaceError(f"{where}: type must be one of {', '.join(KINDS)}; got {kind!r}")
    extra = sorted(set(map(str, spec)) - _KEYS[kind])
    if extra:
        allowed = ", ".join(sorted(_KEYS[kind]))
        raise SpaceError(f"{where}: unknown key {extra[0]!r} for type {kind} (allowed: {allowed})")
    base = _base_kind(field_type)
    allowed_kinds = {
        "float": KINDS,
        "int": ("int", "categorical"),
        "any": KINDS,
    }.get(base, ("categorical",))
    if kind not in allowed_kinds:
        raise SpaceError(
            f"{where}: type {kind} does not fit {name}, {_article(base)} {base} field (use one of "
            f"{', '.join(allowed_kinds)})"
        )
    if kind == "categorical":
        return Param(name, kind, choices=_choices(spec, field_type, name, where))
    if "low" not in spec or "high" not in spec:
        raise SpaceError(f"{where}: type {kind} needs low and high")
    integer = kind == "int"
    low = _number(spec["low"], "low", where, integer)
    high = _number(spec["high"], "high", where, integer)
    if not low < high:
        raise SpaceError(f"{where}: low must be below high; got low={low}, high={high}")
    step = None
    if spec.get("step") is not None:
        step = _number(spec["step"], "step", where, integer)
        if step <= 0:
            raise SpaceError(f"{where}: step must be > 0, got {step}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{where}: log expects true or false, got {log!r}")
    if (kind == "loguniform" or log) and low <= 0:
        raise SpaceError(f"{where}: a log scale needs low > 0, got {low}")
    if log and step not in (None, 1):
        raise SpaceError(f"{where}: log: true takes no step (got step={step})")
    return Param(name, kind, low=low, high=high, step=step, log=log)


def _field_type(name: str, where: str) -> Any:
    hints = typing.get_type_hints(TrainConfig)
    head, dot, sub = name.partition(".")
    if dot:
        if head != "model_args" or not sub:
            raise SpaceError(f"{where}: only model_args takes sub-keys (model_args.NAME)")
        from perfml.models.llama import LlamaConfig

        fields = {f.name: f for f in dataclasses.fields(LlamaConfig)}
        if sub not in fields:
            raise SpaceError(f"{where}: unknown model field {sub!r} (known: {', '.join(fields)})")
        return {"int": int, "float": float, "bool": bool}.get(str(fields[sub].type), Any)
    if name not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
        raise SpaceError(f"{where}: unknown key {name!r} (TrainConfig keys: {known})")
    if name in NOT_SEARCHABLE:
        raise SpaceError(f"{where}: {name} is set per trial (OUT/trials/N); it cannot be searched")
    tp = _strip_optional(hints[name])
    if typing.get_origin(tp) in (list, dict):
        raise SpaceError(
            f"{where}: {name} is a {typing.get_origin(tp).__name__}; only single values are "
            "searched (model_args.NAME for a model field)"
        )
    return hints[name]


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return tp


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _base_kind(tp: Any) -> str:
    tp = _strip_optional(tp)
    if tp is Any:
        return "any"
    if tp is bool:
        return "bool"
    if tp is int:
        return "int"
    if tp is float:
        return "float"
    if typing.get_origin(tp) is Literal:
        return "choice"
    return "text"


def _number(value: Any, what: str, where: str, integer: bool) -> float | int:
    if isinstance(value, bool):
        value = None
    if integer:
        if isinstance(value, int):
            return value
        raise SpaceError(f"{where}: {what} expects an integer, got {value!r}")
    if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            value = None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    raise SpaceError(f"{where}: {what} expects a number, got {value!r}")


def _choices(spec: dict[str, Any], field_type: Any, name: str, where: str) -> tuple[Any, ...]:
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices:
        raise SpaceError(f"{where}: categorical needs a non-empty list of choices, got {choices!r}")
    out = []
    for choice in choices:
        if choice is not None and not isinstance(choice, (bool, int, float, str)):
            raise SpaceError(
                f"{where}: choices must be single values (null, true/false, numbers, text); got "
                f"{choice!r}"
            )
        if field_type is not Any:
            from perfml.train.config import _convert

            try:
                choice = _convert(choice, field_type, name, where, from_text=False)
            except ConfigError as exc:
                raise SpaceError(str(exc)) from None
        out.append(choice)
    if len(set(map(repr, out))) != len(out):
        raise SpaceError(f"{where}: choices repeat a value: {out!r}")
    return tuple(out)
