"""Bearer-key authentication: `require_api_key` guards /v1, `require_admin` guards admin routes.

Keys are compared in constant time, each against every configured key (no early exit), so timing tells
nothing about which key or how much of it matched. The admin key is also accepted wherever an API key is.
Route modules attach them as dependencies: `APIRouter(dependencies=[Depends(require_api_key)])`;
`KeyBeforeBodyMiddleware` refuses keyless /v1 requests before their bodies are read.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from quill.errors import InvalidParameter
from quill.server.errors import APIError
from quill.server.state import AppState, ServerConfig, get_state

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The KEY of an `Authorization: Bearer KEY` header, or None."""
    header = headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def matches(token: str | None, keys: tuple[str, ...]) -> str | None:
    """The configured key equal to `token` (constant time over all keys), or None."""
    if token is None:
        return None
    given = token.encode()
    found = None
    for key in keys:
        if hmac.compare_digest(given, key.encode()) and found is None:
            found = key
    return found


def principal(key: str) -> str:
    """A stable, non-secret name for a key (for metering and logs)."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]


def api_principal(config: ServerConfig, token: str | None) -> str | None:
    """Who `token` is on /v1: "admin", "key:<hash prefix>", or None when /v1 is open; 401 APIError otherwise."""
    if not config.api_keys:
        return None
    if matches(token, config.admin_keys) is not None:
        return "admin"
    key = matches(token, config.api_keys)
    if key is None:
        message = "missing API key: send 'Authorization: Bearer KEY'" if token is None else "invalid API key"
        raise APIError(401, message, code="invalid_api_key", headers=_CHALLENGE)
    return principal(key)


async def require_api_key(request: Request, state: AppState = Depends(get_state)) -> str | None:
    """Allow the request when no API key is configured, or it carries a configured (or the admin) key.

    Sets `request.state.principal` ("key:<hash prefix>", "admin", or None on an open server) and
    `request.state.api_key` (the key itself, e.g. for `quill.continuation.owner_id`; None when open).
    """
    request.state.principal = request.state.api_key = None
    token = bearer_token(request.headers)
    request.state.principal = api_principal(state.config, token)
    if request.state.principal is not None:
        request.state.api_key = token
    return request.state.principal


class KeyBeforeBodyMiddleware:
    """Answer 401 to a /v1 request without a valid key before anything reads its body.

    FastAPI reads (and parses) a body before it runs the route's dependencies, so `require_api_key` alone
    let keyless clients make the server take their bodies; the dependency still sets the principal.
    """

    def __init__(self, app: ASGIApp, state: AppState):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"] + "/").startswith("/v1/"):
            try:
                api_principal(self.state.config, bearer_token(Headers(scope=scope)))
            except APIError as e:
                await JSONResponse(e.body(), status_code=e.status, headers=e.headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def require_admin(request: Request, state: AppState = Depends(get_state)) -> str:
    """Allow only requests carrying the admin key (`--admin-key`); with none configured admin routes are off (403)."""
    cfg = state.config
    if not cfg.admin_keys:
        raise APIError(403, "admin routes are disabled: start the server with --admin-key", code="admin_disabled")
    token = bearer_token(request.headers)
    if matches(token, cfg.admin_keys) is None:
        raise APIError(401, "this route needs the admin key: send 'Authorization: Bearer ADMIN_KEY'",
                       code="invalid_admin_key", headers=_CHALLENGE)
    request.state.principal, request.state.api_key = "admin", token
    return "admin"


def read_key_file(path: str | Path) -> tuple[str, ...]:
    """API keys from a file, one per line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InvalidParameter(f"cannot read API key file {path}: {e.strerror or e}", "api_key_file") from e
    keys = tuple(k for k in (line.strip() for line in lines) if k and not k.startswith("#"))
    if not keys:
        raise InvalidParameter(f"API key file {path} holds no keys", "api_key_file")
    return keys
