"""Logits processing and sampling: small composable processors, vectorised over a batch, torch-only.

Each processor has the semantics of its `transformers.generation.logits_process` namesake and maps
`(logits [B, V] float32, history [B, t] LongTensor, prompt_len: int) -> logits`, where `history` is the
prompt followed by the tokens generated so far and `prompt_len` is how many of its leading tokens are
prompt. Processors never modify their input in place, so the caller's raw logits stay usable (for
logprobs). Nothing here reads a device tensor back to Python: the hot path stays on the device (top-p's
CPU shortcut reads one flag of a CPU tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from quill.errors import InvalidParameter

NEG_INF = float("-inf")
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values
MAX_PENALTY = 2.0  # OpenAI's range for presence/frequency penalties
# Below this temperature sampling is greedy, as in vLLM: dividing logits by a smaller one overflows float32
# (1e-38 turns every logit into an infinity), and the distribution is an argmax long before that.
GREEDY_TEMPERATURE = 1e-5
_FLOAT_MAX = torch.finfo(torch.float32).max
_FLOAT_TINY = torch.finfo(torch.float32).tiny
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts (end exclusive)


@dataclass
class SamplingParams:
    """How to turn one request's logits into tokens; neutral defaults leave the model's distribution as is."""

    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE) means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> additive bias
    banned_tokens: tuple[int, ...] = ()
    min_tokens: int = 0  # EOS/stop ids are suppressed until this many new tokens exist
    ignore_eos: bool = False
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or below GREEDY_TEMPERATURE) means argmax decoding (no warpers, no randomness)."""
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidParameter naming the first field outside its allowed range."""
        _check_range("temperature", self.temperature, low=0.0)
        _check_int("top_k", self.top_k, low=0)
        _check_range("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_range("min_p", self.min_p, low=0.0, high=1.0)
        _check_range("typical_p", self.typical_p, low=0.0, high=1.0, low_open=True)
        _check_range("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        _check_range("presence_penalty", self.presence_penalty, low=-MAX_PENALTY, high=MAX_PENALTY)
        _check_range("frequency_penalty", self.frequency_penalty, low=-MAX_PENALTY, high=MAX_PENALTY)
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, low=0)
        if not isinstance(self.logit_bias, dict):
            raise InvalidParameter("logit_bias must map token ids to biases", param="logit_bias")
        for token_id, bias in self.logit_bias.items():
            _check_token_id("logit_bias", token_id, vocab_size)
            _check_range("logit_bias", bias, low=-MAX_LOGIT_BIAS, high=MAX_LOGIT_BIAS)
        if not isinstance(self.banned_tokens, (tuple, list)):
            raise InvalidParameter("banned_tokens must be a sequence of token ids", param="banned_tokens")
        for token_id in self.banned_tokens:
            _check_token_id("banned_tokens", token_id, vocab_size)
        _check_int("min_tokens", self.min_tokens, low=0)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidParameter(f"ignore_eos must be a boolean, got {self.ignore_eos!r}", param="ignore_eos")
        if self.seed is not None:
            _check_int("seed", self.seed, low=SEED_RANGE[0], high=SEED_RANGE[1] - 1)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_range(
    name: str, value: object, low: float, high: float = math.inf, low_open: bool = False
) -> None:
    """Require a finite number in [low, high], or (low, high] when low_open."""
    if not _is_number(value) or not math.isfinite(value):
        raise InvalidParameter(f"{name} must be a finite number, got {value!r}", param=name)
    if (value <= low if low_open else value < low) or value > high:
        lower = f"({low}" if low_open else f"[{low}"
        upper = "inf)" if high == math.inf else f"{high}]"
        raise InvalidParameter(f"{name} must be in {lower}, {upper}, got {value!r}", param=name)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter(f"{name} must be an integer, got {value!r}", param=name)
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidParameter(f"{name} must be {bound}, got {value!r}", param=name)


def _check_token_id(name: str, token_id: object, vocab_size: int) -> None:
    if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
        raise InvalidParameter(
            f"{name} contains {token_id!r}, which is not a token id in [0, {vocab_size})", param=name
        )


class LogitsProcessor(Protocol):
    """Maps logits [B, V] to processed logits, given the token history [B, t] and the prompt length."""

    def __call__(self, logits: Tensor, history: Tensor, prompt_len: int) -> Tensor: ...


def _token_mask(ids: Tensor, vocab_size: int) -> Tensor:
    """Bool [B, V]: which token ids occur in each row of `ids`; ids >= V are ignored, as in transformers."""
    seen = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    seen.scatter_(1, ids.clamp(max=vocab_size), True)
    return seen[:, :vocab_size]


def _id_tensor(token_ids: list[int] | tuple[int, ...], device: torch.device | str) -> Tensor:
    return torch.tensor(list(token_ids), dtype=torch.long, device=device)


@dataclass
class LogitBiasLogitsProcessor:
    """Adds a fixed bias to single tokens (OpenAI `logit_bias`; transformers' SequenceBias with 1-token keys)."""

    token_ids: Tensor  # [n] long
    biases: Tensor  # [n] float32

    @classmethod
    def from_dict(cls, bias: dict[int, float], device: torch.device | str = "cpu") -> LogitBiasLogitsProcessor:
        biases = torch.tensor(list(bias.values()), dtype=torch.float32, device=device)
        return cls(_id_tensor(list(bias), device), biases)

    def __call__(self, logits: Tensor, history: Tensor, prompt_len: int) -> Tensor:
        source = self.biases.to(logits).expand(logits.shape[0], -1)
        return logits.index_add(1, self.token_ids.to(logits.device), source)


@dataclass
class RepetitionPenaltyLogitsProcessor:
    """Divides positive (multiplies negative) logits of every token already in prompt+generated history.

    A penalty too small for float32 (1e-300 rounds to 0) is taken as the smallest positive float32, and a
    division that overflows stops at the largest float32, so no finite logit becomes an infinity or NaN.
    """

    penalty: float

    def __call__(self, logits: Tensor, history: Tensor, prompt_len: int) -> Tensor:
        penalty = max(self.penalty, _FLOAT_TINY)
        penalised = torch.where(logits < 0, logits * penalty, (logits / penalty).clamp(max=_FLOAT_MAX))
        return torch.where(_token_mask(history, logits.shape[-1]), penalised, logits)


@dataclass
class PresenceFrequencyPenaltyLogitsProcessor:
    """OpenAI penalties over generated tokens only: logits -= frequency*count + presence*(count > 0)."""

    presence_penalty: float
    frequency_penalty: float

    def __call__(self, logits: Tensor, history: Tensor, prompt_len: int) -> Tensor:
        generated = history[:, prompt_len:].clamp(max=logits.shape[-1])
        counts = logits.new_zeros(logits.shape[0], logits.shape[-1] + 1)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=logits.dtype))
        counts = counts[:, :-1]
        return logits - (self.frequency_penalty * counts + self.presence_penalty * (counts > 0))


