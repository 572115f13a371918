"""The server under hostile or heavy use, in process: bounded metrics, timeouts, handles, validation gaps."""

from __future__ import annotations

import random
import string

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from quill.server import AppState, ServerConfig, create_app

OPEN_ROUTERS = ("quill.server.routes_openai", "quill.server.routes_tokens", "quill.server.metrics")


def series(client: TestClient, name: str) -> list[dict]:
    """The label sets of every sample of metric `name` at /metrics."""
    text = client.get("/metrics").text
    return [s.labels for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def test_random_methods_and_paths_leave_series_bounded():
    rng = random.Random(0)
    with TestClient(create_app(AppState(), router_modules=OPEN_ROUTERS)) as c:
        for _ in range(300):
            method = "".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 9)))
            path = "/" + "".join(rng.choices(string.ascii_lowercase, k=8))
            c.request(rng.choice([method, "GET", "POST"]), rng.choice([path, "/v1/models", "/health"]))
        labels = series(c, "quill_http_requests_total")
    assert {s["method"] for s in labels} <= {"GET", "POST", "other"}
    assert {s["route"] for s in labels} <= {"/v1/models", "/health", "/metrics", "other"}
    assert len(labels) <= 20


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    import quill

    return quill.load(tiny_model_dir)


@pytest.fixture
def app_client(tiny_engine, tmp_path):
    """An in-process server of the tiny model with an API key, its store (and handles) under tmp_path."""
    state = AppState(ServerConfig(api_keys=("k",), store_dir=tmp_path / "store"))
    state.add_model("tiny", tiny_engine)
    with TestClient(create_app(state, router_modules=OPEN_ROUTERS),
                    headers={"Authorization": "Bearer k"}) as c:
        c.state = state
        yield c


def error(r, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] and "None" not in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_lone_surrogate_handle_is_404(app_client):
    for handle in ("cont_\\ud800", "\\udfff", "cont_ab\\ud83d"):
        r = app_client.post("/v1/completions", content=f'{{"continuation": "{handle}"}}',
                            headers={"content-type": "application/json"})
        assert error(r, 404)["code"] == "continuation_not_found"


FLOAT_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "typical_p",
                "repetition_penalty")


def test_validation_gaps(app_client):
    c = app_client
    base = {"model": "tiny", "prompt": "ab", "max_tokens": 2}
    for field in FLOAT_FIELDS:
        error(c.post("/v1/completions", json={**base, field: True}), 400, field)
        assert c.post("/v1/completions", json={**base, field: 1}).status_code == 200, field  # ints are numbers
    for key in ("１", " 7 ", "1_0", "+5", "١٢", "-1", "1" * 5000):
        error(c.post("/v1/completions", json={**base, "logit_bias": {key: 1}}), 400, "logit_bias")
    error(c.post("/v1/completions", json={**base, "logit_bias": {"7": True}}), 400, "logit_bias")
    error(c.post("/v1/completions", json={**base, "logit_bias": {"7": 10 ** 400}}), 400, "logit_bias")
    assert c.post("/v1/completions", json={**base, "logit_bias": {"7": 5}}).status_code == 200
    for body in (b"", b"{not json", b"[1,"):
        error(c.post("/v1/completions", content=body, headers={"content-type": "application/json"}), 400)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    error(c.post("/v1/chat/completions", json={**chat, "max_completion_tokens": -1}), 400, "max_completion_tokens")
    err = error(c.post("/v1/chat/completions", json={**chat, "max_completion_tokens": 10_000}), 400,
                "max_completion_tokens")
    assert err["code"] == "context_length_exceeded"
    for n, fits in ((1, 8 + 64), (2, 4 + 64)):  # a list longer than an idle model's rows and queue: never a 429
        err = error(c.post("/v1/completions", json={**base, "n": n, "prompt": ["a"] * (fits + 1)}), 400, "prompt")
        assert err["code"] == "too_many_prompts" and f"at most {fits}" in err["message"]
    r = c.post("/v1/completions", json={**base, "n": 2, "max_tokens": 1, "prompt": ["a"] * (4 + 64)})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2 * 68
    error(c.get("/v1/nothing"), 404)
    error(c.request("BREW", "/v1/models"), 405)


