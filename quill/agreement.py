"""Teacher-forced top-1 agreement: how often a model's most likely next token is a reference model's.

A model reads a fixed token sequence and, at every position, its argmax is compared with the reference's at
the same position. Two ways of computing the logits, as generation does:

- "prefill": the whole sequence in one forward (what a long prompt takes: for int8, Quill's int8 GEMM on
  int16 activations, or fbgemm's 7-bit ones with QUILL_INT8_GEMM=1; docs/performance.md, "Quality");
- "decode": the first `prompt` tokens in one forward, then one token a step through the KV cache (the fused
  decode kernels where they serve).

Random-weight models have nearly flat logits, so top-1 flips at the smallest perturbation: compare a model
with its own fp32 first (transformers fp32 and Quill fp32 agree on every position).
"""

from __future__ import annotations

import torch
from torch import Tensor

from quill.model import GPT

MODES = ("prefill", "decode")


def position_logits(model: GPT, ids: list[int] | Tensor, mode: str = "decode", prompt: int = 32) -> Tensor:
    """fp32 logits [T, V] at every position of the sequence `ids` [T], through the model's own KV cache."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1).to(model.device)
    T = ids.shape[1]
    first = T if mode == "prefill" else min(prompt, T)
    with torch.inference_mode():
        cache = model.new_cache(1, T)
        logits = [model(ids[:, :first], 0, cache)]
        logits += [model(ids[:, t:t + 1], t, cache) for t in range(first, T)]
        return torch.cat(logits, 1)[0].float()


def top1(logits: Tensor) -> list[int]:
    """The most likely token at each position of logits [T, V]."""
    return logits.argmax(-1).tolist()


def top1_agreement(choices: list[int], reference: list[int]) -> float:
    """Fraction of positions where `choices` equals `reference` (same length)."""
    if len(choices) != len(reference) or not reference:
        raise ValueError(f"agreement needs two non-empty sequences of one length, got {len(choices)} and "
                         f"{len(reference)}")
    return sum(a == b for a, b in zip(choices, reference)) / len(reference)


__all__ = ["position_logits", "top1", "top1_agreement", "MODES"]
