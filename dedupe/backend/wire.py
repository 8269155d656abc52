"""Scripts on the wire: EVALSHA packed here, carried over a redis-py connection.

A flight sends two known scripts. redis-py's command layer (argument encoding, the pool's
bookkeeping and observability, event dispatch) cost more per flight than all of dedupe's
own decisions, so standalone and Sentinel clients send them through here instead: packed
once, written and read on a redis-py ``Connection`` (its socket handling, timeouts, health
checks, RESP parsing and error types), and retried as the connection's own ``retry`` says.

Connections come from one of two places. A client dedupe built from a URL gives each
command slot a connection of its own (``Slots``): taking a slot is taking its connection,
one C-level queue operation; those speak RESP2 and their replies are read by resp.py, not
by redis-py's parser. A client the user passed in keeps its own pool and limits: each
command checks a connection out of that pool and back. Cluster clients keep the client path
(they route by slot and follow MOVED/ASK).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import redis.asyncio.retry
import redis.retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dedupe.backend.commands import READ, Script, ScriptCall, Stamp
from dedupe.backend.resp import aread_replies, asked_resp3, read_replies, resp2_kwargs

__all__ = ["AsyncWire", "SyncWire", "pack", "pack_many", "retry_left", "wire_ready"]

# A retry on a fresh connection is worth it only with at least this much of the bound left.
_MIN_RETRY = 0.05
# Failures after which a command may be tried once more on a fresh connection: the request
# may or may not have reached Redis, and every script of dedupe is safe to send twice.
_RETRYABLE = (RedisConnectionError, RedisTimeoutError, OSError)


def pack(call: ScriptCall, *, by_sha: bool = True) -> list[bytes]:
    """The RESP request of EVALSHA (or EVAL, by_sha=False) for one script call, as the one
    chunk redis-py's send_packed_command writes (a bare bytes would be iterated as ints)."""
    script = call.script
    keys, args = call.keys, call.args
    if script is READ:  # no script: MGET of its two keys, then TIME (two replies)
        a, b = keys[0].encode(), keys[1].encode()
        return [
            b"*3\r\n$4\r\nMGET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n*1\r\n$4\r\nTIME\r\n"
            % (len(a), a, len(b), b)
        ]
    # A bytes format costs about a thousand instructions: what repeats is packed once (the
    # head of each script, the ttls), the rest each time.
    head = _HEADS.get((script.sha, by_sha, len(keys), len(args)))
    if head is None:
        head = _packed_head(script, by_sha, len(keys), len(args))
    parts = [head]
    # Loops, not a call per argument, and no bytes format (about a thousand instructions
    # each): a bulk string's "$<len>\r\n" comes from a table. Keys are text (UTF-8),
    # arguments text, ints or bytes.
    lengths = _LENGTHS
    for key in keys:
        data = key.encode()
        size = len(data)
        parts += (lengths[size] if size < _TABLED else b"$%d\r\n" % size, data, _CRLF)
    for arg in args:
        if type(arg) is int:
            packed = _INTS.get(arg)
            if packed is None:
                packed = _packed_int(arg)
            parts.append(packed)
            continue
        data = (
            arg.encode() if isinstance(arg, str) else b"%d" % arg if isinstance(arg, int) else arg
        )
        size = len(data)
        parts += (lengths[size] if size < _TABLED else b"$%d\r\n" % size, data, _CRLF)
    return [b"".join(parts)]


# What pack packed before, by what it was made of; each bounded (cleared when full). No
# lock: a race only packs one twice.
_HEADS: dict[tuple[str, bool, int, int], bytes] = {}  # (sha, by_sha, keys, args) -> head
_INTS: dict[int, bytes] = {}  # ttls and windows: a handful per process
_MAX_PACKED = 1024
_CRLF = b"\r\n"
_TABLED = 512  # bulk strings shorter than this take their head from _LENGTHS (20 KB)
_LENGTHS = [b"$%d\r\n" % n for n in range(_TABLED)]


def _packed_head(script: Script, by_sha: bool, nkeys: int, nargs: int) -> bytes:
    numkeys = b"%d" % nkeys
    head = b"*%d\r\n%b$%d\r\n%b\r\n" % (
        3 + nkeys + nargs,
        script.evalsha_head if by_sha else script.eval_head,
        len(numkeys),
        numkeys,
    )
    return _keep(_HEADS, (script.sha, by_sha, nkeys, nargs), head)


def _packed_int(arg: int) -> bytes:
    data = b"%d" % arg
    return _keep(_INTS, arg, b"$%d\r\n%b\r\n" % (len(data), data))


def _keep(table: dict[Any, bytes], what: Any, packed: bytes) -> bytes:
    if len(table) >= _MAX_PACKED:
        table.clear()
    table[what] = packed
    return packed


