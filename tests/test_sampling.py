"""quill.sampling against transformers' logits processors, plus sampling reproducibility and distribution."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
from transformers.generation import logits_process as hf

from quill import sampling as qs
from quill.errors import InvalidParameter

V = 64
INF = float("inf")


def make_logits(seed: int = 0, batch: int = 5, vocab: int = V) -> torch.Tensor:
    """Random float32 logits with ties, extreme values and entries already at -inf."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 3
    logits[0] = logits[0].round()  # many ties
    logits[1, :7] = -INF  # already filtered
    logits[2, 3], logits[2, 9], logits[2, 11] = 1e30, -1e30, 1e30  # extreme, tied at the top
    logits[3] = torch.randint(-2, 3, (vocab,), generator=g).float()  # few distinct values
    logits[4, ::2] = -INF
    return logits


def make_history(seed: int = 0, batch: int = 5, length: int = 12, alphabet: int = 6) -> torch.Tensor:
    """Different histories per row from a small alphabet, so tokens and n-grams repeat."""
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, alphabet, (batch, length), generator=g)


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def check(ours, theirs, history: torch.Tensor, prompt_len: int = 0) -> None:
    for seed in range(3):
        logits = make_logits(seed)
        before = logits.clone()
        assert_same(ours(logits, history, prompt_len), theirs(history, logits.clone()))
        assert_same(logits, before)  # input left untouched


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5, 2.0])
def test_temperature(temperature):
    check(qs.TemperatureLogitsWarper(temperature), hf.TemperatureLogitsWarper(temperature), make_history())


@pytest.mark.parametrize("top_k", [1, 2, 5, 20, V, V + 10])
def test_top_k(top_k):
    check(qs.TopKLogitsWarper(top_k), hf.TopKLogitsWarper(top_k), make_history())


@pytest.mark.parametrize("top_p", [1e-9, 0.01, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_top_p(top_p):
    check(qs.TopPLogitsWarper(top_p), hf.TopPLogitsWarper(top_p), make_history())


@pytest.mark.parametrize("top_p", [0.01, 0.5, 0.9, 0.99])
def test_top_p_shortcut_matches_transformers(top_p):
    """GPT-2-sized rows: peaked ones are decided among the most likely candidates, flat ones (a nucleus of
    thousands) and ties take the full sort; every mix equals transformers'."""
    g = torch.Generator().manual_seed(1)
    peaked = torch.randn(3, 50257, generator=g) * 8  # nuclei of 1-21 tokens
    flat = torch.randn(2, 50257, generator=g) * 0.3
    warper = qs.TopPLogitsWarper(top_p)
    assert warper.nucleus_among_candidates(peaked) is not None
    assert warper.nucleus_among_candidates(flat) is None
    for logits in (peaked, flat, torch.cat([peaked, flat]), peaked.round()):
        assert_same(warper(logits, None, 0), hf.TopPLogitsWarper(top_p)(None, logits.clone()))


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 0.9, 1.0])
def test_min_p(min_p):
    check(qs.MinPLogitsWarper(min_p), hf.MinPLogitsWarper(min_p), make_history())


@pytest.mark.parametrize("mass", [0.05, 0.2, 0.5, 0.9, 0.99])
def test_typical(mass):
    check(qs.TypicalLogitsWarper(mass), hf.TypicalLogitsWarper(mass), make_history())


@pytest.mark.parametrize("penalty", [0.5, 1.2, 3.0])
@pytest.mark.parametrize("alphabet", [6, V + 5])  # V + 5: ids beyond the vocab are ignored
def test_repetition_penalty(penalty, alphabet):
    history = make_history(alphabet=alphabet)
    check(qs.RepetitionPenaltyLogitsProcessor(penalty), hf.RepetitionPenaltyLogitsProcessor(penalty), history)


@pytest.mark.parametrize("ngram_size", [1, 2, 3, 5])
@pytest.mark.parametrize("length", [1, 2, 4, 20])
def test_no_repeat_ngram(ngram_size, length):
    history = make_history(length=length, alphabet=3)
    check(qs.NoRepeatNGramLogitsProcessor(ngram_size), hf.NoRepeatNGramLogitsProcessor(ngram_size), history)


