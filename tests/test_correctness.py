"""Outcomes never go back in time, leases never lapse silently: real servers, real processes.

Each test here is shaped after a failure seen from outside (issue 8), and fails on the code
before its fix.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import correctness_workers
import pytest
import redis
from helpers import SPAWN, start, until

from dedupe import BackendUnavailable, SingleFlight, WaitTimeout, current_flight
from dedupe.core.keys import names_for
from devtools.servers import RedisServer


@pytest.fixture
def sfs(redis_url: str, prefix: str) -> Iterator[list[SingleFlight]]:
    made: list[SingleFlight] = []
    yield made
    for sf in made:
        sf.close(timeout=0)


def _sf(made: list[SingleFlight], url: str, prefix: str, **kw: Any) -> SingleFlight:
    sf = SingleFlight(url, prefix=prefix, **kw)
    made.append(sf)
    return sf


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


@pytest.mark.timeout(60)
def test_lease_renewed_until_the_outcome_is_stored(
    redis_url: str, redis_client: redis.Redis, prefix: str, sfs: list[Any]
) -> None:
    """Encoding the value outlasts the lease several times over: nobody takes over a live
    leader, and the job runs once."""
    release = threading.Event()
    renewed_during_encoding: list[int] = []
    names = names_for(prefix, "slow-encode")

    class Slow:
        def __reduce__(self) -> Any:
            # Encoding: wait until the lock was seen renewed long past the first lease.
            assert release.wait(20)
            return (str, ("slow",))

    runs: list[int] = []

    def work() -> Any:
        runs.append(1)
        return Slow()

    sf_a = _sf(sfs, redis_url, prefix, lock_ttl=0.5, serializer="pickle", secret="s" * 32)
    sf_b = _sf(sfs, redis_url, prefix, lock_ttl=0.5, serializer="pickle", secret="s" * 32)
    results: dict[str, Any] = {}
    ta = threading.Thread(target=lambda: results.__setitem__("a", sf_a.call("slow-encode", work)))
    ta.start()
    until(lambda: bool(runs), what="the leader to run")
    tb = threading.Thread(target=lambda: results.__setitem__("b", sf_b.call("slow-encode", work)))
    tb.start()
    # Watch the lease live on for 4 lock_ttl (2 s) while the leader is encoding.
    first = redis_client.get(names.lock)
    assert first is not None
    deadline_checks = 0
    while deadline_checks < 20:
        assert redis_client.get(names.lock) == first, "the lease lapsed while encoding"
        renewed_during_encoding.append(int(redis_client.pttl(names.lock)))
        threading.Event().wait(0.1)
        deadline_checks += 1
    release.set()
    ta.join(10)
    tb.join(10)
    assert len(runs) == 1
    assert results["b"] == "slow"


@pytest.mark.timeout(120)
def test_twenty_thousand_async_flights_and_500_threads_queue_not_fail(
    redis_url: str, prefix: str, sfs: list[Any]
) -> None:
    sf = _sf(sfs, redis_url, prefix, result_ttl=0)

    async def work(i: int) -> int:
        return i

    async def main() -> list[int]:
        try:
            return list(await asyncio.gather(*(sf.call(f"a{i}", work, i) for i in range(20_000))))
        finally:
            await sf.aclose()

    assert asyncio.run(main()) == list(range(20_000))

    got: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(500)

    def thread(i: int) -> None:
        try:
            barrier.wait(30)
            got.append(sf.call(f"t{i}", lambda: i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(500)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert sorted(got) == list(range(500))


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


@pytest.mark.timeout(60)
def test_each_local_caller_raises_its_own_copy(redis_url: str, prefix: str, sfs: list[Any]) -> None:
    sf = _sf(sfs, redis_url, prefix)
    go = threading.Event()
    n = 50
    joined = threading.Barrier(n)

    class Boom(Exception):
        pass

    def job() -> None:
        assert go.wait(20)
        raise Boom("boom")

    caught: list[BaseException] = []

    def caller() -> None:
        joined.wait(20)
        try:
            sf.call("boom", job)
        except Boom as exc:
            caught.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(n)]
    for t in threads:
        t.start()
    until(lambda: len(sf.backend().sync_flights) == 1, what="the flight")
    threading.Event().wait(0.2)  # let the joiners queue on the entry
    go.set()
    for t in threads:
        t.join(20)
    assert len(caught) == n
    assert len({id(e) for e in caught}) == n  # distinct objects
    longest = max(len(traceback.extract_tb(e.__traceback__)) for e in caught)
    assert longest < 20, longest


@pytest.mark.timeout(60)
def test_two_event_loops_one_stopped_mid_flight(
    redis_url: str, prefix: str, sfs: list[Any]
) -> None:
    """Callers of one key on two loops: loop 1 leads and then stops for good mid-flight;
    loop 2's callers are not stranded behind it (they take over once its lease lapses)."""
    sf = _sf(sfs, redis_url, prefix, lock_ttl=0.5, max_hold=1.0)
    started = threading.Event()

    async def stuck() -> str:
        started.set()
        await asyncio.Event().wait()  # never set: its loop stops under it
        return "never"

    loop1 = asyncio.new_event_loop()
    tasks: list[Any] = []

    def run_loop1() -> None:
        asyncio.set_event_loop(loop1)
        tasks.append(loop1.create_task(sf.call("two-loops", stuck)))
        loop1.run_forever()

    t1 = threading.Thread(target=run_loop1, daemon=True)
    t1.start()
    assert started.wait(10)
    loop1.call_soon_threadsafe(loop1.stop)
    t1.join(10)

    async def fine() -> str:
        return "loop2"

    async def main() -> list[str]:
        try:
            return list(await asyncio.gather(*(sf.call("two-loops", fine) for _ in range(5))))
        finally:
            await sf.aclose()

    assert asyncio.run(main()) == ["loop2"] * 5
    loop1.close()


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