def pack_many(calls: Sequence[ScriptCall], *, by_sha: bool = True) -> list[bytes]:
    """The RESP requests of several script calls, one chunk (a pipeline: one write)."""
    return [b"".join(pack(call, by_sha=by_sha)[0] for call in calls)]


def wire_ready(client: Any) -> bool:
    """True if scripts for this sync or asyncio (non-Cluster) client may go through here:
    a pooled client (not single-connection) that encodes text as UTF-8, strictly."""
    pool = getattr(client, "connection_pool", None)
    if pool is None or getattr(client, "connection", None) is not None:
        return False
    if getattr(pool, "cache", None) is not None:  # client-side caching wraps connections
        return False
    kw = getattr(pool, "connection_kwargs", {})
    encoding = str(kw.get("encoding", "utf-8")).lower().replace("_", "-")
    return encoding in ("utf-8", "utf8") and kw.get("encoding_errors", "strict") == "strict"


def _takes_command_name(get_connection: Any) -> bool:
    """redis-py < 6 requires a command name for get_connection(); later ones warn on one."""
    try:
        param = inspect.signature(get_connection).parameters.get("command_name")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


class _Wire:
    """What both wires know of the client: its pool, and how to make a connection like it.

    ``bound``: the longest one command may take on connections of our own (``run_on``),
    retry included; None for a client passed in, whose own retry policy then applies.
    """

    __slots__ = ("_name", "_no_retry", "_notified", "_resp2", "bound", "pool")

    def __init__(self, client: Any, bound: float | None = None) -> None:
        self.pool = client.connection_pool
        self.bound = bound
        self._name: tuple[str, ...] = (
            ("EVALSHA",) if _takes_command_name(self.pool.get_connection) else ()
        )
        # redis-py >= 6.2: a server's maintenance notification may ask for a new connection.
        self._notified = hasattr(self.pool.connection_class, "should_reconnect")
        self._no_retry: Any = None  # set by the subclass: a Retry that never retries
        # Our own connections speak RESP2, and their replies are read in resp.py, unless
        # the client asked for RESP3 (then redis-py reads them: pushes, RESP3's types).
        self._resp2 = not asked_resp3(self.pool.connection_kwargs)

    def new_connection(self, bound: float | None = None) -> Any:
        """A connection of the client's settings, owned by the caller (a command slot).

        Our own connections never retry inside redis-py: ``run_on`` retries once itself,
        within ``bound``. ``bound`` given: a one-off connection whose connect and reads
        together fit in it (what is left of a command's bound for its retry)."""
        pool = self.pool
        kw = resp2_kwargs(pool.connection_kwargs) if self._resp2 else {**pool.connection_kwargs}
        kw["retry"] = self._no_retry
        if bound is not None:
            for name in ("socket_timeout", "socket_connect_timeout"):
                given = kw.get(name)
                kw[name] = bound if given is None else min(given, bound)
        return pool.connection_class(**kw)

    def retry_bound(self, started: float) -> float | None:
        """What is left of the command's bound for one retry, or None if not worth one."""
        if self.bound is None:
            return None
        return retry_left(self.bound, time.monotonic() - started)


def retry_left(bound: float, elapsed: float) -> float | None:
    """A command failed ``elapsed`` seconds into its ``bound``: the time its one retry on a
    fresh connection gets, or None if too little is left to be worth one."""
    left = bound - elapsed
    return left if left >= _MIN_RETRY else None


