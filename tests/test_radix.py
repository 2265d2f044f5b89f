"""The radix tree: match / split / insert / LRU eviction / locks / flush / index removal, plus a
randomized comparison against a plain set-of-prefixes model."""

from __future__ import annotations

import random

import pytest

from minisgl.cache.radix import RadixTree


def payload(tokens: list[int], base: int = 0) -> list[int]:
    return [base + i for i in range(len(tokens))]


def flat(values: list) -> list:
    return [x for v in values for x in v]


def test_empty_tree_matches_nothing() -> None:
    tree = RadixTree()
    m = tree.match_prefix([1, 2, 3])
    assert m.length == 0 and m.node is tree.root and m.values == []
    assert tree.total_tokens == 0 and tree.evictable_tokens == 0


def test_insert_and_match_split() -> None:
    tree = RadixTree()
    assert tree.insert([1, 2, 3, 4], [10, 20, 30, 40]) == 0
    assert tree.total_tokens == 4
    m = tree.match_prefix([1, 2, 9])
    assert m.length == 2
    assert flat(m.values) == [10, 20]
    assert m.node.key == [1, 2]  # the edge [1,2,3,4] was split at the match end
    assert [c.key for c in m.node.children.values()] == [[3, 4]]
    assert tree.total_tokens == 4  # a split moves tokens, it does not add any
    # the full sequence still matches through both halves
    m = tree.match_prefix([1, 2, 3, 4, 5])
    assert m.length == 4 and flat(m.values) == [10, 20, 30, 40]


def test_insert_reports_existing_prefix_and_keeps_tree_payload() -> None:
    tree = RadixTree()
    tree.insert([1, 2, 3], [10, 20, 30])
    existing = tree.insert([1, 2, 3, 4, 5], [11, 21, 31, 41, 51])
    assert existing == 3  # the caller frees its payload 11, 21, 31 (duplicates)
    assert tree.total_tokens == 5
    assert flat(tree.match_prefix([1, 2, 3, 4, 5]).values) == [10, 20, 30, 41, 51]
    assert tree.insert([1, 2], [0, 0]) == 2  # fully cached: nothing new
    assert tree.total_tokens == 5
    assert tree.insert([1, 7], [0, 70]) == 1  # branches off after one token
    assert tree.total_tokens == 6
    assert tree.prefix_len([1, 7, 8]) == 2


def test_prefix_len_is_read_only() -> None:
    tree = RadixTree()
    tree.insert([1, 2, 3, 4])
    assert tree.prefix_len([1, 2, 5]) == 2
    assert len(tree.root.children[1].key) == 4  # no split
    assert tree.prefix_len([1, 2, 3, 4, 5]) == 4
    assert tree.prefix_len([2]) == 0


def test_evict_lru_order_and_full_paths() -> None:
    tree = RadixTree()
    tree.insert([1, 1, 1], payload([1, 1, 1], 100))
    tree.insert([2, 2], payload([2, 2], 200))
    tree.insert([3, 3, 3, 3], payload([3, 3, 3, 3], 300))
    tree.match_prefix([1, 1, 1])  # now [2,2] is the least recently used, then [3,3,3,3]
    ev = tree.evict(1)
    assert [e.tokens for e in ev] == [[2, 2]]
    assert ev[0].value == [200, 201]
    ev = tree.evict(5)  # takes [3,3,3,3] then [1,1,1]
    assert [e.tokens for e in ev] == [[3, 3, 3, 3], [1, 1, 1]]
    assert tree.total_tokens == 0 and tree.evictable_tokens == 0


def test_evict_reports_full_path_of_deep_leaf_and_parent_becomes_candidate() -> None:
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], [1, 2, 3, 4])
    tree.insert([1, 2, 5], [1, 2, 5])  # splits into [1,2] -> {[3,4], [5]}
    ev = tree.evict(1)  # [3,4] was last touched before [5] was inserted
    assert [(e.tokens, e.value) for e in ev] == [([1, 2, 3, 4], [3, 4])]
    ev = tree.evict(100)  # the parent goes last, once its children are gone
    assert [(e.tokens, e.value) for e in ev] == [([1, 2, 5], [5]), ([1, 2], [1, 2])]
    assert tree.total_tokens == 0


def test_locked_prefix_is_never_evicted() -> None:
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], [1, 2, 3, 4])
    tree.insert([9, 9], [9, 9])
    m = tree.match_prefix([1, 2, 3])  # splits; node covers [1,2,3]
    tree.lock(m.node)
    assert tree.protected_tokens == 3 and tree.evictable_tokens == 3
    ev = tree.evict(100)
    assert sorted(e.tokens for e in ev) == [[1, 2, 3, 4], [9, 9]]
    assert tree.total_tokens == 3 and tree.evictable_tokens == 0
    assert tree.prefix_len([1, 2, 3]) == 3
    # a second lock on a deeper node counts twice on the shared path
    tree.insert([1, 2, 3, 5], [1, 2, 3, 5])
    m2 = tree.match_prefix([1, 2, 3, 5])
    tree.lock(m2.node)
    tree.unlock(m.node)
    assert tree.flush() == []  # [1,2,3] is still held through [1,2,3,5]
    tree.unlock(m2.node)
    assert tree.protected_tokens == 0
    ev = tree.flush()
    assert [e.tokens for e in ev] == [[1, 2, 3, 5], [1, 2, 3]]
    assert tree.total_tokens == 0


def test_unlock_without_lock_fails() -> None:
    tree = RadixTree()
    tree.insert([1, 2])
    with pytest.raises(AssertionError):
        tree.unlock(tree.match_prefix([1, 2]).node)


