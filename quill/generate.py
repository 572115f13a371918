"""Token generation: requests, per-sequence state, and a batch that decodes many sequences in one forward.

`DecodeBatch` is the one decode loop in Quill. A single library call is a batch of one; `n` samples share
one prefill by copying its KV cache row; the server's scheduler adds and removes sequences between steps
(continuous batching). Each row of the batch sits at its own position (ragged), so nothing is padded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy
import torch
from torch import Tensor

from quill.cost import forward_flops
from quill.errors import BudgetError, ContextLengthError, InvalidParameter
from quill.graphs import GraphedStep, graphs_apply, takes_cuda_turn
from quill.kernels import Interrupt, argmax_rows, single_threaded
from quill.model import GPT, GPTConfig, KVCache
from quill.prefix_cache import PrefixCache, PrefixHit
from quill.sampling import NEG_INF, LogitsPipeline, SamplingParams, sample, top_logprobs
from quill.stopping import StopStrings
from quill.structured import Constraint, GrammarState, fill_bitmasks
from quill.tokenizer import Tokenizer

MAX_LOGPROBS = 20  # top alternatives per token, as the OpenAI API allows
# How long greedy rows may decode in one call into the kernels before their tokens come back (`DecodeBatch.step`):
# short enough that streamed text still flows smoothly, long enough to take the cache-cold Python between steps
# out of most of them
BURST_S = 0.05
BURST_STEPS = 64  # the most steps of one such call


@dataclass
class GenerationRequest:
    """Everything that decides which tokens a generation produces, validated before any work is done."""

    prompt_ids: list[int]
    max_tokens: int | None = 16  # None: up to the end of the context
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop: bool = False
    logprobs: int | None = None  # None: off; N: chosen-token logprob plus the top N alternatives
    echo: bool = False  # also score the prompt tokens
    max_flops: int | None = None  # per-call budget; the call ends with finish_reason "budget" before exceeding it
    constraint: Constraint | None = None  # structured output: what the generated text must match
    # whose cached prompt blocks this request may reuse (tenant isolation; quill.prefix_cache): never the tokens
    cache_salt: str = ""

    def validate(self, model: GPT, cached: int = 0) -> None:
        """Raise InvalidParameter (naming the parameter) for anything the model cannot honour; the budget must pay
        for the prefill of the prompt after its first `cached` tokens (found in the prefix cache)."""
        cfg = model.config
        if not self.prompt_ids:
            raise InvalidParameter("prompt must contain at least one token", "prompt")
        if any(not 0 <= t < cfg.vocab_size for t in self.prompt_ids):
            raise InvalidParameter(f"prompt token ids must lie in [0, {cfg.vocab_size})", "prompt")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            raise InvalidParameter(f"max_tokens must be a non-negative integer, got {self.max_tokens!r}",
                                   "max_tokens")
        wanted = len(self.prompt_ids) + (self.max_tokens or 0)
        if len(self.prompt_ids) > cfg.n_positions or wanted > cfg.n_positions:
            raise ContextLengthError(
                f"this model's context is {cfg.n_positions} tokens, but the prompt has {len(self.prompt_ids)} "
                f"tokens and max_tokens asks for {self.max_tokens or 0} more ({wanted} in all)",
                "max_tokens" if len(self.prompt_ids) <= cfg.n_positions else "prompt")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidParameter(f"logprobs must be between 0 and {MAX_LOGPROBS}", "logprobs")
        if self.max_flops is not None and (not isinstance(self.max_flops, int) or self.max_flops <= 0):
            raise InvalidParameter(f"max_flops must be a positive integer, got {self.max_flops!r}", "max_flops")
        if any(not 0 <= t < cfg.vocab_size for t in self.stop_token_ids):
            raise InvalidParameter(f"stop_token_ids must lie in [0, {cfg.vocab_size})", "stop_token_ids")
        self.sampling.validate(cfg.vocab_size)
        StopStrings(self.stop, self.include_stop)  # validates the stop list
        what = f"the prefill of {len(self.prompt_ids) - cached} prompt tokens" + (f" ({cached} cached)" if cached else "")
        check_budget(self.max_flops, self.prefill_flops(cfg, cached), what)

    def prefill_flops(self, config: GPTConfig, cached: int = 0) -> int:
        """FLOPs of this request's prefill after `cached` prompt tokens whose KV came from the prefix cache (every
        prompt position goes through the head with echo)."""
        n = len(self.prompt_ids)
        return forward_flops(config, n - cached, cached, n if self.echo else 1)

    @property
    def cacheable(self) -> int:
        """How many prompt tokens may come from the prefix cache: all but the last, whose logits give the first
        token; none with echo, which needs the logits of every prompt position."""
        return 0 if self.echo else len(self.prompt_ids) - 1

    @property
    def limit(self) -> int:
        return self.max_tokens if self.max_tokens is not None else 1 << 62


@dataclass
class TokenLogprob:
    """A token with its log-probability under the model and the top alternatives at its position."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Usage:
    """What a call cost: tokens in and out, floating-point operations and wall-clock seconds.

    `cached_tokens` of the prompt tokens came from the prefix cache: their work was not done again, and `flops`
    counts only the work done."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    flops: int = 0
    seconds: float = 0.0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.flops += other.flops
        self.seconds += other.seconds
        self.cached_tokens += other.cached_tokens


@dataclass
class StepEvent:
    """One generated token of one sequence: the text it released (after stop-string hold-back)."""

    seq: Sequence
    token: int
    text: str
    logprob: TokenLogprob | None
    finished: bool


@dataclass
class SequenceState:
    """A paused sequence: its request, tokens, random stream, detokeniser and stop-matcher state, and
    optionally its KV cache ([n_layer, n_head, len(tokens) - 1, head_dim] keys and values)."""

    request: GenerationRequest
    tokens: list[int]
    generator_state: Tensor | None
    decoder_ids: list[int]
    decoder_read: int
    held: str
    kv: tuple[Tensor, Tensor] | None = None


class Sequence:
    """The running state of one generated sequence: its tokens, sampler, detokeniser and stop matcher."""

    def __init__(self, request: GenerationRequest, tokenizer: Tokenizer, context: int, eos_ids: list[int],
                 generator: torch.Generator | None, index: int = 0):
        self.request, self.index = request, index
        self.prompt_len = len(request.prompt_ids)
        self.tokens: list[int] = list(request.prompt_ids)
        self.max_len = min(self.prompt_len + request.limit, context)  # the context this row may fill
        # [1, max_len] ids for the penalties; a numpy array because each step writes one element, far cheaper
        # than a torch index write (docs/performance.md, the Python around a decode step)
        self._history = numpy.zeros((1, self.max_len), dtype=numpy.int64)
        self._history[0, : self.prompt_len] = request.prompt_ids
        self.generator = generator
        self.grammar = GrammarState(request.constraint, tokenizer, eos_ids) if request.constraint is not None else None
        mask = self.grammar.mask if self.grammar is not None else None
        self.pipeline = LogitsPipeline.from_params(request.sampling, eos_ids, stop_token_ids=request.stop_token_ids,
                                                   mask=mask)
        if mask is not None:  # the processors around a constraint's mask: _choose_constrained runs them itself
            self._before_mask, self._after_mask = self.pipeline.split(mask)
        # a greedy choice that only has ids to skip (ignore_eos, banned_tokens) is an argmax over the rest (of
        # what the grammar allows, for a constrained row)
        self.bans = (self._before_mask if mask is not None else self.pipeline).bans() if request.sampling.greedy else None
        self.greedy = self.bans is not None and self.grammar is None  # chosen with the batch's other rows
        self.stop_ids = set(request.stop_token_ids) | (set() if request.sampling.ignore_eos else set(eos_ids))
        self.decoder = tokenizer.stream_decoder()
        self.matcher = StopStrings(request.stop, request.include_stop).matcher() if request.stop else None
        self.text: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.usage = Usage(prompt_tokens=self.prompt_len)  # this call's cost
        self.kv: tuple[Tensor, Tensor] | None = None  # the cache, saved when the budget ends the call
        self.error: Exception | None = None  # why this sequence failed (finish_reason "error"), alone in its batch

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def history(self) -> Tensor:
        """Prompt and generated ids so far, [1, t]: what repetition penalties look at."""
        return torch.from_numpy(self._history[:, : len(self.tokens)])

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def fits(self, flops: int) -> bool:
        """Whether `flops` more still fit in this call's budget."""
        budget = self.request.max_flops
        return budget is None or self.usage.flops + flops <= budget

    def state(self) -> SequenceState:
        """Everything needed to continue this sequence later (the KV cache is attached by the batch)."""
        return SequenceState(self.request, list(self.tokens),
                             self.generator.get_state() if self.generator is not None else None,
                             list(self.decoder.ids), self.decoder.read,
                             self.matcher.held if self.matcher is not None else "")

    @classmethod
    def resume(cls, state: SequenceState, tokenizer: Tokenizer, model: GPT, max_flops: int | None) -> Sequence:
        """A sequence that carries on from `state` exactly where it stopped, with a new budget."""
        request = dataclasses.replace(state.request, max_flops=max_flops)
        if max_flops is not None and (not isinstance(max_flops, int) or max_flops <= 0):
            raise InvalidParameter(f"max_flops must be a positive integer, got {max_flops!r}", "max_flops")
        cached = len(state.tokens) - 1
        what = (f"recomputing the context of {cached} tokens and " if state.kv is None else "") + "one step"
        check_budget(max_flops, resume_flops(model.config, state), what)
        generator = None
        if state.generator_state is not None:
            generator = torch.Generator(device=model.device)
            generator.set_state(state.generator_state)
        seq = cls(request, tokenizer, model.config.n_positions, model.config.eos_token_ids, generator)
        seq.tokens = list(state.tokens)
        seq._history[0, : len(seq.tokens)] = seq.tokens
        seq.decoder.ids, seq.decoder.read = list(state.decoder_ids), state.decoder_read
        if seq.grammar is not None:
            seq.grammar.replay(seq.generated)
        if seq.matcher is not None:
            seq.matcher.held = state.held
        seq.usage.prompt_tokens = 0
        return seq

    def choose(self, logits: Tensor) -> int:
        """Process one row of logits [1, V] with this sequence's pipeline; returns the chosen token id."""
        if self.grammar is not None:
            return self._choose_constrained(logits)
        if self.bans is not None:  # greedy, nothing but ids to skip: an argmax in C, without waking OpenMP
            return argmax_rows(logits, [self.bans])[0]
        processed = self.pipeline(logits, self.history, self.prompt_len)
        if self.request.sampling.greedy:  # in C, as above
            return argmax_rows(processed)[0]
        return int(sample(processed, False, self.generator))

    def _choose_constrained(self, logits: Tensor) -> int:
        """`choose` for a row with a constraint. Most grammar states allow a handful of tokens: the choice is made
        among those (the same argmax, the same distribution as over the masked vocabulary), at a fraction of the
        cost of the whole vocabulary's."""
        if self.request.sampling.greedy:
            # bans alone are skipped in the argmax instead of written into the vocabulary's logits
            processed = logits if self.bans is not None else self._before_mask(logits, self.history, self.prompt_len)
            best = self.grammar.argmax(processed, self.bans or ())
            if best is not None:
                return best
            return argmax_rows(self.grammar.mask(processed), [self.bans] if self.bans else None)[0]
        processed = self._before_mask(logits, self.history, self.prompt_len)
        on_cpu = processed.device.type == "cpu"  # the ids are listed on the CPU, where the draw among them pays
        ids = self.grammar.allowed_ids(processed.shape[-1]) if on_cpu else None
        if ids is not None:
            among = self._after_mask(processed[:, ids], self.history, self.prompt_len)
            if bool(among.amax() > NEG_INF):  # else all are suppressed: as over the masked vocabulary, which fails
                return int(ids[sample(among, False, self.generator)])
        return int(sample(self._after_mask(self.grammar.mask(processed), self.history, self.prompt_len), False,
                          self.generator))

    def logprob_logits(self, logits: Tensor) -> Tensor:
        """The logits that logprobs are reported from: the model's, masked by the constraint when there is one
        (the distribution the token was actually drawn from, before penalties and warpers)."""
        return logits if self.grammar is None else self.grammar.mask(logits)

    def accept(self, token: int, logprob: TokenLogprob | None) -> str:
        """Append a token, update the stop conditions, and return the text it makes safe to emit."""
        self.tokens.append(token)
        self._history[0, len(self.tokens) - 1] = token
        self.usage.completion_tokens += 1
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.grammar is not None:
            self.grammar.advance(token)
        if token in self.stop_ids:  # EOS or a stop token: its own text is not part of the output
            self.finish_reason = "stop"
            released = self._drain()
        else:
            released = self.decoder.push(token)
            if self.matcher is not None:
                released, hit = self.matcher.push(released)
                if hit:
                    self.finish_reason = "stop"
            if self.finish_reason is None and self.grammar is not None and self.grammar.done:
                self.finish_reason = "stop"  # the grammar is complete: nothing may follow, not even EOS
                released += self._drain()
            if self.finish_reason is None and (len(self.generated) >= self.request.limit
                                               or len(self.tokens) >= self.max_len):
                self.finish_reason = "length"
                released += self._drain()
        self.text.append(released)
        return released

    def _drain(self) -> str:
        """Text still held by the detokeniser and the stop matcher when the sequence ends without a stop string."""
        tail = self.decoder.flush()
        if self.matcher is None:
            return tail
        released, hit = self.matcher.push(tail)
        return released + ("" if hit else self.matcher.flush())


