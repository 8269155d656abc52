"""memory://: the same API and semantics within one process, with no Redis.

Threads, tasks, several event loops and several instances on one named store: one run per
key, values and exceptions shared, result_ttl kept and then run again, fencing tokens that
grow, forget (whether it dropped anything; it voids a running flight), inspect,
stale_while_revalidate (the stale value at once, one refresh in the background),
stale_if_error with error_backoff, soft_timeout, a lease renewed through a long run, batches,
a forked child's store of its own; clients without a real socket refused. No server is
started: the scripts run in the store (tests/test_memory_scripts.py holds them to the Lua).
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from dedupe import ConfigurationError, Served, SingleFlight, current_flight
from dedupe.backend.memory import drop_store
from tests.helpers import until

pytestmark = pytest.mark.timeout(30)

_names = itertools.count()


@pytest.fixture
def url() -> Iterator[str]:
    """A store of this test's own (memory://<name>), dropped after it."""
    name = f"test-memory-{next(_names)}"
    yield f"memory://{name}"
    drop_store(name)


@pytest.fixture
def mem(url: str) -> Iterator[SingleFlight]:
    sf = SingleFlight(url)
    yield sf
    sf.close(timeout=5)


@pytest.fixture
def other(url: str) -> Iterator[SingleFlight]:
    """A second instance on the same store: it meets the first as another process would."""
    sf = SingleFlight(url)
    yield sf
    sf.close(timeout=5)


def _waiters(sf: SingleFlight) -> int:
    return sum(e.waiters for e in sf.backend().sync_flights._entries.values())


def _subscribed(sf: SingleFlight) -> int:
    """Mailboxes subscribed through the instance's hub: flights waiting on another's lease."""
    return sum(sf.backend().hub().channels().values())


def test_threads_share_one_run(mem: SingleFlight) -> None:
    runs: list[int] = []
    gate = threading.Event()

    @mem(key="user:{user_id}")
    def load(user_id: int) -> dict[str, int]:
        runs.append(user_id)
        gate.wait(10)
        return {"id": user_id}

    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(load(7))) for _ in range(16)]
    for t in threads:
        t.start()
    until(lambda: _waiters(mem) >= 16, 10, "16 callers on one flight")
    gate.set()
    for t in threads:
        t.join(10)
    assert runs == [7]
    assert results == [{"id": 7}] * 16


def test_tasks_share_one_run(mem: SingleFlight) -> None:
    runs: list[int] = []

    @mem(key="load:{n}")
    async def load(n: int) -> int:
        runs.append(n)
        await asyncio.sleep(0.05)  # the flight stays open while the other tasks join it
        return n * 2

    async def main() -> list[int]:
        try:
            return await asyncio.gather(*(load(3) for _ in range(20)))
        finally:
            await mem.aclose()

    assert asyncio.run(main()) == [6] * 20
    assert runs == [3]


def _in_loop(fn: Any, out: list[Any]) -> threading.Thread:
    """Run coroutine function ``fn`` on an event loop of its own thread; its result or
    exception lands in ``out``."""

    def run() -> None:
        try:
            out.append(asyncio.run(fn()))
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_several_loops_and_instances_share_one_run_through_the_store(url: str) -> None:
    """Each loop has its own table of flights and each instance its own hub: they meet only
    in the store, through the lease and the published outcome. The lease is long: a
    follower that missed the message would wait for it past the test's timeout."""
    mem, other = SingleFlight(url, lock_ttl=60), SingleFlight(url, lock_ttl=60)
    runs: list[str] = []
    gate = threading.Event()

    async def work() -> str:
        runs.append("ran")
        await asyncio.to_thread(gate.wait, 10)
        return "value"

    def caller(sf: SingleFlight) -> Any:
        async def go() -> Served:
            try:
                return await sf.call_detailed("job", work)  # type: ignore[no-any-return]
            finally:
                await sf.aclose()

        return go

    leader_out: list[Any] = []
    leader = _in_loop(caller(mem), leader_out)
    until(lambda: bool(runs), 10, "the leader runs")
    follower_outs: list[list[Any]] = [[], [], []]
    followers = [
        _in_loop(caller(sf), out)
        for sf, out in zip((other, mem, other), follower_outs, strict=True)
    ]
    until(lambda: _subscribed(mem) == 1 and _subscribed(other) == 2, 10, "the followers subscribed")
    gate.set()
    for t in (leader, *followers):
        t.join(10)
    assert runs == ["ran"]
    assert leader_out[0].value == "value" and leader_out[0].role == "leader"
    for out in follower_outs:
        assert out[0].value == "value" and out[0].role == "remote", out
    mem.close(timeout=5)
    other.close(timeout=5)


