#!/usr/bin/env python3
"""The decode benchmark on the CPU: Quill against transformers, ONNX Runtime, llama.cpp, CTranslate2, OpenVINO.

    python bench/decode.py            # GPT-2 124M (random weights), full run, results in docs/benchmarks/
    python bench/decode.py --quick    # a short run
    python bench/decode.py --model PATH --systems quill,llama
    python bench/decode.py --device cuda   # the GPU run instead (bench/decode_cuda.py)

One run, on this machine, for one model (default: a random-initialised GPT-2 124M; `--model` for others):

1. memory read bandwidth (sums over a 1 GiB fp32 tensor in 2 MB pages for a second, just before and just
   after each round's first batch-1 decode measurement: this VM's rate comes in bursts between ~32 and ~65
   GB/s) and from it that decode sample's bound: bandwidth / bytes of weights read per token;
2. batch-1 decode tok/s: 32-token prompt, 128 new tokens, greedy, EOS ignored, timed from the first
   generated token to the last (prefill excluded); DECODE_PASSES samples of every system a round;
3. prefill tok/s: a 512-token prompt up to its first generated token;
4. batched decode tok/s (all rows together) for 1, 4, 8 and 16 sequences;
5. quality: teacher-forced top-1 agreement with Quill fp32 (which agrees with transformers fp32 at every
   position, tests/test_agreement.py) over the first 512 tokens of bench/data/quality.txt (Shakespeare: a
   random model's greedy text repeats itself, and its confident choices flatter every precision): the
   whole text in one forward ("prefill") for every system that returns every position's logits, and for
   Quill also as generation computes it ("decode": 32 tokens prefilled, then one a step).

Systems (bench/runners.py, bench/peers.py): Quill fp32/bf16/int8; transformers fp32/bf16/dynamic int8;
ONNX Runtime fp32/int8; llama.cpp f32/f16/q8_0 when llama-cpp-python is installed; CTranslate2 int8,
int8_float32, bfloat16, float32 (those the CPU supports) and OpenVINO fp32, NNCF int8 and bf16 (where the
CPU has it) when their packages are installed. A peer that is not installed is left out with a note.

How: each family runs in a worker process of its own (bench/worker.py: their thread pools - torch's
OpenMP, ORT's, ggml's - must not share a process), driven round by round from here so that load from other
processes falls on all of them alike, column by column (every system's decode, then every system's prefill,
then each batch size), so that the two samples a ratio pairs were taken within a minute of each other; the
order rotates from round to round, so no system is always measured first (after the previous round's heaviest
work) or last. Every system runs at the thread count (1 or all cores) that was faster for it in the warm-up,
chosen separately for decode, batched decode and prefill; one untimed pass of the multi-row work follows the
warm-up. Tables report medians of `--runs` rounds; the goals compare two systems (or two columns) round by
round, by the median of the rounds' ratios (`paired_ratio`). Results go to docs/benchmarks/ as JSON, Markdown and a
PNG chart, one set per kernel variant (decode-MODEL-avx2.*, decode-MODEL-avx512.*, decode-MODEL-avx512bf16.*: each CPU
kind keeps its own table).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's quill

from runners import (  # noqa: E402
    NEW_TOKENS, PREFILL_LEN, PROMPT_LEN, add_model_arguments, benchmark_model, weight_bytes_per_token,
    write_report,
)
import peers  # noqa: E402

QUALITY_TEXT = Path(__file__).resolve().with_name("data") / "quality.txt"
QUALITY_LEN = 512

BATCHES = (1, 4, 8, 16)
# a measurement slower than this is taken once, a batch-1 decode once a round (transformers bf16 on CPUs without
# bf16 GEMM)
SLOW_S = 20.0
# batch-1 decode samples of every system per round: this VM's bandwidth switches between two rates every few
# seconds (docs/performance.md, "The benchmark's batch-1 samples"), so five samples could all meet one rate
DECODE_PASSES = 3


# ---- machine ----------------------------------------------------------------------------------------------

class BandwidthProbe:
    """Read bandwidth in bytes/s, measured on demand: bytes over time of back-to-back sums (all torch threads)
    over a `gib` GiB fp32 tensor kept for the whole run, for at least `seconds` - this VM's rate comes in
    bursts of seconds, so a window as long as a decode sample's estimates what that sample could get. The
    tensor sits in 2 MB pages where the machine has them, as Quill's weights do: 4 KB pages read slower, and
    a bound measured on them would flatter every system."""

    def __init__(self, gib: float = 1.0):
        import torch

        from quill.kernels import move_to_huge_pages

        self.t = torch.ones(int(gib * (1 << 30)) // 4)
        move_to_huge_pages([self.t])
        self.t.sum()

    def __call__(self, seconds: float = 1.0) -> float:
        n, t0 = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - t0 < seconds:
            self.t.sum()
            n += 1
        return n * self.t.nbytes / (time.perf_counter() - t0)


def machine_info() -> dict:
    """The machine as the report names it: the CPU, its SIMD flags and the kernel variant Quill chose."""
    import torch

    from quill import kernels

    system = kernels.system_report()
    return {"cpu": system["cpu"], "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "simd_flags": system["flags"], "kernels": system["variant"] or system.get("error") or system.get("reason"),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


# ---- worker processes, as the driver sees them -----------------------------------------------------------

class Worker:
    """The driver's handle on a worker process."""

    def __init__(self, family: str, cfg: dict, log_path: Path):
        worker = Path(__file__).resolve().with_name("worker.py")
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, str(worker), family, json.dumps(cfg)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        self.family = family

    def ready(self) -> list[dict]:
        return self._read()["runners"]

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.family} worker exited (log: {self.log.name})")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"{self.family} worker: {msg['error']}")
        return msg

    def call(self, name: str, op: str, threads: int | None = None, **args):
        msg = {"op": op, "name": name, "args": args}
        if threads is not None:
            msg["threads"] = threads
        self.proc.stdin.write(json.dumps(msg) + "\n")
        return self._read()["ok"]

    def close(self):
        with contextlib.suppress(Exception):
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(30)
        if self.proc.poll() is None:
            self.proc.kill()
        self.log.close()


