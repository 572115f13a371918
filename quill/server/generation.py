"""What every generating route shares: model lookup, building and admitting requests, chat prompts, waiting
with disconnect checks, SSE, usage, and the `Responder` that answers a generation as one body or a stream."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from tokenizers import decoders

from quill.batching import Ticket
from quill.generate import Sequence, StepEvent, Usage
from quill.server.errors import APIError, from_exception
from quill.server.schemas import SamplingFields
from quill.server.state import AppState, GenerationContext, LoadedModel
from quill.tokenizer import InstructTemplate, Tokenizer

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


def build_request(model: LoadedModel, body: SamplingFields, prompt_ids: list[int], max_tokens: int | None, *,
                  salt: str, stop=None, stop_token_ids: list[int] | None = None, logprobs: int | None = None,
                  echo: bool = False):
    """A validated GenerationRequest (InvalidParameter / ContextLengthError become 400s naming the parameter);
    `salt` (AppState.cache_salt) decides whose cached prompt blocks it may reuse."""
    searches = body.searches()
    if searches:
        raise APIError(400, f"{searches[0]}: beam, diverse beam and contrastive search are not served over HTTP, "
                       "whose requests share batched decode steps; use `quill generate --num-beams ...` or "
                       "quill.Engine", param=searches[0], code="unsupported_parameter")
    if isinstance(body.n, int) and body.n > model.scheduler.max_batch:
        raise APIError(400, f"n must be at most {model.scheduler.max_batch} (this server's --max-batch)", param="n",
                       code="invalid_value")
    return model.engine.request(prompt_ids, max_tokens, stop=stop,
                                stop_token_ids=list(stop_token_ids or []) + list(body.stop_token_ids or []),
                                logprobs=logprobs, echo=echo, max_flops=body.max_flops, constraint=body.constraint(),
                                cache_salt=salt, **body.sampling())


def render_messages(model: LoadedModel, messages) -> tuple[str, list[int]]:
    """The prompt text of chat messages and the stop token ids that end the assistant's turn."""
    tok = model.engine.tokenizer
    if not tok.has_chat_template:
        raise APIError(400, f"model {model.name!r} has no chat template; use /v1/completions",
                       param="messages", code="chat_template_missing")
    plain = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise APIError(400, "only text content parts are supported", param=f"messages[{i}].content",
                               code="invalid_value")
            content = "".join(p.text for p in content)
        plain.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    text = tok.render_chat(plain)
    stop_ids = []
    if tok.chat_template is None:  # the Alpaca-style instruct prompt: the turn ends at its end marker
        end = tok.token_to_id(InstructTemplate().end)
        if end is None:
            end = tok.added_tokens.get(InstructTemplate().end)
        if end is not None:
            stop_ids.append(end)
    return text, stop_ids


def context(route: str, model: LoadedModel, request, n: int, http: Request) -> GenerationContext:
    """What the hooks see of one generation request: the route, the model, the request and the caller."""
    return GenerationContext(route, model, request, n, http, http.state.principal, http.state.api_key)


async def _call(hook: Callable, *args) -> None:
    result = hook(*args)
    if inspect.isawaitable(result):
        await result


async def submit(state: AppState, contexts: list[GenerationContext]) -> list[Job]:
    """Run the admission checks of every context, then queue each on its model's scheduler (429 when full).

    One ticket per context (per prompt of a list), so continuous batching decodes them together; when one
    cannot be queued, those already queued are cancelled and reported before the error is raised. A list longer
    than an idle model's rows and queue could ever take is a 400 (a 429 would invite retries that cannot succeed).
    """
    if len(contexts) > 1:
        scheduler, n = contexts[0].model.scheduler, contexts[0].n
        most = scheduler.max_batch // n + scheduler.max_queue
        if len(contexts) > most and n <= scheduler.max_batch:  # (n beyond --max-batch: its own 400)
            raise APIError(400, f"a list of {len(contexts)} prompts can never be queued: with n={n}, at most {most} "
                           f"fit this model's rows and queue (--max-batch {scheduler.max_batch}, --max-queue "
                           f"{scheduler.max_queue})", param="prompt", code="too_many_prompts")
    for ctx in contexts:
        for check in state.admission_checks:
            await _call(check, ctx)
    jobs: list[Job] = []
    try:
        for ctx in contexts:
            jobs.append(Job(ctx, ctx.model.scheduler.submit(ctx.request, ctx.n)))
    except Exception as e:
        await close(state, jobs)
        raise from_exception(e) from e
    return jobs


@dataclass
class Job:
    """One queued generation: the context its hooks see and the scheduler's ticket."""

    ctx: GenerationContext
    ticket: Ticket


async def finished(state: AppState, jobs: list[Job]) -> None:
    """Tell the usage listeners what each generation cost (once it ended, however it ended)."""
    for job in jobs:
        for listener in state.usage_listeners:
            try:
                await _call(listener, job.ctx, job.ticket.usage)
            except Exception:
                log.exception("usage listener failed")


