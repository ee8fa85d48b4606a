"""metrics.jsonl rows (non-finite values, truncation on resume, torn lines) and the loss curve."""

import json
import math

import matplotlib

from perfml.train.loggers import JSONLLogger, plot_loss_curve, read_metrics, truncate_metrics


def rows(n):
    train = [{"split": "train", "step": s, "loss": 5.0 / s} for s in range(1, n + 1)]
    return train + [{"split": "val", "step": n, "loss": 1.0, "ppl": math.e}]


def test_non_finite_values_are_written_as_null(tmp_path):
    logger = JSONLLogger(tmp_path / "m.jsonl")
    logger.log({"split": "train", "step": 1, "loss": float("nan"), "grad_norm": float("inf")})
    logger.log({"split": "train", "step": 2, "loss": 1.5, "grad_norm": 0.5})
    logger.close()
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"split": "train", "step": 1, "loss": None, "grad_norm": None}
    assert "NaN" not in lines[0] and "Infinity" not in lines[0]
    plot_loss_curve(tmp_path / "m.jsonl", tmp_path / "loss.png")  # null losses are skipped
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_truncates_rows_after_the_checkpoint_and_appends(tmp_path):
    path = tmp_path / "m.jsonl"
    logger = JSONLLogger(path)
    for row in rows(6):
        logger.log(row)
    logger.close()
    logger = JSONLLogger(path, resume_step=4)
    logger.log({"split": "train", "step": 5, "loss": 0.1})
    logger.close()
    assert [(r["split"], r["step"]) for r in read_metrics(path)] == [
        ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("train", 5),
    ]  # fmt: skip


def test_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(rows(2)[0]) + "\n" + '{"split": "train", "st')
    assert read_metrics(path) == rows(2)[:1]
    truncate_metrics(path, 10)
    assert path.read_text() == json.dumps(rows(2)[0]) + "\n"


def test_loss_curve_png_leaves_the_matplotlib_backend_alone(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(100)))
    backend = matplotlib.get_backend()
    out = plot_loss_curve(path, tmp_path / "loss.png", title="run")
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 10_000
    assert matplotlib.get_backend() == backend
