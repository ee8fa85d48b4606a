"""Where a benchmark ran: card, versions and git commit, stamped on every result row."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess
import uuid
from pathlib import Path
from typing import Any

import torch

import perfml
from perfml import _backend

_PACKAGE_ROOT = Path(perfml.__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(_PACKAGE_ROOT), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_commit() -> tuple[str, bool | None]:
    """(short hash, dirty) of the checkout perfml was imported from; ("unknown", None) when it was
    not imported from a git checkout (an installed wheel inside some other repository counts as
    not: the toplevel must be the directory that holds the perfml package)."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != _PACKAGE_ROOT:
        return "unknown", None
    commit = _git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown", None
    # untracked files count: an uncommitted new source file changes what runs as much as an edit
    status = _git("status", "--porcelain")
    return commit, (bool(status) if status is not None else None)


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict[str, Any]:
    commit, dirty = git_commit()
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "run_id": f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}",
        "time": now.isoformat(timespec="seconds"),
        "device": device.type,
        "card": card_name(device),
        "torch": torch.__version__,
        "triton": _version("triton", "pytorch-triton"),
        "perfml": perfml.__version__,
        "commit": commit,
        "dirty": dirty,
        "python": platform.python_version(),
        "interpret": _backend.interpret_mode(),
    }
