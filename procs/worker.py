"""Worker process: one per device. Owns a backend (model, KV pool, prefix cache) and runs its loop.

In:  Dispatch / AbortReq / InsertPrefix / FlushCache from the scheduler; Shutdown from the launcher
     (a stopping server: the loop ends, the backend shuts down, a TP group leaves together).
Out: one TokenBatch per engine step to the tokenizer; WorkerStatus to the scheduler.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Callable

import zmq

from minisgl import ipc
from minisgl.narration import relay_to_gateway
from minisgl.backends.base import Backend, BackendConfig, StepOutput
from minisgl.backends.base import create_backend
from minisgl.config import ServerConfig
from minisgl.backends.tp_checks import rank_device
from minisgl.distributed.group import TPGroup, destroy_tp, exit_rank
from minisgl.backends.tp_sync import FollowerLoop, StepSync, agree_on_kv_pool, apply
from minisgl.messages import (
    Dispatch,
    FlushCache,
    PeerRestarted,
    Shutdown,
    TokenBatch,
    WorkerInMsg,
    WorkerStatus,
    WorkerUp,
)

log = logging.getLogger("minisgl.worker")

STATUS_INTERVAL_S = 0.25  # load reports while busy, even when no request finished


def pick_device(cfg: ServerConfig, worker_id: int, tp_rank: int = 0) -> str:
    """Worker w, TP rank r: CUDA device w * TP + r. Depends only on the ids, so a restart lands on the
    same device."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return rank_device(cfg.device, cfg.tp, worker_id, tp_rank, count)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a cgroup), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def backend_config(cfg: ServerConfig, device: str) -> BackendConfig:
    return BackendConfig(
        model_path=cfg.model_path, device=device, dtype=cfg.dtype, load_format=cfg.load_format,
        max_running=cfg.max_running, kv_cache_tokens=cfg.kv_cache_tokens, chunk_size=cfg.chunk_size,
        max_model_len=cfg.max_model_len, hf_concurrency=cfg.hf_concurrency, narrate=cfg.narrate,
    )


def warm_prefixes(backend: Backend, model_path: str, prefixes: list[str], pending: StepOutput) -> None:
    """WARM_PREFIXES: prefill them before this worker reports ready (every TP rank does the same)."""
    if not prefixes:
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    for text in prefixes:
        backend.insert_prefix(tokenizer(text).input_ids)
    while backend.has_work():
        out = backend.step()
        pending.cache_inserted += out.cache_inserted
        pending.cache_evicted += out.cache_evicted
        pending.cache_extended += out.cache_extended
    log.info("warmed %d prefix(es)", len(prefixes))


