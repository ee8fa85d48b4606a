"""Opening run directories and model directories: the one place that knows their layout.

A run directory (written by `perfml train`) holds
  config.yaml, tokenizer.json, metrics.jsonl, ...  the run's settings and its tokenizer
  checkpoints/step-00000020/                        one checkpoint per saved step (eight digits)
A model directory (written by `perfml quantize` / `perfml prune`, see perfml/quant/model_dir.py)
holds model.safetensors, perfml_model.json (the model config and the passes applied, in order),
report.json and tokenizer.json; it names the run it came from, whose config and data measure its
perplexity.

    loaded = perfml.runs.load_model("runs/tiny")                  # latest checkpoint
    loaded = perfml.runs.load_model("runs/tiny", "best")
    loaded = perfml.runs.load_model("runs/tiny/quantized-int8")   # a model directory
    loaded.model, loaded.tokenizer(), loaded.run_dir, loaded.passes
    perfml.runs.evaluate("runs/tiny/quantized-int8")              # val loss and perplexity
    loaded = perfml.runs.load_model("models:/tiny@production")    # a registered model (MLflow)

Loading verifies the files against their manifests (perfml.lineage: a checkpoint's DONE and
manifest.json, a model directory's manifest.json) and refuses a changed or truncated file by
name; verify=False skips that, and a directory written before manifests loads with a warning.

Every command that takes a model (eval, generate, quantize, prune, export) opens it here, so any
of them takes either kind of directory and their outputs chain (prune -> quantize -> eval ->
export). A check of the model's lineage against the run it names belongs in load_model, after
the weights are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

RUN = "run"
MODEL_DIR = "model"
CONFIG_FILE = "config.yaml"  # perfml.train.trainer.CONFIG_FILE
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINTS = "checkpoints"
META_FILE = "perfml_model.json"  # perfml.quant.model_dir.META_FILE
CHECKPOINT_PATTERN = "checkpoints/step-NNNNNNNN"  # how messages name a run's checkpoints


class RunError(ValueError):
    """A path that is not a run or model directory, or lacks what was asked of it; the message
    names the path and what is missing."""


@dataclass
class LoadedModel:
    """A model opened from a run directory or a model directory (on the CPU, in eval mode)."""

    path: Path  # the directory opened
    kind: str  # RUN | MODEL_DIR
    model: nn.Module
    model_config: dict[str, Any]
    run_dir: Path | None  # the training run behind the model (config, data, tokenizer)
    checkpoint: Path | None  # the checkpoint loaded (a run) or the one the passes started from
    step: int | None
    passes: list[dict[str, Any]] = field(default_factory=list)  # applied passes, in order
    world_size: int = 1  # the training run's world size (its evaluations' global batch)
    data_fingerprint: str | None = None  # the corpus the run trained on, when recorded
    meta: dict[str, Any] = field(default_factory=dict)  # checkpoint meta / perfml_model.json

    @property
    def tokenizer_file(self) -> Path | None:
        """tokenizer.json next to the model, else the run's; None when neither exists."""
        for folder in (self.path, self.run_dir):
            if folder is not None and (folder / TOKENIZER_FILE).is_file():
                return folder / TOKENIZER_FILE
        return None

    def tokenizer(self) -> Any:
        """The run's tokenizer (perfml.data.load_tokenizer of tokenizer_file)."""
        from perfml import data

        file = self.tokenizer_file
        if file is None:
            looked = [str(f / TOKENIZER_FILE) for f in (self.path, self.run_dir) if f is not None]
            raise RunError(f"{self.path}: no {TOKENIZER_FILE} (looked for {', '.join(looked)})")
        return data.load_tokenizer(file)

    def train_config(self) -> Any:
        """The TrainConfig of the run behind the model (its config.yaml)."""
        from perfml.train.config import load_config

        if self.run_dir is None or not (self.run_dir / CONFIG_FILE).is_file():
            where = (
                "it names no run" if self.run_dir is None else f"no {self.run_dir / CONFIG_FILE}"
            )
            raise RunError(
                f"{self.path}: the training run's config is needed and missing ({where})"
            )
        return load_config(self.run_dir / CONFIG_FILE)

    def describe(self) -> str:
        """One line: the checkpoint (a run) or the directory with its passes (a model dir)."""
        if self.kind == RUN:
            return str(self.checkpoint)
        passes = " + ".join(_pass_name(entry) for entry in self.passes) or "no passes"
        return f"{self.path} ({passes})"


