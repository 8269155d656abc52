"""The lease watchdog against real redis-server processes: the clock decides a lost lease,
groups renew independently and in batches, max_hold, async waiting, closed loops and fork."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import redis
import redis.cluster
import workers
from helpers import SPAWN, start, until
from proxy import Proxy
from redis.backoff import NoBackoff
from redis.retry import Retry

from dedupe import SingleFlight
from dedupe.backend.renewal import Renewer, renew_many
from dedupe.core import leases
from dedupe.core.context import Flight
from dedupe.core.keys import names_for
from dedupe.core.leases import RENEW_UNKNOWN, Lease, LostSignal, lease_margin
from dedupe.errors import LeaseLost
from devtools.servers import RedisClusterSet, RedisServer

pytestmark = pytest.mark.timeout(40)


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


def _evalsha_calls(client: redis.Redis) -> int:
    stats: Any = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0)) + int(
        stats.get("cmdstat_eval", {}).get("calls", 0)
    )


@pytest.fixture
def renewers() -> Iterator[Callable[..., Renewer]]:
    made: list[Renewer] = []

    def make(*args: Any, **kw: Any) -> Renewer:
        r = Renewer(*args, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[Proxy]:
    with Proxy(redis_server.address, count_resp=True) as p:
        yield p


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


# --------------------------------------------------------------------------- the clock


def test_is_set_is_computed_from_the_clock_with_no_thread_running() -> None:
    ttl = 0.5
    fresh = Lease("job", "lock", "1:me", ttl)  # never added to a renewer
    flight = Flight("job", 1, fresh.lost)
    assert not flight.lease_lost
    assert 0 < flight.time_left <= ttl - lease_margin(ttl)
    flight.check()

    stale = Lease(
        "job", "lock", "1:me", ttl, acquired_at=time.monotonic() - ttl + lease_margin(ttl)
    )
    flight = Flight("job", 2, stale.lost)
    assert flight.lease_lost and flight.time_left == 0.0
    with pytest.raises(LeaseLost):
        flight.check()
    assert stale.lost.event().is_set()  # the event agrees with the clock
    # No lease at all (on_backend_error="local"): never lost.
    assert not Flight("job", 0, LostSignal()).lease_lost


def test_margin() -> None:
    assert lease_margin(10.0) == pytest.approx(0.5)
    assert lease_margin(1.0) == pytest.approx(0.05)
    assert lease_margin(0.1) == pytest.approx(0.01)
    assert lease_margin(0.012) == pytest.approx(0.004)  # never more than ttl/3


@pytest.mark.timeout(30)
def test_blackholed_renewal_lease_is_lost_by_the_clock_before_anyone_can_take_over(
    proxy: Proxy,
    redis_client: redis.Redis,
    prefix: str,
    renewers: Callable[..., Renewer],
) -> None:
    """The renewal round trip hangs (half-open link, socket timeout 10 s > the 1 s lease):
    the leader must know its lease is lost before the lock expires, not seconds after."""
    through = _client(proxy.address, socket_timeout=10.0)
    key = f"{prefix}:lock"
    lease = _hold(redis_client, key, 1.0)
    flight = Flight(key, 1, lease.lost)
    renewer = renewers(lambda items: renew_many(through, items))
    renewer.add(lease)
    until(lambda: renewer.stats()["renewed"] >= 1, 5, "a first confirmed renewal")
    proxy.blackhole()
    until(lambda: proxy.held > 0, 5, "a renewal round trip to hang")
    batches = renewer.stats()["renewal_batches"]

    _take_over(redis_client, key)  # another caller takes over once Redis expired the lock
    # By then the leader already knew, from the clock alone...
    assert flight.lease_lost
    with pytest.raises(LeaseLost):
        flight.check()
    # ...while its renewal round trip was (and is) still blocked in the blackhole.
    assert proxy.held > 0
    assert renewer.stats()["renewal_batches"] == batches
    # The scheduler also fired the event for those who wait on it.
    assert flight.lost_event.wait(5)
    assert renewer.stats()["lost_clock"] == 1
    proxy.heal()
    # The late reply (if any) must not resurrect the lease.
    until(lambda: renewer.stats()["renewal_batches"] > batches, 15, "the blocked batch to end")
    assert flight.lease_lost and renewer.pending() == 0


@pytest.mark.timeout(30)
def test_a_stuck_group_does_not_delay_another_group(
    redis_server: RedisServer,
    fresh_redis: RedisServer,
    prefix: str,
    renewers: Callable[..., Renewer],
) -> None:
    """Two servers, two groups; the link to A is blackholed (its round trip hangs 10 s):
    the lease on B keeps being renewed, past its own length, and is never lost."""
    direct_a, direct_b = redis_server.client(), fresh_redis.client()
    with Proxy(redis_server.address) as proxy_a:
        via_a = _client(proxy_a.address, socket_timeout=10.0)
        via_b = _client(fresh_redis.address, socket_timeout=10.0)
        key_a, key_b = f"{prefix}:a:lock", f"{prefix}:b:lock"

        def group_of(key: str) -> str:
            return "A" if key == key_a else "B"

        def renew(items: list[tuple[str, str, int]]) -> Sequence[int]:
            return renew_many(via_a if group_of(items[0][0]) == "A" else via_b, items)

        renewer = renewers(renew, group_of)
        lease_a, lease_b = _hold(direct_a, key_a, 1.0), _hold(direct_b, key_b, 1.0)
        renewer.add(lease_a)
        renewer.add(lease_b)
        until(lambda: renewer.stats()["renewed"] >= 2, 5, "both leases renewed once")
        proxy_a.blackhole()
        until(lambda: proxy_a.held > 0, 5, "a renewal on A to hang")
        start = _evalsha_calls(direct_b)
        # Four renewals of B take longer than B's lease: all while A's round trip hangs.
        until(lambda: _evalsha_calls(direct_b) >= start + 4, 10, "B renewed while A hangs")
        assert proxy_a.held > 0
        assert not lease_b.lost.is_set()
        assert direct_b.get(key_b) == b"1:me" and direct_b.pttl(key_b) > 0
        until(lease_a.lost.is_set, 5, "A's lease lost by the clock")
        assert not lease_b.lost.is_set()
        proxy_a.heal()


@pytest.mark.timeout(40)
def test_ten_thousand_leases_renew_in_a_few_round_trips(
    proxy: Proxy,
    redis_client: redis.Redis,
    prefix: str,
    renewers: Callable[..., Renewer],
) -> None:
    n, ttl = 10_000, 3.0
    keys = [f"{prefix}:{i}:lock" for i in range(n)]
    sent = time.monotonic()
    pipe = redis_client.pipeline(transaction=False)
    for key in keys:
        pipe.set(key, "1:me", px=int(ttl * 1000))
    pipe.execute()
    leases = [Lease(key, key, "1:me", ttl, acquired_at=sent, max_hold=None) for key in keys]
    through = _client(proxy.address)
    renewer = renewers(lambda items: renew_many(through, items))
    calls_before = _evalsha_calls(redis_client)
    for lease in leases:
        renewer.add(lease)
    until(lambda: renewer.stats()["renewed"] >= n, 30, "every lease renewed once")
    # Counted outside our code: the server ran the renewals, the proxy saw the round trips.
    assert _evalsha_calls(redis_client) - calls_before >= n
    assert proxy.commands >= n
    assert proxy.round_trips <= 20, f"{proxy.round_trips} round trips for {n} renewals"
    stats = renewer.stats()
    print(f"round trips {proxy.round_trips}, commands {proxy.commands}, stats {stats}")
    assert stats["renewal_batches"] <= 10
    assert not any(lease.lost.is_set() for lease in leases)
    for lease in leases:
        renewer.remove(lease)
    assert renewer.pending() == 0


def test_a_lease_past_its_deadline_at_the_first_look_is_renewed_all_the_same(
    redis_client: redis.Redis, prefix: str, renewers: Callable[..., Renewer]
) -> None:
    """Redis granted a full TTL, but the renewer first looks only after the lease's local
    deadline (its thread was starved, or the lease was dated too early): the leader is told
    at once, and the lock is renewed anyway, so it does not lapse under a live leader."""
    key = f"{prefix}:lock"
    ttl = 0.6
    assert redis_client.set(key, "1:me", px=int(ttl * 1000))
    lease = Lease(key, key, "1:me", ttl, acquired_at=time.monotonic() - ttl, max_hold=None)
    assert lease.lost.is_set()  # past its deadline before any thread of ours ran
    renewer = renewers(lambda items: renew_many(redis_client, items))
    renewer.add(lease)
    # Renewed for longer than the TTL Redis granted: the lock outlives it, still ours.
    until(lambda: renewer.stats()["renewed"] >= 5, 10, "renewals past the granted TTL")
    assert redis_client.get(key) == b"1:me"
    assert lease.lost.is_set() and renewer.stats()["lost_clock"] == 1
    renewer.remove(lease)
    _take_over(redis_client, key, 5)


# --------------------------------------------------------------------------- ending a lease


def test_max_hold_stops_renewal_and_tells_the_leader(
    redis_client: redis.Redis,
    prefix: str,
    renewers: Callable[..., Renewer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = f"{prefix}:lock"
    sent = time.monotonic()
    assert redis_client.set(key, "1:me", px=600)
    lease = Lease(key, key, "1:me", 0.6, acquired_at=sent, max_hold=1.5)
    renewer = renewers(lambda items: renew_many(redis_client, items))
    with caplog.at_level(logging.WARNING, logger="dedupe"):
        renewer.add(lease)
        assert lease.lost.event().wait(10)
        until(lambda: renewer.stats()["lost_max_hold"] == 1, 5, "the loss to be counted")
        until(lambda: "held longer than max_hold=1.5" in caplog.text, 5, "the warning")
    assert renewer.stats()["renewed"] >= 2  # it was renewed until then
    with pytest.raises(LeaseLost):
        Flight(key, 1, lease.lost).check()
    _take_over(redis_client, key, 5)  # renewal stopped: a waiter takes over when it expires
    assert renewer.pending() == 0


def test_owner_mismatch_stops_renewal_for_good(
    redis_client: redis.Redis, prefix: str, renewers: Callable[..., Renewer]
) -> None:
    key = f"{prefix}:lock"
    lease = _hold(redis_client, key, 1.0)
    renewer = renewers(lambda items: renew_many(redis_client, items))
    renewer.add(lease)
    until(lambda: renewer.stats()["renewed"] >= 1, 5, "a renewal")
    redis_client.set(key, "9:thief", px=60_000)
    assert lease.lost.event().wait(5)
    assert renewer.stats()["lost_mismatch"] == 1
    assert renewer.pending() == 0
    assert redis_client.get(key) == b"9:thief"  # never touched again


def test_removed_lease_stops_being_renewed(
    redis_client: redis.Redis, prefix: str, renewers: Callable[..., Renewer]
) -> None:
    key = f"{prefix}:lock"
    lease = _hold(redis_client, key, 1.0)
    renewer = renewers(lambda items: renew_many(redis_client, items))
    renewer.add(lease)
    until(lambda: renewer.stats()["renewed"] >= 1, 5, "a renewal")
    renewer.remove(lease)
    assert renewer.pending() == 0
    _take_over(redis_client, key, 5)
    assert renewer.lost == 0  # a removal is not a loss


def test_a_renewal_racing_our_own_complete_is_a_release_not_a_loss(
    redis_client: redis.Redis,
    prefix: str,
    renewers: Callable[..., Renewer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = f"{prefix}:lock"
    lease = _hold(redis_client, key, 0.6)
    renewer = renewers(lambda items: renew_many(redis_client, items))
    with caplog.at_level(logging.WARNING, logger="dedupe"):
        renewer.add(lease)
        until(lambda: renewer.stats()["renewed"] >= 1, 5, "a renewal")
        renewer.completing(lease)  # the driver is about to send the complete script...
        redis_client.delete(key)  # ...which deletes the lock before remove() is called
        until(lambda: renewer.stats()["released"] == 1, 5, "a renewal to find the lock gone")
    assert renewer.lost == 0 and not lease.lost.is_set() and renewer.pending() == 0
    assert key not in caplog.text


def test_lease_of_a_closed_event_loop_is_abandoned(
    redis_client: redis.Redis, prefix: str, renewers: Callable[..., Renewer]
) -> None:
    key = f"{prefix}:lock"
    loop = asyncio.new_event_loop()
    sent = time.monotonic()
    assert redis_client.set(key, "1:me", px=1000)
    lease = Lease(key, key, "1:me", 1.0, acquired_at=sent, max_hold=None, loop=loop)
    renewer = renewers(lambda items: renew_many(redis_client, items))
    renewer.add(lease)
    until(lambda: renewer.stats()["renewed"] >= 1, 5, "a renewal")
    loop.close()  # the leader's loop is gone, and with it whoever would remove the lease
    _take_over(redis_client, key, 5)
    until(lambda: renewer.stats()["abandoned"] == 1, 5, "the lease to be dropped")
    assert renewer.pending() == 0


def test_close_marks_held_leases_lost(
    redis_client: redis.Redis, prefix: str, renewers: Callable[..., Renewer]
) -> None:
    lease = _hold(redis_client, f"{prefix}:lock", 5.0)
    renewer = renewers(lambda items: renew_many(redis_client, items))
    renewer.add(lease)
    renewer.close()
    assert lease.lost.is_set() and renewer.stats()["lost_closed"] == 1
    late = Lease("job", "lock", "1:me", 5.0)
    renewer.add(late)  # after close: lost at once, never silently unrenewed
    assert late.lost.is_set()


# --------------------------------------------------------------------------- scripted replies


def test_a_reply_after_the_deadline_does_not_bring_the_lease_back(
    renewers: Callable[..., Renewer],
) -> None:
    release = threading.Event()

    def late(items: list[tuple[str, str, int]]) -> list[int]:
        release.wait(10)  # answers "renewed", but only after the lease counted as lost
        return [1] * len(items)

    renewer = renewers(late)
    lease = Lease("job", "lock", "1:me", 0.15, max_hold=None)
    renewer.add(lease)
    assert lease.lost.event().wait(5)
    release.set()
    until(lambda: renewer.stats()["renewed"] >= 1, 5, "the late reply")
    # The leader was told, and stays told; Redis says the lock is ours, so it is still
    # renewed while the driver holds it (a second run must not start beside a live leader).
    assert lease.lost.is_set() and renewer.stats()["lost_clock"] == 1
    assert renewer.pending() == 1
    renewer.remove(lease)
    until(lambda: renewer.pending() == 0, 5, "renewal to stop once the driver let go")


def test_renewal_errors_until_the_deadline_count_as_error(
    renewers: Callable[..., Renewer],
) -> None:
    def failing(items: list[tuple[str, str, int]]) -> list[int]:
        raise redis.ConnectionError("refused")

    renewer = renewers(failing)
    lease = Lease("job", "lock", "1:me", 0.15, max_hold=None)
    renewer.add(lease)
    assert lease.lost.event().wait(5)
    until(lambda: renewer.stats()["lost_error"] == 1, 5, "the loss counted as an error")
    assert renewer.stats()["renewal_batches"] >= 2  # it retried while the lease might live


def test_losses_are_counted_each_and_logged_at_a_bounded_rate(
    renewers: Callable[..., Renewer], caplog: pytest.LogCaptureFixture
) -> None:
    renewer = renewers(lambda items: [0] * len(items), batch_max=50)
    leases = [Lease(f"rate{i}", f"lock{i}", "1:me", 1.0, max_hold=None) for i in range(200)]
    with caplog.at_level(logging.WARNING, logger="dedupe"):
        for lease in leases:
            renewer.add(lease)
        until(lambda: renewer.stats()["lost_mismatch"] == 200, 10, "every loss counted")
        until(lambda: "more leases lost" in caplog.text, 5, "the summary line")
    assert all(lease.lost.is_set() for lease in leases)
    assert renewer.stats()["renewal_batches"] == 4
    ours = [r for r in caplog.records if isinstance(r.args, tuple) and "'rate" in r.getMessage()]
    assert 0 < len(ours) <= 40  # 20 a second (the losses may straddle two seconds), not 200


# --------------------------------------------------------------------------- async leaders


async def test_async_leader_awaits_wait_lost(
    redis_client: redis.Redis, prefix: str, renewers: Callable[..., Renewer]
) -> None:
    key = f"{prefix}:lock"
    lease = _hold(redis_client, key, 1.0)
    flight = Flight(key, 1, lease.lost)
    renewer = renewers(lambda items: renew_many(redis_client, items))
    renewer.add(lease)
    assert await flight.wait_lost(timeout=0.05) is False  # alive: the bounded wait ends
    here = asyncio.create_task(flight.wait_lost())

    # A second leader-side waiter on another thread's event loop.
    other: list[bool] = []
    ready = threading.Event()

    async def elsewhere() -> None:
        ready.set()
        other.append(await flight.wait_lost(timeout=10))

    thread = threading.Thread(target=lambda: asyncio.run(elsewhere()))
    thread.start()
    await asyncio.to_thread(ready.wait, 5)
    await asyncio.to_thread(until, lambda: renewer.stats()["renewed"] >= 1, 5, "a renewal")
    assert not here.done()
    redis_client.set(key, "9:thief", px=60_000)  # the next renewal finds the lock not ours
    assert await asyncio.wait_for(here, 10) is True
    await asyncio.to_thread(thread.join, 10)
    assert other == [True]


async def test_wait_lost_wakes_at_the_deadline_with_no_thread_at_all() -> None:
    lease = Lease("job", "lock", "1:me", 0.2)  # in no renewer: only the clock can tell
    assert await asyncio.wait_for(Flight("job", 1, lease.lost).wait_lost(), 5) is True


# --------------------------------------------------------------------------- renew_many


def test_renew_many_standalone_and_noscript_fallback(
    redis_client: redis.Redis, prefix: str
) -> None:
    mine, theirs, gone = (f"{prefix}:{n}" for n in ("mine", "theirs", "gone"))
    redis_client.set(mine, "1:me", px=1000)
    redis_client.set(theirs, "1:other", px=1000)
    redis_client.script_flush()  # the first renewal meets NOSCRIPT and falls back to EVAL
    items = [(mine, "1:me", 5000), (theirs, "1:me", 5000), (gone, "1:me", 5000)]
    assert renew_many(redis_client, items) == [1, 0, 0]
    assert redis_client.pttl(mine) > 1000 and redis_client.pttl(theirs) <= 1000
    redis_client.set(gone, "not a lock")
    redis_client.hset(f"{prefix}:hash", "f", "v")
    assert renew_many(redis_client, [(f"{prefix}:hash", "1:me", 5000)]) == [0]
    assert renew_many(redis_client, []) == []


def test_renew_many_raises_when_the_round_trip_fails(fresh_redis: RedisServer) -> None:
    client = _client(fresh_redis.address, socket_timeout=1.0)
    fresh_redis.stop()
    with pytest.raises(redis.ConnectionError):
        renew_many(client, [("k", "1:me", 1000)])


@pytest.mark.cluster
def test_renew_many_on_a_cluster_one_pipeline_per_node(
    redis_cluster: RedisClusterSet, prefix: str, renewers: Callable[..., Renewer]
) -> None:
    cluster: Any = redis_cluster.client()
    keys = [f"{prefix}:{{job{i}}}:lock" for i in range(300)]
    for key in keys:
        cluster.set(key, "1:me", px=60_000)
    items = [(key, "1:me", 120_000) for key in keys]
    assert renew_many(cluster, items) == [1] * len(keys)
    assert all(cluster.pttl(key) > 60_000 for key in keys)
    # And through a Renewer, one group per node.
    nodes = {cluster.get_node_from_key(key).name for key in keys}
    assert len(nodes) == 3
    renewer = renewers(
        lambda batch: renew_many(cluster, batch),
        lambda key: str(cluster.get_node_from_key(key).name),
    )
    sent = time.monotonic()
    for key in keys:
        cluster.set(key, "1:me", px=600)
    for key in keys:
        renewer.add(Lease(key, key, "1:me", 0.6, acquired_at=sent, max_hold=None))
    until(lambda: renewer.stats()["renewed"] >= len(keys), 10, "every lease renewed")
    assert renewer.stats()["renewal_batches"] <= 3 * 3
    assert renewer.lost == 0
    assert renew_many(cluster, [(keys[0], "1:other", 1000)]) == [0]
    assert RENEW_UNKNOWN not in renew_many(cluster, items[:5])


# --------------------------------------------------------------------------- fork


def _child(port: int, prefix: str, parent_renewer: Renewer) -> int:
    """In the forked child: the parent's renewer and signals must be usable, a new renewer
    must renew. Returns the exit code."""
    client = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)
    assert parent_renewer.pending() == 0  # the parent's leases are the parent's to renew
    LostSignal().event()  # takes the signals' lock
    key = f"{prefix}:child"
    lease = _hold(client, key, 0.3)
    renewer = Renewer(lambda items: renew_many(client, items))
    renewer.add(lease)
    end = time.monotonic() + 10
    while renewer.stats()["renewed"] < 2:
        if time.monotonic() > end:
            return 3
        time.sleep(0.01)
    lease.lost.set()
    renewer.close()
    return 0 if lease.lost.event().is_set() else 4


@pytest.mark.timeout(30)
def test_fork_while_leases_are_held_and_locks_are_taken(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    prefix: str,
    renewers: Callable[..., Renewer],
) -> None:
    renewer = renewers(lambda items: renew_many(redis_client, items))
    lease = _hold(redis_client, f"{prefix}:parent", 2.0)
    renewer.add(lease)
    until(lambda: renewer.stats()["renewed"] >= 1, 5, "a renewal in the parent")
    # Another thread holds the signals' lock and the renewer's lock at the moment of fork.
    held, release = threading.Event(), threading.Event()

    def hold_locks() -> None:
        with leases._guard, renewer._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold_locks)
    holder.start()
    assert held.wait(5)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 2
        try:
            code = _child(redis_server.port, prefix, renewer)
        finally:
            os._exit(code)
    release.set()
    holder.join(5)
    status = None
    end = time.monotonic() + 20
    while status is None and time.monotonic() < end:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = raw
        else:
            time.sleep(0.02)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child deadlocked")
    assert os.waitstatus_to_exitcode(status) == 0
    assert not lease.lost.is_set()  # the parent's lease was renewed all along


@pytest.mark.cluster
@pytest.mark.timeout(30)
def test_renew_many_on_a_cluster_a_frozen_node_costs_only_its_own_keys(
    redis_cluster: RedisClusterSet, prefix: str
) -> None:
    cluster: Any = redis_cluster.client(socket_timeout=0.5, socket_connect_timeout=0.5)
    keys = [f"{prefix}:{{f{i}}}:lock" for i in range(60)]
    for key in keys:
        cluster.set(key, "1:me", px=60_000)
    frozen_node = cluster.get_node_from_key(keys[0])
    frozen = next(s for s in redis_cluster.servers if s.port == frozen_node.port)
    frozen.pause()
    try:
        replies = renew_many(cluster, [(key, "1:me", 60_000) for key in keys])
    finally:
        frozen.resume()
    for key, reply in zip(keys, replies, strict=True):
        on_frozen = cluster.get_node_from_key(key).port == frozen_node.port
        assert reply == (RENEW_UNKNOWN if on_frozen else 1), key


# --------------------------------------------------------------------------- a long encode


@pytest.mark.timeout(120)
def test_an_encode_longer_than_the_lease_never_lets_a_waiter_run_the_job(
    redis_url: str, redis_client: redis.Redis, prefix: str, procs: list[Any]
) -> None:
    """The leader's value takes the C JSON encoder several leases to encode. Renewal threads
    cannot run while one C call holds the GIL, so the safe serializer encodes a value that
    large in pieces: the lease stays renewed, and the process waiting on it follows."""
    ttl = 0.2
    n = 50_000
    while True:
        value = [{"id": i, "name": f"item-{i}", "score": i * 0.5} for i in range(n)]
        started = time.perf_counter()
        json.dumps(value)
        if time.perf_counter() - started >= 3 * ttl:
            break
        n *= 2
    channel = names_for(prefix, "big").channel
    out = SPAWN.Queue()
    sf = SingleFlight(redis_url, prefix=prefix, lock_ttl=ttl, max_payload_bytes=None)

    def lead() -> list[Any]:
        redis_client.incr(f"{prefix}:runs")
        start(procs, workers.call_once, redis_url, prefix, "big", "value", 0.0, out,
              {"lock_ttl": ttl})  # fmt: skip
        until(lambda: redis_client.pubsub_numsub(channel)[0][1] >= 1, 30, "a waiter")
        return value

    try:
        assert sf.call("big", lead) is value
    finally:
        sf.close()
    kind, _, theirs = out.get(timeout=60)
    assert int(redis_client.get(f"{prefix}:runs") or 0) == 1
    assert kind == "ok" and theirs == value
