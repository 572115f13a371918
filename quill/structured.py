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
    """One sequence's place in its constraint: which tokens may come next, advanced token by token."""

    def __init__(self, constraint: Constraint, tokenizer: Tokenizer, eos_ids: list[int] | tuple[int, ...] = ()):
        self.constraint = constraint
        info = token_info(tokenizer, eos_ids)
        self.matcher = compiled(constraint, tokenizer, eos_ids)
        self.n_tokens = tokenizer.vocab_size
        # this step's bitmask (llguidance's: bit i of 32-bit word i // 32), valid until the next token
        self._bits = numpy.empty((info.vocab_size + 31) // 32, dtype=numpy.int32)
        self._filled = False
        self._out: Tensor | None = None  # the masked logits (CPU), a buffer kept between steps

    def bitmask(self) -> numpy.ndarray:
        """Int32 words: bit i set where the grammar allows token i next (EOS only where it may end)."""
        if not self._filled:
            self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
            self._filled = True
        return self._bits

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
        row, found without writing it); None when no id is allowed, or where the kernels cannot serve."""
        return kernels.argmax_bits(logits, torch.from_numpy(self.bitmask()), min(self.n_tokens, logits.shape[-1]),
                                   banned)

    def allowed_ids(self, vocab_size: int, most: int = 2048) -> Tensor | None:
        """The ids (int64, ascending, below `vocab_size`) the grammar allows next, when there are at most `most`;
        else None (also where the kernels cannot serve): the caller masks the whole vocabulary instead."""
        return kernels.bits_ids(torch.from_numpy(self.bitmask()), min(self.n_tokens, vocab_size), most)

    def advance(self, token: int) -> None:
        """Consume the chosen token; one the grammar forbids (every allowed token banned by other settings) fails."""
        self._filled = False
        if not self.matcher.consume_token(token):
            raise InvalidParameter(f"token {token} does not continue the {self.constraint.kind}: the settings "
                                   "beside it (banned_tokens, logit_bias, ...) left no allowed token",
                                   self.constraint.param)

    def replay(self, tokens: list[int]) -> None:
        """Advance over tokens generated before (a continuation, also after a restart)."""
        self._filled = False
        if not self.matcher.consume_tokens(tokens):
            raise InvalidParameter(f"the generated tokens do not follow the {self.constraint.kind}",
                                   self.constraint.param)

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more: the sequence ends here."""
        return self.matcher.is_stopped()


def fill_bitmasks(states: list[GrammarState]) -> None:
    """Compute the next bitmask of each of a batch's constrained rows in one llguidance call: after a forward
    pass its data is out of the caches, and one call over the rows reads it once for all of them (and costs one
    crossing into it, not one per row)."""
    global _executor
    todo = [s for s in states if not s._filled]
    if len(todo) < 2 or len({s._bits.size for s in todo}) > 1:
        return  # one row (or rows of different vocabularies) fills on demand
    if _executor is None:
        with _lock:
            if _executor is None:
                _executor = llguidance.LLExecutor(1)  # more threads gain nothing: the fill waits on memory
    block = numpy.empty((len(todo), todo[0]._bits.size), dtype=numpy.int32)
    _executor.unsafe_compute_mask_ptr([(s.matcher, i) for i, s in enumerate(todo)], block.ctypes.data,
                                      block.shape[1] * block.itemsize, len(todo))
    for s, row in zip(todo, block):
        s._bits, s._filled = row, True
