"""The worker's KV cache: the paged pool plus the radix tree that keeps finished prefixes' slots.

Slot ownership: every allocated slot belongs either to exactly one running request (tokens it computed
that are not in the tree yet) or to the tree (cached prefixes; the requests that use them hold a lock).
`available` = free slots + cached slots that no request locks; `alloc` evicts cached prefixes (LRU)
when the free list is short. Every insertion and eviction is logged as a full token sequence from the
root, so the worker can tell the scheduler's index.
"""

from __future__ import annotations

import torch

from minisgl.cache.kv_pool import KVPool
from minisgl.cache.radix import RadixNode, RadixTree


class KVCache:
    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.tree = RadixTree()
        self._log: list[tuple[bool, list[int]]] = []  # (inserted?, tokens), drained once per step

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
                self._log.append((False, ev.tokens))
        return self.pool.alloc(n)

    def match(self, tokens: list[int]) -> tuple[int, RadixNode, torch.Tensor]:
        """Longest cached prefix of tokens, locked: (length, node to unlock later, its slot ids)."""
        m = self.tree.match_prefix(tokens)
        self.tree.lock(m.node)
        slots = torch.cat(m.values) if m.values else self.pool.k.new_empty(0, dtype=torch.int64)
        return m.length, m.node, slots

    def unlock(self, node: RadixNode) -> None:
        self.tree.unlock(node)

    def cache(self, tokens: list[int], slots: torch.Tensor, locked_len: int, node: RadixNode) -> int:
        """Hand a request's computed tokens (with their slots) to the tree and drop its lock on `node`
        (which covers its first locked_len tokens). Slots of tokens the tree already had are freed.
        Returns how many tokens were already cached."""
        existing = self.tree.insert(tokens, slots)
        if existing > locked_len:  # computed twice (another request cached them first): free ours
            self.pool.free(slots[locked_len:existing])
        if existing < len(tokens):
            self._log.append((True, list(tokens)))
        self.tree.unlock(node)
        return existing

    def flush(self) -> None:
        """Drop every unlocked prefix. Not logged: the worker reports a flush as one flag."""
        for ev in self.tree.flush():
            self.pool.free(ev.value)

    def drain_logs(self) -> tuple[list[list[int]], list[list[int]]]:
        """(inserted, evicted) since the last call, as full sequences from the root. A reader applies the
        evictions first, so an insertion cut short by a later eviction in the same step is left out
        (the reader would otherwise believe it still fully cached)."""
        log, self._log = self._log, []
        inserted, evicted = [], []
        for i, (is_insert, seq) in enumerate(log):
            if not is_insert:
                evicted.append(seq)
            elif not any(not later_insert and seq[:len(e)] == e for later_insert, e in log[i + 1:]):
                inserted.append(seq)
        return inserted, evicted
