"""Batches (issue 22): the overlapping herd, dedupe's batch beside the peers, in one run.

``python -m benchmarks.batches [--quick] [--out FILE]`` starts a private redis-server and a
fleet of spawned processes. In each round every process asks at the same instant for a
random window of ``window`` consecutive ids out of ``ids`` (fresh keys each round, so every
round starts cold). The origin loads a list of ids in 20 ms + 0.2 ms per id and counts, in
each process, how often it loaded each id; the parent sums the counts over the fleet.

Figures per tool: origin loads per distinct id asked for (1.00 = each id loaded once
fleet-wide) and the worst id's count; round trips per batch call (every request written by
redis-py in the calling process while the call ran, counted by wrapping its connections, as
the main benchmarks count them: benchmarks/counting.py) and server commands per batch call
(``INFO commandstats`` after ``CONFIG RESETSTAT``, each command inside a script counted);
p50/p99 latency of the batch calls. Within a repeat every tool runs once, in an order
rotated by the repeat; each figure is the median over the repeats with the min-max spread.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis

from devtools.servers import RedisServer

from . import counting
from .fleet import Ctx, Fleet
from .stats import Spread, percentile, ratios

BASE_S = 0.020  # the origin's cost per load ...
PER_ID_S = 0.0002  # ... plus this per id loaded
LOCK_TTL_S = 10

TOOLS = (
    "dedupe batch",
    "dedupe per item (loop)",
    "dedupe per item (thread each)",
    "dogpile get_or_create_multi",
    "cashews @cache(lock=True) per item (gather)",
    "cashews get_many + set_many",
)


class Origin:
    """Loads a list of ids at once; counts the loads of each id (in this process)."""

    def __init__(self) -> None:
        self.loads: Counter[int] = Counter()
        self.calls = 0
        self._lock = threading.Lock()

    def _count(self, ids: list[int]) -> dict[int, bytes]:
        with self._lock:
            self.loads.update(ids)
            self.calls += 1
        return {i: b"user-%d" % i for i in ids}

    def load(self, ids: list[int]) -> dict[int, bytes]:
        time.sleep(BASE_S + PER_ID_S * len(ids))
        return self._count(list(ids))

    async def aload(self, ids: list[int]) -> dict[int, bytes]:
        await asyncio.sleep(BASE_S + PER_ID_S * len(ids))
        return self._count(list(ids))


# --------------------------------------------------------------------------- the tools
# Each is a factory: (url, prefix, origin, window) -> (get(round, ids), close), where
# get returns {id: value} for the ids asked for; async tools return coroutine functions.


def _dedupe(url: str, prefix: str, origin: Origin, window: int, how: str) -> Any:
    from dedupe import SingleFlight

    sf = SingleFlight(url, prefix=prefix, result_ttl=120.0, lock_ttl=LOCK_TTL_S)
    pool = ThreadPoolExecutor(window) if how == "thread" else None

    def one(i: int) -> bytes:
        return origin.load([i])[i]

    def get(rnd: int, ids: list[int]) -> dict[int, bytes]:
        if how == "batch":
            out: dict[int, bytes] = sf.call_batch(ids, origin.load, key=f"r{rnd}:user:{{item}}")
            return out
        if how == "loop":
            return {i: sf.call(f"r{rnd}:user:{i}", one, i) for i in ids}
        assert pool is not None
        futs = {i: pool.submit(sf.call, f"r{rnd}:user:{i}", one, i) for i in ids}
        return {i: f.result() for i, f in futs.items()}

    def close() -> None:
        if pool is not None:
            pool.shutdown()
        sf.close()

    return get, close


def _dogpile(url: str, prefix: str, origin: Origin, window: int) -> Any:
    from dogpile.cache import make_region

    region = make_region().configure(
        "dogpile.cache.redis",
        expiration_time=120,
        arguments={
            "url": url,
            "distributed_lock": True,  # as its docs recommend across processes
            "thread_local_lock": False,  # required with distributed_lock
            "lock_timeout": LOCK_TTL_S,
            "redis_expiration_time": 121,
        },
    )

    def get(rnd: int, ids: list[int]) -> dict[int, bytes]:
        keys = [f"{prefix}:r{rnd}:user:{i}" for i in ids]

        def creator(*missing: str) -> list[bytes]:
            want = [int(k.rsplit(":", 1)[1]) for k in missing]
            got = origin.load(want)
            return [got[i] for i in want]

        values = region.get_or_create_multi(keys, creator)
        return dict(zip(ids, values, strict=True))

    def close() -> None:
        backend: Any = region.backend
        backend.writer_client.close()

    return get, close


def _cashews(url: str, prefix: str, origin: Origin, window: int, how: str) -> Any:
    from cashews import Cache

    cache = Cache()
    cache.setup(url)

    @cache(ttl=120, key=prefix + ":r{rnd}:user:{i}", lock=True)
    async def one(rnd: int, i: int) -> bytes:
        return (await origin.aload([i]))[i]

    async def get(rnd: int, ids: list[int]) -> dict[int, bytes]:
        if how == "gather":
            values = await asyncio.gather(*(one(rnd, i) for i in ids))
            return dict(zip(ids, values, strict=True))
        # Cache-aside over many keys: one MGET, load what is missing in one call, one MSET.
        keys = [f"{prefix}:r{rnd}:m:{i}" for i in ids]
        cached = await cache.get_many(*keys)
        out = {i: v for i, v in zip(ids, cached, strict=True) if v is not None}
        missing = [i for i in ids if i not in out]
        if missing:
            loaded = await origin.aload(missing)
            await cache.set_many({f"{prefix}:r{rnd}:m:{i}": v for i, v in loaded.items()}, 120)
            out.update(loaded)
        return out

    async def close() -> None:
        await cache.close()

    return get, close, cache


def _make(tool: str, url: str, prefix: str, origin: Origin, window: int) -> Any:
    if tool == "dedupe batch":
        return _dedupe(url, prefix, origin, window, "batch")
    if tool == "dedupe per item (loop)":
        return _dedupe(url, prefix, origin, window, "loop")
    if tool == "dedupe per item (thread each)":
        return _dedupe(url, prefix, origin, window, "thread")
    if tool == "dogpile get_or_create_multi":
        return _dogpile(url, prefix, origin, window)
    if tool.startswith("cashews @cache"):
        return _cashews(url, prefix, origin, window, "gather")
    if tool == "cashews get_many + set_many":
        return _cashews(url, prefix, origin, window, "many")
    raise ValueError(tool)


# --------------------------------------------------------------------------- in a worker


def _check(tool: str, got: dict[int, bytes], ids: list[int]) -> None:
    wrong = [i for i in ids if got.get(i) != b"user-%d" % i]
    if wrong:
        raise RuntimeError(f"{tool}: {len(wrong)} of {len(ids)} ids missing or wrong")


def worker(ctx: Ctx, task: dict[str, Any]) -> dict[str, Any]:
    """One tool in this process: warm up, then one batch call per round, all at once."""
    tool, url, prefix, windows = task["tool"], task["url"], task["prefix"], task["windows"]
    origin = Origin()
    counting.install()
    made = _make(tool, url, prefix, origin, len(windows[0]))
    lat: list[float] = []
    trips: list[int] = []
    per_round: list[dict[int, int]] = []
    if tool.startswith("cashews"):
        get, close, cache = made

        async def run() -> None:
            await cache.init()
            await get(-1, [10**6 + ctx.index])  # warm: connections, scripts
            origin.loads.clear()
            ctx.go()
            for rnd, ids in enumerate(windows):
                if rnd:
                    ctx.sync()
                c0, t0 = counting.value(), time.perf_counter_ns()
                got = await get(rnd, ids)
                lat.append((time.perf_counter_ns() - t0) / 1e6)
                trips.append(counting.value() - c0)
                _check(tool, got, ids)
                per_round.append(dict(origin.loads))
                origin.loads.clear()
            await close()

        asyncio.run(run())
    else:
        get, close = made
        get(-1, [10**6 + ctx.index])
        origin.loads.clear()
        ctx.go()
        for rnd, ids in enumerate(windows):
            if rnd:
                ctx.sync()
            c0, t0 = counting.value(), time.perf_counter_ns()
            got = get(rnd, ids)
            lat.append((time.perf_counter_ns() - t0) / 1e6)
            trips.append(counting.value() - c0)
            _check(tool, got, ids)
            per_round.append(dict(origin.loads))  # every load of the round has returned
            origin.loads.clear()
        close()
    return {"loads": per_round, "lat": lat, "trips": trips}


# --------------------------------------------------------------------------- the parent


def windows_for(procs: int, rounds: int, ids: int, window: int, seed: int) -> list[list[list[int]]]:
    """Per process, per round: a random window of consecutive ids."""
    rng = random.Random(seed)
    out: list[list[list[int]]] = [[] for _ in range(procs)]
    for _ in range(rounds):
        for p in range(procs):
            start = rng.randrange(ids - window + 1)
            out[p].append(list(range(start, start + window)))
    return out


def run(
    procs: int, ids: int, window: int, rounds: int, repeats: int, tools: tuple[str, ...] = TOOLS
) -> dict[str, dict[str, list[float]]]:
    res: dict[str, dict[str, list[float]]] = {
        t: {"loads": [], "worst": [], "trips": [], "server": [], "p50": [], "p99": []}
        for t in tools
    }
    with RedisServer() as server, Fleet(procs) as fleet:
        admin = redis.Redis.from_url(server.url)
        try:
            for r in range(repeats):
                wins = windows_for(procs, rounds, ids, window, seed=r)
                order = list(tools[r % len(tools) :]) + list(tools[: r % len(tools)])
                for tool in order:
                    prefix = f"bb:{r}:{tools.index(tool)}"
                    tasks = [
                        {"tool": tool, "url": server.url, "prefix": prefix, "windows": wins[p]}
                        for p in range(procs)
                    ]
                    t0 = time.monotonic()
                    out = fleet.run(
                        "benchmarks.batches:worker",
                        tasks,
                        on_ready=lambda: counting.reset_server_stats(admin),
                    )
                    server_cmds = counting.server_commands(admin)
                    # Per round (each round's keys are fresh): loads summed over the fleet.
                    loads = [Counter[int]() for _ in range(rounds)]
                    for w in out:
                        for k, counts in enumerate(w["loads"]):
                            loads[k].update(counts)
                    distinct = sum(len({i for p in range(procs) for i in wins[p][k]})
                                   for k in range(rounds))  # fmt: skip
                    lat = [x for w in out for x in w["lat"]]
                    e = res[tool]
                    e["loads"].append(sum(sum(c.values()) for c in loads) / distinct)
                    e["worst"].append(max(max(c.values()) for c in loads))
                    e["trips"].append(sum(x for w in out for x in w["trips"]) / len(lat))
                    e["server"].append(server_cmds / len(lat))
                    e["p50"].append(percentile(lat, 50))
                    e["p99"].append(percentile(lat, 99))
                    admin.flushall()
                    print(f"  repeat {r + 1}/{repeats} {tool}: {time.monotonic() - t0:.1f}s",
                          flush=True)  # fmt: skip
        finally:
            admin.close()
    return res


def report(res: dict[str, dict[str, list[float]]], meta: dict[str, Any]) -> str:
    p = meta
    lines = [
        "# Batches: the overlapping herd (issue 22)",
        "",
        f"{p['date']} · python {p['python']} · redis-server {p['redis']} · redis-py "
        f"{p['redis-py']} · dedupe {p['dedupe']} · dogpile.cache {p['dogpile']} · cashews "
        f"{p['cashews']} · {p['cores']} cores (shared) · run time {p['elapsed']:.0f} s",
        "",
        f"{p['procs']} processes each ask at once for a random window of {p['window']} "
        f"consecutive ids out of {p['ids']}; {p['rounds']} rounds per run (fresh keys each "
        f"round), {p['repeats']} repeats, tools in rotated order within each repeat. The "
        f"origin loads a list of ids in {BASE_S * 1000:.0f} ms + {PER_ID_S * 1000:.1f} ms per "
        "id. Figures: median over the repeats (min-max).",
        "",
        "| tool | origin loads per id | worst id's loads | round trips per batch | "
        "server cmds per batch | p50 ms | p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for tool, e in res.items():
        lines.append(
            f"| {tool} | {Spread.of(e['loads']).fmt(2)} | {Spread.of(e['worst']).fmt(0)} | "
            f"{Spread.of(e['trips']).fmt(1)} | {Spread.of(e['server']).fmt(1)} | "
            f"{Spread.of(e['p50']).fmt(0)} | {Spread.of(e['p99']).fmt(0)} |"
        )
    ours = res.get("dedupe batch")
    if ours:
        lines += [
            "",
            "dedupe batch against each other form, ratios taken within each repeat (median, "
            "min-max); issue 22's target: loads per id 1.00 where every peer loads more, "
            "latency ≤ 0.5x the best peer's:",
            "",
            "| against | p50 ratio | p99 ratio | its loads per id |",
            "| --- | --- | --- | --- |",
        ]
        for tool, e in res.items():
            if tool != "dedupe batch":
                lines.append(
                    f"| {tool} | {ratios(ours['p50'], e['p50']).ratio()} | "
                    f"{ratios(ours['p99'], e['p99']).ratio()} | {Spread.of(e['loads']).fmt(2)} |"
                )
    lines += [
        "",
        "*Origin loads per id*: loads summed over the fleet / distinct ids asked for in the "
        "round (1.00: every id loaded once fleet-wide). *Worst id*: the most loads of one id "
        "in a round. *Round trips*: requests written by redis-py in the calling process "
        "while its batch call ran (every thread; pub/sub SUBSCRIBE/UNSUBSCRIBE included; "
        "handshakes not). *Server cmds*: `INFO commandstats` over the run / batch calls, each "
        "`redis.call` inside a script counted. *p50/p99*: of the batch calls "
        f"({p['procs'] * p['rounds']} per repeat), from the call to its dict. "
        "The per-item forms call `sf.call` (dedupe) or a `@cache(lock=True)` function "
        "(cashews) once per id; cashews has no get-or-set over many keys, so its "
        "`get_many`/`set_many` form is cache-aside without a lock.",
        "",
    ]
    return "\n".join(lines)


def _meta(server_ver: str, **kw: Any) -> dict[str, Any]:
    import importlib.metadata as md
    import platform

    def v(d: str) -> str:
        try:
            return md.version(d)
        except md.PackageNotFoundError:
            return "-"

    import os

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "redis": server_ver,
        "redis-py": v("redis"),
        "dedupe": v("redis-single-flight"),
        "dogpile": v("dogpile.cache"),
        "cashews": v("cashews"),
        "cores": os.cpu_count(),
        **kw,
    }


def redis_version() -> str:
    import subprocess

    out = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    return next((w.split("=")[1] for w in out.split() if w.startswith("v=")), "?")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.batches", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a small fleet and one repeat")
    ap.add_argument("--procs", type=int, default=None)
    ap.add_argument("--ids", type=int, default=None)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    ns = ap.parse_args(argv)
    size: dict[str, int] = (
        {"procs": 3, "ids": 60, "window": 20, "rounds": 1, "repeats": 1}
        if ns.quick
        else {"procs": 8, "ids": 300, "window": 100, "rounds": 3, "repeats": 3}
    )
    for k in size:
        if getattr(ns, k) is not None:
            size[k] = getattr(ns, k)
    tools = tuple(t.strip() for t in ns.tools.split(",") if t.strip())
    unknown = set(tools) - set(TOOLS)
    if unknown:
        ap.error(f"unknown tools: {', '.join(sorted(unknown))}")
    t0 = time.monotonic()
    res = run(tools=tools, **size)
    text = report(res, _meta(redis_version(), elapsed=time.monotonic() - t0, **size))
    print(text)
    if ns.out is not None:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
