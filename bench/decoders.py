"""Decoding strategies, Quill against transformers' `generate`, in one process on the same weights.

The strategies of the "How to generate text" comparison: greedy, sampling with top-k 60 + top-p 0.95,
nucleus sampling (top-p 0.92), beam search (5 beams), diverse beam search and contrastive search; 25 new
tokens after the prompt "I enjoy walking with my cute dog" (EOS suppressed until then on both sides, so
every call makes exactly 25 tokens). GPT-2 124M / 355M / 774M shapes with random weights: each is built with
transformers' GPT2Config, saved with save_pretrained to a temporary folder and loaded from that folder by
both. Each (size, strategy, implementation) gets a warm-up call, then `--repeats` timed calls, interleaved
(Quill and transformers alternate, in alternating order); the table shows the medians.

    python bench/decoders.py --sizes 124M --repeats 3        # quick
    python bench/decoders.py --sizes 124M,355M,774M           # the full table

Results go to docs/decoders.md and docs/decoders.json (sizes measured before and not re-run are kept).
transformers 5 moved diverse beam search and contrastive search to Hub "custom generate" repositories,
which this offline machine cannot fetch; for those rows the transformers column says why it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quill  # noqa: E402
from quill.tokenizer import Tokenizer  # noqa: E402

SIZES = {
    "124M": dict(n_embd=768, n_layer=12, n_head=12),
    "355M": dict(n_embd=1024, n_layer=24, n_head=16),
    "774M": dict(n_embd=1280, n_layer=36, n_head=20),
}
PROMPT = "I enjoy walking with my cute dog"
NEW_TOKENS = 25

# name, Quill keywords, transformers keywords
STRATEGIES = [
    ("greedy", dict(temperature=0), dict(do_sample=False)),
    ("sampling, top-k 60 + top-p 0.95", dict(top_k=60, top_p=0.95, seed=0), dict(do_sample=True, top_k=60, top_p=0.95)),
    ("sampling, top-p 0.92", dict(top_p=0.92, seed=0), dict(do_sample=True, top_p=0.92, top_k=0)),
    ("beam search, 5 beams", dict(num_beams=5, early_stopping=True),
     dict(do_sample=False, num_beams=5, early_stopping=True)),
    ("diverse beam, 4 beams in 2 groups, penalty 1.0", dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0),
     dict(do_sample=False, num_beams=4, num_beam_groups=2, diversity_penalty=1.0)),
    ("contrastive, alpha 0.6, top-k 4", dict(penalty_alpha=0.6, top_k=4),
     dict(do_sample=False, penalty_alpha=0.6, top_k=4)),
]


def build(size: str, folder: Path):
    """A random GPT-2 of this shape saved to `folder` with the GPT-2 tokenizer; returns (transformers model, engine)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**SIZES[size])).eval()
    hf.save_pretrained(folder)
    Tokenizer.gpt2().save(folder)
    return hf, quill.load(folder)


def timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - t0, tokens


def run_size(size: str, repeats: int, log) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        hf, engine = build(size, Path(tmp) / size)
        log(f"{size}: built and loaded in {time.perf_counter() - t0:.1f} s")
    ids = engine.tokenizer.encode(PROMPT)
    input_ids = torch.tensor([ids])
    eos = engine.config.eos_token_ids[0]

    def quill_call(kw):
        def call():
            out = engine.generate(ids, NEW_TOKENS, min_tokens=NEW_TOKENS, **kw)
            return len(out.tokens)
        return call

    def hf_call(kw):
        def call():
            with torch.inference_mode():
                out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, pad_token_id=eos, **kw)
            return out.shape[1] - len(ids)
        return call

    rows = []
    calls = []
    for name, qkw, hkw in STRATEGIES:
        row = dict(size=size, strategy=name, quill=[], transformers=[], quill_tokens=None, transformers_tokens=None,
                   transformers_error=None)
        q, h = quill_call(qkw), hf_call(hkw)
        _, row["quill_tokens"] = timed(q)  # warm-up
        try:
            _, row["transformers_tokens"] = timed(h)
        except Exception as e:  # noqa: BLE001 - strategies this transformers no longer ships
            row["transformers_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            h = None
        rows.append(row)
        calls.append((row, q, h))
    for r in range(repeats):
        for row, q, h in calls:
            order = [("quill", q), ("transformers", h)]
            for impl, fn in order if r % 2 == 0 else order[::-1]:
                if fn is not None:
                    row[impl].append(timed(fn)[0])
        log(f"{size}: round {r + 1}/{repeats} done")
    for row in rows:
        row["quill_s"] = statistics.median(row["quill"])
        row["transformers_s"] = statistics.median(row["transformers"]) if row["transformers"] else None
        row["speedup"] = row["transformers_s"] / row["quill_s"] if row["transformers_s"] else None
        log(f"{size} | {row['strategy']} | quill {row['quill_s']:.3f} s | transformers "
            + (f"{row['transformers_s']:.3f} s | x{row['speedup']:.2f}" if row["transformers_s"] else "n/a"))
    return rows


def environment(threads: int) -> dict:
    import transformers

    return dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), torch_threads=threads,
                load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
                date=time.strftime("%Y-%m-%d %H:%M"))


