"""Client side of the scheduler's ZMQ control channel (commands: metrics, warm, insert_prefix,
flush_cache, health). Requests and replies are msgspec Structs encoded as JSON. `main` is the command
line (`mini-sglang ctl`, `python -m tools.ctl`):

    mini-sglang ctl metrics                       # server on port 8000
    mini-sglang ctl --port 8123 health
    mini-sglang ctl warm "You are a helpful assistant."
    mini-sglang ctl insert_prefix "System prompt shared by many requests"
    mini-sglang ctl flush_cache
    mini-sglang ctl --endpoint ipc:///tmp/minisgl-x/control.sock metrics
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import msgspec
import zmq

from minisgl.messages import ControlReply, ControlReq


def run_info_path(port: int) -> Path:
    """Where a running server on `port` records its endpoints (written by the launcher)."""
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
    # launch.py, `mini-sglang serve`, `python -m minisgl serve` (arguments are NUL-separated)
    return any(mark in cmdline for mark in (b"launch.py", b"mini-sglang\0serve", b"minisgl\0serve"))


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


COMMANDS = ["metrics", "health", "warm", "insert_prefix", "flush_cache"]


def main(argv: list[str] | None = None, prog: str = "mini-sglang ctl") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Send a control command to a running server's scheduler.")
    parser.add_argument("command", help=" | ".join(COMMANDS))
    parser.add_argument("prefixes", nargs="*", help="text prefixes for warm / insert_prefix")
    parser.add_argument("--endpoint", default=os.environ.get("ZMQ_CONTROL_ENDPOINT") or None,
                        help="control endpoint [env ZMQ_CONTROL_ENDPOINT]; default: look up the server on --port")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    try:
        endpoint = args.endpoint or find_control_endpoint(args.port)
        reply = ControlClient(endpoint, args.timeout).call(args.command, prefixes=args.prefixes)
    except (FileNotFoundError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"ok": reply.ok, "error": reply.error, "data": reply.data}, indent=2))
    return 0 if reply.ok else 1
