"""The Redis side of one SingleFlight: clients, the hub, the renewer, the in-process tables.

Everything here is created lazily on first use and created anew in a forked child, so a
pre-forking server can import and configure dedupe before it forks.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.connection as aconn
import redis.asyncio.retry
import redis.cluster
import redis.connection as sconn
from redis.backoff import ExponentialBackoff
from redis.exceptions import ClusterError, NoScriptError, TryAgainError
from redis.retry import Retry

from .commands import ScriptCall, renew_call
from .envelope import Codec
from .hub import Connection, Hub, Router, SingleRouter
from .inflight import InFlight
from .kept import LocalCopies
from .renewal import Renewer
from .topology import (
    ClusterRouter,
    cluster_twin,
    kind_of_clients,
    parse_url,
    sentinel_twin,
)

__all__ = ["Backend", "BackendConfig"]

log = logging.getLogger("dedupe")

_live: weakref.WeakSet[Backend] = weakref.WeakSet()
# While Redis is down under on_backend_error="local", calls skip it for this long, so an
# unreachable server costs one connect timeout per pause, not one per call.
_OUTAGE_PAUSE = 1.0

SyncClient: TypeAlias = "redis.Redis | redis.cluster.RedisCluster"
AsyncClient: TypeAlias = "redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster"


@dataclass(frozen=True, slots=True)
class BackendConfig:
    url: str
    client: SyncClient | None
    async_client: AsyncClient | None
    connect_timeout: float
    socket_timeout: float
    health_check_interval: float
    codec: Codec
    on_backend_error: str = "raise"
    local_cache: bool = False


def _client_options(cfg: BackendConfig, retry_cls: type[Any]) -> dict[str, Any]:
    # Bounded everywhere: a dead Redis must surface as BackendUnavailable, never as a hang.
    return {
        "socket_connect_timeout": cfg.connect_timeout,
        "socket_timeout": cfg.socket_timeout,
        "retry": retry_cls(ExponentialBackoff(cap=0.1, base=0.01), 1),
        "health_check_interval": cfg.health_check_interval,
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
    # The hub reads RESP2 pub/sub frames as bytes and does its own health checks;
    # redis-py's maintenance notifications need RESP3, so they stay off its connections.
    kw = {k: v for k, v in kwargs.items() if not k.startswith("maint_notif")}
    kw.update(protocol=2, health_check_interval=0, decode_responses=False)
    return kw


class Backend:
    """Lazily built Redis plumbing shared by every function of one SingleFlight."""

    def __init__(self, cfg: BackendConfig) -> None:
        self.cfg = cfg
        self.codec = cfg.codec
        if cfg.client is not None or cfg.async_client is not None:
            self.target = None
            self.kind = kind_of_clients(cfg.client, cfg.async_client)
        else:
            self.target = parse_url(cfg.url)
            self.kind = self.target.kind
        # Sharded pub/sub keeps a job's messages on the node that owns its slot.
        self.publish = "SPUBLISH" if self.kind == "cluster" else "PUBLISH"
        self._init_process_state()
        _live.add(self)

    def _init_process_state(self) -> None:
        self._lock = threading.RLock()
        self._sync: SyncClient | None = self.cfg.client
        self._async_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncClient] = (
            weakref.WeakKeyDictionary()
        )
        self._hub: Hub | None = None
        self._renewer: Renewer | None = None
        self.sync_flights = InFlight()
        self.async_flights = InFlight()
        self.local_copies = LocalCopies() if self.cfg.local_cache else None
        self._owner_base = uuid.uuid4().hex[:16]
        self._owner_seq = itertools.count(1)
        self._down_until = 0.0
        self._in_outage = False
        self.local_runs = 0

    # --- outages (on_backend_error="local") ---------------------------------------------------

    def skip_redis(self) -> bool:
        """True while a recent outage says not to try Redis yet (local mode only)."""
        return self._in_outage and time.monotonic() < self._down_until

    def fall_back(self, exc: Exception) -> bool:
        """Redis failed: True if the policy is to run locally instead of raising."""
        if self.cfg.on_backend_error != "local":
            return False
        with self._lock:
            self._down_until = time.monotonic() + _OUTAGE_PAUSE
            if not self._in_outage:
                self._in_outage = True
                log.warning(
                    "dedupe: Redis is unavailable (%s); running flights with in-process "
                    "deduplication only until it answers again",
                    exc,
                )
        return True

    def ran_locally(self) -> None:
        self.local_runs += 1

    def answered(self) -> None:
        """A flight went through Redis: any outage is over."""
        if self._in_outage:
            with self._lock:
                if self._in_outage:
                    self._in_outage = False
                    log.warning("dedupe: Redis answers again; flights are distributed again")

    def stats(self) -> dict[str, int]:
        return {
            "rejected_envelopes": self.codec.rejected,
            "hub_reconnects": self._hub.reconnects if self._hub else 0,
            "leases_lost": self._renewer.lost if self._renewer else 0,
            "local_runs": self.local_runs,
            "flights_in_process": len(self.sync_flights) + len(self.async_flights),
            "local_copies": len(self.local_copies) if self.local_copies is not None else 0,
        }

    def after_fork(self) -> None:
        # The parent's threads are gone and its sockets are not ours to use or close.
        self._init_process_state()

    # --- clients ------------------------------------------------------------------------------

    def sync_client(self) -> SyncClient:
        client = self._sync
        if client is None:
            with self._lock:
                if self._sync is None:
                    self._sync = self._build_client(to_async=False)
                client = self._sync
        return client

    def async_client(self) -> AsyncClient:
        if self.cfg.async_client is not None:
            return self.cfg.async_client
        loop = asyncio.get_running_loop()
        client = self._async_by_loop.get(loop)
        if client is None:
            # Clients of closed loops cannot be used again (their sockets belong to the loop).
            for old in [lp for lp in list(self._async_by_loop) if lp.is_closed()]:
                self._async_by_loop.pop(old, None)
            # redis.asyncio connections belong to one loop; keep one client per loop.
            client = self._async_by_loop[loop] = self._build_client(to_async=True)
        return client

    def _build_client(self, *, to_async: bool) -> Any:
        """A client from the URL, or the twin of the client of the other kind we were given."""
        opts = _client_options(self.cfg, redis.asyncio.retry.Retry if to_async else Retry)
        if self.target is not None:
            return self.target.client(opts, to_async=to_async)
        given = self.cfg.client if to_async else self.cfg.async_client
        if self.kind == "cluster":
            return cluster_twin(given, opts, to_async=to_async)
        if self.kind == "sentinel":
            return sentinel_twin(given, opts, to_async=to_async)
        return _twin(given, to_async=to_async)

    # --- shared machinery ---------------------------------------------------------------------

    def hub(self) -> Hub:
        hub = self._hub
        if hub is None:
            with self._lock:
                if self._hub is None:
                    self._hub = Hub(
                        self._router(),
                        sharded=self.kind == "cluster",
                        health_interval=self.cfg.health_check_interval,
                    )
                hub = self._hub
        return hub

    def _router(self) -> Router:
        client: Any = self.sync_client()
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

    def renewer(self) -> Renewer:
        renewer = self._renewer
        if renewer is None:
            with self._lock:
                if self._renewer is None:
                    self._renewer = Renewer(self._renew)
                renewer = self._renewer
        return renewer

    def _renew(self, lock_key: str, lock_value: str, ttl_ms: int) -> int:
        call = renew_call(lock_key, lock_value, ttl_ms)
        return int(run_script(self.sync_client(), call, self.kind == "cluster"))

    def owner(self) -> str:
        return f"{self._owner_base}.{next(self._owner_seq)}"

    @property
    def confirm_timeout(self) -> float:
        """How long a follower waits for the server to confirm its subscription."""
        return self.cfg.connect_timeout + self.cfg.socket_timeout

    def close(self) -> None:
        with self._lock:
            hub, self._hub = self._hub, None
            renewer, self._renewer = self._renewer, None
        if hub is not None:
            hub.close()
        if renewer is not None:
            renewer.close()
        if self.cfg.client is None and self._sync is not None:
            self._sync.close()
            self._sync = None


# While a Cluster slot migrates, a multi-key script may meet TRYAGAIN until it is done. Every
# script is safe to re-send (acquire recognises its own lease; the rest compare, then act).
_MIGRATION_PATIENCE = 5.0
_RETRY_IN_MIGRATION = (TryAgainError, ClusterError)


def _once(client: Any, call: ScriptCall) -> Any:
    try:
        return client.evalsha(*call.evalsha_args())
    except NoScriptError:
        return client.eval(*call.eval_args())


def _migration_pauses() -> Iterator[float]:
    """How long to pause before each re-send after TRYAGAIN; ends when patience runs out."""
    deadline, delay = time.monotonic() + _MIGRATION_PATIENCE, 0.02
    while time.monotonic() + delay <= deadline:
        yield delay
        delay = min(0.2, delay * 2)


def run_script(client: SyncClient, call: ScriptCall, cluster: bool = False) -> Any:
    if not cluster:
        return _once(client, call)
    for pause in _migration_pauses():
        try:
            return _once(client, call)
        except _RETRY_IN_MIGRATION:
            time.sleep(pause)
    return _once(client, call)


async def _once_async(client: Any, call: ScriptCall) -> Any:
    try:
        return await client.evalsha(*call.evalsha_args())
    except NoScriptError:
        return await client.eval(*call.eval_args())


async def run_script_async(client: AsyncClient, call: ScriptCall, cluster: bool = False) -> Any:
    if not cluster:
        return await _once_async(client, call)
    for pause in _migration_pauses():
        try:
            return await _once_async(client, call)
        except _RETRY_IN_MIGRATION:
            await asyncio.sleep(pause)
    return await _once_async(client, call)


def wait_replicas(client: SyncClient, lock_key: str, replicas: int, timeout_ms: int) -> int:
    c: Any = client  # redis-py leaves execute_command untyped
    if isinstance(client, redis.cluster.RedisCluster):
        node = c.get_node_from_key(lock_key)
        return int(c.execute_command("WAIT", replicas, timeout_ms, target_nodes=node))
    return int(c.execute_command("WAIT", replicas, timeout_ms))


async def wait_replicas_async(
    client: AsyncClient, lock_key: str, replicas: int, timeout_ms: int
) -> int:
    c: Any = client
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        node = c.get_node_from_key(lock_key)
        return int(await c.execute_command("WAIT", replicas, timeout_ms, target_nodes=node))
    return int(await c.execute_command("WAIT", replicas, timeout_ms))


def _after_fork_in_child() -> None:
    for backend in list(_live):
        backend.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
