"""`perfml quantize` / `perfml prune` on a small trained run: a new model directory that loads,
with perplexity before and after in its report."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from perfml import cli
from perfml.quant import model_dir
from perfml.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
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


@pytest.mark.parametrize(
    "command,extra",
    [
        ("quantize", ["--method", "int8"]),
        ("quantize", ["--method", "int4", "--group-size", "32"]),
        ("prune", ["--method", "structured", "--head-amount", "0.5"]),
        ("prune", ["--method", "2:4"]),
    ],
)
def test_command_writes_a_loadable_model_dir_with_perplexity(
    run_dir, tmp_path, command, extra, capsys
):
    out = tmp_path / "out"
    assert cli.main([command, str(run_dir), *extra, "--out", str(out), "--device", "cpu"]) == 0
    assert "perplexity" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["ppl"] > 1 and report["after"]["ppl"] > 1
    if command == "quantize":
        assert report["weight_bytes_after"] < report["weight_bytes_before"]
        assert abs(report["after"]["val_loss"] - report["before"]["val_loss"]) < 0.1
    model = model_dir.load_model_dir(out)
    ids = torch.randint(0, 257, (1, 8))
    assert torch.isfinite(model(ids)).all()


def test_bad_method_argument_is_usage_error(run_dir, capsys):
    assert cli.main(["quantize", str(run_dir), "--method", "int4", "--group-size", "48"]) == 2
    assert "group_size" in capsys.readouterr().err
