"""Learning-rate schedules: warmup, cosine, warmup-stable-decay, constant, and their scheduler."""

import math

import pytest
import torch

from perfml.train.schedule import build_scheduler, lr_multiplier


def curve(schedule, max_steps=100, warmup=10, **kw):
    fn = lr_multiplier(schedule, max_steps=max_steps, warmup_steps=warmup, **kw)
    return [fn(s) for s in range(max_steps)]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "wsd"])
def test_linear_warmup_reaches_the_peak_without_a_zero_step(schedule):
    values = curve(schedule, min_lr_ratio=0.1)
    assert values[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert values[9] == 1.0 and min(values) > 0


def test_cosine_ends_at_min_ratio_through_the_midpoint():
    values = curve("cosine", max_steps=101, warmup=0, min_lr_ratio=0.1)
    assert values[0] == 1.0 and values[-1] == pytest.approx(0.1)
    assert values[50] == pytest.approx(0.55)  # half way: the mean of peak and floor
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_wsd_is_stable_then_decays_linearly_over_the_last_fraction():
    values = curve("wsd", max_steps=100, warmup=10, min_lr_ratio=0.0, decay_fraction=0.2)
    assert values[10:80] == [1.0] * 70
    assert values[80] == 1.0 and values[-1] == pytest.approx(0.0)
    decay = values[80:]
    steps = [a - b for a, b in zip(decay, decay[1:], strict=False)]
    assert steps == pytest.approx([1 / 19] * 19)


def test_constant_after_warmup():
    assert curve("constant", warmup=5)[5:] == [1.0] * 95


def test_warmup_longer_than_the_run_is_clamped():
    values = curve("cosine", max_steps=4, warmup=10, min_lr_ratio=0.0)
    assert values == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_unknown_schedule():
    with pytest.raises(ValueError, match="schedule must be constant, cosine or wsd; got 'step'"):
        lr_multiplier("step", max_steps=10, warmup_steps=0)


def test_scheduler_drives_the_optimizer_and_its_state_is_plain():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = build_scheduler(
        opt, "cosine", max_steps=5, warmup_steps=1, min_lr_ratio=0.0, decay_fraction=0.2
    )
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [2.0] + [2.0 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(4)]
    assert seen == pytest.approx(expected, abs=1e-12)
    state = sched.state_dict()
    assert state["lr_lambdas"] == [None]  # the closure is rebuilt from the config, not pickled
