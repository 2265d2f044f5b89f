"""The `mini-sglang` command (also `python -m minisgl`), in the ecosystem's habit (`vllm serve`):

    mini-sglang serve [FLAGS]       start the server tree (minisgl/launcher.py; --help lists the flags)
    mini-sglang ctl COMMAND ...     a running server's control channel (minisgl/control.py)

Benchmarks are not a subcommand: they live in the repository's bench/, which the package does not ship.
"""

from __future__ import annotations

import sys

USAGE = __doc__.split("\n\n")[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "serve":
        from minisgl.launcher import main as serve

        return serve(rest, prog="mini-sglang serve")
    if command == "ctl":
        from minisgl.control import main as ctl

        return ctl(rest, prog="mini-sglang ctl")
    print(f"usage:\n{USAGE}", file=sys.stdout if command in ("-h", "--help") else sys.stderr)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
