"""quill.search: beam search against transformers' `generate`; diverse beam search and contrastive search
(which transformers 5 no longer ships: they moved to Hub "custom generate" code) against the straightforward,
unoptimised, no-KV-cache reference implementations below; and the invalid combinations."""

from __future__ import annotations

import math
import shutil
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import quill
from quill.errors import InvalidParameter
from quill.tokenizer import Tokenizer

V = 101
PROMPT = [5, 9, 2, 33]
NEW = 12


def _save_char_tokenizer(folder, vocab: int) -> None:
    tmp = folder / "_tok"
    Tokenizer.characters("".join(chr(0x100 + i) for i in range(vocab))).save(tmp)
    shutil.copy(tmp / "tokenizer.json", folder)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small GPT-2 with peaked (large-init) distributions, whose EOS is a token beams often choose."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=48, n_head=3, n_layer=2, n_positions=64, vocab_size=V, initializer_range=0.5,
                     bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                          num_beams=4, num_return_sequences=4, do_sample=False, max_new_tokens=8,
                          eos_token_id=None, pad_token_id=0)
    common = [t for t, _ in Counter(out[:, len(PROMPT) + 1:len(PROMPT) + 6].flatten().tolist()).most_common(3)]
    eos, other = common[0], common[1]
    hf.config.eos_token_id = hf.generation_config.eos_token_id = eos
    folder = tmp_path_factory.mktemp("search") / "model"
    hf.save_pretrained(folder)
    _save_char_tokenizer(folder, V)
    return SimpleNamespace(hf=hf, engine=quill.load(folder), eos=eos, other=other, folder=folder)


def hf_beam(hf, ends, **kw):
    with torch.no_grad():
        return hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                           do_sample=False, max_new_tokens=NEW, eos_token_id=ends, pad_token_id=ends[0],
                           output_scores=True, return_dict_in_generate=True, **kw)


def padded(tokens: list[int], length: int, pad: int) -> list[int]:
    return (tokens + [pad] * length)[:length]


# ---- beam search against transformers --------------------------------------------------------------------

BEAM_CASES = [  # num_beams, n, length_penalty, early_stopping
    (4, 4, 1.0, False), (4, 2, 1.0, True), (3, 3, 0.5, "never"), (5, 5, -0.5, False), (4, 4, 2.0, "never"),
    (2, 1, 0.0, True),
]


@pytest.mark.parametrize("beams,n,length_penalty,early_stopping", BEAM_CASES)
@pytest.mark.parametrize("extra_stop", [False, True])
def test_beam_search_equals_transformers(tiny, beams, n, length_penalty, early_stopping, extra_stop):
    stop_ids = [tiny.other] if extra_stop else []
    ends = [tiny.eos] + stop_ids
    ref = hf_beam(tiny.hf, ends, num_beams=beams, num_return_sequences=n, length_penalty=length_penalty,
                  early_stopping=early_stopping)
    out = tiny.engine.generate(PROMPT, NEW, n=n, num_beams=beams, length_penalty=length_penalty,
                               early_stopping=early_stopping, stop_token_ids=stop_ids)
    expected = [row[len(PROMPT):].tolist() for row in ref.sequences]
    length = len(expected[0])
    assert [padded(c.tokens, length, ends[0]) for c in out.choices] == expected
    torch.testing.assert_close(torch.tensor([c.score for c in out.choices]), ref.sequences_scores,
                               rtol=1e-5, atol=1e-5)
    for c in out.choices:
        assert c.finish_reason == ("stop" if c.tokens[-1] in ends else "length")
        assert c.text == tiny.engine.tokenizer.decode([t for t in c.tokens if t not in ends])


def test_beam_search_with_penalties_equals_transformers(tiny):
    ends = [tiny.eos]
    ref = hf_beam(tiny.hf, ends, num_beams=3, num_return_sequences=3, repetition_penalty=1.3,
                  no_repeat_ngram_size=2, min_new_tokens=4)
    out = tiny.engine.generate(PROMPT, NEW, n=3, num_beams=3, repetition_penalty=1.3, no_repeat_ngram_size=2,
                               min_tokens=4)
    expected = [row[len(PROMPT):].tolist() for row in ref.sequences]
    assert [padded(c.tokens, len(expected[0]), ends[0]) for c in out.choices] == expected
    torch.testing.assert_close(torch.tensor([c.score for c in out.choices]), ref.sequences_scores,
                               rtol=1e-5, atol=1e-5)
    assert all(len(c.tokens) >= 4 for c in out.choices)


