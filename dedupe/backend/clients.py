"""The redis-py clients dedupe talks through, and how each is built, once, lazily.

From a URL, or as twins of the clients the user passed (a sync client for an asyncio one and
the other way round, with the same connection settings). Every client is built by the first
caller that needs it, with no lock held while it connects or discovers a Cluster's slots:
callers that need the same client wait for that build (an Event), nobody else does. A
Cluster's version is checked once, by the build of its first sync client.

Locks: ``Clients._lock`` guards ``_loops`` (each event loop's client); it is never held
across network I/O. Each ``Once`` has a lock of its own, held only to hand out its value
or to elect the caller that builds it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import redis
import redis.asyncio
import redis.asyncio.connection as aconn
import redis.asyncio.retry
import redis.cluster
import redis.connection as sconn
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from dedupe.backend.hub import Connection, Router, SingleRouter
from dedupe.backend.resp import resp2_kwargs
from dedupe.backend.topology import ClusterRouter, Target, cluster_twin, sentinel_twin
from dedupe.errors import UnsupportedServer
from dedupe.settings import AsyncClient, Settings, SyncClient

__all__ = ["POOL_SIZE", "Clients", "Once", "client_name", "redact"]

log = logging.getLogger(__name__)

# Commands in flight at once per client (per event loop for asyncio) is the transport's
# business (its command slots); pools are sized above it, so they never refuse one.
POOL_SIZE = 64 + 16

T = TypeVar("T")


class Once(Generic[T]):
    """A value built once, by the first caller that needs it, with no lock held while it is
    built: the others wait for that build (an Event) and share its value. A build that fails
    raises in its caller, and the next caller tries again."""

    __slots__ = ("_building", "_lock", "value")

    def __init__(self, value: T | None = None) -> None:
        self._lock = threading.Lock()  # guards value and _building (held for no I/O)
        self.value: T | None = value  # read without the lock (one attribute read)
        self._building: threading.Event | None = None

    def get(self, build: Callable[[], T]) -> T:
        while True:
            value = self.value
            if value is not None:
                return value
            with self._lock:
                if self.value is not None:
                    return self.value
                done = self._building
                mine = done is None
                if mine:
                    done = self._building = threading.Event()
            assert done is not None
            if not mine:
                done.wait()  # bounded by the build's own timeouts (connects, discovery)
                continue
            try:
                built = build()
            except BaseException:
                with self._lock:
                    self._building = None
                done.set()
                raise
            with self._lock:
                self.value, self._building = built, None
            done.set()
            return built

    def take(self) -> T | None:
        """Forget the value (close()): the next get() builds a new one."""
        with self._lock:
            value, self.value = self.value, None
            return value


def client_name(settings: Settings, role: str) -> str:
    """CLIENT SETNAME of our connections: an operator sees whose they are in CLIENT LIST."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())
    # Redis refuses names with spaces (or anything outside '!'..'~'), which a prefix may hold.
    prefix = re.sub(r"[^!-~]", "_", settings.prefix)
    return f"{prefix}:{role}:{host}:{os.getpid()}"


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


