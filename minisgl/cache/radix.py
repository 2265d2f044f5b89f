"""A radix tree over token ids, with an optional payload per node.

The worker stores KV slot ids as the payload (a tensor, one slot per token of the node's key); the
scheduler reuses the same class with no payload as its per-worker index of what is cached. Payloads
only need slicing (`value[a:b]`), so tensors and lists both work; `None` means "no payload".

    tree = RadixTree()
    m = tree.match_prefix(tokens)     # Match(length, node, values): longest cached prefix; splits a
                                      # node where the match ends inside it; marks the path as used
    tree.prefix_len(tokens)           # the same length, read-only (no split, no LRU touch)
    tree.insert(tokens, value)        # -> how many leading tokens were already cached; the caller
                                      #    frees its own payload for those (they are duplicates)
    tree.lock(m.node) / unlock(node)  # reference counts along the path: locked tokens never evict
    tree.evict(n)                     # -> [Evicted(tokens, value)]: LRU unlocked leaves, >= n tokens
                                      #    if possible; tokens is the full path from the root
    tree.flush()                      # evict everything unlocked
    tree.remove(tokens)               # index side: a worker evicted the leaf ending at `tokens`
    tree.reset()                      # drop everything, locked or not (index side)
    tree.total_tokens, tree.evictable_tokens, tree.protected_tokens

Eviction takes whole leaves, least recently used first; a parent becomes a candidate once its last
child is gone. The candidates are kept in a heap across calls (an entry is pushed whenever a leaf may have
become evictable or was used; stale entries are skipped when popped), so an eviction costs the leaves it
takes, not a walk of the whole tree. The root is locked forever.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence


class RadixNode:
    __slots__ = ("key", "value", "children", "parent", "lock_ref", "last_access", "terminal")

    def __init__(self, key: list[int], value: Any, parent: RadixNode | None) -> None:
        self.key = key
        self.value = value
        self.children: dict[int, RadixNode] = {}
        self.parent = parent
        self.lock_ref = 0
        self.last_access = 0
        self.terminal = False  # some inserted sequence ends here (used by remove)


@dataclass
class Match:
    length: int
    node: RadixNode  # deepest node of the matched prefix (the root when nothing matched)
    values: list[Any] = field(default_factory=list)  # payloads along the path, in order


@dataclass
class Evicted:
    tokens: list[int]  # full sequence from the root to the end of the evicted node
    value: Any  # the evicted node's payload (its own tokens only)


def _slice(value: Any, a: int, b: int | None = None) -> Any:
    return None if value is None else value[a:b]


def _common_len(key: list[int], tokens: Sequence[int], start: int) -> int:
    n = min(len(key), len(tokens) - start)
    seg = tokens[start:start + n]
    if key[:n] == (seg if isinstance(seg, list) else list(seg)):  # fast path, compared in C
        return n
    i = 0
    while i < n and key[i] == tokens[start + i]:
        i += 1
    return i


class RadixTree:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.root = RadixNode([], None, None)
        self.root.lock_ref = 1
        self._clock = 0
        self.total_tokens = 0
        self.evictable_tokens = 0
        # (last_access, tie-break, node) of leaves that were evictable when pushed (see _offer)
        self._lru: list[tuple[int, int, RadixNode]] = []
        self._order = itertools.count()

    @property
    def protected_tokens(self) -> int:
        return self.total_tokens - self.evictable_tokens

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # ------------------------------------------------------------------ lookup

    def _walk(self, tokens: Sequence[int], split: str = "always", now: int = 0
              ) -> tuple[RadixNode, int, list[Any], bool]:
        """The one descent: follow `tokens` from the root as far as the tree holds them. Where the match
        ends inside a node, split it there ("always"; "at_end": only when `tokens` end there too), or
        stop with the partial match counted ("never", and "at_end" otherwise). now > 0: mark the path
        used. Returns (deepest whole node, tokens matched, payloads along the path, diverged inside a
        node)."""
        node, pos, values = self.root, 0, []
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            n = _common_len(child.key, tokens, pos)
            if n < len(child.key):
                if split == "never" or (split == "at_end" and pos + n < len(tokens)):
                    return node, pos + n, values, True
                child = self._split(child, n)
            if now:
                child.last_access = now
            values.append(child.value)
            node, pos = child, pos + n
        if now:
            self._offer(node)
        return node, pos, values, False

    def match_prefix(self, tokens: Sequence[int]) -> Match:
        node, pos, values, _ = self._walk(tokens, now=self._tick())
        return Match(pos, node, values)

    def prefix_len(self, tokens: Sequence[int]) -> int:
        return self._walk(tokens, split="never")[1]

    def _split(self, child: RadixNode, n: int) -> RadixNode:
        """Cut child's key after n tokens; return the new upper node (same locks and access time)."""
        parent = child.parent
        assert parent is not None
        mid = RadixNode(child.key[:n], _slice(child.value, 0, n), parent)
        mid.lock_ref = child.lock_ref
        mid.last_access = child.last_access
        child.key = child.key[n:]
        child.value = _slice(child.value, n)
        child.parent = mid
        mid.children[child.key[0]] = child
        parent.children[mid.key[0]] = mid
        return mid

    # ------------------------------------------------------------------ insert

    def insert(self, tokens: Sequence[int], value: Any = None) -> int:
        """Cache `tokens` (with `value[i]` the payload of token i). Returns how many leading tokens
        were already cached: the tree keeps its own payload for those."""
        now = self._tick()
        node, pos, _, _ = self._walk(tokens, now=now)
        existing = pos
        if pos < len(tokens):
            leaf = RadixNode(list(tokens[pos:]), _slice(value, pos), node)
            leaf.last_access = now
            node.children[tokens[pos]] = leaf
            self.total_tokens += len(leaf.key)
            self.evictable_tokens += len(leaf.key)
            node = leaf
            self._offer(leaf)
        if node is not self.root:
            node.terminal = True
        return existing

    # ------------------------------------------------------------------ locks

    def lock(self, node: RadixNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_tokens -= len(node.key)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: RadixNode) -> None:
        while node is not self.root:
            assert node.lock_ref > 0, "unlock without lock"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_tokens += len(node.key)
                self._offer(node)
            node = node.parent  # type: ignore[assignment]

    # ------------------------------------------------------------------ eviction

    def evict(self, num_tokens: int) -> list[Evicted]:
        """Evict unlocked leaves, least recently used first, until num_tokens are gone (or nothing
        unlocked is left)."""
        if num_tokens <= 0:
            return []
        out: list[Evicted] = []
        freed = 0
        while self._lru and freed < num_tokens:
            access, _, node = heapq.heappop(self._lru)
            if access != node.last_access or not self._is_candidate(node):
                continue  # used, locked, given a child or gone since it was pushed
            out.append(Evicted(self._path(node), node.value))
            freed += len(node.key)
            self._detach(node)  # offers the parent, should it now be an unlocked leaf
        return out

    def _is_candidate(self, node: RadixNode) -> bool:
        return node.parent is not None and not node.children and node.lock_ref == 0

    def _offer(self, node: RadixNode) -> None:
        """Push node onto the LRU heap if it is an evictable leaf now (at its current access time)."""
        if self._is_candidate(node):
            heapq.heappush(self._lru, (node.last_access, next(self._order), node))
            if len(self._lru) > 2 * self.total_tokens + 1024:  # mostly stale entries: keep the live ones
                self._lru = [e for e in self._lru if e[0] == e[2].last_access and self._is_candidate(e[2])]
                heapq.heapify(self._lru)

    def flush(self) -> list[Evicted]:
        return self.evict(self.evictable_tokens)

    def _detach(self, node: RadixNode) -> RadixNode:
        parent = node.parent
        assert parent is not None
        del parent.children[node.key[0]]
        node.parent = None
        self.total_tokens -= len(node.key)
        if node.lock_ref == 0:
            self.evictable_tokens -= len(node.key)
        self._offer(parent)
        return parent

    def _path(self, node: RadixNode) -> list[int]:
        keys = []
        while node is not self.root:
            keys.append(node.key)
            node = node.parent  # type: ignore[assignment]
        return [t for key in reversed(keys) for t in key]

    # ------------------------------------------------------------------ index side

    def remove(self, tokens: Sequence[int]) -> int:
        """Forget the tail of `tokens` that no other cached sequence needs: everything below the last
        point on the path where another sequence branches off or ends. Used by the scheduler's index
        when a worker reports an evicted leaf. Returns how many tokens were dropped. Locked nodes
        stay. (It can forget a little more than the worker did when the worker's tree was split at a
        point the index never saw; an index that under-promises is the safe direction.)"""
        node, pos, _, diverged = self._walk(tokens, split="at_end")
        if diverged or pos < len(tokens):
            return 0  # the index never held this sequence
        if node is self.root:
            return 0
        dropped = 0
        for sub in self._subtree(node):  # the worker evicted a leaf: nothing below it survives there
            if sub.lock_ref == 0:
                dropped += len(sub.key)
                self._detach(sub)
        while node is not self.root and not node.children and node.lock_ref == 0:
            parent = self._detach(node)
            dropped += len(node.key)
            if parent.terminal or parent.children:
                break
            node = parent
        return dropped

    def _subtree(self, node: RadixNode) -> list[RadixNode]:
        """Strict descendants of node, deepest first."""
        out, stack = [], list(node.children.values())
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out[::-1]
