"""The decorator and call() as a user writes them: signatures and metadata kept, methods
keyed on self, every kind of coroutine function detected, bad keys and settings refused as
typed errors, the derived sync/async twin clients, and the lazy default instance.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from dedupe import BackendUnavailable, SingleFlight, current_flight

pytestmark = [pytest.mark.timeout(30), pytest.mark.compat]


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


def test_a_decorated_bound_method_keys_on_its_own_arguments(sf: SingleFlight) -> None:
    # A bound method's signature has no self: its key is built from the call's arguments
    # alone (it once got the method's __self__ too, and every call raised TypeError).
    class Client:
        def __init__(self) -> None:
            self.calls = 0

        def fetch(self, n: int) -> int:
            self.calls += 1
            return n * 2

    client = Client()
    fetch = sf(key="fetch:{n}", result_ttl=30)(client.fetch)
    assert fetch.job_id(4) == fetch.job_id(n=4) and fetch.job_id(4).endswith(":fetch:4")
    assert fetch(4) == 8
    assert fetch.detailed(4).role == "kept"  # the same job as the plain call
    assert fetch.detailed(5).value == 10
    with pytest.raises(TypeError):
        fetch(4, 5)
    assert client.calls == 2


def test_a_key_without_fields_names_one_job_and_still_checks_arguments(
    redis_url: str, prefix: str
) -> None:
    sf = SingleFlight(redis_url, prefix=prefix, local_cache=True)

    @sf(key="token", result_ttl=30)
    def refresh(scope: str) -> str:
        return scope

    try:
        assert refresh.job_id("a") == refresh.job_id(scope="b") == refresh.job_id("c")
        assert refresh("a") == "a"
        assert refresh("b") == "a"  # one job, whatever the arguments: its local copy
        assert refresh.detailed("c").role == "copy"
        with pytest.raises(TypeError):
            refresh()
        with pytest.raises(TypeError):
            refresh("a", "b")
    finally:
        sf.close()


def test_generator_functions_are_refused_when_given(sf: SingleFlight) -> None:
    # A generator is consumed once and cannot travel: refused where it is given, not at the
    # first call as a value the serializer cannot send.
    def numbers(n: int) -> Iterator[int]:
        yield n

    async def anumbers(n: int) -> AsyncIterator[int]:
        yield n

    class Callable_:
        def __call__(self, n: int) -> Iterator[int]:
            yield n

    for fn in (numbers, anumbers, functools.partial(numbers, 1), Callable_()):
        with pytest.raises(TypeError, match="generator function"):
            sf(key="g")(fn)
        with pytest.raises(TypeError, match="generator function"):
            sf.call("g", fn)
        with pytest.raises(TypeError, match="generator function"):
            sf.batch(key="g:{item}")(fn)
        with pytest.raises(TypeError, match="generator function"):
            sf.call_batch([1], fn, key="g:{item}")
    with pytest.raises(TypeError, match="must be callable, not int"):
        sf.call("g", 3)  # type: ignore[call-overload]


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
    with pytest.raises(TypeError, match="@classmethod above"):

        class Repo:
            @sf(key="k:{n}")  # type: ignore[arg-type]
            @classmethod
            def load(cls, n: int) -> int: ...

    class Fine:  # the other order works
        @classmethod
        @sf(key="k:{n}", result_ttl=0)
        def load(cls, n: int) -> tuple[str, int]:
            return cls.__name__, n

    assert Fine.load(3) == ("Fine", 3)


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
