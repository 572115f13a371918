"""The fused decode step's view of a model: its plan (the int64 words quill_decode_step reads), the step's
activation buffers and the thread-count tuner.

The plan's layout is quill/csrc/quill.h's QK_PLAN_* / QK_LAYER_* / QK_LIN_* / QK_NORM_* constants, read from that
header (quill.kernels.build.constants), so C and Python share one definition. The builder duck-types a GPT-2
module tree (transformer.wte/wpe/h/ln_f, lm_head; a projection is a plain nn.Linear or defines `kernel_args()`)
so that this layer never imports the model.
"""

from __future__ import annotations

import functools
import statistics
import struct
import threading
import time

import torch
from torch import Tensor, nn

from quill import kernels
from quill.kernels import build, tune

ABI = build.constants()


class Unsupported(Exception):
    """A module the decode kernels cannot run (the step falls back to the torch path)."""


def f32_bits(v: float) -> int:
    """A float's fp32 bit pattern as a (signed) int64 word."""
    return struct.unpack("<i", struct.pack("<f", v))[0]


def build_plan(model: nn.Module) -> tuple[Tensor, list[Tensor]]:
    """Words describing `model` for kernels.decode_step, and the tensors they point into."""
    cfg, tr = model.config, model.transformer
    refs: list[Tensor] = []
    code = kernels.DTYPE_CODES

    def ptr(t: Tensor | None, dtypes=code) -> int:
        if t is None:
            return 0
        if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in dtypes:
            raise Unsupported("tensor layout")
        refs.append(t)
        return t.data_ptr()

    def linear(m: nn.Module) -> list[int]:
        # kernel_args must be the module's own class's: a subclass with another forward would inherit it
        if type(m) is nn.Linear:
            w, s, b, sums = m.weight, None, m.bias, None
        elif "kernel_args" in type(m).__dict__:
            w, s, b, sums = m.kernel_args()
        else:
            raise Unsupported(type(m).__name__)
        if s is not None and s.dtype != torch.float32:
            raise Unsupported("scale dtype")
        words = [0] * ABI["LIN_WORDS"]
        words[ABI["LIN_WEIGHT"]], words[ABI["LIN_DTYPE"]] = ptr(w), code[w.dtype]
        words[ABI["LIN_SCALE"]], words[ABI["LIN_BIAS"]] = ptr(s), ptr(b)
        words[ABI["LIN_BIAS_DTYPE"]] = code[b.dtype] if b is not None else 0
        words[ABI["LIN_SUMS"]] = ptr(sums, (torch.int32,))
        return words

    def norm(ln: nn.Module) -> list[int]:
        if type(ln) is not nn.LayerNorm or ln.weight is None or ln.eps != cfg.layer_norm_epsilon:
            raise Unsupported("layer norm")
        words = [0] * ABI["NORM_WORDS"]
        words[ABI["NORM_WEIGHT"]], words[ABI["NORM_BIAS"]] = ptr(ln.weight), ptr(ln.bias)
        words[ABI["NORM_DTYPE"]] = code[ln.weight.dtype]
        return words

    def put(words: list[int], at: int, values: list[int]) -> None:
        words[at:at + len(values)] = values

    head = [0] * ABI["PLAN_HEADER"]
    wte, wpe = tr.wte, tr.wpe
    if type(wte) is not nn.Embedding:  # an int8 model's token embedding is float too (quill.quantize)
        raise Unsupported(type(wte).__name__)
    if type(wpe) is not nn.Embedding:
        raise Unsupported(type(wpe).__name__)
    for name, value in (("N_LAYER", cfg.n_layer), ("C", cfg.n_embd), ("H", cfg.n_head), ("INNER", cfg.inner_dim),
                        ("V", cfg.vocab_size), ("ACT", kernels.ACTIVATIONS[cfg.activation_function]),
                        ("DTYPE", code[model.dtype]), ("EPS", f32_bits(cfg.layer_norm_epsilon)),
                        ("WTE", ptr(wte.weight)), ("WTE_DTYPE", code[wte.weight.dtype]),
                        ("WPE", ptr(wpe.weight)), ("WPE_DTYPE", code[wpe.weight.dtype])):
        head[ABI[f"PLAN_{name}"]] = value
    put(head, ABI["PLAN_LN_F"], norm(tr.ln_f))
    put(head, ABI["PLAN_LM_HEAD"], linear(model.lm_head))
    words = head
    for block in tr.h:
        attn, mlp = block.attn, block.mlp
        layer = [0] * ABI["PLAN_LAYER"]
        put(layer, ABI["LAYER_LN_1"], norm(block.ln_1))
        put(layer, ABI["LAYER_QKV"], linear(attn.c_attn))
        put(layer, ABI["LAYER_ATTN_PROJ"], linear(attn.c_proj))
        put(layer, ABI["LAYER_LN_2"], norm(block.ln_2))
        put(layer, ABI["LAYER_FC"], linear(mlp.c_fc))
        put(layer, ABI["LAYER_MLP_PROJ"], linear(mlp.c_proj))
        layer[ABI["LAYER_ATTN_SCALE"]] = f32_bits(attn.scale)
        words += layer
    return torch.tensor(words, dtype=torch.int64), refs


