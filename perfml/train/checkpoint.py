"""Checkpoints: written atomically, verified on load, never executing code from a file.

A checkpoint is a directory RUN_DIR/checkpoints/step-00000100/ holding
  model.safetensors  the weights (tensors only; tied weights stored once, aliases in its metadata)
  trainer.pt         optimizer, scheduler, scaler, RNG and loader states, step, early-stop state:
                     plain tensors, numbers, strings, lists and dicts, read back with
                     torch.load(weights_only=True)
  meta.json          config, data fingerprint, step, versions (for people and for `perfml eval`)
  DONE               the size and sha256 of each file above
  manifest.json      written last (perfml.lineage): DONE's hash, the producer (the train config
                     and step), data fingerprint, losses, versions and git commit

Writing goes to a hidden sibling `.tmp-step-...` directory; every file is fsynced, DONE is written
last, then the directory is renamed into place and its parent fsynced. A crash at any point leaves
either the complete new checkpoint or none (plus a `.tmp-*` leftover that listing ignores), so the
previous checkpoint stays the latest loadable one. Loading checks DONE's sizes and hashes before
parsing anything, so a truncated or damaged file is reported by name instead of surfacing as an
obscure parse error or, worse, loading silently. Hashing costs a read of the checkpoint (about a
second per GB, from the page cache right after writing); that is the price of never resuming from
a damaged file.

`best.json` in the checkpoints folder names the checkpoint with the lowest validation loss; pruning
keeps the newest `keep_last` step checkpoints plus that one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perfml._files import default_mode

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer.pt"
META_FILE = "meta.json"
DONE_FILE = "DONE"
BEST_FILE = "best.json"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, partial or corrupt; the message names the file."""


@dataclass
class Checkpoint:
    path: Path
    model: dict[str, torch.Tensor]
    state: dict[str, Any]
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


# --- writing ----------------------------------------------------------------------------------


def save_checkpoint(
    path: str | Path,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write a complete checkpoint at `path` (a directory), atomically replacing any there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_model(tmp / MODEL_FILE, model_state)
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            _sync(f)
        _write_json(tmp / META_FILE, meta)
        files = {name: _describe(tmp / name) for name in (MODEL_FILE, STATE_FILE, META_FILE)}
        _write_json(tmp / DONE_FILE, {"format": FORMAT, "files": files})
        _write_manifest(tmp, meta)
        _fsync_dir(tmp)
        old = None
        if path.exists():  # the same step written again (e.g. a rerun of the last step)
            old = path.parent / f".old-{path.name}-{os.getpid()}"
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _write_manifest(folder: Path, meta: dict[str, Any]) -> None:
    """manifest.json of a checkpoint: it lists DONE alone (which records every other file)."""
    from perfml import lineage

    manifest = lineage.build(
        lineage.CHECKPOINT,
        folder,
        [DONE_FILE],
        verified_by=DONE_FILE,
        producer={"step": "train", "config": meta.get("config"), "train_step": meta.get("step")},
        data_fingerprint=(meta.get("data") or {}).get("fingerprint"),
        metrics={"train_loss": meta.get("train_loss"), "val_loss": meta.get("val_loss")},
    )
    lineage.write(folder, manifest)


def _write_model(path: Path, model_state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors that share memory: keep the first name of each, alias the rest
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model_state.items():
        key = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})
    default_mode(path)  # safetensors writes 0600; the other files of a checkpoint are 0644
    with open(path, "rb+") as f:
        _sync(f)


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        _sync(f)


def write_json_atomic(path: str | Path, value: Any) -> None:
    """Replace a small JSON file atomically (temp file, fsync, rename)."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    _write_json(tmp, value)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --- reading ----------------------------------------------------------------------------------


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check that `path` is a complete, undamaged checkpoint; returns DONE's manifest."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    done = path / DONE_FILE
    if not done.is_file():
        raise CheckpointError(
            f"{done}: missing, so checkpoint {path} is partial (its write did not finish); "
            "resume from an earlier checkpoint"
        )
    manifest = _read_json(done)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{done}: not a perfml checkpoint manifest (format {FORMAT})")
    for name, record in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from checkpoint {path}")
        size = file.stat().st_size
        if size != record["bytes"]:
            raise CheckpointError(
                f"{file}: {size} bytes where DONE records {record['bytes']}: truncated or damaged"
            )
        if _sha256(file) != record["sha256"]:
            raise CheckpointError(f"{file}: sha256 differs from the one DONE records: corrupt")
    return manifest


def load_checkpoint(
    path: str | Path, *, model_only: bool = False, verify: bool = True
) -> Checkpoint:
    """Read a checkpoint verified against its DONE manifest (verify=False skips the sizes and
    hashes). `model_only` skips parsing trainer.pt (evaluation needs the weights alone)."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    elif not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    model = _read_model(path / MODEL_FILE)
    state: dict[str, Any] = {}
    if not model_only:
        file = path / STATE_FILE
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unpickling failure: damaged file or disallowed content
            raise CheckpointError(f"{file}: cannot be read: {type(exc).__name__}: {exc}") from None
    meta = _read_json(path / META_FILE)
    return Checkpoint(path=path, model=model, state=state, meta=meta)


def _read_model(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors' own error types vary across versions
        raise CheckpointError(f"{file}: cannot be read: {type(exc).__name__}: {exc}") from None
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    return tensors


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: cannot be read: {exc}") from None


# --- finding and pruning ----------------------------------------------------------------------


def list_checkpoints(root: str | Path) -> list[Path]:
    """The step-* directories under `root`, oldest first (unverified; `.tmp-*` ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def best_checkpoint(root: str | Path) -> Path | None:
    file = Path(root) / BEST_FILE
    if not file.is_file():
        return None
    return Path(root) / _read_json(file)["name"]


def resolve_checkpoint(target: str | Path, which: str = "latest") -> Path:
    """A checkpoint directory from a run directory (its latest or best checkpoint), a checkpoints
    folder, or a checkpoint directory itself."""
    target = Path(target)
    if (target / DONE_FILE).exists() or _STEP_DIR.match(target.name):
        return target
    root = target / "checkpoints" if (target / "checkpoints").is_dir() else target
    if which == "best":
        best = best_checkpoint(root)
        if best is None:
            raise CheckpointError(f"{root / BEST_FILE}: missing (no evaluation improved yet)")
        return best
    if which != "latest":
        raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
    found = list_checkpoints(root)
    if not found:
        raise CheckpointError(f"{target}: no checkpoint found (looked for {root}/step-*)")
    return found[-1]


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step checkpoints, never the best one; returns the
    deleted paths. keep_last=0 keeps everything."""
    if keep_last <= 0:
        return []
    best = best_checkpoint(root)
    doomed = [p for p in list_checkpoints(root)[:-keep_last] if p != best]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def remove_leftovers(root: str | Path) -> None:
    """Delete `.tmp-*` / `.old-*` directories left by a crash during a write."""
    root = Path(root)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith((".tmp-", ".old-")):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


# --- the random generators a checkpoint saves and a resume restores --------------------------

# numpy's legacy global generator on purpose (NPY002): it is the one user code and libraries draw
# from, so it is the one a resume must put back


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states as tensors and numbers (weights_only-safe)."""
    version, words, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return {
        "python": {
            "version": version,
            "words": torch.tensor(words, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    np_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002
    torch.manual_seed(seed)
