"""perfml's version: the one literal lives in pyproject.toml; this reads the installed metadata."""

from __future__ import annotations

from importlib import metadata

UNKNOWN = "0+unknown"


def _installed_version(distribution: str = "perfml") -> str:
    """The version of the installed distribution, or UNKNOWN when it is not installed (a source
    tree on PYTHONPATH, e.g. on a machine where nothing can be installed)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return UNKNOWN


__version__ = _installed_version()
