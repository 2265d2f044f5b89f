"""The scheduler's logic with no sockets: admission, backpressure, dispatch, warm-ups, accounting.

procs/scheduler.py feeds it messages and sends what it returns. Everything here is plain data, so the
policies and caps are unit-testable.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import msgspec

from minisgl.config import ServerConfig
from minisgl.messages import FINISH_ABORT, FINISH_ERROR, TokenizedReq, TokenOut, WorkerStatus
from minisgl.scheduler.policy import make_policy
from minisgl.scheduler.workers import WorkerState

log = logging.getLogger("minisgl.scheduler")


@dataclass
class Queued:
    req: TokenizedReq
    enqueued: float


@dataclass
class Counters:
    received: int = 0
    dispatched: int = 0
    finished: int = 0
    rejected_queue_full: int = 0
    timed_out: int = 0
    aborted_in_queue: int = 0
    failed_worker_died: int = 0
    scaled_max_new_tokens: int = 0


@dataclass
class WarmItem:
    input_ids: list[int]
    pending_workers: set[int] = field(default_factory=set)


class SchedulerCore:
    def __init__(self, cfg: ServerConfig, num_workers: int) -> None:
        self.cfg = cfg
        self.policy = make_policy(cfg.scheduler_mode)
        self.workers = [WorkerState(i) for i in range(num_workers)]
        self.queue: deque[Queued] = deque()
        self.owner: dict[str, int] = {}  # rid -> worker it was dispatched to
        self.warm_queue: deque[WarmItem] = deque()
        self.counters = Counters()

    # ------------------------------------------------------------ admission

    @property
    def inflight_total(self) -> int:
        return len(self.owner)

    def on_request(self, req: TokenizedReq, now: float) -> TokenOut | None:
        """Queue a request; returns an error item when it is refused (queue full: HTTP 429)."""
        self.counters.received += 1
        if len(self.queue) >= self.cfg.max_queue:
            self.counters.rejected_queue_full += 1
            return TokenOut(rid=req.rid, finish_reason=FINISH_ERROR, status=429,
                            error=f"server overloaded: {len(self.queue)} requests already waiting; retry later")
        req = self._maybe_scale(req)
        self.queue.append(Queued(req, now))
        return None

    def _maybe_scale(self, req: TokenizedReq) -> TokenizedReq:
        """Adaptive max_new_tokens: only when the workers are saturated, i.e. more requests are in
        flight or queued (this one included) than the workers can run at once (cfg.run_capacity()).
        Then each new request gets its share of that capacity, original * capacity / load, never below
        adaptive_floor. A load the workers can run at once is never scaled."""
        cfg = self.cfg
        if not cfg.adaptive_max_new_tokens or req.params.max_new_tokens <= cfg.adaptive_floor:
            return req
        capacity = cfg.run_capacity()
        load = self.inflight_total + len(self.queue) + 1
        if load <= capacity:
            return req
        original = req.params.max_new_tokens
        scaled = max(cfg.adaptive_floor, original * capacity // load)
        if scaled >= original:
            return req
        self.counters.scaled_max_new_tokens += 1
        params = msgspec.structs.replace(req.params, max_new_tokens=scaled)
        return msgspec.structs.replace(req, params=params, max_new_tokens_scaled_from=original)

    def _candidates(self) -> list[WorkerState]:
        if self.inflight_total >= self.cfg.max_inflight_total:
            return []
        return [w for w in self.workers if w.up and w.load < self.cfg.max_inflight_per_engine]

    def dispatch(self) -> dict[int, list[TokenizedReq]]:
        """Move queued requests to workers in arrival order while caps allow."""
        out: dict[int, list[TokenizedReq]] = {}
        while self.queue:
            candidates = self._candidates()
            if not candidates:
                break
            queued = self.queue.popleft()
            worker = self.policy.choose(queued.req.input_ids, candidates)
            worker.inflight.add(queued.req.rid)
            worker.dispatched_total += 1
            self.owner[queued.req.rid] = worker.worker_id
            self.counters.dispatched += 1
            out.setdefault(worker.worker_id, []).append(queued.req)
        return out

    def expire(self, now: float) -> list[TokenOut]:
        """Requests that waited longer than queue_timeout_s get a clear 503, never an endless wait."""
        errors: list[TokenOut] = []
        while self.queue and now - self.queue[0].enqueued > self.cfg.queue_timeout_s:
            q = self.queue.popleft()
            self.counters.timed_out += 1
            errors.append(TokenOut(rid=q.req.rid, finish_reason=FINISH_ERROR, status=503,
                                   error=f"request waited {now - q.enqueued:.1f}s in the queue (limit {self.cfg.queue_timeout_s}s)"))
        return errors

    # ------------------------------------------------------------ events from workers and clients

    def on_abort(self, rid: str) -> tuple[int | None, TokenOut | None]:
        """Returns (worker to forward the abort to, or a final item for a request still queued)."""
        if rid in self.owner:
            return self.owner[rid], None
        for i, q in enumerate(self.queue):
            if q.req.rid == rid:
                del self.queue[i]
                self.counters.aborted_in_queue += 1
                return None, TokenOut(rid=rid, finish_reason=FINISH_ABORT, prompt_tokens=len(q.req.input_ids))
        return None, None

    def on_status(self, status: WorkerStatus) -> None:
        worker = self.workers[status.worker_id]
        for rid in worker.apply_status(status):
            self.owner.pop(rid, None)
            self.counters.finished += 1

    def on_worker_up(self, worker_id: int) -> None:
        self.workers[worker_id].up = True
        for item in self.warm_queue:  # a restarted worker lost its cache: warm it again
            item.pending_workers.add(worker_id)

    def on_worker_died(self, worker_id: int, exitcode: int) -> list[TokenOut]:
        lost = self.workers[worker_id].mark_down()
        for rid in lost:
            self.owner.pop(rid, None)
        self.counters.failed_worker_died += len(lost)
        return [TokenOut(rid=rid, finish_reason=FINISH_ERROR, status=500,
                         error=f"worker {worker_id} died (exit code {exitcode}) while serving this request")
                for rid in lost]

    # ------------------------------------------------------------ warm-ups

    def queue_warmup(self, input_ids: list[int]) -> None:
        self.warm_queue.append(WarmItem(input_ids, {w.worker_id for w in self.workers}))

    def pop_warmups(self) -> list[tuple[int, list[int]]]:
        """Low priority: a warm-up goes to a worker only while it serves nothing."""
        out: list[tuple[int, list[int]]] = []
        for item in list(self.warm_queue):
            for w in self.workers:
                if w.worker_id in item.pending_workers and w.up and w.load == 0 and not self.queue:
                    out.append((w.worker_id, item.input_ids))
                    item.pending_workers.discard(w.worker_id)
            if not item.pending_workers:
                self.warm_queue.remove(item)
        return out

    # ------------------------------------------------------------ observability

    def metrics(self) -> dict:
        return {
            "scheduler_mode": self.cfg.scheduler_mode,
            "queued": len(self.queue),
            "inflight": self.inflight_total,
            "warm_queue": len(self.warm_queue),
            "counters": dict(vars(self.counters)),
            "workers": [
                {
                    "worker_id": w.worker_id, "up": w.up, "inflight": w.load, "running": w.running,
                    "waiting": w.waiting, "kv_used_tokens": w.kv_used_tokens, "kv_total_tokens": w.kv_total_tokens,
                    "cached_tokens_total": w.cached_tokens_total, "prompt_tokens_total": w.prompt_tokens_total,
                    "cache_hit_rate": w.cache_hit_rate(), "dispatched_total": w.dispatched_total,
                    "index_tokens": w.index.num_tokens,
                }
                for w in self.workers
            ],
            "time": time.time(),
        }
