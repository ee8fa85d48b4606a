"""The app over fake engines (tests/serve/fake_engine.py), through fastapi's TestClient: the
OpenAI shapes, streaming and incremental UTF-8, stop strings and ids, every 4xx, auth, readiness,
drain, metrics, the request log and the A/B router."""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from perfml.data.tokenizer import ByteTokenizer
from perfml.serve.app import Choice, Router, Variant, build_app, drain
from tests.serve.fake_engine import FakeEngine

TOK = ByteTokenizer()


def expected_text(prompt: str, n: int) -> str:
    """What the fake engine generates: the prompt's bytes repeated, n of them, decoded."""
    ids = TOK.encode(prompt)
    return TOK.decode([ids[k % len(ids)] for k in range(n)])


def make_app(*engines_or_weights, start=True, **kwargs):
    variants = {}
    for i, spec in enumerate(engines_or_weights or [(FakeEngine(), 1.0)]):
        engine, weight = spec
        if start:
            engine.start()
        name = "base" if i == 0 else f"v{i}"
        variants[name] = Variant(name, engine, TOK, weight=weight, model_id=f"model-{name}")
    return build_app(variants, **kwargs), variants


@pytest.fixture
def app_client():
    made = []

    def make(*specs, **kwargs):
        app, variants = make_app(*specs, **kwargs)
        client = TestClient(app)
        made.append(variants)
        return client, variants

    yield make
    for variants in made:
        for v in variants.values():
            v.engine.stop(drain=False)


def sse_chunks(response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_completion_shape_and_usage(app_client):
    client, _ = app_client()
    r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["variant"] == "base" and r.headers["x-perfml-variant"] == "base"
    assert body["model"] == "model-base"
    assert body["choices"] == [
        {"index": 0, "text": expected_text("hello", 7), "finish_reason": "length", "logprobs": None}
    ]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


def test_list_of_prompts_gives_one_choice_each(app_client):
    client, _ = app_client()
    r = client.post("/v1/completions", json={"prompt": ["ab", "xyz"], "max_tokens": 4})
    body = r.json()
    assert [c["text"] for c in body["choices"]] == [expected_text("ab", 4), expected_text("xyz", 4)]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}


def test_default_max_tokens_is_16(app_client):
    client, _ = app_client()
    body = client.post("/v1/completions", json={"prompt": "abc"}).json()
    assert body["usage"]["completion_tokens"] == 16


def test_stream_deltas_join_to_the_text_and_end_with_usage(app_client):
    client, _ = app_client()
    with client.stream(
        "POST", "/v1/completions", json={"prompt": "stream", "max_tokens": 9, "stream": True}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-perfml-variant"] == "base"
        chunks = sse_chunks(r)
    assert chunks[-1] == "[DONE]"
    chunks = chunks[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected_text("stream", 9)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": 6, "completion_tokens": 9, "total_tokens": 15}
    # one chunk per token (every byte here is a whole character), then the final one
    assert [c["choices"][0]["text"] != "" for c in chunks] == [True] * 9 + [False]


def test_stream_multibyte_characters_split_across_tokens(app_client):
    client, _ = app_client()
    prompt = "é€😀"  # 2 + 3 + 4 bytes, one token each
    n = len(TOK.encode(prompt)) * 2
    with client.stream(
        "POST", "/v1/completions", json={"prompt": prompt, "max_tokens": n, "stream": True}
    ) as r:
        chunks = sse_chunks(r)[:-1]
    deltas = [c["choices"][0]["text"] for c in chunks]
    assert "".join(deltas) == prompt * 2
    assert not any("\ufffd" in d for d in deltas)
    assert [d for d in deltas if d] == list(prompt * 2)  # each character once it is whole


def test_stop_string_cuts_the_text_and_cancels_the_engine_request(app_client):
    engine = FakeEngine(step_s=0.002)
    client, _ = app_client((engine, 1.0))
    r = client.post("/v1/completions", json={"prompt": "abcdef", "max_tokens": 40, "stop": "de"})
    body = r.json()
    assert body["choices"][0]["text"] == "abc"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 5  # a b c d e: the stop string's tokens count
    deadline = 200
    while not engine.cancelled_ids and deadline:
        asyncio.run(asyncio.sleep(0.01))
        deadline -= 1
    assert engine.cancelled_ids == [0]


def test_stream_holds_back_a_possible_stop_string(app_client):
    client, _ = app_client()
    # "ab" could start "abz": held back; when "c" comes it is text after all
    payload = {"prompt": "abcab", "max_tokens": 8, "stop": ["abz", "ca"], "stream": True}
    with client.stream("POST", "/v1/completions", json=payload) as r:
        chunks = sse_chunks(r)[:-1]
    deltas = [c["choices"][0]["text"] for c in chunks]
    assert "".join(deltas) == "ab"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    assert "ca" not in "".join(deltas)


def test_eos_ends_with_stop_and_is_not_text(app_client):
    engine = FakeEngine(stop_after={3: 2})  # prompts of 3 tokens: eos after two tokens
    client, _ = app_client((engine, 1.0))
    body = client.post("/v1/completions", json={"prompt": "xyz", "max_tokens": 10}).json()
    assert body["choices"][0] == {
        "index": 0,
        "text": "xy",
        "finish_reason": "stop",
        "logprobs": None,
    }
    assert body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    "payload,param",
    [
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "max_tokens": -3}, "max_tokens"),
        ({"prompt": "a", "temperature": -0.1}, "temperature"),
        ({"prompt": "a", "top_p": 0}, "top_p"),
        ({"prompt": "a", "top_p": 1.5}, "top_p"),
        ({"prompt": "a", "top_k": 0}, "top_k"),
        ({"prompt": "a", "best_of": 2}, "best_of"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", ""]}, "prompt"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "a", "stop": ""}, "stop"),
        ({"prompt": "x" * 60, "max_tokens": 10}, "prompt"),  # 70 > max_context 64
    ],
)
def test_bad_requests_name_the_field(app_client, payload, param):
    client, _ = app_client()
    r = client.post("/v1/completions", json=payload)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert param in error["message"]
    assert error["type"]