@dataclass
class RemoteRunner:
    """A runner living in a worker, as the driver sees it; threads chosen in the warm-up per metric."""

    worker: Worker
    name: str
    family: str
    precision: str
    bytes_per_weight: float
    batching: bool
    compiled: bool
    agreement_modes: list[str] = field(default_factory=list)
    threads: dict[str, int] = field(default_factory=dict)

    def decode(self, prompt, new, batch=1, threads=None):
        return self.worker.call(self.name, "decode", threads or self.threads.get("decode"), prompt=prompt, new=new,
                                batch=batch)

    def prefill(self, prompt, threads=None):
        return self.worker.call(self.name, "prefill", threads or self.threads.get("prefill"), prompt=prompt)

    def top1(self, ids, mode):
        return self.worker.call(self.name, "top1", self.threads.get("prefill"), ids=ids, mode=mode)


# ---- the run ----------------------------------------------------------------------------------------------

@dataclass
class Samples:
    """One system's measurements, each column's values ("decode", "prefill-512", "batch-B") by the round that
    took them: ratios pair the rounds (below)."""
    rounds: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    bandwidth: list[float] = field(default_factory=list)  # around each round's first decode sample
    bounded: list[float] = field(default_factory=list)  # those first samples, the ones with a bandwidth

    def add(self, column: str, rnd: int, value: float) -> None:
        self.rounds.setdefault(column, {}).setdefault(rnd, []).append(value)

    def values(self, column: str) -> list[float]:
        return [v for _, vs in sorted(self.rounds.get(column, {}).items()) for v in vs]

    def round_medians(self, column: str, runs: int) -> list[float | None]:
        got = self.rounds.get(column, {})
        return [statistics.median(got[i]) if got.get(i) else None for i in range(runs)]


def _median(xs):
    return statistics.median(xs) if xs else None


def round_ratios(a: dict, col_a: str, b: dict, col_b: str | None = None) -> list[float]:
    """a's column col_a over b's col_b (default the same), round by round: the ratio of their round medians in
    each round that measured both."""
    return [x / y for x, y in zip(a["round_medians"].get(col_a, []), b["round_medians"].get(col_b or col_a, []))
            if x and y]


