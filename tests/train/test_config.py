"""TrainConfig: YAML files and --set overrides, converted by field type; every error names the key
and where it came from."""

from pathlib import Path

import pytest

from perfml.cli import demo as demo_command
from perfml.train import ConfigError, TrainConfig, load_config
from perfml.train.config import save_config
from perfml.train.trainer import model_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_valid():
    config = load_config()
    assert config == TrainConfig()
    assert config.loggers == ["jsonl"] and config.schedule == "cosine"


def test_tiny_yaml_is_the_demo_run():
    config = load_config(REPO / "configs" / "tiny.yaml")
    demo = TrainConfig.from_dict(demo_command.DEMO_SETTINGS)
    assert config.to_dict() == {**demo.to_dict(), "out_dir": "runs/tiny"}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    config = load_config(path)
    assert config.out_dir == f"runs/{path.stem}"
    model = model_config(config, config.vocab_size)  # the preset, seq_len and vocabulary fit
    assert model.fused == config.fused


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("lr=1e-3", "lr", 1e-3),
        ("lr=2", "lr", 2.0),
        ("max_steps=1_000", "max_steps", 1000),
        ("fused=false", "fused", False),
        ("compile=yes", "compile", True),
        ("clip_grad=none", "clip_grad", None),
        ("clip_grad=0.5", "clip_grad", 0.5),
        ("data=null", "data", None),
        ("data=/some/folder", "data", "/some/folder"),
        ("eval_batches=null", "eval_batches", None),
        ("precision=bf16", "precision", "bf16"),
        ("loggers=jsonl,tensorboard", "loggers", ["jsonl", "tensorboard"]),
        ("loggers=[tensorboard]", "loggers", ["tensorboard"]),
        (
            "model_args={hidden_size: 64, num_layers: 2}",
            "model_args",
            {"hidden_size": 64, "num_layers": 2},
        ),
        ("model_args.hidden_size=64", "model_args", {"hidden_size": 64}),
    ],
)
def test_set_converts_by_field_type(override, key, expected):
    value = load_config(None, [override]).to_dict()[key]
    assert value == expected and type(value) is type(expected)


def test_later_overrides_win_and_dotted_keys_merge():
    config = load_config(None, ["lr=1", "lr=2", "model_args.a=1", "model_args.b=x"])
    assert config.lr == 2.0 and config.model_args == {"a": 1, "b": "x"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lr=fast", "--set lr=fast: lr expects a number, got 'fast'"),
        ("max_steps=1.5", "--set max_steps=1.5: max_steps expects an integer, got '1.5'"),
        ("fused=maybe", "--set fused=maybe: fused expects true or false, got 'maybe'"),
        ("precision=fp8", "--set precision=fp8: precision must be one of auto, fp32, bf16, fp16"),
        ("max_stepz=3", "--set max_stepz=3: unknown key 'max_stepz' (did you mean 'max_steps'?)"),
        ("lr", "--set lr: expected key=value"),
        ("lr.x=1", "--set lr.x=1: 'lr' has no sub-keys"),
        ("batch_size=0", "--set batch_size=0: batch_size must be >= 1, got 0"),
        ("val_fraction=1", "--set val_fraction=1: val_fraction must be in (0, 1), got 1.0"),
        ("loggers=jsonl,wandb", "loggers unknown logger 'wandb'"),
        ("early_stop_patience=2", None),  # valid: eval_every defaults to 100
        ("eval_every=0", None),
    ],
)
def test_set_errors_name_the_key(override, message):
    if message is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_patience_needs_periodic_evaluation():
    with pytest.raises(ConfigError, match="early_stop_patience needs eval_every > 0"):
        load_config(None, ["eval_every=0", "early_stop_patience=3"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr: 1e-3\nbatchsize: 4\n", "unknown key 'batchsize' (did you mean 'batch_size'?)"),
        ("batch_size: 2.5\n", "batch_size expects an integer, got 2.5"),
        ("batch_size: true\n", "batch_size expects an integer, got True"),
        ("fused: 1\n", "fused expects true or false, got 1"),
        ("lr: fast\n", "lr expects a number, got 'fast'"),
        ("loggers: jsonl\n", "loggers expects a list, got 'jsonl'"),
        ("model_args: [1, 2]\n", "model_args expects a mapping"),
        ("schedule: linear\n", "schedule must be one of cosine, wsd, constant; got 'linear'"),
        ("max_steps: -1\n", "max_steps must be >= 1, got -1"),
        ("- lr\n- 1\n", "expected a mapping of config keys, got list"),
        ("lr: [1\n", "not valid YAML"),
    ],
)
def test_yaml_errors_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_yaml_values_and_scientific_notation_without_a_dot(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 3e-4\nclip_grad: null\nloggers: [jsonl, tensorboard]\nfused: false\n")
    config = load_config(path, ["max_steps=7"])
    assert (config.lr, config.clip_grad, config.fused, config.max_steps) == (3e-4, None, False, 7)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no-such.yaml: cannot read"):
        load_config(tmp_path / "no-such.yaml")


def test_save_then_load_round_trips(tmp_path):
    config = load_config(
        None,
        [
            "lr=1e-3",
            "model_args.hidden_size=64",
            "clip_grad=none",
            "loggers=jsonl,tensorboard",
            "precision=bf16",
        ],
    )
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
