"""Gateway process: the Starlette app (minisgl/gateway/app.py) under uvicorn."""

from __future__ import annotations

import logging
import socket
import sys

import uvicorn

from minisgl import ipc
from minisgl.gateway.app import create_app

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
    # uvicorn installs its own SIGTERM handler and shuts down gracefully.
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