class WorkerLoop:
    def __init__(self, cfg: ServerConfig, worker_id: int, backend: Backend, sync: StepSync | None = None) -> None:
        self.cfg, self.worker_id, self.backend = cfg, worker_id, backend
        self.sync = sync  # TP rank 0: broadcasts what it receives to the other ranks
        self.ctx = zmq.Context()
        self.pull = ipc.bind_pull(self.ctx, cfg.endpoint(f"worker-{worker_id}"))
        self.to_tokenizer = ipc.connect_push(self.ctx, cfg.endpoint("tokenizer"))
        self.to_scheduler = ipc.connect_push(self.ctx, cfg.endpoint("scheduler"))
        self.decoder = ipc.FrameDecoder(WorkerInMsg, f"worker-{worker_id}")
        self.live: set[str] = set()  # rids dispatched here and not yet finished
        self.last_status = 0.0
        self.pending = StepOutput()  # cache events not yet reported (e.g. from start-up warm-up)

    def warm_start(self, prefixes: list[str]) -> None:
        warm_prefixes(self.backend, self.cfg.model_path, prefixes, self.pending)

    def handle(self, msg: object) -> bool:
        running = apply(self.backend, msg, self.live)  # the same as every other TP rank does
        if isinstance(msg, Dispatch):
            # Say so before any step runs: a request the scheduler never saw accepted is re-queued
            # elsewhere if this process dies, so it must not have run here.
            self.send_status(StepOutput(), accepted=[r.rid for r in msg.reqs if not r.warmup])
        elif isinstance(msg, PeerRestarted):
            log.warning("the scheduler restarted: dropped its request(s), reporting in again")
            self.announce()
        elif isinstance(msg, FlushCache):
            self.send_status(StepOutput(), flushed=True)
        elif isinstance(msg, Shutdown):
            log.info("stopping: the launcher sent Shutdown")
        return running

    def send_status(self, out: StepOutput, flushed: bool = False, accepted: list[str] | None = None) -> None:
        ipc.send(self.to_scheduler, WorkerStatus(
            worker_id=self.worker_id, finished=out.finished, load=self.backend.stats(),
            cache_inserted=out.cache_inserted, cache_evicted=out.cache_evicted, cache_extended=out.cache_extended,
            cache_flushed=flushed,
            accepted=accepted or [],
        ))
        self.last_status = time.monotonic()

    def announce(self) -> None:
        ipc.send(self.to_scheduler, WorkerUp(self.worker_id, self.backend.stats().kv_total_tokens, pid=os.getpid()))
        self.send_status(self.pending)
        self.pending = StepOutput()

    def run(self) -> None:
        self.announce()
        ipc.report_ready(self.ctx, self.cfg, f"worker-{self.worker_id}", backend=self.backend.name,
                         device=self.backend.config.device, max_context=str(self.backend.max_context_len()))
        running = True
        while running:
            # Block for work only when idle; while busy, just drain whatever arrived since the last step.
            timeout = 0 if self.backend.has_work() else 100
            received: list[bytes] = []
            if self.pull.poll(timeout):
                received.extend(ipc.drain(self.pull))
            if self.sync is not None and self.sync.due(received, self.backend):
                self.sync.share(received, self.backend)
            for data in received:
                msg = self.decoder.decode(data)
                if msg is None:
                    continue
                try:
                    running = self.handle(msg) and running
                except Exception:  # noqa: BLE001 - one bad message must never stop the worker
                    log.exception("dropped a %s that failed", type(msg).__name__)
            if not self.backend.has_work():
                continue
            out = self.backend.step()
            self.live.difference_update(out.finished)
            # Status first: the scheduler must count a request as finished before its client can
            # see the end of it and send the next one (else that one is dispatched against a stale
            # load, e.g. cache_aware sends it away from an idle worker).
            if out.finished or out.cache_changed or \
                    time.monotonic() - self.last_status > STATUS_INTERVAL_S:
                self.send_status(out)
            if out.outputs:
                ipc.send(self.to_tokenizer, TokenBatch(self.worker_id, out.outputs))
        self.backend.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker-id", type=int, required=True)
    parser.add_argument("--tp-rank", type=int, default=0, help="this process's rank in the worker's TP group")
    parser.add_argument("--tp-gen", type=int, default=0, help="start count of the TP group (a fresh rendezvous each)")
    args = parser.parse_args()
    name = f"worker-{args.worker_id}" + (f"-tp{args.tp_rank}" if args.tp_rank else "")
    cfg = ipc.become_child(name)
    relay_to_gateway(cfg, name)
    device = pick_device(cfg, args.worker_id, args.tp_rank)
    if device == "cpu":
        import torch

        # Workers (and their TP ranks) share the host's cores; oversubscribing threads slows every one.
        torch.set_num_threads(max(1, usable_cpus() // max(1, cfg.workers * cfg.tp)))
    tp = None
    if cfg.tp > 1:  # before the backend: the loader then loads this rank's shard only
        from minisgl.distributed.group import init_tp

        store = os.path.join(cfg.runtime_dir, f"tp-{args.worker_id}-{args.tp_gen}.store")
        tp = init_tp(args.tp_rank, cfg.tp, store, device)
    t0 = time.perf_counter()
    backend = create_backend(cfg.backend, backend_config(cfg, device))
    log.info("backend %s on %s loaded in %.1fs", backend.name, device, time.perf_counter() - t0)
    if tp is not None:
        agree_on_kv_pool(backend, tp)
    if tp is not None and tp.rank > 0:
        run_follower(cfg, backend, tp, name)
        return
    loop = WorkerLoop(cfg, args.worker_id, backend, StepSync(tp) if tp is not None else None)
    loop.warm_start(cfg.warm_prefixes)
    if tp is not None:
        run_rank(loop.run)
    try:
        loop.run()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


def run_follower(cfg: ServerConfig, backend: Backend, tp: TPGroup, name: str) -> None:
    """TP ranks 1..N-1: warm the same prefixes as rank 0, report ready, then follow rank 0's steps."""
    warm_prefixes(backend, cfg.model_path, cfg.warm_prefixes, StepOutput())
    ctx = zmq.Context()
    ipc.report_ready(ctx, cfg, name, backend=backend.name, device=backend.config.device, tp_rank=str(tp.rank))
    ctx.destroy(linger=0)
    run_rank(FollowerLoop(backend, tp).run)


def run_rank(loop: Callable[[], None]) -> None:
    """A TP rank's loop, then its exit: after a Shutdown every rank leaves the group together; on
    SIGTERM (or Ctrl-C) it exits at once (the other ranks may be gone: no collective to wait in)."""
    try:
        loop()
    except (KeyboardInterrupt, SystemExit):
        exit_rank(0)
    destroy_tp()
    exit_rank(0)


if __name__ == "__main__":
    main()