@pytest.mark.sentinel
@pytest.mark.timeout(60)
def test_min_replicas_ack_waits_on_the_acquiring_connection(
    redis_sentinel: Any, prefix: str
) -> None:
    """WAIT vouches only for its own connection's writes: with the replica stopped, every one
    of many concurrent leaders must be refused, none may lead on a WAIT of an idle connection."""
    from test_sentinel import wait_replica_acks

    wait_replica_acks(redis_sentinel, prefix)
    sf = SingleFlight(
        redis_sentinel.master.url, prefix=prefix, min_replicas_ack=1, replica_ack_timeout=0.3
    )
    runs: list[int] = []
    errors: list[BaseException] = []
    try:
        # Warm the pool with several connections, none of which has written anything.
        warm = threading.Barrier(8)

        def warm_one() -> None:
            warm.wait(10)
            sf.backend().sync_client().ping()

        ws = [threading.Thread(target=warm_one) for _ in range(8)]
        for t in ws:
            t.start()
        for t in ws:
            t.join(10)
        redis_sentinel.replica.pause()
        try:
            barrier = threading.Barrier(8)

            def lead(i: int) -> None:
                barrier.wait(10)
                try:
                    sf.call(f"w{i}", lambda: runs.append(i))
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=lead, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        finally:
            redis_sentinel.replica.resume()
    finally:
        sf.close(timeout=0)
    assert runs == []
    assert len(errors) == 8 and all("replicas acknowledged" in str(e) for e in errors), errors


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


@pytest.mark.timeout(60)
def test_fork_while_locks_are_held_and_a_flight_runs(redis_url: str, prefix: str) -> None:
    """A child forked while another thread holds the instance's lock and a flight leads
    works on its own: no lock inherited locked, its own tables, the parent's lease followed."""
    sf = SingleFlight(redis_url, prefix=prefix, lock_ttl=1.0, result_ttl=10)
    holding, release_lock = threading.Event(), threading.Event()
    running, release_job = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with sf._lock:
            holding.set()
            release_lock.wait(20)

    def job() -> str:
        running.set()
        assert release_job.wait(20)
        return "parent"

    th = threading.Thread(target=hold_lock)
    tj = threading.Thread(target=lambda: sf.call("k1", job))
    try:
        sf.call("warm", lambda: 0)  # the backend exists before the fork
        th.start()
        tj.start()
        assert holding.wait(10) and running.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if both calls come back right
            code = 1
            try:
                sf.configure(result_ttl=10)  # takes the lock another thread held at fork
                ok = sf.call("k2", lambda: "child") == "child"
                ok = ok and sf.call("k1", lambda: "child-ran-it") == "parent"
                code = 0 if ok else 2
            finally:
                os._exit(code)
        release_lock.set()
        release_job.set()
        deadline = 30
        status = 0
        for _ in range(deadline * 100):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            threading.Event().wait(0.01)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child hung")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release_lock.set()
        release_job.set()
        th.join(10)
        tj.join(10)
        sf.close(timeout=0)


