"""Continuation handles: a generation that its budget ended, kept so that a later call resumes it exactly.

The paused state (tokens, random stream, detokeniser and stop-matcher state) is small and is kept until the
handle expires: in memory, and on disk when the store has a directory, so a handle outlives a restart. The
KV cache is large: it is kept in memory only, least-recently-used first out, and a resumed call whose cache
is gone recomputes it from the tokens. Handles are unguessable and bound to the API key that made them.
"""

from __future__ import annotations

import base64
import dataclasses
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

from quill.errors import ContinuationError
from quill.generate import GenerationRequest, SequenceState
from quill.sampling import SamplingParams
from quill.weights import atomic_write

HANDLE = re.compile(r"cont_[A-Za-z0-9_-]{1,64}")  # what `put` makes: "cont_" + URL-safe base64
DEFAULT_TTL = 3600.0  # seconds a handle stays valid after its call ended
DEFAULT_KV_BYTES = 512 << 20  # KV caches kept in memory, all handles together


def owner_id(api_key: str | None) -> str:
    """What a handle is bound to: a hash of the caller's API key ('' for local, keyless callers)."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else ""


@dataclass
class _Entry:
    state: SequenceState
    owner: str
    model: str
    expires: float


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
    gen = d["generator_state"]
    gen_state = torch.frombuffer(bytearray(base64.b64decode(gen)), dtype=torch.uint8) if gen is not None else None
    return SequenceState(GenerationRequest(sampling=SamplingParams(**sampling), **req), d["tokens"], gen_state,
                         d["decoder_ids"], d["decoder_read"], d["held"])


class ContinuationStore:
    """Paused generations by handle, with a time-to-live, an LRU-bounded KV cache and optional disk backing."""

    def __init__(self, directory: str | os.PathLike | None = None, ttl: float = DEFAULT_TTL,
                 max_kv_bytes: int = DEFAULT_KV_BYTES):
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.ttl, self.max_kv_bytes = ttl, max_kv_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # key: hash of the handle
        self._lock = threading.Lock()

    @staticmethod
    def _key(handle: str) -> str:
        return hashlib.sha256(handle.encode()).hexdigest()

    def put(self, state: SequenceState, owner: str, model: str) -> str:
        """Keep a paused sequence; returns its new handle (ContinuationError "continuation_not_kept" when the
        disk cannot take it: nothing is kept then)."""
        handle = "cont_" + secrets.token_urlsafe(24)
        key = self._key(handle)
        entry = _Entry(state, owner, model, time.time() + self.ttl)
        if self.directory is not None:
            record = {"owner": owner, "model": model, "expires": entry.expires, "state": state_to_json(state)}
            try:
                atomic_write(self.directory / f"{key}.json", lambda p: p.write_text(json.dumps(record)))
            except OSError as e:  # a full disk: no handle rather than one that a restart would lose
                raise ContinuationError(f"no continuation handle could be kept: cannot write to {self.directory} "
                                        f"({e.strerror or e})", "continuation_not_kept") from e
        with self._lock:
            self._entries[key] = entry
            self._evict()
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
        if entry is None:
            entry = self._load(key)
        if entry is None:
            raise ContinuationError("unknown continuation handle", "continuation_not_found")
        if not hmac.compare_digest(entry.owner, owner):
            raise ContinuationError("this continuation handle belongs to another API key",
                                    "continuation_forbidden")
        if time.time() > entry.expires:
            self._drop(key)
            raise ContinuationError("continuation handle has expired", "continuation_expired")
        if entry.model != model:
            raise ContinuationError(f"continuation handle belongs to model {entry.model!r}, not {model!r}",
                                    "continuation_model_mismatch")
        return entry.state

    def _load(self, key: str) -> _Entry | None:
        path = self.directory / f"{key}.json" if self.directory is not None else None
        if path is None or not path.exists():
            return None
        record = json.loads(path.read_text())
        entry = _Entry(state_from_json(record["state"]), record["owner"], record["model"], record["expires"])
        with self._lock:
            self._entries[key] = entry
        return entry

    def _drop(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)
        if self.directory is not None:
            (self.directory / f"{key}.json").unlink(missing_ok=True)

    def _evict(self) -> None:
        """Drop expired entries, then KV caches, oldest first, until the kept caches fit the bound."""
        now = time.time()
        for key in [k for k, e in self._entries.items() if e.expires < now]:
            del self._entries[key]
            if self.directory is not None:
                (self.directory / f"{key}.json").unlink(missing_ok=True)
        total = sum(_kv_bytes(e.state) for e in self._entries.values())
        for entry in self._entries.values():
            if total <= self.max_kv_bytes:
                break
            total -= _kv_bytes(entry.state)
            entry.state = dataclasses.replace(entry.state, kv=None)


def _kv_bytes(state: SequenceState) -> int:
    return sum(t.nbytes for t in state.kv) if state.kv is not None else 0
