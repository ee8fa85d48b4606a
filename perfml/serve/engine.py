"""The continuous-batching engine of `perfml serve`: many requests share one model, each joining
the running batch as soon as a slot is free and leaving it the step it finishes.

One thread owns the model. Each turn of its loop takes newcomers from the queue while slots are
free (the prompt's prefill runs alone into its slot of a perfml.models.llama.BatchedKVCache and
gives the first token), then runs one batched decode step for every running request (each row at
its own position: perfml.ops.decode_attention with per-row positions in a fused model), samples
each row with its own parameters and generator, and delivers the tokens. A request finishes on
max_tokens ("length"), on a stop token ("stop": the stop token itself is not delivered), when
cancelled, or when delivering to it fails ("error"); its slot is free for the next prefill at
once.

The step runs over slots 0..n-1 with n the smallest bucket (1, 2, 4, 8, ...) holding every running
slot (slots are handed out lowest first): free slots in that range compute on padding and change
nothing a later prefill does not overwrite. On CUDA with cuda_graph, each bucket's step is
captured once as a CUDA graph and replayed; on the CPU it runs eagerly.

Rows are independent, so a request's tokens do not depend on what shares its batch, up to the
reduction order of kernels whose blocking depends on the batch size (GEMMs picking other tiles,
decode_attention's split count): in fp32 on the CPU greedy tokens equal Decoder.generate's.

The server-facing API (no web framework here):

    engine = Engine(model, max_batch=16)
    engine.start()
    request = engine.submit(prompt_ids, SamplingParams(max_tokens=64), on_event)
    engine.stop(drain=True)
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from perfml.models.llama import BatchedKVCache

log = logging.getLogger("perfml")

# warm-up steps before a bucket's capture: Triton compiles, cuBLAS picks kernels
_WARMUP_STEPS = 2


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples: temperature 0 is greedy; otherwise the logits / temperature are
    cut to the top_k most likely tokens, then to the smallest set whose probability reaches
    top_p, and sampled with the request's own generator (seeded by `seed` when given)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Event:
    """One generated token, or (token_id None) the final event with its finish_reason."""

    token_id: int | None = None
    finish_reason: str | None = None  # "length" | "stop" | "cancelled" | "error"
    error: str | None = None


class QueueFull(Exception):
    """submit() while max_queue requests already wait."""


class RequestTooLong(ValueError):
    """The prompt plus max_tokens does not fit the engine's max_context."""


class Request:
    """A submitted request: counts and times (time.monotonic()) so far; cancel() from any
    thread."""

    def __init__(
        self,
        request_id: int,
        prompt: list[int],
        params: SamplingParams,
        on_event: Callable[[Event], None],
        wake: Callable[[], None],
    ) -> None:
        self.id = request_id
        self.prompt = prompt
        self.params = params
        self.prompt_tokens = len(prompt)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._on_event = on_event
        self._wake = wake
        self._cancelled = False
        self.slot: int | None = None
        self.last_token: int | None = None
        self.generator: torch.Generator | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Ask the engine to stop this request: its slot is freed before the next step and a
        final Event(finish_reason="cancelled") follows (nothing happens once it finished)."""
        self._cancelled = True
        self._wake()

    def __repr__(self) -> str:
        return (
            f"Request(id={self.id}, prompt_tokens={self.prompt_tokens}, "
            f"completion_tokens={self.completion_tokens}, finish_reason={self.finish_reason!r})"
        )


def check_params(params: SamplingParams, vocab_size: int) -> None:
    """A ValueError naming the first bad field of `params`."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")

    def number(x: object) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if isinstance(params.max_tokens, bool) or not isinstance(params.max_tokens, int):
        raise ValueError(f"max_tokens must be an int, got {params.max_tokens!r}")
    if params.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
    if not number(params.temperature) or params.temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {params.temperature!r}")
    if not number(params.top_p) or not 0 < params.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p!r}")
    if params.top_k is not None and (
        isinstance(params.top_k, bool) or not isinstance(params.top_k, int) or params.top_k < 1
    ):
        raise ValueError(f"top_k must be None or an int >= 1, got {params.top_k!r}")
    if params.seed is not None and (
        isinstance(params.seed, bool) or not isinstance(params.seed, int)
    ):
        raise ValueError(f"seed must be None or an int, got {params.seed!r}")
    for token in params.stop_token_ids:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise ValueError(
                f"stop_token_ids must be token ids in [0, {vocab_size}), got {token!r}"
            )


