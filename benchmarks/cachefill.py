"""Cache fill (issue 20): a hot key at expiry, and a failing origin, dedupe beside the peers.

``python -m benchmarks.cachefill [--quick] [--out FILE]`` starts a private redis-server and a
fleet of spawned processes, each with ``threads`` callers (threads; asyncio tasks for
cashews) that call one hot key in a loop, ``think`` ms apart, for ``seconds``. The function
takes ``job`` ms and returns the instant it finished (``time.monotonic_ns()``, one clock for
every process on Linux), so each call knows which run produced its value.

1. Expiry under load: the value is fresh for ``ttl`` s. A call *waited for a refill* if the
   value it got was produced while it was in the call. Reported: the mean time between
   origin runs (one refill per expiry: ttl + job and a little), runs that started while
   the last value was still fresh, waited calls per origin run, their p99 wait, the p99 of
   the calls that did not wait, of the calls in the 100 ms after an expiry, and every
   call's p50/p99/max.
2. Failing origin: the same load; ``lead`` s in, the origin raises (after its ``job`` ms)
   for ``outage`` s, then recovers. Reported over the outage: calls that got the error,
   calls served a stale value (older than ``ttl``), origin calls started in it, and p99.

Every tool gets the same workload, keys fresh per run; within a repeat every tool runs once,
in an order rotated by the repeat; figures are the median over repeats (min-max).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from devtools.servers import RedisServer

from .batches import _meta, redis_version
from .fleet import Ctx, Fleet
from .stats import Spread, percentile, ratios

STALE_S = 5.0  # how long past freshness a stale value may be served (all tools alike)
FAIL_KEEP_S = 30.0  # how long a last good value is kept for failures (all tools alike)
BACKOFF_S = 1.0  # dedupe's error_backoff
AFTER_EXPIRY_S = 0.1  # "right after an expiry": calls that start this soon after one

EXPIRY_TOOLS = (
    "dedupe",
    "dedupe stale_while_revalidate",
    "dedupe early_refresh=1",
    "cashews lock=True",
    "cashews early (early_ttl)",
    "dogpile",
    "dogpile async_creation_runner",
)
OUTAGE_TOOLS = (
    "dedupe",
    "dedupe stale_if_error",
    "dedupe swr + stale_if_error",
    "cashews failover + lock=True",
    "dogpile",
    "dogpile async_creation_runner",
)


class OriginDown(RuntimeError):
    pass


class Origin:
    """The hot key's function: ``job_s`` of work, then the instant it finished; raises in the
    outage window (decided by when the run started). Records every run's start."""

    def __init__(self, job_s: float, outage: tuple[int, int] | None) -> None:
        self.job_s, self.outage = job_s, outage
        self.starts: list[int] = []
        self.runs: list[tuple[int, int]] = []  # (start, end) of each run that has ended
        self._lock = threading.Lock()

    def _begin(self) -> int:
        t = time.monotonic_ns()
        with self._lock:
            self.starts.append(t)
        return t

    def _end(self, t: int) -> bytes:
        end = time.monotonic_ns()
        with self._lock:
            self.runs.append((t, end))
        if self.outage is not None and self.outage[0] <= t < self.outage[1]:
            raise OriginDown("origin down")
        return b"%d" % end

    def __call__(self) -> bytes:
        t = self._begin()
        time.sleep(self.job_s)
        return self._end(t)

    async def acall(self) -> bytes:
        t = self._begin()
        await asyncio.sleep(self.job_s)
        return self._end(t)


# --------------------------------------------------------------------------- the tools
# A factory: (url, prefix, origin, ttl) -> (get, close); get() returns the value (a
# coroutine function for cashews, whose close is a coroutine too).


def _dedupe(url: str, prefix: str, origin: Origin, ttl: float, opts: dict[str, float]) -> Any:
    from dedupe import SingleFlight

    sf = SingleFlight(url, prefix=prefix, result_ttl=ttl, lock_ttl=10.0)

    def hot() -> bytes:
        return origin()

    get = sf(key="hot", **opts)(hot)  # type: ignore[call-overload]
    return get, lambda: sf.close(timeout=2)