def test_exceptions_are_shared(mem: SingleFlight, other: SingleFlight) -> None:
    runs: list[int] = []
    gate = threading.Event()

    def fail() -> None:
        runs.append(1)
        gate.wait(10)
        raise ValueError("no such user")

    errors: list[BaseException] = []

    def call(sf: SingleFlight) -> None:
        try:
            sf.call("fails", fail)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(sf,)) for sf in (mem, mem, other, other)]
    threads[0].start()
    until(lambda: bool(runs), 10, "the leader runs")
    for t in threads[1:]:
        t.start()
    until(
        lambda: _waiters(mem) >= 2 and _waiters(other) >= 2 and _subscribed(other) == 1,
        10,
        "every caller waits",
    )
    gate.set()
    for t in threads:
        t.join(10)
    assert runs == [1]
    assert len(errors) == 4
    for exc in errors:
        assert type(exc) is ValueError and str(exc) == "no such user"


def test_result_ttl_keeps_the_value_then_runs_again(url: str) -> None:
    sf = SingleFlight(url, result_ttl=0.2)
    try:
        runs = itertools.count(1)
        first = sf.call_detailed("kept", lambda: next(runs))
        assert (first.value, first.role) == (1, "leader")
        again = sf.call_detailed("kept", lambda: next(runs))
        assert (again.value, again.role, again.shared) == (1, "kept", True)
        assert sf.inspect("kept").kept is not None
        # Each call is its own check: it is served the kept value until result_ttl ends.
        until(lambda: sf.call_detailed("kept", lambda: next(runs)).role == "leader", 10)
        assert next(runs) == 3  # exactly one more run: the one after the value expired
    finally:
        sf.close(timeout=5)


def test_fencing_tokens_grow(url: str) -> None:
    sf = SingleFlight(url, result_ttl=0)
    try:
        tokens = [sf.call("fenced", lambda: current_flight().token) for _ in range(5)]  # type: ignore[union-attr]
        assert sf.forget("fenced") is False
        tokens.append(sf.call("fenced", lambda: current_flight().token))  # type: ignore[union-attr]
        assert tokens == sorted(tokens) and len(set(tokens)) == 6
    finally:
        sf.close(timeout=5)


def test_forget_says_whether_it_dropped_and_voids_a_running_flight(mem: SingleFlight) -> None:
    assert mem.forget("gone") is False
    mem.call("gone", lambda: 1)
    assert mem.forget("gone") is True
    assert mem.forget("gone") is False

    runs: list[int] = []
    gate = threading.Event()

    def slow() -> int:
        runs.append(1)
        mine = len(runs)
        gate.wait(10)
        return mine

    out: list[int] = []
    first = threading.Thread(target=lambda: out.append(mem.call("voided", slow)))
    first.start()
    until(lambda: bool(runs), 10, "the first run")
    holder = mem.inspect("voided").holder
    assert holder is not None
    mem.forget("voided")
    # A call after forget does not join the run that began before it: it runs its own.
    gate.set()
    assert mem.call("voided", slow) == 2
    first.join(10)
    assert out == [1] and len(runs) == 2


