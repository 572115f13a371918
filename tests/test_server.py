"""`quill serve` against real server processes on loopback: the OpenAI client, batching, streaming, errors, metrics.

Two servers are shared by every test: `server` (two tiny models, API keys from a file, an admin key) and `tight`
(one slow model with --max-batch 1 --max-queue 1 and a small body limit, no auth) for queueing, disconnects
and size limits.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import quill
from conftest import make_tiny_model

KEYS = ("key-one", "key-two")
ADMIN = "admin-secret"
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}


# ---- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Library-side reference generations on one thread: tiny models decode far faster so on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def servers(serve, tiny_model_dir, tiny_gpt2_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    key_file = work / "keys.txt"
    key_file.write_text(f"# API keys\n{KEYS[0]}\n\n{KEYS[1]}\n")
    long_dir = make_tiny_model(work / "long", n_positions=4096, n_embd=64)
    main = serve(f"tiny={tiny_model_dir}", f"tiny-gpt2={tiny_gpt2_dir}", "--api-key-file", key_file,
                 "--admin-key", ADMIN, "--max-batch", 8, "--store", work / "store")
    tight = serve(f"long={long_dir}", "--max-batch", 1, "--max-queue", 1, "--max-body-bytes", 4096,
                  "--store", work / "store-tight")
    return SimpleNamespace(main=main.wait_ready(), tight=tight.wait_ready())


@pytest.fixture(scope="session")
def server(servers):
    return servers.main


@pytest.fixture(scope="session")
def tight(servers):
    return servers.tight


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    return quill.load(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir):
    return quill.load(tiny_gpt2_dir)


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS[1], max_retries=0, timeout=30)


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


def metrics(url: str) -> dict[tuple, float]:
    """Every sample of /metrics as {(name, (label, value), ...): value}."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def sse_events(r: httpx.Response) -> list:
    """The JSON payloads of an SSE body, checking it ends with [DONE]."""
    data = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


# ---- the official OpenAI client ----------------------------------------------------------------------------------

SAMPLING = [
    dict(temperature=0),
    dict(temperature=0.9, seed=11),
    dict(temperature=0.8, top_p=0.9, seed=3, presence_penalty=0.5, frequency_penalty=0.3),
]


@pytest.mark.parametrize("kw", SAMPLING, ids=["greedy", "seeded", "penalties"])
def test_openai_completion_equals_library(client, tiny, kw):
    ref = tiny.generate("Hello there", 24, **kw)
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=24, **kw)
    assert r.object == "text_completion" and r.model == "tiny"
    c = r.choices[0]
    assert (c.text, c.finish_reason) == (ref.text, ref.finish_reason)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.usage.prompt_tokens, ref.usage.completion_tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.model_extra["flops"] == ref.usage.flops and r.usage.model_extra["seconds"] > 0

    chunks = list(client.completions.create(model="tiny", prompt="Hello there", max_tokens=24, stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])


def test_openai_completion_finish_reasons_and_extras(client, tiny):
    # 'length' at max_tokens; 'stop' at a stop string (removed from the text) or EOS; the vLLM extras pass through
    kw = dict(temperature=0.7, seed=5, extra_body={"top_k": 10, "min_p": 0.05, "repetition_penalty": 1.2,
                                                    "min_tokens": 3, "typical_p": 0.9})
    lib = dict(temperature=0.7, seed=5, top_k=10, min_p=0.05, repetition_penalty=1.2, min_tokens=3, typical_p=0.9)
    r = client.completions.create(model="tiny", prompt="Once upon", max_tokens=40, **kw)
    ref = tiny.generate("Once upon", 40, **lib)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (ref.text, ref.finish_reason)
    free = tiny.generate("abc", 60, temperature=0, ignore_eos=True).text
    stop = free[5:7]
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=60, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == free[:free.index(stop)]
    # default max_tokens is 16, as OpenAI's
    r = client.completions.create(model="tiny", prompt="abc", temperature=0, extra_body={"ignore_eos": True})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (16, "length")


