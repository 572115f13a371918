#!/usr/bin/env python3
"""The canister cost tables for Quill: GPT-2 124M (random weights) at fp32 and int8, beside the seeds' figures.

    python bench/cost.py                       # measure what is missing, then write docs/cost.md, docs/benchmarks/cost.png
    python bench/cost.py --count-up-to 128 --no-cache-up-to 32   # fewer cells (defaults: 1024 and 256)
    python bench/cost.py --report-only         # tables and chart from docs/benchmarks/cost-*.json as they are
    python bench/cost.py --precisions fp32 --count 4:609,4:610   # count the calls that bracket a limit figure

Every cell has exact FLOPs and the native wall time; instructions are counted with callgrind (quill.costtable;
`--counter perf` for the hardware counter, which counts another kernel variant: do not mix the two in one file)
for inputs up to --count-up-to (and a real no-cache run up to --no-cache-up-to). Counted cells are kept in
docs/benchmarks/cost-PRECISION.json and not counted again, and callgrind's files of every cell counted so far in the work folder, so
a run can be stopped and resumed. Only a run's first call is warmed up uncounted (quill.costtable). Elsewhere, and for the limit figures
within 40 billion instructions, instructions are extrapolated from FLOPs with the measured instructions per
FLOP (of a prefill at the nearest measured lengths, of a decode step at the nearest measured context), and the
tables mark those cells; counted calls (`--count`) overrule the estimates of a limit figure around them. The
1024-input row is a full context: 1024 - outputs inputs.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's quill

from runners import random_gpt2  # noqa: E402  (bench/, this script's folder)
from quill.callgrind import parse_dumps  # noqa: E402
from quill.cost import forward_flops, generation_flops  # noqa: E402
from quill.errors import InvalidParameter  # noqa: E402
from quill.costtable import Cell, ModelSpec, cells, count_runs, time_cells  # noqa: E402
from quill.weights import load_config  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
LIMIT = 40_000_000_000
INPUTS = tuple(2 ** i for i in range(11))
OUTPUTS = (1, 2, 4, 8)
PRECISIONS = {"fp32": None, "int8": "int8"}
# The GPT-2 instruct canister (candle, wasm with SIMD): instructions per call, (inputs, outputs) -> count.
CANISTER = {(1, 1): 1.12e9, (32, 1): 11.06e9, (128, 8): 52.82e9, **{(1024, n): 445.26e9 for n in OUTPUTS}}
# The ONNX canister's figures within the limit: (figure, cached) -> count.
LIMITS = [("longest input for 1 output", None, True, "76"),
          ("most outputs for 4 inputs", 4, True, "17 (1 before SIMD)"),
          ("most outputs for 4 inputs", 4, False, "7"),
          ("outputs for 12 inputs", 12, True, "14"), ("outputs for 12 inputs", 12, False, "5"),
          ("outputs for 24 inputs", 24, True, "10"), ("outputs for 24 inputs", 24, False, "2"),
          ("outputs for 48 inputs", 48, True, "5"), ("outputs for 48 inputs", 48, False, "1")]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def key(p: int, n: int) -> str:
    return f"{p} {n}"


def row_inputs(p: int, n: int, context: int) -> int:
    """The inputs of a table row's cell: the row's length, or a full context where that leaves no room."""
    return min(p, context - n)


# ---- measuring -------------------------------------------------------------------------------------------

def table_cells(config) -> list[Cell]:
    """Every cell of the table: INPUTS x OUTPUTS, the last row a full context."""
    return [c for p in INPUTS for n in OUTPUTS for c in cells(config, [row_inputs(p, n, config.n_positions)], [n])]


def measure(entry: dict, spec: ModelSpec, precision: str, count_up_to: int, no_cache_up_to: int, save,
            dumps: Path, counter: str) -> None:
    """Fill in what `entry` (one precision's cells) lacks: FLOPs and seconds of every cell, then instructions.

    One counted process (`counter`) counts every missing cell, in `priority` order; callgrind's files stay in
    `dumps`, from which a stopped run's counts are read back first.
    """
    table = table_cells(load_config(Path(spec.path)))
    if any(key(c.input_tokens, c.output_tokens) not in entry for c in table):
        log(f"{precision}: wall time of {len(table)} calls")
        time_cells(spec.load(), table)
        for c in table:
            entry[key(c.input_tokens, c.output_tokens)] = c.to_json()
        save()
    merge_dumps(entry, dumps)
    save()
    runs = [(field, c) for field, up_to in (("instructions", count_up_to), ("instructions_no_cache", no_cache_up_to))
            for c in sorted(table, key=lambda c: priority(field, c)) if c.input_tokens <= up_to
            and field not in entry[key(c.input_tokens, c.output_tokens)]]
    if not runs:
        return
    log(f"{precision}: counting {len(runs)} calls")
    t0 = time.perf_counter()
    count_runs(spec, runs, warm_each=False, dumps=dumps, counter=counter)
    for field, c in runs:
        entry[key(c.input_tokens, c.output_tokens)].update({field: getattr(c, field), "counter": c.counter})
    log(f"{precision}: counted in {time.perf_counter() - t0:.0f} s")
    save()


def count_calls(entry: dict, config, spec: ModelSpec, calls: list[tuple[int, int]], save, dumps: Path,
                counter: str) -> None:
    """Count calls beyond the table (`--count`, with a cache: the limit figures' brackets) into `entry`, after
    an uncounted warm-up call of their first length's prefill."""
    todo = [c for p, n in calls for c in cells(config, [p], [n])
            if "instructions" not in entry.get(key(p, n), {})]
    if not todo:
        return
    for c in todo:
        entry.setdefault(key(c.input_tokens, c.output_tokens), c.to_json())
    save()
    (warm,) = cells(config, [todo[0].input_tokens], [1])
    log(f"counting {len(todo)} more calls")
    count_runs(spec, [("instructions", warm)] + [("instructions", c) for c in todo], warm_each=False,
               dumps=dumps, counter=counter)
    for c in todo:
        entry[key(c.input_tokens, c.output_tokens)].update({"instructions": c.instructions, "counter": c.counter})
    save()


def merge_dumps(entry: dict, dumps: Path) -> None:
    """Take the counts of a stopped run from callgrind's files in `dumps` (cells already timed)."""
    if dumps.exists():
        for label, n in parse_dumps(dumps).items():
            field, p, o = label.split()
            if key(int(p), int(o)) in entry and field not in entry[key(int(p), int(o))]:
                entry[key(int(p), int(o))].update({field: n, "counter": "callgrind"})


def priority(field: str, c: Cell) -> tuple:
    """The order of counting, so that a run stopped early has what matters most: with a cache, the cells
    beside the canister's, then 1 and 8 outputs from the longest input down, then the rest; no-cache runs
    from the shortest up."""
    if field == "instructions_no_cache":
        return (c.input_tokens, c.output_tokens)
    seed = (c.input_tokens, c.output_tokens) in CANISTER
    return (not seed, c.output_tokens not in (1, 8), -c.input_tokens, c.output_tokens)


# ---- extrapolating ---------------------------------------------------------------------------------------

def interpolate(points: dict[float, float], x: float) -> float:
    """Linear interpolation of y over log x; the nearest end's value beyond the points; NaN without points."""
    xs = sorted(points)
    if not xs:
        return math.nan
    if x <= xs[0]:
        return points[xs[0]]
    if x >= xs[-1]:
        return points[xs[-1]]
    i = bisect.bisect_left(xs, x)
    a, b = xs[i - 1], xs[i]
    w = (math.log(x) - math.log(a)) / (math.log(b) - math.log(a))
    return points[a] + w * (points[b] - points[a])


class Estimate:
    """Instructions of any call of one precision: measured where counted, else FLOPs x instructions per FLOP.

    A prefill of L tokens (a 1-output call) takes the instructions per FLOP of the measured 1-output calls at
    the nearest lengths (or, at a length counted only with more outputs, that count less its estimated
    decode steps); a decode step at context c, that of the measured steps ((inputs, N) minus (inputs, 1))
    at the nearest context. Without a cache every token is a prefill of the whole prefix, which costs what a
    counted no-cache prefill of that length did, else what the cached prefill did.
    """

    def __init__(self, config, entry: dict):
        self.config, self.entry = config, entry
        self.step = {}
        for c in entry.values():
            one = entry.get(key(c["input_tokens"], 1), {})
            if c["output_tokens"] > 1 and "instructions" in c and "instructions" in one:
                context = c["input_tokens"] + c["output_tokens"] / 2
                self.step[context] = (c["instructions"] - one["instructions"]) / (c["flops"] - one["flops"])
        ones = [c for c in entry.values() if c["output_tokens"] == 1]
        cached = {c["input_tokens"]: c["instructions"] / c["flops"] for c in ones if "instructions" in c}
        # A length counted only with more outputs: its prefill is that count less its decode steps' estimate
        # (a few percent of such a call), which pins the prefill far better than a rate from other lengths.
        for c in sorted(entry.values(), key=lambda c: c["output_tokens"]):
            p, n = c["input_tokens"], c["output_tokens"]
            if n > 1 and "instructions" in c and p not in cached and self.step:
                cached[p] = (c["instructions"] - self.steps(p, n)) / generation_flops(config, p, 1)
        # A no-cache prefill is the cached one's computation without cache writes (counts within 2% where both
        # were counted), except a 1-token call, which with a cache runs the fused decode kernels instead.
        uncached = {p: v for p, v in cached.items() if p > 1}
        uncached.update({c["input_tokens"]: c["instructions_no_cache"] / c["flops"] for c in ones
                         if "instructions_no_cache" in c})
        self.prefill = {"instructions": cached, "instructions_no_cache": uncached}

    def steps(self, p: int, n: int) -> float:
        """Estimated instructions of the n - 1 decode steps after a prefill of p tokens."""
        return sum(interpolate(self.step, p + t - 1) * forward_flops(self.config, 1, p + t - 1, 1) for t in range(1, n))

    def __call__(self, p: int, n: int, cached: bool = True) -> tuple[float, bool]:
        """(instructions, measured) of a call of p inputs and n outputs."""
        kind = "instructions" if cached else "instructions_no_cache"
        counted = self.entry.get(key(p, n), {}).get(kind)
        if counted is not None:
            return counted, True
        if not cached:
            return sum(self.prefill_of(p + t, kind) for t in range(n)), False
        return self.prefill_of(p, kind) + self.steps(p, n), False

    def prefill_of(self, length: int, kind: str) -> float:
        counted = self.entry.get(key(length, 1), {}).get(kind)
        if counted is not None:
            return counted
        return interpolate(self.prefill[kind], length) * generation_flops(self.config, length, 1)


def limit_figure(est: Estimate, p: int | None, cached: bool) -> dict:
    """Within LIMIT: the longest input for 1 output (p None), else the most outputs for p inputs.

    Counted calls of p inputs (table cells, `--count`) overrule the estimates between them, since a call
    with more outputs never costs less: none past a counted call over the limit, all up to one within it.
    The figure is measured when it is counted and the call with one more output is counted over the limit.
    """
    context = est.config.n_positions
    kind = "instructions" if cached else "instructions_no_cache"
    counted = {} if p is None else {c["output_tokens"]: c[kind] for c in est.entry.values()
                                    if c["input_tokens"] == p and kind in c}
    over = min((n for n, v in counted.items() if v > LIMIT), default=math.inf)
    within = max((n for n, v in counted.items() if v <= LIMIT), default=0)
    best, at, measured = 0, 0.0, True
    for x in range(1, context - (1 if p is None else p) + 1):
        if x >= over:
            break
        instr, m = est(x, 1, cached) if p is None else est(p, x, cached)
        if math.isnan(instr):
            return {"value": None}
        if instr > LIMIT and x > within:
            break
        best, at, measured = x, instr, m
    capped = best == context - (1 if p is None else p)
    bracketed = p is None or capped or best + 1 == over
    return {"value": best, "instructions": at, "measured": measured and bracketed, "context_full": capped}


# ---- reporting -------------------------------------------------------------------------------------------

def fmt(x: float) -> str:
    if math.isnan(x):
        return "—"
    return f"{x / 1e9:.2f}B" if x >= 1e9 else f"{x / 1e6:.1f}M"


def row_label(p: int, context: int) -> str:
    return f"{p} ({context} − out)" if p + max(OUTPUTS) > context else str(p)


def report(store: dict, config) -> str:
    """The Markdown tables of docs/cost.md."""
    context = config.n_positions
    est = {prec: Estimate(config, store[prec]) for prec in PRECISIONS if prec in store}
    out = []
    for prec, e in est.items():
        out += [f"### Instructions per call, Quill {prec} (GPT-2 124M)", "",
                "| inputs | " + " | ".join(f"{n} out" for n in OUTPUTS) + " | " +
                " | ".join(f"{n} out, no cache" for n in OUTPUTS) + " |",
                "|---:|" + "---:|" * (2 * len(OUTPUTS))]
        for p in INPUTS:
            row = []
            for cached in (True, False):
                for n in OUTPUTS:
                    instr, measured = e(row_inputs(p, n, context), n, cached)
                    row.append(fmt(instr) if measured or math.isnan(instr) else f"≈{fmt(instr)}")
            out.append(f"| {row_label(p, context)} | " + " | ".join(row) + " |")
        out.append("")
    out += ["### Beside the GPT-2 instruct canister (candle, wasm + SIMD)", "",
            "| inputs | outputs | canister | " + " | ".join(f"Quill {p}" for p in est) + " | " +
            " | ".join(f"canister / Quill {p}" for p in est) + " |",
            "|---:|---:|---:|" + "---:|" * (2 * len(est))]
    for (p, n), seed in CANISTER.items():
        q = [e(row_inputs(p, n, context), n) for e in est.values()]
        out.append(f"| {p} | {n} | {fmt(seed)} | " + " | ".join(fmt(i) if m else f"≈{fmt(i)}" for i, m in q) +
                   " | " + " | ".join(f"{seed / i:.0f}x" for i, _ in q) + " |")
    out += ["", "### Within 40 billion instructions", "",
            "| figure | KV cache | ONNX canister | " + " | ".join(f"Quill {p}" for p in est) + " |",
            "|---|---|---:|" + "---:|" * len(est)]
    for name, p, cached, seed in LIMITS:
        cells_ = []
        for e in est.values():
            f = limit_figure(e, p, cached)
            if f["value"] is None:
                cells_.append("—")
                continue
            note = ", context full" if f["context_full"] else ""
            basis = "" if f["measured"] else "≈"
            cells_.append(f"{f['value']} ({basis}{fmt(f['instructions'])}{note})")
        out.append(f"| {name} | {'with' if cached else 'without'} | {seed} | " + " | ".join(cells_) + " |")
    out += ["", "### FLOPs per call (any precision)", "",
            "| inputs | " + " | ".join(f"{n} out" for n in OUTPUTS) + " | " +
            " | ".join(f"{n} out, no cache" for n in OUTPUTS) + " |", "|---:|" + "---:|" * (2 * len(OUTPUTS))]
    for p in INPUTS:
        row = [fmt(generation_flops(config, row_inputs(p, n, context), n, kv)) for kv in (True, False)
               for n in OUTPUTS]
        out.append(f"| {row_label(p, context)} | " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


def chart(store: dict, config, path: Path) -> None:
    """Instructions and FLOPs against input length, one line per generation length, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    context = config.n_positions
    fig, (ax_i, ax_f) = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    colours = dict(zip(OUTPUTS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for prec, style in (("fp32", "-"), ("int8", "--")):
        if prec not in store:
            continue
        est = Estimate(config, store[prec])
        for n in OUTPUTS:
            xs = [row_inputs(p, n, context) for p in INPUTS]
            ys = [est(x, n) for x in xs]
            ax_i.plot(xs, [y for y, _ in ys], style, color=colours[n], label=f"Quill {prec}, {n} out")
            ax_i.plot([x for x, (_, m) in zip(xs, ys) if m], [y for y, m in ys if m], "o", color=colours[n], ms=3)
    for n in OUTPUTS:
        xs = [row_inputs(p, n, context) for p in INPUTS]
        ax_f.plot(xs, [generation_flops(config, x, n) for x in xs], "-", color=colours[n], label=f"{n} out, KV cache")
        ax_f.plot(xs, [generation_flops(config, x, n, kv_cache=False) for x in xs], ":", color=colours[n],
                  label=f"{n} out, no cache")
    for ax in (ax_i, ax_f):
        seeds = [(p, n, v) for (p, n), v in CANISTER.items()]
        ax.scatter([p for p, _, _ in seeds], [v for _, _, v in seeds], marker="*", s=120, color="black",
                   label="GPT-2 instruct canister (instructions)", zorder=5)
        ax.axhline(LIMIT, color="grey", lw=0.8)
        ax.text(1, LIMIT * 1.15, "40B-instruction limit", color="grey", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("input tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax_i.set_ylabel("per call")
    ax_i.set_title("Instructions (markers: counted; lines elsewhere extrapolated)", fontsize=9)
    ax_f.set_title("FLOPs of the matrix products (exact)", fontsize=9)
    fig.suptitle("GPT-2 124M: the cost of one call")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results(precision: str) -> Path:
    """One file per precision, so two runs (one per precision) can measure at the same time."""
    return DOCS / "benchmarks" / f"cost-{precision}.json"


MARK_BEGIN, MARK_END = "<!-- cost tables: bench/cost.py writes from here -->", "<!-- end of cost tables -->"


def write_docs(store: dict, config, docs: Path) -> None:
    chart(store, config, docs / "benchmarks" / "cost.png")
    md = docs / "cost.md"
    text = md.read_text()
    begin, end = text.index(MARK_BEGIN) + len(MARK_BEGIN), text.index(MARK_END)
    md.write_text(text[:begin] + "\n" + report(store, config) + text[end:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--count-up-to", type=int, default=1024, help="count instructions for inputs up to this")
    ap.add_argument("--no-cache-up-to", type=int, default=256, help="count no-cache runs for inputs up to this")
    ap.add_argument("--counter", default="callgrind", choices=("perf", "callgrind"),
                    help="what counts instructions (default callgrind, which counted the stored cells)")
    ap.add_argument("--count", default="", help="more calls to count, with a cache: INPUTS:OUTPUTS,... (the limit "
                    "figures' brackets, as docs/cost.md says)")
    ap.add_argument("--report-only", action="store_true", help="write the docs from the stored results (and counts left by a stopped run), measure nothing")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "quill-bench"))
    args = ap.parse_args(argv)
    try:
        calls = [tuple(int(v) for v in c.split(":")) for c in args.count.split(",") if c]
        if any(len(c) != 2 or min(c) < 1 for c in calls):
            raise ValueError
    except ValueError:
        ap.error(f"--count: expected INPUTS:OUTPUTS pairs of positive whole numbers, got {args.count!r}")
    folder = random_gpt2("124M", Path(args.work) / "gpt2-124M-random")
    config = load_config(folder)
    try:
        for p, n in calls:
            cells(config, [p], [n])  # within the model's context
    except InvalidParameter as e:
        ap.error(f"--count: {e}")
    store = {p: json.loads(results(p).read_text()) for p in PRECISIONS if results(p).exists()}
    for prec in args.precisions.split(","):
        entry = store.setdefault(prec, {})
        dumps = Path(args.work) / f"callgrind-{prec}"

        def save(prec=prec, entry=entry):
            results(prec).write_text(json.dumps(entry, indent=1) + "\n")

        if args.report_only:
            merge_dumps(entry, dumps)
            save()
        else:
            spec = ModelSpec(str(folder), quantize=PRECISIONS[prec])
            measure(entry, spec, prec, args.count_up_to, args.no_cache_up_to, save, dumps, args.counter)
            count_calls(entry, config, spec, calls, save, dumps, args.counter)
    write_docs(store, config, DOCS)
    print(report(store, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
