"""Manifests: what a model directory holds, what produced it and where it came from.

Every model output carries one, written atomically (temp file, fsync, rename) as its last file:
  RUN/checkpoints/step-N/manifest.json   a training checkpoint
  MODEL_DIR/manifest.json                 the output of `perfml quantize` / `perfml prune`
  FILE.onnx.manifest.json                 beside an ONNX export (and its `.data` file)

    {"format": 1, "kind": "checkpoint" | "model" | "onnx",
     "files": {name: {"bytes": N, "sha256": HEX}},  every file of the output; a checkpoint lists
              only DONE, which already records the size and hash of each checkpoint file
              ("verified_by": "DONE": its files are checked against DONE, DONE against this),
     "producer": {"step": "train" | "quantize" | "prune" | "export", ...its config or options},
     "parent": {"path", "kind", "manifest_sha256"} | None,   what it was made from
     "lineage": the run, checkpoint, step, world size and corpus behind it (perfml.runs.lineage),
     "data_fingerprint", "metrics" (perplexity before/after a pass, validation loss, parity),
     "versions": {"perfml", "torch", "python"}, "git_commit": HEAD of the working tree or None,
     "created": ISO time}

The parent's manifest hash makes the chain tamper-evident: a child names the exact manifest (and
so, through its file hashes, the exact bytes) it was derived from. `verify` checks an output's
files against its manifest (a changed or truncated file is a ManifestError naming the file and
what differs); an output written before manifests existed loads with a ManifestWarning. `chain`
walks the parents up to the training run, verifying each manifest on the way.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
MANIFEST_SUFFIX = ".manifest.json"  # beside a file output: FILE.onnx.manifest.json
FORMAT = 1
CHECKPOINT, MODEL, ONNX, RUN = "checkpoint", "model", "onnx", "run"
_DONE = "DONE"  # perfml.train.checkpoint.DONE_FILE
_META = "perfml_model.json"  # perfml.quant.model_dir.META_FILE


class ManifestError(ValueError):
    """A file that differs from its manifest (size or hash), a missing file, or an unreadable
    manifest; the message names the file."""


class ManifestWarning(UserWarning):
    """An output written before manifests existed: loaded without verification."""


# --- what a manifest records --------------------------------------------------------------


def file_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def git_commit(cwd: str | Path | None = None) -> str | None:
    """HEAD of the git work tree at `cwd` (default: the current directory); None when it is not
    one or git is missing."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) >= 40 else None


def versions() -> dict[str, str | None]:
    from importlib import metadata

    from perfml._version import __version__

    try:
        torch_version: str | None = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {"perfml": __version__, "torch": torch_version, "python": platform.python_version()}


def manifest_path(target: str | Path) -> Path:
    """Where the manifest of `target` lives: DIR/manifest.json, or FILE.manifest.json."""
    target = Path(target)
    if target.name.endswith(MANIFEST_SUFFIX) or target.name == MANIFEST_FILE:
        return target
    if target.is_dir():
        return target / MANIFEST_FILE
    return target.with_name(target.name + MANIFEST_SUFFIX)


def manifest_sha256(target: str | Path) -> str | None:
    """The sha256 of `target`'s manifest file; None when it has none."""
    file = manifest_path(target)
    return sha256_file(file) if file.is_file() else None


def kind_of(target: str | Path) -> str | None:
    """RUN, CHECKPOINT, MODEL or ONNX by what `target` holds; None for anything else."""
    target = Path(target)
    if target.is_file():
        return ONNX if target.suffix == ".onnx" else None
    if not target.is_dir():
        return None
    if (target / _META).is_file():
        return MODEL
    if (target / _DONE).is_file():
        return CHECKPOINT
    if (target / "config.yaml").is_file() or (target / "checkpoints").is_dir():
        return RUN
    return None


def parent_record(path: str | Path | None) -> dict[str, Any] | None:
    """What a child's manifest records of the output it was made from (None: nothing)."""
    if path is None:
        return None
    path = Path(path).resolve()
    return {"path": str(path), "kind": kind_of(path), "manifest_sha256": manifest_sha256(path)}


