"""Outcomes never go back in time: a caller gets an outcome only of the lease it waited on
or a newer one; fencing tokens only grow (across restarts and a counter run ahead of the
clock); a leader that lost its lease keeps its late outcome to its own callers; a kept value
is fresh for result_ttl from its run, in Redis and in the process's local copies.

Records written back by a key writer are in test_trust_model.py; the protocol's unit tests
(test_protocol.py) and the simulator (test_simulation.py) hold the same rule without servers.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import correctness_workers
import pytest
import redis
import workers
from helpers import SPAWN, _sf, commandstats, start, until

from dedupe import SingleFlight, current_flight
from dedupe.core.keys import names_for
from devtools.servers import RedisServer

pytestmark = pytest.mark.timeout(30)


# ------------------------------------------------------------------ late leaders and fencing tokens


@pytest.mark.timeout(60)
def test_late_leader_never_reaches_a_newer_flight(
    redis_url: str, redis_client: redis.Redis, prefix: str, procs: list[Any], sfs: list[Any]
) -> None:
    """A leader paused past its lease finishes while a newer flight runs: the newer flight's
    followers and later callers get the newer value; the late leader's own caller its own."""
    job = "late"
    names = names_for(prefix, job)
    out = SPAWN.Queue()
    a = start(procs, correctness_workers.late_leader, redis_url, prefix, job, 0.5, out)
    assert redis_client.blpop([f"{prefix}:a-started"], timeout=20) is not None
    os.kill(a.pid, signal.SIGSTOP)  # paused: its renewer stops with it
    until(lambda: not redis_client.exists(names.lock), what="the paused leader's lease to lapse")

    b_go = threading.Event()
    b_started = threading.Event()

    def new_work() -> str:
        b_started.set()
        assert b_go.wait(30)
        return "new"

    results: dict[str, Any] = {}
    sf_b = _sf(sfs, redis_url, prefix, lock_ttl=5, result_ttl=30)
    sf_c = _sf(sfs, redis_url, prefix, lock_ttl=5, result_ttl=30)
    tb = threading.Thread(target=lambda: results.__setitem__("b", sf_b.call(job, new_work)))
    tb.start()
    assert b_started.wait(10)

    def never() -> str:
        raise AssertionError("the follower must not run the job")

    tc = threading.Thread(target=lambda: results.__setitem__("c", sf_c.call(job, never)))
    tc.start()
    channel = names.channel
    until(
        lambda: dict(redis_client.pubsub_numsub(channel)).get(channel.encode(), 0) >= 1,
        what="the newer flight's follower to subscribe",
    )

    redis_client.rpush(f"{prefix}:a-go", 1)
    os.kill(a.pid, signal.SIGCONT)
    kind, value = out.get(timeout=20)
    assert (kind, value) == ("value", "old")  # the late leader's own caller gets its value
    a.join(10)

    # The late outcome was neither published to the newer flight nor stored for new callers.
    assert tc.is_alive(), f"the follower of the newer flight returned {results.get('c')!r}"
    stored = redis_client.get(names.result)
    assert stored is None or b"old" not in stored

    b_go.set()
    tb.join(10)
    tc.join(10)
    assert results == {"b": "new", "c": "new"}
    sf_d = _sf(sfs, redis_url, prefix, lock_ttl=5, result_ttl=30)
    assert sf_d.call(job, never) == "new"


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


def _token_recorder(tokens: list[int]) -> Any:
    """A job that records (and returns) the fencing token of the flight running it."""

    def work() -> int:
        flight = current_flight()
        assert flight is not None
        tokens.append(flight.token)
        return flight.token

    return work


@pytest.mark.timeout(60)
def test_fencing_tokens_grow_across_restart_and_a_busy_counter(fresh_redis: RedisServer) -> None:
    """A key leased faster than the clock ticks runs its counter ahead; after a restart (the
    counter lost) the next token must still be larger than every token given before."""
    url = fresh_redis.url
    sf = SingleFlight(url, prefix="tok", result_ttl=0)
    tokens: list[int] = []
    work = _token_recorder(tokens)

    try:
        # A key leased as fast as one client can (thousands a second, faster than the
        # millisecond clock ticks): a counter seeded from a millisecond clock runs ahead.
        for _ in range(3000):
            sf.call("k", work)
        before = max(tokens)
        fresh_redis.restart()
        sf.close(timeout=0)
        sf = SingleFlight(url, prefix="tok", result_ttl=0)
        sf.call("k", work)
        assert tokens[-1] > before, tokens
        assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    finally:
        sf.close(timeout=0)


