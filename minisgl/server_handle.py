"""Start and stop a whole server tree (launch.py) from Python: used by tests, the bench and the CLI demo."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerHandle:
    """`with ServerHandle(["--backend", "hf"]) as server: httpx.get(server.url + "/health")`.

    Starts `python launch.py --port <free> ARGS` in its own process group, waits until /health answers
    200, and on exit sends SIGTERM (then SIGKILL) to the launcher, which tears its tree down.
    """

    def __init__(self, args: list[str] | None = None, env: dict[str, str] | None = None,
                 port: int | None = None, startup_timeout: float = 300.0, log_path: str | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = list(args or [])
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file = None

    def start(self) -> "ServerHandle":
        if self.proc is not None and self.proc.poll() is None:
            return self  # already running: never start a second tree
        cmd = [sys.executable, str(REPO_ROOT / "launch.py"), "--host", "127.0.0.1", "--port", str(self.port),
               "--exit-with-parent", *self.args]
        out = None
        if self.log_path:
            self._log_file = open(self.log_path, "ab")
            out = self._log_file
        # Own process group: a Ctrl-C meant for the caller (e.g. the CLI demo) does not reach the server;
        # stop() ends it in order.
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=self.env, stdout=out,
                                     stderr=subprocess.STDOUT if out else None, process_group=0)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited during start-up with code {self.proc.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server did not become healthy within {self.startup_timeout}s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_file:
            self._log_file.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerHandle":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
