"""The Backend of one SingleFlight: its clients, transport, hub and renewer, and their life.

Everything is created lazily on first use and anew in a forked child, so a pre-forking server
can import and configure dedupe before it forks. The backend also keeps what belongs to the
process and no single flight: the tables of flights in progress (one for threads, one per
event loop), the local copies, the owner ids of its leases, whether Redis is in an outage
(``on_backend_error="local"``), the leases to give back, and how many flights run (so that
``close()`` and ``configure()`` can wait for them).

Locks (one paragraph for the whole package; each module states its own fields):
``Backend._lock`` guards the flight count, the close/retire state, the outage state and the
give-back queue; it is never held across network I/O, and it is taken before any other lock
of dedupe but never while one is held. Beneath it, and never held together: the clients'
and transport's own locks (``Clients._lock``, ``Transport._lock``, each ``Once``'s), the
hub's (``Hub._lock``, then the leaf locks of Latch, Mailbox and ``ClusterRouter``), the
renewer's (``Renewer._lock``, then ``leases._guard``), a flight table's (``InFlight._lock``,
then the Latch of an entry), the local copies', the codec's and a memory:// store's (then the
Mailbox and Latch locks of a delivery): all leaves, or taken in that order. No lock is held
across network I/O: a client's first build (a Cluster's discovery, its version check) runs
with none held, so a slow discovery stalls only callers that need that very client.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, fields
from typing import Any

from dedupe.backend.clients import Clients, Once, client_name, redact
from dedupe.backend.commands import complete_call, peek_call
from dedupe.backend.hub import Hub
from dedupe.backend.memory import MemoryHub, store_for
from dedupe.backend.renewal import Renewer, renew_many
from dedupe.backend.topology import Target, kind_of_clients, parse_url
from dedupe.backend.transport import Transport
from dedupe.core.inflight import InFlight, InFlightInfo
from dedupe.core.local_copies import LocalCopies
from dedupe.core.owners import OwnerIds
from dedupe.core.protocol import Complete, FlightSpec
from dedupe.core.record import NOTICE_ABORTED, parse_lock
from dedupe.core.sealing import Codec
from dedupe.settings import AsyncClient, Settings, SyncClient

__all__ = ["Backend", "BackendConfig"]

log = logging.getLogger(__name__)

_live: weakref.WeakSet[Backend] = weakref.WeakSet()
# While Redis is down under on_backend_error="local", calls skip it for this long, so an
# unreachable server costs one connect timeout per pause, not one per call.
_OUTAGE_PAUSE = 1.0
# Giving back leases of unanswered acquires: the first pause between looks (then doubled);
# the thread ends when idle this long.
_RELEASE_PAUSE = 0.2
_RELEASE_IDLE = 5.0


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


class Backend:
    """Lazily built Redis plumbing shared by every function of one SingleFlight."""

    def __init__(self, cfg: BackendConfig) -> None:
        self.cfg = cfg
        self.codec = cfg.codec
        self.target: Target | None
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
        where = "the clients given" if self.target is None else redact(cfg.url)
        log.info(
            "prefix %r on %s (%s); %s; on_backend_error=%s",
            cfg.name,
            where,
            self.kind,
            self.codec.mode,
            cfg.on_backend_error,
        )

    def _init_process_state(self) -> None:
        cfg = self.cfg
        self._lock = threading.RLock()
        self.clients = Clients(cfg, self.target, self.kind)
        self.transport = Transport(self.clients, self.kind, cfg.queue_timeout, self.command_bound)
        # The per-call path reaches the transport through these (no extra call frame).
        self.run_sync_script = self.transport.run_sync_script
        self.run_async_script = self.transport.run_async_script
        self.in_thread = self.transport.in_thread
        self._hub: Once[Hub | MemoryHub] = Once()
        self._renewer: Once[Renewer] = Once()
        self.sync_flights = InFlight()
        # Each event loop's table of flights (a loop that stops strands only its own callers):
        # under _lock.
        self._loop_flights: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, InFlight] = (
            weakref.WeakKeyDictionary()
        )
        self.local_copies = (
            LocalCopies(max_bytes=cfg.local_cache_max_bytes) if cfg.local_cache else None
        )
        self._owner_ids = OwnerIds()  # "<host>/<pid>/<start-ms>/<instance>.<seq>"
        # Under _lock:
        self._active = 0  # flights running on this backend
        self._idle = threading.Condition(self._lock)  # notified when _active drops to 0
        self._retired = False  # configure() replaced us: close when the last flight ends
        self._closing = 0  # close() calls waiting for _active to drop to 0
        # Outage state (on_backend_error="local"): written under _lock; read without it on
        # the per-call path (a stale read costs one more try of Redis, or one less).
        self._down_until = 0.0
        self._in_outage = False
        self._local_runs = 0  # under _lock
        # Background runs (refreshes): places taken (max_background_runs), and the asyncio
        # tasks running them (kept here: the loop holds tasks only weakly); under _lock.
        self._background = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._stood_in = 0  # failed runs a stale value stood in for; under _lock
        # Leases to give back (release_later): (next look, seq, spec, until, next pause), a
        # heap; and their thread: all under _lock.
        self._releases: list[tuple[float, int, FlightSpec, float, float]] = []
        self._release_seq = itertools.count()
        self._release_wanted = threading.Condition(self._lock)
        self._releaser: threading.Thread | None = None
        self._release_stop = False

    # --- what the drivers and the call machine use ------------------------------------------

    def sync_client(self) -> SyncClient:
        return self.clients.sync()

    def async_client(self) -> AsyncClient:
        return self.clients.for_loop()

    def async_flights(self) -> InFlight:
        """The running loop's table of flights."""
        loop = asyncio.get_running_loop()
        table = self._loop_flights.get(loop)
        if table is None:
            with self._lock:
                table = self._loop_flights.get(loop)
                if table is None:
                    table = self._loop_flights[loop] = InFlight()
        return table

    def hub(self) -> Hub | MemoryHub:
        """The pub/sub hub (its router is built on a hub thread: on Cluster that is network
        I/O, and making the hub costs the caller, or its event loop, nothing); memory://
        delivers in-process."""
        if self.target is not None and self.target.kind == "memory":
            target = self.target
            return self._hub.value or self._hub.get(lambda: MemoryHub(store_for(target.service)))
        return self._hub.value or self._hub.get(
            lambda: Hub(
                self.clients.router,
                sharded=self.kind == "cluster",
                health_interval=self.cfg.health_check_interval,
                name=client_name(self.cfg, "hub"),
            )
        )

    def renewer(self) -> Renewer:
        return self._renewer.value or self._renewer.get(
            lambda: Renewer(self._renew_batch, self._renewal_group)
        )

    def _renew_batch(self, items: list[tuple[str, str, int]]) -> list[int]:
        # Runs on a renewal worker thread: one round trip per server for the whole batch.
        return renew_many(self.clients.renewal(), items)

    def _renewal_group(self, lock_key: str) -> str:
        # Called by the renewal scheduler: no network I/O. One group per Cluster node.
        client = self.clients.renewal_if_built()
        if client is None or self.kind != "cluster":
            return ""
        return str(client.get_node_from_key(lock_key).name)

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
        with self._lock:
            self._local_runs += 1

    def answered(self) -> None:
        """A flight went through Redis: any outage is over."""
        if self._in_outage:
            with self._lock:
                if self._in_outage:
                    self._in_outage = False
                    log.warning("Redis answers again; flights are distributed again")

    # --- flights running on this backend ------------------------------------------------------

    def begin_flight(self) -> None:
        """Count a running flight, so that close() and configure() can wait for it."""
        with self._lock:
            self._active += 1

    def end_flight(self) -> None:
        with self._lock:
            self._active -= 1
            idle = self._active == 0
            if idle and self._closing:
                self._idle.notify_all()  # only close() waits on it
            retired = self._retired
        if idle and retired:
            self.close(timeout=0)

    # --- background runs (refreshes) ----------------------------------------------------------

    def reserve_background(self) -> bool:
        """Take a place for a background run, if one of max_background_runs is free."""
        with self._lock:
            if self._background >= self.cfg.max_background_runs:
                return False
            self._background += 1
            return True

    def release_background(self) -> None:
        with self._lock:
            self._background -= 1

    def run_in_background(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on a thread of its own, in a copy of the caller's context,
        counted as a running flight (close() waits for it)."""
        context = contextvars.copy_context()
        self.begin_flight()

        def run() -> None:
            try:
                context.run(fn, *args)
            finally:
                self.end_flight()

        threading.Thread(target=run, name="dedupe-refresh", daemon=True).start()

    def start_task(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in a task of the running loop that this backend keeps until it ends,
        counted as a running flight; aclose() lets it finish, or cancels it."""
        self.begin_flight()

        async def run() -> None:
            try:
                await coro
            finally:
                self.end_flight()

        task = asyncio.get_running_loop().create_task(run(), name="dedupe-refresh")
        with self._lock:
            self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        with self._lock:
            self._tasks.discard(task)

    async def aclose_tasks(self, timeout: float | None) -> None:
        """Let this loop's background runs finish, for up to ``timeout`` (None: lock_ttl);
        then cancel those still running, and wait for them to end."""
        loop = asyncio.get_running_loop()
        with self._lock:
            tasks = [t for t in self._tasks if t.get_loop() is loop]
        if not tasks:
            return
        wait = self.cfg.lock_ttl if timeout is None else timeout
        _, pending = await asyncio.wait(tasks, timeout=wait) if wait > 0 else ((), set(tasks))
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    def stood_in(self) -> None:
        with self._lock:
            self._stood_in += 1

    def stats(self) -> dict[str, int]:
        hub, renewer = self._hub.value, self._renewer.value
        with self._lock:
            tables = list(self._loop_flights.values())
            local_runs = self._local_runs
            background, stood_in = self._background, self._stood_in
        return {
            "rejected_envelopes": self.codec.rejected,
            "hub_reconnects": hub.reconnects if hub else 0,
            "leases_lost": renewer.lost if renewer else 0,
            "local_runs": local_runs,
            "flights_in_process": len(self.sync_flights) + sum(len(t) for t in tables),
            "local_copies": len(self.local_copies) if self.local_copies is not None else 0,
            "background_runs": background,
            "errors_replaced": stood_in,
            **{f"lease_{k}": v for k, v in (renewer.stats() if renewer else {}).items()},
        }

    def void_flights(self, key: str) -> None:
        """forget(): detach the key's flights in this process (every table), so that callers
        from now on start their own rather than join a run that began before."""
        self.sync_flights.void(key)
        with self._lock:
            tables = list(self._loop_flights.values())
        for table in tables:
            table.void(key)

    def inflight(self) -> list[InFlightInfo]:
        flights = self.sync_flights.snapshot("sync")
        with self._lock:
            tables = list(self._loop_flights.values())
        for table in tables:
            flights.extend(table.snapshot("async"))
        return flights

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
            raw = self.transport.run_sync_script(peek_call(spec))
            value = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
            holder = parse_lock(value)
            if holder is None or holder.owner != spec.owner:
                return  # not ours (or gone)
            token = holder.token
            notice = self.codec.notice(NOTICE_ABORTED, channel=spec.names.channel, token=token)
            cmd = Complete(value, b"", 0, notice, token)
            self.transport.run_sync_script(complete_call(spec, cmd, self.publish))
            log.info("gave back lease %d on %r after its acquire went unanswered", token,
                     spec.names.job_id)  # fmt: skip
        except Exception as exc:
            log.debug("could not give back a lease on %r yet: %s", spec.names.job_id, exc)

    # --- the end --------------------------------------------------------------------------

    async def aclose_loop_client(self) -> None:
        """Close the running loop's client and connections (they belong to that loop)."""
        await self.transport.aclose_loop()
        await self.clients.aclose_loop()

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
            self._release_stop = True
            self._release_wanted.notify_all()
            self._loop_flights.clear()
        hub, renewer = self._hub.take(), self._renewer.take()
        if hub is not None:
            hub.close()
        if renewer is not None:
            renewer.close()
        self.transport.close()
        self.clients.close()

    def retire(self) -> None:
        """configure() replaced this backend: flights already running finish on it (leases
        renewed), and it closes itself when the last one ends."""
        with self._lock:
            self._retired = True
            idle = self._active == 0
        if idle:
            self.close(timeout=0)

    def after_fork(self) -> None:
        # The parent's threads are gone and its sockets are not ours to use or close.
        self._init_process_state()


def _after_fork_in_child() -> None:
    for backend in list(_live):
        backend.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