def _pass_name(entry: dict[str, Any]) -> str:
    return f"{entry['pass']} {entry['config'].removesuffix('Config')}"


def kind_of(path: str | Path) -> str:
    """RUN or MODEL_DIR; a RunError saying what `path` lacks otherwise."""
    path = Path(path)
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        raise RunError(f"{path}: {what} (a run directory or a model directory is expected)")
    if (path / META_FILE).is_file():
        return MODEL_DIR
    if (path / CONFIG_FILE).is_file() or (path / CHECKPOINTS).is_dir():
        return RUN
    if _run_of_checkpoint(path) is not None:
        return RUN
    raise RunError(
        f"{path}: neither a run directory ({CONFIG_FILE}, {CHECKPOINT_PATTERN}/) nor a model "
        f"directory ({META_FILE})"
    )


def _run_of_checkpoint(path: Path) -> Path | None:
    """The run directory of a checkpoint directory RUN/checkpoints/step-N, else None."""
    from perfml.train.checkpoint import DONE_FILE

    if path.parent.name == CHECKPOINTS and (path / DONE_FILE).is_file():
        return path.parent.parent
    return None


def load_model(path: str | Path, checkpoint: str = "latest", *, verify: bool = True) -> LoadedModel:
    """Open the model of a run directory (its "latest" or "best" checkpoint, or the checkpoint
    directory given: a path, or a name like step-00000020 under the run's checkpoints/), of a
    checkpoint directory itself, or of a model directory (checkpoint must stay "latest"). A
    string "models:/NAME/VERSION" or "models:/NAME@ALIAS" is a registered model, downloaded
    first (perfml.registry.resolve). verify=False skips checking the files against their
    manifests."""
    if isinstance(path, str) and path.startswith("models:/"):
        from perfml import registry

        try:
            path = registry.resolve(path)
        except registry.RegistryError as exc:
            raise RunError(str(exc)) from None
    path = Path(path)
    if kind_of(path) == MODEL_DIR:
        if checkpoint != "latest":
            raise RunError(
                f"{path}: a model directory has one model; a checkpoint ({checkpoint!r}) can be "
                "chosen for run directories only"
            )
        return _load_model_dir(path, verify)
    return _load_run(path, checkpoint, verify)


def _resolve(path: Path, checkpoint: str) -> tuple[Path, Path]:
    """(run directory, checkpoint directory)."""
    from perfml.train.checkpoint import resolve_checkpoint

    run = _run_of_checkpoint(path)
    if run is not None:  # a checkpoint directory opened directly
        if checkpoint != "latest":
            raise RunError(f"{path}: a checkpoint directory; choose --checkpoint with its run")
        return run, path
    if checkpoint in ("latest", "best"):
        return path, resolve_checkpoint(path, checkpoint)
    chosen = Path(checkpoint)
    if not chosen.exists() and (path / CHECKPOINTS / checkpoint).exists():
        chosen = path / CHECKPOINTS / checkpoint
    if not chosen.is_dir():
        raise RunError(
            f"checkpoint {checkpoint!r}: not latest, best, or a checkpoint directory "
            f"(e.g. {path / CHECKPOINTS / 'step-00000020'})"
        )
    return path, resolve_checkpoint(chosen)


def _load_run(path: Path, checkpoint: str, verify: bool = True) -> LoadedModel:
    from perfml import lineage
    from perfml.models.llama import Llama, LlamaConfig
    from perfml.train.checkpoint import load_checkpoint
    from perfml.train.trainer import structure_mismatch

    run_dir, where = _resolve(path, checkpoint)
    if verify:
        lineage.verify(where)  # DONE's hash; load_checkpoint checks the files against DONE
    loaded = load_checkpoint(where, model_only=True, verify=verify)
    meta = loaded.meta
    model = Llama(LlamaConfig.from_dict(meta["model_config"]))
    problem = structure_mismatch(model, loaded.model)
    if problem is not None:
        raise RunError(
            f"{loaded.path}: its weights do not fit the model its model_config builds ({problem}): "
            "the run trained a model of another structure (e.g. a structurally pruned one)"
        )
    model.load_state_dict(loaded.model)
    return LoadedModel(
        path=path,
        kind=RUN,
        model=model.eval(),
        model_config=meta["model_config"],
        run_dir=run_dir,
        checkpoint=loaded.path,
        step=loaded.step,
        world_size=int(meta.get("world_size", 1)),
        data_fingerprint=meta.get("data", {}).get("fingerprint"),
        meta=meta,
    )


