"""One byte bound for every KV cache kept between calls: prefix-cache blocks and paused generations' caches.

Each kept cache is an entry of the pool: its bytes, and a callback that drops it. The entries share one
least-recently-used order, so a shared prompt's blocks and a paused generation's cache compete for the same
memory on the same terms. An entry a running request holds is pinned (counted) and never evicted; when the
unpinned entries cannot make room, the newcomer is not kept, so the bound always holds.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

MIN_DEFAULT_BYTES = 512 << 20  # the continuation store's KV bound before the pool existed
MAX_DEFAULT_BYTES = 4 << 30


def default_bytes() -> int:
    """The bound when none is given: an eighth of physical memory, between 512 MiB and 4 GiB."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return MIN_DEFAULT_BYTES
    return max(MIN_DEFAULT_BYTES, min(MAX_DEFAULT_BYTES, ram // 8))


@dataclass
class _Held:
    nbytes: int
    on_evict: Callable[[], None]
    pins: int = 0


class KVPool:
    """Kept KV caches bounded by `max_bytes` in all, least recently used evicted first, pinned ones never.

    `lock` is re-entrant and guards the pool; owners (PrefixCache) guard their own indexes with it too, which
    lets `on_evict` callbacks (run under it) update them. Callbacks must not take other locks.
    """

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = default_bytes() if max_bytes is None else max_bytes
        if not isinstance(self.max_bytes, int) or self.max_bytes < 0:
            raise ValueError(f"a KV pool's bound must be a non-negative number of bytes, got {max_bytes!r}")
        self.lock = threading.RLock()
        self._entries: OrderedDict[Hashable, _Held] = OrderedDict()  # least recently used first
        self.used = 0
        self.evictions = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def put(self, key: Hashable, nbytes: int, on_evict: Callable[[], None]) -> bool:
        """Keep `nbytes` under `key` as the most recently used entry, evicting others to make room; False (and
        nothing kept) when the unpinned entries cannot make room."""
        with self.lock:
            self.remove(key)
            if not self._make_room(nbytes):
                return False
            self._entries[key] = _Held(nbytes, on_evict)
            self.used += nbytes
            return True

    def touch(self, key: Hashable) -> None:
        """Mark an entry as just used."""
        with self.lock:
            if key in self._entries:
                self._entries.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        """Forget an entry without calling its eviction callback (its owner dropped it)."""
        with self.lock:
            held = self._entries.pop(key, None)
            if held is not None:
                self.used -= held.nbytes

    def pin(self, key: Hashable) -> bool:
        """Hold an entry against eviction (counted: each pin needs an `unpin`); False when it is not kept."""
        with self.lock:
            held = self._entries.get(key)
            if held is None:
                return False
            held.pins += 1
            return True

    def unpin(self, key: Hashable) -> None:
        with self.lock:
            held = self._entries.get(key)
            if held is not None and held.pins > 0:
                held.pins -= 1

    def _make_room(self, nbytes: int) -> bool:
        """Evict unpinned entries, least recently used first, until `nbytes` more fit (the lock held)."""
        if nbytes > self.max_bytes:
            return False
        victims, free = [], self.max_bytes - self.used
        for key, held in self._entries.items():
            if free >= nbytes:
                break
            if held.pins == 0:
                victims.append(key)
                free += held.nbytes
        if free < nbytes:
            return False
        for key in victims:
            held = self._entries.pop(key)
            self.used -= held.nbytes
            self.evictions += 1
            held.on_evict()
        return True
