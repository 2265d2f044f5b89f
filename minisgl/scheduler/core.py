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
from minisgl.messages import FINISH_ABORT, FINISH_ERROR, SamplingParams, TokenizedReq, TokenOut, WorkerStatus
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
    requeued_worker_died: int = 0
    scaled_max_new_tokens: int = 0
    warmups_refused: int = 0


MAX_WARM_QUEUE = 64  # prefixes waiting to be warmed; beyond it `warm` answers ok: false
WARM_PIECE_TIMEOUT_S = 60.0  # a warm-up piece never reported back (a backend without a cache) is forgotten


class GroupAffinity:
    """The n choices of one OpenAI request go to the worker that took the first of them, so they share
    the prompt's KV in its radix cache (while that worker can take them; else the policy picks)."""

    def __init__(self) -> None:
        self.worker: dict[str, int] = {}  # group -> worker of its live choices
        self.live: dict[str, int] = {}  # group -> choices dispatched and not finished
        self.group_of: dict[str, str] = {}  # rid -> group

    def choose(self, req: TokenizedReq, candidates: list[WorkerState]) -> WorkerState | None:
        wid = self.worker.get(req.group) if req.group else None
        return next((w for w in candidates if w.worker_id == wid), None)

    def dispatched(self, req: TokenizedReq, worker_id: int) -> None:
        if req.group:
            self.worker.setdefault(req.group, worker_id)
            self.live[req.group] = self.live.get(req.group, 0) + 1
            self.group_of[req.rid] = req.group

    def finished(self, rid: str) -> None:
        group = self.group_of.pop(rid, None)
        if group is None:
            return
        self.live[group] -= 1
        if self.live[group] <= 0:
            del self.live[group], self.worker[group]


@dataclass
class WarmItem:
    input_ids: list[int]
    pending_workers: set[int] = field(default_factory=set)
    done: dict[int, int] = field(default_factory=dict)  # worker -> tokens of the prefix warmed so far


@dataclass
class WarmPiece:
    """The one warm-up a worker has at a time: a prefix of item.input_ids up to `end`."""

    rid: str
    item: WarmItem
    end: int
    sent: float


