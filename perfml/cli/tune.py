"""`perfml tune`: a hyperparameter search (Optuna) over the `tune:` block of a training config,
each trial an ordinary run of the Trainer in OUT/trials/N (perfml.tune)."""

from __future__ import annotations

import argparse
import shlex
import sys

from perfml.cli._common import UsageError, add_device, add_overrides, device, positive_int

HELP = "search hyperparameters (Optuna) over a config's tune: block"
DESCRIPTION = (
    "Search the TrainConfig values of the config's tune: block with Optuna, one training run per "
    "trial in OUT/trials/N, pruning runs whose evaluations fall behind. The study is kept in "
    "sqlite:///OUT/study.db (or --storage): running the same command again continues it. At the "
    "end: OUT/best.yaml (train it with perfml train --config OUT/best.yaml), OUT/trials.csv and "
    "PNG plots. Exit codes: 0 done, or stopped by SIGTERM/SIGINT with the trial in flight "
    "checkpointed (run the command again to continue); 1 no trial completed; 2 bad usage or "
    "config; 130 interrupted twice."
)
# perfml.tune.study's METRICS and PRUNERS (kept here so that --help imports no torch)
METRICS = ("val_loss", "best_val_loss", "val_ppl", "train_loss")
PRUNERS = ("median", "hyperband", "none")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", required=True, metavar="FILE.yaml", help="a training config with a tune: block"
    )
    p.add_argument("--trials", type=positive_int, default=20, help="finished trials to reach")
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="processes sharing the study on this machine",
    )
    p.add_argument(
        "--storage",
        metavar="URL",
        help="an Optuna RDB URL (e.g. postgresql://host/db) that workers on several machines "
        "share; default: sqlite:///OUT/study.db",
    )
    p.add_argument("--study", metavar="NAME", help="the study name; default: the config's name")
    p.add_argument("--out", metavar="DIR", help="the study's directory; default: runs/tune-NAME")
    add_overrides(p, "override a base config key, e.g. --set max_steps=200")
    p.add_argument("--direction", choices=("minimize", "maximize"), default="minimize")
    p.add_argument(
        "--metric",
        choices=METRICS,
        default="val_loss",
        help="the trial's value: the final val loss, the best one, its perplexity, or the last "
        "train loss; reported at each evaluation",
    )
    p.add_argument("--pruner", choices=PRUNERS, default="median")
    p.add_argument(
        "--seed", type=int, help="the sampler's seed (worker i: seed + i); default: random"
    )
    p.add_argument(
        "--startup-trials",
        type=int,
        default=3,
        help="trials sampled at random and never pruned before TPE and the pruner take over",
    )
    p.add_argument(
        "--heartbeat",
        type=positive_int,
        default=10,
        metavar="SECONDS",
        help="a trial whose process stops beating for twice this is failed and retried",
    )
    add_device(p, "the trials' device (--set device=...); ")


def run(args: argparse.Namespace) -> int:
    from perfml.cli._common import train_errors

    overrides = list(args.overrides)
    if args.device is not None:
        overrides.append(f"device={device(args.device).type}")
    try:
        from perfml import tune
        from perfml.tune import report

        tune.import_optuna()
        options = tune.TuneOptions(
            config=args.config,
            trials=args.trials,
            out=args.out or f"runs/tune-{args.study or _stem(args.config)}",
            workers=args.workers,
            storage=args.storage,
            study_name=args.study,
            overrides=tuple(overrides),
            direction=args.direction,
            metric=args.metric,
            pruner=args.pruner,
            seed=args.seed,
            startup_trials=args.startup_trials,
            heartbeat_s=args.heartbeat,
        )
        result = tune.run_tune(options)
        base, _ = tune.study.load_inputs(options)
    except train_errors() as exc:
        raise UsageError(str(exc)) from None
    except KeyboardInterrupt:
        print("perfml tune: interrupted", file=sys.stderr)
        return 130
    study, out = result.study, result.out_dir
    print()
    print(report.format_table(study, options.metric))
    print()
    csv_path = report.write_csv(study, out / report.CSV_FILE)
    best_path = report.write_best_config(study, out, base, options.metric)
    plots, notes = report.write_plots(study, out)
    print(f"study directory  {out}")
    print(f"  {'trials':<15}{out / 'trials'}")
    print(f"  {'table':<15}{csv_path}")
    for path in plots:
        print(f"  {'plot':<15}{path}")
    for note in notes:
        print(f"  {'(skipped)':<15}{note}")
    if best_path is not None:
        best = report.best_trial(study)
        print(f"best: trial {best.number}, {options.metric} {best.value:.4f}")
        print(f"  {'config':<15}{best_path}")
        print(f"train it with: perfml train --config {shlex.quote(str(best_path))}")
    if result.interrupted:
        print(f"stopped by {result.interrupted}; continue the study by running the same command")
        return 0
    if best_path is None:
        print("perfml tune: no trial completed (see the table's notes)", file=sys.stderr)
        return 1
    return 0


def _stem(path: str) -> str:
    from pathlib import Path

    return Path(path).stem
