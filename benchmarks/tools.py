"""The tools under test, each behind one small interface, with the job they run.

Cache-aside tools (the peers) follow their docs' recipe for cache stampedes: read the cache;
on a miss take the lock, read again, and only then run the job and fill the cache.
dedupe runs the job through a decorated function with ``result_ttl`` as long as the peers'
cache TTL, so late callers are served the kept value just as a cache would serve them.

Every tool keeps its own keys under the ``prefix`` of its run, so each run starts cold.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import redis
import redis.asyncio

from dedupe import SingleFlight

LOCK_TTL_S = 10  # every lock's lease; jobs take far less

# Raw baseline: the minimum a correct lease needs. SET NX PX takes it; this script gives it back
# only if still ours and tells the waiters, in one round trip.
RELEASE_AND_PUBLISH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""


class Job:
    """The shared work: sleeps, then returns a payload; counts executions in this process."""

    def __init__(self, seconds: float, payload: bytes) -> None:
        self.seconds = seconds
        self.payload = payload
        self._lock = threading.Lock()
        self.executions = 0
        self.done_ns: dict[str, int] = {}  # key -> time.monotonic_ns() when the job finished

    def _finish(self, key: str) -> bytes:
        with self._lock:
            self.executions += 1
            self.done_ns[key] = time.monotonic_ns()
        return self.payload

    def __call__(self, key: str) -> bytes:
        if self.seconds:
            time.sleep(self.seconds)
        return self._finish(key)

    async def acall(self, key: str) -> bytes:
        if self.seconds:
            await asyncio.sleep(self.seconds)
        return self._finish(key)

    def reset(self) -> None:
        with self._lock:
            self.executions = 0
            self.done_ns.clear()


class SyncTool(Protocol):
    name: str

    def get(self, key: str) -> Any: ...

    def close(self) -> None: ...


class AsyncTool(Protocol):
    name: str

    async def start(self) -> None: ...

    def get(self, key: str) -> Awaitable[Any]: ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------- sync tools


class DedupeSync:
    name = "dedupe"
    local_cache = False

    def __init__(self, url: str, prefix: str, job: Job, ttl: float) -> None:
        self.sf = SingleFlight(
            url, prefix=prefix, result_ttl=ttl, lock_ttl=LOCK_TTL_S, local_cache=self.local_cache
        )

        @self.sf(key="{key}")
        def cached(key: str) -> bytes:
            return job(key)

        self.get: Callable[[str], Any] = cached

    def close(self) -> None:
        self.sf.close()


class DedupeLocalSync(DedupeSync):
    """dedupe with local_cache=True: a process-local copy of each kept value, held no longer
    than Redis keeps it fresh (result_ttl after the flight)."""

    name = "dedupe+local copy"
    local_cache = True


class _CacheAside:
    """Cache-aside under a lock: get; on a miss lock, get again, run, set."""

    def __init__(self, url: str, prefix: str, job: Job, ttl: float) -> None:
        self.r = redis.Redis.from_url(url)
        self.prefix = prefix
        self.job = job
        self.ttl_ms = int(ttl * 1000)

    def locked(self, key: str) -> Any:
        raise NotImplementedError

    def get(self, key: str) -> Any:
        ck = f"{self.prefix}:c:{key}"
        value = self.r.get(ck)
        if value is not None:
            return value
        with self.locked(key):
            value = self.r.get(ck)
            if value is None:
                value = self.job(key)
                self.r.set(ck, value, px=self.ttl_ms)
        return value

    def close(self) -> None:
        self.r.close()


class RedisPyLock(_CacheAside):
    name = "redis-py Lock"

    def locked(self, key: str) -> Any:
        # redis-py's defaults: polls every 0.1 s while blocked.
        return self.r.lock(f"{self.prefix}:l:{key}", timeout=LOCK_TTL_S)


class PythonRedisLock(_CacheAside):
    name = "python-redis-lock"

    def locked(self, key: str) -> Any:
        import redis_lock

        return redis_lock.Lock(self.r, f"{self.prefix}:{key}", expire=LOCK_TTL_S)


class NoLock(_CacheAside):
    name = "no lock (control)"

    def get(self, key: str) -> Any:
        ck = f"{self.prefix}:c:{key}"
        value = self.r.get(ck)
        if value is None:
            value = self.job(key)
            self.r.set(ck, value, px=self.ttl_ms)
        return value


class Dogpile:
    name = "dogpile.cache"

    def __init__(self, url: str, prefix: str, job: Job, ttl: float) -> None:
        from dogpile.cache import make_region

        self.region = make_region().configure(
            "dogpile.cache.redis",
            expiration_time=ttl,
            arguments={
                "url": url,
                "distributed_lock": True,  # as its docs recommend across processes
                "thread_local_lock": False,  # required with distributed_lock
                "lock_timeout": LOCK_TTL_S,
                "redis_expiration_time": int(ttl) + 1,
            },
        )
        self.prefix = prefix
        self.job = job

    def get(self, key: str) -> Any:
        return self.region.get_or_create(f"{self.prefix}:{key}", functools.partial(self.job, key))

    def close(self) -> None:
        backend: Any = self.region.backend
        backend.writer_client.close()


SYNC_TOOLS: dict[str, type[Any]] = {
    "dedupe": DedupeSync,
    "dedupe+local copy": DedupeLocalSync,
    "redis-py Lock": RedisPyLock,
    "python-redis-lock": PythonRedisLock,
    "dogpile.cache": Dogpile,
    "no lock (control)": NoLock,
}


# --------------------------------------------------------------------------- async tools


class DedupeAsync:
    name = "dedupe"

    def __init__(self, url: str, prefix: str, job: Job, ttl: float) -> None:
        self.sf = SingleFlight(url, prefix=prefix, result_ttl=ttl, lock_ttl=LOCK_TTL_S)

        @self.sf(key="{key}")
        async def cached(key: str) -> bytes:
            return await job.acall(key)

        self.get: Callable[[str], Awaitable[Any]] = cached

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        client = self.sf.backend().async_client()
        self.sf.close()
        await client.aclose()


class Cashews:
    name = "cashews"

    def __init__(self, url: str, prefix: str, job: Job, ttl: float) -> None:
        from cashews import Cache

        self.cache = Cache()
        self.cache.setup(url)

        @self.cache(ttl=ttl, key=prefix + ":{key}", lock=True)
        async def cached(key: str) -> bytes:
            return await job.acall(key)

        self.get: Callable[[str], Awaitable[Any]] = cached

    async def start(self) -> None:
        await self.cache.init()

    async def close(self) -> None:
        await self.cache.close()


class NoLockAsync:
    name = "no lock (control)"

    def __init__(self, url: str, prefix: str, job: Job, ttl: float) -> None:
        self.r = redis.asyncio.Redis.from_url(url)
        self.prefix = prefix
        self.job = job
        self.ttl_ms = int(ttl * 1000)

    async def start(self) -> None:
        pass

    async def get(self, key: str) -> Any:
        ck = f"{self.prefix}:c:{key}"
        value = await self.r.get(ck)
        if value is None:
            value = await self.job.acall(key)
            await self.r.set(ck, value, px=self.ttl_ms)
        return value

    async def close(self) -> None:
        await self.r.aclose()


ASYNC_TOOLS: dict[str, type[Any]] = {
    "dedupe": DedupeAsync,
    "cashews": Cashews,
    "no lock (control)": NoLockAsync,
}


# --------------------------------------------------------------------------- lock-only calls
# Scenario 1 (uncontended overhead) and 5 (throughput): one acquire+release on a fresh key.


class Overhead(Protocol):
    name: str

    def __call__(self, i: int) -> Any: ...


def _unique() -> str:
    return uuid.uuid4().hex[:12]


class RawSync:
    name = "raw SET NX PX + EVALSHA"

    def __init__(self, url: str, prefix: str) -> None:
        self.r = redis.Redis.from_url(url)
        self.sha = self.r.script_load(RELEASE_AND_PUBLISH)
        self.prefix = prefix
        self.owner = _unique()

    def __call__(self, i: int) -> None:
        key = f"{self.prefix}:{i}"
        token = f"{i}:{self.owner}"
        if not self.r.set(key, token, nx=True, px=LOCK_TTL_S * 1000):
            raise RuntimeError("raw lease not acquired on a fresh key")
        self.r.evalsha(self.sha, 1, key, token, key, b"")

    def close(self) -> None:
        self.r.close()


def _packed(*args: str | bytes | int) -> list[bytes]:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        data = a.encode() if isinstance(a, str) else b"%d" % a if isinstance(a, int) else a
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return [b"".join(out)]


class RawWireSync:
    """The raw lease on redis-py's connection layer, as dedupe's wire sends its scripts:
    commands packed by hand on one held Connection (no pool, no command layer). What the
    two commands cost on redis-py at the least; dedupe's own layer is the rest."""

    name = "raw SET NX PX + EVALSHA (hand-packed, one Connection)"

    def __init__(self, url: str, prefix: str) -> None:
        self.r = redis.Redis.from_url(url)
        self.sha = self.r.script_load(RELEASE_AND_PUBLISH)
        pool = self.r.connection_pool
        self.conn = pool.connection_class(**pool.connection_kwargs)
        self.prefix = prefix
        self.owner = _unique()

    def __call__(self, i: int) -> None:
        key = f"{self.prefix}:{i}"
        token = f"{i}:{self.owner}"
        conn = self.conn
        conn.send_packed_command(_packed("SET", key, token, "NX", "PX", LOCK_TTL_S * 1000))
        if not conn.read_response():
            raise RuntimeError("raw lease not acquired on a fresh key")
        conn.send_packed_command(_packed("EVALSHA", self.sha, 1, key, token, key, b""))
        conn.read_response()

    def close(self) -> None:
        self.conn.disconnect()
        self.r.close()


