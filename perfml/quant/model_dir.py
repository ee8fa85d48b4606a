"""Model directories written by `perfml quantize` / `perfml prune`, and the run-directory helpers
those commands share (loading a trained Llama, its validation perplexity).

A model directory holds
  model.safetensors  the state_dict as it is: packed int8/int4/float8 buffers, pruned shapes
                     (tied weights stored once, through safetensors' save_model)
  perfml_model.json  {"model_config": LlamaConfig dict, "passes": [{"pass", "config", "args"}],
                     "report": the pass's report}
Loading builds the float model from the config, replays each pass's structure (a quantize pass
re-runs the transform, a structured prune resizes the layers to the stored shapes; unstructured
and 2:4 pruning change values only) and loads the tensors strictly, so a mismatch is an error.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODEL_FILE = "model.safetensors"
META_FILE = "perfml_model.json"


def describe_config(pass_name: str, config: Any, *, include_head: bool = False) -> dict[str, Any]:
    """The pass entry of perfml_model.json; include_head records that the quantize pass took the
    output head too (the default filter leaves lm_head alone)."""
    entry = {"pass": pass_name, "config": type(config).__name__, "args": dataclasses.asdict(config)}
    if include_head:
        entry["include_head"] = True
    return entry


def _every_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def pass_filter(include_head: bool) -> Any:
    """The quantize filter_fn a pass used: None (perfml.quant's default: every nn.Linear but
    lm_head) or every nn.Linear."""
    return _every_linear if include_head else None


def _config_from(entry: dict[str, Any]) -> Any:
    import importlib

    module = importlib.import_module(
        "perfml.quant" if entry["pass"] == "quantize" else "perfml.sparsity"
    )
    cls = getattr(module, entry["config"], None)
    if cls is None:
        raise ValueError(f"{META_FILE}: unknown {entry['pass']} config {entry['config']!r}")
    return cls(**entry["args"])


def save_model_dir(
    model: nn.Module,
    path: str | Path,
    *,
    model_config: dict[str, Any],
    passes: list[dict[str, Any]],
    report: dict[str, Any],
) -> Path:
    """Write `model` (a perfml Llama after its passes) and its recipe to the directory `path`."""
    from safetensors.torch import save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path / MODEL_FILE))
    meta = {"model_config": model_config, "passes": passes, "report": report}
    (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The Llama saved by save_model_dir, its passes replayed and its tensors loaded strictly."""
    from safetensors.torch import load_file

    from perfml import quant
    from perfml.models.llama import Llama, LlamaConfig

    path = Path(path)
    meta = json.loads((path / META_FILE).read_text())
    model = Llama(LlamaConfig.from_dict(meta["model_config"]))
    state = load_file(str(path / MODEL_FILE))
    for entry in meta["passes"]:
        config = _config_from(entry)
        if entry["pass"] == "quantize":
            quant.quantize(model, config, filter_fn=pass_filter(entry.get("include_head", False)))
        elif entry["config"] == "StructuredConfig":
            from perfml.sparsity.structured import resize_like

            resize_like(model, state)
    # tied weights are stored once: load_state_dict(strict=False) then check what is missing
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.lm_head is None else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{path / MODEL_FILE}: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()


# --- run directories (written by perfml train) --------------------------------------------------


def load_run(run_dir: str | Path, checkpoint: str = "latest") -> tuple[nn.Module, dict[str, Any]]:
    """The float Llama of a training run's checkpoint ("latest", "best" or a path), on the CPU,
    and the checkpoint's meta."""
    from perfml.models.llama import Llama, LlamaConfig
    from perfml.train import load_checkpoint, resolve_checkpoint

    which = checkpoint if checkpoint in ("latest", "best") else "latest"
    target = Path(run_dir) if checkpoint in ("latest", "best") else Path(checkpoint)
    loaded = load_checkpoint(resolve_checkpoint(target, which), model_only=True)
    model = Llama(LlamaConfig.from_dict(loaded.meta["model_config"]))
    model.load_state_dict(loaded.model)
    return model.eval(), loaded.meta


def run_perplexity(
    model: nn.Module, run_dir: str | Path, *, device: torch.device, batches: int | None = None
) -> dict[str, float]:
    """Validation loss and perplexity of `model` on the run's held-out split, through the
    trainer's own evaluate() (same batches as `perfml eval`)."""
    from perfml.train import distributed
    from perfml.train.config import load_config
    from perfml.train.trainer import (
        CONFIG_FILE,
        build_data,
        evaluate,
        resolve_precision,
        token_loader,
    )

    config = load_config(Path(run_dir) / CONFIG_FILE)
    env = distributed.DistEnv(0, 1, 0, device)
    data = build_data(config)
    metrics = evaluate(
        model.to(device),
        token_loader(data.val_tokens, config, env, split="val"),
        device=device,
        precision=resolve_precision(config.precision, device),
        max_batches=batches or config.eval_batches,
        env=env,
    )
    return {"val_loss": metrics["loss"], "ppl": metrics["ppl"], "tokens": metrics["tokens"]}
