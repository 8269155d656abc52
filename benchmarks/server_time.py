"""Server time of the flight's scripts, from Redis's own ``INFO commandstats``.

Redis times every command it executes (``usec_per_call``, the script's whole run for
EVALSHA). Each case runs alone after ``CONFIG RESETSTAT``: N fresh keys, one command each,
so the figure is that command's server time and nothing else's. The cases: the raw lease's
two steps (SET NX PX, and its release-and-publish script), and dedupe's acquire and complete
scripts on the uncontended path (a fresh key: nothing stored, no lease; the complete stores
a 100-byte record and publishes it). Median of the repeats, min-max in brackets.

``python -m benchmarks.server_time [--calls N] [--repeats R]``; starts its own redis-server.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import uuid
from typing import Any

import redis

from dedupe.commands import ACQUIRE, COMPLETE, Script

from .tools import RELEASE_AND_PUBLISH

CASES = ("SET NX PX", "raw release + PUBLISH", "dedupe acquire", "dedupe complete")


def _usec(client: redis.Redis, command: str) -> float:
    stats: Any = client.info("commandstats")
    return float(stats[f"cmdstat_{command}"]["usec_per_call"])


def _case(client: redis.Redis, case: str, n: int, release_sha: str) -> float:
    run = uuid.uuid4().hex[:8]
    owner = "bench/1/1/x.1"
    record = b"1:1000:1000:" + b"x" * 88
    if case == "dedupe complete":  # leases to complete, taken before the stats reset
        tokens = [
            int(client.evalsha(ACQUIRE.sha, 3, *_keys(run, i), owner, 10_000, 60_000, ""))
            for i in range(n)
        ]
    client.config_resetstat()
    for i in range(n):
        lock, token, result = _keys(run, i)
        if case == "SET NX PX":
            client.set(lock, "1:me", nx=True, px=10_000)
        elif case == "raw release + PUBLISH":
            client.evalsha(release_sha, 1, lock, "1:me", lock[:-5], b"x" * 100)
        elif case == "dedupe acquire":
            client.evalsha(ACQUIRE.sha, 3, lock, token, result, owner, 10_000, 60_000, "")
        else:
            value = f"{tokens[i]}:{owner}"
            client.evalsha(COMPLETE.sha, 3, lock, result, token, value, record, 60_000, "")
    return _usec(client, "set" if case == "SET NX PX" else "evalsha")


def _keys(run: str, i: int) -> tuple[str, str, str]:
    base = f"st:{run}:{{{i}}}"
    return f"{base}:lock", f"{base}:token", f"{base}:result"


def measure(url: str, calls: int = 5000, repeats: int = 5) -> dict[str, list[float]]:
    client = redis.Redis.from_url(url)
    try:
        release_sha = client.script_load(RELEASE_AND_PUBLISH)
        script: Script
        for script in (ACQUIRE, COMPLETE):
            client.script_load(script.lua)
        out: dict[str, list[float]] = {c: [] for c in CASES}
        for _ in range(repeats):
            for case in CASES:  # interleaved: each repeat runs every case once
                out[case].append(_case(client, case, calls, release_sha))
        return out
    finally:
        client.close()


def report(res: dict[str, list[float]]) -> list[str]:
    def med(case: str) -> float:
        return statistics.median(res[case])

    rows = ["| case | server µs per call | vs SET NX PX |", "| --- | --- | --- |"]
    for case in CASES:
        values = res[case]
        rows.append(
            f"| {case} | {med(case):.1f} ({min(values):.1f}-{max(values):.1f}) "
            f"| {med(case) / med('SET NX PX'):.1f}x |"
        )
    return rows


def scenario(url: str, quick: bool) -> dict[str, Any]:
    res = measure(url, calls=1000 if quick else 5000, repeats=3 if quick else 5)
    return {"usec": res}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.server_time", description=__doc__)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=5)
    ns = ap.parse_args(argv)
    from devtools.servers import RedisServer

    server = RedisServer().start()
    try:
        res = measure(server.url, ns.calls, ns.repeats)
    finally:
        server.stop()
    print("\n".join(report(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
