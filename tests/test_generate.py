"""The generation API as a whole, against transformers: echo and generated-token logprobs, seeded samples,
streaming, stop strings and stop token ids, min_tokens / ignore_eos, `quill eval` perplexity, invalid
parameters."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import quill
from quill.errors import InvalidParameter
from quill.stopping import StopStrings
from quill.tokenizer import Tokenizer

V = 101
N_POS = 64
PROMPT = [5, 9, 2, 33, 17, 4]
CHARS = "".join(chr(0x100 + i) for i in range(V))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small GPT-2 with peaked distributions whose EOS is the second token greedy decoding picks."""
    torch.manual_seed(1)
    cfg = GPT2Config(n_embd=48, n_head=3, n_layer=2, n_positions=N_POS, vocab_size=V, initializer_range=0.3,
                     bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        free = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                           do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    greedy = free[0, len(PROMPT):].tolist()
    eos = greedy[1]
    assert greedy[0] != eos
    hf.config.eos_token_id = hf.generation_config.eos_token_id = eos
    folder = tmp_path_factory.mktemp("generate") / "model"
    hf.save_pretrained(folder)
    Tokenizer.characters(CHARS).save(folder.parent / "tok")
    shutil.copy(folder.parent / "tok" / "tokenizer.json", folder)
    return SimpleNamespace(hf=hf, engine=quill.load(folder), eos=eos, folder=folder)


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position of `ids`: [len(ids), V]."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def assert_top(lp, row: torch.Tensor, n: int) -> None:
    """`lp.top` is the true top-n of the log-probabilities `row`."""
    top = row.topk(n)
    assert [i for i, _ in lp.top] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), top.values, rtol=0, atol=1e-5)


# ---- logprobs ---------------------------------------------------------------------------------------------

PROMPT_20 = [(7 * i + 3) % V for i in range(20)]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_equal_transformers(tiny, max_tokens):
    out = tiny.engine.generate(PROMPT_20, max_tokens=max_tokens, echo=True, logprobs=5, temperature=0)
    ref = hf_logprobs(tiny.hf, PROMPT_20)
    echoed = out.choices[0].prompt_logprobs
    assert [t.token for t in echoed] == PROMPT_20
    assert echoed[0].logprob is None
    for i in range(1, len(PROMPT_20)):
        assert echoed[i].logprob == pytest.approx(float(ref[i - 1, PROMPT_20[i]]), abs=1e-5)
        assert_top(echoed[i], ref[i - 1], 5)
    assert len(out.tokens) == max_tokens
    if max_tokens:
        assert out.logprobs[0].logprob == pytest.approx(float(ref[-1, out.tokens[0]]), abs=1e-5)
        assert out.tokens[0] == int(ref[-1].argmax())


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.8, top_k=10, seed=3),
                                      dict(temperature=1.3, top_p=0.9, repetition_penalty=1.2, seed=4)])
def test_generated_logprobs_equal_transformers(tiny, sampling):
    out = tiny.engine.generate(PROMPT, max_tokens=20, logprobs=5, ignore_eos=True, **sampling)
    assert len(out.tokens) == 20
    ref = hf_logprobs(tiny.hf, PROMPT + out.tokens)[len(PROMPT) - 1:-1]  # the distribution of each new token
    # logprobs describe the model's own distribution, before temperature, filtering and penalties
    assert [t.token for t in out.logprobs] == out.tokens
    chosen = torch.tensor([t.logprob for t in out.logprobs])
    torch.testing.assert_close(chosen, ref[torch.arange(20), out.tokens], rtol=0, atol=1e-5)
    for lp, row in zip(out.logprobs, ref):
        assert_top(lp, row, 5)
    if sampling["temperature"] == 0:  # greedy under ignore_eos: the best token other than EOS
        assert out.tokens == ref.index_fill(1, torch.tensor([tiny.eos]), -math.inf).argmax(-1).tolist()


# ---- seeds ------------------------------------------------------------------------------------------------


