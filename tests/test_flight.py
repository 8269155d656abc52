"""Single-flight semantics inside one process, against a real redis-server.

Two SingleFlight instances share nothing but Redis, so a pair of them stands in for two
processes where a test needs a follower without paying for a spawn.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from dedupe import (
    BackendUnavailable,
    ReentrantFlight,
    SingleFlight,
    WaitTimeout,
    current_flight,
)
from dedupe.core.keys import names_for

pytestmark = [pytest.mark.timeout(30), pytest.mark.compat]


@pytest.fixture
def sf(redis_url: str, prefix: str) -> Iterator[SingleFlight]:
    inst = SingleFlight(redis_url, prefix=prefix, lock_ttl=2.0)
    yield inst
    inst.close()


@pytest.fixture
def other(redis_url: str, prefix: str) -> Iterator[SingleFlight]:
    """A second instance: a follower as good as one in another process."""
    inst = SingleFlight(redis_url, prefix=prefix, lock_ttl=2.0)
    yield inst
    inst.close()


def commandstats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def test_threads_share_one_run_and_one_lock_attempt(
    sf: SingleFlight, redis_client: redis.Redis
) -> None:
    runs: list[int] = []
    gate = threading.Event()
    barrier = threading.Barrier(16)

    @sf(key="user:{user_id}")
    def load(user_id: int) -> dict[str, int]:
        runs.append(user_id)
        gate.wait(10)  # hold the flight open until every thread has joined it
        return {"id": user_id}

    results: list[Any] = []

    def caller() -> None:
        barrier.wait(10)
        results.append(load(7))

    threads = [threading.Thread(target=caller) for _ in range(16)]
    sf.call("warm-up", lambda: None)  # loads the scripts, so only the flight is counted
    redis_client.config_resetstat()
    for t in threads:
        t.start()
    # Hold the flight open until all sixteen threads have joined its one entry.
    deadline = time.monotonic() + 10
    while sum(e.waiters for e in sf.backend().sync_flights._entries.values()) < 16:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    gate.set()
    for t in threads:
        t.join(10)
    assert runs == [7]
    assert results == [{"id": 7}] * 16
    stats = commandstats(redis_client)
    # One caller costs one acquire and one complete; sixteen threads cost the same.
    assert stats.get("evalsha", 0) == 2 and "eval" not in stats
    assert stats.get("subscribe", 0) == 0


async def test_tasks_share_one_run(sf: SingleFlight) -> None:
    runs = 0

    @sf(key="report:{rid}")
    async def report(rid: str) -> str:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.2)
        return f"report {rid}"

    results = await asyncio.gather(*(report("q3") for _ in range(50)))
    assert runs == 1
    assert results == ["report q3"] * 50
    assert sf.stats()["flights_in_process"] == 0


def test_follower_instance_gets_leader_value(sf: SingleFlight, other: SingleFlight) -> None:
    started = threading.Event()
    release = threading.Event()
    runs: list[str] = []

    def work(tag: str) -> str:
        runs.append(tag)
        started.set()
        release.wait(10)
        return f"from {tag}"

    leader_result: list[str] = []
    t = threading.Thread(target=lambda: leader_result.append(sf.call("job", work, "leader")))
    t.start()
    assert started.wait(10)
    follower_result: list[str] = []
    f = threading.Thread(target=lambda: follower_result.append(other.call("job", work, "f")))
    f.start()
    # The follower subscribes before we let the leader finish.
    deadline = time.monotonic() + 10
    while not other.backend().hub().channels():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    release.set()
    t.join(10)
    f.join(10)
    assert runs == ["leader"]
    assert leader_result == ["from leader"]
    assert follower_result == ["from leader"]
    deadline = time.monotonic() + 10
    while other.backend().hub().channels():  # the UNSUBSCRIBE is acked asynchronously
        assert time.monotonic() < deadline
        time.sleep(0.005)


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


def test_current_flight_and_growing_tokens(sf: SingleFlight) -> None:
    seen: list[Any] = []

    @sf(key="tok", namespace=False)
    def job() -> int:
        flight = current_flight()
        assert flight is not None
        seen.append((flight.key, flight.token, flight.lease_lost))
        flight.check()
        return flight.token

    assert current_flight() is None
    sf.configure(result_ttl=0)
    first, second = job(), job()
    assert second > first
    assert seen[0][0] == "tok" and seen[0][2] is False
    assert current_flight() is None


def test_reentry_fails_fast_sync(sf: SingleFlight) -> None:
    @sf(key="a:{n}")
    def a(n: int) -> int:
        return b(n)

    @sf(key="b:{n}")
    def b(n: int) -> int:
        return a(n) if n else 0

    with pytest.raises(ReentrantFlight):
        a(1)
    assert a(0) == 0  # a different key is no recursion
    with pytest.raises(ReentrantFlight):

        @sf(key="self")
        def itself() -> Any:
            return itself()

        itself()


async def test_reentry_fails_fast_async(sf: SingleFlight) -> None:
    @sf(key="x")
    async def outer() -> Any:
        return await asyncio.gather(inner())

    @sf(key="y")
    async def inner() -> Any:
        return await outer()

    with pytest.raises(ReentrantFlight):
        await outer()


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


def test_signature_and_metadata_are_kept(sf: SingleFlight) -> None:
    def plain(user_id: int, *, verbose: bool = False) -> dict[str, int]:
        """Doc."""
        return {"id": user_id}

    async def coro(user_id: int) -> int:
        return user_id

    wrapped = sf(key="u:{user_id}")(plain)
    assert inspect.signature(wrapped) == inspect.signature(plain)
    assert wrapped.__name__ == "plain" and wrapped.__doc__ == "Doc."
    assert inspect.iscoroutinefunction(sf(coro))
    assert not inspect.iscoroutinefunction(wrapped)


def test_methods_key_on_self(sf: SingleFlight) -> None:
    class Repo:
        def __init__(self, ident: int) -> None:
            self.id = ident
            self.calls = 0

        @sf(key="repo:{self.id}:{n}")
        def get(self, n: int) -> tuple[int, int]:
            self.calls += 1
            flight = current_flight()
            assert flight is not None and flight.key == Repo.get.job_id(self, n)
            return (self.id, n)

    repo = Repo(3)
    assert repo.get(4) == (3, 4)
    assert Repo.get(repo, 5) == (3, 5)
    assert repo.calls == 2


def test_bad_keys_are_typed_errors(sf: SingleFlight) -> None:
    with pytest.raises(TypeError, match="user_idd"):

        @sf(key="user:{user_idd}")
        def f(user_id: int) -> None: ...

    @sf
    def g(obj: object) -> None: ...

    with pytest.raises(TypeError, match="'obj'"):
        g(object())
    with pytest.raises(ValueError, match="empty"):
        sf.call("", lambda: None)


def test_bad_settings_are_typed_errors(redis_url: str) -> None:
    with pytest.raises(ValueError, match="lock_ttl"):
        SingleFlight(redis_url, lock_ttl=0)
    with pytest.raises(ValueError, match="result_ttl"):
        SingleFlight(redis_url, result_ttl=-1)
    with pytest.raises(ValueError, match="prefix"):
        SingleFlight(redis_url, prefix="a{b}")
    with pytest.raises(TypeError, match="wait_timeout"):
        SingleFlight(redis_url, wait_timeout="5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="nonsense"):
        SingleFlight(redis_url).configure(nonsense=1)


def test_backend_unavailable_is_prompt() -> None:
    # Port 1 on loopback: connection refused at once.
    sf = SingleFlight("redis://127.0.0.1:1/0", connect_timeout=0.5)
    with pytest.raises(BackendUnavailable):
        sf.call("x", lambda: 1)
    sf.close()


async def test_backend_unavailable_is_prompt_async() -> None:
    sf = SingleFlight("redis://127.0.0.1:1/0", connect_timeout=0.5)

    async def job() -> int:
        return 1

    with pytest.raises(BackendUnavailable):
        await sf.call("x", job)
    sf.close()


def test_sync_twin_of_async_client(redis_server: Any, prefix: str) -> None:
    import redis.asyncio

    aclient = redis.asyncio.Redis(port=redis_server.port)
    sf = SingleFlight(async_client=aclient, prefix=prefix)
    assert sf.call("twin", lambda: 5) == 5  # sync calls run on a derived sync client

    async def job() -> int:
        return 6

    assert asyncio.run(sf.call("twin-async", job)) == 6
    sf.close()

    client = redis.Redis(port=redis_server.port)
    sync_only = SingleFlight(client=client, prefix=prefix)
    assert asyncio.run(sync_only.call("twin-async-2", job)) == 6  # a derived asyncio client
    sync_only.close()
    client.close()


def test_default_instance_is_lazy_and_configurable(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dedupe import single_flight

    before = single_flight.settings
    monkeypatch.setenv("DEDUPE_REDIS_URL", redis_url)
    try:
        single_flight.configure(prefix=prefix, result_ttl=0)

        @single_flight(key="d:{n}")
        def double(n: int) -> int:
            return 2 * n

        assert double(21) == 42  # the URL came from DEDUPE_REDIS_URL, read on first use
        single_flight.configure(url="redis://127.0.0.1:1/0", connect_timeout=0.5)
        with pytest.raises(BackendUnavailable):
            double(1)  # decorated earlier, configured later: the new settings apply
    finally:
        single_flight.configure(**{f: getattr(before, f) for f in before.__dataclass_fields__})


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


async def test_call_detects_every_kind_of_coroutine_function(sf: SingleFlight) -> None:
    import functools

    class Job:
        async def __call__(self, x: int) -> int:
            return x

    async def add(a: int, b: int) -> int:
        return a + b

    assert await sf.call("callable-object", Job(), 3) == 3
    assert await sf.call("partial", functools.partial(add, 4), 1) == 5
    with pytest.warns(RuntimeWarning, match="blocks that loop"):
        assert sf.call("plain", lambda: 6) == 6  # a plain function runs now, in the loop