def _dogpile(url: str, prefix: str, origin: Origin, ttl: float, runner: bool) -> Any:
    from dogpile.cache import make_region

    def async_creation_runner(cache: Any, key: str, creator: Any, mutex: Any) -> None:
        # dogpile's documented recipe: refresh in a thread, release the mutex when done.
        def refresh() -> None:
            try:
                cache.set(key, creator())
            except Exception:
                pass  # the old value stays; the next caller past expiry tries again
            finally:
                mutex.release()

        threading.Thread(target=refresh, daemon=True).start()

    region = make_region(async_creation_runner=async_creation_runner if runner else None)
    region.configure(
        "dogpile.cache.redis",
        expiration_time=ttl,
        arguments={
            "url": url,
            "distributed_lock": True,
            "thread_local_lock": False,
            "lock_timeout": 10,
            # The value stays in Redis past its expiration_time, so dogpile can serve it
            # while one caller regenerates (its default), as long as the others' windows.
            "redis_expiration_time": int(ttl + STALE_S) + 1,
        },
    )

    def get() -> bytes:
        value: bytes = region.get_or_create(f"{prefix}:hot", origin)
        return value

    def close() -> None:
        backend: Any = region.backend
        backend.writer_client.close()

    return get, close


def _cashews(url: str, prefix: str, origin: Origin, ttl: float, how: str) -> Any:
    from cashews import Cache

    cache = Cache()
    cache.setup(url)
    fn: Callable[[], Any]
    if how == "lock":
        fn = cache(ttl=ttl, key=f"{prefix}:hot", lock=True)(origin.acall)
    elif how == "early":
        # Kept ttl + STALE_S, refreshed in the background once older than ttl: the same
        # freshness and stale window as dedupe's stale_while_revalidate.
        fn = cache.early(ttl=ttl + STALE_S, early_ttl=ttl, key=f"{prefix}:hot")(origin.acall)
    else:  # its README's fail-over recipe: the last good value served when the call raises
        inner = cache(ttl=ttl, key=f"{prefix}:hot", lock=True)(origin.acall)
        fn = cache.failover(ttl=FAIL_KEEP_S, key=f"{prefix}:hot:fail")(inner)
    return fn, cache.close, cache


def _make(tool: str, url: str, prefix: str, origin: Origin, ttl: float) -> Any:
    swr = {"stale_while_revalidate": STALE_S}
    sie = {"stale_if_error": FAIL_KEEP_S, "error_backoff": BACKOFF_S}
    table: dict[str, Callable[[], Any]] = {
        "dedupe": lambda: _dedupe(url, prefix, origin, ttl, {}),
        "dedupe stale_while_revalidate": lambda: _dedupe(url, prefix, origin, ttl, swr),
        "dedupe early_refresh=1": lambda: _dedupe(url, prefix, origin, ttl, {"early_refresh": 1}),
        "dedupe stale_if_error": lambda: _dedupe(url, prefix, origin, ttl, sie),
        "dedupe swr + stale_if_error": lambda: _dedupe(url, prefix, origin, ttl, swr | sie),
        "dogpile": lambda: _dogpile(url, prefix, origin, ttl, False),
        "dogpile async_creation_runner": lambda: _dogpile(url, prefix, origin, ttl, True),
        "cashews lock=True": lambda: _cashews(url, prefix, origin, ttl, "lock"),
        "cashews early (early_ttl)": lambda: _cashews(url, prefix, origin, ttl, "early"),
        "cashews failover + lock=True": lambda: _cashews(url, prefix, origin, ttl, "failover"),
    }
    return table[tool]()


# --------------------------------------------------------------------------- in a worker

Call = tuple[int, int, int]  # (t0, t1, produced) in monotonic ns; produced -1: an error


