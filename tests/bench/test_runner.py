"""The runner end to end on CPU: rows, JSONL, the correctness guard, errors and skips."""

import json

import pytest
import torch

from perfml import bench
from perfml.bench.timing import CpuTimer
from tests.bench.helpers import TINY, tiny_bytes, tiny_case

CPU = torch.device("cpu")
QUICK = bench.RunConfig(CPU, quick=True, cpu_budget_s=0.005)

REQUIRED = {
    # meta, on every row
    "schema", "run_id", "time", "device", "card", "torch", "triton", "perfml", "commit", "dirty",
    "python", "interpret", "copy_gbps", "copy_method", "copy_mib", "cache_mib",
    "matmul_bf16_tflops", "matmul_fp32_tflops", "matmul_n",
    # what was measured
    "case", "family", "shape", "dtype", "mode", "impl", "path",
    # results
    "ms", "ms_min", "reps", "bytes", "gbps", "pct_of_copy", "cache_resident", "flops", "tflops",
    "pct_of_matmul",
    "speedup_perfml", "tokens_per_s", "baseline", "speedup_vs_baseline", "peak_mib", "mismatch",
    "max_rel_err", "error", "skipped",
}  # fmt: skip


def _by_impl(rows, mode):
    return {r["impl"]: r for r in rows if r["mode"] == mode}


def test_run_writes_jsonl_rows_with_every_field(tiny, tmp_path):
    out = tmp_path / "results.jsonl"
    rows = bench.run([tiny], QUICK, out=out)
    lines = out.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    assert parsed == rows
    # 6 impls (one unavailable) x 2 modes, one quick shape, one dtype
    assert len(parsed) == 12
    for row in parsed:
        assert set(row) == REQUIRED, set(row) ^ REQUIRED
        assert row["case"] == TINY and row["shape"] == [4, 16] and row["dtype"] == "float32"
        assert row["device"] == "cpu" and row["peak_mib"] is None  # no honest CPU peak
        assert row["copy_gbps"] > 0 and row["matmul_fp32_tflops"] > 0
    fwd = _by_impl(parsed, "fwd")
    good = fwd["eager"]
    assert good["ms"] > 0 and good["reps"] >= 3 and good["ms_min"] <= good["ms"]
    assert good["mismatch"] is False and good["max_rel_err"] == 0.0 and good["error"] is None
    assert good["bytes"] == tiny_bytes((4, 16), torch.float32, "fwd")
    assert good["gbps"] == pytest.approx(good["bytes"] / good["ms"] / 1e6)
    assert good["pct_of_copy"] == pytest.approx(100 * good["gbps"] / good["copy_gbps"])
    assert good["tflops"] == pytest.approx(64 / good["ms"] / 1e9)
    assert good["speedup_perfml"] == pytest.approx(good["ms"] / fwd["perfml"]["ms"])
    assert fwd["perfml"]["speedup_perfml"] == 1.0 and fwd["perfml"]["path"] == "reference"


