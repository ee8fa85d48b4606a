"""The lineage tests open the small trained run of the command-line tests, and a chain made
from it once per session: run -> prune (magnitude) -> quantize (int8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.conftest import run_dir  # noqa: F401  (the session's trained run)


@pytest.fixture(scope="session")
def chain_dirs(run_dir, tmp_path_factory) -> tuple[Path, Path, Path]:  # noqa: F811
    """(run, pruned model directory, its quantized model directory)."""
    from perfml import cli

    root = tmp_path_factory.mktemp("chain")
    pruned, quantized = root / "pruned", root / "quantized"
    args = ["--device", "cpu", "--batches", "1"]
    assert (
        cli.main(["prune", str(run_dir), "--method", "magnitude", "--out", str(pruned), *args]) == 0
    )
    assert (
        cli.main(["quantize", str(pruned), "--method", "int8", "--out", str(quantized), *args]) == 0
    )
    return run_dir, pruned, quantized
