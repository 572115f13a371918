"""Multi-row work chosen by measurement: which implementation of a shape class is fastest on this machine.

A product of several activation rows with a weight (prefill, batched decode) has candidates whose ranking
depends on the CPU: Quill's kernels (the weight read once, all rows against it), torch's GEMM (MKL/oneDNN) and,
for int8 weights, fbgemm's int8 GEMM; a batched decode step can also run as two calls of half the rows. The
first use of a shape class times each candidate briefly (one warm-up call, then the best of a few, the
candidates taking turns) and keeps the fastest, where a candidate that rounds more than the others (fbgemm's)
must beat the exact ones by INEXACT_MARGIN, and what a losing candidate made for itself while it was timed (a
weight packed into its GEMM's layout) is released, so only the paths that serve keep copies; the choices live
in a JSON file in the user cache named for the machine (CPU model, kernel variant, kernel sources, torch
version, thread count), so later loads do not pay for it. A file that does not parse or was written for
another machine is ignored and rewritten. `QUILL_TUNE=0` turns timing off: the fixed default
(Quill's kernels up to DEFAULT_ROWS rows, the GEMM beyond; decode in calls of at most DEFAULT_ROWS rows) serves,
as tests need for deterministic paths.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Collection
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
FORMAT = 1  # version of the cache file's layout

_lock = threading.Lock()
_tables: dict[Path, dict[str, str]] = {}
_timing = threading.local()  # .made: the releases of what the candidate being timed on this thread made


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


def _read(path: Path, isa: str) -> dict[str, str]:
    """The choices stored at `path`, or none when it is missing, unreadable, malformed or another machine's."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if (not isinstance(data, dict) or data.get("format") != FORMAT or data.get("machine") != machine(isa)
            or not isinstance(data.get("choices"), dict)):
        log.info("ignoring tuning cache %s (another machine's or malformed); rebuilding it", path)
        return {}
    return {k: v for k, v in data["choices"].items() if isinstance(k, str) and isinstance(v, str)}


def _write(path: Path, isa: str, choices: dict[str, str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump({"format": FORMAT, "machine": machine(isa), "choices": choices}, f, indent=1, sort_keys=True)
        os.replace(f.name, path)  # atomic: a reader sees the old file or the new one
    except OSError as e:
        log.warning("could not save tuning choices to %s: %s", path, e)


def forget() -> None:
    """Drop the choices held in memory (the next use reads the cache file again)."""
    with _lock:
        _tables.clear()


def made_while_timing(release: Callable[[], None]) -> None:
    """Note how to free something a path just made for itself (a packed weight): if that path is being timed
    as a candidate and loses, `release` is called. Outside timing it does nothing: a path that serves keeps it."""
    made = getattr(_timing, "made", None)
    if made is not None:
        made.append(release)


def _time(candidates: dict[str, Callable[[], object]], key: str) -> dict[str, tuple[float, list[Callable[[], None]]]]:
    """Each candidate's fastest of REPEATS calls after a warm-up call, with the releases of what it made meanwhile;
    a candidate whose backend this build of torch lacks (it raises RuntimeError/NotImplementedError) is left out.
    The candidates take turns (each round calls every one once), so a slow spell of a shared machine falls on
    all of them rather than on whichever was being timed then."""
    outer = getattr(_timing, "made", None)
    made: dict[str, list[Callable[[], None]]] = {name: [] for name in candidates}
    best = {name: float("inf") for name in candidates}
    try:
        for rnd in range(REPEATS + 1):  # round 0 warms up: first-use costs (packing, page faults) are not speed
            for name, fn in candidates.items():
                if name not in best:
                    continue
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


def choose(isa: str, key: str, candidates: dict[str, Callable[[], object]], default: str,
           inexact: Collection[str] = ()) -> str:
    """The name of the fastest of `candidates` (name -> a call running that path once) for shape class `key`:
    cached for this machine, else timed now and saved. Those named in `inexact` count as INEXACT_MARGIN times
    slower than measured (they must be that much faster than the exact ones to win). With QUILL_TUNE=0,
    `default`."""
    if not enabled() or len(candidates) == 1:
        return default
    path = cache_file(isa)
    with _lock:
        table = _tables.get(path)
        if table is None:
            table = _tables[path] = _read(path, isa)
        chosen = table.get(key)
    if chosen in candidates:
        return chosen
    timed = _time(candidates, key)
    times = {name: t for name, (t, _) in timed.items()}
    chosen = min(times, key=lambda n: times[n] * (INEXACT_MARGIN if n in inexact else 1.0)) if times else default
    for name, (_, releases) in timed.items():
        if name != chosen:
            for release in releases:
                release()
    log.info("tuning %s: %s (%s)", key, chosen, ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in times.items()))
    with _lock:
        table = _tables.setdefault(path, _read(path, isa))
        table[key] = chosen
        _write(path, isa, dict(table))
    return chosen
