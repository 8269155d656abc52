"""``memory://``: the flight protocol on an in-process store, for tests and one-process apps.

The store is a keyspace of bytes with expiries, on its own monotonic clock (which stands in
for the server's ``TIME``: microseconds, started at the wall clock so tokens look as Redis's
do), and it runs dedupe's scripts: each script of ``dedupe.core.scripts`` has its Python
twin here, run atomically under the store's lock, reading and writing the same keys and
replying as Redis replies to the Lua (tests/test_memory_scripts.py runs both on random
command sequences and compares replies and keys). ``PUBLISH`` hands the message straight to
the mailboxes subscribed in this process (``MemoryHub`` stands where the pub/sub hub does).

Everything above the transport (the call, flight and batch machines, the drivers, renewal,
local copies) is the same code as with Redis; only where scripts run and where messages go
differ. A store lives in one process: a forked child starts with empty stores, and nothing
coordinates across processes. ``memory://`` is one store per process, shared by every
instance with that URL (as a Redis server would be); ``memory://<name>`` a store of its own.

Locks: ``MemoryStore._lock`` guards the keyspace and the subscriptions; it is a leaf but for
the Mailbox locks that delivering a message takes (leaves themselves). A subscription is
confirmed at once (a Latch set before it is handed out), and a hub never loses one.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from dedupe.core import record, scripts
from dedupe.core.signals import Latch, Mailbox
from dedupe.errors import BackendUnavailable

__all__ = [
    "MemoryAsyncClient",
    "MemoryClient",
    "MemoryHub",
    "MemoryStore",
    "drop_store",
    "store_for",
]

Reply = Any  # what Redis would reply to the Lua: int, bytes, None, or a list of them
_NOT_OURS = 9_000_000_000_000_000  # the acquire script's bound on a counter it trusts
_LEADING_DIGITS = re.compile(rb"[0-9]+")
_LOCK_TOKEN = re.compile(rb"([0-9]+):")


class ScriptFailed(ResponseError):
    """A script raised where Redis's Lua would have (redis.call failing, a bad argument)."""


def _bytes(value: str | bytes | int | float) -> bytes:
    """An argument as Redis receives it."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bool):
        raise ScriptFailed("Lua redis lib command arguments must be strings or integers")
    if isinstance(value, int):
        return b"%d" % value
    if isinstance(value, float):
        return (b"%d" % int(value)) if value.is_integer() else repr(value).encode()
    return value.encode()


def _number(raw: bytes | None) -> float | int | None:
    """Lua's tonumber of an argument (decimal forms: what dedupe passes), or None."""
    if raw is None:
        return None
    text = raw.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return None if number != number else number  # NaN is no number to Lua's tonumber


def _px(raw: bytes | int | float) -> int:
    """SET ... PX n and PEXPIRE n: Redis refuses anything but a positive integer."""
    text = _bytes(raw)
    if not re.fullmatch(rb"-?[0-9]+", text):
        raise ScriptFailed("ERR value is not an integer or out of range")
    return int(text)


