"""SingleFlight as a user meets it: namespaced job ids, pickling, what a flight leaves in Redis,
forget / job_id / detailed, checks made at construction, docstrings and warnings, and the
local copies' bounds. Redis tests use the shared test server with a per-test prefix.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import gc
import multiprocessing
import os
import pickle
import pydoc
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from dedupe import INHERIT, ReentrantFlight, Served, SingleFlight
from dedupe.core.keys import names_for
from dedupe.core.local_copies import LocalCopies, estimate_size
from dedupe.overrides import Overrides
from devtools.servers import RedisServer

# A port nothing listens on: building an instance must never need one.
NOWHERE = "redis://127.0.0.1:1/0"

# For the process-pool test: spawned workers import this module and build this instance.
POOL_SF = SingleFlight(
    os.environ.get("DEDUPE_TEST_API_URL", NOWHERE),
    prefix=os.environ.get("DEDUPE_TEST_API_PREFIX", "api-pool"),
)


@POOL_SF
def pool_square(x: int) -> int:
    return x * x


@pytest.fixture
def sf(redis_url: str, prefix: str) -> Iterator[SingleFlight]:
    instance = SingleFlight(redis_url, prefix=prefix, result_ttl=30.0)
    try:
        yield instance
    finally:
        instance.close()


def result_key(prefix: str, job_id: str) -> str:
    return f"{prefix}:{{{job_id}}}:result"


# --------------------------------------------------------------------------- namespaces


def test_two_functions_with_one_template_keep_their_own_results(
    sf: SingleFlight, prefix: str, redis_client: redis.Redis
) -> None:
    # The README's quickstart shape: two functions, one key template.
    @sf(key="user:{user_id}")
    def load_profile(user_id: int) -> dict[str, Any]:
        return {"profile": user_id}

    @sf(key="user:{user_id}")
    def load_orders(user_id: int) -> list[int]:
        return [user_id]

    assert load_profile(42) == {"profile": 42}
    assert load_orders(42) == [42]
    assert load_profile(42) == {"profile": 42}  # kept, and still its own
    where = f"{__name__}.test_two_functions_with_one_template_keep_their_own_results.<locals>"
    assert load_orders.job_id(42) == f"{where}.load_orders:user:42"
    assert redis_client.exists(result_key(prefix, load_profile.job_id(42))) == 1
    assert redis_client.exists(result_key(prefix, load_orders.job_id(42))) == 1


def _dedupe_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("dedupe")}


def test_with_and_async_with_close_the_instance(redis_url: str, prefix: str) -> None:
    before = _dedupe_threads()
    with SingleFlight(redis_url, prefix=prefix, lock_ttl=2.0) as sf:
        assert sf.call("with", lambda: 7) == 7
        assert _dedupe_threads() - before  # the lease's renewer runs
    assert not _dedupe_threads() - before  # closed at the end of the block

    async def main() -> int:
        async with SingleFlight(redis_url, prefix=prefix, lock_ttl=2.0) as asf:

            async def job() -> int:
                return 8

            got = await asf.call("async with", job)
            assert _dedupe_threads() - before
        assert not _dedupe_threads() - before
        return got

    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)  # the loop's client closed too
        assert asyncio.run(main()) == 8


def test_namespace_false_shares_the_id_with_call(sf: SingleFlight) -> None:
    runs: list[int] = []

    @sf(key="user:{user_id}", namespace=False)
    def load(user_id: int) -> str:
        runs.append(user_id)
        return f"loaded {user_id}"

    assert load.job_id(7) == "user:7"
    assert load(7) == "loaded 7"
    assert sf.call("user:7", lambda: "call ran") == "loaded 7"  # kept under the shared id
    assert runs == [7]


def test_sf_with_a_function_and_a_key_uses_the_key(sf: SingleFlight) -> None:
    def plain(n: int) -> int:
        return n

    wrapped = sf(plain, key="n:{n}")
    assert wrapped.job_id(3).endswith(":n:3")
    assert wrapped(3) == 3


# --------------------------------------------------------------------------- pickling


def test_a_decorated_function_pickles_by_reference() -> None:
    assert pickle.loads(pickle.dumps(pool_square)) is pool_square
    assert copy.copy(pool_square) is pool_square
    assert copy.deepcopy(pool_square) is pool_square


@pytest.mark.timeout(60)
def test_process_pool_map_with_a_decorated_function(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEDUPE_TEST_API_URL", redis_url)
    monkeypatch.setenv("DEDUPE_TEST_API_PREFIX", prefix)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        assert list(pool.map(pool_square, range(6), timeout=50)) == [0, 1, 4, 9, 16, 25]


# --------------------------------------------------------------------------- leftovers


def leftovers(client: redis.Redis, prefix: str) -> dict[str, int]:
    return {k.decode(): int(client.pttl(k)) for k in client.scan_iter(f"{prefix}:*", count=1000)}


def test_what_200_flights_leave_lives_at_most_a_minute(
    sf: SingleFlight, prefix: str, redis_client: redis.Redis
) -> None:
    sf.configure(result_ttl=1.0)
    for i in range(200):
        assert sf.call(f"id:{i}", lambda: "v") == "v"
    left = leftovers(redis_client, prefix)
    assert len(left) == 400  # per id: its token counter and its result
    assert all(0 < ttl <= 60_000 for ttl in left.values()), sorted(left.values())[-3:]
    tokens = [ttl for key, ttl in left.items() if key.endswith(":token")]
    results = [ttl for key, ttl in left.items() if key.endswith(":result")]
    assert len(tokens) == len(results) == 200
    assert all(ttl <= 10_000 + 2_000 for ttl in results)  # max(result_ttl, lock_ttl + 2 s)


def test_token_ttl_and_lock_ttl_bound_the_leftovers(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    sf = SingleFlight(redis_url, prefix=prefix, token_ttl=3.0, lock_ttl=0.5, result_ttl=0.2)
    try:
        for i in range(20):
            sf.call(f"id:{i}", lambda: "v")
    finally:
        sf.close()
    left = leftovers(redis_client, prefix)
    assert len(left) == 40
    assert all(0 < ttl <= 3_000 for key, ttl in left.items() if key.endswith(":token"))
    assert all(0 < ttl <= 2_500 for key, ttl in left.items() if key.endswith(":result"))


# --------------------------------------------------------------------------- handles


def test_forget_makes_the_next_call_run(sf: SingleFlight, prefix: str) -> None:
    runs: list[int] = []

    def compute() -> int:
        runs.append(1)
        return len(runs)

    assert sf.call("report", compute) == 1
    assert sf.call("report", compute) == 1  # kept for result_ttl
    assert sf.forget("report") is True
    assert sf.call("report", compute) == 2
    assert sf.forget("never-ran") is False  # nothing kept: fine, and said so


def test_forget_says_whether_a_kept_value_was_dropped(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    sf = SingleFlight(redis_url, prefix=prefix, result_ttl=30.0)
    brief = SingleFlight(redis_url, prefix=prefix, result_ttl=0)  # keeps nothing
    try:
        sf.call("kept", lambda: 1)
        assert sf.forget("kept") is True
        assert sf.forget("kept") is False  # already gone
        # A record that is no longer fresh stays a while for the flight's own waiters; it is
        # deleted too, but no caller would have been served it: nothing kept was dropped.
        brief.call("brief", lambda: 2)
        result = names_for(prefix, "brief").result
        assert redis_client.exists(result) == 1
        assert brief.forget("brief") is False
        assert redis_client.exists(result) == 0
    finally:
        sf.close()
        brief.close()


def test_forget_on_a_decorated_function_and_its_local_copy(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    sf = SingleFlight(redis_url, prefix=prefix, result_ttl=30.0, local_cache=True)
    versions = {"n": 1}

    @sf(key="cfg:{name}")
    def config(name: str) -> int:
        return versions["n"]

    try:
        assert config("a") == 1
        versions["n"] = 2  # a write...
        assert config("a") == 1  # ...the kept value is stale
        assert config.forget("a") is True  # the way out, also for this process's local copy
        assert config("a") == 2
        # Only this process's copy is left: dropping it alone counts too.
        redis_client.delete(names_for(prefix, config.job_id("a")).result)
        assert config.forget("a") is True
        assert config.forget("a") is False
    finally:
        sf.close()


def test_aforget_and_async_handles(redis_url: str, prefix: str) -> None:
    sf = SingleFlight(redis_url, prefix=prefix, result_ttl=30.0)
    runs: list[int] = []

    @sf(key="fetch:{n}")  # a bare key would refuse the closure: it captures a list
    async def fetch(n: int) -> int:
        runs.append(n)
        return n * 10

    async def main() -> None:
        first = await fetch.detailed(1)
        assert first == Served(10, False, "leader")
        again = await fetch.detailed(1)
        assert (again.value, again.shared) == (10, True)
        assert await fetch.forget(1) is True
        assert await fetch.forget(1) is False
        assert await fetch(1) == 10
        assert await sf.aforget(fetch.job_id(1)) is True
        assert await fetch(1) == 10

    try:
        asyncio.run(main())
    finally:
        sf.close()
    assert runs == [1, 1, 1]


def test_job_id_is_the_id_the_decorator_uses(
    sf: SingleFlight, prefix: str, redis_client: redis.Redis
) -> None:
    @sf
    def bare(x: int, y: str = "a") -> str:
        return f"{x}{y}"

    job_id = bare.job_id(1, y="b")
    assert job_id == bare.job_id(1, "b") != bare.job_id(1)
    assert redis_client.exists(result_key(prefix, job_id)) == 0
    bare(1, y="b")
    assert redis_client.exists(result_key(prefix, job_id)) == 1


def test_detailed_tells_a_leader_from_a_sharer(
    sf: SingleFlight, redis_url: str, prefix: str
) -> None:
    other = SingleFlight(redis_url, prefix=prefix)  # another "process": its own tables
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait(10)
        return "done"

    served: list[Served] = []
    leader = threading.Thread(target=lambda: served.append(sf.call_detailed("job", slow)))
    leader.start()
    try:
        assert started.wait(10)
        follower = threading.Thread(
            target=lambda: served.append(other.call_detailed("job", lambda: "follower ran"))
        )
        follower.start()
        channel = f"{prefix}:{{job}}"
        probe = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 10
        while probe.pubsub_numsub(channel)[0][1] == 0:  # the follower subscribed: it waits
            assert time.monotonic() < deadline
            time.sleep(0.005)
        probe.close()
    finally:
        release.set()
        leader.join(10)
        follower.join(10)
        other.close()
    assert sorted(served) == [Served("done", False, "leader"), Served("done", True, "remote")]
    kept = sf.call_detailed("job", slow)
    assert kept[:4] == ("done", True, "kept", False) and 0 <= kept.age < 10, kept


# --------------------------------------------------------------------------- construction


BAD_URLS = [
    "redis:/127.0.0.1:1/0",
    "redis//127.0.0.1:1",
    "127.0.0.1:1",
    "redis://",
    "redis://:1/0",
    "redis://127.0.0.1:port/0",
    "redis://127.0.0.1:99999/0",
    "redis://127.0.0.1:1/db",
    "redis://127.0.0.1:1/0?decode_responses=True",
    "unix://",
    "redis+cluster://127.0.0.1",
    "http://127.0.0.1:1",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_malformed_url_fails_at_construction(url: str) -> None:
    with pytest.raises(ValueError, match="Redis URL"):
        SingleFlight(url)


@pytest.mark.parametrize("url", BAD_URLS)
async def test_a_malformed_url_fails_at_construction_in_async_code(url: str) -> None:
    with pytest.raises(ValueError, match="Redis URL"):
        SingleFlight(url)


def test_a_typo_is_shown_its_likely_fix() -> None:
    with pytest.raises(ValueError, match=r"did you mean redis://127\.0\.0\.1:1"):
        SingleFlight("redis//127.0.0.1:1")


def test_construction_makes_no_connection() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        sf = SingleFlight(f"redis://127.0.0.1:{port}/0")

        @sf(key="k:{n}")
        def fn(n: int) -> int:
            return n

        assert fn.job_id(1).endswith("k:1")
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody dialled


def test_a_bad_env_url_fails_on_first_use_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DEDUPE_REDIS_URL", "redis//127.0.0.1:1")
    sf = SingleFlight()
    with pytest.raises(ValueError, match="DEDUPE_REDIS_URL"):
        sf.call("x", lambda: 1)


def test_a_decoding_client_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="decode_responses"):
        SingleFlight(client=redis.Redis(port=1, decode_responses=True))
    with pytest.raises(ValueError, match="decode_responses"):
        SingleFlight(async_client=redis.asyncio.Redis(port=1, decode_responses=True))
    SingleFlight(client=redis.Redis(port=1))  # the default is fine


@pytest.mark.timeout(20)
def test_a_decoding_client_made_after_construction_is_a_configuration_error(
    redis_server: RedisServer, prefix: str
) -> None:
    # configure() checks too: the same rule, whichever way the client arrives.
    sf = SingleFlight(NOWHERE, prefix=prefix)
    with pytest.raises(ValueError, match="decode_responses"):
        sf.configure(client=redis_server.client(decode_responses=True))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"lock_ttl": 0.001}, "lock_ttl must be at least 0.01"),
        ({"lock_ttl": 0}, "lock_ttl"),
        ({"wait_timeout": -1}, "wait_timeout"),
        ({"result_ttl": float("nan")}, "result_ttl"),
    ],
)
def test_decorator_and_constructor_validate_alike(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match) as from_constructor:
        SingleFlight(NOWHERE, **changes)
    with pytest.raises(ValueError, match=match) as from_decorator:
        SingleFlight(NOWHERE)(**changes)
    assert str(from_constructor.value) == str(from_decorator.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_hold": 5.0, "lock_ttl": 10.0}, ValueError, "max_hold .* must be longer than"),
        ({"max_hold": 10.0}, ValueError, "max_hold .* must be longer than lock_ttl"),
        ({"token_ttl": 0}, ValueError, "token_ttl must be > 0"),
        ({"token_ttl": "60"}, TypeError, "token_ttl must be a number"),
        ({"local_cache_max_bytes": 0}, ValueError, "local_cache_max_bytes must be an int >= 1"),
    ],
)
def test_new_settings_are_checked(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        SingleFlight(NOWHERE, **kwargs)


def test_a_function_lock_ttl_must_stay_under_max_hold() -> None:
    with pytest.raises(ValueError, match="max_hold"):
        SingleFlight(NOWHERE, max_hold=60.0)(lock_ttl=60.0)


def test_settings_reach_the_flight_spec(redis_url: str, prefix: str) -> None:
    sf = SingleFlight(redis_url, prefix=prefix, token_ttl=7.0, max_hold=90.0, lock_ttl=2.0)
    spec = sf._spec_maker(sf.backend(), names_for(prefix, "x"), Overrides())(None, None)
    assert (spec.token_ttl_ms, spec.max_hold_ms, spec.lock_ttl_ms) == (7000, 90_000, 2000)
    sf.close()


# --------------------------------------------------------------------------- what help() shows


def test_help_documents_every_parameter_without_object_addresses() -> None:
    text = pydoc.render_doc(SingleFlight, renderer=pydoc.plaintext)
    assert "object at 0x" not in text
    assert repr(INHERIT) == "INHERIT"
    doc = SingleFlight.__doc__ or ""
    for name in list(SingleFlight.__init__.__code__.co_varnames)[1:22]:
        assert f"``{name}``" in doc, name
    decorator_doc = SingleFlight.__call__.__doc__ or ""
    for name in ("key", "namespace", "lock_ttl", "wait_timeout", "result_ttl"):
        assert f"``{name}``" in decorator_doc, name


def test_an_unawaited_call_warns_with_the_users_function_name() -> None:
    sf = SingleFlight(NOWHERE)

    @sf
    async def fetch_report(n: int) -> int:
        return n

    async def refresh_cache() -> int:
        return 1

    for make in (lambda: fetch_report(1), lambda: sf.call("x", refresh_cache)):
        with pytest.warns(RuntimeWarning, match="(fetch_report|refresh_cache)' was never awaited"):
            coro = make()
            del coro
            gc.collect()


# --------------------------------------------------------------------------- re-entrancy


@pytest.mark.timeout(20)
def test_reentry_through_a_pool_is_caught_when_the_context_travels(sf: SingleFlight) -> None:
    # The documented recipe: submit through contextvars.copy_context().run, as
    # asyncio.to_thread does, and a self-call through the pool is ReentrantFlight, not a hang.
    @sf(key="outer")
    def outer() -> int:
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(contextvars.copy_context().run, outer).result(timeout=10)

    with pytest.raises(ReentrantFlight):
        outer()


# --------------------------------------------------------------------------- local copies


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_local_copies_evict_expired_entries_without_being_touched() -> None:
    clock = Clock()
    copies = LocalCopies(clock=clock)
    for i in range(200):
        copies.put(f"k{i}", b"x" * 100_000, fresh_ms=1000)
    assert len(copies) == 200
    clock.now += 2.0
    copies.put("fresh", b"y", fresh_ms=1000)  # any put sweeps what expired
    assert len(copies) == 1
    assert copies.nbytes < 1000
    assert copies.get("fresh") == (True, b"y")


def test_local_copies_are_bounded_in_bytes() -> None:
    copies = LocalCopies(max_bytes=1_000_000, clock=Clock())
    for i in range(50):
        copies.put(f"k{i}", b"x" * 100_000, fresh_ms=60_000)
        assert copies.nbytes <= 1_000_000
    assert 5 <= len(copies) <= 10
    assert copies.get("k49")[0] and not copies.get("k0")[0]  # the oldest went first
    copies.put("huge", b"x" * 2_000_000, fresh_ms=60_000)
    assert not copies.get("huge")[0]
    copies.discard("k49")
    assert not copies.get("k49")[0]


def test_size_estimate_sees_into_containers() -> None:
    assert estimate_size([b"x" * 10_000] * 3) >= 10_000
    assert estimate_size({"a": [b"x" * 10_000, b"y" * 10_000]}) >= 20_000
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    assert estimate_size(cyclic) > 0


def test_local_cache_max_bytes_reaches_the_local_copies(redis_url: str, prefix: str) -> None:
    sf = SingleFlight(redis_url, prefix=prefix, local_cache=True, local_cache_max_bytes=12345)
    copies = sf.backend().local_copies
    assert copies is not None and copies._max_bytes == 12345
    sf.close()


# --------------------------------------------------------------------------- typing

TYPED_SAMPLE = """
from collections.abc import Coroutine
from typing import Any

