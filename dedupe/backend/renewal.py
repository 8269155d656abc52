"""The renewer: threads that carry a LeaseBook's decisions over Redis, in batches.

Every decision (when to look at a lease, which to renew, what a reply means, when it is lost)
is the LeaseBook's (leases.py). This module runs it: one scheduler thread that never does
network I/O and wakes when the book's next look is due, and one worker thread per group (a
Cluster node; one group on a single server or Sentinel), so a stuck node stalls only its own
group. Each worker renews every due lease of its group in one round trip (``renew_many``: a
pipeline of EVALSHA RENEW, at most ``batch_max`` per pipeline; on Cluster, ``MOVED`` and
``ASK`` are followed once, so a lease stays renewed while its slot migrates). After a pause
(a stalled round trip, a full garbage collection) the book cuts the backlog into shorter
round trips, most urgent first (``LeaseBook.batch_limit``).

Locks: ``Renewer._lock`` guards the book, the groups and their queues, and the scheduling
fields below; it is never held across network I/O or while logging. It may be held while
taking ``leases._guard`` (LostSignal state), never the other way round. Both are re-created in
a forked child.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import redis.cluster
from redis.exceptions import AskError, MovedError, NoScriptError, ResponseError

from dedupe.backend.commands import renew_call
from dedupe.backend.topology import note_moved
from dedupe.backend.wire import SyncWire, wire_ready
from dedupe.core.leases import RENEW_UNKNOWN, Lease, LeaseBook

__all__ = ["BatchRenewFn", "Renewer", "renew_many"]

log = logging.getLogger(__name__)

BatchRenewFn = Callable[[list[tuple[str, str, int]]], Sequence[int]]
"""renew([(lock_key, lock_value, ttl_ms), ...]) -> per lease 1 renewed, 0 no longer ours,
RENEW_UNKNOWN no answer; raises if the round trip failed as a whole."""

_renewers: weakref.WeakSet[Renewer] = weakref.WeakSet()


class _Group:
    """One worker thread and its queue (all under the Renewer's _lock)."""

    __slots__ = ("cond", "cost", "name", "queue", "thread")

    def __init__(self, name: str, lock: threading.Lock) -> None:
        self.name = name
        self.cond = threading.Condition(lock)
        self.queue: list[Lease] = []
        self.thread: threading.Thread | None = None
        self.cost = 0.0  # seconds a lease took in the last answered round trip (0: none yet)


_JOIN = 1.0  # close() waits this long, in all, for the renewer's threads to end


class Renewer:
    """Renews leases about every ttl/3 until they are removed, lost or abandoned.

    ``renew`` renews a batch of one group (see BatchRenewFn; e.g. ``renew_many`` bound to a
    client); ``group_of(lock_key)`` names the group a key renews through (default: one group).
    """

    def __init__(
        self,
        renew: BatchRenewFn,
        group_of: Callable[[str], str] | None = None,
        *,
        batch_max: int = 4096,
    ) -> None:
        if batch_max < 1:
            raise ValueError(f"batch_max must be at least 1, not {batch_max!r}")
        self._renew = renew
        self._group_of = group_of
        self._batch_max = batch_max
        self._closed = False  # kept across fork
        self._init_state()
        _renewers.add(self)

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        # Everything below is guarded by self._lock.
        self._cond = threading.Condition(self._lock)  # the scheduler waits on it
        self._book = LeaseBook(self._group_of)
        if self._closed:
            self._book.close()
        self._groups: dict[str, _Group] = {}
        self._thread: threading.Thread | None = None
        self._wake_at = math.inf  # when the scheduler means to wake next

    # --- what the drivers call ----------------------------------------------------------------

    def add(self, lease: Lease) -> None:
        with self._lock:
            first = self._book.add(lease)
            if first is None:
                return  # closed: counted as lost
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._schedule, name="dedupe-renewer", daemon=True
                )
                self._thread.start()
            # Wake the scheduler only if it must wake earlier than planned, or now and then
            # to drop finished leases, so a burst of short flights does not pile up.
            if first < self._wake_at or len(self._book.incoming) % 1024 == 0:
                self._wake_at = min(self._wake_at, first)
                self._cond.notify()

    def remove(self, lease: Lease) -> None:
        """The flight is over (its complete script returned): stop renewing. O(1), no lock:
        the lease is dropped when the scheduler next looks at it."""
        lease.active = False

    def completing(self, lease: Lease) -> None:
        """The complete script is about to be sent: keep renewing until remove(), but a
        renewal that finds the lock gone is our own release, not a loss. O(1), no lock."""
        lease.completing = True

    def close(self) -> None:
        """Stop all threads. Leases still held count as lost: renewal stops for them."""
        with self._lock:
            self._closed = True
            held = self._book.close()
            self._cond.notify()
            threads = [self._thread]
            for group in self._groups.values():
                group.queue.clear()
                group.cond.notify()
                threads.append(group.thread)
        for lease in held:
            lease.lost.set()
        if held:
            log.warning("renewer closed under %d leases; they count as lost", len(held))
        # Bounded as a whole, as the hub's: a worker in a round trip to a server that does
        # not answer ends on its own when its timeout does (the threads are daemons).
        deadline = time.monotonic() + _JOIN
        for thread in threads:
            if (
                thread is not None
                and thread.is_alive()
                and thread is not threading.current_thread()
            ):
                thread.join(max(0.0, deadline - time.monotonic()))

    def pending(self) -> int:
        """Leases still renewed (not removed, not lost for good)."""
        with self._lock:
            return self._book.pending()

    def stats(self) -> dict[str, int]:
        """Counters: renewals_sent, renewal_batches (round trips), renewed, lost_<reason>
        (mismatch, clock, max_hold, error, closed), abandoned (owning loop closed), released
        (a renewal met the lock our own complete script had just deleted)."""
        with self._lock:
            return dict(self._book.counts)

    @property
    def lost(self) -> int:
        """Leases lost, every reason."""
        with self._lock:
            c = self._book.counts
            return sum(c[k] for k in c if k.startswith("lost_"))

    # --- the scheduler: no network I/O here ---------------------------------------------------

    def _schedule(self) -> None:
        with self._lock:
            while not self._closed:
                for name, lease in self._book.due(time.monotonic()):
                    self._enqueue(name, lease)
                self._flush_logs()
                self._wake_at = self._book.next_look()
                if self._wake_at <= time.monotonic():
                    continue  # more came due while the logs were written
                if math.isinf(self._wake_at):
                    self._cond.wait()
                else:
                    self._cond.wait(max(0.0, self._wake_at - time.monotonic()))

    def _enqueue(self, name: str, lease: Lease) -> None:
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = _Group(name, self._lock)
        group.queue.append(lease)
        if group.thread is None:
            group.thread = threading.Thread(
                target=self._work, args=(group,), name=f"dedupe-renew-{name or 'all'}", daemon=True
            )
            group.thread.start()
        group.cond.notify()

    def _flush_logs(self) -> None:
        """Log what the book wants logged, with the lock released for the while (called
        holding it): a slow log handler must not hold up add()."""
        logs = self._book.take_logs(time.monotonic())
        if not logs:
            return
        self._lock.release()
        try:
            for msg, args in logs:
                log.warning(msg, *args)
        finally:
            self._lock.acquire()

    # --- the workers: one round trip at a time, per group -------------------------------------

    def _work(self, group: _Group) -> None:
        with self._lock:
            while True:
                while not group.queue and not self._closed:
                    group.cond.wait()
                if self._closed:
                    return
                limit = self._book.batch_limit(
                    group.queue[0], time.monotonic(), group.cost, self._batch_max
                )
                batch = [lease for lease in group.queue[:limit] if lease.active]
                del group.queue[:limit]
                if not batch:
                    continue
                self._lock.release()
                try:
                    items = [(lease.lock_key, lease.value, lease.ttl_ms) for lease in batch]
                    sent = time.monotonic()
                    try:
                        replies: Sequence[int] = self._renew(items)
                        error: str | None = None
                        if len(replies) != len(items):
                            error = f"{len(replies)} replies to {len(items)} renewals"
                    except Exception as exc:
                        replies, error = (), f"{type(exc).__name__}: {exc}"
                    done = time.monotonic()
                finally:
                    self._lock.acquire()
                if error is None:  # a failed round trip's length says nothing of the load
                    group.cost = (done - sent) / len(batch)
                earliest = self._book.settle(batch, sent, done, replies, error)
                if earliest < self._wake_at:
                    self._wake_at = earliest
                    self._cond.notify()
                self._flush_logs()

    def _after_fork_in_child(self) -> None:
        # The parent's threads are gone and its leases are the parent's to renew; start fresh.
        self._init_state()


