"""Counted instructions: run a Python worker under valgrind's callgrind and read what each labelled span executed.

Callgrind counts every instruction a process executes (`Ir`), exactly and repeatably, where a machine exposes no
hardware counters (this project's VM does not: `perf stat -e instructions` says not supported). The worker runs
with `--instr-atstart=no`, so the interpreter's start-up and the model's loading are not counted, and brackets
each span it measures with callgrind's client requests (`quill/csrc/callgrind.c`: zero, start, stop, dump with
the span's label); one process measures every span, and `count` returns the instructions of each label.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from quill.errors import QuillError
from quill.kernels.cpu import AVX2, this_cpu

SOURCE = Path(__file__).with_name("csrc") / "callgrind.c"
_TRIGGER = re.compile(r"^desc: Trigger: Client Request: (.*)$", re.M)
# `totals:` is what the dump counted; `summary:` reads 0 in a dump taken with instrumentation switched off.
_TOTAL = re.compile(r"^totals: (\d+)", re.M)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


class CallgrindUnavailable(QuillError):
    """Counting instructions needs valgrind (with its headers) and a C compiler; says which is missing."""


def _build() -> Path:
    """Compile the client requests once per source version into the user cache, as the kernels are built."""
    from quill.kernels.build import compile_library

    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    try:
        return compile_library("quill_callgrind", (SOURCE.name,), ("-O2", "-shared", "-fPIC"), digest,
                               SOURCE.name).path
    except RuntimeError as e:
        if "valgrind/callgrind.h" in str(e):
            raise CallgrindUnavailable("counting instructions needs valgrind's headers (valgrind/callgrind.h: "
                                       "apt-get install valgrind)") from e
        no_cc = "no C compiler" in str(e)
        raise CallgrindUnavailable("counting instructions needs a C compiler (cc, gcc or clang) on PATH" if no_cc
                                   else f"{e}"[:500]) from e


def unavailable_reason() -> str | None:
    """Why instructions cannot be counted here (no valgrind, no headers, no compiler), or None when they can."""
    if shutil.which("valgrind") is None:
        return "counting instructions needs valgrind on PATH (apt-get install valgrind)"
    try:
        _library()
    except CallgrindUnavailable as e:
        return str(e)
    return None


def _library() -> ctypes.CDLL:
    global _lib
    with _lock:
        if _lib is None:
            lib = ctypes.CDLL(str(_build()))
            lib.quill_cg_running.restype = ctypes.c_int
            lib.quill_cg_start.restype = None
            lib.quill_cg_stop.argtypes = [ctypes.c_char_p]
            lib.quill_cg_stop.restype = None
            _lib = lib
        return _lib


def running() -> bool:
    """Whether this process runs under valgrind."""
    return bool(_library().quill_cg_running())


@contextlib.contextmanager
def counted(label: str) -> Iterator[None]:
    """Count the instructions the block executes, dumped under `label` (labels: no newlines)."""
    if "\n" in label:
        raise ValueError("a callgrind label must be one line")
    lib = _library()
    lib.quill_cg_start()
    try:
        yield
    finally:
        lib.quill_cg_stop(label.encode())


def parse_dumps(folder: Path) -> dict[str, int]:
    """Instructions of each labelled dump in `folder` (the `totals:` line of each dump file)."""
    counts: dict[str, int] = {}
    for path in sorted(folder.iterdir()):
        text = path.read_text(errors="replace")
        trigger, total = _TRIGGER.search(text), _TOTAL.search(text)
        if trigger and total:
            counts[trigger.group(1).strip()] = int(total.group(1))
    return counts


def worker_environment() -> dict[str, str]:
    """The counted worker's environment: the AVX2 kernels wherever the CPU has them, since valgrind executes no
    AVX-512 instruction (the AVX-512 variant dies with SIGILL under it, though /proc/cpuinfo lists the flags).
    MKL and oneDNN, which read the CPU's features themselves, are held to AVX2 too: under valgrind they see no
    AVX-512 and take their AVX2 code, so the native run that chooses the paths (costtable.settle_paths) must
    time that code, not their AVX-512 code. Python seeds its string hashing per process, which moves a tiny
    call's count by up to 1.5% from one worker to the next: the worker hashes with a fixed seed (unless the
    caller chose one), and the same job then counts the same, instruction for instruction."""
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    if not this_cpu().missing(AVX2):
        env.update(QUILL_ISA=AVX2.name, MKL_ENABLE_INSTRUCTIONS="AVX2", DNNL_MAX_CPU_ISA="AVX2")
    return env


def count(argv: Sequence[str], folder: Path | None = None, timeout: float | None = None) -> dict[str, int]:
    """Run `python argv...` under callgrind (counting off at start) and return the instructions per label.

    Dumps go to a temporary folder, or to `folder`, where they stay (named by process id) so that a stopped
    run's finished spans can be read back with parse_dumps. The worker's stderr (its progress, valgrind's
    warnings) is passed through; a failed worker raises CallgrindUnavailable.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise CallgrindUnavailable(reason)
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quill-callgrind-")))
        folder.mkdir(parents=True, exist_ok=True)
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--quiet",
               f"--callgrind-out-file={folder}/callgrind.out.%p", sys.executable, *argv]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, timeout=timeout, env=worker_environment())
        if proc.returncode != 0:
            raise CallgrindUnavailable(f"the counted worker failed under callgrind (exit {proc.returncode}; "
                                       "its messages are above)")
        return parse_dumps(folder)