class Clients:
    """The clients of one backend: the sync client (shared by every thread), one asyncio
    client per event loop, and the renewer's own sync client; all built lazily."""

    def __init__(self, settings: Settings, target: Target | None, kind: str) -> None:
        self.settings = settings
        self.target = target  # the parsed URL; None when clients were passed in
        self.kind = kind
        self._sync: Once[SyncClient] = Once()  # the given client too: its version is checked
        self._renewal: Once[SyncClient] = Once()
        self._lock = threading.Lock()
        # Each event loop's client (redis.asyncio connections belong to one loop); under _lock.
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    # --- what the backend asks for ------------------------------------------------------------

    def sync(self) -> SyncClient:
        """The sync client (built, and a Cluster's version checked, on first use)."""
        client = self._sync.value
        return client if client is not None else self._sync.get(self._build_sync)

    def for_loop(self) -> AsyncClient:
        """The running event loop's asyncio client (built on that loop, on first use)."""
        loop = asyncio.get_running_loop()
        client = self._loops.get(loop)
        if client is None:
            given = self.settings.async_client
            client = given if given is not None else self._build(to_async=True)
            with self._lock:
                client = self._loops.setdefault(loop, client)
        return client

    def renewal(self) -> SyncClient:
        """The renewer's client: no retries, timeouts of at most a quarter of the lease."""
        client = self._renewal.value
        return client if client is not None else self._renewal.get(self._build_renewal)

    def renewal_if_built(self) -> Any:
        """The renewer's client if it exists (no I/O: for the renewal scheduler)."""
        return self._renewal.value

    def router(self) -> Router:
        """The hub's router (on Cluster it reads the slot layout: call it off the caller's
        path, as the hub does on its own thread)."""
        client: Any = self.sync()
        if self.kind == "cluster":
            node_pool = client.get_default_node().redis_connection.connection_pool
            base = _hub_kwargs(node_pool.connection_kwargs)
            node_cls = node_pool.connection_class

            def make(host: str, port: int) -> Connection:
                conn: Connection = node_cls(**{**base, "host": host, "port": port})
                return conn

            return ClusterRouter(client, make)
        pool = client.connection_pool
        kwargs = _hub_kwargs(pool.connection_kwargs)
        cls = pool.connection_class

        def connect() -> Connection:
            conn: Connection = cls(**kwargs)
            return conn

        return SingleRouter(connect)

    async def aclose_loop(self) -> None:
        """Close the running loop's client, if dedupe built it (on its own loop)."""
        with self._lock:
            client = self._loops.pop(asyncio.get_running_loop(), None)
        if client is not None and self.settings.async_client is None:
            await client.aclose()

    def close(self) -> None:
        """Close the sync clients built here (asyncio ones belong to their loops)."""
        renewal = self._renewal.take()
        sync = self._sync.take()
        self._sync = Once()
        with self._lock:
            self._loops.clear()
        if renewal is not None:
            renewal.close()
        if self.settings.client is None and sync is not None:
            sync.close()

    # --- building (no lock held) ----------------------------------------------------------

    def _build_sync(self) -> SyncClient:
        client: SyncClient = self.settings.client or self._build(to_async=False)
        if self.kind == "cluster":
            _check_cluster_version(client)  # sharded pub/sub needs 7.0: before the first lease
        return client

    def _build(self, *, to_async: bool) -> Any:
        """A client from the URL, or the twin of the client of the other kind we were given."""
        s = self.settings
        opts = _client_options(s, redis.asyncio.retry.Retry if to_async else Retry)
        if self.kind == "cluster":
            opts.pop("max_connections")  # per node, and the cluster clients size their own
            # A cluster client retries by re-discovering the topology, which drops every
            # connection of its nodes, in use or not: with a retry policy of ours, one failed
            # command under concurrency cut others off mid-command (seen with redis.asyncio).
            # Its own policy (a few retries with backoff) stays.
            opts.pop("retry")
        if self.target is not None:
            return self.target.client(opts, to_async=to_async)
        given = s.client if to_async else s.async_client
        if self.kind == "cluster":
            return cluster_twin(given, opts, to_async=to_async)
        if self.kind == "sentinel":
            return sentinel_twin(given, opts, to_async=to_async)
        return _twin(given, to_async=to_async)

    def _build_renewal(self) -> SyncClient:
        """A sync client of our own for renewals: no retries, and timeouts of at most a
        quarter of the lease, so each batch round trip ends well inside lock_ttl/3."""
        s = self.settings
        bound = s.lock_ttl / 4
        opts: dict[str, Any] = {
            "socket_connect_timeout": min(s.connect_timeout, bound),
            "socket_timeout": min(s.socket_timeout, bound),
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
            "client_name": client_name(s, "renew"),
            # Our own connections, which only renew: RESP2, whose replies the wire reads in
            # one pass (a URL's protocol=3 still wins).
            "protocol": 2,
        }
        if self.target is not None:
            client: SyncClient = self.target.client(opts, to_async=False)
            return client
        given: Any = s.client if s.client is not None else s.async_client
        if self.kind == "cluster":
            return cluster_twin(given, opts, to_async=False)  # type: ignore[no-any-return]
        if self.kind == "sentinel":
            return sentinel_twin(given, opts, to_async=False)  # type: ignore[no-any-return]
        pool = given.connection_pool
        cls = _ASYNC_TO_SYNC.get(pool.connection_class, pool.connection_class)
        accepted = set(inspect.signature(cls.__init__).parameters)
        skip = {"retry", "connection_pool", "redis_connect_func", "event_dispatcher"}
        kw = {k: v for k, v in pool.connection_kwargs.items() if k in accepted and k not in skip}
        kw.update({k: v for k, v in opts.items() if k in accepted})
        return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=cls, **kw))


