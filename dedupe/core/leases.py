"""Leases and every decision about renewing them, with no threads, locks or I/O.

A lease counts as lost as soon as the local clock says it may have expired: at
``sent + ttl - margin``, where ``sent`` is when the last renewal that Redis confirmed was sent
(the acquire's write for the first period) and ``margin = min(ttl/3, max(10 ms, 5% ttl))``
covers clock-rate differences and the delay between that instant and the leader's next look.
``LostSignal.is_set()`` computes this from the clock on every call, so it is right even when no
thread has run.

``LeaseBook`` decides everything else a renewer does: when to look at each lease, which to
renew now (in batches, by group: one per Cluster node), what each reply means, when a lease
counts as lost and why, and what to count and log. It is fed the time and the replies; the
threaded ``renewal.Renewer`` carries its decisions over Redis, and the simulator (tests/sim)
drives the same book on simulated clocks. Renewal is owner-checked in Redis and stops for good
on a mismatch, at ``max_hold``, or when the lease's asyncio loop is closed. A loss by the clock
is reported to the leader at once, but renewal goes on while the driver holds the lease: Redis
may still hold it (a renewer starved past the deadline, a slow link), and a renewal that finds
it ours keeps a second run from starting beside a live leader; one that finds it gone stops.

Locks: ``_guard`` (module-level) guards every LostSignal's ``_set``, ``_event`` and
``_waiters`` and writes of ``_deadline``; it is a leaf. A LeaseBook and the fields its leases
mark "under the book's lock" are guarded by the lock of the Renewer that carries it, which may
be held while taking ``_guard``, never the other way round.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

__all__ = [
    "COUNTERS",
    "RENEW_UNKNOWN",
    "Lease",
    "LeaseBook",
    "LostSignal",
    "lease_margin",
]

RENEW_UNKNOWN: Final = -1
"""A renewal reply: no answer for that lease this time (an error reply); try again."""

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

    __slots__ = ("_clock", "_deadline", "_event", "_set", "_waiters")

    def __init__(
        self, deadline: float = math.inf, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock  # the monotonic clock the deadline is on
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
        if self._clock() < self._deadline:
            return False
        return self._expire()

    def _expire(self) -> bool:
        # Re-check under the lock: a renewal may have raised the deadline just now. Either way
        # the answer is stable: once we say lost, _set makes it stay lost.
        with _guard:
            if not self._set and self._clock() < self._deadline:
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
            if self._clock() < self._deadline:
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
        end = math.inf if timeout is None else self._clock() + max(0.0, timeout)
        try:
            while True:
                now = self._clock()
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


class _Terms:
    """A lease's terms, the same for every lease of one lock_ttl and max_hold: shared, not
    copied into each lease (five numbers, some 160 bytes a leader: issue 23's memory per
    flight). Never changed once made."""

    __slots__ = ("interval", "margin", "max_hold", "ttl", "ttl_ms")

    def __init__(self, ttl: float, max_hold: float | None) -> None:
        margin = ttl * 0.05  # lease_margin(ttl), inlined
        if margin < 0.010:
            margin = 0.010
        if margin > ttl / 3:
            margin = ttl / 3
        self.ttl = ttl
        self.ttl_ms = int(ttl * 1000 + 0.5) or 1
        self.interval = ttl / 3
        self.margin = margin
        self.max_hold = max_hold


_terms: dict[tuple[float, float | None], _Terms] = {}  # a few per process: one per setting


def _terms_of(ttl: float, max_hold: float | None) -> _Terms:
    terms = _terms.get((ttl, max_hold))
    if terms is None:
        if len(_terms) >= 256:  # settings made on the fly: keep the table small
            _terms.clear()
        terms = _terms[ttl, max_hold] = _Terms(ttl, max_hold)  # a race makes an equal one
    return terms


class Lease(LostSignal):
    """One leader's hold on a lock key, from the acquire until the driver removes it; it is
    its own LostSignal (``lost``: one object a leader, not two; issue 23's memory per flight).

    ``lock_key``: the key, or the job's Names (its ``lock``, made when the renewer needs it:
    a leader holds no string of it). ``acquired_at``: monotonic time the acquire script was
    written to the socket (default: now), the start of the first period. ``max_hold``:
    seconds after which renewal stops and the lease counts as lost (None: no bound).
    ``loop``: the asyncio loop of an async leader; once it is closed the lease is no longer
    renewed. ``clock``: the monotonic clock all its times are on.
    """

    __slots__ = (
        "_busy",
        "_entry",
        "_error",
        "_key",
        "_next",
        "_reported",
        "active",
        "completing",
        "hold_until",
        "job_id",
        "loop",
        "sent_at",
        "terms",
        "value",
    )

    def __init__(
        self,
        job_id: str,
        lock_key: str | HasLock,
        value: str,
        ttl: float,
        *,
        acquired_at: float | None = None,
        max_hold: float | None = 300.0,
        loop: asyncio.AbstractEventLoop | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ttl > 0:
            raise ValueError(f"a lease's ttl must be positive, not {ttl!r}")
        # Plain arithmetic, no calls but the terms': a lease is made for every flight that
        # leads.
        start = clock() if acquired_at is None else acquired_at
        if max_hold is None:
            hold_until = math.inf
        elif max_hold > 0:
            hold_until = start + max_hold
        else:
            raise ValueError(f"max_hold must be positive or None, not {max_hold!r}")
        terms = _terms_of(ttl, max_hold)
        deadline = start + ttl - terms.margin
        # Set here and never changed:
        self.job_id = job_id
        self._key = lock_key
        self.value = value
        self.terms = terms
        self.hold_until = hold_until
        self.loop = loop
        LostSignal.__init__(self, deadline if deadline < hold_until else hold_until, clock)
        # Written by the driver with no lock (one store, O(1)); the watchdog reads it and
        # tolerates a stale True (a renewal of a finished lease is harmless: compare-and-expire).
        self.active = True
        # Set (the same way) just before the complete script is sent: from then on a "not
        # ours" reply means our own complete released the lock, not that the lease was lost.
        self.completing = False
        # Under the lock of the Renewer that carries its LeaseBook:
        self.sent_at = start  # send time of the last confirmed renewal (or of the acquire)
        self._next = start + terms.interval  # when to send the next renewal
        self._busy = False  # queued at or in flight with a worker
        self._entry = 0  # sequence number of this lease's one live heap entry (0: none)
        self._error: str | None = None  # the last renewal error, until a renewal succeeds
        self._reported = False  # its loss was counted and logged (once)

    @property
    def lost(self) -> LostSignal:
        """Set once the lease is lost (the watchdog, or the clock): the lease itself."""
        return self

    @property
    def lock_key(self) -> str:
        key = self._key
        return key if type(key) is str else key.lock  # type: ignore[union-attr]

    @property
    def ttl(self) -> float:
        return self.terms.ttl

    @property
    def ttl_ms(self) -> int:
        return self.terms.ttl_ms

    @property
    def interval(self) -> float:
        return self.terms.interval

    @property
    def margin(self) -> float:
        return self.terms.margin

    @property
    def max_hold(self) -> float | None:
        return self.terms.max_hold


class HasLock(Protocol):
    """What names a lease's lock key: keys.Names."""

    @property
    def lock(self) -> str: ...