def test_openai_completion_n_and_token_prompt(client, tiny):
    ids = tiny.tokenizer.encode("Seeds grow")
    ref = tiny.generate(ids, 12, n=3, temperature=1.0, seed=42)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=12, n=3, seed=42)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [c.text for c in ref.choices]
    assert r.usage.completion_tokens == ref.usage.completion_tokens
    chunks = list(client.completions.create(model="tiny", prompt=ids, max_tokens=12, n=3, seed=42, stream=True))
    texts = ["", "", ""]
    for ch in chunks:
        texts[ch.choices[0].index] += ch.choices[0].text
    assert texts == [c.text for c in ref.choices]


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=0.9, seed=11)], ids=["greedy", "seeded"])
def test_list_prompts_equal_one_by_one(http, tiny, kw):
    """A list of prompts (texts or token-id lists) answers as the same prompts sent one by one: each prompt's n
    choices in turn, index running over all, usage summed; streamed the same."""
    texts = ["Hello there", "abc", "Once upon a time"]
    ids = [tiny.tokenizer.encode(t) for t in texts]
    common = {"model": "tiny", "max_tokens": 10, "n": 2, "logprobs": 1, **kw}
    alone = [http.post("/v1/completions", json={**common, "prompt": t}).json() for t in texts]
    want = [(2 * k + c["index"], c["text"], c["finish_reason"], c["logprobs"]["token_ids"])
            for k, r in enumerate(alone) for c in r["choices"]]
    for prompt in (texts, ids):
        r = http.post("/v1/completions", json={**common, "prompt": prompt})
        assert r.status_code == 200, r.text
        body = r.json()
        got = [(c["index"], c["text"], c["finish_reason"], c["logprobs"]["token_ids"]) for c in body["choices"]]
        assert sorted(got) == sorted(want)
        for field in ("prompt_tokens", "completion_tokens", "total_tokens", "flops"):
            assert body["usage"][field] == sum(a["usage"][field] for a in alone), field
        events = sse_events(http.post("/v1/completions", json={**common, "prompt": prompt, "stream": True,
                                                                "stream_options": {"include_usage": True}}))
        streamed: dict[int, str] = {}
        for ev in events[:-1]:
            for c in ev["choices"]:
                streamed[c["index"]] = streamed.get(c["index"], "") + c["text"]
        assert streamed == {i: text for i, text, _, _ in want}
        assert events[-1]["usage"]["completion_tokens"] == body["usage"]["completion_tokens"]


def test_openai_completion_logprobs_and_echo(client, tiny):
    ref = tiny.generate("Hello", 8, temperature=0, logprobs=3)
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp.tokens == [tiny.tokenizer.id_to_piece(t.token) for t in ref.logprobs]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in ref.logprobs], abs=1e-4)
    assert all(len(top) <= 3 and lp.tokens[i] in top for i, top in enumerate(lp.top_logprobs))
    assert lp.text_offset == list(range(8))  # one character per token
    # echo: prompt text first, the first prompt token has no logprob; max_tokens=0 scores the prompt only
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == "Hello" and c.finish_reason == "length"
    assert c.logprobs.tokens == list("Hello") and c.logprobs.token_logprobs[0] is None
    assert c.logprobs.top_logprobs[0] is None and c.logprobs.text_offset == [0, 1, 2, 3, 4]
    score = tiny.score("Hello")
    assert c.logprobs.token_logprobs[1:] == pytest.approx(score.logprobs, abs=1e-4)


def test_logprobs_of_partial_utf8_tokens(http, tiny_gpt2):
    # byte-level BPE: an emoji can be split over tokens that are not whole UTF-8 characters
    ids = tiny_gpt2.tokenizer.encode("🙂")
    assert len(ids) > 1
    r = http.post("/v1/chat/completions", json={"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}]})
    assert_error(r, 400, "chat_template_missing", "messages")
    r = http.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": ids, "max_tokens": 2, "echo": True,
                                           "logprobs": 0, "temperature": 0})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"][0].startswith("bytes:\\x")
    assert r.json()["choices"][0]["text"].startswith("🙂")


