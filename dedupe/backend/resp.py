"""RESP2 replies read straight off a connection of our own, in one pass over the bytes.

redis-py's reader costs a dozen Python calls per reply (a buffer object, a readline and a
read per element, a purge) and redis.asyncio's a timeout context per reply: half of what a
hit costs the client. A script's reply is small and read whole, so here each read takes
what the socket has and parses it in place, asking for more only when a reply is cut.

Only for connections dedupe made itself (``wire.run_on``): RESP2, bytes, a request at a
time, nothing pushed, so nothing of redis-py's parser is left unread between requests.
Errors are redis-py's: a timeout is its TimeoutError, a lost connection its
ConnectionError, an error reply the ResponseError its parser would make (NoScriptError,
BusyLoadingError, ...). The caller drops the connection after any failure (``wire._on``).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["Stream", "aread_replies", "asked_resp3", "parse", "read_replies", "resp2_kwargs"]

_CHUNK = 65536  # a read's size, as redis-py's socket_read_size
_BIG = 1 << 20  # a read's largest size, when a long reply is cut
_CLOSED = "Connection closed by server."
# An error reply's exception, of the class its code names, as redis-py's parser makes it.
_error: Callable[[str], Exception] = BaseParser.parse_error


def asked_resp3(kwargs: dict[str, Any]) -> bool:
    """True if a client's connection settings ask for RESP3 by name (``protocol=3``)."""
    return str(kwargs.get("protocol") or 2) == "3"


def resp2_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A client's connection settings for a connection of ours that speaks RESP2 (redis-py
    8 speaks RESP3 unless told). redis-py's maintenance notifications need RESP3: they stay
    off it (its commands are retried on a fresh connection within their bound anyway)."""
    kw = {k: v for k, v in kwargs.items() if not k.startswith("maint_notif")}
    kw["protocol"] = 2
    return kw


class Short(Exception):
    """The bytes end inside a reply: ``need`` is the length the buffer must reach (at
    least) before parsing it again."""

    __slots__ = ("need",)

    def __init__(self, need: int) -> None:
        self.need = need


def parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """The reply that starts at ``buf[pos]`` and where the next one starts; raises Short if
    ``buf`` ends before it does. As redis-py's RESP2 reader (no decoding): bulk and simple
    strings are bytes, integers int, nil None, an error reply its ResponseError (a value,
    inside an array too), anything else InvalidResponse."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise Short(len(buf) + 1)
    kind = buf[pos]
    if kind == 36:  # $ bulk string
        size = int(buf[pos + 1 : end])
        if size < 0:
            return None, end + 2
        start = end + 2
        stop = start + size
        if len(buf) < stop + 2:
            raise Short(stop + 2)
        return buf[start:stop], stop + 2
    if kind == 42:  # * array
        count = int(buf[pos + 1 : end])
        pos = end + 2
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 58:  # : integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 43:  # + simple string
        return buf[pos + 1 : end], end + 2
    if kind == 45:  # - error
        return _error(buf[pos + 1 : end].decode("utf-8", errors="replace")), end + 2
    raise InvalidResponse(f"Protocol Error: {buf[pos:end]!r}")


def _reply(buf: bytes, pos: int) -> tuple[Any, int]:
    """parse(), with redis-py's errors: an error reply of the ConnectionError kind
    (LOADING, ...) raised, as redis-py raises it; a length that is no number, or nesting
    past the stack, InvalidResponse."""
    try:
        value, end = parse(buf, pos)
    except (ValueError, RecursionError) as exc:
        raise InvalidResponse(f"Protocol Error: {exc}") from None
    if isinstance(value, RedisConnectionError):
        raise value
    return value, end


def _take(buf: bytes, count: int, out: list[Any]) -> tuple[int, int]:
    """Parse the replies ``buf`` holds into ``out`` until it holds ``count``: (where they
    end, 0), or where a cut reply starts and the length it needs from there. An error reply
    of the ConnectionError kind (LOADING, ...) is raised, as redis-py raises it."""
    pos = 0
    while len(out) < count:
        # _reply, inline: a call per reply costs about 1k instructions (2 a flight, 2 a hit).
        try:
            value, pos_next = parse(buf, pos)
        except Short as short:
            return pos, short.need - pos
        except (ValueError, RecursionError) as exc:
            raise InvalidResponse(f"Protocol Error: {exc}") from None
        if isinstance(value, RedisConnectionError):
            raise value
        out.append(value)
        pos = pos_next
    if pos != len(buf):  # a request at a time: nothing may follow its replies
        raise InvalidResponse(f"{len(buf) - pos} bytes after the replies")
    return pos, 0


def read_replies(conn: Any, count: int) -> list[Any]:
    """``count`` replies off a sync redis-py connection's socket (a request's, in order),
    under the socket's own timeout, as redis-py reads them."""
    sock = conn._sock
    if sock is None:
        raise RedisConnectionError(_CLOSED)
    out: list[Any] = []
    if not count:
        return out
    buf = _recv(conn, sock, _CHUNK)
    while True:
        pos, need = _take(buf, count, out)
        if not need:
            break
        buf = _more(conn, sock, buf[pos:], need)  # a cut reply: read on, parse it again
    if conn.health_check_interval:
        conn.next_health_check = time.monotonic() + conn.health_check_interval
    return out


