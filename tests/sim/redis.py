"""A simulated Redis that runs the package's real Lua scripts (Lua 5.1 through lupa).

Only the commands the scripts use exist: GET, SET (NX/XX, PX/EX, GET), DEL, EXISTS, PTTL,
PEXPIRE, INCR, TIME, PUBLISH and SPUBLISH. Keys in ``tracked`` live on one of two Cluster
nodes ("A", "B"): a script running at ``node`` sees only those there (the world decides,
as Redis Cluster does, where a command may run), and what it writes lives there. Values
are bytes; keys expire on the store's own clock (milliseconds, read from ``now_us``); a
restart loses every key and may move TIME forward. Replies follow Redis's Lua conversion
rules: a Lua number becomes an integer (truncated), a table an array (up to its first nil),
``{err=...}`` an error, ``{ok=...}`` a status, false a nil; and the other way round a nil
bulk reaches Lua as false.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from lupa import lua51

__all__ = ["ScriptError", "SimRedis"]

_PRELUDE = b"""
redis = {}
function redis.pcall(...) return _sim_call(...) end
function redis.call(...)
  local r = _sim_call(...)
  if type(r) == 'table' and r.err then error(r.err, 2) end
  return r
end
function redis.error_reply(msg) return {err = msg} end
function redis.status_reply(msg) return {ok = msg} end
"""


class ScriptError(Exception):
    """A script raised (redis.call failed or a Lua error): Redis would return an error reply."""


class _Err(Exception):
    """A command error, as Redis would reply it (``-ERR ...``)."""


def _arg(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bool):
        raise _Err(b"ERR Lua redis lib command arguments must be strings or integers")
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, float):
        return (str(int(value)) if value.is_integer() else repr(value)).encode()
    if isinstance(value, str):
        return value.encode()
    raise _Err(b"ERR Lua redis lib command arguments must be strings or integers")


def _int(value: bytes) -> int:
    if not value.lstrip(b"-").isdigit():
        raise _Err(b"ERR value is not an integer or out of range")
    return int(value)


class SimRedis:
    """One Redis server: a keyspace with expiry, the scripts, and a publish hook."""

    def __init__(self, now_us: Callable[[], int], publish: Callable[[bytes, bytes], int]) -> None:
        self._now_us = now_us
        self._publish = publish
        self.offset_us = 0  # TIME (and expiry) = true time + offset; a restart may move it
        self.data: dict[bytes, tuple[bytes, int | None]] = {}  # key -> (value, expires at ms)
        self.restarts = 0
        self.tracked: set[bytes] = set()  # keys of the Cluster slot: each lives on one node
        self.where: dict[bytes, str] = {}  # tracked key -> the node that holds it
        self.node = "A"  # where the running command runs
        self.lua = lua51.LuaRuntime(
            encoding=None,
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=False,
        )
        self.lua.globals()._sim_call = self._call
        self.lua.execute(_PRELUDE)
        self.scripts: dict[str, Any] = {}
        # What a script wrote, for the invariants: (key, value, px) of every SET.
        self.on_set: Callable[[bytes, bytes, int | None], None] | None = None
        # A key found expired: (key, value, when it expired on the store's clock, ms).
        self.on_expire: Callable[[bytes, bytes, int], None] | None = None

    # --- time and keys ----------------------------------------------------------------------

    def now_ms(self) -> int:
        return (self._now_us() + self.offset_us) // 1000

    def time_us(self) -> int:
        return self._now_us() + self.offset_us

    def _physical(self, key: bytes) -> tuple[bytes, int | None] | None:
        entry = self.data.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= self.now_ms():
            del self.data[key]
            self.where.pop(key, None)
            if self.on_expire is not None:
                self.on_expire(key, entry[0], entry[1])
            return None
        return entry

    def _live(self, key: bytes) -> tuple[bytes, int | None] | None:
        """The key as the running command sees it: at its node only, if tracked."""
        entry = self._physical(key)
        if entry is not None and key in self.tracked and self.where.get(key, "A") != self.node:
            return None
        return entry

    def get_at(self, key: bytes, node: str) -> bytes | None:
        entry = self._physical(key)
        if entry is None or (key in self.tracked and self.where.get(key, "A") != node):
            return None
        return entry[0]

    def get_any(self, key: bytes) -> bytes | None:
        entry = self._physical(key)
        return None if entry is None else entry[0]

    def move(self, key: bytes, node: str) -> None:
        """MIGRATE: the key, its value and its expiry, now at ``node``."""
        if self._physical(key) is not None:
            self.where[key] = node

    def write(self, key: bytes, value: bytes, px: int | None, node: str = "A") -> None:
        """Someone else's SET (a key writer), at ``node``."""
        self.data[key] = (value, None if px is None else self.now_ms() + px)
        if key in self.tracked:
            self.where[key] = node

    def get(self, key: bytes) -> bytes | None:
        entry = self._live(key)
        return None if entry is None else entry[0]

    def pttl(self, key: bytes) -> int:
        entry = self._physical(key)
        if entry is None:
            return -2
        return -1 if entry[1] is None else entry[1] - self.now_ms()

    def live_keys(self) -> list[bytes]:
        return [key for key in list(self.data) if self._physical(key) is not None]

    def restart(self, jump_ms: int = 0) -> None:
        """Lose every key (no persistence); the clock may jump forward."""
        self.data.clear()
        self.where.clear()
        # A restart takes time: TIME moves on by at least a millisecond.
        self.offset_us += max(1, jump_ms) * 1000
        self.restarts += 1

    # --- scripts ----------------------------------------------------------------------------

    def load(self, lua: str) -> str:
        sha = hashlib.sha1(lua.encode()).hexdigest()
        if sha not in self.scripts:
            # Redis wraps a script body in a function; KEYS and ARGV are its tables.
            self.scripts[sha] = self.lua.eval(b"function(KEYS, ARGV)\n" + lua.encode() + b"\nend")
        return sha

    def evalsha(self, sha: str, keys: list[bytes], args: list[bytes]) -> Any:
        fn = self.scripts.get(sha)
        if fn is None:
            raise ScriptError("NOSCRIPT No matching script")
        try:
            result = fn(self.lua.table_from(keys), self.lua.table_from(args))
        except lua51.LuaError as exc:
            raise ScriptError(f"script error: {exc}") from None
        return self._from_lua(result)

    def _from_lua(self, value: Any) -> Any:
        if value is None or value is False:
            return None
        if value is True:
            return 1
        if isinstance(value, (int, float)):
            return int(value)  # Redis truncates a Lua number to an integer reply
        if isinstance(value, bytes):
            return value
        if lua51.lua_type(value) == "table":
            if value[b"err"] is not None:
                raise ScriptError(value[b"err"].decode("utf-8", "replace"))
            if value[b"ok"] is not None:
                return value[b"ok"]
            out = []
            i = 1
            while value[i] is not None:
                out.append(self._from_lua(value[i]))
                i += 1
            return out
        raise ScriptError(f"unsupported Lua reply {value!r}")

    def _to_lua(self, value: Any) -> Any:
        if value is None:
            return False  # a nil bulk reply reaches Lua as false
        if isinstance(value, list):
            return self.lua.table_from([self._to_lua(v) for v in value])
        return value

    def _call(self, *raw: Any) -> Any:
        try:
            if not raw:
                raise _Err(b"ERR Please specify at least one argument for this redis lib call")
            args = [_arg(a) for a in raw]
            handler = _COMMANDS.get(args[0].upper())
            if handler is None:
                raise _Err(b"ERR Unknown Redis command called from script")
            return self._to_lua(handler(self, args[1:]))
        except _Err as exc:
            return self.lua.table_from({b"err": exc.args[0]})

    # --- commands ---------------------------------------------------------------------------

    def _get(self, a: list[bytes]) -> Any:
        return self.get(a[0])

    def _mget(self, a: list[bytes]) -> Any:
        return [self.get(k) for k in a]

    def _set(self, a: list[bytes]) -> Any:
        key, value, opts = a[0], a[1], [o.upper() for o in a[2:]]
        px: int | None = None
        i = 0
        while i < len(opts):
            if opts[i] in (b"PX", b"EX") and i + 1 < len(opts):
                n = _int(a[2 + i + 1])
                if n <= 0:
                    raise _Err(b"ERR invalid expire time in 'set' command")
                px = n if opts[i] == b"PX" else n * 1000
                i += 2
                continue
            if opts[i] not in (b"NX", b"XX", b"GET"):
                raise _Err(b"ERR syntax error")
            i += 1
        old = self._live(key)
        exists = old is not None
        if (b"NX" in opts and exists) or (b"XX" in opts and not exists):
            return None
        if self.on_set is not None:
            self.on_set(key, value, px)
        self.data[key] = (value, None if px is None else self.now_ms() + px)
        if key in self.tracked:
            self.where[key] = self.node
        if b"GET" in opts:  # the old value (nil reaches Lua as false), as Redis 6.2+ does
            return old[0] if old is not None else False
        return self.lua.table_from({b"ok": b"OK"})  # a status reply reaches Lua as {ok=...}

    def _del(self, a: list[bytes]) -> Any:
        n = 0
        for key in a:
            if self._live(key) is not None:
                del self.data[key]
                self.where.pop(key, None)
                n += 1
        return n

    def _exists(self, a: list[bytes]) -> Any:
        return sum(1 for key in a if self._live(key) is not None)

    def _pttl(self, a: list[bytes]) -> Any:
        return self.pttl(a[0])

    def _pexpire(self, a: list[bytes]) -> Any:
        entry = self._live(a[0])
        if entry is None:
            return 0
        ms = _int(a[1])
        if ms <= 0:
            del self.data[a[0]]
            self.where.pop(a[0], None)
        else:
            self.data[a[0]] = (entry[0], self.now_ms() + ms)
        return 1

    def _incr(self, a: list[bytes]) -> Any:
        entry = self._live(a[0])
        n = (_int(entry[0]) if entry is not None else 0) + 1
        self.data[a[0]] = (str(n).encode(), None if entry is None else entry[1])
        if a[0] in self.tracked:
            self.where[a[0]] = self.node
        return n

    def _time(self, a: list[bytes]) -> Any:
        us = self.time_us()
        return [str(us // 1_000_000).encode(), str(us % 1_000_000).encode()]

    def _pub(self, a: list[bytes]) -> Any:
        if len(a) != 2:
            raise _Err(b"ERR wrong number of arguments for 'publish' command")
        return self._publish(a[0], a[1])


_COMMANDS: dict[bytes, Callable[[SimRedis, list[bytes]], Any]] = {
    b"GET": SimRedis._get,
    b"MGET": SimRedis._mget,
    b"SET": SimRedis._set,
    b"DEL": SimRedis._del,
    b"EXISTS": SimRedis._exists,
    b"PTTL": SimRedis._pttl,
    b"PEXPIRE": SimRedis._pexpire,
    b"INCR": SimRedis._incr,
    b"TIME": SimRedis._time,
    b"PUBLISH": SimRedis._pub,
    b"SPUBLISH": SimRedis._pub,
}
