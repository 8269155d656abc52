"""Worker functions for the Redis Cluster and Sentinel tests, run in spawned processes.

Spawned children import this module by name, so everything here is top level.

A topology is described by a plain dict (``env``) that pickles across processes:

- ``{"topology": "cluster", "nodes": [[host, port], ...], "prefix": P}``
- ``{"topology": "sentinel", "sentinels": [[host, port], ...], "service": S, "prefix": P}``

and a SingleFlight is built from it with one of the three spellings a user would write:
``"url"`` (``redis+cluster://`` / ``redis+sentinel://``), ``"client"`` (a sync RedisCluster or
``Sentinel.master_for``) or ``"async_client"`` (their asyncio twins).

A job is described by a tuple too:

- ``("cluster", env, behaviour, hold)``: counts its run in Redis (keys under ``P-aux``, all in
  the hash slot of ``{P}``), pushes its PID to a ``started`` list, then holds for ``hold``
  seconds, or until something is pushed to its ``go`` list when ``hold == "go"``;
- ``("signal", ran, go, behaviour)``: for a topology that is being killed, it reports its run
  through the multiprocessing queue ``ran`` and holds until the multiprocessing event ``go``.

``behaviour`` is ``"value"`` (return who ran it) or ``"raise"`` (raise :class:`Custom`).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel

from dedupe import SingleFlight, current_flight

HOLD_LIMIT = 30.0  # no job holds longer than this, whatever the test does


class Custom(Exception):
    """A user exception with two arguments, raised by the leader."""


# --------------------------------------------------------------------------- topologies


def url_of(env: dict[str, Any]) -> str:
    if env["topology"] == "cluster":
        return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in env["nodes"])
    hosts = ",".join(f"{h}:{p}" for h, p in env["sentinels"])
    return f"redis+sentinel://{hosts}/{env['service']}"


def sync_client(env: dict[str, Any], **kw: Any) -> Any:
    if env["topology"] == "cluster":
        nodes = [redis.cluster.ClusterNode(h, p) for h, p in env["nodes"]]
        return redis.cluster.RedisCluster(startup_nodes=nodes, **kw)
    sentinel = redis.sentinel.Sentinel([tuple(a) for a in env["sentinels"]], socket_timeout=1.0)
    return sentinel.master_for(env["service"], **kw)


def async_client(env: dict[str, Any], **kw: Any) -> Any:
    if env["topology"] == "cluster":
        nodes = [redis.asyncio.cluster.ClusterNode(h, p) for h, p in env["nodes"]]
        return redis.asyncio.cluster.RedisCluster(startup_nodes=nodes, **kw)
    sentinel = redis.asyncio.sentinel.Sentinel(
        [tuple(a) for a in env["sentinels"]], socket_timeout=1.0
    )
    return sentinel.master_for(env["service"], **kw)


_CLIENT_KW = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0}


def make_sf(env: dict[str, Any], spelling: str, **sf_kw: Any) -> SingleFlight:
    """A SingleFlight for ``env``; call it for ``async_client`` from inside the event loop."""
    kw = {"prefix": env["prefix"], **sf_kw}
    if spelling == "url":
        return SingleFlight(url_of(env), **kw)
    if spelling == "client":
        return SingleFlight(client=sync_client(env, **_CLIENT_KW), **kw)
    if spelling == "async_client":
        return SingleFlight(async_client=async_client(env, **_CLIENT_KW), **kw)
    raise AssertionError(spelling)


# --------------------------------------------------------------------------- aux keys


def aux(env: dict[str, Any], job_id: str, what: str) -> str:
    """A bookkeeping key of the test: outside the dedupe prefix, in the slot of ``{prefix}``."""
    p = env["prefix"]
    return f"{p}-aux:{{{p}}}:{job_id}:{what}"


_aux_clients: dict[tuple[tuple[str, int], ...], redis.cluster.RedisCluster] = {}
_aux_lock = threading.Lock()


def aux_client(env: dict[str, Any]) -> redis.cluster.RedisCluster:
    key = tuple((h, int(p)) for h, p in env["nodes"])
    with _aux_lock:
        client = _aux_clients.get(key)
        if client is None:
            client = _aux_clients[key] = sync_client(env)
        return client


# --------------------------------------------------------------------------- jobs


def _result(behaviour: str, job_id: str, token: int) -> dict[str, Any]:
    if behaviour == "raise":
        raise Custom(f"{job_id} failed", 42)
    assert behaviour == "value", behaviour
    return {"pid": os.getpid(), "token": token, "job": job_id}


def run_job(job: tuple[Any, ...]) -> dict[str, Any]:
    flight = current_flight()
    assert flight is not None
    if job[0] == "cluster":
        _, env, behaviour, hold = job
        r = aux_client(env)
        job_id = flight.key
        r.incr(aux(env, job_id, "runs"))
        r.rpush(aux(env, job_id, "tokens"), flight.token)
        r.rpush(aux(env, job_id, "started"), os.getpid())
        if hold == "go":
            assert r.blpop([aux(env, job_id, "go")], timeout=HOLD_LIMIT) is not None
        else:
            _hold(float(hold))
        return _result(behaviour, job_id, flight.token)
    _, ran, go, behaviour = job
    ran.put((os.getpid(), flight.token))
    assert go.wait(HOLD_LIMIT)
    return _result(behaviour, flight.key, flight.token)


async def arun_job(job: tuple[Any, ...]) -> dict[str, Any]:
    flight = current_flight()
    assert flight is not None
    loop = asyncio.get_running_loop()
    if job[0] == "cluster":
        _, env, behaviour, hold = job
        r = aux_client(env)
        job_id = flight.key
        r.incr(aux(env, job_id, "runs"))
        r.rpush(aux(env, job_id, "tokens"), flight.token)
        r.rpush(aux(env, job_id, "started"), os.getpid())
        if hold == "go":
            key = aux(env, job_id, "go")
            got = await loop.run_in_executor(None, lambda: r.blpop([key], timeout=HOLD_LIMIT))
            assert got is not None
        else:
            await asyncio.sleep(float(hold))
        return _result(behaviour, job_id, flight.token)
    _, ran, go, behaviour = job
    ran.put((os.getpid(), flight.token))
    assert await loop.run_in_executor(None, go.wait, HOLD_LIMIT)
    return _result(behaviour, flight.key, flight.token)


def _hold(seconds: float) -> None:
    deadline = time.monotonic() + min(seconds, HOLD_LIMIT)
    while time.monotonic() < deadline:  # interruptible by signals, unlike one long sleep
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


# --------------------------------------------------------------------------- outcomes


def describe(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "module": type(exc).__module__,
        "args": [repr(a) for a in exc.args],
        "text": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def _outcome(job_id: str, started: float, fn: Any) -> dict[str, Any]:
    try:
        value = fn()
        kind, payload = "ok", value
    except Exception as exc:
        kind, payload = "err", describe(exc)
    return {
        "job": job_id,
        "kind": kind,
        "value": payload,
        "pid": os.getpid(),
        "started": started,
        "ended": time.monotonic(),  # CLOCK_MONOTONIC: comparable across processes on Linux
    }


async def _aoutcome(job_id: str, started: float, coro: Any) -> dict[str, Any]:
    try:
        value = await coro
        kind, payload = "ok", value
    except Exception as exc:
        kind, payload = "err", describe(exc)
    return {
        "job": job_id,
        "kind": kind,
        "value": payload,
        "pid": os.getpid(),
        "started": started,
        "ended": time.monotonic(),
    }


def hub_channels_when_idle(sf: SingleFlight, timeout: float = 5.0) -> dict[str, int]:
    """The hub's channels once the server acked our last unsubscribe (bounded)."""
    hub = sf.backend().hub()
    deadline = time.monotonic() + timeout
    while hub.channels() and time.monotonic() < deadline:
        time.sleep(0.01)
    return hub.channels()