class MemoryStore:
    """A keyspace with expiries and dedupe's scripts, on one clock; thread-safe.

    ``clock_us``: the store's clock in microseconds (default: monotonic, from the wall
    clock at creation). Each script reads it once: time stands still while it runs.
    """

    def __init__(self, name: str = "", clock_us: Callable[[], int] | None = None) -> None:
        self.name = name
        if clock_us is None:
            base = time.time_ns() // 1000 - time.monotonic_ns() // 1000

            def clock_us() -> int:
                return base + time.monotonic_ns() // 1000

        self._clock_us = clock_us
        self._lock = threading.Lock()
        self.data: dict[bytes, tuple[bytes, int | None]] = {}  # key -> (value, expires at ms)
        # channel -> hub -> its mailboxes on that channel
        self._subs: dict[bytes, dict[MemoryHub, list[Mailbox[Any]]]] = {}
        self._now_ms = 0  # the running script's clock (under _lock)
        self._now_us = 0
        self._writes = 0
        self._scripts: dict[str, Callable[[list[bytes], list[bytes]], Reply]] = {}
        for lua, fn in (
            (scripts.ACQUIRE, self._acquire),
            (scripts.RENEW, self._renew),
            (scripts.COMPLETE, self._complete),
            (scripts.COMPLETE_SHARDED, self._complete),
            (scripts.DISCARD, self._discard),
            (scripts.PEEK, self._peek),
            (scripts.READ, self._read),
            (scripts.FORGET, self._forget),
            (scripts.NOTIFY, self._notify),
            (scripts.NOTIFY_SHARDED, self._notify),
        ):
            self._scripts[hashlib.sha1(lua.encode()).hexdigest()] = fn

    # --- running scripts ------------------------------------------------------------------

    def knows(self, sha: str) -> bool:
        return sha in self._scripts

    def run(self, sha: str, keys: Sequence[Any], args: Sequence[Any]) -> Reply:
        """EVALSHA: the script's reply; NoScriptError if it is none of dedupe's; ScriptFailed
        where the Lua would have raised."""
        fn = self._scripts.get(sha)
        if fn is None:
            raise NoScriptError("NOSCRIPT memory:// runs dedupe's own scripts only")
        k = [_bytes(key) for key in keys]
        a = [_bytes(arg) for arg in args]
        with self._lock:
            self._now_us = self._clock_us()
            self._now_ms = self._now_us // 1000
            try:
                return fn(k, a)
            finally:
                self._writes += 1
                if self._writes % 1024 == 0:
                    self._sweep()

    def now_ms(self) -> int:
        return self._clock_us() // 1000

    # --- the keyspace (under _lock, at the script's time) -------------------------------------

    def _sweep(self) -> None:
        now = self._now_ms
        for key in [k for k, (_, at) in self.data.items() if at is not None and at <= now]:
            del self.data[key]

    def _entry(self, key: bytes) -> tuple[bytes, int | None] | None:
        entry = self.data.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= self._now_ms:
            del self.data[key]
            return None
        return entry

    def _get(self, key: bytes) -> bytes | None:
        entry = self._entry(key)
        return None if entry is None else entry[0]

    def _set(self, key: bytes, value: bytes | None, px: bytes | int | float) -> None:
        if value is None:
            raise ScriptFailed("Lua redis lib command arguments must be strings or integers")
        ms = _px(px)
        if ms <= 0:
            raise ScriptFailed("ERR invalid expire time in 'set' command")
        self.data[key] = (value, self._now_ms + ms)

    def _del(self, *keys: bytes) -> int:
        n = 0
        for key in keys:
            if self._entry(key) is not None:
                del self.data[key]
                n += 1
        return n

    def _pttl(self, key: bytes) -> int:
        entry = self._entry(key)
        if entry is None:
            return -2
        return -1 if entry[1] is None else entry[1] - self._now_ms

    def _pexpire(self, key: bytes, ms_raw: bytes | int) -> int:
        entry = self._entry(key)
        if entry is None:
            return 0
        ms = _px(ms_raw)
        if ms <= 0:
            del self.data[key]
        else:
            self.data[key] = (entry[0], self._now_ms + ms)
        return 1

    def _publish(self, channel: bytes, message: bytes) -> int:
        hubs = self._subs.get(channel)
        if not hubs:
            return 0
        for boxes in hubs.values():
            for box in boxes:
                box.put(message)
        return len(hubs)

    def _state(
        self, result: bytes, counter: bytes, token: int, keep: int, ttl: int
    ) -> record.RecordState | None:
        """LUA_RECORD's record_state: PTTL of the record, the counter, the clock."""
        pttl = self._pttl(result)
        if keep <= 0 or pttl < 0 or pttl > ttl:
            return None
        return record.record_state(token, keep, ttl, pttl, self._get(counter), self._now_ms)

    # --- the scripts (each mirrors its Lua in dedupe.core.scripts, line for line) ---------

    def _acquire(self, keys: list[bytes], argv: list[bytes]) -> Reply:
        lock, counter, result, error = keys
        floor = _number(argv[3])
        swr = _number(argv[4] if len(argv) > 4 else None) or 0
        sie = _number(argv[5] if len(argv) > 5 else None) or 0
        early = _number(argv[6] if len(argv) > 6 else None) or 0
        flags = _number(argv[7] if len(argv) > 7 else None) or 0
        background = flags % 2 == 1
        after_error = flags % 4 >= 2

        def grant(base: bytes | None, life: bytes | int | float) -> int:
            t = self._now_us
            tail = b":" + base if base else b""
            last_raw = self._get(counter)
            self._set(counter, b"%d" % t + tail, life)
            m = _LEADING_DIGITS.match(last_raw) if last_raw is not None else None
            last = int(m[0]) if m else 0
            if last > _NOT_OURS:
                last = 0
            if last >= t:
                t = last + 1
                self._set(counter, b"%d" % t + tail, life)
            self._set(lock, b"%d:" % t + argv[0], argv[1])
            return t

        rec = self._get(result)
        head = record.read_header(rec) if rec is not None else None
        fresh = age = run = None
        stale = False
        ttl = 0
        tok_text = b""
        if head is not None:
            tok, keep, ttl, _ = head
            tok_text = b"%d" % tok
            state = self._state(result, counter, tok, keep, ttl)
            if state is not None:
                fresh, age, run = state
            ours = floor is not None and tok >= floor
            if fresh is not None and fresh > 0 and (floor is None or ours):
                assert run is not None and age is not None
                if (
                    early > 0
                    and background
                    and run * early / 1000 >= fresh
                    and self._pttl(lock) == -2
                    and self._entry(error) is None
                ):
                    life = max(_number(argv[2]) or 0, ttl - age)
                    return [3, rec, fresh, age, grant(tok_text, life)]
                return [0, rec, fresh, age]
            if ours:
                return [0, rec, 0, age or 0]
            stale = fresh is not None and (-fresh < swr or -fresh < sie)
        pttl = self._pttl(lock)
        if pttl == -1:
            # A lease with no expiry was not written by us; bound it so no waiter waits forever.
            self._pexpire(lock, argv[1])
            pttl = int(_number(argv[1]) or 0)
        if stale:
            assert fresh is not None and age is not None
            life = max(_number(argv[2]) or 0, ttl - age)
            if after_error or self._entry(error) is not None:
                return [4, rec, fresh, age, b"e"]
            if -fresh < swr:
                if pttl >= 0 or not background:
                    return [4, rec, fresh, age, b"r"]
                return [3, rec, fresh, age, grant(tok_text, life)]
            if pttl < 0:
                return [2, grant(tok_text, life), rec, fresh, age]
        if pttl >= 0:
            holder = self._get(lock) or b""
            if stale:
                return [1, pttl, holder, rec, fresh, age]
            return [1, pttl, holder]
        return grant(None, argv[2])

    def _renew(self, keys: list[bytes], argv: list[bytes]) -> Reply:
        if self._get(keys[0]) == argv[0]:
            return self._pexpire(keys[0], argv[1])
        return 0

    def _complete(self, keys: list[bytes], argv: list[bytes]) -> Reply:
        lock, result, counter, error = keys
        m = _LOCK_TOKEN.match(argv[0])
        tok = m[1] if m else None
        state = 0
        if self._get(lock) == argv[0]:
            self._del(lock)
            state = 1
        elif record.counter_parts(self._get(counter))[0] != tok:
            return -1
        msg = argv[3]
        cached = len(argv) > 4
        if cached and argv[4] != b"":
            rec = self._get(result)
            head = record.read_header(rec) if rec is not None else None
            if head is not None and rec is not None and b"%d" % head[0] == argv[4]:
                at = head[3] + record.KIND_AT
                if len(rec) > at and rec[at] == record.KIND_VALUE:
                    got = self._state(result, counter, head[0], head[1], head[2])
                    limit = _number(argv[5]) if got is not None else 0
                    if limit is None:
                        raise ScriptFailed("attempt to compare number with nil")
                    if got is not None and -got.fresh_ms < limit:
                        backoff = _number(argv[6])
                        if backoff is None:
                            raise ScriptFailed("attempt to compare nil with number")
                        if backoff > 0:
                            self._set(error, tok, argv[6])
                        state = 2
                        msg = argv[7]
        if state != 2 and argv[1] != b"":
            self._set(result, argv[1], argv[2])
            if cached:
                self._del(error)
            cur = self._get(counter)
            lease, base = record.counter_parts(cur)
            record_ttl = _number(argv[2]) or 0
            if lease == tok:
                life = self._pttl(counter)
                if base is not None or life < record_ttl:
                    self._set(counter, tok, max(life, record_ttl))
            elif cur is None:
                self._set(counter, tok, argv[2])
        if msg == b"":
            msg = argv[1]
        self._publish(lock[:-5], msg)
        return state

    def _discard(self, keys: list[bytes], argv: list[bytes]) -> Reply:
        if self._get(keys[0]) == argv[0]:
            return self._del(keys[0])
        return 0

    def _read(self, keys: list[bytes], argv: list[bytes]) -> Reply:
        now = self._now_us
        return [[self._get(keys[0]), self._get(keys[1])], [b"%d" % (now // 1_000_000),
                b"%d" % (now % 1_000_000)]]  # fmt: skip

    def _peek(self, keys: list[bytes], argv: list[bytes]) -> Reply:
        return self._get(keys[0])

    def _forget(self, keys: list[bytes], argv: list[bytes]) -> Reply:
        result, counter, lock, error = keys
        kept = 0  # the record was current: fresh, or stale within a caller's window
        rec = self._get(result)
        head = record.read_header(rec) if rec is not None else None
        if head is not None and self._state(result, counter, head[0], head[1], head[2]):
            kept = 1
        self._del(result, error)
        voided = 0
        held = self._get(lock)
        if held is not None:
            m = _LOCK_TOKEN.match(held)
            voided = int(m[1]) if m else 0  # Lua: tonumber(nil) or 0
            self._del(lock)
        last = self._get(counter)
        if last is not None:
            t = self._now_us
            d = _LEADING_DIGITS.match(last)
            lease = int(d[0]) if d else 0
            if t <= lease < _NOT_OURS:
                t = lease + 1
            self._set(counter, b"%d" % t, argv[0])
        return [kept, voided]

    def _notify(self, keys: list[bytes], argv: list[bytes]) -> Reply:
        return self._publish(keys[0][:-5], argv[0])

    # --- reads for inspect() ----------------------------------------------------------------

    def read(self, key: bytes) -> tuple[bytes | None, int]:
        """GET and PTTL of a key, now."""
        with self._lock:
            self._now_us = self._clock_us()
            self._now_ms = self._now_us // 1000
            return self._get(key), self._pttl(key)

    def delete(self, *keys: bytes) -> int:
        with self._lock:
            self._now_us = self._clock_us()
            self._now_ms = self._now_us // 1000
            return self._del(*keys)

    def numsub(self, channel: bytes) -> int:
        with self._lock:
            return len(self._subs.get(channel, {}))

    # --- subscriptions (MemoryHub) -----------------------------------------------------------

    def subscribe(self, hub: MemoryHub, channel: bytes, box: Mailbox[Any]) -> None:
        with self._lock:
            boxes = self._subs.setdefault(channel, {}).setdefault(hub, [])
            if box not in boxes:
                boxes.append(box)

    def unsubscribe(self, hub: MemoryHub, channel: bytes, box: Mailbox[Any] | None) -> None:
        """Drop one mailbox of the hub's on the channel (None: all of them)."""
        with self._lock:
            hubs = self._subs.get(channel)
            if hubs is None or hub not in hubs:
                return
            if box is not None and box in hubs[hub]:
                hubs[hub].remove(box)
            if box is None or not hubs[hub]:
                del hubs[hub]
            if not hubs:
                del self._subs[channel]

    def holds(self, hub: MemoryHub, channel: bytes) -> bool:
        with self._lock:
            return hub in self._subs.get(channel, {})

    def subscribed(self, hub: MemoryHub) -> dict[str, int]:
        with self._lock:
            return {
                channel.decode("utf-8", "replace"): len(hubs[hub])
                for channel, hubs in self._subs.items()
                if hub in hubs
            }


class MemoryHub:
    """The pub/sub hub of a ``memory://`` backend: subscriptions are entries in the store,
    confirmed at once; PUBLISH puts each message in the subscribed mailboxes. It has no
    connection to lose, so it never hands out RECHECK."""

    reconnects = 0

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._closed = False

    def subscribe(self, channel: str, mailbox: Mailbox[Any]) -> Latch[bool]:
        if self._closed:
            raise BackendUnavailable("this dedupe instance is closed")
        self._store.subscribe(self, channel.encode(), mailbox)
        return self.confirmation(channel)

    def confirmation(self, channel: str) -> Latch[bool]:
        latch: Latch[bool] = Latch()
        latch.set(not self._closed and self._store.holds(self, channel.encode()))
        return latch

    def denied(self, channel: str) -> str | None:
        return None

    def unsubscribe(self, channel: str, mailbox: Mailbox[Any]) -> None:
        self._store.unsubscribe(self, channel.encode(), mailbox)

    def channels(self) -> dict[str, int]:
        return self._store.subscribed(self)

    def close(self) -> None:
        self._closed = True
        for channel in list(self._store.subscribed(self)):
            self._store.unsubscribe(self, channel.encode(), None)


# --- the clients the backend talks through -----------------------------------------------------


def _script_args(sha_or_lua: str, numkeys: int, rest: tuple[Any, ...]) -> tuple[str, Any, Any]:
    return sha_or_lua, list(rest[:numkeys]), list(rest[numkeys:])


class MemoryClient:
    """What the backend uses of a redis-py sync client, over a MemoryStore."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Reply:
        return self.store.run(*_script_args(sha, numkeys, keys_and_args))

    def eval(self, lua: str, numkeys: int, *keys_and_args: Any) -> Reply:
        sha = hashlib.sha1(lua.encode()).hexdigest()
        if not self.store.knows(sha):
            raise ResponseError("memory:// runs dedupe's own scripts only")
        return self.store.run(*_script_args(sha, numkeys, keys_and_args))

    def pipeline(self, transaction: bool = False) -> MemoryPipeline:
        return MemoryPipeline(self)

    def execute_command(self, *args: Any) -> Any:
        if args[0] == "PUBSUB NUMSUB":
            channel = args[1]
            return [(channel, self.store.numsub(_bytes(channel)))]
        raise ResponseError(f"memory:// does not run {args[0]!r}")

    def get(self, key: str) -> bytes | None:
        return self.store.read(_bytes(key))[0]

    def pttl(self, key: str) -> int:
        return self.store.read(_bytes(key))[1]

    def delete(self, *keys: str) -> int:
        return self.store.delete(*(_bytes(k) for k in keys))

    def close(self) -> None:
        pass


class MemoryPipeline:
    """A pipeline of the commands the inspector and the renewer send: run one by one."""

    def __init__(self, client: MemoryClient) -> None:
        self._client = client
        self._calls: list[Callable[[], Any]] = []

    def _add(self, fn: Callable[..., Any], *args: Any) -> MemoryPipeline:
        self._calls.append(lambda: fn(*args))
        return self

    def get(self, key: str) -> MemoryPipeline:
        return self._add(self._client.get, key)

    def pttl(self, key: str) -> MemoryPipeline:
        return self._add(self._client.pttl, key)

    def evalsha(self, sha: str, numkeys: int, *rest: Any) -> MemoryPipeline:
        return self._add(self._client.evalsha, sha, numkeys, *rest)

    def eval(self, lua: str, numkeys: int, *rest: Any) -> MemoryPipeline:
        return self._add(self._client.eval, lua, numkeys, *rest)

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        out: list[Any] = []
        calls, self._calls = self._calls, []
        for call in calls:
            try:
                out.append(call())
            except ResponseError as exc:
                if raise_on_error:
                    raise
                out.append(exc)
        return out


class MemoryAsyncClient:
    """What the backend uses of a redis.asyncio client, over a MemoryStore (a script never
    waits: it runs in the caller's task, under the store's lock)."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self._sync = MemoryClient(store)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Reply:
        return self._sync.evalsha(sha, numkeys, *keys_and_args)

    async def eval(self, lua: str, numkeys: int, *keys_and_args: Any) -> Reply:
        return self._sync.eval(lua, numkeys, *keys_and_args)

    async def aclose(self) -> None:
        pass


# --- the stores of this process ---------------------------------------------------------------

_stores: dict[str, MemoryStore] = {}
_stores_lock = threading.Lock()


def store_for(name: str) -> MemoryStore:
    """The process's store of that name (``memory://<name>``; "" for ``memory://``)."""
    with _stores_lock:
        store = _stores.get(name)
        if store is None:
            store = _stores[name] = MemoryStore(name)
        return store


def drop_store(name: str) -> None:
    """Forget a store (the pytest fixture's, after its test): the next use starts empty."""
    with _stores_lock:
        _stores.pop(name, None)


def _after_fork_in_child() -> None:
    # A child shares nothing with its parent: not its keys, not its subscribers.
    global _stores_lock
    _stores_lock = threading.Lock()
    _stores.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
