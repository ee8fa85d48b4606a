"""A study: Optuna trials, each an ordinary training run of perfml.train.Trainer.

    run_tune(TuneOptions(config="configs/tune-tiny.yaml", trials=20, out="runs/tune"))

- Each trial trains the config with the values sampled from its `tune:` block in its own run
  directory OUT/trials/N (config.yaml, metrics.jsonl, checkpoints). A Trainer callback reports the
  metric at each evaluation (trial.report) and asks the Trainer to stop when the pruner says so;
  a pruned run directory holds a PRUNED file, a failed one a FAILED file with the reason.
- The study lives in an Optuna RDB storage: sqlite:///OUT/study.db unless --storage names another
  database, which lets workers on several machines share one study. With a heartbeat, a trial
  whose process died (SIGKILL, a lost machine) is marked failed once its heartbeat is stale and
  retried with the same values (RetryHeartbeatStaleTrialCallback); running the same command again
  continues a study: its finished trials are kept.
- `trials` is the number of finished trials (complete, pruned, or failed with a reason) the study
  should hold; interrupted trials, retried, do not count. `workers` processes split what is left
  and each stops early once the study has that many complete or pruned trials (MaxTrialsCallback),
  so workers on other machines do not overshoot either.
- A trial that fails (a value the config or the model refuses, a non-finite loss, out of memory,
  any error inside the Trainer) is recorded failed with its reason (user attr fail_reason) and the
  study goes on. SIGTERM/SIGINT: the trial in flight is checkpointed by the Trainer and marked
  interrupted (its values queued again), the study stops; running the command again continues it.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perfml.train.callbacks import Callback
from perfml.train.config import ConfigError, TrainConfig, load_config
from perfml.tune.space import SearchSpace, apply_params, read_space

METRICS = ("val_loss", "best_val_loss", "val_ppl", "train_loss")
PRUNERS = ("median", "hyperband", "none")
DIRECTIONS = ("minimize", "maximize")
PRUNED_FILE = "PRUNED"
FAILED_FILE = "FAILED"
INTERRUPTED_FILE = "INTERRUPTED"
# trial user attrs
FAIL_REASON = "fail_reason"
INTERRUPTED = "interrupted"


class TuneError(ConfigError):
    """Bad tune input (options, storage, a study that does not match): names what is wrong."""


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:
        raise TuneError(
            f"perfml tune needs the optuna package, which is not importable ({exc}); install it "
            "with: pip install 'perfml[tune]'"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # perfml prints one line per trial
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


@dataclass
class TuneOptions:
    config: str | Path
    trials: int = 20
    out: str | Path = "runs/tune"
    workers: int = 1
    storage: str | None = None  # default: sqlite:///OUT/study.db
    study_name: str | None = None  # default: the config file's name without .yaml
    overrides: tuple[str, ...] = ()
    direction: str = "minimize"
    metric: str = "val_loss"
    pruner: str = "median"
    seed: int | None = None  # the sampler's seed (worker i uses seed + i)
    startup_trials: int = 3  # trials drawn at random, and never pruned, before TPE and pruning
    heartbeat_s: int = 10  # a dead worker's trial is failed and retried after 2x this

    def check(self) -> None:
        checks = (
            (self.trials >= 1, f"--trials must be >= 1, got {self.trials}"),
            (self.workers >= 1, f"--workers must be >= 1, got {self.workers}"),
            (self.metric in METRICS, f"--metric must be one of {', '.join(METRICS)}"),
            (self.pruner in PRUNERS, f"--pruner must be one of {', '.join(PRUNERS)}"),
            (self.direction in DIRECTIONS, f"--direction must be one of {', '.join(DIRECTIONS)}"),
            (self.startup_trials >= 0, "--startup-trials must be >= 0"),
            (self.heartbeat_s >= 1, f"--heartbeat must be >= 1 s, got {self.heartbeat_s}"),
        )
        for ok, message in checks:
            if not ok:
                raise TuneError(message)

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out_dir / 'study.db').resolve()}"

    @property
    def name(self) -> str:
        return self.study_name or Path(self.config).stem


@dataclass
class TuneResult:
    study: Any
    out_dir: Path
    interrupted: str | None  # the signal that stopped the study, or None
    ran: int  # trials run by this command


# --- setup ------------------------------------------------------------------------------------


def load_inputs(options: TuneOptions) -> tuple[TrainConfig, SearchSpace]:
    """The base TrainConfig (file + overrides) and the search space, both checked."""
    space = read_space(options.config)
    for item in options.overrides:
        key = item.partition("=")[0].strip()
        if key in space.names:
            raise TuneError(f"--set {item}: {key} is searched by the tune: block; drop one")
    base = load_config(options.config, list(options.overrides))
    space.check(base, source=f"{options.config}: tune")
    return base, space


def make_storage(options: TuneOptions) -> Any:
    optuna = import_optuna()
    url = options.storage_url
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=options.heartbeat_s,
            grace_period=2 * options.heartbeat_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=3
            ),
        )
    except Exception as exc:  # a bad URL, a missing driver, an unreachable server
        raise TuneError(f"--storage {url}: cannot open the study storage: {exc}") from None


def make_sampler(options: TuneOptions, worker: int) -> Any:
    optuna = import_optuna()
    seed = None if options.seed is None else options.seed + worker
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(options.startup_trials, 1))


def make_pruner(options: TuneOptions, base: TrainConfig) -> Any:
    optuna = import_optuna()
    if options.pruner == "none":
        return optuna.pruners.NopPruner()
    if options.pruner == "hyperband":
        first_eval = base.eval_every or base.max_steps
        return optuna.pruners.HyperbandPruner(
            min_resource=min(first_eval, base.max_steps), max_resource=base.max_steps
        )
    return optuna.pruners.MedianPruner(n_startup_trials=options.startup_trials)


def open_study(options: TuneOptions, base: TrainConfig, space: SearchSpace, worker: int) -> Any:
    """Create the study, or load it and check it is the same search."""
    optuna = import_optuna()
    study = optuna.create_study(
        storage=make_storage(options),
        sampler=make_sampler(options, worker),
        pruner=make_pruner(options, base),
        study_name=options.name,
        direction=options.direction,
        load_if_exists=True,
    )
    recorded = study.user_attrs
    expected = {"metric": options.metric, "space": space.to_dict()}
    if not recorded:
        for key, value in expected.items():
            study.set_user_attr(key, value)
        return study
    hint = "choose another --study name or --out"
    if study.direction.name.lower() != options.direction:
        raise TuneError(
            f"study {options.name!r} ({options.storage_url}) maximizes or minimizes the other "
            f"way ({study.direction.name.lower()}); {hint}"
        )
    for key, value in expected.items():
        if recorded.get(key) != value:
            raise TuneError(
                f"study {options.name!r} ({options.storage_url}) was started with another {key} "
                f"({recorded.get(key)!r}, now {value!r}); {hint}"
            )
    return study


def finished_trials(study: Any) -> list[Any]:
    """The trials that count towards --trials: complete, pruned, failed with a reason."""
    from optuna.trial import TrialState

    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and FAIL_REASON in t.user_attrs)
    ]


# --- one trial ----------------------------------------------------------------------------------


class TrialFailed(Exception):
    """A trial that failed for a recorded reason; the study goes on."""


class StudyInterrupted(Exception):
    """SIGTERM/SIGINT during a trial: the study stops."""


class TrialCallback(Callback):
    """Reports the metric at each evaluation; stops the run when the pruner says so, when the
    loss is not finite, or when the study was asked to stop before the run began."""

    def __init__(self, trial: Any, metric: str, stop_flag: Callable[[], str | None]) -> None:
        self.trial = trial
        self.metric = metric
        self.stop_flag = stop_flag
        self.pruned_at: int | None = None
        self.non_finite: str | None = None
        self.reported: dict[int, float] = {}

    def on_train_start(self, trainer: Any) -> None:
        reason = self.stop_flag()
        if reason is not None:
            trainer.request_stop(reason)

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if not math.isfinite(metrics["loss"]) and self.non_finite is None:
            self.non_finite = f"the train loss is {metrics['loss']} at step {metrics['step']}"
            trainer.request_stop("non-finite loss")

    def on_eval(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if not math.isfinite(metrics["loss"]):
            if self.non_finite is None:
                self.non_finite = f"the val loss is {metrics['loss']} at step {metrics['step']}"
                trainer.request_stop("non-finite loss")
            return
        value = {
            "val_loss": metrics["loss"],
            "best_val_loss": trainer.early_stopping.best,
            "val_ppl": metrics["ppl"],
            "train_loss": trainer.last_train_loss,
        }[self.metric]
        step = int(metrics["step"])
        self.trial.report(float(value), step)
        self.reported[step] = float(value)
        if self.pruned_at is None and self.trial.should_prune():
            self.pruned_at = step
            trainer.request_stop("pruned")


class Objective:
    """The function Optuna calls: one trial = one Trainer run in OUT/trials/N."""

    def __init__(
        self,
        options: TuneOptions,
        base: TrainConfig,
        space: SearchSpace,
        worker: int,
        stop_flag: Callable[[], str | None],
    ) -> None:
        self.options = options
        self.base = base
        self.space = space
        self.worker = worker
        self.stop_flag = stop_flag

    def __call__(self, trial: Any) -> float:
        optuna = import_optuna()
        from perfml.train import Trainer

        if self.stop_flag() is not None:
            trial.set_user_attr(INTERRUPTED, self.stop_flag())
            raise StudyInterrupted(self.stop_flag())
        params = self.space.suggest(trial)
        run_dir = self.options.out_dir / "trials" / str(trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", self.worker)
        try:
            config = apply_params(self.base, params, out_dir=str(run_dir), progress=False)
        except ConfigError as exc:
            self._fail(trial, run_dir, f"ConfigError: {exc}")
        callback = TrialCallback(trial, self.options.metric, self.stop_flag)
        try:
            result = Trainer(config, callbacks=[callback]).fit()
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # the study goes on; the reason is recorded
            reason = f"{type(exc).__name__}: {exc}"
            if "OutOfMemoryError" in type(exc).__name__:
                _free_cuda_memory()
            self._fail(trial, run_dir, reason)
        if result.stop_reason in ("SIGTERM", "SIGINT"):
            trial.set_user_attr(INTERRUPTED, result.stop_reason)
            (run_dir / INTERRUPTED_FILE).write_text(
                f"{result.stop_reason} at step {result.step}; this trial's values are queued "
                "again for the next run of the study\n"
            )
            trial.study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
            raise StudyInterrupted(result.stop_reason)
        if callback.non_finite is not None:
            self._fail(trial, run_dir, f"non-finite loss: {callback.non_finite}")
        if result.stop_reason == "pruned":
            step = callback.pruned_at
            value = callback.reported[step]
            trial.set_user_attr("pruned_at_step", step)
            (run_dir / PRUNED_FILE).write_text(
                f"pruned at step {step}: {self.options.metric} {value:.6g}\n"
            )
            raise optuna.TrialPruned(f"pruned at step {step}")
        value = {
            "val_loss": result.val_loss,
            "best_val_loss": result.best_val_loss,
            "val_ppl": None if result.val_loss is None else math.exp(min(result.val_loss, 50.0)),
            "train_loss": result.train_loss,
        }[self.options.metric]
        if value is None or not math.isfinite(value):
            self._fail(trial, run_dir, f"no finite {self.options.metric} (got {value})")
        trial.set_user_attr("step", result.step)
        return float(value)

    @staticmethod
    def _fail(trial: Any, run_dir: Path, reason: str) -> None:
        trial.set_user_attr(FAIL_REASON, reason)
        if run_dir.is_dir():
            (run_dir / FAILED_FILE).write_text(reason + "\n")
        raise TrialFailed(reason)


def _free_cuda_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- workers ------------------------------------------------------------------------------------


def trial_line(trial: Any, metric: str, worker: int | None = None) -> str:
    """One progress line for a finished trial."""
    state = trial.state.name.lower()
    params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    if state == "complete":
        what = f"{metric} {trial.value:.4f}"
    elif state == "pruned":
        what = f"pruned at step {trial.user_attrs.get('pruned_at_step', '?')}"
    elif INTERRUPTED in trial.user_attrs:
        what = f"interrupted by {trial.user_attrs[INTERRUPTED]}"
    else:
        what = trial.user_attrs.get(FAIL_REASON, "interrupted")
    seconds = trial.duration.total_seconds() if trial.duration is not None else 0.0
    where = "" if worker is None else f" [worker {worker}]"
    return f"trial {trial.number} {state}: {what} ({params}), {seconds:.1f} s{where}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class _StopFlag:
    """Set by SIGTERM/SIGINT outside a training run (the Trainer handles them inside one)."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def __call__(self) -> str | None:
        return self.reason

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.reason is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.reason = signal.Signals(signum).name
            print(f"{self.reason}: stopping the study after this trial", file=sys.stderr)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def run_worker(
    options: TuneOptions, worker: int, quota: int, label: bool = False
) -> tuple[int, str | None]:
    """Run up to `quota` trials of the study in this process; (trials run, the signal that
    stopped it or None)."""
    optuna = import_optuna()
    from optuna.trial import TrialState

    base, space = load_inputs(options)
    study = open_study(options, base, space, worker)
    flag = _StopFlag()
    ran = 0

    def after_trial(study: Any, trial: Any) -> None:
        nonlocal ran
        ran += 1
        print(trial_line(trial, options.metric, worker if label else None), flush=True)
        if flag() is not None or trial.user_attrs.get(INTERRUPTED):
            study.stop()

    callbacks = [
        optuna.study.MaxTrialsCallback(
            options.trials, states=(TrialState.COMPLETE, TrialState.PRUNED)
        ),
        after_trial,
    ]
    objective = Objective(options, base, space, worker, flag)
    with flag.installed():
        try:
            study.optimize(objective, n_trials=quota, catch=(TrialFailed,), callbacks=callbacks)
        except StudyInterrupted as exc:
            where = f" [worker {worker}]" if label else ""
            print(f"study stopped by {exc}: the trial in flight is checkpointed{where}", flush=True)
            return ran + 1, str(exc)
    return ran, flag()