class SchedulerCore:
    def __init__(self, cfg: ServerConfig, num_workers: int) -> None:
        self.cfg = cfg
        self.policy = make_policy(cfg.scheduler_mode)
        self.workers = [WorkerState(i) for i in range(num_workers)]
        self.queue: deque[Queued] = deque()
        self.owner: dict[str, int] = {}  # rid -> worker it was dispatched to
        self.dispatched: dict[str, Queued] = {}  # rid -> the request, while in flight (re-queued if never run)
        self.warm_queue: deque[WarmItem] = deque()
        self.warm_running: dict[int, WarmPiece] = {}  # worker -> its warm-up piece in flight
        self.warm_seq = 0
        self.counters = Counters()
        self.groups = GroupAffinity()

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
            # The load the policy sees is this scheduler's own count of what it dispatched and has
            # not seen finish: it goes up here, in the same pass, never later from a worker report.
            # The n choices of one request go where their first sibling went (their prompt is cached there).
            worker = self.groups.choose(queued.req, candidates) or self.policy.choose(queued.req.input_ids, candidates)
            self.groups.dispatched(queued.req, worker.worker_id)
            worker.inflight.add(queued.req.rid)
            worker.dispatched_total += 1
            self.owner[queued.req.rid] = worker.worker_id
            self.dispatched[queued.req.rid] = queued
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
        if not 0 <= status.worker_id < len(self.workers):
            raise ValueError(f"status from unknown worker {status.worker_id}")
        worker = self.workers[status.worker_id]
        piece = self.warm_running.get(status.worker_id)
        if piece is not None and piece.rid in status.finished:
            self._warm_piece_done(status.worker_id, piece)
        for rid in worker.apply_status(status):
            self.owner.pop(rid, None)
            self.dispatched.pop(rid, None)
            self.groups.finished(rid)
            self.counters.finished += 1

    def on_worker_up(self, worker_id: int, pid: int = 0) -> None:
        w = self.workers[worker_id]
        w.up, w.pid = True, pid
        for item in self.warm_queue:  # a restarted worker lost its cache: warm it again
            item.pending_workers.add(worker_id)
            item.done.pop(worker_id, None)

    def on_worker_died(self, worker_id: int, exitcode: int, pid: int = 0) -> list[TokenOut]:
        """Fail what the worker had started; re-queue (at the front, in order) what it never took in:
        those never ran, so another worker (or this one once restarted) serves them as if nothing happened."""
        w = self.workers[worker_id]
        if pid and w.pid and pid != w.pid:
            return []  # a late notice about an earlier process: its successor is already up
        started, never_ran = w.mark_down()
        self.warm_running.pop(worker_id, None)
        for rid in started + never_ran:
            self.owner.pop(rid, None)
        for rid in started + never_ran:
            self.groups.finished(rid)  # re-queued choices are booked again when dispatched
        requeue = [self.dispatched.pop(rid) for rid in never_ran if rid in self.dispatched]
        for queued in sorted(requeue, key=lambda q: q.enqueued, reverse=True):
            self.queue.appendleft(queued)
        for rid in started:
            self.dispatched.pop(rid, None)
        self.counters.failed_worker_died += len(started)
        self.counters.requeued_worker_died += len(requeue)
        return [TokenOut(rid=rid, finish_reason=FINISH_ERROR, status=500,
                         error=f"worker {worker_id} died (exit code {exitcode}) while serving this request")
                for rid in started]

    # ------------------------------------------------------------ warm-ups

    def queue_warmup(self, input_ids: list[int]) -> bool:
        """Queue a prefix to warm on every worker; False when the queue is full (the caller says so)."""
        if any(item.input_ids == input_ids for item in self.warm_queue):
            return True  # already waiting
        if len(self.warm_queue) >= MAX_WARM_QUEUE:
            self.counters.warmups_refused += 1
            return False
        self.warm_queue.append(WarmItem(input_ids, {w.worker_id for w in self.workers}))
        return True

    def pop_warmups(self, now: float | None = None) -> list[tuple[int, TokenizedReq]]:
        """Low priority, bounded: a worker gets one warm-up piece at a time (at most chunk_size new tokens,
        one engine step), only while it serves nothing and nothing waits, and the next piece only once it
        reported the last one done. A request arriving meanwhile waits one step at most."""
        now = time.monotonic() if now is None else now
        out: list[tuple[int, TokenizedReq]] = []
        for w in self.workers:
            piece = self.warm_running.get(w.worker_id)
            if piece is not None and now - piece.sent > WARM_PIECE_TIMEOUT_S:
                self.warm_running.pop(w.worker_id)  # never reported: give up on it
                piece.item.pending_workers.discard(w.worker_id)
                self._drop_finished_items()
                piece = None
            if piece is not None or not w.up or w.load > 0 or self.queue:
                continue
            item = next((i for i in self.warm_queue if w.worker_id in i.pending_workers), None)
            if item is None:
                continue
            end = min(len(item.input_ids), item.done.get(w.worker_id, 0) + max(1, self.cfg.chunk_size))
            self.warm_seq += 1
            rid = f"__warm-{self.warm_seq}"
            self.warm_running[w.worker_id] = WarmPiece(rid, item, end, now)
            out.append((w.worker_id, TokenizedReq(rid=rid, input_ids=item.input_ids[:end], arrival=0.0,
                                                  params=SamplingParams(max_new_tokens=1), warmup=True)))
        return out

    def drop_warmups(self) -> int:
        """Forget the warm-ups still waiting (flush_cache); a piece in flight finishes on its own."""
        n = len(self.warm_queue)
        self.warm_queue.clear()
        for piece in self.warm_running.values():
            piece.item.pending_workers.clear()
        return n

    def _warm_piece_done(self, worker_id: int, piece: WarmPiece) -> None:
        del self.warm_running[worker_id]
        piece.item.done[worker_id] = piece.end
        if piece.end >= len(piece.item.input_ids):
            piece.item.pending_workers.discard(worker_id)
            self._drop_finished_items()

    def _drop_finished_items(self) -> None:
        for item in [i for i in self.warm_queue if not i.pending_workers]:
            self.warm_queue.remove(item)

    # ------------------------------------------------------------ observability

    def metrics(self) -> dict:
        return {
            "scheduler_mode": self.cfg.scheduler_mode,
            "queued": len(self.queue),
            "inflight": self.inflight_total,
            "warm_queue": len(self.warm_queue),
            "warm_running": len(self.warm_running),
            "counters": dict(vars(self.counters)),
            "workers": [
                {
                    "worker_id": w.worker_id, "up": w.up, "inflight": w.load, **msgspec.structs.asdict(w.stats),
                    "cache_hit_rate": w.cache_hit_rate(), "dispatched_total": w.dispatched_total,
                    "index_tokens": w.index.num_tokens,
                }
                for w in self.workers
            ],
            "time": time.time(),
        }
