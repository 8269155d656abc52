"""The README's failure behaviour, row by row, against real servers: Redis unreachable,
half-open, restarted; replies lost; the local fallback; interrupted and cancelled callers;
configure() and close() under running flights; foreign lock values and hostile job ids.

Leases here are long (30 s or more) wherever the point is that something other than lease
expiry must rescue the waiters: if it did not, the test's own timeout would fail it. Rows
held by a guarantee's own file are mapped in tests/README.md.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest
import redis
from helpers import SLACK, _sf, until

from dedupe import BackendUnavailable, SingleFlight, current_flight
from dedupe.core.keys import names_for
from devtools.servers import RedisServer

pytestmark = pytest.mark.timeout(30)


@pytest.mark.timeout(40)
def test_redis_restart_mid_flight(fresh_redis: RedisServer, prefix: str) -> None:
    url = fresh_redis.url
    a = SingleFlight(url, prefix=prefix, lock_ttl=1.0, connect_timeout=1.0)
    b = SingleFlight(url, prefix=prefix, lock_ttl=1.0, connect_timeout=1.0)
    a_running, a_release = threading.Event(), threading.Event()
    b_running, b_release = threading.Event(), threading.Event()
    lost: list[bool] = []

    def job(tag: str) -> str:
        flight = current_flight()
        assert flight is not None
        if tag == "a":
            a_running.set()
            a_release.wait(20)
            lost.append(flight.lost_event.wait(10))
        else:
            b_running.set()
            b_release.wait(20)
        return tag

    outcomes: dict[str, Any] = {}

    def caller(name: str, inst: SingleFlight) -> None:
        t0 = time.monotonic()
        try:
            outcomes[name] = inst.call("job", job, name[0])
        except BackendUnavailable as exc:
            outcomes[name] = exc
        outcomes[name + "-took"] = time.monotonic() - t0

    ta = threading.Thread(target=caller, args=("a", a))
    ta.start()
    assert a_running.wait(10)
    tb = threading.Thread(target=caller, args=("b", b))
    tb.start()
    until(lambda: bool(b.backend().hub().channels()), what="b following")
    fresh_redis.kill()
    fresh_redis.restart()
    # Nothing survived the restart: b re-checks through its reconnected hub and takes over.
    assert b_running.wait(20), "the follower did not take over after the restart"
    client = fresh_redis.client()
    lock_key = names_for(prefix, "job").lock
    b_lock = client.get(lock_key)
    assert b_lock is not None
    a_release.set()
    ta.join(20)
    assert outcomes["a"] == "a"  # the old leader still answers its own caller
    assert lost == [True]  # and learned that its lease was gone
    assert client.get(lock_key) == b_lock  # its completion left the new lock alone
    b_release.set()
    tb.join(20)
    assert outcomes["b"] == "b"
    assert a.call("after", lambda: "fine") == "fine"
    a.close()
    b.close()


@pytest.mark.timeout(30)
def test_lock_key_overwritten_by_another_program(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    sf = SingleFlight(redis_url, prefix=prefix, lock_ttl=0.3)
    lock_key = names_for(prefix, "foreign").lock
    redis_client.set(lock_key, "not ours, and no expiry")
    assert sf.call("foreign", lambda: "ran after the foreign lock expired") == (
        "ran after the foreign lock expired"
    )
    for key in redis_client.scan_iter(match=f"{prefix}:*"):
        assert redis_client.pttl(key) > 0
    sf.close()


@pytest.mark.timeout(30)
def test_hostile_job_ids_work_end_to_end(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    sf = SingleFlight(redis_url, prefix=prefix)
    for job_id in ["{braces}", "new\nline", "bad \udcff utf-8", "#hash", "x" * 10_000, "ok"]:
        flight_key: list[str] = []

        def job(job_id: str = job_id, flight_key: list[str] = flight_key) -> str:
            flight = current_flight()
            assert flight is not None
            flight_key.append(flight.key)
            return job_id

        assert sf.call(job_id, job) == job_id
        assert flight_key == [job_id]
    for key in redis_client.scan_iter(match=f"{prefix}:*"):
        assert redis_client.pttl(key) > 0
        assert len(key) < 300
    sf.close()


@pytest.mark.timeout(40)
def test_local_fallback_while_redis_is_down(
    fresh_redis: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    sf = SingleFlight(fresh_redis.url, prefix=prefix, on_backend_error="local", connect_timeout=0.5)
    raising = SingleFlight(fresh_redis.url, prefix=prefix, connect_timeout=0.5)
    assert sf.call("warm", lambda: 1) == 1
    fresh_redis.kill()
    caplog.set_level(logging.WARNING, logger="dedupe")
    with pytest.raises(BackendUnavailable):
        raising.call("x", lambda: 1)
    runs = 0
    gate = threading.Event()

    def job() -> str:
        nonlocal runs
        runs += 1
        gate.wait(10)
        return "local"

    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(sf.call("k", job))) for _ in range(8)]
    for t in threads:
        t.start()
    until(lambda: runs == 1, what="the local run")
    until(
        lambda: sum(e.waiters for e in sf.backend().sync_flights._entries.values()) == 8,
        what="all threads joined the one local flight",
    )
    gate.set()
    for t in threads:
        t.join(10)
    assert results == ["local"] * 8 and runs == 1  # still deduplicated within the process
    assert sf.call("k2", lambda: "again") == "again"
    outage_warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outage_warnings) == 1  # once per outage, not once per call
    fresh_redis.restart()
    client = fresh_redis.client()
    # Back to Redis once it answers: the flight leaves its result key there again.
    until(
        lambda: (
            sf.call("back", lambda: "distributed") == "distributed"
            and client.exists(names_for(prefix, "back").result) == 1
        ),
        what="flights to go through Redis again",
    )
    assert sf.stats()["local_runs"] >= 2
    sf.close()
    raising.close()


@pytest.mark.timeout(25)
@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("lost", [1, 2])
def test_a_lost_acquire_reply_on_a_hanging_connection(
    redis_server: RedisServer, redis_client: redis.Redis, prefix: str, kind: str, lost: int
) -> None:
    """The acquire runs, its reply is lost and its connection hangs (lock_ttl 30 s).
    One reply lost: the command is tried again on a fresh connection within its bound,
    finds the lease it was granted, and leads with it: one run, and the caller that waited
    on that lease gets its value. Two lost (the retry's too): the caller gets
    BackendUnavailable, and the lease it may hold is given back at once (owner-checked, off
    its path), so the waiter takes over instead of waiting out the lease (this test's
    timeout is shorter than the lease)."""
    from proxy import Proxy

    from dedupe.backend.commands import ACQUIRE

    names = names_for(prefix, "hung")
    runs: list[str] = []
    got: dict[str, Any] = {}

    def job(who: str) -> str:
        runs.append(who)
        return who

    async def ajob(who: str) -> str:
        return job(who)

    def run(who: str, sf: SingleFlight) -> None:
        try:
            if kind == "sync":
                got[who] = sf.call_detailed("hung", job, who)
            else:
                got[who] = asyncio.run(_acall(sf, ajob, who))
        except Exception as exc:
            got[who] = exc

    with Proxy(redis_server.address) as proxy:
        url = "redis://{}:{}/0".format(*proxy.address)
        cut = SingleFlight(url, prefix=prefix, lock_ttl=30, connect_timeout=0.5, socket_timeout=1)
        direct = SingleFlight(redis_server.url, prefix=prefix, lock_ttl=30)
        try:
            redis_client.script_load(ACQUIRE.lua)  # the reply lost is the acquire's own
            proxy.lose_reply_to(ACQUIRE.sha.encode(), lost)
            a = threading.Thread(target=run, args=("A", cut))
            a.start()
            until(lambda: redis_client.exists(names.lock) == 1, 10, "the acquire to run")
            b = threading.Thread(target=run, args=("B", direct))
            b.start()
            a.join(15)
            b.join(15)
            assert not a.is_alive() and not b.is_alive()
            assert proxy.lost_replies == lost
        finally:
            cut.close(timeout=0)
            direct.close(timeout=0)
    if lost == 1:
        assert runs == ["A"]
        assert got["A"].role == "leader" and got["B"].value == "A"
    else:
        assert isinstance(got["A"], BackendUnavailable), got["A"]
        assert runs == ["B"]
        assert got["B"].role == "leader" and got["B"].value == "B"


async def _acall(sf: SingleFlight, fn: Any, *args: Any) -> Any:
    try:
        return await sf.call_detailed("hung", fn, *args)
    finally:
        await sf.aclose()


# ------------------------------------------------------------------- Redis unreachable or half-open


@pytest.mark.compat
def test_backend_unavailable_is_prompt() -> None:
    # Port 1 on loopback: connection refused at once. The README's bound on any command is
    # connect_timeout + socket_timeout (its one retry included): the call fails within it.
    sf = SingleFlight("redis://127.0.0.1:1/0", connect_timeout=0.5, socket_timeout=0.5)
    bound = sf.settings.connect_timeout + sf.settings.socket_timeout + SLACK
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        sf.call("x", lambda: 1)
    took = time.monotonic() - started
    assert took < bound, f"BackendUnavailable after {took:.2f} s, past the bound {bound:.2f} s"
    sf.close()


@pytest.mark.compat
async def test_backend_unavailable_is_prompt_async() -> None:
    sf = SingleFlight("redis://127.0.0.1:1/0", connect_timeout=0.5, socket_timeout=0.5)
    bound = sf.settings.connect_timeout + sf.settings.socket_timeout + SLACK

    async def job() -> int:
        return 1

    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await sf.call("x", job)
    took = time.monotonic() - started
    assert took < bound, f"BackendUnavailable after {took:.2f} s, past the bound {bound:.2f} s"
    sf.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_half_open_redis_fails_the_call_within_its_bound(
    redis_server: RedisServer, prefix: str, kind: str
) -> None:
    """Redis stops answering but the sockets stay open: the call raises BackendUnavailable
    within the documented bound, connect_timeout + socket_timeout (its one retry on a fresh
    connection included), and works again once the link heals."""
    from proxy import Proxy

    with Proxy(redis_server.address).start() as proxy:
        url = "redis://{}:{}/0".format(*proxy.address)
        sf = SingleFlight(url, prefix=prefix, connect_timeout=0.5, socket_timeout=0.5)
        try:

            async def aval() -> str:
                return "v"

            def run() -> Any:
                if kind == "sync":
                    return sf.call("half-open", lambda: "v")

                async def main() -> Any:
                    try:
                        return await sf.call("half-open", aval)
                    finally:
                        await sf.aclose()

                return asyncio.run(main())

            assert run() == "v"  # connections are pooled and warm
            proxy.blackhole()
            bound = sf.settings.connect_timeout + sf.settings.socket_timeout + SLACK
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                run()
            took = time.monotonic() - started
            assert took < bound, f"failed after {took:.2f} s, past the bound {bound:.2f} s"
            proxy.heal()
            assert run() == "v"
        finally:
            sf.close(timeout=0)


# --------------------------------------------------------------------------- cancelled callers


@pytest.mark.compat
async def test_cancelled_caller_stops_alone(sf: SingleFlight) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    runs = 0

    @sf(key="c")
    async def job() -> str:
        nonlocal runs
        runs += 1
        started.set()
        await release.wait()
        return "shared"

    first = asyncio.create_task(job())  # this caller started the flight
    await started.wait()
    second = asyncio.create_task(job())
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    release.set()
    assert await second == "shared"
    assert runs == 1


@pytest.mark.compat
async def test_cancelled_lone_leader_still_finishes_for_followers(
    sf: SingleFlight, other: SingleFlight
) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def job(tag: str) -> str:
        started.set()
        await release.wait()
        return f"by {tag}"

    leader = asyncio.create_task(sf.call("lone", job, "leader"))
    await started.wait()
    follower = asyncio.create_task(other.call("lone", job, "follower"))
    deadline = time.monotonic() + 10
    while not other.backend().hub().channels():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    release.set()
    assert await follower == "by leader"


# -------------------------------------------------------- configure() and close() while flights run


@pytest.mark.timeout(60)
def test_configure_under_a_running_flight_keeps_its_lease(
    redis_url: str, redis_client: redis.Redis, prefix: str, sfs: list[Any]
) -> None:
    """configure() mid-flight: the running leader finishes on the old backend with its lease
    renewed (no second run), and its follower gets its value."""
    sf = _sf(sfs, redis_url, prefix, lock_ttl=0.6, max_hold=30)
    other = _sf(sfs, redis_url, prefix, lock_ttl=0.6, max_hold=30)
    running, release = threading.Event(), threading.Event()
    runs: list[str] = []
    lost: list[bool] = []

    def job() -> str:
        runs.append("a")
        running.set()
        assert release.wait(20)
        flight = current_flight()
        assert flight is not None
        lost.append(flight.lease_lost)
        return "a"

    results: dict[str, Any] = {}
    ta = threading.Thread(target=lambda: results.__setitem__("a", sf.call("cfg", job)))
    ta.start()
    assert running.wait(10)
    sf.configure(result_ttl=5)  # a new backend for new calls; the old one keeps renewing
    tb = threading.Thread(
        target=lambda: results.__setitem__("b", other.call("cfg", lambda: runs.append("b")))
    )
    tb.start()
    lock = names_for(prefix, "cfg").lock
    value = redis_client.get(lock)
    # Watch the lease through 6 renewals (2 lease lengths): same holder, never lapsed.
    seen_renewals = 0
    last = redis_client.pttl(lock)
    while seen_renewals < 6:
        assert redis_client.get(lock) == value, "the lease lapsed under configure()"
        now = redis_client.pttl(lock)
        if now > last:
            seen_renewals += 1
        last = now
        threading.Event().wait(0.02)
    release.set()
    ta.join(10)
    tb.join(10)
    assert runs == ["a"] and lost == [False]
    assert results == {"a": "a", "b": "a"}


@pytest.mark.timeout(60)
def test_close_under_a_running_flight_hands_over(
    redis_url: str, prefix: str, sfs: list[Any]
) -> None:
    """close() with a flight still running past its timeout: its lease stops being renewed,
    its leader learns so, and a waiter elsewhere takes over."""
    sf = _sf(sfs, redis_url, prefix, lock_ttl=0.3)
    other = _sf(sfs, redis_url, prefix, lock_ttl=0.3)
    running, release = threading.Event(), threading.Event()
    lost: list[bool] = []

    def job() -> str:
        running.set()
        flight = current_flight()
        assert flight is not None
        lost.append(flight.lost_event.wait(20))
        release.wait(20)
        return "a"

    ta = threading.Thread(target=lambda: sf.call("close", job))
    ta.start()
    assert running.wait(10)
    sf.close(timeout=0.05)
    assert other.call("close", lambda: "b") == "b"
    release.set()
    ta.join(10)
    assert lost == [True]
