"""Search strategies: beam search, diverse (group) beam search and contrastive search.

These decide which candidates are kept and how they are ranked across steps, so their settings live in
`SearchParams`, apart from the per-token `SamplingParams`. The penalties and bans of `SamplingParams`
(repetition/presence/frequency penalties, no_repeat_ngram_size, logit_bias, banned_tokens, min_tokens,
ignore_eos) still apply to every strategy; the sampling warpers (temperature, top_p, min_p, typical_p) do
not, since these searches are deterministic, and are rejected. Contrastive search uses `top_k` as its
number of candidates.

The semantics are transformers':
- beam search: transformers 5's vectorised `_beam_search` (same sequences and `sequences_scores`), with
  `length_penalty` and `early_stopping` True / False / "never";
- diverse beam search: transformers 4's `_group_beam_search` with `BeamSearchScorer` and the Hamming
  diversity penalty (Vijayakumar et al. 2016), which transformers 5 moved to the Hub as custom generate code;
- contrastive search: transformers 4's `_contrastive_search` (Su et al. 2022), likewise moved to the Hub.

Beams are rows of one KV cache at a common position; after each step the cache rows are reordered with
`KVCache.copy_rows`. Stop strings end a hypothesis as an EOS token does, and stop token ids are EOS tokens.
Beam results are known only when the search ends, so their events all come at the end; contrastive search
streams token by token.

These searches run a decode loop of their own, not `quill.generate.DecodeBatch`: DecodeBatch steps
independent sequences, each choosing its own next token, while a search chooses across its rows together
(beams are reordered and replaced every step; contrastive search scores `top_k` candidates by their hidden
states, `GPT.forward(..., return_hidden=True)`, which the fused decode path never computes). So a search
runs in the caller's thread with plain `GPT.forward` calls: no CUDA graphs, no CUDA turn (`quill.graphs`),
and the server refuses search parameters rather than batching them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from quill.cost import forward_flops
from quill.errors import InvalidParameter
from quill.generate import (
    GenerationRequest,
    Sequence,
    StepEvent,
    TokenLogprob,
    prompt_logprobs,
    run,
)
from quill.model import GPT, KVCache
from quill.sampling import LogitsPipeline, SamplingParams
from quill.stopping import StopStrings
from quill.tokenizer import Tokenizer

SEARCH_FIELDS = ("num_beams", "num_beam_groups", "diversity_penalty", "length_penalty", "early_stopping",
                 "penalty_alpha")
_NEG = -1.0e9  # transformers' "impossible" score for beams and finished slots


@dataclass
class SearchParams:
    """A search strategy: beam search (num_beams > 1), diverse beam search (num_beam_groups > 1) or
    contrastive search (penalty_alpha > 0, with `top_k` candidates). Defaults mean none (plain decoding)."""

    num_beams: int = 1
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False (heuristic) or "never"
    penalty_alpha: float = 0.0

    @classmethod
    def pop_from(cls, kwargs: dict) -> SearchParams | None:
        """Take the search keywords out of `kwargs` (None when there are none)."""
        given = {k: kwargs.pop(k) for k in SEARCH_FIELDS if k in kwargs}
        return cls(**given) if given else None

    @property
    def strategy(self) -> str | None:
        """'beam', 'group_beam', 'contrastive', or None for plain greedy/sampled decoding (after validate)."""
        if self.penalty_alpha > 0:
            return "contrastive"
        if self.num_beams > 1:
            return "group_beam" if self.num_beam_groups > 1 else "beam"
        return None

    def validate(self, sampling: SamplingParams, n: int = 1) -> None:
        """Raise InvalidParameter naming the first setting that is out of range or that does not combine."""
        _int("num_beams", self.num_beams, 1)
        _int("num_beam_groups", self.num_beam_groups, 1)
        if self.num_beam_groups > self.num_beams or self.num_beams % self.num_beam_groups:
            raise InvalidParameter(f"num_beam_groups must divide num_beams ({self.num_beams}), "
                                   f"got {self.num_beam_groups}", "num_beam_groups")
        _number("diversity_penalty", self.diversity_penalty, 0.0)
        _number("length_penalty", self.length_penalty)
        _number("penalty_alpha", self.penalty_alpha, 0.0, 1.0)
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            raise InvalidParameter(f"early_stopping must be true, false or \"never\", got {self.early_stopping!r}",
                                   "early_stopping")
        if self.num_beam_groups > 1 and self.diversity_penalty == 0:
            raise InvalidParameter("diverse beam search (num_beam_groups > 1) needs diversity_penalty > 0, "
                                   "otherwise every group is the same", "diversity_penalty")
        if self.num_beam_groups == 1 and self.diversity_penalty != 0:
            raise InvalidParameter("diversity_penalty applies only to diverse beam search (num_beam_groups > 1)",
                                   "diversity_penalty")
        beams = self.num_beams > 1
        if not beams and self.length_penalty != 1.0:
            raise InvalidParameter("length_penalty applies only to beam search (num_beams > 1)", "length_penalty")
        if not beams and self.early_stopping is not False:
            raise InvalidParameter("early_stopping applies only to beam search (num_beams > 1)", "early_stopping")
        if self.penalty_alpha > 0 and beams:
            raise InvalidParameter("contrastive search (penalty_alpha > 0) cannot be combined with num_beams > 1",
                                   "penalty_alpha")
        if self.penalty_alpha > 0 and sampling.top_k < 1:
            raise InvalidParameter("contrastive search (penalty_alpha > 0) needs top_k >= 1 candidates", "top_k")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidParameter(f"n must be a positive integer, got {n!r}", "n")
        if self.strategy is None:
            return
        name = {"beam": "beam search", "group_beam": "diverse beam search", "contrastive": "contrastive search"}
        what = name[self.strategy]
        # Deterministic searches: the sampling warpers have nothing to act on.
        for field, neutral in (("temperature", 1.0), ("top_p", 1.0), ("min_p", 0.0), ("typical_p", 1.0)):
            value = getattr(sampling, field)
            if value != neutral and not (field == "temperature" and value == 0):
                raise InvalidParameter(f"{what} does not sample: {field} cannot be used with it", field)
        if beams and sampling.top_k != 0:
            raise InvalidParameter(f"{what} does not sample: top_k cannot be used with it", "top_k")
        if beams and n > self.num_beams:
            raise InvalidParameter(f"n ({n}) cannot exceed num_beams ({self.num_beams})", "n")
        if not beams and n != 1:
            raise InvalidParameter("contrastive search is deterministic: n must be 1", "n")


def _int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidParameter(f"{name} must be an integer >= {low}, got {value!r}", name)


def _number(name: str, value: object, low: float = -math.inf, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParameter(f"{name} must be a finite number, got {value!r}", name)
    if not low <= value <= high:
        raise InvalidParameter(f"{name} must be in [{low}, {high}], got {value!r}", name)


@dataclass
class Hypothesis:
    """A finished beam: its generated tokens (an ending EOS/stop token included) and transformers' score."""

    tokens: list[int]
    score: float  # sum of the (processed) token log-probabilities / generated_length ** length_penalty
    logprobs: list[TokenLogprob] | None = None


