"""What the scheduler knows about each worker: liveness, inflight requests, load and a prefix index."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from minisgl.messages import LoadStats, WorkerStatus
from minisgl.scheduler.index import PrefixIndex


@dataclass
class WorkerState:
    worker_id: int
    up: bool = False
    inflight: set[str] = field(default_factory=set)  # dispatched here and not yet reported finished
    accepted: set[str] = field(default_factory=set)  # of those, the ones the worker said it took in
    pid: int = 0
    stats: LoadStats = field(default_factory=LoadStats)  # as the worker last reported them
    growing: dict[str, list[int]] = field(default_factory=dict)  # rid -> its prompt cached so far (extensions)
    dispatched_total: int = 0
    index: PrefixIndex = field(default_factory=PrefixIndex)

    @property
    def load(self) -> int:
        return len(self.inflight)

    def apply_status(self, status: WorkerStatus) -> list[str]:
        """Update from a worker report; returns the rids that finished there."""
        self.stats = status.load
        if status.cache_flushed:
            self.index.clear()
        for seq in status.cache_evicted:
            self.index.remove(seq)
        for seq in status.cache_inserted:
            self.index.insert(seq)
        for ext in status.cache_extended:
            known = self.growing.get(ext.rid, [])
            if ext.start > len(known):
                continue  # extends what this scheduler never heard (it restarted): leave it out, safely
            self.growing[ext.rid] = seq = known[:ext.start] + ext.tokens
            self.index.insert(seq)
        self.accepted.update(rid for rid in status.accepted if rid in self.inflight)
        done = [rid for rid in status.finished if rid in self.inflight]
        self.inflight.difference_update(done)
        self.accepted.difference_update(done)
        for rid in status.finished:
            self.growing.pop(rid, None)
        return done

    def mark_down(self) -> tuple[list[str], list[str]]:
        """The worker died: its KV and cache are gone. Returns the rids in flight on it: those it had
        taken in (they may have streamed tokens) and those it never acknowledged (they never ran)."""
        started = sorted(self.inflight & self.accepted)
        never_ran = sorted(self.inflight - self.accepted)
        self.up = False
        self.inflight.clear()
        self.accepted.clear()
        self.growing.clear()
        self.stats = msgspec.structs.replace(self.stats, running=0, waiting=0, kv_used_tokens=0)
        self.index.clear()
        return started, never_ran

    def cache_hit_rate(self) -> float:
        s = self.stats
        return s.cached_tokens_total / s.prompt_tokens_total if s.prompt_tokens_total else 0.0