def worker(ctx: Ctx, task: dict[str, Any]) -> dict[str, Any]:
    tool, url, prefix, ttl = task["tool"], task["url"], task["prefix"], task["ttl"]
    threads, think, seconds = task["threads"], task["think"], task["seconds"]
    origin = Origin(task["job"], None)
    made = _make(tool, url, prefix, origin, ttl)
    admin = redis.Redis.from_url(url)
    calls: list[Call] = []
    lock = threading.Lock()

    def window() -> tuple[int, int]:
        # The parent stamped the start while everyone held still: one clock for the fleet.
        t0 = int(admin.get(f"{prefix}:t0") or 0)
        if task["outage"] is not None:
            lead, length = task["outage"]
            origin.outage = (t0 + int(lead * 1e9), t0 + int((lead + length) * 1e9))
        return t0, t0 + int(seconds * 1e9)

    if tool.startswith("cashews"):
        get, close, cache = made

        async def run() -> None:
            await cache.init()
            await get()  # warm: connections; fills the key
            ctx.go()
            _, end = window()
            origin.starts.clear()
            origin.runs.clear()

            async def caller() -> None:
                while time.monotonic_ns() < end:
                    t0 = time.monotonic_ns()
                    try:
                        produced = int(await get())
                    except OriginDown:
                        produced = -1
                    calls.append((t0, time.monotonic_ns(), produced))
                    await asyncio.sleep(think)

            await asyncio.gather(*(caller() for _ in range(threads)))
            await close()

        asyncio.run(run())
    else:
        get, close = made
        get()
        ctx.go()
        _, end = window()
        origin.starts.clear()
        origin.runs.clear()

        def caller() -> None:
            mine: list[Call] = []
            while time.monotonic_ns() < end:
                t0 = time.monotonic_ns()
                try:
                    produced = int(get())
                except OriginDown:
                    produced = -1
                mine.append((t0, time.monotonic_ns(), produced))
                time.sleep(think)
            with lock:
                calls.extend(mine)

        ts = [threading.Thread(target=caller, daemon=True) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(seconds + 60)
        close()
    admin.close()
    return {"calls": calls, "starts": list(origin.starts), "runs": list(origin.runs)}


# --------------------------------------------------------------------------- the parent


def _expiry_figures(out: list[dict[str, Any]], p: dict[str, Any]) -> dict[str, float]:
    calls = [c for w in out for c in w["calls"]]
    runs = sum(len(w["starts"]) for w in out)
    waited = [(t1 - t0) / 1e6 for t0, t1, prod in calls if t0 < prod <= t1]
    hits = [(t1 - t0) / 1e6 for t0, t1, prod in calls if not t0 < prod <= t1]
    lat = [(t1 - t0) / 1e6 for t0, t1, _ in calls]
    # The instants a value stopped being fresh (each value once: produced + ttl), and the
    # calls that started within AFTER_EXPIRY_S of one.
    ends = sorted({prod + int(p["ttl"] * 1e9) for _, _, prod in calls if prod > 0})
    after = []
    for t0, t1, _ in calls:
        k = bisect.bisect_right(ends, t0) - 1
        if k >= 0 and t0 - ends[k] <= AFTER_EXPIRY_S * 1e9:
            after.append((t1 - t0) / 1e6)
    starts = sorted(t for w in out for t in w["starts"])
    gaps = [(b - a) / 1e6 for a, b in itertools.pairwise(starts)]
    return {
        "after99": percentile(after, 99),
        # The mean time from one origin run's start to the next (not quantized as a count
        # over a few seconds would be), and the runs that started while another was running.
        "every": sum(gaps) / len(gaps) if gaps else float("nan"),
        # Runs that started while the last value produced was still fresh: by design for an
        # early refresh; for the others, a second refill of one expiry.
        "early": _runs_while_fresh(out, p["ttl"]),
        "waited": len(waited) / max(runs, 1),
        "wait99": percentile(waited, 99) if waited else 0.0,
        "hit99": percentile(hits, 99),
        "p50": percentile(lat, 50),
        "p99": percentile(lat, 99),
        "max": max(lat),
        "errors": sum(1 for c in calls if c[2] < 0),
        "calls": len(calls),
    }


def _runs_while_fresh(out: list[dict[str, Any]], ttl: float) -> int:
    runs = sorted(r for w in out for r in w["runs"])
    ends = sorted(e for _, e in runs)
    n = 0
    for s, _ in runs:
        k = bisect.bisect_left(ends, s) - 1  # the last run that ended before this one began
        if k >= 0 and s - ends[k] < ttl * 1e9:
            n += 1
    return n


def _outage_figures(out: list[dict[str, Any]], t0: int, p: dict[str, Any]) -> dict[str, float]:
    a = t0 + int(p["lead"] * 1e9)
    b = a + int(p["outage"] * 1e9)
    ttl_ns = int(p["ttl"] * 1e9)
    during = [c for w in out for c in w["calls"] if a <= c[0] < b]
    errors = sum(1 for c in during if c[2] < 0)
    stale = sum(1 for c in during if c[2] >= 0 and c[1] - c[2] > ttl_ns)
    return {
        "calls": len(during),
        "errors": errors,
        "stale": stale,
        "fresh": len(during) - errors - stale,
        "origin": sum(1 for w in out for s in w["starts"] if a <= s < b),
        "p99": percentile([(c[1] - c[0]) / 1e6 for c in during], 99),
        "errors_all": sum(1 for w in out for c in w["calls"] if c[2] < 0),
    }


def run(
    phase: str, p: dict[str, Any], tools: tuple[str, ...], url: str, fleet: Fleet
) -> dict[str, dict[str, list[float]]]:
    res: dict[str, dict[str, list[float]]] = {t: {} for t in tools}
    admin = redis.Redis.from_url(url)
    try:
        for r in range(p["repeats"]):
            order = list(tools[r % len(tools) :]) + list(tools[: r % len(tools)])
            for tool in order:
                prefix = f"bc:{phase}:{r}:{tools.index(tool)}"
                task = {
                    "tool": tool,
                    "url": url,
                    "prefix": prefix,
                    "ttl": p["ttl"],
                    "job": p["job"],
                    "threads": p["threads"],
                    "think": p["think"],
                    "seconds": p["seconds"],
                    "outage": (p["lead"], p["outage"]) if phase == "outage" else None,
                }
                stamp: list[int] = []

                def start(prefix: str = prefix, stamp: list[int] = stamp) -> None:
                    stamp.append(time.monotonic_ns())
                    admin.set(f"{prefix}:t0", stamp[0])

                w0 = time.monotonic()
                out = fleet.run("benchmarks.cachefill:worker", [task] * p["procs"], start)
                figs = (
                    _expiry_figures(out, p)
                    if phase == "expiry"
                    else _outage_figures(out, stamp[0], p)
                )
                for k, v in figs.items():
                    res[tool].setdefault(k, []).append(v)
                admin.flushall()
                print(f"  {phase} repeat {r + 1}/{p['repeats']} {tool}: "
                      f"{time.monotonic() - w0:.1f}s", flush=True)  # fmt: skip
    finally:
        admin.close()
    return res


def report(
    expiry: dict[str, dict[str, list[float]]],
    outage: dict[str, dict[str, list[float]]],
    meta: dict[str, Any],
) -> str:
    m = meta
    lines = [
        "# Cache fill: a hot key at expiry, a failing origin (issue 20)",
        "",
        f"{m['date']} · python {m['python']} · redis-server {m['redis']} · redis-py "
        f"{m['redis-py']} · dedupe {m['dedupe']} · dogpile.cache {m['dogpile']} · cashews "
        f"{m['cashews']} · {m['cores']} cores (shared) · run time {m['elapsed']:.0f} s",
        "",
        f"{m['procs']} processes x {m['threads']} callers (threads; asyncio tasks for cashews) "
        f"call one hot key in a loop, {m['think'] * 1000:.0f} ms apart, for {m['seconds']} s "
        f"per run; the function takes {m['job'] * 1000:.0f} ms; fresh for {m['ttl']} s. "
        f"{m['repeats']} repeats, tools in rotated order within each; median over the repeats "
        "(min-max).",
        "",
        "## 1. Expiry under load",
        "",
        "| tool | an origin run every (ms) | runs started while the value was fresh "
        "| calls that waited, per run | their p99 wait ms | p99 of the other calls ms "
        "| p99 in the 100 ms after an expiry ms "
        "| all calls p50 / p99 / max ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for tool, e in expiry.items():
        lines.append(
            f"| {tool} | {Spread.of(e['every']).fmt(0)} | {Spread.of(e['early']).fmt(0)} | "
            f"{Spread.of(e['waited']).fmt(1)} | "
            f"{Spread.of(e['wait99']).fmt(0)} | {Spread.of(e['hit99']).fmt(1)} | "
            f"{Spread.of(e['after99']).fmt(1)} | "
            f"{Spread.of(e['p50']).fmt(1)} / {Spread.of(e['p99']).fmt(0)} / "
            f"{Spread.of(e['max']).fmt(0)} |"
        )
    lines += [
        "",
        "One refill per expiry is an origin run every TTL + the run + the gap until the next "
        f"call ≈ {(m['ttl'] + m['job']) * 1000:.0f}+ ms; shorter means refills before expiry "
        "(early refresh) or more than one per expiry. *Started while fresh*: runs that began "
        "less than the TTL after another run had ended, in the run: an early refresh does "
        "that by design; otherwise it is a second refill for one expiry. A call *waited* if its "
        "value was produced while it was in the call (the first fill before the run is not "
        "counted); *per run*: over the origin runs in the same period, fleet-wide. "
        "Settings: dedupe `result_ttl` = the TTL; "
        f"`stale_while_revalidate={STALE_S:g}`; `early_refresh=1` (XFetch, β = 1). cashews "
        f"`@cache(ttl, lock=True)`; `@cache.early(ttl=TTL+{STALE_S:g}, early_ttl=TTL)` (a "
        "background refresh once older than the TTL). dogpile.cache Redis backend, "
        "`distributed_lock=True`, `expiration_time` = the TTL, the value kept in Redis "
        f"{STALE_S:g} s longer; its default serves the old value to everyone but the one "
        "regenerating; with `async_creation_runner` (its documented thread recipe) that one too.",
        "",
    ]
    plain, swr = expiry.get("dedupe"), expiry.get("dedupe stale_while_revalidate")
    if plain and swr:
        r = ratios(swr["after99"], plain["hit99"])
        lines += [
            "Issue 20's target, per repeat: p99 of the calls in the 100 ms after an expiry "
            "with stale_while_revalidate / p99 of plain dedupe's calls that did not wait "
            f"(its fresh hits): {r.ratio()} (target ≤ 1.2x).",
            "",
        ]
    lines += [
        f"## 2. Failing origin: it raises for {m['outage']} s, {m['lead']} s into each run",
        "",
        "| tool | calls in the outage | got the error | got a stale value | got a fresh value "
        "| origin calls in the outage | p99 ms in the outage |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for tool, e in outage.items():
        lines.append(
            f"| {tool} | {Spread.of(e['calls']).fmt(0)} | {Spread.of(e['errors']).fmt(0)} | "
            f"{Spread.of(e['stale']).fmt(0)} | {Spread.of(e['fresh']).fmt(0)} | "
            f"{Spread.of(e['origin']).fmt(0)} | {Spread.of(e['p99']).fmt(0)} |"
        )
    bound = m["outage"] / BACKOFF_S + 1
    lines += [
        "",
        "Calls counted by when they started; each column is its own median over the repeats, "
        "so a row need not add up (when the last refill before the outage happened decides "
        "how many calls still got a fresh value). *Stale*: the value was older than the TTL when "
        "the call returned. Settings: dedupe `stale_if_error="
        f"{FAIL_KEEP_S:g}, error_backoff={BACKOFF_S:g}` (fleet-wide: the bound on origin "
        f"calls in the outage is {m['outage']:g} / {BACKOFF_S:g} + 1 = {bound:g}), with and "
        f"without `stale_while_revalidate={STALE_S:g}`; cashews `@cache.failover(ttl="
        f"{FAIL_KEEP_S:g})` over `@cache(ttl, lock=True)` (its fail-over recipe; the last good "
        "value re-served when the call raises); dogpile.cache has no fail-over: a failed "
        "regeneration raises to the caller that ran it, the old value stays and the next "
        "caller past expiry tries again.",
        "",
    ]
    return "\n".join(lines)


# The outage begins 1.5 TTL into the run: after the first refill of the run (near one TTL in,
# the warm-up having filled the key just before), mid-way through that value's freshness,
# so no tool's refill falls on the outage's first instant by the phase of its warm-up.
QUICK = {"procs": 2, "threads": 4, "ttl": 0.1, "job": 0.05, "think": 0.005, "seconds": 0.4,
         "lead": 0.15, "outage": 0.2, "repeats": 1}  # fmt: skip
FULL = {"procs": 4, "threads": 8, "ttl": 0.5, "job": 0.05, "think": 0.01, "seconds": 2.5,
        "lead": 0.75, "outage": 1.5, "repeats": 3}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cachefill", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a small fleet, short runs, 1 repeat")
    for k in FULL:
        ap.add_argument(f"--{k}", type=type(FULL[k]), default=None)
    ap.add_argument(
        "--tools",
        default=",".join(dict.fromkeys(EXPIRY_TOOLS + OUTAGE_TOOLS)),
        help="comma-separated subset (each phase runs those of its tools named)",
    )
    ap.add_argument("--out", type=Path, default=None, help="also write the tables here")
    ns = ap.parse_args(argv)
    p: dict[str, Any] = dict(QUICK if ns.quick else FULL)
    for k in FULL:
        if getattr(ns, k) is not None:
            p[k] = getattr(ns, k)
    if p["lead"] + p["outage"] > p["seconds"]:
        ap.error("the outage must end within the run (lead + outage <= seconds)")
    named = {t.strip() for t in ns.tools.split(",") if t.strip()}
    unknown = named - set(EXPIRY_TOOLS + OUTAGE_TOOLS)
    if unknown:
        ap.error(f"unknown tools: {', '.join(sorted(unknown))}")
    t0 = time.monotonic()
    with RedisServer() as server, Fleet(p["procs"]) as fleet:
        expiry = run("expiry", p, tuple(t for t in EXPIRY_TOOLS if t in named), server.url, fleet)
        outage = run("outage", p, tuple(t for t in OUTAGE_TOOLS if t in named), server.url, fleet)
    text = report(expiry, outage, _meta(redis_version(), elapsed=time.monotonic() - t0, **p))
    print(text)
    if ns.out is not None:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