class ScoredSequence(Sequence):
    """A `Sequence` replayed from a search result; `score` is the hypothesis' score (None for contrastive)."""

    score: float | None = None


def run_search(model: GPT, tokenizer: Tokenizer, request: GenerationRequest, search: SearchParams | None,
               n: int = 1) -> Iterator[StepEvent]:
    """Validate `search` against the request (eagerly) and generate with the strategy it names.

    Without a strategy (num_beams=1, penalty_alpha=0) this is plain `quill.generate.run`.
    """
    search = search or SearchParams()
    search.validate(request.sampling, n)
    if search.strategy is None:
        return run(model, tokenizer, request, n)
    if request.constraint is not None:
        raise InvalidParameter(f"{request.constraint.param} (structured output) cannot be combined with beam or "
                               "contrastive search (num_beams > 1 or penalty_alpha > 0)", request.constraint.param)
    if request.max_flops is not None:
        raise InvalidParameter("max_flops budgets apply to sampled and greedy decoding, not to search strategies "
                               "(num_beams > 1 or penalty_alpha > 0)", "max_flops")
    if search.strategy == "contrastive":
        return _contrastive_events(model, tokenizer, request, search)
    return _beam_events(model, tokenizer, request, search, n)


class _Setup:
    """What every strategy derives from a request: ids that end a hypothesis, lengths, the penalty pipeline."""

    def __init__(self, model: GPT, tokenizer: Tokenizer | None, request: GenerationRequest):
        self.model, self.tokenizer, self.request = model, tokenizer, request
        cfg = model.config
        self.eos_ids = cfg.eos_token_ids
        sampling = request.sampling
        ends = list(dict.fromkeys(([] if sampling.ignore_eos else self.eos_ids) + list(request.stop_token_ids)))
        self.end_list = ends
        self.end_set = set(ends)
        self.end_ids = torch.tensor(ends, dtype=torch.long, device=model.device)
        self.prompt = list(request.prompt_ids)
        self.P = len(self.prompt)
        self.max_length = min(self.P + request.limit, cfg.n_positions)  # prompt + generated, at most
        # No warpers: temperature 0 gives the penalties-and-bans part of the pipeline only.
        greedy = dataclasses.replace(sampling, temperature=0.0, top_k=0)
        pipeline = LogitsPipeline.from_params(greedy, self.eos_ids, model.device, request.stop_token_ids)
        self.pipeline = None if pipeline.is_identity else pipeline
        self.stops = StopStrings(request.stop, request.include_stop) if request.stop else None
        if self.stops is not None and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.top_n = request.logprobs  # None: no logprobs
        self.flops = 0
        self.prompt_logprobs: list[TokenLogprob] | None = None

    def prefill(self, cache: KVCache, rows: int, hidden: list | None = None) -> Tensor:
        """Run the prompt into cache row 0, copy it to rows 1..rows-1; return the last position's logits [V].

        With `hidden` (a list), append the prompt's final hidden states [P, C] to it.
        """
        req = self.request
        idx = torch.tensor([self.prompt], device=self.model.device)
        if hidden is None:
            logits = self.model(idx, 0, cache.rows(slice(0, 1)), last_only=not req.echo)[0].float()
        else:
            logits, states = self.model(idx, 0, cache.rows(slice(0, 1)), last_only=not req.echo, return_hidden=True)
            logits = logits[0].float()
            hidden.append(states[0])
        if rows > 1:
            cache.copy_rows(slice(1, rows), slice(0, 1))
        if req.echo:
            self.prompt_logprobs = prompt_logprobs(logits, self.prompt, req.logprobs or 0)
        self.flops += forward_flops(self.model.config, self.P, 0, self.P if req.echo else 1)
        return logits[-1]

    def stop_hit(self, generated: list[int]) -> bool:
        """Whether the text of these generated tokens contains a stop string."""
        return self.stops.truncate(self.tokenizer.decode(generated))[1]

    def stop_hits(self, seqs: Tensor, length: int) -> Tensor:
        """Bool [rows]: whose generated text (tokens P..length-1 of `seqs`) contains a stop string."""
        hits = [self.stop_hit(row) for row in seqs[:, self.P:length].tolist()]
        return torch.tensor(hits, dtype=torch.bool, device=seqs.device)

    def ends(self, tokens: Tensor) -> Tensor:
        return torch.isin(tokens, self.end_ids) if self.end_list else torch.zeros_like(tokens, dtype=torch.bool)