def count_messages() -> list[int]:
    """From now on, count the channel messages this process's flights take; the count is the
    list's one item.

    A waiting flight gets what the hub delivers through its Mailbox (dedupe.core.signals): a
    record or notice (bytes), or an order to re-check (not bytes). A flight served by the
    leader's message takes that message; one served by a re-check of Redis takes none. An
    asyncio flight takes it through ``take_soon`` (handed over in the hub's callback)."""
    from dedupe.core.signals import Mailbox

    taken = [0]
    get, get_async, take_soon = Mailbox.get, Mailbox.get_async, Mailbox.take_soon

    def counted(item: Any) -> Any:
        if type(item) is bytes:
            taken[0] += 1
        return item

    def spy_get(self: Any, timeout: float | None) -> Any:
        return counted(get(self, timeout))

    async def spy_get_async(self: Any, timeout: float | None) -> Any:
        return counted(await get_async(self, timeout))

    def spy_take_soon(self: Any, timeout: float | None, handle: Callable[[Any], None]) -> Any:
        return take_soon(self, timeout, lambda item: handle(counted(item)))

    Mailbox.get = spy_get  # type: ignore[method-assign]
    Mailbox.get_async = spy_get_async  # type: ignore[method-assign]
    Mailbox.take_soon = spy_take_soon  # type: ignore[method-assign]
    return taken


