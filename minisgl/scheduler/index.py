"""The scheduler's view of one worker's prefix cache: the same radix tree class as the worker's KV
cache, with no payload. Kept current from the insertions and evictions workers report."""

from __future__ import annotations

from minisgl.cache.radix import RadixTree


class PrefixIndex:
    def __init__(self) -> None:
        self.tree = RadixTree()

    def insert(self, tokens: list[int]) -> None:
        self.tree.insert(tokens)

    def remove(self, tokens: list[int]) -> None:
        self.tree.remove(tokens)

    def match_prefix(self, tokens: list[int]) -> int:
        return self.tree.prefix_len(tokens)

    def clear(self) -> None:
        self.tree.reset()

    @property
    def num_tokens(self) -> int:
        return self.tree.total_tokens
