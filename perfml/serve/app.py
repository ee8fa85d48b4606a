"""The HTTP face of `perfml serve`: an OpenAI-compatible completions API over one or more engines.

    app = build_app({"base": Variant("base", engine, tokenizer, weight=1.0, model_id="tiny")})

Endpoints: POST /v1/completions (streamed as Server-Sent Events with "stream": true),
GET /v1/models, /healthz (alive), /readyz (every engine ready and not draining), /metrics
(Prometheus text, a registry of this app's own).

A/B: each request goes to one variant. A request naming a variant in "model" gets it; otherwise
the variant is drawn by weight, from a stable hash of "user" when given (the same user always
lands on the same variant) and at random when not. Every metric carries a "variant" label.

With an api_key every path but /healthz and /readyz (so /metrics too) needs
`Authorization: Bearer <key>`. Errors are JSON: {"error": {"message", "type", "param"}}.
Draining (drain()): /readyz answers 503, new requests get 503, the requests already accepted
finish.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import hmac
import json
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from perfml.serve.engine import QueueFull, RequestTooLong, SamplingParams

__all__ = ["ApiError", "CompletionRequest", "Router", "Variant", "build_app", "drain"]

# paths open without the api key, served while draining
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
NO_VARIANT = "none"  # the variant label of a request refused before it was routed
CLIENT_CLOSED = 499  # the status recorded for a client that went away mid-request
RETRY_AFTER_S = 1
DECODE_WINDOW = 32  # ids decoded again per token at most (plus those of a split character)
DISCONNECT_POLL_S = 0.05  # how often a non-streamed request checks that its client is still there
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


@dataclass
class Variant:
    """One model served: its engine (started by the caller), tokenizer, A/B weight and id."""

    name: str
    engine: Any
    tokenizer: Any
    weight: float = 1.0
    model_id: str = ""  # the model's directory (or any id clients may name in "model")


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param"}} with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type
        self.headers = headers or {}


def _error_response(
    status: int,
    message: str,
    param: str | None = None,
    type: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions (unknown fields are refused)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | list[str]
    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0)  # greedy unless asked: the project's one default
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v: str | list[str]) -> str | list[str]:
        if v == "" or v == [] or (isinstance(v, list) and any(p == "" for p in v)):
            raise ValueError("the prompt is empty")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v == "" or (isinstance(v, list) and any(s == "" for s in v)):
            raise ValueError("a stop string is empty")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def _unit(user: str) -> float:
    """A stable number in [0, 1) for a user id (the same on every run and machine)."""
    digest = hashlib.sha256(user.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Router:
    """Variant by weight: sticky per user (a stable hash), random (weighted) without one."""

    def __init__(self, weights: dict[str, float], seed: int | None = None) -> None:
        if not weights:
            raise ValueError("at least one variant is needed")
        bad = {n: w for n, w in weights.items() if not w > 0}
        if bad:
            raise ValueError(f"variant weights must be > 0, got {bad}")
        total = sum(weights.values())
        self.names = list(weights)
        self.shares = {n: w / total for n, w in weights.items()}
        acc, self._edges = 0.0, []
        for n in self.names:
            acc += weights[n] / total
            self._edges.append(acc)
        self._rng = random.Random(seed)

    def pick(self, user: str | None = None) -> str:
        if len(self.names) == 1:
            return self.names[0]
        u = _unit(user) if user is not None else self._rng.random()
        return self.names[min(bisect.bisect_right(self._edges, u), len(self.names) - 1)]


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class Choice:
    """One prompt's completion as it streams: tokens in, text deltas out.

    The text is the decode of every token so far; a trailing U+FFFD (a UTF-8 character whose
    bytes are split across tokens) and any tail that may begin a stop string are held back
    until the next token settles them. The stop token ids (eos) count as tokens, not text."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], stop_ids: Sequence[int]) -> None:
        self.tokenizer, self.stops, self.stop_ids = tokenizer, tuple(stops), set(stop_ids)
        self.ids: list[int] = []
        self._done = 0  # ids[:_done] decode to _done_text, which ends on a whole character
        self._done_text = ""
        self.tokens = 0  # completion tokens received
        self.text = ""  # the text given out so far
        self.finish_reason: str | None = None
        self.error: str | None = None

    def _advance(self, full: str, final: bool) -> str:
        cut = min((i for i in (full.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.finish_reason = "stop"
            end = cut
        elif final:
            end = len(full)
        else:
            end = len(full) - _held_back(full, self.stops)
        if end <= len(self.text):
            if cut >= 0:  # never longer than the cut (a stream has sent no more than this)
                self.text = self.text[:end]
            return ""
        delta = full[len(self.text) : end]
        self.text = full[:end]
        return delta

    def _decoded(self) -> str:
        """decode(ids), decoding only the ids after the last whole-character point that is
        DECODE_WINDOW ids old (the byte and byte-level BPE tokenizers decode piecewise)."""
        tail = self.tokenizer.decode(self.ids[self._done :])
        if len(self.ids) - self._done >= DECODE_WINDOW and not tail.endswith("\ufffd"):
            self._done, self._done_text = len(self.ids), self._done_text + tail
            return self._done_text
        return self._done_text + tail

    def feed(self, token_id: int) -> str:
        self.tokens += 1
        if token_id in self.stop_ids:
            return ""
        self.ids.append(token_id)
        return self._advance(self._decoded().rstrip("\ufffd"), final=False)

    def finish(self, reason: str | None, error: str | None = None) -> str:
        delta = self._advance(self._decoded(), final=True) if self.ids else ""
        if self.finish_reason is None:
            self.finish_reason = reason
            self.error = error
        return delta


@dataclass
class _Job:
    """One HTTP completion request: its engine requests and what is measured of them."""

    variant: Variant
    body: CompletionRequest
    prompts: list[str]
    prompt_ids: list[list[int]]
    choices: list[Choice]
    queue: asyncio.Queue
    started: float
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    requests: list[Any] = field(default_factory=list)
    first_token_at: float | None = None
    pending: set[int] = field(default_factory=set)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    def usage(self) -> dict[str, int]:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def cancel_pending(self) -> None:
        for i in self.pending:
            self.requests[i].cancel()


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        v = ["variant"]
        self.requests = Counter(
            "perfml_requests",
            "HTTP completion requests answered, by status",
            ["variant", "status"],
            registry=registry,
        )
        self.ttft = Histogram(
            "perfml_time_to_first_token_seconds",
            "request arrival to its first generated token",
            v,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "perfml_time_per_output_token_seconds",
            "time per generated token after the first",
            v,
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "perfml_request_latency_seconds",
            "request arrival to its last token (end to end)",
            v,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.generated = Counter(
            "perfml_generation_tokens",
            "completion tokens generated (tokens/s: rate() of this counter)",
            v,
            registry=registry,
        )
        self.prompt = Counter(
            "perfml_prompt_tokens", "prompt tokens processed", v, registry=registry
        )
        self.in_flight = Gauge(
            "perfml_requests_in_flight", "HTTP requests being answered", v, registry=registry
        )
        self.queue_depth = Gauge(
            "perfml_queue_depth", "engine requests waiting for a slot", v, registry=registry
        )
        self.running = Gauge(
            "perfml_running_batch_size",
            "engine requests in the running batch",
            v,
            registry=registry,
        )
        self.slots_in_use = Gauge(
            "perfml_kv_slots_in_use", "KV cache slots holding a request", v, registry=registry
        )
        self.slots = Gauge("perfml_kv_slots", "KV cache slots (max_batch)", v, registry=registry)


class _RequestLog:
    """One JSON line per finished request, appended and flushed as it finishes."""

    def __init__(self, path: str | Path) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (lives with the app)
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False)
        with self._lock:
            if self._file.closed:  # a response that outlived the drain
                return
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


@dataclass
class _State:
    variants: dict[str, Variant]
    router: Router
    served_model: str
    metrics: _Metrics
    registry: CollectorRegistry
    api_key: str | None
    log: _RequestLog | None
    log_prompts: bool
    max_body_bytes: int
    draining: bool = False
    in_flight: int = 0


class _Gate:
    """ASGI middleware: the api key, 503 while draining, the count of requests in flight (a
    streamed response counts until its last byte)."""

    def __init__(self, app: Any, state: _State) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        state = self.state
        refused: JSONResponse | None = None
        if state.api_key is not None and not _authorized(scope, state.api_key):
            refused = _error_response(
                401,
                "missing or wrong api key (send Authorization: Bearer <key>)",
                type="authentication_error",
                headers={"WWW-Authenticate": "Bearer"},
            )
        elif state.draining:
            refused = _error_response(503, "the server is shutting down", type="unavailable_error")
        if refused is not None:
            if scope["path"] == "/v1/completions":
                state.metrics.requests.labels(NO_VARIANT, str(refused.status_code)).inc()
            await refused(scope, receive, send)
            return
        state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.in_flight -= 1


def _authorized(scope: dict, key: str) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode(), key.encode()
            )
    return False


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = ApiError(413, f"the request body is over {limit} bytes", type="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes) -> CompletionRequest:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = first.get("loc") or ()
        param = str(loc[0]) if loc else None
        message = first.get("msg", str(exc)).removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {message}" if param else message, param) from None


PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "prompt")


def _param_named(message: str) -> str | None:
    return next((p for p in PARAMS if p in message), None)


def build_app(
    variants: dict[str, Variant],
    *,
    api_key: str | None = None,
    request_log: str | Path | None = None,
    log_prompts: bool = False,
    max_body_bytes: int = 1_000_000,
    served_model: str | None = None,
    seed: int | None = None,
) -> FastAPI:
    """The FastAPI app over `variants` (their engines started by the caller). `served_model`
    (default: the first variant's model_id, else its name) is the id that routes by A/B weight;
    `seed` seeds the random draw of requests without a user."""
    if not variants:
        raise ValueError("build_app needs at least one variant")
    first = next(iter(variants.values()))
    registry = CollectorRegistry()
    state = _State(
        variants=dict(variants),
        router=Router({n: v.weight for n, v in variants.items()}, seed=seed),
        served_model=served_model or first.model_id or first.name,
        metrics=_Metrics(registry),
        registry=registry,
        api_key=api_key,
        log=_RequestLog(request_log) if request_log is not None else None,
        log_prompts=log_prompts,
        max_body_bytes=max_body_bytes,
    )
    app = FastAPI(title="perfml serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.perfml = state
    app.add_middleware(_Gate, state=state)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.param, exc.type, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail), type="invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(500, f"internal error: {exc}", type="server_error")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        engines = {n: bool(v.engine.ready) for n, v in state.variants.items()}
        ready = all(engines.values()) and not state.draining
        status = "ready" if ready else ("draining" if state.draining else "starting")
        return JSONResponse(
            {"status": status, "variants": engines}, status_code=200 if ready else 503
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        data = [
            {
                "id": state.served_model,
                "object": "model",
                "created": created,
                "owned_by": "perfml",
                "variants": {n: state.router.shares[n] for n in state.router.names},
            }
        ]
        for n, v in state.variants.items():
            if n == state.served_model:
                continue
            data.append(
                {
                    "id": n,
                    "object": "model",
                    "created": created,
                    "owned_by": "perfml",
                    "path": v.model_id,
                    "weight": state.router.shares[n],
                }
            )
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics() -> Response:
        m = state.metrics
        for n, v in state.variants.items():
            stats = v.engine.stats()
            m.queue_depth.labels(n).set(stats.get("queue_depth", 0))
            m.running.labels(n).set(stats.get("running", 0))
            m.slots_in_use.labels(n).set(stats.get("slots_in_use", 0))
            m.slots.labels(n).set(stats.get("max_batch", 0))
            m.in_flight.labels(n)  # present (at 0) before the first request
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        started = time.monotonic()
        try:
            body = _parse(await _read_body(request, state.max_body_bytes))
            variant = _route(state, body)
        except ApiError as exc:
            state.metrics.requests.labels(NO_VARIANT, str(exc.status)).inc()
            raise
        job = _submit(state, variant, body, started)
        headers = {"x-perfml-variant": variant.name}
        if body.stream:
            return StreamingResponse(
                _stream(state, job), media_type="text/event-stream", headers=headers
            )
        return await _answer_unless_gone(request, state, job, headers)

    return app


async def _answer_unless_gone(
    request: Request, state: _State, job: _Job, headers: dict[str, str]
) -> Response:
    """_answer, cancelled (its engine requests with it) when the client disconnects first."""
    answer = asyncio.ensure_future(_answer(state, job, headers))
    gone = False

    async def watch() -> None:
        nonlocal gone
        while not answer.done():
            if await request.is_disconnected():
                gone = True
                answer.cancel()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.ensure_future(watch())
    try:
        return await answer
    except asyncio.CancelledError:
        if not gone:
            raise
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it
    finally:
        watcher.cancel()


def _route(state: _State, body: CompletionRequest) -> Variant:
    model = body.model
    if model is None or model == state.served_model:
        return state.variants[state.router.pick(body.user)]
    if model in state.variants:
        return state.variants[model]
    for v in state.variants.values():
        if v.model_id and model == v.model_id:
            return v
    known = ", ".join([state.served_model, *(n for n in state.variants if n != state.served_model)])
    raise ApiError(
        404, f"model {model!r} does not exist (served: {known})", "model", "not_found_error"
    )


def _submit(state: _State, variant: Variant, body: CompletionRequest, started: float) -> _Job:
    """Encode the prompts and submit one engine request per prompt (all or none)."""
    tok = variant.tokenizer
    prompts = body.prompts()
    prompt_ids = [tok.encode(p) for p in prompts]

    def refuse(exc: ApiError) -> ApiError:
        state.metrics.requests.labels(variant.name, str(exc.status)).inc()
        _log(state, variant, body, prompt_ids, None, started, "error", exc.status)
        return exc

    if any(not ids for ids in prompt_ids):
        raise refuse(ApiError(400, "prompt: the prompt encodes to no tokens", "prompt"))
    eos = getattr(tok, "eos_id", None)
    params = SamplingParams(
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop_token_ids=(eos,) if eos is not None else (),
    )
    stops = body.stops()
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    job = _Job(
        variant=variant,
        body=body,
        prompts=prompts,
        prompt_ids=prompt_ids,
        choices=[Choice(tok, stops, params.stop_token_ids) for _ in prompts],
        queue=queue,
        started=started,
    )
    for i, ids in enumerate(prompt_ids):

        def on_event(event: Any, i: int = i) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (i, event))

        try:
            job.requests.append(variant.engine.submit(ids, params, on_event))
        except Exception as exc:
            for r in job.requests:
                r.cancel()
            raise refuse(_engine_error(exc)) from None
        job.pending.add(i)
    state.metrics.in_flight.labels(variant.name).inc()
    return job


def _engine_error(exc: Exception) -> ApiError:
    if isinstance(exc, QueueFull):
        return ApiError(
            429,
            f"too many requests are waiting ({exc}); retry later",
            type="rate_limit_error",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(exc, RequestTooLong):
        return ApiError(400, f"prompt: {exc}", "prompt", "context_length_exceeded")
    if isinstance(exc, RuntimeError) and "stopping" in str(exc):
        return ApiError(503, "the server is shutting down", type="unavailable_error")
    if isinstance(exc, ValueError):
        return ApiError(400, str(exc), _param_named(str(exc)))
    return ApiError(500, f"the engine refused the request: {exc}", type="server_error")


async def _events(job: _Job) -> AsyncIterator[tuple[int, str, str | None]]:
    """(choice index, text delta, finish reason or None) as the engine's events arrive; the
    engine requests of a stop string's cut, or of a consumer that leaves, are cancelled."""
    try:
        while job.pending:
            i, event = await job.queue.get()
            if i not in job.pending:
                continue  # a request already cut by a stop string: its last events
            choice = job.choices[i]
            if event.token_id is not None:
                if job.first_token_at is None:
                    job.first_token_at = time.monotonic()
                delta = choice.feed(event.token_id)
                if choice.finish_reason is not None:
                    job.requests[i].cancel()
                    job.pending.discard(i)
                    yield i, delta, choice.finish_reason
                elif delta:
                    yield i, delta, None
            else:
                delta = choice.finish(event.finish_reason, event.error)
                job.pending.discard(i)
                yield i, delta, choice.finish_reason
    finally:
        job.cancel_pending()


def _status(job: _Job) -> int:
    return 500 if any(c.finish_reason == "error" for c in job.choices) else 200


def _finished(state: _State, job: _Job, status: int) -> None:
    """Metrics and the request log of a job that ended (answered, failed or abandoned)."""
    name = job.variant.name
    m = state.metrics
    now = time.monotonic()
    m.in_flight.labels(name).dec()
    m.requests.labels(name, str(status)).inc()
    m.prompt.labels(name).inc(job.prompt_tokens)
    m.generated.labels(name).inc(job.completion_tokens)
    latency = now - job.started
    if job.first_token_at is not None:
        m.ttft.labels(name).observe(job.first_token_at - job.started)
        m.latency.labels(name).observe(latency)
        after_first = job.completion_tokens - len(job.choices)
        if after_first > 0:
            m.tpot.labels(name).observe((now - job.first_token_at) / after_first)
    reasons = [c.finish_reason or "cancelled" for c in job.choices]
    _log(state, job.variant, job.body, job.prompt_ids, job, job.started, reasons, status, now)


def _log(
    state: _State,
    variant: Variant,
    body: CompletionRequest,
    prompt_ids: list[list[int]],
    job: _Job | None,
    started: float,
    reasons: list[str] | str,
    status: int,
    now: float | None = None,
) -> None:
    if state.log is None:
        return
    now = time.monotonic() if now is None else now
    if isinstance(reasons, list):
        reasons = reasons[0] if len(set(reasons)) == 1 else ",".join(reasons)
    record: dict[str, Any] = {
        "time": time.time(),
        "variant": variant.name,
        "prompt_tokens": sum(len(ids) for ids in prompt_ids),
        "completion_tokens": job.completion_tokens if job is not None else 0,
        "ttft_s": (
            job.first_token_at - started if job is not None and job.first_token_at else None
        ),
        "latency_s": now - started,
        "finish_reason": reasons,
        "status": status,
    }
    if state.log_prompts:
        record["prompt"] = body.prompt
    state.log.write(record)


async def _answer(state: _State, job: _Job, headers: dict[str, str]) -> JSONResponse:
    status = CLIENT_CLOSED
    try:
        async for _ in _events(job):
            pass
        status = _status(job)
    finally:
        _finished(state, job, status)
    if status == 500:
        message = next(c.error for c in job.choices if c.finish_reason == "error")
        return _error_response(
            500, f"the request failed: {message}", type="server_error", headers=headers
        )
    body = {
        "id": job.id,
        "object": "text_completion",
        "created": job.created,
        "model": job.variant.model_id or job.variant.name,
        "variant": job.variant.name,
        "choices": [
            {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
            for i, c in enumerate(job.choices)
        ],
        "usage": job.usage(),
    }
    return JSONResponse(body, headers=headers)


def _sse(data: Any) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


async def _stream(state: _State, job: _Job) -> AsyncIterator[bytes]:
    status = CLIENT_CLOSED
    head = {
        "id": job.id,
        "object": "text_completion",
        "created": job.created,
        "model": job.variant.model_id or job.variant.name,
        "variant": job.variant.name,
    }
    try:
        async for i, delta, reason in _events(job):
            choice = {"index": i, "text": delta, "finish_reason": reason, "logprobs": None}
            chunk = {**head, "choices": [choice]}
            if reason is not None and not job.pending:
                chunk["usage"] = job.usage()
            yield _sse(chunk)
        status = _status(job)
        if status == 500:
            message = next(c.error for c in job.choices if c.finish_reason == "error")
            error = {"message": f"the request failed: {message}", "type": "server_error"}
            yield _sse({"error": {**error, "param": None}})
        yield _sse("[DONE]")
    finally:
        _finished(state, job, status)


async def drain(
    app: FastAPI, timeout: float | None = None, grace_s: float = 10.0, poll_s: float = 0.05
) -> None:
    """Stop taking requests (readyz and new requests answer 503), let the engines finish what
    they accepted (engine.stop(drain=True, timeout): past the timeout the rest is cancelled and
    answered "cancelled"), then wait (up to grace_s) until every response has been sent."""
    state: _State = app.state.perfml
    state.draining = True
    await asyncio.gather(
        *(
            asyncio.to_thread(v.engine.stop, drain=True, timeout=timeout)
            for v in state.variants.values()
        )
    )
    deadline = time.monotonic() + grace_s
    while state.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(poll_s)
    if state.log is not None:
        state.log.close()
