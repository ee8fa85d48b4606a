"""`perfml info PATH`: what PATH is (run, checkpoint, model directory, ONNX file), its manifest
(files, producer, metrics, versions, commit) and its lineage up to the training run, each
manifest verified on the way (perfml.lineage)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from perfml.cli._common import UsageError

HELP = "what a run, checkpoint, model directory or ONNX file is, and its verified lineage"
KIND_NAMES = {
    "run": "training run",
    "checkpoint": "checkpoint",
    "model": "model directory",
    "onnx": "ONNX file",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path",
        metavar="PATH",
        help="a run directory, a checkpoint directory, a model directory, an .onnx file, or "
        "models:/NAME/VERSION | models:/NAME@ALIAS",
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="do not check the files' sizes and sha256 against the manifests",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def describe(path: Path, verify: bool) -> dict[str, Any]:
    """{"path", "kind", "manifest", "latest_checkpoint" (a run), "chain"}."""
    from perfml import lineage
    from perfml.train.checkpoint import list_checkpoints

    kind = lineage.kind_of(path)
    if kind is None:
        what = "no such file or directory" if not path.exists() else "not a perfml output"
        raise UsageError(
            f"{path}: {what} (a run, checkpoint or model directory, or an .onnx file is expected)"
        )
    info: dict[str, Any] = {"path": str(path), "kind": kind}
    target = path
    if kind == lineage.RUN:
        found = list_checkpoints(path / "checkpoints")
        info["checkpoints"] = [p.name for p in found]
        if not found:
            info["manifest"], info["chain"] = None, [{"path": str(path), "kind": "run"}]
            return info
        target = found[-1]
        info["latest_checkpoint"] = str(target)
    manifest = lineage.verify(target, warn=False) if verify else lineage.read(target)
    if manifest is not None:
        info["manifest_file"] = str(lineage.manifest_path(target))
    info["manifest"] = manifest
    info["verified"] = verify and manifest is not None
    info["chain"] = lineage.chain(target, verify_files=verify)
    return info


def _print(info: dict[str, Any]) -> None:
    from perfml import lineage

    print(f"{info['path']}: {KIND_NAMES[info['kind']]}")
    if info["kind"] == "run":
        names = info["checkpoints"]
        print(f"  checkpoints: {', '.join(names) if names else 'none'}")
        if "latest_checkpoint" in info:
            print(f"  latest: {info['latest_checkpoint']}")
    manifest = info["manifest"]
    if manifest is None:
        if info["kind"] != "run" or info.get("latest_checkpoint"):
            print("  manifest: none (written before manifests existed; files not verified)")
    else:
        state = "verified" if info["verified"] else "not verified (--no-verify)"
        print(f"  manifest: {info['manifest_file']} ({state})")
        if manifest.get("verified_by"):
            print(f"    files (each checked against {manifest['verified_by']}):")
        else:
            print("    files:")
        for name, record in sorted(manifest["files"].items()):
            print(f"      {name:<24} {record['bytes']:>12,} bytes  sha256 {record['sha256'][:16]}")
        print(f"    producer: {lineage.describe_producer(manifest.get('producer'))}")
        metrics = manifest.get("metrics") or {}
        if metrics:
            print("    metrics: " + ", ".join(f"{k} {_num(v)}" for k, v in sorted(metrics.items())))
        if manifest.get("data_fingerprint"):
            print(f"    data: {manifest['data_fingerprint']}")
        versions = manifest.get("versions") or {}
        print("    versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        print(f"    commit: {manifest.get('git_commit') or 'unknown'}")
    print("lineage (newest first):")
    for step in info["chain"]:
        kind = step["kind"]
        line = f"  {kind:<10} {step['path']}"
        if kind not in ("run", "missing"):
            line += f"  {step['producer']}"
            text = lineage.describe_metrics(step["metrics"])
            if text:
                line += f"  {text}"
            if step["manifest"] is None:
                line += "  (no manifest)"
            elif step["verified"]:
                line += "  verified"
        elif kind == "missing":
            line += "  (missing)"
        print(line)


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run(args: argparse.Namespace) -> int:
    from perfml import lineage

    path = args.path
    if path.startswith("models:/"):
        from perfml import registry

        try:
            path = registry.resolve(path)
        except registry.RegistryError as exc:
            raise UsageError(str(exc)) from None
    try:
        info = describe(Path(path), args.verify)
    except lineage.ManifestError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(info, default=str))
    else:
        _print(info)
    return 0
