"""The paged KV pool's slot accounting, alone and under a mixed engine workload with aborts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from minisgl.cache.kv_cache import KVCache
from minisgl.cache.kv_pool import KVPool, free_memory_bytes, kv_bytes_per_token, tokens_for_memory
from minisgl.models import load_model
from minisgl.models.decoder import CausalLM
from tests.test_engine import Collector, assert_pool_clean, make_engine, request


def small_pool(n: int = 10) -> KVPool:
    return KVPool(num_layers=2, num_kv_heads=2, head_dim=4, num_tokens=n, dtype=torch.float32, device="cpu")


def test_alloc_free_accounting() -> None:
    pool = small_pool(10)
    assert pool.k.shape == (2, 11, 2, 4)  # one extra scratch slot
    assert pool.free_count == 10 and pool.used_count == 0
    a = pool.alloc(4)
    assert a is not None and a.dtype == torch.int64 and len(a) == 4
    b = pool.alloc(6)
    assert b is not None and pool.free_count == 0
    assert pool.alloc(1) is None  # short: None, nothing taken
    slots = torch.cat([a, b]).tolist()
    assert sorted(slots) == list(range(1, 11))  # every slot once, never the scratch slot 0
    pool.free(a)
    assert pool.free_count == 4 and pool.used_count == 6
    assert pool.alloc(5) is None and pool.free_count == 4
    c = pool.alloc(4)
    assert c is not None and sorted(c.tolist()) == sorted(a.tolist())
    pool.free(b)
    pool.free(c)
    pool.free(torch.empty(0, dtype=torch.int64))
    assert pool.free_count == 10
    pool.reset()
    assert pool.free_count == 10
    assert torch.equal(pool.k[:, 0], torch.zeros(2, 2, 4))  # padded gathers read finite zeros


def test_random_alloc_free_never_duplicates() -> None:
    rng = random.Random(0)
    pool = small_pool(64)
    held: list[torch.Tensor] = []
    for _ in range(500):
        if held and rng.random() < 0.45:
            pool.free(held.pop(rng.randrange(len(held))))
        else:
            s = pool.alloc(rng.randrange(1, 9))
            if s is not None:
                held.append(s)
        owned = [x for h in held for x in h.tolist()]
        assert len(owned) == len(set(owned)) == pool.used_count
    for h in held:
        pool.free(h)
    assert pool.free_count == 64


def test_kv_cache_alloc_evicts_unlocked_prefixes() -> None:
    cache = KVCache(small_pool(8))
    s = cache.alloc(6)
    assert s is not None
    cache.cache([1, 2, 3], s[:3], 0, cache.tree.root)
    cache.cache([4, 5, 6], s[3:], 0, cache.tree.root)
    assert cache.available == 8 and cache.pool.free_count == 2
    length, node, slots = cache.match([1, 2, 3, 9])
    assert length == 3 and slots.tolist() == s[:3].tolist()
    assert cache.available == 5  # the locked prefix is not available
    got = cache.alloc(5)  # evicts [4,5,6], keeps the locked [1,2,3]
    assert got is not None and cache.pool.free_count == 0
    assert cache.alloc(1) is None
    ins, ev, _ = cache.drain_logs()
    assert ev == [[4, 5, 6]]
    assert ins == [[1, 2, 3]]  # [4,5,6] was evicted after its insertion: not reported as cached
    cache.unlock(node)
    cache.pool.free(got)
    cache.flush()
    assert cache.pool.free_count == 8 and cache.drain_logs() == ([], [], [])  # a flush is not logged


def test_kv_cache_log_keeps_an_insert_that_follows_an_eviction() -> None:
    cache = KVCache(small_pool(4))
    s = cache.alloc(4)
    assert s is not None
    cache.cache([1, 2, 3, 4], s, 0, cache.tree.root)
    cache.drain_logs()
    t = cache.alloc(2)  # evicts [1,2,3,4]
    assert t is not None
    cache.cache([1, 2], t, 0, cache.tree.root)  # then caches [1,2] again
    assert cache.drain_logs() == ([[1, 2]], [[1, 2, 3, 4]], [])


def test_kv_cache_frees_duplicate_slots() -> None:
    cache = KVCache(small_pool(8))
    a, b = cache.alloc(3), cache.alloc(4)
    assert a is not None and b is not None
    cache.cache([1, 2, 3], a, 0, cache.tree.root)
    # another request computed [1,2,3] too, plus one more token: its first three slots are duplicates
    assert cache.cache([1, 2, 3, 4], b, 0, cache.tree.root) == 3
    assert cache.pool.free_count == 8 - 4
    assert cache.tree.total_tokens == 4
    cache.flush()
    assert cache.pool.free_count == 8


def test_sizing_helpers() -> None:
    assert kv_bytes_per_token(30, 3, 64, torch.float32) == 2 * 30 * 3 * 64 * 4
    assert kv_bytes_per_token(30, 3, 64, torch.bfloat16) == 2 * 30 * 3 * 64 * 2
    free = free_memory_bytes("cpu")
    assert free > 0
    assert 0 < tokens_for_memory(0.25, 1000, "cpu") < free // 1000  # memory moves between the calls


@pytest.fixture(scope="module")
def model(default_model_dir: Path) -> CausalLM:
    return load_model(default_model_dir)


def test_pool_returns_to_start_after_mixed_workload_with_aborts(model: CausalLM) -> None:
    """Random arrivals, lengths, shared prefixes, aborts at every stage, a small pool (so evictions and
    preemptions happen): afterwards every slot is free or cached, and a flush frees all of them."""
    rng = random.Random(0)
    engine = make_engine(model, kv_tokens=160, max_model_len=120, chunk_size=24, max_running=6)
    start = engine.pool.free_count
    stem = [rng.randrange(100, 30000) for _ in range(40)]
    col = Collector(engine)
    live: list[str] = []
    for i in range(24):
        prompt = (stem[: rng.randrange(0, 40)] + [rng.randrange(100, 30000) for _ in range(rng.randrange(1, 50))])
        rid = f"r{i}"
        engine.add_request(request(rid, prompt, [], max_new_tokens=rng.randrange(1, 24),
                                   temperature=rng.choice([0.0, 0.8])))
        live.append(rid)
        if rng.random() < 0.3:
            engine.insert_prefix(stem[: rng.randrange(5, 40)])
        for _ in range(rng.randrange(0, 4)):
            col.step()
        if rng.random() < 0.35:
            victim = rng.choice(live)
            engine.abort(victim)
        live = [r for r in live if r not in col.final]
    col.run()
    assert len(col.final) == 24  # every request ended exactly once
    aborted = {rid for rid, item in col.final.items() if item.finish_reason == "abort"}
    assert aborted and len(aborted) < 24
    for rid, item in col.final.items():
        assert item.completion_tokens == len(col.tokens.get(rid, []))
    assert engine.preemptions > 0 and col.evicted > 0  # the small pool was really under pressure
    assert_pool_clean(engine)
    assert engine.pool.free_count == start


def test_kv_cache_reports_a_growing_prompt_as_extensions() -> None:
    """A request caching its prompt chunk by chunk is reported by what each chunk adds (keyed by its rid),
    not its whole prefix again: 4 chunks of 8 tokens cost 32 tokens of log, not 8 + 16 + 24 + 32."""
    cache = KVCache(small_pool(64))
    prompt = list(range(1, 33))
    slots = cache.alloc(32)
    assert slots is not None
    node, got = cache.tree.root, []
    for end in (8, 16, 24, 32):
        cache.tree.lock(node)
        cache.cache(prompt[:end], slots[:end], 0 if node is cache.tree.root else end - 8, node, key="r1")
        _, node, _ = cache.match(prompt[:end])
        ins, ev, ext = cache.drain_logs()
        assert ins == [] and ev == []
        got += ext
    cache.unlock(node)
    assert [(e.rid, e.start, len(e.tokens)) for e in got] == [("r1", 0, 8), ("r1", 8, 8), ("r1", 16, 8), ("r1", 24, 8)]
    assert [t for e in got for t in e.tokens] == prompt
    cache.forget("r1")  # the request is gone: a later request under the same id starts from 0 again
    assert cache.drain_logs() == ([], [], [])
    more = cache.alloc(2)
    cache.tree.lock(cache.tree.root)
    cache.cache(prompt + [40, 41], torch.cat([slots, more]), 0, cache.tree.root, key="r1")
    assert [(e.start, e.tokens) for e in cache.drain_logs()[2]] == [(0, prompt + [40, 41])]
