"""The load benchmark of `perfml serve` (`perfml bench serve MODEL_DIR`).

It starts the real server (`perfml serve MODEL_DIR` as a subprocess on a loopback port), waits for
/readyz, and drives it at each concurrency level with a bounded async client: N streamed greedy
requests in all, at most C in flight. Per level it reports output tokens/s (total completion
tokens from the responses' usage / wall time), time to first token (the first SSE chunk) p50/p99,
time per output token p50/p99 (per request: (latency - ttft) / (completion_tokens - 1)),
requests/s and errors.

Baselines at the same levels:
- "batch1": the same server started with --max-batch 1 (one request decoded at a time);
- "hf": one-request-at-a-time eager generation without a server: perfml's own Llama.generate per
  request on the same weights (the Hugging Face generate loop: a KV cache, one token per forward).
  The C clients of a level are simulated over the measured sequential timings: request j arrives
  when request j - C finishes (the first C at time 0), so its TTFT includes its wait in line.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import perfml

__all__ = [
    "BASELINES",
    "SERVE",
    "LoadConfig",
    "RequestResult",
    "ServeLoadError",
    "ServerFailed",
    "ServerProcess",
    "drive",
    "hf_level",
    "make_prompts",
    "percentile",
    "render_table",
    "run",
    "summarize",
]

SERVE = "perfml serve"
BASELINES = ("batch1", "hf")
READY_TIMEOUT_S = 180.0
TAIL_CHARS = 2000
_PACKAGE_PARENT = Path(perfml.__file__).resolve().parent.parent


class ServeLoadError(ValueError):
    """Bad input to the benchmark (a missing model, bad sizes, a port in use)."""


class ServerFailed(RuntimeError):
    """The server process did not become ready (its output's tail is in the message)."""


@dataclass(frozen=True)
class LoadConfig:
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int = 64
    max_tokens: int = 32
    prompt_len: int = 16
    device: str = "cpu"
    baselines: tuple[str, ...] = BASELINES
    port: int | None = None  # the first server's port (None: a free one each time)
    warmup: int = 2  # requests sent to each server before its first level (not measured)
    threads: int | None = None  # torch threads of the servers and of hf (None: torch's default)

    def check(self) -> None:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ServeLoadError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.threads is not None and self.threads < 1:
            raise ServeLoadError(f"threads must be >= 1, got {self.threads}")
        for name in ("requests", "max_tokens", "prompt_len"):
            if getattr(self, name) < 1:
                raise ServeLoadError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ServeLoadError(
                f"unknown baseline(s) {', '.join(unknown)}; known: {', '.join(BASELINES)}"
            )


@dataclass
class RequestResult:
    """One request as the client saw it (seconds from when it was sent)."""

    ttft_s: float | None = None
    latency_s: float | None = None
    completion_tokens: int = 0
    error: str | None = None


# --- prompts --------------------------------------------------------------------------------


def _source_text() -> str:
    """Fixed text to cut prompts from: a few of the Python standard library's own sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in ("bisect.py", "heapq.py", "textwrap.py", "shlex.py"):
        path = stdlib / name
        if path.is_file():
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(parts) or "def f(x):\n    return x + 1\n" * 64


def make_prompts(tokenizer: Any, n: int, prompt_len: int) -> list[str]:
    """n distinct prompts that each encode to exactly prompt_len tokens (windows of fixed
    standard-library text; repeated when the text has fewer windows)."""
    ids = tokenizer.encode(_source_text())
    prompts: list[str] = []
    step = max(1, prompt_len)
    for start in range(0, max(0, len(ids) - prompt_len), step):
        text = tokenizer.decode(ids[start : start + prompt_len])
        if text.strip() and "\ufffd" not in text and len(tokenizer.encode(text)) == prompt_len:
            prompts.append(text)
        if len(prompts) == n:
            break
    if not prompts:
        raise ServeLoadError(
            f"no prompt of exactly {prompt_len} tokens could be cut from the fixed text"
        )
    return [prompts[i % len(prompts)] for i in range(n)]


# --- statistics -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between ranks; None when empty."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000.0 * x, 3)


def summarize(
    system: str, concurrency: int, results: Sequence[RequestResult], wall_s: float
) -> dict[str, Any]:
    """One row of a level: throughput, TTFT and TPOT percentiles, errors."""
    ok = [r for r in results if r.error is None]
    tokens = sum(r.completion_tokens for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [
        (r.latency_s - r.ttft_s) / (r.completion_tokens - 1)
        for r in ok
        if r.ttft_s is not None and r.latency_s is not None and r.completion_tokens > 1
    ]
    errors = [r.error for r in results if r.error is not None]
    return {
        "system": system,
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "completion_tokens": tokens,
        "wall_s": round(wall_s, 6),
        "tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
        "requests_per_s": round(len(ok) / wall_s, 3) if wall_s > 0 else None,
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p99_ms": _ms(percentile(ttft, 99)),
        "tpot_p50_ms": _ms(percentile(tpot, 50)),
        "tpot_p99_ms": _ms(percentile(tpot, 99)),
    }


# --- the client -----------------------------------------------------------------------------


async def _one(client: Any, payload: dict[str, Any]) -> RequestResult:
    result = RequestResult()
    sent = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {response.status_code}: {body[:200]}"
                return result
            usage = None
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if result.ttft_s is None:
                    result.ttft_s = time.perf_counter() - sent
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message", chunk["error"]))
                usage = chunk.get("usage", usage)
            result.latency_s = time.perf_counter() - sent
            if usage is None and result.error is None:
                result.error = "the stream ended without usage"
            elif usage is not None:
                result.completion_tokens = int(usage["completion_tokens"])
    except Exception as exc:  # a transport error is one failed request, not the benchmark
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def _drive(
    url: str, prompts: Sequence[str], concurrency: int, max_tokens: int, timeout_s: float
) -> tuple[list[RequestResult], float]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

        async def bounded(prompt: str) -> RequestResult:
            async with sem:
                payload = {
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                    "stream": True,
                }
                return await _one(client, payload)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        wall = time.perf_counter() - start
    return list(results), wall


def drive(
    url: str,
    prompts: Sequence[str],
    concurrency: int,
    max_tokens: int,
    timeout_s: float = 300.0,
) -> tuple[list[RequestResult], float]:
    """Send one streamed greedy request per prompt to url's /v1/completions, at most
    `concurrency` in flight; (per-request results in prompt order, wall seconds)."""
    return asyncio.run(_drive(url, prompts, concurrency, max_tokens, timeout_s))


# --- the server -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_port(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ServeLoadError(
                f"port {port} on 127.0.0.1 is in use ({exc.strerror or exc}); give another "
                "--port or leave it out for a free one"
            ) from None


def _tail(text: str) -> str:
    return text if len(text) <= TAIL_CHARS else "..." + text[-TAIL_CHARS:]


class ServerProcess:
    """`perfml serve MODEL_DIR ARGS` on 127.0.0.1:port, ready when start() returns."""

    def __init__(
        self,
        model_dir: str | Path,
        args: Sequence[str],
        port: int | None = None,
        threads: int | None = None,
    ) -> None:
        self.threads = threads
        if port is not None:
            _check_port(port)
        self.port = _free_port() if port is None else port
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [
            sys.executable,
            "-m",
            "perfml",
            "serve",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *args,
        ]
        self.proc: subprocess.Popen | None = None
        self._log: TextIO | None = None

    def output(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> ServerProcess:
        import httpx

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PACKAGE_PARENT), env.get("PYTHONPATH")) if p
        )
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        self._log = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, text=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                self.close()
                raise ServerFailed(
                    f"`perfml serve` exited {code} before it was ready; its output ends:\n"
                    f"{_tail(self._output_after_close)}"
                )
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.close()
        raise ServerFailed(
            f"`perfml serve` was not ready in {timeout_s:.0f} s; its output ends:\n"
            f"{_tail(self._output_after_close)}"
        )

    _output_after_close = ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # drains: nothing is in flight by now
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None and not self._log.closed:
            self._output_after_close = self.output()
            self._log.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the eager baseline ---------------------------------------------------------------------


def hf_level(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    concurrency: int,
    max_tokens: int,
    device: Any,
) -> tuple[list[RequestResult], float]:
    """Llama.generate per request, one at a time, greedy, stopping at eos like the server;
    the closed-loop clients of `concurrency` are simulated over the measured times (see the
    module's doc). (results, wall seconds)."""
    import torch

    eos = getattr(tokenizer, "eos_id", None)
    first_logits: list[float] = []
    plain_logits = model.logits

    def timed_logits(*a: Any, **kw: Any) -> Any:
        out = plain_logits(*a, **kw)
        if not first_logits:
            if out.device.type == "cuda":
                torch.cuda.synchronize(out.device)
            first_logits.append(time.perf_counter())
        return out

    spans: list[tuple[float, float, float, int]] = []  # start, first token, end, tokens
    model.logits = timed_logits  # the instance attribute shadows the method for generate()
    try:
        with torch.inference_mode():
            for prompt in prompts:
                ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
                first_logits.clear()
                start = time.perf_counter()
                out = model.generate(ids, max_tokens, temperature=0.0, eos_token_id=eos)
                new = out[0, ids.shape[1] :].tolist()
                end = time.perf_counter()
                n = new.index(eos) + 1 if eos is not None and eos in new else len(new)
                spans.append((start, first_logits[0], end, n))
    finally:
        del model.logits
    t0 = spans[0][0]
    results = []
    for j, (_, first, end, n) in enumerate(spans):
        arrived = t0 if j < concurrency else spans[j - concurrency][2]
        results.append(RequestResult(first - arrived, end - arrived, n))
    return results, spans[-1][2] - t0


# --- the whole benchmark --------------------------------------------------------------------


def run(
    model_dir: str | Path,
    config: LoadConfig,
    out: str | Path | None = None,
    progress: TextIO | None = None,
    extra_server_args: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Every system (perfml serve, then the baselines) at every level; the rows (also appended
    to `out` as JSON lines, as each is measured)."""
    import torch

    from perfml import runs
    from perfml.bench.env import environment

    config.check()
    path = Path(model_dir)
    if not path.exists():
        raise ServeLoadError(f"{model_dir}: no such model or run directory")
    loaded = runs.load_model(path, "latest")
    tokenizer = loaded.tokenizer()
    max_seq = loaded.model.config.max_seq_len
    if config.prompt_len + config.max_tokens > max_seq:
        raise ServeLoadError(
            f"prompt_len {config.prompt_len} + max_tokens {config.max_tokens} exceed the model's "
            f"max_seq_len {max_seq}"
        )
    dev = torch.device(config.device)
    prompts = make_prompts(tokenizer, config.requests, config.prompt_len)
    env = environment(dev)
    stamp = {
        "bench": "serve_load",
        "model_dir": str(model_dir),
        "max_tokens": config.max_tokens,
        "prompt_len": config.prompt_len,
        "device": str(dev),
        "time": env["time"],
        "commit": env["commit"],
        "dirty": env["dirty"],
        "card": env["card"],
        "torch": env["torch"],
        "threads": config.threads or torch.get_num_threads(),
    }
    rows: list[dict[str, Any]] = []
    say: Callable[[str], None] = (
        (lambda s: print(s, file=progress, flush=True)) if progress else (lambda s: None)
    )

    def record(row: dict[str, Any]) -> None:
        row = {**stamp, **row}
        rows.append(row)
        say(
            f"  {row['system']:<12} c={row['concurrency']:<3} {row['tokens_per_s']} tok/s, "
            f"ttft p99 {row['ttft_p99_ms']} ms, errors {row['errors']}"
        )
        if out is not None:
            with open(out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    top = max(config.concurrency)
    servers = [(SERVE, ["--max-batch", str(top)])]
    if "batch1" in config.baselines:
        servers.append(("batch1", ["--max-batch", "1"]))
    port = config.port
    for system, args in servers:
        say(f"{system}: starting `perfml serve {path} {' '.join(args)}`")
        argv = [*args, "--device", config.device, "--max-queue", str(max(256, top))]
        server = ServerProcess(path, [*argv, *extra_server_args], port=port, threads=config.threads)
        with server:
            if config.warmup:
                drive(server.url, prompts[: config.warmup], 1, config.max_tokens)
            for c in config.concurrency:
                results, wall = drive(server.url, prompts, c, config.max_tokens)
                record(summarize(system, c, results, wall))
        port = None  # the first server's port may linger in TIME_WAIT: the next gets a free one
    if "hf" in config.baselines:
        say("hf: Llama.generate per request, one at a time")
        model = loaded.model.to(dev).eval()
        threads = torch.get_num_threads()
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        try:
            if config.warmup:
                hf_level(model, tokenizer, prompts[: config.warmup], 1, config.max_tokens, dev)
            for c in config.concurrency:
                results, wall = hf_level(model, tokenizer, prompts, c, config.max_tokens, dev)
                record(summarize("hf", c, results, wall))
        finally:
            torch.set_num_threads(threads)
    return rows


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per level and system, and the speed-up of perfml serve over batch1."""
    by = {(r["system"], r["concurrency"]): r for r in rows}
    systems = [s for s in (SERVE, *BASELINES) if any(k[0] == s for k in by)]
    levels = sorted({r["concurrency"] for r in rows})
    head = (
        "| concurrency | system | tokens/s | req/s | TTFT p50 ms | TTFT p99 ms | "
        "TPOT p50 ms | TPOT p99 ms | errors | vs batch1 |"
    )
    lines = [head, "|" + "---|" * 10]
    for c in levels:
        base = by.get(("batch1", c))
        for s in systems:
            r = by.get((s, c))
            if r is None:
                continue
            speedup = "-"
            if base and base["tokens_per_s"] and r["tokens_per_s"] is not None:
                speedup = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x"
            lines.append(
                f"| {c} | {s} | {_fmt(r['tokens_per_s'])} | {_fmt(r['requests_per_s'], 2)} | "
                f"{_fmt(r['ttft_p50_ms'])} | {_fmt(r['ttft_p99_ms'])} | "
                f"{_fmt(r['tpot_p50_ms'], 2)} | {_fmt(r['tpot_p99_ms'], 2)} | {r['errors']} | "
                f"{speedup} |"
            )
    return "\n".join(lines)
