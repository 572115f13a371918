"""Multi-row work chosen by measurement: which implementation of a shape class is fastest on this machine.

A product of several activation rows with a weight (prefill, batched decode) has candidates whose ranking
depends on the CPU: Quill's kernels (the weight read once, all rows against it), torch's GEMM (MKL/oneDNN) and,
for int8 weights, fbgemm's int8 GEMM; a batched decode step can also run as two calls of half the rows. The
first use of a shape class times each candidate briefly (one warm-up call, then the best of a few, the
candidates taking turns, each call after a short untimed job on Quill's pool as in a prefill) and keeps the
fastest, where a candidate that rounds more than the others (fbgemm's)
must beat the exact ones by INEXACT_MARGIN, and what a losing candidate made for itself while it was timed (a
weight packed into its GEMM's layout) is released, so only the paths that serve keep copies. A choice serves
at once but is kept for good only after a second timing, at its first use CONFIRM_AFTER seconds later or in a
later process, where each candidate counts its best of both: one slow spell of a shared machine during the
first timing would otherwise bias every later load. The choices live in a JSON file in the user cache named
for the machine (CPU model, kernel variant, kernel sources, torch version, thread count), so later loads do
not pay for them. A file that does not parse or was written for another machine is ignored and rewritten.
`QUILL_TUNE=0` turns timing off: the fixed default
(Quill's kernels up to DEFAULT_ROWS rows, the GEMM beyond; decode in calls of at most DEFAULT_ROWS rows) serves,
as tests need for deterministic paths.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from quill.kernels import build
from quill.kernels.cpu import this_cpu

log = logging.getLogger("quill.kernels.tune")

DEFAULT_ROWS = 32  # the fixed default's threshold: up to this many rows on Quill's kernels
# An inexact candidate (one that rounds more than the others: fbgemm's 7-bit per-tensor activations, 7 points of
# top-1 agreement over 512 positions) is chosen only when this many times faster than the fastest exact one
INEXACT_MARGIN = 1.3
REPEATS = 3  # timed calls per candidate after the warm-up; the fastest counts
CONFIRM_AFTER = 60.0  # seconds after its first timing (in the same process) that a choice is timed again
FORMAT = 2  # version of the cache file's layout

_lock = threading.Lock()
_timing = threading.local()  # .made: the releases of what the candidate being timed on this thread made


@dataclass
class _Trial:
    """A choice's first timing, kept until a second one confirms it: each candidate's fastest call in seconds,
    and in which process and when it was made."""

    times: dict[str, float]
    pid: int
    at: float

    def due(self) -> bool:
        """Whether to time the candidates again now: in a later process, or CONFIRM_AFTER seconds on."""
        return self.pid != os.getpid() or time.time() - self.at >= CONFIRM_AFTER


@dataclass
class _Table:
    """One cache file's choices (shape class -> the path that serves it), those awaiting their second timing,
    and, for those first timed in this process, the releases of what the chosen path made while timed."""

    choices: dict[str, str] = field(default_factory=dict)
    trials: dict[str, _Trial] = field(default_factory=dict)
    made: dict[str, list[Callable[[], None]]] = field(default_factory=dict)


_tables: dict[Path, _Table] = {}


def enabled() -> bool:
    """Whether multi-row paths are timed (QUILL_TUNE, default on) rather than taken from the fixed default."""
    return os.environ.get("QUILL_TUNE", "1").lower() not in ("0", "false", "off", "no")


def row_class(rows: int) -> int:
    """The shape class of `rows` activation rows: the next power of two (choices are kept per class)."""
    return 1 << max(0, rows - 1).bit_length()


@functools.cache
def _cpu_and_sources() -> tuple[str, str]:
    return this_cpu().model, build.source_digest()


def machine(isa: str) -> dict[str, object]:
    """What a tuning choice depends on besides the shape; part of the cache file's name and content."""
    cpu, sources = _cpu_and_sources()
    return {"cpu": cpu, "isa": isa, "kernels": sources, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def cache_file(isa: str) -> Path:
    """The tuning cache for this machine and kernel variant."""
    return _cache_file(isa, torch.get_num_threads(), build.cache_dir())


@functools.cache
def _cache_file(isa: str, threads: int, folder: Path) -> Path:  # memoised: it runs before every multi-row product
    key = hashlib.sha256(json.dumps(machine(isa), sort_keys=True).encode()).hexdigest()[:16]
    return folder / "tuning" / f"paths-{isa}-{key}.json"


def _read(path: Path, isa: str) -> _Table:
    """The choices stored at `path`, or none when it is missing, unreadable, malformed or another machine's; a
    choice whose first timing does not parse is left out (timed afresh)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return _Table()
    if (not isinstance(data, dict) or data.get("format") != FORMAT or data.get("machine") != machine(isa)
            or not isinstance(data.get("choices"), dict) or not isinstance(data.get("trials"), dict)):
        log.info("ignoring tuning cache %s (another machine's or malformed); rebuilding it", path)
        return _Table()
    table = _Table({k: v for k, v in data["choices"].items() if isinstance(k, str) and isinstance(v, str)})
    for key, trial in data["trials"].items():
        try:
            table.trials[key] = _Trial({str(n): float(t) for n, t in trial["times"].items()}, int(trial["pid"]),
                                       float(trial["at"]))
        except (TypeError, KeyError, AttributeError, ValueError):
            table.choices.pop(key, None)
    return table


def _write(path: Path, isa: str, table: _Table) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump({"format": FORMAT, "machine": machine(isa), "choices": table.choices,
                       "trials": {k: asdict(t) for k, t in table.trials.items()}}, f, indent=1, sort_keys=True)
        os.replace(f.name, path)  # atomic: a reader sees the old file or the new one
    except OSError as e:
        log.warning("could not save tuning choices to %s: %s", path, e)


def forget() -> None:
    """Drop the choices held in memory (the next use reads the cache file again)."""
    with _lock:
        _tables.clear()


def made_while_timing(release: Callable[[], None]) -> None:
    """Note how to free something a path just made for itself (a packed weight): if that path is being timed
    as a candidate and loses (at once, or on the choice's second timing), `release` is called. Outside timing it
    does nothing: a path that serves keeps it. A bound method is held weakly, so a layer dropped before its
    choice is confirmed is freed with its copies."""
    made = getattr(_timing, "made", None)
    if made is not None:
        made.append(_weakly(release))


def _weakly(release: Callable[[], None]) -> Callable[[], None]:
    if not inspect.ismethod(release):
        return release
    ref = weakref.WeakMethod(release)

    def call() -> None:
        method = ref()
        if method is not None:
            method()
    return call


def _time(candidates: dict[str, Callable[[], object]], key: str,
          before: Callable[[], object] | None = None) -> dict[str, tuple[float, list[Callable[[], None]]]]:
    """Each candidate's fastest of REPEATS calls after a warm-up call, with the releases of what it made meanwhile;
    a candidate whose backend this build of torch lacks (it raises RuntimeError/NotImplementedError) is left out.
    The candidates take turns (each round calls every one once), so a slow spell of a shared machine falls on
    all of them rather than on whichever was being timed then. `before`, where given, runs untimed before each
    call: the work a call follows where it serves (choose's docstring)."""
    outer = getattr(_timing, "made", None)
    made: dict[str, list[Callable[[], None]]] = {name: [] for name in candidates}
    best = {name: float("inf") for name in candidates}
    try:
        for rnd in range(REPEATS + 1):  # round 0 warms up: first-use costs (packing, page faults) are not speed
            for name, fn in candidates.items():
                if name not in best:
                    continue
                if before is not None:
                    before()
                _timing.made = made[name]
                t0 = time.perf_counter()
                try:
                    fn()
                except (RuntimeError, NotImplementedError) as e:
                    log.info("tuning %s: candidate %s failed (%s)", key, name, e)
                    del best[name]
                    for release in made.pop(name):
                        release()
                    continue
                if rnd:
                    best[name] = min(best[name], time.perf_counter() - t0)
    except BaseException:
        for releases in made.values():
            for release in releases:
                release()
        raise
    finally:
        _timing.made = outer
    return {name: (best[name], made[name]) for name in best}


def _table(path: Path, isa: str) -> _Table:
    """The choices of cache file `path` held in memory, read on first use (under _lock)."""
    table = _tables.get(path)
    if table is None:
        table = _tables[path] = _read(path, isa)
    return table


def choose(isa: str, key: str, candidates: dict[str, Callable[[], object]], default: str,
           inexact: Collection[str] = (), before: Callable[[], object] | None = None) -> str:
    """The name of the fastest of `candidates` (name -> a call running that path once) for shape class `key`:
    cached for this machine, else timed now (and once more later, see the module's docstring) and saved. Those
    named in `inexact` count as INEXACT_MARGIN times slower than measured (they must be that much faster than
    the exact ones to win). `before` runs untimed before each timed call: what the call follows where it
    serves, so that no candidate starts beside what the previous one left running (torch's OpenMP workers spin
    after a torch call; a Quill GEMM right after an MKL one measured 2-25% slower than after a Quill one).
    With QUILL_TUNE=0, `default`."""
    if not enabled() or len(candidates) == 1:
        return default
    path = cache_file(isa)
    with _lock:
        table = _table(path, isa)
        chosen, trial = table.choices.get(key), table.trials.get(key)
    confirming = chosen in candidates and trial is not None
    if chosen in candidates and not (confirming and trial.due()):
        return chosen
    timed = _time(candidates, key, before)
    times = {name: t for name, (t, _) in timed.items()}
    if confirming:  # each candidate's best of both timings: a slow spell in one of them does not decide
        times = {name: min(t, trial.times.get(name, t)) for name, t in times.items()}
    best = min(times, key=lambda n: times[n] * (INEXACT_MARGIN if n in inexact else 1.0)) if times else default
    for name, (_, releases) in timed.items():
        if name != best:
            for release in releases:
                release()
    with _lock:
        table = _table(path, isa)
        earlier = table.made.pop(key, [])
        if confirming:
            table.trials.pop(key, None)
        else:
            table.trials[key] = _Trial(times, os.getpid(), time.time())
            table.made[key] = timed[best][1] if best in timed else []
        table.choices[key] = best
        _write(path, isa, table)
    if confirming and best != chosen:
        for release in earlier:  # what the first timing's choice made is no longer wanted
            release()
    log.info("tuning %s: %s%s (%s)", key, best, " on a second timing" if confirming else "",
             ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in times.items()))
    return best