def _worker_main(options: TuneOptions, worker: int, quota: int, results: Any) -> None:
    try:
        ran, interrupted = run_worker(options, worker, quota, label=True)
        results.put((worker, ran, interrupted, None))
    except BaseException as exc:  # reported by the parent
        results.put((worker, 0, None, f"{type(exc).__name__}: {exc}"))


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def run_tune(options: TuneOptions, log: Callable[[str], None] = print) -> TuneResult:
    """Run (or continue) the study until it holds options.trials finished trials."""
    options.check()
    optuna = import_optuna()
    base, space = load_inputs(options)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(options, base, space, worker=0)
    optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed, queued again
    done = len(finished_trials(study))
    remaining = options.trials - done
    log(
        f"study {options.name!r} in {options.storage_url}: {done} of {options.trials} trials "
        f"finished; searching {', '.join(space.names)} ({options.metric}, {options.direction})"
    )
    interrupted = None
    ran = 0
    if remaining > 0 and options.workers == 1:
        ran, interrupted = run_worker(options, 0, remaining)
    elif remaining > 0:
        ran, interrupted = _run_processes(options, remaining, log)
    return TuneResult(
        study=optuna.load_study(study_name=options.name, storage=make_storage(options)),
        out_dir=options.out_dir,
        interrupted=interrupted,
        ran=ran,
    )


