"""Nobody waits forever: every wait is bounded by the lease and wait_timeout and ends with a
re-check against Redis; pub/sub only hurries things along, and no wait depends on a
subscription being confirmed. wait_timeout fails only the waiter, never the caller whose own
call runs the function, and bounds a wait for a command slot too.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import redis
import workers
from helpers import SPAWN, _sf, numsub, start, until

from dedupe import SingleFlight, WaitTimeout
from dedupe.core.keys import names_for
from devtools.servers import RedisServer

# --------------------------------------------------------------------------- wait_timeout


@pytest.mark.timeout(30)
@pytest.mark.compat
def test_wait_timeout_only_fails_the_waiter(sf: SingleFlight, other: SingleFlight) -> None:
    started = threading.Event()
    release = threading.Event()

    def slow() -> str:
        started.set()
        release.wait(10)
        return "done"

    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(sf.call("slow", slow)))
    t.start()
    assert started.wait(10)

    @other(key="slow", wait_timeout=0.2, namespace=False)
    def impatient() -> str:
        raise AssertionError("the follower must not run while the leader holds the lease")

    with pytest.raises(WaitTimeout):
        impatient()
    release.set()
    t.join(10)
    assert result == ["done"]


@pytest.mark.timeout(30)
@pytest.mark.compat
def test_local_waiter_timeout_leaves_leader_alone(sf: SingleFlight) -> None:
    started = threading.Event()
    release = threading.Event()

    @sf(key="k", wait_timeout=0.1)
    def slow() -> str:
        started.set()
        release.wait(10)
        return "done"

    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(slow()))
    t.start()
    assert started.wait(10)
    with pytest.raises(WaitTimeout):
        slow()
    release.set()
    t.join(10)
    assert result == ["done"]


def test_wait_timeout_says_how_long(redis_url: str, prefix: str, sfs: list[Any]) -> None:
    sf_a = _sf(sfs, redis_url, prefix)
    sf_b = _sf(sfs, redis_url, prefix, wait_timeout=0.2)
    go, running = threading.Event(), threading.Event()

    def slow() -> bool:
        running.set()
        return go.wait(20)

    t = threading.Thread(target=lambda: sf_a.call("slow", slow))
    t.start()
    assert running.wait(10)
    with pytest.raises(WaitTimeout, match=r"0\.2 s"):
        sf_b.call("slow", lambda: None)
    go.set()
    t.join(10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_leaders_own_caller_gets_the_value_past_wait_timeout(
    kind: str, redis_url: str, prefix: str, sfs: list[Any]
) -> None:
    sf = _sf(sfs, redis_url, prefix, wait_timeout=0.1)
    if kind == "sync":

        def job() -> str:
            threading.Event().wait(0.5)
            return "done"

        assert sf.call("own", job) == "done"
    else:

        async def ajob() -> str:
            await asyncio.sleep(0.5)
            return "done"

        async def main() -> str:
            try:
                return await sf.call("own", ajob)
            finally:
                await sf.aclose()

        assert asyncio.run(main()) == "done"


def _swallow(sf: SingleFlight, job: str) -> None:
    try:
        sf.call(job, lambda: job)
    except Exception:
        pass


@pytest.mark.timeout(30)
def test_a_caller_queued_for_a_command_slot_waits_no_longer_than_its_wait_timeout(
    redis_server: RedisServer, prefix: str
) -> None:
    """All 64 command slots of the process hang on a half-open link (found by simulation:
    a caller whose acquire waited in the client's queue outlived its wait_timeout by the
    whole queue_timeout). It has no lease yet, so wait_timeout bounds that wait too."""
    from proxy import Proxy

    from dedupe.backend.transport import SLOTS

    with Proxy(redis_server.address) as proxy:
        url = "redis://{}:{}/0".format(*proxy.address)
        sf = SingleFlight(url, prefix=prefix, wait_timeout=0.5, socket_timeout=10)
        backend = sf.backend()
        stuck: list[threading.Thread] = []
        try:
            assert sf.call("warm", lambda: 1) == 1
            proxy.blackhole()
            for i in range(SLOTS):
                t = threading.Thread(target=_swallow, args=(sf, f"stuck-{i}"), daemon=True)
                t.start()
                stuck.append(t)
            until(lambda: backend.transport.free_sync_slots() == 0, 10, "every slot taken")
            with pytest.raises(WaitTimeout) as raised:
                sf.call("late", lambda: "never")
            assert raised.value.job_id == "late"
        finally:
            proxy.heal()
            for t in stuck:
                t.join(15)
            sf.close(timeout=0)


# ---------------------------------------------------------------- pub/sub only hurries things along


@pytest.mark.timeout(40)
@pytest.mark.parametrize("finish", ["after-resubscribe", "while-reconnecting"])
def test_killed_pubsub_connections_cost_a_recheck_not_a_lease(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any], finish: str
) -> None:
    """20+ followers in 3 processes; their pub/sub connections are killed mid-wait."""
    kw = {"lock_ttl": 60.0}
    out, leader_out = SPAWN.Queue(), SPAWN.Queue()
    leader = start(procs, workers.call_once, redis_url, prefix, "j", "wait-go", 30.0, leader_out,
                   kw)  # fmt: skip
    got = redis_client.blpop([f"{prefix}:started"], timeout=20)
    assert got is not None and int(got[1]) == leader.pid
    channel = names_for(prefix, "j").channel
    barrier = SPAWN.Barrier(21)
    for _ in range(3):
        start(procs, workers.herd_sync, redis_url, prefix, "j", "wait-go", 30.0, 7, barrier,
              out, kw)  # fmt: skip
    until(lambda: numsub(redis_client, channel) == 3, what="3 follower processes subscribed")
    killed = redis_client.client_kill_filter(_type="pubsub")
    assert killed >= 3
    if finish == "after-resubscribe":
        until(lambda: numsub(redis_client, channel) == 3, what="followers re-subscribed")
    redis_client.rpush(f"{prefix}:go:{leader.pid}", 1)
    leader_result = leader_out.get(timeout=20)
    followers = [item for _ in range(3) for item in out.get(timeout=20)]
    assert leader_result[0] == "ok"
    assert len(followers) == 21
    assert all(r[0] == "ok" and r[2] == leader_result[2] for r in followers)
    assert int(redis_client.get(f"{prefix}:runs") or 0) == 1