def test_too_long_names_both_numbers(app_client):
    client, _ = app_client()
    error = client.post("/v1/completions", json={"prompt": "x" * 60, "max_tokens": 10}).json()
    assert "60" in error["error"]["message"] and "10" in error["error"]["message"]


def test_body_not_json_and_too_big(app_client):
    client, _ = app_client(max_body_bytes=200)
    r = client.post("/v1/completions", content=b"{nope", headers={"content-type": "x"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "a" * 300})
    assert r.status_code == 413 and "200 bytes" in r.json()["error"]["message"]

    def chunked():  # no content-length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 50
        yield b'"}'

    r = client.post("/v1/completions", content=chunked())
    assert r.status_code == 413


def test_unknown_model_is_404_naming_it_and_known_ones_route(app_client):
    client, _ = app_client((FakeEngine(), 1.0), (FakeEngine(), 1.0))
    r = client.post("/v1/completions", json={"prompt": "a", "model": "gpt-17"})
    assert r.status_code == 404
    assert r.json()["error"]["param"] == "model" and "gpt-17" in r.json()["error"]["message"]
    for model, variant in (("v1", "v1"), ("model-v1", "v1"), ("base", "base")):
        r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1, "model": model})
        assert r.headers["x-perfml-variant"] == variant
    served = client.post(
        "/v1/completions", json={"prompt": "a", "model": "model-base", "user": "u"}
    )
    assert served.status_code == 200


