"""perfml.bench.ceilings: the CPU cache size from sysfs, the CPU copy size, the copy ceiling as
the fastest of its streaming copies, and the cache-resident marking of rows (deterministic: fake
sysfs trees and fake timers, no timing compared against timing)."""

import pytest
import torch

from perfml import bench
from perfml.bench import ceilings
from perfml.bench.runner import cache_resident
from perfml.bench.timing import Timing

CPU = torch.device("cpu")
MiB = 2**20


def _cache_tree(root, caches):
    for i, (level, kind, size) in enumerate(caches):
        d = root / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    return root


def test_cpu_cache_bytes_is_the_largest_data_or_unified_cache(tmp_path):
    root = _cache_tree(
        tmp_path / "cache",
        [
            (1, "Data", "32K"),
            (1, "Instruction", "64M"),
            (2, "Unified", "1024K"),
            (3, "Unified", "32768K"),
        ],
    )
    assert ceilings.cpu_cache_bytes(root) == 32768 * 2**10
    assert ceilings.cpu_cache_bytes(_cache_tree(tmp_path / "m", [(2, "Unified", "2M")])) == 2 * MiB
    assert ceilings.cpu_cache_bytes(tmp_path / "absent") is None
    assert ceilings.cpu_cache_bytes(_cache_tree(tmp_path / "bad", [(3, "Unified", "?")])) is None


def test_cpu_copy_bytes_is_four_caches_within_bounds():
    assert ceilings.cpu_copy_bytes(32 * MiB) == 128 * MiB
    assert ceilings.cpu_copy_bytes(1 * MiB) == ceilings.CPU_COPY_MIN_BYTES
    assert ceilings.cpu_copy_bytes(2**30) == ceilings.CPU_COPY_MAX_BYTES
    assert ceilings.cpu_copy_bytes(None) == ceilings.CPU_COPY_UNKNOWN_CACHE_BYTES


class _ScriptedTimer:
    """Runs each step once (so it really is callable) and reports the scripted times in order."""

    def __init__(self, ms):
        self.ms = list(ms)
        self.calls = 0

    def time(self, step, leaves=()):
        step()
        ms = self.ms[self.calls]
        self.calls += 1
        return Timing(ms, ms, 1)

    def peak_mib(self, step, leaves=()):
        return None


def test_copy_ceiling_is_the_fastest_method():
    methods = list(ceilings._copies(torch.empty(4), torch.empty(4)))
    assert methods[0] == "copy_" and len(methods) >= 2  # at least copy_ and add_out on CPU
    nbytes = 4 * MiB
    ms = [4.0] * len(methods)
    ms[1] = 1.0  # the second method is the fastest
    timer = _ScriptedTimer(ms)
    gbps, method = ceilings.copy_ceiling(timer, CPU, nbytes)
    assert timer.calls == len(methods)
    assert method == methods[1]
    assert gbps == pytest.approx(2 * nbytes / 1e-3 / 1e9)


def test_each_copy_method_copies():
    src, dst = torch.arange(10.0), torch.zeros(10)
    for name, step in ceilings._copies(src, dst).items():
        dst.zero_()
        step()
        assert torch.equal(dst, src), name


def test_measure_ceilings_copies_beyond_the_cache(monkeypatch):
    monkeypatch.setattr(ceilings, "cpu_cache_bytes", lambda: 40 * MiB)
    monkeypatch.setattr(ceilings, "matmul_tflops", lambda *args: 1.0)
    sizes = []

    def fake_ceiling(timer, device, nbytes):
        sizes.append(nbytes)
        return 20.0, "copy_"

    monkeypatch.setattr(ceilings, "copy_ceiling", fake_ceiling)
    got = ceilings.measure_ceilings(_ScriptedTimer([]), CPU, quick=True)
    assert sizes == [160 * MiB]
    assert got["copy_mib"] == 160 and got["cache_mib"] == 40 and got["copy_method"] == "copy_"


def test_cache_resident():
    assert cache_resident(2 * MiB, 2.0) is True
    assert cache_resident(2 * MiB + 1, 2.0) is False
    assert cache_resident(None, 2.0) is None and cache_resident(10, None) is None


@pytest.mark.parametrize("cache", [1 * MiB, 16])
def test_run_marks_rows_that_fit_in_the_cache(tiny, monkeypatch, cache):
    monkeypatch.setattr(ceilings, "cache_bytes", lambda device: cache)
    config = bench.RunConfig(CPU, quick=True, cpu_budget_s=0.005, modes=("fwd",), impls=("eager",))
    (row,) = bench.run([tiny], config)
    assert row["cache_mib"] == cache / MiB
    assert row["bytes"] > 16  # the tiny case's traffic: beyond 16 bytes, within 1 MiB
    assert row["cache_resident"] is (cache == 1 * MiB)
    text = bench.render_table([row])
    assert ("cache-resident" in text) is row["cache_resident"]
    if row["cache_resident"]:
        assert "fits in the 1 MiB last-level cache" in text
