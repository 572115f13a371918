"""The systems the decode benchmarks measure (bench/decode.py on the CPU, bench/decode_cuda.py on a GPU), one
`Runner` each, and the model they measure.

Systems: Quill fp32/bf16/int8; transformers fp32/bf16/dynamic int8 (every Linear incl. lm_head, after
turning GPT-2's Conv1D layers into Linear); ONNX Runtime fp32/int8 (Quill's exporter, int8 via
onnxruntime.quantization.quantize_dynamic); llama.cpp f32/f16/q8_0 through llama-cpp-python; CTranslate2
and OpenVINO in bench/peers.py.

This module imports neither torch nor quill at the top: the llama.cpp worker (bench/worker.py) loads it
without them, so that ggml's thread pool never shares a process with torch's OpenMP.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

PROMPT_LEN, NEW_TOKENS, PREFILL_LEN = 32, 128, 512
SIZES = {"124M": dict(n_embd=768, n_layer=12, n_head=12), "355M": dict(n_embd=1024, n_layer=24, n_head=16)}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"  # bench/ lives only in a checkout
BYTES_PER_WEIGHT = {"fp32": 4, "bf16": 2, "int8": 1, "f32": 4, "f16": 2, "q8_0": 34 / 32}


def weight_bytes_per_token(cfg, bytes_per_weight: float) -> float:
    """Bytes of weight matrices one decode step reads: every block's projections and the (tied) head."""
    c, i, v = cfg.n_embd, cfg.inner_dim, cfg.vocab_size
    return (cfg.n_layer * (3 * c * c + c * c + 2 * c * i) + v * c) * bytes_per_weight


# ---- runners (they live in the worker processes) ---------------------------------------------------------