class DedupeNoop:
    name = "dedupe"

    def __init__(self, url: str, prefix: str) -> None:
        self.sf = SingleFlight(url, prefix=prefix, lock_ttl=LOCK_TTL_S)

        @self.sf(key="{i}")
        def noop(i: int) -> None:
            return None

        self.fn: Callable[[int], None] = noop

    def __call__(self, i: int) -> None:
        self.fn(i)

    def close(self) -> None:
        self.sf.close()


class RawGetSync:
    """The hit's floor: one GET of a present key through redis-py's client API."""

    name = "raw GET (redis-py)"

    def __init__(self, url: str, prefix: str) -> None:
        self.r = redis.Redis.from_url(url)
        self.key = f"{prefix}:hot"
        self.r.set(self.key, b"x" * 16, ex=3600)

    def __call__(self, i: int) -> None:
        if self.r.get(self.key) is None:
            raise RuntimeError("the hot key is gone")

    def close(self) -> None:
        self.r.close()


class DedupeHit:
    """A fresh kept value: every call after the first is served by the acquire script."""

    name = "dedupe kept hit"
    local_cache = False

    def __init__(self, url: str, prefix: str) -> None:
        self.sf = SingleFlight(
            url, prefix=prefix, lock_ttl=LOCK_TTL_S, result_ttl=3600, local_cache=self.local_cache
        )

        @self.sf(key="hot")
        def hot() -> bytes:
            return b"x" * 16

        self.fn: Callable[[], bytes] = hot

    def __call__(self, i: int) -> None:
        self.fn()

    def close(self) -> None:
        self.sf.close()


