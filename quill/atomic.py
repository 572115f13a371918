"""Atomic, durable file writes: a file is either its old content or its whole new content, even after a crash.

Every file Quill publishes (checkpoints, store manifests, upload sidecars, continuation handles, training
logs) goes through `atomic_write`: written to a temporary sibling, fsynced, renamed over the target, and the
folder fsynced so that the rename itself survives a power loss.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames, deletions) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Write through `write(tmp_path)` into a temporary sibling, fsync it, rename it over `path`, fsync the folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; published files are ordinary readable files
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_durably(path: str | os.PathLike, data: Any) -> None:
    """`atomic_write` of `data` as indented JSON (values JSON cannot hold written as their str)."""
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8"))
