"""`perfml quantize` / `perfml prune` on a small trained run: a new model directory that loads,
with perplexity before and after in its report (and after fine-tuning, for prune
--finetune-steps)."""

from __future__ import annotations

import dataclasses
import json
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from perfml import cli, sparsity
from perfml.quant import model_dir
from perfml.train import TrainConfig, Trainer, load_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qrun")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join((stdlib / n).read_text() for n in ("textwrap.py", "bisect.py")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = TrainConfig(
        model="tiny",
        model_args={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "max_seq_len": 64,
        },
        fused=False,
        data=str(corpus),
        cache_dir=str(root / "cache"),
        seq_len=16,
        batch_size=4,
        max_steps=6,
        lr=3e-3,
        warmup_steps=1,
        precision="fp32",
        device="cpu",
        eval_every=6,
        eval_batches=2,
        ckpt_every=6,
        progress=False,
        out_dir=str(root / "run"),
    )
    try:
        Trainer(config).fit()
    finally:
        torch.set_num_threads(threads)
    return root / "run"


@pytest.mark.parametrize(
    "command,extra",
    [
        ("quantize", ["--method", "int8"]),
        ("quantize", ["--method", "int4", "--group-size", "32"]),
        ("prune", ["--method", "structured", "--head-amount", "0.5"]),
        ("prune", ["--method", "2:4"]),
    ],
)
def test_command_writes_a_loadable_model_dir_with_perplexity(
    run_dir, tmp_path, command, extra, capsys
):
    out = tmp_path / "out"
    assert cli.main([command, str(run_dir), *extra, "--out", str(out), "--device", "cpu"]) == 0
    assert "perplexity" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["ppl"] > 1 and report["after"]["ppl"] > 1
    if command == "quantize":
        assert report["weight_bytes_after"] < report["weight_bytes_before"]
        assert abs(report["after"]["val_loss"] - report["before"]["val_loss"]) < 0.1
    model = model_dir.load_model_dir(out)
    ids = torch.randint(0, 257, (1, 8))
    assert torch.isfinite(model(ids)).all()


def test_bad_method_argument_is_usage_error(run_dir, capsys):
    assert cli.main(["quantize", str(run_dir), "--method", "int4", "--group-size", "48"]) == 2
    assert "group_size" in capsys.readouterr().err


