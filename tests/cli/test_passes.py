"""`perfml quantize` / `perfml prune` on a small trained run (tests/cli/conftest.py): a new
model directory that loads, with perplexity before and after in its report (and after
fine-tuning, for prune --finetune-steps); passes chain through model directories; outputs are
written whole or not at all."""

from __future__ import annotations

import dataclasses
import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from perfml import cli, runs, sparsity
from perfml.quant import model_dir
from perfml.train import load_config


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
    with pytest.raises(SystemExit) as info:
        cli.main(["quantize", str(run_dir), "--method", "int4", "--group-size", "48"])
    assert info.value.code == 2
    assert "--group-size: invalid choice: 48 (choose from 32, 64, 128)" in capsys.readouterr().err
    assert cli.main(["prune", str(run_dir), "--method", "magnitude", "--amount", "1.5"]) == 2
    assert "amount" in capsys.readouterr().err


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
    measured = runs.evaluate(out, device="cpu")
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


def test_an_existing_output_is_refused_unless_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "finetune").mkdir(parents=True)
    (out / "finetune" / "config.yaml").write_text("max_steps: 1\n")
    argv = ["prune", str(run_dir), "--method", "2:4", "--finetune-steps", "2", "--out", str(out)]
    assert cli.main(argv) == 2
    assert f"--out {out}: already exists; choose another path or pass --overwrite" in (
        capsys.readouterr().err
    )
    assert sorted(p.name for p in out.iterdir()) == ["finetune"]
    # --overwrite replaces it with a complete model directory, nothing of the old one left
    assert cli.main([*argv, "--overwrite", "--device", "cpu"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["finetune", "manifest.json", "model.safetensors", "perfml_model.json",
                     "report.json", "tokenizer.json"]  # fmt: skip
    assert load_config(out / "finetune" / "config.yaml").max_steps == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_out_equal_to_the_input_is_refused(run_dir, tmp_path, capsys):
    before = sorted(p.name for p in run_dir.iterdir())
    for out in (run_dir, run_dir / "."):
        argv = ["quantize", str(run_dir), "--method", "int8", "--out", str(out)]
        assert cli.main([*argv, "--overwrite"]) == 2
        assert "is the input directory" in capsys.readouterr().err
    argv = ["quantize", str(run_dir), "--method", "int8", "--out", str(run_dir.parent)]
    assert cli.main([*argv, "--overwrite"]) == 2
    assert f"holds the input {run_dir}" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_a_failed_pass_leaves_nothing_behind(run_dir, tmp_path, monkeypatch, capsys):
    from perfml import quant

    def fail(*args, **kwargs):
        raise quant.QuantizationError("the transform failed")

    monkeypatch.setattr(quant, "quantize", fail)
    out = tmp_path / "q"
    argv = ["quantize", str(run_dir), "--method", "int8", "--out", str(out), "--device", "cpu"]
    assert cli.main(argv) == 2
    assert "the transform failed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_passes_chain_prune_then_quantize_then_eval_and_export(run_dir, tmp_path, capsys):
    pruned, quantized = tmp_path / "pruned", tmp_path / "pruned-int8"
    argv = ["prune", str(run_dir), "--method", "structured", "--head-amount", "0.5"]
    assert cli.main([*argv, "--out", str(pruned), "--device", "cpu"]) == 0
    # the model directory is the input; the default output sits next to it
    argv = ["quantize", str(pruned), "--method", "int8", "--device", "cpu"]
    assert cli.main(argv) == 0
    default = tmp_path / "pruned-quantized-int8"
    assert f"written to {default}" in capsys.readouterr().out
    os.rename(default, quantized)
    meta = json.loads((quantized / "perfml_model.json").read_text())
    assert [(p["pass"], p["config"]) for p in meta["passes"]] == [
        ("prune", "StructuredConfig"), ("quantize", "Int8WeightOnlyConfig"),
    ]  # fmt: skip
    report = meta["report"]
    assert report["source"] == str(pruned) and report["run"] == str(run_dir)
    assert report["step"] == 6 and report["checkpoint"].endswith("checkpoints/step-00000006")
    # the quantized pruned model loads with its pruned shapes and its int8 weights
    loaded = runs.load_model(quantized)
    assert loaded.model.layers[0].self_attn.k_proj.out_features == 16
    assert loaded.passes == meta["passes"] and loaded.run_dir == run_dir
    pruned_ppl = json.loads((pruned / "report.json").read_text())["after"]["ppl"]
    assert report["before"]["ppl"] == pytest.approx(pruned_ppl)

    assert cli.main(["eval", str(quantized), "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ppl"] == pytest.approx(report["after"]["ppl"])
    assert cli.main(["eval", str(pruned), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{pruned} (prune Structured) (step 6): val loss")
    assert cli.main(["eval", str(pruned), "--checkpoint", "best"]) == 2
    assert "a model directory has one model" in capsys.readouterr().err

    pytest.importorskip("onnxruntime")
    onnx_file = tmp_path / "m.onnx"
    assert cli.main(["export", str(pruned), "--out", str(onnx_file), "--seq", "8"]) == 0
    assert onnx_file.is_file() and ") ok" in capsys.readouterr().out


def test_model_files_have_the_default_mode(run_dir, tmp_path):
    out = tmp_path / "q"
    assert cli.main(["quantize", str(run_dir), "--method", "int8", "--out", str(out)]) == 0
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~mask)
    checkpoint = run_dir / "checkpoints" / "step-00000006" / "model.safetensors"
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o666 & ~mask


def test_include_head_is_recorded_and_replayed_on_load(run_dir, tmp_path, capsys):
    out = tmp_path / "head"
    argv = ["quantize", str(run_dir), "--method", "int8", "--include-head", "--out", str(out)]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    # the run's head is tied to the embedding: it stays float, and the report says so
    assert "output head is tied to the embedding, so it stays float" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert "include_head" not in report["config"] and report["head"].startswith("tied")
    assert model_dir.load_model_dir(out).lm_head is None
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
