"""Send a control command to a running server's scheduler.

    python -m tools.ctl metrics                       # server on port 8000
    python -m tools.ctl --port 8123 health
    python -m tools.ctl warm "You are a helpful assistant."
    python -m tools.ctl insert_prefix "System prompt shared by many requests"
    python -m tools.ctl flush_cache
    python -m tools.ctl --endpoint ipc:///tmp/minisgl-x/control.sock metrics
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minisgl.control import ControlClient, find_control_endpoint  # noqa: E402

COMMANDS = ["metrics", "health", "warm", "insert_prefix", "flush_cache"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools.ctl", description=__doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    sys.exit(main())
