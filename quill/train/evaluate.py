"""Exact held-out loss of a model on a text, and a minimal sampling loop (for model cards and tests).

`text_loss` is the deterministic counterpart of the trainer's random-window estimate: the text is cut into
consecutive, non-overlapping windows of the model's context and every token (but the first) is predicted once,
from the tokens before it in its window. The random-window estimate averages over window offsets uniformly, so the
two agree in expectation; this one has no sampling noise.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from quill.model import GPT
from quill.tokenizer import Tokenizer


@torch.no_grad()
def token_loss(model: GPT, ids: np.ndarray | list[int], block_size: int | None = None, batch: int = 32) -> float:
    """Mean cross-entropy (nats/token) of predicting ids[1:] in non-overlapping windows of `block_size`."""
    model = model.eval()
    block_size = block_size or model.config.n_positions
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    n_pred = len(ids) - 1
    if n_pred <= 0:
        raise ValueError("need at least two tokens")
    full = n_pred // block_size
    total = 0.0
    starts = list(range(0, full * block_size, block_size))
    for i in range(0, len(starts), batch):
        rows = torch.stack([ids[s:s + block_size + 1] for s in starts[i:i + batch]])
        logits = model(rows[:, :-1]).float()
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1),
                                 reduction="sum").item()
    rest = ids[full * block_size:]
    if len(rest) > 1:
        logits = model(rest[None, :-1]).float()
        total += F.cross_entropy(logits[0], rest[1:], reduction="sum").item()
    return total / n_pred


def text_loss(model: GPT, tokenizer: Tokenizer, text: str, block_size: int | None = None) -> float:
    return token_loss(model, tokenizer.encode(text), block_size)


@torch.no_grad()
def sample(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.0,
           top_k: int = 0, seed: int = 0) -> str:
    """Continue `prompt`: greedy at temperature 0, else sampled (optionally top-k). Uses the model's KV cache and
    slides the window (re-prefilling the last half context) when the context fills up."""
    model = model.eval()
    gen = torch.Generator().manual_seed(seed)
    ctx = model.config.n_positions
    ids = tokenizer.encode(prompt) or [0]
    out: list[int] = []
    cache = model.new_cache(1, ctx)
    window = ids[-ctx:]
    logits = model(torch.tensor([window]), 0, cache, last_only=True)[0, -1]
    pos = len(window)
    for _ in range(max_new_tokens):
        logits = logits.float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, -math.inf)
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        out.append(nxt)
        if pos == ctx:  # context full: restart from the most recent half window
            window = (ids + out)[-(ctx // 2):]
            cache = model.new_cache(1, ctx)
            logits = model(torch.tensor([window]), 0, cache, last_only=True)[0, -1]
            pos = len(window)
        else:
            logits = model(torch.tensor([[nxt]]), pos, cache)[0, -1]
            pos += 1
    return tokenizer.decode(out)


__all__ = ["token_loss", "text_loss", "sample"]