def paired_ratio(a: dict, col_a: str, b: dict, col_b: str | None = None) -> float | None:
    """The median of `round_ratios`: what the goals compare. Two systems of one round ran seconds apart, so a
    slow spell of a shared machine meets both; a ratio of whole-run medians can set one's fast minutes against
    the other's slow ones."""
    pairs = round_ratios(a, col_a, b, col_b)
    return statistics.median(pairs) if pairs else None


def start_workers(folder: Path, work: Path, systems: set[str], n_ctx: int, log, notes: list[str],
                  compile: bool = False) -> list[Worker]:
    import importlib.util

    configs: dict[str, dict] = {}
    onnx: dict[str, Path] = {}
    if "quill" in systems:
        configs["quill"] = {"folder": str(folder), "compile": compile}
    if "transformers" in systems and importlib.util.find_spec("transformers"):
        configs["transformers"] = {"folder": str(folder)}
    openvino = "openvino" in systems and importlib.util.find_spec("openvino") is not None
    if ("ort" in systems and importlib.util.find_spec("onnxruntime")) or openvino:
        from quill.export import export_onnx

        for kind, last_only in (("decode", True), ("scoring", False)):  # scoring: every position's logits
            onnx[kind] = work / ("onnx" if last_only else "onnx-scoring") / "model.onnx"
            if not onnx[kind].exists() and (last_only or openvino):
                log(f"exporting ONNX ({kind}) ...")
                export_onnx(folder, onnx[kind].parent, last_logits_only=last_only)
    if "ort" in systems and importlib.util.find_spec("onnxruntime"):
        from quill.export import quantize_onnx_int8

        fp32 = onnx["decode"]
        int8 = work / "onnx-int8" / "model.onnx"
        if not int8.exists():
            log("quantising ONNX (onnxruntime quantize_dynamic) ...")
            quantize_onnx_int8(fp32, int8)
        configs["onnxruntime"] = {"fp32": str(fp32), "int8": str(int8)}
    if "llama" in systems:
        if importlib.util.find_spec("llama_cpp") is None:
            log("llama-cpp-python is not installed: llama.cpp skipped")
        else:
            from quill.export import export_gguf

            paths = {}
            for t in ("f32", "f16", "q8_0"):
                path = work / f"model-{t}.gguf"
                if not path.exists():
                    log(f"exporting GGUF {t} ...")
                    export_gguf(folder, path, t)
                paths[t] = str(path)
            configs["llama.cpp"] = {**paths, "n_ctx": n_ctx}
    configs.update(peers.prepare(systems, folder, work, onnx, log, notes))
    return [Worker(fam, cfg, work / f"worker-{fam}.log") for fam, cfg in configs.items()]


