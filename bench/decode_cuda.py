#!/usr/bin/env python3
"""The decode benchmark on a CUDA GPU: Quill (decode steps replayed from CUDA graphs, and eager steps for
comparison) against transformers' eager `generate`, same process, same random GPT-2 weights.

    python bench/decode_cuda.py     # GPT-2 124M; writes docs/benchmarks/decode-*-cuda.{json,md}
    python bench/decode.py --device cuda   # the same

Batch-1 decode is what CUDA graphs are for: a GPT-2 124M step is a few hundred kernels of a few microseconds
each, so launching them one by one from Python, not the GPU, sets the pace. Figures are medians of `--runs`
rounds after a warm-up, systems interleaved within each round; the bound is GPU read bandwidth over bytes of
weights per token.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's quill

import torch  # noqa: E402

from runners import (  # noqa: E402
    BYTES_PER_WEIGHT, NEW_TOKENS, PREFILL_LEN, PROMPT_LEN, QuillRunner, Runner, TransformersRunner,
    add_model_arguments, benchmark_model, weight_bytes_per_token, write_report,
)

BATCHES = (1, 8, 32)
SYSTEMS = (  # family, precision, CUDA graphs
    ("quill", "bf16", True),
    ("quill", "bf16", False),
    ("quill", "fp32", True),
    ("transformers", "bf16", False),
    ("transformers", "fp32", False),
)


def gpu_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the median time of `repeats` sums over a `gib` GiB bf16 tensor."""
    t = torch.ones(int(gib * (1 << 30)) // 2, dtype=torch.bfloat16, device="cuda")
    t.sum()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t.sum()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return t.nbytes / statistics.median(times)


def _runner(folder: Path, family: str, precision: str, graphs: bool) -> Runner:
    if family == "quill":
        return QuillRunner(str(folder), precision, device="cuda", cuda_graphs=graphs)
    return TransformersRunner(str(folder), precision, device="cuda")


def run_cuda_benchmark(args: argparse.Namespace, folder: Path, label: str) -> dict:
    """Measure every system of SYSTEMS; returns the report (medians, samples, ratios, goal)."""
    from quill.weights import load_config

    cfg = load_config(folder)
    runs = args.runs or 5
    new = args.new_tokens or NEW_TOKENS
    runners = [(_runner(folder, family, precision, graphs), graphs) for family, precision, graphs in SYSTEMS]
    systems = {r.name: r for r, _ in runners}
    prompt = list(range(1000, 1000 + PROMPT_LEN))
    long_prompt = [(1000 + 7 * i) % cfg.vocab_size for i in range(PREFILL_LEN)]
    samples = {name: {"decode": {b: [] for b in BATCHES}, "prefill": []} for name in systems}
    for sys_ in systems.values():  # warm-up: CUDA graphs captured, cuBLAS heuristics cached
        for b in BATCHES:
            sys_.decode(prompt, 8, b)
        sys_.prefill(long_prompt)
    bandwidth = []
    for _ in range(runs):
        bandwidth.append(gpu_bandwidth())
        for name, sys_ in systems.items():
            for b in BATCHES:
                samples[name]["decode"][b].append(b * (new - 1) / sys_.decode(prompt, new, b))
            samples[name]["prefill"].append(PREFILL_LEN / sys_.prefill(long_prompt))
    bw = statistics.median(bandwidth)
    results = []
    for r, graphs in runners:
        s = samples[r.name]
        bound = bw / weight_bytes_per_token(cfg, BYTES_PER_WEIGHT[r.precision])
        decode = {b: statistics.median(v) for b, v in s["decode"].items()}
        results.append({"system": r.name, "family": r.family, "precision": r.precision, "cuda_graphs": graphs,
                        "decode_tok_s": decode, "bound_tok_s": bound,
                        "pct_of_bound": 100 * decode[1] / bound, "prefill_tok_s": statistics.median(s["prefill"]),
                        "samples": {"decode": {str(b): v for b, v in s["decode"].items()}, "prefill": s["prefill"]}})
    by_name = {r["system"]: r for r in results}
    ratio = by_name["quill bf16"]["decode_tok_s"][1] / by_name["transformers bf16"]["decode_tok_s"][1]
    return {"model": label, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "settings": {"prompt": PROMPT_LEN, "new_tokens": new, "prefill": PREFILL_LEN, "batches": list(BATCHES),
                         "runs": runs},
            "bandwidth_GBps": bw / 1e9, "bandwidth_samples_GBps": [b / 1e9 for b in bandwidth],
            "results": results, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "goals": {"bf16 batch-1 decode >= 3x transformers eager generate": ratio >= 3},
            "quill_bf16_over_transformers_bf16": ratio}


def format_cuda_report(rep: dict) -> str:
    s = rep["settings"]
    lines = [f"# Decode benchmark on CUDA: {rep['model']} ({rep['time']})", "",
             f"Device: {rep['device']}, torch {rep['torch']}. Measured read bandwidth {rep['bandwidth_GBps']:.0f} GB/s.",
             f"Prompt {s['prompt']} tokens, {s['new_tokens']} new tokens per row (greedy, EOS ignored), prefill "
             f"{s['prefill']} tokens; median of {s['runs']} rounds after a warm-up, systems interleaved. Bound = "
             "bandwidth / weight bytes per token.", "",
             "| system | CUDA graphs | " + " | ".join(f"batch {b} tok/s" for b in s["batches"])
             + " | % of bound (batch 1) | prefill-512 tok/s |", "|---|" + "---|" * (len(s["batches"]) + 3)]
    for r in rep["results"]:
        lines.append(f"| {r['system']} | {'yes' if r['cuda_graphs'] else 'no'} | "
                     + " | ".join(f"{r['decode_tok_s'][b]:.0f}" for b in s["batches"])
                     + f" | {r['pct_of_bound']:.1f}% | {r['prefill_tok_s']:.0f} |")
    lines += ["", f"Batch-1 bf16 decode, Quill over transformers' eager generate: "
              f"**{rep['quill_bf16_over_transformers_bf16']:.2f}x**", "", "Goals (this run):", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {goal}" for goal, ok in rep["goals"].items()]
    return "\n".join(lines) + "\n"



def run(args: argparse.Namespace) -> int:
    """Measure, then print and write the report (the flags of `add_model_arguments`)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder, label, _ = benchmark_model(args)
    rep = run_cuda_benchmark(args, folder, label)
    write_report(out, f"decode-{rep['model']}-cuda", rep, format_cuda_report(rep))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/decode_cuda.py", description=__doc__.splitlines()[1])
    add_model_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
