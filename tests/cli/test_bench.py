"""`perfml bench`: the table, the JSONL rows, plots, and the usage errors, through main(argv)."""

import json

import pytest
import torch

from perfml import cli
from tests.bench.helpers import TINY


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
    argv = ["bench", TINY, "--quick", "--device", "cpu", "--plot-dir", str(plots)]
    assert cli.main(argv) == 0
    names = sorted(p.name for p in plots.iterdir())
    assert names == [f"{TINY}-float32-fwd+bwd.png", f"{TINY}-float32-fwd.png"]
    assert all((plots / n).read_bytes().startswith(b"\x89PNG") for n in names)
    assert f"plot: {plots / names[0]}" in capsys.readouterr().err


def test_bench_plot_takes_no_folder_so_a_case_after_it_is_a_case(
    only_tiny, tmp_path, monkeypatch, capsys
):
    """`perfml bench --plot CASE` plots CASE into the default folder; it used to take CASE as
    the folder and run every case."""
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args(["bench", "--plot", TINY])
    assert args.cases == [TINY] and args.plot
    assert cli.main(["bench", "--plot", TINY, "--quick", "--device", "cpu"]) == 0
    plots = tmp_path / "bench-results" / "plots"
    assert sorted(p.name for p in plots.iterdir()) == [
        f"{TINY}-float32-fwd+bwd.png", f"{TINY}-float32-fwd.png",
    ]  # fmt: skip
    assert not (tmp_path / TINY).exists()


def test_bench_out_into_a_missing_folder_creates_it(only_tiny, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "bench.jsonl"
    assert cli.main(["bench", TINY, "--quick", "--device", "cpu", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 4
    assert "appended 4 rows" in capsys.readouterr().err


def test_bench_out_that_cannot_be_written_fails_before_measuring(only_tiny, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = ["bench", TINY, "--quick", "--device", "cpu"]
    assert cli.main([*argv, "--out", str(blocker / "bench.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"--out {blocker / 'bench.jsonl'}: cannot write" in err and "[1/" not in err
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


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