def test_openai_chat_equals_library(client, tiny):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, who are you?"}]
    prompt = tiny.tokenizer.render_chat(messages)
    for kw in SAMPLING[:2]:
        ref = tiny.generate(prompt, 30, **kw)
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, **kw)
        m = r.choices[0]
        assert r.object == "chat.completion" and m.message.role == "assistant"
        assert (m.message.content, m.finish_reason) == (ref.text, ref.finish_reason)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.usage.prompt_tokens,
                                                                       ref.usage.completion_tokens)
        stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, stream=True,
                                                stream_options={"include_usage": True}, **kw)
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref.text
        finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finals == [ref.finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.usage.completion_tokens
    # max_tokens omitted: up to the end of the context
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.total_tokens == tiny.config.n_positions and r.choices[0].finish_reason == "length"


def test_openai_chat_logprobs(client, tiny):
    messages = [{"role": "user", "content": "Hello"}]
    ref = tiny.generate(tiny.tokenizer.render_chat(messages), 6, temperature=0, logprobs=2, ignore_eos=True)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [tiny.tokenizer.id_to_piece(t.token) for t in ref.logprobs]
    assert [c.logprob for c in content] == pytest.approx([t.logprob for t in ref.logprobs], abs=1e-4)
    assert all(c.bytes == list(c.token.encode()) and len(c.top_logprobs) == 2 for c in content)


def test_models_list(client, server):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny", "tiny-gpt2"}
    assert models["tiny"].model_extra["context_length"] == 128 and models["tiny"].model_extra["has_chat_template"]
    assert client.models.retrieve("tiny-gpt2").model_extra["vocab_size"] == 50257


# ---- continuous batching -----------------------------------------------------------------------------------------


def test_concurrent_greedy_requests_equal_alone(server, tiny):
    prompts = ["Hello", "The quick brown fox", "a", "To be or not to be", "xyz", "Lorem ipsum dolor",
               "Quill serves", "0123456789"]
    lengths = [40, 7, 60, 25, 1, 33, 50, 12]
    alone = [tiny.generate(p, n, temperature=0, ignore_eos=i % 2 == 0)
             for i, (p, n) in enumerate(zip(prompts, lengths))]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=30) as c:
            return await asyncio.gather(*[
                c.post("/v1/completions", json={"model": "tiny", "prompt": p, "max_tokens": n, "temperature": 0,
                                                "ignore_eos": i % 2 == 0, "stream": i % 3 == 0})
                for i, (p, n) in enumerate(zip(prompts, lengths))])

    for i, r in enumerate(asyncio.run(run())):
        assert r.status_code == 200, r.text
        if i % 3 == 0:
            events = sse_events(r)
            text = "".join(e["choices"][0]["text"] for e in events)
            finish = events[-1]["choices"][0]["finish_reason"]
        else:
            text, finish = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
        assert (text, finish) == (alone[i].text, alone[i].finish_reason), prompts[i]


# ---- token-level endpoints ---------------------------------------------------------------------------------------


