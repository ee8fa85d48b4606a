"""`perfml ab-report FILE`: per variant of a `perfml serve --request-log` file, the count,
latency p50/p90/p99, TTFT p50/p99 and tokens/s; and each variant's difference from the baseline
in mean latency and tokens/s with a bootstrap 95% confidence interval."""

from __future__ import annotations

import argparse
import json

from perfml.cli._common import UsageError, positive_int

HELP = "compare the variants of a perfml serve request log (latency, TTFT, tokens/s, bootstrap CIs)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="a request log (perfml serve --request-log)")
    p.add_argument(
        "--baseline",
        metavar="NAME",
        help="the variant the others are compared with (default: base, else the first by name)",
    )
    p.add_argument("--resamples", type=positive_int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.1f}"


def run(args: argparse.Namespace) -> int:
    from perfml.serve.ab import read_log, report

    try:
        result = report(read_log(args.file), args.baseline, args.resamples, args.seed)
    except OSError as exc:
        raise UsageError(f"{args.file}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    head = ("variant", "count", "lat p50", "lat p90", "lat p99", "ttft p50", "ttft p99", "tok/s")
    rows = [head]
    for name, v in result["variants"].items():
        rows.append(
            (
                name,
                str(v["count"]),
                *(_ms(v[k]) for k in ("latency_p50", "latency_p90", "latency_p99")),
                *(_ms(v[k]) for k in ("ttft_p50", "ttft_p99")),
                f"{v['tokens_per_s']:.1f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    print("(times in ms)")
    for r in rows:
        cells = zip(r, widths, strict=True)
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(cells)))
    base = result["baseline"]
    for name, diffs in result["differences"].items():
        lat, rate = diffs["latency_s"], diffs["tokens_per_s"]
        print(
            f"{name} - {base}: mean latency {1000 * lat['diff']:+.2f} ms "
            f"[95% CI {1000 * lat['low']:+.2f}, {1000 * lat['high']:+.2f}]; "
            f"tokens/s {rate['diff']:+.2f} [95% CI {rate['low']:+.2f}, {rate['high']:+.2f}]"
        )
    return 0
