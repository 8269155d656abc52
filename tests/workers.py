"""Functions that spawned test processes run: each builds its own SingleFlight from a URL.

Spawned children import this module by name, so everything here is top level. Children
report through a multiprocessing queue and count executions in Redis (``<prefix>:runs``),
which every process can see.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import redis

from dedupe import SingleFlight, current_flight


class Unbuildable(Exception):
    """Its __init__ takes two arguments but it stores one: unpickling it fails."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


class HoldsLock(Exception):
    """Carries a lock in its args: neither it nor any base class can be pickled."""


class Custom(Exception):
    pass


def _sf(url: str, prefix: str, **kw: Any) -> SingleFlight:
    return SingleFlight(url, prefix=prefix, **kw)


def _job(url: str, prefix: str, behaviour: str, duration: float) -> Any:
    """The work: counts its run in Redis, marks itself started, then behaves as asked."""
    r = redis.Redis.from_url(url)
    flight = current_flight()
    assert flight is not None
    r.incr(f"{prefix}:runs")
    r.rpush(f"{prefix}:tokens", flight.token)
    r.set(f"{prefix}:leader-pid", os.getpid())
    r.rpush(f"{prefix}:started", os.getpid())
    if behaviour in ("wait-go", "wait-go-lost"):
        # Held open until the test pushes to <prefix>:go:<pid> (or the duration runs out).
        r.blpop([f"{prefix}:go:{os.getpid()}"], timeout=duration)
        if behaviour == "wait-go-lost":
            # Paused past its lease: the renewer must find out, and tell the function.
            r.rpush(f"{prefix}:lost", int(flight.lost_event.wait(10)))
        return {"pid": os.getpid(), "token": flight.token}
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:  # interruptible by signals, unlike one long sleep
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    if behaviour == "value":
        return {"pid": os.getpid(), "token": flight.token, "blob": "x" * 100}
    if behaviour == "big":
        return "y" * 200_000
    if behaviour == "custom":
        raise Custom("custom failure", 42)
    if behaviour == "unbuildable":
        raise Unbuildable("a", "b")
    if behaviour == "holds-lock":
        raise HoldsLock("cannot travel", threading.Lock())
    if behaviour == "unpicklable":
        return threading.Lock()
    raise AssertionError(behaviour)


def _describe(exc: BaseException) -> dict[str, Any]:
    import traceback

    return {
        "type": type(exc).__name__,
        "module": type(exc).__module__,
        "args": [repr(a) for a in exc.args],
        "traceback": "".join(traceback.format_exception(exc)),
        "attrs": {k: getattr(exc, k) for k in ("type_name", "message") if hasattr(exc, k)},
    }


def herd_sync(
    url: str,
    prefix: str,
    job_id: str,
    behaviour: str,
    duration: float,
    threads: int,
    barrier: Any,
    out: Any,
    sf_kw: dict[str, Any],
) -> None:
    """`threads` threads of this process call one job at the barrier; each result goes to out."""
    sf = _sf(url, prefix, **sf_kw)
    results: list[Any] = []

    def one() -> None:
        barrier.wait(timeout=30)
        try:
            value = sf.call(job_id, _job, url, prefix, behaviour, duration)
            results.append(("ok", os.getpid(), value if behaviour != "unpicklable" else "lock"))
        except BaseException as exc:
            results.append(("err", os.getpid(), _describe(exc)))

    pool = [threading.Thread(target=one) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    out.put(results)
    sf.close()


async def _ajob(url: str, prefix: str, duration: float) -> dict[str, Any]:
    r = redis.Redis.from_url(url)
    flight = current_flight()
    assert flight is not None
    r.incr(f"{prefix}:runs")
    r.rpush(f"{prefix}:started", os.getpid())
    await asyncio.sleep(duration)
    return {"pid": os.getpid(), "token": flight.token}


def herd_async(
    url: str,
    prefix: str,
    job_id: str,
    duration: float,
    tasks: int,
    barrier: Any,
    out: Any,
) -> None:
    sf = _sf(url, prefix)

    async def main() -> list[Any]:
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait, 30)
        got = await asyncio.gather(
            *(sf.call(job_id, _ajob, url, prefix, duration) for _ in range(tasks)),
            return_exceptions=True,
        )
        return [("ok", v) if not isinstance(v, BaseException) else ("err", repr(v)) for v in got]

    out.put(asyncio.run(main()))
    sf.close()


def lead_until_signalled(url: str, prefix: str, job_id: str, lock_ttl: float, out: Any) -> None:
    """Lead a long job in the main thread, so SIGINT lands in it as KeyboardInterrupt."""
    sf = _sf(url, prefix, lock_ttl=lock_ttl)
    try:
        sf.call(job_id, _job, url, prefix, "value", 120.0)
        out.put("finished")
    except KeyboardInterrupt:
        out.put("interrupted")
    sf.close()


def lead_async_until_signalled(
    url: str, prefix: str, job_id: str, lock_ttl: float, out: Any
) -> None:
    """Lead a long async job; SIGINT makes asyncio.run cancel it (CancelledError in the job)."""
    sf = _sf(url, prefix, lock_ttl=lock_ttl)

    async def main() -> None:
        await sf.call(job_id, _ajob, url, prefix, 120.0)

    try:
        asyncio.run(main())
        out.put("finished")
    except KeyboardInterrupt:
        out.put("interrupted")


def call_once(
    url: str,
    prefix: str,
    job_id: str,
    behaviour: str,
    duration: float,
    out: Any,
    sf_kw: dict[str, Any],
) -> None:
    sf = _sf(url, prefix, **sf_kw)
    try:
        value = sf.call(job_id, _job, url, prefix, behaviour, duration)
        out.put(("ok", os.getpid(), value))
    except BaseException as exc:
        out.put(("err", os.getpid(), _describe(exc)))
    sf.close()


def key_of(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    """The default key this process builds for a module-level function and these arguments."""
    sf = SingleFlight("redis://127.0.0.1:1/0")
    from dedupe.core.keys import key_builder

    out.put(key_builder(sample, None)(args, kwargs))
    del sf


def sample(a: Any, b: Any = 2, *rest: Any, c: Any = None, **extra: Any) -> Any:
    return (a, b, rest, c, extra)
