"""The on-disk cache of trained tokenizers and token streams, keyed by content fingerprints.

Location: $PERFML_CACHE_DIR, else $XDG_CACHE_HOME/perfml, else ~/.cache/perfml. Entries are
written to a temporary file in the same folder and renamed into place, so a reader (another
process, a rerun after a crash) sees a complete entry or none.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def default_cache_dir() -> Path:
    env = os.environ.get("PERFML_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "perfml"


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    path = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, fsync it and rename it
    to `path`; when it fails, remove it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
