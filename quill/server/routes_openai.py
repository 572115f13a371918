"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from quill.batching import Ticket
from quill.continuation import owner_id
from quill.generate import TokenLogprob
from quill.server import generation as g
from quill.server.auth import require_api_key
from quill.server.errors import APIError
from quill.server.schemas import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                  CompletionResponse, ModelCard, ModelList, SamplingFields)
from quill.server.state import AppState, GenerationContext, LoadedModel, get_state
from quill.tokenizer import InstructTemplate, Tokenizer

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"])


def model_card(m: LoadedModel) -> ModelCard:
    cfg = m.engine.config
    return ModelCard(id=m.name, created=m.created, context_length=cfg.n_positions, vocab_size=cfg.vocab_size,
                     parameters=cfg.num_params(), has_chat_template=m.engine.tokenizer.has_chat_template)


@router.get("/models", response_model=ModelList)
async def list_models(state: AppState = Depends(get_state)) -> ModelList:
    listing = ModelList(data=[model_card(m) for m in state.models.values()])
    extend = getattr(state, "extend_model_list", None)  # the model store adds stored models (routes_store.mount)
    return listing if extend is None else JSONResponse(extend(listing.model_dump()))


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, state: AppState = Depends(get_state)) -> ModelCard:
    return model_card(g.get_model(state, model_id))


def build_request(model: LoadedModel, body: SamplingFields, prompt_ids: list[int], max_tokens: int | None, *,
                  stop=None, stop_token_ids: list[int] | None = None, logprobs: int | None = None, echo: bool = False):
    """A validated GenerationRequest (InvalidParameter / ContextLengthError become 400s naming the parameter)."""
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
                                logprobs=logprobs, echo=echo, max_flops=body.max_flops, **body.sampling())


def pause(ctx: GenerationContext, seq) -> str | None:
    """The continuation handle of a sequence its budget ended (bound to the caller's API key), else None."""
    if seq.finish_reason != "budget":
        return None
    return ctx.model.engine.pause(seq, owner_id(ctx.api_key))


async def resume(state: AppState, body: CompletionRequest, model: LoadedModel, http: Request):
    """Queue the continuation of a paused generation: only `max_flops` (and stream settings) may come with it."""
    fields = body.model_fields_set - {"model", "continuation", "max_flops", "stream", "stream_options", "user"}
    if fields:
        raise APIError(400, f"a continuation carries its own prompt and settings; {sorted(fields)[0]!r} cannot be "
                       "given with it", param=sorted(fields)[0], code="invalid_value")
    ctx = context("completions", model, None, 1, http)
    paused = model.engine.continuations.get(body.continuation, owner_id(ctx.api_key), model.name)
    try:
        ticket = model.scheduler.resume(paused, body.max_flops)
    except Exception as e:
        raise g.from_exception(e) from e
    ctx.request = ticket.request
    return ctx, ticket


def context(route: str, model: LoadedModel, request, n: int, http: Request) -> GenerationContext:
    return GenerationContext(route, model, request, n, http, getattr(http.state, "principal", None),
                             getattr(http.state, "api_key", None))


# ---- logprobs ----------------------------------------------------------------------------------------------------


class LegacyLogprobBuilder:
    """Completions' legacy logprobs (tokens, token_logprobs, top_logprobs, text_offset), built incrementally.

    text_offset is the character offset of each token in the choice's text (prompt included with echo).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.decoder = tokenizer.stream_decoder()
        self.offset = 0

    def build(self, lps: list[TokenLogprob]) -> dict[str, list]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": [],
                                "token_ids": []}  # token_ids: Quill's extra, the id of each token
        for lp in lps:
            out["tokens"].append(g.token_text(self.tok, lp.token))
            out["token_ids"].append(lp.token)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append(None if lp.logprob is None else
                                       {g.token_text(self.tok, i): v for i, v in lp.top})
            out["text_offset"].append(self.offset)
            self.offset += len(self.decoder.push(lp.token))
        return out


def chat_logprobs(tok: Tokenizer, lps: list[TokenLogprob]) -> list[dict[str, Any]]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        return {"token": g.token_text(tok, token), "logprob": logprob, "bytes": list(g.token_bytes(tok, token)),
                "id": token}  # id: Quill's extra

    return [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]} for lp in lps]


# ---- completions -------------------------------------------------------------------------------------------------


async def completion_prompt(model: LoadedModel, prompt) -> tuple[list[int], str | None]:
    """Token ids of an OpenAI `prompt` (text, ids, or a list of one of them) and its text when given as text."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported (use n for several samples)",
                           param="prompt", code="invalid_value")
        prompt = prompt[0]
    tok = model.engine.tokenizer
    if isinstance(prompt, str):
        if prompt == "":
            if tok.bos_token_id is None:
                raise APIError(400, "prompt is empty and the model has no BOS token to start from", param="prompt",
                               code="invalid_value")
            return [tok.bos_token_id], ""
        return await g.encode(tok, prompt, "prompt"), prompt
    return list(prompt), None


