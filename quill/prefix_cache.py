"""Automatic prefix caching: the KV rows of prompts already computed, reused by later requests that share them.

The tokens are cut into blocks of `block_size`; a block's key hashes its parent's key and its tokens, so one key
names the whole prefix up to the block's end (as vLLM's automatic prefix caching does). The first block's key
also hashes a salt: the requests of one salt (one API key, by default) reuse only each other's blocks, since a
hit shows in timing. A block keeps its keys and values for every layer in the model's KV-cache dtype; the
bytes are accounted in a `KVPool`, evicted least recently used first, and pinned while a request copies them.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field

from torch import Tensor

from quill.kvpool import KVPool

DEFAULT_BLOCK = 16


@dataclass
class _Block:
    k: Tensor  # [n_layer, n_head, block_size, head_dim]
    v: Tensor

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass
class PrefixHit:
    """The cached blocks of a prompt's longest cached prefix, pinned until `release`."""

    cache: PrefixCache | None = None
    keys: list[bytes] = field(default_factory=list)
    blocks: list[_Block] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Prompt tokens the hit covers (whole blocks)."""
        return len(self.blocks) * self.cache.block_size if self.blocks else 0

    def copy_into(self, k_row: Tensor, v_row: Tensor) -> None:
        """Write the cached keys and values into positions 0..tokens-1 of a KV-cache row ([n_layer, n_head, L, D])."""
        b = self.cache.block_size if self.blocks else 0
        for j, block in enumerate(self.blocks):
            k_row[:, :, j * b:(j + 1) * b] = block.k
            v_row[:, :, j * b:(j + 1) * b] = block.v

    def release(self) -> None:
        """Let the blocks be evicted again (idempotent)."""
        if self.cache is not None:
            with self.cache.pool.lock:
                for key in self.keys:
                    self.cache.pool.unpin((id(self.cache), key))
        self.keys, self.blocks = [], []


class PrefixCache:
    """The cached prompt blocks of one model, bounded by the bytes of a (possibly shared) `KVPool`.

    Counters for /metrics: `queries` (lookups), `hits` (lookups that found a block), `queried_tokens` (prompt
    tokens looked up) and `hit_tokens` (tokens found cached).
    """

    def __init__(self, pool: KVPool, block_size: int = DEFAULT_BLOCK):
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        self.pool, self.block_size = pool, block_size
        self._blocks: dict[bytes, _Block] = {}
        self.queries = self.hits = self.queried_tokens = self.hit_tokens = 0
        self.nbytes = 0  # of the blocks kept

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self, tokens: list[int], salt: str = "", limit: int | None = None) -> list[bytes]:
        """The chained keys of the whole blocks among the first `limit` (default all) tokens."""
        b = self.block_size
        n = len(tokens) if limit is None else min(limit, len(tokens))
        out, parent = [], hashlib.blake2b(salt.encode(), digest_size=16).digest()
        for j in range(n // b):
            parent = hashlib.blake2b(parent + array("q", tokens[j * b:(j + 1) * b]).tobytes(), digest_size=16).digest()
            out.append(parent)
        return out

    def lookup(self, tokens: list[int], salt: str = "", limit: int | None = None, count: bool = True) -> PrefixHit:
        """The longest cached prefix among the first `limit` tokens, its blocks pinned (call `hit.release()`);
        `count`: add it to the counters."""
        keys = self.keys(tokens, salt, limit)
        hit = PrefixHit(self)
        with self.pool.lock:
            for key in keys:
                block = self._blocks.get(key)
                if block is None or not self.pool.pin((id(self), key)):
                    break
                hit.keys.append(key)
                hit.blocks.append(block)
            self._touch(hit.keys)
            if count:
                self.queries += 1
                self.hits += bool(hit.blocks)
                self.queried_tokens += len(tokens)
                self.hit_tokens += hit.tokens
        return hit

    def peek(self, tokens: list[int], salt: str = "", limit: int | None = None) -> int:
        """How many of the first `limit` tokens a lookup would find cached now (nothing pinned, nothing counted)."""
        with self.pool.lock:
            found = 0
            for key in self.keys(tokens, salt, limit):
                if key not in self._blocks:
                    break
                found += 1
        return found * self.block_size

    def insert(self, tokens: list[int], salt: str, k_row: Tensor, v_row: Tensor) -> int:
        """Keep the whole blocks of `tokens`, whose keys and values are positions 0..len-1 of a KV-cache row;
        blocks already kept are only touched. Returns how many blocks are new.

        The new blocks are copied outside the lock, which lookups from the server's event loop also take."""
        b, added, kept = self.block_size, 0, []
        keys = self.keys(tokens, salt)
        with self.pool.lock:
            missing = [j for j, key in enumerate(keys) if key not in self._blocks]
        copies = {j: _Block(k_row[:, :, j * b:(j + 1) * b].clone(), v_row[:, :, j * b:(j + 1) * b].clone())
                  for j in missing}
        with self.pool.lock:
            try:
                for j, key in enumerate(keys):
                    if key not in self._blocks:
                        block = copies.get(j)  # None: evicted since it was found (another thread made room)
                        if block is None or not self.pool.put((id(self), key), block.nbytes,
                                                              self._evicter(key)):
                            break  # no room: the blocks after it could never be reached
                        self._blocks[key] = block
                        self.nbytes += block.nbytes
                        added += 1
                    self.pool.pin((id(self), key))  # making room for its children must not evict it
                    kept.append(key)
            finally:
                for key in kept:
                    self.pool.unpin((id(self), key))
                self._touch(kept)
        return added

    def clear(self) -> None:
        """Drop every block (the model is going away)."""
        with self.pool.lock:
            for key in self._blocks:
                self.pool.remove((id(self), key))
            self._blocks.clear()
            self.nbytes = 0

    def _touch(self, keys: list[bytes]) -> None:
        # leaf first, so a prefix's first block is the most recent: eviction takes leaves before the blocks that
        # lead to them (a block whose parent is gone can never be reached again)
        for key in reversed(keys):
            self.pool.touch((id(self), key))

    def _evicter(self, key: bytes):
        def evict() -> None:
            block = self._blocks.pop(key, None)
            if block is not None:
                self.nbytes -= block.nbytes
        return evict
