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
child is gone. The root is locked forever.
"""

from __future__ import annotations

import heapq
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

    def __lt__(self, other: RadixNode) -> bool:  # heap tie-break
        return self.last_access < other.last_access


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

    @property
    def protected_tokens(self) -> int:
        return self.total_tokens - self.evictable_tokens

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # ------------------------------------------------------------------ lookup

    def match_prefix(self, tokens: Sequence[int]) -> Match:
        now = self._tick()
        node, pos, values = self.root, 0, []
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            n = _common_len(child.key, tokens, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            values.append(child.value)
            node, pos = child, pos + n
        return Match(pos, node, values)

    def prefix_len(self, tokens: Sequence[int]) -> int:
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            n = _common_len(child.key, tokens, pos)
            pos += n
            if n < len(child.key):
                break
            node = child
        return pos

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
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            n = _common_len(child.key, tokens, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            node, pos = child, pos + n
        existing = pos
        if pos < len(tokens):
            leaf = RadixNode(list(tokens[pos:]), _slice(value, pos), node)
            leaf.last_access = now
            node.children[tokens[pos]] = leaf
            self.total_tokens += len(leaf.key)
            self.evictable_tokens += len(leaf.key)
            node = leaf
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
            node = node.parent  # type: ignore[assignment]

    # ------------------------------------------------------------------ eviction

    def evict(self, num_tokens: int) -> list[Evicted]:
        """Evict unlocked leaves, least recently used first, until num_tokens are gone (or nothing
        unlocked is left)."""
        if num_tokens <= 0:
            return []
        heap = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        out: list[Evicted] = []
        freed = 0
        while heap and freed < num_tokens:
            node = heapq.heappop(heap)
            out.append(Evicted(self._path(node), node.value))
            freed += len(node.key)
            parent = self._detach(node)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, parent)
        return out

    def flush(self) -> list[Evicted]:
        return self.evict(self.evictable_tokens)

    def _detach(self, node: RadixNode) -> RadixNode:
        parent = node.parent
        assert parent is not None
        del parent.children[node.key[0]]
        self.total_tokens -= len(node.key)
        if node.lock_ref == 0:
            self.evictable_tokens -= len(node.key)
        return parent

    def _path(self, node: RadixNode) -> list[int]:
        keys = []
        while node is not self.root:
            keys.append(node.key)
            node = node.parent  # type: ignore[assignment]
        return [t for key in reversed(keys) for t in key]

    def _nodes(self) -> list[RadixNode]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node is not self.root:
                out.append(node)
        return out

    # ------------------------------------------------------------------ index side

    def remove(self, tokens: Sequence[int]) -> int:
        """Forget the tail of `tokens` that no other cached sequence needs: everything below the last
        point on the path where another sequence branches off or ends. Used by the scheduler's index
        when a worker reports an evicted leaf. Returns how many tokens were dropped. Locked nodes
        stay. (It can forget a little more than the worker did when the worker's tree was split at a
        point the index never saw; an index that under-promises is the safe direction.)"""
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                return 0
            n = _common_len(child.key, tokens, pos)
            if n < len(child.key):
                if pos + n < len(tokens):
                    return 0  # diverges: the index never held this sequence
                child = self._split(child, n)
            node, pos = child, pos + n
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
