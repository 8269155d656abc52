"""How a script reaches Redis: command slots, routes to the wire, Cluster's migration retries.

A process has 64 command slots per client (per event loop for asyncio): past them, callers
queue, first come first served, at most ``queue_timeout`` (and a caller with a deadline and
no lease yet not past its deadline). Each script then takes a route: over the wire on
connections of our own (a standalone client dedupe built: one per slot, kept while idle),
over the wire through the pool of a client passed in (its limits hold), or through the
client's command layer (Cluster: slot routing, MOVED and ASK, and dedupe's pauses while a
slot migrates). A batch's scripts go pipelined: in one round trip on our own connections,
in one per node on a Cluster (a script a node redirects then goes on its own, as above).
asyncio's Cluster scripts, and WAIT for replicas, run on threads of this transport (one per
slot), never in the loop's default executor.

Locks: ``Transport._lock`` guards ``_loops``; the sync slots are a C queue and the idle
lists are appended and popped atomically; neither needs it, and nothing here holds a lock
across network I/O (the route's Once builds the sync client with no lock held).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import redis.cluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from dedupe.backend.clients import Clients, Once
from dedupe.backend.commands import READ, ScriptCall, Stamp
from dedupe.backend.slots import AsyncSlots
from dedupe.backend.topology import note_moved
from dedupe.backend.wire import AsyncWire, SyncWire, wire_ready
from dedupe.errors import BackendUnavailable, WaitTimeout
from dedupe.settings import AsyncClient, SyncClient

__all__ = ["SLOTS", "Transport", "acquire_and_wait", "run_script"]

# Commands in flight at once per client (per event loop for asyncio). More callers queue
# for a slot instead of failing with "Too many connections"; pools are sized above it.
SLOTS = 64

_T = TypeVar("_T")


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


class _Loop:
    """What the transport keeps per asyncio event loop (used on that loop only: no lock)."""

    __slots__ = ("idle", "route", "slots")

    def __init__(self, queue_timeout: float) -> None:
        self.route: _Route | None = None
        self.slots = AsyncSlots(SLOTS, _loop_slots_busy(queue_timeout))
        self.idle: list[Any] = []  # the route's own connections not in use (at most SLOTS)


def _loop_slots_busy(timeout: float) -> Callable[[], Exception]:
    def error() -> Exception:
        return BackendUnavailable(
            f"all {SLOTS} Redis command slots of this event loop stayed busy for {timeout:g} s"
        )

    return error


class Transport:
    """The command slots and routes of one backend's clients."""

    def __init__(self, clients: Clients, kind: str, queue_timeout: float, bound: float) -> None:
        self.clients = clients
        self.kind = kind
        self.queue_timeout = queue_timeout
        self.bound = bound  # the longest one command takes on our own connections
        # The sync slots: a semaphore in C (threading's is Python over a Condition, ~80
        # bytecodes a take).
        self._sync_slots: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(SLOTS):
            self._sync_slots.put(None)
        self._sync_route: Once[_Route] = Once()
        # The route's own connections not in use, last used on top, so that there are only
        # as many as commands ever ran at once (at most SLOTS). No lock: list.pop() and
        # append() are atomic.
        self._sync_idle: list[Any] = []
        self._lock = threading.Lock()
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Loop] = (
            weakref.WeakKeyDictionary()
        )  # under _lock
        self._threads: Once[ThreadPoolExecutor] = Once()

    # --- sync ---------------------------------------------------------------------------------

    def _take_sync_slot(self, deadline: float | None = None) -> None:
        """Wait for a command slot, at most queue_timeout, and not past ``deadline`` (a
        caller's wait_timeout, on time.monotonic: then WaitTimeout)."""
        timeout = self.queue_timeout
        if deadline is not None:
            left = deadline - time.monotonic()  # (not min/max: a keyword parse each)
            if left < timeout:
                timeout = left if left > 0.0 else 0.0
        try:
            self._sync_slots.get(timeout=timeout)
        except queue.Empty:
            if timeout < self.queue_timeout:
                raise WaitTimeout("waited the wait_timeout for a command slot") from None
            raise BackendUnavailable(
                f"all {SLOTS} Redis command slots of this process stayed busy for "
                f"{self.queue_timeout:g} s"
            ) from None

    @contextmanager
    def slot(self) -> Iterator[None]:
        """One of the sync command slots, for a command not sent by run_sync_script."""
        self._take_sync_slot()
        try:
            yield
        finally:
            self._sync_slots.put(None)

    def free_sync_slots(self) -> int:
        """Sync command slots free now (for tests and stats)."""
        return self._sync_slots.qsize()

    def run_sync_script(
        self, call: ScriptCall, stamp: Stamp | None = None, deadline: float | None = None
    ) -> Any:
        """Run one script over the sync client, in a command slot (the per-call path: no
        context managers). ``stamp`` learns when its request was written; ``deadline``
        bounds the wait for a slot (a caller's wait_timeout, before it holds any lease)."""
        route = self._sync_route.value or self._sync_route.get(self._make_sync_route)
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

    def run_sync_scripts(
        self, calls: Sequence[ScriptCall], stamps: Sequence[Stamp | None]
    ) -> list[Any]:
        """Run several scripts of one batch: on our own standalone (or Sentinel) connections
        one pipelined round trip, in one command slot; on a Cluster one pipelined round trip
        per node (``_run_on_nodes``); through a client passed in, one after another. Each
        item's reply, or the exception its script raised."""
        route = self._sync_route.value or self._sync_route.get(self._make_sync_route)
        if self.kind == "cluster" and len(calls) > 1:
            return self._run_on_nodes(route.client, calls, stamps)
        if route.own and route.wire is not None and len(calls) > 1:
            wire: Any = route.wire
            self._take_sync_slot()
            try:
                idle = self._sync_idle
                try:
                    conn = idle.pop()
                except IndexError:
                    conn = wire.new_connection()
                try:
                    return wire.run_many_on(conn, calls, stamps)  # type: ignore[no-any-return]
                finally:
                    idle.append(conn)
            except Exception as exc:
                return [exc] * len(calls)
            finally:
                self._sync_slots.put(None)
        out: list[Any] = []
        for call, stamp in zip(calls, stamps, strict=True):
            try:
                out.append(self.run_sync_script(call, stamp))
            except Exception as exc:
                out.append(exc)
        return out

    def _run_on_nodes(
        self, client: Any, calls: Sequence[ScriptCall], stamps: Sequence[Stamp | None]
    ) -> list[Any]:
        """A batch's scripts on a Cluster: grouped by the node that owns each one's slot (as
        the client knows the layout), one pipeline per node on that node's own client, in one
        command slot. A script the node does not run now (MOVED, ASK, TRYAGAIN, CLUSTERDOWN:
        a slot moved or migrating), or that a failed node left unanswered, goes on its own
        through the client's command layer (its redirections, and the pauses while a slot
        migrates); once one of those fails for want of the Cluster (a node down, CLUSTERDOWN,
        a migration past patience), the rest fail with it rather than wait as long each."""
        replies: list[Any] = [_UNSENT] * len(calls)
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for k, call in enumerate(calls):
            try:
                node = client.get_node_from_key(call.keys[0])
            except Exception:
                continue  # a slot not covered now: on its own, below
            by_node.setdefault(node.name, (node, []))[1].append(k)
        try:
            self._take_sync_slot()
        except Exception as exc:
            return [exc] * len(calls)
        try:
            for node, ks in by_node.values():
                try:
                    got = _pipelined(client.get_redis_connection(node), calls, stamps, ks)
                except Exception:
                    continue  # the node may be gone: its scripts on their own, below
                for k, reply in zip(ks, got, strict=True):
                    replies[k] = reply
        finally:
            self._sync_slots.put(None)
        note_moved(client, replies)
        outage: Exception | None = None
        for k, reply in enumerate(replies):
            if reply is _UNSENT or isinstance(reply, _NOT_RUN_NOW):
                if outage is not None:
                    replies[k] = outage
                    continue
                try:
                    replies[k] = self.run_sync_script(calls[k], stamps[k])
                except Exception as exc:
                    replies[k] = exc
                    if not isinstance(exc, ResponseError) or isinstance(exc, _NOT_RUN_NOW):
                        outage = exc  # not this script's error: the Cluster's
        return replies

    def _make_sync_route(self) -> _Route:
        client = self.clients.sync()
        given = self.clients.settings.client is not None
        return _route(client, self.kind, not given, False, self.bound)

    # --- asyncio ------------------------------------------------------------------------------

    async def run_async_script(self, call: ScriptCall, stamp: Stamp | None = None) -> Any:
        """Run one script over the running loop's client, in one of its command slots."""
        state = self._loop()
        slots = state.slots
        await slots.take(self.queue_timeout)
        try:
            if self.kind == "cluster":
                # redis.asyncio's RedisCluster drops connections other tasks are using when
                # one command fails (it re-discovers the topology), and under concurrency we
                # saw it hand out a connection mid-handshake: Cluster scripts go through the
                # thread-safe sync client, on threads of our own (one per command slot), and
                # only once this loop's slot is ours: callers queue here, in order and
                # bounded, not in an executor's queue.
                return await self.in_thread(self.run_sync_script, call, stamp)
            route = state.route or self._loop_route(state)
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

    async def run_async_scripts(
        self, calls: Sequence[ScriptCall], stamps: Sequence[Stamp | None]
    ) -> list[Any]:
        """As run_sync_scripts, over the running loop's client (a Cluster's on a thread, as
        run_async_script's)."""
        state = self._loop()
        if self.kind == "cluster" and len(calls) > 1:
            await state.slots.take(self.queue_timeout)
            try:
                return await self.in_thread(self.run_sync_scripts, calls, stamps)
            except Exception as exc:
                return [exc] * len(calls)
            finally:
                state.slots.release()
        route = state.route or self._loop_route(state)  # the first batch on a loop too
        if route.own and route.wire is not None and len(calls) > 1:
            wire: Any = route.wire
            slots = state.slots
            await slots.take(self.queue_timeout)
            try:
                idle = state.idle
                conn = idle.pop() if idle else wire.new_connection()
                try:
                    return await wire.run_many_on(conn, calls, stamps)  # type: ignore[no-any-return]
                finally:
                    idle.append(conn)
            except Exception as exc:
                return [exc] * len(calls)
            finally:
                slots.release()
        out: list[Any] = []
        for call, stamp in zip(calls, stamps, strict=True):
            try:
                out.append(await self.run_async_script(call, stamp))
            except Exception as exc:
                out.append(exc)
        return out

    def _loop_route(self, state: _Loop) -> _Route:
        """The running loop's route, made on its first script (no I/O: the client connects
        on its first command)."""
        given = self.clients.settings.async_client is not None
        client = self.clients.for_loop()
        state.route = _route(client, self.kind, not given, True, self.bound)
        return state.route

    def in_thread(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Run blocking ``fn(*args)`` on one of this transport's threads (at most one per
        command slot), for asyncio callers; the loop's default executor is not ours to fill."""
        pool = self._threads.value or self._threads.get(
            lambda: ThreadPoolExecutor(SLOTS, thread_name_prefix="dedupe-io")
        )
        return asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def _loop(self) -> _Loop:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            with self._lock:
                state = self._loops.get(loop)
                if state is None:
                    state = self._loops[loop] = _Loop(self.queue_timeout)
        return state

    # --- closing ------------------------------------------------------------------------------

    async def aclose_loop(self) -> None:
        """Drop the running loop's route and close its idle connections (on that loop)."""
        with self._lock:
            state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is not None:
            idle, state.idle, state.route = state.idle, [], None
            for conn in idle:
                await conn.disconnect()

    def close(self) -> None:
        """Close the sync connections of our own and the threads; asyncio connections belong
        to their loops (aclose_loop). Connections in use now close when collected."""
        threads = self._threads.take()
        self._sync_route = Once()
        own, self._sync_idle = self._sync_idle, []
        with self._lock:
            self._loops.clear()
        if threads is not None:
            threads.shutdown(wait=False)
        for conn in own:
            conn.disconnect()


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