from dedupe import Served, SingleFlight

sf = SingleFlight("redis://localhost:1/0")


@sf
def square(x: int) -> int:
    return x * x


@sf(key="a:{x}")
async def asquare(x: int) -> int:
    return x * x


class Repo:
    @sf(key="repo:{self}:{n}", namespace="repo")
    def get(self, n: int) -> bytes:
        return b""


ident: str = square.job_id(3)
detail: Served = square.detailed(3)
value: int = square(3)
coro: Coroutine[Any, Any, Served] = asquare.detailed(3)
forgot: Coroutine[Any, Any, bool] = asquare.forget(3)
dropped: bool = square.forget(3)
data: bytes = Repo().get(2)
rid: str = Repo().get.job_id(2)
unbound: bytes = Repo.get(Repo(), 2)
square.job_id("three")  # E: the handles check arguments too
"""


@pytest.mark.timeout(120)
def test_mypy_sees_the_handles_of_decorated_functions(tmp_path: Path) -> None:
    sample = tmp_path / "handles.py"
    sample.write_text(TYPED_SAMPLE)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(sample)],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=tmp_path,
    )
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, proc.stdout
    assert '"job_id"' in errors[0] and 'expected "int"' in errors[0], proc.stdout


# --------------------------------------------------------------------------- blocking a loop


def test_a_sync_flight_called_in_a_running_loop_warns_once_naming_the_function(
    sf: SingleFlight,
) -> None:
    @sf(key="load:{n}")
    def load_blocking(n: int) -> int:
        return n

    def adhoc_blocking() -> str:
        return "adhoc"

    async def main() -> None:
        with pytest.warns(RuntimeWarning, match="load_blocking") as caught:
            assert load_blocking(1) == 1  # blocks this loop for the whole flight
        (warning,) = caught
        text = str(warning.message)
        assert "async def" in text and "asyncio.to_thread" in text, text
        assert warning.filename == __file__  # points at the call, not into dedupe
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert load_blocking(2) == 2  # once per function
            assert load_blocking.detailed(3).value == 3
            assert await asyncio.to_thread(load_blocking, 4) == 4  # the way out: no loop there
        with pytest.warns(RuntimeWarning, match="adhoc_blocking") as caught:
            assert sf.call("adhoc", adhoc_blocking) == "adhoc"
        assert caught[0].filename == __file__
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert sf.call("adhoc", adhoc_blocking) == "adhoc"

    asyncio.run(main())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_blocking(5) == 5  # no loop runs in this thread now


@pytest.mark.timeout(30)
@pytest.mark.parametrize("odd", ["my app", "tab\there", "ünï"])
def test_any_valid_prefix_works_sync_and_async(redis_url: str, prefix: str, odd: str) -> None:
    """A prefix validate_prefix accepts must work: connection names (CLIENT SETNAME) refuse
    spaces, so a prefix with one broke every call before it was spelt safely there."""
    sf = SingleFlight(redis_url, prefix=f"{prefix}-{odd}")
    try:
        assert sf.call("job", lambda: 7) == 7
        assert sf.call_batch([1, 2], lambda items: {i: i * 2 for i in items}, key="i:{item}") == {
            1: 2,
            2: 4,
        }

        async def main() -> int:
            async def seven() -> int:
                return 7

            try:
                return await sf.call("async-job", seven)
            finally:
                await sf.aclose()

        assert asyncio.run(main()) == 7
    finally:
        sf.close()


def test_configure_moves_the_keys_of_a_job_already_called(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    """A job's Redis names are remembered per SingleFlight (the hot path); configure() with a
    new prefix must move every later call's keys, also a job called before it."""
    sf = SingleFlight(redis_url, prefix=f"{prefix}-a", result_ttl=30.0)
    try:
        assert sf.call("moved", lambda: 1) == 1
        assert redis_client.exists(names_for(f"{prefix}-a", "moved").result) == 1
        sf.configure(prefix=f"{prefix}-b")
        assert sf.call("moved", lambda: 2) == 2  # a new prefix: nothing kept there yet
        assert redis_client.exists(names_for(f"{prefix}-b", "moved").result) == 1
    finally:
        sf.close()
