"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.convertors import PathConvertor, register_url_convertor

from quill.continuation import owner_id
from quill.errors import ContinuationError, InvalidParameter
from quill.generate import TokenLogprob
from quill.server import generation as g
from quill.server.auth import require_api_key
from quill.server.errors import APIError
from quill.server.schemas import (GENERATING, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                  CompletionResponse, ModelCard, ModelList, error_responses)
from quill.server.state import AppState, GenerationContext, LoadedModel, get_state
from quill.tokenizer import Tokenizer

log = logging.getLogger("quill.server")
router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"], responses=error_responses(401))


def model_card(m: LoadedModel) -> ModelCard:
    cfg = m.engine.config
    return ModelCard(id=m.name, created=m.created, context_length=cfg.n_positions, vocab_size=cfg.vocab_size,
                     parameters=cfg.num_params(), has_chat_template=m.engine.tokenizer.has_chat_template)


@router.get("/models", response_model=ModelList)
async def list_models(state: AppState = Depends(get_state)) -> ModelList:
    listing = ModelList(data=[model_card(m) for m in state.models.values()])
    extend = state.extend_model_list  # the model store adds stored models (routes_store.mount)
    return listing if extend is None else JSONResponse(extend(listing.model_dump()))


class _AnyPath(PathConvertor):
    """Starlette's `path` that also matches line breaks: an id with one is answered 404, not 405 by the store's
    `/v1/models/{name}` routes (whose `[^/]+` does match them)."""

    regex = "(?s:.*)"


register_url_convertor("anypath", _AnyPath())


@router.get("/models/{model_id:anypath}", response_model=ModelCard, responses=error_responses(404, 503))
async def get_model(model_id: str, state: AppState = Depends(get_state)) -> ModelCard:
    return model_card(g.get_model(state, model_id))


def pause(ctx: GenerationContext, seq) -> dict[str, Any]:
    """The choice fields of a sequence its budget ended: its continuation handle (bound to the caller's API key),
    or, when the handle store cannot keep it (a full disk), no handle and `continuation_error` saying why.
    The generated result stands either way. Nothing for other sequences."""
    if seq.finish_reason != "budget":
        return {}
    try:
        return {"continuation": ctx.model.engine.pause(seq, owner_id(ctx.api_key))}
    except ContinuationError as e:
        log.warning("%s", e)
        return {"continuation": None, "continuation_error": str(e)}


async def resume(state: AppState, body: CompletionRequest, model: LoadedModel, http: Request) -> g.Job:
    """Queue the continuation of a paused generation: only `max_flops` (and stream settings) may come with it."""
    fields = body.model_fields_set - {"model", "continuation", "max_flops", "stream", "stream_options", "user"}
    if fields:
        raise APIError(400, f"a continuation carries its own prompt and settings; {sorted(fields)[0]!r} cannot be "
                       "given with it", param=sorted(fields)[0], code="invalid_value")
    ctx = g.context("completions", model, None, 1, http)
    paused = model.engine.continuations.get(body.continuation, owner_id(ctx.api_key), model.name)
    try:
        ticket = model.scheduler.resume(paused, body.max_flops)
    except Exception as e:
        raise g.from_exception(e) from e
    ctx.request = ticket.request
    return g.Job(ctx, ticket)


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


async def completion_prompts(model: LoadedModel, prompt) -> list[tuple[list[int], str | None]]:
    """Each prompt of an OpenAI `prompt` (text, token ids, a list of texts or a list of token-id lists): its token
    ids, and its text when given as text."""
    many = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
    return [await _completion_prompt(model, p) for p in (prompt if many else [prompt])]


async def _completion_prompt(model: LoadedModel, prompt: str | list[int]) -> tuple[list[int], str | None]:
    tok = model.engine.tokenizer
    if isinstance(prompt, str):
        if prompt == "":
            if tok.bos_token_id is None:
                raise APIError(400, "prompt is empty and the model has no BOS token to start from", param="prompt",
                               code="invalid_value")
            return [tok.bos_token_id], ""
        return await g.encode(tok, prompt, "prompt"), prompt
    return list(prompt), None


