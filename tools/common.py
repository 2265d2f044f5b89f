"""Bits shared by the CLI tools: narration lines, and starting a server whose log goes somewhere useful."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from minisgl.server_handle import ServerHandle


def narrator(prefix: str, enabled: bool = True) -> Callable[[str], None]:
    """Narration goes to stderr, so stdout carries only the model's text (and a pipe stays clean)."""

    def say(message: str) -> None:
        if enabled:
            print(f"[{prefix}] {message}", file=sys.stderr, flush=True)

    return say


def server_log_path(arg: str | None, tool: str) -> str | None:
    """'-' shows the server's own log inline (our stdout); a path or nothing writes it to a file."""
    if arg == "-":
        return None
    if arg:
        return arg
    return str(Path(tempfile.mkdtemp(prefix=f"minisgl-{tool}-")) / "server.log")


def start_server(server_args: list[str], log_path: str | None, say: Callable[[str], None],
                 timeout: float) -> ServerHandle:
    """Start launch.py with --narrate (so the server logs each prefill and decode step) and wait for it."""
    args = ["--narrate", *server_args]
    say(f"starting a server: launch.py {' '.join(args)}" + (f" (its log: {log_path})" if log_path else ""))
    t0 = time.perf_counter()
    handle = ServerHandle(args, log_path=log_path, startup_timeout=timeout).start()
    say(f"server healthy at {handle.url} after {time.perf_counter() - t0:.1f} s")
    return handle


def tail(path: str | None, lines: int = 30) -> str:
    if not path:
        return ""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
