"""Hyperparameter search with Optuna through the real Trainer (`perfml tune`).

    from perfml.tune import TuneOptions, run_tune
    result = run_tune(TuneOptions(config="configs/tune-tiny.yaml", trials=20, out="runs/tune"))

The search space is the config's `tune:` block (perfml.tune.space); each trial is an ordinary run
directory OUT/trials/N trained by perfml.train.Trainer (perfml.tune.study); the study's files
(best.yaml, trials.csv, plots) are written by perfml.tune.report. optuna is imported when a study
runs: `pip install 'perfml[tune]'`.
"""

from perfml.tune.space import Param, SearchSpace, SpaceError, apply_params, parse_space, read_space
from perfml.tune.study import (
    METRICS,
    PRUNERS,
    TrialCallback,
    TuneError,
    TuneOptions,
    TuneResult,
    finished_trials,
    import_optuna,
    run_tune,
)

__all__ = [
    "METRICS",
    "PRUNERS",
    "Param",
    "SearchSpace",
    "SpaceError",
    "TrialCallback",
    "TuneError",
    "TuneOptions",
    "TuneResult",
    "apply_params",
    "finished_trials",
    "import_optuna",
    "parse_space",
    "read_space",
    "run_tune",
]
