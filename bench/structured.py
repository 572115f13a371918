#!/usr/bin/env python3
"""Structured output's cost: the per-token overhead of a JSON-schema constraint on GPT-2 124M int8 decode
(random weights, transformers' GPT2Config() defaults) at batch 1 and 8, and the grammar compile time.

    python bench/structured.py            # 5 rounds of 64 tokens
    python bench/structured.py --quick    # 2 rounds of 32 tokens

Each round decodes the same prompt with and without the constraint (in turn, so that load from other processes
falls on both alike), EOS ignored, timed from the first generated token to the last; the schema is an
array of objects with more items than fit in max_tokens, so the constrained rows run to max_tokens too. Batch 8 is one request with n=8,
seeded sampling. Goal (docs/structured.md): at most 5% of the step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's quill

import quill  # noqa: E402
from quill import structured  # noqa: E402

SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "kind": {"enum": ["cat", "dog", "owl"]}}, "required": ["name", "age", "kind"], "additionalProperties": False},
    "minItems": 100}  # more items than max_tokens can hold: no row ends before the others
PROMPT = "A list of pets as JSON:"


def model_dir(folder: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from quill.tokenizer import Tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    Tokenizer.gpt2().save(folder)
    return folder


def decode_seconds_per_token(engine, n: int, tokens: int, **kw) -> float:
    """Seconds per decode step (all n rows together), from the first generated token to the last."""
    first = last = None
    steps = 0
    for ev in engine.events(PROMPT, tokens, n, ignore_eos=True, **kw):
        now = time.perf_counter()
        if ev.seq.index == 0:
            first, last = first or now, now
            steps += 1
    return (last - first) / max(steps - 1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    rounds, tokens = (2, 32) if args.quick else (args.rounds or 5, 64)
    with tempfile.TemporaryDirectory() as tmp:
        engine = quill.load(model_dir(Path(tmp)), quantize="int8")
    t0 = time.perf_counter()
    structured.token_info(engine.tokenizer, engine.config.eos_token_ids)
    info_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    structured.compiled(structured.constraint_from(json_schema=SCHEMA), engine.tokenizer, engine.config.eos_token_ids)
    compile_s = time.perf_counter() - t0
    report = {"tokenizer_info_s": info_s, "compile_s": compile_s, "batches": {}}
    for n in (1, 8):
        kw = dict(temperature=0) if n == 1 else dict(seed=0)
        plain, shaped = [], []
        decode_seconds_per_token(engine, n, 8, **kw)  # warm-up
        for _ in range(rounds):
            plain.append(decode_seconds_per_token(engine, n, tokens, **kw))
            shaped.append(decode_seconds_per_token(engine, n, tokens, json_schema=SCHEMA, **kw))
        p, s = statistics.median(plain), statistics.median(shaped)
        report["batches"][n] = {"step_ms": 1e3 * p, "constrained_step_ms": 1e3 * s, "overhead": s / p - 1}
    print(json.dumps(report, indent=2))
    print(f"tokenizer info {info_s:.2f} s, schema compile {1e3 * compile_s:.1f} ms")
    for n, r in report["batches"].items():
        print(f"batch {n}: step {r['step_ms']:.2f} ms, constrained {r['constrained_step_ms']:.2f} ms, "
              f"overhead {100 * r['overhead']:+.1f}%")


if __name__ == "__main__":
    main()
