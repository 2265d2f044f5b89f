"""Client side of the scheduler's ZMQ control channel (commands: metrics, warm, insert_prefix,
flush_cache, health). Requests and replies are msgspec Structs encoded as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import zmq

from minisgl.messages import ControlReply, ControlReq


def run_info_path(port: int) -> Path:
    """Where a running server on `port` records its endpoints (written by launch.py)."""
    root = Path(os.environ.get("MINISGL_CACHE_DIR", Path.home() / ".cache" / "mini-sglang"))
    return root / "run" / f"port-{port}.json"


def launcher_alive(pid: int) -> bool:
    """Whether pid is a running mini-sglang launcher (not a dead one, nor a reused pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours to judge
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): the pid exists, trust it
    return b"launch.py" in cmdline


def find_control_endpoint(port: int) -> str:
    path = run_info_path(port)
    if not path.exists():
        raise FileNotFoundError(f"no mini-sglang server on port {port} recorded at {path}; pass --endpoint")
    try:
        info = json.loads(path.read_text())
    except ValueError:
        info = {}
    if not launcher_alive(int(info.get("pid") or 0)):
        # Left by a launcher killed with SIGKILL: its sockets are gone, a call would only time out.
        path.unlink(missing_ok=True)
        raise FileNotFoundError(f"the server recorded at {path} (launcher pid {info.get('pid')}) is not running; "
                                "removed the stale file")
    if not info.get("control_endpoint"):
        raise FileNotFoundError(f"the server on port {port} runs without a control channel (ZMQ_CONTROL off)")
    return info["control_endpoint"]


class ControlClient:
    def __init__(self, endpoint: str, timeout_s: float = 10.0) -> None:
        self.endpoint, self.timeout_ms = endpoint, int(timeout_s * 1000)
        self.ctx = zmq.Context.instance()

    def call(self, command: str, prefixes: list[str] | None = None, token_ids: list[list[int]] | None = None) -> ControlReply:
        req = ControlReq(command=command, prefixes=prefixes or [], token_ids=token_ids or [])
        return self.call_raw(msgspec.json.encode(req))

    def call_raw(self, payload: bytes) -> ControlReply:
        """Send any bytes (tests send malformed frames this way) and decode the reply."""
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        try:
            sock.send(payload)
            if not sock.poll(self.timeout_ms):
                raise TimeoutError(f"no reply from {self.endpoint} within {self.timeout_ms} ms")
            return msgspec.json.decode(sock.recv(), type=ControlReply)
        finally:
            sock.close()
