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