def sample_row(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from logits [V] under `params`: the rule of Llama.generate (temperature, top_k)
    plus nucleus sampling (top_p: the most likely tokens whose probabilities, in descending
    order, first reach top_p; the most likely token always stays)."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass above each token
        drop = before >= params.top_p
        drop[0] = False
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def _buckets(max_batch: int) -> list[int]:
    """Step sizes 1, 2, 4, ... below max_batch, then max_batch itself."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return [*sizes, max_batch]


class Engine:
    """Continuous batching of a perfml Llama (float or quantized): up to max_batch requests
    decode together, max_queue more wait; prompt + max_tokens <= max_context (default and limit:
    the model's max_seq_len). The batched KV cache [max_batch slots x max_context] is allocated
    here, once."""

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch: int = 16,
        max_context: int | None = None,
        max_queue: int = 256,
        device: str | torch.device = "cpu",
        cuda_graph: bool | None = None,
    ) -> None:
        for name in ("hidden_states", "logits", "config", "embed_tokens", "layers"):
            if not hasattr(model, name):
                raise TypeError(f"Engine: model must be a perfml Llama (no .{name})")
        limit = model.config.max_seq_len
        max_context = limit if max_context is None else max_context
        if not 1 <= max_context <= limit:
            raise ValueError(
                f"Engine: max_context must be in [1, {limit}] (the model's max_seq_len), got "
                f"{max_context}"
            )
        if max_batch < 1:
            raise ValueError(f"Engine: max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise ValueError(f"Engine: max_queue must be >= 0, got {max_queue}")
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        if cuda_graph and not on_cuda:
            raise ValueError(f"Engine: cuda_graph=True needs a CUDA device, got {self.device}")
        self.model = model.to(self.device).eval()
        self.max_batch = max_batch
        self.max_context = max_context
        self.max_queue = max_queue
        self.vocab_size = model.config.vocab_size
        self.cuda_graph = on_cuda if cuda_graph is None else cuda_graph
        self.cache = BatchedKVCache.for_model(self.model, max_batch, max_context)
        self._tokens = torch.zeros(max_batch, 1, dtype=torch.long, device=self.device)
        self._buckets = _buckets(max_batch)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}

        self._cond = threading.Condition()
        self._queue: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}  # slot -> request
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._ready = False
        self._stopping = False
        self._abort = False
        self._warm = threading.Event()
        self._warm_error: BaseException | None = None
        self._steps = 0
        self._tokens_generated = 0

    # --- the API the server calls ----------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread and wait for its warm-up (one prefill and one step; on CUDA
        with cuda_graph, every bucket's graph capture). A failed warm-up raises here."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("Engine.start: the engine was already started")
            if self._stopping:
                raise RuntimeError("Engine.start: the engine is stopping")
            self._thread = threading.Thread(target=self._run, name="perfml-engine", daemon=True)
        self._thread.start()
        self._warm.wait()
        if self._warm_error is not None:
            self._thread.join()
            raise RuntimeError(f"Engine.start: warm-up failed: {self._warm_error}") from (
                self._warm_error
            )

    @property
    def ready(self) -> bool:
        """Started and warmed up, not stopping."""
        return self._ready and not self._stopping

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None]
    ) -> Request:
        """Queue a request (thread-safe). on_event(Event) is called from the engine thread, in
        order: the tokens, then one final event. Raises RequestTooLong, ValueError (a bad prompt
        or parameter, named), QueueFull, or RuntimeError once the engine is stopping."""
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("prompt_ids must hold at least one token")
        for token in prompt:
            if isinstance(token, bool) or not isinstance(token, int):
                raise ValueError(f"prompt_ids must be ints, got {token!r}")
            if not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"prompt_ids: token {token} is out of range for the vocabulary of "
                    f"{self.vocab_size}"
                )
        check_params(params, self.vocab_size)
        if not callable(on_event):
            raise TypeError("on_event must be callable")
        total = len(prompt) + params.max_tokens
        if total > self.max_context:
            raise RequestTooLong(
                f"the prompt's {len(prompt)} tokens + max_tokens {params.max_tokens} = {total} "
                f"exceed max_context {self.max_context}"
            )
        with self._cond:
            if self._stopping:
                raise RuntimeError("engine is stopping")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests already wait (max_queue)")
            request = Request(next(self._ids), prompt, params, on_event, self._wake)
            self._queue.append(request)
            self._cond.notify_all()
        return request

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Accept nothing new; with drain, finish the queued and running requests (for up to
        `timeout` seconds, then cancel the rest), otherwise cancel them all; join the thread.
        Every accepted request gets its final event."""
        with self._cond:
            self._stopping = True
            if not drain:
                self._abort = True
            self._cond.notify_all()
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._cancel_everything()  # never started (or gone): nothing runs the queue
            return
        thread.join(timeout)
        if thread.is_alive():
            with self._cond:
                self._abort = True
                self._cond.notify_all()
            thread.join()

    def stats(self) -> dict:
        with self._cond:
            return {
                "queue_depth": len(self._queue),
                "running": len(self._running),
                "slots_in_use": len(self._running),
                "max_batch": self.max_batch,
                "max_context": self.max_context,
                "steps": self._steps,
                "tokens_generated": self._tokens_generated,
            }

    # --- the engine thread -----------------------------------------------------------------

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        with torch.inference_mode():
            try:
                self._warm_up()
            except BaseException as error:  # reported by start()
                self._warm_error = error
                self._warm.set()
                return
            self._ready = True
            self._warm.set()
            while True:
                try:
                    if not self._turn():
                        break
                except Exception as error:  # a bug of the loop itself: fail what runs, go on
                    log.exception("perfml serve: the engine loop failed")
                    message = f"engine error: {type(error).__name__}: {error}"
                    for request in list(self._running.values()):
                        self._finish(request, "error", message)
        self._ready = False
        self._cancel_everything()

    def _turn(self) -> bool:
        """One turn of the loop; False when the engine is done."""
        with self._cond:
            while not (self._queue or self._running or self._stopping or self._any_cancelled()):
                self._cond.wait()
            if self._abort:
                return False
            if self._stopping and not self._queue and not self._running:
                return False
            cancelled = [r for r in self._queue if r.cancelled]
            for request in cancelled:
                self._queue.remove(request)
            free = [s for s in range(self.max_batch) if s not in self._running]
            newcomers = []
            while self._queue and len(newcomers) < len(free):
                newcomers.append(self._queue.popleft())
        for request in cancelled:
            self._finish(request, "cancelled")
        for request in newcomers:
            self._prefill(request, free.pop(0))
        for request in [r for r in self._running.values() if r.cancelled]:
            self._finish(request, "cancelled")
        if self._running:
            self._decode_step()
        return True

    def _any_cancelled(self) -> bool:
        return any(r.cancelled for r in self._queue) or any(
            r.cancelled for r in self._running.values()
        )

    def _prefill(self, request: Request, slot: int) -> None:
        try:
            ids = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
            hidden = self.model.hidden_states(ids, self.cache.slot(slot))
            logits = self.model.logits(hidden[:, -1])[0]
            if request.params.seed is not None:
                request.generator = torch.Generator(self.device).manual_seed(request.params.seed)
            token = sample_row(logits, request.params, request.generator)
        except Exception as error:
            self.cache.free(slot)
            self._finish(request, "error", f"{type(error).__name__}: {error}")
            return
        request.slot = slot
        with self._cond:
            self._running[slot] = request
        request.first_token_at = time.monotonic()
        self._deliver(request, token)

    def _decode_step(self) -> None:
        running = sorted(self._running.items())
        n = next(b for b in self._buckets if b > running[-1][0])
        try:
            tokens = torch.zeros(n, 1, dtype=torch.long)
            for slot, request in running:
                tokens[slot, 0] = request.last_token
            self._tokens[:n].copy_(tokens)
            logits = self._step(n)
            self._steps += 1
            rows = torch.tensor([slot for slot, _ in running], device=self.device)
            picked = logits.index_select(0, rows)
            greedy = picked.argmax(dim=-1).tolist()
        except Exception as error:  # the model failed: every running request fails with it
            message = f"{type(error).__name__}: {error}"
            for _, request in running:
                self._finish(request, "error", message)
            return
        for i, (_, request) in enumerate(running):
            try:
                if request.params.temperature == 0:
                    token = greedy[i]
                else:
                    token = sample_row(picked[i], request.params, request.generator)
            except Exception as error:
                self._finish(request, "error", f"{type(error).__name__}: {error}")
                continue
            self._deliver(request, token)

    def _forward_step(self, n: int) -> Tensor:
        rows = self.cache.rows(n)
        return self.model.logits(self.model.hidden_states(self._tokens[:n], rows)[:, -1])

    def _step(self, n: int) -> Tensor:
        """Logits [n, V] of one decode step over slots 0..n-1 (advancing the running ones)."""
        if not self.cuda_graph:
            return self._forward_step(n)
        if n not in self._graphs:
            self._capture(n)
        graph, logits = self._graphs[n]
        graph.replay()
        lengths = self.cache.lengths
        for row in range(n):  # what the replayed advance did on the device
            if self.cache.occupied[row]:
                lengths[row] += 1
        return logits

    def _capture(self, n: int) -> None:
        cache = self.cache
        saved = cache.position.clone(), list(cache.lengths)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_STEPS):
                self._forward_step(n)
                cache.position.copy_(saved[0])  # the warm-up writes only slots overwritten later
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._forward_step(n)
        cache.lengths[:] = saved[1]  # capture ran the Python (host counts) but no kernel
        self._graphs[n] = (graph, logits)

    def _warm_up(self) -> None:
        """One prefill and one step in slot 0 (every bucket's graph on the CUDA graph path),
        then slot 0 is freed."""
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.model.logits(self.model.hidden_states(ids, self.cache.slot(0))[:, -1])
        self._tokens.zero_()
        for n in self._buckets if self.cuda_graph else self._buckets[:1]:
            self._step(n)
        if self.cuda_graph:
            torch.cuda.synchronize(self.device)
        self.cache.free(0)

    def _deliver(self, request: Request, token: int) -> None:
        params = request.params
        if token in params.stop_token_ids:
            self._finish(request, "stop")
            return
        request.completion_tokens += 1
        request.last_token = token
        with self._cond:
            self._tokens_generated += 1
        try:
            request._on_event(Event(token_id=token))
        except Exception as error:
            self._finish(request, "error", f"on_event raised {type(error).__name__}: {error}")
            return
        if request.completion_tokens >= params.max_tokens:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        """Free the request's slot and deliver its final event (once)."""
        if request.finish_reason is not None:
            return
        with self._cond:
            if request.slot is not None and self._running.get(request.slot) is request:
                del self._running[request.slot]
                self.cache.free(request.slot)
            request.finish_reason = reason
            request.finished_at = time.monotonic()
        try:
            request._on_event(Event(finish_reason=reason, error=error))
        except Exception:
            pass  # a failing callback has nobody left to tell

    def _cancel_everything(self) -> None:
        with self._cond:
            left = [*self._queue, *self._running.values()]
            self._queue.clear()
        for request in left:
            self._finish(request, "cancelled")
