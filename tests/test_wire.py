"""The wire: scripts packed by dedupe and carried on redis-py connections of its own.

What it promises: the bytes are what redis-py would send; a connection is never used again
with a reply left unread on it; a connection the server dropped is replaced within the
call; only as many connections as commands ran at once; a client passed in keeps its
pool's limits; close() closes what the wire opened; a flushed script cache costs nothing.
That a forked child or another event loop never shares a connection is in
test_fork_and_loop_safe.py.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import redis
from helpers import until
from hypothesis import given, settings
from hypothesis import strategies as st

from dedupe import BackendUnavailable, SingleFlight
from dedupe.backend.commands import ACQUIRE, COMPLETE, ScriptCall
from dedupe.backend.wire import pack
from devtools.servers import RedisServer

pytestmark = [pytest.mark.timeout(60), pytest.mark.compat]


def _ours(client: redis.Redis, prefix: str, role: str = "cmd") -> int:
    """Connections to the server named as this prefix's command connections."""
    return sum(1 for c in client.client_list() if c["name"].startswith(f"{prefix}:{role}:"))


# --------------------------------------------------------------------------- bytes


_arg = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)


@settings(max_examples=300, deadline=None)
@given(
    keys=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=4),
    args=st.lists(_arg, max_size=6),
)
def test_packed_bytes_are_what_redis_py_sends(keys: list[str], args: list[Any]) -> None:
    call = ScriptCall(ACQUIRE, tuple(keys), tuple(args))
    packer = redis.connection.Connection()  # never connected: only its packer is used
    want = b"".join(packer.pack_command("EVALSHA", ACQUIRE.sha, len(keys), *keys, *args))
    assert b"".join(pack(call)) == want
    want = b"".join(packer.pack_command("EVAL", ACQUIRE.lua, len(keys), *keys, *args))
    assert b"".join(pack(call, by_sha=False)) == want


def test_a_large_record_is_packed_whole() -> None:
    record = bytes(range(256)) * 4096  # 1 MiB, every byte value
    call = ScriptCall(COMPLETE, ("a:lock", "a:result", "a:token"), ("1:me", record, 1000, b""))
    packer = redis.connection.Connection()
    want = b"".join(packer.pack_command("EVALSHA", COMPLETE.sha, 3, *call.keys, *call.args))
    assert b"".join(pack(call)) == want


# --------------------------------------------------------------------------- connections


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_timed_out_reply_is_never_read_by_a_later_command(
    redis_server: RedisServer, prefix: str, kind: str
) -> None:
    """A blackholed link times the acquire out; heal() then delivers its reply (a LEAD).
    Were the connection used again without being dropped, the next call would read that
    LEAD as its own acquire's reply and run a job whose value is kept in Redis."""
    from proxy import Proxy

    runs: list[str] = []

    async def arun(value: str) -> str:
        runs.append(value)
        return value

    with Proxy(redis_server.address).start() as proxy:
        url = "redis://{}:{}/0".format(*proxy.address)
        sf = SingleFlight(
            url, prefix=prefix, connect_timeout=0.5, socket_timeout=0.5, result_ttl=60
        )
        try:
            if kind == "sync":
                assert sf.call("kept", lambda: "old") == "old"
                proxy.blackhole()
                with pytest.raises(BackendUnavailable):
                    sf.call("cut", lambda: "cut")
                proxy.heal()
                for _ in range(5):
                    assert sf.call("kept", lambda: runs.append("new") or "new") == "old"
            else:

                async def main() -> None:
                    try:
                        assert await sf.call("kept", arun, "old") == "old"
                        runs.clear()
                        proxy.blackhole()
                        with pytest.raises(BackendUnavailable):
                            await sf.call("cut", arun, "cut")
                        proxy.heal()
                        for _ in range(5):
                            assert await sf.call("kept", arun, "new") == "old"
                    finally:
                        await sf.aclose()

                asyncio.run(main())
            assert runs == []
        finally:
            sf.close(timeout=0)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_connections_the_server_dropped_are_replaced_within_the_call(
    fresh_redis: RedisServer, prefix: str, kind: str
) -> None:
    admin = fresh_redis.client()
    sf = SingleFlight(fresh_redis.url, prefix=prefix)

    async def aval(v: int) -> int:
        return v

    def calls(first: int) -> list[int]:
        if kind == "sync":
            return [sf.call(f"k{i}", lambda i=i: i) for i in range(first, first + 3)]

        async def main() -> list[int]:
            return [await sf.call(f"k{i}", aval, i) for i in range(first, first + 3)]

        return loop.run_until_complete(main())

    loop = asyncio.new_event_loop()
    try:
        assert calls(0) == [0, 1, 2]
        for c in admin.client_list():
            if c["name"].startswith(f"{prefix}:cmd:"):
                admin.client_kill_filter(_id=c["id"])
        assert calls(10) == [10, 11, 12]  # no BackendUnavailable: one retry reconnects
        admin.script_flush()  # and a restarted server's empty script cache
        assert calls(20) == [20, 21, 22]
    finally:
        loop.run_until_complete(sf.aclose())
        loop.close()
        sf.close(timeout=0)
        admin.close()