@pytest.mark.timeout(30)
def test_inflight_and_inspect_show_a_running_flight(
    redis_url: str, prefix: str, sfs: list[Any]
) -> None:
    sf = _sf(sfs, redis_url, prefix, lock_ttl=5)
    running, release = threading.Event(), threading.Event()

    def job() -> str:
        running.set()
        assert release.wait(20)
        return "v"

    t = threading.Thread(target=lambda: sf.call("seen", job))
    t.start()
    try:
        assert running.wait(10)
        [info] = sf.inflight()
        assert (info.job_id, info.state, info.driver) == ("seen", "leading", "sync")
        assert info.age_s >= 0
        state = sf.inspect("seen")
        assert state.holder is not None and state.holder.pid == os.getpid()
        assert state.lease_ms is not None and 0 < state.lease_ms <= 5000
    finally:
        release.set()
        t.join(10)
    assert sf.inflight() == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_half_open_redis_fails_the_call_within_its_bound(
    redis_server: RedisServer, prefix: str, kind: str
) -> None:
    """Redis stops answering but the sockets stay open: the call raises BackendUnavailable
    (the documented bound is connect_timeout + socket_timeout; pytest's timeout would catch
    a hang), and works again once the link heals."""
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
            with pytest.raises(BackendUnavailable):
                run()
            proxy.heal()
            assert run() == "v"
        finally:
            sf.close(timeout=0)


@pytest.mark.timeout(120)
def test_a_cluster_older_than_7_is_refused_at_the_first_call() -> None:
    """Redis 6.2 has no sharded pub/sub: the first call, sync or async, raises
    UnsupportedServer naming the version, before any lease (no lock key is written)."""
    from dedupe import UnsupportedServer
    from devtools.servers import RedisClusterSet, legacy_redis_server_binary

    with RedisClusterSet(binary=legacy_redis_server_binary()) as cluster:
        host, port = cluster.startup_nodes[0]
        url = f"redis+cluster://{host}:{port}"
        sf = SingleFlight(url, prefix="old")
        try:
            with pytest.raises(UnsupportedServer, match=r"Redis 6\.2"):
                sf.call("j", lambda: 1)
        finally:
            sf.close(timeout=0)

        async def ajob() -> int:
            return 1

        async def main() -> None:
            asf = SingleFlight(url, prefix="old")
            try:
                with pytest.raises(UnsupportedServer):
                    await asf.call("j", ajob)
            finally:
                await asf.aclose(timeout=0)

        asyncio.run(main())
        client = cluster.client()
        try:
            assert list(client.scan_iter("old:*")) == []
        finally:
            client.close()


@pytest.mark.timeout(60)
def test_a_standalone_redis_6_2_runs_flights(legacy_redis: RedisServer, prefix: str) -> None:
    """The oldest server the README supports standalone: every script runs on it (SET ...
    GET in the acquire is 6.2's), sync and asyncio, leading, kept and followed."""
    sf = SingleFlight(legacy_redis.url, prefix=prefix, result_ttl=30)
    gate = threading.Event()
    runs: list[int] = []

    def slow() -> str:
        runs.append(1)
        gate.wait(10)
        return "v"

    async def aval() -> str:
        return "a"

    try:
        leader = threading.Thread(target=lambda: sf.call("slow", slow))
        leader.start()
        until(lambda: bool(runs), what="the leader to start")
        other = SingleFlight(legacy_redis.url, prefix=prefix, result_ttl=30)
        try:
            got: list[str] = []
            follower = threading.Thread(target=lambda: got.append(other.call("slow", slow)))
            follower.start()
            until(lambda: bool(other.inflight()), what="the follower to join")
            gate.set()
            follower.join(10)
            leader.join(10)
            assert got == ["v"] and runs == [1]
        finally:
            other.close(timeout=0)
        assert sf.call("slow", lambda: "again") == "v"  # kept

        async def main() -> str:
            try:
                return str(await sf.call("async", aval))
            finally:
                await sf.aclose()

        assert asyncio.run(main()) == "a"
    finally:
        sf.close(timeout=0)
