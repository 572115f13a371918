"""Counted instructions from the CPU's hardware counter, where the machine exposes one (`perf_event_open`).

The counter (`quill/csrc/perfcount.c`) counts the calling thread's user-space instructions between start and
stop, natively: a counted call takes its own time rather than callgrind's emulation of it, and runs the kernel
variant the CPU picks (callgrind runs the AVX2 one). `count` runs a worker that measures every span in one
process and prints `label<TAB>instructions` per span, as quill.callgrind's `count` reads callgrind's dumps.
Virtual machines often expose no counter (this project's VM: the syscall fails with ENOENT); then
`unavailable_reason` names the failed call and its errno, and quill.costtable counts with callgrind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from quill.errors import QuillError

SOURCE = Path(__file__).with_name("csrc") / "perfcount.c"

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_fd: int | None = None


class CounterUnavailable(QuillError):
    """No hardware instruction counter here (or no C compiler to build the counter); says which."""


def _failed(call: str, code: int) -> str:
    return (f"{call} failed: {errno.errorcode.get(code, str(code))} ({os.strerror(code)}): "
            "this machine exposes no usable hardware instruction counter")


def _library() -> ctypes.CDLL:
    global _lib
    with _lock:
        if _lib is None:
            from quill.kernels.build import compile_library

            digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
            try:
                path = compile_library("quill_perfcount", (SOURCE.name,), ("-O2", "-shared", "-fPIC"), digest,
                                       SOURCE.name).path
            except RuntimeError as e:
                raise CounterUnavailable(f"{e}"[:500]) from e
            lib = ctypes.CDLL(str(path))
            lib.quill_pc_open.restype = ctypes.c_int
            lib.quill_pc_start.argtypes = [ctypes.c_int]
            lib.quill_pc_start.restype = ctypes.c_int
            lib.quill_pc_stop.argtypes = [ctypes.c_int]
            lib.quill_pc_stop.restype = ctypes.c_longlong
            _lib = lib
        return _lib


def _counter() -> int:
    """This process's counter, opened once (it counts the thread that opened it: the worker's only one)."""
    global _fd
    lib = _library()
    if _fd is None:
        fd = lib.quill_pc_open()
        if fd < 0:
            raise CounterUnavailable(_failed("perf_event_open(PERF_COUNT_HW_INSTRUCTIONS, user space)", -fd))
        _fd = fd
    return _fd


def unavailable_reason() -> str | None:
    """Why instructions cannot be counted with the hardware counter here, or None when they can."""
    try:
        _counter()
    except CounterUnavailable as e:
        return str(e)
    return None


@contextlib.contextmanager
def counted(label: str) -> Iterator[None]:
    """Count the instructions the block executes on this thread and print `label<TAB>count` to stdout."""
    if "\n" in label or "\t" in label:
        raise ValueError("a counted label must be one line without tabs")
    lib, fd = _library(), _counter()
    if (rc := lib.quill_pc_start(fd)) < 0:
        raise CounterUnavailable(_failed("starting the counter (ioctl)", -rc))
    try:
        yield
    finally:
        n = lib.quill_pc_stop(fd)
    if n < 0:
        raise CounterUnavailable(_failed("reading the counter", -n))
    print(f"{label}\t{n}", flush=True)


def count(argv: Sequence[str], env: dict[str, str] | None = None, timeout: float | None = None) -> dict[str, int]:
    """Run `python argv...` natively and return the instructions per label its `counted` spans printed. The
    worker's stderr is passed through; a failed worker raises CounterUnavailable."""
    reason = unavailable_reason()
    if reason is not None:
        raise CounterUnavailable(reason)
    proc = subprocess.run([sys.executable, *argv], stdout=subprocess.PIPE, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise CounterUnavailable(f"the counted worker failed (exit {proc.returncode}; its messages are above)")
    return {label: int(n) for label, n in (line.split("\t") for line in proc.stdout.splitlines() if "\t" in line)}
