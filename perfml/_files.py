"""Writing outputs so that a failure leaves nothing half made, with ordinary file modes.

staged_output(dest) yields a hidden temporary directory next to `dest` (same filesystem); the
caller writes there, and on success the result is renamed into place: the directory itself when
`dest` is a directory output, or each file written into it when `dest` is a file output (an ONNX
model and its `.data` file). On any error the temporary directory is removed and `dest` is as it
was. An existing `dest` is refused unless overwrite=True, and then replaced only once the new
output is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


class OutputExistsError(FileExistsError):
    """The output path exists and overwrite was not asked for."""


def default_mode(path: str | Path) -> None:
    """Give `path` the mode a plain open() would (0666 less the umask): some writers (safetensors)
    create their files 0600."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def check_output(dest: str | Path, *, overwrite: bool, what: str = "--out") -> Path:
    """`dest` as a Path; an OutputExistsError when it exists and overwrite is False."""
    dest = Path(dest)
    if (dest.exists() or dest.is_symlink()) and not overwrite:
        raise OutputExistsError(
            f"{what} {dest}: already exists; choose another path or pass --overwrite to replace it"
        )
    return dest


@contextlib.contextmanager
def staged_output(dest: str | Path, *, overwrite: bool, is_dir: bool = True) -> Iterator[Path]:
    """A temporary directory next to `dest` to write the output into; renamed into place (a
    directory output) or emptied into dest's folder (a file output: write `tmp / dest.name` and
    any sibling files) when the block ends without an error."""
    dest = check_output(dest, overwrite=overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if is_dir:
            _replace(tmp, dest)
        else:
            for item in sorted(tmp.iterdir()):
                _replace(item, dest.parent / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(src: Path, dest: Path) -> None:
    """Rename src to dest; an existing dest is moved aside first and removed after."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.parent / f".old-{dest.name}-{os.getpid()}"
        os.rename(dest, old)
    try:
        os.rename(src, dest)
    except BaseException:
        if old is not None:
            os.rename(old, dest)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
