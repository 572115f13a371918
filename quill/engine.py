"""`quill.load`: a model, its tokenizer and the calls users make on them (generate, stream, score)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from quill import kernels
from quill.errors import InvalidParameter, QuillError
from quill.continuation import ContinuationStore
from quill.generate import GenerationRequest, Sequence, StepEvent, TokenLogprob, Usage, resume, run
from quill.graphs import cuda_turn
from quill.kvpool import KVPool
from quill.model import GPT, GPTConfig
from quill.prefix_cache import PrefixCache
from quill.resolve import resolve
from quill.sampling import SamplingParams
from quill.search import SearchParams, run_search
from quill.structured import Constraint, compiled, constraint_from
from quill.tokenizer import Tokenizer
from quill.weights import load_model

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


def parse_dtype(dtype: str | torch.dtype, field: str = "dtype") -> torch.dtype:
    """'float32' / 'bf16' / torch.float16 ... as a torch dtype; anything else is an error naming `field`."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise InvalidParameter(f"{field} must be one of float32, bfloat16, float16, got {dtype!r}", field)


@dataclass
class Choice:
    """One generated continuation."""

    index: int
    text: str
    tokens: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    continuation: str | None = None  # when finish_reason is "budget": the handle a later call resumes from
    score: float | None = None  # beam search: the hypothesis' score (transformers' sequences_scores)


@dataclass
class Completion:
    """The result of `Engine.generate`: the choices and what they cost; `.text` etc. are choice 0's."""

    choices: list[Choice]
    usage: Usage
    prompt_tokens: list[int]

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def tokens(self) -> list[int]:
        return self.choices[0].tokens

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return self.choices[0].logprobs

    @property
    def continuation(self) -> str | None:
        return self.choices[0].continuation


@dataclass
class Score:
    """Per-token log-probabilities of a text (the first token has none) and its perplexity."""

    tokens: list[int]
    logprobs: list[float]  # logprobs[i] is log p(tokens[i+1] | tokens[:i+1])
    mean_nll: float
    perplexity: float


