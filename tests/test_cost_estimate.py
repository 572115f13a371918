"""bench/cost.py's extrapolation, against exact arithmetic: counts made from known instructions per FLOP."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT

from quill.cost import forward_flops, generation_flops
from quill.model import GPTConfig

sys.path.insert(0, str(ROOT / "bench"))  # bench/cost.py imports its neighbour `runners` as a script does
import cost as bench_cost  # noqa: E402

PREFILL = {1: 5.0, 32: 6.0, 128: 8.0}  # FLOPs per instruction of a prefill at each length
STEP = 4.0  # and of a decode step, at any context


def count(config: GPTConfig, p: int, n: int) -> float:
    steps = sum(forward_flops(config, 1, p + t - 1, 1) for t in range(1, n))
    return generation_flops(config, p, 1) / PREFILL[p] + steps / STEP


def test_a_prefill_counted_only_with_more_outputs_is_that_count_less_its_steps():
    config = GPTConfig()
    entry = {}
    for p, n in [(1, 1), (1, 8), (32, 1), (32, 8), (128, 8)]:  # 128 inputs counted with 8 outputs only
        entry[f"{p} {n}"] = {"input_tokens": p, "output_tokens": n, "flops": generation_flops(config, p, n),
                             "flops_no_cache": generation_flops(config, p, n, kv_cache=False),
                             "instructions": count(config, p, n)}
    est = bench_cost.Estimate(config, entry)
    assert est(128, 8) == (entry["128 8"]["instructions"], True)
    for p, n in [(128, 1), (128, 2), (128, 4)]:
        value, measured = est(p, n)
        assert not measured and value == pytest.approx(count(config, p, n), rel=1e-9)
