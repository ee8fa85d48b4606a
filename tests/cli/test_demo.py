"""`perfml demo`: the tiny run, its sample, then (--bench) the table, through main(argv)."""

import pytest
import torch

from perfml import cli
from tests.bench.helpers import TINY


@pytest.fixture
def demo_args(tmp_path):
    """A demo run shrunk to seconds: a small corpus, a small model, two steps, plain PyTorch."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n\n" * 400)
    model = "{hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2, num_kv_heads: 1}"
    settings = [f"data={corpus}", f"cache_dir={tmp_path / 'cache'}", f"model_args={model}",
                "fused=false", "seq_len=16", "batch_size=2", "max_steps=2", "eval_every=1",
                "eval_batches=1", "progress=false"]  # fmt: skip
    run_dir = tmp_path / "demo"
    return run_dir, ["demo", "--device", "cpu", "--out", str(run_dir)] + [
        arg for setting in settings for arg in ("--set", setting)
    ]


def test_demo_trains_then_prints_the_table(only_tiny, demo_args, capsys):
    run_dir, argv = demo_args
    assert cli.main([*argv, "--bench"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("perfml demo: training the tiny Llama preset")
    assert f"run directory    {run_dir}" in out and "sample: 'def " in out
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "tensorboard"):
        assert str(run_dir / name) in out and (run_dir / name).exists()
    assert f"perfml eval {run_dir}" in out
    assert out.index("sample:") < out.index(f"{TINY}  4x16  float32  fwd+bwd")


def test_demo_without_the_benchmark(only_tiny, demo_args, capsys):
    _, argv = demo_args
    threads = torch.get_num_threads()
    assert cli.main([*argv, "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads  # the demo's thread count is its own
    out = capsys.readouterr().out
    assert "sample: " in out and TINY not in out and "perfml demo --bench" in out


def test_demo_bad_setting_exits_2(capsys):
    assert cli.main(["demo", "--device", "cpu", "--set", "max_steps=-3"]) == 2
    assert "max_steps must be >= 1, got -3" in capsys.readouterr().err


def test_demo_out_dir_is_a_deprecated_alias_of_out(demo_args, capsys):
    run_dir, argv = demo_args
    old = [a if a != "--out" else "--out-dir" for a in argv]
    args = cli.build_parser().parse_args(old)
    assert args.out_dir == str(run_dir) and args.out is None
    assert cli.main([*argv, "--out-dir", str(run_dir.parent / "other")]) == 2
    assert "--out-dir is the old name of --out" in capsys.readouterr().err