def _client_options(settings: Settings, retry_cls: type[Any]) -> dict[str, Any]:
    # Bounded everywhere: a dead Redis must surface as BackendUnavailable, never as a hang.
    # The wire retries a failed command itself, within connect_timeout + socket_timeout
    # (wire.py); redis-py's own retry here covers a connection that failed in a connect.
    return {
        "socket_connect_timeout": settings.connect_timeout,
        "socket_timeout": settings.socket_timeout,
        "retry": retry_cls(
            ExponentialBackoff(cap=0.1, base=0.01), 1, supported_errors=(RedisConnectionError,)
        ),
        "max_connections": POOL_SIZE,
        "client_name": client_name(settings, "cmd"),
        "health_check_interval": settings.health_check_interval,
    }


# Connection classes of redis-py's sync and asyncio clients that mean the same transport.
_ASYNC_TO_SYNC: dict[Any, Any] = {
    aconn.Connection: sconn.Connection,
    aconn.SSLConnection: sconn.SSLConnection,
    aconn.UnixDomainSocketConnection: sconn.UnixDomainSocketConnection,
}
_SYNC_TO_ASYNC = {v: k for k, v in _ASYNC_TO_SYNC.items()}


def _twin(client: Any, *, to_async: bool) -> Any:
    """A client of the other kind (sync/async) with the same connection settings."""
    pool = client.connection_pool
    cls = (_SYNC_TO_ASYNC if to_async else _ASYNC_TO_SYNC).get(pool.connection_class)
    if cls is None:
        given, wanted = ("client", "async_client") if to_async else ("async_client", "client")
        raise TypeError(
            f"cannot derive a client from {pool.connection_class.__name__}; "
            f"pass {wanted}= as well as {given}="
        )
    accepted = set(inspect.signature(cls.__init__).parameters)
    skip = {"retry", "connection_pool", "redis_connect_func", "event_dispatcher"}
    kw = {k: v for k, v in pool.connection_kwargs.items() if k in accepted and k not in skip}
    if to_async:
        return redis.asyncio.Redis(
            connection_pool=redis.asyncio.ConnectionPool(connection_class=cls, **kw)
        )
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=cls, **kw))


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    # The hub reads RESP2 pub/sub frames as bytes and does its own health checks; it names
    # its connections itself (CLIENT SETNAME as the first command).
    kw = resp2_kwargs(kwargs)
    kw.update(health_check_interval=0, decode_responses=False, client_name=None)
    return kw


def _check_cluster_version(client: Any) -> None:
    """UnsupportedServer if a primary runs Redis < 7.0; skipped where INFO is denied or
    the cluster cannot answer yet (the first command then reports that)."""
    try:
        infos = client.info("server", target_nodes=redis.cluster.RedisCluster.PRIMARIES)
    except redis.exceptions.RedisError:
        return
    found = infos.values() if isinstance(infos, dict) and "redis_version" not in infos else [infos]
    for info in found:
        version = str(info.get("redis_version", "")) if isinstance(info, dict) else ""
        major = version.split(".")[0]
        if major.isdigit() and int(major) < 7:
            raise UnsupportedServer(
                f"dedupe needs Redis 7.0 or later on a Cluster (sharded pub/sub); a primary "
                f"runs Redis {version}"
            )
