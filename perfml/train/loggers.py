"""Where a run's numbers go: RUN_DIR/metrics.jsonl always, TensorBoard and MLflow on request, and a
loss-curve PNG drawn from metrics.jsonl.

Every logger receives the same rows: one per optimizer step (`split: "train"`: step, loss, lr,
grad_norm, tokens_per_s, mfu, tokens, elapsed_s) and one per evaluation (`split: "val"`: step,
loss, ppl). On resume, rows after the checkpoint's step (written by the interrupted run after its
last checkpoint) are dropped first, so the logged curve is the one an uninterrupted run would have
written. TensorBoard gets the same effect through `purge_step`. MLflow is imported only when asked
for, so it stays an optional extra. JSON has no inf or nan: metrics.jsonl writes them as null.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from perfml.train.config import ConfigError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class Logger:
    """Receives the run's config once and every metrics row."""

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def log(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JSONLLogger(Logger):
    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            truncate_metrics(self.path, resume_step)
        self._file = open(self.path, "a")  # noqa: SIM115 (held open for the run, closed in close())

    def log(self, row: dict[str, Any]) -> None:
        # JSON has no inf/nan (a skipped fp16 step's grad norm, a diverged loss): null instead
        row = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()
        }
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger(Logger):
    def __init__(self, log_dir: str | Path, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def log_config(self, config: dict[str, Any]) -> None:
        self._writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, row: dict[str, Any]) -> None:
        split = row["split"]
        for key, value in _scalars(row).items():
            self._writer.add_scalar(f"{split}/{key}", value, row["step"])

    def close(self) -> None:
        self._writer.close()


class MLflowLogger(Logger):
    """An MLflow run in a local store (RUN_DIR/mlruns unless `uri` says otherwise); the run id is
    kept in RUN_DIR/mlflow_run_id so a resumed training logs into the same MLflow run."""

    def __init__(self, run_dir: str | Path, uri: str | None = None) -> None:
        mlflow = import_mlflow()
        run_dir = Path(run_dir).resolve()
        self._mlflow = mlflow
        mlflow.set_tracking_uri(uri or (run_dir / "mlruns").as_uri())
        id_file = run_dir / "mlflow_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        self._run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_dir.name)
        id_file.write_text(self._run.info.run_id)
        self._new = run_id is None

    def log_config(self, config: dict[str, Any]) -> None:
        if self._new:  # MLflow params are write-once
            self._mlflow.log_params({k: str(v) for k, v in config.items()})

    def log(self, row: dict[str, Any]) -> None:
        split = row["split"]
        metrics = {f"{split}/{k}": v for k, v in _scalars(row).items()}
        self._mlflow.log_metrics(metrics, step=row["step"])

    def close(self) -> None:
        self._mlflow.end_run()


def import_mlflow() -> Any:
    try:
        import mlflow
    except ImportError as exc:
        raise ConfigError(
            "loggers: 'mlflow' needs the mlflow package, which is not importable "
            f"({exc}); install it with: pip install 'perfml[mlflow]'"
        ) from None
    return mlflow


def build_loggers(
    names: list[str],
    run_dir: str | Path,
    *,
    resume_step: int | None = None,
    mlflow_uri: str | None = None,
) -> list[Logger]:
    """The JSONL logger plus those named (tensorboard, mlflow)."""
    run_dir = Path(run_dir)
    if "mlflow" in names:
        import_mlflow()  # fail before any file is touched
    loggers: list[Logger] = [JSONLLogger(run_dir / METRICS_FILE, resume_step)]
    if "tensorboard" in names:
        loggers.append(TensorBoardLogger(run_dir / "tensorboard", resume_step))
    if "mlflow" in names:
        loggers.append(MLflowLogger(run_dir, mlflow_uri))
    return loggers


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (a torn last line, from a crash mid-write, is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def truncate_metrics(path: str | Path, step: int) -> None:
    """Keep only the rows up to `step` (atomically rewritten)."""
    path = Path(path)
    kept = [row for row in read_metrics(path) if row.get("step", 0) <= step]
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    os.replace(tmp, path)


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Path:
    """Train loss per step (and its running mean) with the validation points, as a PNG."""
    # a bare Figure renders through Agg without pyplot, leaving the caller's backend untouched
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = read_metrics(metrics_path)
    train = [
        (r["step"], r["loss"]) for r in rows if r["split"] == "train" and r["loss"] is not None
    ]
    val = [(r["step"], r["loss"]) for r in rows if r["split"] == "val" and r["loss"] is not None]
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=0.8, label="train")
        window = max(1, len(losses) // 25)
        if window > 1:
            smooth = [
                sum(losses[max(0, i - window + 1) : i + 1]) / min(i + 1, window)
                for i in range(len(losses))
            ]
            ax.plot(
                steps, smooth, color="tab:blue", linewidth=1.6, label=f"train (mean of {window})"
            )
    if val:
        steps, losses = zip(*val, strict=True)
        ax.plot(steps, losses, "o-", color="tab:orange", markersize=4, label="val")
        best = min(range(len(losses)), key=losses.__getitem__)
        ax.annotate(
            f"{losses[best]:.3f} (ppl {math.exp(min(losses[best], 50)):.1f})",
            (steps[best], losses[best]),
            textcoords="offset points",
            xytext=(4, 6),
            fontsize=8,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    return Path(png_path)
