"""`python -m minisgl serve ...`: the same as the `mini-sglang` command."""

import sys

from minisgl.cli import main

sys.exit(main())
