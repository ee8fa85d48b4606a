"""perfml.serve.engine: continuous batching against decoding each prompt alone, sampling, the
queue, cancel, stop, failing callbacks; BatchedKVCache's slots and its batched step.

fp32 tiny models on the CPU with random weights (std 0.3, so greedy continuations vary). The
main model is unfused (plain PyTorch, fast); one fused model runs the Triton kernels in
interpret mode through the engine's batched step.
"""

import importlib
import threading
import time

import pytest
import torch

from perfml import _backend
from perfml.models.decode import Decoder
from perfml.models.llama import BatchedKVCache, Llama, LlamaConfig
from perfml.serve import Engine, Event, QueueFull, RequestTooLong, SamplingParams
from perfml.serve.engine import check_params, sample_row

V = 97
CONTEXT = 48


def model(fused=False, seed=0, **overrides):
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_layers=2)
    config = LlamaConfig.preset("tiny", max_seq_len=CONTEXT, fused=fused, **{**base, **overrides})
    torch.manual_seed(seed)
    m = Llama(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return m


@pytest.fixture(scope="module")
def unfused():
    return model()


class Collector:
    """on_event callbacks that record every event per request and signal the final one."""

    def __init__(self, engine_thread=True):
        self.engine_thread = engine_thread
        self.events = {}
        self.done = {}
        self.lock = threading.Lock()

    def __call__(self, key, hook=None):
        with self.lock:
            self.events[key] = []
            self.done[key] = threading.Event()

        def on_event(event):
            if self.engine_thread:
                assert threading.current_thread().name == "perfml-engine"
            with self.lock:
                self.events[key].append(event)
            if event.finish_reason is not None:
                self.done[key].set()
            if hook is not None:
                hook(event)

        return on_event

    def tokens(self, key):
        return [e.token_id for e in self.events[key] if e.token_id is not None]

    def final(self, key):
        finals = [e for e in self.events[key] if e.finish_reason is not None]
        assert len(finals) == 1 and self.events[key][-1] is finals[0], "one final event, last"
        return finals[0]

    def wait(self, key, timeout=60):
        assert self.done[key].wait(timeout), f"request {key} never finished"


def alone(m, prompt, max_tokens, max_len=CONTEXT, **sampling):
    out = Decoder(m, max_len).generate(torch.tensor([prompt]), max_tokens, **sampling)
    return out[0, len(prompt) :].tolist()


def started(m, **kwargs):
    engine = Engine(m, max_context=CONTEXT, **kwargs)
    engine.start()
    assert engine.ready
    return engine


def test_greedy_batched_requests_equal_each_prompt_alone(unfused):
    # 12 requests from 4 threads at once into 4 slots: they queue and join mid-flight
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 15, (12,), generator=gen).tolist()
    prompts = [torch.randint(0, V, (n,), generator=gen).tolist() for n in lengths]
    max_tokens = torch.randint(1, 14, (12,), generator=gen).tolist()
    engine = started(unfused, max_batch=4)
    seen = Collector()
    requests = {}

    def client(indices):
        for i in indices:
            requests[i] = engine.submit(prompts[i], SamplingParams(max_tokens[i]), seen(i))
            time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(range(j, 12, 4),)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(12):
        seen.wait(i)
    stats = engine.stats()
    engine.stop()
    for i in range(12):
        assert seen.tokens(i) == alone(unfused, prompts[i], max_tokens[i]), f"request {i}"
        assert seen.final(i) == Event(finish_reason="length")
        r = requests[i]
        assert (r.prompt_tokens, r.completion_tokens, r.finish_reason) == (
            lengths[i],
            max_tokens[i],
            "length",
        )
        assert r.submitted_at <= r.first_token_at <= r.finished_at
    assert stats["tokens_generated"] == sum(max_tokens)
    assert stats["queue_depth"] == stats["running"] == stats["slots_in_use"] == 0
    assert stats["max_batch"] == 4 and stats["max_context"] == CONTEXT
    # every request's first token comes from its prefill, the rest from batched steps
    assert max(max_tokens) - 1 <= stats["steps"] < sum(max_tokens) - 12 + 1


