"""One tiny training run for the tests that need a real run directory (the model commands, the
server): a few standard-library modules as the corpus, one intra-op thread, seconds of CPU."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import torch


def train_tiny_run(
    root: Path, sources: tuple[str, ...], model_args: dict[str, int], **settings: Any
) -> Path:
    """Train the tiny preset with `model_args` on the standard-library `sources` into root/run
    (fp32, CPU, no progress bar; `settings` are the other TrainConfig keys); returns root/run."""
    from perfml.train import TrainConfig, Trainer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join((stdlib / name).read_text() for name in sources))
    config = TrainConfig(
        model="tiny",
        model_args=model_args,
        fused=False,
        data=str(corpus),
        cache_dir=str(root / "cache"),
        precision="fp32",
        device="cpu",
        progress=False,
        out_dir=str(root / "run"),
        **settings,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(config).fit()
    finally:
        torch.set_num_threads(threads)
    return root / "run"