class CompletionResponder(g.Responder):
    """/v1/completions: text choices with legacy logprobs, the prompt first with echo, a handle per choice."""

    object = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, state: AppState, jobs: list[g.Job], body: CompletionRequest, texts: list[str | None]):
        super().__init__(state, jobs, body)
        self.texts = texts  # each prompt's text, for echo
        self.builders: dict[int, LegacyLogprobBuilder] = {}
        self.echoed: set[int] = set()

    def _builder(self, index: int) -> LegacyLogprobBuilder:
        if index not in self.builders:
            self.builders[index] = LegacyLogprobBuilder(self.model.engine.tokenizer)
        return self.builders[index]

    def choice(self, k: int, seq) -> dict[str, Any]:
        body, lp = self.body, None
        if body.logprobs is not None:
            lp = self._builder(self.index(k, seq)).build((seq.prompt_logprobs if body.echo else []) + seq.logprobs)
        return {"index": self.index(k, seq), "text": (self.texts[k] if body.echo else "") + "".join(seq.text),
                "logprobs": lp, "finish_reason": seq.finish_reason, "continuation": None,
                **pause(self.jobs[k].ctx, seq)}

    def body_fields(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {k: choices[0][k] for k in ("continuation", "continuation_error") if k in choices[0]}

    def _chunk(self, index: int, text: str, logprobs, finish_reason, handle: dict[str, Any] | None = None) -> bytes:
        extra = handle or {}
        return self.chunk([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
                            **extra}], **extra)

    def chunks(self, k: int, ev):
        body, i = self.body, self.index(k, ev.seq)
        with_lp = body.logprobs is not None
        if body.echo and i not in self.echoed:
            self.echoed.add(i)
            yield self._chunk(i, self.texts[k] or "", self._builder(i).build(ev.seq.prompt_logprobs) if with_lp
                              else None, None)
        lp = self._builder(i).build([ev.logprob]) if with_lp and ev.logprob is not None else None
        if ev.text or lp or ev.finished:
            yield self._chunk(i, ev.text, lp, ev.seq.finish_reason if ev.finished else None,
                              pause(self.jobs[k].ctx, ev.seq) if ev.finished else None)


@router.post("/completions", response_model=CompletionResponse,
             responses={**GENERATING, **error_responses(403, 410)})
async def completions(body: CompletionRequest, http: Request, state: AppState = Depends(get_state)):
    model = g.get_model(state, body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_parameter")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of is not supported (it may only equal n)", param="best_of",
                       code="unsupported_parameter")
    if body.continuation is not None:
        jobs, texts = [await resume(state, body, model, http)], [None]
    elif body.prompt is None:
        raise APIError(400, "prompt is required (or a continuation handle)", param="prompt",
                       code="missing_required_parameter")
    else:
        contexts, texts = [], []
        for prompt_ids, text in await completion_prompts(model, body.prompt):
            req = g.build_request(model, body, prompt_ids, body.max_tokens, stop=body.stop, logprobs=body.logprobs,
                                  echo=body.echo, salt=state.cache_salt(http.state.api_key))
            contexts.append(g.context("completions", model, req, body.n, http))
            texts.append(model.engine.tokenizer.decode(prompt_ids) if body.echo and text is None else text)
        jobs = await g.submit(state, contexts)
    return await CompletionResponder(state, jobs, body, texts).answer(http)


# ---- chat --------------------------------------------------------------------------------------------------------


class ChatResponder(g.Responder):
    """/v1/chat/completions: assistant messages (content deltas when streamed), chat logprobs."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def choice(self, k: int, seq) -> dict[str, Any]:
        tok = self.model.engine.tokenizer
        return {"index": self.index(k, seq), "message": {"role": "assistant", "content": "".join(seq.text)},
                "logprobs": {"content": chat_logprobs(tok, seq.logprobs)} if self.body.logprobs else None,
                "finish_reason": seq.finish_reason, "continuation": None, **pause(self.jobs[k].ctx, seq)}

    def _chunk(self, index: int, delta: dict, logprobs=None, finish_reason=None, **extra) -> bytes:
        return self.chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                            **extra}])

    def opening(self):
        for k, job in enumerate(self.jobs):
            for seq in job.ticket.seqs:
                yield self._chunk(self.index(k, seq), {"role": "assistant", "content": ""})

    def chunks(self, k: int, ev):
        i, tok = self.index(k, ev.seq), self.model.engine.tokenizer
        lp = ({"content": chat_logprobs(tok, [ev.logprob])} if self.body.logprobs and ev.logprob is not None
              else None)
        if ev.text or lp:
            yield self._chunk(i, {"content": ev.text}, lp)
        if ev.finished:
            yield self._chunk(i, {}, None, ev.seq.finish_reason, **pause(self.jobs[k].ctx, ev.seq))


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=GENERATING)
async def chat_completions(body: ChatCompletionRequest, http: Request, state: AppState = Depends(get_state)):
    model = g.get_model(state, body.model)
    text, stop_ids = g.render_messages(model, body.messages)
    prompt_ids = await g.encode(model.engine.tokenizer, text, "messages")
    newer = body.max_completion_tokens is not None
    max_tokens = body.max_completion_tokens if newer else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    try:
        req = g.build_request(model, body, prompt_ids, max_tokens, stop=body.stop, stop_token_ids=stop_ids,
                              logprobs=logprobs, salt=state.cache_salt(http.state.api_key))
    except InvalidParameter as e:  # name the field the client sent
        if newer and e.param == "max_tokens":
            e.param = "max_completion_tokens"
        raise
    jobs = await g.submit(state, [g.context("chat.completions", model, req, body.n, http)])
    return await ChatResponder(state, jobs, body).answer(http)
