"""Continuation handles: a generation that its budget ended, kept so that a later call resumes it exactly.

The paused state (tokens, random stream, detokeniser and stop-matcher state) is small and is kept until the
handle expires: in memory, and on disk when the store has a directory, so a handle outlives a restart. The
KV cache is large: it is kept in memory only, in a `KVPool` it may share with the prefix cache (one bound,
least-recently-used first out; the memory it took goes back to the OS), and a resumed call whose cache is gone
recomputes it from the tokens. The number of handles is
bounded too. Handles are unguessable and bound to the API key that made them.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import dataclasses
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from quill.atomic import atomic_write
from quill.errors import ContinuationError
from quill.generate import GenerationRequest, SequenceState
from quill.kvpool import KVPool
from quill.sampling import SamplingParams
from quill.structured import Constraint

HANDLE = re.compile(r"cont_[A-Za-z0-9_-]{1,64}")  # what `put` makes: "cont_" + URL-safe base64
DEFAULT_TTL = 3600.0  # seconds a handle stays valid after its call ended
DEFAULT_KV_BYTES = 512 << 20  # KV caches kept in memory, all handles together (a store with a pool of its own)
DEFAULT_MAX_HANDLES = 10_000  # handles kept (in memory and on disk), all callers together
KEY_FILE = re.compile(r"[0-9a-f]{64}\.json")  # a handle's file: the SHA-256 of the handle
STALE_TEMPORARY_SECONDS = 3600.0  # an unfinished write older than this is removed (another process may be writing)


def owner_id(api_key: str | None) -> str:
    """What a handle is bound to: a hash of the caller's API key ('' for local, keyless callers)."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else ""


@dataclass
class _Entry:
    owner: str
    model: str
    expires: float
    state: SequenceState | None = None  # None: only on disk (read by the next `get`)


def state_to_json(state: SequenceState) -> dict:
    """A JSON-able form of a paused sequence, without its KV cache."""
    req = dataclasses.asdict(state.request)
    req["sampling"]["logit_bias"] = {str(k): v for k, v in state.request.sampling.logit_bias.items()}
    gen = state.generator_state
    return {"request": req, "tokens": state.tokens, "decoder_ids": state.decoder_ids,
            "decoder_read": state.decoder_read, "held": state.held,
            "generator_state": base64.b64encode(gen.numpy().tobytes()).decode() if gen is not None else None}


def state_from_json(d: dict) -> SequenceState:
    """Inverse of `state_to_json`."""
    req = dict(d["request"])
    sampling = dict(req.pop("sampling"))
    sampling["logit_bias"] = {int(k): v for k, v in sampling["logit_bias"].items()}
    sampling["banned_tokens"] = tuple(sampling["banned_tokens"])
    constraint = req.pop("constraint", None)
    req["constraint"] = Constraint(**constraint) if constraint is not None else None
    gen = d["generator_state"]
    gen_state = torch.frombuffer(bytearray(base64.b64decode(gen)), dtype=torch.uint8) if gen is not None else None
    return SequenceState(GenerationRequest(sampling=SamplingParams(**sampling), **req), d["tokens"], gen_state,
                         d["decoder_ids"], d["decoder_read"], d["held"])


