"""SchedulerCore without sockets: policies, caps, queue limits, timeouts, adaptive max_new_tokens."""

from __future__ import annotations

from collections import Counter

import pytest

from minisgl.config import ServerConfig
from minisgl.messages import SamplingParams, TokenizedReq, WorkerStatus
from minisgl.scheduler.core import SchedulerCore


def req(rid: str, ids: list[int] | None = None, max_new: int = 100) -> TokenizedReq:
    return TokenizedReq(rid=rid, input_ids=ids or [1, 2, 3], params=SamplingParams(max_new_tokens=max_new), arrival=0.0)


def core(mode: str = "round_robin", workers: int = 2, **kw: object) -> SchedulerCore:
    c = SchedulerCore(ServerConfig(scheduler_mode=mode, **kw), workers)
    for w in range(workers):
        c.on_worker_up(w)
    return c


def dispatch_one(c: SchedulerCore, r: TokenizedReq) -> int:
    assert c.on_request(r, 0.0) is None
    ((worker, reqs),) = c.dispatch().items()
    assert [x.rid for x in reqs] == [r.rid]
    return worker


def finish(c: SchedulerCore, worker: int, rid: str) -> None:
    c.on_status(WorkerStatus(worker_id=worker, finished=[rid]))


def test_round_robin_alternates() -> None:
    c = core("round_robin", 3)
    assert [dispatch_one(c, req(f"r{i}")) for i in range(6)] == [0, 1, 2, 0, 1, 2]


def test_fcfs_fills_first_free_worker_and_accepts_seed_spelling() -> None:
    c = core("fsfs", 2, max_inflight_per_engine=2)
    assert [dispatch_one(c, req(f"r{i}")) for i in range(4)] == [0, 0, 1, 1]
    finish(c, 1, "r2")
    assert dispatch_one(c, req("r4")) == 1


def test_random_uses_every_worker() -> None:
    c = core("random", 3)
    seen = Counter(dispatch_one(c, req(f"r{i}")) for i in range(60))
    assert set(seen) == {0, 1, 2}


def test_cache_aware_prefers_worker_holding_prefix_else_least_loaded() -> None:
    c = core("cache_aware", 2)
    prefix = list(range(100, 200))
    c.on_status(WorkerStatus(worker_id=1, cache_inserted=[prefix]))
    assert dispatch_one(c, req("hit", prefix + [7, 8])) == 1
    # No useful prefix: least loaded (worker 0 has nothing in flight).
    assert dispatch_one(c, req("miss", [5, 6, 7])) == 0
    # Evicted prefix no longer attracts requests; now both hold one request, ties go to the lowest id.
    c.on_status(WorkerStatus(worker_id=1, cache_evicted=[prefix]))
    assert dispatch_one(c, req("after-evict", prefix + [9])) == 0


def test_cache_aware_falls_back_when_holder_is_overloaded() -> None:
    c = core("cache_aware", 2)
    prefix = list(range(300, 400))
    c.on_status(WorkerStatus(worker_id=0, cache_inserted=[prefix]))
    for i in range(6):  # load worker 0 far beyond worker 1
        c.workers[0].inflight.add(f"busy{i}")
    assert dispatch_one(c, req("hit", prefix + [1])) == 1


def test_caps_queue_and_429() -> None:
    c = core("round_robin", 2, max_inflight_total=3, max_inflight_per_engine=2, max_queue=2, adaptive_max_new_tokens=False)
    for i in range(5):
        assert c.on_request(req(f"r{i}"), 0.0) is None
        c.dispatch()
    assert c.inflight_total == 3 and len(c.queue) == 2
    refused = c.on_request(req("r5"), 0.0)
    assert refused is not None and refused.status == 429 and "retry" in refused.error
    finish(c, c.owner["r0"], "r0")
    out = c.dispatch()
    assert sum(len(v) for v in out.values()) == 1 and len(c.queue) == 1