# --------------------------------------------------------------------------- entry points


def herd(
    env: dict[str, Any],
    spelling: str,
    mode: str,
    calls: list[str],
    job: tuple[Any, ...],
    barrier: Any,
    out: Any,
    sf_kw: dict[str, Any],
    messages: bool = False,
) -> None:
    """One caller per entry of ``calls`` (a job id), as threads (``mode="sync"``) or tasks.

    All callers start together once every process reached ``barrier``; the report put on
    ``out`` holds each caller's outcome and the hub's channels afterwards, and with
    ``messages`` how many channel messages the process's flights took (count_messages).
    """
    taken = count_messages() if messages else None
    if mode == "sync":
        report = _herd_sync(env, spelling, calls, job, barrier, sf_kw)
    else:
        report = asyncio.run(_herd_async(env, spelling, calls, job, barrier, sf_kw))
    if taken is not None:
        report["messages"] = taken[0]
    out.put(report)


def _herd_sync(
    env: dict[str, Any],
    spelling: str,
    calls: list[str],
    job: tuple[Any, ...],
    barrier: Any,
    sf_kw: dict[str, Any],
) -> dict[str, Any]:
    sf = make_sf(env, spelling, **sf_kw)
    sf.backend().sync_client()  # connect before the barrier, not inside the herd
    go = threading.Event()
    results: list[dict[str, Any]] = []

    def one(job_id: str) -> None:
        go.wait(HOLD_LIMIT)
        started = time.monotonic()
        results.append(_outcome(job_id, started, lambda: sf.call(job_id, run_job, job)))

    pool = [threading.Thread(target=one, args=(j,)) for j in calls]
    for t in pool:
        t.start()
    barrier.wait(timeout=HOLD_LIMIT)
    go.set()
    for t in pool:
        t.join(timeout=60)
    report = {"pid": os.getpid(), "results": results, "hub": hub_channels_when_idle(sf)}
    sf.close()
    return report


async def _herd_async(
    env: dict[str, Any],
    spelling: str,
    calls: list[str],
    job: tuple[Any, ...],
    barrier: Any,
    sf_kw: dict[str, Any],
) -> dict[str, Any]:
    sf = make_sf(env, spelling, **sf_kw)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, barrier.wait, HOLD_LIMIT)
    started = time.monotonic()
    results = await asyncio.gather(
        *(_aoutcome(j, started, sf.call(j, arun_job, job)) for j in calls)
    )
    hub = await loop.run_in_executor(None, hub_channels_when_idle, sf)
    sf.close()
    client = sf.settings.async_client
    if client is not None:
        await client.aclose()
    return {"pid": os.getpid(), "results": list(results), "hub": hub}


def call_once(
    env: dict[str, Any],
    spelling: str,
    job_id: str,
    job: tuple[Any, ...],
    out: Any,
    sf_kw: dict[str, Any],
) -> None:
    """One sync call in the main thread (a leader the test may SIGKILL)."""
    sf = make_sf(env, spelling, **sf_kw)
    out.put(_outcome(job_id, time.monotonic(), lambda: sf.call(job_id, run_job, job)))
    sf.close()


def follow_many(env: dict[str, Any], job_ids: list[str], out: Any, sf_kw: dict[str, Any]) -> None:
    """One sync call per job id, each on a thread of its own, all at once; puts {job id: the
    value, or "ran here" if this process had to run the job itself}."""
    sf = make_sf(env, "url", **sf_kw)
    got: dict[str, Any] = {}

    def one(job_id: str) -> None:
        try:
            got[job_id] = sf.call(job_id, lambda: "ran here")
        except Exception as exc:
            got[job_id] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=one, args=(j,)) for j in job_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HOLD_LIMIT * 2)
    out.put(got)
    sf.close()
