"""`quill bench decode` (also `bench/decode.py`): Quill against transformers, ONNX Runtime and llama.cpp.

One run, on this machine, for one model (default: a random-initialised GPT-2 124M; `--model` for others):

1. memory read bandwidth (a sum over a 1 GiB fp32 tensor, once per round) and from it the decode bound
   of each precision: bandwidth / bytes of weights read per token;
2. batch-1 decode tok/s: 32-token prompt, 128 new tokens, greedy, EOS ignored, timed from the first
   generated token to the last (prefill excluded);
3. prefill tok/s: a 512-token prompt up to its first generated token;
4. batched decode tok/s (all rows together) for 1, 4, 8 and 16 sequences;
5. quality: top-1 agreement of bf16 and int8 with fp32 along a 160-token greedy fp32 sequence.

Systems: Quill fp32/bf16/int8; transformers fp32/bf16/dynamic int8 (every Linear incl. lm_head, after
turning GPT-2's Conv1D layers into Linear); ONNX Runtime fp32/int8 (Quill's exporter, int8 via
onnxruntime.quantization.quantize_dynamic); llama.cpp f32/f16/q8_0 when llama-cpp-python is installed.
Every measurement is repeated `--runs` times after a warm-up, with systems interleaved round by round so
that load from other processes falls on all of them alike; tables report medians. Results go to
docs/benchmarks/ as JSON, Markdown and a PNG chart.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

PROMPT_LEN, NEW_TOKENS, PREFILL_LEN = 32, 128, 512
BATCHES = (1, 4, 8, 16)
SIZES = {"124M": dict(n_embd=768, n_layer=12, n_head=12), "355M": dict(n_embd=1024, n_layer=24, n_head=16)}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


# ---- machine ----------------------------------------------------------------------------------------------

def memory_bandwidth(gib: float = 1.0, repeats: int = 3) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` sums over a `gib` GiB fp32 tensor (all threads)."""
    t = torch.ones(int(gib * (1 << 30)) // 4)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - t0)
    n = t.nbytes
    del t
    return n / best


def machine_info() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    flags = ""
    with contextlib.suppress(OSError):
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "avx512": "avx512f" in flags, "avx2": "avx2" in flags, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def weight_bytes_per_token(cfg, bytes_per_weight: float) -> float:
    """Bytes of weight matrices one decode step reads: every block's projections and the (tied) head."""
    c, i, v = cfg.n_embd, cfg.inner_dim, cfg.vocab_size
    return (cfg.n_layer * (3 * c * c + c * c + 2 * c * i) + v * c) * bytes_per_weight


# ---- runners ----------------------------------------------------------------------------------------------

@dataclass
class Runner:
    """One system at one precision; subclasses implement decode/prefill/batched and return seconds."""

    name: str
    family: str
    precision: str
    bytes_per_weight: float
    batching: bool = True

    def decode(self, prompt: list[int], new: int, batch: int = 1) -> float:
        """Seconds from the first generated token to the last (`new` tokens per row, `batch` rows)."""
        raise NotImplementedError

    def prefill(self, prompt: list[int]) -> float:
        """Seconds from the call to the first generated token."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class QuillRunner(Runner):
    def __init__(self, folder: Path, precision: str):
        import quill

        dtype = {"fp32": "float32", "bf16": "bfloat16", "int8": "float32"}[precision]
        self.engine = quill.load(folder, dtype=dtype, quantize="int8" if precision == "int8" else None)
        super().__init__(f"quill {precision}", "quill", precision, {"fp32": 4, "bf16": 2, "int8": 1}[precision])

    def decode(self, prompt, new, batch=1):
        events = self.engine.events(prompt, new, n=batch, temperature=0, ignore_eos=True)
        for i, _ in enumerate(events):
            if i == batch - 1:
                t0 = time.perf_counter()
        return time.perf_counter() - t0

    def prefill(self, prompt):
        t0 = time.perf_counter()
        for _ in self.engine.events(prompt, 1, temperature=0, ignore_eos=True):
            pass
        return time.perf_counter() - t0


class _FirstTokenTimer:
    """A transformers streamer that records when the first generated token arrives."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # the first put is the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


def conv1d_to_linear(model: torch.nn.Module) -> None:
    """Replace transformers' Conv1D ([in, out] weights) by equivalent nn.Linear layers, in place."""
    from transformers.pytorch_utils import Conv1D

    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, Conv1D):
                lin = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
                lin.weight.data = child.weight.data.t().contiguous()
                lin.bias.data = child.bias.data
                setattr(mod, child_name, lin)