class ThreadTuner:
    """Picks the thread count of decode steps from measured step times, per batch size.

    On a machine shared with other work, two threads can be slower than one (and the reverse when it is
    quiet: docs/performance.md). The
    tuner times steps with 1 and with all threads (`torch.get_num_threads()`), keeps the faster (median of
    the last few steps each) and re-checks the other now and then, so it follows the load as it changes.
    A re-check costs a step at the slower choice: while the other choice keeps measuring clearly slower, the
    re-checks come at doubling intervals (a slowdown of the choice in use shows in its own times at once).
    """

    PROBE_EVERY = 48  # steps between re-checks of the other choice, at first and whenever the two are close
    PROBE_MAX = 384  # the longest interval, reached while the other choice stays CLEARLY_SLOWER
    CLEARLY_SLOWER = 1.25
    REDECIDE_EVERY = 8  # steps between comparisons of the medians (Python work, cache-cold after each step)
    WINDOW = 5  # recent step times kept per (batch size, threads)

    def __init__(self, max_threads: int):
        self.max_threads = max(1, max_threads)
        self.choices = sorted({1, self.max_threads})
        self.times: dict[tuple[int, int], list[float]] = {}
        self.steps: dict[int, int] = {}
        self.best: dict[int, int] = {}  # the faster choice per batch size, as last decided
        self.next_probe: dict[int, int] = {}  # the step of the next re-check, per batch size
        self.interval: dict[int, int] = {}  # steps between re-checks, per batch size

    def choose(self, batch: int) -> int:
        if len(self.choices) == 1:
            return self.choices[0]
        n = self.steps.get(batch, 0)
        self.steps[batch] = n + 1
        best = self.best.get(batch)
        if best is None or n % self.REDECIDE_EVERY == 0:
            for c in self.choices:  # warm-up: a few samples of each choice first
                if len(self.times.get((batch, c), ())) < 3:
                    return c
            best = self.best[batch] = min(self.choices, key=lambda c: statistics.median(self.times[(batch, c)]))
        if n >= self.next_probe.setdefault(batch, n + self.PROBE_EVERY):
            self.next_probe[batch] = n + self.interval.get(batch, self.PROBE_EVERY)
            return next(c for c in self.choices if c != best)
        return best

    def record(self, batch: int, threads: int, seconds: float) -> None:
        best = self.best.get(batch)
        if best is not None and threads != best:  # a re-check: space the next one by what it found
            interval = self.PROBE_EVERY
            if seconds > self.CLEARLY_SLOWER * statistics.median(self.times[(batch, best)]):
                interval = min(2 * self.interval.get(batch, self.PROBE_EVERY), self.PROBE_MAX)
            # (steps[batch] - 1: the re-check's own step, counted by choose)
            self.interval[batch], self.next_probe[batch] = interval, self.steps[batch] - 1 + interval
        ts = self.times.setdefault((batch, threads), [])
        ts.append(seconds)
        if len(ts) > self.WINDOW:
            del ts[0]


