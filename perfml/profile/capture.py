"""Running the profiled steps: torch.profiler with a wait / warmup / active schedule, the NVML
sampler beside it, and the two workloads `perfml profile` knows (forward passes of a Llama
preset; steps of a perfml.train run through a Trainer callback).

Only the `active` steps are recorded; `wait` steps run unprofiled (first-call costs: lazy
initialization, Triton compilation, allocator growth) and `warmup` steps run with the profiler
on but discarded (its own start-up cost). On CUDA each step ends with a synchronize, so step
times and the NVML step marks are wall-clock true; a training step syncs anyway when it reads
its loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from perfml.profile.nvml import NvmlSampler
from perfml.train.callbacks import Callback

TRACE_FILE = "trace.json"

# what the profiler's native library prints to stderr at every start and stop (stage markers and
# USDT probe messages): not for the user, and not silenced by its log-level setting
_NATIVE_NOISE = ("USDT:", "STAGE:")


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Inside the block, file descriptor 2 goes to a temporary file; afterwards every line of it
    except the profiler's own noise is written to the real stderr, in order. (The noise comes from
    C++, below sys.stderr, so only the descriptor can catch it.)"""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [
                line
                for line in caught.read().splitlines(keepends=True)
                if not line.startswith(tuple(n.encode() for n in _NATIVE_NOISE))
            ]
            if kept:
                os.write(2, b"".join(kept))


class StepProfiler:
    """start(); then step() after each of wait + warmup + active steps; then stop()."""

    def __init__(
        self, device: torch.device, out_dir: Path, *, wait: int, warmup: int, active: int
    ) -> None:
        if wait < 0 or warmup < 0 or active < 1:
            raise ValueError(
                f"profile: needs wait >= 0, warmup >= 0 and at least one active step, got "
                f"wait={wait}, warmup={warmup}, steps={active}"
            )
        self.device = device
        self.wait, self.warmup, self.active = wait, warmup, active
        self.trace_path = out_dir / TRACE_FILE
        self.nvml = NvmlSampler(device)
        self.step_marks_s: list[float] = []  # end of each step, seconds since start
        self.peak_mib: float | None = None
        self.steps_done = 0
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            on_trace_ready=lambda prof: prof.export_chrome_trace(str(self.trace_path)),
            record_shapes=True,
            profile_memory=True,
            with_flops=True,
        )

    @property
    def total_steps(self) -> int:
        return self.wait + self.warmup + self.active

    @property
    def done(self) -> bool:
        return self.steps_done >= self.total_steps

    def start(self) -> None:
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.nvml.start()
        with _quiet_native_stderr():
            self.profiler.start()

    def step(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        with _quiet_native_stderr():
            self.profiler.step()
        self.steps_done += 1
        self.step_marks_s.append(time.perf_counter() - self.nvml.t0)

    def stop(self) -> None:
        with _quiet_native_stderr():
            self.profiler.stop()
        self.nvml.stop()
        if self.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20


@dataclasses.dataclass
class Workload:
    """What ran, for the report's header."""

    kind: str  # "forward" | "training"
    description: str
    tokens_per_step: int
    dtype: torch.dtype
    params: int


def run_forward(
    preset: str,
    out_dir: Path,
    *,
    steps: int,
    wait: int = 1,
    warmup: int = 1,
    device: torch.device,
    batch: int = 4,
    seq: int = 128,
    dtype: torch.dtype = torch.float32,
    fused: bool = True,
    model_args: dict[str, Any] | None = None,
) -> tuple[StepProfiler, Workload]:
    """Forward passes (no grad) of the Llama `preset` (fields overridden by model_args) on
    random token ids [batch, seq]."""
    from perfml.models.llama import Llama, LlamaConfig

    config = LlamaConfig.preset(preset, **{**(model_args or {}), "fused": fused})
    if not 1 <= seq <= config.max_seq_len or batch < 1:
        raise ValueError(
            f"profile: needs batch >= 1 and 1 <= seq <= {config.max_seq_len} for {preset}, "
            f"got batch {batch}, seq {seq}"
        )
    torch.manual_seed(0)
    model = Llama(config).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    profiler = StepProfiler(device, out_dir, wait=wait, warmup=warmup, active=steps)
    profiler.start()
    try:
        with torch.no_grad():
            while not profiler.done:
                model(ids)
                profiler.step()
    finally:
        profiler.stop()
    workload = Workload(
        kind="forward",
        description=(
            f"forward passes of Llama {preset} ({'fused' if fused else 'unfused'}), token ids "
            f"{batch}x{seq}, {str(dtype).removeprefix('torch.')}"
        ),
        tokens_per_step=batch * seq,
        dtype=dtype,
        params=model.num_params(),
    )
    return profiler, workload


class _ProfileCallback(Callback):
    """Starts the profiler when training starts and steps it after each optimizer step."""

    def __init__(self, out_dir: Path, wait: int, warmup: int, active: int) -> None:
        self.args = (out_dir, wait, warmup, active)
        self.profiler: StepProfiler | None = None
        self.trainer: Any = None

    def on_train_start(self, trainer: Any) -> None:
        out_dir, wait, warmup, active = self.args
        self.trainer = trainer
        self.profiler = StepProfiler(
            trainer.device, out_dir, wait=wait, warmup=warmup, active=active
        )
        self.profiler.start()

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if self.profiler is not None and not self.profiler.done:
            self.profiler.step()
            if self.profiler.done:
                self.profiler.stop()


def run_training(
    config: Any, out_dir: Path, *, steps: int, wait: int = 1, warmup: int = 1
) -> tuple[StepProfiler, Workload]:
    """Optimizer steps of the training run `config` (a perfml.train.TrainConfig): the run goes
    to out_dir/run with evaluation and periodic checkpoints off, for exactly wait + warmup +
    steps steps (it still writes its final checkpoint and evaluation after the profile)."""
    from perfml.train import Trainer
    from perfml.train.trainer import DTYPES

    run = dataclasses.replace(
        config,
        max_steps=wait + warmup + steps,
        eval_every=0,
        eval_batches=1,
        ckpt_every=0,
        early_stop_patience=0,
        loggers=["jsonl"],
        progress=False,
        out_dir=str(out_dir / "run"),
    )
    callback = _ProfileCallback(out_dir, wait, warmup, steps)
    Trainer(run, callbacks=[callback]).fit()
    profiler, trainer = callback.profiler, callback.trainer
    if profiler is None or not profiler.done:
        raise RuntimeError("profile: the training run stopped before the profiled steps ended")
    c = run
    workload = Workload(
        kind="training",
        description=(
            f"training steps of Llama {c.model} ({'fused' if c.fused else 'unfused'}), "
            f"batch {c.batch_size} x {c.seq_len} tokens x {c.grad_accum} micro-batches, "
            f"precision {trainer.precision}, optimizer {c.optimizer}"
        ),
        tokens_per_step=trainer.tokens_per_step,
        dtype=DTYPES.get(trainer.precision, torch.float32),
        params=trainer.model.num_params(),
    )
    return profiler, workload
