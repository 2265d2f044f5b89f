"""The worker's KV memory: the paged pool (kv_pool), the radix prefix tree (radix), and the two together
(kv_cache). The radix tree is also the scheduler's per-worker index, with no payload."""

from minisgl.cache.kv_cache import KVCache
from minisgl.cache.kv_pool import KVPool
from minisgl.cache.radix import RadixTree

__all__ = ["KVCache", "KVPool", "RadixTree"]