class TransformersRunner(Runner):
    def __init__(self, folder: Path, precision: str):
        import warnings

        from transformers import GPT2LMHeadModel

        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model = GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).eval()
        if precision == "int8":
            conv1d_to_linear(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        model.generation_config.pad_token_id = model.config.eos_token_id
        self.model = model
        name = {"fp32": "fp32", "bf16": "bf16", "int8": "dynamic int8"}[precision]
        super().__init__(f"transformers {name}", "transformers", precision,
                         {"fp32": 4, "bf16": 2, "int8": 1}[precision])

    def decode(self, prompt, new, batch=1):
        ids = torch.tensor([prompt] * batch)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True)
        with torch.inference_mode():
            if batch == 1:  # a streamer times the first token (streamers take one row only)
                timer = _FirstTokenTimer()
                self.model.generate(ids, max_new_tokens=new, min_new_tokens=new, streamer=timer, **kw)
                return time.perf_counter() - timer.first
            t0 = time.perf_counter()  # rows: total time minus that of a one-token generate (the prefill)
            self.model.generate(ids, max_new_tokens=1, **kw)
            t1 = time.perf_counter()
            self.model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
            t2 = time.perf_counter()
        return (t2 - t1) - (t1 - t0)

    def prefill(self, prompt):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model(ids, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - t0


class OrtRunner(Runner):
    def __init__(self, onnx_path: Path, precision: str, threads: int):
        import numpy as np
        import onnxruntime as ort

        from quill.export import onnx_names

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        past = self.sess.get_inputs()[1].shape  # [batch, n_head, past, head_dim]
        self.n_head, self.head_dim = int(past[1]), int(past[3])
        self.names = onnx_names((len(self.sess.get_inputs()) - 1) // 2)[0]
        self.np = np
        super().__init__(f"onnxruntime {precision}", "onnxruntime", precision, {"fp32": 4, "int8": 1}[precision])

    def _run(self, ids, past):
        feed = {"input_ids": ids, **dict(zip(self.names[1:], past))}
        out = self.sess.run(None, feed)
        return out[0][:, -1].argmax(-1), out[1:]

    def _empty(self, batch):
        z = self.np.zeros((batch, self.n_head, 0, self.head_dim), self.np.float32)
        return [z] * (len(self.names) - 1)

    def decode(self, prompt, new, batch=1):
        np = self.np
        tok, past = self._run(np.array([prompt] * batch, dtype=np.int64), self._empty(batch))
        t0 = time.perf_counter()
        for _ in range(new - 1):
            tok, past = self._run(tok[:, None].astype(np.int64), past)
        return time.perf_counter() - t0

    def prefill(self, prompt):
        t0 = time.perf_counter()
        self._run(self.np.array([prompt], dtype=self.np.int64), self._empty(1))
        return time.perf_counter() - t0


class LlamaRunner(Runner):
    def __init__(self, gguf_path: Path, precision: str, threads: int, n_ctx: int):
        import llama_cpp
        import numpy as np

        self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=512, n_ubatch=512,
                                   n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
        self.np = np
        super().__init__(f"llama.cpp {precision}", "llama.cpp", precision,
                         {"f32": 4, "f16": 2, "q8_0": 34 / 32}[precision], batching=False)

    def _next(self):
        return int(self.np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def decode(self, prompt, new, batch=1):
        llm = self.llm
        llm.reset()
        llm.eval(prompt)
        tok = self._next()
        t0 = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([tok])
            tok = self._next()
        return time.perf_counter() - t0

    def prefill(self, prompt):
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        self._next()
        return time.perf_counter() - t0

    def close(self):
        self.llm.close()


# ---- the run ----------------------------------------------------------------------------------------------

def random_gpt2(size: str, folder: Path, seed: int = 0) -> Path:
    """A random-initialised GPT-2 of `size` with the GPT-2 tokenizer, saved (once) into `folder`."""
    if (folder / "config.json").exists():
        return folder
    from transformers import GPT2Config, GPT2LMHeadModel

    from quill.tokenizer import Tokenizer

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**SIZES[size]))
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    Tokenizer.gpt2().save(tmp)
    tmp.rename(folder)
    return folder


@dataclass
class Samples:
    decode: list[float] = field(default_factory=list)
    prefill: list[float] = field(default_factory=list)
    batched: dict[int, list[float]] = field(default_factory=dict)


def _median(xs):
    return statistics.median(xs) if xs else None


def build_runners(folder: Path, work: Path, systems: set[str], threads: int, n_ctx: int, log) -> list[Runner]:
    import importlib.util

    runners: list[Runner] = []
    if "quill" in systems:
        for p in ("fp32", "bf16", "int8"):
            runners.append(QuillRunner(folder, p))
    if "transformers" in systems and importlib.util.find_spec("transformers"):
        for p in ("fp32", "bf16", "int8"):
            runners.append(TransformersRunner(folder, p))
    if "ort" in systems and importlib.util.find_spec("onnxruntime"):
        from quill.export import export_onnx, quantize_onnx_int8

        fp32 = work / "onnx" / "model.onnx"
        if not fp32.exists():
            log("exporting ONNX ...")
            export_onnx(folder, fp32.parent, last_logits_only=True)
        int8 = work / "onnx-int8" / "model.onnx"
        if not int8.exists():
            log("quantising ONNX (onnxruntime quantize_dynamic) ...")
            quantize_onnx_int8(fp32, int8)
        runners += [OrtRunner(fp32, "fp32", threads), OrtRunner(int8, "int8", threads)]
    if "llama" in systems:
        if importlib.util.find_spec("llama_cpp") is None:
            log("llama-cpp-python is not installed: llama.cpp skipped")
        else:
            from quill.export import export_gguf

            for t in ("f32", "f16", "q8_0"):
                path = work / f"model-{t}.gguf"
                if not path.exists():
                    log(f"exporting GGUF {t} ...")
                    export_gguf(folder, path, t)
                runners.append(LlamaRunner(path, t, threads, n_ctx))
    return runners


def top1_agreement(folder: Path, n_tokens: int = 160) -> dict[str, float]:
    """Share of positions where bf16 / int8 Quill pick the same next token as fp32 (teacher-forced)."""
    import quill

    ref = quill.load(folder)
    prompt = list(range(1000, 1000 + PROMPT_LEN))
    seq = prompt + ref.generate(prompt, n_tokens - PROMPT_LEN, temperature=0, ignore_eos=True).tokens
    ids = torch.tensor([seq])
    with torch.inference_mode():
        want = ref.model(ids)[0].float().argmax(-1)
        out = {}
        for name, kw in (("bf16", dict(dtype="bfloat16")), ("int8", dict(quantize="int8"))):
            got = quill.load(folder, **kw).model(ids)[0].float().argmax(-1)
            out[name] = float((got == want).float().mean())
    return out


def run_benchmark(args: argparse.Namespace) -> dict:
    log = (lambda *a: print(*a, file=sys.stderr, flush=True))
    torch.manual_seed(0)
    cache_root = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "quill-bench"
    if args.model:
        from quill.engine import resolve

        folder = resolve(args.model)
        label = folder.name
    else:
        label = f"gpt2-{args.size}-random"
        folder = random_gpt2(args.size, cache_root / label)
    work = cache_root / f"{label}-exports"
    work.mkdir(parents=True, exist_ok=True)
    from quill.weights import load_config

    cfg = load_config(folder)
    quick = args.quick
    runs = args.runs or (3 if quick else 5)
    new = args.new_tokens or (32 if quick else NEW_TOKENS)
    new_batched = 16 if quick else 64
    batches = (1, 8) if quick else BATCHES
    systems = set(args.systems.split(","))
    threads = torch.get_num_threads()
    load_before = os.getloadavg()
    log(f"model {label}; threads {threads}; load {load_before}; runs {runs}")
    runners = build_runners(folder, work, systems, threads, PREFILL_LEN + 8, log)
    prompt = list(range(1000, 1000 + PROMPT_LEN))
    long_prompt = [(1000 + 7 * i) % cfg.vocab_size for i in range(PREFILL_LEN)]
    samples = {r.name: Samples() for r in runners}
    bandwidth: list[float] = []

    def one_round(record: bool):
        bandwidth.append(memory_bandwidth(0.5 if quick else 1.0, repeats=1 if quick else 2))
        for r in runners:
            s = samples[r.name]
            dt = r.decode(prompt, new)
            if record:
                s.decode.append((new - 1) / dt)
            dt = r.prefill(long_prompt)
            if record:
                s.prefill.append(PREFILL_LEN / dt)
            for b in batches:
                if b == 1 or not r.batching:
                    continue
                tps = b * (new_batched - 1) / r.decode(prompt, new_batched, b)
                if record:
                    s.batched.setdefault(b, []).append(tps)
            gc.collect()

    log("warm-up ...")
    one_round(record=False)
    bandwidth.clear()
    for i in range(runs):
        t0 = time.perf_counter()
        one_round(record=True)
        log(f"round {i + 1}/{runs}: {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f}")
    for r in runners:
        r.close()
    quality = {} if args.no_quality else top1_agreement(folder)
    bw = _median(bandwidth)
    results = []
    for r in runners:
        s = samples[r.name]
        bound = bw / weight_bytes_per_token(cfg, r.bytes_per_weight)
        d = _median(s.decode)
        batched = {b: _median(v) for b, v in s.batched.items()}
        results.append({
            "system": r.name, "family": r.family, "precision": r.precision,
            "decode_tok_s": d, "decode_samples": s.decode, "bound_tok_s": bound, "pct_of_bound": 100 * d / bound,
            "prefill_tok_s": _median(s.prefill), "prefill_samples": s.prefill,
            "batched_tok_s": {1: d, **batched}, "batched_samples": {str(b): v for b, v in s.batched.items()},
        })
    report = {
        "model": label, "config": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size},
        "settings": {"prompt": PROMPT_LEN, "new_tokens": new, "prefill": PREFILL_LEN, "batched_new_tokens": new_batched,
                     "batches": list(batches), "runs": runs, "quick": quick, "threads": threads},
        "machine": machine_info(), "load_before": load_before, "load_after": os.getloadavg(),
        "bandwidth_GBps": bw / 1e9, "bandwidth_samples_GBps": [b / 1e9 for b in bandwidth],
        "results": results, "top1_agreement_with_fp32": quality, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    report["goals"] = check_goals(results, batches)
    return report


def _find(results, system):
    return next((r for r in results if r["system"] == system), None)


def check_goals(results: list[dict], batches) -> dict:
    """The issue's targets, evaluated on this run's medians (None where a peer is missing)."""
    g: dict[str, bool | None] = {}

    def dec(name):
        r = _find(results, name)
        return r["decode_tok_s"] if r else None

    q32, q16, q8 = (_find(results, f"quill {p}") for p in ("fp32", "bf16", "int8"))
    if q32:
        g["fp32 decode >= 90% of bound"] = q32["pct_of_bound"] >= 90
    if q16 and dec("llama.cpp f16"):
        g["bf16 decode >= llama.cpp f16"] = q16["decode_tok_s"] >= dec("llama.cpp f16")
    if q8 and dec("llama.cpp q8_0"):
        g["int8 decode >= 1.2x llama.cpp q8_0"] = q8["decode_tok_s"] >= 1.2 * dec("llama.cpp q8_0")
    if q8 and dec("onnxruntime int8"):
        g["int8 decode >= 1.5x ORT int8"] = q8["decode_tok_s"] >= 1.5 * dec("onnxruntime int8")
    peers_by_precision = {"fp32": ("transformers fp32", "onnxruntime fp32", "llama.cpp f32"),
                          "bf16": ("transformers bf16", "llama.cpp f16"),
                          "int8": ("transformers dynamic int8", "onnxruntime int8", "llama.cpp q8_0")}
    for p, peers in peers_by_precision.items():
        q = _find(results, f"quill {p}")
        best = max((r["prefill_tok_s"] for r in results if r["system"] in peers), default=None)
        if q and best:
            g[f"{p} prefill-512 >= best peer"] = q["prefill_tok_s"] >= best
    if 8 in batches:
        for q in (q32, q16, q8):
            if q and q["batched_tok_s"].get(8):
                g[f"{q['precision']} batch-8 >= 5x batch-1"] = q["batched_tok_s"][8] >= 5 * q["decode_tok_s"]
    return g


# ---- reporting --------------------------------------------------------------------------------------------

def format_report(rep: dict) -> str:
    res = rep["results"]
    batches = rep["settings"]["batches"]
    lines = [f"# Decode benchmark: {rep['model']} ({rep['time']})", "",
             f"Machine: {rep['machine']['cpu']}, {rep['machine']['cores']} cores, torch threads "
             f"{rep['machine']['torch_threads']}, AVX-512: {rep['machine']['avx512']}; load average "
             f"{rep['load_before'][0]:.1f} before, {rep['load_after'][0]:.1f} after. Measured read bandwidth "
             f"{rep['bandwidth_GBps']:.1f} GB/s (median of rounds; "
             f"{', '.join(f'{b:.1f}' for b in rep['bandwidth_samples_GBps'])}).",
             f"Prompt {rep['settings']['prompt']} tokens, {rep['settings']['new_tokens']} new tokens (greedy, EOS "
             f"ignored), prefill {rep['settings']['prefill']} tokens, batched rows generate "
             f"{rep['settings']['batched_new_tokens']} tokens each; median of {rep['settings']['runs']} runs after a "
             "warm-up, systems interleaved.", ""]
    head = "| system | decode tok/s | % of bound | bound | prefill-512 tok/s | " + " | ".join(
        f"batch {b} tok/s" for b in batches if b != 1) + " | batch 8 / batch 1 |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in res:
        bt = r["batched_tok_s"]
        cells = [r["system"], f"{r['decode_tok_s']:.1f}", f"{r['pct_of_bound']:.0f}%", f"{r['bound_tok_s']:.0f}",
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
    if rep.get("top1_agreement_with_fp32"):
        lines += ["", "Top-1 agreement with Quill fp32 (teacher-forced, 160 positions): " + ", ".join(
            f"{k} {100 * v:.1f}%" for k, v in rep["top1_agreement_with_fp32"].items())]
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
    parser = argparse.ArgumentParser(prog="bench/decode.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return cmd_bench(parser.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder (default: a random GPT-2 of --size)")
    p.add_argument("--size", choices=sorted(SIZES), default="124M")
    p.add_argument("--quick", action="store_true", help="short run: 3 rounds, 32 new tokens, batches 1 and 8")
    p.add_argument("--runs", type=int, default=None, help="measured rounds after the warm-up (default 5, quick 3)")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--systems", default="quill,transformers,ort,llama",
                   help="comma-separated subset of quill,transformers,ort,llama")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the JSON, Markdown and PNG")
    p.add_argument("--work", default=None, help="folder for the random model and exports (default: temp dir)")
    p.add_argument("--no-quality", action="store_true", help="skip the top-1 agreement check")


def cmd_bench(args: argparse.Namespace) -> int:
    rep = run_benchmark(args)
    text = format_report(rep)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"decode-{rep['model']}" + ("-quick" if rep["settings"]["quick"] else "")
    (out / f"{stem}.json").write_text(json.dumps(rep, indent=1) + "\n")
    (out / f"{stem}.md").write_text(text)
    plot_report(rep, out / f"{stem}.png")
    print(f"wrote {out / stem}.json, .md, .png", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    kinds = p.add_subparsers(dest="bench", required=True)
    d = kinds.add_parser("decode", help="decode/prefill/batched tok/s against transformers, ONNX Runtime, llama.cpp")
    add_arguments(d)
    d.set_defaults(func=cmd_bench)


if __name__ == "__main__":
    sys.exit(main())
