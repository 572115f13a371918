"""Prefix caching: a cached prompt prefix changes nothing but the work done, and the bill says so.

Every output is compared with the same call on an engine without a prefix cache; cached tokens and FLOPs with
the cost formula for the uncached remainder; the byte bound with the pool's own count after every call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import httpx
import pytest
import torch

import quill
from quill.batching import Scheduler
from quill.cost import generation_flops
from quill.errors import BudgetError, QuillError
from quill.generate import DecodeBatch, GenerationRequest, new_sequences
from quill.kvpool import KVPool
from quill.prefix_cache import DEFAULT_BLOCK as B, PrefixCache
from quill.sampling import SamplingParams
from quill.tokenizer import Tokenizer

from conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = {"greedy": {"temperature": 0}, "seeded": {"temperature": 0.9, "top_k": 30, "seed": 7}}
SHARED = "ROMEO: But soft, what light through yonder window breaks? It is the east"  # 71 characters = tokens
KEY, OTHER = "key-alice", "key-bob"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny256", n_positions=256)


@pytest.fixture(scope="module")
def plain(model_dir):
    """The reference: the same model without a prefix cache."""
    return quill.load(model_dir, prefix_cache=0)


def fresh(model_dir, **kw) -> quill.Engine:
    return quill.load(model_dir, **kw)


def blocks_of(n: int) -> int:
    return n // B * B


def common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def expected_cached(prompt: list[int], seen: list[list[int]]) -> int:
    """What a lookup must find: the whole blocks of the longest prefix shared with a sequence whose KV was kept,
    leaving at least the last prompt token to compute."""
    return blocks_of(min(len(prompt) - 1, max((common(prompt, s) for s in seen), default=0)))


def fed(completion) -> list[int]:
    """The tokens whose keys and values a finished call computed: prompt and output but the last token."""
    return (completion.prompt_tokens + completion.tokens)[:-1]


# ---- the library ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("first_len", [48, 53], ids=["on-boundary", "off-boundary"])
def test_cached_prefix_changes_nothing_but_the_work(model_dir, plain, setting, first_len):
    """A prompt that extends an earlier one: the same tokens as without a cache; cached_tokens is the earlier
    prompt's whole blocks and FLOPs are the formula's for the uncached remainder."""
    engine = fresh(model_dir)
    first = SHARED[:first_len]
    a = engine.generate(first, max_tokens=0)
    assert a.usage.cached_tokens == 0
    second = first + " and Juliet is the sun."
    out = engine.generate(second, max_tokens=24, ignore_eos=True, **SETTINGS[setting])
    ref = plain.generate(second, max_tokens=24, ignore_eos=True, **SETTINGS[setting])
    assert out.tokens == ref.tokens and out.text == ref.text
    prompt = engine.encode(second)
    cached = expected_cached(prompt, [engine.encode(first)])
    assert out.usage.cached_tokens == cached == blocks_of(first_len) > 0
    assert out.usage.flops == generation_flops(engine.config, len(prompt), 24, cached_tokens=cached)
    assert ref.usage.flops == generation_flops(engine.config, len(prompt), 24) > out.usage.flops
    # the same prompt again: all but its last token's block come from the cache, same tokens
    again = engine.generate(second, max_tokens=24, ignore_eos=True, **SETTINGS[setting])
    assert again.tokens == ref.tokens
    assert again.usage.cached_tokens == expected_cached(prompt, [fed(out)])


def test_kernels_and_torch_decode_paths(model_dir, plain, monkeypatch):
    """A prefix hit feeds the fused decode kernels and the plain torch path alike (the remainder may be one
    token: a decode step)."""
    for kernels in (True, False):
        engine = fresh(model_dir)
        monkeypatch.setattr(engine.model, "use_kernels", kernels)
        engine.generate(SHARED[:64], max_tokens=0)
        for prompt in (SHARED[:65], SHARED):  # one token to compute, then several
            out = engine.generate(prompt, max_tokens=16, temperature=0, ignore_eos=True)
            assert out.usage.cached_tokens == 64
            assert out.tokens == plain.generate(prompt, max_tokens=16, temperature=0, ignore_eos=True).tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("setting", SETTINGS)
def test_cuda_hit_equals_uncached(model_dir, setting):
    """On a GPU (blocks kept in device memory, copies under CUDA's turn, graphed decode steps): a hit gives the
    uncached run's tokens, cached_tokens the earlier prompt's whole blocks."""
    engine = quill.load(model_dir, device="cuda")
    ref = quill.load(model_dir, device="cuda", prefix_cache=0)
    engine.generate(SHARED[:48], max_tokens=0)
    kw = dict(max_tokens=24, ignore_eos=True, **SETTINGS[setting])
    out = engine.generate(SHARED, **kw)
    assert out.usage.cached_tokens == 48
    assert out.tokens == ref.generate(SHARED, **kw).tokens


@pytest.mark.parametrize("dtype,kv", [("float32", "bfloat16"), ("bfloat16", None), ("float16", None),
                                      ("float32", "float16")])
def test_half_caches(model_dir, dtype, kv):
    """bf16 and fp16 KV caches (a half model's, or fp32 activations over a half cache as int8 models keep):
    cached blocks are stored in the cache's dtype, so a hit gives the uncached run's tokens."""
    engine = quill.load(model_dir, dtype=dtype, kv_cache=kv)
    ref = quill.load(model_dir, dtype=dtype, kv_cache=kv, prefix_cache=0)
    engine.generate(SHARED[:40], max_tokens=0)
    out = engine.generate(SHARED, max_tokens=20, temperature=0, ignore_eos=True)
    assert out.usage.cached_tokens == 32
    assert out.tokens == ref.generate(SHARED, max_tokens=20, temperature=0, ignore_eos=True).tokens
    block = next(iter(engine.prefix_cache._blocks.values()))
    assert block.k.dtype == engine.model.new_cache(1, 1).k.dtype


def test_int8_model(model_dir):
    """An int8 model's bf16 cache."""
    engine = quill.load(model_dir, quantize="int8")
    ref = quill.load(model_dir, quantize="int8", prefix_cache=0)
    engine.generate(SHARED[:50], max_tokens=0)
    out = engine.generate(SHARED, max_tokens=20, temperature=0, ignore_eos=True)
    assert out.usage.cached_tokens == 48
    assert out.tokens == ref.generate(SHARED, max_tokens=20, temperature=0, ignore_eos=True).tokens


def test_hit_in_the_middle_of_a_ragged_batch(model_dir, plain):
    """A request with a cached prefix joins a batch whose other rows are mid-decode at other positions; every
    row gives the tokens it gives alone without a cache."""
    engine = fresh(model_dir)
    engine.generate(SHARED[:60], max_tokens=0)
    batch = DecodeBatch(engine.model, 4, prefix_cache=engine.prefix_cache)

    def req(prompt, seed=None):
        return GenerationRequest(engine.encode(prompt), 20, SamplingParams(temperature=0.8 if seed else 0.0,
                                                                           seed=seed, ignore_eos=True))

    running = [req("the quiet river", seed=3), req("a", None)]
    seqs = [new_sequences(engine.model, engine.tokenizer, r, 1)[0] for r in running]
    for s in seqs:
        batch.add([s])
    for _ in range(5):
        batch.step()
    late = new_sequences(engine.model, engine.tokenizer, req(SHARED, seed=5), 2)  # two samples of it
    batch.add(late)
    assert late[0].usage.cached_tokens == 48
    while batch.rows:
        batch.step()
    for s, r in zip(seqs, running):
        assert s.generated == plain.generate(r.prompt_ids, max_tokens=20, temperature=r.sampling.temperature,
                                             seed=r.sampling.seed, ignore_eos=True).tokens
    alone = plain.generate(SHARED, max_tokens=20, n=2, temperature=0.8, seed=5, ignore_eos=True)
    assert [s.generated for s in late] == [c.tokens for c in alone.choices]


def test_same_prefix_arriving_together(model_dir, plain):
    """Two requests sharing a long prefix, queued at once: the second reuses what the first's prefill cached."""
    engine = fresh(model_dir)
    scheduler = Scheduler(engine, max_batch=4)
    loop = asyncio.new_event_loop()
    prompts = [SHARED + " one", SHARED + " two!"]
    tickets = [scheduler.submit(GenerationRequest(engine.encode(p), 16, SamplingParams(temperature=0,
                                                                                      ignore_eos=True)), loop=loop)
               for p in prompts]
    scheduler.start()
    try:
        async def read(t):
            return [ev.token async for ev in t if ev.token >= 0]

        outs = [loop.run_until_complete(read(t)) for t in tickets]
    finally:
        scheduler.stop()
        loop.close()
    for p, out in zip(prompts, outs):
        assert out == plain.generate(p, max_tokens=16, temperature=0, ignore_eos=True).tokens
    assert [t.usage.cached_tokens for t in tickets] == [0, blocks_of(len(SHARED) + 1)]
    assert engine.prefix_cache.queries == 2 and engine.prefix_cache.hits == 1


def test_a_budget_that_pays_only_for_the_uncached_rest(model_dir):
    """max_flops below the whole prefill but enough for the uncached remainder: the call runs."""
    engine = fresh(model_dir)
    prompt = engine.encode(SHARED)
    req = GenerationRequest(prompt, 4)
    cfg = engine.config
    full, rest = req.prefill_flops(cfg), req.prefill_flops(cfg, 64)
    assert rest < full
    with pytest.raises(BudgetError):
        engine.generate(SHARED, max_tokens=4, max_flops=rest)
    engine.generate(SHARED[:64], max_tokens=0)
    out = engine.generate(SHARED, max_tokens=4, temperature=0, max_flops=rest)
    assert out.usage.cached_tokens == 64 and out.usage.flops == rest
    assert out.finish_reason == "budget" and len(out.tokens) == 1


def test_bound_holds_under_distinct_prompts_and_evictions_change_nothing(model_dir, plain):
    """A pool with room for a few blocks: bytes never pass the bound while prompts stream through, evictions
    happen, and outputs stay those of the uncached model (whatever is still cached)."""
    probe = fresh(model_dir)
    probe.generate(SHARED[:B], max_tokens=0)
    block_bytes = probe.prefix_cache.nbytes
    bound = 7 * block_bytes + block_bytes // 2
    engine = fresh(model_dir, prefix_cache=bound)
    pool = engine.prefix_cache.pool
    for i in range(30):
        prompt = f"{i:03d} " + SHARED[i % 20:] + f" {i}"
        out = engine.generate(prompt, max_tokens=8, temperature=0, ignore_eos=True)
        assert pool.used <= bound and engine.prefix_cache.nbytes == pool.used
        if i % 7 == 0:
            assert out.tokens == plain.generate(prompt, max_tokens=8, temperature=0, ignore_eos=True).tokens
    assert pool.evictions > 0
    last = f"{29:03d} " + SHARED[9:] + " 29"
    out = engine.generate(last + "!", max_tokens=8, temperature=0, ignore_eos=True)
    assert 0 < out.usage.cached_tokens <= 7 * B
    assert out.tokens == plain.generate(last + "!", max_tokens=8, temperature=0, ignore_eos=True).tokens


def test_pool_is_shared_with_paused_generations(model_dir):
    """One pool, one bound: a paused generation's KV cache is an entry beside the prefix blocks, and filling the
    pool with prefix blocks evicts it (its resume then recomputes, with the same result)."""
    engine = fresh(model_dir)
    pool = engine.prefix_cache.pool
    assert engine.continuations.pool is pool
    part = engine.generate("ROMEO:", max_tokens=40, seed=3, max_flops=engine.generate(
        "ROMEO:", max_tokens=10, seed=3).usage.flops)
    assert part.finish_reason == "budget"
    whole = engine.generate("ROMEO:", max_tokens=40, seed=3)
    kv_entries = [k for k in pool._entries if k[0] == id(engine.continuations)]
    assert len(kv_entries) == 1
    # room for one more block: the next blocks evict the least recently used entries, the paused cache first
    pool.max_bytes = pool.used + engine.prefix_cache.nbytes // len(engine.prefix_cache)
    engine.generate(SHARED, max_tokens=2)
    assert kv_entries[0] not in pool and pool.used <= pool.max_bytes
    text = part.text
    while part.finish_reason == "budget":
        part = engine.generate(continuation=part.continuation, max_flops=10**9)
        text += part.text
    assert text == whole.text


def test_owner_salts_the_cache(model_dir):
    """A call of another owner (API key) finds nothing of another's prompt; the same owner does."""
    engine = fresh(model_dir)
    engine.generate(SHARED, max_tokens=0, owner="a")
    assert engine.generate(SHARED, max_tokens=0, owner="b").usage.cached_tokens == 0
    assert engine.generate(SHARED, max_tokens=0, owner="a").usage.cached_tokens == 64


def test_prefix_cache_off_and_bad_sizes(model_dir):
    engine = quill.load(model_dir, prefix_cache=0)
    assert engine.prefix_cache is None
    engine.generate(SHARED, max_tokens=0)
    assert engine.generate(SHARED, max_tokens=0).usage.cached_tokens == 0
    assert quill.load(model_dir, prefix_cache="1MiB").prefix_cache.pool.max_bytes == 1 << 20
    for bad in ("lots", -1, 1.5):
        with pytest.raises(QuillError) as e:
            quill.load(model_dir, prefix_cache=bad)
        assert e.value.param == "prefix_cache"


def test_pinned_blocks_are_never_evicted():
    pool = KVPool(100)
    cache = PrefixCache(pool, block_size=2)
    k = torch.zeros(1, 1, 10, 1)  # [layers, heads, positions, head dim]: a block of 2 positions is 16 bytes
    cache.insert([1, 2, 3, 4], "", k, k)
    hit = cache.lookup([1, 2, 3, 4, 5], "")
    assert hit.tokens == 4 and pool.used == 32
    assert cache.insert(list(range(10, 20)), "", k, k) == 4  # 5 blocks; room for 4 beside the 2 pinned
    assert pool.used == 96 and pool.evictions == 0
    hit.release()
    cache.insert(list(range(30, 34)), "", k, k)  # unpinned now: the least recently used go
    assert pool.used <= 100 and pool.evictions > 0
    assert cache.lookup([1, 2, 3, 4, 5], "").tokens == 0


# ---- over HTTP --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory):
    """A tiny GPT-2 with gpt2-open-instruct-v1's tokenizer: the GPT-2 BPE plus its instruct tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("models") / "instruct"
    tok = Tokenizer.gpt2()
    tok.add_tokens(["### End", "### Instruction:", "### Response:\n"])
    tok = dataclasses.replace(tok, eos_token="### End")
    torch.manual_seed(1)
    eos = tok.token_to_id("### End")
    GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=512,
                               bos_token_id=eos, eos_token_id=eos, initializer_range=0.2)).save_pretrained(folder)
    tok.save(folder)
    return folder


@pytest.fixture(scope="module")
def servers(serve, model_dir, instruct_dir):
    main = serve(f"tiny={model_dir}", f"instruct={instruct_dir}", "--api-key", KEY, "--api-key", OTHER)
    shared = serve(f"tiny={model_dir}", "--api-key", KEY, "--api-key", OTHER, "--prefix-cache-share")
    return main.wait_ready(), shared.wait_ready()


def post(server, path, body, key=KEY):
    r = httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def streamed_usage(server, path, body, key=KEY) -> tuple[str, dict]:
    text, usage = "", None
    with httpx.stream("POST", server.url + path, json={**body, "stream": True,
                                                      "stream_options": {"include_usage": True}},
                      headers={"Authorization": f"Bearer {key}"}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for c in chunk["choices"]:
                    text += c.get("text") or c.get("delta", {}).get("content") or ""
    return text, usage


@pytest.mark.parametrize("setting", SETTINGS)
def test_http_completions_report_and_bill_the_hit(servers, plain, setting):
    main, _ = servers
    prompt = f"{setting}: " + SHARED
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "ignore_eos": True, **SETTINGS[setting]}
    first = post(main, "/v1/completions", body)
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    ref = plain.generate(prompt, max_tokens=16, ignore_eos=True, **SETTINGS[setting])
    assert first["choices"][0]["text"] == ref.text
    text, usage = streamed_usage(main, "/v1/completions", {**body, "prompt": prompt + " again"})
    ids = plain.encode(prompt + " again")
    cached = expected_cached(ids, [plain.encode(prompt)])
    assert usage["prompt_tokens_details"]["cached_tokens"] == cached > 0
    assert usage["flops"] == generation_flops(plain.config, len(ids), 16, cached_tokens=cached)
    assert text == plain.generate(prompt + " again", max_tokens=16, ignore_eos=True, **SETTINGS[setting]).text


def test_http_isolation_by_api_key_unless_shared(servers):
    main, shared = servers
    for server, other_hits in ((main, False), (shared, True)):
        body = {"model": "tiny", "prompt": "isolation " + SHARED, "max_tokens": 1}
        post(server, "/v1/completions", body, KEY)
        again = post(server, "/v1/completions", body, OTHER)["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert (again > 0) == other_hits
        assert post(server, "/v1/completions", body, KEY)["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_http_multi_turn_chat_reports_earlier_turns_cached(servers, instruct_dir):
    """Ten turns of an open-instruct chat: turn n finds turns 1..n-1 (prompts and answers) cached, up to
    the last whole block, and is billed for the rest only."""
    main, _ = servers
    tok = Tokenizer.load(instruct_dir)
    engine = quill.load(instruct_dir, prefix_cache=0)
    messages, seen, previous = [], [], []
    for turn in range(10):
        messages.append({"role": "user", "content": f"Question {turn}: what is {turn} plus {turn}?"})
        r = post(main, "/v1/chat/completions", {"model": "instruct", "messages": messages, "max_tokens": 12,
                                                "temperature": 0})
        answer = r["choices"][0]["message"]["content"]
        prompt = tok.encode(tok.render_chat(messages))
        cached = r["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == expected_cached(prompt, seen)
        assert prompt[:len(previous)] == previous and cached >= blocks_of(len(previous))  # the earlier turns
        assert cached > 0 or turn == 0
        out = engine.generate(prompt, max_tokens=12, temperature=0, stop_token_ids=[tok.token_to_id("### End")])
        assert answer == out.text
        assert r["usage"]["flops"] == generation_flops(engine.config, len(prompt), len(out.tokens), cached_tokens=cached)
        seen.append(fed(out))
        previous = prompt
        messages.append({"role": "assistant", "content": answer})


def test_metrics(servers):
    main, _ = servers
    post(main, "/v1/completions", {"model": "tiny", "prompt": "metrics " + SHARED, "max_tokens": 1})
    post(main, "/v1/completions", {"model": "tiny", "prompt": "metrics " + SHARED, "max_tokens": 1})
    text = httpx.get(main.url + "/metrics").text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("quill_prefix_cache") or line.startswith("quill_kv_pool")}
    assert values['quill_prefix_cache_queries_total{model="tiny"}'] >= 2
    assert values['quill_prefix_cache_hits_total{model="tiny"}'] >= 1
    assert values['quill_prefix_cache_hit_tokens_total{model="tiny"}'] >= 64
    assert values['quill_prefix_cache_bytes{model="tiny"}'] > 0
    assert 0 < values["quill_kv_pool_bytes"] <= values["quill_kv_pool_limit_bytes"]
    assert "quill_kv_pool_evictions_total" in values


def test_server_state_one_pool_for_every_model_and_off_switch(model_dir, tmp_path):
    """The server's models share one pool with the continuation store; --prefix-cache 0 turns prefix caching off
    and leaves paused calls their default bound; unloading a model frees its blocks."""
    from quill.kvpool import default_bytes
    from quill.server.state import AppState, ServerConfig

    state = AppState(ServerConfig(store_dir=tmp_path, prefix_cache=1 << 20))
    a, b = state.add_model("a", fresh(model_dir)), state.add_model("b", fresh(model_dir))
    assert a.engine.prefix_cache.pool is b.engine.prefix_cache.pool is state.continuations.pool is state.kv_pool
    assert state.kv_pool.max_bytes == 1 << 20
    a.engine.generate(SHARED, max_tokens=0)
    assert state.kv_pool.used == a.engine.prefix_cache.nbytes > 0
    state.remove_model("a")
    assert state.kv_pool.used == 0
    off = AppState(ServerConfig(store_dir=tmp_path / "off", prefix_cache=0))
    assert off.add_model("a", fresh(model_dir)).engine.prefix_cache is None
    assert off.continuations.pool.max_bytes == default_bytes()
    assert off.cache_salt("k1") != off.cache_salt("k2")
    assert AppState(ServerConfig(store_dir=tmp_path / "s", prefix_cache_share=True)).cache_salt("k1") == ""


def test_concurrent_caches_on_one_pool_keep_the_books():
    """Two caches (two models' schedulers) inserting and looking up on one small pool from two threads: the
    bound holds, the pool's bytes are the caches' bytes, and a hit's rows are the ones inserted."""
    import random
    import threading

    pool = KVPool(40 * 2 * 4 * 4)  # 40 blocks of [1, 1, 4, 1] keys and values (fp32)
    caches = [PrefixCache(pool, block_size=4), PrefixCache(pool, block_size=4)]
    errors = []

    def work(cache, seed):
        rng = random.Random(seed)
        try:
            for _ in range(300):
                tokens = [rng.randrange(8) for _ in range(rng.randrange(4, 33))]
                row = torch.tensor(tokens, dtype=torch.float32).reshape(1, 1, -1, 1)
                cache.insert(tokens, "", row, -row)
                hit = cache.lookup(tokens + [0], "")
                k = torch.zeros(1, 1, hit.tokens, 1)
                hit.copy_into(k, k.clone())
                assert k.flatten().tolist() == tokens[:hit.tokens]
                hit.release()
                assert pool.used <= pool.max_bytes
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(c, i)) for i, c in enumerate(caches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert pool.used == sum(c.nbytes for c in caches) <= pool.max_bytes and pool.evictions > 0
