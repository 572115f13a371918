"""Cost tables: what a call of `inputs` prompt tokens and `outputs` generated tokens costs, cell by cell.

Each cell has the exact FLOPs with a KV cache and without one (quill.cost), the wall time of the real call
(prefill then greedy decode through the library, `ignore_eos` so the length is exact) and, when asked, the
instructions it executed, counted in one worker process that measures every cell: with the CPU's hardware
counter where the machine exposes one (quill.perfcount), else under callgrind (quill.callgrind). Counted calls
run on one thread (torch's and the kernels' pool) so the counts repeat; a cell is run once uncounted first, so
one-time set-up (first use of a shape, lazy initialisation) is not in its count (for long calls, as in
bench/cost.py, only the first cell is, which saves half the time). Cells share no prefix cache (ModelSpec.load).
The no-cache instructions come from a real run that recomputes the whole prefix for every new token.
`quill cost` (through `measure`) and bench/cost.py are shells over this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from quill.cost import generation_flops
from quill.errors import InvalidParameter
from quill.model import GPTConfig


@dataclass
class ModelSpec:
    """How to load the measured model: the counting worker loads it again in its own process."""

    path: str
    dtype: str = "float32"
    quantize: str | None = None
    kv_cache: str | None = None

    def load(self):
        """The engine, with prefix caching off: each cell stands for one call of a new prompt, and the cells'
        prompts all start alike (`prompt`), so a cache would hand later cells the earlier ones' KV rows."""
        import quill

        return quill.load(self.path, dtype=self.dtype, quantize=self.quantize, kv_cache=self.kv_cache,
                          prefix_cache=0)