def test_a_lease_is_renewed_while_a_long_run_goes_on(url: str) -> None:
    """A run longer than lock_ttl keeps its lease (the renewer renews it in the store): a
    caller that comes meanwhile waits for it rather than taking over."""
    sf = SingleFlight(url, lock_ttl=0.3)
    runs: list[int] = []
    gate = threading.Event()

    def long_run() -> int:
        runs.append(1)
        gate.wait(10)
        return len(runs)

    try:
        first = threading.Thread(target=lambda: sf.call("long", long_run))
        first.start()
        until(lambda: bool(runs), 10, "the run")
        token = sf.inspect("long").token_counter
        # Several lease lengths later, the lease is still the first one's, renewed.
        until(lambda: sf.stats()["lease_renewed"] >= 3, 10, "three renewals")
        state = sf.inspect("long")
        assert state.holder is not None and state.token_counter == token
        out: list[int] = []
        second = threading.Thread(target=lambda: out.append(sf.call("long", long_run)))
        second.start()
        until(lambda: _waiters(sf) >= 2, 10, "the second caller on the flight")
        gate.set()
        for t in (first, second):
            t.join(10)
        assert runs == [1] and out == [1]
    finally:
        gate.set()
        sf.close(timeout=5)


def test_stale_while_revalidate_serves_stale_and_refreshes_once(url: str) -> None:
    sf = SingleFlight(url, result_ttl=0.1, stale_while_revalidate=30)
    runs: list[int] = []
    refresh_gate = threading.Event()

    def load() -> int:
        runs.append(1)
        if len(runs) > 1:
            refresh_gate.wait(10)  # the refresh stays open while stale callers come
        return len(runs)

    try:
        assert sf.call("swr", load) == 1
        until(lambda: sf.call_detailed("swr", load).stale, 10, "the value goes stale")
        until(lambda: len(runs) == 2, 10, "the refresh the first stale call started")
        kept = sf.inspect("swr").kept
        assert kept is not None
        served = [sf.call_detailed("swr", load) for _ in range(10)]
        assert {(s.value, s.stale) for s in served} == {(1, True)}
        assert len(runs) == 2  # no second refresh while one runs
        refresh_gate.set()
        until(
            lambda: getattr(sf.inspect("swr").kept, "token", 0) > kept.token,
            10,
            "the refreshed value stored",
        )
        assert len(runs) == 2
        assert sf.call("swr", load) == 2
    finally:
        refresh_gate.set()
        sf.close(timeout=5)


def test_stale_if_error_serves_the_last_good_value_and_backs_off(url: str) -> None:
    sf = SingleFlight(url, result_ttl=0.05, stale_if_error=30, error_backoff=30)
    calls: list[int] = []

    def load() -> int:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("backend down")
        return 41

    try:
        assert sf.call("sie", load) == 41
        until(lambda: len(calls) > 1 or sf.call("sie", load) != 41, 10, "a run after result_ttl")
        assert len(calls) == 2  # the run after result_ttl failed; its callers got 41
        served = [sf.call_detailed("sie", load) for _ in range(5)]
        assert {(s.value, s.stale) for s in served} == {(41, True)}
        assert len(calls) == 2  # error_backoff: no run while the job backs off
    finally:
        sf.close(timeout=5)


def test_soft_timeout_gives_a_waiting_caller_the_stale_value(url: str) -> None:
    sf = SingleFlight(url, result_ttl=0.05, stale_if_error=30, soft_timeout=0.2)
    runs: list[int] = []
    gate = threading.Event()

    def load() -> int:
        runs.append(1)
        if len(runs) > 1:
            gate.wait(10)  # the run after result_ttl is slow
        return len(runs)

    try:
        assert sf.call("soft", load) == 1

        def slow_caller() -> None:  # served the kept value until result_ttl ends; then runs
            while len(runs) < 2 and not gate.is_set():
                sf.call("soft", load)

        slow = threading.Thread(target=slow_caller)
        slow.start()
        until(lambda: len(runs) == 2, 10, "the slow run")
        # A caller of another instance waits on that run; at its soft timeout it is served
        # the stale value instead.
        follower = SingleFlight(url, result_ttl=0.05, stale_if_error=30, soft_timeout=0.2)
        served = follower.call_detailed("soft", load)
        assert (served.value, served.stale) == (1, True)
        gate.set()
        slow.join(10)
        assert len(runs) == 2
        follower.close(timeout=5)
    finally:
        gate.set()
        sf.close(timeout=5)


