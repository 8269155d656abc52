"""``python -m dedupe``: the command line of dedupe.ops.cli."""

from __future__ import annotations

import sys

from dedupe.ops.cli import main

if __name__ == "__main__":
    sys.exit(main())