def markdown(results: dict) -> str:
    lines = [
        "# Decoding strategies: Quill and transformers",
        "",
        "Seconds per `generate` call (median of the timed runs after a warm-up), 25 new tokens after the prompt",
        f"\"{PROMPT}\", float32 on CPU, random weights in GPT-2 shapes, Quill and transformers in the same process",
        "on the same checkpoint folder, calls interleaved. \"speed-up\" is transformers' time over Quill's.",
        "Produced by `bench/decoders.py` (see its docstring); raw numbers in `docs/decoders.json`.",
        "",
    ]
    for size, env in results["environments"].items():
        load = ", ".join(f"{x:.1f}" for x in env["load_average"] or [])
        lines.append(f"- GPT-2 {size}: {env['date']}, {env['cores']} CPU cores ({env['cpu']}), torch {env['torch']} "
                     f"with {env['torch_threads']} thread(s), transformers {env['transformers']}, Python "
                     f"{env['python']}; load average {load} after the run.")
    lines += [
        "",
        "| model | strategy | Quill s/call | transformers s/call | speed-up | timed runs |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    missing = set()
    for row in results["rows"]:
        if row["transformers_s"] is not None:
            hf, ratio = f"{row['transformers_s']:.3f}", f"{row['speedup']:.2f}x"
        else:
            hf, ratio = "n/a (1)", "-"
            missing.add(row["transformers_error"])
        lines.append(f"| GPT-2 {row['size']} | {row['strategy']} | {row['quill_s']:.3f} | {hf} | {ratio} | "
                     f"{len(row['quill'])} |")
    lines += [
        "",
        "## The strategies in Quill",
        "",
        "```python",
        "engine = quill.load(\"path/to/gpt2\")  # a Hugging Face GPT-2 checkpoint folder",
        "engine.generate(prompt, 25, temperature=0)                          # greedy",
        "engine.generate(prompt, 25, top_k=60, top_p=0.95, seed=0)           # sampling",
        "engine.generate(prompt, 25, top_p=0.92)                             # nucleus sampling",
        "engine.generate(prompt, 25, num_beams=5, early_stopping=True, n=3)  # beam search, 3 best beams",
        "engine.generate(prompt, 25, num_beams=4, num_beam_groups=2, diversity_penalty=1.0)  # diverse beams",
        "engine.generate(prompt, 25, penalty_alpha=0.6, top_k=4)             # contrastive search",
        "```",
        "",
        "Search settings live in `quill.search.SearchParams` (not `SamplingParams`): beam search follows",
        "transformers 5's `generate(num_beams=..., do_sample=False)` (same sequences and `sequences_scores`, which",
        "Quill reports as `Choice.score`), diverse beam search and contrastive search follow transformers 4.",
        "Penalties and bans (repetition_penalty, no_repeat_ngram_size, logit_bias, min_tokens, ignore_eos, ...),",
        "stop strings, stop_token_ids, logprobs and echo work with every strategy; the sampling warpers",
        "(temperature, top_p, min_p, typical_p) and max_flops budgets are refused with beam and contrastive",
        "search, naming the parameter. Beam results arrive when the search ends (a stream gets the best beam's",
        "text at the end); contrastive search streams token by token.",
        "",
        "Notes:",
        "",
    ]
    if missing:
        lines += [
            "1. transformers 5 no longer ships diverse (group) beam search and contrastive search: `generate` points",
            "   to the Hub \"custom generate\" repositories (`transformers-community/group-beam-search`,",
            "   `transformers-community/contrastive-search`), which need `trust_remote_code` and a download this",
            "   offline machine cannot make. What it said: " + "; ".join(sorted(m.rstrip(".") for m in missing if m))
            + ".",
            "   Quill's versions follow transformers 4's: tests/test_search.py checks them against reference",
            "   implementations, and they were also checked once, by hand, against transformers 4.46.3's own",
            "   `_group_beam_search` (120 settings: identical sequences and scores) and `_contrastive_search`",
            "   (120 settings: identical sequences).",
        ]
    skipped = [s for s in SIZES if s not in {r["size"] for r in results["rows"]}]
    if skipped:
        lines += [f"- Not measured here: GPT-2 {', '.join(skipped)}; `python bench/decoders.py --sizes "
                  f"{','.join(skipped)}` adds it (on the shared 2-core machine of these runs, one round of the six "
                  "strategies at 774M would take several minutes).", ]
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="124M,355M,774M", help="comma-separated: " + ", ".join(SIZES))
    p.add_argument("--repeats", type=int, default=5, help="timed calls per strategy and implementation")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=str(ROOT / "docs" / "decoders.md"))
    p.add_argument("--json", default=str(ROOT / "docs" / "decoders.json"))
    p.add_argument("--note", action="append", default=[], help="a line to add to the notes of the report")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the JSON, measure nothing")
    args = p.parse_args(argv)
    if args.report_only:
        results = json.loads(Path(args.json).read_text())
        results["notes"] = list(dict.fromkeys(results.get("notes", []) + args.note))
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        Path(args.out).write_text(markdown(results))
        print(markdown(results))
        return
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        p.error(f"unknown size {unknown[0]!r} (known: {', '.join(SIZES)})")
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rows = []
    for size in sizes:
        rows += run_size(size, args.repeats, log)
    previous = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    kept = [r for r in previous.get("rows", []) if r["size"] not in sizes]
    order = list(SIZES)
    environments = {s: e for s, e in previous.get("environments", {}).items() if s not in sizes}
    environments.update({s: environment(torch.get_num_threads()) for s in sizes})
    results = dict(environments={s: environments[s] for s in order if s in environments},
                   rows=sorted(kept + rows, key=lambda r: order.index(r["size"])),
                   notes=list(dict.fromkeys(previous.get("notes", []) + args.note)))
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    report = markdown(results)
    Path(args.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