def test_stop_tokens_end_a_request_undelivered(unfused):
    prompt = [5, 6, 7]
    free = alone(unfused, prompt, 8)
    stop = free[3]
    engine = started(unfused, max_batch=2)
    seen = Collector()
    engine.submit(prompt, SamplingParams(8, stop_token_ids=(stop,)), seen(0))
    seen.wait(0)
    engine.stop()
    assert seen.tokens(0) == free[: free.index(stop)]
    assert seen.final(0).finish_reason == "stop"


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(unfused):
    params = [
        SamplingParams(10, temperature=1.0, seed=7),
        SamplingParams(10, temperature=0.8, top_k=5, seed=3),
        SamplingParams(10, temperature=1.2, top_p=0.7, seed=11),
    ]
    prompts = [[1, 2, 3], [9] * 6, [40, 2]]
    solo = Collector()
    engine = started(unfused, max_batch=1)
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.submit(p, sp, solo(i))
        solo.wait(i)
    engine.stop()
    batch = Collector()
    engine = started(unfused, max_batch=4)
    others = [engine.submit([i + 3] * (i + 2), SamplingParams(6, temperature=1.0), batch(f"x{i}"))
              for i in range(3)]  # fmt: skip
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.submit(p, sp, batch(i))
    for i in range(3):
        batch.wait(i)
    engine.stop()
    assert all(r.finish_reason == "length" for r in others)
    for i in range(3):
        assert solo.tokens(i) == batch.tokens(i), f"params {params[i]}"
    assert solo.tokens(0) != solo.tokens(1)


def test_temperature_and_top_k_follow_llama_generate_when_alone(unfused):
    # without top_p the engine samples like Decoder.generate: same generator, same tokens
    prompt = [3, 1, 4, 1, 5]
    seen = Collector()
    engine = started(unfused, max_batch=2)
    engine.submit(prompt, SamplingParams(9, temperature=0.9, top_k=7, seed=5), seen(0))
    seen.wait(0)
    engine.stop()
    gen = torch.Generator().manual_seed(5)
    assert seen.tokens(0) == alone(unfused, prompt, 9, temperature=0.9, top_k=7, generator=gen)


def test_top_p_keeps_the_nucleus_only():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0])
    probs = torch.softmax(logits, 0)
    order = probs.argsort(descending=True).tolist()  # [4, 0, 1, 2, 3]
    gen = torch.Generator().manual_seed(0)
    tiny = SamplingParams(1, temperature=1.0, top_p=1e-6)
    assert {sample_row(logits, tiny, gen) for _ in range(50)} == {order[0]}
    # the two most likely tokens hold less than 0.9; the third reaches it
    top_p = float(probs[order[:2]].sum() + probs[order[2]] / 2)
    nucleus = SamplingParams(1, temperature=1.0, top_p=top_p)
    drawn = [sample_row(logits, nucleus, gen) for _ in range(400)]
    assert set(drawn) == set(order[:3])
    # renormalized over the nucleus: the most likely token's share matches
    share = drawn.count(order[0]) / len(drawn)
    want = float(probs[order[0]] / probs[order[:3]].sum())
    assert abs(share - want) < 0.08


def test_cancel_frees_the_slot_for_a_queued_request(unfused):
    engine = started(unfused, max_batch=1)
    seen = Collector()
    holder = {}

    def cancel_after_two(event):
        if event.token_id is not None and holder["long"].completion_tokens == 2:
            holder["long"].cancel()

    holder["long"] = engine.submit([1, 2], SamplingParams(40), seen("long", cancel_after_two))
    queued = engine.submit([3, 4, 5], SamplingParams(4), seen("queued"))
    seen.wait("queued")
    engine.stop()
    assert seen.final("long").finish_reason == "cancelled"
    assert holder["long"].finish_reason == "cancelled" and len(seen.tokens("long")) == 2
    assert seen.tokens("queued") == alone(unfused, [3, 4, 5], 4)
    assert queued.finish_reason == "length"


