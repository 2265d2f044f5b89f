"""Send a control command to a running server's scheduler: the same as `mini-sglang ctl`.

    python -m tools.ctl metrics                       # server on port 8000
    python -m tools.ctl --port 8123 health
    python -m tools.ctl warm "You are a helpful assistant."
    python -m tools.ctl insert_prefix "System prompt shared by many requests"
    python -m tools.ctl flush_cache
    python -m tools.ctl --endpoint ipc:///tmp/minisgl-x/control.sock metrics
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minisgl.control import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="tools.ctl"))
