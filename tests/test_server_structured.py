"""Structured output over HTTP: `response_format` and `structured_outputs` on /v1/completions and
/v1/chat/completions, streamed and budgeted (also across a restart), and their 400s."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest

import quill

from conftest import CHAT_TEMPLATE, make_tiny_model
from test_structured import SCHEMA


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("structured-http") / "m", tokenizer="gpt2", n_positions=256,
                           chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def server(serve, model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("structured-store")

    def start():
        return serve(f"m={model_dir}", "--store", store).wait_ready()

    box = {"server": start()}
    box["restart"] = lambda: (box["server"].stop(), box.update(server=start()))
    return box


@pytest.fixture(scope="module")
def engine(model_dir):
    return quill.load(model_dir)


def post(server, route, body):
    return httpx.post(server["server"].url + route, json={"model": "m", **body}, timeout=120)


def streamed(server, route, body) -> tuple[str, str | None, str | None]:
    """Text, finish reason and continuation handle of a streamed call."""
    text, finish, handle = "", None, None
    with httpx.stream("POST", server["server"].url + route, json={"model": "m", **body, "stream": True},
                      timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    text += c.get("text", "") or c.get("delta", {}).get("content", "") or ""
                    finish = c["finish_reason"] or finish
                    handle = c.get("continuation") or handle
    return text, finish, handle


FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}


def test_completions_response_format_equals_the_library(server, engine):
    r = post(server, "/v1/completions", {"prompt": "Pet:", "max_tokens": 200, "n": 3, "seed": 5,
                                         "response_format": FORMAT})
    assert r.status_code == 200, r.text
    lib = engine.generate("Pet:", 200, n=3, seed=5, json_schema=SCHEMA)
    for got, want in zip(r.json()["choices"], lib.choices):
        assert (got["text"], got["finish_reason"]) == (want.text, "stop")
        jsonschema.validate(json.loads(got["text"]), SCHEMA)


def test_chat_structured_outputs(server):
    messages = [{"role": "user", "content": "Answer"}]
    for so, ok in [({"choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
                   ({"regex": "[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch("[0-9]{3}-[a-z]{2}", t)),
                   ({"json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
                   ({"grammar": 'root ::= "(" [a-c]+ ")"'}, lambda t: re.fullmatch(r"\([a-c]+\)", t))]:
        r = post(server, "/v1/chat/completions", {"messages": messages, "n": 2, "seed": 1, "max_tokens": 200,
                                                  "structured_outputs": so, "logprobs": True, "top_logprobs": 3})
        assert r.status_code == 200, r.text
        for c in r.json()["choices"]:
            assert ok(c["message"]["content"]) and c["finish_reason"] == "stop", c
            assert all(t["logprob"] <= 0 for t in c["logprobs"]["content"])


def test_json_object_and_streamed_chunks(server):
    r = post(server, "/v1/completions", {"prompt": "{", "max_tokens": 40, "n": 4, "seed": 2,
                                         "response_format": {"type": "json_object"}})
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:  # an object may run past max_tokens; one that ends parses to an object
        assert c["text"].startswith("{") and (c["finish_reason"] == "length" or isinstance(json.loads(c["text"]), dict))
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 40, "n": 3, "seed": 2,
                                         "logit_bias": {"90": 100, "92": 100},  # '{' and '}': an object that closes
                                         "response_format": {"type": "json_object"}})
    assert [(json.loads(c["text"]), c["finish_reason"]) for c in r.json()["choices"]] == [({}, "stop")] * 3
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 5, "logit_bias": {"92": 100},
                                         "response_format": {"type": "json_object"}})
    assert r.json()["choices"][0]["text"].startswith("{")  # unconstrained, the +100 on "}" would win at once
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 200, "seed": 8,
            "response_format": FORMAT}
    text, finish, _ = streamed(server, "/v1/chat/completions", body)
    assert finish == "stop" and text == post(server, "/v1/chat/completions", body).json()["choices"][0]["message"][
        "content"]
    jsonschema.validate(json.loads(text), SCHEMA)


def test_budgeted_pieces_and_a_restart_equal_one_call(server):
    body = {"prompt": "Pet:", "max_tokens": 200, "seed": 13, "top_k": 100, "structured_outputs": {"json": SCHEMA}}
    whole = post(server, "/v1/completions", body).json()
    budget = whole["usage"]["flops"] // 4
    text, finish, handle = streamed(server, "/v1/completions", {**body, "max_flops": budget})
    assert finish == "budget" and handle
    server["restart"]()  # the grammar state is replayed from the generated tokens
    pieces, calls = text, 1
    while finish == "budget":
        text, finish, handle = streamed(server, "/v1/completions", {"continuation": handle, "max_flops": budget})
        pieces += text
        calls += 1
    assert calls >= 3 and pieces == whole["choices"][0]["text"] and finish == "stop"


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", "Invalid type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"if": {}}}}},
     "response_format", "Unimplemented keys"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", ""),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "unclosed group"),
    ({"structured_outputs": {"grammar": "start: nope"}}, "structured_outputs", "unknown name"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "one constraint"),
    ({"structured_outputs": {}}, "structured_outputs", "needs one of"),
    ({"structured_outputs": {"choice": "a"}}, "structured_outputs", ""),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "not both"),
])
def test_errors_are_400_naming_the_field(server, body, param, words):
    for route, extra in [("/v1/completions", {"prompt": "x"}),
                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})]:
        r = post(server, route, {**extra, **body})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"].split(".")[0] == param and words in err["message"], err
