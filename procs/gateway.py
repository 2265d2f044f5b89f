"""Gateway process: the Starlette app (minisgl/gateway/app.py) under uvicorn."""

from __future__ import annotations

import uvicorn

from minisgl import ipc
from minisgl.gateway.app import create_app


def main() -> None:
    cfg = ipc.become_child("gateway")
    app = create_app(cfg)
    # uvicorn installs its own SIGINT/SIGTERM handlers and shuts down gracefully on SIGTERM.
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=2)


if __name__ == "__main__":
    main()
