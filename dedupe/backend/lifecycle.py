"""The Redis side of one SingleFlight: clients, the hub, the renewer, the in-process tables.

Everything here is created lazily on first use and created anew in a forked child, so a
pre-forking server can import and configure dedupe before it forks.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
import logging
import os
import queue
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.connection as aconn
import redis.asyncio.retry
import redis.cluster
import redis.connection as sconn
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ClusterError, NoScriptError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from dedupe.backend.commands import ScriptCall, Stamp, complete_call, peek_call
from dedupe.backend.hub import Connection, Hub, Router, SingleRouter
from dedupe.backend.renewal import Renewer, renew_many
from dedupe.backend.slots import AsyncSlots
from dedupe.backend.topology import (
    ClusterRouter,
    cluster_twin,
    kind_of_clients,
    parse_url,
    sentinel_twin,
)
from dedupe.backend.wire import AsyncWire, SyncWire, wire_ready
from dedupe.core.inflight import InFlight, InFlightInfo
from dedupe.core.local_copies import LocalCopies
from dedupe.core.protocol import Complete, FlightSpec
from dedupe.core.record import NOTICE_ABORTED, parse_lock
from dedupe.core.sealing import Codec
from dedupe.errors import BackendUnavailable, UnsupportedServer, WaitTimeout
from dedupe.ops.inspector import OwnerIds
from dedupe.settings import AsyncClient, Settings, SyncClient

__all__ = ["Backend", "BackendConfig"]

log = logging.getLogger(__name__)

_live: weakref.WeakSet[Backend] = weakref.WeakSet()
# While Redis is down under on_backend_error="local", calls skip it for this long, so an
# unreachable server costs one connect timeout per pause, not one per call.
_OUTAGE_PAUSE = 1.0
# Commands in flight at once per client (per event loop for asyncio). More callers queue
# for a slot instead of failing with "Too many connections"; pools are sized above it.
_SLOTS = 64
_POOL_SIZE = _SLOTS + 16
# Giving back leases of unanswered acquires: pause between tries; the thread ends when idle.
_RELEASE_PAUSE = 0.2
_RELEASE_IDLE = 5.0

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendConfig(Settings):
    """The settings as the backend reads them: every setting, the URL resolved and the codec
    built (api.SingleFlight._new_backend)."""

    url: str  # the url setting, else DEDUPE_REDIS_URL, else the default
    codec: Codec
    queue_timeout: float = 20.0  # longest wait for a free command slot

    @classmethod
    def of(cls, s: Settings, *, url: str, codec: Codec) -> BackendConfig:
        given = {f.name: getattr(s, f.name) for f in fields(Settings)}
        return cls(**{**given, "url": url}, codec=codec)

    @property
    def name(self) -> str:
        """CLIENT SETNAME prefix of our connections: the prefix."""
        return self.prefix


def _client_name(cfg: BackendConfig, role: str) -> str:
    """CLIENT SETNAME of our connections: an operator sees whose they are in CLIENT LIST."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())
    return f"{cfg.name}:{role}:{host}:{os.getpid()}"


