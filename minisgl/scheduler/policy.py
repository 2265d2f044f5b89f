"""Dispatch policies: which worker gets the next request.

Every policy sees only workers that can take a request now (up, under their inflight caps). Requests
wait in one central queue in arrival order whatever the policy; the policy picks among workers.
"""

from __future__ import annotations

import random
from typing import Protocol

from minisgl.scheduler.workers import WorkerState


class Policy(Protocol):
    def choose(self, input_ids: list[int], candidates: list[WorkerState]) -> WorkerState: ...


class RoundRobin:
    def __init__(self) -> None:
        self.next_id = 0

    def choose(self, input_ids: list[int], candidates: list[WorkerState]) -> WorkerState:
        # The first candidate at or after the rotation point, so a full worker is skipped, not waited on.
        ordered = sorted(candidates, key=lambda w: (w.worker_id - self.next_id) % 1_000_000)
        chosen = ordered[0]
        self.next_id = chosen.worker_id + 1
        return chosen


class FirstFree:
    """fcfs: the queue is served in arrival order, each request to the first worker with room."""

    def choose(self, input_ids: list[int], candidates: list[WorkerState]) -> WorkerState:
        return min(candidates, key=lambda w: w.worker_id)


class Random:
    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)

    def choose(self, input_ids: list[int], candidates: list[WorkerState]) -> WorkerState:
        return self.rng.choice(candidates)


class CacheAware:
    """The worker whose prefix index holds the longest prefix of the request, unless that prefix is too
    short to matter or the worker is overloaded compared with the least loaded one; then the least
    loaded worker (ties to the lowest id)."""

    def __init__(self, min_match_tokens: int = 16, min_match_fraction: float = 0.1, load_slack: int = 4) -> None:
        self.min_match_tokens = min_match_tokens
        self.min_match_fraction = min_match_fraction
        self.load_slack = load_slack  # how many more inflight requests a cache hit is worth

    def choose(self, input_ids: list[int], candidates: list[WorkerState]) -> WorkerState:
        least = min(candidates, key=lambda w: (w.load, w.worker_id))
        best, best_len = least, 0
        for w in candidates:
            n = w.index.match_prefix(input_ids)
            if n > best_len or (n == best_len and n > 0 and w.load < best.load):
                best, best_len = w, n
        useful = best_len >= max(self.min_match_tokens, int(self.min_match_fraction * len(input_ids)))
        if useful and best.load <= least.load + self.load_slack:
            return best
        return least


def make_policy(mode: str) -> Policy:
    mode = "fcfs" if mode == "fsfs" else mode  # the seed's spelling
    policies = {"round_robin": RoundRobin, "fcfs": FirstFree, "random": Random, "cache_aware": CacheAware}
    if mode not in policies:
        raise ValueError(f"unknown SCHEDULER_MODE {mode!r}; choose one of {sorted(policies)}")
    return policies[mode]()
