"""ZeroMQ socket helpers and the few things every child process does at start-up."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

from collections.abc import Iterator

import msgspec
import zmq

from minisgl.config import ServerConfig
from minisgl.messages import ProcReady

log = logging.getLogger("minisgl")


def bind_pull(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    return sock


def connect_push(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    # Keep unsent messages briefly at close so a final event still leaves, but never hang on exit.
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.SNDHWM, 0)  # never drop: back-pressure is the scheduler's job, not the socket's
    sock.connect(endpoint)
    return sock


_encoder = msgspec.msgpack.Encoder()


def drain(sock: zmq.Socket, multipart: bool = False) -> Iterator:
    """Every message already waiting on sock, without blocking: each loop takes in all that arrived, then
    acts once (one Dispatch per worker per pass, one engine step per batch of messages)."""
    while True:
        try:
            yield sock.recv_multipart(zmq.NOBLOCK) if multipart else sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return


def send(sock: zmq.Socket, msg: msgspec.Struct, flags: int = 0) -> None:
    sock.send(_encoder.encode(msg), flags, copy=False)


def setup_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s.%(msecs)03d {name:>10} %(levelname).1s %(message)s",  # ms: steps are ~30 ms
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def _watch_parent(parent_pid: int) -> None:
    # PR_SET_PDEATHSIG covers Linux; this thread covers the rest (and the race before prctl ran).
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(0.5)


def become_child(name: str) -> ServerConfig:
    """Common start-up of every process the launcher starts: config, logging, signals, no orphans.

    SIGINT is ignored (Ctrl-C reaches the whole process group; the launcher decides what happens) and
    SIGTERM exits cleanly. If the launcher dies, even by SIGKILL, we die with it.
    """
    cfg = ServerConfig.from_env_var()
    setup_logging(cfg.log_level, name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    parent_pid = int(os.environ.get("MINISGL_PARENT_PID", os.getppid()))
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="parent-watch").start()
    return cfg


def report_ready(ctx: zmq.Context, cfg: ServerConfig, name: str, **info: str) -> None:
    sock = connect_push(ctx, cfg.endpoint("launcher"))
    send(sock, ProcReady(name=name, pid=os.getpid(), info={k: str(v) for k, v in info.items()}))
    sock.close(linger=2000)


RESTARTED_ENV = "MINISGL_RESTARTED"


def is_restart() -> bool:
    """Whether the launcher started this process to replace one that died (its peers hold stale state)."""
    return os.environ.get(RESTARTED_ENV) == "1"


class FrameDecoder:
    """Decodes one socket's frames; a malformed frame is logged (rate-limited) and dropped, never fatal:
    any process that can reach a socket could send one, and one bad frame must not stop the tree."""

    def __init__(self, union: object, where: str) -> None:
        self.decoder = msgspec.msgpack.Decoder(union)
        self.where = where
        self.dropped = 0

    def decode(self, data: bytes):  # noqa: ANN201 - a member of the union, or None
        try:
            return self.decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.dropped += 1
            if self.dropped <= 10 or self.dropped % 1000 == 0:
                log.warning("%s: dropped a malformed frame (%d bytes, %d dropped so far): %s",
                            self.where, len(data), self.dropped, e)
            return None