@pytest.mark.timeout(30)
def test_a_counter_ahead_of_the_clock_or_not_ours_still_gives_larger_tokens(
    redis_url: str, redis_client: redis.Redis, prefix: str, sfs: list[Any]
) -> None:
    """The acquire sets the counter to the clock and reads the old value in one SET ... GET:
    a counter ahead of the clock must still win, and a key of another type is overwritten."""
    sf = _sf(sfs, redis_url, prefix, result_ttl=0)
    names = names_for(prefix, "k")
    tokens: list[int] = []
    work = _token_recorder(tokens)

    sf.call("k", work)
    ahead = tokens[-1] + 10**12  # eleven days of microseconds ahead
    redis_client.set(names.token, str(ahead), px=60_000)
    sf.call("k", work)
    assert tokens[-1] == ahead + 1
    sf.call("k", work)
    assert tokens[-1] == ahead + 2
    redis_client.delete(names.token)
    redis_client.rpush(names.token, "not", "ours")  # WRONGTYPE for SET ... GET
    sf.call("k", work)
    assert redis_client.type(names.token) == b"string"
    assert redis_client.pttl(names.token) > 0
    assert 0 < tokens[-1] < ahead  # the clock again: the foreign value told us nothing


# --------------------------------------------------- kept values: fresh for result_ttl from the run


@pytest.mark.compat
def test_result_ttl_serves_late_callers_then_expires(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    sf = SingleFlight(redis_url, prefix=prefix, result_ttl=0.3)
    runs = 0

    @sf(key="v:{x}")
    def value(x: int) -> int:
        nonlocal runs
        runs += 1
        return x * 10

    assert value(1) == 10
    assert value(1) == 10  # within result_ttl: served from the kept value
    assert runs == 1
    # Wait, through Redis, until the kept value is older than result_ttl.
    result_key = names_for(prefix, value.job_id(1)).result
    ttl_total = int(redis_client.get(result_key).split(b":")[2])  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while redis_client.pttl(result_key) > ttl_total - 300 - 5:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert value(1) == 10
    assert runs == 2
    sf.close()


@pytest.mark.compat
def test_exceptions_are_not_kept(sf: SingleFlight) -> None:
    runs = 0

    @sf(key="e")
    def fails() -> None:
        nonlocal runs
        runs += 1
        raise LookupError("no", runs)

    for expected in (1, 2):
        with pytest.raises(LookupError) as info:
            fails()
        assert info.value.args == ("no", expected)
    assert runs == 2


@pytest.mark.compat
def test_result_ttl_zero_keeps_nothing(redis_url: str, prefix: str) -> None:
    sf = SingleFlight(redis_url, prefix=prefix, result_ttl=0)
    runs = 0

    def work() -> int:
        nonlocal runs
        runs += 1
        return runs

    assert sf.call("z", work) == 1
    assert sf.call("z", work) == 2
    sf.close()


@pytest.mark.compat
def test_local_cache_serves_kept_values_without_a_round_trip(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    leader = SingleFlight(redis_url, prefix=prefix, result_ttl=0.5, local_cache=True)
    late = SingleFlight(redis_url, prefix=prefix, result_ttl=0.5, local_cache=True)
    runs = 0

    def job() -> dict[str, int]:
        nonlocal runs
        runs += 1
        return {"run": runs}

    first = leader.call("hot", job)
    assert late.call("hot", job) == first  # read from Redis: fresh there
    redis_client.config_resetstat()
    assert leader.call("hot", job) is first  # the leader's own copy: the very same object
    assert late.call("hot", job) == first  # the late reader's copy
    calls = commandstats(redis_client)
    assert "evalsha" not in calls and "eval" not in calls  # neither touched Redis
    assert runs == 1
    assert leader.stats()["local_copies"] == 1
    # Copies last no longer than Redis keeps the value fresh (result_ttl after the flight).
    result_key = f"{prefix}:{{hot}}:result"
    ttl_total = int(redis_client.get(result_key).split(b":")[2])  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while (
        redis_client.pttl(result_key) > ttl_total - 500 - 5
        or leader.backend().local_copies.get(f"{prefix}:{{hot}}")[0]
    ):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert leader.call("hot", job) == {"run": 2}
    leader.close()
    late.close()


@pytest.mark.compat
def test_local_cache_fills_from_a_followed_flight(sf: SingleFlight, redis_url: str) -> None:
    follower = SingleFlight(redis_url, prefix=sf.settings.prefix, result_ttl=30, local_cache=True)
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait(10)
        return "value"

    t = threading.Thread(target=lambda: sf.call("f", slow))
    t.start()
    assert started.wait(10)
    got: list[str] = []
    f = threading.Thread(target=lambda: got.append(follower.call("f", slow)))
    f.start()
    deadline = time.monotonic() + 10
    while not follower.backend().hub().channels():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    release.set()
    t.join(10)
    f.join(10)
    assert got == ["value"]
    # The copy came with the published record: no flight needed for the next call.
    assert follower.call("f", lambda: "must not run") == "value"
    follower.close()
