"""Local text corpora: the default one (this Python's standard-library sources), any text file,
or every text file under a folder; each with a fingerprint that names its exact content.

The default corpus needs no network and exists on every machine: the `*.py` files of the running
interpreter's standard library (about 9 MB for CPython 3.11), minus site-packages, test suites and
the few directories that are data more than code (encodings' codec tables, the IDLE and turtle
demos, lib2to3's fixtures). Different Python versions give different corpora, and the fingerprint
says so.

Fingerprint: sha256 over, per file in order, its name relative to the corpus root, its size and
the sha256 of its bytes. A copy of the same files elsewhere has the same fingerprint; any edit,
rename, addition or reordering changes it. Hashing reads every byte once (~0.1 s for the default
corpus), which is why the fingerprint is computed from contents rather than timestamps.

Files are decoded as UTF-8; undecodable bytes become U+FFFD rather than stopping a run. In a
folder, files that are not text (a NUL byte in the first 8 KiB, or not valid UTF-8 there) and
hidden files and folders are skipped.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

_FINGERPRINT_VERSION = b"perfml-corpus-v1"
_SNIFF_BYTES = 8192
# stdlib directories left out of the default corpus: installed packages, tests, and data
_STDLIB_SKIP = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "encodings",
    }
)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def default_corpus_files() -> list[Path]:
    """The running Python's standard-library `*.py` files, sorted by relative path."""
    root = stdlib_dir()
    files = [
        path
        for path in root.rglob("*.py")
        if not _STDLIB_SKIP.intersection(path.relative_to(root).parts[:-1]) and path.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _common_root(files: Sequence[Path]) -> Path:
    if not files:
        return Path(".")
    return Path(os.path.commonpath([str(Path(f).resolve().parent) for f in files]))


def corpus_fingerprint(files: Sequence[Path], root: Path | None = None) -> str:
    """sha256 hex digest of the files' names (relative to `root`, by default their common
    folder), sizes and contents, in the order given."""
    root = _common_root(files) if root is None else Path(root).resolve()
    digest = hashlib.sha256(_FINGERPRINT_VERSION)
    for f in files:
        data = Path(f).read_bytes()
        name = Path(f).resolve().relative_to(root).as_posix()
        digest.update(f"\0{name}\0{len(data)}\0".encode())
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


@dataclass(frozen=True)
class Corpus:
    """A list of text files read as documents.

    source: what was asked for ("stdlib" or the path as given); root: the folder names are
    relative to; files: sorted; fingerprint: see corpus_fingerprint.
    """

    source: str
    root: Path
    files: tuple[Path, ...]
    fingerprint: str

    def documents(self) -> Iterator[str]:
        """Each file's text, in order."""
        for f in self.files:
            yield f.read_bytes().decode("utf-8", errors="replace")

    @cached_property
    def text(self) -> str:
        """All documents, separated by a blank line."""
        return "\n\n".join(self.documents())

    @property
    def num_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def describe(self) -> dict[str, object]:
        """JSON-ready record of the corpus for a run's metadata."""
        return {
            "source": self.source,
            "files": len(self.files),
            "bytes": self.num_bytes,
            "fingerprint": self.fingerprint,
        }


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # a multi-byte character cut by the sniff window is still text
        return exc.start >= len(head) - 3 and exc.reason == "unexpected end of data"
    return True


def _folder_files(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_file() and _is_text(path):
                files.append(path)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def load_corpus(source: str | Path | None = None) -> Corpus:
    """None: the standard-library corpus; a path: that text file, or every text file under that
    folder (sorted by relative path). A missing path raises FileNotFoundError naming it; a
    folder without text files raises ValueError."""
    if source is None:
        root = stdlib_dir()
        files = default_corpus_files()
        return Corpus("stdlib", root, tuple(files), corpus_fingerprint(files, root))
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus path {str(source)!r} does not exist")
    path = path.resolve()
    if path.is_dir():
        root, files = path, _folder_files(path)
        if not files:
            raise ValueError(f"corpus folder {str(source)!r} contains no text files")
    else:
        root, files = path.parent, [path]
    return Corpus(str(source), root, tuple(files), corpus_fingerprint(files, root))
