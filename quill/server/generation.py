"""What every generating route shares: model lookup, admission, waiting with disconnect checks, SSE, usage."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from tokenizers import decoders

from quill.batching import Ticket
from quill.server.errors import APIError, from_exception
from quill.server.state import AppState, GenerationContext, LoadedModel
from quill.tokenizer import Tokenizer

log = logging.getLogger("quill.server")
DISCONNECT_POLL_SECONDS = 0.1
LONG_TEXT = 16384  # characters: longer texts are tokenized off the event loop


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


async def encode(tokenizer: Tokenizer, text: str, param: str) -> list[int]:
    """Token ids of a text; long texts are encoded on a worker thread so the event loop keeps serving."""
    try:
        if len(text) > LONG_TEXT:
            return await asyncio.to_thread(tokenizer.encode, text)
        return tokenizer.encode(text)
    except Exception as e:
        raise APIError(400, f"cannot tokenize {param}: {e}", param=param, code="invalid_value") from e


def get_model(state: AppState, name: str | None) -> LoadedModel:
    """The served model `name` (the default model when None); 404 model_not_found otherwise."""
    if name is None or name == "":
        name = state.default_model
        if name is None:
            raise APIError(503, "no model is loaded", code="model_not_found")
    model = state.models.get(name)
    if model is None:
        known = ", ".join(state.models) or "none"
        raise APIError(404, f"the model {name!r} does not exist (served: {known})", param="model",
                       code="model_not_found")
    return model


async def _call(hook: Callable, *args) -> None:
    result = hook(*args)
    if inspect.isawaitable(result):
        await result


async def submit(state: AppState, ctx: GenerationContext) -> Ticket:
    """Run the admission checks, then queue the request on its model's scheduler (429 when the queue is full)."""
    for check in state.admission_checks:
        await _call(check, ctx)
    try:
        return ctx.model.scheduler.submit(ctx.request, ctx.n)
    except Exception as e:
        raise from_exception(e) from e


async def finished(state: AppState, ctx: GenerationContext, ticket: Ticket) -> None:
    """Tell the usage listeners what a generation cost (once it ended, however it ended)."""
    for listener in state.usage_listeners:
        try:
            await _call(listener, ctx, ticket.usage)
        except Exception:
            log.exception("usage listener failed")


async def wait(ticket: Ticket, http: Request) -> None:
    """Wait until every sample of `ticket` finished; a client that hangs up cancels it (its rows free at once)."""
    async def drain() -> None:
        async for _ in ticket:
            pass

    task = asyncio.ensure_future(drain())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                task.result()  # raises the scheduler's error, if any
                return
            if await http.is_disconnected():
                raise APIError(499, "client closed the request", code="client_closed")
    finally:
        if not task.done():
            ticket.cancel()
            task.cancel()


def usage_body(ticket: Ticket) -> dict[str, Any]:
    u = ticket.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "flops": u.flops, "seconds": round(u.seconds, 6)}


def sse(data: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


SSE_DONE = sse("[DONE]")


class EventStream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends (done, client gone, error): cancels the ticket."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Any]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            result = self.on_close()
            if inspect.isawaitable(result):
                await result


def error_event(e: BaseException) -> bytes:
    return sse(from_exception(e).body())


# ---- token text ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes (the inverse of `bytes_to_unicode`)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The exact bytes a token stands for (part of a UTF-8 character for some byte-level tokens)."""
    piece = tokenizer.backend.id_to_token(token_id)
    if piece is not None and token_id not in tokenizer.added_tokens.values() \
            and isinstance(tokenizer.backend.decoder, decoders.ByteLevel):
        table = _byte_decoder()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    return tokenizer.decode([token_id]).encode("utf-8")


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as text for logprobs: its characters, or `bytes:\\xe2\\x80` when it is not whole UTF-8 (as OpenAI)."""
    raw = token_bytes(tokenizer, token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
