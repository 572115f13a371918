#!/usr/bin/env python3
"""Structured output's cost: the per-token overhead of a JSON-schema constraint on GPT-2 124M int8 decode
(random weights, transformers' GPT2Config() defaults) at batch 1 and 8, and the grammar compile time.

    python bench/structured.py            # 12 rounds of 64 tokens
    python bench/structured.py --quick    # 4 rounds of 32 tokens

Each round decodes the same prompt with and without the constraint, in ABBA order (plain, constrained,
constrained, plain; the next round BAAB), so that load from other processes and drift fall on both alike; EOS
is ignored and each run's figure is its median step. The schema is an array of objects with more items than
fit in max_tokens, so the constrained rows run to max_tokens too. Batch 1 is greedy (unconstrained rows take
the batch's argmax, constrained ones an argmax over what the grammar allows); batch 8 is one request with n=8,
seeded sampling. The overhead is the median over rounds of each round's ratio (a paired figure), with the
rounds' interquartile range. Beside it, the constraint's own work per token and row (the bitmask, its use,
advancing the matcher; see `constraint_clock`). Goal (docs/structured.md): at most 5% of the step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's quill

import quill  # noqa: E402
from quill import generate, structured  # noqa: E402
from runners import random_gpt2  # noqa: E402  (bench/, this script's folder)

SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "kind": {"enum": ["cat", "dog", "owl"]}}, "required": ["name", "age", "kind"], "additionalProperties": False},
    "minItems": 100}  # more items than max_tokens can hold: no row ends before the others
PROMPT = "A list of pets as JSON:"


def decode_seconds_per_token(engine, n: int, tokens: int, **kw) -> float:
    """Seconds of the median decode step (all n rows together) between the first generated token and the
    last: a median, which another process's stall in a few steps does not move."""
    times = [time.perf_counter() for ev in engine.events(PROMPT, tokens, n, ignore_eos=True, **kw) if ev.seq.index == 0]
    return statistics.median(b - a for a, b in zip(times, times[1:]))


@contextlib.contextmanager
def constraint_clock():
    """Seconds of the constraint's per-token work inside the block, and the tokens advanced: GrammarState's
    `mask`, `argmax` and `allowed_ids` (each computes the bitmask first, unless a batch's was computed together)
    and `advance` in thread CPU time, which the load of other processes does not inflate; a batch's bitmasks
    computed together (`fill_bitmasks`) in wall time, since llguidance's thread does that work while the decode
    thread waits."""
    spent = [0.0, 0]
    patched = [*((structured.GrammarState, name, time.thread_time, False) for name in ("mask", "argmax", "allowed_ids")),
               (structured.GrammarState, "advance", time.thread_time, True),
               (generate, "fill_bitmasks", time.perf_counter, False)]
    originals = [getattr(owner, name) for owner, name, _, _ in patched]

    def timed(fn, clock, count):
        def wrapper(*args, **kw):
            t0 = clock()
            try:
                return fn(*args, **kw)
            finally:
                spent[0] += clock() - t0
                spent[1] += count
        return wrapper

    for (owner, name, clock, count), fn in zip(patched, originals):
        setattr(owner, name, timed(fn, clock, count))
    try:
        yield spent
    finally:
        for (owner, name, _, _), fn in zip(patched, originals):
            setattr(owner, name, fn)


def quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return q[0], q[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "quill-bench"))
    args = ap.parse_args()
    rounds, tokens = (args.rounds or 4, 32) if args.quick else (args.rounds or 12, 64)
    engine = quill.load(random_gpt2("124M", Path(args.work) / "gpt2-124M-random"), quantize="int8")
    t0 = time.perf_counter()
    structured.token_info(engine.tokenizer, engine.config.eos_token_ids)
    info_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    structured.compiled(structured.constraint_from(json_schema=SCHEMA), engine.tokenizer, engine.config.eos_token_ids)
    compile_s = time.perf_counter() - t0
    from quill.kernels.cpu import this_cpu

    report = {"cpu": this_cpu().model or platform.processor(), "rounds": rounds, "tokens": tokens,
              "tokenizer_info_s": info_s, "compile_s": compile_s, "batches": {}}
    for n in (1, 8):
        kw = dict(temperature=0) if n == 1 else dict(seed=0)
        plain, shaped, ratios, work = [], [], [], []
        decode_seconds_per_token(engine, n, 8, **kw)  # warm-up
        decode_seconds_per_token(engine, n, 8, json_schema=SCHEMA, **kw)
        for r in range(rounds):
            times = {False: [], True: []}
            for constrained in ((False, True, True, False) if r % 2 == 0 else (True, False, False, True)):
                if constrained:
                    with constraint_clock() as spent:
                        times[True].append(decode_seconds_per_token(engine, n, tokens, json_schema=SCHEMA, **kw))
                    work.append(spent[0] / spent[1])
                else:
                    times[False].append(decode_seconds_per_token(engine, n, tokens, **kw))
            p, s = statistics.mean(times[False]), statistics.mean(times[True])
            plain.append(p)
            shaped.append(s)
            ratios.append(s / p - 1)
        q1, q3 = quartiles(ratios)
        step = statistics.median(plain)
        row_work = statistics.median(work)
        report["batches"][n] = {"step_ms": 1e3 * step, "constrained_step_ms": 1e3 * statistics.median(shaped),
                                "overhead": statistics.median(ratios), "overhead_q1": q1, "overhead_q3": q3,
                                "constraint_work_us_per_row": 1e6 * row_work,
                                "constraint_work_share": n * row_work / step}
    print(json.dumps(report, indent=2))
    print(f"{report['cpu']}: tokenizer info {info_s:.2f} s, schema compile {1e3 * compile_s:.1f} ms")
    for n, r in report["batches"].items():
        print(f"batch {n}: step {r['step_ms']:.2f} ms, constrained {r['constrained_step_ms']:.2f} ms, overhead "
              f"{100 * r['overhead']:+.1f}% (rounds' IQR {100 * r['overhead_q1']:+.1f}% to "
              f"{100 * r['overhead_q3']:+.1f}%); "
              f"the constraint's own work {r['constraint_work_us_per_row']:.0f} us a row and token "
              f"({100 * r['constraint_work_share']:.1f}% of the plain step)")


if __name__ == "__main__":
    main()