def test_cancel_while_queued(unfused):
    engine = Engine(unfused, max_batch=1, max_context=CONTEXT)
    seen = Collector()
    first = engine.submit([1], SamplingParams(3), seen(0))
    second = engine.submit([2], SamplingParams(3), seen(1))
    second.cancel()
    engine.start()
    seen.wait(0)
    seen.wait(1)
    engine.stop()
    assert first.finish_reason == "length" and len(seen.tokens(0)) == 3
    assert seen.tokens(1) == [] and seen.final(1).finish_reason == "cancelled"


def test_queue_full_and_stop_without_start(unfused):
    engine = Engine(unfused, max_batch=2, max_context=CONTEXT, max_queue=2)
    seen = Collector(engine_thread=False)  # never started: stop() delivers the final events
    engine.submit([1], SamplingParams(2), seen(0))
    engine.submit([1], SamplingParams(2), seen(1))
    with pytest.raises(QueueFull):
        engine.submit([1], SamplingParams(2), seen(2))
    assert engine.stats()["queue_depth"] == 2 and not engine.ready
    engine.stop()
    assert seen.final(0).finish_reason == seen.final(1).finish_reason == "cancelled"
    assert seen.events[2] == []


def test_request_too_long_names_the_numbers(unfused):
    engine = Engine(unfused, max_batch=2, max_context=20)
    with pytest.raises(
        RequestTooLong, match=r"15 tokens \+ max_tokens 6 = 21 exceed max_context 20"
    ):
        engine.submit(list(range(15)), SamplingParams(6), lambda e: None)
    engine.submit(list(range(15)), SamplingParams(5), lambda e: None)  # 20 fits
    with pytest.raises(ValueError, match="max_context must be in"):
        Engine(unfused, max_context=CONTEXT + 1)


@pytest.mark.parametrize(
    "params,field",
    [
        (SamplingParams(0), "max_tokens"),
        (SamplingParams(2, temperature=-1.0), "temperature"),
        (SamplingParams(2, top_p=0.0), "top_p"),
        (SamplingParams(2, top_p=1.5), "top_p"),
        (SamplingParams(2, top_k=0), "top_k"),
        (SamplingParams(2, seed=1.5), "seed"),
        (SamplingParams(2, stop_token_ids=(V,)), "stop_token_ids"),
    ],
)
def test_bad_params_name_the_field(params, field):
    with pytest.raises(ValueError, match=field):
        check_params(params, V)


def test_bad_prompts(unfused):
    engine = Engine(unfused, max_batch=1, max_context=CONTEXT)
    for prompt, message in (([], "at least one token"), ([V], "out of range"), ([1.0], "ints")):
        with pytest.raises(ValueError, match=message):
            engine.submit(prompt, SamplingParams(1), lambda e: None)


def test_stop_drains_in_flight_requests_then_refuses(unfused):
    engine = started(unfused, max_batch=2)
    seen = Collector()
    requests = [engine.submit([i + 1] * 3, SamplingParams(6), seen(i)) for i in range(5)]
    engine.stop(drain=True)
    assert not engine.ready
    for i, r in enumerate(requests):
        assert r.finish_reason == "length" and seen.tokens(i) == alone(unfused, [i + 1] * 3, 6)
    with pytest.raises(RuntimeError, match="engine is stopping"):
        engine.submit([1], SamplingParams(1), lambda e: None)


