"""Scheduler process: the only process that sees every request.

In:  TokenizedReq / AbortReq (tokenizer, gateway), WorkerStatus / WorkerUp (workers), WorkerDied
     (launcher); control requests on a ROUTER socket.
Out: Dispatch / AbortReq / InsertPrefix / FlushCache to workers; TokenBatch (errors for requests that
     never reached a worker) to the tokenizer.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import zmq


from minisgl import ipc
from minisgl.narration import relay_to_gateway
from minisgl.backend_registry import backend_spec
from minisgl.config import ServerConfig
from minisgl.messages import (
    AbortReq,
    ControlReply,
    ControlReq,
    Dispatch,
    FlushCache,
    InsertPrefix,
    PeerRestarted,
    SchedulerInMsg,
    TokenBatch,
    TokenizedReq,
    TokenOut,
    WorkerDied,
    WorkerStatus,
    WorkerUp,
)
from minisgl.scheduler.core import SchedulerCore

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("minisgl.scheduler")

CONTROL_COMMANDS = ("metrics", "warm", "insert_prefix", "flush_cache", "health")
MAX_CONTROL_PREFIXES = 64  # prefixes in one warm / insert_prefix call


class ControlInputError(ValueError):
    """A control request that cannot be served as given: answered ok: false with the reason."""


def model_limits(cfg: ServerConfig) -> tuple[int, int]:
    """(vocabulary size, context window) of the served model, for checking control-channel token ids."""
    try:
        model_cfg = json.loads((Path(cfg.model_path) / "config.json").read_text())
    except (OSError, ValueError):
        model_cfg = {}
    model_cfg = model_cfg.get("text_config", model_cfg)
    vocab = int(model_cfg.get("vocab_size") or 0)
    context = cfg.max_model_len or int(model_cfg.get("max_position_embeddings") or 4096)
    return vocab, context


class SchedulerProcess:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.core = SchedulerCore(cfg, cfg.workers)
        self.ctx = zmq.Context()
        self.pull = ipc.bind_pull(self.ctx, cfg.endpoint("scheduler"))
        self.to_workers = [ipc.connect_push(self.ctx, cfg.endpoint(f"worker-{i}")) for i in range(cfg.workers)]
        self.to_tokenizer = ipc.connect_push(self.ctx, cfg.endpoint("tokenizer"))
        self.control: zmq.Socket | None = None
        if cfg.zmq_control:
            self.control = self.ctx.socket(zmq.ROUTER)
            self.control.setsockopt(zmq.LINGER, 0)
            self.control.setsockopt(zmq.MAXMSGSIZE, 64 * 1024 * 1024)  # beyond it: dropped by ZeroMQ itself
            self.control.bind(cfg.control_endpoint)
        self.decoder = ipc.FrameDecoder(SchedulerInMsg, "scheduler")
        self.vocab_size, self.context = model_limits(cfg)
        self.control_decoder = msgspec.json.Decoder(ControlReq)
        self.control_encoder = msgspec.json.Encoder()
        self.poller = zmq.Poller()
        self.poller.register(self.pull, zmq.POLLIN)
        if self.control is not None:
            self.poller.register(self.control, zmq.POLLIN)

    # ------------------------------------------------------------ main loop

    def run(self) -> None:
        if ipc.is_restart():
            # The old scheduler's queue and counts are gone: the tokenizer fails what it holds, the
            # workers drop what they run and report in again.
            ipc.send(self.to_tokenizer, PeerRestarted("scheduler"))
            for sock in self.to_workers:
                ipc.send(sock, PeerRestarted("scheduler"))
        ipc.report_ready(self.ctx, self.cfg, "scheduler", control=self.cfg.control_endpoint if self.control else "")
        log.info("scheduler ready: mode=%s workers=%d caps total=%d per-engine=%d queue=%d",
                 self.cfg.scheduler_mode, self.cfg.workers, self.cfg.max_inflight_total,
                 self.cfg.max_inflight_per_engine, self.cfg.max_queue)
        while True:
            events = dict(self.poller.poll(timeout=100))
            if self.pull in events:
                for data in ipc.drain(self.pull):  # everything waiting, then one dispatch pass
                    msg = self.decoder.decode(data)
                    if msg is None:
                        continue
                    try:
                        self.handle(msg)
                    except Exception:  # noqa: BLE001 - e.g. a status naming a worker that does not exist
                        log.exception("dropped a %s that failed", type(msg).__name__)
            if self.control is not None and self.control in events:
                self.handle_control()
            self.pump()

    def handle(self, msg: object) -> None:
        core = self.core
        if isinstance(msg, TokenizedReq):
            err = core.on_request(msg, time.monotonic())
            if err is not None:
                log.warning("rejected rid=%s: %s", msg.rid, err.error)
                self.fail([err])
        elif isinstance(msg, AbortReq):
            worker_id, final = core.on_abort(msg.rid)
            if worker_id is not None:
                ipc.send(self.to_workers[worker_id], msg)
            elif final is not None:
                self.fail([final])
        elif isinstance(msg, WorkerStatus):
            core.on_status(msg)
        elif isinstance(msg, WorkerUp):
            log.info("worker %d is up (%d KV tokens, pid %d)", msg.worker_id, msg.kv_total_tokens, msg.pid)
            core.on_worker_up(msg.worker_id, msg.pid)
        elif isinstance(msg, WorkerDied):
            before = core.counters.requeued_worker_died
            errors = core.on_worker_died(msg.worker_id, msg.exitcode, msg.pid)
            log.error("worker %d died (exit %d); failing %d in-flight requests, re-queued %d it never started",
                      msg.worker_id, msg.exitcode, len(errors), core.counters.requeued_worker_died - before)
            self.fail(errors)

    def pump(self) -> None:
        self.fail(self.core.expire(time.monotonic()))
        for worker_id, reqs in self.core.dispatch().items():
            ipc.send(self.to_workers[worker_id], Dispatch(reqs))
            if self.cfg.narrate:
                log.info("dispatch %d request(s) to worker %d (%s)", len(reqs), worker_id, self.cfg.scheduler_mode)
        for worker_id, warm in self.core.pop_warmups():
            ipc.send(self.to_workers[worker_id], Dispatch([warm]))

    def fail(self, items: list[TokenOut]) -> None:
        if items:
            ipc.send(self.to_tokenizer, TokenBatch(worker_id=-1, items=items))

    @functools.cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """For text prefixes sent to `warm` / `insert_prefix`; loaded on first use (it is slow to import)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.cfg.model_path)

    # ------------------------------------------------------------ control channel

    def handle_control(self) -> None:
        assert self.control is not None
        for frames in ipc.drain(self.control, multipart=True):
            envelope, payload = frames[:-1], frames[-1]
            try:
                reply = self.control_command(self.control_decoder.decode(payload))
            except msgspec.DecodeError as e:
                reply = ControlReply(ok=False, error=f"malformed control request: {e}")
            except ControlInputError as e:
                reply = ControlReply(ok=False, error=str(e))
            except Exception as e:  # noqa: BLE001 - a bad command must never take the scheduler down
                log.exception("control command failed")
                reply = ControlReply(ok=False, error=f"{type(e).__name__}: {e}")
            self.control.send_multipart([*envelope, self.control_encoder.encode(reply)])

    def _prefix_ids(self, req: ControlReq) -> list[list[int]]:
        """Checked like HTTP input, before anything is tokenized or sent: a bad id would crash a worker's
        embedding, a huge text would hold this loop for seconds."""
        cmd = req.command
        if len(req.token_ids) + len(req.prefixes) > MAX_CONTROL_PREFIXES:
            raise ControlInputError(f"'{cmd}' takes at most {MAX_CONTROL_PREFIXES} prefixes per call")
        chars = sum(len(t) for t in req.prefixes)
        if chars > self.cfg.max_prompt_chars:
            raise ControlInputError(f"'{cmd}': the prefixes hold {chars} characters; the limit is "
                                    f"{self.cfg.max_prompt_chars} (MAX_PROMPT_CHARS)")
        hi = self.vocab_size - 1
        for i, ids in enumerate(req.token_ids):
            bad = next((t for t in ids if t < 0 or (hi >= 0 and t > hi)), None)
            if bad is not None:
                raise ControlInputError(f"'{cmd}': token_ids[{i}] holds {bad}; ids must be between 0 and {hi}")
        seqs = [list(ids) for ids in req.token_ids]
        seqs += [self.tokenizer(text).input_ids for text in req.prefixes]
        if not seqs or any(len(s) == 0 for s in seqs):
            raise ControlInputError(f"'{cmd}' needs non-empty 'prefixes' (text) or 'token_ids'")
        for i, s in enumerate(seqs):
            if len(s) >= self.context:
                raise ControlInputError(f"'{cmd}': prefix {i} is {len(s)} tokens; the context window is "
                                        f"{self.context} tokens")
        return seqs

    def control_command(self, req: ControlReq) -> ControlReply:
        core = self.core
        if req.command == "metrics":
            return ControlReply(ok=True, data=core.metrics())
        if req.command == "health":
            up = sum(w.up for w in core.workers)
            return ControlReply(ok=up > 0, data={"workers_up": up, "workers": len(core.workers),
                                                  "queued": len(core.queue), "inflight": core.inflight_total},
                                error=None if up else "no worker is up")
        if req.command == "warm":
            seqs = self._prefix_ids(req)
            if not backend_spec(self.cfg.backend).prefix_cache:
                return ControlReply(ok=True, data={"queued": 0,
                                                   "skipped": f"the {self.cfg.backend} backend has no prefix cache"})
            if self.cfg.async_prefill_queue:
                refused = sum(not core.queue_warmup(ids) for ids in seqs)
                if refused:
                    return ControlReply(ok=False, error=f"the warm-up queue is full ({len(core.warm_queue)} "
                                        f"waiting); {len(seqs) - refused} of {len(seqs)} prefixes queued")
            else:
                self._insert_now(seqs)
            return ControlReply(ok=True, data={"queued": len(seqs), "tokens": [len(s) for s in seqs],
                                               "async": self.cfg.async_prefill_queue})
        if req.command == "insert_prefix":
            seqs = self._prefix_ids(req)
            self._insert_now(seqs)
            return ControlReply(ok=True, data={"inserted": len(seqs), "tokens": [len(s) for s in seqs]})
        if req.command == "flush_cache":
            dropped = core.drop_warmups()  # they would fill the cache again
            for sock in self.to_workers:
                ipc.send(sock, FlushCache())
            return ControlReply(ok=True, data={"workers": len(self.to_workers), "warmups_dropped": dropped})
        return ControlReply(ok=False, error=f"unknown command {req.command!r}; known: {', '.join(CONTROL_COMMANDS)}")

    def _insert_now(self, seqs: list[list[int]]) -> None:
        for worker in self.core.workers:
            if worker.up:
                for ids in seqs:
                    ipc.send(self.to_workers[worker.worker_id], InsertPrefix(ids))


def main() -> None:
    cfg = ipc.become_child("scheduler")
    relay_to_gateway(cfg, "scheduler")
    SchedulerProcess(cfg).run()


if __name__ == "__main__":
    main()
