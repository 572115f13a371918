"""The continuous-batching scheduler: one request's failure is its own, and Retry-After tracks the real wait."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

import quill
from quill.batching import QueueFull, Scheduler
from quill.errors import QuillError
from quill.generate import GenerationRequest
from quill.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

# Range-valid settings that once made the sampler produce NaN and pick token id = vocab_size (or crash top-p)
POISON = [dict(temperature=1e-38), dict(temperature=1e-300, top_p=0.5), dict(top_p=1e-300),
          dict(repetition_penalty=1e-300), dict(typical_p=1e-300), dict(repetition_penalty=1e-300, top_p=1e-300)]


@pytest.fixture(scope="module")
def engine(tiny_gpt2_dir):
    return quill.load(tiny_gpt2_dir)


def request(engine, prompt: str, max_tokens: int, **sampling) -> GenerationRequest:
    return GenerationRequest(engine.encode(prompt), max_tokens, SamplingParams(ignore_eos=True, **sampling))


def collect(ticket) -> list[int]:
    """The tokens of a ticket, read on the event loop it was submitted from (raises the ticket's error)."""
    async def read() -> list[int]:
        return [ev.token async for ev in ticket if ev.token >= 0]

    return LOOP.run_until_complete(read())


LOOP = asyncio.new_event_loop()  # tickets deliver to the loop they were submitted for, as in the server


@pytest.mark.parametrize("settings", POISON, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_poison_settings_sample_valid_tokens(engine, settings):
    """Each once-poisonous setting now yields tokens inside the vocabulary (tiny temperatures are greedy)."""
    out = engine.generate("hello there", max_tokens=12, seed=3, ignore_eos=True, **settings)
    assert len(out.tokens) == 12 and all(0 <= t < engine.config.vocab_size for t in out.tokens)
    if settings.get("temperature", 1.0) < 1e-5:
        assert out.tokens == engine.generate("hello there", max_tokens=12, temperature=0, ignore_eos=True).tokens


def test_poison_beside_a_running_stream(engine):
    """The poison settings, submitted while a greedy request decodes, leave it exactly as it is alone."""
    alone = engine.generate("the quiet river", max_tokens=40, temperature=0, ignore_eos=True).tokens
    scheduler = Scheduler(engine, max_batch=8, max_queue=16).start()
    try:
        greedy = scheduler.submit(request(engine, "the quiet river", 40, temperature=0), loop=LOOP)
        poisoned = [scheduler.submit(request(engine, "hello there", 6, seed=1, **p), loop=LOOP) for p in POISON]
        assert collect(greedy) == alone
        for t in poisoned:
            tokens = collect(t)
            assert len(tokens) == 6 and all(0 <= x < engine.config.vocab_size for x in tokens)
    finally:
        scheduler.stop()


class Injected(QuillError):
    """A failure planted in one request."""


def test_a_failing_request_fails_alone(engine, monkeypatch):
    """A request that fails in its prefill, and one whose sampler fails mid-stream, each end with their own
    error; the greedy request decoding beside them finishes intact and the scheduler keeps serving."""
    alone = engine.generate("the quiet river", max_tokens=30, temperature=0, ignore_eos=True).tokens
    scheduler = Scheduler(engine, max_batch=8, max_queue=16).start()
    try:
        add = scheduler._batch.add

        def add_failing_prefill(seqs, hit=None):
            if seqs[0].request.prompt_ids == engine.encode("fail at prefill"):
                raise Injected("prefill failed")
            return add(seqs, hit)

        monkeypatch.setattr(scheduler._batch, "add", add_failing_prefill)
        greedy = scheduler.submit(request(engine, "the quiet river", 30, temperature=0), loop=LOOP)
        at_prefill = scheduler.submit(request(engine, "fail at prefill", 5, temperature=0), loop=LOOP)
        mid_stream = scheduler.submit(request(engine, "fail later", 20, seed=2), n=2, loop=LOOP)
        choose = mid_stream.seqs[1].choose
        calls = []

        def choose_failing_on_fourth(logits):
            calls.append(1)
            if len(calls) == 4:
                raise Injected("sampler failed")
            return choose(logits)

        mid_stream.seqs[1].choose = choose_failing_on_fourth
        with pytest.raises(Injected, match="prefill failed"):
            collect(at_prefill)
        with pytest.raises(Injected, match="sampler failed"):
            collect(mid_stream)
        assert collect(greedy) == alone
        assert collect(scheduler.submit(request(engine, "the quiet river", 30, temperature=0), loop=LOOP)) == alone
        assert scheduler.active_rows == 0 and scheduler.queued == 0
    finally:
        scheduler.stop()


def test_retry_after_tracks_the_wait_of_a_full_queue(tmp_path):
    """Retry-After is within 2x of how long the back of a full queue then waits for its first token."""
    from conftest import make_tiny_model

    engine = quill.load(make_tiny_model(tmp_path / "m", n_embd=128, n_layer=4, n_head=4, n_positions=1024))
    scheduler = Scheduler(engine, max_batch=2, max_queue=4).start()
    tickets = []

    def top_up() -> None:
        while True:
            try:
                tickets.append(scheduler.submit(request(engine, "abc", 400, temperature=0), loop=LOOP))
            except QueueFull:
                return

    try:
        top_up()
        while sum(t.done for t in tickets) < 3:  # let the drain rate be measured
            time.sleep(0.02)
            top_up()
        with pytest.raises(QueueFull) as full:
            scheduler.submit(request(engine, "abc", 400, temperature=0), loop=LOOP)
        rejected_at = time.perf_counter()
        back = scheduler._waiting[-1]
        while back.first_token_at is None:
            time.sleep(0.01)
        waited = back.first_token_at - rejected_at
        advertised = full.value.retry_after
        assert waited / 2 <= advertised <= max(1.0, 2 * waited), (advertised, waited)
    finally:
        scheduler.stop()


def test_poison_over_http_beside_a_stream(serve, tmp_path):
    """Over HTTP: a streamed greedy completion runs while the poison requests arrive; it streams to its end,
    equal to the same request alone, and each poison request gets a valid answer within seconds."""
    from conftest import make_tiny_model

    folder = make_tiny_model(tmp_path / "m", tokenizer="gpt2", n_positions=512, n_embd=64)
    server = serve(f"tiny-gpt2={folder}", "--max-batch", 8).wait_ready()
    body = {"model": "tiny-gpt2", "prompt": "the quiet river", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True}
    alone = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    streamed: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    streamed.append(httpx.Response(200, content=line[6:]).json()["choices"][0]["text"])

    thread = threading.Thread(target=stream)
    thread.start()
    while not streamed:
        time.sleep(0.01)
    try:
        for settings in POISON:
            r = httpx.post(server.url + "/v1/completions", timeout=10,
                           json={"model": "tiny-gpt2", "prompt": "hello", "max_tokens": 5, "seed": 1, **settings})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["finish_reason"] == "length"
    finally:
        thread.join(60)
    assert "".join(streamed) == alone


def test_a_new_or_cancelled_request_interrupts_a_greedy_burst(engine):
    """Running rows may decode several greedy steps in one kernel call (`DecodeBatch.step`'s burst); the flag that
    ends such a call after its current step is raised by every arrival and cancellation, and lowered only by
    the scheduler's thread before it looks at the queue."""
    scheduler = Scheduler(engine, max_batch=2, max_queue=4)  # not started: nothing lowers the flag
    flag = scheduler._interrupt.word
    assert flag.value == 0
    ticket = scheduler.submit(request(engine, "the quiet river", 4, temperature=0), loop=LOOP)
    assert flag.value == 1
    flag.value = 0
    ticket.cancel()
    assert flag.value == 1