def test_beam_logprobs_echo_stream_and_zero_tokens(tiny):
    eng = tiny.engine
    out = eng.generate(PROMPT, NEW, n=3, num_beams=3, logprobs=3, echo=True)
    greedy = eng.generate(PROMPT, 0, echo=True, logprobs=3)
    assert [(t.token, t.logprob) for t in out.choices[0].prompt_logprobs] == \
           [(t.token, t.logprob) for t in greedy.choices[0].prompt_logprobs]
    for c in out.choices:
        with torch.no_grad():
            logp = tiny.hf(torch.tensor([PROMPT + c.tokens])).logits[0, len(PROMPT) - 1:-1].log_softmax(-1)
        assert [t.token for t in c.logprobs] == c.tokens
        chosen = torch.tensor([t.logprob for t in c.logprobs])
        torch.testing.assert_close(chosen, logp[torch.arange(len(c.tokens)), c.tokens], rtol=0, atol=1e-5)
        for j, t in enumerate(c.logprobs):
            top = logp[j].topk(3)
            assert [i for i, _ in t.top] == top.indices.tolist()
        # no processors: the score is the summed log-probability over length ** length_penalty (1.0)
        assert c.score == pytest.approx(float(chosen.sum()) / len(c.tokens), abs=1e-4)
    assert "".join(eng.stream(PROMPT, NEW, num_beams=3)) == out.text
    empty = eng.generate(PROMPT, 0, n=2, num_beams=3)
    assert [(c.tokens, c.finish_reason) for c in empty.choices] == [([], "length"), ([], "length")]
    assert out.usage.flops > greedy.usage.flops


def test_beam_search_stop_strings(tiny):
    eng = tiny.engine
    free = eng.generate(PROMPT, NEW, n=4, num_beams=4, ignore_eos=True)
    stop = eng.tokenizer.decode(free.choices[0].tokens[2:4])  # two tokens: a stop spanning tokens
    out = eng.generate(PROMPT, NEW, n=4, num_beams=4, ignore_eos=True, stop=[stop])
    assert "stop" in {c.finish_reason for c in out.choices}
    for c in out.choices:
        full = eng.tokenizer.decode(c.tokens)
        assert stop not in c.text
        if c.finish_reason == "stop":
            assert full.endswith(stop) and c.text == full[: len(full) - len(stop)]
        else:
            assert stop not in full and len(c.tokens) == NEW
    with_stop = eng.generate(PROMPT, NEW, n=4, num_beams=4, ignore_eos=True, stop=[stop], include_stop=True)
    for c, kept in zip(out.choices, with_stop.choices):
        assert kept.text == c.text + (stop if c.finish_reason == "stop" else "")


# ---- diverse beam search against a reference ---------------------------------------------------------------


