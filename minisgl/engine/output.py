"""What one engine step hands back (every backend's step() returns one). Below the engine and the
backends alike, so neither imports the other for it."""

from __future__ import annotations

from dataclasses import dataclass, field

from minisgl.messages import CacheExtension, TokenOut


@dataclass
class StepOutput:
    # one item per request that produced tokens or finished this step; the last item of a request
    # has finish_reason set ("stop", "length", "abort", "error") and its usage counts filled in.
    outputs: list[TokenOut] = field(default_factory=list)
    # rids that left the backend this step (including warm-up requests, which emit no outputs)
    finished: list[str] = field(default_factory=list)
    # prefix cache changes, as full token sequences from the root, for the scheduler's index
    cache_inserted: list[list[int]] = field(default_factory=list)
    cache_evicted: list[list[int]] = field(default_factory=list)
    # a running request's prompt cached further (deltas: see messages.CacheExtension)
    cache_extended: list[CacheExtension] = field(default_factory=list)

    @property
    def cache_changed(self) -> bool:
        return bool(self.cache_inserted or self.cache_evicted or self.cache_extended)