@router.post("/completions", response_model=CompletionResponse)
async def completions(body: CompletionRequest, http: Request, state: AppState = Depends(get_state)):
    model = g.get_model(state, body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_parameter")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of is not supported (it may only equal n)", param="best_of",
                       code="unsupported_parameter")
    if body.continuation is not None:
        ctx, ticket = await resume(state, body, model, http)
        prompt_text = None
    elif body.prompt is None:
        raise APIError(400, "prompt is required (or a continuation handle)", param="prompt",
                       code="missing_required_parameter")
    else:
        prompt_ids, prompt_text = await completion_prompt(model, body.prompt)
        req = build_request(model, body, prompt_ids, body.max_tokens, stop=body.stop, logprobs=body.logprobs,
                            echo=body.echo)
        if body.echo and prompt_text is None:
            prompt_text = model.engine.tokenizer.decode(prompt_ids)
        ctx = context("completions", model, req, body.n, http)
        ticket = await g.submit(state, ctx)
    rid, created = g.new_id("cmpl"), g.now()
    if body.stream:
        return g.EventStream(_stream_completion(body, model, ctx, ticket, rid, created, prompt_text),
                             on_close=lambda: _close(state, ctx, ticket))
    try:
        await g.wait(ticket, http)
    finally:
        await g.finished(state, ctx, ticket)
    choices = []
    for seq in ticket.seqs:
        text = "".join(seq.text)
        lp = None
        if body.logprobs is not None:
            builder = LegacyLogprobBuilder(model.engine.tokenizer)
            lp = builder.build((seq.prompt_logprobs if body.echo else []) + seq.logprobs)
        choices.append({"index": seq.index, "text": (prompt_text if body.echo else "") + text, "logprobs": lp,
                        "finish_reason": seq.finish_reason, "continuation": pause(ctx, seq)})
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model.name,
                         "choices": choices, "usage": g.usage_body(ticket),
                         "continuation": choices[0]["continuation"], **ctx.extra})


async def _close(state: AppState, ctx: GenerationContext, ticket: Ticket) -> None:
    ticket.cancel()
    await g.finished(state, ctx, ticket)


async def _stream_completion(body: CompletionRequest, model: LoadedModel, ctx: GenerationContext, ticket: Ticket,
                             rid: str, created: int, prompt_text: str | None) -> AsyncIterator[bytes]:
    tok = model.engine.tokenizer
    builders = {i: LegacyLogprobBuilder(tok) for i in range(body.n)} if body.logprobs is not None else {}
    echoed: set[int] = set()

    def chunk(index: int, text: str, logprobs, finish_reason, handle: str | None = None) -> bytes:
        extra = {"continuation": handle} if handle else {}
        return g.sse({"id": rid, "object": "text_completion", "created": created, "model": model.name,
                      "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                   "finish_reason": finish_reason, **extra}], **extra})

    try:
        async for ev in ticket:
            i = ev.seq.index
            if body.echo and i not in echoed:
                echoed.add(i)
                lp = builders[i].build(ev.seq.prompt_logprobs) if builders else None
                yield chunk(i, prompt_text or "", lp, None)
            lp = builders[i].build([ev.logprob]) if builders and ev.logprob is not None else None
            if ev.text or lp or ev.finished:
                yield chunk(i, ev.text, lp, ev.seq.finish_reason if ev.finished else None,
                            pause(ctx, ev.seq) if ev.finished else None)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield g.sse({"id": rid, "object": "text_completion", "created": created, "model": model.name,
                         "choices": [], "usage": g.usage_body(ticket), **ctx.extra})
    except Exception as e:
        yield g.error_event(e)
    yield g.SSE_DONE


# ---- chat --------------------------------------------------------------------------------------------------------


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


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, http: Request, state: AppState = Depends(get_state)):
    model = g.get_model(state, body.model)
    text, stop_ids = render_messages(model, body.messages)
    prompt_ids = await g.encode(model.engine.tokenizer, text, "messages")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    req = build_request(model, body, prompt_ids, max_tokens, stop=body.stop, stop_token_ids=stop_ids,
                        logprobs=logprobs)
    ctx = context("chat.completions", model, req, body.n, http)
    ticket = await g.submit(state, ctx)
    rid, created = g.new_id("chatcmpl"), g.now()
    if body.stream:
        return g.EventStream(_stream_chat(body, model, ctx, ticket, rid, created),
                             on_close=lambda: _close(state, ctx, ticket))
    try:
        await g.wait(ticket, http)
    finally:
        await g.finished(state, ctx, ticket)
    tok = model.engine.tokenizer
    choices = [{"index": s.index, "message": {"role": "assistant", "content": "".join(s.text)},
                "logprobs": {"content": chat_logprobs(tok, s.logprobs)} if body.logprobs else None,
                "finish_reason": s.finish_reason, "continuation": pause(ctx, s)} for s in ticket.seqs]
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model.name,
                         "choices": choices, "usage": g.usage_body(ticket), **ctx.extra})


async def _stream_chat(body: ChatCompletionRequest, model: LoadedModel, ctx: GenerationContext, ticket: Ticket,
                       rid: str, created: int) -> AsyncIterator[bytes]:
    tok = model.engine.tokenizer

    def chunk(index: int, delta: dict, logprobs=None, finish_reason=None, **extra) -> bytes:
        return g.sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model.name,
                      "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                   "finish_reason": finish_reason, **extra}]})

    try:
        for i in range(body.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for ev in ticket:
            i = ev.seq.index
            lp = {"content": chat_logprobs(tok, [ev.logprob])} if body.logprobs and ev.logprob is not None else None
            if ev.text or lp:
                yield chunk(i, {"content": ev.text}, lp)
            if ev.finished:
                handle = pause(ctx, ev.seq)
                yield chunk(i, {}, None, ev.seq.finish_reason, **({"continuation": handle} if handle else {}))
        if body.stream_options is not None and body.stream_options.include_usage:
            yield g.sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model.name,
                         "choices": [], "usage": g.usage_body(ticket), **ctx.extra})
    except Exception as e:
        yield g.error_event(e)
    yield g.SSE_DONE
