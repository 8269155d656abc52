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


# --------------------------------------------------------------------------- replies


def _resp(value: Any) -> bytes:
    """RESP2 of a value as Redis sends it (a str stands for an error reply's text)."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, bool):
        raise TypeError(value)
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%b\r\n" % (len(value), value)
    if isinstance(value, str):
        return b"-%b\r\n" % value.encode()
    return b"*%d\r\n%b" % (len(value), b"".join(_resp(v) for v in value))


def _by_redis_py(wire: bytes, count: int) -> list[Any]:
    """The replies as redis-py's own RESP2 reader parses them, off a socket."""
    import socket

    from redis._parsers import Encoder, _RESP2Parser

    ours, peer = socket.socketpair()
    try:
        ours.settimeout(5)
        writer = threading.Thread(target=peer.sendall, args=(wire,))
        writer.start()
        conn = type("Conn", (), {})()
        conn._sock, conn.socket_timeout = ours, 5
        conn.encoder = Encoder("utf-8", "strict", False)
        parser = _RESP2Parser(socket_read_size=65536)
        parser.on_connect(conn)
        got = [parser.read_response() for _ in range(count)]
        writer.join(5)
        return got
    finally:
        ours.close()
        peer.close()


def _seen(value: Any) -> Any:
    if isinstance(value, Exception):
        return (type(value).__name__, str(value))
    if isinstance(value, list):
        return [_seen(v) for v in value]
    return value


