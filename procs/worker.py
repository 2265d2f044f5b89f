"""Worker process: one per device. Owns a backend (model, KV pool, prefix cache) and runs its loop.

In:  Dispatch / AbortReq / InsertPrefix / FlushCache / Shutdown from the scheduler.
Out: one TokenBatch per engine step to the tokenizer; WorkerStatus to the scheduler.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import zmq

from minisgl import ipc
from minisgl.narration import relay_to_gateway
from minisgl.backends.base import Backend, BackendConfig, StepOutput, create_backend
from minisgl.config import ServerConfig
from minisgl.messages import (
    AbortReq,
    Dispatch,
    FlushCache,
    InsertPrefix,
    PeerRestarted,
    Shutdown,
    TokenBatch,
    WorkerInMsg,
    WorkerStatus,
    WorkerUp,
)

log = logging.getLogger("minisgl.worker")

STATUS_INTERVAL_S = 0.25  # load reports while busy, even when no request finished


def pick_device(cfg: ServerConfig, worker_id: int) -> str:
    if cfg.device not in ("", "auto"):
        return cfg.device if cfg.device != "cuda" else f"cuda:{worker_id}"
    import torch

    if torch.cuda.is_available():
        return f"cuda:{worker_id % torch.cuda.device_count()}"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


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


class WorkerLoop:
    def __init__(self, cfg: ServerConfig, worker_id: int, backend: Backend) -> None:
        self.cfg, self.worker_id, self.backend = cfg, worker_id, backend
        self.ctx = zmq.Context()
        self.pull = ipc.bind_pull(self.ctx, cfg.endpoint(f"worker-{worker_id}"))
        self.to_tokenizer = ipc.connect_push(self.ctx, cfg.endpoint("tokenizer"))
        self.to_scheduler = ipc.connect_push(self.ctx, cfg.endpoint("scheduler"))
        self.decoder = ipc.FrameDecoder(WorkerInMsg, f"worker-{worker_id}")
        self.live: set[str] = set()  # rids dispatched here and not yet finished
        self.last_status = 0.0
        self.pending = StepOutput()  # cache events not yet reported (e.g. from start-up warm-up)

    def warm_start(self, prefixes: list[str]) -> None:
        """WARM_PREFIXES: prefill them before this worker reports ready."""
        if not prefixes:
            return
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.cfg.model_path)
        for text in prefixes:
            self.backend.insert_prefix(tokenizer(text).input_ids)
        while self.backend.has_work():
            out = self.backend.step()
            self.pending.cache_inserted += out.cache_inserted
            self.pending.cache_evicted += out.cache_evicted
        log.info("warmed %d prefix(es)", len(prefixes))

    def handle(self, msg: object) -> bool:
        if isinstance(msg, Dispatch):
            for req in msg.reqs:
                self.backend.add_request(req)
                self.live.add(req.rid)
            # Say so before any step runs: a request the scheduler never saw accepted is re-queued
            # elsewhere if this process dies, so it must not have run here.
            self.send_status(StepOutput(), accepted=[r.rid for r in msg.reqs if not r.warmup])
        elif isinstance(msg, PeerRestarted):
            # A new scheduler knows nothing of what runs here (the tokenizer has failed those requests):
            # drop it all and report in as a fresh worker.
            for rid in list(self.live):
                self.backend.abort(rid)
            log.warning("the scheduler restarted: dropped %d request(s), reporting in again", len(self.live))
            self.live.clear()
            self.announce()
        elif isinstance(msg, AbortReq):
            self.backend.abort(msg.rid)
        elif isinstance(msg, InsertPrefix):
            self.backend.insert_prefix(msg.input_ids)
        elif isinstance(msg, FlushCache):
            self.backend.flush_cache()
            self.send_status(StepOutput(), flushed=True)
        elif isinstance(msg, Shutdown):
            return False
        return True

    def send_status(self, out: StepOutput, flushed: bool = False, accepted: list[str] | None = None) -> None:
        s = self.backend.stats()
        ipc.send(self.to_scheduler, WorkerStatus(
            worker_id=self.worker_id, finished=out.finished, running=s.running, waiting=s.waiting,
            kv_used_tokens=s.kv_used_tokens, kv_total_tokens=s.kv_total_tokens,
            cached_tokens_total=s.cached_tokens_total, prompt_tokens_total=s.prompt_tokens_total,
            cache_inserted=out.cache_inserted, cache_evicted=out.cache_evicted, cache_flushed=flushed,
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
            if self.pull.poll(timeout):
                while True:
                    try:
                        data = self.pull.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
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
            if out.finished or out.cache_inserted or out.cache_evicted or \
                    time.monotonic() - self.last_status > STATUS_INTERVAL_S:
                self.send_status(out)
            if out.outputs:
                ipc.send(self.to_tokenizer, TokenBatch(self.worker_id, out.outputs))
        self.backend.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker-id", type=int, required=True)
    args = parser.parse_args()
    cfg = ipc.become_child(f"worker-{args.worker_id}")
    relay_to_gateway(cfg, f"worker-{args.worker_id}")
    device = pick_device(cfg, args.worker_id)
    if device == "cpu":
        import torch

        # Workers share the host's cores; oversubscribing threads makes every worker slower.
        torch.set_num_threads(max(1, usable_cpus() // max(1, cfg.workers)))
    t0 = time.perf_counter()
    backend = create_backend(cfg.backend, backend_config(cfg, device))
    log.info("backend %s on %s loaded in %.1fs", backend.name, device, time.perf_counter() - t0)
    loop = WorkerLoop(cfg, args.worker_id, backend)
    loop.warm_start(cfg.warm_prefixes)
    try:
        loop.run()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
