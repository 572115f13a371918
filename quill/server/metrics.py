"""Prometheus metrics: one CollectorRegistry per app, served at GET /metrics.

Exported (all prefixed `quill_`): http_requests_total{method,route,status}, prompt_tokens_total{model},
generation_tokens_total{model}, flops_total{model}, generations_total{model,outcome}, active_slots{model},
batch_capacity{model}, queue_depth{model}, time_to_first_token_seconds{model} and
inter_token_latency_seconds{model} (histograms), http_request_duration_seconds{route} (histogram); the prefix
cache's prefix_cache_queries_total{model}, prefix_cache_hits_total{model} (lookups that found a block),
prefix_cache_queried_tokens_total{model}, prefix_cache_hit_tokens_total{model}, prefix_cache_bytes{model}, and
the KV pool it shares with paused generations: kv_pool_bytes, kv_pool_limit_bytes, kv_pool_evictions_total.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quill.batching import SchedulerObserver, Ticket

# Label values come from closed sets, so no request can add series: unknown methods and paths count as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """The server's metrics in a registry of its own (several apps in one process do not collide)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("quill_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram("quill_http_request_duration_seconds",
                                         "Time to the end of the response (streams included)", ["route"], registry=r)
        self.prompt_tokens = Counter("quill_prompt_tokens", "Prompt tokens of finished generations", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("quill_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.flops = Counter("quill_flops", "Floating-point operations of generations", ["model"], registry=r)
        self.generations = Counter("quill_generations", "Generations ended, by outcome (completed, cancelled, failed)",
                                   ["model", "outcome"], registry=r)
        self.active_slots = Gauge("quill_active_slots", "Batch rows decoding now", ["model"], registry=r)
        self.capacity = Gauge("quill_batch_capacity", "Batch rows available (--max-batch)", ["model"], registry=r)
        self.queue_depth = Gauge("quill_queue_depth", "Requests waiting for a batch row", ["model"], registry=r)
        self.ttft = Histogram("quill_time_to_first_token_seconds", "From submission to the first token", ["model"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.token_latency = Histogram("quill_inter_token_latency_seconds", "Between consecutive tokens of a sequence",
                                       ["model"], buckets=TOKEN_BUCKETS, registry=r)

    def observer(self, model: str, capacity: int) -> SchedulerObserver:
        """The scheduler hooks of one model; creates its series at zero so they show before any request."""
        self.capacity.labels(model).set(capacity)
        for c in (self.prompt_tokens, self.generation_tokens, self.flops, self.active_slots, self.queue_depth):
            c.labels(model)
        return _ModelObserver(self, model)

    def forget_model(self, model: str) -> None:
        """Drop an unloaded model's series."""
        for metric in (self.prompt_tokens, self.generation_tokens, self.flops, self.active_slots, self.capacity,
                       self.queue_depth, self.ttft, self.token_latency):
            try:
                metric.remove(model)
            except KeyError:
                pass
        for outcome in ("completed", "cancelled", "failed"):
            try:
                self.generations.remove(model, outcome)
            except KeyError:
                pass

    def watch_kv(self, state) -> None:
        """Export the KV pool and every served model's prefix cache of `state` (an AppState), read when scraped."""
        self.registry.register(_KVCollector(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ModelObserver(SchedulerObserver):
    def __init__(self, metrics: Metrics, model: str):
        self.active = metrics.active_slots.labels(model)
        self.queued = metrics.queue_depth.labels(model)
        self.ttft = metrics.ttft.labels(model)
        self.latency = metrics.token_latency.labels(model)
        self.prompt = metrics.prompt_tokens.labels(model)
        self.generated = metrics.generation_tokens.labels(model)
        self.flops = metrics.flops.labels(model)
        self.generations = metrics.generations
        self.model = model

    def occupancy(self, active_rows: int, queued: int) -> None:
        self.active.set(active_rows)
        self.queued.set(queued)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token_interval(self, seconds: float) -> None:
        self.latency.observe(seconds)

    def finished(self, ticket: Ticket) -> None:
        u = ticket.usage
        self.prompt.inc(u.prompt_tokens if ticket.first_token_at is not None else 0)  # only if prefilled
        self.generated.inc(u.completion_tokens)
        self.flops.inc(u.flops)
        outcome = "failed" if ticket.error is not None else "cancelled" if ticket.cancelled else "completed"
        self.generations.labels(self.model, outcome).inc()


class _KVCollector:
    """The prefix caches' counters and the KV pool's bytes, read from the server's state at each scrape."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        caches = [(name, m.engine.prefix_cache) for name, m in list(self.state.models.items())
                  if m.engine.prefix_cache is not None]
        families = [
            (CounterMetricFamily, "quill_prefix_cache_queries", "Prefix cache lookups (one per request)", "queries"),
            (CounterMetricFamily, "quill_prefix_cache_hits", "Prefix cache lookups that found a cached block", "hits"),
            (CounterMetricFamily, "quill_prefix_cache_queried_tokens", "Prompt tokens looked up", "queried_tokens"),
            (CounterMetricFamily, "quill_prefix_cache_hit_tokens", "Prompt tokens found cached (not computed again)",
             "hit_tokens"),
            (GaugeMetricFamily, "quill_prefix_cache_bytes", "Bytes of the prefix cache's blocks", "nbytes"),
        ]
        for kind, name, doc, attr in families:
            family = kind(name, doc, labels=["model"])
            for model, cache in caches:
                family.add_metric([model], getattr(cache, attr))
            yield family
        pool = self.state.kv_pool
        yield GaugeMetricFamily("quill_kv_pool_bytes", "Bytes of KV kept between calls (prefix blocks, paused calls)",
                                value=pool.used)
        yield GaugeMetricFamily("quill_kv_pool_limit_bytes", "The KV pool's bound (--prefix-cache)",
                                value=pool.max_bytes)
        yield CounterMetricFamily("quill_kv_pool_evictions", "KV entries evicted, least recently used first",
                                  value=pool.evictions)


def request_labels(scope: Scope) -> tuple[str, str]:
    """The (method, route) labels of a request: a known method or "other", its route's template or "other"."""
    method = scope["method"] if scope["method"] in METHODS else "other"
    return method, getattr(scope.get("route"), "path", None) or "other"


class MetricsMiddleware:
    """Counts every HTTP request by method, route template (not the raw path) and status, all from closed sets."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            method, name = request_labels(scope)
            self.metrics.requests.labels(method, name, str(status)).inc()
            self.metrics.request_seconds.labels(name).observe(time.perf_counter() - start)


router = APIRouter(tags=["system"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.quill.metrics.render(), media_type=CONTENT_TYPE_LATEST)