_reply = st.recursive(
    st.none()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.binary(max_size=300)  # CR, LF and "\r\n" inside values too
    | st.sampled_from(["ERR wrong", "WRONGTYPE Operation against a key"]),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(replies=st.lists(_reply, min_size=1, max_size=4))
def test_replies_parse_whole_and_a_cut_reply_asks_only_for_bytes_it_has_coming(
    replies: list[Any],
) -> None:
    """Every reply parses to its value and ends where the next begins. Cut anywhere, the
    parse asks for more, never for more than the reply has: a reader that waited for
    bytes the server will not send would hang until the socket timeout."""
    from dedupe.backend.resp import Short, parse

    wire = b"".join(_resp(r) for r in replies)
    pos, got = 0, []
    for _ in replies:
        value, pos = parse(wire, pos)
        got.append(value)
    assert pos == len(wire)
    assert _seen(got) == _seen(_by_redis_py(wire, len(replies)))
    start = 0
    for reply in replies:
        whole = _resp(reply)
        for cut in range(len(whole)):
            with pytest.raises(Short) as short:
                parse(wire[: start + cut], start)
            assert start + cut < short.value.need <= start + len(whole)
        start += len(whole)


class _Conn:
    """What read_replies uses of a redis-py connection: its socket, its name for errors."""

    health_check_interval = 0

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def _host_error(self) -> str:
        return "test peer"


@settings(max_examples=100, deadline=None)
@given(
    replies=st.lists(_reply, min_size=1, max_size=4),
    big=st.integers(min_value=0, max_value=3 * 65536),
    cuts=st.lists(st.integers(min_value=1, max_value=70000), max_size=8),
)
def test_replies_cut_into_any_pieces_on_a_socket_are_read_whole(
    replies: list[Any], big: int, cuts: list[int]
) -> None:
    """The replies of one request, and a bulk string past the read size, written in pieces
    of any size (a slow link, a large record): read_replies returns them all and leaves
    nothing on the socket."""
    import socket

    from dedupe.backend.resp import read_replies

    replies = [*replies, bytes(range(256)) * (big // 256)]
    wire = b"".join(_resp(r) for r in replies)
    ours, peer = socket.socketpair()
    ours.settimeout(5)

    def write() -> None:
        rest = memoryview(wire)
        for cut in cuts:
            peer.sendall(rest[:cut])
            rest = rest[cut:]
        peer.sendall(rest)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        got = read_replies(_Conn(ours), len(replies))
        assert _seen(got) == _seen(_by_redis_py(wire, len(replies)))
        writer.join(5)
        ours.setblocking(False)
        with pytest.raises(BlockingIOError):
            ours.recv(1)
    finally:
        writer.join(5)
        ours.close()
        peer.close()


def test_a_reply_that_does_not_come_whole_is_redis_pys_error() -> None:
    """The errors wire._on acts on: a timeout (drop, retry), a closed connection, an error
    reply of the connection kind (LOADING: raised, as redis-py raises it), bytes no
    request asked for (a connection not to use again)."""
    import socket

    from dedupe.backend.resp import read_replies

    def read(sent: bytes, count: int = 1, close: bool = False) -> list[Any]:
        ours, peer = socket.socketpair()
        ours.settimeout(0.2)
        try:
            peer.sendall(sent)
            if close:
                peer.close()
            return read_replies(_Conn(ours), count)
        finally:
            ours.close()
            peer.close()

    with pytest.raises(redis.exceptions.TimeoutError):
        read(b"$5\r\nhel")  # cut, and nothing more comes
    with pytest.raises(redis.exceptions.ConnectionError, match="closed"):
        read(b"*2\r\n:1\r\n", close=True)
    with pytest.raises(redis.exceptions.BusyLoadingError):
        read(b"-LOADING Redis is loading the dataset in memory\r\n")
    with pytest.raises(redis.exceptions.InvalidResponse):
        read(b":1\r\n:2\r\n")  # one reply asked for, two came
    with pytest.raises(redis.exceptions.InvalidResponse):
        read(b"%1\r\n:1\r\n:2\r\n")  # a RESP3 map on a RESP2 connection
    with pytest.raises(redis.exceptions.InvalidResponse):
        read(b"$x\r\n")  # a length that is no number
    with pytest.raises(redis.exceptions.InvalidResponse):
        read(b"*1\r\n" * 5000 + b":1\r\n")  # nested past the interpreter's stack
    (noscript,) = read(b"-NOSCRIPT No matching script.\r\n")
    assert isinstance(noscript, redis.exceptions.NoScriptError)


@pytest.mark.parametrize("protocol", ["", "?protocol=2", "?protocol=3"])
def test_own_connections_speak_resp2_unless_the_url_asks_for_resp3(
    redis_server: RedisServer, prefix: str, protocol: str
) -> None:
    """dedupe's command connections speak RESP2, whose replies it reads itself (redis-py 8
    speaks RESP3 unless told); a URL that asks for RESP3 gets it, read by redis-py. Either
    way a flight, a kept value's hit, a refused command and an asyncio flight work."""
    admin = redis_server.client()
    sf = SingleFlight(redis_server.url + protocol, prefix=prefix, result_ttl=60)
    want = {"3" if protocol.endswith("3") else "2"}

    def spoken() -> set[str]:
        return {c["resp"] for c in admin.client_list() if c["name"].startswith(f"{prefix}:cmd:")}

    async def aval(v: str) -> str:
        return v

    async def amain() -> set[str]:
        assert await sf.call("a", aval, "a1") == "a1"
        assert await sf.call("a", aval, "a2") == "a1"
        return spoken()

    try:
        assert sf.call("s", lambda: "s1") == "s1"
        assert sf.call("s", lambda: "s2") == "s1"  # the hit: MGET and TIME read whole
        assert spoken() == want
        sf.close(timeout=1)
        assert spoken() == set()
        assert asyncio.run(amain()) == want
        admin.script_flush()  # the next acquire gets NOSCRIPT, then sends the script
        assert sf.call("t", lambda: "t1") == "t1"
    finally:
        sf.close(timeout=0)


@settings(max_examples=100, deadline=None)
@given(
    replies=st.lists(_reply, min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=10),
)
def test_a_stream_of_pushes_cut_anywhere_yields_each_reply_once_in_order(
    replies: list[Any], cuts: list[int]
) -> None:
    """The hub's reader (resp.Stream): messages written in pieces of any size come out
    whole, each once, in order; a read that got only part of one gives [] (heard, not
    silence), a read that got nothing within its timeout gives None (silence)."""
    import socket

    from dedupe.backend.resp import Stream

    wire = b"".join(_resp(r) for r in replies)
    ours, peer = socket.socketpair()
    ours.settimeout(5)
    conn = _Conn(ours)
    conn.socket_timeout = 5  # type: ignore[attr-defined]
    stream = Stream(conn)
    got: list[Any] = []
    try:
        rest = wire
        for cut in [*cuts, len(wire)]:
            piece, rest = rest[:cut], rest[cut:]
            if not piece:
                break
            peer.sendall(piece)
            out = stream.read(5)
            assert out is not None  # bytes came: never silence
            got += out
        assert stream.read(0.01) is None  # all of it read: silence
        assert ours.gettimeout() == 5  # the socket's own timeout put back
        assert _seen(got) == _seen(_by_redis_py(wire, len(replies)))
    finally:
        ours.close()
        peer.close()


@pytest.mark.parametrize("protocol", [2, 3])  # read in resp.py; by redis-py's reader
def test_a_renewal_batch_whose_replies_time_out_never_leaves_them_to_the_next(
    redis_server: RedisServer, protocol: int
) -> None:
    """Renewals go pipelined through the renew client's pool (SyncWire.run_many). A batch
    whose replies do not come in time fails, and its connection goes back to the pool
    dropped: the next batch reads its own replies (0: not ours), never the late 1s."""
    from proxy import Proxy

    from dedupe.backend.renewal import renew_many

    admin = redis_server.client()
    with Proxy(redis_server.address).start() as proxy:
        # As dedupe's renew client: no retries of redis-py's own, one connection.
        client = redis.Redis(
            *proxy.address,
            protocol=protocol,
            socket_timeout=0.3,
            max_connections=1,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        )
        try:
            keys = [f"{{rn}}:lock:{i}" for i in range(50)]
            for key in keys:
                admin.set(key, "1:me", px=60_000)
            ours = [(key, "1:me", 60_000) for key in keys]
            assert renew_many(client, ours) == [1] * 50
            proxy.blackhole()
            with pytest.raises(redis.exceptions.TimeoutError):
                renew_many(client, ours)
            proxy.heal()  # the late replies of that batch (fifty 1s) now arrive
            theirs = [(key, "1:someone-else", 60_000) for key in keys]
            assert renew_many(client, theirs) == [0] * 50
            assert renew_many(client, ours) == [1] * 50
        finally:
            client.close()


@pytest.mark.timeout(90)
def test_over_tls_replies_and_messages_are_read_whole(tmp_path: Any, prefix: str) -> None:
    """rediss://: dedupe's own connections and the hub's over TLS, where a read returns what
    the TLS layer has decrypted so far. A flight, a hit on a 1 MiB value (read in pieces),
    an asyncio flight and its hit, and a follower in another instance woken by its message
    (its wait_timeout, far below the lease, fails the test if the message is not read)."""
    import shutil
    import subprocess

    from devtools.servers import free_port

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: no certificate for a TLS server")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    tls_port = free_port()
    server = RedisServer(
        args=["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file",
              str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
    )  # fmt: skip
    try:
        server.start()
    except Exception as exc:  # a redis-server built without TLS
        pytest.skip(f"this redis-server does not serve TLS: {exc}")
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
    sf = SingleFlight(url, prefix=prefix, result_ttl=60, lock_ttl=30)
    other = SingleFlight(url, prefix=prefix, result_ttl=60, lock_ttl=30, wait_timeout=10)
    big = bytes(range(256)) * 4096
    started, go = threading.Event(), threading.Event()
    led: list[Any] = []

    async def aval(v: str) -> str:
        return v

    async def amain() -> list[str]:
        try:
            return [await sf.call("a", aval, "a1"), await sf.call("a", aval, "a2")]
        finally:
            await sf.aclose()

    def lead() -> None:
        def job() -> str:
            started.set()
            assert go.wait(30)
            return "the leader's"

        led.append(sf.call("wake", job))

    try:
        assert sf.call("big", lambda: big) == big
        assert sf.call("big", lambda: b"ran again") == big  # the hit: 1 MiB over TLS
        assert asyncio.run(amain()) == ["a1", "a1"]
        leader = threading.Thread(target=lead)
        leader.start()
        assert started.wait(30)
        followed: list[Any] = []
        follower = threading.Thread(
            target=lambda: followed.append(other.call("wake", lambda: "the follower's"))
        )
        # What the follower's hub reads off its TLS socket (a follower that missed the
        # message would still find the kept outcome when its wait ends: not enough).
        hub = other.backend().hub()
        read_off: list[Any] = []
        on_reply = hub._on_reply

        def spy(link: Any, reply: Any) -> None:
            read_off.append(reply)
            on_reply(link, reply)

        hub._on_reply = spy  # type: ignore[method-assign]
        follower.start()
        until(lambda: other.inspect("wake").subscribers >= 1, 30, "the follower to subscribe")
        go.set()
        leader.join(30)
        follower.join(30)
        assert led == ["the leader's"] and followed == ["the leader's"]
        assert any(r[0] in (b"message", b"smessage") for r in read_off), read_off
    finally:
        go.set()
        sf.close(timeout=0)
        other.close(timeout=0)
        server.stop()
