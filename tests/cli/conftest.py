"""Shared setup of the command-line tests: a registry holding one tiny benchmark case, and a
small trained run (a few seconds of CPU) that the model commands open."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from perfml import bench
from perfml.bench import registry
from tests.bench.helpers import tiny_case


@pytest.fixture
def only_tiny(monkeypatch):
    """A registry holding just the tiny test case (commands that run every case stay fast)."""
    monkeypatch.setattr(registry, "_CASES", {})
    monkeypatch.setattr(registry, "_builtins_loaded", True)
    bench.register(tiny_case("eager", "perfml"))


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A run directory of a 2-layer model trained 6 steps (one checkpoint, step-00000006)."""
    from perfml.train import TrainConfig, Trainer

    root = tmp_path_factory.mktemp("qrun")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join((stdlib / n).read_text() for n in ("textwrap.py", "bisect.py")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = TrainConfig(
        model="tiny",
        model_args={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "max_seq_len": 64,
        },
        fused=False,
        data=str(corpus),
        cache_dir=str(root / "cache"),
        seq_len=16,
        batch_size=4,
        max_steps=6,
        lr=3e-3,
        warmup_steps=1,
        precision="fp32",
        device="cpu",
        eval_every=6,
        eval_batches=2,
        ckpt_every=6,
        progress=False,
        out_dir=str(root / "run"),
    )
    try:
        Trainer(config).fit()
    finally:
        torch.set_num_threads(threads)
    return root / "run"
