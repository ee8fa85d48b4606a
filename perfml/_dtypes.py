"""The one map of the dtype names that configs and the command line use: fp32, bf16, fp16.

Importing this module imports no torch (the `perfml` command builds its parsers from DTYPE_NAMES
before any command runs); torch_dtype() and torch_dtypes() resolve the names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("fp32", "bf16", "fp16")
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of `name` (fp32, bf16 or fp16); a ValueError naming them otherwise."""
    if name not in _TORCH_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}; got {name!r}")
    import torch

    return getattr(torch, _TORCH_NAMES[name])


def torch_dtypes() -> dict[str, torch.dtype]:
    """{name: torch dtype} for every name of DTYPE_NAMES."""
    return {name: torch_dtype(name) for name in DTYPE_NAMES}