class Runner:
    """One system at one precision. decode/prefill return seconds; `threads` is set before each call."""

    family = ""
    batching = True
    compiled = False  # torch.compile'd (Quill's --compile): no kernel profile, compiled during the warm-up
    device = "cpu"  # "cuda": bench/decode_cuda.py's runs on a GPU

    agreement_modes: tuple[str, ...] = ()  # the ways `top1` computes logits (quill/agreement.py's modes)

    def __init__(self, name: str, precision: str):
        self.name, self.precision = name, precision

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "precision": self.precision,
                "bytes_per_weight": BYTES_PER_WEIGHT[self.precision], "batching": self.batching,
                "compiled": self.compiled, "agreement_modes": list(self.agreement_modes)}

    def set_threads(self, n: int) -> None:
        import torch

        torch.set_num_threads(n)

    def _sync(self) -> None:
        """Wait for the GPU's queued work, so that a clock read after it counts the kernels too."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def decode(self, prompt: list[int], new: int, batch: int = 1) -> float:
        """Seconds from the first generated token to the last (`new` tokens per row, `batch` rows)."""
        raise NotImplementedError

    def prefill(self, prompt: list[int]) -> float:
        """Seconds from the call to the first generated token."""
        raise NotImplementedError

    def top1(self, ids: list[int], mode: str = "prefill") -> list[int]:
        """The most likely next token at every position of `ids`, teacher-forced (one of agreement_modes)."""
        raise NotImplementedError


class QuillRunner(Runner):
    family = "quill"
    agreement_modes = ("prefill", "decode")

    def __init__(self, folder: str, precision: str, compile: bool = False, device: str = "cpu",
                 cuda_graphs: bool = True):
        import quill

        dtype = {"fp32": "float32", "bf16": "bfloat16", "int8": "float32"}[precision]
        # no prefix cache: every measured call repeats its prompt, and each stands for a new one (the peers
        # keep none either; bench/prefix.py measures the cache)
        self.engine = quill.load(folder, dtype=dtype, quantize="int8" if precision == "int8" else None,
                                 compile=compile, device=device, prefix_cache=0)
        self.compiled, self.device = compile, device
        eager = device == "cuda" and not cuda_graphs
        if device == "cuda":
            self.engine.model.use_cuda_graphs = cuda_graphs
        super().__init__(f"quill {precision}{' compiled' if compile else ''}{' eager' if eager else ''}", precision)

    def decode(self, prompt, new, batch=1):
        t0 = time.perf_counter()
        for i, _ in enumerate(self.engine.events(prompt, new, n=batch, temperature=0, ignore_eos=True)):
            if i == batch - 1:  # the prefill has emitted each row's first token
                t0 = time.perf_counter()
        self._sync()
        return time.perf_counter() - t0

    def prefill(self, prompt):
        t0 = time.perf_counter()
        for _ in self.engine.events(prompt, 1, temperature=0, ignore_eos=True):
            pass
        self._sync()
        return time.perf_counter() - t0

    def profile(self, prompt: list[int], new: int) -> dict:
        """Milliseconds per token in each part of a decode step (the kernels' own clock; QUILL_PROFILE=1)."""
        from quill import kernels

        t0 = time.perf_counter()
        for i, _ in enumerate(self.engine.events(prompt, new, temperature=0, ignore_eos=True)):
            if i == 0:
                kernels.step_profile()
                t0 = time.perf_counter()
        wall = (time.perf_counter() - t0) / (new - 1) * 1e3
        parts = {k: v / (new - 1) * 1e3 for k, v in kernels.step_profile().items()}
        parts["rest: Python step, sampling, detokenizer"] = wall - sum(parts.values())
        parts["whole token"] = wall
        return parts

    def top1(self, ids, mode="prefill"):
        from quill.agreement import position_logits, top1

        return top1(position_logits(self.engine.model, ids, mode, PROMPT_LEN))


def first_token_timer():
    """A transformers stopping criterion that never stops and records when it is first asked, which is when
    every row has its first generated token (the prefill done): timing from there is timing the decode steps,
    for any number of rows."""
    import torch
    from transformers import StoppingCriteria

    class FirstTokenTimer(StoppingCriteria):
        first: float | None = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.first is None:
                self.first = time.perf_counter()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return FirstTokenTimer()


def conv1d_to_linear(model) -> None:
    """Replace transformers' Conv1D ([in, out] weights) by equivalent nn.Linear layers, in place."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for _, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, Conv1D):
                lin = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
                lin.weight.data = child.weight.data.t().contiguous()
                lin.bias.data = child.bias.data
                setattr(mod, child_name, lin)


class TransformersRunner(Runner):
    family = "transformers"

    def __init__(self, folder: str, precision: str, device: str = "cpu"):
        import warnings

        import torch
        from transformers import GPT2LMHeadModel

        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model = GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).eval().to(device)
        self.device = device
        if precision == "int8":
            conv1d_to_linear(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        model.generation_config.pad_token_id = model.config.eos_token_id
        self.model = model
        super().__init__(f"transformers {'dynamic int8' if precision == 'int8' else precision}", precision)

    def decode(self, prompt, new, batch=1):
        import torch

        ids = torch.tensor([prompt] * batch, device=self.device)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True)
        timer = first_token_timer()
        with torch.inference_mode():
            self.model.generate(ids, max_new_tokens=new, min_new_tokens=new, stopping_criteria=[timer], **kw)
        self._sync()
        return time.perf_counter() - timer.first

    def prefill(self, prompt):
        import torch

        ids = torch.tensor([prompt], device=self.device)
        with torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            self.model(ids, use_cache=True, logits_to_keep=1)
            self._sync()
            return time.perf_counter() - t0


class OrtRunner(Runner):
    family = "onnxruntime"

    def __init__(self, onnx_path: str, precision: str):
        import numpy as np
        import onnxruntime

        self.path, self.np, self.ort = onnx_path, np, onnxruntime
        self.sessions: dict[int, object] = {}
        self.threads = os.cpu_count() or 1
        sess = self._session()
        past = sess.get_inputs()[1].shape  # [batch, n_head, past, head_dim]
        self.n_head, self.head_dim = int(past[1]), int(past[3])
        self.names = [i.name for i in sess.get_inputs()]
        super().__init__(f"onnxruntime {precision}", precision)

    def set_threads(self, n):
        self.threads = n

    def _session(self):
        if self.threads not in self.sessions:
            opts = self.ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.sessions[self.threads] = self.ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        return self.sessions[self.threads]

    def _run(self, sess, ids, past):
        out = sess.run(None, {"input_ids": ids, **dict(zip(self.names[1:], past))})
        return out[0][:, -1].argmax(-1), out[1:]

    def _empty(self, batch):
        z = self.np.zeros((batch, self.n_head, 0, self.head_dim), self.np.float32)
        return [z] * (len(self.names) - 1)

    def decode(self, prompt, new, batch=1):
        np, sess = self.np, self._session()
        tok, past = self._run(sess, np.array([prompt] * batch, dtype=np.int64), self._empty(batch))
        t0 = time.perf_counter()
        for _ in range(new - 1):
            tok, past = self._run(sess, tok[:, None].astype(np.int64), past)
        return time.perf_counter() - t0

    def prefill(self, prompt):
        sess = self._session()
        t0 = time.perf_counter()
        self._run(sess, self.np.array([prompt], dtype=self.np.int64), self._empty(1))
        return time.perf_counter() - t0


class LlamaRunner(Runner):
    """llama.cpp through llama-cpp-python: eval() the prompt, then one token at a time (greedy argmax)."""

    family = "llama.cpp"
    batching = False  # llama-cpp-python's Llama decodes one sequence

    def __init__(self, gguf_path: str, precision: str, n_ctx: int):
        import llama_cpp
        import numpy as np

        n = os.cpu_count() or 1
        self.llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=n,
                                   n_threads_batch=n, logits_all=False, verbose=False)
        self.np = np
        super().__init__(f"llama.cpp {precision}", precision)

    def set_threads(self, n):
        self.llm._ctx.set_n_threads(n, n)

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


# ---- the model measured, and where its report goes ---------------------------------------------------------

def random_gpt2(size: str, folder: Path, seed: int = 0) -> Path:
    """A random-initialised GPT-2 of `size` with the GPT-2 tokenizer, saved (once) into `folder`."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from quill.tokenizer import Tokenizer

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**SIZES[size]))
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    Tokenizer.gpt2().save(tmp)
    tmp.rename(folder)
    return folder


def benchmark_model(args: argparse.Namespace) -> tuple[Path, str, Path]:
    """The checkpoint to measure (--model, or a random GPT-2 of --size), its label, and the cache folder."""
    cache_root = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "quill-bench"
    if args.model:
        from quill.resolve import resolve

        folder = resolve(args.model)
        return folder, folder.name, cache_root
    label = f"gpt2-{args.size}-random"
    return random_gpt2(args.size, cache_root / label), label, cache_root


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The flags both entry points share: which model, how many rounds, where the report goes."""
    p.add_argument("--model", default=None, help="checkpoint folder (default: a random GPT-2 of --size)")
    p.add_argument("--size", choices=sorted(SIZES), default="124M")
    p.add_argument("--runs", type=int, default=None, help="measured rounds after the warm-up (default 5, quick 3)")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the JSON, Markdown and PNG")
    p.add_argument("--work", default=None, help="folder for the random model and exports (default: temp dir)")


def write_report(out: Path, stem: str, rep: dict, text: str) -> None:
    """Print the Markdown report and write it, with the JSON, as out/stem.{md,json}."""
    print(text)
    (out / f"{stem}.json").write_text(json.dumps(rep, indent=1) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(f"wrote {out / stem}.json and .md", file=sys.stderr)