@dataclass
class Cell:
    """One call's cost; `instructions*` are None where not counted, `counter` names what counted them."""

    input_tokens: int
    output_tokens: int
    flops: int
    flops_no_cache: int
    seconds: float | None = None
    instructions: int | None = None
    instructions_no_cache: int | None = None
    counter: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def parse_lengths(text: str, name: str) -> list[int]:
    """Positive token counts from '1,2,4'; InvalidParameter naming `name` otherwise."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise InvalidParameter(f"{name} must be a comma-separated list of token counts, got {text!r}", name)
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise InvalidParameter(f"{name} must be whole numbers, got {text!r}", name) from None
    if any(v < 1 for v in values):
        raise InvalidParameter(f"{name} must be at least 1, got {text!r}", name)
    return values


def cells(config: GPTConfig, inputs: list[int], outputs: list[int]) -> list[Cell]:
    """Every (input, output) pair's FLOPs; InvalidParameter when a pair exceeds the model's context."""
    if not inputs or not outputs:
        raise InvalidParameter("inputs and outputs must each list at least one length", "inputs" if not inputs
                               else "outputs")
    for p in inputs:
        for n in outputs:
            if p + n > config.n_positions:
                raise InvalidParameter(f"{p} inputs + {n} outputs exceed this model's context of "
                                       f"{config.n_positions} tokens", "inputs")
    return [Cell(p, n, generation_flops(config, p, n), generation_flops(config, p, n, kv_cache=False))
            for p in inputs for n in outputs]


def prompt(config: GPTConfig, length: int) -> list[int]:
    """A fixed prompt of `length` token ids (a call's cost does not depend on which tokens)."""
    return [(7 * i + 1) % config.vocab_size for i in range(length)]


def real_call(engine, cell: Cell) -> None:
    """The call a cell stands for: prefill then greedy decode with the KV cache, exactly `output_tokens`."""
    out = engine.generate(prompt(engine.config, cell.input_tokens), cell.output_tokens, temperature=0,
                          ignore_eos=True)
    assert len(out.choices[0].tokens) == cell.output_tokens


def no_cache_call(engine, cell: Cell) -> None:
    """The same greedy generation without a KV cache: every new token runs a forward of the whole prefix."""
    import torch

    ids = prompt(engine.config, cell.input_tokens)
    with torch.inference_mode():
        for _ in range(cell.output_tokens):
            logits = engine.model(torch.tensor([ids], device=engine.model.device), last_only=True)
            ids.append(int(logits[0, -1].argmax()))


def time_cells(engine, table: list[Cell]) -> None:
    """Wall time of each cell's real call, after one uncounted call that takes the first-use costs."""
    real_call(engine, table[0])
    for cell in table:
        t0 = time.perf_counter()
        real_call(engine, cell)
        cell.seconds = time.perf_counter() - t0


def _label(kind: str, cell: Cell) -> str:
    return f"{kind} {cell.input_tokens} {cell.output_tokens}"


RUNS = {"instructions": real_call, "instructions_no_cache": no_cache_call}  # the Cell field each run fills
COUNTERS = ("auto", "perf", "callgrind")


def choose_counter(counter: str = "auto") -> str:
    """`perf` (the hardware counter) or `callgrind`; `auto`: the hardware counter where it opens. A counter
    that cannot count here raises its Unavailable error (before any cell runs)."""
    from quill import callgrind, perfcount

    if counter not in COUNTERS:
        raise InvalidParameter(f"counter must be one of {', '.join(COUNTERS)}, got {counter!r}", "counter")
    if counter == "auto":
        counter = "perf" if perfcount.unavailable_reason() is None else "callgrind"
    module, error = ((perfcount, perfcount.CounterUnavailable) if counter == "perf"
                     else (callgrind, callgrind.CallgrindUnavailable))
    if (reason := module.unavailable_reason()) is not None:
        raise error(reason)
    return counter


def count_cells(spec: ModelSpec, table: list[Cell], fields: tuple[str, ...] = ("instructions",),
                warm_each: bool = True, dumps: Path | None = None, counter: str = "auto") -> None:
    """Fill `fields` (keys of RUNS) and `counter` of every cell, cell by cell, from one counted worker process."""
    count_runs(spec, [(name, cell) for cell in table for name in fields], warm_each, dumps, counter)


def count_runs(spec: ModelSpec, runs: list[tuple[str, Cell]], warm_each: bool = True,
               dumps: Path | None = None, counter: str = "auto") -> None:
    """Fill field `name` and `counter` of each (name, cell) in this order from one counted worker process.

    With `warm_each` every run is done once uncounted before it is counted; without, only the first (enough
    for calls so long that the first use of their shapes is lost in the count). `counter` as for
    choose_counter; `dumps` keeps callgrind's files (see quill.callgrind.count).
    """
    from quill import callgrind, perfcount

    counter = choose_counter(counter)
    job = {"model": dataclasses.asdict(spec), "warm_each": warm_each, "counter": counter,
           "runs": [[name, c.input_tokens, c.output_tokens] for name, c in runs]}
    argv = ["-m", "quill.costtable", json.dumps(job)]
    if counter == "perf":
        settle_paths(job, dict(os.environ))
        counts = perfcount.count(argv)
    else:
        settle_paths(job, callgrind.worker_environment())
        counts = callgrind.count(argv, folder=dumps)
    for name, cell in runs:
        setattr(cell, name, counts[_label(name, cell)])
        cell.counter = counter


def measure(spec: ModelSpec, inputs: list[int], outputs: list[int], instructions: bool = False,
            no_cache: bool = False, engine=None, counter: str = "auto") -> list[Cell]:
    """The cost table of `spec`'s model over inputs x outputs: FLOPs, wall time and optionally instructions."""
    from quill.weights import load_config

    table = cells(load_config(Path(spec.path)), inputs, outputs)  # bad lengths fail before the model loads
    if instructions or no_cache:
        counter = choose_counter(counter)  # and a counter that cannot count here
    engine = engine or spec.load()
    time_cells(engine, table)
    if instructions or no_cache:
        count_cells(spec, table, ("instructions",) + (("instructions_no_cache",) if no_cache else ()),
                    counter=counter)
    return table


def settle_paths(job: dict, env: dict[str, str]) -> None:
    """Run `job`'s calls natively, in the counted worker's environment `env` (its kernel variant; one thread),
    so that the multi-row paths they need (quill.kernels.tune) are chosen and cached as a native run chooses
    them, and no counted cell that first uses a shape class counts its timing. Twice: the tuner keeps a choice
    only after a second timing in a later process, which would otherwise be the counted worker.

    Left to a callgrind worker, the paths would also be timed under valgrind, whose emulation slows some far
    more than others (those whose time natively is their arithmetic: valgrind emulates every fused
    multiply-add lane by lane, docs/cost.md): it would take paths no native run takes.
    """
    import subprocess

    from quill.kernels import tune

    if tune.enabled():
        for _ in range(2):
            subprocess.run([sys.executable, "-m", "quill.costtable", json.dumps({**job, "native": True})],
                           env=env, check=True)


def _worker(job: dict) -> None:
    """Under the job's counter: run cells uncounted to warm up, then counted (one thread, so counts repeat).
    With `native` (`settle_paths`): run each call once, counting nothing."""
    import torch

    from quill import callgrind, perfcount

    torch.set_num_threads(1)  # also the kernels' pool size: quill.kernels uses torch.get_num_threads()
    engine = ModelSpec(**job["model"]).load()
    if job.get("native"):
        for name, p, n in job["runs"]:
            RUNS[name](engine, Cell(p, n, 0, 0))
        return
    for i, (name, p, n) in enumerate(job["runs"]):
        cell = Cell(p, n, 0, 0)
        if i == 0 or job["warm_each"]:
            RUNS[name](engine, cell)
        with (perfcount if job["counter"] == "perf" else callgrind).counted(_label(name, cell)):
            RUNS[name](engine, cell)
        print(f"counted {_label(name, cell)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
