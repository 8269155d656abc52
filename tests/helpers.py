"""What the test modules share: starting spawned processes, bounded waits, and the helpers
of flights, process herds and leases that tests of several guarantees use (each moved here,
unchanged, from the module that had it before the tests were grouped by promise)."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any

import redis
import workers
from redis.backoff import NoBackoff
from redis.retry import Retry

from dedupe import SingleFlight
from dedupe.core.leases import Lease

SPAWN = mp.get_context("spawn")

SLACK = 1.5
"""What an asserted bound allows beyond the time the README promises: scheduling of threads
and event loops on a loaded machine (2 cores shared with other suites); the stuck callers of
the command-slot test end 0.01-0.12 s after their promised 4 s there."""


def start(procs: list[Any], target: Any, *args: Any) -> Any:
    """Start ``target(*args)`` in a spawned process; the ``procs`` fixture cleans it up."""
    p = SPAWN.Process(target=target, args=args)
    p.start()
    procs.append(p)
    return p


def until(check: Callable[[], bool], timeout: float = 15, what: str = "condition") -> None:
    """Poll ``check`` until it holds; fail the test (not hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# --------------------------------------------------------------------------- flights


def _sf(made: list[SingleFlight], url: str, prefix: str, **kw: Any) -> SingleFlight:
    sf = SingleFlight(url, prefix=prefix, **kw)
    made.append(sf)
    return sf


def numsub(client: redis.Redis, channel: str) -> int:
    return int(client.pubsub_numsub(channel)[0][1])


def commandstats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


# --------------------------------------------------------------------------- process herds


def gather(queue: Any, n: int, timeout: float = 60) -> list[Any]:
    return [queue.get(timeout=timeout) for _ in range(n)]


def flatten(batches: list[list[Any]]) -> list[Any]:
    return [item for batch in batches for item in batch]


def wait_started(client: redis.Redis, prefix: str, timeout: float = 30) -> int:
    """Block (in Redis) until a job has started; its PID."""
    got = client.blpop([f"{prefix}:started"], timeout=timeout)
    assert got is not None, "the job never started"
    return int(got[1])


def _exception_herd(
    redis_url: str, prefix: str, behaviour: str, procs: list[Any]
) -> tuple[list[Any], list[Any]]:
    """Three processes of 4 threads each; returns (results in the leader's process, the others)."""
    n_proc, n_threads = 3, 4
    barrier, out = SPAWN.Barrier(n_proc * n_threads), SPAWN.Queue()
    for _ in range(n_proc):
        start(procs, workers.herd_sync, redis_url, prefix, behaviour, behaviour, 0.4, n_threads,
              barrier, out, {})  # fmt: skip
    results = flatten(gather(out, n_proc))
    leader_pid = int(redis.Redis.from_url(redis_url).get(f"{prefix}:leader-pid") or 0)
    mine = [r for r in results if r[1] == leader_pid]
    others = [r for r in results if r[1] != leader_pid]
    assert len(mine) == n_threads and len(others) == (n_proc - 1) * n_threads
    return mine, others


# --------------------------------------------------------------------------- leases


def _client(address: tuple[str, int], socket_timeout: float = 10.0) -> redis.Redis:
    """A renewal client as the backend makes it: no retries, RESP2 (the proxy counts RESP2)."""
    host, port = address
    return redis.Redis(
        host=host,
        port=port,
        socket_timeout=socket_timeout,
        socket_connect_timeout=2,
        retry=Retry(NoBackoff(), 0),
        protocol=2,
    )


def _hold(client: redis.Redis, key: str, ttl: float, value: str = "1:me") -> Lease:
    """Take the lock as an acquire would, and the Lease for it (its period starts at the send)."""
    sent = time.monotonic()
    assert client.set(key, value, px=int(ttl * 1000), nx=True)
    return Lease(key, key, value, ttl, acquired_at=sent, max_hold=None)


def _take_over(client: redis.Redis, key: str, timeout: float = 15) -> None:
    """Wait (bounded) until another caller could take the lock: only once it expired."""
    until(
        lambda: bool(client.set(key, "2:taker", px=60_000, nx=True)), timeout, "the lock to expire"
    )