@dataclass
class NoRepeatNGramLogitsProcessor:
    """Bans every token that would complete an n-gram already present in the history (prompt included)."""

    ngram_size: int

    def __call__(self, logits: Tensor, history: Tensor, prompt_len: int) -> Tensor:
        n, length = self.ngram_size, history.shape[1]
        if length < n:
            return logits
        windows = history.unfold(1, n, 1)  # [B, length-n+1, n]: every n-gram so far
        suffix = history[:, length - n + 1 :]  # the n-1 tokens the next one would extend
        # A window whose first n-1 tokens equal the suffix bans its last token; others point past the vocab.
        completes = (windows[..., :-1] == suffix.unsqueeze(1)).all(-1)
        banned = torch.where(completes, windows[..., -1], logits.shape[-1])
        return logits.masked_fill(_token_mask(banned, logits.shape[-1]), NEG_INF)


@dataclass
class MinNewTokensLengthLogitsProcessor:
    """Suppresses the EOS/stop ids until `min_new_tokens` tokens have been generated."""

    min_new_tokens: int
    eos_token_ids: Tensor  # [n] long

    def __call__(self, logits: Tensor, history: Tensor, prompt_len: int) -> Tensor:
        if history.shape[1] - prompt_len >= self.min_new_tokens:
            return logits
        return logits.index_fill(1, self.eos_token_ids.to(logits.device), NEG_INF)


@dataclass
class SuppressTokensLogitsProcessor:
    """Bans tokens for the whole generation (banned_tokens, and EOS when ignore_eos)."""

    token_ids: Tensor  # [n] long

    def __call__(self, logits: Tensor, history: Tensor, prompt_len: int) -> Tensor:
        return logits.index_fill(1, self.token_ids.to(logits.device), NEG_INF)


@dataclass
class TemperatureLogitsWarper:
    """Divides logits by the temperature (>1 flattens, <1 sharpens the distribution)."""

    temperature: float

    def __call__(self, logits: Tensor, history: Tensor, prompt_len: int) -> Tensor:
        return logits / self.temperature


@dataclass
class TopKLogitsWarper:
    """Keeps the k largest logits (and any tied with the k-th)."""

    top_k: int

    def __call__(self, logits: Tensor, history: Tensor, prompt_len: int) -> Tensor:
        kth_largest = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        return logits.masked_fill(logits < kth_largest, NEG_INF)


