"""The `perfml` command as a whole: --help and usage errors without torch, every option's default
in --help, docs/cli.md generated from the parsers, and the layering (no library module imports
perfml.cli)."""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from perfml import cli
from perfml.cli import _docs

ROOT = Path(__file__).resolve().parents[2]
# modules that only a command that runs may import
HEAVY = ("torch", "numpy", "triton", "onnx", "transformers", "matplotlib", "safetensors")


def _imported_by(*argv: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime -m perfml ARGV`; (the process, the top-level modules it
    imported)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "perfml", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    modules = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            modules.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return proc, modules


@pytest.mark.parametrize(
    "argv,code,text",
    [
        (["--help"], 0, "quantize"),
        (["quantize", "--help"], 0, "--group-size"),
        (["prune"], 2, "the following arguments are required: PATH, --method"),
        (["bench", "--modes"], 2, "expected one argument"),
        (["nope"], 2, "invalid choice: 'nope'"),
    ],
)
def test_help_and_usage_errors_import_no_torch(argv, code, text):
    proc, modules = _imported_by(*argv)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert text in proc.stdout + proc.stderr
    assert "perfml" in modules  # the import-time log was read
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


def _options():
    parser = cli.build_parser()
    for name, sub in _docs._subparsers(parser).items():
        required_groups = {
            id(a) for g in sub._mutually_exclusive_groups if g.required for a in g._group_actions
        }
        for action in sub._actions:
            if (
                action.option_strings
                and action.nargs != 0
                and not action.required
                and id(action) not in required_groups
                and action.help != argparse.SUPPRESS
            ):
                yield name, sub, action


def test_every_option_says_its_default_in_help():
    checked = 0
    for name, sub, action in _options():
        rendered = " ".join(_docs._help(sub, action).split())
        assert "default" in rendered, f"perfml {name} {action.option_strings[0]}: {rendered!r}"
        checked += 1
    assert checked > 40
    # the ones the issue named, with their values
    help_of = {(n, a.option_strings[0]): _docs._help(s, a) for n, s, a in _options()}
    assert help_of[("prune", "--amount")].endswith("(default: 0.5)")
    assert help_of[("prune", "--scope")].endswith("(default: layer)")
    assert help_of[("prune", "--mlp-amount")].endswith("(default: 0.25)")
    assert help_of[("prune", "--head-amount")].endswith("(default: 0.0)")
    assert help_of[("quantize", "--group-size")].endswith("(default: 64)")
    assert "default: the run's eval_batches" in help_of[("eval", "--batches")]
    assert "default: the run's eval_batches" in help_of[("quantize", "--batches")]


def test_export_help_shows_the_valid_opset_range():
    from perfml.export import onnx as export_onnx

    sub = _docs._subparsers(cli.build_parser())["export"]
    (opset,) = [a for a in sub._actions if a.dest == "opset"]
    text = _docs._help(sub, opset)
    assert f"ONNX opset, {export_onnx.MIN_OPSET} up to the newest" in text
    assert f"default: {export_onnx.PREFERRED_OPSET} when onnxruntime runs it" in text
    assert f"else {export_onnx.FALLBACK_OPSET}" in text


def test_every_command_that_takes_a_model_takes_a_run_or_model_directory():
    subs = _docs._subparsers(cli.build_parser())
    for name in ("eval", "generate", "quantize", "prune", "export"):
        (path,) = [a for a in subs[name]._actions if a.dest == "path"]
        assert path.help == cli._common.MODEL_PATH_HELP, name
        assert "checkpoints/step-NNNNNNNN" in path.help


def test_set_takes_several_pairs_after_one_flag():
    parser = cli.build_parser()
    for command in ("train", "demo", "profile --model tiny"):
        argv = [*command.split(), "--set", "a=1", "b=2", "--set", "c=3"]
        assert parser.parse_args(argv).overrides == ["a=1", "b=2", "c=3"], command


def test_docs_cli_md_is_generated_from_the_parsers():
    """docs/cli.md is what `python -m perfml.cli._docs` writes: regenerate it after changing
    an argument."""
    page = _docs.render()
    assert (ROOT / "docs" / "cli.md").read_text() == page, (
        "docs/cli.md is stale: run `python -m perfml.cli._docs`"
    )
    for name in cli.COMMANDS:
        assert f"## perfml {name}\n" in page
    # every option of every command is on the page, with its default
    for name, _sub, action in _options():
        assert f"`{_docs._name(action)}`" in page, (name, action.option_strings)


def test_the_docs_generator_writes_the_file(tmp_path):
    out = tmp_path / "cli.md"
    assert _docs.main([str(out)]) == 0
    assert out.read_text() == _docs.render()


def test_no_library_module_imports_perfml_cli():
    offenders = []
    for file in (ROOT / "perfml").rglob("*.py"):
        rel = file.relative_to(ROOT)
        if rel.parts[1] == "cli" or rel.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "perfml.cli" or n.startswith("perfml.cli.") for n in names):
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []


def test_one_dtype_map():
    import torch

    from perfml import _dtypes
    from perfml.train import trainer

    assert _dtypes.torch_dtypes() == {
        "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
    }  # fmt: skip
    assert trainer.DTYPES == _dtypes.torch_dtypes()
    with pytest.raises(ValueError, match="dtype must be one of fp32, bf16, fp16; got 'fp64'"):
        _dtypes.torch_dtype("fp64")
    for name in ("generate", "profile"):
        sub = _docs._subparsers(cli.build_parser())[name]
        (dtype,) = [a for a in sub._actions if a.dest == "dtype"]
        assert tuple(dtype.choices) == _dtypes.DTYPE_NAMES
