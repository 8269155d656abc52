"""Dead leaders are replaced: a leader that dies stops renewing its lease, and within about
lock_ttl one waiter takes over while the rest get its outcome; a leader aborted by
KeyboardInterrupt, SystemExit or CancelledError releases the lease and tells the waiters at
once. Real processes, SIGKILL and SIGINT; the Cluster's is in test_cluster.py.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
import redis
import workers
from helpers import SPAWN, gather, start, wait_started

from dedupe.core.keys import names_for


def wait_subscribers(client: redis.Redis, channel: str, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while client.pubsub_numsub(channel)[0][1] < n:
        assert time.monotonic() < deadline, f"fewer than {n} followers subscribed"
        time.sleep(0.01)


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