@dataclass
class TopPLogitsWarper:
    """Nucleus filtering: keeps the most likely tokens whose cumulative probability reaches top_p.

    On CPU the nucleus is first looked for among each row's CANDIDATES most likely tokens: a partial top-k
    costs a fraction of sorting a whole vocabulary, which on GPT-2's takes longer than a bf16 decode step's
    matrices (docs/performance.md, "top-p without sorting the vocabulary"). Rows whose nucleus is wider, or
    whose boundary is a tie or within rounding of top_p, take the full sort, transformers' own computation,
    so the result is the same either way.
    """

    top_p: float
    CANDIDATES = 256
    # Closer to top_p than this, transformers' sum from the other end may decide otherwise. Both cumulative
    # sums accumulate in double (torch's CPU cumsum); they differ by the softmax's rounding, ~1e-7.
    MARGIN = 1e-5

    def __call__(self, logits: Tensor, history: Tensor, prompt_len: int) -> Tensor:
        kept = self.nucleus_among_candidates(logits) if logits.device.type == "cpu" else None
        if kept is not None:
            return logits.masked_fill(~kept, NEG_INF)
        ascending, order = logits.sort(dim=-1)
        # Drop the unlikely tail whose total mass stays within 1 - top_p; the top token always survives.
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - self.top_p
        drop[:, -1] = False
        return logits.masked_fill(drop.scatter(1, order, drop), NEG_INF)

    def nucleus_among_candidates(self, logits: Tensor) -> Tensor | None:
        """The kept tokens as a bool mask [B, V] when every row's nucleus is decided among its CANDIDATES most
        likely tokens, clear of ties and rounding at its boundary; else None."""
        if logits.shape[-1] <= self.CANDIDATES:
            return None
        top, ids = logits.softmax(dim=-1).topk(self.CANDIDATES, dim=-1)  # [B, n] descending
        above = top.cumsum(dim=-1) - top  # mass of the more likely candidates
        keep = above < self.top_p  # transformers drops a token once the mass below and at it is <= 1 - top_p
        keep[:, 0] = True  # the top token always survives, also for a top_p that float32 rounds to 0
        n_kept = keep.sum(dim=-1, keepdim=True)  # >= 1: the top token's `above` is 0
        decided = ~keep[:, -1] & ((above - self.top_p).abs() > self.MARGIN).all(dim=-1)
        untied = top.gather(-1, n_kept - 1) != top.gather(-1, n_kept.clamp(max=self.CANDIDATES - 1))
        if not bool((decided & untied.squeeze(-1)).all()):
            return None
        return torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, ids, keep)


@dataclass
class MinPLogitsWarper:
    """Drops tokens less likely than min_p times the most likely token's probability."""

    min_p: float

    def __call__(self, logits: Tensor, history: Tensor, prompt_len: int) -> Tensor:
        probs = logits.softmax(dim=-1)
        # min_p <= 1, so the top token is never below the threshold: min_tokens_to_keep=1 holds by itself.
        return logits.masked_fill(probs < self.min_p * probs.amax(dim=-1, keepdim=True), NEG_INF)


@dataclass
class TypicalLogitsWarper:
    """Locally typical sampling: keeps tokens whose surprisal is closest to the entropy, up to mass typical_p."""

    mass: float

    def __call__(self, logits: Tensor, history: Tensor, prompt_len: int) -> Tensor:
        logp = logits.log_softmax(dim=-1)
        entropy = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)
        atypicality, order = (-logp - entropy).abs().sort(dim=-1)
        cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
        # Keep everything up to (and tied with) the first token at which the cumulative mass reaches `mass`;
        # the most typical token is never above that threshold, so min_tokens_to_keep=1 holds by itself.
        last = (cumulative < self.mass).sum(dim=-1, keepdim=True).clamp_(max=logits.shape[-1] - 1)
        drop = atypicality > atypicality.gather(-1, last)
        return logits.masked_fill(drop.scatter(1, order, drop), NEG_INF)


