"""Functions that the batch tests run in spawned processes (top level, importable by name).

Each builds its own SingleFlight from a URL (``redis://`` or ``redis+cluster://``) and the
same two functions a user would write over one set of job ids: a batch loader
(``@sf.batch(key="user:{item}", namespace="users")``) and a single-key one
(``@sf(key="user:{user_id}", namespace="users")``). Every run is counted in Redis per item
(``aux(prefix, "runs", item)``, keys in one hash slot), and announced on ``aux(prefix,
"started")``; a run told to hold waits for a push to ``aux(prefix, "go", pid)``.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from typing import Any

import redis
import redis.cluster

from dedupe import BatchError, BatchFlight, SingleFlight, current_flight

NAMESPACE, KEY, SINGLE_KEY = "users", "user:{item}", "user:{user_id}"


def aux(prefix: str, *parts: object) -> str:
    """A bookkeeping key of the test (one hash slot per test, apart from dedupe's keys)."""
    return ":".join([f"{{{prefix}-aux}}", *map(str, parts)])


def counter(url: str) -> Any:
    """A client for the bookkeeping keys."""
    if url.startswith("redis+cluster://"):
        nodes = [
            redis.cluster.ClusterNode(h, int(p))
            for h, p in (a.split(":") for a in url.removeprefix("redis+cluster://").split(","))
        ]
        return redis.cluster.RedisCluster(startup_nodes=nodes, socket_timeout=10)
    return redis.Redis.from_url(url, socket_timeout=60)


def _ran(r: Any, prefix: str, ids: list[Any], tokens: list[int], hold: float) -> None:
    """Count the run of each item, record it (``aux(prefix, "ran")``: JSON of the pid, the
    items in the order given and their tokens), announce it, then hold as told."""
    pipe = r.pipeline(transaction=False)
    for i in ids:
        pipe.incr(aux(prefix, "runs", i))
    pipe.rpush(aux(prefix, "ran"), json.dumps([os.getpid(), ids, tokens]))
    pipe.execute()
    r.rpush(aux(prefix, "started"), os.getpid())
    if hold:
        r.blpop([aux(prefix, "go", os.getpid())], timeout=hold)


def _value(i: Any, token: int) -> dict[str, Any]:
    return {"id": i, "pid": os.getpid(), "token": token}


def loaders(url: str, prefix: str, hold: float, **kw: Any) -> tuple[SingleFlight, Any, Any, Any]:
    """This process's SingleFlight, its sync and async batch loaders and its single-key one."""
    sf = SingleFlight(url, prefix=prefix, **kw)
    r = counter(url)

    @sf.batch(key=KEY, namespace=NAMESPACE)
    def load(ids: list[int]) -> dict[int, dict[str, Any]]:
        flight = current_flight()
        assert isinstance(flight, BatchFlight) and list(flight.items) == ids
        _ran(r, prefix, ids, [flight.items[i].token for i in ids], hold)
        return {i: _value(i, flight.items[i].token) for i in ids}

    @sf.batch(key=KEY, namespace=NAMESPACE)
    async def aload(ids: list[int]) -> dict[int, dict[str, Any]]:
        flight = current_flight()
        assert isinstance(flight, BatchFlight)
        tokens = [flight.items[i].token for i in ids]
        await asyncio.to_thread(_ran, r, prefix, ids, tokens, hold)
        return {i: _value(i, flight.items[i].token) for i in ids}

    @sf(key=SINGLE_KEY, namespace=NAMESPACE)
    def one(user_id: int) -> dict[str, Any]:
        flight = current_flight()
        assert flight is not None and not isinstance(flight, BatchFlight)
        _ran(r, prefix, [user_id], [flight.token], hold)
        return _value(user_id, flight.token)

    return sf, load, aload, one


def _report(fn: Any) -> tuple[str, int, Any]:
    try:
        return ("ok", os.getpid(), fn())
    except BatchError as exc:
        errors = {k: repr(e) for k, e in exc.errors.items()}
        return ("err", os.getpid(), {"values": exc.values, "errors": errors})
    except BaseException as exc:
        return ("err", os.getpid(), repr(exc))


def call(
    url: str,
    prefix: str,
    how: str,
    ids: list[int],
    hold: float,
    barrier: Any,
    out: Any,
    kw: dict[str, Any],
) -> None:
    """Call for ``ids`` and put (kind, pid, result) on ``out``, once the barrier (if any)
    lets everyone go: ``how`` is "batch" (the sync loader), "abatch" (the async one),
    or "single" (a thread per id calling the single-key loader; the result maps each id)."""
    sf, load, aload, one = loaders(url, prefix, hold, **kw)
    try:
        if barrier is not None:
            barrier.wait(timeout=30)
        if how == "batch":
            out.put(_report(lambda: load(ids)))
        elif how == "abatch":
            out.put(_report(lambda: asyncio.run(aload(ids))))
        elif how == "single":
            got: dict[int, Any] = {}

            def single(i: int) -> None:
                got[i] = _report(lambda: one(i))

            threads = [threading.Thread(target=single, args=(i,)) for i in ids]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            failed = {i: g[2] for i, g in got.items() if g[0] != "ok"}
            if failed or len(got) != len(ids):
                out.put(("err", os.getpid(), failed))
            else:
                out.put(("ok", os.getpid(), {i: g[2] for i, g in got.items()}))
        else:
            raise AssertionError(how)
    finally:
        sf.close(timeout=0)


def mixed(
    url: str, prefix: str, windows: list[list[int]], barrier: Any, out: Any, kw: dict[str, Any]
) -> None:
    """Threads and asyncio tasks in one process: a thread per window calls the sync loader,
    and one event loop (on a thread of its own) a task per window with the async one, all at
    once. Puts one (kind, pid, result) per caller on ``out``."""
    sf, load, aload, _ = loaders(url, prefix, 0.2, **kw)
    results: list[Any] = []
    try:
        barrier.wait(timeout=30)

        async def tasks() -> None:
            got = await asyncio.gather(*(aload(w) for w in windows), return_exceptions=True)
            results.extend(("ok", os.getpid(), g) if isinstance(g, dict) else ("err", 0, repr(g))
                           for g in got)  # fmt: skip

        def sync(w: list[int]) -> None:
            results.append(_report(lambda: load(w)))

        threads = [threading.Thread(target=sync, args=(w,)) for w in windows]
        threads.append(threading.Thread(target=lambda: asyncio.run(tasks())))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for r in results:
            out.put(r)
    finally:
        sf.close(timeout=0)
