"""The six scenarios of issue 5. Each returns plain data for the report.

Within a scenario, repeat ``r`` runs every tool once, in an order rotated by ``r``; a ratio is
taken within a repeat (its runs are interleaved in time) and the report gives the median of
the per-repeat figures with their min-max spread.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from . import counting
from .pool import WorkerPool
from .tools import OVERHEAD_ASYNC, OVERHEAD_SYNC

JOB_S = 0.020
PAYLOAD = 1024


@dataclass
class Params:
    quick: bool
    repeats: int = 5
    overhead_calls: int = 1000
    wake_flights: int = 40
    wake_flights_slow: int = 12  # polling peers: ~0.3 s per flight
    wake_hold: float = 0.020
    wake_delay: float = 0.005
    stampede_keys: int = 50
    stampede_keys_slow: int = 5  # polling peers take 1-2 s per key
    procs: int = 4
    threads: int = 16
    tasks: int = 64
    steady_keys: int = 50
    throughput_seconds: float = 1.0
    memory_flights: int = 100_000
    slow_tools: tuple[str, ...] = ("redis-py Lock", "dogpile.cache")

    @classmethod
    def make(cls, quick: bool) -> Params:
        if not quick:
            return cls(quick=False)
        return cls(
            quick=True,
            overhead_calls=200,
            wake_flights=8,
            wake_flights_slow=3,
            stampede_keys=8,
            stampede_keys_slow=1,
            steady_keys=25,
            throughput_seconds=0.3,
            memory_flights=10_000,
        )


def _rotate(items: Sequence[Any], r: int) -> list[Any]:
    k = r % len(items)
    return list(items[k:]) + list(items[:k])


def _log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- 1. overhead


def overhead(url: str, p: Params) -> dict[str, Any]:
    """A no-op decorated function on a fresh key each call; acquire+release for the others."""
    out: dict[str, Any] = {"sync": {}, "async": {}, "commandstats": {}}
    n = p.overhead_calls
    counter = iter(range(10**12))

    sync_tools = [cls(url, f"b1s:{cls.__name__}") for cls in OVERHEAD_SYNC]
    try:
        for tool in sync_tools:  # warm: connections, scripts
            for _ in range(50):
                tool(next(counter))
        for r in range(p.repeats):
            for tool in _rotate(sync_tools, r):
                gc.collect()
                lat = []
                for _ in range(n):
                    i = next(counter)
                    t0 = time.perf_counter_ns()
                    tool(i)
                    lat.append(time.perf_counter_ns() - t0)
                out["sync"].setdefault(tool.name, []).append(lat)
        out["commandstats"]["sync"] = _leader_path(url, sync_tools[1], counter, is_async=False)
    finally:
        for tool in sync_tools:
            tool.close()

    async def run_async() -> None:
        tools = [cls(url, f"b1a:{cls.__name__}") for cls in OVERHEAD_ASYNC]
        for tool in tools:
            await tool.start()
        try:
            for tool in tools:
                for _ in range(50):
                    await tool(next(counter))
            for r in range(p.repeats):
                for tool in _rotate(tools, r):
                    gc.collect()
                    lat = []
                    for _ in range(n):
                        i = next(counter)
                        t0 = time.perf_counter_ns()
                        await tool(i)
                        lat.append(time.perf_counter_ns() - t0)
                    out["async"].setdefault(tool.name, []).append(lat)
            out["commandstats"]["async"] = await _leader_path_async(url, tools[1], counter)
        finally:
            for tool in tools:
                await tool.close()

    asyncio.run(run_async())
    return out


def _leader_path(url: str, tool: Any, counter: Any, *, is_async: bool) -> dict[str, Any]:
    n = 100
    admin = redis.Redis.from_url(url)
    counting.install()
    try:
        counting.reset_server_stats(admin)
        base = counting.value()
        for _ in range(n):
            tool(next(counter))
        sent = counting.value() - base
        stats = counting.server_commandstats(admin)
    finally:
        counting.uninstall()
        admin.close()
    return {"calls": n, "client": sent / n, "server": {k: v / n for k, v in stats.items()}}


async def _leader_path_async(url: str, tool: Any, counter: Any) -> dict[str, Any]:
    n = 100
    admin = redis.Redis.from_url(url)
    counting.install()
    try:
        counting.reset_server_stats(admin)
        base = counting.value()
        for _ in range(n):
            await tool(next(counter))
        sent = counting.value() - base
        stats = counting.server_commandstats(admin)
    finally:
        counting.uninstall()
        admin.close()
    return {"calls": n, "client": sent / n, "server": {k: v / n for k, v in stats.items()}}


# --------------------------------------------------------------------------- 2. wake latency

WAKE_TOOLS = [
    ("raw PUBLISH→receive", "sync"),
    ("dedupe", "sync"),
    ("dedupe", "async"),
    ("python-redis-lock", "sync"),
    ("redis-py Lock", "sync"),
    ("dogpile.cache", "sync"),
    ("cashews", "async"),
]
WAKE_FOLLOWERS = (1, 3)
RAW_WAKE = "raw PUBLISH→receive"


def wake(pool: WorkerPool, p: Params) -> dict[str, Any]:
    """Worker 0 leads; 1 or 3 followers (one per process) follow. Latency from the leader's
    job finishing to each follower's call returning; for the raw floor, from just before the
    PUBLISH to the moment a blocked subscriber thread in another process parsed it."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in range(p.repeats):
        for followers in WAKE_FOLLOWERS:
            # The peers only with 3 followers: the floor and dedupe with both.
            tools = [t for t in WAKE_TOOLS if followers == 3 or t[0] in (RAW_WAKE, "dedupe")]
            for tool, mode in _rotate(tools, r):
                label = tool if tool == RAW_WAKE else f"{tool} ({mode})"
                prefix = f"b2:{r}:{followers}:{tool}:{mode}".replace(" ", "_")
                flights = p.wake_flights_slow if tool in p.slow_tools else p.wake_flights
                task = {
                    "kind": "wake",
                    "tool": tool,
                    "mode": mode,
                    "prefix": prefix,
                    "keys": [f"k{i}" for i in range(flights)],
                    "job_s": p.wake_hold,
                    "hold": p.wake_hold,
                    "delay": p.wake_delay,
                    "payload": 64,
                    "threads": 1,
                    "tasks": 1,
                    "followers": followers,
                }
                res = pool.run(task)
                entry = out.setdefault(str(followers), {}).setdefault(
                    label, {"samples": [], "dropped": 0, "legs": []}
                )
                # The idle before the message goes out, after the key's barrier: the raw
                # publisher sleeps "hold", a leader's job "job_s"; the report checks they match
                # (a publish after a shorter idle is faster: issue 23).
                entry["idle_ms"] = 1000 * (task["hold"] if tool == RAW_WAKE else task["job_s"])
                samples, dropped, legs = _wake_samples(res)
                entry["samples"].append(samples)
                entry["dropped"] += dropped
                entry["legs"].append(legs)
        _log(f"  wake repeat {r + 1}/{p.repeats} done")
    return out


