"""The speed gate: the verdict from per-round timings, the interleaved rounds, and the runner hook
on the tiny case, with scripted timers (no real timing decides anything here)."""

import contextlib
import dataclasses

import pytest
import torch

from perfml import bench
from perfml.bench import runner
from perfml.bench.gate import Contender, Gate, Threshold, decide, interleave
from perfml.bench.timing import Timing
from tests.bench.helpers import tiny_case

CPU = torch.device("cpu")
QUICK = bench.RunConfig(CPU, quick=True, cpu_budget_s=0.005, modes=("fwd",))


def test_slower_beyond_the_ratio_fails_within_it_passes():
    perfml, eager = [1.2, 1.2, 1.2], [1.0, 1.0, 1.0]
    assert decide(perfml, eager, 1.0).slower
    assert not decide(perfml, eager, 1.25).slower
    assert not decide([1.0, 1.0], [1.0, 1.0], 1.0).slower  # equal is not slower
    verdict = decide([0.5, 0.5, 0.5], [1.0, 1.0, 1.0], 1.0)
    assert verdict.ratio == pytest.approx(0.5) and not verdict.slower


def test_the_median_of_per_round_ratios_decides_not_the_ratio_of_medians():
    # ratios 2, 0.4, 1.2 -> median 1.2; the medians 2 ms / 2.5 ms would say 0.8
    fails = decide([1.0, 2.0, 3.0], [0.5, 5.0, 2.5], 1.0)
    assert fails.ratio == pytest.approx(1.2) and fails.slower
    assert fails.perfml_ms == pytest.approx(2.0) and fails.impl_ms == pytest.approx(2.5)
    # ratios 0.5, 1.2, 0.3 -> median 0.5; the medians 3 ms / 2.5 ms would say 1.2
    passes = decide([1.0, 3.0, 3.0], [2.0, 2.5, 10.0], 1.0)
    assert passes.ratio == pytest.approx(0.5) and not passes.slower