def run_benchmark(args: argparse.Namespace) -> dict:
    import torch

    log = (lambda *a: print(*a, file=sys.stderr, flush=True))
    folder, label, cache_root = benchmark_model(args)
    work = cache_root / f"{label}-exports"
    work.mkdir(parents=True, exist_ok=True)
    from quill.weights import load_config

    cfg = load_config(folder)
    quick = args.quick
    runs = args.runs or (3 if quick else 5)
    new = args.new_tokens or (32 if quick else NEW_TOKENS)
    new_batched = 16 if quick else 64
    passes = args.decode_passes or (1 if quick else DECODE_PASSES)
    batches = (1, 8) if quick else BATCHES
    systems = set(args.systems.split(","))
    cores = os.cpu_count() or 1
    thread_choices = sorted({1, torch.get_num_threads()})
    load_before = os.getloadavg()
    log(f"model {label}; cores {cores}; load {load_before}; runs {runs}")
    notes: list[str] = []
    workers = start_workers(folder, work, systems, PREFILL_LEN + 8, log, notes, compile=args.compile)
    runners: list[RemoteRunner] = []
    try:
        for w in workers:
            runners += [RemoteRunner(w, **d) for d in w.ready()]
        prompt = list(range(1000, 1000 + PROMPT_LEN))
        long_prompt = [(1000 + 7 * i) % cfg.vocab_size for i in range(PREFILL_LEN)]
        samples = {r.name: Samples() for r in runners}
        probe = BandwidthProbe()

        log("warm-up: choosing each system's thread count ...")
        slow: set[tuple[str, str]] = set()  # measurements over SLOW_S seconds are taken in the first round only
        for r in runners:
            if r.compiled:  # compile the graphs of every batch size before anything is timed
                for b in batches:
                    r.decode(prompt, 4, b)
            tried = {n: r.decode(prompt, new, threads=n) for n in thread_choices}
            r.threads["decode"] = r.threads["batch"] = min(tried, key=tried.get)
            if r.batching and max(batches) > 1 and max(tried.values()) < SLOW_S:
                # batched rows are compute-bound where one row is bandwidth-bound: their best count may differ
                b = 8 if 8 in batches else max(batches)
                tried = {n: r.decode(prompt, 16, b, threads=n) for n in thread_choices}
                r.threads["batch"] = min(tried, key=tried.get)
            tried = {}
            for n in thread_choices:
                tried[n] = r.prefill(long_prompt, threads=n)
                if tried[n] > SLOW_S:
                    slow.add((r.name, "prefill-512"))
                    break
            r.threads["prefill"] = min(tried, key=tried.get)
            if min(tried.values()) > SLOW_S:
                slow.add((r.name, "prefill-512"))
            log(f"  {r.name}: decode {r.threads['decode']} thread(s), batched {r.threads['batch']}, "
                f"prefill {r.threads['prefill']}")
        # one untimed prefill and short batched decodes at the chosen thread counts: first-use work that comes
        # late falls here, not in round 1's samples. Quill's path tuner times each choice again CONFIRM_AFTER
        # seconds after its first timing (in the warm-up above), so the pass waits that long where it tunes:
        # with few systems the warm-up ended sooner, and the second timings fell into round 1's prefill
        from quill.kernels import tune
        if tune.enabled():
            time.sleep(tune.CONFIRM_AFTER)
        t0 = time.perf_counter()
        for r in runners:
            if (r.name, "prefill-512") not in slow:
                r.prefill(long_prompt)
            for b in batches:
                if b > 1 and r.batching:
                    r.decode(prompt, 4, b, threads=r.threads["batch"])
        log(f"settled every system's multi-row work in {time.perf_counter() - t0:.0f} s")
        for i in range(runs):
            t0 = time.perf_counter()
            start = i * len(runners) // runs
            order = runners[start:] + runners[:start]  # no system always first
            for p in range(passes):
                for r in order:
                    if p > 0 and (r.name, "decode") in slow:
                        continue
                    s = samples[r.name]
                    before = probe() if p == 0 else None
                    seconds = r.decode(prompt, new)
                    s.add("decode", i, (new - 1) / seconds)
                    if before is not None:
                        s.bandwidth.append((before + probe()) / 2)
                        s.bounded.append((new - 1) / seconds)
                    if seconds > SLOW_S:
                        slow.add((r.name, "decode"))
            for col in _columns(batches)[1:]:
                for r in order:  # a column's systems one after another: the samples a ratio pairs are close
                    if (i > 0 and (r.name, col) in slow) or (col != "prefill-512" and not r.batching):
                        continue
                    t1 = time.perf_counter()
                    if col == "prefill-512":
                        samples[r.name].add(col, i, PREFILL_LEN / r.prefill(long_prompt))
                    else:
                        b = _batch(col)
                        samples[r.name].add(col, i, b * (new_batched - 1) / r.decode(prompt, new_batched, b,
                                                                                     threads=r.threads["batch"]))
                    if time.perf_counter() - t1 > SLOW_S:
                        slow.add((r.name, col))
            log(f"round {i + 1}/{runs}: {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f}")
        quality, profile = {}, {}
        for r in runners:
            if r.family == "quill" and not r.compiled:  # where a decode step's time goes, at the thread count chosen above
                profiles = [r.worker.call(r.name, "profile", r.threads["decode"], prompt=prompt, new=new)
                            for _ in range(3)]
                profile[r.name] = min(profiles, key=lambda p: p["whole token"])
        if not args.no_quality:
            quality = measure_quality(runners, folder, cfg, notes)
    finally:
        for w in workers:
            w.close()
    bandwidth = [b for r in runners for b in samples[r.name].bandwidth]
    results = []
    for r in runners:
        s = samples[r.name]
        per_token = weight_bytes_per_token(cfg, r.bytes_per_weight)
        d = _median(s.values("decode"))
        measured = [b for b in batches if b > 1 and s.values(f"batch-{b}")]
        results.append({
            "system": r.name, "family": r.family, "precision": r.precision, "threads": dict(r.threads),
            "decode_tok_s": d, "decode_samples": s.values("decode"), "bound_tok_s": _median(s.bandwidth) / per_token,
            "bandwidth_samples_GBps": [b / 1e9 for b in s.bandwidth],
            "pct_of_bound": _median([100 * t * per_token / b for t, b in zip(s.bounded, s.bandwidth)]),
            "prefill_tok_s": _median(s.values("prefill-512")), "prefill_samples": s.values("prefill-512"),
            "batched_tok_s": {1: d, **{b: _median(s.values(f"batch-{b}")) for b in measured}},
            "batched_samples": {str(b): s.values(f"batch-{b}") for b in measured},
            "round_medians": {col: s.round_medians(col, runs) for col in s.rounds},
        })
    report = {
        "model": label, "config": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size},
        "settings": {"prompt": PROMPT_LEN, "new_tokens": new, "prefill": PREFILL_LEN, "batched_new_tokens": new_batched,
                     "batches": list(batches), "runs": runs, "decode_passes": passes, "quick": quick,
                     "thread_choices": thread_choices},
        "machine": machine_info(), "load_before": load_before, "load_after": os.getloadavg(),
        "bandwidth_GBps": _median(bandwidth) / 1e9,
        "bandwidth_range_GBps": [min(bandwidth) / 1e9, max(bandwidth) / 1e9],
        "results": results, "top1_agreement_with_fp32": quality, "quality_positions": min(QUALITY_LEN, cfg.n_positions),
        "notes": notes, "decode_profile_ms": profile,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    report["goals"] = check_goals(results, batches, quality)
    return report


