"""Request and response bodies of the HTTP API (pydantic 2), OpenAI's field names and defaults.

Unknown request fields are ignored, as vLLM and llama.cpp do, so any OpenAI client works. Each field states its
range, so /openapi.json tells a client what is accepted; what depends on the model (context length, vocabulary,
--max-batch) is checked by Quill's own validation (`GenerationRequest.validate`). Either names the parameter.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from quill.generate import MAX_LOGPROBS
from quill.sampling import SEED_RANGE
from quill.sampling import MAX_LOGIT_BIAS, MAX_PENALTY
from quill.structured import Constraint, constraint_from

TOKEN_ID = re.compile(r"[0-9]{1,12}")  # a token id as logit_bias keys give it
TokenId = Annotated[StrictInt, Field(ge=0)]
Prompt = StrictStr | list[TokenId] | list[StrictStr] | list[list[TokenId]]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False


class JSONSchemaFormat(_Request):
    """OpenAI's `response_format.json_schema`."""

    name: StrictStr = Field(..., description="the schema's name (as OpenAI requires; not used otherwise)")
    description: StrictStr | None = None
    # `schema` is pydantic's own attribute: the field is `schema_`, spelt `schema` in JSON
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="a JSON schema; none: any JSON object")
    strict: bool | None = Field(None, description="accepted; the output always follows the schema")


