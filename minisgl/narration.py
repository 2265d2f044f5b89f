"""--narrate lines of every process, also sent to the gateway for the dashboard's live feed.

A logging handler on the `minisgl` loggers: each record becomes one Narration message to the gateway's
PULL socket (the lines are per engine step, per dispatch or per streamed chunk, and narration is a
teaching mode, so one small message per line is fine). Installed only when --narrate is on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import zmq

from minisgl import ipc
from minisgl.config import ServerConfig
from minisgl.messages import Narration


class _Relay(logging.Handler):
    def __init__(self, sink: Callable[[str], None]) -> None:
        super().__init__(level=logging.INFO)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:  # called under the handler's lock
        try:
            self.sink(record.getMessage())
        except Exception:  # noqa: BLE001 - narration must never break serving
            self.handleError(record)


def relay_to_gateway(cfg: ServerConfig, source: str) -> None:
    """In a child process: forward its minisgl log lines to the gateway, when narrating."""
    if not cfg.narrate:
        return
    sock = ipc.connect_push(zmq.Context.instance(), cfg.endpoint("gateway"))
    sock.setsockopt(zmq.LINGER, 0)
    logging.getLogger("minisgl").addHandler(_Relay(lambda line: ipc.send(sock, Narration(source, [line]))))


def relay_local(cfg: ServerConfig, sink: Callable[[str, list[str]], None]) -> None:
    """In the gateway itself: its own lines go straight to the feed."""
    if cfg.narrate:
        logging.getLogger("minisgl").addHandler(_Relay(lambda line: sink("gateway", [line])))
