"""The FastAPI app: `create_app(state)` mounts the routers, error handlers, metrics and the body-size limit.

Extending the server (model store, metering, web page) needs no edit here beyond, at most, one line:

- add a module to `ROUTER_MODULES`; it exposes `router` (an APIRouter, included as is) and/or
  `mount(app, state)` (for static files, extra middleware, hooks on `state`);
- or pass `routers=[...]` / call `app.include_router(...)` on the app `create_app` returns.

Routers guard themselves: `dependencies=[Depends(require_api_key)]` for /v1 routes, `Depends(require_admin)` for
admin routes (both in `quill.server.auth`). Routes reach the models and hooks through `Depends(get_state)`.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
from collections.abc import Iterable
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quill.server.auth import KeyBeforeBodyMiddleware
from quill.server.errors import APIError, install_error_handlers
from quill.server.metrics import MetricsMiddleware
from quill.server.schemas import Health
from quill.server.state import AppState, get_state

log = logging.getLogger("quill.server")

# Modules whose `router` / `mount(app, state)` make up the server (in this order).
ROUTER_MODULES: tuple[str, ...] = (
    "quill.server.routes_openai",
    "quill.server.routes_tokens",
    "quill.server.metrics",
    "quill.server.routes_web",
    "quill.server.routes_store",
    "quill.server.routes_hub",
)

system = APIRouter(tags=["system"])


@system.get("/health", response_model=Health)
async def health(state: AppState = Depends(get_state)) -> Health:
    """Liveness and the served models; open (no key needed)."""
    return Health(status="ok" if state.started else "starting", models=list(state.models))


async def _run_hooks(hooks, state: AppState) -> None:
    for hook in hooks:
        result = hook(state)
        if inspect.isawaitable(result):
            await result


async def sweep_handles(state: AppState) -> None:
    """Remove expired continuation handles every `config.handle_sweep_seconds` (off the event loop)."""
    while True:
        await asyncio.sleep(state.config.handle_sweep_seconds)
        try:
            await asyncio.to_thread(state.continuations.sweep)
        except OSError:
            log.exception("sweeping continuation handles failed")


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Start every model's scheduler thread, the handle sweeper and the startup hooks; stop them at shutdown."""
    state: AppState = app.state.quill
    state.start()
    sweeper = asyncio.create_task(sweep_handles(state))
    await _run_hooks(state.startup_hooks, state)
    try:
        yield
    finally:
        sweeper.cancel()
        try:
            await _run_hooks(state.shutdown_hooks, state)
        finally:
            state.stop()


class BodyLimitMiddleware:
    """413 for request bodies over `state.config.max_body_bytes` (paths in `state.body_limit_exempt` excepted).

    A declared Content-Length over the limit is refused before reading; a chunked body is counted as it arrives.
    """

    def __init__(self, app: ASGIApp, state: AppState):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.state.config.max_body_bytes
        if scope["type"] != "http" or not limit or any(scope["path"].startswith(p) for p in self.state.body_limit_exempt):
            await self.app(scope, receive, send)
            return
        too_large = APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await JSONResponse(too_large.body(), status_code=413)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large
            return message

        await self.app(scope, counted, send)


def true_openapi(app: FastAPI) -> None:
    """Make /openapi.json say what the server answers: FastAPI documents 422 for every validated route, while
    validation errors are 400 in OpenAI's error shape (each route lists its own error statuses)."""
    generate = app.openapi

    def openapi() -> dict:
        schema = generate()
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema

    app.openapi = openapi


def create_app(state: AppState | None = None, routers: Iterable[APIRouter] | None = None,
               router_modules: Iterable[str] | None = None, title: str = "Quill") -> FastAPI:
    """The server app for `state` (its models, config and hooks), with the default routers plus `routers`."""
    from quill import __version__

    state = state or AppState()
    app = FastAPI(title=title, version=__version__, lifespan=lifespan)
    app.state.quill = state
    install_error_handlers(app)
    app.include_router(system)
    for name in ROUTER_MODULES if router_modules is None else router_modules:
        module = importlib.import_module(name)
        if getattr(module, "router", None) is not None:
            app.include_router(module.router)
        if callable(getattr(module, "mount", None)):
            module.mount(app, state)
    for r in routers or ():
        app.include_router(r)
    true_openapi(app)
    app.add_middleware(BodyLimitMiddleware, state=state)
    app.add_middleware(KeyBeforeBodyMiddleware, state=state)  # a keyless client gets 401 before 413
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)  # outermost: sees every status, 413s included
    return app