def test_queue_timeout_gives_clear_error() -> None:
    c = core("round_robin", 1, max_inflight_total=1, queue_timeout_s=5.0)
    c.on_request(req("a"), 0.0)
    c.dispatch()
    c.on_request(req("b"), 1.0)
    assert c.expire(3.0) == []
    (err,) = c.expire(7.0)
    assert err.rid == "b" and err.status == 503 and "queue" in err.error


def test_adaptive_max_new_tokens_scales_under_load() -> None:
    # 8 may be in flight but the worker runs 4 at once: the 5th request on is saturation
    c = core("round_robin", 1, max_inflight_total=8, max_inflight_per_engine=8, max_running=4, adaptive_floor=16)
    budgets = []
    for i in range(8):
        c.on_request(req(f"r{i}", max_new=256), 0.0)
        (reqs,) = c.dispatch().values()
        budgets.append((reqs[0].params.max_new_tokens, reqs[0].max_new_tokens_scaled_from))
    # Up to what the worker runs at once nothing changes; past it each request gets its share of the
    # capacity (256 * 4 / load), and says what it was scaled from.
    assert budgets[:4] == [(256, None)] * 4
    assert budgets[4:] == [(256 * 4 // n, 256) for n in (5, 6, 7, 8)]
    # a load the workers can run at once is never scaled, however close to the caps it is
    roomy = core("round_robin", 1, max_inflight_total=8, max_inflight_per_engine=8, max_running=8, adaptive_floor=16)
    for i in range(8):
        roomy.on_request(req(f"m{i}", max_new=256), 0.0)
        (reqs,) = roomy.dispatch().values()
        assert reqs[0].params.max_new_tokens == 256 and reqs[0].max_new_tokens_scaled_from is None
    off = core("round_robin", 1, max_inflight_total=2, adaptive_max_new_tokens=False)
    for i in range(2):
        off.on_request(req(f"o{i}", max_new=256), 0.0)
        (reqs,) = off.dispatch().values()
        assert reqs[0].params.max_new_tokens == 256


def accept(c: SchedulerCore, worker: int, *rids: str) -> None:
    c.on_status(WorkerStatus(worker_id=worker, accepted=list(rids)))


def test_worker_death_fails_its_requests_only() -> None:
    c = core("round_robin", 2)
    for i in range(4):
        dispatch_one(c, req(f"r{i}"))
    accept(c, 0, "r0", "r2")
    accept(c, 1, "r1", "r3")
    errors = c.on_worker_died(0, -9)
    assert sorted(e.rid for e in errors) == ["r0", "r2"] and all(e.status == 500 for e in errors)
    assert dispatch_one(c, req("r4")) == 1  # the dead worker gets nothing until it is up again
    c.on_worker_up(0)
    assert dispatch_one(c, req("r5")) == 0


def test_abort_of_queued_request_returns_final_item() -> None:
    c = core("round_robin", 1, max_inflight_total=1)
    dispatch_one(c, req("a"))
    c.on_request(req("b"), 0.0)
    assert c.on_abort("a") == (0, None)
    worker, final = c.on_abort("b")
    assert worker is None and final is not None and final.finish_reason == "abort"
    assert len(c.queue) == 0


def warm_ids(out: list[tuple[int, TokenizedReq]]) -> list[tuple[int, list[int]]]:
    assert all(r.warmup for _, r in out)
    return [(w, r.input_ids) for w, r in out]


def test_warmups_go_to_idle_workers_only() -> None:
    c = core("round_robin", 2)
    dispatch_one(c, req("busy"))  # worker 0 busy
    c.queue_warmup([1, 2, 3])
    out = c.pop_warmups()
    assert warm_ids(out) == [(1, [1, 2, 3])]
    finish(c, 1, out[0][1].rid)
    finish(c, 0, "busy")
    out = c.pop_warmups()
    assert warm_ids(out) == [(0, [1, 2, 3])]
    finish(c, 0, out[0][1].rid)
    assert not c.warm_queue


def test_warmups_are_one_chunk_per_worker_at_a_time() -> None:
    """Twenty long warm-ups must not land on a worker at once: one piece of at most chunk_size new
    tokens per worker, the next only after the last one finished, none while a request waits."""
    c = core("round_robin", 1, chunk_size=512)
    for i in range(20):
        assert c.queue_warmup([i] * 1200)
    out = c.pop_warmups()
    assert warm_ids(out) == [(0, [0] * 512)]
    assert c.pop_warmups() == []  # the piece is still running
    finish(c, 0, out[0][1].rid)
    c.on_request(req("user"), 0.0)
    assert c.pop_warmups() == []  # a request waits: it goes first
    c.dispatch()
    assert c.pop_warmups() == []  # ...and runs: the worker is busy
    finish(c, 0, "user")
    out = c.pop_warmups()
    assert warm_ids(out) == [(0, [0] * 1024)]  # the same prefix, one chunk further
    finish(c, 0, out[0][1].rid)
    out = c.pop_warmups()
    assert warm_ids(out) == [(0, [0] * 1200)]
    finish(c, 0, out[0][1].rid)
    assert len(c.warm_queue) == 19


def test_warm_queue_is_bounded() -> None:
    from minisgl.scheduler.core import MAX_WARM_QUEUE

    c = core("round_robin", 1)
    assert all(c.queue_warmup([i, 1]) for i in range(MAX_WARM_QUEUE))
    assert c.queue_warmup([0, 1])  # already queued: no new entry
    assert not c.queue_warmup([999, 1])
    assert c.drop_warmups() == MAX_WARM_QUEUE and not c.warm_queue


def test_requests_the_dead_worker_never_took_in_are_requeued() -> None:
    """Dispatched in the ~200 ms before the launcher noticed the death: they never ran, so they go to
    a live worker (or wait for the restart) instead of failing."""
    c = core("round_robin", 2)
    for i in range(4):
        dispatch_one(c, req(f"r{i}"))
    accept(c, 0, "r0")  # r2 was dispatched to worker 0 but never acknowledged
    errors = c.on_worker_died(0, -9)
    assert [e.rid for e in errors] == ["r0"]
    assert [q.req.rid for q in c.queue] == ["r2"]
    assert {w: [r.rid for r in reqs] for w, reqs in c.dispatch().items()} == {1: ["r2"]}


def test_late_death_notice_does_not_down_the_restarted_worker() -> None:
    c = SchedulerCore(ServerConfig(), 1)
    c.on_worker_up(0, pid=100)
    assert c.on_worker_died(0, -9, pid=100) == []
    c.on_worker_up(0, pid=200)
    c.on_worker_died(0, -9, pid=100)  # about the old process
    assert c.workers[0].up


def test_status_from_an_unknown_worker_is_an_error_not_a_crash_elsewhere() -> None:
    c = core("round_robin", 1)
    with pytest.raises(ValueError, match="unknown worker"):
        c.on_status(WorkerStatus(worker_id=7))
    with pytest.raises(ValueError, match="unknown worker"):
        c.on_status(WorkerStatus(worker_id=-1))


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="SCHEDULER_MODE"):
        core("best_effort")


def test_cache_extensions_build_the_index_and_end_with_the_request() -> None:
    """The worker reports a prompt cached chunk by chunk as extensions of its rid; the index holds the
    whole prefix, and the scheduler forgets the rid's tokens once the request finished."""
    from minisgl.messages import CacheExtension

    c = core("cache_aware", 2)
    prompt = list(range(500, 620))
    c.on_status(WorkerStatus(worker_id=1, cache_extended=[CacheExtension("a", 0, prompt[:40])]))
    c.on_status(WorkerStatus(worker_id=1, cache_extended=[CacheExtension("a", 40, prompt[40:80]),
                                                          CacheExtension("a", 80, prompt[80:])]))
    assert c.workers[1].index.match_prefix(prompt + [1]) == len(prompt)
    assert dispatch_one(c, req("hit", prompt + [7])) == 1
    # an extension of what this scheduler never heard (it restarted meanwhile) is left out, not guessed
    c.on_status(WorkerStatus(worker_id=0, cache_extended=[CacheExtension("b", 50, [1, 2, 3])]))
    assert c.workers[0].index.num_tokens == 0
    c.on_status(WorkerStatus(worker_id=1, finished=["a"]))
    assert "a" not in c.workers[1].growing