def test_seeded_samples_are_reproducible(tiny):
    eng = tiny.engine
    kw = dict(max_tokens=16, temperature=1.0, top_k=40, ignore_eos=True)
    a = eng.generate(PROMPT, n=4, seed=7, **kw)
    b = eng.generate(PROMPT, n=4, seed=7, **kw)
    assert [c.tokens for c in a.choices] == [c.tokens for c in b.choices]
    assert eng.generate(PROMPT, n=1, seed=7, **kw).tokens == a.choices[0].tokens
    assert len({tuple(c.tokens) for c in a.choices}) > 1  # samples of one request differ from each other
    other = eng.generate(PROMPT, n=4, seed=8, **kw)
    assert [c.tokens for c in other.choices] != [c.tokens for c in a.choices]
    assert eng.generate(PROMPT, n=1, seed=8, **kw).tokens != a.choices[0].tokens


# ---- streaming and stopping -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def free_text(tiny):
    """A seeded sample with nothing stopping it: where the stop tests take their stops from."""
    out = tiny.engine.generate(PROMPT, max_tokens=30, seed=11, ignore_eos=True)
    return out


def test_stop_strings_spanning_tokens(tiny, free_text):
    eng, text = tiny.engine, free_text.text
    stop = text[10:13]  # three tokens (one character each)
    kw = dict(max_tokens=30, seed=11, ignore_eos=True)
    out = eng.generate(PROMPT, stop=stop, **kw)
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]
    assert eng.generate(PROMPT, stop=stop, include_stop=True, **kw).text == text[: text.index(stop) + 3]
    # several stops: the one that completes first wins
    later, earlier = text[14:18], text[12:14]
    assert eng.generate(PROMPT, stop=[later, earlier], **kw).text == text[: text.index(earlier)]
    assert StopStrings([later, earlier]).truncate(text) == (text[: text.index(earlier)], True)


@pytest.mark.parametrize("kw", [dict(seed=11), dict(seed=11, stop="XYZ"), dict(seed=11, stop_at=(10, 13)),
                                dict(seed=11, stop_at=(10, 13), include_stop=True),
                                dict(temperature=0, stop_at=(2, 4)), dict(seed=5, n_stops=3)])
def test_stream_concatenation_equals_generate_text(tiny, free_text, kw):
    kw = dict(kw)
    if "stop_at" in kw:
        a, b = kw.pop("stop_at")
        kw["stop"] = [free_text.text[a:b]]
    if "n_stops" in kw:
        kw["stop"] = [free_text.text[i:i + 2] for i in range(0, 2 * kw.pop("n_stops"), 2)]
    eng = tiny.engine
    out = eng.generate(PROMPT, max_tokens=30, ignore_eos=True, **kw)
    pieces = list(eng.stream(PROMPT, max_tokens=30, ignore_eos=True, **kw))
    assert "".join(pieces) == out.text
    assert all(pieces)


def test_stop_token_ids(tiny, free_text):
    tokens = free_text.tokens
    stop_tok = tokens[6]
    first = tokens.index(stop_tok)
    out = tiny.engine.generate(PROMPT, max_tokens=30, seed=11, ignore_eos=True, stop_token_ids=[stop_tok])
    assert out.tokens == tokens[: first + 1]
    assert out.finish_reason == "stop"
    assert out.text == tiny.engine.tokenizer.decode(tokens[:first])  # the stop token's own text is left out


def test_min_tokens_suppresses_stop_token_ids(tiny):
    """min_tokens holds back stop token ids as well as EOS, greedy and sampled (transformers' min_new_tokens
    suppresses every id in eos_token_id; its suppress_tokens plays ignore_eos)."""
    eng, eos = tiny.engine, tiny.eos
    free = eng.generate(PROMPT, max_tokens=20, temperature=0, ignore_eos=True).tokens
    stop_tok = free[1]
    m = free.index(stop_tok) + 4
    for ignore_eos in (True, False):
        out = eng.generate(PROMPT, max_tokens=20, temperature=0, min_tokens=m, stop_token_ids=[stop_tok],
                           ignore_eos=ignore_eos)
        ends = [stop_tok] if ignore_eos else [stop_tok, eos]
        with torch.no_grad():
            ref = tiny.hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                                   do_sample=False, max_new_tokens=20, min_new_tokens=m, eos_token_id=ends,
                                   pad_token_id=eos, suppress_tokens=[eos] if ignore_eos else None)
        ref = ref[0, len(PROMPT):].tolist()
        assert out.tokens == ref[: len(out.tokens)] and set(ref[len(out.tokens):]) <= {eos}
        assert not set(out.tokens[:m]) & set(ends) and len(out.tokens) > m
        for seed in range(3):
            sampled = eng.generate(PROMPT, max_tokens=20, seed=seed, min_tokens=m, stop_token_ids=[stop_tok])
            assert not set(sampled.tokens[:m]) & {stop_tok, eos}


