"""bench/cost.py's extrapolation, against exact arithmetic: counts made from known instructions per FLOP."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT

from quill.cost import forward_flops, generation_flops
from quill.model import GPTConfig

sys.path.insert(0, str(ROOT / "bench"))  # bench/cost.py imports its neighbour `runners` as a script does
import cost as bench_cost  # noqa: E402

PREFILL = {1: 5.0, 4: 5.5, 32: 6.0, 128: 8.0}  # FLOPs per instruction of a prefill at each length
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


def test_counted_calls_overrule_a_limit_figures_estimate():
    """The most outputs for 4 inputs within the limit: the estimate's answer, unless counted calls say
    otherwise (a call with more outputs never costs less); measured only when bracketed by counts."""
    config = GPTConfig()
    entry = {}
    for p, n in [(1, 1), (1, 8), (4, 1), (32, 1), (32, 8), (128, 1), (128, 8)]:
        entry[f"{p} {n}"] = {"input_tokens": p, "output_tokens": n, "flops": generation_flops(config, p, n),
                             "flops_no_cache": generation_flops(config, p, n, kv_cache=False),
                             "instructions": count(config, p, n)}
    est = bench_cost.Estimate(config, entry)
    estimated = bench_cost.limit_figure(est, 4, True)
    n = estimated["value"]
    assert not estimated["measured"] and est(4, n)[0] <= bench_cost.LIMIT < est(4, n + 1)[0]

    def counted(outputs: int, instructions: float) -> None:
        entry[f"4 {outputs}"] = {"input_tokens": 4, "output_tokens": outputs, "flops": generation_flops(config, 4, outputs),
                                 "flops_no_cache": generation_flops(config, 4, outputs, kv_cache=False),
                                 "instructions": instructions}

    counted(n - 20, bench_cost.LIMIT * 1.01)  # the estimate was low: a count over the limit 20 outputs earlier
    fig = bench_cost.limit_figure(bench_cost.Estimate(config, entry), 4, True)
    assert fig["value"] == n - 21 and not fig["measured"]
    counted(n - 21, bench_cost.LIMIT * 0.999)  # and the call before it counted within: bracketed
    fig = bench_cost.limit_figure(bench_cost.Estimate(config, entry), 4, True)
    assert fig == {"value": n - 21, "instructions": bench_cost.LIMIT * 0.999, "measured": True, "context_full": False}
    entry.pop(f"4 {n - 20}")
    counted(n + 5, bench_cost.LIMIT * 0.9999)  # a count within the limit past the estimate's answer
    fig = bench_cost.limit_figure(bench_cost.Estimate(config, entry), 4, True)
    assert fig["value"] == n + 5 and not fig["measured"]

