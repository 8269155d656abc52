"""The hit (issue 23, target 2): a call served a fresh kept value, against a raw ``GET``.

Three measures, each in this process on one hot key (its instructions are in the callgrind
scenario, which runs each tool in its own process under valgrind):

* **Server time** of a hit against a ``GET``'s: per case and repeat, ``CONFIG RESETSTAT``,
  then N calls while :func:`counting.record_names` notes every command the client writes;
  then the sum of ``INFO commandstats`` ``usec`` over exactly those commands (whatever they
  are: a script, plain reads, a pipeline), over N. A script's ``usec`` covers the commands it
  runs, which are not added again. The hit runs sync; its async twin sends the same commands.
* **Round trips** per call (writes of a request, counted by wrapping redis-py's
  ``send_packed_command`` and the asyncio stream writes): a ``local_cache=True`` hit needs none.
* **Throughput** on one hot key from one process: 8 threads (sync) and 100 asyncio tasks,
  dedupe's hit against a raw ``GET`` through redis-py's client API, for ``seconds`` a run.

Every repeat runs each case once, in an order rotated by the repeat; ratios are per repeat.

``python -m benchmarks.hit [--quick]`` starts its own redis-server and prints the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import threading
import uuid
from typing import Any

import redis

from . import counting
from .scenarios import Params, _async_rate, _rotate, _sync_rate
from .tools import DedupeCopyHit, DedupeHit, DedupeHitAsync, RawGetAsync, RawGetSync

SERVER_CASES = ("raw GET", "dedupe hit")
TRIP_CASES = ("raw GET", "dedupe hit", "dedupe local copy hit")
WARM = 50  # calls before any measured ones: connections, scripts, the first flight


def _tools(url: str, run: str) -> dict[str, Any]:
    return {
        "raw GET": RawGetSync(url, f"bh:{run}:get"),
        "dedupe hit": DedupeHit(url, f"bh:{run}:hit"),
        "dedupe local copy hit": DedupeCopyHit(url, f"bh:{run}:copy"),
    }


def server_and_trips(url: str, calls: int, repeats: int) -> dict[str, Any]:
    """Server µs per call of each SERVER_CASES case, round trips per call of TRIP_CASES."""
    admin = redis.Redis.from_url(url)
    tools = _tools(url, uuid.uuid4().hex[:8])
    usec: dict[str, list[float]] = {c: [] for c in SERVER_CASES}
    per_cmd: dict[str, dict[str, float]] = {}
    trips: dict[str, list[float]] = {c: [] for c in TRIP_CASES}
    counting.install()
    try:
        for tool in tools.values():
            for i in range(WARM):
                tool(i)
        for r in range(repeats):
            for case in _rotate(TRIP_CASES, r):
                tool = tools[case]
                counting.reset_server_stats(admin)
                base = counting.value()
                with counting.record_names() as sent:
                    for i in range(calls):
                        tool(i)
                trips[case].append((counting.value() - base) / calls)
                if case in usec:
                    total, per = counting.server_usec(admin, sent)
                    usec[case].append(total / calls)
                    per_cmd[case] = {k: v / calls for k, v in per.items()}  # the last repeat
    finally:
        counting.uninstall()
        for tool in tools.values():
            tool.close()
        admin.close()
    return {"calls": calls, "usec": usec, "per_command": per_cmd, "trips": trips}


def hot_throughput(url: str, p: Params) -> dict[str, dict[str, list[float]]]:
    """Calls per second on one hot key: 8 threads (sync), 100 asyncio tasks (async)."""
    out: dict[str, dict[str, list[float]]] = {"sync": {}, "async": {}}
    counter = iter(range(10**12))
    lock = threading.Lock()

    def next_i() -> int:
        with lock:  # the calls ignore it; _sync_rate's signature wants it
            return next(counter)

    run = uuid.uuid4().hex[:8]
    sync = {"raw GET": RawGetSync(url, f"bt:{run}:get"), "dedupe hit": DedupeHit(url, f"bt:{run}")}
    try:
        for r in range(p.repeats + 1):  # the first round warms up (8 connections each)
            for name in _rotate(list(sync), r):
                rate = _sync_rate(sync[name], next_i, 8, p.throughput_seconds if r else 0.2)
                if r:
                    out["sync"].setdefault(name, []).append(rate)
    finally:
        for tool in sync.values():
            tool.close()

    async def run_async() -> None:
        tools = {
            "raw GET": RawGetAsync(url, f"bt:{run}:aget"),
            "dedupe hit": DedupeHitAsync(url, f"bt:{run}:a"),
        }
        for tool in tools.values():
            await tool.start()
        try:
            for r in range(p.repeats + 1):
                for name in _rotate(list(tools), r):
                    secs = p.throughput_seconds if r else 0.2
                    rate = await _async_rate(tools[name], next_i, 100, secs)
                    if r:
                        out["async"].setdefault(name, []).append(rate)
        finally:
            for tool in tools.values():
                await tool.close()

    asyncio.run(run_async())
    return out


def hot_trips(url: str, seconds: float = 0.3) -> dict[str, dict[str, float]]:
    """Round trips per call in a short counted run of each hot-key case, apart from the timed
    runs (counting costs a little): concurrent dedupe callers may share one call."""
    out: dict[str, dict[str, float]] = {"sync": {}, "async": {}}
    run = uuid.uuid4().hex[:8]
    counter = itertools.count()
    counting.install()
    try:
        for name, tool in (
            ("raw GET", RawGetSync(url, f"bc:{run}:get")),
            ("dedupe hit", DedupeHit(url, f"bc:{run}")),
        ):
            try:
                _sync_rate(tool, counter.__next__, 8, 0.1)  # warm: 8 connections
                calls = itertools.count()

                def counted(i: int, tool: Any = tool, calls: Any = calls) -> None:
                    next(calls)  # atomic under the GIL
                    tool(i)

                base = counting.value()
                _sync_rate(counted, counter.__next__, 8, seconds)
                out["sync"][name] = (counting.value() - base) / max(1, next(calls))
            finally:
                tool.close()

        async def run_async() -> None:
            for name, tool in (
                ("raw GET", RawGetAsync(url, f"bc:{run}:aget")),
                ("dedupe hit", DedupeHitAsync(url, f"bc:{run}:a")),
            ):
                await tool.start()
                try:
                    await _async_rate(tool, counter.__next__, 100, 0.1)
                    calls = itertools.count()

                    async def counted(i: int, tool: Any = tool, calls: Any = calls) -> None:
                        next(calls)
                        await tool(i)

                    base = counting.value()
                    await _async_rate(counted, counter.__next__, 100, seconds)
                    out["async"][name] = (counting.value() - base) / max(1, next(calls))
                finally:
                    await tool.close()

        asyncio.run(run_async())
    finally:
        counting.uninstall()
    return out


def scenario(url: str, p: Params) -> dict[str, Any]:
    """The `make bench` scenario: server time and round trips, then hot-key throughput."""
    res = server_and_trips(url, calls=1000 if p.quick else 5000, repeats=p.repeats)
    res["throughput"] = hot_throughput(url, p)
    res["throughput_trips"] = hot_trips(url)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hit", description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ns = ap.parse_args(argv)
    from devtools.servers import RedisServer

    server = RedisServer().start()
    try:
        res = scenario(server.url, Params.make(ns.quick))
    finally:
        server.stop()
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
