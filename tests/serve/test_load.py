"""`perfml bench serve`: the load benchmark against real `perfml serve` processes over the tiny
run (concurrency 1 and 4, a few requests of 4 tokens)."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from perfml.bench import serve_load
from perfml.cli import main
from perfml.data import load_tokenizer

FIELDS = {
    "system",
    "concurrency",
    "requests",
    "errors",
    "completion_tokens",
    "wall_s",
    "tokens_per_s",
    "requests_per_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "tpot_p50_ms",
    "tpot_p99_ms",
    "max_tokens",
    "prompt_len",
    "device",
    "commit",
    "threads",
}


@pytest.fixture
def clean_env(monkeypatch):
    """Servers run the real kernels (not interpret mode), one thread each."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def generated_tokens(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "perfml_generation_tokens":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    raise AssertionError("no perfml_generation_tokens in /metrics")


def test_prompts_have_the_asked_length(serve_run):
    tok = load_tokenizer(serve_run / "tokenizer.json")
    prompts = serve_load.make_prompts(tok, 5, 7)
    assert len(prompts) == 5 and len(set(prompts)) == 5
    assert all(len(tok.encode(p)) == 7 for p in prompts)


def test_percentile_and_summary():
    assert serve_load.percentile([], 50) is None
    assert serve_load.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert serve_load.percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    results = [
        serve_load.RequestResult(0.1, 0.4, 4),  # tpot (0.4 - 0.1) / 3 = 0.1
        serve_load.RequestResult(0.2, 0.5, 2),  # tpot 0.3
        serve_load.RequestResult(error="HTTP 500: boom"),
    ]
    row = serve_load.summarize("x", 2, results, 2.0)
    assert row["completion_tokens"] == 6 and row["tokens_per_s"] == 3.0
    assert row["errors"] == 1 and row["first_error"] == "HTTP 500: boom"
    assert row["requests_per_s"] == 1.0
    assert row["ttft_p50_ms"] == pytest.approx(150.0)
    assert row["tpot_p50_ms"] == pytest.approx(200.0)


def test_client_counts_the_servers_tokens(serve_run, start_server, clean_env):
    server = start_server(serve_run, "--max-batch", "4", "--device", "cpu")
    tok = load_tokenizer(serve_run / "tokenizer.json")
    prompts = serve_load.make_prompts(tok, 6, 8)
    before = generated_tokens(server.url)
    results, wall = serve_load.drive(server.url, prompts, 4, max_tokens=4)
    assert wall > 0 and all(r.error is None for r in results), results
    assert sum(r.completion_tokens for r in results) == generated_tokens(server.url) - before
    for r in results:
        assert 1 <= r.completion_tokens <= 4
        assert 0 < r.ttft_s <= r.latency_s


def test_bench_serve_end_to_end(serve_run, tmp_path, capsys, clean_env):
    out = tmp_path / "load.jsonl"
    code = main(
        [
            "bench", "serve", str(serve_run),
            "--concurrency", "1,4",
            "--requests", "4",
            "--max-tokens", "4",
            "--prompt-len", "8",
            "--device", "cpu",
            "--threads", "1",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["system"], r["concurrency"]) for r in rows] == [
        (s, c) for s in ("perfml serve", "batch1", "hf") for c in (1, 4)
    ]
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["errors"] == 0 and r["requests"] == 4
        assert 4 <= r["completion_tokens"] <= 16 and r["tokens_per_s"] > 0
        assert r["ttft_p50_ms"] <= r["ttft_p99_ms"]
        assert r["tokens_per_s"] == pytest.approx(r["completion_tokens"] / r["wall_s"], rel=1e-2)
    # greedy on the same weights: every system generates the same number of tokens
    assert len({(r["concurrency"], r["completion_tokens"]) for r in rows}) == 2
    table = capsys.readouterr().out
    assert "| 4 | batch1 |" in table and "1.00x" in table and "| 1 | hf |" in table


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--concurrency", "0"], "levels must be whole numbers >= 1"),
        (["--concurrency", "1,x"], "levels look like"),
        (["--baselines", "vllm"], "unknown baseline"),
        (["--max-tokens", "0"], "must be >= 1"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_exit_2(serve_run, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "serve", str(serve_run), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_usage_errors_name_what_is_wrong(serve_run, tmp_path, capsys):
    assert main(["bench", "serve", str(tmp_path / "missing")]) == 2
    assert "missing: no such model or run directory" in capsys.readouterr().err
    # the tiny run's max_seq_len is 64
    assert main(["bench", "serve", str(serve_run), "--prompt-len", "40", "--max-tokens", "30"]) == 2
    assert "exceed the model's max_seq_len 64" in capsys.readouterr().err


def test_a_port_in_use_is_a_usage_error(serve_run, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["bench", "serve", str(serve_run), "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err


def test_a_server_that_fails_shows_its_output(serve_run, clean_env):
    server = serve_load.ServerProcess(serve_run, ["--max-context", "100000"])
    with pytest.raises(serve_load.ServerFailed) as exc:
        server.start(timeout_s=60)
    message = str(exc.value)
    assert "exited 2 before it was ready" in message and "max_context" in message
