"""`perfml bench`: the table, the JSONL rows, plots, and the usage errors, through main(argv)."""

import json
import time
from dataclasses import replace

import pytest
import torch

from perfml import _backend, bench, cli
from perfml.bench import registry
from tests.bench.helpers import TINY, tiny_case


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


def _rms_norm_with(monkeypatch, name, make):
    """The real rms_norm case with one more impl, registered for the test's duration; perfml on
    its CPU path (the tests run Triton in interpret mode, which plain perfml would pick)."""
    monkeypatch.setenv("PERFML_BACKEND", "cpp" if _backend.has_extension() else "reference")
    case = bench.get_case("rms_norm")
    extra = bench.Impl(name, make=make)
    monkeypatch.setitem(registry._CASES, "rms_norm", replace(case, impls=(*case.impls, extra)))
    return case


GATE_ARGV = ["bench", "rms_norm", "--device", "cpu", "--quick", "--modes", "fwd",
             "--shapes", "32x256", "--impls", "eager"]  # fmt: skip


def test_gate_passes_against_a_slower_impl(monkeypatch, capsys):
    case = _rms_norm_with(monkeypatch, "sleepy", lambda: _sleepy(case.reference))
    assert cli.main([*GATE_ARGV, "--fail-if-slower-than", "sleepy"]) == 0
    out = capsys.readouterr().out
    assert "  perfml " in out  # --impls eager: the gate still measures perfml and sleepy
    row = next(line for line in out.splitlines() if " ms  sleepy " in line)
    assert row.strip().startswith("rms_norm 32x256 float32 fwd") and row.endswith("ok")
    assert out.rstrip().endswith("gate: 1 row compared, 0 slower than sleepy")


def test_gate_fails_naming_the_row_against_a_faster_impl(monkeypatch, capsys):
    case = _rms_norm_with(monkeypatch, "cached", lambda: _cached(case.reference))
    assert cli.main([*GATE_ARGV, "--fail-if-slower-than", "cached:1.5"]) == 1
    out = capsys.readouterr().out
    assert "rms_norm  32x256  float32  fwd" in out  # the table is printed first
    last = out.rstrip().splitlines()[-1]
    assert last.startswith(
        "gate: FAILED: 1 row slower than cached by more than 1.5x: rms_norm 32x256 float32 fwd ("
    )
    assert "SLOWER (limit 1.50)" in out and "IQR" in out


def test_gate_rows_where_the_impl_did_not_run_are_not_compared(only_tiny, capsys):
    argv = ["bench", TINY, "tiny_absent", "--quick", "--device", "cpu", "--modes", "fwd"]
    bench.register(replace(tiny_case("eager", "perfml", "absent"), name="tiny_absent"))
    assert cli.main([*argv, "--fail-if-slower-than", "absent"]) == 0
    out = capsys.readouterr().out
    assert f"{TINY} 4x16 float32 fwd  vs absent: not compared (no absent impl in this run)" in out
    assert "vs absent: not compared (absent: not on this machine)" in out
    assert out.rstrip().endswith("gate: 0 rows compared, 0 slower than absent, 2 not compared")


def test_gate_with_an_impl_no_case_has_exits_2_listing_the_known_ones(only_tiny, capsys):
    assert cli.main(["bench", "--device", "cpu", "--fail-if-slower-than", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--fail-if-slower-than nope: unknown impl; known impls: eager" in err
    assert "[1/" not in err  # refused before anything was measured


@pytest.mark.parametrize("bad", ["eager:abc", "eager:0", "eager:-1", "eager:", "eager:nan", ":2",
                                 "perfml"])  # fmt: skip
def test_gate_with_a_bad_ratio_is_a_usage_error(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--device", "cpu", "--fail-if-slower-than", bad])
    assert exit_info.value.code == 2
    assert "--fail-if-slower-than" in capsys.readouterr().err


def test_gate_with_one_impl_twice_is_a_usage_error(only_tiny, capsys):
    argv = ["bench", "--device", "cpu", "--fail-if-slower-than", "eager"]
    assert cli.main([*argv, "--fail-if-slower-than", "eager:1.2"]) == 2
    assert "--fail-if-slower-than eager: given more than once" in capsys.readouterr().err


def _sleepy(reference):
    def call(x, weight):
        time.sleep(0.002)
        return reference(x, weight)

    return call


def _cached(reference):
    answers = {}

    def call(x, weight):  # the right answer without computing it: faster than any kernel
        if "y" not in answers:
            answers["y"] = reference(x, weight)
        return answers["y"]

    return call
