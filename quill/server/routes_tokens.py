"""Token-level routes: POST /v1/tokenize, /v1/detokenize and /v1/inference (token ids in, token ids out)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from quill.generate import TokenLogprob
from quill.server import generation as g
from quill.server.auth import require_api_key
from quill.server.errors import APIError
from quill.server.schemas import (GENERATING, DetokenizeRequest, DetokenizeResponse, InferenceRequest,
                                  InferenceResponse, TokenizeRequest, TokenizeResponse, error_responses)
from quill.server.state import AppState, get_state

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["tokens"], responses=error_responses(401))


@router.post("/tokenize", response_model=TokenizeResponse, responses=error_responses(400, 404, 413, 503))
async def tokenize(body: TokenizeRequest, state: AppState = Depends(get_state)) -> TokenizeResponse:
    model = g.get_model(state, body.model)
    if (body.text is None) == (body.messages is None):
        raise APIError(400, "give exactly one of 'text' and 'messages'", param="text", code="invalid_value")
    text = body.text if body.text is not None else g.render_messages(model, body.messages)[0]
    tok = model.engine.tokenizer
    ids = await g.encode(tok, text, "text" if body.text is not None else "messages")
    return TokenizeResponse(model=model.name, tokens=ids, pieces=[tok.id_to_piece(i) for i in ids], count=len(ids),
                            max_model_len=model.context_length)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses(400, 404, 413, 503))
async def detokenize(body: DetokenizeRequest, state: AppState = Depends(get_state)) -> DetokenizeResponse:
    model = g.get_model(state, body.model)
    tok = model.engine.tokenizer
    bad = next((t for t in body.tokens if not 0 <= t < tok.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {tok.vocab_size})", param="tokens",
                       code="invalid_value")
    return DetokenizeResponse(model=model.name, text=tok.decode(body.tokens, skip_special_tokens=body.skip_special_tokens))


def _logprobs(lps: list[TokenLogprob]) -> list[dict]:
    return [{"token": lp.token, "logprob": lp.logprob,
             "top_logprobs": [{"token": i, "logprob": v} for i, v in lp.top]} for lp in lps]


class InferenceResponder(g.Responder):
    """/v1/inference: token ids in, token ids out."""

    object, chunk_object, id_prefix = "inference", "inference.chunk", "inf"

    def choice(self, k: int, seq) -> dict:
        return {"index": self.index(k, seq), "tokens": seq.generated, "finish_reason": seq.finish_reason,
                "logprobs": _logprobs(seq.logprobs) if self.body.logprobs is not None else None}

    def chunks(self, k: int, ev):
        lp = _logprobs([ev.logprob]) if ev.logprob is not None else None
        yield self.chunk([{"index": self.index(k, ev.seq), "tokens": [ev.token] if ev.token >= 0 else [],
                           "logprobs": lp, "finish_reason": ev.seq.finish_reason if ev.finished else None}])


@router.post("/inference", response_model=InferenceResponse, responses=GENERATING)
async def inference(body: InferenceRequest, http: Request, state: AppState = Depends(get_state)):
    model = g.get_model(state, body.model)
    req = g.build_request(model, body, list(body.tokens), body.max_tokens, logprobs=body.logprobs,
                          salt=state.cache_salt(http.state.api_key))
    jobs = await g.submit(state, [g.context("inference", model, req, body.n, http)])
    return await InferenceResponder(state, jobs, body).answer(http)