def test_no_repeat_ngram_bans_something():
    history = torch.tensor([[1, 2, 3, 1, 2], [4, 4, 4, 4, 4]])
    out = qs.NoRepeatNGramLogitsProcessor(3)(torch.zeros(2, 8), history, 0)
    assert out[0].isinf().nonzero().flatten().tolist() == [3]
    assert out[1].isinf().nonzero().flatten().tolist() == [4]


def test_logit_bias():
    bias = {3: 2.5, 10: -1.0, 5: -100.0, 0: 0.125, V - 1: 7.0}
    theirs = hf.SequenceBiasLogitsProcessor([[[token], value] for token, value in bias.items()])
    check(qs.LogitBiasLogitsProcessor.from_dict(bias), theirs, make_history())


def test_suppress_tokens():
    ids = [0, 3, 7, V - 1]
    check(qs.SuppressTokensLogitsProcessor(torch.tensor(ids)), hf.SuppressTokensLogitsProcessor(ids), make_history())


@pytest.mark.parametrize("prompt_len", [2, 8, 12])
@pytest.mark.parametrize("min_new", [1, 4, 10])
def test_min_new_tokens(prompt_len, min_new):
    eos = [0, 7]
    ours = qs.MinNewTokensLengthLogitsProcessor(min_new, torch.tensor(eos))
    theirs = hf.MinNewTokensLengthLogitsProcessor(prompt_len, min_new, eos)
    check(ours, theirs, make_history(length=12), prompt_len)


@pytest.mark.parametrize(("presence", "frequency"), [(0.5, 0.0), (0.0, 0.7), (-1.5, 2.0)])
def test_presence_frequency_penalty(presence, frequency):
    logits, history, prompt_len = make_logits(), make_history(length=12), 5
    expected = logits.clone()
    for row in range(logits.shape[0]):
        for token, count in Counter(history[row, prompt_len:].tolist()).items():
            expected[row, token] -= frequency * count + presence
    ours = qs.PresenceFrequencyPenaltyLogitsProcessor(presence, frequency)(logits, history, prompt_len)
    torch.testing.assert_close(ours, expected)


def hf_processors(params: qs.SamplingParams, eos: list[int], prompt_len: int) -> hf.LogitsProcessorList:
    """The list transformers' `generate` builds for the same settings."""
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=32, n_embd=8, n_layer=1, n_head=1))
    suppress = list(params.banned_tokens) + (eos if params.ignore_eos else [])
    config = GenerationConfig(
        do_sample=not params.greedy,
        temperature=params.temperature if not params.greedy else 1.0,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p or None,
        typical_p=params.typical_p,
        repetition_penalty=params.repetition_penalty,
        no_repeat_ngram_size=params.no_repeat_ngram_size,
        sequence_bias=[[[token], float(value)] for token, value in params.logit_bias.items()] or None,
        suppress_tokens=suppress or None,
        min_new_tokens=0 if params.ignore_eos else params.min_tokens,
    )
    config._eos_token_tensor = torch.tensor(eos)
    return model._get_logits_processor(config, input_ids_seq_length=prompt_len, device="cpu")


PIPELINE_CASES = [
    qs.SamplingParams(),
    qs.SamplingParams(temperature=0.0),
    qs.SamplingParams(temperature=0.0, repetition_penalty=1.3, no_repeat_ngram_size=2, banned_tokens=(4,)),
    qs.SamplingParams(temperature=0.7, top_k=20, top_p=0.9),
    qs.SamplingParams(temperature=1.3, top_p=0.8, min_p=0.05, typical_p=0.9, min_tokens=20),
    qs.SamplingParams(
        temperature=0.9,
        top_k=30,
        top_p=0.95,
        min_p=0.02,
        typical_p=0.95,
        repetition_penalty=1.2,
        no_repeat_ngram_size=3,
        logit_bias={2: 3.0, 9: -2.0},
        banned_tokens=(1, 5),
        min_tokens=3,
    ),
    qs.SamplingParams(temperature=0.5, ignore_eos=True, min_tokens=3, banned_tokens=(2,)),
]