@dataclass
class LogitsPipeline:
    """The processors for one request, applied in the order transformers' `generate` applies them."""

    processors: list[LogitsProcessor] = field(default_factory=list)

    @classmethod
    def from_params(
        cls, params: SamplingParams, eos_token_ids: list[int] | tuple[int, ...], device: torch.device | str = "cpu",
        stop_token_ids: list[int] | tuple[int, ...] = (), mask: LogitsProcessor | None = None,
    ) -> LogitsPipeline:
        """Build the pipeline, skipping neutral settings (greedy without penalties is a bare argmax).

        `mask` (a structured-output constraint's, `quill.structured.GrammarState.mask`) comes after the
        processors and before the warpers, as in vLLM: a top-k or top-p taken first could keep only tokens
        the grammar forbids.

        `min_tokens` suppresses every id that would end generation early (the model's EOS ids, unless
        `ignore_eos`, and the request's `stop_token_ids`); `ignore_eos` bans the EOS ids throughout, as in
        vLLM. Warpers only apply when sampling.
        """
        procs: list[LogitsProcessor] = []
        if params.logit_bias:
            procs.append(LogitBiasLogitsProcessor.from_dict(params.logit_bias, device))
        if params.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            procs.append(PresenceFrequencyPenaltyLogitsProcessor(params.presence_penalty, params.frequency_penalty))
        if params.no_repeat_ngram_size > 0:
            procs.append(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
        ends = sorted(set(stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids)))
        if params.min_tokens > 0 and ends:
            procs.append(MinNewTokensLengthLogitsProcessor(params.min_tokens, _id_tensor(ends, device)))
        banned = set(params.banned_tokens) | (set(eos_token_ids) if params.ignore_eos else set())
        if banned:
            procs.append(SuppressTokensLogitsProcessor(_id_tensor(sorted(banned), device)))
        if mask is not None:
            procs.append(mask)
        if not params.greedy:
            if params.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                procs.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                procs.append(TopPLogitsWarper(params.top_p))
            if params.min_p > 0.0:
                procs.append(MinPLogitsWarper(params.min_p))
            if params.typical_p < 1.0:
                procs.append(TypicalLogitsWarper(params.typical_p))
        return cls(procs)

    @property
    def is_identity(self) -> bool:
        """True when every setting is neutral, so the logits pass through unchanged."""
        return not self.processors

    def bans(self) -> list[int] | None:
        """The ids this pipeline bans when banning is all it does (a greedy choice is then an argmax that skips
        them), else None."""
        if not all(isinstance(p, SuppressTokensLogitsProcessor) for p in self.processors):
            return None
        return sorted({i for p in self.processors for i in p.token_ids.tolist()})

    def split(self, at: LogitsProcessor) -> tuple[LogitsPipeline, LogitsPipeline]:
        """The processors before `at` and those after it (a constraint's mask: see `from_params`)."""
        i = self.processors.index(at)
        return LogitsPipeline(self.processors[:i]), LogitsPipeline(self.processors[i + 1:])

    def __call__(self, logits: Tensor, history: Tensor, prompt_len: int) -> Tensor:
        for process in self.processors:
            logits = process(logits, history, prompt_len)
        return logits


Generators = list[torch.Generator | None] | torch.Generator | None


def sample(logits: Tensor, greedy: bool, generators: Generators = None) -> Tensor:
    """Pick one token id per row: argmax when greedy, else a draw from softmax(logits).

    With a list of generators, row i consumes exactly one number from generators[i] (None: the global
    RNG), so a seeded request samples the same tokens alone or batched beside others.
    """
    if greedy:
        return logits.argmax(dim=-1)
    # Inverse-CDF sampling with one uniform per row: on CPU a cumulative sum and a binary search cost a
    # fraction of torch.multinomial or an exponential race (Tensor.exponential_ is slow), and one uniform per
    # row keeps each row's random stream its own. The CDF is float64 so tiny probabilities keep their mass;
    # zero-probability (filtered) tokens have empty intervals and are never picked.
    rows = logits.shape[0]
    options = {"dtype": torch.float64, "device": logits.device}
    if isinstance(generators, list):
        uniform = torch.cat([torch.rand(1, generator=g, **options) for g in generators])
    else:
        uniform = torch.rand(rows, generator=generators, **options)
    if logits.shape[-1] == 1:  # one candidate (a grammar's forced token): drawn all the same, for the stream
        return torch.zeros(rows, dtype=torch.long, device=logits.device)
    probs = logits.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    # 1 - u lies in (0, 1], so the target is never 0 and never beyond the total mass.
    total = cdf[:, -1:]
    target = (1 - uniform).unsqueeze(-1) * total
    tokens = torch.searchsorted(cdf, target).squeeze(-1)
    # A row without a finite positive mass (a NaN or +inf logit, or every token filtered) has no distribution
    # to draw from: it takes its largest logit, so a token id is always inside the vocabulary.
    lost = ~(total.squeeze(-1) > 0) | ~total.squeeze(-1).isfinite()
    if bool(lost.any()):
        tokens = torch.where(lost, logits.nan_to_num(nan=NEG_INF).argmax(dim=-1), tokens)
    return tokens


def log_softmax(logits: Tensor) -> Tensor:
    """Log-probabilities in float32 over the last dimension."""
    return torch.log_softmax(logits.float(), dim=-1)


def top_logprobs(logits: Tensor, ids: Tensor, n: int) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Logprob of the chosen `ids` [B], and the n most likely as (ids [B, n], logprobs [B, n]).

    Callers pass the raw model logits, before penalties, temperature and filtering: the model's own
    distribution, comparable across requests whatever their sampling settings; a structured-output row's are
    masked by its grammar first (`Sequence.logprob_logits`).
    """
    logp = log_softmax(logits)
    chosen = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    top = logp.topk(n, dim=-1)
    return chosen, (top.indices, top.values)