def _wake_samples(res: list[dict[str, Any]]) -> tuple[list[float], int, dict[str, list[float]]]:
    """Wake latencies (ms) of the followers, the dropped count, and the three legs (ms)."""
    done: dict[str, int] = {}
    complete: dict[str, int] = {}
    for w in res:
        for key, t in w["done_ns"].items():
            done.setdefault(key, t)
        complete.update(w.get("legs", {}).get("complete", {}))
    led = {key for w in res[1:] for key in w["done_ns"]}
    samples: list[float] = []
    legs: dict[str, list[float]] = {"job→complete": [], "complete→hub": [], "hub→return": []}
    dropped = 0
    for w in res[1:]:
        hub = w.get("legs", {}).get("hub", {})
        for key, t0, t1 in w["calls"]:
            td = done.get(key)
            if td is None or t1 < 0 or key in led or t0 > td:
                dropped += 1  # a follower led, came too late, or got nothing
                continue
            samples.append((t1 - td) / 1e6)
            tc, th = complete.get(key), hub.get(key)
            if tc is not None and th is not None:
                legs["job→complete"].append((tc - td) / 1e6)
                legs["complete→hub"].append((th - tc) / 1e6)
                legs["hub→return"].append((t1 - th) / 1e6)
    return samples, dropped, legs


# --------------------------------------------------------------------------- 3/4. stampede, steady

STAMPEDE_SYNC = [
    "dedupe",
    "python-redis-lock",
    "redis-py Lock",
    "dogpile.cache",
    "no lock (control)",
]
STAMPEDE_ASYNC = ["dedupe", "cashews", "no lock (control)"]
STEADY_SYNC = [
    "dedupe",
    "dedupe+local copy",
    "python-redis-lock",
    "redis-py Lock",
    "dogpile.cache",
    "no lock (control)",
]


