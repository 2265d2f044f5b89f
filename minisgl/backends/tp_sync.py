"""Keeping the N ranks of a TP worker in lockstep.

Every rank runs the whole engine (scheduling, radix cache, sampling) on its share of the model. The
engine is deterministic given its inputs, and the gathered logits are the same bits on every rank, so
the ranks only need the same inputs in the same order: rank 0, the only one with sockets, broadcasts
each loop iteration's scheduler messages over the host (gloo) group (one 4 KB broadcast per step), as
the msgspec bytes they came in (never pickle), and every rank applies them and then steps iff its engine has work. Rank 0 sends only
when there is something to do, plus an empty heartbeat every HEARTBEAT_S while idle (a gloo wait has a
timeout). Each broadcast carries rank 0's engine fingerprint (running, waiting, KV used) from before
the messages; a rank whose own differs stops with an error: better than a deadlock in a collective.
"""

from __future__ import annotations

import logging
import time

import msgspec
import torch
import torch.distributed as dist

from minisgl.backends.base import Backend
from minisgl.distributed.group import TPGroup
from minisgl import ipc
from minisgl.messages import AbortReq, Dispatch, FlushCache, InsertPrefix, PeerRestarted, Shutdown, WorkerInMsg

log = logging.getLogger("minisgl.tp")

HEARTBEAT_S = 5.0


class StepInputs(msgspec.Struct, array_like=True):
    running: int  # rank 0's engine before these messages
    waiting: int
    kv_used: int
    msgs: list[bytes]  # encoded WorkerInMsg, in arrival order


def fingerprint(backend: Backend) -> tuple[int, int, int]:
    s = backend.stats()
    return s.running, s.waiting, s.kv_used_tokens


class StepSync:
    """Rank 0: `share(msgs, backend)`; the other ranks: `receive()`. One broadcast of a fixed-size
    block per iteration on the host group (its first 8 bytes give the length; a payload larger than
    the block takes a second broadcast for the rest); none on the model's NCCL group."""

    BLOCK = 4096  # bytes: a decode step's inputs (no new messages) are ~10, a Dispatch of one request ~1 KB

    def __init__(self, tp: TPGroup) -> None:
        self.tp = tp
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(StepInputs)
        self.last_sent = time.monotonic()
        self._block = torch.zeros(self.BLOCK, dtype=torch.uint8)

    def due(self, msgs: list[bytes], backend: Backend) -> bool:
        """Whether rank 0 must broadcast this iteration."""
        return bool(msgs) or backend.has_work() or time.monotonic() - self.last_sent > HEARTBEAT_S

    def share(self, msgs: list[bytes], backend: Backend) -> None:
        running, waiting, kv_used = fingerprint(backend)
        payload = self._encoder.encode(StepInputs(running, waiting, kv_used, msgs))
        data = len(payload).to_bytes(8, "little") + payload
        head = data[:self.BLOCK]
        self._block[:len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        dist.broadcast(self._block, src=0, group=self.tp.cpu_group)
        if len(data) > self.BLOCK:
            dist.broadcast(torch.frombuffer(bytearray(data[self.BLOCK:]), dtype=torch.uint8), src=0,
                           group=self.tp.cpu_group)
        self.last_sent = time.monotonic()

    def receive(self) -> StepInputs:
        dist.broadcast(self._block, src=0, group=self.tp.cpu_group)
        head = self._block.numpy().tobytes()
        size = int.from_bytes(head[:8], "little")
        payload = head[8:8 + size]
        if 8 + size > self.BLOCK:
            rest = torch.empty(8 + size - self.BLOCK, dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.tp.cpu_group)
            payload += rest.numpy().tobytes()
        return self._decoder.decode(payload)


def apply(backend: Backend, msg: object, live: set[str]) -> bool:
    """A scheduler message applied to a rank's backend, the same on every rank; False on Shutdown.
    `live`: the rids dispatched here and not yet finished. (Rank 0's WorkerLoop.handle calls this, then
    sends its replies.)"""
    if isinstance(msg, Dispatch):
        for req in msg.reqs:
            backend.add_request(req)
            live.add(req.rid)
    elif isinstance(msg, PeerRestarted):
        # A new scheduler knows nothing of what runs here (the tokenizer has failed those requests)
        for rid in list(live):
            backend.abort(rid)
        live.clear()
    elif isinstance(msg, AbortReq):
        backend.abort(msg.rid)
    elif isinstance(msg, InsertPrefix):
        backend.insert_prefix(msg.input_ids)
    elif isinstance(msg, FlushCache):
        backend.flush_cache()
    elif isinstance(msg, Shutdown):
        return False
    return True


class FollowerLoop:
    """The loop of TP ranks 1..N-1: no sockets, only rank 0's broadcasts."""

    def __init__(self, backend: Backend, tp: TPGroup) -> None:
        self.backend, self.tp = backend, tp
        self.sync = StepSync(tp)
        # the same frames rank 0 got: malformed ones are dropped here as there, never fatal
        self.decoder = ipc.FrameDecoder(WorkerInMsg, f"worker-tp{tp.rank}")
        self.live: set[str] = set()
        self.steps = 0

    def run(self) -> None:
        running = True
        while running:
            inputs = self.sync.receive()
            mine = fingerprint(self.backend)
            if mine != (inputs.running, inputs.waiting, inputs.kv_used):
                raise RuntimeError(f"TP rank {self.tp.rank} diverged from rank 0 after {self.steps} steps: "
                                   f"(running, waiting, KV used) {mine} here, "
                                   f"{(inputs.running, inputs.waiting, inputs.kv_used)} on rank 0")
            for data in inputs.msgs:
                msg = self.decoder.decode(data)
                if msg is None:
                    continue
                try:
                    running = apply(self.backend, msg, self.live) and running
                except Exception:  # noqa: BLE001 - as on rank 0: a bad message is dropped, not fatal
                    log.exception("dropped a %s that failed", type(msg).__name__)
            if self.backend.has_work():  # after a Shutdown too: rank 0's loop steps once more as well
                self.live.difference_update(self.backend.step().finished)
                self.steps += 1
        self.backend.shutdown()


def agree_on_kv_pool(backend: Backend, tp: TPGroup) -> None:
    """Every rank must schedule over the same number of KV slots; sized from each rank's free memory
    they can differ by a few. All take the smallest (the slots above it are simply never handed out)."""
    engine = getattr(backend, "engine", None)
    if engine is None:
        raise RuntimeError(f"the {backend.name} backend cannot run tensor-parallel (it has no engine)")
    total = tp.min_int(engine.pool.total)
    if total < engine.pool.total:
        log.info("KV pool: %d slots here, %d on the smallest rank; using %d", engine.pool.total, total, total)
        engine.pool.total = total
        engine.pool.reset()
        engine.max_context_len = min(engine.max_context_len, total)
