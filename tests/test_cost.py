"""Metered calls: the FLOP formula against torch's own counter, budgets, and continuation handles."""

from __future__ import annotations

import time

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

import quill
from quill.continuation import ContinuationStore
from quill.cost import forward_flops, generation_flops
from quill.errors import BudgetError, ContinuationError, InvalidParameter
from quill.model import GPT, GPTConfig
from quill.tokenizer import Tokenizer

CONFIGS = [
    GPTConfig(n_embd=48, n_head=3, n_layer=2, n_positions=64, vocab_size=101),
    GPTConfig(n_embd=32, n_head=4, n_layer=3, n_positions=40, vocab_size=50, n_inner=72, tie_word_embeddings=False),
]


def counted(model: GPT, idx: torch.Tensor, cached: int, last_only: bool) -> int:
    """FLOPs torch's FlopCounterMode sees for one forward after `cached` tokens: on the plain torch path, with
    attention through the math kernel, whose matmuls the counter can see (the fused decode kernels compute the
    same products outside torch)."""
    model.use_kernels = False
    cache = model.new_cache()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        if cached:
            model(idx[:, :cached], 0, cache)
        with FlopCounterMode(display=False) as fc:
            model(idx[:, cached:], cached, cache, last_only=last_only)
    return fc.get_total_flops()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("cached", [0, 1, 9])
def test_single_token_step_equals_flop_counter(config, cached):
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (1, cached + 1))
    for last_only in (True, False):
        assert counted(model, idx, cached, last_only) == forward_flops(config, 1, cached, 1)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("new,cached", [(7, 0), (4, 5), (12, 20)])