def _cross_process(
    pool: WorkerPool,
    admin: redis.Redis,
    p: Params,
    kind: str,
    mode: str,
    tools: list[str],
    keys_for: Callable[[str], int],
) -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {}
    for r in range(p.repeats):
        for tool in _rotate(tools, r):
            nkeys = keys_for(tool)
            prefix = f"b:{kind}:{mode}:{r}:{tool}".replace(" ", "_")
            task = {
                "kind": kind,
                "tool": tool,
                "mode": mode,
                "prefix": prefix,
                "keys": [f"k{i}" for i in range(nkeys)],
                "job_s": JOB_S,
                "payload": PAYLOAD,
                "ttl": 120.0,  # result_ttl / cache TTL: covers the run
                "threads": p.threads,
                "tasks": p.tasks,
                "seed": r,
            }
            t0 = time.monotonic()
            res = pool.run(task, on_ready=lambda: counting.reset_server_stats(admin))
            wall = time.monotonic() - t0
            server = counting.server_commands(admin)
            breakdown = counting.server_commandstats(admin)
            lat = [x / 1e6 for w in res for x in w["lat_ns"]]
            starts = [w["spans"] for w in res]
            per_key_wall = []
            for i in range(len(starts[0])):
                s = min(sp[i][0] for sp in starts)
                e = max(sp[i][1] for sp in starts)
                per_key_wall.append((e - s) / 1e6)
            callers = p.procs * (p.threads if mode == "sync" else p.tasks)
            e = out.setdefault(
                tool,
                {
                    "lat": [],
                    "exec": [],
                    "server": [],
                    "client": [],
                    "wall_key": [],
                    "calls": [],
                    "cpu_key": [],
                    "after_job": [],
                },
            )
            if kind == "stampede":
                # From the (first) job's end to each caller's return: how fast callers learn.
                first_done: dict[str, int] = {}
                for w in res:
                    for key, t in w["done_ns"].items():
                        first_done[key] = min(t, first_done.get(key, t))
                e["after_job"].append(
                    [
                        (t1 - first_done[key]) / 1e6
                        for w in res
                        for key, t1 in w["ret_ns"]
                        if key in first_done
                    ]
                )
            e["cpu_key"].append(sum(w["cpu_s"] for w in res) * 1000 / nkeys)
            e["lat"].append(lat)
            e["exec"].append(sum(w["executions"] for w in res) / nkeys)
            e["server"].append(server / nkeys)
            e["client"].append(sum(w["client_cmds"] for w in res) / nkeys)
            e["wall_key"].append(sum(per_key_wall) / len(per_key_wall))
            e["calls"].append(len(lat))
            e["keys"] = nkeys
            e["callers"] = callers
            e["breakdown"] = {k: v / nkeys for k, v in breakdown.items()}
            e.setdefault("wrong", 0)
            e["wrong"] += sum(w["wrong"] for w in res)
            e.setdefault("errors", []).extend(x for w in res for x in w["errors"])
            e.setdefault("run_s", []).append(wall)
            admin.flushall()
        _log(
            f"  {kind} {mode} repeat {r + 1}/{p.repeats}: "
            + ", ".join(f"{t} {e['run_s'][-1]:.1f}s" for t, e in out.items())
        )
    return out


def stampede(pool: WorkerPool, url: str, p: Params) -> dict[str, Any]:
    admin = redis.Redis.from_url(url)
    try:

        def keys_for(tool: str) -> int:
            return p.stampede_keys_slow if tool in p.slow_tools else p.stampede_keys

        sync = _cross_process(pool, admin, p, "stampede", "sync", STAMPEDE_SYNC, keys_for)
        asy = _cross_process(pool, admin, p, "stampede", "async", STAMPEDE_ASYNC, keys_for)
    finally:
        admin.close()
    return {"sync": sync, "async": asy}


def steady(pool: WorkerPool, url: str, p: Params) -> dict[str, Any]:
    admin = redis.Redis.from_url(url)
    try:
        return _cross_process(
            pool, admin, p, "steady", "sync", STEADY_SYNC, lambda tool: p.steady_keys
        )
    finally:
        admin.close()


# --------------------------------------------------------------------------- 5. throughput


def throughput(url: str, p: Params) -> dict[str, Any]:
    """Distinct keys in one process: 8 threads (sync) and 100 tasks (async)."""
    out: dict[str, Any] = {"sync": {}, "async": {}}
    counter = iter(range(10**12))
    lock = threading.Lock()

    def next_i() -> int:
        with lock:
            return next(counter)

    sync_tools = [cls(url, f"b5s:{cls.__name__}") for cls in OVERHEAD_SYNC[:2]]
    try:
        for r in range(p.repeats + 1):  # the first round warms up (8 connections each)
            for tool in _rotate(sync_tools, r):
                rate = _sync_rate(tool, next_i, 8, p.throughput_seconds if r else 0.2)
                if r:
                    out["sync"].setdefault(tool.name, []).append(rate)
    finally:
        for tool in sync_tools:
            tool.close()

    async def run_async() -> None:
        tools = [cls(url, f"b5a:{cls.__name__}") for cls in OVERHEAD_ASYNC[:2]]
        for tool in tools:
            await tool.start()
        try:
            for r in range(p.repeats + 1):
                for tool in _rotate(tools, r):
                    rate = await _async_rate(tool, next_i, 100, p.throughput_seconds if r else 0.2)
                    if r:
                        out["async"].setdefault(tool.name, []).append(rate)
        finally:
            for tool in tools:
                await tool.close()

    asyncio.run(run_async())
    return out


