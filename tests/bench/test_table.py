"""The printed table, rendered from result rows alone."""

import torch

from perfml import bench

CPU = torch.device("cpu")


def test_table_from_a_run(tiny):
    config = bench.RunConfig(CPU, quick=True, cpu_budget_s=0.005)
    text = bench.render_table(bench.run([tiny], config))
    lines = text.splitlines()
    assert lines[0].startswith("perfml bench  cpu: ")
    assert lines[1].startswith("ceilings (this run): copy ")
    assert "tiny_double  4x16  float32  fwd" in lines
    assert "tiny_double  4x16  float32  fwd+bwd" in lines
    header = next(line for line in lines if line.startswith("  impl "))
    for column in ("path", "ms", "GB/s", "% copy", "TFLOP/s", "perfml x"):
        assert column in header
    assert "peak MiB" not in header  # all None on CPU: the column is left out
    wrong = next(line for line in lines if line.startswith("  wrong "))
    assert "MISMATCH vs reference (max rel err 0.5)" in wrong
    raises = next(line for line in lines if line.startswith("  raises "))
    assert "error: RuntimeError: kernel exploded" in raises
    assert "not run: absent: not on this machine" in lines
    perfml = next(line for line in lines if line.startswith("  perfml "))
    assert perfml.split()[1] == "reference" and " 1.00" in perfml


def test_noisy_rows_are_marked(tiny):
    config = bench.RunConfig(CPU, quick=True, cpu_budget_s=0.005, modes=("fwd",), impls=("eager",))
    (row,) = bench.run([tiny], config)
    assert "noisy:" not in bench.render_table([{**row, "ms_min": row["ms"]}])
    noisy = bench.render_table([{**row, "ms_min": row["ms"] / 2}])
    assert f"noisy: fastest call {row['ms'] / 2:.4g} ms" in noisy


def test_table_without_rows():
    assert bench.render_table([]) == "no results"
