"""Nothing left behind for long: every key dedupe writes has a TTL of at most
max(token_ttl, result_ttl, lock_ttl + 2 s); a channel's subscription closes soon after its
last follower; the process's tables, renewals and hub objects empty out.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any

import pytest
import redis
from helpers import _sf

from dedupe import SingleFlight

pytestmark = pytest.mark.timeout(30)


def _assert_clean(instances: list[SingleFlight], client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    assert keys, "the flights should have left their result/token keys"
    for key in keys:
        assert client.pttl(key) > 0, f"{key!r} has no TTL"
    deadline = time.monotonic() + 10
    for sf in instances:
        while sf.backend().hub().channels():  # UNSUBSCRIBE goes out after the flight
            assert time.monotonic() < deadline
            time.sleep(0.005)
    assert client.pubsub_channels(f"{prefix}:*") == []
    for sf in instances:
        backend = sf.backend()
        assert backend.stats()["flights_in_process"] == 0
        assert backend.renewer().pending() == 0


def test_everything_has_a_ttl_and_nothing_stays_subscribed(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    sf = SingleFlight(redis_url, prefix=prefix, lock_ttl=0.5)
    follower = SingleFlight(redis_url, prefix=prefix, lock_ttl=0.5)
    gate = threading.Event()
    started = threading.Event()

    def slow(x: int) -> int:
        started.set()
        gate.wait(10)
        return x

    def boom() -> None:
        raise ValueError("x")

    def big() -> bytes:
        return b"z" * 100_000

    def interrupted() -> None:
        raise KeyboardInterrupt

    t = threading.Thread(target=lambda: sf.call("slow", slow, 1))
    t.start()
    assert started.wait(10)
    got: list[Any] = []
    f = threading.Thread(target=lambda: got.append(follower.call("slow", slow, 2)))
    f.start()
    deadline = time.monotonic() + 10
    while not follower.backend().hub().channels():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    gate.set()
    t.join(10)
    f.join(10)
    assert got == [1]
    with pytest.raises(ValueError):
        sf.call("boom", boom)
    assert len(sf.call("big", big)) == 100_000
    with pytest.raises(KeyboardInterrupt):
        sf.call("interrupted", interrupted)

    async def job() -> str:
        await asyncio.sleep(0.01)
        return "a"

    async def herd() -> list[str]:
        return await asyncio.gather(*(sf.call("async", job) for _ in range(10)))

    assert asyncio.run(herd()) == ["a"] * 10
    _assert_clean([sf, follower], redis_client, prefix)
    sf.close()
    follower.close()


def test_renewal_stops_with_the_flight(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    # A lease long enough that a loaded machine renews it in time (a renewal later than the
    # lease minus its margin counts as a loss).
    sf = SingleFlight(redis_url, prefix=prefix, lock_ttl=2.0)
    renewed = threading.Event()
    lock_key = f"{prefix}:{{long}}:lock"

    def long_job() -> str:
        # Outlive several renewal periods: the lock's TTL must have been pushed back up.
        # A renewal shows as the TTL jumping up between two consecutive looks.
        last = redis_client.pttl(lock_key)
        deadline = time.monotonic() + 5
        while not renewed.is_set() and time.monotonic() < deadline:
            now = redis_client.pttl(lock_key)
            if now > last:
                renewed.set()
            last = now
            time.sleep(0.005)
        return "ok"

    assert sf.call("long", long_job) == "ok"
    assert renewed.is_set()
    assert redis_client.exists(lock_key) == 0
    assert sf.backend().renewer().pending() == 0
    sf.close()


def test_a_finished_flights_hub_objects_are_gone(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    """A follower's channel state and its confirmation latch live as long as its flight:
    once the flights end (and the subscriptions linger out), none is reachable, not from a
    parked hub thread's locals either."""
    from dedupe.core import signals
    from dedupe.core.subscriptions import _Channel

    n = 300
    leader = SingleFlight(redis_url, prefix=prefix, lock_ttl=10)
    follower = SingleFlight(redis_url, prefix=prefix, lock_ttl=10)
    release = threading.Event()
    all_started = threading.Event()
    started: list[int] = []

    def hold(i: int) -> int:
        started.append(i)
        if len(started) == n:
            all_started.set()
        release.wait(20)
        return i

    def ours() -> tuple[int, int]:
        gc.collect()
        objs = gc.get_objects()
        channels = sum(1 for o in objs if isinstance(o, _Channel) and prefix in o.name)
        return channels, sum(1 for o in objs if isinstance(o, signals.Latch))

    _, latches_before = ours()
    threads = [threading.Thread(target=leader.call, args=(f"j{i}", hold, i)) for i in range(n)]
    for t in threads:
        t.start()
    assert all_started.wait(20)

    async def follow_all() -> list[int]:
        return list(await asyncio.gather(*(follower.call(f"j{i}", _never) for i in range(n))))

    got: list[Any] = []
    f = threading.Thread(target=lambda: got.append(asyncio.run(follow_all())))
    f.start()
    deadline = time.monotonic() + 20
    while len(follower.backend().hub().channels()) < n:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    release.set()
    f.join(20)
    for t in threads:
        t.join(20)
    assert got == [list(range(n))]
    _assert_clean([leader, follower], redis_client, prefix)
    channels, latches = ours()
    assert channels == 0, f"{channels} channel states still reachable"
    assert latches <= latches_before, f"{latches - latches_before} more latches than before"
    leader.close()
    follower.close()


async def _never() -> int:
    raise AssertionError("a follower ran the job")


# --------------------------------------------------------------------------- what 200 flights leave


@pytest.mark.timeout(60)
def test_what_a_flight_leaves_is_short_lived(
    redis_url: str, redis_client: redis.Redis, prefix: str, sfs: list[Any]
) -> None:
    sf = _sf(sfs, redis_url, prefix, result_ttl=1)
    for i in range(200):
        sf.call(f"id-{i}", lambda: 1)
    keys = list(redis_client.scan_iter(f"{prefix}:*", count=1000))
    assert keys
    for key in keys:
        ttl = redis_client.pttl(key)
        assert 0 < ttl <= 61_000, (key, ttl)