def test_eos_min_tokens_and_ignore_eos(tiny):
    eng, eos = tiny.engine, tiny.eos
    plain = eng.generate(PROMPT, max_tokens=20, temperature=0)
    assert plain.tokens[-1] == eos and len(plain.tokens) == 2 and plain.finish_reason == "stop"
    for m in (3, 7):
        out = eng.generate(PROMPT, max_tokens=20, temperature=0, min_tokens=m)
        with torch.no_grad():
            ref = tiny.hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                                   do_sample=False, max_new_tokens=20, min_new_tokens=m, eos_token_id=eos,
                                   pad_token_id=eos)[0, len(PROMPT):].tolist()
        assert out.tokens == ref[: len(out.tokens)] and set(ref[len(out.tokens):]) <= {eos}
        assert eos not in out.tokens[:m]
        for seed in range(4):
            sampled = eng.generate(PROMPT, max_tokens=20, seed=seed, min_tokens=m)
            assert eos not in sampled.tokens[:m] and len(sampled.tokens) >= m
    ignoring = eng.generate(PROMPT, max_tokens=20, temperature=0, ignore_eos=True)
    assert len(ignoring.tokens) == 20 and eos not in ignoring.tokens and ignoring.finish_reason == "length"


# ---- quill eval -------------------------------------------------------------------------------------------


def hf_sliding_window_nll(hf, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Mean NLL and tokens scored with transformers' perplexity recipe: windows of `window` tokens every
    `stride`, each scoring only the tokens no earlier window scored (the rest are context, label -100)."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        input_ids = torch.tensor([ids[begin:end]])
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = hf(input_ids).logits
        nll = F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((labels[0, 1:] != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return total / count, count


@pytest.mark.parametrize("stride", [None, 16, 64, 5, 63])
def test_eval_perplexity_matches_transformers(tiny, tmp_path, capsys, stride):
    import quill.cli

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (150,), generator=g).tolist()
    text = tiny.engine.tokenizer.decode(ids)
    path = tmp_path / "text.txt"
    path.write_text(text)
    args = ["eval", str(tiny.folder), "--text", str(path)] + (["--stride", str(stride)] if stride else [])
    assert quill.cli.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    nll, scored = hf_sliding_window_nll(tiny.hf, ids, N_POS, stride or N_POS)
    assert result["tokens"] == 150 and result["scored"] == scored
    assert result["mean_nll"] == pytest.approx(nll, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    score = tiny.engine.score(text, stride=stride)
    assert score.perplexity == pytest.approx(result["perplexity"], rel=1e-6)


# ---- invalid parameters -----------------------------------------------------------------------------------

INVALID = [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(n=0), "n"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(stop=[f"s{i}" for i in range(17)]), "stop"),
    (dict(stop=[""]), "stop"),
    (dict(stop=""), "stop"),
    (dict(stop=["ok", ""]), "stop"),
    (dict(logprobs=21), "logprobs"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(seed="x"), "seed"),
    (dict(stop_token_ids=[V]), "stop_token_ids"),
    (dict(frobnicate=1), "frobnicate"),
]


@pytest.mark.parametrize("kw,param", INVALID, ids=[p + str(i) for i, (_, p) in enumerate(INVALID)])
def test_invalid_parameters_name_the_parameter(tiny, kw, param):
    kw = dict(kw)
    args = dict(n=kw.pop("n", 1), max_tokens=kw.pop("max_tokens", 4))
    with pytest.raises(InvalidParameter) as e:
        tiny.engine.generate(PROMPT, **args, **kw)
    assert e.value.param == param, str(e.value)
    with pytest.raises(InvalidParameter) as e:
        list(tiny.engine.stream(PROMPT, args["max_tokens"], **kw)) if args["n"] == 1 else \
            list(tiny.engine.events(PROMPT, **args, **kw))
    assert e.value.param == param
