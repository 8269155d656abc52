"""Counting Redis requests: client side by wrapping redis-py, server side with INFO commandstats.

Client side, :func:`install` wraps ``send_packed_command`` of redis-py's sync and asyncio
connection classes, so every request any library sends through redis-py in this process is
counted: each call is one write of a request to the socket, that is one round trip (a pipeline
is one write; blocking commands such as BLPOP count once; SUBSCRIBE/UNSUBSCRIBE on a pub/sub
connection count once per write). The connection handshake (HELLO, CLIENT SETINFO, SELECT,
AUTH) is not counted. Each thread counts into its own cell, so counting takes no lock.

Server side, :func:`reset_server_stats` runs ``CONFIG RESETSTAT`` before a run and
:func:`server_commands` sums ``INFO commandstats`` after it: that counts every command the server
executed, including those run inside Lua scripts (EVALSHA counts once, and so does each
``redis.call`` within it), minus the benchmark's own bookkeeping and connection handshakes.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

_SKIP = frozenset({"CLIENT", "HELLO", "SELECT", "AUTH"})
_cells: list[list[int]] = []
_cells_lock = threading.Lock()
_local = threading.local()
_originals: dict[str, Any] = {}
# While record_names() is open: the name of every command written, across threads (guarded by
# _cells_lock). None otherwise, so plain counting parses no more than a request's head.
_names: Counter[str] | None = None


def _cell() -> list[int]:
    cell: list[int] | None = getattr(_local, "cell", None)
    if cell is None:
        cell = [0]
        _local.cell = cell
        with _cells_lock:
            _cells.append(cell)
    return cell


def head_of(packed: Any, count: int = 1) -> list[bytes]:
    """The first ``count`` words of a packed RESP request (bytes, str or a list of chunks)."""
    chunk = packed[0] if isinstance(packed, (list, tuple)) else packed
    if isinstance(chunk, str):
        chunk = chunk.encode()
    lines = bytes(chunk[:4096]).split(b"\r\n")
    # "*N", then "$len", word, "$len", word, ...
    return [lines[i] for i in range(2, min(len(lines), 2 + 2 * count), 2)]


def names_of(packed: Any) -> list[str]:
    """The command of every request in a packed RESP write (a pipeline packs several), as
    ``INFO commandstats`` names it: lower case, ``container|sub`` for subcommands (such as
    ``client|setname``) when the second word is one."""
    if isinstance(packed, (list, tuple)):
        data = b"".join(c.encode() if isinstance(c, str) else bytes(c) for c in packed)
    else:
        data = packed.encode() if isinstance(packed, str) else bytes(packed)
    out: list[str] = []
    pos = 0
    while pos < len(data) and data[pos : pos + 1] == b"*":
        end = data.index(b"\r\n", pos)
        argc = int(data[pos + 1 : end])
        pos = end + 2
        words: list[bytes] = []
        for _ in range(argc):
            end = data.index(b"\r\n", pos)
            size = int(data[pos + 1 : end])
            if len(words) < 2:
                words.append(data[end + 2 : end + 2 + size])
            pos = end + 2 + size + 2
        if words:
            name = words[0].decode("ascii", "replace").lower()
            if len(words) > 1 and name in _CONTAINERS:
                name += "|" + words[1].decode("ascii", "replace").lower()
            out.append(name)
    return out


# Commands whose commandstats entry is per subcommand (INFO commandstats: "config|resetstat").
_CONTAINERS = frozenset(
    {"acl", "client", "cluster", "command", "config", "function", "latency", "memory"}
    | {"module", "object", "pubsub", "script", "slowlog", "xgroup", "xinfo"}
)


def _counted(packed: Any) -> bool:
    head = head_of(packed)
    counted = bool(head) and head[0].decode("ascii", "replace").upper() not in _SKIP
    if counted and _names is not None:
        names = names_of(packed)
        with _cells_lock:
            if _names is not None:
                _names.update(names)
    return counted


@contextmanager
def record_names() -> Iterator[Counter[str]]:
    """Within the block, every counted request's command names (all threads of this process),
    by commandstats name, in the Counter it yields. Needs :func:`install`."""
    global _names
    names: Counter[str] = Counter()
    with _cells_lock:
        _names = names
    try:
        yield names
    finally:
        with _cells_lock:
            _names = None


def install() -> None:
    """Count every request sent through redis-py in this process (idempotent).

    Sync: ``send_packed_command`` is what writes a request, from redis-py's command layer
    (``send_command`` calls it), from pipelines (one write: one round trip) and from dedupe's
    wire, which packs its scripts itself. asyncio: the write to the stream, where redis.asyncio
    (through ``send_packed_command``) and dedupe's wire (straight to the transport) both end."""
    if _originals:
        return
    import asyncio

    import redis.connection as sconn

    sync_send = sconn.AbstractConnection.send_packed_command
    writelines = asyncio.StreamWriter.writelines
    write = asyncio.StreamWriter.write

    def send_packed_command(self: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
        if _counted(command):
            _cell()[0] += 1
        return sync_send(self, command, *args, **kwargs)

    def counted_writelines(self: Any, data: Any) -> None:
        data = list(data)
        if data and _counted(data):
            _cell()[0] += 1
        writelines(self, data)

    def counted_write(self: Any, data: Any) -> None:
        if data and _counted(data):
            _cell()[0] += 1
        write(self, data)

    _originals["sync"] = sync_send
    _originals["writelines"] = writelines
    _originals["write"] = write
    sconn.AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]
    asyncio.StreamWriter.writelines = counted_writelines  # type: ignore[method-assign]
    asyncio.StreamWriter.write = counted_write  # type: ignore[method-assign]


