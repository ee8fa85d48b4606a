"""A/B analysis of a `perfml serve --request-log` file (what `perfml ab-report` prints).

Per variant: the answered requests (status 200), latency and TTFT percentiles, tokens/s (per
request: completion_tokens / latency_s, averaged); per other variant against the baseline: the
difference of the means of latency and tokens/s with a bootstrap 95% confidence interval
(each variant resampled with replacement, independently, `resamples` times, from `seed`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["bootstrap_diff", "read_log", "report"]

METRICS = ("latency_s", "tokens_per_s")


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a request log; a ValueError naming the line of a damaged one."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not a JSON line ({exc})") from None
            if not isinstance(record, dict) or "variant" not in record:
                raise ValueError(f"{path}:{n}: a request record needs a 'variant'")
            records.append(record)
    return records


def bootstrap_diff(
    a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """mean(b) - mean(a) and its bootstrap 95% interval (percentile method)."""
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, len(a), size=(resamples, len(a)))
    ib = rng.integers(0, len(b), size=(resamples, len(b)))
    diffs = b[ib].mean(axis=1) - a[ia].mean(axis=1)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(b.mean() - a.mean()), float(low), float(high)


def _values(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    latency = np.array([float(r["latency_s"]) for r in records])
    tokens = np.array([float(r.get("completion_tokens") or 0) for r in records])
    ttft = np.array([float(r["ttft_s"]) for r in records if r.get("ttft_s") is not None])
    rate = np.divide(tokens, latency, out=np.zeros_like(tokens), where=latency > 0)
    return {"latency_s": latency, "ttft_s": ttft, "tokens_per_s": rate}


def report(
    records: list[dict[str, Any]],
    baseline: str | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """{"baseline", "variants": {name: {count, latency_p50/p90/p99, ttft_p50/p99,
    tokens_per_s, latency_mean}}, "differences": {name: {metric: {diff, low, high}}}}."""
    ok = [r for r in records if r.get("status", 200) == 200 and r.get("latency_s") is not None]
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        by_variant.setdefault(str(r["variant"]), []).append(r)
    if not by_variant:
        raise ValueError("the log holds no answered request (status 200)")
    names = sorted(by_variant)
    if baseline is None:
        baseline = "base" if "base" in by_variant else names[0]
    if baseline not in by_variant:
        raise ValueError(f"baseline {baseline!r} has no answered request (variants: {names})")
    values = {n: _values(by_variant[n]) for n in names}
    variants = {}
    for n in names:
        v = values[n]
        lat_p = np.percentile(v["latency_s"], [50, 90, 99])
        ttft_p = np.percentile(v["ttft_s"], [50, 99]) if len(v["ttft_s"]) else [None, None]
        variants[n] = {
            "count": len(by_variant[n]),
            "latency_mean": float(v["latency_s"].mean()),
            "latency_p50": float(lat_p[0]),
            "latency_p90": float(lat_p[1]),
            "latency_p99": float(lat_p[2]),
            "ttft_p50": None if ttft_p[0] is None else float(ttft_p[0]),
            "ttft_p99": None if ttft_p[1] is None else float(ttft_p[1]),
            "tokens_per_s": float(v["tokens_per_s"].mean()),
        }
    differences = {}
    for n in names:
        if n == baseline:
            continue
        differences[n] = {}
        for metric in METRICS:
            diff, low, high = bootstrap_diff(
                values[baseline][metric], values[n][metric], resamples, seed
            )
            differences[n][metric] = {"diff": diff, "low": low, "high": high}
    return {"baseline": baseline, "variants": variants, "differences": differences}
