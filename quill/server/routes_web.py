"""The web playground: GET / (the page) and /static/... (its script and style sheet), open like /health.

The page is plain HTML, CSS and JavaScript in `quill/server/static/` (no build step, nothing fetched from
elsewhere); it talks to the same /v1 API as any client, with the API key the user types in. Its responses
carry a Content-Security-Policy that allows this origin only.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

from quill.server.state import AppState

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Everything from this origin only: no CDN, no inline script, the API on the same host.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer"}


class _Static(StaticFiles):
    """StaticFiles that revalidates (a new version of Quill shows at once) and sends the page's headers."""

    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        for k, v in HEADERS.items():
            response.headers.setdefault(k, v)
        return response


def mount(app: FastAPI, state: AppState) -> None:
    """Serve the playground at / and its files at /static (no API key needed: the page asks for one)."""

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)

    app.mount("/static", _Static(directory=STATIC_DIR), name="static")