def test_multi_token_forward(config, new, cached):
    """Token by token, the counter sees exactly the formula; a dense causal kernel also multiplies the masked
    half of the score rectangle, which the formula leaves out (each token's real context only)."""
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (1, cached + new))
    by_token = sum(counted(model, idx[:, : cached + j + 1], cached + j, False) for j in range(new))
    assert by_token == forward_flops(config, new, cached, new)
    masked = config.n_layer * 4 * config.n_embd * (new * (cached + new) - (new * cached + new * (new + 1) // 2))
    for last_only in (True, False):
        heads = 1 if last_only else new
        assert counted(model, idx, cached, last_only) == forward_flops(config, new, cached, heads) + masked


def test_generation_flops_with_and_without_cache():
    cfg = CONFIGS[0]
    # With a cache: a prefill then single-token steps; without: every step is a full forward of the prefix.
    assert generation_flops(cfg, 5, 3) == sum([forward_flops(cfg, 5, 0, 1), forward_flops(cfg, 1, 5, 1),
                                               forward_flops(cfg, 1, 6, 1)])
    assert generation_flops(cfg, 5, 3, kv_cache=False) == sum(forward_flops(cfg, 5 + t, 0, 1) for t in range(3))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("metered")
    GPT2LMHeadModel(GPT2Config(n_embd=48, n_head=3, n_layer=2, n_positions=96, vocab_size=101, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(folder)
    Tokenizer.characters("".join(chr(0x100 + i) for i in range(101))).save(folder)
    return quill.load(folder)


def generate_in_pieces(engine, budget, owner="", between=None, later_budget=None, **kw):
    """Tokens and text of a generation run call after call, under `budget` (later calls: `later_budget`)."""
    tokens, text, calls = [], "", 0
    out = engine.generate(max_flops=budget, owner=owner, **kw)
    while True:
        calls += 1
        tokens += out.tokens
        text += out.text
        assert out.usage.flops <= budget
        if out.finish_reason != "budget":
            return tokens, text, out.finish_reason, calls
        if between is not None:
            between()
        budget = later_budget or budget
        out = engine.generate(continuation=out.continuation, max_flops=budget, owner=owner)


SETTINGS = {
    "greedy": dict(temperature=0),
    "seeded": dict(temperature=0.9, top_k=30, top_p=0.95, seed=1234, repetition_penalty=1.3),
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_budgeted_pieces_equal_one_call(engine, setting):
    kw = dict(prompt=[3, 1, 4, 1, 5], max_tokens=40, ignore_eos=True, stop=["\u0105\u0106"], **SETTINGS[setting])
    whole = engine.generate(**kw)
    assert whole.usage.flops == generation_flops(engine.config, 5, len(whole.tokens))
    # One call, at least two, at least five, and many: the last pays for one step per later call.
    step = forward_flops(engine.config, 1, 5 + len(whole.tokens), 1)
    cases = [(whole.usage.flops, None, 1), (whole.usage.flops // 2 + 1, None, 2),
             (whole.usage.flops // 5 + 1, None, 5), (forward_flops(engine.config, 5, 0, 1), step, len(whole.tokens))]
    for budget, later, at_least in cases:
        tokens, text, finish, calls = generate_in_pieces(engine, budget, later_budget=later, **kw)
        assert (tokens, text, finish) == (whole.tokens, whole.text, whole.finish_reason)
        assert calls >= at_least


def test_resume_after_kv_is_evicted_recomputes(engine):
    kw = dict(prompt=[7, 7, 2], max_tokens=60, ignore_eos=True, **SETTINGS["seeded"])
    whole = engine.generate(**kw)
    store = engine.continuations

    def evict():
        for entry in store._entries.values():
            entry.state.kv = None

    tokens, text, _, calls = generate_in_pieces(engine, whole.usage.flops // 4, between=evict,
                                                later_budget=whole.usage.flops, **kw)
    assert calls > 1 and tokens == whole.tokens and text == whole.text


def test_resume_from_disk_after_restart(engine, tmp_path):
    """A store with a directory: a fresh store over the same directory (a restarted server) continues."""
    kw = dict(prompt=[9, 8, 7], max_tokens=25, ignore_eos=True, **SETTINGS["seeded"])
    whole = engine.generate(**kw)
    engine.continuations = ContinuationStore(tmp_path)
    first = engine.generate(max_flops=whole.usage.flops // 2, **kw)
    assert first.finish_reason == "budget"
    engine.continuations = ContinuationStore(tmp_path)  # the restart: nothing in memory
    rest = engine.generate(continuation=first.continuation, max_flops=whole.usage.flops * 2)
    assert first.tokens + rest.tokens == whole.tokens and rest.finish_reason == "length"
    assert rest.usage.prompt_tokens == 0 and rest.usage.flops > forward_flops(engine.config, 1, 27, 1)


def test_budget_errors(engine):
    prefill = forward_flops(engine.config, 4, 0, 1)
    with pytest.raises(BudgetError) as e:
        engine.generate([1, 2, 3, 4], max_flops=prefill - 1)
    assert e.value.minimum == prefill and str(prefill) in str(e.value) and e.value.param == "max_flops"
    for bad in (-5, 0, 1.5):
        with pytest.raises(InvalidParameter, match="max_flops"):
            engine.generate([1, 2], max_flops=bad)
    out = engine.generate([1, 2, 3], max_tokens=10, ignore_eos=True, max_flops=prefill)
    assert out.finish_reason == "budget" and len(out.tokens) == 1
    with pytest.raises(BudgetError, match="one step"):
        engine.generate(continuation=out.continuation, max_flops=10)
    with pytest.raises(InvalidParameter, match="continuation"):
        engine.generate(continuation=out.continuation, temperature=0.5)


def test_unknown_foreign_and_expired_handles(engine):
    engine.continuations = ContinuationStore(ttl=0.2)
    out = engine.generate([1, 2, 3], max_tokens=10, ignore_eos=True, owner="alice",
                          max_flops=forward_flops(engine.config, 3, 0, 1))
    with pytest.raises(ContinuationError) as e:
        engine.generate(continuation="cont_" + "x" * 32, owner="alice")
    assert e.value.code == "continuation_not_found"
    with pytest.raises(ContinuationError) as e:
        engine.generate(continuation=out.continuation, owner="mallory")
    assert e.value.code == "continuation_forbidden"
    time.sleep(0.3)
    with pytest.raises(ContinuationError) as e:
        engine.generate(continuation=out.continuation, owner="alice")
    assert e.value.code == "continuation_expired"