_LOGS_PER_SECOND: Final = 20
_MIN_BATCH: Final = 256  # a round trip sends at least this many (when queued)
COUNTERS: Final = (
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


class LeaseBook:
    """Every renewal decision for a set of leases; time and replies are passed in.

    ``group_of(lock_key)`` names the group a key renews through (a Cluster node; default:
    one group). Not thread-safe: its carrier holds one lock around every call.
    """

    def __init__(self, group_of: Callable[[str], str] | None = None) -> None:
        self._group_of = group_of
        # New leases wait in a plain list; due() moves them into the heap, and most are
        # finished (and dropped) by then: a flight shorter than ttl/3 costs an append.
        self.incoming: list[Lease] = []
        self._heap: list[tuple[float, int, Lease]] = []  # (when to look, seq, lease)
        self._seq = itertools.count(1)
        self.closed = False
        self.counts = dict.fromkeys(COUNTERS, 0)
        # Warnings to log, at most _LOGS_PER_SECOND, the rest summed up (take_logs).
        self._logs: list[tuple[str, tuple[object, ...]]] = []
        self._log_window = -math.inf
        self._logged = 0
        self._unlogged = 0

    # --- leases in and out --------------------------------------------------------------------

    def add(self, lease: Lease) -> float | None:
        """Take a lease; when it must first be looked at (None: the book is closed, and the
        lease counts as lost at once)."""
        if self.closed:
            lease.lost.set()
            self.counts["lost_closed"] += 1
            return None
        self.incoming.append(lease)
        return min(lease._next, lease.lost._deadline)

    def close(self) -> list[Lease]:
        """Stop: the leases still held count as lost (the caller sets their signals)."""
        self.closed = True
        held = [lease for lease in self.incoming if lease.active]
        held += [lease for _, seq, lease in self._heap if lease._entry == seq and lease.active]
        self.incoming.clear()
        self._heap.clear()
        for lease in held:
            lease._entry = 0
            lease.active = False
            self.counts["lost_closed"] += 1
        return held

    def pending(self) -> int:
        """Leases still renewed (not removed, not lost for good)."""
        queued = sum(1 for lease in self.incoming if lease.active)
        return queued + sum(
            1 for _, seq, lease in self._heap if lease._entry == seq and lease.active
        )

    # --- looking at leases ----------------------------------------------------------------------

    def due(self, now: float) -> list[tuple[str, Lease]]:
        """Look at every lease due by ``now``: (group, lease) for each to renew now."""
        for lease in self.incoming:
            if lease.active:
                self._push(min(lease._next, lease.lost._deadline), lease)
        self.incoming.clear()
        out: list[tuple[str, Lease]] = []
        heap = self._heap
        while heap:
            at, seq, lease = heap[0]
            if lease._entry != seq or not lease.active:
                heapq.heappop(heap)  # stale entry, or the flight is over
                if lease._entry == seq:
                    lease._entry = 0
                continue
            # Look early by up to a tenth of the interval: leases due close together go out
            # in one batch. Deadlines are never looked at early.
            if at > now + (0 if lease._busy else lease.interval / 10):
                break
            heapq.heappop(heap)
            lease._entry = 0
            group = self._visit(lease, now)
            if group is not None:
                out.append((group, lease))
        return out

    def next_look(self) -> float:
        """When due() next has something to do (inf: nothing)."""
        at = self._heap[0][0] if self._heap else math.inf
        if self._unlogged:  # the summary line of warnings over the rate
            at = min(at, self._log_window + 1.0)
        return at

    def _push(self, at: float, lease: Lease) -> None:
        seq = next(self._seq)
        lease._entry = seq
        heapq.heappush(self._heap, (at, seq, lease))

    def _visit(self, lease: Lease, now: float) -> str | None:
        signal = lease.lost
        if now >= lease.hold_until:
            lease.active = False  # max_hold: renewal stops for good, so a waiter takes over
            self._report(lease, now)
            return None
        if not lease._reported and (signal._set or now >= signal._deadline):
            self._report(lease, now)  # lost by the clock: the leader knows; renewal goes on
        if lease.loop is not None and lease.loop.is_closed():
            lease.active = False
            self.counts["abandoned"] += 1
            self._warn(now, "lease on %r abandoned: its event loop is closed", lease.job_id)
            return None
        # Look again at the deadline (to report a loss on time), or, once lost, at the
        # hold's end; a settled renewal schedules its own next look.
        later = min(signal._deadline if not lease._reported else math.inf, lease.hold_until)
        self._push(later, lease)
        if lease._busy:
            return None  # still in flight: look again then
        lease._busy = True
        try:
            return "" if self._group_of is None else self._group_of(lease.lock_key)
        except Exception:  # e.g. no slot map yet: the renewal routes by key anyway
            return ""

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
        self.counts[f"lost_{reason}"] += 1
        lease.lost.set()
        self._warn(now, "lease on %r lost: %s", lease.job_id, why)

    def batch_limit(self, head: Lease, now: float, cost: float, batch_max: int) -> int:
        """How many leases of a group's queue (in the order due() gave them) to send in one
        round trip, starting with ``head``: as many as ``cost`` seconds a lease (what the
        group's last answered round trip took; 0: not known) lets come back within half the
        time ``head`` has left before it counts as lost; at least _MIN_BATCH, at most
        ``batch_max``. On schedule that is the whole queue. After a pause the backlog goes out
        most urgent first, in round trips short enough for their replies to come back in
        time, not in one pipeline that answers none of them until all went through."""
        # From the last confirmed send, also for a lease already reported lost: Redis may
        # still hold it, and that renewal is as urgent.
        left = head.sent_at + head.ttl - head.margin - now
        if cost <= 0 or left <= 0:
            return batch_max  # no measure yet, or too late to win time for the head
        return min(batch_max, max(int(left / 2 / cost), _MIN_BATCH))

    # --- replies ----------------------------------------------------------------------------

    def settle(
        self,
        batch: Sequence[Lease],
        sent: float,
        done: float,
        replies: Sequence[int],
        error: str | None,
    ) -> float:
        """A batch's round trip (sent at ``sent``, answered at ``done``) gave ``replies``
        (1 renewed, 0 not ours, RENEW_UNKNOWN no answer), or failed with ``error``. Returns
        the earliest next look it scheduled (inf: none)."""
        c = self.counts
        c["renewal_batches"] += 1
        c["renewals_sent"] += len(batch)
        earliest = math.inf
        for i, lease in enumerate(batch):
            lease._busy = False
            if not lease.active or self.closed:
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
                    done,
                    "lease on %r lost: the lock is no longer ours (expired or taken over)",
                    lease.job_id,
                )
                continue
            else:
                # No answer: try again soon, sooner while the lease may still be alive (but
                # not ever sooner as its deadline nears: at least half a margin apart).
                lease._error = error or "an error reply"
                left = lease.lost._deadline - done
                pause = min(lease.interval / 3, left / 2) if left > 0 else lease.interval / 3
                lease._next = done + max(pause, lease.margin / 2)
            # Look at the deadline too, to report a loss on time (once reported, no need).
            at = lease._next if lease._reported else min(lease._next, lease.lost._deadline)
            self._push(at, lease)
            earliest = min(earliest, at)
        return earliest

    # --- what to log ----------------------------------------------------------------------

    def _warn(self, now: float, msg: str, *args: object) -> None:
        if now - self._log_window >= 1.0:
            self._log_window, self._logged = now, 0
        if self._logged < _LOGS_PER_SECOND:
            self._logged += 1
            self._logs.append((msg, args))
        else:
            self._unlogged += 1

    def take_logs(self, now: float) -> list[tuple[str, tuple[object, ...]]]:
        """The warnings to log now (log them without the carrier's lock held)."""
        logs, self._logs = self._logs, []
        if self._unlogged and now - self._log_window >= 1.0:
            logs.append(("%d more leases lost or abandoned (see stats())", (self._unlogged,)))
            self._unlogged = 0
        return logs


def _after_fork_in_child() -> None:
    global _guard
    _guard = threading.Lock()  # a thread of the parent may have held it at fork time


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