@pytest.mark.parametrize("params", PIPELINE_CASES)
@pytest.mark.parametrize("prompt_len", [6, 11])
def test_pipeline_matches_generate(params, prompt_len):
    eos = [0, 7]
    params.validate(V)
    ours = qs.LogitsPipeline.from_params(params, eos)
    theirs = hf_processors(params, eos, prompt_len)
    assert [type(p).__name__ for p in ours.processors] == [
        type(p).__name__.replace("SequenceBias", "LogitBias") for p in theirs
    ]
    history = make_history(length=12, alphabet=10)
    for seed in range(3):
        logits = make_logits(seed)
        assert_same(ours(logits, history, prompt_len), theirs(history, logits.clone()))


def test_pipeline_neutral_is_identity():
    assert qs.LogitsPipeline.from_params(qs.SamplingParams(temperature=0, top_k=5, top_p=0.5), [0]).is_identity
    assert qs.LogitsPipeline.from_params(qs.SamplingParams(), [0]).is_identity
    assert not qs.LogitsPipeline.from_params(qs.SamplingParams(temperature=0, min_tokens=2), [0]).is_identity


def test_pipeline_penalties_come_before_temperature():
    params = qs.SamplingParams(temperature=0.5, repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=0.5)
    names = [type(p).__name__ for p in qs.LogitsPipeline.from_params(params, [0]).processors]
    assert names == [
        "RepetitionPenaltyLogitsProcessor",
        "PresenceFrequencyPenaltyLogitsProcessor",
        "TemperatureLogitsWarper",
    ]


def test_greedy_is_argmax():
    logits = make_logits()
    assert torch.equal(qs.sample(logits, greedy=True), logits.argmax(-1))


def draw(logits: torch.Tensor, generators, steps: int) -> torch.Tensor:
    return torch.stack([qs.sample(logits, False, generators) for _ in range(steps)])


def test_same_seed_same_ids_different_seeds_differ():
    logits = torch.zeros(3, 1000)
    one = draw(logits, [torch.Generator().manual_seed(s) for s in (1, 2, 3)], 50)
    again = draw(logits, [torch.Generator().manual_seed(s) for s in (1, 2, 3)], 50)
    other = draw(logits, [torch.Generator().manual_seed(s) for s in (4, 5, 6)], 50)
    assert torch.equal(one, again)
    assert (one != other).float().mean() > 0.9
    single = draw(logits, torch.Generator().manual_seed(9), 50)
    assert torch.equal(single, draw(logits, torch.Generator().manual_seed(9), 50))


def test_per_row_generators_batch_equals_alone():
    logits = make_logits()
    seeds = [11, None, 12, 13, 14]
    torch.manual_seed(0)
    batched = draw(logits, [torch.Generator().manual_seed(s) if s is not None else None for s in seeds], 40)
    for row, seed in enumerate(seeds):
        if seed is None:
            continue
        alone = draw(logits[row : row + 1], [torch.Generator().manual_seed(seed)], 40)
        assert torch.equal(batched[:, row], alone[:, 0])


def chi2_critical(df: int, alpha: float) -> float:
    """x with P(Chi2(df) > x) = alpha, by bisection on the exact survival function Q(df/2, x/2)."""
    low, high = 0.0, 10.0 * df + 100.0
    half_df = torch.tensor(df / 2, dtype=torch.float64)
    for _ in range(200):
        mid = (low + high) / 2
        survival = torch.special.gammaincc(half_df, torch.tensor(mid / 2, dtype=torch.float64)).item()
        low, high = (mid, high) if survival > alpha else (low, mid)
    return high


def test_chi2_critical_value_matches_tables():
    assert chi2_critical(1, 0.001) == pytest.approx(10.828, abs=1e-3)
    assert chi2_critical(10, 0.001) == pytest.approx(29.588, abs=1e-3)


@pytest.mark.parametrize(
    "params",
    [
        qs.SamplingParams(),
        qs.SamplingParams(temperature=0.8, top_k=15, top_p=0.97),
        qs.SamplingParams(temperature=1.5, min_p=0.1, banned_tokens=(0, 1)),
    ],
)
def test_sampled_distribution(params):
    vocab, draws = 20, 20_000
    raw = torch.linspace(-2.0, 1.5, vocab)[torch.randperm(vocab, generator=torch.Generator().manual_seed(3))]
    processed = qs.LogitsPipeline.from_params(params, [])(raw[None], torch.zeros(1, 0, dtype=torch.long), 0)[0]
    probs = processed.double().softmax(-1)
    ids = qs.sample(processed.expand(draws, vocab), False, torch.Generator().manual_seed(1234))
    counts = torch.bincount(ids, minlength=vocab).double()
    kept = probs > 0
    assert counts[~kept].sum() == 0, "a filtered token was sampled"
    expected = probs[kept] * draws
    assert expected.min() >= 5, "chi-square needs at least 5 expected per cell"
    statistic = (((counts[kept] - expected) ** 2) / expected).sum().item()
    assert statistic < chi2_critical(int(kept.sum()) - 1, 0.001)