class DecodeBatch:
    """Up to `capacity` sequences decoded together against one KV cache; active rows are 0..n-1."""

    def __init__(self, model: GPT, capacity: int, max_len: int | None = None, prefix_cache: PrefixCache | None = None):
        self.model = model
        self.cache: KVCache = model.new_cache(capacity, max_len)
        self.prefix_cache = prefix_cache  # prompts' KV rows kept between calls (None: off)
        self.rows: list[Sequence] = []
        self._graphs: dict[int, GraphedStep] = {}  # CUDA: a captured decode step per number of active rows

    @property
    def capacity(self) -> int:
        return self.cache.batch

    @property
    def free(self) -> int:
        return self.capacity - len(self.rows)

    def _emit(self, seq: Sequence, logits: Tensor | None, token: int | None = None) -> StepEvent:
        """Choose, record and report the next token of `seq` from its logits [1, V] (`token`: already chosen;
        then the logits are needed only for logprobs).

        A failure here belongs to this sequence alone (its sampling settings, its text): it ends with
        finish_reason "error" and `seq.error`, and the other rows of the batch carry on.
        """
        try:
            if token is None:
                token = seq.choose(logits)
            lp = None
            if seq.request.logprobs is not None:
                chosen, top = top_logprobs(seq.logprob_logits(logits), torch.tensor([token], device=logits.device),
                                           seq.request.logprobs)
                # a constraint's mask leaves forbidden tokens at -inf: they are no alternatives
                lp = TokenLogprob(token, float(chosen[0]), [(i, v) for i, v in zip(top[0][0].tolist(),
                                                                                  top[1][0].tolist()) if v > -math.inf])
            text = seq.accept(token, lp)
        except Exception as e:
            seq.error, seq.finish_reason = e, "error"
            return StepEvent(seq, -1, "", None, True)
        return StepEvent(seq, token, text, lp, seq.finished)

    def lookup(self, request: GenerationRequest, count: bool = True) -> PrefixHit:
        """The longest cached prefix of a request's prompt, pinned until `add` is done with it (or `release`);
        `count=False`: not counted in the cache's metrics (a lookup that another will follow)."""
        if self.prefix_cache is None:
            return PrefixHit()
        return self.prefix_cache.lookup(request.prompt_ids, request.cache_salt, request.cacheable, count)

    @takes_cuda_turn
    @torch.inference_mode()
    def add(self, seqs: list[Sequence], hit: PrefixHit | None = None) -> list[StepEvent]:
        """Prefill the shared prompt of `seqs` once (they are samples of one request) and emit each one's first token.

        The rows of the prompt's cached prefix (`hit`, else looked up now) are copied, and only the rest is
        computed; the prompt's whole blocks then go into the prefix cache. The hit is released either way.
        """
        if len(seqs) > self.free:
            raise RuntimeError(f"batch has {self.free} free rows, {len(seqs)} requested")
        request = seqs[0].request
        hit = hit if hit is not None else self.lookup(request)
        try:
            prompt, want_all, cached = request.prompt_ids, request.echo, hit.tokens
            flops = request.prefill_flops(self.model.config, cached)
            row = len(self.rows)
            t0 = time.perf_counter()
            k_row, v_row = self.cache.k[:, row], self.cache.v[:, row]
            with single_threaded(self.model.device):  # many block-sized copies (see _keep_prefix)
                hit.copy_into(k_row, v_row)
            idx = torch.tensor([prompt[cached:]], device=self.model.device)
            logits = self.model(idx, cached, self.cache.rows(slice(row, row + 1)), last_only=not want_all)[0].float()
        finally:
            hit.release()
        if self.prefix_cache is not None:
            with single_threaded(self.model.device):
                self.prefix_cache.insert(prompt, request.cache_salt, k_row, v_row)
        if len(seqs) > 1:
            self.cache.copy_rows(slice(row + 1, row + len(seqs)), slice(row, row + 1))
        if want_all:
            seqs[0].prompt_logprobs = prompt_logprobs(logits, prompt, seqs[0].request.logprobs or 0)
            for s in seqs[1:]:
                s.prompt_logprobs = seqs[0].prompt_logprobs
        seconds = time.perf_counter() - t0
        events = []
        for i, seq in enumerate(seqs):
            seq.usage.flops += flops if i == 0 else 0
            seq.usage.cached_tokens = cached
            seq.usage.seconds += seconds / len(seqs)
            self.rows.append(seq)
            if seq.request.max_tokens == 0:
                seq.finish_reason = "length"
                events.append(StepEvent(seq, -1, "", None, True))
            else:
                events.append(self._emit(seq, logits[-1:]))
        self._compact()
        return events

    def _step_flops(self, seq: Sequence) -> int:
        """FLOPs of the decode step that feeds `seq`'s last token."""
        return forward_flops(self.model.config, 1, len(seq.tokens) - 1, 1)

    @takes_cuda_turn
    @torch.inference_mode()
    def resume(self, seq: Sequence, kv: tuple[Tensor, Tensor] | None) -> None:
        """Put a continued sequence back into a free row: copy its saved KV cache, or recompute it."""
        if self.free < 1:
            raise RuntimeError("batch has no free row")
        cached = len(seq.tokens) - 1  # the last token has not been fed yet
        row = len(self.rows)
        if kv is None:
            t0 = time.perf_counter()
            idx = torch.tensor([seq.tokens[:-1]], device=self.model.device)
            self.model(idx, 0, self.cache.rows(slice(row, row + 1)), last_only=True)
            seq.usage.flops += forward_flops(self.model.config, cached, 0, 1)
            seq.usage.seconds += time.perf_counter() - t0
        else:
            self.cache.k[:, row, :, :cached] = kv[0]
            self.cache.v[:, row, :, :cached] = kv[1]
        self.rows.append(seq)

    @takes_cuda_turn
    @torch.inference_mode()
    def step(self, burst: float = 0.0, interrupt: Interrupt | None = None) -> list[StepEvent]:
        """One decode step for every active row: feed each row's last token, emit each row's next token.

        A row whose budget cannot pay for the step ends first, with finish_reason "budget" and its KV cache
        saved in `seq.kv` so that a later call can continue it. With `burst` seconds, a batch of plain greedy
        rows may take several steps in one call into the kernels (`_burst`), until a row stops, the window
        passes or `interrupt` is set; their tokens come back together, each as its own event.
        """
        events = []
        for i, seq in enumerate(self.rows):
            if not seq.fits(self._step_flops(seq)):
                seq.finish_reason = "budget"
                cached = len(seq.tokens) - 1
                seq.kv = (self.cache.k[:, i, :, :cached].clone(), self.cache.v[:, i, :, :cached].clone())
                events.append(StepEvent(seq, -1, "", None, True))
        if events:
            self._compact()
        n = len(self.rows)
        if n == 0:
            return events
        t0 = time.perf_counter()
        device = self.model.device
        last = torch.tensor([[s.tokens[-1]] for s in self.rows], device=device)  # [n, 1]
        lengths = [len(s.tokens) - 1 for s in self.rows]  # position of each row's last token
        tokens = self._burst(last, lengths, burst, interrupt) if burst > 0 else None
        if tokens is not None:
            seconds = (time.perf_counter() - t0) / (n * len(tokens))
            for j, chosen in enumerate(tokens):
                for i, seq in enumerate(self.rows):
                    if not seq.finished:  # (a row whose text failed at an earlier step of the burst)
                        seq.usage.flops += forward_flops(self.model.config, 1, lengths[i] + j, 1)
                        seq.usage.seconds += seconds
                        events.append(self._emit(seq, None, chosen[i]))
            self._compact()
            return events
        if graphs_apply(self.model):
            positions = torch.tensor(lengths, device=device)
            graph = self._graphs.get(n)
            if graph is None:
                graph = self._graphs[n] = GraphedStep(self.model, self.cache.rows(slice(0, n)), last, positions)
            raw = graph(last, positions)  # [n, V]
        else:
            start: int | Tensor = lengths[0] if n == 1 else torch.tensor(lengths, device=device)
            raw = self.model(last, start, self.cache.rows(slice(0, n)))[:, -1]  # [n, V]
        fill_bitmasks([s.grammar for s in self.rows if s.grammar is not None])
        # greedy rows are chosen together, in C: one argmax over [n, V] and one transfer, not one per row
        greedy = argmax_rows(raw, [s.bans or [] for s in self.rows]) if any(s.greedy for s in self.rows) else None
        # Sampling and logprobs are torch ops; they run on one CPU thread: they are small, and waking torch's
        # OpenMP threads for them costs more than it saves - the woken threads then spin through the next step,
        # stealing its core. A step of greedy rows without logprobs runs no torch op here at all.
        torch_ops = greedy is None or any(not s.greedy or s.request.logprobs is not None for s in self.rows)
        with single_threaded(device) if torch_ops else contextlib.nullcontext():
            logits = raw.float() if torch_ops else raw
            seconds = (time.perf_counter() - t0) / n
            for i, seq in enumerate(self.rows):
                seq.usage.flops += forward_flops(self.model.config, 1, lengths[i], 1)
                seq.usage.seconds += seconds
                events.append(self._emit(seq, logits[i:i + 1], greedy[i] if seq.greedy else None))
        self._compact()
        return events

    def _burst(self, last: Tensor, lengths: list[int], window: float,
               interrupt: Interrupt | None) -> list[list[int]] | None:
        """Several greedy steps of every row in one call into the fused kernels, each row's argmax fed straight
        back: each step's tokens, or None where the batch does not qualify (a row that samples, reports logprobs,
        follows a grammar or has stop strings, which need Python between steps) or the kernels cannot run it.

        The burst ends where the first row does: its stop ids are checked in C, and no row is taken past its
        length limit, the context or what its budget pays for, so every step computed is a token emitted and
        paid for, and the tokens are those of single steps. Between steps of a plain greedy decode, Python
        runs cache-cold and costs about a tenth of an int8 step (docs/performance.md).
        """
        if not all(s.greedy and s.request.logprobs is None and s.matcher is None for s in self.rows):
            return None
        steps = min(self._steps_paid(s) for s in self.rows)
        if steps < 2:
            return None
        start: int | Tensor = lengths[0] if len(lengths) == 1 else torch.tensor(lengths)
        return self.model.decode_greedy(last, start, self.cache.rows(slice(0, len(self.rows))),
                                        [s.bans for s in self.rows], [sorted(s.stop_ids) for s in self.rows], steps,
                                        time.monotonic() + window, interrupt)

    def _steps_paid(self, seq: Sequence) -> int:
        """How many more tokens `seq` may take in one burst: up to its length limit, the context and what its budget
        pays for (its next step is already paid: `step` checked)."""
        left = min(seq.request.limit - len(seq.generated), seq.max_len - len(seq.tokens), BURST_STEPS)
        if seq.request.max_flops is None:
            return left
        spent = seq.usage.flops
        for k in range(left):
            spent += forward_flops(self.model.config, 1, len(seq.tokens) - 1 + k, 1)
            if spent > seq.request.max_flops:
                return k
        return left

    def close(self) -> None:
        """End the batch: its cache goes back to the model for the next generation's (`GPT.recycle_cache`)."""
        self.rows = []
        self.model.recycle_cache(self.cache)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence (finished or cancelled) and free its row."""
        if seq.finish_reason is None:
            seq.finish_reason = "cancelled"
        self._compact()

    def _compact(self) -> None:
        """Keep active rows contiguous: move the last active row into each finished row's place."""
        i = 0
        while i < len(self.rows):
            if self.rows[i].finished:
                self._keep_prefix(i)
                last = len(self.rows) - 1
                if i != last:
                    self.cache.copy_rows(slice(i, i + 1), slice(last, last + 1))
                    self.rows[i] = self.rows[last]
                self.rows.pop()
            else:
                i += 1

    def _keep_prefix(self, i: int) -> None:
        """Put the whole blocks of a leaving row's tokens into the prefix cache: a chat's next turn resends them."""
        seq = self.rows[i]
        if self.prefix_cache is not None and seq.error is None:
            fed = seq.tokens[:-1]  # the last token was never fed: its keys and values are not in the row
            # One thread: for block-sized copies, waking torch's OpenMP threads costs more than the copy, and
            # on a busy machine far more (docs/performance.md, "Prefix caching").
            with single_threaded(self.model.device):
                self.prefix_cache.insert(fed, seq.request.cache_salt, self.cache.k[:, i], self.cache.v[:, i])