def measure_quality(runners: list[RemoteRunner], folder: Path, cfg, notes: list[str]) -> dict:
    """{system: {mode: agreement}}: each system's teacher-forced top-1 over QUALITY_LEN tokens of the quality
    text against Quill fp32's, in every way the system computes logits (quill/agreement.py)."""
    from quill.agreement import top1_agreement
    from quill.tokenizer import Tokenizer

    ref = next((r for r in runners if r.name == "quill fp32"), None)
    if ref is None:
        notes.append("top-1 agreement: not measured (it needs quill fp32 as the reference)")
        return {}
    n = min(QUALITY_LEN, cfg.n_positions)
    ids = [i % cfg.vocab_size for i in Tokenizer.load(folder).encode(QUALITY_TEXT.read_text())[:n]]
    want = ref.top1(ids, "prefill")
    return {r.name: {mode: top1_agreement(r.top1(ids, mode), want) for mode in r.agreement_modes}
            for r in runners if r.agreement_modes}


def _find(results, system):
    return next((r for r in results if r["system"] == system), None)


PEERS_BY_PRECISION = {"fp32": ("transformers fp32", "onnxruntime fp32", "llama.cpp f32"),
                      "bf16": ("transformers bf16", "llama.cpp f16"),
                      "int8": ("transformers dynamic int8", "onnxruntime int8", "llama.cpp q8_0")}


def _is_peer(r: dict, precision: str) -> bool:
    return r["system"] in PEERS_BY_PRECISION[precision] or (
        r["family"] in ("ctranslate2", "openvino") and r["precision"] == precision)


def _column_median(r: dict, col: str) -> float | None:
    if col == "decode":
        return r["decode_tok_s"]
    return r["prefill_tok_s"] if col == "prefill-512" else r["batched_tok_s"].get(_batch(col))


def _columns(batches) -> list[str]:
    """The columns the goals and the paired table compare, in the report's order."""
    return ["decode", "prefill-512"] + [f"batch-{b}" for b in batches if b > 1]


def _batch(col: str) -> int:
    """The batch size of a "batch-B" column."""
    return int(col.split("-")[1])