class SyncWire(_Wire):
    """Scripts over a sync redis-py pool (or over connections the caller holds)."""

    __slots__ = ()

    def __init__(self, client: Any, bound: float | None = None) -> None:
        super().__init__(client, bound)
        self._no_retry = redis.retry.Retry(NoBackoff(), 0)

    def run_on(self, conn: Any, call: ScriptCall, stamp: Stamp | None = None) -> Any:
        """Run the script on a connection the caller owns. A failure other than an error
        reply (a timeout too: the reply may be lost on a hanging connection) drops the
        connection and tries once more on a fresh one, within what is left of ``bound``."""
        return self._on(conn, _roundtrip, call, stamp)

    def run_many_on(
        self, conn: Any, calls: Sequence[ScriptCall], stamps: Sequence[Stamp | None]
    ) -> list[Any]:
        """Run several scripts pipelined on a connection the caller owns: one write, then
        every reply in order. Each item's reply, or the ResponseError its script got (an
        error reply is read whole: the others are unaffected). A failure of the connection
        fails them all, after one more try on a fresh connection, as ``run_on``."""
        return self._on(conn, _pipeline, calls, stamps)  # type: ignore[no-any-return]

    def _on(
        self, conn: Any, trip: Callable[[Any, Any, Any, Replies], Any], what: Any, stamps: Any
    ) -> Any:
        """``trip(conn, what, stamps)``, and once more on a fresh connection after a
        failure that may have left the connection mid-reply (see ``run_on``)."""
        replies = read_replies if self._resp2 else _replies
        started = time.monotonic()
        try:
            return trip(conn, what, stamps, replies)
        except ResponseError:
            raise  # the error reply was read whole: the connection is clean
        except _RETRYABLE:
            conn.disconnect()  # never leave a half-read reply on a connection used again
            left = self.retry_bound(started)
            if left is None:
                raise
        except BaseException:
            conn.disconnect()
            raise
        finally:
            if self._notified and conn.should_reconnect():
                conn.disconnect()
        fresh = self.new_connection(left)
        try:
            return trip(fresh, what, stamps, replies)
        finally:
            fresh.disconnect()

    def run(self, call: ScriptCall, stamp: Stamp | None = None) -> Any:
        """Run the script on a connection checked out of the client's pool (retried as the
        client's own retry policy says)."""
        pool = self.pool
        conn = pool.get_connection(*self._name)
        try:
            return conn.retry.call_with_retry(
                partial(_roundtrip, conn, call, stamp, _replies), conn.disconnect
            )
        finally:
            pool.release(conn)

    def run_many(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run several scripts pipelined on a connection checked out of the client's pool, as
        run_many_on (each item's reply or ResponseError), retried as the client's own retry
        policy says. A RESP2 connection's replies are read in resp.py (a renewal batch of
        thousands: about a third of the client's time of a redis-py pipeline)."""
        pool = self.pool
        conn = pool.get_connection(*self._name)
        resp2 = str(getattr(conn, "protocol", 2) or 2) == "2"
        try:
            return conn.retry.call_with_retry(  # type: ignore[no-any-return]
                partial(_pipeline, conn, calls, [None] * len(calls),
                        read_replies if resp2 else _replies),
                conn.disconnect,
            )  # fmt: skip
        except ResponseError:
            raise
        except BaseException:
            conn.disconnect()  # never back to the pool with a reply half read
            raise
        finally:
            pool.release(conn)


Replies = Callable[[Any, int], list[Any]]
"""replies(conn, n): the n replies of the request just sent, an error reply as its
ResponseError (read whole); a failure of the connection raised."""


def _replies(conn: Any, count: int) -> list[Any]:
    """Replies as redis-py's reader reads them (a client passed in; RESP3)."""
    return [_read(conn) for _ in range(count)]


def _roundtrip(conn: Any, call: ScriptCall, stamp: Stamp | None, replies: Replies) -> Any:
    if stamp is not None:
        if conn._sock is None:
            conn.connect()  # a connect is not a send: the stamp comes after it
        stamp.sent = time.monotonic()
    conn.send_packed_command(pack(call))
    if call.script is READ:  # two replies, both read whole before either error is raised
        keys, now = replies(conn, 2)
        _raise_any(keys)
        _raise_any(now)
        return [keys, now]
    (reply,) = replies(conn, 1)
    if isinstance(reply, NoScriptError):  # a restarted or flushed server: send the script
        if stamp is not None:
            stamp.sent = time.monotonic()
        conn.send_packed_command(pack(call, by_sha=False))
        (reply,) = replies(conn, 1)
    _raise_any(reply)
    return reply


def _raise_any(reply: Any) -> None:
    if isinstance(reply, ResponseError):
        raise reply


def _pipeline(
    conn: Any, calls: Sequence[ScriptCall], stamps: Sequence[Stamp | None], replies: Replies
) -> list[Any]:
    if conn._sock is None:
        conn.connect()  # a connect is not a send: the stamps come after it
    _stamp(stamps)
    conn.send_packed_command(pack_many(calls))
    got = replies(conn, len(calls))
    again = [i for i, r in enumerate(got) if isinstance(r, NoScriptError)]
    if again:  # a restarted or flushed server: send those scripts themselves
        _stamp([stamps[i] for i in again])
        conn.send_packed_command(pack_many([calls[i] for i in again], by_sha=False))
        for i, reply in zip(again, replies(conn, len(again)), strict=True):
            got[i] = reply
    return got


def _read(conn: Any) -> Any:
    try:
        return conn.read_response()
    except ResponseError as exc:  # read whole: the next reply is the next item's
        return exc


def _stamp(stamps: Sequence[Stamp | None]) -> None:
    now = time.monotonic()
    for stamp in stamps:
        if stamp is not None:
            stamp.sent = now


class AsyncWire(_Wire):
    """Scripts over a redis.asyncio pool (or over connections the caller holds)."""

    __slots__ = ()

    def __init__(self, client: Any, bound: float | None = None) -> None:
        super().__init__(client, bound)
        self._no_retry = redis.asyncio.retry.Retry(NoBackoff(), 0)

    async def run_on(self, conn: Any, call: ScriptCall, stamp: Stamp | None = None) -> Any:
        """As SyncWire.run_on, on the running loop."""
        return await self._on(conn, _aroundtrip, call, stamp)

    async def run_many_on(
        self, conn: Any, calls: Sequence[ScriptCall], stamps: Sequence[Stamp | None]
    ) -> list[Any]:
        """As SyncWire.run_many_on, on the running loop."""
        return await self._on(conn, _apipeline, calls, stamps)  # type: ignore[no-any-return]

    async def _on(
        self,
        conn: Any,
        trip: Callable[[Any, Any, Any, AsyncReplies], Awaitable[Any]],
        what: Any,
        stamps: Any,
    ) -> Any:
        """As SyncWire._on, on the running loop."""
        replies = aread_replies if self._resp2 else _areplies
        started = time.monotonic()
        try:
            return await trip(conn, what, stamps, replies)
        except ResponseError:
            raise
        except _RETRYABLE:
            await conn.disconnect(nowait=True)
            left = self.retry_bound(started)
            if left is None:
                raise
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            if self._notified and conn.should_reconnect():
                await conn.disconnect()
        fresh = self.new_connection(left)
        try:
            return await trip(fresh, what, stamps, replies)
        finally:
            await fresh.disconnect(nowait=True)

    async def run(self, call: ScriptCall, stamp: Stamp | None = None) -> Any:
        pool = self.pool
        conn = await pool.get_connection(*self._name)
        try:
            return await conn.retry.call_with_retry(
                partial(_aroundtrip, conn, call, stamp, _areplies),
                lambda error: conn.disconnect(),
            )
        finally:
            await pool.release(conn)


AsyncReplies = Callable[[Any, int], Awaitable[list[Any]]]
"""As Replies, on the running loop."""


async def _areplies(conn: Any, count: int) -> list[Any]:
    return [await _aread(conn) for _ in range(count)]


async def _aroundtrip(
    conn: Any, call: ScriptCall, stamp: Stamp | None, replies: AsyncReplies
) -> Any:
    if stamp is not None:
        if getattr(conn, "_writer", None) is None:
            await conn.connect()  # a connect is not a send: the stamp comes after it
        stamp.sent = time.monotonic()
    await _asend(conn, pack(call))
    if call.script is READ:
        keys, now = await replies(conn, 2)
        _raise_any(keys)
        _raise_any(now)
        return [keys, now]
    (reply,) = await replies(conn, 1)
    if isinstance(reply, NoScriptError):
        if stamp is not None:
            stamp.sent = time.monotonic()
        await _asend(conn, pack(call, by_sha=False))
        (reply,) = await replies(conn, 1)
    _raise_any(reply)
    return reply


async def _apipeline(
    conn: Any, calls: Sequence[ScriptCall], stamps: Sequence[Stamp | None], replies: AsyncReplies
) -> list[Any]:
    if getattr(conn, "_writer", None) is None:
        await conn.connect()  # a connect is not a send: the stamps come after it
    _stamp(stamps)
    await _asend(conn, pack_many(calls))
    got = await replies(conn, len(calls))
    again = [i for i, r in enumerate(got) if isinstance(r, NoScriptError)]
    if again:
        _stamp([stamps[i] for i in again])
        await _asend(conn, pack_many([calls[i] for i in again], by_sha=False))
        for i, reply in zip(again, await replies(conn, len(again)), strict=True):
            got[i] = reply
    return got


async def _aread(conn: Any) -> Any:
    try:
        return await conn.read_response()
    except ResponseError as exc:
        return exc


async def _asend(conn: Any, packed: list[bytes]) -> None:
    """send_packed_command without its task per write: with a socket timeout, redis.asyncio
    wraps every write in asyncio.wait_for, a new task and two loop turns (Python 3.11). A
    transport write never blocks, so the request goes straight to it; only a write the
    socket could not take at once waits for drain(), under the socket timeout, as before."""
    writer = getattr(conn, "_writer", None)  # redis.asyncio's StreamWriter, once connected
    if writer is None or writer.transport.is_closing():
        await conn.send_packed_command(packed)  # connects first, redis-py's own way
        return
    await conn.check_health()  # a PING if health_check_interval has passed (rarely)
    if conn._writer is not writer:  # the health check failed and reconnected
        await conn.send_packed_command(packed)
        return
    writer.writelines(packed)
    if writer.transport.get_write_buffer_size() == 0:
        return  # all of it is in the kernel's buffer (a lost link shows up in the read)
    try:
        await asyncio.wait_for(writer.drain(), conn.socket_timeout)
    except asyncio.TimeoutError:
        await conn.disconnect(nowait=True)
        raise RedisTimeoutError("Timeout writing to socket") from None
    except OSError as exc:
        await conn.disconnect(nowait=True)
        raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