def test_only_as_many_connections_as_commands_ran_at_once(
    redis_client: redis.Redis, redis_url: str, prefix: str
) -> None:
    sf = SingleFlight(redis_url, prefix=prefix)
    try:
        for i in range(200):
            assert sf.call(f"seq{i}", lambda i=i: i) == i
        assert _ours(redis_client, prefix) == 1

        threads = 12
        barrier = threading.Barrier(threads)
        errors: list[BaseException] = []

        def worker(w: int) -> None:
            try:
                barrier.wait(10)
                for i in range(30):
                    assert sf.call(f"par{w}:{i}", lambda: w) == w
            except BaseException as exc:
                errors.append(exc)

        ts = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert errors == []
        assert 1 <= _ours(redis_client, prefix) <= threads
    finally:
        sf.close(timeout=0)
    # close() closed every connection it opened. The server learns of a closed socket in its
    # own time: a CLIENT LIST sent at once listed all 12 now and then (on Python 3.12, 2 runs
    # in 15), and none a moment later.
    until(lambda: _ours(redis_client, prefix) == 0, 5, "the server to drop our connections")


def test_asyncio_connections_follow_concurrency_and_close_with_the_loop(
    redis_client: redis.Redis, redis_url: str, prefix: str
) -> None:
    sf = SingleFlight(redis_url, prefix=prefix)

    async def val(v: int) -> int:
        return v

    async def main() -> None:
        try:
            for i in range(100):
                assert await sf.call(f"seq{i}", val, i) == i
            assert _ours(redis_client, prefix) == 1
            got = await asyncio.gather(*(sf.call(f"par{i}", val, i) for i in range(300)))
            assert got == list(range(300))
            assert _ours(redis_client, prefix) <= 64  # the loop's command slots
        finally:
            await sf.aclose()
        assert _ours(redis_client, prefix) == 0

    try:
        asyncio.run(main())
    finally:
        sf.close(timeout=0)


def test_a_client_passed_in_keeps_its_pools_limit(
    redis_client: redis.Redis, redis_server: RedisServer, prefix: str
) -> None:
    host, port = redis_server.address
    name = f"{prefix}:given"
    pool = redis.BlockingConnectionPool(
        host=host, port=port, max_connections=2, timeout=20, client_name=name
    )
    given = redis.Redis(connection_pool=pool)
    sf = SingleFlight(client=given, prefix=prefix)
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(sum(1 for c in redis_client.client_list() if c["name"] == name))
            stop.wait(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for i in range(20):
                assert sf.call(f"w{w}:{i}", lambda: w) == w
        except BaseException as exc:
            errors.append(exc)

    ts = [threading.Thread(target=worker, args=(w,)) for w in range(10)]
    try:
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
    finally:
        stop.set()
        watcher.join(5)
        sf.close(timeout=0)
    assert errors == []
    assert max(seen) <= 2
    assert _ours(redis_client, prefix) == 0  # nothing of our own was opened beside its pool
    given.close()
    pool.disconnect()


def test_non_ascii_job_ids_reach_the_same_keys_as_the_client_api(
    redis_client: redis.Redis, redis_url: str, prefix: str
) -> None:
    """The wire encodes keys itself; forget() and inspect() go through redis-py's client."""
    sf = SingleFlight(redis_url, prefix=prefix, result_ttl=60)
    runs: list[int] = []
    job = "отчёт:日本:🙂"
    try:
        assert sf.call(job, lambda: runs.append(1) or "v1") == "v1"
        state = sf.inspect(job)
        assert state.kept is not None and state.token_counter is not None
        assert sf.call(job, lambda: runs.append(2) or "v2") == "v1"
        sf.forget(job)
        assert sf.call(job, lambda: runs.append(3) or "v3") == "v3"
        assert runs == [1, 3]
    finally:
        sf.close(timeout=0)


def test_an_asyncio_record_larger_than_the_socket_buffer_goes_out_whole(
    redis_url: str, prefix: str
) -> None:
    """A write the kernel cannot take at once waits for the transport to drain."""
    sf = SingleFlight(redis_url, prefix=prefix, result_ttl=60)
    big = bytes(range(256)) * (32 * 1024)  # 8 MiB

    async def make() -> bytes:
        return big

    async def main() -> None:
        try:
            assert await sf.call("big", make) == big
        finally:
            await sf.aclose()

    try:
        asyncio.run(main())
        # Stored whole: a sync caller is served the kept record without running anything.
        assert sf.call("big", lambda: b"ran again") == big
    finally:
        sf.close(timeout=0)