def _more(conn: Any, sock: Any, head: bytes, need: int) -> bytes:
    """``head`` and what the socket sends next, at least ``need`` bytes in all."""
    chunks = [head]
    have = len(head)
    while have < need:
        data = _recv(conn, sock, min(max(need - have, _CHUNK), _BIG))
        chunks.append(data)
        have += len(data)
    return b"".join(chunks)


def _recv(conn: Any, sock: Any, size: int) -> bytes:
    try:
        data: bytes = sock.recv(size)
    except TimeoutError as exc:
        if exc.errno is None:  # ours, not the OS's ETIMEDOUT (a dead link)
            raise _timed_out(conn) from None
        raise _lost(conn, exc) from exc
    except OSError as exc:
        raise _lost(conn, exc) from exc
    if not data:
        raise RedisConnectionError(_CLOSED)
    return data


def _timed_out(conn: Any) -> RedisTimeoutError:
    return RedisTimeoutError(f"Timeout reading from {conn._host_error()}")


def _lost(conn: Any, exc: OSError) -> RedisConnectionError:
    return RedisConnectionError(f"Error while reading from {conn._host_error()} : {exc.args}")


class Stream:
    """Replies as they come off a pub/sub connection (the hub's reader thread): one read may
    hold several messages and the start of the next, which waits here for the rest.

    ``read(timeout)``: the replies complete by now, reading the socket once if none is
    buffered; None if nothing came within ``timeout`` (silence); [] if bytes came but no
    reply is whole yet. Errors as read_replies'. The socket's timeout is set for the read
    and put back after it (as redis-py's can_read does).
    """

    __slots__ = ("_buf", "_conn", "_sock")

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._sock = conn._sock
        self._buf = b""

    def read(self, timeout: float | None) -> list[Any] | None:
        out = self._parsed()
        if out:
            return out
        sock = self._sock
        sock.settimeout(timeout)
        try:
            data = _recv(self._conn, sock, _CHUNK)
        except RedisTimeoutError:
            return None
        finally:
            try:
                sock.settimeout(self._conn.socket_timeout)
            except OSError:  # closed meanwhile: the next read says so
                pass
        self._buf += data
        return self._parsed()

    def _parsed(self) -> list[Any]:
        buf = self._buf
        out: list[Any] = []
        pos = 0
        try:
            while pos < len(buf):
                value, pos_next = _reply(buf, pos)
                out.append(value)
                pos = pos_next
        except Short:
            pass  # the rest waits for the next read
        if pos:
            self._buf = buf[pos:]
        return out


async def aread_replies(conn: Any, count: int) -> list[Any]:
    """As read_replies, off a redis.asyncio connection's stream, all ``count`` replies
    under one socket_timeout (redis.asyncio's bound per reply, for a request read whole)."""
    reader = getattr(conn, "_reader", None)
    if reader is None:
        raise RedisConnectionError(_CLOSED)
    timeout = conn.socket_timeout
    try:
        if timeout is None:
            out = await _aread(reader, count)
        else:
            out = await _within(_aread(reader, count), timeout)
    except _Expired:
        raise _timed_out(conn) from None
    except OSError as exc:  # an OS-level timeout (ETIMEDOUT) too: the link is dead
        raise _lost(conn, exc) from exc
    if conn.health_check_interval:
        conn.next_health_check = asyncio.get_running_loop().time() + conn.health_check_interval
    return out


class _Expired(Exception):
    """The read outlasted socket_timeout."""


if sys.version_info >= (3, 11):

    async def _within(read: Awaitable[list[Any]], timeout: float) -> list[Any]:
        bound = asyncio.timeout(timeout)  # a timer, no task
        try:
            async with bound:
                return await read
        except TimeoutError:
            if bound.expired():
                raise _Expired from None
            raise

else:  # pragma: no cover - Python 3.10

    async def _within(read: Awaitable[list[Any]], timeout: float) -> list[Any]:
        try:
            return await asyncio.wait_for(read, timeout)
        except asyncio.TimeoutError:
            raise _Expired from None


async def _aread(reader: Any, count: int) -> list[Any]:
    out: list[Any] = []
    if not count:
        return out
    buf = await _arecv(reader, _CHUNK)
    while True:
        pos, need = _take(buf, count, out)
        if not need:
            return out
        chunks = [buf[pos:]]
        have = len(buf) - pos
        while have < need:
            data = await _arecv(reader, min(max(need - have, _CHUNK), _BIG))
            chunks.append(data)
            have += len(data)
        buf = b"".join(chunks)


async def _arecv(reader: Any, size: int) -> bytes:
    data: bytes = await reader.read(size)
    if not data:
        raise RedisConnectionError(_CLOSED)
    return data