def test_stop_without_drain_cancels_everything(unfused):
    engine = started(unfused, max_batch=1)
    seen = Collector()
    gate = threading.Event()
    engine.submit([1], SamplingParams(30), seen(0, lambda e: gate.wait(10)))
    for i in range(1, 4):
        engine.submit([2], SamplingParams(30), seen(i))
    stopper = threading.Thread(target=engine.stop, kwargs={"drain": False})
    stopper.start()
    time.sleep(0.05)
    gate.set()
    stopper.join(30)
    assert not stopper.is_alive()
    for i in range(4):
        assert seen.final(i).finish_reason == "cancelled"
        assert len(seen.tokens(i)) < 30


def test_drain_timeout_cancels_the_rest(unfused):
    engine = started(unfused, max_batch=1)
    seen = Collector()
    slow = engine.submit([1], SamplingParams(40), seen(0, lambda e: time.sleep(0.02)))
    engine.stop(drain=True, timeout=0.1)
    assert slow.finish_reason == "cancelled" and len(seen.tokens(0)) < 40


def test_a_raising_callback_fails_only_its_request(unfused):
    engine = started(unfused, max_batch=3)
    seen = Collector()

    def explode(event):
        if event.token_id is not None and len(seen.tokens("bad")) == 2:
            raise RuntimeError("client went away")

    good = [engine.submit([7, i], SamplingParams(8), seen(i)) for i in range(2)]
    bad = engine.submit([7, 9], SamplingParams(8), seen("bad", explode))
    for key in (0, 1, "bad"):
        seen.wait(key)
    stats = engine.stats()
    engine.stop()
    final = seen.final("bad")
    assert final.finish_reason == "error" and "client went away" in final.error
    assert bad.finish_reason == "error" and len(seen.tokens("bad")) == 2
    for i, r in enumerate(good):
        assert r.finish_reason == "length" and seen.tokens(i) == alone(unfused, [7, i], 8)
    assert stats["running"] == 0 and stats["tokens_generated"] == 8 + 8 + 2


def test_fused_projections_and_reused_slots(unfused):
    # fused q/k/v and gate/up projections decode the same; 6 requests through 2 slots
    m = model()
    m.fuse_projections()
    engine = started(m, max_batch=2)
    seen = Collector()
    prompts = [[i, i + 1, i + 2][: 1 + i % 3] for i in range(6)]
    for i, p in enumerate(prompts):
        engine.submit(p, SamplingParams(3 + i), seen(i))
    for i in range(6):
        seen.wait(i)
    engine.stop()
    for i, p in enumerate(prompts):
        assert seen.tokens(i) == alone(unfused, p, 3 + i)


def test_quantized_model_batches_like_it_decodes_alone():
    # int8 weight-only linears (head included): the engine only calls the modules
    from torch import nn

    from perfml import quant

    m = model(tie_embeddings=False, num_layers=1)
    every_linear = lambda mod, fqn: isinstance(mod, nn.Linear)  # noqa: E731
    quant.quantize(m, quant.Int8WeightOnlyConfig(), filter_fn=every_linear)
    assert isinstance(m.lm_head, quant.Int8WeightOnlyLinear)
    prompts = [[1, 2, 3, 4], [5], [6, 7]]
    engine = started(m, max_batch=2)
    seen = Collector()
    for i, p in enumerate(prompts):
        engine.submit(p, SamplingParams(4), seen(i))
    for i in range(3):
        seen.wait(i, timeout=300)
    engine.stop()
    for i, p in enumerate(prompts):
        assert seen.tokens(i) == alone(m, p, 4)


