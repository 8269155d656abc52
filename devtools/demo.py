"""``python -m devtools.demo`` (``make demo``): start a private redis-server, run examples/demo.py.

examples/demo.py runs against any Redis URL; this launcher gives it a throwaway server on a free
loopback port (never the system Redis), prints its address and stops it by PID afterwards.
Extra arguments are ignored; the exit code is the demo's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from devtools.servers import RedisServer

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


def main() -> int:
    with RedisServer() as server:
        print(f"redis-server {server.url} (pid {server.pid})\n", flush=True)
        # The demo bounds its own waits (about 15 s in all); 300 s is only a backstop.
        demo = subprocess.run([sys.executable, str(DEMO), server.url], check=False, timeout=300)
        return demo.returncode


if __name__ == "__main__":
    sys.exit(main())
