"""The worker's KV cache: the paged pool plus the radix tree that keeps finished prefixes' slots.

Slot ownership: every allocated slot belongs either to exactly one running request (tokens it computed
that are not in the tree yet) or to the tree (cached prefixes; the requests that use them hold a lock).
`available` = free slots + cached slots that no request locks; `alloc` evicts cached prefixes (LRU)
when the free list is short. Every insertion and eviction is logged, so the worker can tell the
scheduler's index: evictions and anonymous insertions as full token sequences from the root, a running
request's chunk-by-chunk insertions as extensions of what was already reported for it (drain_logs).
"""

from __future__ import annotations

import torch

from minisgl.cache.kv_pool import KVPool
from minisgl.cache.radix import RadixNode, RadixTree
from minisgl.messages import CacheExtension


class KVCache:
    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.tree = RadixTree()
        self._log: list[tuple[bool, list[int], str]] = []  # (inserted?, tokens, key), drained once per step
        self._reported: dict[str, int] = {}  # key (a request id) -> its tokens reported as inserted so far
        self._forgotten: list[str] = []  # keys whose request is gone, dropped once this step's log is out

    @property
    def available(self) -> int:
        return self.pool.free_count + self.tree.evictable_tokens

    def alloc(self, n: int) -> torch.Tensor | None:
        short = n - self.pool.free_count
        if short > 0:
            if short > self.tree.evictable_tokens:
                return None
            for ev in self.tree.evict(short):
                self.pool.free(ev.value)
                self._log.append((False, ev.tokens, ""))
        return self.pool.alloc(n)

    def match(self, tokens: list[int]) -> tuple[int, RadixNode, torch.Tensor]:
        """Longest cached prefix of tokens, locked: (length, node to unlock later, its slot ids)."""
        m = self.tree.match_prefix(tokens)
        self.tree.lock(m.node)
        slots = torch.cat(m.values) if m.values else self.pool.k.new_empty(0, dtype=torch.int64)
        return m.length, m.node, slots

    def unlock(self, node: RadixNode) -> None:
        self.tree.unlock(node)

    def cache(self, tokens: list[int], slots: torch.Tensor, locked_len: int, node: RadixNode, key: str = "") -> int:
        """Hand a request's computed tokens (with their slots) to the tree and drop its lock on `node`
        (which covers its first locked_len tokens). Slots of tokens the tree already had are freed.
        `key` (the request id) lets the log report only what is new since its last insertion. Returns
        how many tokens were already cached."""
        existing = self.tree.insert(tokens, slots)
        if existing > locked_len:  # computed twice (another request cached them first): free ours
            self.pool.free(slots[locked_len:existing])
        if existing < len(tokens):
            self._log.append((True, list(tokens), key))
        self.tree.unlock(node)
        return existing

    def flush(self) -> None:
        """Drop every unlocked prefix. Not logged: the worker reports a flush as one flag."""
        for ev in self.tree.flush():
            self.pool.free(ev.value)

    def forget(self, key: str) -> None:
        """The request behind `key` is gone (after its last insertion of this step, which is still to be
        reported as an extension)."""
        if key:
            self._forgotten.append(key)

    def drain_logs(self) -> tuple[list[list[int]], list[list[int]], list[CacheExtension]]:
        """(inserted, evicted, extended) since the last call: evictions and insertions without a key as
        full sequences from the root, keyed insertions as extensions of the key's last one. A reader
        applies the evictions first, so an insertion cut short by a later eviction in the same step is
        left out (the reader would otherwise believe it still fully cached)."""
        log, self._log = self._log, []
        inserted: list[list[int]] = []
        evicted: list[list[int]] = []
        extended: list[CacheExtension] = []
        for i, (is_insert, seq, key) in enumerate(log):
            if not is_insert:
                evicted.append(seq)
            elif any(not later_insert and seq[:len(e)] == e for later_insert, e, _ in log[i + 1:]):
                continue
            elif key:
                start = self._reported.get(key, 0)
                extended.append(CacheExtension(key, start, seq[start:]))
                self._reported[key] = len(seq)
            else:
                inserted.append(seq)
        for key in self._forgotten:
            self._reported.pop(key, None)
        self._forgotten = []
        return inserted, evicted, extended