def prompt_logprobs(logits: Tensor, prompt: list[int], top_n: int) -> list[TokenLogprob]:
    """Log-probability of every prompt token given the ones before it (the first has none), from logits [T, V]."""
    out = [TokenLogprob(prompt[0], None)]
    if len(prompt) > 1:
        targets = torch.tensor(prompt[1:], device=logits.device)
        chosen, (top_ids, top_vals) = top_logprobs(logits[:-1], targets, top_n)
        for j, tok in enumerate(prompt[1:]):
            top = list(zip(top_ids[j].tolist(), top_vals[j].tolist())) if top_n else []
            out.append(TokenLogprob(tok, float(chosen[j]), top))
    return out


def check_budget(max_flops: int | None, flops: int, what: str) -> None:
    """Refuse, before any work, a budget that cannot pay for `what` (the work that must come first)."""
    if max_flops is not None and flops > max_flops:
        raise BudgetError(f"max_flops={max_flops} cannot pay for {what}: at least {flops} FLOPs are needed",
                          "max_flops", minimum=flops)


def resume_flops(config: GPTConfig, state: SequenceState) -> int:
    """The least a continuation's call must pay: recomputing a lost KV cache, then one decode step."""
    cached = len(state.tokens) - 1
    return (forward_flops(config, cached, 0, 1) if state.kv is None else 0) + forward_flops(config, 1, cached, 1)