def _run_processes(
    options: TuneOptions, remaining: int, log: Callable[[str], None]
) -> tuple[int, str | None]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    quotas = [q for q in _split(remaining, options.workers) if q > 0]
    processes = [
        context.Process(target=_worker_main, args=(options, i, q, results), daemon=False)
        for i, q in enumerate(quotas)
    ]
    stop: list[str] = []

    def forward(signum: int, frame: Any) -> None:
        stop.append(signal.Signals(signum).name)
        for p in processes:
            if p.is_alive() and signum == signal.SIGTERM:
                p.terminate()  # SIGTERM: each worker's Trainer checkpoints and stops

    in_main = threading.current_thread() is threading.main_thread()
    previous = (
        {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        if in_main
        else {}
    )
    try:
        for p in processes:
            p.start()
        reports = []
        while len(reports) < len(processes):
            try:
                reports.append(results.get(timeout=1.0))
            except Exception:  # queue.Empty: check that the workers are alive
                if not any(p.is_alive() for p in processes) and results.empty():
                    break
        for p in processes:
            p.join()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    errors = [f"worker {w}: {err}" for w, _, _, err in reports if err]
    if errors:
        raise TuneError("; ".join(errors))
    lost = [p.exitcode for p in processes if p.exitcode not in (0, None)]
    if lost and not stop:
        log(f"{len(lost)} worker(s) ended with exit codes {lost}")
    ran = sum(r for _, r, _, _ in reports)
    interrupted = next((i for _, _, i, _ in reports if i), None) or (stop[0] if stop else None)
    return ran, interrupted