class ContinuationStore:
    """Paused generations by handle, with a time-to-live, bounded in number and in KV bytes, optionally on disk.

    At most `max_handles` handles are kept (the least recently used go first, file and all). Their KV caches are
    entries of `pool` (by default a pool of their own bounded by `max_kv_bytes`): beyond its bound the least
    recently used entries are dropped; a handle whose cache went stays.
    Expired handles are removed on every `put` and `sweep`; a store on disk indexes the handles a previous run
    left at start, removing expired and unreadable files.
    """

    def __init__(self, directory: str | os.PathLike | None = None, ttl: float = DEFAULT_TTL,
                 max_kv_bytes: int = DEFAULT_KV_BYTES, max_handles: int = DEFAULT_MAX_HANDLES,
                 pool: KVPool | None = None):
        self.directory = Path(directory) if directory is not None else None
        self.ttl, self.max_handles = ttl, max_handles
        self.pool = pool if pool is not None else KVPool(max_kv_bytes)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # key: hash of the handle; least recent first
        self._lock = threading.Lock()
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._index()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(handle: str) -> str:
        return hashlib.sha256(handle.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def put(self, state: SequenceState, owner: str, model: str) -> str:
        """Keep a paused sequence; returns its new handle (ContinuationError "continuation_not_kept" when the
        disk cannot take it: nothing is kept then)."""
        handle = "cont_" + secrets.token_urlsafe(24)
        key = self._key(handle)
        entry = _Entry(owner, model, time.time() + self.ttl, state)
        if self.directory is not None:
            record = {"owner": owner, "model": model, "expires": entry.expires, "state": state_to_json(state)}
            try:
                atomic_write(self._path(key), lambda p: p.write_text(json.dumps(record)))
            except OSError as e:  # a full disk: no handle rather than one that a restart would lose
                raise ContinuationError(f"no continuation handle could be kept: cannot write to {self.directory} "
                                        f"({e.strerror or e})", "continuation_not_kept") from e
        with self._lock:
            self._entries[key] = entry
            freed = self._evict()
            evictions, nbytes = self.pool.evictions, _kv_bytes(state)
            if nbytes and not self.pool.put((id(self), key), nbytes, functools.partial(_drop_kv, entry)):
                _drop_kv(entry)
            freed |= self.pool.evictions != evictions
        if freed:
            release_freed_memory()
        return handle

    def get(self, handle: str, owner: str, model: str) -> SequenceState:
        """The paused sequence behind a handle (its KV cache if still in memory), checked for owner and expiry."""
        if not isinstance(handle, str) or not HANDLE.fullmatch(handle):  # any text, lone surrogates included
            raise ContinuationError("continuation handle is malformed", "continuation_not_found")
        key = self._key(handle)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.pool.touch((id(self), key))
        if entry is None or entry.state is None:
            entry = self._load(key)
        if entry is None:
            raise ContinuationError("unknown continuation handle", "continuation_not_found")
        if not hmac.compare_digest(entry.owner, owner):
            raise ContinuationError("this continuation handle belongs to another API key",
                                    "continuation_forbidden")
        if time.time() > entry.expires:
            with self._lock:
                self._remove(key)
            raise ContinuationError("continuation handle has expired", "continuation_expired")
        if entry.model != model:
            raise ContinuationError(f"continuation handle belongs to model {entry.model!r}, not {model!r}",
                                    "continuation_model_mismatch")
        return entry.state

    def sweep(self) -> None:
        """Remove expired handles (and their files) and return freed memory; the server runs it periodically."""
        with self._lock:
            self._evict()
        release_freed_memory()

    def _read(self, path: Path) -> dict | None:
        """A handle file's record, or None when it is unreadable (it is removed then)."""
        try:
            record = json.loads(path.read_text())
            record["expires"] = float(record["expires"])
            return record
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            return None

    def _index(self) -> None:
        """Index the handles a previous run left on disk: expired, unreadable and half-written files go."""
        now, found = time.time(), []
        for path in self.directory.iterdir():
            if path.name.endswith(".tmp"):  # atomic_write's temporary of a write that never finished
                if path.stat().st_mtime < now - STALE_TEMPORARY_SECONDS:
                    path.unlink(missing_ok=True)
            elif KEY_FILE.fullmatch(path.name):
                record = self._read(path)
                if record is not None:
                    found.append((record["expires"], path.name[:-5], record))
        with self._lock:
            for expires, key, record in sorted(found):
                self._entries[key] = _Entry(record["owner"], record["model"], expires)
            self._evict()

    def _load(self, key: str) -> _Entry | None:
        record = self._read(self._path(key)) if self.directory is not None else None
        if record is None:
            return None
        entry = _Entry(record["owner"], record["model"], record["expires"], state_from_json(record["state"]))
        with self._lock:
            self._entries[key] = entry
            self._evict()
        return entry

    def _remove(self, key: str) -> None:
        """Forget a handle and remove its file (the lock held)."""
        self._entries.pop(key, None)
        self.pool.remove((id(self), key))
        if self.directory is not None:
            self._path(key).unlink(missing_ok=True)

    def _evict(self) -> bool:
        """Drop expired handles, then the least recently used beyond `max_handles` (the lock held); the pool
        bounds their KV caches. Whether a KV cache was dropped."""
        now, freed = time.time(), False
        for key in [k for k, e in self._entries.items() if e.expires < now]:
            freed |= _kv_bytes(self._entries[key].state) > 0
            self._remove(key)
        while len(self._entries) > self.max_handles:
            key = next(iter(self._entries))
            freed |= _kv_bytes(self._entries[key].state) > 0
            self._remove(key)
        return freed


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None on another C library."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Give memory freed to the C heap back to the OS (glibc keeps it otherwise).

    Dropped KV caches come and go in sizes that glibc's heap keeps after they are freed, so without this the
    process outgrows the KV bound a little with every handle (docs/cost.md has the figure).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _drop_kv(entry: _Entry) -> None:
    """The pool evicted a handle's KV cache (any thread, the pool's lock held): a later resume recomputes it."""
    entry.state = dataclasses.replace(entry.state, kv=None)


def _kv_bytes(state: SequenceState | None) -> int:
    return sum(t.nbytes for t in state.kv) if state is not None and state.kv is not None else 0
