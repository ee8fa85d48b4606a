"""`perfml train` and `perfml eval` driven through cli.main: config file plus --set, resume,
evaluation, and the exit code 2 errors."""

import json

import pytest
import yaml

from perfml import cli
from tests.train.conftest import read_rows


@pytest.fixture
def config_file(make_config, tmp_path):
    """A YAML config of a fast run in tmp_path/run."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(make_config(max_steps=4, eval_every=2, ckpt_every=2).to_dict()))
    return path


def test_train_then_resume_for_more_steps_then_eval(config_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(config_file), "--set", "lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "step 4: reached max_steps; train loss" in out and f"run directory    {run}" in out
    assert f"checkpoint     {run}/checkpoints/step-00000004" in out
    assert read_rows(run)[0]["lr"] == pytest.approx(1e-3 / 2)  # warmup step 1 of 2

    assert cli.main(["train", "--resume", str(run), "--set", "max_steps=6"]) == 0
    assert [r["step"] for r in read_rows(run)] == list(range(1, 7))
    capsys.readouterr()

    assert cli.main(["eval", str(run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{run}/checkpoints/step-00000006 (step 6): val loss ")
    assert "perplexity" in out
    assert cli.main(["eval", str(run), "--checkpoint", "best", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    best = min(read_rows(run, "val"), key=lambda r: r["loss"])
    assert result["step"] == best["step"] and result["val_loss"] == best["loss"]


def test_resume_from_a_checkpoint_directory(config_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(config_file)]) == 0
    checkpoint = run / "checkpoints" / "step-00000002"
    assert cli.main(["train", "--resume", str(checkpoint)]) == 0
    assert [r["step"] for r in read_rows(run)] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--set", "lr=fast"], "perfml train: error: --set lr=fast: lr expects a number"),
        (["train", "--set", "nope=1"], "perfml train: error: --set nope=1: unknown key 'nope'"),
        (["eval", "/no/such/run"], "perfml eval: error: /no/such/run: no such directory"),
        (["train", "--resume", "/no/such/run"], "/no/such/run/config.yaml: cannot read"),
    ],
)
def test_errors_exit_2_naming_the_problem(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_key_in_the_config_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("max_steps: 3\nbatchsize: 4\n")
    assert cli.main(["train", "--config", str(path)]) == 2
    assert (
        f"{path}: unknown key 'batchsize' (did you mean 'batch_size'?)" in capsys.readouterr().err
    )


def test_config_and_resume_are_exclusive(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--config", "a.yaml", "--resume", "run"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model=nosuchpreset", "nosuchpreset"),
        ("model_args.nosuchkey=1", "nosuchkey"),
        ("data=/no/such/corpus.txt", "/no/such/corpus.txt"),
    ],
)
def test_a_run_that_fails_validation_leaves_no_run_directory(
    config_file, tmp_path, capsys, override, message
):
    assert cli.main(["train", "--config", str(config_file), "--set", override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resuming_a_finished_run_again_prints_a_clean_summary(config_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(config_file)]) == 0
    capsys.readouterr()
    # nothing left to train: no train loss this time, and no stray separator in its place
    assert cli.main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    summary = next(line for line in out.splitlines() if line.startswith("step 4:"))
    assert "; ," not in summary and ";;" not in summary
    assert summary.startswith("step 4: reached max_steps; val loss ")


def test_train_takes_device_like_the_other_commands(config_file, tmp_path):
    assert cli.main(["train", "--config", str(config_file), "--device", "cpu"]) == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["device"] == "cpu"