def test_queue_full_is_429_with_retry_after(app_client):
    client, _ = app_client((FakeEngine(max_queue=0), 1.0))
    r = client.post("/v1/completions", json={"prompt": "a"})
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_an_error_in_one_request_fails_only_that_one(app_client):
    client, _ = app_client()
    r = client.post("/v1/completions", json={"prompt": "bad!", "max_tokens": 3})
    assert r.status_code == 500
    assert "fails" in r.json()["error"]["message"]
    with client.stream(
        "POST", "/v1/completions", json={"prompt": "bad!", "max_tokens": 3, "stream": True}
    ) as s:
        chunks = sse_chunks(s)
    assert chunks[-1] == "[DONE]" and "error" in chunks[-2]
    r = client.post("/v1/completions", json={"prompt": "good", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "goo"


def test_api_key(app_client):
    client, _ = app_client(api_key="s3cret")
    payload = {"prompt": "a", "max_tokens": 1}
    assert client.post("/v1/completions", json=payload).status_code == 401
    bad = {"Authorization": "Bearer nope"}
    r = client.post("/v1/completions", json=payload, headers=bad)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    good = {"Authorization": "Bearer s3cret"}
    assert client.post("/v1/completions", json=payload, headers=good).status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=good).status_code == 200
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_models_lists_the_served_model_and_variants(app_client):
    client, _ = app_client((FakeEngine(), 3.0), (FakeEngine(), 1.0))
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["model-base", "base", "v1"]
    assert data[0]["variants"] == {"base": 0.75, "v1": 0.25}


def test_readyz_follows_the_engines_and_drain(app_client):
    engine = FakeEngine()
    app, variants = make_app((engine, 1.0), start=False)
    client = TestClient(app)
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "starting"
    engine.start()
    assert client.get("/readyz").status_code == 200
    asyncio.run(drain(app, 5.0))
    assert not engine.ready
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "draining"
    r = client.post("/v1/completions", json={"prompt": "a"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable_error"
    assert client.get("/healthz").status_code == 200


def metric_samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_by_variant(app_client):
    client, _ = app_client((FakeEngine(), 1.0), (FakeEngine(), 1.0))
    for model, n in (("base", 3), ("v1", 2)):
        for _ in range(n):
            client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 4, "model": model})
    client.post("/v1/completions", json={"prompt": "a", "max_tokens": 0})
    text = client.get("/metrics").text
    s = metric_samples(text)
    ok = "perfml_requests_total"
    assert s[(ok, (("status", "200"), ("variant", "base")))] == 3
    assert s[(ok, (("status", "200"), ("variant", "v1")))] == 2
    assert s[(ok, (("status", "400"), ("variant", "none")))] == 1
    assert s[("perfml_generation_tokens_total", (("variant", "base"),))] == 12
    assert s[("perfml_prompt_tokens_total", (("variant", "v1"),))] == 4
    assert s[("perfml_time_to_first_token_seconds_count", (("variant", "base"),))] == 3
    assert s[("perfml_time_per_output_token_seconds_count", (("variant", "v1"),))] == 2
    assert s[("perfml_request_latency_seconds_count", (("variant", "v1"),))] == 2
    for name in ("perfml_queue_depth", "perfml_running_batch_size", "perfml_kv_slots_in_use"):
        assert s[(name, (("variant", "base"),))] == 0
    assert s[("perfml_kv_slots", (("variant", "v1"),))] == 4
    assert s[("perfml_requests_in_flight", (("variant", "base"),))] == 0
    # a registry per app: a second app starts from zero
    other, _ = app_client()
    assert ("perfml_requests_total", (("status", "200"), ("variant", "base"))) not in (
        metric_samples(other.get("/metrics").text)
    )


def test_request_log(app_client, tmp_path):
    log = tmp_path / "requests.jsonl"
    client, _ = app_client(request_log=log)
    client.post("/v1/completions", json={"prompt": "secret", "max_tokens": 3})
    client.post("/v1/completions", json={"prompt": "x" * 70, "max_tokens": 3})
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert first["variant"] == "base" and first["status"] == 200
    assert first["prompt_tokens"] == 6 and first["completion_tokens"] == 3
    assert first["finish_reason"] == "length"
    assert 0 <= first["ttft_s"] <= first["latency_s"]
    assert isinstance(first["time"], float)
    assert "prompt" not in first and "secret" not in log.read_text()
    assert lines[1]["status"] == 400 and lines[1]["completion_tokens"] == 0

    log2 = tmp_path / "with_prompts.jsonl"
    client, _ = app_client(request_log=log2, log_prompts=True)
    client.post("/v1/completions", json={"prompt": "secret", "max_tokens": 1})
    assert json.loads(log2.read_text())["prompt"] == "secret"


def test_choice_decodes_incrementally():
    text = "aé€b"
    choice = Choice(TOK, stops=(), stop_ids=(TOK.eos_id,))
    deltas = [choice.feed(t) for t in TOK.encode(text)]
    assert "".join(deltas) + choice.finish("length") == text
    assert [d for d in deltas if d] == list(text)
    # past the decode window: the same text as one decode of every id
    ids = TOK.encode("aé€😀 b" * 40)
    choice = Choice(TOK, stops=(), stop_ids=())
    deltas = [choice.feed(t) for t in ids]
    assert "".join(deltas) + choice.finish("length") == TOK.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    # a final byte that never completes its character is flushed as U+FFFD at the end
    choice = Choice(TOK, stops=(), stop_ids=())
    deltas = [choice.feed(t) for t in TOK.encode("x€")[:-1]]
    assert "".join(deltas) == "x"
    assert choice.finish("length") == "\ufffd"


def test_router_is_sticky_and_weighted():
    router = Router({"a": 3.0, "b": 1.0}, seed=0)
    assert all(router.pick(f"user{i}") == router.pick(f"user{i}") for i in range(200))
    again = Router({"a": 3.0, "b": 1.0}, seed=123)
    assert all(router.pick(f"user{i}") == again.pick(f"user{i}") for i in range(200))
    n = 4000
    for picks in (
        Counter(router.pick(f"user{i}") for i in range(n)),
        Counter(router.pick() for _ in range(n)),
    ):
        sd = math.sqrt(n * 0.25 * 0.75)
        assert abs(picks["b"] - n * 0.25) < 4 * sd, picks
    with pytest.raises(ValueError, match="> 0"):
        Router({"a": 1.0, "b": 0.0})
    assert Router({"only": 2.0}).pick("anyone") == "only"
