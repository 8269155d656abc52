"""The lease watchdog: the local clock decides when a lease is lost; workers renew in batches.

A lease counts as lost as soon as the local clock says it may have expired: at
``sent + ttl - margin``, where ``sent`` is when the last renewal that Redis confirmed was sent
(the acquire's send time for the first period) and ``margin = min(ttl/3, max(10 ms, 5% ttl))``
covers clock-rate differences and the delay between that instant and the leader's next look.
``LostSignal.is_set()`` computes this from the clock on every call, so it is right even when no
thread of ours has run; the scheduler thread (which never does network I/O) also fires the
signal at that instant, for those waiting on ``event()`` or ``wait_async()``.

Renewals go through one worker thread per group (a Cluster node; one group on a single server
or Sentinel): a stuck node stalls only its own group. Each worker renews every due lease of its
group in one round trip (``renew_many``: a pipeline of EVALSHA RENEW, at most ``batch_max`` per
pipeline; on Cluster, ``MOVED`` and ``ASK`` are followed once, so a lease stays renewed while its
slot migrates). Renewal is owner-checked in Redis and stops for good on a mismatch, at
``max_hold``, or when the lease's asyncio loop is closed. A loss by the clock is reported to the
leader at once, but renewal goes on while the driver holds the lease: Redis may still hold it
(a renewer starved past the deadline, a slow link), and a renewal that finds it ours keeps a
second run from starting beside a live leader; one that finds it gone stops.

Lock order: ``Renewer._lock`` (scheduling state of a renewer and of its leases) may be held
while taking ``_guard`` (LostSignal state); never the other way round. Neither is held across
network I/O, and both are re-created in a forked child.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
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

from .commands import renew_call

__all__ = [
    "RENEW_UNKNOWN",
    "BatchRenewFn",
    "Lease",
    "LostSignal",
    "Renewer",
    "lease_margin",
    "renew_many",
]

log = logging.getLogger(__name__)

RENEW_UNKNOWN = -1
"""A ``renew_many`` reply: no answer for that lease this time (an error reply); try again."""

# Guards every LostSignal's _set, _event and _waiters, and writes of _deadline. Module-level
# (not per signal: a lock per lease costs more than the rest of it); re-created after fork.
_guard = threading.Lock()


def lease_margin(ttl: float) -> float:
    """How long before ``sent + ttl`` a lease already counts as lost."""
    return min(ttl / 3, max(0.010, ttl * 0.05))


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class LostSignal:
    """Whether a lease is lost: set for good by the watchdog, or by the clock passing the
    lease's deadline. Its threading.Event is made only if someone waits on it."""

    __slots__ = ("_deadline", "_event", "_set", "_waiters")

    def __init__(self, deadline: float = math.inf) -> None:
        # _deadline: monotonic time from which the lease counts as lost. Only raised (by a
        # confirmed renewal, under _guard and only while not _set); read without a lock.
        self._deadline = deadline
        self._set = False  # under _guard for writes; once True it stays True
        self._event: threading.Event | None = None  # under _guard
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] | None = (
            None  # under _guard: async waiters to wake
        )

    @property
    def deadline(self) -> float:
        """Monotonic time from which the lease counts as lost (inf: no lease to lose)."""
        return self._deadline

    def is_set(self) -> bool:
        """True once the lease is lost or may have expired; one clock read and a compare."""
        if self._set:
            return True
        if time.monotonic() < self._deadline:
            return False
        return self._expire()

    def _expire(self) -> bool:
        # Re-check under the lock: a renewal may have raised the deadline just now. Either way
        # the answer is stable: once we say lost, _set makes it stay lost.
        with _guard:
            if not self._set and time.monotonic() < self._deadline:
                return False
        self.set()
        return True

    def set(self) -> None:
        """The lease is lost, for good."""
        with _guard:
            self._set = True
            event = self._event
            waiters, self._waiters = self._waiters, None
        if event is not None:
            event.set()
        for loop, fut in waiters or ():
            if not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(_wake, fut)
                except RuntimeError:  # closed between the check and the call
                    pass

    def extend(self, deadline: float) -> bool:
        """A renewal was confirmed: move the deadline on, unless the lease already counts as
        lost (then it stays lost, and this returns False)."""
        with _guard:
            if self._set:
                return False
            if time.monotonic() < self._deadline:
                self._deadline = max(self._deadline, deadline)
                return True
        self.set()
        return False

    def event(self) -> threading.Event:
        """A threading.Event set when the lease is lost (by the watchdog, at the deadline)."""
        lost = self.is_set()
        with _guard:
            if self._event is None:
                self._event = threading.Event()
            if lost or self._set:
                self._event.set()
            return self._event

    async def wait_async(self, timeout: float | None = None) -> bool:
        """Wait on the running event loop (any loop) until lost; False if ``timeout`` passed
        first. No polling: a future woken by set(), and one timer at the current deadline."""
        if self.is_set():
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        entry = (loop, fut)
        with _guard:
            if self._set:
                return True
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(entry)
        end = math.inf if timeout is None else time.monotonic() + max(0.0, timeout)
        try:
            while True:
                now = time.monotonic()
                if self.is_set():
                    return True
                if now >= end:
                    return False
                left = min(end, self._deadline) - now
                await asyncio.wait({fut}, timeout=None if math.isinf(left) else left)
        finally:
            with _guard:
                if self._waiters is not None and entry in self._waiters:
                    self._waiters.remove(entry)


