"""An engine with the contract of perfml.serve.engine and no model, for the server's unit tests.

It runs a real thread with the same queue, slot and event rules: up to max_batch requests run,
max_queue wait, each step emits one token per running request. The tokens of a request repeat
its prompt ids (so the generated text repeats the prompt, which tests can predict); a stop id
ends a request "stop" without being delivered, as in the engine; a prompt holding FAIL_ID fails
its request (final Event "error") and no other."""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable

from perfml.serve.engine import Event, QueueFull, RequestTooLong, SamplingParams

FAIL_ID = ord("!")


class FakeRequest:
    def __init__(self, rid: int, prompt: list[int], params: SamplingParams, on_event) -> None:
        self.id = rid
        self.prompt = prompt
        self.prompt_tokens = len(prompt)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.params = params
        self.on_event = on_event
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


class FakeEngine:
    def __init__(
        self,
        *,
        max_batch: int = 4,
        max_context: int = 64,
        max_queue: int = 8,
        step_s: float = 0.0,
        stop_after: dict[int, int] | None = None,
    ) -> None:
        self.max_batch, self.max_context, self.max_queue = max_batch, max_context, max_queue
        self.step_s = step_s
        self.stop_after = stop_after or {}  # prompt length -> emit the first stop id after N
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._waiting: deque[FakeRequest] = deque()
        self._running: list[FakeRequest] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ready = False
        self.steps = 0
        self.tokens_generated = 0
        self.cancelled_ids: list[int] = []

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        self._ready = True

    @property
    def ready(self) -> bool:
        return self._ready and not self._stopping

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None]
    ) -> FakeRequest:
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise RequestTooLong(
                f"prompt {len(prompt_ids)} + max_tokens {params.max_tokens} > max_context "
                f"{self.max_context}"
            )
        with self._lock:
            if self._stopping:
                raise RuntimeError("engine is stopping")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests wait")
            req = FakeRequest(next(self._ids), list(prompt_ids), params, on_event)
            self._waiting.append(req)
            self._lock.notify_all()
        return req

    def _deliver(self, req: FakeRequest, event: Event) -> bool:
        try:
            req.on_event(event)
            return True
        except Exception as exc:  # one request fails, never the engine
            if event.finish_reason is None:
                self._finish(req, "error", str(exc))
            return False

    def _finish(self, req: FakeRequest, reason: str, error: str | None = None) -> None:
        req.finish_reason = reason
        req.finished_at = time.monotonic()
        if req in self._running:
            self._running.remove(req)
        if reason == "cancelled":
            self.cancelled_ids.append(req.id)
        try:
            req.on_event(Event(finish_reason=reason, error=error))
        except Exception:
            pass

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._running and not self._stopping:
                    self._lock.wait(0.05)
                if self._stopping and not self._waiting and not self._running:
                    return
                if self._cancel_all:
                    for req in [*self._running, *self._waiting]:
                        req.cancelled.set()
                while self._waiting and len(self._running) < self.max_batch:
                    self._running.append(self._waiting.popleft())
                for req in [r for r in self._waiting if r.cancelled.is_set()]:
                    self._waiting.remove(req)
                    self._finish(req, "cancelled")
                batch = list(self._running)
            for req in batch:
                if req.cancelled.is_set():
                    self._finish(req, "cancelled")
                    continue
                if FAIL_ID in req.prompt:
                    self._finish(req, "error", "a token that fails was in the prompt")
                    continue
                k = req.completion_tokens
                stop_at = self.stop_after.get(len(req.prompt))
                if stop_at is not None and k == stop_at and req.params.stop_token_ids:
                    token = req.params.stop_token_ids[0]
                else:
                    token = req.prompt[k % len(req.prompt)]
                if token in req.params.stop_token_ids:  # as the engine: not delivered
                    self._finish(req, "stop")
                    continue
                req.completion_tokens += 1
                self.tokens_generated += 1
                if req.first_token_at is None:
                    req.first_token_at = time.monotonic()
                if not self._deliver(req, Event(token_id=token)):
                    continue
                if req.completion_tokens >= req.params.max_tokens:
                    self._finish(req, "length")
            self.steps += 1
            if self.step_s:
                time.sleep(self.step_s)

    _cancel_all = False

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        with self._lock:
            self._stopping = True
            if not drain:
                self._cancel_all = True
            self._lock.notify_all()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._cancel_all = True
            self._thread.join()

    def stats(self) -> dict:
        with self._lock:
            return {
                "queue_depth": len(self._waiting),
                "running": len(self._running),
                "slots_in_use": len(self._running),
                "max_batch": self.max_batch,
                "max_context": self.max_context,
                "steps": self.steps,
                "tokens_generated": self.tokens_generated,
            }
