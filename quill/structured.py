"""Structured output: a JSON schema, a regex, a choice of strings or a grammar, enforced while decoding.

The grammar engine is llguidance (docs/structured.md says why): a `Constraint` names what the output must
match; `GrammarState` follows one sequence through it and masks, at each step, every token that would leave
the language. Compiled matchers are cached by tokenizer and constraint text, and each sequence deep-copies one,
so a request's `n` samples and a repeated schema compile once.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
import numpy
import torch
from torch import Tensor

from quill import kernels
from quill.errors import InvalidParameter
from quill.tokenizer import Tokenizer

KINDS = ("json_schema", "regex", "choice", "grammar")
_FORMAT = {"json_schema": "json", "regex": "regex", "choice": "choice", "grammar": "grammar"}  # llguidance's names
# json.dumps' separators and no other whitespace: a small model, free to put any, fills the output with it
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE_SIZE = 64
_lock = threading.Lock()  # the caches are shared by the server's request threads and its decode thread
_tokenizers: dict[tuple, tuple[Tokenizer, llguidance.LLTokenizer]] = {}
_matchers: OrderedDict[tuple, llguidance.LLMatcher] = OrderedDict()
_executor: llguidance.LLExecutor | None = None  # for a batch's bitmasks (fill_bitmasks), made on first use


@dataclass(frozen=True)
class Constraint:
    """What a generation's output must match: `kind` is one of KINDS, `spec` its text (a JSON schema as JSON, a
    regex, the choices as a JSON list, a Lark or GBNF grammar); errors name `param`, the argument it came from.
    Checked when made, so an invalid one never reaches a batch."""

    kind: str
    spec: str
    param: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidParameter(f"unknown constraint kind {self.kind!r} (one of {', '.join(KINDS)})",
                                   self.param or "constraint")
        if not self.param:
            object.__setattr__(self, "param", self.kind)
        _grammar(self.kind, self.spec, self.param)

    @property
    def grammar(self) -> str:
        """The llguidance grammar of this constraint."""
        return _grammar(self.kind, self.spec, self.param)


def constraint_from(json_schema: dict | bool | str | None = None, regex: str | None = None,
                    choice: list[str] | None = None, grammar: str | None = None,
                    param: str | None = None) -> Constraint | None:
    """The one constraint given (None for none); two at once, or a value of the wrong type, is an InvalidParameter
    naming the argument (or `param`, the field that carried them)."""
    given = {k: v for k, v in (("json_schema", json_schema), ("regex", regex), ("choice", choice),
                               ("grammar", grammar)) if v is not None}
    if not given:
        return None
    if len(given) > 1:
        a, b = list(given)[:2]
        raise InvalidParameter(f"give one constraint at a time, not both {a} and {b}", param or b)
    kind, value = next(iter(given.items()))
    name = param or kind
    if kind == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise InvalidParameter(f"json_schema is not valid JSON: {e}", name) from e
        if not isinstance(value, (dict, bool)):
            raise InvalidParameter("json_schema must be a JSON object (a schema)", name)
        spec = json.dumps(value)  # key order kept: the output lists properties in the schema's order
    elif kind == "choice":
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(c, str) and c for c in value)):
            raise InvalidParameter("choice must be a non-empty list of non-empty strings", name)
        spec = json.dumps(list(value))
    else:
        if not isinstance(value, str) or not value:
            raise InvalidParameter(f"{kind} must be a non-empty string", name)
        spec = value
    return Constraint(kind, spec, name)


def _grammar(kind: str, spec: str, param: str) -> str:
    """llguidance's grammar for a constraint, checked without a tokenizer (syntax, unsupported keywords)."""
    try:
        if kind == "json_schema":  # compact JSON (a schema's own "x-guidance" may ask for other whitespace)
            grammar = llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=_JSON_OPTIONS)
        else:
            grammar = llguidance.grammar_from(_FORMAT[kind], spec)
    except ValueError as e:
        raise InvalidParameter(f"invalid {kind}: {e}", param) from e
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, None)
    if is_error:
        raise InvalidParameter(f"invalid {kind}: {messages[0].strip()}", param)
    return grammar


def token_info(tokenizer: Tokenizer, eos_ids: list[int] | tuple[int, ...] = ()) -> llguidance.LLTokenizer:
    """llguidance's view of a Quill tokenizer, built once per tokenizer (and vocabulary size: added tokens grow it).

    `eos_ids` are the ids that end a sequence (the model's; default the tokenizer's EOS): the grammar allows them
    only where it may end, and never as text.

    A byte-level BPE (GPT-2's, with its added tokens) goes over as its tokenizer.json; llguidance cannot read a
    character-level tokenizer's, so that one goes over as the bytes of each token (each a whole character). A
    vocabulary without an EOS gets a virtual one past its end: the grammar's end is then reached, never chosen.
    """
    n = tokenizer.vocab_size
    eos = sorted(set(eos_ids)) or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    virtual = not eos
    key = (id(tokenizer.backend), n, tuple(eos))
    with _lock:
        hit = _tokenizers.get(key)
        if hit is not None:
            return hit[1]
    vocab, eos = (n + 1, [n]) if virtual else (n, eos)
    try:
        info = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab, eos_token=eos)
    except ValueError:  # not a decoder llguidance knows (the character tokenizer's Fuse)
        info = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_CharacterTokens(tokenizer, virtual)),
                                      n_vocab=vocab, eos_token=eos)
    with _lock:
        _tokenizers[key] = (tokenizer, info)  # the tokenizer is kept so that its id is never reused
    return info


