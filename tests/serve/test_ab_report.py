"""`perfml ab-report` and perfml.serve.ab on synthetic request logs whose answer the test
computes: the per-variant numbers, the mean differences and their bootstrap intervals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from perfml import cli
from perfml.serve.ab import bootstrap_diff, read_log, report


def write_log(path, rng, n_base=400, n_b=300, shift=0.2):
    records = []
    for variant, n, mean in (("base", n_base, 1.0), ("b", n_b, 1.0 + shift)):
        latency = rng.normal(mean, 0.1, n).clip(0.05)
        tokens = rng.integers(20, 40, n)
        ttft = latency * 0.1
        for lat, tok, t in zip(latency, tokens, ttft, strict=True):
            records.append(
                {
                    "time": 0.0,
                    "variant": variant,
                    "prompt_tokens": 5,
                    "completion_tokens": int(tok),
                    "ttft_s": float(t),
                    "latency_s": float(lat),
                    "finish_reason": "length",
                    "status": 200,
                }
            )
    # refused requests do not count
    records.append({"variant": "b", "latency_s": 99.0, "status": 429, "completion_tokens": 0})
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return records


def test_report_numbers_and_the_known_difference(tmp_path):
    rng = np.random.default_rng(7)
    log = tmp_path / "requests.jsonl"
    records = write_log(log, rng)
    result = report(read_log(log), resamples=1000, seed=3)
    assert result["baseline"] == "base"
    ok = [r for r in records if r["status"] == 200]
    lat = {v: np.array([r["latency_s"] for r in ok if r["variant"] == v]) for v in ("base", "b")}
    rate = {
        v: np.array([r["completion_tokens"] / r["latency_s"] for r in ok if r["variant"] == v])
        for v in ("base", "b")
    }
    for v in ("base", "b"):
        got = result["variants"][v]
        assert got["count"] == len(lat[v])
        assert got["latency_p90"] == pytest.approx(np.percentile(lat[v], 90))
        assert got["ttft_p99"] == pytest.approx(np.percentile(lat[v] * 0.1, 99))
        assert got["tokens_per_s"] == pytest.approx(rate[v].mean())
    d = result["differences"]["b"]["latency_s"]
    known = lat["b"].mean() - lat["base"].mean()
    assert d["diff"] == pytest.approx(known)
    assert d["low"] < known < d["high"]
    assert d["low"] > 0.15 and d["high"] < 0.25  # the shift is 0.2, the noise sd/sqrt(n) ~0.006
    stderr = np.sqrt(lat["b"].var() / len(lat["b"]) + lat["base"].var() / len(lat["base"]))
    assert d["high"] - d["low"] == pytest.approx(2 * 1.96 * stderr, rel=0.2)
    r = result["differences"]["b"]["tokens_per_s"]
    assert r["diff"] == pytest.approx(rate["b"].mean() - rate["base"].mean())
    assert r["high"] < 0  # slower requests, fewer tokens per second
    # the same seed, the same interval
    assert report(read_log(log), resamples=1000, seed=3) == result


def test_no_difference_gives_an_interval_around_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 0.1, 500)
    b = rng.permutation(a)
    diff, low, high = bootstrap_diff(a, b, resamples=2000, seed=1)
    assert diff == pytest.approx(0.0, abs=1e-12)
    assert low < 0 < high


def test_cli_prints_each_variant_and_the_difference(tmp_path, capsys):
    log = tmp_path / "requests.jsonl"
    write_log(log, np.random.default_rng(1))
    assert cli.main(["ab-report", str(log), "--resamples", "500"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["variant", "count"]
    assert [line.split()[0] for line in lines[2:4]] == ["b", "base"]
    assert "b - base: mean latency +" in out and "95% CI" in out
    assert cli.main(["ab-report", str(log), "--json", "--baseline", "b"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["baseline"] == "b" and result["differences"]["base"]["latency_s"]["diff"] < 0


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"variant": "a", "latency_s": 1, "status": 200}\nnot json\n')
    assert cli.main(["ab-report", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert cli.main(["ab-report", str(tmp_path / "missing.jsonl")]) == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"variant": "a", "latency_s": 1, "status": 500}\n')
    assert cli.main(["ab-report", str(empty)]) == 2
    assert "no answered request" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text('{"variant": "a", "latency_s": 1, "status": 200, "completion_tokens": 2}\n')
    assert cli.main(["ab-report", str(good), "--baseline", "zz"]) == 2