class DedupeCopyHit(DedupeHit):
    """local_cache=True: a hit served from this process's copy, no round trip."""

    name = "dedupe local copy hit"
    local_cache = True


class PlainCall:
    """The benchmark's own floor for a local copy: the same loop calling a plain function."""

    name = "a plain function call"

    def __init__(self, url: str, prefix: str) -> None:
        def hot() -> bytes:
            return b"x" * 16

        self.fn: Callable[[], bytes] = hot

    def __call__(self, i: int) -> None:
        self.fn()

    def close(self) -> None:
        pass


class RawGetAsync:
    """RawGetSync through redis.asyncio's client API."""

    name = "raw GET (redis.asyncio)"

    def __init__(self, url: str, prefix: str) -> None:
        self.r = redis.asyncio.Redis.from_url(url)
        self.key = f"{prefix}:hot"

    async def start(self) -> None:
        await self.r.set(self.key, b"x" * 16, ex=3600)

    async def __call__(self, i: int) -> None:
        if await self.r.get(self.key) is None:
            raise RuntimeError("the hot key is gone")

    async def close(self) -> None:
        await self.r.aclose()


class DedupeHitAsync:
    """DedupeHit's async twin: every call after the first is served the fresh kept value."""

    name = "dedupe kept hit"

    def __init__(self, url: str, prefix: str) -> None:
        self.sf = SingleFlight(url, prefix=prefix, lock_ttl=LOCK_TTL_S, result_ttl=3600)

        @self.sf(key="hot")
        async def hot() -> bytes:
            return b"x" * 16

        self.fn: Callable[[], Awaitable[bytes]] = hot

    async def start(self) -> None:
        pass

    async def __call__(self, i: int) -> None:
        await self.fn()

    async def close(self) -> None:
        client = self.sf.backend().async_client()
        self.sf.close()
        await client.aclose()


class RedisPyLockNoop:
    name = "redis-py Lock"

    def __init__(self, url: str, prefix: str) -> None:
        self.r = redis.Redis.from_url(url)
        self.prefix = prefix

    def __call__(self, i: int) -> None:
        lock = self.r.lock(f"{self.prefix}:{i}", timeout=LOCK_TTL_S)
        lock.acquire()
        lock.release()

    def close(self) -> None:
        self.r.close()


