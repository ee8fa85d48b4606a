"""DDP and FSDP2 through torchrun: two CPU processes (gloo) against one process on the same global
batch, checkpoints written once by rank 0 and loadable anywhere, FSDP resume."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from perfml.runs import evaluate as evaluate_run
from perfml.train import Trainer
from tests.train.conftest import config_args, read_rows, subprocess_env

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "perfml",
        *args,
    ]
    done = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_on_the_same_global_batch(make_config, tmp_path, parallel):
    # one step = 8 windows: one process 2 micro-batches of 4, or two ranks 2 micro-batches of 2
    settings = dict(max_steps=4, grad_accum=2, eval_every=2, ckpt_every=2, keep_last=0)
    single = Trainer(make_config("single", batch_size=4, **settings)).fit()
    config = make_config(parallel, batch_size=2, parallel=parallel, **settings)
    done = torchrun("train", *config_args(config))
    assert done.stdout.count("step 4: reached max_steps") == 1  # the summary comes from rank 0

    for split in ("train", "val"):
        one, two = read_rows(single.run_dir, split), read_rows(tmp_path / parallel, split)
        assert [r["step"] for r in two] == [r["step"] for r in one]  # one row per step: rank 0's
        assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    norms = [r["grad_norm"] for r in read_rows(single.run_dir)]
    assert [r["grad_norm"] for r in read_rows(tmp_path / parallel)] == pytest.approx(
        norms, rel=1e-4
    )
    assert read_rows(tmp_path / parallel)[-1]["tokens"] == 4 * 8 * 16

    # the checkpoint holds the full (gathered) model: one process evaluates it
    evaluated = evaluate_run(tmp_path / parallel)
    assert evaluated["step"] == 4
    assert evaluated["val_loss"] == pytest.approx(
        read_rows(single.run_dir, "val")[-1]["loss"], rel=1e-5
    )

    if parallel == "fsdp":  # each rank loads the full state back into its shard and continues
        before = read_rows(tmp_path / parallel)
        torchrun("train", "--resume", str(tmp_path / parallel / "checkpoints" / "step-00000002"))
        after = read_rows(tmp_path / parallel)
        assert [r["step"] for r in after] == [1, 2, 3, 4]
        assert [r["loss"] for r in after] == pytest.approx([r["loss"] for r in before], rel=1e-6)

    # the same checkpoint resumes in one process with the same global batch
    one = dataclasses.replace(config, batch_size=4, parallel="ddp")
    Trainer(one, resume=tmp_path / parallel / "checkpoints" / "step-00000002").fit()
    resumed = read_rows(tmp_path / parallel)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    single_losses = [r["loss"] for r in read_rows(single.run_dir)]
    assert [r["loss"] for r in resumed] == pytest.approx(single_losses, rel=1e-5)