class _Logprobs:
    """Per-row chosen-token logprobs and top-N alternatives, [rows, steps(, N)], reordered with the rows."""

    def __init__(self, rows: int, steps: int, n: int, device: torch.device):
        self.n = n
        self.chosen = torch.zeros(rows, steps, device=device)
        self.top_ids = torch.zeros(rows, steps, n, dtype=torch.long, device=device)
        self.top_vals = torch.zeros(rows, steps, n, device=device)

    def take(self, index: Tensor) -> _Logprobs:
        out = _Logprobs.__new__(_Logprobs)
        out.n, out.chosen = self.n, self.chosen[index]
        out.top_ids, out.top_vals = self.top_ids[index], self.top_vals[index]
        return out

    def cat(self, other: _Logprobs) -> _Logprobs:
        out = _Logprobs.__new__(_Logprobs)
        out.n = self.n
        out.chosen = torch.cat([self.chosen, other.chosen])
        out.top_ids = torch.cat([self.top_ids, other.top_ids])
        out.top_vals = torch.cat([self.top_vals, other.top_vals])
        return out

    def top(self, logp: Tensor) -> tuple[Tensor, Tensor] | None:
        """The top-N alternatives of every row of the raw log-probabilities logp [rows, V] (None when N = 0)."""
        if not self.n:
            return None
        top = logp.topk(self.n, dim=-1)
        return top.indices, top.values

    def record(self, step: int, logp: Tensor, rows: Tensor, tokens: Tensor, top: tuple[Tensor, Tensor] | None) -> None:
        """Row i chose tokens[i] from logp[rows[i]] (with alternatives top[.][rows[i]]) at generated step `step`."""
        self.chosen[:, step] = logp[rows, tokens]
        if top is not None:
            self.top_ids[:, step] = top[0][rows]
            self.top_vals[:, step] = top[1][rows]

    def row(self, i: int, tokens: list[int]) -> list[TokenLogprob]:
        chosen = self.chosen[i, :len(tokens)].tolist()
        ids, vals = self.top_ids[i, :len(tokens)].tolist(), self.top_vals[i, :len(tokens)].tolist()
        return [TokenLogprob(t, c, list(zip(ids[j], vals[j]))) for j, (t, c) in enumerate(zip(tokens, chosen))]