def test_jsonl_appends_runs(tiny, tmp_path):
    out = tmp_path / "results.jsonl"
    config = bench.RunConfig(CPU, quick=True, cpu_budget_s=0.005, modes=("fwd",), impls=("eager",))
    bench.run([tiny], config, out=out)
    bench.run([tiny], config, out=out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["run_id"] != rows[1]["run_id"]


def test_wrong_answers_are_flagged_and_never_get_a_speedup(tiny):
    rows = bench.run([tiny], QUICK)
    fwd, both = _by_impl(rows, "fwd"), _by_impl(rows, "fwd+bwd")
    assert fwd["wrong"]["mismatch"] is True and fwd["wrong"]["max_rel_err"] == pytest.approx(0.5)
    assert fwd["wrong"]["speedup_perfml"] is None
    # right forward, wrong gradient: passes fwd, flagged in fwd+bwd
    assert fwd["wrong-grad"]["mismatch"] is False
    assert both["wrong-grad"]["mismatch"] is True
    assert both["eager"]["mismatch"] is False


def test_failures_and_unavailable_impls_become_rows(tiny):
    rows = bench.run([tiny], QUICK)
    fwd = _by_impl(rows, "fwd")
    assert fwd["raises"]["error"] == "RuntimeError: kernel exploded"
    assert fwd["raises"]["ms"] is None and fwd["raises"]["mismatch"] is None
    assert fwd["absent"]["skipped"] == "not on this machine" and fwd["absent"]["ms"] is None


def test_filters_and_validation(tiny):
    config = bench.RunConfig(CPU, quick=True, cpu_budget_s=0.005, modes=("fwd+bwd",),
                             impls=("eager", "perfml"), shapes=((2, 3),))  # fmt: skip
    rows = bench.run([tiny], config)
    assert [(r["impl"], r["mode"], r["shape"]) for r in rows] == [
        ("eager", "fwd+bwd", [2, 3]),
        ("perfml", "fwd+bwd", [2, 3]),
    ]
    with pytest.raises(ValueError, match="unknown impl 'nope'.*known impls: .*eager"):
        bench.run([tiny], bench.RunConfig(CPU, impls=("nope",)))
    with pytest.raises(ValueError, match="unknown mode 'bwd'"):
        bench.run([tiny], bench.RunConfig(CPU, modes=("bwd",)))


def test_bad_shape_override_gives_error_rows(tiny):
    config = bench.RunConfig(CPU, quick=True, cpu_budget_s=0.005, modes=("fwd",),
                             impls=("eager",), shapes=((5,),))  # fmt: skip
    (row,) = bench.run([tiny], config)
    assert row["error"].startswith("making the inputs failed")


def test_rms_norm_case_runs_and_matches(tmp_path):
    # the real case at a tiny size, every impl this machine has except torch.compile (slow)
    case = bench.get_case("rms_norm")
    names = tuple(i.name for i in case.impls if i.name != "compile")
    config = bench.RunConfig(CPU, quick=True, cpu_budget_s=0.005, shapes=((8, 64),), impls=names)
    rows = [r for r in bench.run([case], config) if not r["skipped"]]
    assert {r["impl"] for r in rows} >= {"eager", "torch", "perfml", "reference"}
    for row in rows:
        assert row["error"] is None, row
        assert row["mismatch"] is False, row
        assert row["speedup_perfml"] > 0


def test_cpu_timer_spends_its_budget_and_clears_grads():
    leaf = torch.ones(3, requires_grad=True)
    seen = []

    def step():
        seen.append(leaf.grad)
        (leaf * 2).sum().backward()

    timing = CpuTimer(budget_s=0.01).time(step, [leaf])
    assert timing.reps >= 3 and 0 < timing.ms_min <= timing.ms
    assert all(g is None for g in seen)  # every call started without a gradient


def test_tokens_per_s_and_baseline_speedups():
    """A case with `tokens` gets tokens/s; with `baseline`, every matching row gets baseline ms /
    its ms, and a wrong row gets none."""
    import dataclasses

    case = dataclasses.replace(
        tiny_case("eager", "perfml", "wrong"),
        name="tiny_tokens",
        tokens=lambda shape: shape[0] * 3,
        baseline="eager",
        modes=("fwd",),
    )
    bench.register(case)
    try:
        rows = bench.run([case], QUICK)
    finally:
        bench.unregister("tiny_tokens")
    by = {r["impl"]: r for r in rows}
    for row in by.values():
        assert row["baseline"] == "eager"
        assert row["tokens_per_s"] == pytest.approx(4 * 3 / row["ms"] * 1e3)
    assert by["eager"]["speedup_vs_baseline"] == 1.0
    assert by["perfml"]["speedup_vs_baseline"] == pytest.approx(
        by["eager"]["ms"] / by["perfml"]["ms"]
    )
    assert by["wrong"]["speedup_vs_baseline"] is None
    table = bench.render_table(rows)
    assert "tokens/s" in table and "x baseline" in table and "faster than eager" in table


def test_baseline_must_be_an_impl():
    import dataclasses

    case = dataclasses.replace(tiny_case("eager"), name="tiny_nobase", baseline="nope")
    with pytest.raises(ValueError, match="baseline 'nope' is not one of its impls"):
        bench.register(case)