def test_tokenize_detokenize(http, tiny, tiny_gpt2):
    r = http.post("/v1/tokenize", json={"model": "tiny-gpt2", "text": "Hello world"})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == tiny_gpt2.tokenizer.encode("Hello world") and body["pieces"] == ["Hello", " world"]
    assert body["count"] == 2 and body["max_model_len"] == 64
    r = http.post("/v1/detokenize", json={"model": "tiny-gpt2", "tokens": body["tokens"]})
    assert r.json()["text"] == "Hello world"
    r = http.post("/v1/tokenize", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert r.json()["tokens"] == tiny.tokenizer.encode(tiny.tokenizer.render_chat([{"role": "user", "content": "hi"}]))
    assert_error(http.post("/v1/detokenize", json={"model": "tiny", "tokens": [1, 10**6]}), 400, param="tokens")
    assert_error(http.post("/v1/tokenize", json={"model": "tiny", "text": "é"}), 400, param="text")


def test_inference_token_ids(http, tiny):
    ids = tiny.tokenizer.encode("Token ids")
    ref = tiny.generate(ids, 10, temperature=0.5, seed=9, top_k=20, logprobs=1)
    body = {"model": "tiny", "tokens": ids, "max_tokens": 10, "temperature": 0.5, "seed": 9, "top_k": 20,
            "logprobs": 1}
    r = http.post("/v1/inference", json=body)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert c["tokens"] == ref.tokens and c["finish_reason"] == ref.finish_reason
    assert [x["logprob"] for x in c["logprobs"]] == pytest.approx([t.logprob for t in ref.logprobs], abs=1e-4)
    assert r.json()["usage"]["completion_tokens"] == len(ref.tokens)
    events = sse_events(http.post("/v1/inference", json={**body, "stream": True}))
    assert [t for e in events for t in e["choices"][0]["tokens"]] == ref.tokens
    assert events[-1]["choices"][0]["finish_reason"] == ref.finish_reason


# ---- errors ------------------------------------------------------------------------------------------------------


def test_auth(server, client):
    url = server.url
    assert httpx.get(url + "/health").json() == {"status": "ok", "models": ["tiny", "tiny-gpt2"]}  # open
    err = assert_error(httpx.get(url + "/v1/models"), 401, "invalid_api_key")
    assert "Authorization" in err["message"]
    r = httpx.post(url + "/v1/completions", json={"prompt": "a"}, headers={"Authorization": "Bearer wrong"})
    assert_error(r, 401, "invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    for key in (*KEYS, ADMIN):  # every key of the file, and the admin key
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def test_request_errors(http, server):
    def post(body, path="/v1/completions"):
        return http.post(path, json=body)

    err = assert_error(post({"model": "tiny", "prompt": "Hello", "max_tokens": 500}), 400,
                       "context_length_exceeded", "max_tokens")
    assert "128" in err["message"] and "500" in err["message"]
    assert_error(post({"model": "tiny", "prompt": "x" * 200}), 400, "context_length_exceeded", "prompt")
    assert_error(post({"model": "nope", "prompt": "a"}), 404, "model_not_found", "model")
    assert_error(post({"model": "nope", "messages": [{"role": "user", "content": "a"}]}, "/v1/chat/completions"),
                 404, "model_not_found", "model")
    assert_error(post({"model": "tiny"}), 400, "missing_required_parameter", "prompt")
    assert_error(post({"model": "tiny", "prompt": "a", "temperature": "hot"}), 400, "invalid_value", "temperature")
    assert_error(post({"model": "tiny", "prompt": "a", "temperature": -1}), 400, "invalid_value", "temperature")
    assert_error(post({"model": "tiny", "prompt": "a", "top_p": 0}), 400, "invalid_value", "top_p")
    assert_error(post({"model": "tiny", "prompt": "a", "logprobs": 21}), 400, "invalid_value", "logprobs")
    assert_error(post({"model": "tiny", "prompt": "a", "n": 0}), 400, "invalid_value", "n")
    assert_error(post({"model": "tiny", "prompt": "a", "n": 9}), 400, "invalid_value", "n")
    assert_error(post({"model": "tiny", "prompt": "a", "max_tokens": -1}), 400, "invalid_value", "max_tokens")
    assert_error(post({"model": "tiny", "prompt": "a", "logit_bias": {"x": 1}}), 400, "invalid_value", "logit_bias")
    assert_error(post({"model": "tiny", "prompt": "a", "logit_bias": {"5": 500}}), 400, "invalid_value", "logit_bias")
    assert_error(post({"model": "tiny", "prompt": "a", "stop": [""]}), 400, "invalid_value", "stop")
    for search in ({"num_beams": 3}, {"penalty_alpha": 0.6, "top_k": 4}, {"use_beam_search": True}):
        assert_error(post({"model": "tiny", "prompt": "a", **search}), 400, "unsupported_parameter", next(iter(search)))
    assert_error(post({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "num_beams": 2},
                      "/v1/chat/completions"), 400, "unsupported_parameter", "num_beams")
    assert post({"model": "tiny", "prompt": "a", "max_tokens": 1, "num_beams": 1}).status_code == 200  # neutral
    assert_error(post({"model": "tiny", "prompt": [1, 99999]}), 400, "invalid_value", "prompt")
    assert_error(post({"model": "tiny", "prompt": {"a": 1}}), 400, "invalid_value", "prompt")
    assert_error(post({"model": "tiny", "prompt": ["a", [1, 99999]]}), 400, "invalid_value", "prompt")
    assert_error(post({"model": "tiny", "messages": []}, "/v1/chat/completions"), 400, "invalid_value", "messages")
    assert_error(post({"model": "tiny", "messages": [{"role": "user"}, {"content": "x"}]}, "/v1/chat/completions"),
                 400, "missing_required_parameter", "messages[1].role")
    assert_error(post({"model": "tiny", "messages": [{"role": "robot", "content": "x"}], "top_logprobs": 50},
                      "/v1/chat/completions"), 400, "invalid_value", "top_logprobs")
    r = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json")
    assert_error(http.get("/v1/nothing-here"), 404, "not_found")
    assert_error(http.get("/v1/completions"), 405, "method_not_allowed")
    # the official client surfaces the same errors
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[0], max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="Hello", max_tokens=1000)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])