@pytest.mark.parametrize(
    "method,extra",
    [("magnitude", ["--finetune-lr", "3e-3"]), ("structured", ["--head-amount", "0.5"])],
)
def test_prune_then_finetune_writes_the_finetuned_model_and_three_perplexities(
    run_dir, tmp_path, method, extra, capsys
):
    out = tmp_path / "out"
    argv = ["prune", str(run_dir), "--method", method, *extra, "--finetune-steps", "8"]
    assert cli.main([*argv, "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    before, after, tuned = report["before"], report["after"], report["after_finetune"]
    assert f"fine-tuning 8 steps at lr {report['finetune']['lr']:g}" in printed
    assert (
        f"perplexity {before['ppl']:.3f} -> {after['ppl']:.3f} pruned -> {tuned['ppl']:.3f} "
        "fine-tuned (8 steps)" in printed
    )
    assert tuned["val_loss"] < after["val_loss"]
    assert report["finetune"]["steps"] == 8 and report["finetune"]["stop_reason"] == "max_steps"

    # the fine-tune ran on the run's own config: N steps, the lr asked for (default a tenth of
    # the run's), a warmup of at most a tenth of the steps, its run directory inside OUT
    run_config = load_config(run_dir / "config.yaml")
    lr = 3e-3 if "--finetune-lr" in extra else 0.1 * run_config.lr
    expected = dataclasses.replace(
        run_config,
        out_dir=str(out / "finetune"),
        max_steps=8,
        lr=lr,
        warmup_steps=0,
        device="cpu",
    )
    assert load_config(out / "finetune" / "config.yaml") == expected

    # the model directory holds the fine-tuned weights (those of the fine-tune's last step)
    model = model_dir.load_model_dir(out)
    last = load_file(str(out / "finetune" / "checkpoints" / "step-00000008" / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in last.items() if k in state)
    measured = model_dir.run_perplexity(model, run_dir, device=torch.device("cpu"))
    assert measured["val_loss"] == pytest.approx(tuned["val_loss"])
    assert report["sparsity"] == sparsity.sparsity_report(model)
    if method == "magnitude":  # exactly half of every pruned layer is still zero
        layers = report["sparsity"]["layers"]
        assert all(v["sparsity"] == 0.5 for k, v in layers.items() if not k.endswith("lm_head"))
    else:
        assert state["layers.0.mlp.gate_proj.weight"].shape == (96, 64)
        assert state["layers.0.self_attn.k_proj.weight"].shape == (16, 64)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--finetune-steps", "-1"], "--finetune-steps must be >= 0, got -1"),
        (["--finetune-steps", "2", "--finetune-lr", "0"], "--finetune-lr must be a positive "),
        (["--finetune-steps", "2", "--finetune-lr", "nan"], "positive number, got nan"),
        (["--finetune-lr", "1e-3"], "--finetune-lr needs --finetune-steps N > 0"),
    ],
)
def test_bad_finetune_arguments_are_usage_errors(run_dir, tmp_path, extra, message, capsys):
    out = tmp_path / "out"
    argv = ["prune", str(run_dir), "--method", "magnitude", *extra, "--out", str(out)]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_existing_finetune_run_is_not_overwritten(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "finetune").mkdir(parents=True)
    (out / "finetune" / "config.yaml").write_text("max_steps: 1\n")
    argv = ["prune", str(run_dir), "--method", "2:4", "--finetune-steps", "2", "--out", str(out)]
    assert cli.main(argv) == 2
    assert "already holds a fine-tune run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["finetune"]


def test_include_head_is_recorded_and_replayed_on_load(run_dir, tmp_path, capsys):
    out = tmp_path / "head"
    argv = ["quantize", str(run_dir), "--method", "int8", "--include-head", "--out", str(out)]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["include_head"] is True
    assert model_dir.load_model_dir(out) is not None  # the run's head is tied: stays float
    # an untied head is quantized by the pass and again when the directory is loaded
    from perfml import quant
    from perfml.models import Llama, LlamaConfig

    config = LlamaConfig.preset("tiny", hidden_size=64, intermediate_size=96, num_layers=1)
    config = dataclasses.replace(config, tie_embeddings=False)
    torch.manual_seed(0)
    model = Llama(config).eval()
    q = quant.Int8WeightOnlyConfig()
    quant.quantize(model, q, filter_fn=model_dir.pass_filter(True))
    assert isinstance(model.lm_head, quant.Int8WeightOnlyLinear)
    entry = model_dir.describe_config("quantize", q, include_head=True)
    saved = model_dir.save_model_dir(
        model, tmp_path / "untied", model_config=config.to_dict(), passes=[entry], report={}
    )
    loaded = model_dir.load_model_dir(saved)
    assert isinstance(loaded.lm_head, quant.Int8WeightOnlyLinear)
    ids = torch.randint(0, 257, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_generate_from_a_run_and_from_a_quantized_model_dir(run_dir, tmp_path, capsys):
    from perfml import data

    argv = ["generate", str(run_dir), "--prompt", "def f", "--max-new-tokens", "12"]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    # greedy: the same text as the checkpoint's own Llama.generate
    model, _ = model_dir.load_run(run_dir)
    tokenizer = data.load_tokenizer(run_dir / "tokenizer.json")
    prompt = torch.tensor([tokenizer.encode("def f")])
    expected = tokenizer.decode(model.generate(prompt, 12, temperature=0)[0].tolist())
    assert out == expected + "\n"
    assert "12 tokens in" in err and "tokens/s" in err and "float32, eager, cpu" in err

    quantized = tmp_path / "q"
    argv = ["quantize", str(run_dir), "--method", "int8", "--out", str(quantized)]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    assert (quantized / "tokenizer.json").read_text() == (run_dir / "tokenizer.json").read_text()
    capsys.readouterr()
    argv = ["generate", str(quantized), "--max-new-tokens", "6", "--temperature", "0.8"]
    assert cli.main([*argv, "--top-k", "5", "--dtype", "bf16", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def ") and "6 tokens in" in err and "bfloat16" in err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--top-k", "0"], "--top-k must be >= 1"),
        (["--prompt", ""], "--prompt is empty"),
    ],
)
def test_generate_bad_arguments(run_dir, extra, message, capsys):
    assert cli.main(["generate", str(run_dir), *extra, "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


def test_generate_needs_a_directory_with_a_model(tmp_path, capsys):
    assert cli.main(["generate", str(tmp_path / "nope"), "--device", "cpu"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli.main(["generate", str(tmp_path), "--device", "cpu"]) == 2
    assert "perfml generate: error:" in capsys.readouterr().err
