"""What a study leaves in OUT: best.yaml, trials.csv, the printed table and the PNG plots."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import yaml

from perfml.train.config import TrainConfig
from perfml.tune.space import apply_params
from perfml.tune.study import FAIL_REASON, INTERRUPTED

BEST_FILE = "best.yaml"
CSV_FILE = "trials.csv"
HISTORY_PLOT = "optimization_history.png"
IMPORTANCE_PLOT = "param_importances.png"
INTERMEDIATE_PLOT = "intermediate_values.png"


def trial_rows(study: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """(the parameter names, one row per trial: number, state, value, duration_s, params,
    reason, run_dir)."""
    trials = study.get_trials(deepcopy=False)
    names: list[str] = []
    for t in trials:
        names += [n for n in t.params if n not in names]
    rows = []
    for t in trials:
        reason = t.user_attrs.get(FAIL_REASON, "")
        if t.state.name == "FAIL" and not reason:
            reason = f"interrupted ({t.user_attrs.get(INTERRUPTED, 'its process died')})"
        if t.state.name == "PRUNED":
            reason = f"pruned at step {t.user_attrs.get('pruned_at_step', '?')}"
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                "duration_s": None if t.duration is None else round(t.duration.total_seconds(), 2),
                **{n: t.params.get(n) for n in names},
                "reason": reason,
                "run_dir": t.user_attrs.get("run_dir", ""),
            }
        )
    return names, rows


def write_csv(study: Any, path: str | Path) -> Path:
    names, rows = trial_rows(study)
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=["number", "state", "value", "duration_s", *names, "reason", "run_dir"]
        )
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return path


def format_table(study: Any, metric: str) -> str:
    names, rows = trial_rows(study)
    header = ["trial", "state", metric, "seconds", *names, "note"]
    lines = [header]
    for row in rows:
        value = row["value"]
        lines.append(
            [
                str(row["number"]),
                row["state"],
                "" if value is None else f"{value:.4f}",
                "" if row["duration_s"] is None else f"{row['duration_s']:.1f}",
                *(_cell(row[n]) for n in names),
                row["reason"][:60],
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def best_trial(study: Any) -> Any | None:
    try:
        return study.best_trial
    except ValueError:  # no complete trial
        return None


def write_best_config(
    study: Any, out_dir: str | Path, base: TrainConfig, metric: str
) -> Path | None:
    """OUT/best.yaml: the best trial's full TrainConfig (its run's config.yaml, or the base
    config with its values when the run directory is on another machine), out_dir set to a
    directory that does not exist yet; None without a complete trial."""
    trial = best_trial(study)
    if trial is None:
        return None
    out_dir = Path(out_dir)
    run_config = Path(trial.user_attrs.get("run_dir", "")) / "config.yaml"
    if trial.user_attrs.get("run_dir") and run_config.is_file():
        values = yaml.safe_load(run_config.read_text())
        config = TrainConfig.from_dict(values, source=str(run_config))
    else:
        config = apply_params(base, trial.params, out_dir="")
    target = out_dir / "best-run"
    n = 2
    while target.exists():
        target = out_dir / f"best-run-{n}"
        n += 1
    config.out_dir = str(target)
    config.progress = base.progress
    values = config.to_dict()
    params = ", ".join(f"{k}={v!r}" for k, v in trial.params.items())
    header = (
        f"# The best trial of study {study.study_name!r}: trial {trial.number}, {metric} "
        f"{trial.value:.6g}\n# ({params}). Train it with: perfml train --config "
        f"{out_dir / BEST_FILE}\n"
    )
    path = out_dir / BEST_FILE
    path.write_text(header + yaml.safe_dump(values, sort_keys=False))
    return path


def write_plots(study: Any, out_dir: str | Path) -> tuple[list[Path], list[str]]:
    """PNG plots in OUT: the optimization history, the intermediate values, the parameter
    importances (with >= 2 complete trials and >= 2 parameters); (paths, notes on skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as vis

    out_dir = Path(out_dir)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = {n for t in complete for n in t.params}
    plots = [(HISTORY_PLOT, vis.plot_optimization_history)]
    notes = []
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        plots.append((INTERMEDIATE_PLOT, vis.plot_intermediate_values))
    if len(complete) >= 2 and len(names) >= 2:
        plots.append((IMPORTANCE_PLOT, vis.plot_param_importances))
    else:
        notes.append(
            f"{IMPORTANCE_PLOT}: needs >= 2 complete trials and >= 2 parameters "
            f"(have {len(complete)} and {len(names)})"
        )
    written = []
    for name, plot in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(study)
            figure = getattr(ax, "figure", None) or ax.flat[0].figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            figure.savefig(out_dir / name, dpi=100)
            plt.close(figure)
            written.append(out_dir / name)
        except (ValueError, RuntimeError) as exc:  # e.g. importances of a constant parameter
            notes.append(f"{name}: not drawn ({exc})")
    return written, notes