def test_fused_model_runs_the_triton_step_in_interpret_mode(monkeypatch):
    # a fused model: per-row decode_attention through the Triton kernel (interpret mode on CPU)
    if not _backend.has_triton():
        pytest.skip("needs triton")
    da = importlib.import_module("perfml.ops.decode_attention")
    calls = []
    real = da._decode_attention_triton

    def counting(q, k, v, k_cache, v_cache, position, scale):
        calls.append(tuple(position.shape))
        return real(q, k, v, k_cache, v_cache, position, scale)

    monkeypatch.setattr(da, "_decode_attention_triton", counting)
    m = model(
        fused=True, num_layers=1, hidden_size=32, intermediate_size=32, num_heads=2, num_kv_heads=1
    )
    prompts, max_tokens = [[1, 2, 3], [4], [5, 6]], [3, 4, 2]
    want = [alone(m, p, k, max_len=16) for p, k in zip(prompts, max_tokens, strict=True)]
    calls.clear()
    engine = Engine(m, max_batch=2, max_context=16)
    engine.start()
    seen = Collector()
    for i, (p, k) in enumerate(zip(prompts, max_tokens, strict=True)):
        engine.submit(p, SamplingParams(k), seen(i))
    for i in range(3):
        seen.wait(i, timeout=300)
    engine.stop()
    assert [seen.tokens(i) for i in range(3)] == want
    assert (2,) in calls, "the batched step did not run the Triton kernel with per-row positions"


# --- BatchedKVCache ---------------------------------------------------------------------------


def _prefill(m, cache, slot, prompt):
    ids = torch.tensor([prompt])
    return m.logits(m.hidden_states(ids, cache.slot(slot))[:, -1])[0]


def _step(m, cache, tokens):
    ids = torch.tensor(tokens).reshape(-1, 1)
    return m.logits(m.hidden_states(ids, cache.rows(len(tokens)))[:, -1])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_batched_step_matches_each_sequence_alone(backend):
    # slots at different lengths (one free, one reused) step together; rows match solo decoding
    if backend == "triton" and not _backend.has_triton():
        pytest.skip("needs triton")
    m = model(
        fused=True, num_layers=1, hidden_size=32, intermediate_size=32, num_heads=2, num_kv_heads=1
    )
    with torch.inference_mode(), _backend.force(backend):
        cache = BatchedKVCache.for_model(m, 4, 16)
        assert cache.k[0].shape == (4, 1, 16, 16) and cache.k[0].dtype == torch.float32
        _prefill(m, cache, 2, [9, 9, 9, 9])
        cache.free(2)  # reused at once: the next prefill sees nothing of it
        prompts = {0: [1, 2, 3], 2: [4], 3: [5, 6, 7, 8, 9]}
        first = {s: _prefill(m, cache, s, p) for s, p in prompts.items()}
        assert cache.position.tolist() == [3, 0, 1, 5] and cache.active.tolist() == [1, 0, 1, 1]
        nxt = {s: int(first[s].argmax()) for s in prompts}
        logits = _step(m, cache, [nxt.get(s, 0) for s in range(4)])
        assert cache.position.tolist() == [4, 0, 2, 6] and cache.lengths == [4, 0, 2, 6]
        for s, p in prompts.items():
            whole = m(torch.tensor([[*p, nxt[s]]]))[0, -1]
            torch.testing.assert_close(logits[s], whole, atol=1e-5, rtol=1e-5)
        with pytest.raises(IndexError, match="slot 4"):
            cache.slot(4)


def test_unfused_batched_step_masks_per_row(unfused):
    with torch.inference_mode():
        cache = BatchedKVCache.for_model(unfused, 3, CONTEXT)
        mask = cache.rows(3).attention_mask(1)
        assert mask.shape == (3, 1, 1, CONTEXT) and not mask[:, :, :, 1:].any()
        prompts = {0: [3, 4, 5, 6], 1: [8]}
        nxt = {s: int(_prefill(unfused, cache, s, p).argmax()) for s, p in prompts.items()}
        logits = _step(unfused, cache, [nxt[0], nxt[1], 0])
        for s, p in prompts.items():
            whole = unfused(torch.tensor([[*p, nxt[s]]]))[0, -1]
            torch.testing.assert_close(logits[s], whole, atol=1e-5, rtol=1e-5)
        assert cache.position.tolist() == [5, 2, 0]
