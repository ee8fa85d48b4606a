"""Model directories written by `perfml quantize` / `perfml prune` (perfml.runs opens them and
run directories alike).

A model directory holds
  model.safetensors  the state_dict as it is: packed int8/int4/float8 buffers, pruned shapes
                     (tied weights stored once, through safetensors' save_model)
  perfml_model.json  {"model_config": LlamaConfig dict, "passes": [{"pass", "config", "args"}],
                     "report": the last pass's report}
  manifest.json      written last (perfml.lineage): size and sha256 of every file of the
                     directory (report.json, tokenizer.json too: write them before), the pass,
                     the parent directory's manifest hash, perplexity before/after, versions
Loading verifies the files against manifest.json first (verify=False skips it; a directory
without one loads with a warning), then builds the float model from the config, replays each
pass's structure in order (a quantize pass re-runs the transform, a structured prune resizes the
layers to the float shapes it recorded; unstructured and 2:4 pruning change values only) and
loads the tensors strictly, so a mismatch is an error. Passes chain: a pruned model directory
quantized again lists both passes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from perfml._files import default_mode

MODEL_FILE = "model.safetensors"
META_FILE = "perfml_model.json"


def describe_config(
    pass_name: str, config: Any, *, include_head: bool = False, model: nn.Module | None = None
) -> dict[str, Any]:
    """The pass entry of perfml_model.json; include_head records that the quantize pass took the
    output head too (the default filter leaves lm_head alone). For a structured prune, `model`
    (the pruned model) gives the float shapes to rebuild, so that a later pass (quantizing)
    may change how the weights are stored."""
    entry = {"pass": pass_name, "config": type(config).__name__, "args": dataclasses.asdict(config)}
    if include_head:
        entry["include_head"] = True
    if model is not None and entry["config"] == "StructuredConfig":
        entry["shapes"] = {
            name: list(t.shape)
            for name, t in model.state_dict().items()
            if name.endswith((".mlp.gate_proj.weight", ".self_attn.k_proj.weight"))
        }
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
    """Write `model` (a perfml Llama after its passes) and its recipe to the directory `path`,
    then its manifest, covering every file already in `path` (write the others first). The
    report's "parent" (perfml.runs.lineage) names the directory the model was made from."""
    from safetensors.torch import save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path / MODEL_FILE))
    default_mode(path / MODEL_FILE)  # safetensors writes 0600; the other files are 0644
    meta = {"model_config": model_config, "passes": passes, "report": report}
    (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    _write_manifest(path, passes, report)
    return path


def _write_manifest(path: Path, passes: list[dict[str, Any]], report: dict[str, Any]) -> None:
    from perfml import lineage

    def ppl(key: str) -> float | None:
        return (report.get(key) or {}).get("ppl")

    origin = {k: report.get(k) for k in ("run", "checkpoint", "step", "world_size", "source")}
    manifest = lineage.build(
        lineage.MODEL,
        path,
        lineage.top_level_files(path),
        producer={"step": passes[-1]["pass"], **passes[-1]} if passes else {"step": "save"},
        parent=lineage.parent_record(report.get("parent")),
        lineage=origin,
        data_fingerprint=report.get("data_fingerprint"),
        metrics={
            "ppl_before": ppl("before"),
            "ppl_after": ppl("after"),
            "ppl_after_finetune": ppl("after_finetune"),
            "val_loss_after": (report.get("after") or {}).get("val_loss"),
        },
    )
    lineage.write(path, manifest)


def load_model_dir(
    path: str | Path, device: str | torch.device = "cpu", *, verify: bool = True
) -> nn.Module:
    """The Llama saved by save_model_dir, its passes replayed and its tensors loaded strictly.
    Its files are checked against manifest.json first (perfml.lineage.ManifestError naming a
    changed or truncated file); verify=False skips that."""
    from safetensors.torch import load_file

    from perfml import lineage, quant
    from perfml.models.llama import Llama, LlamaConfig

    path = Path(path)
    if verify:
        lineage.verify(path)
    meta = json.loads((path / META_FILE).read_text())
    model = Llama(LlamaConfig.from_dict(meta["model_config"]))
    state = load_file(str(path / MODEL_FILE))
    for entry in meta["passes"]:
        config = _config_from(entry)
        if entry["pass"] == "quantize":
            quant.quantize(model, config, filter_fn=pass_filter(entry.get("include_head", False)))
        elif entry["config"] == "StructuredConfig":
            from perfml.sparsity.structured import resize_like

            # the float shapes the pass left (recorded since passes chain; older directories:
            # read from the stored float weights)
            shapes = entry.get("shapes")
            sizes = state if shapes is None else {
                name: torch.empty(shape, device="meta") for name, shape in shapes.items()
            }  # fmt: skip
            resize_like(model, sizes)
    # tied weights are stored once: load_state_dict(strict=False) then check what is missing
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.lm_head is None else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{path / MODEL_FILE}: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()
