"""A leader knows when its lease is lost: by its own clock (the last renewal Redis
confirmed, timed from its send, older than lock_ttl minus the margin), whatever the network
does; when Redis says the lock is no longer ours; after max_hold. A loss by the clock alone
does not stop renewal. ``lease_lost``, ``check()``, ``lost_event`` and ``wait_lost()`` tell it.

The lease watchdog (dedupe/backend/renewal.py, dedupe/core/leases.py) against real
redis-server processes, and a live but hung leader replaced after max_hold.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from helpers import _client, _hold, _sf, _take_over, until
from proxy import Proxy

from dedupe import current_flight
from dedupe.backend.renewal import Renewer, renew_many
from dedupe.core.context import Flight
from dedupe.core.leases import Lease, LostSignal, lease_margin
from dedupe.errors import LeaseLost

pytestmark = pytest.mark.timeout(40)


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


# ----------------------------------------------------------------- what Redis says, max_hold, close


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


@pytest.mark.timeout(60)
def test_a_live_but_hung_leader_is_replaced_after_max_hold(
    redis_url: str, prefix: str, sfs: list[Any]
) -> None:
    sf_a = _sf(sfs, redis_url, prefix, lock_ttl=0.3, max_hold=1.0)
    sf_b = _sf(sfs, redis_url, prefix, lock_ttl=0.3, max_hold=1.0)
    release = threading.Event()
    running = threading.Event()
    lost: list[bool] = []

    def hung() -> str:
        flight = current_flight()
        assert flight is not None
        running.set()
        lost.append(flight.lost_event.wait(20))
        release.wait(20)
        return "hung"

    ta = threading.Thread(target=lambda: sf_a.call("hung", hung))
    ta.start()
    assert running.wait(10)
    assert sf_b.call("hung", lambda: "taken over") == "taken over"
    release.set()
    ta.join(20)
    assert lost == [True]


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


# --------------------------------------------------------------------------- telling the leader


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
