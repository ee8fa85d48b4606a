"""Studies of a micro config (6 steps, an evaluation every 2) through `perfml tune`: pruning,
best.yaml reproducing the best trial, failures recorded while the study goes on, SIGKILL and
SIGTERM, two workers on one SQLite study."""

import csv
import math
import signal
import subprocess
import time

import optuna  # noqa: F401  (pinned in the dev extra: missing fails, never skips)
import pytest
import yaml

from perfml import cli
from perfml.train import Trainer, load_config
from tests.tune.conftest import LR_SPACE, load_study, perfml_command, subprocess_env


def _states(study):
    return [t.state.name for t in study.get_trials()]


def test_a_study_prunes_writes_its_files_and_best_yaml_reproduces_the_best_trial(
    write_config, tmp_path, capsys
):
    # lrs from 1e-5 (no progress) to 1 (diverging): the median pruner must stop some trials
    space = {**LR_SPACE, "weight_decay": {"type": "uniform", "low": 0.0, "high": 0.2}}
    path = write_config(space)
    out = tmp_path / "study"
    argv = ["tune", "--config", str(path), "--out", str(out), "--trials", "6", "--seed", "0"]
    assert cli.main([*argv, "--startup-trials", "2"]) == 0
    printed = capsys.readouterr().out
    study = load_study(out)
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(6))
    states = _states(study)
    assert states.count("PRUNED") >= 1 and states.count("COMPLETE") >= 2, states
    assert set(states) <= {"PRUNED", "COMPLETE"}
    for t in trials:
        run_dir = out / "trials" / str(t.number)
        config = load_config(run_dir / "config.yaml")
        assert config.lr == t.params["lr"] and config.weight_decay == t.params["weight_decay"]
        assert (run_dir / "PRUNED").exists() == (t.state.name == "PRUNED")
        assert f"trial {t.number} {t.state.name.lower()}:" in printed
        assert t.intermediate_values  # reported at each evaluation
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    rows = [r for r in (out / "trials" / str(pruned[0].number) / "metrics.jsonl").open()]
    assert len(rows) < 6 + 3  # stopped before max_steps
    with (out / "trials.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["state"] for r in table] == [s.lower() for s in states]
    assert float(table[0]["lr"]) == trials[0].params["lr"]
    for plot in ("optimization_history.png", "intermediate_values.png", "param_importances.png"):
        assert (out / plot).stat().st_size > 1000, plot

    best = study.best_trial
    assert f"best: trial {best.number}" in printed
    config = load_config(out / "best.yaml")
    assert config.lr == best.params["lr"]
    assert not (tmp_path / config.out_dir).exists() and config.out_dir.endswith("best-run")
    result = Trainer(config).fit()
    assert result.val_loss == best.value  # the Trainer is deterministic on CPU

    # the same command again continues the study: its trials kept, one more run
    assert cli.main([*argv[:-4], "--trials", "7", "--seed", "1"]) == 0
    again = load_study(out).get_trials()
    assert len(again) == 7
    assert [t.value for t in again[:6]] == [t.value for t in trials]


def test_failing_trials_are_recorded_with_their_reason_and_the_study_goes_on(
    write_config, tmp_path, capsys
):
    # seq_len 128 exceeds the micro model's max_seq_len 64: valid config, refused by the model
    path = write_config({"seq_len": {"type": "categorical", "choices": [16, 128]}})
    out = tmp_path / "study"
    argv = ["tune", "--config", str(path), "--out", str(out), "--trials", "5", "--seed", "0"]
    assert cli.main([*argv, "--startup-trials", "5", "--pruner", "none"]) == 0
    study = load_study(out)
    trials = study.get_trials()
    assert len(trials) == 5
    failed = [t for t in trials if t.state.name == "FAIL"]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert failed and complete
    assert {t.params["seq_len"] for t in failed} == {128}
    assert {t.params["seq_len"] for t in complete} == {16}
    for t in failed:
        assert "seq_len 128 exceeds the model's max_seq_len 64" in t.user_attrs["fail_reason"]
    assert "fail: ConfigError: seq_len 128 exceeds" in capsys.readouterr().out


def test_a_non_finite_loss_fails_the_trial(write_config, tmp_path, capsys):
    path = write_config({"lr": {"type": "categorical", "choices": [1.0e4]}}, clip_grad=None)
    out = tmp_path / "study"
    code = cli.main(["tune", "--config", str(path), "--out", str(out), "--trials", "1"])
    assert code == 1  # no trial completed
    (trial,) = load_study(out).get_trials()
    assert trial.state.name == "FAIL"
    reason = trial.user_attrs["fail_reason"]
    assert reason.startswith("non-finite loss: the ") and "nan" in reason, reason
    assert (out / "trials" / "0" / "FAILED").read_text().startswith("non-finite loss")
    assert not (out / "best.yaml").exists()
    assert "no trial completed" in capsys.readouterr().err


def test_a_study_continued_with_another_search_is_refused(write_config, tmp_path):
    from perfml.tune.study import TuneError, TuneOptions, load_inputs, make_pruner, open_study

    path = write_config(LR_SPACE)
    options = TuneOptions(config=path, out=tmp_path / "study")
    options.out_dir.mkdir()
    base, space = load_inputs(options)
    open_study(options, base, space, worker=0)
    for change, what in (
        ({"metric": "train_loss"}, "another metric"),
        ({"direction": "maximize"}, "the other way"),
    ):
        other = TuneOptions(config=path, out=tmp_path / "study", **change)
        with pytest.raises(TuneError, match=what):
            open_study(other, base, space, worker=0)
    hyperband = make_pruner(TuneOptions(config=path, pruner="hyperband"), base)
    assert type(hyperband).__name__ == "HyperbandPruner"
    assert (hyperband._min_resource, hyperband._max_resource) == (base.eval_every, base.max_steps)


def _start(path, out, *extra):
    argv = ["tune", "--config", str(path), "--out", str(out), "--seed", "0", *extra]
    return subprocess.Popen(
        perfml_command(*argv),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(path, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_killed_study_continues_keeping_its_finished_trials(write_config, tmp_path):
    path = write_config(LR_SPACE, max_steps=20, eval_every=10)
    out = tmp_path / "study"
    args = ("--trials", "3", "--heartbeat", "1", "--pruner", "none")
    proc = _start(path, out, *args)
    _wait_for(out / "trials" / "1" / "config.yaml", proc)  # trial 1 is training
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = load_study(out).get_trials()
    assert [t.state.name for t in before] == ["COMPLETE", "RUNNING"]
    time.sleep(2.5)  # its heartbeat (1 s) is stale after the grace period of 2 s

    done = subprocess.run(
        perfml_command("tune", "--config", str(path), "--out", str(out), "--seed", "0", *args),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 of 3 trials finished" in done.stdout
    after = load_study(out).get_trials()
    assert after[0].value == before[0].value and after[0].state.name == "COMPLETE"
    assert after[1].state.name == "FAIL" and "fail_reason" not in after[1].user_attrs
    retried = [t for t in after if t.system_attrs.get("failed_trial") == 1]
    assert len(retried) == 1 and retried[0].params == before[1].params
    assert retried[0].state.name == "COMPLETE"
    assert sum(t.state.name == "COMPLETE" for t in after) == 3
    assert "interrupted" in (out / "trials.csv").read_text()


def test_sigterm_checkpoints_the_trial_and_stops_the_study(write_config, tmp_path):
    path = write_config(LR_SPACE, max_steps=20, eval_every=10)
    out = tmp_path / "study"
    proc = _start(path, out, "--trials", "2", "--pruner", "none")
    _wait_for(out / "trials" / "1" / "config.yaml", proc)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout
    assert "stopped by SIGTERM" in stdout
    run_dir = out / "trials" / "1"
    assert "SIGTERM" in (run_dir / "INTERRUPTED").read_text()
    assert list((run_dir / "checkpoints").glob("step-*"))
    trials = load_study(out).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "WAITING"]
    assert trials[1].user_attrs["interrupted"] == "SIGTERM"
    assert trials[2].system_attrs["fixed_params"] == trials[1].params  # queued again


def test_two_workers_share_one_sqlite_study(write_config, tmp_path):
    path = write_config(LR_SPACE)
    out = tmp_path / "study"
    proc = _start(path, out, "--trials", "4", "--workers", "2", "--pruner", "none")
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    trials = load_study(out).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}
    assert "[worker 0]" in stdout and "[worker 1]" in stdout
    for t in trials:
        assert load_config(out / "trials" / str(t.number) / "config.yaml").lr == t.params["lr"]
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert math.isclose(best["lr"], min(trials, key=lambda t: t.value).params["lr"])