def best_peers(results: list[dict], precision: str) -> dict[str, dict]:
    """For each column the peer at `precision` with the highest median there: the one Quill is set against."""
    best: dict[str, dict] = {}
    for r in results:
        if not _is_peer(r, precision):
            continue
        for col in r["round_medians"]:
            value = _column_median(r, col)
            if value and (col not in best or value > _column_median(best[col], col)):
                best[col] = r
    return best


def check_goals(results: list[dict], batches, quality: dict | None = None) -> dict:
    """The issue's targets, each comparison on paired rounds (`paired_ratio`; None where a peer is missing)."""
    g: dict[str, bool | None] = {}

    def at_least(a, col_a, b, col_b, factor):
        ratio = paired_ratio(a, col_a, b, col_b) if a and b else None
        return None if ratio is None else ratio >= factor

    q32, q16, q8 = (_find(results, f"quill {p}") for p in ("fp32", "bf16", "int8"))
    if q32:
        g["fp32 decode >= 90% of bound"] = q32["pct_of_bound"] >= 90
    for q, peer, factor, name in ((q32, "llama.cpp f32", 1, "fp32 decode >= llama.cpp f32"),
                                  (q16, "llama.cpp f16", 1, "bf16 decode >= llama.cpp f16"),
                                  (q8, "llama.cpp q8_0", 1.2, "int8 decode >= 1.2x llama.cpp q8_0"),
                                  (q8, "onnxruntime int8", 1.5, "int8 decode >= 1.5x ORT int8")):
        ok = at_least(q, "decode", _find(results, peer), "decode", factor)
        if ok is not None:
            g[name] = ok
    for p in PEERS_BY_PRECISION:
        q = _find(results, f"quill {p}")
        if not q:
            continue
        best = best_peers(results, p)
        for col in _columns(batches):
            ok = at_least(q, col, best.get(col), col, 1)  # issue 25: at least the best peer at the same precision
            if ok is not None:
                g[f"{p} {col} >= best peer"] = ok
        ok = at_least(q, "decode", best.get("decode"), "decode", 1.3)
        if p == "int8" and ok is not None:
            g["int8 decode >= 1.3x best peer's int8"] = ok
        best_top1 = max((quality[r["system"]]["prefill"] for r in results
                         if _is_peer(r, p) and r["system"] in (quality or {})), default=None)
        if best_top1 is not None and q["system"] in quality:
            g[f"{p} top-1 agreement (prefill) >= best peer's"] = quality[q["system"]]["prefill"] >= best_top1
    if 8 in batches:
        for q in (q32, q16, q8):
            if q and q["batched_tok_s"].get(8):
                g[f"{q['precision']} batch-8 >= 5x batch-1"] = at_least(q, "batch-8", q, "decode", 5)
                if q["precision"] != "fp32":  # issue 25, on AVX-512 (VNNI and BF16 dot products)
                    g[f"{q['precision']} batch-8 >= 4x batch-1"] = at_least(q, "batch-8", q, "decode", 4)
                if q["batched_tok_s"].get(16):
                    g[f"{q['precision']} batch-16 >= batch-8"] = at_least(q, "batch-16", q, "batch-8", 1)
    return g


# ---- reporting --------------------------------------------------------------------------------------------