def test_tiny_probabilities_are_sampled_and_zero_never():
    logits = torch.full((1, 8), -INF)
    logits[0, 2], logits[0, 5] = 0.0, -12.0  # p(5) ~ 6e-6
    ids = qs.sample(logits.expand(200_000, 8), False, torch.Generator().manual_seed(5))
    assert set(ids.unique().tolist()) == {2, 5}


def test_top_logprobs_uses_raw_distribution():
    logits = make_logits()
    logits[1, :7] = 0.0
    ids = logits.argmax(-1)
    chosen, (top_ids, top_values) = qs.top_logprobs(logits, ids, 3)
    reference = torch.log_softmax(logits, -1)
    assert_same(chosen, reference.gather(-1, ids[:, None])[:, 0])
    assert_same(top_values, reference.sort(-1, descending=True).values[:, :3])
    assert_same(reference.gather(-1, top_ids), top_values)
    assert qs.top_logprobs(logits, ids, 0)[1][0].shape == (5, 0)


def test_valid_params_pass():
    qs.SamplingParams().validate(V)
    PIPELINE_CASES[-2].validate(V)
    qs.SamplingParams(temperature=0, top_p=1.0, min_p=1.0, seed=-1, logit_bias={V - 1: -100.0}).validate(V)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", INF),
        ("temperature", "1"),
        ("top_k", -1),
        ("top_k", 1.5),
        ("top_k", True),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("typical_p", 0.0),
        ("typical_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", INF),
        ("presence_penalty", 2.5),
        ("presence_penalty", math.nan),
        ("frequency_penalty", -3.0),
        ("no_repeat_ngram_size", -1),
        ("logit_bias", {V: 1.0}),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {"3": 1.0}),
        ("logit_bias", {3: INF}),
        ("logit_bias", {3: 101.0}),
        ("logit_bias", [(3, 1.0)]),
        ("banned_tokens", (V,)),
        ("banned_tokens", (-1,)),
        ("banned_tokens", 5),
        ("min_tokens", -1),
        ("ignore_eos", "yes"),
        ("seed", 2**64),
        ("seed", 1.5),
    ],
)
def test_invalid_parameter(name, value):
    params = qs.SamplingParams(**{name: value})
    with pytest.raises(InvalidParameter) as info:
        params.validate(V)
    assert info.value.param == name
    assert name in str(info.value)


def test_sample_never_leaves_the_vocabulary():
    """Rows with a NaN or +inf logit, or with every token filtered, take their largest logit; others draw."""
    logits = torch.tensor([[0.0, float("nan"), 1.0], [0.0, float("inf"), 1.0], [float("-inf")] * 3, [0.0, 5.0, 1.0]])
    torch.manual_seed(0)
    ids = qs.sample(logits, greedy=False)
    assert ids[:2].tolist() == [2, 1] and 0 <= int(ids[2]) < 3 and 0 <= int(ids[3]) < 3


def test_tiny_penalties_and_top_p_stay_finite():
    """A repetition penalty or top_p that float32 rounds to 0 keeps every logit finite and the top token."""
    logits, history = make_logits(0), make_history()
    penalised = qs.RepetitionPenaltyLogitsProcessor(1e-300)(logits, history, 0)
    assert not penalised.isnan().any() and not (penalised == float("inf")).any()
    kept = qs.TopPLogitsWarper(1e-300)(logits, history, 0)
    assert ((kept > float("-inf")).sum(-1) == 1).all()
    assert (logits.gather(-1, kept.argmax(-1, keepdim=True)) == logits.amax(-1, keepdim=True)).all()  # a top one
    assert qs.SamplingParams(temperature=1e-38).greedy and not qs.SamplingParams(temperature=1e-5).greedy