def _sync_rate(tool: Any, next_i: Callable[[], int], threads: int, seconds: float) -> float:
    gc.collect()
    counts = [0] * threads
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def worker(t: int) -> None:
        start.wait(30)
        end = stop_at[0]
        n = 0
        while time.monotonic() < end:
            tool(next_i())
            n += 1
        counts[t] = n

    ts = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for t in ts:
        t.start()
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    start.wait(30)
    for t in ts:
        t.join(30 + seconds)
    return sum(counts) / (time.monotonic() - t0)


async def _async_rate(tool: Any, next_i: Callable[[], int], tasks: int, seconds: float) -> float:
    gc.collect()
    end = time.monotonic() + seconds

    async def worker() -> int:
        n = 0
        while time.monotonic() < end:
            await tool(next_i())
            n += 1
        return n

    t0 = time.monotonic()
    counts = await asyncio.gather(*(worker() for _ in range(tasks)))
    return sum(counts) / (time.monotonic() - t0)


# --------------------------------------------------------------------------- 6. memory


def memory(url: str, p: Params) -> dict[str, Any]:
    """100,000 flights in a fresh process; RSS growth and the in-process tables afterwards."""
    ctx = mp.get_context("spawn")
    q: Any = ctx.Queue()
    proc = ctx.Process(target=_memory_main, args=(url, p.memory_flights, q), daemon=True)
    proc.start()
    try:
        res: dict[str, Any] = q.get(timeout=600)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
    if "error" in res:
        raise RuntimeError(res["error"])
    return res


def _rss_kb() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _memory_main(url: str, flights: int, q: Any) -> None:
    import traceback

    try:
        q.put(asyncio.run(_memory_async(url, flights)))
    except BaseException:
        q.put({"error": traceback.format_exc()})


async def _memory_async(url: str, flights: int) -> dict[str, Any]:
    from dedupe import SingleFlight

    sf = SingleFlight(url, prefix="b6", result_ttl=0.0)

    @sf(key="{i}")
    async def job(i: int, hold: float) -> int:
        if hold:
            await asyncio.sleep(hold)
        return i

    @sf(key="{i}")
    def job_sync(i: int, hold: float) -> int:
        return i

    loop = asyncio.get_running_loop()
    counter = iter(range(10**12))
    contended = 0

    async def worker(n: int) -> None:
        nonlocal contended
        for _ in range(n):
            i = next(counter)
            if i % 50 == 0:
                # Every 50th flight also has a sync caller: it follows the async leader
                # through the pub/sub hub (the two tables are separate), so the hub's
                # subscribe/unsubscribe path is part of the run.
                f = loop.run_in_executor(None, job_sync, i, 0.0)
                await job(i, 0.005)
                await f
                contended += 1
            else:
                await job(i, 0.0)

    async def run(total: int) -> None:
        per, extra = divmod(total, 100)
        await asyncio.gather(*(worker(per + (1 if t < extra else 0)) for t in range(100)))

    await run(2000)  # warm-up: connections, hub, threads, allocator pools
    gc.collect()
    rss0 = _rss_kb()
    t0 = time.monotonic()
    contended = 0
    await run(flights)
    elapsed = time.monotonic() - t0
    backend = sf.backend()
    hub = backend.hub()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and hub.channels():
        await asyncio.sleep(0.05)  # unsubscribe acks still on their way
    gc.collect()
    rss1 = _rss_kb()
    res = {
        "flights": flights,
        "contended": contended,
        "seconds": elapsed,
        "rss_before_mb": rss0 / 1024,
        "rss_after_mb": rss1 / 1024,
        "growth_mb": (rss1 - rss0) / 1024,
        "sync_flights": len(backend.sync_flights),
        "async_flights": backend.stats()["flights_in_process"] - len(backend.sync_flights),
        "hub_channels": len(hub.channels()),
        "renewer_pending": backend.renewer().pending(),
    }
    client = backend.async_client()
    sf.close()
    await client.aclose()
    return res
