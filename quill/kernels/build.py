"""Compiling quill/csrc into a shared library per kernel variant, once, into the user cache.

The library's name carries a digest of every source file and the compiler flags, so an edited source or another
variant builds afresh while an unchanged one loads at once. The compiler's messages are kept beside the library
(`.log`): the sources are meant to be `-Wall -Wextra` clean, and `Build.warnings` shows what a compiler said even
when the library came from the cache (tests check it is empty for every variant).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from quill.kernels.cpu import Variant

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("kernels.c",)
HEADER = "quill.h"
# -ffp-contract=off: the compiler may not fuse a scalar multiply and add on its own, which it could do
# differently per variant; the kernels' FMAs are explicit intrinsics
BASE_FLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11", "-pthread", "-Wall", "-Wextra")


@dataclass(frozen=True)
class Build:
    """A compiled variant: the library's path and what the compiler printed (warnings; empty when clean)."""

    path: Path
    warnings: str


@cache
def constants() -> dict[str, int]:
    """The `#define QK_<NAME> <int>` constants of quill.h (dtype codes, activations, the plan layout), by NAME."""
    text = (CSRC / HEADER).read_text()
    return {m[1]: int(m[2]) for m in re.finditer(r"^#define QK_(\w+) (-?\d+)\b", text, re.M)}


def cache_dir() -> Path:
    """Where compiled kernels (and the path tuner's choices) live: $QUILL_CACHE_DIR, else the user cache."""
    env = os.environ
    return _cache_dir(env.get("QUILL_CACHE_DIR"), env.get("XDG_CACHE_HOME"), env.get("HOME"))


@cache
def _cache_dir(base: str | None, xdg_cache: str | None, home: str | None) -> Path:
    """Memoised on the variables the answer depends on: the path tuner asks before every multi-row product, and
    platformdirs takes as long as a small product."""
    if base:
        return Path(base)
    import platformdirs

    return Path(platformdirs.user_cache_dir("quill"))


def source_digest() -> str:
    """A digest of every C source and header (part of the library's and the tuning cache's names)."""
    h = hashlib.sha256()
    for name in sorted((*SOURCES, HEADER)):
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    return h.hexdigest()[:16]


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    return cc


def build(variant: Variant) -> Build:
    """Compile `variant` once per source version into the cache; a failed compile raises RuntimeError."""
    return compile_library(f"quill_kernels_{variant.name}", SOURCES, (*BASE_FLAGS, *variant.cflags),
                           source_digest(), f"the {variant.name} kernels")


def compile_library(stem: str, sources: tuple[str, ...], flags: tuple[str, ...], digest: str, what: str) -> Build:
    """Compile csrc/`sources` with `flags` into `<cache>/kernels/<stem>_<digest of digest and flags>.so`, once.

    `digest` stands for the sources' content. The compiler's messages are kept beside the library (`.log`), so
    a cached library still shows what its compile printed; a failed compile raises RuntimeError with them.
    """
    key = hashlib.sha256((digest + " ".join(flags)).encode()).hexdigest()[:16]
    folder = cache_dir() / "kernels"
    target = folder / f"{stem}_{key}.so"
    log = target.with_suffix(".log")
    if target.exists() and log.exists():
        return Build(target, log.read_text())
    cc = compiler()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([cc, *flags, "-I", str(CSRC), *(str(CSRC / s) for s in sources), "-o", str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed for {what}: {proc.stderr.strip()[:2000]}")
        (Path(tmp) / log.name).write_text(proc.stderr)
        os.replace(Path(tmp) / log.name, log)
        os.replace(out, target)  # atomic: concurrent builders each rename a complete file
    return Build(target, proc.stderr)
