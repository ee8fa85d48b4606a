"""The Trainer on a CUDA device: bf16 autocast over the fused (Triton) model, the MFU peak of a
known card, and resume after SIGTERM."""

import pytest
import torch

from perfml.train import Trainer, load_checkpoint
from tests.train.conftest import read_rows
from tests.train.test_trainer import SignalAt

pytestmark = pytest.mark.gpu

GPU_MODEL = {
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "max_seq_len": 256,
}


def gpu_config(make_config, name, **overrides):
    settings = dict(
        device="cuda",
        precision="bf16",
        fused=True,
        model_args=GPU_MODEL,
        seq_len=128,
        batch_size=8,
        max_steps=30,
        lr=3e-3,
        eval_every=10,
        ckpt_every=10,
    )
    return make_config(name, **{**settings, **overrides})


def test_bf16_fused_training_learns_and_reports_mfu(make_config):
    result = Trainer(gpu_config(make_config, "bf16")).fit()
    rows = read_rows(result.run_dir)
    losses = [r["loss"] for r in rows]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert all(0 < r["mfu"] < 1 for r in rows[5:])
    meta = load_checkpoint(result.last_checkpoint, model_only=True).meta
    assert meta["precision"] == "bf16"
    name = torch.cuda.get_device_name()
    if any(card in name for card in ("H100", "H200")):
        assert meta["mfu_peak"]["flops"] == pytest.approx(989.4e12)
        assert meta["mfu_peak"]["source"] == f"{name} datasheet"


def test_resume_after_sigterm_on_cuda(make_config):
    settings = dict(max_steps=12, grad_accum=2, deterministic=True)
    straight = Trainer(gpu_config(make_config, "straight", **settings)).fit()
    config = gpu_config(make_config, "interrupted", **settings)
    assert Trainer(config, callbacks=[SignalAt(5)]).fit().step == 5
    resumed = Trainer(config, resume=config.out_dir).fit()
    a, b = read_rows(straight.run_dir), read_rows(resumed.run_dir)
    assert [r["step"] for r in b] == list(range(1, 13))
    # torch's deterministic algorithms; perfml's kernels may still sum in a varying order, which
    # stays far below the loss change of a wrong batch or optimizer state
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