def test_full_disk_keeps_the_result_and_says_no_handle_was_kept(app_client, tiny_engine, monkeypatch):
    import errno
    import json

    import quill.continuation as qc
    from quill.cost import forward_flops

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    body = {"model": "tiny", "prompt": "To be", "max_tokens": 9, "ignore_eos": True, "temperature": 0,
            "max_flops": forward_flops(tiny_engine.config, len("To be"), 0, 1)}
    want = app_client.post("/v1/completions", json=body).json()
    assert want["continuation"].startswith("cont_")
    monkeypatch.setattr(qc, "atomic_write", full)
    r = app_client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["choices"][0]["text"] == want["choices"][0]["text"] and got["continuation"] is None
    assert "no continuation handle could be kept" in got["continuation_error"]
    assert got["choices"][0]["finish_reason"] == "budget" and got["choices"][0]["continuation_error"]
    r = app_client.post("/v1/completions", json={**body, "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.text.rstrip().endswith("data: [DONE]") and not any("error" in ev for ev in events)
    assert "".join(c["text"] for ev in events for c in ev["choices"]) == want["choices"][0]["text"]
    assert events[-1]["choices"][0]["continuation_error"] and events[-1]["continuation"] is None
    messages = [{"role": "user", "content": "hi"}]
    count = app_client.post("/v1/tokenize", json={"model": "tiny", "messages": messages}).json()["count"]
    chat = {"model": "tiny", "messages": messages, "max_tokens": 3, "ignore_eos": True,
            "max_flops": forward_flops(tiny_engine.config, count, 0, 1)}
    r = app_client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200 and r.json()["choices"][0]["continuation_error"], r.text
    assert not list(app_client.state.continuations.directory.glob("*.tmp"))


# ---- continuation handles: bounded in number, files and memory ----------------------------------------------------


def paused(kv=None):
    """A paused sequence as `Engine.pause` makes it: its random stream's state (a small tensor) and its KV."""
    import torch

    from quill.generate import GenerationRequest, SequenceState

    return SequenceState(GenerationRequest([1, 2]), [1, 2], torch.Generator().get_state(), [], 0, "", kv=kv)


def test_handle_count_and_files_are_bounded(tmp_path):
    import os
    import time

    from quill.continuation import ContinuationStore
    from quill.errors import ContinuationError

    folder = tmp_path / "handles"
    store = ContinuationStore(folder, max_handles=5)
    handles = [store.put(paused(), "", "m") for _ in range(12)]
    assert len(store) == 5 and len(list(folder.glob("*.json"))) == 5
    with pytest.raises(ContinuationError) as e:
        store.get(handles[0], "", "m")  # the least recently used went first
    assert e.value.code == "continuation_not_found"
    assert store.get(handles[-1], "", "m").tokens == [1, 2]

    # a restart: the handles left on disk are indexed (and bounded), expired and half-written files removed
    short = ContinuationStore(folder, ttl=0.05, max_handles=5)
    assert len(short) == 5
    expired = [short.put(paused(), "", "m") for _ in range(3)]
    old_tmp, new_tmp, junk = folder / ".x.json.1.tmp", folder / ".y.json.2.tmp", folder / ("0" * 64 + ".json")
    for p in (old_tmp, new_tmp, junk):
        p.write_text("{")
    os.utime(old_tmp, (time.time() - 7200, time.time() - 7200))
    time.sleep(0.1)
    again = ContinuationStore(folder, max_handles=5)
    names = {p.name for p in folder.iterdir()}
    assert len(again) == 2 and len(names) == 3 and new_tmp.name in names  # a write in progress elsewhere stays
    with pytest.raises(ContinuationError):
        again.get(expired[0], "", "m")
    assert again.get(handles[-1], "", "m").tokens == [1, 2]
    # the periodic sweep removes what expired since (the two long-lived handles stay)
    short.put(paused(), "", "m")
    time.sleep(0.1)
    short.sweep()
    assert len(short) == 2 and len(list(folder.glob("*.json"))) == 2


def test_the_server_sweeps_expired_handles(tiny_engine, tmp_path):
    import time

    state = AppState(ServerConfig(store_dir=tmp_path, continuation_ttl=0.05, handle_sweep_seconds=0.05))
    folder = state.continuations.directory
    with TestClient(create_app(state, router_modules=OPEN_ROUTERS)):
        state.continuations.put(paused(), "", "m")
        assert len(list(folder.glob("*.json"))) == 1
        deadline = time.monotonic() + 10
        while list(folder.glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not list(folder.glob("*.json"))


def rss_mb() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_dropped_kv_caches_return_memory_to_the_os():
    """KV caches of many handles, cloned on another thread as the scheduler does, in sizes that vary: beyond
    the KV bound, resident memory stays within the bound plus generous slack."""
    import queue
    import threading

    import torch

    from quill.continuation import ContinuationStore

    bound, count = 32 << 20, 500
    store = ContinuationStore(None, max_kv_bytes=bound)
    cache = torch.randn(4, 8, 1024, 64)  # [layers, heads, positions, head dim]: up to 8 MiB a handle
    rng = random.Random(0)
    made: queue.Queue = queue.Queue(maxsize=1)

    kept = []  # small objects that live on between the caches (token lists, states), as in a server

    def scheduler() -> None:
        for _ in range(count):
            length = rng.randint(50, 1000)
            kept.append([0.5] * rng.randint(10, 500))
            made.put((cache[:, :, :length].clone(), cache[:, :, :length].clone()))

    thread = threading.Thread(target=scheduler)
    thread.start()
    start = None
    for i in range(count):
        store.put(paused(made.get()), "", "m")
        if i == 20:
            start = rss_mb()
    thread.join()
    grown = rss_mb() - start
    print(f"RSS grew {grown:.0f} MiB")
    assert grown < (bound >> 20) + 64


# ---- connections: header and body time limits, auth before the body, a cap ----------------------------------------


@pytest.fixture(scope="module")
def guarded(serve, tiny_model_dir):
    """A real server with short limits: 1 s for headers and body, 12 connections."""
    return serve(f"tiny={tiny_model_dir}", "--api-key", "k", "--header-timeout", "1", "--body-timeout", "1",
                 "--max-connections", "12").wait_ready()


def answer(sock, limit: float = 15.0) -> bytes:
    """Everything the server sends until it closes the connection (fails if it stays open past `limit`)."""
    import socket

    sock.settimeout(limit)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except socket.timeout:
        raise AssertionError(f"the connection was still open after {limit} s; got {out!r}") from None
    except ConnectionResetError:
        pass
    return out


def connect(server):
    import socket

    return socket.create_connection(("127.0.0.1", server.port), timeout=15)


def test_silent_partial_and_slow_connections_are_cut(guarded):
    import time

    with connect(guarded) as s:  # says nothing
        assert answer(s).startswith(b"HTTP/1.1 408 ")
    with connect(guarded) as s:  # headers a byte at a time: more bytes do not extend the deadline
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        try:
            while time.monotonic() - start < 15:
                s.sendall(b"X")
                time.sleep(0.2)
        except OSError:  # closed under us
            pass
        assert answer(s).startswith(b"HTTP/1.1 408 ")
    with connect(guarded) as s:  # a body that stops arriving
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ")
        reply = answer(s)
        assert reply.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in reply
    with connect(guarded) as s:  # a keyless client is answered before its body is read
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000\r\n\r\n{")
        reply = answer(s)
        assert reply.startswith(b"HTTP/1.1 401 ") and b"invalid_api_key" in reply
    r = __import__("httpx").get(guarded.url + "/v1/models", headers={"Authorization": "Bearer k"})
    assert r.status_code == 200  # and the server still serves


def test_connections_beyond_the_cap_get_503(guarded):
    sockets = [connect(guarded) for _ in range(20)]
    try:
        replies = [answer(s) for s in sockets]
    finally:
        for s in sockets:
            s.close()
    refused = [r for r in replies if r.startswith(b"HTTP/1.1 503 ")]
    assert len(refused) >= 8 and all(b"too_many_connections" in r for r in refused)
    assert all(r.startswith(b"HTTP/1.1 408 ") for r in replies if r not in refused)
