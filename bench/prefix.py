#!/usr/bin/env python3
"""Prefix caching's gain: time to first token on a hit against a miss, and a chat's total prefill time.

    python bench/prefix.py             # GPT-2 124M (random weights, transformers' GPT2Config()), 5 rounds
    python bench/prefix.py --quick     # 2 rounds
    python bench/prefix.py --model DIR # another checkpoint folder (tests run it on a tiny one)

- Shared prefix: a 900-token prefix plus a 20-token question (random token ids). A miss is a prefix the cache
  has never seen (another owner salts it); a hit is the same prefix with another question. Time to first
  token: from the call to its first token (max_tokens=1), which is the prefill plus one sampling step. The
  same prompt on an engine without a prefix cache shows what a miss pays for keeping its blocks.
- Chat: a 100-token system prompt, then 10 turns of a 30-token question and a 30-token greedy answer, each turn
  sending the whole conversation so far (as a chat client does). Total prefill time: the sum of the turns'
  times to first token, with the prefix cache and without it (two engines of the same model).
Each round runs both sides in turn, so that load from other processes falls on both alike; medians reported.
Goals (issue 21): a hit at least 10x faster than a miss; the chat's prefill at least 3x less with the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's quill

import quill  # noqa: E402

PREFIX, QUESTION = 900, 20
SYSTEM, TURN, TURNS = 100, 30, 10


def model_dir(folder: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from quill.tokenizer import Tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    Tokenizer.gpt2().save(folder)
    return folder


def ttft(engine, prompt: list[int], owner: str = "", max_tokens: int = 1) -> tuple[float, list[int], int]:
    """Seconds to the first token, the tokens generated, and the prompt tokens the prefix cache held."""
    t0 = time.perf_counter()
    first, seq = None, None
    for ev in engine.events(prompt, max_tokens, owner=owner, temperature=0, ignore_eos=True):
        first = first or time.perf_counter() - t0
        seq = ev.seq
    return first, seq.generated, seq.usage.cached_tokens


def chat_prefill(engine, rng: random.Random) -> tuple[float, int]:
    """Total time to first token over the chat's turns, and the prompt tokens the cache held in all."""
    conversation = [rng.randrange(50000) for _ in range(SYSTEM)]
    total, cached = 0.0, 0
    for _ in range(TURNS):
        conversation += [rng.randrange(50000) for _ in range(TURN)]
        seconds, answer, hit = ttft(engine, conversation, max_tokens=TURN)
        total, cached = total + seconds, cached + hit
        conversation += answer
    return total, cached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: GPT-2 124M, random weights)")
    args = ap.parse_args()
    rounds = 2 if args.quick else args.rounds or 5
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else model_dir(Path(tmp))
        cached_engine, plain_engine = quill.load(folder), quill.load(folder, prefix_cache=0)
    vocab = min(cached_engine.config.vocab_size, 50000)
    rng = random.Random(0)
    load_before = os.getloadavg()

    def ids(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    ttft(cached_engine, ids(64))  # warm-up
    misses, hits, held, uncached = [], [], [], []
    for r in range(rounds):
        prefix = ids(PREFIX)
        first = prefix + ids(QUESTION)
        uncached.append(ttft(plain_engine, first)[0])
        miss, _, none = ttft(cached_engine, first, owner=f"round{r}")
        hit, _, found = ttft(cached_engine, prefix + ids(QUESTION), owner=f"round{r}")
        assert none == 0 and found == PREFIX // 16 * 16, (none, found)
        misses.append(miss)
        hits.append(hit)
        held.append(found)
    with_cache, without, chat_cached = [], [], []
    for r in range(rounds):
        seconds, hit = chat_prefill(cached_engine, random.Random(100 + r))
        with_cache.append(seconds)
        chat_cached.append(hit)
        without.append(chat_prefill(plain_engine, random.Random(100 + r))[0])
    m, h, u = statistics.median(misses), statistics.median(hits), statistics.median(uncached)
    w, wo = statistics.median(with_cache), statistics.median(without)
    report = {
        "model": str(args.model or "gpt2-124M-random"), "threads": __import__("torch").get_num_threads(),
        "rounds": rounds, "load_average": [load_before, os.getloadavg()],
        "shared_prefix": {"prefix_tokens": PREFIX, "question_tokens": QUESTION, "cached_tokens": held[0],
                          "ttft_miss_s": m, "ttft_hit_s": h, "ttft_without_cache_s": u, "speedup": m / h,
                          "goal": 10.0},
        "chat": {"system_tokens": SYSTEM, "turns": TURNS, "tokens_per_message": TURN,
                 "cached_tokens": chat_cached[0], "prefill_with_cache_s": w, "prefill_without_s": wo,
                 "speedup": wo / w, "goal": 3.0},
    }
    print(json.dumps(report, indent=2))
    print(f"shared prefix: TTFT miss {1e3 * m:.1f} ms, hit {1e3 * h:.1f} ms: {m / h:.1f}x (goal 10x); "
          f"without a cache {1e3 * u:.1f} ms")
    print(f"10-turn chat: prefill {1e3 * wo:.0f} ms without the cache, {1e3 * w:.0f} ms with: {wo / w:.1f}x "
          f"(goal 3x)")


if __name__ == "__main__":
    main()
