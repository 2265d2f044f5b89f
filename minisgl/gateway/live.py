"""What the dashboard shows beyond /metrics: per-second series over the rolling window, the recent
requests, and (with --narrate) the processes' narration as a live feed.

Everything is updated per streamed batch or per finished request, never per token, and kept in bounded
deques, so the gateway's memory does not grow with uptime.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import asdict, dataclass

from minisgl.gateway.metrics import WINDOW_S

RECENT = 50  # requests shown
FEED = 500  # narration lines kept for a dashboard that connects later


@dataclass
class Second:
    t: int  # unix second
    chunks: int = 0  # streamed text items (about one token each)
    ttft_sum: float = 0.0
    ttft_n: int = 0
    itl_sum: float = 0.0
    itl_n: int = 0


@dataclass
class RecentRequest:
    rid: str
    t: float
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float | None
    e2e_s: float
    worker_id: int


class LiveStats:
    def __init__(self) -> None:
        self.seconds: deque[Second] = deque()
        self.recent: deque[RecentRequest] = deque(maxlen=RECENT)
        self.feed: deque[dict] = deque(maxlen=FEED)
        self.feed_seq = 0
        self.listeners: set[asyncio.Queue[dict]] = set()

    def _now(self) -> Second:
        t = int(time.time())
        if not self.seconds or self.seconds[-1].t != t:
            self.seconds.append(Second(t))
            while self.seconds and self.seconds[0].t <= t - WINDOW_S:
                self.seconds.popleft()
        return self.seconds[-1]

    def chunks(self, n: int) -> None:
        if n:
            self._now().chunks += n

    def finished(self, rid: str, finish_reason: str, prompt: int, cached: int, completion: int,
                 ttft: float | None, itls: list[float], e2e: float, worker_id: int) -> None:
        sec = self._now()
        if ttft is not None:
            sec.ttft_sum += ttft
            sec.ttft_n += 1
        if itls:
            sec.itl_sum += sum(itls)
            sec.itl_n += len(itls)
        self.recent.appendleft(RecentRequest(rid[:12], time.time(), finish_reason, prompt, cached, completion,
                                             ttft, e2e, worker_id))

    def series(self) -> dict:
        """One point per second of the window (seconds with nothing are zeros / nulls)."""
        now = int(time.time())
        self._now()
        by_t = {s.t: s for s in self.seconds}
        pts = [by_t.get(t) or Second(t) for t in range(now - int(WINDOW_S) + 1, now + 1)]
        return {"t": [p.t for p in pts],
                "tokens_per_s": [p.chunks for p in pts],
                "ttft_ms": [round(1000 * p.ttft_sum / p.ttft_n, 1) if p.ttft_n else None for p in pts],
                "itl_ms": [round(1000 * p.itl_sum / p.itl_n, 2) if p.itl_n else None for p in pts]}

    def recent_requests(self) -> list[dict]:
        return [asdict(r) for r in self.recent]

    # ------------------------------------------------------------ narration

    def narrate(self, source: str, lines: list[str]) -> None:
        for line in lines:
            self.feed_seq += 1
            entry = {"seq": self.feed_seq, "t": time.time(), "source": source, "line": line}
            self.feed.append(entry)
            for q in self.listeners:
                if q.qsize() < FEED:  # a stalled dashboard loses lines, never the gateway's memory
                    q.put_nowait(entry)

    def subscribe(self) -> asyncio.Queue[dict]:
        q: asyncio.Queue[dict] = asyncio.Queue()
        for entry in self.feed:
            q.put_nowait(entry)
        self.listeners.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict]) -> None:
        self.listeners.discard(q)