class _CharacterTokens:
    """What `llguidance.TokenizerWrapper` reads: each token's bytes, an EOS (overridden by `token_info`; a
    virtual one past the vocabulary when there is none) and an encoder."""

    def __init__(self, tokenizer: Tokenizer, virtual_eos: bool):
        self.tokenizer = tokenizer
        self.tokens = [tokenizer.decode([i]).encode() for i in range(tokenizer.vocab_size)]
        self.eos_token_id = len(self.tokens) if virtual_eos else tokenizer.eos_token_id or 0
        if virtual_eos:
            self.tokens.append(b"")
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(tokenizer.special_ids)

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)


def compiled(constraint: Constraint, tokenizer: Tokenizer,
             eos_ids: list[int] | tuple[int, ...] = ()) -> llguidance.LLMatcher:
    """A fresh matcher at the start of `constraint`, for `tokenizer` and `eos_ids` (see `token_info`), copied
    from a cached compilation.

    A constraint that no token of this vocabulary can start (a character model lacking '{') is refused here.
    """
    info = token_info(tokenizer, eos_ids)
    key = (id(info), constraint.kind, constraint.spec)
    with _lock:
        template = _matchers.get(key)
        if template is not None:
            _matchers.move_to_end(key)
    if template is None:
        template = llguidance.LLMatcher(info, constraint.grammar, log_level=0)
        if template.is_error():
            raise InvalidParameter(f"invalid {constraint.kind}: {template.get_error()}", constraint.param)
        if not (template.is_accepting() or _begins(template.deep_copy(), info)):
            raise InvalidParameter(f"no token of this model's vocabulary can begin the {constraint.kind}",
                                   constraint.param)
        with _lock:
            _matchers[key] = template
            while len(_matchers) > _CACHE_SIZE:
                _matchers.popitem(last=False)
    return template.deep_copy()


def _begins(matcher: llguidance.LLMatcher, info: llguidance.LLTokenizer) -> bool:
    """Whether some token other than EOS may start the grammar (llguidance offers EOS alone at a dead end)."""
    bits = numpy.unpackbits(numpy.frombuffer(matcher.compute_bitmask(), dtype=numpy.uint8), bitorder="little")
    bits[info.eos_tokens] = 0
    return bool(bits.any())