class Decoder:
    """A model's fused decode state: its plan (rebuilt when any weight moves), the step's activation buffers and
    the thread tuners. One per model (GPT keeps it); `forget()` after swapping modules in place."""

    def __init__(self) -> None:
        # the plan, the tensors it was built from, and aliases of their data then (detached views: they keep
        # the memory the plan points into alive when a tensor's data is replaced, and hold its addresses)
        self._plan: tuple[Tensor, list[Tensor], list[Tensor]] | None = None
        self._checked = False
        self._buffers: dict[tuple, dict[str, Tensor]] = {}
        self._tuners: dict[int, ThreadTuner] = {}
        self._rows: dict[tuple, int] = {}  # rows per fused call, by (batch, cache dtype, threads)

    def forget(self) -> None:
        """Drop the plan and buffers (after swapping modules in place: a module swapped for another is not
        noticed otherwise)."""
        self._plan = None
        self._buffers = {}

    def recheck(self) -> None:
        """Compare the weights' addresses with the plan's again at the next step, and rebuild it if any moved.

        The model calls this for every new cache and every step outside the fused path (a prompt), so weight
        data replaced between generations (`model.to`, `param.data = ...`) is noticed. Steps in between skip
        the comparison, which reads every weight tensor's address with the Python objects cache-cold after a
        step (docs/performance.md); a plan made stale in the middle of a generation still reads live memory."""
        self._checked = False

    def plan(self, model: nn.Module) -> Tensor:
        """The model as the int64 words quill_decode_step reads (cached; rebuilt when any weight moved)."""
        cached = self._plan
        if cached is not None and (self._checked or list(map(Tensor.data_ptr, cached[1]))
                                   == list(map(Tensor.data_ptr, cached[2]))):
            self._checked = True
            return cached[0]
        plan, refs = build_plan(model)
        self._plan = (plan, refs, [t.detach() for t in refs])
        self._checked = True
        return plan

    def tuner(self) -> ThreadTuner:
        """The thread tuner for the current torch thread count (one per count, kept)."""
        n = torch.get_num_threads()
        tuner = self._tuners.get(n)
        if tuner is None:
            tuner = self._tuners[n] = ThreadTuner(n)
        return tuner

    def workspace(self, model: nn.Module, batch: int, dtype: torch.dtype) -> dict[str, Tensor]:
        """Preallocated activations of a decode step, reused across steps (keyed by batch size and dtype)."""
        key = (batch, dtype, threading.get_ident())  # per thread: concurrent generations must not share
        ws = self._buffers.get(key)
        if ws is None:
            if len(self._buffers) >= 64:
                self._buffers.clear()
            c = model.config
            ws = {"x": torch.empty(batch, c.n_embd, dtype=dtype), "qkv": torch.empty(batch, 3 * c.n_embd, dtype=dtype),
                  "att": torch.empty(batch, c.n_embd, dtype=dtype),
                  "hidden": torch.empty(batch, c.inner_dim, dtype=dtype)}
            self._buffers[key] = ws
        return ws

    def step(self, model: nn.Module, tokens: Tensor, start: Tensor | int, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """One token per row (tokens: LongTensor [B]) at positions `start` through the fused kernels: logits [B, V].

        The rows run in calls of `rows_per_call` rows (all of them, or fewer where that measured faster here: a
        batch that outgrows the caches runs as two halves, so twice the rows never costs more than twice the
        time). Raises Unsupported for a model the kernels cannot run."""
        plan = self.plan(model)
        B = tokens.shape[0]
        logits = torch.empty(B, model.config.vocab_size, dtype=model.dtype)  # fresh: callers keep logits across steps
        chunk = self.rows_per_call(model, B, k_cache)
        if chunk >= B:  # one call (the common case): no views of the inputs to make
            self._call(model, plan, tokens, start, k_cache, v_cache, logits)
            return logits
        for r0 in range(0, B, chunk):
            r1 = min(B, r0 + chunk)
            part = start[r0:r1] if isinstance(start, Tensor) else start
            self._call(model, plan, tokens[r0:r1], part, k_cache[:, r0:r1], v_cache[:, r0:r1], logits[r0:r1])
        return logits

    def greedy(self, model: nn.Module, tokens: Tensor, start: Tensor | int, k_cache: Tensor, v_cache: Tensor,
               banned: list[list[int]], stops: list[list[int]], steps: int, deadline: float,
               interrupt: kernels.Interrupt | None = None) -> list[list[int]]:
        """Up to `steps` greedy steps of the rows `tokens` in one call (kernels.decode_greedy), each step in calls
        of `rows_per_call` rows as `step` makes them: each step's tokens, [steps][B]. Raises Unsupported for a
        model the kernels cannot run."""
        B = tokens.shape[0]
        chunk = self.rows_per_call(model, B, k_cache)
        plan = self.plan(model)
        logits = torch.empty(B, model.config.vocab_size, dtype=model.dtype)
        tuner = self.tuner()
        threads = tuner.choose(chunk)
        t0 = time.perf_counter()
        out = kernels.decode_greedy(plan, tokens, start, k_cache, v_cache, self.workspace(model, chunk, model.dtype),
                                    logits, threads, chunk, banned, stops, steps, deadline, interrupt)
        tuner.record(chunk, threads, (time.perf_counter() - t0) / (len(out) * -(-B // chunk)))
        return out

    def _call(self, model: nn.Module, plan: Tensor, tokens: Tensor, start: Tensor | int, k_cache: Tensor,
              v_cache: Tensor, logits: Tensor) -> None:
        B = tokens.shape[0]
        tuner = self.tuner()
        threads = tuner.choose(B)
        t0 = time.perf_counter()
        kernels.decode_step(plan, tokens, start, k_cache, v_cache, self.workspace(model, B, model.dtype), logits,
                            threads)
        tuner.record(B, threads, time.perf_counter() - t0)

    SCRATCH_POSITIONS = 64  # context of the scratch cache that timing runs attend over

    def rows_per_call(self, model: nn.Module, batch: int, k_cache: Tensor) -> int:
        """How many rows one fused call takes for a batch of `batch` rows: timed once per machine and shape
        (quill.kernels.tune) between all rows, half of them and DEFAULT_ROWS, on a scratch cache (the real one
        is never written); with QUILL_TUNE=0, DEFAULT_ROWS."""
        default = min(batch, tune.DEFAULT_ROWS)
        if batch == 1 or not tune.enabled():
            return default
        memo = (batch, k_cache.dtype, torch.get_num_threads())
        chosen = self._rows.get(memo)
        if chosen is None:
            chosen = self._rows[memo] = self._time_rows(model, batch, k_cache, default)
        return chosen

    def _time_rows(self, model: nn.Module, batch: int, k_cache: Tensor, default: int) -> int:
        options = sorted({batch, (batch + 1) // 2, default}, reverse=True)
        c = model.config
        key = (f"decode L={c.n_layer} C={c.n_embd} H={c.n_head} I={c.inner_dim} V={c.vocab_size} "
               f"x={str(model.dtype)[6:]} w={str(model.lm_head.weight.dtype)[6:]} kv={str(k_cache.dtype)[6:]} "
               f"rows={batch} [{','.join(map(str, options))}]")
        plan = self.plan(model)
        n_layer, _, H, _, D = k_cache.shape
        shape = (n_layer, batch, H, self.SCRATCH_POSITIONS, D)
        scratch = torch.zeros(shape, dtype=k_cache.dtype), torch.zeros(shape, dtype=k_cache.dtype)
        tokens = torch.zeros(batch, dtype=torch.long)
        logits = torch.empty(batch, c.vocab_size, dtype=model.dtype)
        pos = self.SCRATCH_POSITIONS - 1

        def run(chunk: int) -> None:
            for r0 in range(0, batch, chunk):
                r1 = min(batch, r0 + chunk)
                kernels.decode_step(plan, tokens[r0:r1], pos, scratch[0][:, r0:r1], scratch[1][:, r0:r1],
                                    self.workspace(model, r1 - r0, model.dtype), logits[r0:r1],
                                    torch.get_num_threads())

        chosen = tune.choose(kernels.variant().name, key, {str(n): functools.partial(run, n) for n in options},
                             str(default))
        return int(chosen)
