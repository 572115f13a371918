"""Every error the server answers is JSON in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from quill.batching import QueueFull, SchedulerClosed
from quill.errors import (BudgetError, ContextLengthError, ContinuationError, InvalidParameter, QuillError,
                          TokenizerError)

log = logging.getLogger("quill.server")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


# The code of an error raised without one (routing, tuspyserver, plain QuillErrors): no error has `code: null`.
_HTTP_CODES = {400: "invalid_value", 404: "not_found", 405: "method_not_allowed", 409: "conflict", 410: "gone",
               412: "precondition_failed", 413: "request_too_large", 415: "unsupported_media_type",
               460: "checksum_mismatch", 500: "internal_error"}


class APIError(StarletteHTTPException):
    """An error answered as OpenAI error JSON; raise it from any route or dependency."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.status, self.message, self.param = status, message, param
        self.code = code or _HTTP_CODES.get(status, f"http_{status}")
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_CONTINUATION_STATUS = {"continuation_not_found": 404, "continuation_expired": 410, "continuation_forbidden": 403,
                        "continuation_not_kept": 507}


def from_exception(e: BaseException) -> APIError:
    """The APIError a Quill exception (or anything else) is answered with."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), param=e.param, code="context_length_exceeded")
    if isinstance(e, ContinuationError):
        return APIError(_CONTINUATION_STATUS.get(e.code, 400), str(e), param=e.param, code=e.code)
    if isinstance(e, BudgetError):
        return APIError(400, str(e), param=e.param, code="budget_too_small")
    if isinstance(e, InvalidParameter):
        return APIError(400, str(e), param=e.param, code="invalid_value")
    if isinstance(e, TokenizerError):
        return APIError(400, str(e), code="invalid_value")
    if isinstance(e, QueueFull):
        return APIError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, SchedulerClosed):
        return APIError(503, str(e), code="model_unavailable")
    if isinstance(e, QuillError):
        return APIError(400, str(e))
    return APIError(500, "internal server error", code="internal_error")


_TYPE_TAGS = {"str", "int", "float", "bool", "bytes", "list", "dict", "set", "tuple", "none", "is-instance",
              "lax-or-strict", "json-or-python", "function-after", "function-before", "function-wrap", "function-plain"}


def _is_type_tag(part: str) -> bool:
    """pydantic's names for union alternatives in an error location ('str', 'list[int]', 'function-after[..]')."""
    return part in _TYPE_TAGS or part.endswith("]") or part.startswith(("constrained-", "typed-dict"))


def _loc_param(loc: tuple) -> tuple[str | None, bool]:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'; also whether it ran into a union alternative."""
    parts = list(loc[1:]) if loc and loc[0] in ("body", "query", "path", "header") else list(loc)
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _is_type_tag(str(p)):
            return out or None, True
        else:
            out += ("." if out else "") + str(p)
    return out or None, False


def validation_error(exc: RequestValidationError) -> APIError:
    """The 400 of a request pydantic refused: the first error, naming its parameter (or the body)."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}",
                        code="invalid_json")
    param, union = _loc_param(tuple(first.get("loc", ())))
    if param is None and first.get("type") in ("model_attributes_type", "dict_type", "model_type", "missing"):
        return APIError(400, "the request body must be a JSON object (send Content-Type: application/json)",
                        code="invalid_json")
    if first.get("type") == "missing":
        return APIError(400, f"missing required parameter {param!r}", param=param, code="missing_required_parameter")
    message = first.get("msg", "invalid value")
    if union:
        message = "not one of the accepted types (e.g. " + message[0].lower() + message[1:] + ")"
    return APIError(400, f"invalid value for {param!r}: {message}" if param else message, param=param,
                    code="invalid_value")


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc, APIError):
        return await _api_error(request, exc)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    err = APIError(exc.status_code, detail, headers=exc.headers)
    return await _api_error(request, err)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return await _api_error(request, validation_error(exc))


async def _quill_error(request: Request, exc: QuillError) -> JSONResponse:
    return await _api_error(request, from_exception(exc))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return await _api_error(request, from_exception(exc))


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error raised while handling a request as OpenAI error JSON."""
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(QuillError, _quill_error)
    app.add_exception_handler(Exception, _unexpected)
