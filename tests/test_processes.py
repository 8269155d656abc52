"""Single-flight across real OS processes (spawned), against a real redis-server.

Synchronisation is through multiprocessing barriers and Redis itself (BLPOP on a list the
job pushes to when it starts, PUBSUB NUMSUB for followers that wait), never sleeps.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from typing import Any

import pytest
import redis
import workers
from helpers import SPAWN, start

from dedupe import SingleFlight
from dedupe.core.keys import names_for


def gather(queue: Any, n: int, timeout: float = 60) -> list[Any]:
    return [queue.get(timeout=timeout) for _ in range(n)]


def flatten(batches: list[list[Any]]) -> list[Any]:
    return [item for batch in batches for item in batch]


def wait_started(client: redis.Redis, prefix: str, timeout: float = 30) -> int:
    """Block (in Redis) until a job has started; its PID."""
    got = client.blpop([f"{prefix}:started"], timeout=timeout)
    assert got is not None, "the job never started"
    return int(got[1])


def wait_subscribers(client: redis.Redis, channel: str, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while client.pubsub_numsub(channel)[0][1] < n:
        assert time.monotonic() < deadline, f"fewer than {n} followers subscribed"
        time.sleep(0.01)


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


@pytest.mark.timeout(60)
def test_custom_exception_reaches_every_process_with_traceback(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any]
) -> None:
    mine, others = _exception_herd(redis_url, prefix, "custom", procs)
    assert int(redis_client.get(f"{prefix}:runs") or 0) == 1
    for kind, _, info in mine + others:
        assert kind == "err"
        assert (info["module"], info["type"]) == ("workers", "Custom")
        assert info["args"] == ["'custom failure'", "42"]
        assert "in _job" in info["traceback"]  # the leader's frames are attached
    # The note naming the leader is an exception note (add_note): Python 3.11 and later.
    noted = ["raised by the dedupe leader" in info["traceback"] for _, _, info in others]
    assert noted == [sys.version_info >= (3, 11)] * len(others)


@pytest.mark.timeout(60)
def test_unbuildable_exception_arrives_as_remote_error_naming_it(
    redis_url: str, prefix: str, procs: list[Any]
) -> None:
    # Its class is imported in every process, but it does not rebuild from its args, and
    # without a signed pickle nothing else may rebuild it: a RemoteError names it.
    mine, others = _exception_herd(redis_url, prefix, "unbuildable", procs)
    assert {info["type"] for _, _, info in mine} == {"Unbuildable"}
    for _, _, info in others:
        assert info["type"] == "RemoteError" and "workers.Unbuildable" in info["args"][0]
        assert "in _job" in info["traceback"]


@pytest.mark.timeout(60)
def test_exception_that_cannot_travel_becomes_remote_error(
    redis_url: str, prefix: str, procs: list[Any]
) -> None:
    mine, others = _exception_herd(redis_url, prefix, "holds-lock", procs)
    assert {info["type"] for _, _, info in mine} == {"HoldsLock"}
    for _, _, info in others:
        assert info["type"] == "RemoteError"
        assert info["attrs"]["type_name"] == "workers.HoldsLock"
        assert "cannot travel" in info["attrs"]["message"]
        assert "in _job" in info["traceback"]


@pytest.mark.timeout(60)
def test_unpicklable_value_raises_in_other_processes_only(
    redis_url: str, prefix: str, procs: list[Any]
) -> None:
    mine, others = _exception_herd(redis_url, prefix, "unpicklable", procs)
    assert all(kind == "ok" for kind, _, _ in mine)
    assert {info["type"] for _, _, info in others} == {"ResultNotSerializable"}


@pytest.mark.timeout(60)
def test_large_value_travels_by_notice(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any]
) -> None:
    mine, others = _exception_herd(redis_url, prefix, "big", procs)
    assert all(kind == "ok" and value == "y" * 200_000 for kind, _, value in mine + others)
    assert int(redis_client.get(f"{prefix}:runs") or 0) == 1


@pytest.mark.timeout(60)
def test_sigkilled_leader_is_taken_over(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any]
) -> None:
    out = SPAWN.Queue()
    kw = {"lock_ttl": 1.0}
    leader = start(procs, workers.call_once, redis_url, prefix, "job", "value", 60.0, out, kw)
    assert wait_started(redis_client, prefix) == leader.pid
    for _ in range(3):
        start(procs, workers.call_once, redis_url, prefix, "job", "value", 0.2, out, kw)
    wait_subscribers(redis_client, names_for(prefix, "job").channel, 3)
    os.kill(leader.pid, signal.SIGKILL)
    results = gather(out, 3, timeout=30)
    assert int(redis_client.get(f"{prefix}:runs") or 0) == 2  # the dead one, and one taker
    assert {r[0] for r in results} == {"ok"}
    values = {(r[2]["pid"], r[2]["token"]) for r in results}
    assert len(values) == 1
    tokens = [int(t) for t in redis_client.lrange(f"{prefix}:tokens", 0, -1)]
    assert tokens[1] > tokens[0]  # the new lease is fenced above the dead one


@pytest.mark.timeout(60)
def test_lease_is_renewed_for_a_job_many_times_its_ttl(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any]
) -> None:
    out = SPAWN.Queue()
    kw = {"lock_ttl": 0.3}
    leader = start(procs, workers.call_once, redis_url, prefix, "long", "value", 2.0, out, kw)
    assert wait_started(redis_client, prefix) == leader.pid
    for _ in range(2):
        start(procs, workers.call_once, redis_url, prefix, "long", "value", 2.0, out, kw)
    results = gather(out, 3, timeout=30)
    assert int(redis_client.get(f"{prefix}:runs") or 0) == 1
    assert {r[2]["pid"] for r in results} == {leader.pid}


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "target", [workers.lead_until_signalled, workers.lead_async_until_signalled]
)
def test_interrupted_leader_hands_over_at_once(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any], target: Any
) -> None:
    """KeyboardInterrupt (sync) or the CancelledError asyncio.run raises on SIGINT (async).

    The lease is 60 s and the test's timeout 30 s: only the abort notice can hand over in time.
    """
    leader_out, out = SPAWN.Queue(), SPAWN.Queue()
    leader = start(procs, target, redis_url, prefix, "abort", 60.0, leader_out)
    assert wait_started(redis_client, prefix) == leader.pid
    start(procs, workers.call_once, redis_url, prefix, "abort", "value", 0.1, out, {})
    wait_subscribers(redis_client, names_for(prefix, "abort").channel, 1)
    os.kill(leader.pid, signal.SIGINT)
    assert leader_out.get(timeout=20) == "interrupted"
    kind, pid, value = out.get(timeout=20)
    assert kind == "ok" and value["pid"] == pid  # the follower took over and ran it
    assert int(redis_client.get(f"{prefix}:runs") or 0) == 2


def _forked_child(url: str, prefix: str, out: Any) -> None:
    out.put(_FORK_SF.call("after-fork", os.getpid))


_FORK_SF: SingleFlight


@pytest.mark.timeout(60)
def test_works_in_processes_forked_after_first_use(redis_url: str, prefix: str) -> None:
    global _FORK_SF
    _FORK_SF = SingleFlight(redis_url, prefix=prefix, result_ttl=0)
    # First use in the parent starts its hub and renewer threads and opens its sockets.
    assert _FORK_SF.call("before-fork", os.getpid) == os.getpid()
    fork = mp.get_context("fork")
    out = fork.Queue()
    children = [fork.Process(target=_forked_child, args=(redis_url, prefix, out)) for _ in range(3)]
    for c in children:
        c.start()
    pids = gather(out, 3, timeout=30)
    for c in children:
        c.join(10)
    assert all(c.exitcode == 0 for c in children)
    assert set(pids) <= {c.pid for c in children}
    # The parent still works after its children used their own copies.
    assert _FORK_SF.call("parent-again", os.getpid) == os.getpid()
    _FORK_SF.close()
