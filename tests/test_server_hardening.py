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
