"""Shared setup of the trainer tests: a small fixed corpus, a private token cache, and a model
small enough that a training step takes milliseconds on a CPU."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from perfml.train import TrainConfig

# a few standard-library modules: real text, fixed for a given Python, ~100 KB
_CORPUS_MODULES = (
    "json/decoder.py",
    "json/encoder.py",
    "textwrap.py",
    "bisect.py",
    "heapq.py",
    "fnmatch.py",
    "colorsys.py",
    "keyword.py",
)

SMALL_MODEL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_layers": 2,
    "num_heads": 2,
    "num_kv_heads": 1,
    "max_seq_len": 64,
}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the test model's matmuls are too small to share, and spinning
    OpenMP workers on a busy machine cost seconds per step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join((stdlib / name).read_text() for name in _CORPUS_MODULES))
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_config(tmp_path, corpus_file, cache_dir):
    """make_config(name, **overrides): a fast TrainConfig whose run directory is tmp_path/name."""

    def make(name: str = "run", **overrides) -> TrainConfig:
        values = dict(
            model="tiny",
            model_args=SMALL_MODEL,
            fused=False,
            data=str(corpus_file),
            cache_dir=str(cache_dir),
            seq_len=16,
            batch_size=4,
            max_steps=8,
            lr=3e-3,
            warmup_steps=2,
            precision="fp32",
            device="cpu",
            eval_every=4,
            eval_batches=2,
            ckpt_every=4,
            progress=False,
            out_dir=str(tmp_path / name),
        )
        values.update(overrides)
        return TrainConfig(**values)

    return make


def read_rows(run_dir: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["split"] == split]


def subprocess_env() -> dict[str, str]:
    """The environment of a `python -m perfml` child: the repository importable, the Triton
    interpreter off (CPU ops take their C++/reference paths, as for a user)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"  # as the tests' own process (see _one_thread)
    return env


def perfml_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "perfml", *args]


def config_args(config: TrainConfig) -> list[str]:
    """`--set` arguments reproducing `config` on a command line."""
    out = []
    for key, value in config.to_dict().items():
        text = (
            json.dumps(value) if isinstance(value, (dict, list, bool)) or value is None else value
        )
        out += ["--set", f"{key}={text}"]
    return out