def _load_model_dir(path: Path, verify: bool = True) -> LoadedModel:
    from perfml import lineage
    from perfml.quant import model_dir

    if verify:
        lineage.verify(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
        model = model_dir.load_model_dir(path, verify=False)  # verified above
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise RunError(f"{path}: cannot read the model directory: {exc}") from None
    report = meta.get("report", {})
    run = report.get("run")
    if run is None and "source" in report:
        run = _source_run(Path(report["source"]))
    checkpoint = report.get("checkpoint")
    return LoadedModel(
        path=path,
        kind=MODEL_DIR,
        model=model,
        model_config=meta["model_config"],
        run_dir=None if run is None else Path(run),
        checkpoint=None if checkpoint is None else Path(checkpoint),
        step=report.get("step"),
        passes=list(meta.get("passes", [])),
        world_size=int(report.get("world_size", 1)),
        data_fingerprint=report.get("data_fingerprint"),
        meta=meta,
    )


def _source_run(source: Path) -> Path | None:
    """The training run at the root of a chain of sources (a model directory written before the
    run was recorded names only its source: follow it)."""
    for _ in range(32):
        meta_file = source / META_FILE
        if not meta_file.is_file():
            return source
        try:
            report = json.loads(meta_file.read_text()).get("report", {})
        except (OSError, json.JSONDecodeError):
            return None
        if report.get("run"):
            return Path(report["run"])
        if "source" not in report:
            return None
        source = Path(report["source"])
    return None


def lineage(loaded: LoadedModel) -> dict[str, Any]:
    """What a model directory derived from `loaded` records of where it came from: the source
    directory, the training run, its checkpoint and step, world size and corpus fingerprint,
    and its parent (parent_of: whose manifest the new directory's manifest names)."""
    return {
        "source": str(loaded.path),
        "parent": str(parent_of(loaded)),
        "run": None if loaded.run_dir is None else str(loaded.run_dir),
        "checkpoint": None if loaded.checkpoint is None else str(loaded.checkpoint),
        "step": loaded.step,
        "world_size": loaded.world_size,
        "data_fingerprint": loaded.data_fingerprint,
    }


def parent_of(loaded: LoadedModel) -> Path:
    """The output a model derived from `loaded` is made from: the checkpoint of a run, the
    model directory itself otherwise."""
    if loaded.kind == RUN and loaded.checkpoint is not None:
        return loaded.checkpoint
    return loaded.path


def evaluate(
    path: str | Path | LoadedModel,
    checkpoint: str = "latest",
    *,
    batches: int | None = None,
    device: str | torch.device = "auto",
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """Validation loss and perplexity of a run's checkpoint or of a model directory's model, on
    the validation batches the run's own evaluations used (its global batch: batch_size x the
    world size it trained with); `batches` caps them (default: the run's eval_batches). `model`
    measures another model (e.g. a pass's output) on `path`'s run instead of the loaded one.
    Returns {"path", "checkpoint", "step", "val_loss", "ppl", "tokens"}."""
    from perfml.train.trainer import validation_metrics

    loaded = path if isinstance(path, LoadedModel) else load_model(path, checkpoint)
    metrics = validation_metrics(
        loaded.model if model is None else model,
        loaded.train_config(),
        device=device,
        batches=batches,
        world_size=loaded.world_size,
        fingerprint=loaded.data_fingerprint,
        source=str(loaded.checkpoint or loaded.path),
    )
    return {
        "path": str(loaded.path),
        "checkpoint": None if loaded.checkpoint is None else str(loaded.checkpoint),
        "step": loaded.step,
        **metrics,
    }
