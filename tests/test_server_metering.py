"""Metered calls over HTTP: budgets, continuation handles (also across a restart), and their errors."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from quill.cost import forward_flops
from quill.model import GPTConfig
from quill.weights import load_config

KEY, OTHER = "key-alice", "key-bob"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def server(serve, tiny_model_dir, store):
    def start():
        return serve(f"tiny={tiny_model_dir}", "--store", store, "--api-key", KEY, "--api-key", OTHER,
                     "--continuation-ttl", "30").wait_ready()

    box = {"server": start()}
    box["restart"] = lambda: (box["server"].stop(), box.update(server=start()))
    return box


@pytest.fixture(scope="module")
def config(tiny_model_dir) -> GPTConfig:
    return load_config(tiny_model_dir)


def post(server, body, key=KEY):
    return httpx.post(server["server"].url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=60)


def stream(server, body, key=KEY) -> tuple[str, str, str | None]:
    """Text, finish reason and continuation handle of a streamed completion."""
    text, finish, handle = "", None, None
    with httpx.stream("POST", server["server"].url + "/v1/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {key}"}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk["choices"]:
                text += choice["text"]
                finish = choice["finish_reason"] or finish
                handle = choice.get("continuation") or handle
    return text, finish, handle


SETTINGS = {"greedy": {"temperature": 0}, "seeded": {"temperature": 0.8, "top_k": 20, "seed": 99}}
PROMPT = {"model": "tiny", "prompt": "To be, or not", "max_tokens": 48, "ignore_eos": True}


@pytest.mark.parametrize("setting", SETTINGS)
def test_pieces_over_http_equal_one_call(server, config, setting):
    body = {**PROMPT, **SETTINGS[setting]}
    whole = post(server, body).json()
    total = whole["usage"]["flops"]
    assert whole["continuation"] is None and whole["choices"][0]["finish_reason"] == "length"
    step = forward_flops(config, 1, 64, 1)
    for first, later, at_least in [(total // 2 + 1, None, 2), (total // 5 + 1, None, 5),
                                   (total - 40 * step, step, 40)]:
        r = post(server, {**body, "max_flops": first}).json()
        text, calls = r["choices"][0]["text"], 1
        while r["choices"][0]["finish_reason"] == "budget":
            assert r["usage"]["flops"] <= (first if calls == 1 else later or first)
            r = post(server, {"model": "tiny", "continuation": r["continuation"], "max_flops": later or first}).json()
            text, calls = text + r["choices"][0]["text"], calls + 1
        assert text == whole["choices"][0]["text"] and calls >= at_least


def test_streamed_pieces_and_a_restart_between_them(server):
    body = {**PROMPT, **SETTINGS["seeded"]}
    whole = post(server, body).json()["choices"][0]["text"]
    budget = post(server, body).json()["usage"]["flops"] // 3
    text, finish, handle = stream(server, {**body, "max_flops": budget})
    assert finish == "budget" and handle
    server["restart"]()  # the KV cache is gone with the process: the next piece recomputes it from disk state
    pieces = text
    while finish == "budget":
        text, finish, handle = stream(server, {"model": "tiny", "continuation": handle, "max_flops": budget * 2})
        pieces += text
    assert pieces == whole and finish == "length"


def test_budget_and_handle_errors(server, config):
    def error(r, status, param=None, code=None):
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert (param is None or err["param"] == param) and (code is None or err["code"] == code)
        return err

    prefill = forward_flops(config, len("To be, or not"), 0, 1)
    err = error(post(server, {**PROMPT, "max_flops": prefill - 1}), 400, "max_flops", "budget_too_small")
    assert str(prefill) in err["message"]
    error(post(server, {**PROMPT, "max_flops": -3}), 400, "max_flops")
    error(post(server, {"model": "tiny", "continuation": "cont_" + "A" * 32}), 404, "continuation",
          "continuation_not_found")
    r = post(server, {**PROMPT, "temperature": 0, "max_flops": prefill}).json()
    assert r["choices"][0]["finish_reason"] == "budget"
    handle = r["continuation"]
    error(post(server, {"model": "tiny", "continuation": handle}, key=OTHER), 403, "continuation",
          "continuation_forbidden")
    error(post(server, {"model": "tiny", "continuation": handle, "prompt": "x"}), 400, "prompt")
    error(post(server, {"model": "tiny", "continuation": handle, "max_flops": 5}), 400, "max_flops",
          "budget_too_small")
    error(post(server, {"model": "tiny"}), 400, "prompt")
    assert post(server, {"model": "tiny", "continuation": handle}).status_code == 200  # valid until it expires


def test_expired_handle(serve, tiny_model_dir, tmp_path, config):
    srv = serve(str(tiny_model_dir), "--store", tmp_path, "--continuation-ttl", "0.5").wait_ready()
    prefill = forward_flops(config, 3, 0, 1)
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 9, "max_flops": prefill,
                                                     "ignore_eos": True}, timeout=60).json()
    time.sleep(0.7)
    r = httpx.post(srv.url + "/v1/completions", json={"continuation": r["continuation"]}, timeout=60)
    assert r.status_code == 410 and r.json()["error"]["code"] == "continuation_expired"
    srv.stop()