def reference_group_beam_search(hf, prompt, ends, max_new, num_beams, groups, diversity_penalty,
                                length_penalty, early_stopping):
    """Diverse beam search (Vijayakumar et al. 2016) as transformers 4 defined it, recomputing every beam's
    full forward each step. Groups extend in turn; a group's candidates lose diversity_penalty for every
    beam of an earlier group that picked the same token this step. Each group keeps its own best-`size`
    finished hypotheses, scored sum_logprobs / generated_len ** length_penalty."""
    size = num_beams // groups
    P, max_len = len(prompt), len(prompt) + max_new
    beams = [[list(prompt), 0.0 if i % size == 0 else -1e9] for i in range(num_beams)]
    finished = [[] for _ in range(groups)]  # (score, tokens), best first, at most `size`
    done = [False] * groups
    pad = ends[0]

    def add(g, tokens, sum_logprobs, generated_len):
        score = sum_logprobs / generated_len ** length_penalty
        if len(finished[g]) == size and score <= finished[g][-1][0]:
            return
        finished[g].append((score, tokens))
        finished[g].sort(key=lambda h: -h[0])
        del finished[g][size:]

    def is_done(g, best_sum, cur_len):
        if len(finished[g]) < size:
            return False
        if early_stopping is True:
            return True
        length = max_len - P if (early_stopping == "never" and length_penalty > 0) else cur_len - P
        return finished[g][-1][0] >= best_sum / length ** length_penalty

    length = P
    while True:
        with torch.no_grad():
            logp = hf(torch.tensor([b[0] for b in beams])).logits[:, -1].float().log_softmax(-1)
        chosen_now: list[int] = []
        new_beams = []
        for g in range(groups):
            rows = range(g * size, (g + 1) * size)
            if done[g]:
                new_beams += [[beams[g * size][0] + [pad], 0.0] for _ in rows]
                chosen_now += [pad] * size
                continue
            penalty = torch.bincount(torch.tensor(chosen_now, dtype=torch.long), minlength=V).float()
            scores = torch.stack([logp[r] - diversity_penalty * penalty + beams[r][1] for r in rows]).flatten()
            ranked_scores, ranked = scores.sort(descending=True, stable=True)
            kept = []
            for rank, (score, flat) in enumerate(zip(ranked_scores.tolist(), ranked.tolist())):
                beam, token = rows[flat // V], flat % V
                if token in ends:
                    if rank < size:
                        add(g, beams[beam][0][P:] + [token], score, length + 1 - P)
                else:
                    kept.append([beams[beam][0] + [token], score])
                if len(kept) == size:
                    break
            done[g] = is_done(g, ranked_scores[0].item(), length + 1)
            new_beams += kept
            chosen_now += [b[0][-1] for b in kept]
        beams = new_beams
        length += 1
        if all(done) or length >= max_len:
            break
    for g in range(groups):
        if not done[g]:
            for beam in beams[g * size:(g + 1) * size]:
                add(g, beam[0][P:], beam[1], length - P)
    return sorted((h for f in finished for h in f), key=lambda h: -h[0])


GROUP_CASES = [  # num_beams, groups, diversity_penalty, length_penalty, early_stopping
    (4, 2, 0.5, 1.0, False), (6, 3, 1.0, 1.0, True), (6, 2, 2.0, 0.5, "never"), (4, 4, 0.3, -0.5, False),
]


@pytest.mark.parametrize("beams,groups,diversity,length_penalty,early_stopping", GROUP_CASES)
@pytest.mark.parametrize("extra_stop", [False, True])
def test_diverse_beam_search_equals_reference(tiny, beams, groups, diversity, length_penalty, early_stopping,
                                              extra_stop):
    stop_ids = [tiny.other] if extra_stop else []
    ends = [tiny.eos] + stop_ids
    ref = reference_group_beam_search(tiny.hf, PROMPT, ends, NEW, beams, groups, diversity, length_penalty,
                                      early_stopping)
    out = tiny.engine.generate(PROMPT, NEW, n=beams, num_beams=beams, num_beam_groups=groups,
                               diversity_penalty=diversity, length_penalty=length_penalty,
                               early_stopping=early_stopping, stop_token_ids=stop_ids)
    assert [c.tokens for c in out.choices] == [tokens for _, tokens in ref[:beams]]
    for c, (score, _) in zip(out.choices, ref):
        assert c.score == pytest.approx(score, rel=1e-5, abs=1e-5)


def test_diverse_beam_and_contrastive_logprobs_and_echo(tiny):
    eng = tiny.engine
    echo = eng.generate(PROMPT, 0, echo=True, logprobs=2).choices[0].prompt_logprobs
    outs = [eng.generate(PROMPT, NEW, n=4, num_beams=4, num_beam_groups=2, diversity_penalty=0.5, logprobs=2,
                         echo=True, stop_token_ids=[tiny.other]),
            eng.generate(PROMPT, NEW, penalty_alpha=0.6, top_k=4, logprobs=2, echo=True)]
    assert any(c.tokens[-1] in (tiny.eos, tiny.other) for c in outs[0].choices)  # hypotheses that ended, too
    for out in outs:
        for c in out.choices:
            assert [(t.token, t.logprob, t.top) for t in c.prompt_logprobs] == \
                   [(t.token, t.logprob, t.top) for t in echo]
            with torch.no_grad():
                logp = tiny.hf(torch.tensor([PROMPT + c.tokens])).logits[0, len(PROMPT) - 1:-1].log_softmax(-1)
            assert [t.token for t in c.logprobs] == c.tokens
            torch.testing.assert_close(torch.tensor([t.logprob for t in c.logprobs]),
                                       logp[torch.arange(len(c.tokens)), c.tokens], rtol=0, atol=1e-5)
            assert [[i for i, _ in t.top] for t in c.logprobs] == logp.topk(2).indices.tolist()


def test_diverse_beams_differ_more_than_plain_beams(tiny):
    eng = tiny.engine
    plain = eng.generate(PROMPT, NEW, n=4, num_beams=4, ignore_eos=True)
    diverse = eng.generate(PROMPT, NEW, n=4, num_beams=4, num_beam_groups=4, diversity_penalty=5.0,
                           ignore_eos=True)
    first = lambda out: {c.tokens[0] for c in out.choices}  # noqa: E731
    assert len(first(diverse)) == 4 > len(first(plain))


# ---- contrastive search against a reference --------------------------------------------------------------


def reference_contrastive_search(hf, prompt, ends, max_new, alpha, k, processor=None):
    """Contrastive search (Su et al. 2022) by full recomputation: among the k most likely next tokens pick
    argmax (1 - alpha) * p(v) - alpha * max_j cos(h_v, h_j) over the final hidden states h_j of every token
    so far, where h_v is the hidden state the candidate v would have."""
    ids = list(prompt)
    for _ in range(max_new):
        with torch.no_grad():
            out = hf(torch.tensor([ids]), output_hidden_states=True)
            logits = out.logits[0, -1].float()
            if processor is not None:
                logits = processor(torch.tensor([ids]), logits[None])[0]
            probs, cands = logits.softmax(-1).topk(k)
            context = out.hidden_states[-1][0]  # [t, C]
            cand = hf(torch.tensor([ids + [c] for c in cands.tolist()]), output_hidden_states=True)
            hidden = cand.hidden_states[-1][:, -1]  # [k, C]
        similarity = F.cosine_similarity(hidden[:, None], context[None], dim=-1).max(-1).values  # [k]
        token = cands[int(((1 - alpha) * probs - alpha * similarity).argmax())].item()
        ids.append(token)
        if token in ends:
            break
    return ids[len(prompt):]


@pytest.mark.parametrize("alpha,k,ignore_eos", [(0.6, 4, False), (0.6, 4, True), (0.3, 2, True), (0.9, 8, True),
                                                (1.0, 3, False), (0.5, 1, True)])
def test_contrastive_search_equals_reference(tiny, alpha, k, ignore_eos):
    from transformers.generation.logits_process import SuppressTokensLogitsProcessor

    if ignore_eos:
        ref = reference_contrastive_search(tiny.hf, PROMPT, [], 20, alpha, k,
                                           SuppressTokensLogitsProcessor([tiny.eos]))
    else:
        ref = reference_contrastive_search(tiny.hf, PROMPT, [tiny.eos], 20, alpha, k)
    out = tiny.engine.generate(PROMPT, 20, penalty_alpha=alpha, top_k=k, ignore_eos=ignore_eos)
    assert out.tokens == ref
    assert out.finish_reason == ("stop" if ref[-1] == tiny.eos and not ignore_eos else "length")
    greedy = tiny.engine.generate(PROMPT, 20, temperature=0, ignore_eos=ignore_eos).tokens
    assert (out.tokens == greedy) == (k == 1)  # the degeneration penalty changes the choice; with 1 candidate not


def test_contrastive_search_with_penalty_streams(tiny):
    from transformers.generation.logits_process import (LogitsProcessorList, NoRepeatNGramLogitsProcessor,
                                                        SuppressTokensLogitsProcessor)

    processors = LogitsProcessorList([NoRepeatNGramLogitsProcessor(2), SuppressTokensLogitsProcessor([tiny.eos])])
    ref = reference_contrastive_search(tiny.hf, PROMPT, [], 24, 0.6, 4, processors)
    eng = tiny.engine
    out = eng.generate(PROMPT, 24, penalty_alpha=0.6, top_k=4, no_repeat_ngram_size=2, ignore_eos=True,
                       logprobs=2)
    assert out.tokens == ref
    with torch.no_grad():
        logp = tiny.hf(torch.tensor([PROMPT + ref])).logits[0, len(PROMPT) - 1:-1].log_softmax(-1)
    torch.testing.assert_close(torch.tensor([t.logprob for t in out.logprobs]),
                               logp[torch.arange(len(ref)), ref], rtol=0, atol=1e-5)
    pieces = list(eng.stream(PROMPT, 24, penalty_alpha=0.6, top_k=4, no_repeat_ngram_size=2, ignore_eos=True))
    assert len(pieces) > 1 and "".join(pieces) == out.text
    stop = eng.tokenizer.decode(ref[5:8])
    stopped = eng.generate(PROMPT, 24, penalty_alpha=0.6, top_k=4, no_repeat_ngram_size=2, ignore_eos=True,
                           stop=stop)
    full = eng.tokenizer.decode(ref)
    assert stopped.finish_reason == "stop" and stopped.text == full[: full.index(stop)]
    assert "".join(eng.stream(PROMPT, 24, penalty_alpha=0.6, top_k=4, no_repeat_ngram_size=2, ignore_eos=True,
                              stop=stop)) == stopped.text


# ---- invalid settings ------------------------------------------------------------------------------------

INVALID = [
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2.5), "num_beams"),
    (dict(num_beams=4, num_beam_groups=3, diversity_penalty=1.0), "num_beam_groups"),
    (dict(num_beams=2, num_beam_groups=0), "num_beam_groups"),
    (dict(num_beams=4, num_beam_groups=2), "diversity_penalty"),
    (dict(num_beams=4, diversity_penalty=1.0), "diversity_penalty"),
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=-1.0), "diversity_penalty"),
    (dict(length_penalty=2.0), "length_penalty"),
    (dict(num_beams=2, length_penalty=math.nan), "length_penalty"),
    (dict(early_stopping=True), "early_stopping"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"),
    (dict(penalty_alpha=1.5, top_k=4), "penalty_alpha"),
    (dict(penalty_alpha=0.6, top_k=4, num_beams=2), "penalty_alpha"),
    (dict(penalty_alpha=0.6), "top_k"),
    (dict(num_beams=2, temperature=0.7), "temperature"),
    (dict(num_beams=2, top_p=0.9), "top_p"),
    (dict(num_beams=2, top_k=5), "top_k"),
    (dict(num_beams=2, min_p=0.1), "min_p"),
    (dict(penalty_alpha=0.6, top_k=4, typical_p=0.5), "typical_p"),
    (dict(num_beams=2, n=3), "n"),
    (dict(penalty_alpha=0.6, top_k=4, n=2), "n"),
    (dict(num_beams=2, max_flops=10**12), "max_flops"),
]