@torch.inference_mode()
def beam_search(model: GPT, request: GenerationRequest, params: SearchParams, n: int = 1,
                tokenizer: Tokenizer | None = None) -> tuple[list[Hypothesis], _Setup]:
    """The `n` best hypotheses of (diverse) beam search, best first, and the run's bookkeeping."""
    setup = _Setup(model, tokenizer, request)
    if request.max_tokens == 0 or setup.max_length <= setup.P:
        return [Hypothesis([], 0.0, [] if setup.top_n is not None else None) for _ in range(n)], setup
    if params.num_beam_groups > 1:
        return _group_beam_search(setup, params, n), setup
    return _beam_search(setup, params, n), setup


def _beam_search(s: _Setup, params: SearchParams, n: int) -> list[Hypothesis]:
    """transformers 5 `_beam_search` for one prompt: top-K continuations, running beams, finished beams."""
    model, P, max_length = s.model, s.P, s.max_length
    device = model.device
    B, lp_pen, early = params.num_beams, params.length_penalty, params.early_stopping
    K = max(2, 1 + len(s.end_list)) * B
    cache = model.new_cache(B, max_length)
    logits = s.prefill(cache, B).expand(B, -1)
    V = logits.shape[-1]
    K = min(K, B * V)
    top_mask = torch.arange(K, device=device) < B

    running = torch.zeros(B, max_length, dtype=torch.long, device=device)
    running[:, :P] = torch.tensor(s.prompt, device=device)
    running_scores = torch.full((B,), _NEG, device=device)
    running_scores[0] = 0.0
    done_seqs, done_scores = running.clone(), torch.full((B,), _NEG, device=device)
    done_flags = torch.zeros(B, dtype=torch.bool, device=device)
    done_lens = torch.full((B,), P, dtype=torch.long, device=device)
    steps = max_length - P
    lps = _Logprobs(B, steps, s.top_n, device) if s.top_n is not None else None
    done_lps = lps.take(torch.arange(B, device=device)) if lps is not None else None
    unsatisfied = True  # transformers' is_early_stop_heuristic_unsatisfied
    cur = P
    rows = torch.arange(B, device=device)
    while True:
        logp = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
        processed = s.pipeline(logp, running[:, :cur], P) if s.pipeline is not None else logp
        acc = (processed + running_scores[:, None]).reshape(-1)
        topk_lp, topk_idx = torch.topk(acc, K)
        src = topk_idx // V
        tok = topk_idx % V
        cand = running[src]
        cand[:, cur] = tok
        hits = s.ends(tok) | (cur + 1 >= max_length)
        if s.stops is not None:
            hits |= s.stop_hits(cand, cur + 1)
        cand_lps = None
        if lps is not None:
            cand_lps = lps.take(src)
            cand_lps.record(cur - P, logp, src, tok, lps.top(logp))
        # e. the best num_beams unfinished continuations run on
        masked = topk_lp + hits.to(torch.float32) * _NEG
        keep = torch.topk(masked, B).indices
        running, running_scores, beam_src = cand[keep], masked[keep], src[keep]
        if lps is not None:
            lps = cand_lps.take(keep)
        # f. finished continuations among the top num_beams replace worse finished ones
        just = hits & top_mask
        fin = topk_lp / ((cur + 1 - P) ** lp_pen)
        fin = fin + float(bool(done_flags.all()) and early is True) * _NEG
        fin = fin + float(not unsatisfied) * _NEG
        fin = fin + (~just) * _NEG
        merged = torch.cat((done_scores, fin))
        best = torch.topk(merged, B).indices
        done_seqs = torch.cat((done_seqs, cand))[best]
        done_scores = merged[best]
        done_flags = torch.cat((done_flags, just))[best]
        done_lens = torch.cat((done_lens, torch.full((K,), cur + 1, dtype=torch.long, device=device)))[best]
        if lps is not None:
            done_lps = done_lps.cat(cand_lps).take(best)
        cur += 1
        # g. can the running beams still beat the worst finished one?
        if early == "never" and lp_pen > 0.0:
            best_len = max_length - P
        else:
            best_len = cur - P
        best_running = running_scores[:1] / (best_len ** lp_pen)
        worst_done = torch.where(done_flags, done_scores.min(), _NEG)
        unsatisfied = unsatisfied and bool((best_running > worst_done).any())
        open_beam = not (bool(done_flags.all()) and early is True)
        if not (unsatisfied and open_beam and not bool(hits.all())):
            break
        if not torch.equal(beam_src, rows):
            cache.copy_rows(rows, beam_src)
        logits = model(running[:, cur - 1:cur], cur - 1, cache)[:, -1]
        s.flops += B * forward_flops(model.config, 1, cur - 1, 1)
    out = []
    for i in range(min(n, B)):
        length = int(done_lens[i])
        tokens = done_seqs[i, P:length].tolist()
        out.append(Hypothesis(tokens, float(done_scores[i]), done_lps.row(i, tokens) if done_lps is not None else None))
    return out


