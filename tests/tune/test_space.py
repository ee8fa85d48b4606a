"""The `tune:` block: parsed and checked up front, with errors naming the key; `perfml train`
ignores it; `perfml tune` without optuna says how to install it."""

import sys

import pytest
import yaml

from perfml import cli
from perfml.train import load_config
from perfml.tune import SpaceError, parse_space, read_space
from perfml.tune.space import Param


def test_a_valid_block_parses_to_params():
    space = parse_space(
        {
            "lr": {"type": "loguniform", "low": "1e-4", "high": 1.0e-2},  # YAML's 1e-4: a string
            "warmup_steps": {"type": "int", "low": 0, "high": 50, "step": 5},
            "weight_decay": {"type": "uniform", "low": 0.0, "high": 0.2},
            "batch_size": {"type": "categorical", "choices": [8, 16]},
            "schedule": {"type": "categorical", "choices": ["cosine", "wsd"]},
            "model_args.num_layers": {"type": "int", "low": 1, "high": 3},
        }
    )
    assert space.names == (
        "lr",
        "warmup_steps",
        "weight_decay",
        "batch_size",
        "schedule",
        "model_args.num_layers",
    )
    assert space.params[0] == Param("lr", "loguniform", low=1e-4, high=1e-2)
    assert space.params[1].step == 5
    assert space.params[3].choices == (8, 16)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ([1, 2], "tune: expected a mapping of TrainConfig keys"),
        ({}, "tune: expected a mapping of TrainConfig keys"),
        ({"lrr": {"type": "uniform", "low": 0, "high": 1}}, "tune.lrr: unknown key 'lrr'"),
        ({"lr": "1e-3"}, "tune.lr: expected a mapping like"),
        ({"lr": {"type": "normal", "low": 0, "high": 1}}, "tune.lr: type must be one of"),
        ({"lr": {"type": "uniform", "low": 0.1}}, "tune.lr: type uniform needs low and high"),
        ({"lr": {"type": "uniform", "low": 0.1, "high": 0.01}}, "tune.lr: low must be below"),
        ({"lr": {"type": "loguniform", "low": 0.0, "high": 1.0}}, "tune.lr: a log scale needs"),
        ({"lr": {"type": "uniform", "low": "x", "high": 1.0}}, "tune.lr: low expects a number"),
        ({"lr": {"type": "uniform", "low": 0, "high": 1, "q": 2}}, "tune.lr: unknown key 'q'"),
        ({"warmup_steps": {"type": "int", "low": 0.5, "high": 3}}, "low expects an integer"),
        ({"warmup_steps": {"type": "uniform", "low": 0, "high": 3}}, "fit warmup_steps, an int"),
        ({"fused": {"type": "uniform", "low": 0, "high": 1}}, "uniform does not fit fused"),
        ({"batch_size": {"type": "categorical", "choices": []}}, "needs a non-empty list"),
        ({"batch_size": {"type": "categorical", "choices": [8, "x"]}}, "batch_size expects an"),
        ({"schedule": {"type": "categorical", "choices": ["cosine", "step"]}}, "must be one of"),
        ({"batch_size": {"type": "categorical", "choices": [8, 8]}}, "choices repeat a value"),
        ({"loggers": {"type": "categorical", "choices": ["jsonl"]}}, "tune.loggers: loggers is a"),
        ({"out_dir": {"type": "categorical", "choices": ["a"]}}, "tune.out_dir: out_dir is set"),
        ({"model_args.depth": {"type": "int", "low": 1, "high": 2}}, "unknown model field 'depth'"),
        ({"lr.x": {"type": "int", "low": 1, "high": 2}}, "only model_args takes sub-keys"),
    ],
)
def test_bad_blocks_name_the_key(block, message):
    with pytest.raises(SpaceError) as info:
        parse_space(block)
    assert message in str(info.value)


def test_bounds_the_config_refuses_are_caught_before_any_trial(write_config):
    path = write_config({"warmup_steps": {"type": "int", "low": -2, "high": 3}})
    space = read_space(path)
    with pytest.raises(SpaceError, match=r"tune\.warmup_steps: the value -2 is not valid.*>= 0"):
        space.check(load_config(path))


def test_perfml_train_ignores_the_tune_block(write_config):
    with_block = load_config(write_config({"lr": {"type": "uniform", "low": 0.1, "high": 1}}))
    without = load_config(write_config(None, name="plain"))
    assert with_block.to_dict() == without.to_dict()


def test_a_config_without_a_block_is_a_usage_error(write_config, capsys, tmp_path):
    code = cli.main(["tune", "--config", str(write_config(None)), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "no `tune:` block" in capsys.readouterr().err


def test_a_bad_block_is_a_usage_error_before_any_file(write_config, capsys, tmp_path):
    path = write_config({"lr": {"type": "loguniform", "low": -1, "high": 1}})
    code = cli.main(["tune", "--config", str(path), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "tune.lr: a log scale needs low > 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_set_of_a_searched_key_is_refused(write_config, capsys, tmp_path):
    path = write_config({"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}})
    code = cli.main(["tune", "--config", str(path), "--out", str(tmp_path / "o"), "--set", "lr=1"])
    assert code == 2
    assert "--set lr=1: lr is searched by the tune: block" in capsys.readouterr().err


def test_without_optuna_the_command_names_the_extra(write_config, capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    path = write_config({"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}})
    code = cli.main(["tune", "--config", str(path), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "pip install 'perfml[tune]'" in capsys.readouterr().err


def test_the_cli_choices_are_the_library_ones():
    from perfml.cli import tune as command
    from perfml.tune import study

    assert command.METRICS == study.METRICS
    assert command.PRUNERS == study.PRUNERS


def test_the_shipped_example_has_a_valid_space():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / "tune-tiny.yaml"
    space = read_space(path)
    space.check(load_config(path))
    assert set(space.names) == set(yaml.safe_load(path.read_text())["tune"])