@pytest.mark.parametrize("kw,param", INVALID, ids=[p + str(i) for i, (_, p) in enumerate(INVALID)])
def test_invalid_search_settings_name_the_parameter(tiny, kw, param):
    kw = dict(kw)
    n = kw.pop("n", 1)
    with pytest.raises(InvalidParameter) as e:
        tiny.engine.generate(PROMPT, 4, n=n, **kw)
    assert e.value.param == param, str(e.value)
    with pytest.raises(InvalidParameter):  # refused before any token is generated, also when streaming
        tiny.engine.events(PROMPT, 4, n=n, **kw)


def test_neutral_search_settings_are_plain_decoding(tiny):
    eng = tiny.engine
    greedy = eng.generate(PROMPT, 8, temperature=0)
    assert eng.generate(PROMPT, 8, temperature=0, num_beams=1, penalty_alpha=0.0).tokens == greedy.tokens
    # beam search accepts the explicit neutral sampling values and ignores the seed
    a = eng.generate(PROMPT, 8, num_beams=2, temperature=1.0, top_p=1.0, seed=3)
    assert a.tokens == eng.generate(PROMPT, 8, num_beams=2, temperature=0).tokens


@pytest.mark.parametrize("flags,kw", [
    (["--num-beams", "3", "--length-penalty", "0.5", "--early-stopping", "true"],
     dict(num_beams=3, length_penalty=0.5, early_stopping=True)),
    (["--num-beams", "4", "--num-beam-groups", "2", "--diversity-penalty", "1.5", "--early-stopping", "never"],
     dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.5, early_stopping="never")),
    (["--penalty-alpha", "0.6", "--top-k", "4"], dict(penalty_alpha=0.6, top_k=4)),
])
def test_cli_search_flags_equal_the_library(tiny, capsys, flags, kw):
    import quill.cli

    text = "".join(chr(0x100 + t) for t in PROMPT)
    assert quill.cli.main(["generate", str(tiny.folder), text, "--max-tokens", "6", *flags]) == 0
    assert capsys.readouterr().out == tiny.engine.generate(text, 6, **kw).text + "\n"


def test_cli_search_flags_bad_combination_is_one_line_error(tiny, capsys):
    import quill.cli

    text = "".join(chr(0x100 + t) for t in PROMPT)
    flags = ["--max-tokens", "4", "--num-beams", "2", "--top-p", "0.5"]
    assert quill.cli.main(["generate", str(tiny.folder), text, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quill: error:") and "top_p" in err and "\n" not in err
