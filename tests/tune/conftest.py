"""Shared setup of the tune tests: the trainer tests' corpus, token cache and small model, and a
micro config file (6 steps, an evaluation every 2) with a `tune:` block."""

from pathlib import Path

import pytest
import yaml

from tests.train.conftest import (  # noqa: F401  (fixtures)
    SMALL_MODEL,
    _one_thread,
    cache_dir,
    corpus_file,
    perfml_command,
    subprocess_env,
)

LR_SPACE = {"lr": {"type": "loguniform", "low": 1.0e-5, "high": 1.0}}


@pytest.fixture
def write_config(tmp_path, corpus_file, cache_dir):  # noqa: F811
    """write_config(tune, name="micro", **overrides) -> the path of a micro config with that
    tune: block (None: no block)."""

    def write(tune, name: str = "micro", **overrides) -> Path:
        values = dict(
            model="tiny",
            model_args=SMALL_MODEL,
            fused=False,
            data=str(corpus_file),
            cache_dir=str(cache_dir),
            seq_len=16,
            batch_size=4,
            max_steps=6,
            lr=3e-3,
            warmup_steps=1,
            precision="fp32",
            device="cpu",
            eval_every=2,
            eval_batches=2,
            ckpt_every=0,
            keep_last=1,
            progress=False,
            out_dir=str(tmp_path / "unused"),
        )
        values.update(overrides)
        if tune is not None:
            values["tune"] = tune
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        return path

    return write


def storage_of(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


def load_study(out: Path, name: str = "micro"):
    import optuna

    return optuna.load_study(study_name=name, storage=storage_of(out))
