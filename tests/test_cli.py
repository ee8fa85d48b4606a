"""The `perfml` command: bench, demo, errors and exit codes, driven through main(argv)."""

import json

import pytest
import torch

from perfml import bench, cli
from perfml.bench import registry
from tests.bench.helpers import TINY, tiny_case


@pytest.fixture
def only_tiny(monkeypatch):
    """A registry holding just the tiny test case (commands that run every case stay fast)."""
    monkeypatch.setattr(registry, "_CASES", {})
    monkeypatch.setattr(registry, "_builtins_loaded", True)
    bench.register(tiny_case("eager", "perfml"))


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("bench", "demo", "train", "eval"))


def test_bench_quick_writes_jsonl_and_prints_the_table(only_tiny, tmp_path, capsys):
    out = tmp_path / "f.jsonl"
    code = cli.main(["bench", TINY, "--quick", "--device", "cpu", "--out", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["impl"], r["mode"]) for r in rows} == {
        ("eager", "fwd"), ("perfml", "fwd"), ("eager", "fwd+bwd"), ("perfml", "fwd+bwd"),
    }  # fmt: skip
    assert all(r["ms"] > 0 and r["mismatch"] is False for r in rows)
    captured = capsys.readouterr()
    assert f"{TINY}  4x16  float32  fwd" in captured.out
    assert "[4/4]" in captured.err and "appended 4 rows" in captured.err


def test_bench_options_reach_the_run(only_tiny, capsys):
    argv = ["bench", "--device", "cpu", "--quick", "--modes", "fwd", "--impls", "eager",
            "--shapes", "2x8,3x8"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"{TINY}  2x8  float32  fwd" in out and f"{TINY}  3x8  float32  fwd" in out
    assert "fwd+bwd" not in out and "  perfml " not in out


def test_bench_plot_writes_one_png_per_case_and_mode(only_tiny, tmp_path, capsys):
    plots = tmp_path / "plots"
    argv = ["bench", TINY, "--quick", "--device", "cpu", "--plot", str(plots)]
    assert cli.main(argv) == 0
    names = sorted(p.name for p in plots.iterdir())
    assert names == [f"{TINY}-float32-fwd+bwd.png", f"{TINY}-float32-fwd.png"]
    assert all((plots / n).read_bytes().startswith(b"\x89PNG") for n in names)
    assert f"plot: {plots / names[0]}" in capsys.readouterr().err


def test_unknown_case_exits_2_listing_known_cases(capsys):
    assert cli.main(["bench", "no_such_case", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark case 'no_such_case'" in err and "rms_norm" in err


def test_unknown_impl_exits_2(only_tiny, capsys):
    assert cli.main(["bench", "--device", "cpu", "--impls", "nope"]) == 2
    assert "unknown impl 'nope'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a CUDA device")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    assert cli.main(["bench", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA device is available" in err


def test_bad_shapes_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--shapes", "4096xabc"])
    assert exit_info.value.code == 2
    assert "shapes look like" in capsys.readouterr().err


def test_list(capsys):
    assert cli.main(["bench", "--list", "--device", "cpu"]) == 0
    assert "rms_norm" in capsys.readouterr().out


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
    return run_dir, ["demo", "--device", "cpu", "--out-dir", str(run_dir)] + [
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
