"""`perfml generate`: a run's or a model directory's model through the Decoder."""

from __future__ import annotations

import pytest
import torch

from perfml import cli, runs


def test_generate_from_a_run_and_from_a_quantized_model_dir(run_dir, tmp_path, capsys):
    from perfml import data

    argv = ["generate", str(run_dir), "--prompt", "def f", "--max-new-tokens", "12"]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    # greedy: the same text as the checkpoint's own Llama.generate
    model = runs.load_model(run_dir).model
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
    assert "nope: no such directory" in capsys.readouterr().err
    assert cli.main(["generate", str(tmp_path), "--device", "cpu"]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_max_new_tokens_beyond_the_context_is_an_error_naming_the_limit(run_dir, capsys):
    # max_seq_len 64; "def f" is 5 byte tokens: 59 new tokens fit, 60 do not
    argv = ["generate", str(run_dir), "--prompt", "def f", "--device", "cpu"]
    assert cli.main([*argv, "--max-new-tokens", "60"]) == 2
    err = capsys.readouterr().err
    assert (
        "the prompt (5 tokens) + --max-new-tokens 60 = 65 exceeds the model's max_seq_len 64" in err
    )
    assert "at most --max-new-tokens 59 with this prompt" in err
    assert cli.main([*argv, "--max-new-tokens", "59"]) == 0
    assert "59 tokens in" in capsys.readouterr().err
    # an over-long prompt alone: the same error, naming the same limit
    assert cli.main([*argv[:2], "--prompt", "x" * 64, "--device", "cpu"]) == 2
    assert "exceeds the model's max_seq_len 64" in capsys.readouterr().err


def test_one_sampling_default_greedy_everywhere():
    """Llama.generate, Decoder.generate and `perfml generate` default to greedy decoding."""
    import inspect

    from perfml.cli import generate
    from perfml.models import Decoder
    from perfml.models.llama import DEFAULT_TEMPERATURE, Llama, LlamaConfig

    assert DEFAULT_TEMPERATURE == 0.0 == generate.DEFAULT_TEMPERATURE
    for fn in (Llama.generate, Decoder.generate):
        assert inspect.signature(fn).parameters["temperature"].default == DEFAULT_TEMPERATURE
    args = cli.build_parser().parse_args(["generate", "run"])
    assert args.temperature == DEFAULT_TEMPERATURE
    torch.manual_seed(0)
    model = Llama(LlamaConfig.preset("tiny", hidden_size=32, intermediate_size=64, num_layers=1))
    prompt = torch.randint(0, 257, (2, 3))
    seeded = [model.generate(prompt, 6, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert torch.equal(seeded[0], seeded[1])  # no sampling: the seed does not matter
    assert torch.equal(seeded[0], model.generate(prompt, 6, temperature=0))
