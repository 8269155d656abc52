"""Faults against real servers: lost pub/sub connections, Redis restarts, paused leaders,
forged envelopes, foreign lock values, and the local fallback while Redis is down.

Leases here are long (30 s or more) wherever the point is that something other than lease
expiry must rescue the waiters: if it did not, the test's own timeout would fail it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from typing import Any

import pytest
import redis
import workers
from helpers import SPAWN, start, until

from dedupe import BackendUnavailable, SingleFlight, WaitTimeout, current_flight
from dedupe.core.keys import names_for
from dedupe.core.sealing import Codec, Outcome
from devtools.servers import RedisServer


def numsub(client: redis.Redis, channel: str) -> int:
    return int(client.pubsub_numsub(channel)[0][1])


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


@pytest.mark.timeout(40)
def test_paused_leader_loses_its_lease_and_spares_the_new_one(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any]
) -> None:
    kw = {"lock_ttl": 0.5}
    out_a, out_b = SPAWN.Queue(), SPAWN.Queue()
    a = start(procs, workers.call_once, redis_url, prefix, "p", "wait-go-lost", 30.0, out_a, kw)
    got = redis_client.blpop([f"{prefix}:started"], timeout=20)
    assert got is not None and int(got[1]) == a.pid
    lock_key = names_for(prefix, "p").lock
    os.kill(a.pid, signal.SIGSTOP)  # a pause longer than the lease: GC, swap, a debugger
    until(lambda: redis_client.exists(lock_key) == 0, what="the paused lease to expire")
    b = start(procs, workers.call_once, redis_url, prefix, "p", "wait-go", 30.0, out_b, kw)
    got = redis_client.blpop([f"{prefix}:started"], timeout=20)
    assert got is not None and int(got[1]) == b.pid
    b_lock = redis_client.get(lock_key)
    os.kill(a.pid, signal.SIGCONT)
    redis_client.rpush(f"{prefix}:go:{a.pid}", 1)  # let a finish first
    assert redis_client.blpop([f"{prefix}:lost"], timeout=20) == (f"{prefix}:lost".encode(), b"1")
    result_a = out_a.get(timeout=20)
    assert result_a[0] == "ok" and result_a[2]["pid"] == a.pid
    assert redis_client.get(lock_key) == b_lock  # a's completion did not touch b's lease
    redis_client.rpush(f"{prefix}:go:{b.pid}", 1)
    result_b = out_b.get(timeout=20)
    assert result_b[0] == "ok"
    assert result_b[2]["token"] > result_a[2]["token"]


def _forged(prefix: str, job_id: str, secret: bytes | None, token: int, value: Any) -> bytes:
    codec = Codec(secret=secret)
    channel = names_for(prefix, job_id).channel
    return codec.seal(
        Outcome(value=value), channel=channel, token=token, keep_ms=60_000, ttl_ms=60_000
    )


@pytest.mark.timeout(30)
def test_forged_and_unsigned_envelopes_are_refused(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    secret = "s3cret"
    leader = SingleFlight(redis_url, prefix=prefix, secret=secret, lock_ttl=30)
    follower = SingleFlight(redis_url, prefix=prefix, secret=secret, lock_ttl=30)
    names = names_for(prefix, "signed")
    running, release = threading.Event(), threading.Event()

    def job() -> str:
        flight = current_flight()
        assert flight is not None
        running.set()
        release.wait(20)
        return f"genuine {flight.token}"

    results: dict[str, Any] = {}
    t = threading.Thread(target=lambda: results.update(a=leader.call("signed", job)))
    t.start()
    assert running.wait(10)
    f = threading.Thread(target=lambda: results.update(b=follower.call("signed", job)))
    f.start()
    until(lambda: numsub(redis_client, names.channel) == 1, what="the follower subscribed")
    token = int(redis_client.get(names.lock).split(b":")[0])  # type: ignore[union-attr]
    hostile = [
        _forged(prefix, "signed", b"wrong secret", token, "forged"),
        _forged(prefix, "signed", None, token, "unsigned"),
        b"garbage on the channel",
        _forged(prefix, "signed", b"s3cret", token, "ok")[:-3],  # truncated
    ]
    for message in hostile:
        redis_client.publish(names.channel, message)
    # The follower's re-checks read the result key too: poison it as well.
    redis_client.set(names.result, hostile[0], px=60_000)
    until(lambda: follower.stats()["rejected_envelopes"] >= len(hostile), what="rejections")
    assert "b" not in results  # nothing forged was delivered
    release.set()
    t.join(10)
    f.join(10)
    assert results["a"] == results["b"] == f"genuine {token}"
    # A forged *kept* value is never served to a new caller either.
    redis_client.set(names_for(prefix, "kept").result, _forged(prefix, "kept", None, 1, "bad"))
    assert follower.call("kept", lambda: "recomputed") == "recomputed"
    leader.close()
    follower.close()


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


def _swallow(sf: SingleFlight, job: str) -> None:
    try:
        sf.call(job, lambda: job)
    except Exception:
        pass
