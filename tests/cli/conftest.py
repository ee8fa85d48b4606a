"""Shared setup of the command-line tests: a registry holding one tiny benchmark case, and a
small trained run (a few seconds of CPU) that the model commands open."""

from __future__ import annotations

from pathlib import Path

import pytest

from perfml import bench
from perfml.bench import registry
from tests.bench.helpers import tiny_case
from tests.tiny_run import train_tiny_run


@pytest.fixture
def only_tiny(monkeypatch):
    """A registry holding just the tiny test case (commands that run every case stay fast)."""
    monkeypatch.setattr(registry, "_CASES", {})
    monkeypatch.setattr(registry, "_builtins_loaded", True)
    bench.register(tiny_case("eager", "perfml"))


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A run directory of a 2-layer model trained 6 steps (one checkpoint, step-00000006)."""
    return train_tiny_run(
        tmp_path_factory.mktemp("qrun"),
        ("textwrap.py", "bisect.py"),
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "max_seq_len": 64,
        },
        seq_len=16,
        batch_size=4,
        max_steps=6,
        lr=3e-3,
        warmup_steps=1,
        eval_every=6,
        eval_batches=2,
        ckpt_every=6,
    )
