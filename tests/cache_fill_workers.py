"""What the spawned processes of tests/test_cache_fill.py run: an origin scripted through
Redis, and herds of sync threads or asyncio tasks that call it through dedupe.

Spawned children import this module by name, so everything here is top level. The origin
counts its runs in Redis and follows a plan the test writes there: run ``n`` (counted from 1,
per job) does what ``<aux>:plan``'s item ``n - 1`` says ("ok" when the plan runs out):

- ``ok``: return ``{"n": n, "pid": ..., "token": ...}`` at once;
- ``slow``: the same after 0.1 s of work (a run with a length: early_refresh scales by it);
- ``block``: the same, once the test pushes to ``<aux>:go`` (BLPOP; bounded);
- ``fail``: raise Failing; ``block-fail``: raise it once the test pushes to ``<aux>:go``;
- ``hang``: wait on a list nobody pushes to (only SIGKILL ends it).

Every run pushes its PID to ``<aux>:started`` as it starts, and ``n`` to ``<aux>:done`` as
it returns or raises, so the test waits on Redis, never on a clock. The bookkeeping keys are
named by :func:`aux`: outside the dedupe prefix, in the slot of ``{prefix}`` on a Cluster.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import redis
import redis.asyncio
import redis.cluster

from dedupe import Served, SingleFlight, current_flight

# Where the bookkeeping keys live: ("url", redis_url) or ("cluster", [(host, port), ...]).
Where = tuple[str, Any]


class Failing(Exception):
    """The origin is down."""


def aux(prefix: str, job_id: str, what: str) -> str:
    """A bookkeeping key of one job: outside the dedupe prefix, in ``{prefix}``'s slot."""
    return f"{prefix}-aux:{{{prefix}}}:{job_id}:{what}"


def url_of(where: Where) -> str:
    kind, target = where
    if kind == "url":
        return str(target)
    return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in target)


_BLOCK = 150.0  # longer than any BLPOP below
_clients: dict[Any, Any] = {}
_clients_lock = threading.Lock()


def client(where: Where) -> Any:
    """This process's bookkeeping client (one per target, shared by its threads)."""
    kind, target = where
    key = (kind, repr(target))
    with _clients_lock:
        got = _clients.get(key)
        if got is None:
            # No socket timeout shorter than the BLPOPs (redis-py's default is 5 s).
            if kind == "url":
                got = redis.Redis.from_url(target, socket_timeout=_BLOCK)
            else:
                nodes = [redis.cluster.ClusterNode(h, p) for h, p in target]
                got = redis.cluster.RedisCluster(startup_nodes=nodes, socket_timeout=_BLOCK)
            _clients[key] = got
        return got


def _step(where: Where, prefix: str, job_id: str) -> tuple[int, str]:
    r = client(where)
    n = int(r.incr(aux(prefix, job_id, "runs")))
    r.rpush(aux(prefix, job_id, "started"), os.getpid())
    plan = r.lindex(aux(prefix, job_id, "plan"), n - 1)
    return n, (plan or b"ok").decode()


def origin(where: Where, prefix: str, job_id: str) -> dict[str, Any]:
    """The function dedupe runs (sync): see the module's doc."""
    n, plan = _step(where, prefix, job_id)
    r = client(where)
    flight = current_flight()
    token = flight.token if flight is not None else 0
    try:
        if plan in ("block", "block-fail"):
            r.blpop([aux(prefix, job_id, "go")], timeout=30)
        elif plan == "hang":
            r.blpop([aux(prefix, job_id, "never")], timeout=120)
        elif plan == "slow":
            time.sleep(0.1)  # the run's own length, not a wait for anything
        if plan in ("fail", "block-fail"):
            raise Failing(f"run {n} failed")
        return {"n": n, "pid": os.getpid(), "token": token}
    finally:
        r.rpush(aux(prefix, job_id, "done"), n)


async def aorigin(where: Where, prefix: str, job_id: str) -> dict[str, Any]:
    """The same origin as a coroutine function (its waits do not block the loop)."""
    n, plan = await asyncio.to_thread(_step, where, prefix, job_id)
    flight = current_flight()
    token = flight.token if flight is not None else 0
    r = redis.asyncio.Redis.from_url(url_of(where), socket_timeout=_BLOCK)
    try:
        if plan in ("block", "block-fail"):
            await r.blpop([aux(prefix, job_id, "go")], timeout=30)
        if plan in ("fail", "block-fail"):
            raise Failing(f"run {n} failed")
        return {"n": n, "pid": os.getpid(), "token": token}
    finally:
        await r.rpush(aux(prefix, job_id, "done"), n)
        await r.aclose()


def describe(job_id: str, served: Served | BaseException) -> dict[str, Any]:
    """What one call got, as plain data: the run's number, marked stale or not, and how."""
    if isinstance(served, BaseException):
        return {"job": job_id, "kind": "err", "type": type(served).__name__, "repr": repr(served)}
    return {
        "job": job_id,
        "kind": "ok",
        "n": served.value["n"],
        "stale": served.stale,
        "role": served.role,
        "age": served.age,
        "pid": os.getpid(),
    }


def herd(
    where: Where,
    prefix: str,
    sf_kw: dict[str, Any],
    mode: str,
    callers: int,
    job_ids: list[str],
    rounds: int,
    barrier: Any,
    out: Any,
) -> None:
    """``callers`` threads (mode "sync") or tasks ("async") of this process each call every
    job in ``job_ids``, ``rounds`` times over, once every process is at ``barrier``; what each
    call got goes to ``out`` (one list), then the instance closes (letting a background
    refresh finish)."""
    sf = SingleFlight(url_of(where), prefix=prefix, **sf_kw)
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    barrier.wait(timeout=30)
    if mode == "sync":
        together = threading.Barrier(callers)

        def one() -> None:
            together.wait(timeout=30)
            for _ in range(rounds):
                for job_id in job_ids:
                    try:
                        got: Any = sf.call_detailed(job_id, origin, where, prefix, job_id)
                    except Exception as exc:
                        got = exc
                    with lock:
                        results.append(describe(job_id, got))

        pool = [threading.Thread(target=one) for _ in range(callers)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(timeout=60)
        out.put(results)
        sf.close()
        return

    async def task() -> None:
        for _ in range(rounds):
            for job_id in job_ids:
                try:
                    got: Any = await sf.call_detailed(job_id, aorigin, where, prefix, job_id)
                except Exception as exc:
                    got = exc
                results.append(describe(job_id, got))

    async def main() -> None:
        await asyncio.gather(*(task() for _ in range(callers)))
        out.put(results)
        await sf.aclose()

    asyncio.run(main())


def call_and_report(
    where: Where, prefix: str, sf_kw: dict[str, Any], job_id: str, out: Any
) -> None:
    """One sync call; what it got goes to ``out``; then the instance closes (a background
    refresh this call started runs on until then: SIGKILL may end the process first)."""
    sf = SingleFlight(url_of(where), prefix=prefix, **sf_kw)
    try:
        got: Any = sf.call_detailed(job_id, origin, where, prefix, job_id)
    except Exception as exc:
        got = exc
    out.put(describe(job_id, got))
    sf.close()