def test_body_too_large(tight):
    big = {"model": "long", "prompt": "a" * 5000, "max_tokens": 1}
    assert_error(httpx.post(tight.url + "/v1/completions", json=big), 413, "request_too_large")

    def chunks():  # no Content-Length: counted as it arrives
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    r = httpx.post(tight.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "request_too_large")
    small = httpx.post(tight.url + "/v1/completions", json={"model": "long", "prompt": "a", "max_tokens": 2})
    assert small.status_code == 200  # open server (no keys), still serving


def test_queue_full_and_disconnect_frees_slot(tight):
    url = tight.url
    gauge = lambda name: metrics(url).get((name, ("model", "long")), 0.0)  # noqa: E731
    cancelled = lambda: metrics(url).get(("quill_generations_total", ("model", "long"),  # noqa: E731
                                          ("outcome", "cancelled")), 0.0)
    before = cancelled()
    tokens_before = gauge("quill_generation_tokens_total")
    pool = ThreadPoolExecutor(1)
    with httpx.Client(base_url=url, timeout=30) as c:
        body = {"model": "long", "prompt": "a", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            wait_for(lambda: gauge("quill_active_slots") == 1, what="an active slot")
            queued = pool.submit(httpx.post, url + "/v1/completions",
                                 json={"model": "long", "prompt": "b", "max_tokens": 3}, timeout=30)
            wait_for(lambda: gauge("quill_queue_depth") == 1, what="a queued request")
            r = httpx.post(url + "/v1/completions", json={"model": "long", "prompt": "c", "max_tokens": 3})
            assert_error(r, 429, "queue_full")
            assert int(r.headers["retry-after"]) >= 1
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).completions.create(
                    model="long", prompt="c", max_tokens=3)
            assert not queued.done()
        # leaving the block closes the connection mid-stream: the slot frees and the queued request runs
        assert queued.result(timeout=30).status_code == 200
    wait_for(lambda: gauge("quill_active_slots") == 0 and gauge("quill_queue_depth") == 0, what="a free slot")
    assert cancelled() == before + 1
    assert gauge("quill_generation_tokens_total") - tokens_before < 3900  # stopped long before max_tokens
    r = httpx.post(url + "/v1/completions", json={"model": "long", "prompt": "d", "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_non_streaming_disconnect_cancels(tight):
    def sample(name, *labels):
        return metrics(tight.url).get((name, ("model", "long"), *labels), 0.0)

    before = sample("quill_generations_total", ("outcome", "cancelled"))
    body = {"model": "long", "prompt": "a", "max_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up while the server generates
        httpx.post(tight.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    wait_for(lambda: sample("quill_generations_total", ("outcome", "cancelled")) == before + 1, what="a cancel")
    assert sample("quill_active_slots") == 0
    r = httpx.post(tight.url + "/v1/completions", json={"model": "long", "prompt": "e", "max_tokens": 2})
    assert r.status_code == 200


# ---- metrics -----------------------------------------------------------------------------------------------------


def test_metrics_move(server, http):
    before = metrics(server.url)
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "Count", "max_tokens": 5, "temperature": 0,
                                           "ignore_eos": True})
    assert r.status_code == 200
    http.post("/v1/completions", json={"model": "nope", "prompt": "a"})
    after = metrics(server.url)

    def delta(*key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    route = ("method", "POST"), ("route", "/v1/completions")
    assert delta("quill_http_requests_total", *route, ("status", "200")) == 1
    assert delta("quill_http_requests_total", *route, ("status", "404")) == 1
    assert delta("quill_generation_tokens_total", ("model", "tiny")) == 5
    assert delta("quill_prompt_tokens_total", ("model", "tiny")) == 5
    assert delta("quill_flops_total", ("model", "tiny")) == r.json()["usage"]["flops"]
    assert delta("quill_generations_total", ("model", "tiny"), ("outcome", "completed")) == 1
    assert delta("quill_time_to_first_token_seconds_count", ("model", "tiny")) == 1
    assert delta("quill_inter_token_latency_seconds_count", ("model", "tiny")) == 4
    assert after[("quill_batch_capacity", ("model", "tiny"))] == 8
    assert after[("quill_active_slots", ("model", "tiny"))] == 0


# ---- in-process: extension points and the command line -----------------------------------------------------------


def test_admin_dependency_and_extra_routers():
    from fastapi import APIRouter, Depends
    from fastapi.testclient import TestClient

    from quill.server import AppState, ServerConfig, create_app, require_admin

    admin = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

    @admin.get("/ping")
    async def ping():
        return {"pong": True}

    mine = ("quill.server.routes_openai", "quill.server.routes_tokens", "quill.server.metrics")
    app = create_app(AppState(ServerConfig(api_keys=("user",), admin_keys=("boss",))), routers=[admin],
                     router_modules=mine)
    with TestClient(app) as c:
        assert_error(c.get("/admin/ping"), 401, "invalid_admin_key")
        assert_error(c.get("/admin/ping", headers={"Authorization": "Bearer user"}), 401, "invalid_admin_key")
        assert c.get("/admin/ping", headers={"Authorization": "Bearer boss"}).json() == {"pong": True}
        assert c.get("/v1/models", headers={"Authorization": "Bearer user"}).json() == {"object": "list", "data": []}
    with TestClient(create_app(AppState(), routers=[admin], router_modules=mine)) as c:
        assert_error(c.get("/admin/ping", headers={"Authorization": "Bearer boss"}), 403, "admin_disabled")
        assert c.get("/v1/models").status_code == 200  # no keys: open


def test_serve_command_errors(capsys, monkeypatch, tmp_path):
    from quill import cli

    assert cli.main(["serve", str(tmp_path / "missing")]) == 2
    assert "quill: error:" in capsys.readouterr().err
    monkeypatch.setattr("quill.resolve.bundled_models", lambda: [])
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "shakespeare" in err and "quill serve PATH" in err
    assert cli.main(["serve", "m", "--api-key-file", str(tmp_path / "nokeys")]) == 2
    assert "API key file" in capsys.readouterr().err
