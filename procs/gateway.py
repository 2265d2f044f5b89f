"""Gateway process: the Starlette app (minisgl/gateway/app.py) under uvicorn."""

from __future__ import annotations

import logging
import socket
import sys

import uvicorn

from minisgl import ipc
from minisgl.gateway.app import create_app

log = logging.getLogger("minisgl.gateway")


def main() -> None:
    cfg = ipc.become_child("gateway")
    # Bind the port ourselves before the app starts, so "ready" (sent from the app's startup) can only
    # be reported by a gateway that really owns its port.
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", cfg.host, cfg.port, e)
        sys.exit(3)
    app = create_app(cfg)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    # uvicorn installs its own SIGTERM handler and shuts down gracefully.
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