_UNSENT: Any = object()  # a batch's script not sent yet
# The error replies of a script a Cluster node did not run, to be sent again on its own.
_NOT_RUN_NOW = (AskError, TryAgainError, ClusterDownError)  # AskError: MovedError too


def _pipelined(
    node: Any, calls: Sequence[ScriptCall], stamps: Sequence[Stamp | None], ks: Sequence[int]
) -> list[Any]:
    """The scripts ``ks`` of ``calls`` in one pipeline on one node's client; once more, as
    EVAL, those the node had not cached (a restarted or failed-over node)."""
    pipe = node.pipeline(transaction=False)
    for k in ks:
        pipe.evalsha(*calls[k].evalsha_args())
    _stamp([stamps[k] for k in ks])
    replies: list[Any] = list(pipe.execute(raise_on_error=False))
    again = [j for j, r in enumerate(replies) if isinstance(r, NoScriptError)]
    if again:
        pipe = node.pipeline(transaction=False)
        for j in again:
            pipe.eval(*calls[ks[j]].eval_args())
        _stamp([stamps[ks[j]] for j in again])
        for j, reply in zip(again, pipe.execute(raise_on_error=False), strict=True):
            replies[j] = reply
    return replies


def _stamp(stamps: Sequence[Stamp | None]) -> None:
    now = time.monotonic()
    for stamp in stamps:
        if stamp is not None:
            stamp.sent = now


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
    if not cluster or call.script is READ:  # a read met by TRYAGAIN: the acquire decides
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


def acquire_and_wait(
    transport: Transport, client: SyncClient, call: ScriptCall, spec: Any, stamp: Stamp
) -> tuple[Any, int]:
    """The acquire script and WAIT on ONE connection: WAIT vouches only for the writes of
    the connection it runs on (min_replicas_ack)."""
    c: Any = client
    if isinstance(client, redis.cluster.RedisCluster):
        c = c.get_redis_connection(c.get_node_from_key(spec.names.lock))
    with transport.slot():
        stamp.sent = time.monotonic()
        pipe = c.pipeline(transaction=False)
        pipe.eval(*call.eval_args())
        pipe.execute_command("WAIT", spec.min_replicas, spec.replica_timeout_ms)
        raw, acked = pipe.execute()
    return raw, int(acked)