class GrammarState:
    """One sequence's place in its constraint: which tokens may come next, advanced token by token.

    Where a state allows a single token, the matcher runs ahead: it consumes that token at once and computes
    the next bitmask while its data is still in the caches (after a forward pass, which evicts it, a bitmask
    costs several times more), and so on while the tokens are forced. The sequence still takes them one step at
    a time; `advance` then only checks them.
    """

    RUN_AHEAD = 32  # forced tokens the matcher may be ahead of the sequence
    MOST_IDS = 2048  # allowed ids listed for a choice among them; more: the whole vocabulary is masked

    def __init__(self, constraint: Constraint, tokenizer: Tokenizer, eos_ids: list[int] | tuple[int, ...] = ()):
        self.constraint = constraint
        info = token_info(tokenizer, eos_ids)
        self.matcher = compiled(constraint, tokenizer, eos_ids)
        self.n_tokens = tokenizer.vocab_size
        self._words = (info.vocab_size + 31) // 32
        self._eos = frozenset(info.eos_tokens)
        # The bitmasks computed ahead (llguidance's: bit i of 32-bit word i // 32), [0] that of the sequence's next
        # token; _forced[i] is the one token _masks[i] allows, already consumed by the matcher, and _stopped_after[i]
        # whether the grammar is complete after it. len(_masks) is len(_forced) or one more.
        self._masks: list[numpy.ndarray] = []
        self._forced: list[int] = []
        self._stopped_after: list[bool] = []
        self._stopped = self.matcher.is_stopped()
        self._out: Tensor | None = None  # the masked logits (CPU), a buffer kept between steps
        self._ids = torch.empty(self.MOST_IDS, dtype=torch.int64)  # the allowed ids listed (allowed_ids, _take)

    def bitmask(self) -> numpy.ndarray:
        """Int32 words: bit i set where the grammar allows token i next (EOS only where it may end)."""
        if not self._masks:
            bits = numpy.empty(self._words, dtype=numpy.int32)
            self.matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            self._take(bits)
        return self._masks[0]

    def _take(self, bits: numpy.ndarray) -> None:
        """Keep the bitmask of the matcher's state, and run ahead while it allows a single token (not an EOS)."""
        self._masks.append(bits)
        while len(self._forced) < self.RUN_AHEAD:
            ids = kernels.bits_ids(torch.from_numpy(self._masks[-1]), self.n_tokens, self._ids[:1])
            if ids is None or len(ids) != 1 or (token := int(ids[0])) in self._eos:
                return
            if not self.matcher.consume_token(token):
                return  # llguidance allowed what it then refused: left to `advance` to report
            self._forced.append(token)
            self._stopped_after.append(self.matcher.is_stopped())
            if self._stopped_after[-1]:
                return
            bits = numpy.empty(self._words, dtype=numpy.int32)
            self.matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            self._masks.append(bits)

    def mask(self, logits: Tensor, history: Tensor | None = None, prompt_len: int = 0) -> Tensor:
        """Logits [1, V] with every token the grammar forbids at -inf (a `quill.sampling` logits processor); on a
        CPU the result is overwritten by the next call."""
        bits = torch.from_numpy(self.bitmask())
        n = min(self.n_tokens, logits.shape[-1])  # ids past the tokenizer's (a padded head) are never allowed
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            # in C on the calling thread, into a buffer kept between steps: torch.where over a CPU row wakes
            # torch's OpenMP threads, and a new output row each step costs more than the masking itself
            if self._out is None or self._out.shape != logits.shape:
                self._out = torch.empty_like(logits)
            out = kernels.mask_bits(logits, bits, n, self._out)
            if out is not None:
                return out
        allowed = numpy.zeros(logits.shape[-1], dtype=bool)
        allowed[:n] = numpy.unpackbits(bits.numpy().view(numpy.uint8), count=n, bitorder="little")
        return torch.where(torch.from_numpy(allowed).to(logits.device), logits, float("-inf"))

    def argmax(self, logits: Tensor, banned: list[int] | tuple[int, ...] = ()) -> int | None:
        """The allowed id with the largest logit in `logits` [1, V], skipping `banned` (the argmax of the masked
        row, found without writing it); None when no allowed id's logit is above -inf, or where the kernels
        cannot serve."""
        return kernels.argmax_bits(logits, torch.from_numpy(self.bitmask()), min(self.n_tokens, logits.shape[-1]),
                                   banned)

    def allowed_ids(self, vocab_size: int) -> Tensor | None:
        """The ids (int64, ascending, below `vocab_size`) the grammar allows next, when there are at most
        MOST_IDS; else None (also where the kernels cannot serve): the caller masks the whole vocabulary instead.
        A view of a buffer that the next call overwrites."""
        if self._forced and self._forced[0] < vocab_size:  # the one token this state allows, known already
            return self._ids[:1].fill_(self._forced[0])
        return kernels.bits_ids(torch.from_numpy(self.bitmask()), min(self.n_tokens, vocab_size), self._ids)

    def advance(self, token: int) -> None:
        """Consume the chosen token; one the grammar forbids (every allowed token banned by other settings) fails."""
        if self._forced:  # consumed already, when it was the only one allowed
            forced = self._forced.pop(0)
            self._masks.pop(0)
            self._stopped = self._stopped_after.pop(0)
            if token == forced:
                return
            self.matcher.rollback(len(self._forced) + 1)
            self._masks, self._forced, self._stopped_after = [], [], []
        else:
            self._masks.clear()
        if not self.matcher.consume_token(token):
            raise InvalidParameter(f"token {token} does not continue the {self.constraint.kind}: the settings "
                                   "beside it (banned_tokens, logit_bias, ...) left no allowed token",
                                   self.constraint.param)
        self._stopped = self.matcher.is_stopped()

    def replay(self, tokens: list[int]) -> None:
        """Advance over tokens generated before (a continuation, also after a restart)."""
        if self._forced:
            self.matcher.rollback(len(self._forced))
        self._masks, self._forced, self._stopped_after = [], [], []
        if not self.matcher.consume_tokens(tokens):
            raise InvalidParameter(f"the generated tokens do not follow the {self.constraint.kind}",
                                   self.constraint.param)
        self._stopped = self.matcher.is_stopped()

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more: the sequence ends here."""
        return self._stopped


def fill_bitmasks(states: list[GrammarState]) -> None:
    """Compute the next bitmask of each of a batch's constrained rows in one llguidance call: after a forward
    pass its data is out of the caches, and one call over the rows reads it once for all of them (and costs one
    crossing into it, not one per row)."""
    global _executor
    todo = [s for s in states if not s._masks]
    if len(todo) < 2 or len({s._words for s in todo}) > 1:
        return  # one row (or rows of different vocabularies) fills on demand
    if _executor is None:
        with _lock:
            if _executor is None:
                _executor = llguidance.LLExecutor(1)  # more threads gain nothing: the fill waits on memory
    block = numpy.empty((len(todo), todo[0]._words), dtype=numpy.int32)
    _executor.unsafe_compute_mask_ptr([(s.matcher, i) for i, s in enumerate(todo)], block.ctypes.data,
                                      block.shape[1] * block.itemsize, len(todo))
    for s, bits in zip(todo, block):
        s._take(bits)