class _BeamHypotheses:
    """transformers 4's `BeamHypotheses`: the n best finished hypotheses of one group, scores in Python floats."""

    def __init__(self, size: int, length_penalty: float, early_stopping: bool | str, max_length: int):
        self.size, self.length_penalty, self.early_stopping, self.max_length = (size, length_penalty,
                                                                                 early_stopping, max_length)
        self.beams: list[tuple[float, list[int], list[TokenLogprob] | None]] = []
        self.worst_score = 1e9

    def add(self, tokens: list[int], sum_logprobs: float, generated_len: int,
            logprobs: list[TokenLogprob] | None) -> None:
        score = sum_logprobs / (generated_len ** self.length_penalty)
        if len(self.beams) < self.size or score > self.worst_score:
            self.beams.append((score, tokens, logprobs))
            if len(self.beams) > self.size:
                ranked = sorted((s, i) for i, (s, _, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int, prompt_len: int) -> bool:
        if len(self.beams) < self.size:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best = best_sum_logprobs / (self.max_length - prompt_len) ** self.length_penalty
        else:
            best = best_sum_logprobs / (cur_len - prompt_len) ** self.length_penalty
        return self.worst_score >= best


def _group_beam_search(s: _Setup, params: SearchParams, n: int) -> list[Hypothesis]:
    """transformers 4 `_group_beam_search`: groups decode in turn, each penalised (Hamming diversity) for the
    tokens the earlier groups chose at this step; one forward serves all groups."""
    model, P, max_length = s.model, s.P, s.max_length
    device = model.device
    B, G = params.num_beams, params.num_beam_groups
    S = B // G
    cache = model.new_cache(B, max_length)
    logits = s.prefill(cache, B).expand(B, -1)
    V = logits.shape[-1]
    K = min(max(2, 1 + len(s.end_list)) * S, S * V)
    pad = s.end_list[0] if s.end_list else 0
    seqs = torch.zeros(B, max_length, dtype=torch.long, device=device)
    seqs[:, :P] = torch.tensor(s.prompt, device=device)
    beam_scores = torch.full((B,), _NEG, device=device)
    beam_scores[::S] = 0.0
    steps = max_length - P
    lps = _Logprobs(B, steps, s.top_n, device) if s.top_n is not None else None
    hyps = [_BeamHypotheses(S, params.length_penalty, params.early_stopping, max_length) for _ in range(G)]
    done = [False] * G
    cur = P
    while True:
        current = torch.zeros(B, dtype=torch.long, device=device)
        reorder = torch.zeros(B, dtype=torch.long, device=device)
        logp_all = torch.log_softmax(logits.float(), dim=-1)
        top = lps.top(logp_all) if lps is not None else None
        new_seqs = seqs.clone()
        new_lps = lps.take(torch.arange(B, device=device)) if lps is not None else None
        for g in range(G):
            lo = g * S
            group = slice(lo, lo + S)
            scores = logp_all[group]
            if s.pipeline is not None:
                scores = s.pipeline(scores, seqs[group, :cur], P)
            if g > 0:
                scores = scores - params.diversity_penalty * torch.bincount(current[:lo], minlength=V).to(scores)
            flat = (scores + beam_scores[group, None]).reshape(-1)
            top_s, top_i = torch.topk(flat, K)
            idx, tok = top_i // V, top_i % V
            if done[g]:
                new_scores = torch.zeros(S, device=device)
                new_tok = torch.full((S,), pad, dtype=torch.long, device=device)
                new_idx = torch.zeros(S, dtype=torch.long, device=device)
            else:
                score_l, tok_l, idx_l = top_s.tolist(), tok.tolist(), idx.tolist()
                keep: list[int] = []  # ranks of the candidates that run on
                rank = 0
                while len(keep) < S:
                    if rank == len(score_l):  # stop strings ended every candidate so far: look further down
                        if rank == flat.numel():
                            raise RuntimeError("every continuation ends the sequence")
                        top_s, top_i = torch.topk(flat, min(flat.numel(), 2 * rank))
                        idx, tok = top_i // V, top_i % V
                        score_l, tok_l, idx_l = top_s.tolist(), tok.tolist(), idx.tolist()
                    row, token = lo + idx_l[rank], tok_l[rank]
                    tokens = seqs[row, P:cur].tolist() + [token]
                    if token in s.end_set or (s.stops is not None and s.stop_hit(tokens)):
                        if rank < S:  # only the top group_size candidates may finish
                            lp = None
                            if lps is not None:
                                one = lps.take(torch.tensor([row], device=device))
                                one.record(cur - P, logp_all, torch.tensor([row], device=device),
                                           torch.tensor([token], device=device), top)
                                lp = one.row(0, tokens)
                            hyps[g].add(tokens, score_l[rank], cur + 1 - P, lp)
                    else:
                        keep.append(rank)
                    rank += 1
                keep_t = torch.tensor(keep, device=device)
                new_scores, new_tok, new_idx = top_s[keep_t], tok[keep_t], idx[keep_t]
                done[g] = done[g] or hyps[g].is_done(score_l[0], cur + 1, P)
            beam_scores[group] = new_scores
            src = lo + new_idx
            new_seqs[group] = seqs[src]
            new_seqs[group, cur] = new_tok
            if lps is not None:
                taken = lps.take(src)
                taken.record(cur - P, logp_all, src, new_tok, top)
                new_lps.chosen[group], new_lps.top_ids[group], new_lps.top_vals[group] = (
                    taken.chosen, taken.top_ids, taken.top_vals)
            current[group] = new_tok
            reorder[group] = src
        seqs, lps = new_seqs, new_lps
        if not torch.equal(reorder, torch.arange(B, device=device)):
            cache.copy_rows(torch.arange(B, device=device), reorder)
        cur += 1
        if all(done) or cur >= max_length:
            break
        logits = model(seqs[:, cur - 1:cur], cur - 1, cache)[:, -1]
        s.flops += B * forward_flops(model.config, 1, cur - 1, 1)
    # finalize: unfinished groups add their running beams
    scores_l = beam_scores.tolist()
    for g in range(G):
        if done[g]:
            continue
        for row in range(g * S, (g + 1) * S):
            tokens = seqs[row, P:cur].tolist()
            hyps[g].add(tokens, scores_l[row], cur - P, lps.row(row, tokens) if lps is not None else None)
    ranked = sorted((b for h in hyps for b in h.beams), key=lambda b: b[0])
    out = []
    for _ in range(min(n, len(ranked))):
        score, tokens, lp = ranked.pop()
        out.append(Hypothesis(tokens, float(torch.tensor(score, dtype=torch.float32)), lp))
    return out


def _beam_events(model: GPT, tokenizer: Tokenizer, request: GenerationRequest, params: SearchParams,
                 n: int) -> Iterator[StepEvent]:
    """Run the search, then replay the n best hypotheses through `Sequence`s (detokenising, stop strings)."""
    t0 = time.perf_counter()
    hyps, setup = beam_search(model, request, params, n, tokenizer)
    seconds = time.perf_counter() - t0
    for i, hyp in enumerate(hyps):
        seq = ScoredSequence(request, tokenizer, model.config.n_positions, setup.eos_ids, None, index=i)
        seq.score = hyp.score if hyp.tokens else None
        seq.prompt_logprobs = setup.prompt_logprobs or []
        if i == 0:
            seq.usage.flops, seq.usage.seconds = setup.flops, seconds
        yield from _replay(seq, hyp.tokens, hyp.logprobs)


def _replay(seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob] | None) -> Iterator[StepEvent]:
    if not tokens:
        seq.finish_reason = "length"
        yield StepEvent(seq, -1, "", None, True)
        return
    for j, token in enumerate(tokens):
        lp = logprobs[j] if logprobs is not None else None
        text = seq.accept(token, lp)
        yield StepEvent(seq, token, text, lp, seq.finished)
        if seq.finished:
            return
    # A hypothesis ends with an EOS/stop token or at max length, which `accept` sees; anything else is length.
    seq.finish_reason = "length"
    yield StepEvent(seq, -1, seq._drain(), None, True)