def _client_options(cfg: BackendConfig, retry_cls: type[Any]) -> dict[str, Any]:
    # Bounded everywhere: a dead Redis must surface as BackendUnavailable, never as a hang.
    # One retry, and only for a connection that failed (a stale pooled socket after a
    # restart), never after a timeout: a command takes at most connect_timeout +
    # socket_timeout, the documented bound.
    return {
        "socket_connect_timeout": cfg.connect_timeout,
        "socket_timeout": cfg.socket_timeout,
        "retry": retry_cls(
            ExponentialBackoff(cap=0.1, base=0.01), 1, supported_errors=(RedisConnectionError,)
        ),
        "max_connections": _POOL_SIZE,
        "client_name": _client_name(cfg, "cmd"),
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
    # The hub names its connections itself (CLIENT SETNAME as the first command).
    kw.update(protocol=2, health_check_interval=0, decode_responses=False, client_name=None)
    return kw


def _redact(url: str) -> str:
    """The URL without its password, for logs."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


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
        where = "the clients given" if self.target is None else _redact(cfg.url)
        log.info(
            "prefix %r on %s (%s); %s; on_backend_error=%s",
            cfg.name,
            where,
            self.kind,
            self.codec.mode,
            cfg.on_backend_error,
        )

    def _init_process_state(self) -> None:
        self._lock = threading.RLock()
        # Fields below are set once under _lock (double-checked) and read without it.
        self._sync: SyncClient | None = self.cfg.client
        # Cluster needs sharded pub/sub (7.0): checked once, before the first lease.
        self._supported = self.kind != "cluster"
        # Per event loop: its client (redis.asyncio connections belong to one loop), its
        # command slots and its table of flights. Guarded by _lock.
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )
        self._hub: Hub | None = None
        self._renewer: Renewer | None = None
        self._renewal: SyncClient | None = None  # built by the first renewal, on its thread
        self.sync_flights = InFlight()
        # How scripts reach Redis: set once under _lock (double-checked), read without it.
        self._sync_route: _Route | None = None
        # The command slots: a semaphore in C (threading's is Python over a Condition, ~80
        # bytecodes a take).
        self._sync_slots: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(_SLOTS):
            self._sync_slots.put(None)
        # The route's own connections not in use, last used on top, so that there are only
        # as many as commands ever ran at once (at most _SLOTS). No lock: list.pop() and
        # append() are atomic.
        self._sync_idle: list[Any] = []
        self._active = 0  # flights running on this backend (guarded by _lock)
        self._idle = threading.Condition(self._lock)  # notified when _active drops to 0
        self._retired = False  # configure() replaced us: close when the last flight ends
        self._closing = 0  # close() calls waiting for _active to drop to 0 (guarded by _lock)
        self.local_copies = (
            LocalCopies(max_bytes=self.cfg.local_cache_max_bytes) if self.cfg.local_cache else None
        )
        self._owner_ids = OwnerIds()  # "<host>/<pid>/<start-ms>/<instance>.<seq>"
        self._down_until = 0.0
        self._in_outage = False
        self.local_runs = 0
        # Blocking work of asyncio callers (Cluster scripts, min_replicas_ack): made once
        # under _lock, read without it.
        self._threads: ThreadPoolExecutor | None = None
        # Leases to give back (release_later): (next look, seq, spec, until, next pause), a
        # heap; and their thread: all under _lock.
        self._releases: list[tuple[float, int, FlightSpec, float, float]] = []
        self._release_seq = itertools.count()
        self._release_wanted = threading.Condition(self._lock)
        self._releaser: threading.Thread | None = None
        self._release_stop = False

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
                    "Redis is unavailable (%s); running flights with in-process "
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
                    log.warning("Redis answers again; flights are distributed again")

    def stats(self) -> dict[str, int]:
        return {
            "rejected_envelopes": self.codec.rejected,
            "hub_reconnects": self._hub.reconnects if self._hub else 0,
            "leases_lost": self._renewer.lost if self._renewer else 0,
            "local_runs": self.local_runs,
            "flights_in_process": len(self.sync_flights)
            + sum(len(state.flights) for state in list(self._per_loop.values())),
            "local_copies": len(self.local_copies) if self.local_copies is not None else 0,
            **{
                f"lease_{k}": v for k, v in (self._renewer.stats() if self._renewer else {}).items()
            },
        }

    def inflight(self) -> list[InFlightInfo]:
        flights = self.sync_flights.snapshot("sync")
        for state in list(self._per_loop.values()):
            flights.extend(state.flights.snapshot("async"))
        return flights

    def after_fork(self) -> None:
        # The parent's threads are gone and its sockets are not ours to use or close.
        self._init_process_state()

    # --- flights running on this backend ------------------------------------------------------

    @contextmanager
    def flight(self) -> Iterator[None]:
        """Count a running flight, so that close() and configure() can wait for it."""
        self.begin_flight()
        try:
            yield
        finally:
            self.end_flight()

    def begin_flight(self) -> None:
        """flight() without a context manager (the per-call path): end_flight() after."""
        with self._lock:
            self._active += 1

    def end_flight(self) -> None:
        with self._lock:
            self._active -= 1
            idle = self._active == 0
            if idle and self._closing:
                self._idle.notify_all()  # only close() waits on it
        if idle and self._retired:
            self.close(timeout=0)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """One of the client's command slots: past _SLOTS concurrent commands, callers queue."""
        self._take_sync_slot()
        try:
            yield
        finally:
            self._sync_slots.put(None)

    def _take_sync_slot(self, deadline: float | None = None) -> None:
        """Wait for a command slot, at most queue_timeout, and not past ``deadline`` (a
        caller's wait_timeout, on time.monotonic: then WaitTimeout)."""
        timeout = self.cfg.queue_timeout
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - time.monotonic()))
        try:
            self._sync_slots.get(timeout=timeout)
        except queue.Empty:
            if timeout < self.cfg.queue_timeout:
                raise WaitTimeout("waited the wait_timeout for a command slot") from None
            raise BackendUnavailable(
                f"all {_SLOTS} Redis command slots of this process stayed busy for "
                f"{self.cfg.queue_timeout:g} s"
            ) from None

    def run_sync_script(
        self, call: ScriptCall, stamp: Stamp | None = None, deadline: float | None = None
    ) -> Any:
        """Run one script over the sync client, in a command slot (the per-call path: no
        context managers). ``stamp`` learns when its request was written; ``deadline``
        bounds the wait for a slot (a caller's wait_timeout, before it holds any lease)."""
        route = self._sync_route or self._make_sync_route()
        self._take_sync_slot(deadline)
        try:
            wire = route.wire
            if route.own:
                idle = self._sync_idle
                try:
                    conn = idle.pop()
                except IndexError:
                    conn = wire.new_connection()  # type: ignore[union-attr]
                try:
                    return wire.run_on(conn, call, stamp)  # type: ignore[union-attr]
                finally:
                    idle.append(conn)
            if wire is not None:
                return wire.run(call, stamp)
            return run_script(route.client, call, self.kind == "cluster", stamp)
        finally:
            self._sync_slots.put(None)

    async def run_async_script(self, call: ScriptCall, stamp: Stamp | None = None) -> Any:
        """Run one script over the running loop's client, in one of its command slots."""
        state = self._loop_state()
        slots = state.slots
        await slots.take(self.cfg.queue_timeout)
        try:
            if self.kind == "cluster":
                # redis.asyncio's RedisCluster drops connections other tasks are using when
                # one command fails (it re-discovers the topology), and under concurrency we
                # saw it hand out a connection mid-handshake: Cluster scripts go through the
                # thread-safe sync client, on threads of our own (one per command slot), and
                # only once this loop's slot is ours: callers queue here, in order and
                # bounded, not in an executor's queue.
                return await self.in_thread(self.run_sync_script, call, stamp)
            route = state.route or self._make_async_route(state)
            wire = route.wire
            if route.own:
                idle = state.idle
                conn = idle.pop() if idle else wire.new_connection()  # type: ignore[union-attr]
                try:
                    return await wire.run_on(conn, call, stamp)  # type: ignore[union-attr]
                finally:
                    idle.append(conn)
            if wire is not None:
                return await _connect_retried(wire.run, call, stamp)
            return await run_script_async(route.client, call, stamp)
        finally:
            slots.release()

    def in_thread(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Run blocking ``fn(*args)`` on one of this backend's threads (at most one per
        command slot), for asyncio callers; the loop's default executor is not ours to fill."""
        pool = self._threads
        if pool is None:
            with self._lock:
                if self._threads is None:
                    self._threads = ThreadPoolExecutor(_SLOTS, thread_name_prefix="dedupe-io")
                pool = self._threads
        return asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    # --- giving back a lease an unanswered acquire may have granted ---------------------------

    def release_later(self, spec: FlightSpec, sent: float) -> None:
        """Give back the lease an acquire sent at ``sent`` may have granted to ``spec.owner``,
        on a thread of ours: owner-checked, best effort, never delaying the caller.

        The acquire may still be on its way (a slow link delivers it after our look), so we
        look again, at growing intervals, for as long as such a lease could be alive
        (``lock_ttl`` after its send): a handful of cheap reads, and a lease granted late is
        given back at the next look rather than left for the waiters to wait out."""
        with self._lock:
            until = sent + spec.lock_ttl_ms / 1000
            heapq.heappush(self._releases, (time.monotonic(), next(self._release_seq), spec,
                                            until, _RELEASE_PAUSE))  # fmt: skip
            if self._releaser is None or not self._releaser.is_alive():
                self._releaser = threading.Thread(
                    target=self._release_loop, name="dedupe-release", daemon=True
                )
                self._releaser.start()
            self._release_wanted.notify()

    def _release_loop(self) -> None:
        while True:
            with self._lock:
                while not self._release_stop:
                    if not self._releases:
                        if not self._release_wanted.wait(_RELEASE_IDLE) and not self._releases:
                            self._releaser = None  # idle: end; the next release starts one
                            return
                        continue
                    due = self._releases[0][0] - time.monotonic()
                    if due <= 0:
                        break
                    self._release_wanted.wait(due)
                if self._release_stop:
                    return
                _, _, spec, until, delay = heapq.heappop(self._releases)
            self._release_one(spec)
            now = time.monotonic()
            if now < until:  # look again while such a lease could still be alive, last at until
                with self._lock:
                    heapq.heappush(self._releases, (min(now + delay, until),
                                                    next(self._release_seq), spec, until,
                                                    delay * 2))  # fmt: skip

    def _release_one(self, spec: FlightSpec) -> None:
        """One look: if the lock is ours, complete with an abort notice (owner-checked)."""
        try:
            raw = self.run_sync_script(peek_call(spec))
            value = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
            holder = parse_lock(value)
            if holder is None or holder.owner != spec.owner:
                return  # not ours (or gone)
            token = holder.token
            notice = self.codec.notice(NOTICE_ABORTED, channel=spec.names.channel, token=token)
            cmd = Complete(value, b"", 0, notice, token)
            self.run_sync_script(complete_call(spec, cmd, self.publish))
            log.info("gave back lease %d on %r after its acquire went unanswered", token,
                     spec.names.job_id)  # fmt: skip
        except Exception as exc:
            log.debug("could not give back a lease on %r yet: %s", spec.names.job_id, exc)

    def _make_sync_route(self) -> _Route:
        client = self.sync_client()
        with self._lock:
            if self._sync_route is None:
                self._sync_route = _route(
                    client, self.kind, self.cfg.client is None, False, self.command_bound
                )
            return self._sync_route

    def _make_async_route(self, state: _LoopState) -> _Route:
        # The loop's own state: only this loop reads or writes it.
        state.route = _route(
            self.async_client(), self.kind, self.cfg.async_client is None, True, self.command_bound
        )
        return state.route

    def async_flights(self) -> InFlight:
        """The running loop's table of flights."""
        return self._loop_state().flights

    # --- clients ------------------------------------------------------------------------------

    def sync_client(self) -> SyncClient:
        client = self._sync
        if client is None or not self._supported:
            with self._lock:
                if self._sync is None:
                    self._sync = self._build_client(to_async=False)
                client = self._sync
                if not self._supported:
                    _check_cluster_version(client)
                    self._supported = True
        return client

    def async_client(self) -> AsyncClient:
        state = self._loop_state()
        client = state.client
        if client is None:
            client = state.client = self.cfg.async_client or self._build_client(to_async=True)
        return client

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._per_loop.get(loop)
        if state is None:
            with self._lock:
                state = self._per_loop.get(loop)
                if state is None:
                    # What belonged to closed loops cannot be used again: drop it.
                    for old in [lp for lp in list(self._per_loop) if lp.is_closed()]:
                        self._per_loop.pop(old, None)
                    state = self._per_loop[loop] = _LoopState(self.cfg.queue_timeout)
        return state

    async def aclose_loop_client(self) -> None:
        """Close the running loop's client (redis.asyncio clients must be closed on their loop)."""
        loop = asyncio.get_running_loop()
        state = self._per_loop.get(loop)
        if state is None:
            return
        idle, state.idle = state.idle, []
        state.route = None
        for conn in idle:
            await conn.disconnect()
        if state.client is not None and self.cfg.async_client is None:
            client, state.client = state.client, None
            await client.aclose()

    def _build_client(self, *, to_async: bool) -> Any:
        """A client from the URL, or the twin of the client of the other kind we were given."""
        opts = _client_options(self.cfg, redis.asyncio.retry.Retry if to_async else Retry)
        if self.kind == "cluster":
            opts.pop("max_connections")  # per node, and the cluster clients size their own
            # A cluster client retries by re-discovering the topology, which drops every
            # connection of its nodes, in use or not: with a retry policy of ours, one failed
            # command under concurrency cut others off mid-command (seen with redis.asyncio).
            # Its own policy (a few retries with backoff) stays.
            opts.pop("retry")
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
                    # The router is built on a hub thread (on Cluster that is network I/O):
                    # making the hub costs the caller, or its event loop, nothing.
                    self._hub = Hub(
                        self._router,
                        sharded=self.kind == "cluster",
                        health_interval=self.cfg.health_check_interval,
                        name=_client_name(self.cfg, "hub"),
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
                    self._renewer = Renewer(self._renew_batch, self._renewal_group)
                renewer = self._renewer
        return renewer

    def _renew_batch(self, items: list[tuple[str, str, int]]) -> list[int]:
        # Runs on a renewal worker thread: one round trip per server for the whole batch.
        return renew_many(self._renewal_client(), items)

    def _renewal_group(self, lock_key: str) -> str:
        # Called by the renewal scheduler: no network I/O. One group per Cluster node.
        client: Any = self._renewal
        if client is None or self.kind != "cluster":
            return ""
        return str(client.get_node_from_key(lock_key).name)

    def _renewal_client(self) -> SyncClient:
        client = self._renewal
        if client is None:
            with self._lock:
                if self._renewal is None:
                    self._renewal = self._build_renewal_client()
                client = self._renewal
        return client

    def _build_renewal_client(self) -> Any:
        """A sync client of our own for renewals: no retries, and timeouts of at most a
        quarter of the lease, so each batch round trip ends well inside lock_ttl/3."""
        bound = self.cfg.lock_ttl / 4
        opts: dict[str, Any] = {
            "socket_connect_timeout": min(self.cfg.connect_timeout, bound),
            "socket_timeout": min(self.cfg.socket_timeout, bound),
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
            "client_name": _client_name(self.cfg, "renew"),
        }
        if self.target is not None:
            return self.target.client(opts, to_async=False)
        given: Any = self.cfg.client if self.cfg.client is not None else self.cfg.async_client
        if self.kind == "cluster":
            return cluster_twin(given, opts, to_async=False)
        if self.kind == "sentinel":
            return sentinel_twin(given, opts, to_async=False)
        pool = given.connection_pool
        cls = _ASYNC_TO_SYNC.get(pool.connection_class, pool.connection_class)
        accepted = set(inspect.signature(cls.__init__).parameters)
        skip = {"retry", "connection_pool", "redis_connect_func", "event_dispatcher"}
        kw = {k: v for k, v in pool.connection_kwargs.items() if k in accepted and k not in skip}
        kw.update({k: v for k, v in opts.items() if k in accepted})
        return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=cls, **kw))

    def owner(self) -> str:
        return self._owner_ids()

    @property
    def command_bound(self) -> float:
        """The longest one command takes on connections dedupe built (a retry included)."""
        return self.cfg.connect_timeout + self.cfg.socket_timeout

    @property
    def confirm_timeout(self) -> float:
        """How long a follower waits for the server to confirm its subscription."""
        return self.cfg.connect_timeout + self.cfg.socket_timeout

    def close(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` (None: a lease's length) for running flights, then stop the
        hub and the renewer and close the clients built here. Leases still held by then stop
        being renewed: their leaders learn it from their Flight, and a waiter takes over."""
        wait = self.cfg.lock_ttl if timeout is None else timeout
        with self._lock:
            if wait > 0 and self._active:
                end = time.monotonic() + wait
                self._closing += 1
                try:
                    while self._active and time.monotonic() < end:
                        self._idle.wait(end - time.monotonic())
                finally:
                    self._closing -= 1
            if self._active:
                log.warning(
                    "closing with %d flights still running; their leases stop being renewed",
                    self._active,
                )
            hub, self._hub = self._hub, None
            renewer, self._renewer = self._renewer, None
            renewal, self._renewal = self._renewal, None
            sync, self._sync = self._sync, self.cfg.client
            self._sync_route = None
            threads, self._threads = self._threads, None
            self._release_stop = True
            self._release_wanted.notify_all()
            # Connections in use now go back to the old list and close when collected.
            own, self._sync_idle = self._sync_idle, []
            # asyncio clients belong to their loops: aclose() closes the running loop's.
            self._per_loop.clear()
        if threads is not None:
            threads.shutdown(wait=False)
        if hub is not None:
            hub.close()
        if renewer is not None:
            renewer.close()
        if renewal is not None:
            renewal.close()
        for conn in own:
            conn.disconnect()
        if self.cfg.client is None and sync is not None:
            sync.close()

    def retire(self) -> None:
        """configure() replaced this backend: flights already running finish on it (leases
        renewed), and it closes itself when the last one ends."""
        with self._lock:
            self._retired = True
            idle = self._active == 0
        if idle:
            self.close(timeout=0)


class _LoopState:
    """What a backend keeps per asyncio event loop (used on that loop only: no lock)."""

    __slots__ = ("client", "flights", "idle", "route", "slots")

    def __init__(self, queue_timeout: float) -> None:
        self.client: AsyncClient | None = None
        self.route: _Route | None = None
        self.slots = AsyncSlots(_SLOTS, _loop_slots_busy(queue_timeout))
        self.idle: list[Any] = []  # the route's own connections not in use (at most _SLOTS)
        self.flights = InFlight()


def _loop_slots_busy(timeout: float) -> Callable[[], Exception]:
    def error() -> Exception:
        return BackendUnavailable(
            f"all {_SLOTS} Redis command slots of this event loop stayed busy for {timeout:g} s"
        )

    return error


class _Route:
    """How scripts reach Redis from one client: over the wire on connections of our own
    (``own``: a client built here), over the wire through the client's pool (a client
    passed in, Sentinel), or through the client's command layer (Cluster)."""

    __slots__ = ("client", "own", "wire")

    def __init__(self, client: Any, wire: SyncWire | AsyncWire | None, own: bool) -> None:
        self.client = client
        self.wire = wire
        self.own = own


def _route(client: Any, kind: str, built_here: bool, is_async: bool, bound: float) -> _Route:
    """``bound``: the longest one command may take on connections of our own, retry included."""
    if kind == "cluster" or not wire_ready(client):
        return _Route(client, None, False)
    own = built_here and kind == "standalone"
    wire_bound = bound if own else None  # a client passed in keeps its own retry policy
    wire = AsyncWire(client, wire_bound) if is_async else SyncWire(client, wire_bound)
    return _Route(client, wire, own)


async def _connect_retried(run: Any, *args: Any) -> Any:
    """A connect that timed out never reached Redis, and on a loop busy starting thousands
    of tasks its timer fires before the loop looks at the socket: one more try, on a loop
    that has caught up. Read timeouts are never retried."""
    try:
        return await run(*args)
    except RedisTimeoutError as exc:
        if not _connect_timed_out(exc):
            raise
    return await run(*args)


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


def run_script(
    client: SyncClient, call: ScriptCall, cluster: bool = False, stamp: Stamp | None = None
) -> Any:
    """One script through the client's command layer (Cluster, or a client the wire cannot
    carry); ``stamp`` is set before each send (it then includes the client's own connect)."""
    if not cluster:
        if stamp is not None:
            stamp.sent = time.monotonic()
        return _once(client, call)
    for pause in _migration_pauses():
        try:
            if stamp is not None:
                stamp.sent = time.monotonic()
            return _once(client, call)
        except _RETRY_IN_MIGRATION:
            time.sleep(pause)
    if stamp is not None:
        stamp.sent = time.monotonic()
    return _once(client, call)


async def _once_async(client: Any, call: ScriptCall) -> Any:
    try:
        return await client.evalsha(*call.evalsha_args())
    except NoScriptError:
        return await client.eval(*call.eval_args())


def _connect_timed_out(exc: BaseException) -> bool:
    return isinstance(exc, RedisTimeoutError) and str(exc).startswith("Timeout connecting")


async def run_script_async(client: AsyncClient, call: ScriptCall, stamp: Stamp | None) -> Any:
    """One script through an asyncio client's command layer (one the wire cannot carry)."""
    if stamp is not None:
        stamp.sent = time.monotonic()
    try:
        return await _once_async(client, call)
    except RedisTimeoutError as exc:
        # A connect that timed out never reached Redis, and on a loop busy starting
        # thousands of tasks its timer fires before the loop looks at the socket: one
        # more try, on a loop that has caught up. Read timeouts are never retried.
        if not _connect_timed_out(exc):
            raise
    if stamp is not None:
        stamp.sent = time.monotonic()
    return await _once_async(client, call)


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


def acquire_and_wait(
    backend: Backend, client: SyncClient, call: ScriptCall, spec: Any, stamp: Stamp
) -> tuple[Any, int]:
    """The acquire script and WAIT on ONE connection: WAIT vouches only for the writes of
    the connection it runs on (min_replicas_ack)."""
    c: Any = client
    if isinstance(client, redis.cluster.RedisCluster):
        c = c.get_redis_connection(c.get_node_from_key(spec.names.lock))
    with backend.slot():
        stamp.sent = time.monotonic()
        pipe = c.pipeline(transaction=False)
        pipe.eval(*call.eval_args())
        pipe.execute_command("WAIT", spec.min_replicas, spec.replica_timeout_ms)
        raw, acked = pipe.execute()
    return raw, int(acked)


def _after_fork_in_child() -> None:
    for backend in list(_live):
        backend.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