# --- the batch renewal over redis-py ----------------------------------------------------------


def _flag(reply: Any) -> int:
    if isinstance(reply, Exception):
        return RENEW_UNKNOWN
    try:
        return 1 if int(reply) == 1 else 0
    except (TypeError, ValueError):
        return RENEW_UNKNOWN


def _pipelined(client: Any, items: Sequence[tuple[str, str, int]]) -> list[Any]:
    """One round trip of EVALSHA RENEW; one more only if the server had not cached the
    script (EVAL then). Packed and read by the wire where the client allows (wire_ready):
    about a third of the client's time of redis-py's pipeline, for renewals that can run
    to thousands a second."""
    calls = [renew_call(key, value, ttl_ms) for key, value, ttl_ms in items]
    wire = _wire_of(client)
    if wire is not None:
        return wire.run_many(calls)
    pipe = client.pipeline(transaction=False)
    for call in calls:
        pipe.evalsha(*call.evalsha_args())
    replies: list[Any] = list(pipe.execute(raise_on_error=False))
    missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
    if missing:
        pipe = client.pipeline(transaction=False)
        pipe.eval(*calls[missing[0]].eval_args())
        for i in missing[1:]:
            pipe.evalsha(*calls[i].evalsha_args())
        for i, reply in zip(missing, pipe.execute(raise_on_error=False), strict=True):
            replies[i] = reply
    return replies


