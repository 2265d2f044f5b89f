"""Gateway process: the Starlette app (minisgl/gateway/app.py) under uvicorn."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from types import FrameType

import uvicorn

from minisgl import ipc
from minisgl.gateway.app import Gateway, create_app

log = logging.getLogger("minisgl.gateway")


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn. The protocol must be named: asyncio turns on TCP_NODELAY only for
    sockets whose proto is IPPROTO_TCP, and one made with proto 0 hands that 0 to every accepted
    connection. Without NODELAY, Nagle holds each streamed chunk until the client's delayed ACK of the
    previous write: about 40 ms added to every response on a keep-alive connection."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class DrainingServer(uvicorn.Server):
    """The first SIGTERM / SIGINT drains (new requests get 503, open streams get DRAIN_GRACE_S to
    finish, then a final error event each) before uvicorn's own graceful exit; a second one exits now."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_task: asyncio.Task | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.loop is None or self.drain_task is not None or self.gateway.draining:
            super().handle_exit(sig, frame)
            return
        log.info("received %s: draining (grace %.1fs)", signal.Signals(sig).name, self.gateway.cfg.drain_grace_s)
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        async def drain() -> None:
            await self.gateway.drain(self.gateway.cfg.drain_grace_s)
            self.should_exit = True

        self.drain_task = asyncio.ensure_future(drain())


def main() -> None:
    cfg = ipc.become_child("gateway")
    # Bind the port ourselves before the app starts, so "ready" (sent from the app's startup) can only
    # be reported by a gateway that really owns its port.
    try:
        sock = listen_socket(cfg.host, cfg.port)
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", cfg.host, cfg.port, e)
        sys.exit(3)
    app = create_app(cfg)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    DrainingServer(config, app.state.gateway).run(sockets=[sock])


if __name__ == "__main__":
    main()
