"""One run per burst: concurrent calls with the same job id, on any number of threads,
tasks, event loops, processes and machines sharing the Redis, run the function once while
its leader lives and reaches Redis; every caller gets its value or the same exception.

In one process (threads, tasks, sync and async callers of one key), across two instances (as
good as two processes, without the spawn), and across spawned processes. The Cluster and
Sentinel herds are in test_cluster.py and test_sentinel.py; tests/README.md maps the rest.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import redis
import workers
from helpers import SPAWN, _exception_herd, _sf, commandstats, flatten, gather, start, until

from dedupe import SingleFlight

pytestmark = pytest.mark.timeout(30)


# --------------------------------------------------------------------------- in one process


@pytest.mark.compat
def test_threads_share_one_run_and_one_lock_attempt(
    sf: SingleFlight, redis_client: redis.Redis
) -> None:
    runs: list[int] = []
    gate = threading.Event()
    barrier = threading.Barrier(16)

    @sf(key="user:{user_id}")
    def load(user_id: int) -> dict[str, int]:
        runs.append(user_id)
        gate.wait(10)  # hold the flight open until every thread has joined it
        return {"id": user_id}

    results: list[Any] = []

    def caller() -> None:
        barrier.wait(10)
        results.append(load(7))

    threads = [threading.Thread(target=caller) for _ in range(16)]
    sf.call("warm-up", lambda: None)  # loads the scripts, so only the flight is counted
    redis_client.config_resetstat()
    for t in threads:
        t.start()
    # Hold the flight open until all sixteen threads have joined its one entry.
    deadline = time.monotonic() + 10
    while sum(e.waiters for e in sf.backend().sync_flights._entries.values()) < 16:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    gate.set()
    for t in threads:
        t.join(10)
    assert runs == [7]
    assert results == [{"id": 7}] * 16
    stats = commandstats(redis_client)
    # One caller costs one acquire and one complete; sixteen threads cost the same.
    assert stats.get("evalsha", 0) == 2 and "eval" not in stats
    assert stats.get("subscribe", 0) == 0


@pytest.mark.compat
async def test_tasks_share_one_run(sf: SingleFlight) -> None:
    runs = 0

    @sf(key="report:{rid}")
    async def report(rid: str) -> str:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.2)
        return f"report {rid}"

    results = await asyncio.gather(*(report("q3") for _ in range(50)))
    assert runs == 1
    assert results == ["report q3"] * 50
    assert sf.stats()["flights_in_process"] == 0


@pytest.mark.timeout(60)
def test_mixed_sync_and_async_callers_of_one_key(
    redis_url: str, prefix: str, sfs: list[Any]
) -> None:
    """Sync threads and async tasks of one key in one process: the job runs once."""
    sf = _sf(sfs, redis_url, prefix, result_ttl=5)
    runs: list[str] = []
    go = threading.Event()

    def sync_job() -> str:
        runs.append("sync")
        assert go.wait(20)
        return "v"

    async def async_job() -> str:
        runs.append("async")
        return "v"

    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(sf.call("mixed", sync_job)))
        for _ in range(5)
    ]
    for t in threads:
        t.start()
    until(lambda: bool(runs), what="the sync leader")

    async def main() -> list[str]:
        try:
            tasks = [asyncio.ensure_future(sf.call("mixed", async_job)) for _ in range(5)]
            await asyncio.sleep(0)
            go.set()
            return list(await asyncio.gather(*tasks))
        finally:
            await sf.aclose()

    results.extend(asyncio.run(main()))
    for t in threads:
        t.join(20)
    assert results == ["v"] * 10
    assert runs == ["sync"]


# ------------------------------------------------------------------- across instances and processes


@pytest.mark.compat
def test_follower_instance_gets_leader_value(sf: SingleFlight, other: SingleFlight) -> None:
    started = threading.Event()
    release = threading.Event()
    runs: list[str] = []

    def work(tag: str) -> str:
        runs.append(tag)
        started.set()
        release.wait(10)
        return f"from {tag}"

    leader_result: list[str] = []
    t = threading.Thread(target=lambda: leader_result.append(sf.call("job", work, "leader")))
    t.start()
    assert started.wait(10)
    follower_result: list[str] = []
    f = threading.Thread(target=lambda: follower_result.append(other.call("job", work, "f")))
    f.start()
    # The follower subscribes before we let the leader finish.
    deadline = time.monotonic() + 10
    while not other.backend().hub().channels():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    release.set()
    t.join(10)
    f.join(10)
    assert runs == ["leader"]
    assert leader_result == ["from leader"]
    assert follower_result == ["from leader"]
    deadline = time.monotonic() + 10
    while other.backend().hub().channels():  # the UNSUBSCRIBE is acked asynchronously
        assert time.monotonic() < deadline
        time.sleep(0.005)


@pytest.mark.timeout(60)
def test_sync_herd_across_processes(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any]
) -> None:
    n_proc, n_threads = 4, 8
    barrier, out = SPAWN.Barrier(n_proc * n_threads), SPAWN.Queue()
    for _ in range(n_proc):
        start(procs, workers.herd_sync, redis_url, prefix, "herd", "value", 0.5, n_threads,
              barrier, out, {})  # fmt: skip
    results = flatten(gather(out, n_proc))
    assert int(redis_client.get(f"{prefix}:runs") or 0) == 1
    assert len(results) == n_proc * n_threads
    assert {r[0] for r in results} == {"ok"}
    values = {(r[2]["pid"], r[2]["token"]) for r in results}
    assert len(values) == 1  # every caller got the one leader's value
    assert len({r[1] for r in results}) == n_proc


@pytest.mark.timeout(60)
def test_async_herd_across_processes(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any]
) -> None:
    n_proc, n_tasks = 3, 20
    barrier, out = SPAWN.Barrier(n_proc), SPAWN.Queue()
    for _ in range(n_proc):
        start(procs, workers.herd_async, redis_url, prefix, "aherd", 0.5, n_tasks, barrier, out)
    results = flatten(gather(out, n_proc))
    assert int(redis_client.get(f"{prefix}:runs") or 0) == 1
    assert len(results) == n_proc * n_tasks
    assert {r[0] for r in results} == {"ok"}
    assert len({(r[1]["pid"], r[1]["token"]) for r in results}) == 1


@pytest.mark.timeout(60)
def test_large_value_travels_by_notice(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any]
) -> None:
    mine, others = _exception_herd(redis_url, prefix, "big", procs)
    assert all(kind == "ok" and value == "y" * 200_000 for kind, _, value in mine + others)
    assert int(redis_client.get(f"{prefix}:runs") or 0) == 1