def format_report(rep: dict) -> str:
    res = rep["results"]
    batches = rep["settings"]["batches"]
    lines = [f"# Decode benchmark: {rep['model']} ({rep['time']})", "",
             f"Machine: {rep['machine']['cpu']}, {rep['machine']['cores']} cores, torch threads "
             f"{rep['machine']['torch_threads']}, SIMD flags: {' '.join(rep['machine']['simd_flags'])}, Quill's kernels: "
             f"{rep['machine']['kernels']}; load average "
             f"{rep['load_before'][0]:.1f} before, {rep['load_after'][0]:.1f} after. Measured read bandwidth "
             f"{rep['bandwidth_GBps']:.1f} GB/s (torch sums over 1 GiB in 2 MB pages for 1 s before and after "
             "each round's first batch-1 decode sample; median, range {:.1f}-{:.1f}).".format(*rep["bandwidth_range_GBps"]),
             f"Prompt {rep['settings']['prompt']} tokens, {rep['settings']['new_tokens']} new tokens (greedy, EOS "
             f"ignored), prefill {rep['settings']['prefill']} tokens, batched rows generate "
             f"{rep['settings']['batched_new_tokens']} tokens each; medians of {rep['settings']['runs']} rounds "
             f"({rep['settings'].get('decode_passes', 1)} batch-1 decode samples a round) after a "
             "warm-up that picks each system's thread count (1 or all cores) for decode, batched rows and prefill, "
             "systems interleaved within each round, the order rotated from round to round, "
             f"each family in its own process (measurements over {SLOW_S:.0f} s are taken once). "
             "Bound = bandwidth measured around the sample / weight bytes per token; % of bound is the median over "
             "the samples with a bandwidth, the bound column the median bound.", ""]
    head = "| system | threads (decode/batched/prefill) | decode tok/s | % of bound | bound | prefill-512 tok/s | " + " | ".join(
        f"batch {b} tok/s" for b in batches if b != 1) + " | batch 8 / batch 1 |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in res:
        bt = r["batched_tok_s"]
        cells = [r["system"], f"{r['threads'].get('decode')}/{r['threads'].get('batch', '-')}/{r['threads'].get('prefill')}", f"{r['decode_tok_s']:.1f}", f"{r['pct_of_bound']:.0f}%", f"{r['bound_tok_s']:.0f}",
                 f"{r['prefill_tok_s']:.0f}"]
        cells += [f"{bt[b]:.1f}" if bt.get(b) else "-" for b in batches if b != 1]
        cells.append(f"{bt[8] / r['decode_tok_s']:.2f}x" if bt.get(8) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    quills = [r for r in res if r["family"] == "quill"]
    peers = [r for r in res if r["family"] != "quill"]
    if quills and peers:
        lines += ["", "Decode speed-up of Quill over each peer (median tok/s ratio):", "",
                  "| | " + " | ".join(p["system"] for p in peers) + " |", "|---|" + "---|" * len(peers)]
        for q in quills:
            lines.append(f"| {q['system']} | " + " | ".join(f"{q['decode_tok_s'] / p['decode_tok_s']:.2f}x"
                                                          for p in peers) + " |")
        lines += ["", "Prefill-512 speed-up of Quill over each peer:", "",
                  "| | " + " | ".join(p["system"] for p in peers) + " |", "|---|" + "---|" * len(peers)]
        for q in quills:
            lines.append(f"| {q['system']} | " + " | ".join(f"{q['prefill_tok_s'] / p['prefill_tok_s']:.2f}x"
                                                          for p in peers) + " |")
    rows = []
    for q in quills:
        best = best_peers(res, q["precision"])
        for col in _columns(batches):
            ratios = round_ratios(q, col, best[col], col) if col in best and col in q["round_medians"] else []
            if ratios:
                rows.append(f"| {q['system']} | {col} | {best[col]['system']} | {statistics.median(ratios):.2f}x | "
                            f"{min(ratios):.2f}-{max(ratios):.2f}x | "
                            f"{_column_median(q, col) / _column_median(best[col], col):.2f}x |")
    if rows:
        lines += ["", "Quill over the best peer at the same precision (the highest median), column by column: the "
                  "median of the rounds' ratios (each round's median over the peer's, measured seconds apart; the "
                  "goals compare these), the rounds' range, and the ratio of the whole run's medians:", "",
                  "| Quill | column | best peer | paired ratio | rounds | ratio of medians |", "|---|---|---|---|---|---|",
                  *rows]
    prof = rep.get("decode_profile_ms") or {}
    if prof:
        names = list(prof)
        parts = list(next(iter(prof.values())))
        lines += ["", "Where a Quill decode step's time goes (ms per token, best of 3 runs of "
                  f"{rep['settings']['new_tokens']} tokens, at the decode thread count above):", "",
                  "| part | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for part in parts:
            lines.append(f"| {part} | " + " | ".join(f"{prof[n][part]:.2f}" for n in names) + " |")
    if rep.get("top1_agreement_with_fp32"):
        lines += ["", f"Top-1 agreement with Quill fp32 (= transformers fp32), teacher-forced over "
                  f"{rep['quality_positions']} tokens of bench/data/quality.txt; prefill: the text in one forward, "
                  "decode: 32 tokens prefilled, then one a step:", "", "| system | prefill | decode |", "|---|---|---|"]
        for name, modes in rep["top1_agreement_with_fp32"].items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * modes[m]:.1f}%" if m in modes else "-"
                                                    for m in ("prefill", "decode")) + " |")
    if rep.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in rep["notes"]]
    if rep.get("goals"):
        lines += ["", "Goals (this run):", ""] + [f"- {'PASS' if ok else 'FAIL'}: {k}" for k, ok in rep["goals"].items()]
    return "\n".join(lines) + "\n"