def test_split_keeps_locks_consistent() -> None:
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], [1, 2, 3, 4])
    m = tree.match_prefix([1, 2, 3, 4])
    tree.lock(m.node)
    tree.match_prefix([1, 2])  # split inside a locked node
    assert tree.protected_tokens == 4
    tree.unlock(m.node)
    assert tree.protected_tokens == 0 and tree.evictable_tokens == 4


def test_evict_budget_stops_early() -> None:
    tree = RadixTree()
    for t in range(10):
        tree.insert([t, t, t], [t] * 3)
    ev = tree.evict(7)  # whole leaves: 3 + 3 + 3 >= 7
    assert len(ev) == 3 and tree.total_tokens == 21
    assert [e.tokens[0] for e in ev] == [0, 1, 2]  # insertion order is LRU order here
    assert tree.evict(0) == []


def test_flush_and_reset() -> None:
    tree = RadixTree()
    tree.insert([1, 2, 3])
    tree.insert([4, 5])
    m = tree.match_prefix([4, 5])
    tree.lock(m.node)
    tree.flush()
    assert tree.total_tokens == 2 and tree.prefix_len([4, 5]) == 2
    tree.reset()
    assert tree.total_tokens == 0 and tree.prefix_len([4, 5]) == 0


def test_index_remove() -> None:
    # The scheduler's index mirrors a worker's inserts, then hears of its evictions.
    tree = RadixTree()
    tree.insert([1, 2, 3, 4])
    tree.insert([1, 2, 5])
    assert tree.remove([1, 2, 5]) == 1  # only the part no other sequence needs
    assert tree.prefix_len([1, 2, 3, 4]) == 4
    assert tree.remove([1, 2, 3, 4]) == 4  # nothing else holds [1,2] any more
    assert tree.total_tokens == 0
    tree.insert([7, 8])
    tree.insert([7, 8, 9, 10])
    assert tree.remove([7, 8, 9, 10]) == 2  # [7,8] was inserted on its own: it stays
    assert tree.prefix_len([7, 8]) == 2
    assert tree.remove([6, 6]) == 0 and tree.remove([7, 9]) == 0  # never held


# ---------------------------------------------------------------- randomized against a reference


class Reference:
    """What should be cached: a prefix-closed set of token tuples, each token's payload a pure function
    of its prefix."""

    def __init__(self) -> None:
        self.prefixes: set[tuple[int, ...]] = set()
        self.ids: dict[tuple[int, ...], int] = {}

    def pid(self, prefix: tuple[int, ...]) -> int:
        return self.ids.setdefault(prefix, len(self.ids))

    def payload(self, tokens: list[int]) -> list[int]:
        return [self.pid(tuple(tokens[: i + 1])) for i in range(len(tokens))]

    def prefix_len(self, tokens: list[int]) -> int:
        n = 0
        while n < len(tokens) and tuple(tokens[: n + 1]) in self.prefixes:
            n += 1
        return n


@pytest.mark.parametrize("seed", range(6))
def test_randomized_against_reference(seed: int) -> None:
    rng = random.Random(seed)
    tree, ref = RadixTree(), Reference()
    locked: list[tuple[object, list[int]]] = []  # (node, its tokens)
    base = [rng.randrange(4) for _ in range(30)]

    def random_seq() -> list[int]:
        # shared stems so that branches and splits happen often
        stem = base[: rng.randrange(len(base))] if rng.random() < 0.7 else []
        return stem + [rng.randrange(4) for _ in range(rng.randrange(1, 12))]

    for _ in range(400):
        op = rng.random()
        if op < 0.4:
            seq = random_seq()
            existing = tree.insert(seq, ref.payload(seq))
            assert existing == ref.prefix_len(seq)
            ref.prefixes.update(tuple(seq[: i + 1]) for i in range(len(seq)))
        elif op < 0.65:
            seq = random_seq()
            m = tree.match_prefix(seq)
            assert m.length == ref.prefix_len(seq)
            assert flat(m.values) == ref.payload(seq[: m.length])
            if m.length and rng.random() < 0.5:
                tree.lock(m.node)
                locked.append((m.node, seq[: m.length]))
        elif op < 0.75 and locked:
            node, _ = locked.pop(rng.randrange(len(locked)))
            tree.unlock(node)  # type: ignore[arg-type]
        else:
            before = tree.total_tokens
            want = rng.randrange(1, 20)
            ev = tree.evict(want)
            freed = sum(len(e.value) for e in ev)
            assert tree.total_tokens == before - freed
            assert freed >= want or tree.evictable_tokens == 0
            for e in ev:
                start = len(e.tokens) - len(e.value)
                assert e.value == ref.payload(e.tokens)[start:]
                for i in range(start, len(e.tokens)):
                    ref.prefixes.discard(tuple(e.tokens[: i + 1]))
        # invariants after every operation
        assert tree.total_tokens == len(ref.prefixes)
        assert all(p[:-1] in ref.prefixes or len(p) == 1 for p in ref.prefixes)  # prefix-closed
        for _, toks in locked:
            assert tree.prefix_len(toks) == len(toks)  # locked paths survive every eviction
        protected = {tuple(toks[: i + 1]) for _, toks in locked for i in range(len(toks))}
        assert tree.protected_tokens == len(protected)
        probe = random_seq()
        assert tree.prefix_len(probe) == ref.prefix_len(probe)

    for node, _ in locked:
        tree.unlock(node)  # type: ignore[arg-type]
    tree.flush()
    assert tree.total_tokens == 0 and tree.evictable_tokens == 0