async def close(state: AppState, jobs: list[Job]) -> None:
    """Cancel what still runs (a no-op for finished tickets) and report the usage."""
    for job in jobs:
        job.ticket.cancel()
    await finished(state, jobs)


async def events(tickets: list[Ticket]) -> AsyncIterator[tuple[int, StepEvent]]:
    """The events of several tickets as they come, each with its ticket's position; raises the first error."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, ticket: Ticket) -> None:
        try:
            async for ev in ticket:
                merged.put_nowait((k, ev))
            merged.put_nowait((k, None))
        except Exception as e:
            merged.put_nowait((k, e))

    tasks = [asyncio.ensure_future(pump(k, t)) for k, t in enumerate(tickets)]
    try:
        running = len(tasks)
        while running:
            k, item = await merged.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield k, item
    finally:
        for task in tasks:
            task.cancel()


async def wait(tickets: list[Ticket], http: Request) -> None:
    """Wait until every sample of the tickets finished; a client that hangs up cancels them (rows free at once)."""
    async def drain() -> None:
        async for _ in events(tickets):
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
        for ticket in tickets:  # a no-op for finished tickets: after an error or a hang-up the others stop too
            ticket.cancel()
        if not task.done():
            task.cancel()


def usage_body(tickets: list[Ticket]) -> dict[str, Any]:
    """The `usage` of a call: tokens and FLOPs summed over its tickets, seconds until the last one ended; the
    prompt tokens that came from the prefix cache in OpenAI's `prompt_tokens_details.cached_tokens`."""
    total = Usage()
    for t in tickets:
        u = t.usage
        total.add(dataclasses.replace(u, seconds=0.0))
        total.seconds = max(total.seconds, u.seconds)
    return {"prompt_tokens": total.prompt_tokens, "completion_tokens": total.completion_tokens,
            "total_tokens": total.total_tokens, "prompt_tokens_details": {"cached_tokens": total.cached_tokens},
            "flops": total.flops, "seconds": round(total.seconds, 6)}


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


class Responder:
    """Answers a generating route from its jobs: waits and returns one JSON body, or streams SSE chunks.

    A route subclasses it with what differs: `choice` (one finished sample of the body), `chunks` (the stream
    chunks of one event), `opening` (chunks sent before any event) and `body_fields`. Either way the call's
    usage is reported once it ended, and a stream ends with the usage chunk (when asked), an error event
    (when it failed) and `[DONE]`. Choice indexes run over all jobs: job k's sample i is `k * n + i`.
    """

    object = ""  # the body's `object`
    chunk_object = ""  # a stream chunk's `object`
    id_prefix = ""

    def __init__(self, state: AppState, jobs: list[Job], body):
        self.state, self.jobs, self.body = state, jobs, body
        self.model: LoadedModel = jobs[0].ctx.model
        self.n = jobs[0].ticket.n
        self.rid, self.created = new_id(self.id_prefix), now()

    @property
    def tickets(self) -> list[Ticket]:
        return [job.ticket for job in self.jobs]

    @property
    def extra(self) -> dict[str, Any]:
        """What the hooks merge into the body and the usage chunk (`ctx.extra` of every job)."""
        return {k: v for job in self.jobs for k, v in job.ctx.extra.items()}

    def index(self, k: int, seq: Sequence) -> int:
        return k * self.n + seq.index

    def choice(self, k: int, seq: Sequence) -> dict[str, Any]:
        raise NotImplementedError

    def chunks(self, k: int, ev: StepEvent) -> Iterator[bytes]:
        raise NotImplementedError

    def opening(self) -> Iterator[bytes]:
        return iter(())

    def body_fields(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {}

    def chunk(self, choices: list[dict[str, Any]], **fields) -> bytes:
        return sse({"id": self.rid, "object": self.chunk_object, "created": self.created, "model": self.model.name,
                    "choices": choices, **fields})

    async def answer(self, http: Request):
        if self.body.stream:
            return EventStream(self._stream(), on_close=lambda: close(self.state, self.jobs))
        try:
            await wait(self.tickets, http)
        finally:
            await finished(self.state, self.jobs)
        choices = [self.choice(k, seq) for k, job in enumerate(self.jobs) for seq in job.ticket.seqs]
        return JSONResponse({"id": self.rid, "object": self.object, "created": self.created, "model": self.model.name,
                             "choices": choices, "usage": usage_body(self.tickets), **self.body_fields(choices),
                             **self.extra})

    async def _stream(self) -> AsyncIterator[bytes]:
        try:
            for c in self.opening():
                yield c
            async for k, ev in events(self.tickets):
                for c in self.chunks(k, ev):
                    yield c
            options = self.body.stream_options
            if options is not None and options.include_usage:
                yield self.chunk([], usage=usage_body(self.tickets), **self.extra)
        except Exception as e:
            yield error_event(e)
        yield SSE_DONE


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
