"""The end-to-end `train_step` benchmark case (perfml/bench/cases/train_step.py)."""

import pytest
import torch

from perfml import bench
from perfml.bench.cases import train_step
from perfml.models.llama import Llama, LlamaConfig

CPU = torch.device("cpu")


def test_preset_follows_the_sequence_length():
    assert [train_step.preset_for(t) for t in (64, 256, 257, 1024, 2048)] == [
        "tiny",
        "tiny",
        "small",
        "small",
        "llama-1b",
    ]
    with pytest.raises(ValueError, match="4096 tokens"):
        train_step.preset_for(4096)


def test_flops_are_the_models_per_token_count():
    model = Llama(LlamaConfig.preset("tiny"))
    assert train_step.train_step_flops((3, 100), "fwd+bwd") == model.flops_per_token(100) * 300
    # llama-1b at the headline shape: 5.58 GFLOP per token, 45.7 TFLOP per step
    assert 4.56e13 < train_step.train_step_flops((4, 2048), "fwd+bwd") < 4.58e13


@pytest.mark.parametrize("fused", [False, True])
def test_one_call_is_one_optimizer_step(fused):
    spec, ids, labels = train_step._inputs((1, 8), torch.float32, CPU)
    step = train_step._TrainStep(fused=fused, compiled=False)
    loss = step(spec, ids, labels)
    model = step.forward
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = train_step._reference(spec, ids, labels)
    torch.testing.assert_close(loss, want)  # same seeded init as the reference
    loss.backward(torch.tensor(-3.0))  # the harness's random upstream gradient is ignored
    for name, p in model.named_parameters():
        assert p.grad is None, name  # zero_grad(set_to_none=True) ran after the backward
        assert not torch.equal(p.detach(), before[name]), name
    assert step.optimizer.state[model.embed_tokens.weight]["step"] == 1


def test_runs_in_the_harness():
    case = bench.get_case("train_step")
    config = bench.RunConfig(
        CPU, quick=True, cpu_budget_s=0.005, shapes=((1, 8),), impls=("eager",)
    )
    rows = bench.run([case], config)
    ran = {r["impl"]: r for r in rows if not r["skipped"]}
    assert set(ran) == {"eager"}
    for row in ran.values():
        assert row["error"] is None and row["mismatch"] is False, row
        assert row["tflops"] > 0