def uninstall() -> None:
    if not _originals:
        return
    import asyncio

    import redis.connection as sconn

    sconn.AbstractConnection.send_packed_command = _originals.pop("sync")  # type: ignore[method-assign]
    asyncio.StreamWriter.writelines = _originals.pop("writelines")  # type: ignore[method-assign]
    asyncio.StreamWriter.write = _originals.pop("write")  # type: ignore[method-assign]


def value() -> int:
    """Requests counted so far in this process."""
    with _cells_lock:
        return sum(c[0] for c in _cells)


# --------------------------------------------------------------------------- server side

# The benchmark's own bookkeeping and connection set-up, not the tools' work.
_IGNORED = ("config|", "info", "client|", "hello", "select", "flushall", "auth")


def reset_server_stats(client: redis.Redis) -> None:
    client.config_resetstat()


def server_commandstats(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the last reset, without the benchmark's own commands."""
    raw = client.info("commandstats")
    out: dict[str, int] = {}
    for name, fields in raw.items():
        cmd = name.removeprefix("cmdstat_")
        if cmd.startswith(_IGNORED):
            continue
        out[cmd] = int(fields["calls"])
    return out


def server_commands(client: redis.Redis) -> int:
    return sum(server_commandstats(client).values())


def server_usec(client: redis.Redis, sent: Counter[str]) -> tuple[float, dict[str, float]]:
    """Server microseconds spent on the commands in ``sent`` (names and how many of each the
    client wrote, from :func:`record_names`) since the last reset: the total and per command.

    A command's ``usec`` covers everything it ran (a script's includes each ``redis.call`` in
    it), so only the commands the client sent are summed, never those run inside a script. If
    the server ran a command more often than it was sent (the same command inside a script
    too), its share is ``usec_per_call`` times the count sent."""
    raw = client.info("commandstats")
    per: dict[str, float] = {}
    for name, count in sent.items():
        fields = raw.get(f"cmdstat_{name}")
        if fields is None:
            raise RuntimeError(f"{name} was sent but the server has no commandstats for it")
        if int(fields["calls"]) == count:
            per[name] = float(fields["usec"])
        else:
            per[name] = float(fields["usec_per_call"]) * count
    return sum(per.values()), per
