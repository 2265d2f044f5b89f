#!/usr/bin/env python3
"""Start the whole server from a checkout, installed or not: the same as `mini-sglang serve`.

    python launch.py                       # embedded SmolLM2-135M-Instruct on 127.0.0.1:8000
    python launch.py --backend hf          # the plain Hugging Face baseline, same gateway

The launcher itself is minisgl/launcher.py; `python launch.py --help` lists every flag.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from minisgl.launcher import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="launch.py"))
