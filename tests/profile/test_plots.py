"""perfml.bench.plot (the per-op GB/s-vs-size plots of `perfml bench --plot`, and the style the
profiling report shares) on synthetic benchmark rows."""

import numpy as np
from matplotlib import image

from perfml.bench import plot


def _row(case, impl, shape, gbps, mode="fwd", **extra):
    row = {
        "case": case, "dtype": "bfloat16", "mode": mode, "impl": impl, "shape": list(shape),
        "bytes": 4 * shape[0] * shape[1], "gbps": gbps, "copy_gbps": 3000.0, "card": "H200",
        "mismatch": False, "error": None, "skipped": None,
    }  # fmt: skip
    row.update(extra)
    return row


def test_one_png_per_case_dtype_and_mode(tmp_path):
    rows = [
        _row("rms_norm", impl, shape, gbps)
        for impl, scale in (("eager", 1.0), ("perfml", 2.0))
        for shape, gbps in (((1024, 1024), 900 * scale), ((4096, 4096), 1200 * scale))
    ]
    rows += [
        _row("rms_norm", "eager", (1024, 1024), 500.0, mode="fwd+bwd"),
        _row("rms_norm", "liger", (1024, 1024), None, error="RuntimeError: boom"),
        # a case whose only rows are wrong or skipped gets no plot
        _row("softmax", "perfml", (1024, 1024), 5000.0, mismatch=True),
        _row("softmax", "liger", (1024, 1024), None, skipped="not installed"),
    ]
    paths = plot.plot_rows(rows, tmp_path / "plots")
    assert sorted(p.name for p in paths) == [
        "rms_norm-bfloat16-fwd+bwd.png",
        "rms_norm-bfloat16-fwd.png",
    ]
    pixels = image.imread(str(tmp_path / "plots" / "rms_norm-bfloat16-fwd.png"))
    rgb = (pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 50  # lines, labels, the ceiling: not an empty canvas
    # perfml's line is drawn in its own color
    green = np.array([0x1B, 0x9E, 0x77])
    assert (np.abs(rgb.astype(int) - green).sum(axis=1) < 30).sum() > 50


def test_nothing_to_plot_writes_nothing(tmp_path):
    rows = [_row("softmax", "perfml", (8, 8), None, error="x")]
    assert plot.plot_rows(rows, tmp_path / "plots") == []
    assert not (tmp_path / "plots").exists()