def build(
    kind: str,
    folder: str | Path,
    files: list[str],
    *,
    producer: dict[str, Any],
    parent: dict[str, Any] | None = None,
    lineage: dict[str, Any] | None = None,
    data_fingerprint: str | None = None,
    metrics: dict[str, Any] | None = None,
    verified_by: str | None = None,
) -> dict[str, Any]:
    """A manifest of `files` (names inside `folder`, hashed now)."""
    folder = Path(folder)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "kind": kind,
        "files": {name: file_record(folder / name) for name in files},
    }
    if verified_by is not None:
        manifest["verified_by"] = verified_by
    manifest.update(
        producer=producer,
        parent=parent,
        lineage=lineage or {},
        data_fingerprint=data_fingerprint,
        metrics={k: v for k, v in (metrics or {}).items() if v is not None},
        versions=versions(),
        git_commit=git_commit(),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return manifest


def top_level_files(folder: str | Path) -> list[str]:
    """The regular files directly in `folder` (not hidden, not the manifest), sorted."""
    return sorted(
        p.name
        for p in Path(folder).iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST_FILE
    )


def write(target: str | Path, manifest: dict[str, Any]) -> Path:
    """Write `manifest` for `target` (a directory or a file) atomically: temp, fsync, rename."""
    file = manifest_path(target)
    tmp = file.with_name(f".tmp-{file.name}-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)
    fd = os.open(file.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return file


# --- reading and verifying ------------------------------------------------------------------


def read(target: str | Path) -> dict[str, Any] | None:
    """`target`'s manifest; None when it has none (written before manifests existed)."""
    file = manifest_path(target)
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{file}: cannot be read: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ManifestError(f"{file}: not a perfml manifest (no files table)")
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{file}: manifest format {manifest.get('format')!r}, not {FORMAT}")
    return manifest


def verify(target: str | Path, *, warn: bool = True) -> dict[str, Any] | None:
    """Check every file `target`'s manifest lists (size, then sha256); returns the manifest, or
    None (with a ManifestWarning unless warn=False) when `target` has none."""
    target = Path(target)
    file = manifest_path(target)
    manifest = read(target)
    if manifest is None:
        if warn:
            warnings.warn(
                f"{target}: no {file.name} (written before manifests existed): its files are "
                "loaded unverified",
                ManifestWarning,
                stacklevel=2,
            )
        return None
    for name, record in manifest["files"].items():
        path = file.parent / name
        if not path.is_file():
            raise ManifestError(f"{path}: missing (listed in {file})")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise ManifestError(
                f"{path}: {size} bytes where {file} records {record['bytes']}: truncated or "
                "changed since it was written"
            )
        digest = sha256_file(path)
        if digest != record["sha256"]:
            raise ManifestError(
                f"{path}: sha256 {digest[:12]}... differs from {record['sha256'][:12]}... that "
                f"{file} records: the file changed since it was written"
            )
    return manifest


# --- the chain up to the training run -------------------------------------------------------


def describe_producer(producer: dict[str, Any] | None) -> str:
    """One line of what produced an output."""
    if not producer:
        return "unknown"
    step = producer.get("step")
    if step == "train":
        config = producer.get("config") or {}
        return f"train {config.get('model', '?')} to step {producer.get('train_step')}"
    if step in ("quantize", "prune"):
        return f"{step} {str(producer.get('config', '?')).removesuffix('Config')}"
    if step == "export":
        return f"export {producer.get('format', '?')} opset {producer.get('opset')}"
    return str(step)


def describe_metrics(metrics: dict[str, Any] | None) -> str:
    """One line of an output's headline metrics."""
    metrics = metrics or {}
    if "ppl_after" in metrics:
        text = f"ppl {metrics.get('ppl_before', float('nan')):.3f} -> {metrics['ppl_after']:.3f}"
        if "ppl_after_finetune" in metrics:
            text += f" -> {metrics['ppl_after_finetune']:.3f} fine-tuned"
        return text
    if metrics.get("val_loss") is not None:
        return f"val loss {metrics['val_loss']:.4f}"
    if "max_rel_err" in metrics:
        return f"parity max rel err {metrics['max_rel_err']:.3g}"
    return ""


def chain(target: str | Path, *, verify_files: bool = True) -> list[dict[str, Any]]:
    """The lineage of `target`, newest first, up to its training run: one step per output with
    its path, kind, producer, metrics and manifest hash. With verify_files each manifest's files
    are checked, and each parent's manifest against the hash its child recorded (ManifestError
    naming what differs)."""
    steps: list[dict[str, Any]] = []
    path: Path | None = Path(target)
    expected: str | None = None
    child: Path | None = None
    seen: set[str] = set()
    while path is not None and str(path.resolve()) not in seen and len(steps) < 64:
        seen.add(str(path.resolve()))
        kind = kind_of(path)
        if kind == RUN or kind is None:
            steps.append({"path": str(path), "kind": kind or "missing", "manifest": None})
            break
        manifest = verify(path, warn=False) if verify_files else read(path)
        digest = manifest_sha256(path)
        if verify_files and expected is not None and digest != expected:
            raise ManifestError(
                f"{manifest_path(path)}: sha256 {str(digest)[:12]}... differs from the "
                f"{expected[:12]}... that {manifest_path(child)} records for its parent: the "
                "parent changed after its child was made from it"
            )
        step = {
            "path": str(path),
            "kind": kind,
            "manifest": None if manifest is None else str(manifest_path(path)),
            "manifest_sha256": digest,
            "producer": describe_producer(None if manifest is None else manifest["producer"]),
            "metrics": {} if manifest is None else manifest.get("metrics", {}),
            "verified": verify_files and manifest is not None,
        }
        steps.append(step)
        parent = None if manifest is None else manifest.get("parent")
        child, expected = path, None
        if parent is not None:
            path, expected = Path(parent["path"]), parent.get("manifest_sha256")
        elif kind == CHECKPOINT:
            path = path.parent.parent  # RUN/checkpoints/step-N -> RUN
        else:
            path = None
    return steps