def test_batches_run_each_key_once(mem: SingleFlight, other: SingleFlight) -> None:
    led: list[list[int]] = []
    gate = threading.Event()

    def fetch(items: list[int]) -> dict[int, str]:
        led.append(sorted(items))
        gate.wait(10)
        return {i: f"v{i}" for i in items}

    out: list[dict[int, str]] = []
    first = threading.Thread(
        target=lambda: out.append(mem.call_batch([1, 2, 3], fetch, key="item:{item}"))
    )
    first.start()
    until(lambda: bool(led), 10, "the first batch runs")
    second = threading.Thread(
        target=lambda: out.append(other.call_batch([2, 3, 4], fetch, key="item:{item}"))
    )
    second.start()
    until(lambda: len(led) == 2, 10, "the second batch runs its own item")
    gate.set()
    for t in (first, second):
        t.join(10)
    assert sorted(led) == [[1, 2, 3], [4]]
    assert sorted(out, key=len) == [{1: "v1", 2: "v2", 3: "v3"}, {2: "v2", 3: "v3", 4: "v4"}]
    assert mem.call_batch([1, 4], fetch, key="item:{item}") == {1: "v1", 4: "v4"}
    assert len(led) == 2  # kept: no run


def test_stores_are_apart_by_name(url: str) -> None:
    a, b = SingleFlight(url), SingleFlight(url + "-other")
    try:
        a.call("apart", lambda: 1)
        assert a.inspect("apart").kept is not None
        assert b.inspect("apart").kept is None
        assert b.call_detailed("apart", lambda: 2).role == "leader"
    finally:
        a.close(timeout=5)
        b.close(timeout=5)


_FORKED: SingleFlight | None = None


def _forked_child(out: Any) -> None:
    assert _FORKED is not None
    kept = _FORKED.inspect("parent-job").kept
    served = _FORKED.call_detailed("parent-job", os.getpid)
    out.put((kept is None, served.role, served.value == os.getpid()))


def test_a_forked_child_has_a_store_of_its_own(url: str) -> None:
    """memory:// does not coordinate processes: a child starts empty, and runs the job."""
    global _FORKED
    _FORKED = SingleFlight(url, result_ttl=60)
    try:
        assert _FORKED.call("parent-job", os.getpid) == os.getpid()
        fork = mp.get_context("fork")
        out = fork.Queue()
        child = fork.Process(target=_forked_child, args=(out,))
        child.start()
        got = out.get(timeout=20)
        child.join(10)
        assert got == (True, "leader", True)
        assert _FORKED.call_detailed("parent-job", os.getpid).role == "kept"  # the parent's own
    finally:
        _FORKED.close(timeout=5)
        _FORKED = None


def test_clients_without_a_socket_transport_are_refused() -> None:
    fakeredis = pytest.importorskip("fakeredis")
    for given in ({"client": fakeredis.FakeRedis()}, {"async_client": fakeredis.FakeAsyncRedis()}):
        with pytest.raises(ConfigurationError, match=r"memory://"):
            SingleFlight(**given)
    # A connection class of the user's own that keeps redis-py's socket is a real transport.
    import redis

    class Named(redis.Connection):
        pass

    pool = redis.ConnectionPool(connection_class=Named, host="127.0.0.1", port=1)
    SingleFlight(client=redis.Redis(connection_pool=pool))


def test_min_replicas_ack_is_refused_with_memory() -> None:
    with pytest.raises(ValueError, match="memory://"):
        SingleFlight("memory://", min_replicas_ack=1)