class Engine:
    """A loaded model with its tokenizer: what `quill.load` returns."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, name: str = "model", path: Path | None = None,
                 continuations: ContinuationStore | None = None, prefix_cache: PrefixCache | None = None):
        self.model, self.tokenizer, self.name, self.path = model, tokenizer, name, path
        self.continuations = continuations if continuations is not None else ContinuationStore()
        self.prefix_cache = prefix_cache  # None: every prompt is computed from its first token

    @property
    def config(self) -> GPTConfig:
        return self.model.config

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a text prompt, or the ids themselves when given ids."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise InvalidParameter("prompt must be a string or a list of token ids", "prompt")

    def request(self, prompt: str | list[int], max_tokens: int | None = 16, *, stop: str | list[str] | None = None,
                stop_token_ids: list[int] | None = None, include_stop: bool = False, logprobs: int | None = None,
                echo: bool = False, max_flops: int | None = None, json_schema: dict | str | None = None,
                regex: str | None = None, choice: list[str] | None = None, grammar: str | None = None,
                constraint: Constraint | None = None, cache_salt: str = "", **sampling) -> GenerationRequest:
        """Build and validate a generation request; sampling keywords are `SamplingParams` fields.

        At most one of json_schema (a dict or its JSON), regex, choice (a list of strings) and grammar (Lark or
        GBNF) constrains the output to match it (docs/structured.md); `constraint` is one already made.
        `cache_salt` decides whose cached prompt blocks it may reuse (the owner: requests of one salt share).
        A `max_flops` budget must pay for the prefill of what the prefix cache does not hold now.
        """
        unknown = sorted(set(sampling) - _SAMPLING_FIELDS)
        if unknown:
            raise InvalidParameter(f"unknown generation parameter {unknown[0]!r}", unknown[0])
        made = constraint_from(json_schema, regex, choice, grammar)
        if made is not None and constraint is not None:
            raise InvalidParameter(f"give one constraint at a time, not both constraint and {made.param}",
                                   made.param)
        req = GenerationRequest(
            prompt_ids=self.encode(prompt), max_tokens=max_tokens, sampling=SamplingParams(**sampling),
            stop=[stop] if isinstance(stop, str) else list(stop or []), stop_token_ids=list(stop_token_ids or []),
            include_stop=include_stop, logprobs=logprobs, echo=echo, max_flops=max_flops,
            constraint=constraint or made, cache_salt=cache_salt)
        cache = self.prefix_cache
        req.validate(self.model, cache.peek(req.prompt_ids, cache_salt, req.cacheable) if cache is not None else 0)
        if req.constraint is not None:
            # against this vocabulary now, not later in a batch
            compiled(req.constraint, self.tokenizer, self.config.eos_token_ids)
        return req

    def events(self, prompt: str | list[int] | None = None, max_tokens: int | None = 16, n: int = 1, *,
               continuation: str | None = None, owner: str = "", **kw) -> Iterator[StepEvent]:
        """Every token of `n` samples as it is generated (the lowest-level streaming call).

        With `continuation` (a handle from a call its budget ended) instead of a prompt, the paused sequence
        carries on exactly where it stopped; only a new `max_flops` may be given with it.
        Search keywords (num_beams, num_beam_groups, diversity_penalty, length_penalty, early_stopping,
        penalty_alpha) select a `quill.search` strategy.
        """
        if continuation is None:
            search = SearchParams.pop_from(kw)
            request = self.request(prompt, max_tokens, cache_salt=owner, **kw)
            if search is not None:
                return run_search(self.model, self.tokenizer, request, search, n)
            return run(self.model, self.tokenizer, request, n, self.prefix_cache)
        extra = sorted(k for k in kw if k != "max_flops")
        if prompt is not None or extra or n != 1:
            raise InvalidParameter("a continuation carries its own prompt and settings: give only max_flops "
                                   "with it", "continuation")
        state = self.continuations.get(continuation, owner, self.name)
        return resume(self.model, self.tokenizer, state, kw.get("max_flops"))

    def pause(self, seq: Sequence, owner: str = "") -> str:
        """Keep a sequence that its budget ended; returns the handle that continues it."""
        return self.continuations.put(dataclasses.replace(seq.state(), kv=seq.kv), owner, self.name)

    def generate(self, prompt: str | list[int] | None = None, max_tokens: int | None = 16, n: int = 1, *,
                 owner: str = "", **kw) -> Completion:
        """Generate `n` continuations of a prompt (text or token ids) and report their cost.

        With `max_flops`, a choice that the budget ends has finish_reason "budget" and a `continuation` handle.
        """
        t0 = time.perf_counter()
        seqs = {}
        for ev in self.events(prompt, max_tokens, n, owner=owner, **kw):
            seqs[ev.seq.index] = ev.seq
        usage = Usage()
        choices = []
        for i, seq in sorted(seqs.items()):
            usage.prompt_tokens = max(usage.prompt_tokens, seq.usage.prompt_tokens)
            usage.cached_tokens = max(usage.cached_tokens, seq.usage.cached_tokens)
            usage.completion_tokens += seq.usage.completion_tokens
            usage.flops += seq.usage.flops
            handle = self.pause(seq, owner) if seq.finish_reason == "budget" else None
            choices.append(Choice(i, "".join(seq.text), seq.tokens[len(seq.tokens) - seq.usage.completion_tokens:],
                                  seq.finish_reason, seq.logprobs if seq.request.logprobs is not None else None,
                                  seq.prompt_logprobs or None, handle, getattr(seq, "score", None)))
        usage.seconds = time.perf_counter() - t0
        return Completion(choices, usage, seqs[0].request.prompt_ids)

    def stream(self, prompt: str | list[int], max_tokens: int | None = 16, **kw) -> Iterator[str]:
        """Text pieces of one continuation as they are generated; their concatenation is `generate(...).text`."""
        for ev in self.events(prompt, max_tokens, 1, **kw):
            if ev.text:
                yield ev.text

    @torch.inference_mode()
    def score(self, text: str | list[int], stride: int | None = None,
              progress: Callable[[int], None] | None = None) -> Score:
        """Log-probability of every token given all before it, with a sliding window of the model's context.

        Each window of n_positions tokens advances by `stride` (default: the whole window); only tokens not
        scored by an earlier window are scored, each seeing at least n_positions - stride tokens of context. As
        in transformers' perplexity recipe, a window's first token is context only: with stride == window the
        first token of each later window goes unscored.
        """
        ids = self.encode(text)
        window = self.config.n_positions
        stride = stride or window
        if not 0 < stride <= window:
            raise InvalidParameter(f"stride must be in [1, {window}]", "stride")
        if len(ids) < 2:
            raise InvalidParameter("text must have at least two tokens to score", "text")
        logprobs: list[float] = []
        done = 1  # tokens[0] has no prediction
        begin = 0
        while done < len(ids):
            end = min(begin + window, len(ids))
            first = max(done, begin + 1)  # the first token scored in this window
            chunk = torch.tensor([ids[begin:end]], device=self.model.device)
            logits = self.model(chunk)[0].float().log_softmax(-1)  # [T, V]
            targets = chunk[0, first - begin:]
            picked = logits[first - begin - 1: end - begin - 1].gather(-1, targets[:, None])[:, 0]
            logprobs.extend(picked.tolist())
            if progress is not None:
                progress(end - done)
            done = end
            begin += stride
        nll = -sum(logprobs) / len(logprobs)
        return Score(ids, logprobs, nll, math.exp(nll))


def load(path_or_name: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str = "cpu",
         quantize: str | None = None, compile: bool = False, kv_cache: str | torch.dtype | None = None,
         prefix_cache: int | str | None = None) -> Engine:
    """Load a GPT-2 model ready to generate: a Hugging Face checkpoint folder, or a bundled, stored or Hub model by
    name (`gpt2`, `org/name[@revision]`), found by `quill.resolve` in that order (docs/models.md).

    `quantize="int8"` quantises every Linear (and a tied embedding) to int8 weights on load; a folder written
    by `quill quantize` loads as int8 by itself. `compile=True` runs the model through torch.compile.
    On the CPU a half `dtype` (bfloat16, float16) stores the projection matrices and the token embedding in it
    and computes in fp32 (`GPT.weights_to`): as fast, and the residual stream stays out of half rounding.
    `kv_cache` is the KV cache's dtype; by default the activations' dtype (the half dtype for half weights on
    the CPU), except bfloat16 for an int8 model
    with float32 activations (as llama.cpp keeps f16 caches): decode reads the whole cache every step, and at
    GPT-2 124M's 1024 positions an fp32 cache is 75 MB against 124 MB of int8 weights (docs/performance.md).
    `prefix_cache` bounds the memory (bytes, or a size such as "2GiB") of the KV kept between calls: prompt
    blocks later calls reuse (quill.prefix_cache) and paused generations' caches, one least-recently-used pool;
    None: an eighth of physical memory between 512 MiB and 4 GiB; 0 turns prefix caching off.
    """
    from quill import quantize as quantization
    from quill.model import compile_model

    path = resolve(path_or_name)
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidParameter("device 'cuda' was asked for but CUDA is not available", "device")
    if quantize is not None and quantize not in quantization.MODES:
        raise InvalidParameter(f"unknown quantize mode {quantize!r} (supported: {', '.join(quantization.MODES)})",
                               "quantize")
    kv_dtype = parse_dtype(kv_cache, "kv_cache") if kv_cache is not None else None
    pool_bytes = parse_prefix_cache(prefix_cache)
    dtype = parse_dtype(dtype)
    with cuda_turn(device):  # never while another thread captures a CUDA graph
        if quantization.quantization_config(path) is not None:
            model = quantization.load_quantized(path, dtype, device)
        elif quantize is not None:
            model = quantization.quantize_model(load_model(path, dtype, device), quantize)
        elif device == "cpu" and dtype != torch.float32:  # half matrices, fp32 activations, a half KV cache
            model = load_model(path, torch.float32, device).weights_to(dtype)
            kv_dtype = kv_dtype or dtype
        else:
            model = load_model(path, dtype, device)
    if kv_dtype is None and quantization.is_quantized_model(model) and model.dtype == torch.float32:
        kv_dtype = torch.bfloat16
    model.kv_dtype = kv_dtype
    if device == "cpu":
        kernels.move_to_huge_pages(itertools.chain(model.parameters(), model.buffers()))
    if compile:
        model = compile_model(model)
    # a folder is named for its last part; a bundled, stored or Hub model by the name it was asked for
    name = path.name if isinstance(path_or_name, os.PathLike) or Path(path_or_name).is_dir() else str(path_or_name)
    pool = KVPool(pool_bytes or None)  # with prefix caching off, paused generations keep the default bound
    return Engine(model, Tokenizer.load(path), name=name, path=path, continuations=ContinuationStore(pool=pool),
                  prefix_cache=PrefixCache(pool) if pool_bytes != 0 else None)


def parse_prefix_cache(size: int | str | None) -> int | None:
    """The prefix cache's bound in bytes from an int or a size such as '2GiB' (None: the default)."""
    if size is None:
        return None
    from quill.store import parse_size

    bad = InvalidParameter(f"prefix_cache (--prefix-cache) must be a size such as 2GiB or a number of bytes, 0 to "
                           f"turn it off; got {size!r}", "prefix_cache")
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise bad
    try:
        nbytes = parse_size(size, "prefix_cache")
    except QuillError:
        raise bad from None
    if nbytes < 0:
        raise bad
    return nbytes