class Lease:
    """One leader's hold on a lock key, from the acquire until the driver removes it.

    ``acquired_at``: monotonic time the acquire script was SENT (default: now), the start of the
    first period. ``max_hold``: seconds after which renewal stops and the lease counts as lost
    (None: no bound). ``loop``: the asyncio loop of an async leader; once it is closed the lease
    is no longer renewed.
    """

    __slots__ = (
        "_busy",
        "_entry",
        "_error",
        "_next",
        "_reported",
        "active",
        "completing",
        "hold_until",
        "interval",
        "job_id",
        "lock_key",
        "loop",
        "lost",
        "margin",
        "max_hold",
        "sent_at",
        "ttl",
        "ttl_ms",
        "value",
    )

    def __init__(
        self,
        job_id: str,
        lock_key: str,
        value: str,
        ttl: float,
        *,
        acquired_at: float | None = None,
        max_hold: float | None = 300.0,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not ttl > 0:
            raise ValueError(f"a lease's ttl must be positive, not {ttl!r}")
        # Plain arithmetic, no calls: a lease is made for every flight that leads.
        start = time.monotonic() if acquired_at is None else acquired_at
        margin = ttl * 0.05  # lease_margin(ttl), inlined
        if margin < 0.010:
            margin = 0.010
        if margin > ttl / 3:
            margin = ttl / 3
        if max_hold is None:
            hold_until = math.inf
        elif max_hold > 0:
            hold_until = start + max_hold
        else:
            raise ValueError(f"max_hold must be positive or None, not {max_hold!r}")
        deadline = start + ttl - margin
        # Set here and never changed:
        self.job_id = job_id
        self.lock_key = lock_key
        self.value = value
        self.ttl = ttl
        self.ttl_ms = int(ttl * 1000 + 0.5) or 1
        self.interval = ttl / 3
        self.margin = margin
        self.max_hold = max_hold
        self.hold_until = hold_until
        self.loop = loop
        self.lost = LostSignal(deadline if deadline < hold_until else hold_until)
        # Written by the driver with no lock (one store, O(1)); the watchdog reads it and
        # tolerates a stale True (a renewal of a finished lease is harmless: compare-and-expire).
        self.active = True
        # Set (the same way) just before the complete script is sent: from then on a "not
        # ours" reply means our own complete released the lock, not that the lease was lost.
        self.completing = False
        # Under the owning Renewer's _lock:
        self.sent_at = start  # send time of the last confirmed renewal (or of the acquire)
        self._next = start + self.interval  # when to send the next renewal
        self._busy = False  # queued at or in flight with a worker
        self._entry = 0  # sequence number of this lease's one live heap entry (0: none)
        self._error: str | None = None  # the last renewal error, until a renewal succeeds
        self._reported = False  # its loss was counted and logged (once)

    @property
    def expires_at(self) -> float:
        """Monotonic time from which this lease counts as lost."""
        return self.lost.deadline


BatchRenewFn = Callable[[list[tuple[str, str, int]]], Sequence[int]]
"""renew([(lock_key, lock_value, ttl_ms), ...]) -> per lease 1 renewed, 0 no longer ours,
RENEW_UNKNOWN no answer; raises if the round trip failed as a whole."""

_OneRenewFn = Callable[[str, str, int], int]


def _as_batch(renew: BatchRenewFn | _OneRenewFn) -> BatchRenewFn:
    # TRANSITION (remove once backend.py passes a batch function): an older per-key
    # renew(lock_key, lock_value, ttl_ms) -> int is called once per lease of the batch.
    try:
        params = inspect.signature(renew).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if len(params) != 3:
        return renew  # type: ignore[return-value]
    one: Any = renew

    def batch(items: list[tuple[str, str, int]]) -> list[int]:
        return [int(one(*item)) for item in items]

    return batch


_renewers: weakref.WeakSet[Renewer] = weakref.WeakSet()
_LOGS_PER_SECOND = 20
_COUNTERS = (
    "renewals_sent",
    "renewal_batches",
    "renewed",
    "lost_mismatch",
    "lost_clock",
    "lost_max_hold",
    "lost_error",
    "lost_closed",
    "abandoned",
    "released",
)


class _Group:
    """One worker thread and its queue (all under the Renewer's _lock)."""

    __slots__ = ("cond", "name", "queue", "thread")

    def __init__(self, name: str, lock: threading.Lock) -> None:
        self.name = name
        self.cond = threading.Condition(lock)
        self.queue: list[Lease] = []
        self.thread: threading.Thread | None = None


class Renewer:
    """Renews leases about every ttl/3 until they are removed, lost or abandoned.

    ``renew`` renews a batch of one group (see BatchRenewFn; e.g. ``renew_many`` bound to a
    client); ``group_of(lock_key)`` names the group a key renews through (default: one group).
    """

    def __init__(
        self,
        renew: BatchRenewFn | _OneRenewFn,
        group_of: Callable[[str], str] | None = None,
        *,
        batch_max: int = 4096,
    ) -> None:
        if batch_max < 1:
            raise ValueError(f"batch_max must be at least 1, not {batch_max!r}")
        self._renew = _as_batch(renew)
        self._group_of = group_of
        self._batch_max = batch_max
        self._init_state()
        _renewers.add(self)

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        # Everything below is guarded by self._lock.
        self._cond = threading.Condition(self._lock)  # the scheduler waits on it
        # New leases wait in a plain list; only the scheduler moves them into the heap, and
        # most are finished (and dropped) by then: a flight shorter than ttl/3 costs an append.
        self._incoming: list[Lease] = []
        self._heap: list[tuple[float, int, Lease]] = []  # (when to look, seq, lease)
        self._seq = itertools.count(1)
        self._groups: dict[str, _Group] = {}
        self._thread: threading.Thread | None = None
        self._closed = getattr(self, "_closed", False)  # kept across fork
        self._wake_at = math.inf  # when the scheduler means to wake next
        self._counts = dict.fromkeys(_COUNTERS, 0)
        # Warnings wait here and are logged with the lock released (a slow log handler must
        # not hold up add()); at most _LOGS_PER_SECOND, the rest summed up.
        self._logs: list[tuple[str, tuple[object, ...]]] = []
        self._log_window = -math.inf
        self._logged = 0
        self._unlogged = 0

    # --- what the drivers call ----------------------------------------------------------------

    def add(self, lease: Lease) -> None:
        with self._lock:
            if self._closed:
                lease.lost.set()
                self._counts["lost_closed"] += 1
                return
            self._incoming.append(lease)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._schedule, name="dedupe-renewer", daemon=True
                )
                self._thread.start()
            # Wake the scheduler only if it must wake earlier than planned, or now and then
            # to drop finished leases, so a burst of short flights does not pile up.
            first = min(lease._next, lease.lost._deadline)
            if first < self._wake_at or len(self._incoming) % 1024 == 0:
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
            held = [lease for lease in self._incoming if lease.active]
            held += [lease for _, seq, lease in self._heap if lease._entry == seq and lease.active]
            self._incoming.clear()
            self._heap.clear()
            for lease in held:
                lease._entry = 0
                lease.active = False
                self._counts["lost_closed"] += 1
            self._cond.notify()
            for group in self._groups.values():
                group.queue.clear()
                group.cond.notify()
        for lease in held:
            lease.lost.set()
        if held:
            log.warning("renewer closed under %d leases; they count as lost", len(held))

    def pending(self) -> int:
        """Leases still renewed (not removed, not lost)."""
        with self._lock:
            queued = sum(1 for lease in self._incoming if lease.active)
            return queued + sum(
                1 for _, seq, lease in self._heap if lease._entry == seq and lease.active
            )

    def stats(self) -> dict[str, int]:
        """Counters: renewals_sent, renewal_batches (round trips), renewed, lost_<reason>
        (mismatch, clock, max_hold, error, closed), abandoned (owning loop closed), released
        (a renewal met the lock our own complete script had just deleted)."""
        with self._lock:
            return dict(self._counts)

    @property
    def lost(self) -> int:
        """Leases lost, every reason."""
        with self._lock:
            c = self._counts
            return sum(c[k] for k in c if k.startswith("lost_"))

    # --- the scheduler: no network I/O here ---------------------------------------------------

    def _push(self, at: float, lease: Lease) -> None:
        seq = next(self._seq)
        lease._entry = seq
        heapq.heappush(self._heap, (at, seq, lease))

    def _schedule(self) -> None:
        with self._lock:
            while not self._closed:
                for lease in self._incoming:
                    if lease.active:
                        self._push(min(lease._next, lease.lost._deadline), lease)
                self._incoming.clear()
                while self._heap:
                    at, seq, lease = self._heap[0]
                    if lease._entry != seq or not lease.active:
                        heapq.heappop(self._heap)  # stale entry, or the flight is over
                        if lease._entry == seq:
                            lease._entry = 0
                        continue
                    now = time.monotonic()
                    # Look early by up to a tenth of the interval: leases due close together
                    # go out in one batch. Deadlines are never looked at early.
                    if at > now + (0 if lease._busy else lease.interval / 10):
                        break
                    heapq.heappop(self._heap)
                    lease._entry = 0
                    self._visit(lease, now)
                if self._logs or self._unlogged:
                    self._flush_logs()
                    if self._incoming or (self._heap and self._heap[0][0] <= time.monotonic()):
                        continue
                self._wake_at = self._heap[0][0] if self._heap else math.inf
                if self._unlogged:  # wake to log the summary even with nothing due
                    self._wake_at = min(self._wake_at, self._log_window + 1.0)
                if math.isinf(self._wake_at):
                    self._cond.wait()
                else:
                    self._cond.wait(max(0.0, self._wake_at - time.monotonic()))

    def _visit(self, lease: Lease, now: float) -> None:
        signal = lease.lost
        if now >= lease.hold_until:
            lease.active = False  # max_hold: renewal stops for good, so a waiter takes over
            self._report(lease, now)
            return
        if not lease._reported and (signal._set or now >= signal._deadline):
            self._report(lease, now)  # lost by the clock: the leader knows; renewal goes on
        if lease.loop is not None and lease.loop.is_closed():
            lease.active = False
            self._counts["abandoned"] += 1
            self._warn("lease on %r abandoned: its event loop is closed", lease.job_id)
            return
        # Look again at the deadline (to report a loss on time), or, once lost, at the
        # hold's end; a settled renewal schedules its own next look.
        later = min(signal._deadline if not lease._reported else math.inf, lease.hold_until)
        if lease._busy:
            self._push(later, lease)  # still in flight: look again then
            return
        lease._busy = True
        try:
            name = "" if self._group_of is None else self._group_of(lease.lock_key)
        except Exception:  # e.g. no slot map yet: renew_many routes by key anyway
            name = ""
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
        self._push(later, lease)

    def _report(self, lease: Lease, now: float) -> None:
        """The lease counts as lost (by the clock, or max_hold): tell the leader, count and
        log it once. Whether renewal goes on is the caller's decision."""
        if lease._reported:
            return
        lease._reported = True
        if now >= lease.hold_until:
            reason, why = "max_hold", f"held longer than max_hold={lease.max_hold}s"
        elif lease._error is not None:
            reason, why = "error", f"no renewal confirmed within the lease: {lease._error}"
        else:
            reason, why = "clock", "no renewal confirmed within the lease (no reply in time)"
        self._counts[f"lost_{reason}"] += 1
        lease.lost.set()
        self._warn("lease on %r lost: %s", lease.job_id, why)

    def _warn(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._log_window >= 1.0:
            self._log_window, self._logged = now, 0
        if self._logged < _LOGS_PER_SECOND:
            self._logged += 1
            self._logs.append((msg, args))
        else:
            self._unlogged += 1

    def _flush_logs(self) -> None:
        """Log what waits, with the lock released for the while (called holding it)."""
        logs, self._logs = self._logs, []
        if self._unlogged and time.monotonic() - self._log_window >= 1.0:
            logs.append(("%d more leases lost or abandoned (see stats())", (self._unlogged,)))
            self._unlogged = 0
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
                batch = [lease for lease in group.queue[: self._batch_max] if lease.active]
                del group.queue[: self._batch_max]
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
                self._settle(batch, sent, done, replies, error)
                if self._logs:
                    self._flush_logs()

    def _settle(
        self,
        batch: list[Lease],
        sent: float,
        done: float,
        replies: Sequence[int],
        error: str | None,
    ) -> None:
        c = self._counts
        c["renewal_batches"] += 1
        c["renewals_sent"] += len(batch)
        earliest = math.inf
        for i, lease in enumerate(batch):
            lease._busy = False
            if not lease.active or self._closed:
                continue
            reply = RENEW_UNKNOWN if error is not None else replies[i]
            if reply == 1:
                c["renewed"] += 1
                deadline = min(sent + lease.ttl - lease.margin, lease.hold_until)
                if not lease.lost.extend(deadline):
                    # Lost by the clock before this reply came: the leader was told, and
                    # stays told; Redis still says ours, so renewal goes on while it runs.
                    self._report(lease, done)
                lease.sent_at, lease._error = sent, None
                lease._next = sent + lease.interval
            elif reply == 0 and lease.completing:
                lease.active = False  # our complete script deleted the lock: released
                c["released"] += 1
                continue
            elif reply == 0:
                lease.active = False
                lease._error = "mismatch"
                c["lost_mismatch"] += 1
                lease.lost.set()
                self._warn(
                    "lease on %r lost: the lock is no longer ours (expired or taken over)",
                    lease.job_id,
                )
                continue
            else:
                # No answer: try again soon, sooner while the lease may still be alive.
                lease._error = error or "an error reply"
                left = lease.lost._deadline - done
                lease._next = done + (
                    max(0.0, min(lease.interval / 3, left / 2)) if left > 0 else lease.interval / 3
                )
            # Look at the deadline too, to report a loss on time (once reported, no need).
            at = lease._next if lease._reported else min(lease._next, lease.lost._deadline)
            self._push(at, lease)
            earliest = min(earliest, at)
        if earliest < self._wake_at:
            self._wake_at = earliest
            self._cond.notify()

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
    script: EVAL once (which caches it), EVALSHA for the rest, in one pipeline."""
    calls = [renew_call(key, value, ttl_ms) for key, value, ttl_ms in items]
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


def _note_moved(cluster: Any, replies: list[Any]) -> None:
    # A slot moved: patch the slot map (no I/O), so the next renewal goes to the new owner.
    manager = cluster.nodes_manager
    for reply in replies:
        if isinstance(reply, MovedError):
            try:
                if hasattr(manager, "move_slot"):
                    manager.move_slot(reply)
                else:  # redis-py < 5.1
                    manager.update_moved_exception(reply)
            except Exception:
                log.debug("could not patch the slot map", exc_info=True)
            return


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
        _note_moved(c, replies)
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
    global _guard
    _guard = threading.Lock()  # a thread of the parent may have held it at fork time
    for renewer in list(_renewers):
        renewer._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
