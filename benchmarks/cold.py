"""Code right after a pause: the same Python runs slower when it follows an idle wait.

Two measurements, each back to back and then with a 20 ms sleep before every run (as a
leader's job and a waiting follower have): a pure-Python function (no dedupe), and dedupe's
leader path from the job's return to the complete script being written (stamped by wrapping
redis-py's ``send_packed_command``). Median µs of the runs after a warm-up.

``python -m benchmarks.cold [--runs N]``; starts its own redis-server.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import redis.connection as sconn

from dedupe import SingleFlight
from dedupe.backend import commands

PAUSE = 0.02


def _work() -> dict[int, bytes]:
    d = {}
    for i in range(300):
        d[i] = str(i).encode() * 3
    return d


def pure_python(runs: int, pause: float) -> float:
    took = []
    for _ in range(runs):
        if pause:
            time.sleep(pause)
        t0 = time.perf_counter_ns()
        _work()
        took.append(time.perf_counter_ns() - t0)
    return statistics.median(took[runs // 10 :]) / 1000


def leader_leg(url: str, runs: int, pause: float) -> float:
    sha = commands.COMPLETE.sha.encode()
    stamps: dict[str, int] = {}
    original = sconn.AbstractConnection.send_packed_command

    def stamped(self: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
        if sha in command[0][:80]:
            stamps["sent"] = time.perf_counter_ns()
        return original(self, command, *args, **kwargs)

    sconn.AbstractConnection.send_packed_command = stamped  # type: ignore[method-assign]
    sf = SingleFlight(url, prefix=f"cold:{pause}", lock_ttl=10, result_ttl=5)
    payload = b"x" * 64

    @sf(key="{i}")
    def job(i: int) -> bytes:
        if pause:
            time.sleep(pause)
        stamps["done"] = time.perf_counter_ns()
        return payload

    try:
        took = []
        for i in range(runs):
            job(i)
            took.append(stamps["sent"] - stamps["done"])
        return statistics.median(took[runs // 10 :]) / 1000
    finally:
        sf.close()
        sconn.AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cold", description=__doc__)
    ap.add_argument("--runs", type=int, default=300)
    ns = ap.parse_args(argv)
    from devtools.servers import RedisServer

    server = RedisServer().start()
    try:
        rows = [
            ("pure-Python function", pure_python(ns.runs, 0), pure_python(ns.runs, PAUSE)),
            (
                "dedupe: job's return → complete sent",
                leader_leg(server.url, ns.runs, 0),
                leader_leg(server.url, ns.runs, PAUSE),
            ),
        ]
    finally:
        server.stop()
    print(f"| code | back to back µs | after a {PAUSE * 1000:.0f} ms sleep µs | ratio |")
    print("| --- | --- | --- | --- |")
    for name, hot, cold in rows:
        print(f"| {name} | {hot:.1f} | {cold:.1f} | {cold / hot:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