class ResponseFormat(_Request):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = Field(None, description="required with type json_schema")


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs`: exactly one of a JSON schema, a regex, a choice of strings, a grammar."""

    json_: dict[str, Any] | bool | StrictStr | None = Field(None, alias="json",
                                                            description="a JSON schema (an object or its JSON)")
    regex: StrictStr | None = Field(None, description="a regular expression the whole output matches")
    choice: list[StrictStr] | None = Field(None, min_length=1, description="the output is one of these strings")
    grammar: StrictStr | None = Field(None, description="a Lark or GBNF (llama.cpp) grammar")


class SamplingFields(_Request):
    """Sampling controls shared by every generating endpoint: OpenAI's plus llama.cpp/vLLM extras."""

    model: str | None = Field(None, description="a served model's id; default: the first one loaded")
    n: StrictInt = Field(1, ge=1, description="samples to generate (at most --max-batch)")
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1] - 1)
    temperature: StrictFloat | None = Field(None, ge=0, description="0 is greedy; default 1")
    top_p: StrictFloat | None = Field(None, gt=0, le=1)
    presence_penalty: StrictFloat | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: StrictFloat | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    # Checked by parse_logit_bias (so that every error names `logit_bias`); the schema states the same.
    logit_bias: dict[str, Any] | None = Field(None, description="token id (ASCII digits) -> bias in [-100, 100]",
                                              json_schema_extra={"propertyNames": {"pattern": f"^{TOKEN_ID.pattern}$"},
                                                                 "additionalProperties": {
                                                                     "type": "number", "minimum": -MAX_LOGIT_BIAS,
                                                                     "maximum": MAX_LOGIT_BIAS}})
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extras of llama.cpp / vLLM:
    top_k: StrictInt | None = Field(None, ge=0, description="0: off")
    min_p: StrictFloat | None = Field(None, ge=0, le=1)
    typical_p: StrictFloat | None = Field(None, gt=0, le=1)
    repetition_penalty: StrictFloat | None = Field(None, gt=0)
    no_repeat_ngram_size: StrictInt | None = Field(None, ge=0)
    min_tokens: StrictInt | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None
    # Structured output (docs/structured.md): OpenAI's response_format, or vLLM's structured_outputs
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # Quill's metering: a FLOP budget for this call (the call ends with finish_reason "budget" and a handle).
    max_flops: StrictInt | None = Field(None, ge=1, description="FLOP budget of this call")
    # Search strategies (transformers' names, vLLM's use_beam_search): recognised so that they are refused
    # with a clear error rather than silently ignored; see `searches`.
    num_beams: StrictInt | None = None
    num_beam_groups: StrictInt | None = None
    diversity_penalty: StrictFloat | None = None
    length_penalty: StrictFloat | None = None
    early_stopping: bool | str | None = None
    penalty_alpha: StrictFloat | None = None
    use_beam_search: bool | None = None

    def searches(self) -> list[str]:
        """The search-strategy fields this request sets to something other than plain decoding."""
        neutral = {"num_beams": 1, "num_beam_groups": 1, "diversity_penalty": 0.0, "length_penalty": 1.0,
                   "early_stopping": False, "penalty_alpha": 0.0, "use_beam_search": False}
        return [k for k, v in neutral.items() if getattr(self, k) not in (None, v)]

    def constraint(self) -> Constraint | None:
        """The structured-output constraint this request sets; a bad or doubled one is an InvalidParameter naming
        `response_format` or `structured_outputs`."""
        from quill.errors import InvalidParameter

        made = None
        fmt, so = self.response_format, self.structured_outputs
        if fmt is not None and fmt.type == "json_object":
            made = constraint_from(json_schema={"type": "object"}, param="response_format")
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise InvalidParameter("response_format of type json_schema needs json_schema", "response_format")
            made = constraint_from(json_schema=fmt.json_schema.schema_ or {"type": "object"},
                                   param="response_format")
        if so is not None:
            if made is not None:
                raise InvalidParameter("give response_format or structured_outputs, not both", "structured_outputs")
            made = constraint_from(so.json_, so.regex, so.choice, so.grammar, param="structured_outputs")
            if made is None:
                raise InvalidParameter("structured_outputs needs one of json, regex, choice, grammar",
                                       "structured_outputs")
        return made

    def sampling(self) -> dict[str, Any]:
        """The `SamplingParams` keywords this request sets (None means: keep Quill's default)."""
        names = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "no_repeat_ngram_size", "min_tokens", "ignore_eos", "seed")
        out = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        if self.logit_bias:
            out["logit_bias"] = parse_logit_bias(self.logit_bias)
        return out


def parse_logit_bias(bias: dict[str, Any]) -> dict[int, float]:
    """Token id -> bias; the keys must be ASCII digit strings and the biases numbers (not booleans)."""
    from quill.errors import InvalidParameter

    out = {}
    for key, value in bias.items():
        if not TOKEN_ID.fullmatch(key):  # int() would also take "１", " 7 ", "1_0", "+5"
            raise InvalidParameter(f"logit_bias keys must be token ids (ASCII digits), got {key!r}", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > MAX_LOGIT_BIAS:
            raise InvalidParameter(f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                                   f"got {value!r}", "logit_bias")
        out[int(key)] = float(value)
    return out


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: Prompt | None = Field(None, description="text, token ids, or a list holding one of them")
    continuation: StrictStr | None = Field(None, description="resume a call its budget ended (instead of prompt)")
    max_tokens: StrictInt | None = Field(16, ge=0, description="tokens to generate; null: up to the end of the context")
    stop: StrictStr | list[StrictStr] | None = None
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: StrictInt | None = None


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: StrictStr
    content: StrictStr | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=0, description="default: up to the end of the context")
    max_completion_tokens: StrictInt | None = Field(None, ge=0, description="max_tokens' newer name (wins over it)")
    stop: StrictStr | list[StrictStr] | None = None
    logprobs: bool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(_Request):
    """POST /v1/tokenize: a text (or chat messages, rendered with the model's template)."""

    model: str | None = None
    text: StrictStr | None = Field(None, validation_alias=AliasChoices("text", "prompt", "content"))
    messages: list[ChatMessage] | None = None


class DetokenizeRequest(_Request):
    """POST /v1/detokenize."""

    model: str | None = None
    tokens: list[TokenId] = Field(..., validation_alias=AliasChoices("tokens", "ids"))
    skip_special_tokens: bool = False


class InferenceRequest(SamplingFields):
    """POST /v1/inference: token ids in, token ids out."""

    tokens: list[TokenId] = Field(..., validation_alias=AliasChoices("tokens", "prompt", "ids"))
    max_tokens: StrictInt | None = Field(16, ge=0)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)


# ---- responses ---------------------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose keys and values came from the prefix cache")


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    flops: int = Field(description="floating-point operations spent, none for cached prompt tokens (Quill extra)")
    seconds: float = Field(description="wall-clock seconds from arrival to the last token (Quill extra)")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "quill"
    context_length: int
    vocab_size: int
    parameters: int
    has_chat_template: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LegacyLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]
    token_ids: list[int] = []  # Quill's extra: the id of each token


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    model_config = ConfigDict(extra="allow")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    id: int | None = None  # Quill's extra: the token id


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    model_config = ConfigDict(extra="allow")


class TokenizeResponse(BaseModel):
    model: str
    tokens: list[int]
    pieces: list[str]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    model: str
    text: str


class InferenceTopLogprob(BaseModel):
    token: int
    logprob: float


class InferenceLogprob(InferenceTopLogprob):
    top_logprobs: list[InferenceTopLogprob]


class InferenceChoice(BaseModel):
    index: int
    tokens: list[int]
    finish_reason: str | None
    logprobs: list[InferenceLogprob] | None = None


class InferenceResponse(BaseModel):
    id: str
    object: Literal["inference"] = "inference"
    created: int
    model: str
    choices: list[InferenceChoice]
    usage: UsageInfo
    model_config = ConfigDict(extra="allow")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class ErrorResponse(BaseModel):
    """Every error the server answers (OpenAI's shape)."""

    error: ErrorDetail


ERRORS = {400: "a parameter out of range or of the wrong type, or a body that is not a JSON object (`param` names "
               "the field)",
          401: "missing or wrong key (`WWW-Authenticate: Bearer`)",
          403: "admin routes are disabled, a continuation handle of another key, or a Hub repo this server may not read",
          404: "unknown model, handle, upload or route",
          409: "the stored model exists already (commit without replace) or is in use",
          410: "the continuation handle expired, or the upload did",
          412: "unsupported Tus-Resumable version",
          413: "the body is larger than --max-body-bytes, or the file or model than the store's limits",
          429: "the model's queue is full; `Retry-After` says when to try again",
          460: "Upload-Checksum does not match the PATCH body",
          502: "the Hugging Face Hub could not be reached",
          503: "no model is loaded, or the model is being unloaded, or the server stops",
          507: "the store's (or the Hub cache's) disk is full"}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, each with the error schema (FastAPI's `responses=`)."""
    out: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse, "description": ERRORS[status]}
                                            for status in statuses}
    if 429 in out:
        out[429]["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    return out


STREAMED = {200: {"content": {"text/event-stream": {"schema": {"type": "string"},
                                                    "description": "with \"stream\": true"}}}}
GENERATING = {**STREAMED, **error_responses(400, 404, 413, 429, 503)}  # the routes that queue a generation


class Health(BaseModel):
    status: str
    models: list[str]