class PythonRedisLockNoop:
    name = "python-redis-lock"

    def __init__(self, url: str, prefix: str) -> None:
        import redis_lock

        self.redis_lock = redis_lock
        self.r = redis.Redis.from_url(url)
        self.prefix = prefix

    def __call__(self, i: int) -> None:
        lock = self.redis_lock.Lock(self.r, f"{self.prefix}:{i}", expire=LOCK_TTL_S)
        lock.acquire()
        lock.release()

    def close(self) -> None:
        self.r.close()


class RawAsync:
    name = "raw SET NX PX + EVALSHA"

    def __init__(self, url: str, prefix: str) -> None:
        self.r = redis.asyncio.Redis.from_url(url)
        self.prefix = prefix
        self.owner = _unique()
        self.sha = ""

    async def start(self) -> None:
        self.sha = await self.r.script_load(RELEASE_AND_PUBLISH)

    async def __call__(self, i: int) -> None:
        key = f"{self.prefix}:{i}"
        token = f"{i}:{self.owner}"
        if not await self.r.set(key, token, nx=True, px=LOCK_TTL_S * 1000):
            raise RuntimeError("raw lease not acquired on a fresh key")
        await self.r.evalsha(self.sha, 1, key, token, key, b"")

    async def close(self) -> None:
        await self.r.aclose()


class RawWireAsync:
    """RawWireSync over redis.asyncio."""

    name = "raw SET NX PX + EVALSHA (hand-packed, one Connection)"

    def __init__(self, url: str, prefix: str) -> None:
        self.r = redis.asyncio.Redis.from_url(url)
        pool = self.r.connection_pool
        self.conn = pool.connection_class(**pool.connection_kwargs)
        self.prefix = prefix
        self.owner = _unique()
        self.sha = ""

    async def start(self) -> None:
        self.sha = await self.r.script_load(RELEASE_AND_PUBLISH)

    async def __call__(self, i: int) -> None:
        key = f"{self.prefix}:{i}"
        token = f"{i}:{self.owner}"
        conn = self.conn
        await conn.send_packed_command(_packed("SET", key, token, "NX", "PX", LOCK_TTL_S * 1000))
        if not await conn.read_response():
            raise RuntimeError("raw lease not acquired on a fresh key")
        await conn.send_packed_command(_packed("EVALSHA", self.sha, 1, key, token, key, b""))
        await conn.read_response()

    async def close(self) -> None:
        await self.conn.disconnect()
        await self.r.aclose()


class DedupeNoopAsync:
    name = "dedupe"

    def __init__(self, url: str, prefix: str) -> None:
        self.sf = SingleFlight(url, prefix=prefix, lock_ttl=LOCK_TTL_S)

        @self.sf(key="{i}")
        async def noop(i: int) -> None:
            return None

        self.fn: Callable[[int], Awaitable[None]] = noop

    async def start(self) -> None:
        pass

    async def __call__(self, i: int) -> None:
        await self.fn(i)

    async def close(self) -> None:
        client = self.sf.backend().async_client()
        self.sf.close()
        await client.aclose()


class RedisPyLockNoopAsync:
    name = "redis-py Lock"

    def __init__(self, url: str, prefix: str) -> None:
        self.r = redis.asyncio.Redis.from_url(url)
        self.prefix = prefix

    async def start(self) -> None:
        pass

    async def __call__(self, i: int) -> None:
        lock = self.r.lock(f"{self.prefix}:{i}", timeout=LOCK_TTL_S)
        await lock.acquire()
        await lock.release()

    async def close(self) -> None:
        await self.r.aclose()


class CashewsLockNoop:
    name = "cashews lock"

    def __init__(self, url: str, prefix: str) -> None:
        from cashews import Cache

        self.cache = Cache()
        self.cache.setup(url)
        self.prefix = prefix
        self.owner = _unique()

    async def start(self) -> None:
        await self.cache.init()

    async def __call__(self, i: int) -> None:
        key = f"{self.prefix}:{i}"
        if not await self.cache.set_lock(key, self.owner, expire=LOCK_TTL_S):
            raise RuntimeError("cashews lock not acquired on a fresh key")
        await self.cache.unlock(key, self.owner)

    async def close(self) -> None:
        await self.cache.close()


OVERHEAD_SYNC: list[type[Any]] = [RawSync, DedupeNoop, RedisPyLockNoop, PythonRedisLockNoop]
OVERHEAD_ASYNC: list[type[Any]] = [RawAsync, DedupeNoopAsync, RedisPyLockNoopAsync, CashewsLockNoop]