@torch.inference_mode()
def _contrastive_events(model: GPT, tokenizer: Tokenizer, request: GenerationRequest,
                        params: SearchParams) -> Iterator[StepEvent]:
    """Contrastive search: among the top_k tokens, pick the one maximising
    (1 - alpha) * p(token) - alpha * max cosine similarity of its hidden state to every earlier one."""
    s = _Setup(model, tokenizer, request)
    seq = ScoredSequence(request, tokenizer, model.config.n_positions, s.eos_ids, None, index=0)
    resumed = time.perf_counter()
    k, alpha = request.sampling.top_k, params.penalty_alpha
    device = model.device
    if request.max_tokens == 0 or s.max_length <= s.P:
        s.prefill(model.new_cache(1, s.P), 1)
        seq.prompt_logprobs = s.prompt_logprobs or []
        seq.usage.flops, seq.usage.seconds = s.flops, time.perf_counter() - resumed
        yield from _replay(seq, [], None)
        return
    cache = model.new_cache(k, s.max_length)
    prompt_hidden: list[Tensor] = []
    logits = s.prefill(cache, k, prompt_hidden)  # [V]
    context = prompt_hidden[0].float()  # [P, C]
    context = context / context.norm(dim=-1, keepdim=True)
    seq.prompt_logprobs = s.prompt_logprobs or []
    history = torch.zeros(1, s.max_length, dtype=torch.long, device=device)
    history[0, :s.P] = torch.tensor(s.prompt, device=device)
    rows = torch.arange(k, device=device)
    pos = s.P
    while True:
        processed = logits[None]
        if s.pipeline is not None:
            processed = s.pipeline(processed, history[:, :pos], s.P)
        probs = torch.softmax(processed, dim=-1)[0]
        top_probs, top_ids = torch.topk(probs, k)
        cand_logits, cand_hidden = model(top_ids[:, None], pos, cache, return_hidden=True)
        cand_logits, cand_hidden = cand_logits[:, -1].float(), cand_hidden[:, -1].float()  # [k, V], [k, C]
        s.flops += k * forward_flops(model.config, 1, pos, 1)
        cand_hidden = cand_hidden / cand_hidden.norm(dim=-1, keepdim=True)
        degeneration = (context @ cand_hidden.T).max(dim=0).values  # [k]
        choice = int(torch.argmax((1.0 - alpha) * top_probs - alpha * degeneration))
        token = int(top_ids[choice])
        lp = None
        if s.top_n is not None:
            logp = torch.log_softmax(logits, dim=-1)
            top = logp.topk(s.top_n)
            lp = TokenLogprob(token, float(logp[token]), list(zip(top.indices.tolist(), top.values.tolist())))
        text = seq.accept(token, lp)
        seq.usage.flops = s.flops
        seq.usage.seconds += time.perf_counter() - resumed
        yield StepEvent(seq, token, text, lp, seq.finished)
        resumed = time.perf_counter()
        if seq.finished:
            return
        history[0, pos] = token
        context = torch.cat([context, cand_hidden[choice:choice + 1]])
        logits = cand_logits[choice]
        # every row continues from the chosen candidate: give them its keys and values
        cache.copy_rows(rows, torch.full_like(rows, choice))
        pos += 1