# The wire of each client renewals went through (a Cluster node's client too), or None where
# the client cannot take one. No lock: a race only makes a wire twice.
_wires: weakref.WeakKeyDictionary[Any, SyncWire | None] = weakref.WeakKeyDictionary()


def _wire_of(client: Any) -> SyncWire | None:
    try:
        return _wires[client]
    except KeyError:
        pass
    except TypeError:  # not weakly referenceable
        return SyncWire(client) if wire_ready(client) else None
    wire = _wires[client] = SyncWire(client) if wire_ready(client) else None
    return wire


def _redirect(reply: Any) -> tuple[str, str, int] | None:
    """("MOVED" | "ASK", host, port) for a redirection reply, else None."""
    if not isinstance(reply, ResponseError):
        return None
    if isinstance(reply, AskError):  # MovedError too
        kind = "MOVED" if isinstance(reply, MovedError) else "ASK"
        return kind, str(reply.host), int(reply.port)
    # Older redis-py may leave a pipeline's redirection as a plain ResponseError.
    parts = str(reply).split()
    if len(parts) == 3 and parts[0] in ("MOVED", "ASK") and ":" in parts[2]:
        host, _, port = parts[2].rpartition(":")
        if port.isdigit():
            return parts[0], host, int(port)
    return None


def _follow(
    cluster: Any, items: Sequence[tuple[str, str, int]], redirects: list[tuple[int, str, str, int]]
) -> dict[int, Any]:
    """Send each redirected renewal once more where its reply sent it: after ASKING for ASK
    (a slot in migration: the key already lives on the importing node), plainly for MOVED.
    One pipeline per target node; replies by item index (left out: no answer)."""
    by_target: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for i, kind, host, port in redirects:
        by_target.setdefault((host, port), []).append((i, kind))
    out: dict[int, Any] = {}
    for (host, port), group in by_target.items():
        node = cluster.get_node(host=host, port=port)
        if node is None:
            continue  # not in the layout we know: no answer this time
        calls = [renew_call(*items[i]) for i, _ in group]
        try:
            pipe = cluster.get_redis_connection(node).pipeline(transaction=False)
            for (_, kind), call in zip(group, calls, strict=True):
                if kind == "ASK":
                    pipe.execute_command("ASKING")
                pipe.evalsha(*call.evalsha_args())
            replies = list(pipe.execute(raise_on_error=False))
        except Exception:
            log.debug("could not follow a redirection to %s:%s", host, port, exc_info=True)
            continue
        it = iter(replies)
        for (i, kind), call in zip(group, calls, strict=True):
            if kind == "ASK":
                next(it)  # ASKING's OK
            reply = next(it)
            if isinstance(reply, NoScriptError):
                try:
                    conn = cluster.get_redis_connection(node)
                    pipe = conn.pipeline(transaction=False)
                    if kind == "ASK":
                        pipe.execute_command("ASKING")
                    pipe.eval(*call.eval_args())
                    reply = pipe.execute(raise_on_error=False)[-1]
                except Exception:
                    continue
            out[i] = reply
    return out


def renew_many(client: Any, items: Sequence[tuple[str, str, int]]) -> list[int]:
    """Renew leases owner-checked, one round trip per server: for each (lock_key, lock_value,
    ttl_ms), 1 renewed, 0 no longer ours, RENEW_UNKNOWN an error reply for that key.

    ``client`` is a redis-py sync client, standalone (Sentinel too) or RedisCluster. On Cluster
    each node gets one plain pipeline on that node's own client (no redirection chasing, no
    retries: a failed node answers RENEW_UNKNOWN for its keys and the slot map is refreshed).
    Raises only when every server's round trip failed."""
    if not items:
        return []
    if not isinstance(client, redis.cluster.RedisCluster):
        return [_flag(r) for r in _pipelined(client, items)]
    c: Any = client
    by_node: dict[str, tuple[Any, list[int]]] = {}
    out = [RENEW_UNKNOWN] * len(items)
    for i, (key, _, _) in enumerate(items):
        try:
            node = c.get_node_from_key(key)
        except Exception:
            continue  # slot not covered now: unknown, tried again later
        by_node.setdefault(node.name, (node, []))[1].append(i)
    failure: Exception | None = None
    for node, idxs in by_node.values():
        try:
            replies = _pipelined(c.get_redis_connection(node), [items[i] for i in idxs])
        except Exception as exc:
            failure = exc
            try:
                c.nodes_manager.initialize()  # a failover may have moved the slots
            except Exception:
                log.debug("could not refresh the cluster slot map", exc_info=True)
            continue
        note_moved(c, replies)
        redirects: list[tuple[int, str, str, int]] = []
        for i, reply in zip(idxs, replies, strict=True):
            out[i] = _flag(reply)
            target = _redirect(reply)
            if target is not None:
                redirects.append((i, *target))
        if redirects:
            for i, reply in _follow(c, items, redirects).items():
                out[i] = _flag(reply)
    if failure is not None and all(r == RENEW_UNKNOWN for r in out):
        raise failure
    return out


# --- fork -------------------------------------------------------------------------------------


def _after_fork_in_child() -> None:
    for renewer in list(_renewers):
        renewer._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
