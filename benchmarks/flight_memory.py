"""Memory per waiting flight and per leader (issue 23: at most 4 KB each), at two sizes.

One spawned process leads N asyncio flights on distinct keys, each blocked inside its
function; a second spawned process then calls the same N keys, so it holds N flights that
wait on another process's leader (subscribed through the hub). Each process measures the
Python memory it holds (``tracemalloc``, after a collection) and its RSS, before its N calls
and once all N are in place; the difference over N is the cost of one flight. Two sizes
(1,000 and 20,000 by default) show whether it grows linearly.

``python -m benchmarks.flight_memory [--sizes 1000,20000] [--out FILE]``; it starts its own
redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import os
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

TARGET_KB = 4.0
TIMEOUT = float(os.environ.get("FLIGHT_MEMORY_TIMEOUT", "300"))
SETTLE = 10.0  # seconds a step's waiters may take to wait (see _side)
WARM_UP = 200  # flights at once before measuring (see _side)


def _rss_kb() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _snapshot() -> tuple[int, int]:
    gc.collect()
    return tracemalloc.get_traced_memory()[0], _rss_kb()


async def _until(check: Any, what: str) -> None:
    end = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _running(table: Any) -> int:
    """How many of the process's flights run in a task now (a waiting flight has none)."""
    return sum(isinstance(e.task, asyncio.Task) for e in list(table._entries.values()))


def _side(role: str, url: str, prefix: str, n: int, ready: Any, release: Any, out: Any) -> None:
    """One process: the leaders (role "lead") or the waiters ("wait")."""
    from dedupe import SingleFlight

    tracemalloc.start()

    async def main() -> dict[str, Any]:
        sf = SingleFlight(url, prefix=prefix, lock_ttl=30.0, wait_timeout=None)
        started = 0
        gate = asyncio.Event()

        @sf(key="{i}")
        async def job(i: int) -> int:
            nonlocal started
            if i >= 0:  # the warm-up's flights (negative keys) do not block
                started += 1
                await gate.wait()
            return i

        # Warm up: clients, the hub, the renewer, the first flights. More at once than the
        # loop has command slots (64), so that every slot's connection is open (and what the
        # first connections import is imported): one-off costs, not a flight's (at 50, the
        # 1,000 waiters' figure carried some 0.1-0.3 KB of them).
        await asyncio.gather(*(job(-1 - k) for k in range(WARM_UP)))
        if role == "wait":
            assert ready.wait(TIMEOUT), "the leaders never started"
        before = _snapshot()
        # In steps of 500, each in place before the next: the measure is memory, not how
        # long 20,000 callers queue for 64 command slots (slower under tracemalloc).
        tasks: list[asyncio.Future[int]] = []
        hub = sf.backend().hub() if role == "wait" else None
        table = sf.backend().async_flights()
        for start in range(0, n, 500):
            tasks += [asyncio.ensure_future(job(i)) for i in range(start, min(n, start + 500))]
            want = len(tasks)
            if hub is None:
                await _until(lambda want=want: started == want, "the leaders to run")
            else:
                await _until(
                    lambda h=hub, want=want: len(h.channels()) >= want, "the waiters to subscribe"
                )
                # And waiting: no flight still between its subscription and its wait (the
                # re-check's acquire runs in a task; a waiting flight has none). Without this
                # a step's last flights were measured mid-way (at 1,000, half of them). Up to
                # SETTLE seconds: a flight whose subscription was confirmed late polls (a
                # round trip now and then), which a loaded machine may never stop doing.
                settle = time.monotonic() + SETTLE
                while _running(table) > want // 100 and time.monotonic() < settle:
                    await asyncio.sleep(0.05)
        after = _snapshot()
        tracemalloc.stop()  # measured: the rest runs at full speed
        if role == "lead":
            ready.set()
            await asyncio.to_thread(release.wait, TIMEOUT)
            gate.set()
        else:
            release.set()
        values = await asyncio.gather(*tasks)
        assert values == list(range(n)), "a wrong value"
        await sf.aclose()
        return {
            "role": role,
            "n": n,
            "py_bytes": after[0] - before[0],
            "rss_kb": after[1] - before[1],
        }

    try:
        out.put(asyncio.run(main()))
    except BaseException:
        import traceback

        release.set()  # let the other side finish
        ready.set()
        out.put({"role": role, "error": traceback.format_exc()})


def measure(url: str, n: int) -> dict[str, dict[str, Any]]:
    """Per-flight bytes of N leaders and N waiters on another process's leaders."""
    ctx = mp.get_context("spawn")
    ready, release, out = ctx.Event(), ctx.Event(), ctx.Queue()
    prefix = f"fm{n}:{os.getpid()}:{time.monotonic_ns()}"
    procs = [
        ctx.Process(target=_side, args=(role, url, prefix, n, ready, release, out))
        for role in ("lead", "wait")
    ]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=TIMEOUT) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    for r in results:
        if "error" in r:
            raise RuntimeError(f"the {r['role']} process failed:\n{r['error']}")
    return {r["role"]: r for r in results}


def table(rows: list[tuple[int, dict[str, dict[str, Any]]]]) -> str:
    lines = [
        "| flights | per leader (Python) | per leader (RSS) | per waiting flight (Python) "
        "| per waiting flight (RSS) | target ≤ 4 KB (Python, both) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for n, res in rows:
        lead, wait = res["lead"], res["wait"]
        lp, wp = lead["py_bytes"] / n / 1024, wait["py_bytes"] / n / 1024
        ok = "met" if max(lp, wp) <= TARGET_KB else "missed"
        lines.append(
            f"| {n:,} | {lp:.2f} KB | {lead['rss_kb'] / n:.2f} KB | {wp:.2f} KB "
            f"| {wait['rss_kb'] / n:.2f} KB | {ok} |"
        )
    return "\n".join(lines)


NOTE = (
    "Python: tracemalloc's traced memory after a collection, once all N flights are in "
    "place, minus before them; RSS: the process's resident set, the same way (it grows "
    "by pages and arenas, so it is coarse at small N). Leaders block inside their "
    "function; waiters are subscribed followers of another process's leaders."
)
SIZES = (1000, 20000)  # issue 23: at 1,000 and 20,000 flights
QUICK_SIZES = (200, 2000)


def document(rows: list[tuple[int, dict[str, dict[str, Any]]]]) -> str:
    """The markdown file `make bench` writes (results/flight_memory.md)."""
    return (
        "# Memory per flight (issue 23)\n\n"
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · python "
        f"{sys.version.split()[0]}\n\n" + table(rows) + "\n\n" + NOTE + "\n"
    )


def scenario(url: str, quick: bool) -> dict[str, Any]:
    """The `make bench` scenario: both sizes, on the run's redis-server."""
    return {"rows": [(n, measure(url, n)) for n in (QUICK_SIZES if quick else SIZES)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.flight_memory", description=__doc__)
    ap.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="flights per run, comma-separated"
    )
    ap.add_argument("--out", default=None, help="also write the table here (markdown)")
    ns = ap.parse_args(argv)
    from devtools.servers import RedisServer

    sizes = [int(s) for s in ns.sizes.split(",") if s.strip()]
    server = RedisServer().start()
    try:
        rows = [(n, measure(server.url, n)) for n in sizes]
    finally:
        server.stop()
    text = document(rows)
    print(text)
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
