"""What the `perfml` commands share: the usage error, the help formatter, argument helpers.

Nothing here imports torch at module level: the parsers are built, and --help and usage errors
answered, before any command imports its library code (in its run function).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from perfml._dtypes import DTYPE_NAMES

if TYPE_CHECKING:
    import torch

DEVICES = ("cpu", "cuda")
MODEL_PATH_HELP = (
    "a run directory (perfml train; its checkpoints/step-NNNNNNNN) or a model directory "
    "(perfml quantize / prune), or a registered model models:/NAME/VERSION or models:/NAME@ALIAS "
    "(perfml register)"
)
CHECKPOINT_HELP = (
    "for a run directory: latest, best, or a checkpoint (a directory, or a name like "
    "step-00000020 under the run's checkpoints/)"
)


class UsageError(Exception):
    """Bad command-line input: reported on one line, exit code 2."""


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default: "(default: X)" is added to a help text that does not already
    say what the default is (options without a default, and flags, say nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or action.default == []
            or action.required
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def add_device(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument(
        "--device", choices=DEVICES, help=f"{what}default: cuda when available, else cpu"
    )


def add_dtype(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("--dtype", choices=DTYPE_NAMES, help=f"{what}default: bf16 on CUDA, fp32 on CPU")


def add_overrides(p: argparse.ArgumentParser, help: str) -> None:
    """--set KEY=VALUE, repeatable, and several pairs after one flag (--set a=1 b=2)."""
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help=f"{help}; repeatable, and several pairs may follow one --set (default: none)",
    )


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out (the new output is complete before the old one goes)",
    )


def add_no_verify(p: argparse.ArgumentParser) -> None:
    """--no-verify: load the model without checking its files against their manifests."""
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="load the model without checking its files' sizes and sha256 against its manifest",
    )


def device(name: str | None) -> torch.device:
    """The --device value as a torch.device; a UsageError for cuda without a CUDA device."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device cuda: no CUDA device is available (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda or 'none'}); use --device cpu"
        )
    return torch.device(name)


def dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The --dtype value as a torch dtype (default: bf16 on CUDA, fp32 on CPU)."""
    from perfml._dtypes import torch_dtype

    return torch_dtype(name or ("bf16" if device.type == "cuda" else "fp32"))


def train_errors() -> tuple[type[Exception], ...]:
    """The library's errors that are the user's input: bad config, bad or missing checkpoint."""
    from perfml.train import CheckpointError, ConfigError

    return ConfigError, CheckpointError


def model_errors() -> tuple[type[Exception], ...]:
    """train_errors() plus a path that is not a run or model directory (perfml.runs) and a file
    that differs from its manifest (perfml.lineage)."""
    from perfml.lineage import ManifestError
    from perfml.runs import RunError

    return (*train_errors(), RunError, ManifestError)


def load_model(path: str, checkpoint: str, verify: bool = True) -> Any:
    """perfml.runs.load_model (verify: check the files against their manifests; the commands'
    --no-verify), its errors as UsageErrors."""
    from perfml import runs

    try:
        return runs.load_model(path, checkpoint, verify=verify)
    except model_errors() as exc:
        raise UsageError(str(exc)) from None


def csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def shapes(text: str) -> tuple[tuple[int, ...], ...]:
    try:
        parsed = tuple(tuple(int(d) for d in part.split("x")) for part in csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shapes look like 1024x4096,2048x4096; got {text!r}"
        ) from None
    if not parsed or any(d <= 0 for shape in parsed for d in shape):
        raise argparse.ArgumentTypeError(f"shapes need positive sizes; got {text!r}")
    return parsed


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def print_run_summary(result: Any) -> None:
    """What `perfml train` and `perfml demo` print after a run: losses, where the files are."""
    import math

    run_dir = result.run_dir
    losses = []
    if result.train_loss is not None:
        losses.append(f"train loss {result.train_loss:.4f}")
    if result.val_loss is not None:
        ppl = math.exp(min(result.val_loss, 50.0))
        losses.append(f"val loss {result.val_loss:.4f} (ppl {ppl:.2f})")
    stopped = {"max_steps": "reached max_steps", "early_stop": "early stopping"}.get(
        result.stop_reason, f"stopped by {result.stop_reason}"
    )
    done = f"{result.tokens:,} tokens in {result.elapsed_s:.1f} s"
    print(f"step {result.step}: " + "; ".join([stopped, *losses, done]))
    print(f"run directory    {run_dir}")
    for label, name in (
        ("config", "config.yaml"),
        ("metrics", "metrics.jsonl"),
        ("loss curve", "loss.png"),
        ("tensorboard", "tensorboard"),
    ):
        if (run_dir / name).exists():
            print(f"  {label:<15}{run_dir / name}")
    if result.last_checkpoint is not None:
        print(f"  {'checkpoint':<15}{result.last_checkpoint}")
    if result.best_checkpoint is not None:
        print(f"  {'best':<15}{result.best_checkpoint}")
    if result.stop_reason not in ("max_steps", "early_stop"):
        print(f"resume with: perfml train --resume {run_dir}")
