"""`perfml serve` as a real process on a free loopback port, over a tiny trained run: the API
through httpx, A/B routing, metrics, 429, a client that leaves, and the SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from perfml.data import load_tokenizer
from tests.serve.conftest import Server

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def ab_server(serve_run, tmp_path_factory):
    """Two variants of the same run (base 3 : b 1), an api key and a request log."""
    tmp = tmp_path_factory.mktemp("ab_server")
    server = Server(
        [
            str(serve_run),
            "--max-batch", "4",
            "--api-key", KEY,
            "--request-log", str(tmp / "requests.jsonl"),
            "--weight", "3",
            "--variant", f"b={serve_run}:1",
            "--device", "cpu",
        ],
        tmp,
    )  # fmt: skip
    server.log_file = tmp / "requests.jsonl"
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def post(server, payload, **kw):
    return httpx.post(f"{server.url}/v1/completions", json=payload, headers=AUTH, timeout=60, **kw)


async def post_all(server, payloads, headers=AUTH):
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=p) for p in payloads))


def sse(response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_completion_and_stream_agree_and_count_tokens(ab_server, serve_run):
    tok = load_tokenizer(serve_run / "tokenizer.json")
    prompt = "def f(x):"
    r = post(ab_server, {"prompt": prompt, "max_tokens": 12, "model": "base"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(tok.encode(prompt))
    choice = body["choices"][0]
    n = body["usage"]["completion_tokens"]
    assert (n, choice["finish_reason"]) == (12, "length") or choice["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + n
    payload = {"prompt": prompt, "max_tokens": 12, "model": "base", "stream": True}
    with httpx.stream(
        "POST", f"{ab_server.url}/v1/completions", json=payload, headers=AUTH, timeout=60
    ) as s:
        assert s.headers["x-perfml-variant"] == "base"
        chunks = sse(s)
    assert chunks[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == choice["text"]
    assert chunks[-2]["usage"] == body["usage"]
    assert chunks[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_concurrent_greedy_requests_equal_single_ones(ab_server):
    prompts = ["def ", "import ", "class A", "return x", "    if ", "# the", "for i in"]
    payloads = [{"prompt": p, "max_tokens": 16, "model": "base"} for p in prompts]
    alone = [post(ab_server, p).json()["choices"][0]["text"] for p in payloads]
    together = asyncio.run(post_all(ab_server, payloads))
    assert [r.json()["choices"][0]["text"] for r in together] == alone


def test_models_health_and_auth(ab_server):
    assert httpx.get(f"{ab_server.url}/healthz").status_code == 200
    assert httpx.get(f"{ab_server.url}/readyz").json()["status"] == "ready"
    assert httpx.get(f"{ab_server.url}/v1/models").status_code == 401
    data = httpx.get(f"{ab_server.url}/v1/models", headers=AUTH).json()["data"]
    assert [m["id"] for m in data] == ["run", "base", "b"]
    assert data[0]["variants"] == {"base": 0.75, "b": 0.25}
    r = httpx.post(f"{ab_server.url}/v1/completions", json={"prompt": "a"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{ab_server.url}/metrics").status_code == 401


@pytest.mark.parametrize(
    "payload,status,param",
    [
        ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "a", "temperature": -1}, 400, "temperature"),
        ({"prompt": "a", "top_p": 0}, 400, "top_p"),
        ({"prompt": "a", "top_p": 1.01}, 400, "top_p"),
        ({"prompt": "a", "frequency_penalty": 1}, 400, "frequency_penalty"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "x" * 60, "max_tokens": 10}, 400, "prompt"),  # 70 > max_seq_len 64
        ({"prompt": "a", "model": "nope"}, 404, "model"),
        ({"prompt": "a" * 1_100_000}, 413, None),
    ],
)
def test_bad_requests(ab_server, payload, status, param):
    r = post(ab_server, payload)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    if param is not None:
        assert param in error["message"]


def test_ab_split_within_a_binomial_interval_and_sticky_per_user(ab_server):
    n = 300
    random_picks = asyncio.run(post_all(ab_server, [{"prompt": "a", "max_tokens": 1}] * n))
    users = [f"user-{i}" for i in range(n)]
    user_picks = asyncio.run(
        post_all(ab_server, [{"prompt": "a", "max_tokens": 1, "user": u} for u in users])
    )
    again = asyncio.run(
        post_all(ab_server, [{"prompt": "b", "max_tokens": 1, "user": u} for u in users[:60]])
    )
    for picks in (random_picks, user_picks):
        assert {r.status_code for r in picks} == {200}
        counts = Counter(r.headers["x-perfml-variant"] for r in picks)
        assert counts["b"] == sum(r.json()["variant"] == "b" for r in picks)
        sd = math.sqrt(n * 0.25 * 0.75)
        assert abs(counts["b"] - n * 0.25) < 4 * sd, counts
    first = [r.headers["x-perfml-variant"] for r in user_picks[:60]]
    assert [r.headers["x-perfml-variant"] for r in again] == first


def samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_and_request_log(ab_server):
    before = samples(httpx.get(f"{ab_server.url}/metrics", headers=AUTH).text)
    key = ("perfml_requests_total", (("status", "200"), ("variant", "b")))
    tokens = ("perfml_generation_tokens_total", (("variant", "b"),))
    for _ in range(3):
        assert post(ab_server, {"prompt": "ab", "max_tokens": 5, "model": "b"}).status_code == 200
    after = samples(httpx.get(f"{ab_server.url}/metrics", headers=AUTH).text)
    assert after[key] - before.get(key, 0) == 3
    assert after[tokens] - before.get(tokens, 0) <= 15  # eos may stop one early
    assert after[tokens] - before.get(tokens, 0) >= 3
    for name in (
        "perfml_time_to_first_token_seconds_count",
        "perfml_time_per_output_token_seconds_count",
        "perfml_request_latency_seconds_count",
    ):
        assert after[(name, (("variant", "b"),))] >= 3
    for name in ("perfml_queue_depth", "perfml_running_batch_size", "perfml_kv_slots_in_use"):
        for variant in ("base", "b"):
            assert (name, (("variant", variant),)) in after
    assert after[("perfml_kv_slots", (("variant", "b"),))] == 4
    records = [json.loads(line) for line in ab_server.log_file.read_text().splitlines()]
    routed = sum(  # requests refused before routing (variant "none") are not logged
        v
        for (name, labels), v in after.items()
        if name == "perfml_requests_total" and ("variant", "none") not in labels
    )
    assert len(records) == routed
    last = records[-1]
    assert last["variant"] == "b" and last["status"] == 200 and "prompt" not in last
    assert last["prompt_tokens"] == 2 and 1 <= last["completion_tokens"] <= 5
    assert 0 < last["ttft_s"] <= last["latency_s"]


def test_queue_full_is_429_and_a_client_that_leaves_frees_its_slot(serve_run, start_server):
    log = start_server.tmp / "requests.jsonl"
    server = start_server(serve_run, "--max-batch", "1", "--max-queue", "3", "--request-log", log)
    payload = {"prompt": "a", "max_tokens": 60, "temperature": 0.8, "seed": 1}
    results = asyncio.run(post_all(server, [payload] * 16, headers={}))
    codes = Counter(r.status_code for r in results)
    assert set(codes) == {200, 429} and codes[429] >= 1, codes
    refused = next(r for r in results if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    # a client that goes away mid-stream: its request is cancelled, the slot freed
    stream = {**payload, "max_tokens": 63, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=stream, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        records = [json.loads(line) for line in log.read_text().splitlines()]
        if records and records[-1]["status"] == 499:
            break
        time.sleep(0.05)
    last = records[-1]
    assert last["status"] == 499 and last["finish_reason"] == "cancelled"
    assert last["completion_tokens"] < 63

    # a client that gives up on a non-streamed request (queued behind three others): the same
    async def leave_while_queued():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            busy = [
                asyncio.create_task(client.post("/v1/completions", json=stream | {"stream": False}))
                for _ in range(3)
            ]
            await asyncio.sleep(0.02)
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/completions", json={**payload, "seed": 9}, timeout=0.05)
            return await asyncio.gather(*busy)

    assert [r.status_code for r in asyncio.run(leave_while_queued())] == [200] * 3
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        more = [json.loads(line) for line in log.read_text().splitlines()][len(records) :]
        if len(more) == 4:
            break
        time.sleep(0.05)
    more = [r for r in more if r["status"] != 200]
    assert [(r["status"], r["finish_reason"]) for r in more] == [(499, "cancelled")]
    assert more[0]["completion_tokens"] < 63
    metrics = samples(httpx.get(f"{server.url}/metrics").text)
    assert metrics[("perfml_kv_slots_in_use", (("variant", "base"),))] == 0
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 2})
    assert r.status_code == 200


async def _sigterm_with_requests_in_flight(server, payloads, probe=True):
    """Send payloads, SIGTERM once all are in flight; (responses, when each came back, when the
    signal went, and with probe /readyz and a new request during the drain)."""
    n = len(payloads)
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        tasks = [asyncio.create_task(client.post("/v1/completions", json=p)) for p in payloads]
        done_at: dict[int, float] = {}
        for i, t in enumerate(tasks):
            t.add_done_callback(lambda _, i=i: done_at.setdefault(i, time.monotonic()))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # every request accepted (running or answered)
            m = samples((await client.get("/metrics")).text)
            if m[("perfml_requests_in_flight", (("variant", "base"),))] + len(done_at) >= n:
                break
            await asyncio.sleep(0.01)
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        ready = late = None
        if probe:
            await asyncio.sleep(0.02)
            ready = await client.get("/readyz")
            late = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
        return await asyncio.gather(*tasks), done_at, sent, ready, late


def test_sigterm_drains_every_accepted_request(serve_run, start_server):
    server = start_server(serve_run, "--max-batch", "2", "--drain-timeout", "60")
    n = 24
    payloads = [
        {"prompt": f"x{i}", "max_tokens": 60, "temperature": 0.9, "seed": i} for i in range(n)
    ]
    results, done_at, sent, ready, late = asyncio.run(
        _sigterm_with_requests_in_flight(server, payloads)
    )
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert late.status_code == 503
    assert [r.status_code for r in results] == [200] * n
    for r in results:
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] in ("length", "stop")
        if choice["finish_reason"] == "length":
            assert r.json()["usage"]["completion_tokens"] == 60
    assert sum(t > sent for t in done_at.values()) >= n // 2  # answered during the drain
    assert server.proc.wait(60) == 0, server.output()


def test_drain_timeout_answers_the_rest_cancelled(serve_run, start_server):
    server = start_server(serve_run, "--max-batch", "1", "--drain-timeout", "0.1")
    # 24 x 63 tokens one at a time: far more than 0.1 s of work
    payloads = [{"prompt": "y", "max_tokens": 63, "temperature": 0.9, "seed": i} for i in range(24)]
    results, _, _, _, _ = asyncio.run(
        _sigterm_with_requests_in_flight(server, payloads, probe=False)
    )
    assert [r.status_code for r in results] == [200] * len(payloads)  # none without an answer
    reasons = Counter(r.json()["choices"][0]["finish_reason"] for r in results)
    assert reasons["cancelled"] >= 1, reasons
    for r in results:
        if r.json()["choices"][0]["finish_reason"] == "cancelled":
            assert r.json()["usage"]["completion_tokens"] < 63
    assert server.proc.wait(30) == 0, server.output()
