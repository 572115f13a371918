"""Quill's HTTP server: an OpenAI-compatible API over continuously batched models (see docs/server.md)."""

from quill.server.app import ROUTER_MODULES, create_app
from quill.server.auth import require_admin, require_api_key
from quill.server.errors import APIError
from quill.server.state import AppState, GenerationContext, LoadedModel, ServerConfig, get_state

__all__ = ["create_app", "ROUTER_MODULES", "AppState", "ServerConfig", "LoadedModel", "GenerationContext",
           "get_state", "require_api_key", "require_admin", "APIError"]
