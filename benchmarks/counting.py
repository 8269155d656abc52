"""Counting Redis requests: client side by wrapping redis-py, server side with INFO commandstats.

Client side, :func:`install` wraps ``send_command`` of redis-py's sync and asyncio connection
classes, so every request any library sends through redis-py in this process is counted: each
call is one request written to the socket, that is one round trip (no tool pipelines on these
paths; blocking commands such as BLPOP count once; SUBSCRIBE/UNSUBSCRIBE on a pub/sub connection
count once each). The connection handshake (HELLO, CLIENT SETINFO, SELECT, AUTH) is not counted.
Each thread counts into its own cell, so counting takes no lock.

Server side, :func:`reset_server_stats` runs ``CONFIG RESETSTAT`` before a run and
:func:`server_commands` sums ``INFO commandstats`` after it: that counts every command the server
executed, including those run inside Lua scripts (EVALSHA counts once, and so does each
``redis.call`` within it), minus the benchmark's own bookkeeping and connection handshakes.
"""

from __future__ import annotations

import threading
from typing import Any

import redis

_SKIP = frozenset({"CLIENT", "HELLO", "SELECT", "AUTH"})
_cells: list[list[int]] = []
_cells_lock = threading.Lock()
_local = threading.local()
_originals: dict[str, Any] = {}


def _cell() -> list[int]:
    cell: list[int] | None = getattr(_local, "cell", None)
    if cell is None:
        cell = [0]
        _local.cell = cell
        with _cells_lock:
            _cells.append(cell)
    return cell


def _counted(args: tuple[Any, ...]) -> bool:
    if not args:
        return False
    name = args[0]
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return str(name).upper() not in _SKIP


def install() -> None:
    """Count every request sent through redis-py in this process (idempotent)."""
    if _originals:
        return
    import redis.asyncio.connection as aconn
    import redis.connection as sconn

    sync_send = sconn.AbstractConnection.send_command
    async_send = aconn.AbstractConnection.send_command

    def send_command(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _counted(args):
            _cell()[0] += 1
        return sync_send(self, *args, **kwargs)

    async def asend_command(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _counted(args):
            _cell()[0] += 1
        return await async_send(self, *args, **kwargs)

    _originals["sync"] = sync_send
    _originals["async"] = async_send
    sconn.AbstractConnection.send_command = send_command  # type: ignore[method-assign]
    aconn.AbstractConnection.send_command = asend_command  # type: ignore[method-assign]


def uninstall() -> None:
    if not _originals:
        return
    import redis.asyncio.connection as aconn
    import redis.connection as sconn

    sconn.AbstractConnection.send_command = _originals.pop("sync")  # type: ignore[method-assign]
    aconn.AbstractConnection.send_command = _originals.pop("async")  # type: ignore[method-assign]


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