def plot_report(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = rep["results"]
    colors = {"quill": "tab:blue", "transformers": "tab:orange", "onnxruntime": "tab:green", "llama.cpp": "tab:red"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    names = [r["system"] for r in res]
    ax = axes[0]
    ax.barh(names, [r["decode_tok_s"] for r in res], color=[colors.get(r["family"], "gray") for r in res])
    for i, r in enumerate(res):
        ax.plot([r["bound_tok_s"]] * 2, [i - 0.4, i + 0.4], color="black", lw=1)
    ax.invert_yaxis()
    ax.set_xlabel("tok/s (black tick: bandwidth bound)")
    ax.set_title(f"batch-1 decode, {rep['settings']['new_tokens']} new tokens")
    ax = axes[1]
    ax.barh(names, [r["prefill_tok_s"] for r in res], color=[colors.get(r["family"], "gray") for r in res])
    ax.invert_yaxis()
    ax.set_yticklabels([])
    ax.set_xlabel("tok/s")
    ax.set_title(f"prefill {rep['settings']['prefill']} tokens")
    ax = axes[2]
    for r in res:
        bt = {int(k): v for k, v in r["batched_tok_s"].items() if v}
        if len(bt) > 1:
            ks = sorted(bt)
            ax.plot(ks, [bt[k] for k in ks], marker="o", label=r["system"], color=colors.get(r["family"], "gray"),
                    linestyle={"fp32": "-", "bf16": "--", "int8": ":"}.get(r["precision"], "-"))
    ax.set_xlabel("sequences decoded together")
    ax.set_ylabel("total tok/s")
    ax.set_xscale("log", base=2)
    ax.set_title("batched decode")
    ax.legend(fontsize=7)
    fig.suptitle(f"{rep['model']} on {rep['machine']['cpu']} ({rep['machine']['cores']} cores, "
                 f"{rep['bandwidth_GBps']:.1f} GB/s), {rep['time']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/decode.py", description=__doc__.splitlines()[1])
    add_model_arguments(p)
    p.add_argument("--quick", action="store_true", help="short run: 3 rounds, 32 new tokens, batches 1 and 8")
    p.add_argument("--decode-passes", type=int, default=None,
                   help=f"batch-1 decode samples of each system a round (default {DECODE_PASSES}, quick 1)")
    p.add_argument("--systems", default="quill,transformers,ort,llama,ct2,openvino",
                   help="comma-separated subset of quill,transformers,ort,llama,ct2,openvino")
    p.add_argument("--no-quality", action="store_true", help="skip the top-1 agreement check")
    p.add_argument("--compile", action="store_true", help="also measure Quill fp32 through torch.compile")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: Quill (CUDA graphs) against transformers on the GPU (bench/decode_cuda.py)")
    args = p.parse_args(argv)
    if args.device == "cuda":
        import decode_cuda

        return decode_cuda.run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rep = run_benchmark(args)
    from quill.kernels.cpu import VARIANTS

    # one table per CPU kind: named by the kernel variant Quill ran (quill.kernels.cpu; "torch" without them)
    variant = rep["machine"]["kernels"] if rep["machine"]["kernels"] in VARIANTS else "torch"
    stem = f"decode-{rep['model']}-{variant}" + ("-quick" if rep["settings"]["quick"] else "")
    plot_report(rep, out / f"{stem}.png")
    write_report(out, stem, rep, format_report(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