def run(model: GPT, tokenizer: Tokenizer, request: GenerationRequest, n: int = 1,
        prefix_cache: PrefixCache | None = None) -> Iterator[StepEvent]:
    """Generate `n` samples of one request, yielding each token as it is chosen (reusing cached prompt rows)."""
    if not isinstance(n, int) or n < 1:
        raise InvalidParameter(f"n must be a positive integer, got {n!r}", "n")
    batch = DecodeBatch(model, n, len(request.prompt_ids) + request.limit, prefix_cache)
    hit = batch.lookup(request)
    try:
        request.validate(model, hit.tokens)
        seqs = new_sequences(model, tokenizer, request, n)
    except BaseException:
        hit.release()
        raise
    try:
        yield from _raising(batch.add(seqs, hit))
        while batch.rows:
            yield from _raising(batch.step(BURST_S))
    finally:
        batch.close()


def resume(model: GPT, tokenizer: Tokenizer, state: SequenceState, max_flops: int | None) -> Iterator[StepEvent]:
    """Continue a sequence paused by its budget, yielding each further token."""
    seq = Sequence.resume(state, tokenizer, model, max_flops)
    batch = DecodeBatch(model, 1, seq.max_len)
    try:
        batch.resume(seq, state.kv)
        while batch.rows:
            yield from _raising(batch.step(BURST_S))
    finally:
        batch.close()


def _raising(events: list[StepEvent]) -> list[StepEvent]:
    """The events of a library call's step, raising the error of a sequence that failed (one caller, no batch)."""
    for ev in events:
        if ev.seq.error is not None:
            raise ev.seq.error
    return events


def new_sequences(model: GPT, tokenizer: Tokenizer, request: GenerationRequest, n: int) -> list[Sequence]:
    """The `n` samples of a validated request, each drawing from its own random stream (`make_generator`)."""
    return [Sequence(request, tokenizer, model.config.n_positions, model.config.eos_token_ids,
                     make_generator(request.sampling.seed, i, model), index=i) for i in range(n)]


def make_generator(seed: int | None, index: int, model: GPT) -> torch.Generator | None:
    """The random stream of sample `index` of a request: sample 0 of seed s is the same as a lone request with s."""
    if seed is None:
        return None
    g = torch.Generator(device=model.device)
    g.manual_seed((seed + index * 0x9E3779B97F4A7C15) % (1 << 63))
    return g