def test_the_spread_is_the_interquartile_range_of_the_ratios():
    verdict = decide([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5, 10.0)
    assert (verdict.q1, verdict.ratio, verdict.q3) == pytest.approx((2.0, 3.0, 4.0))
    assert verdict.rounds == 5
    single = decide([2.0], [1.0], 1.0)
    assert single.q1 == single.q3 == pytest.approx(2.0)


def test_rounds_must_pair_up():
    with pytest.raises(ValueError, match="same positive number of rounds"):
        decide([1.0, 2.0], [1.0], 1.0)
    with pytest.raises(ValueError):
        decide([], [], 1.0)


class ScriptedTimer:
    """Runs the step once (so it says who it is) and answers that impl's scripted time."""

    def __init__(self, ms: dict[str, list[float]], calls: list[str]) -> None:
        self.ms = {name: list(times) for name, times in ms.items()}
        self.calls = calls
        self.order: list[str] = []

    def time(self, step, leaves=()):
        for t in leaves:
            t.grad = None
        step()
        name = self.calls[-1]
        self.order.append(name)
        times = self.ms[name]
        ms = times.pop(0) if len(times) > 1 else times[0]
        return Timing(ms, ms, 1)

    def peak_mib(self, step, leaves=()):
        return None


def _contender(name: str, calls: list[str]) -> Contender:
    return Contender(name, lambda: calls.append(name), (), contextlib.nullcontext)


def test_rounds_alternate_perfml_and_the_other_impl():
    calls: list[str] = []
    timer = ScriptedTimer({"perfml": [1.0], "eager": [2.0]}, calls)
    a, b = interleave(_contender("perfml", calls), _contender("eager", calls), timer, rounds=4)
    assert timer.order == ["perfml", "eager"] * 4
    assert a == [1.0] * 4 and b == [2.0] * 4


def test_rounds_stop_early_once_the_budget_is_spent_but_not_before_min_rounds():
    calls: list[str] = []
    clock = iter(float(i) for i in range(100))  # one second per reading
    timer = ScriptedTimer({"perfml": [1.0], "eager": [2.0]}, calls)
    a, _ = interleave(
        _contender("perfml", calls),
        _contender("eager", calls),
        timer,
        rounds=9,
        min_rounds=3,
        budget_s=0.5,
        clock=lambda: next(clock),
    )
    assert len(a) == 3 and timer.order == ["perfml", "eager"] * 3


def test_each_side_runs_inside_its_impls_context():
    entered: list[str] = []

    @contextlib.contextmanager
    def ctx(name):
        entered.append(name)
        yield

    calls: list[str] = []
    first = Contender("perfml", lambda: calls.append("perfml"), (), lambda: ctx("perfml"))
    second = Contender("eager", lambda: calls.append("eager"), (), lambda: ctx("eager"))
    interleave(first, second, ScriptedTimer({"perfml": [1.0], "eager": [1.0]}, calls), rounds=2)
    assert entered == ["perfml", "eager", "perfml", "eager"]


def _recording(name: str, fn, calls: list[str]) -> bench.Impl:
    def make():
        def call(*args):
            calls.append(name)
            return fn(*args)

        return call

    return bench.Impl(name, make=make)


def _gated_case(calls: list[str], perfml=lambda x: x.mul(2.0)) -> bench.Case:
    extra = tiny_case("wrong", "raises", "absent").impls
    return dataclasses.replace(
        tiny_case(),
        impls=(
            _recording("perfml", perfml, calls),
            _recording("eager", lambda x: x * 2, calls),
            _recording("slowpoke", lambda x: x + x, calls),
            *extra,
        ),
    )


def _run_gate(case, thresholds, ms, calls, config=QUICK):
    timer = ScriptedTimer(ms, calls)
    gate = Gate(thresholds, CPU, timer=timer, rounds=5)
    bench.run([case], config, on_group=gate)
    return gate, timer


def test_the_gate_compares_every_group_and_names_the_slower_rows():
    calls: list[str] = []
    case = _gated_case(calls)
    ms = {"perfml": [1.0], "eager": [0.5], "slowpoke": [4.0]}
    config = dataclasses.replace(QUICK, modes=("fwd", "fwd+bwd"))
    gate, timer = _run_gate(case, [Threshold("eager"), Threshold("slowpoke")], ms, calls, config)
    assert timer.order == ["perfml", "eager"] * 5 + ["perfml", "slowpoke"] * 5 + (
        ["perfml", "eager"] * 5 + ["perfml", "slowpoke"] * 5
    )
    by = {(c.mode, c.threshold.impl): c for c in gate.comparisons}
    assert by["fwd", "eager"].verdict.slower and by["fwd+bwd", "eager"].verdict.slower
    assert by["fwd", "eager"].verdict.ratio == pytest.approx(2.0)
    assert not by["fwd", "slowpoke"].verdict.slower
    assert [c.label for c in gate.failed] == [
        "tiny_double 4x16 float32 fwd", "tiny_double 4x16 float32 fwd+bwd",
    ]  # fmt: skip
    line = gate.verdict_line()
    assert line.startswith("gate: FAILED: 2 rows slower than eager: tiny_double 4x16 float32 fwd")
    assert "(2.00x)" in line and "slowpoke" not in line


def test_within_the_ratio_the_gate_passes_and_says_how_many_rows_it_compared():
    calls: list[str] = []
    ms = {"perfml": [1.05], "eager": [1.0]}
    gate, _ = _run_gate(_gated_case(calls), [Threshold("eager", 1.1)], ms, calls)
    assert not gate.failed
    assert gate.verdict_line() == "gate: 1 row compared, 0 slower than eager by more than 1.1x"
    report = gate.report()
    assert "ratio 1.050 (IQR 1.050-1.050, 5 rounds)  ok" in report[1]


def test_rows_without_the_impl_are_not_compared_and_not_failures():
    calls: list[str] = []
    thresholds = [Threshold("absent"), Threshold("wrong"), Threshold("raises")]
    gate, timer = _run_gate(_gated_case(calls), thresholds, {}, calls)
    assert timer.order == [] and not gate.failed
    reasons = [c.not_compared for c in gate.comparisons]
    assert reasons == [
        "absent: not on this machine",
        "wrong does not match the reference",
        "raises raised: RuntimeError: kernel exploded",
    ]
    assert "vs absent: not compared (absent: not on this machine)" in gate.report()[1]
    assert gate.verdict_line() == (
        "gate: 0 rows compared, 0 slower than absent, 1 not compared; 0 rows compared, 0 slower "
        "than wrong, 1 not compared; 0 rows compared, 0 slower than raises, 1 not compared"
    )


def test_a_case_without_perfml_or_the_impl_is_not_compared():
    calls: list[str] = []
    case = dataclasses.replace(tiny_case("eager"), name="no_perfml")
    gate, _ = _run_gate(case, [Threshold("eager")], {}, calls)
    assert [c.not_compared for c in gate.comparisons] == ["no perfml impl in this run"]
    gate, _ = _run_gate(_gated_case(calls), [Threshold("torch")], {}, calls)
    assert [c.not_compared for c in gate.comparisons] == ["no torch impl in this run"]


def test_a_wrong_perfml_fails_the_gate_however_fast():
    calls: list[str] = []
    case = _gated_case(calls, perfml=lambda x: x * 3)
    gate, timer = _run_gate(case, [Threshold("eager")], {"perfml": [0.1], "eager": [1.0]}, calls)
    assert timer.order == []
    assert [c.failure for c in gate.failed] == ["perfml does not match the reference"]
    assert gate.verdict_line() == (
        "gate: FAILED: 1 row where perfml failed vs eager: tiny_double 4x16 float32 fwd "
        "(perfml does not match the reference)"
    )


def test_without_the_gate_the_runner_keeps_no_prepared_steps(monkeypatch):
    kept: list[object] = []
    real = runner.measure

    def spy(problem, impl, timer, keep=None):
        kept.append(keep)
        return real(problem, impl, timer, keep)

    monkeypatch.setattr(runner, "measure", spy)
    bench.run([tiny_case("eager", "perfml")], QUICK)
    assert kept == [None, None]
