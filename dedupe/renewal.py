"""The lease watchdog: one thread per backend renews every running leader's lease.

It runs off the callers' threads and off any event loop, so a busy loop or a function that
holds the GIL in long stretches delays renewal only as much as the GIL does. Renewal is
owner-checked in Redis and stops for good on a mismatch; the running function learns of a
loss through its Flight.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

__all__ = ["Lease", "LostSignal", "Renewer"]

log = logging.getLogger("dedupe")


class LostSignal:
    """Set when a lease is lost. Its threading.Event is made only if someone waits on it:
    most flights never look, and an Event costs more than the rest of a lease."""

    __slots__ = ("_event", "_set")
    _guard = threading.Lock()

    def __init__(self) -> None:
        self._set = False
        self._event: threading.Event | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._guard:
            self._set = True
            event = self._event
        if event is not None:
            event.set()

    def event(self) -> threading.Event:
        with self._guard:
            if self._event is None:
                self._event = threading.Event()
                if self._set:
                    self._event.set()
            return self._event


class Lease:
    """One leader's hold on a lock key."""

    __slots__ = ("active", "job_id", "last_ok", "lock_key", "lost", "ttl", "value")

    def __init__(self, job_id: str, lock_key: str, value: str, ttl: float) -> None:
        self.job_id = job_id
        self.lock_key = lock_key
        self.value = value
        self.ttl = ttl
        self.lost = LostSignal()
        self.active = True
        self.last_ok = time.monotonic()

    @property
    def interval(self) -> float:
        return self.ttl / 3


RenewFn = Callable[[str, str, int], int]
"""renew(lock_key, lock_value, ttl_ms) -> 1 if still ours and extended, else 0."""


class Renewer:
    """Renews leases about every ttl/3 until they are removed or found lost."""

    def __init__(self, renew: RenewFn) -> None:
        self._renew = renew
        self._cond = threading.Condition(threading.Lock())
        # New leases wait in a plain list; only the thread moves them into the heap, and most
        # are finished (and dropped) by then: a flight shorter than ttl/3 costs an append.
        self._incoming: list[Lease] = []
        self._heap: list[tuple[float, int, Lease]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._wake_at = float("inf")  # when the thread means to wake next
        self.lost = 0

    def add(self, lease: Lease) -> None:
        due = lease.last_ok + lease.interval
        with self._cond:
            self._incoming.append(lease)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="dedupe-renewer", daemon=True
                )
                self._thread.start()
            # Wake the thread only if it must now wake earlier than it planned.
            if due < self._wake_at:
                self._wake_at = due
                self._cond.notify()

    def remove(self, lease: Lease) -> None:
        # Lazy: a finished lease is dropped when the thread next looks at it. A renewal already
        # in flight is harmless: completion deletes the lock, and renewal only extends a lock
        # that is still ours.
        lease.active = False

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            queued = sum(1 for lease in self._incoming if lease.active)
            return queued + sum(1 for _, _, lease in self._heap if lease.active)

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                for lease in self._incoming:
                    if lease.active:
                        due = lease.last_ok + lease.interval
                        heapq.heappush(self._heap, (due, next(self._seq), lease))
                self._incoming.clear()
                while self._heap and not self._heap[0][2].active:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._wake_at = float("inf")
                    self._cond.wait()
                    continue
                due, _, lease = self._heap[0]
                now = time.monotonic()
                if due > now:
                    self._wake_at = due
                    self._cond.wait(due - now)
                    continue
                heapq.heappop(self._heap)
                self._wake_at = now  # busy: no need to be woken
                self._renew_one(lease, now)

    def _renew_one(self, lease: Lease, now: float) -> None:
        # Never hold the condition across a round trip: new leaders must not queue behind it.
        self._cond.release()
        try:
            ok = self._renew(lease.lock_key, lease.value, max(1, int(lease.ttl * 1000)))
        except Exception as exc:
            error: Exception | None = exc
        else:
            error = None
        finally:
            self._cond.acquire()
        if not lease.active:
            return
        if error is not None:
            # Redis unreachable: keep trying while the lease may still be alive.
            left = lease.last_ok + lease.ttl - time.monotonic()
            if left <= 0:
                self._lose(lease, f"renewal failed for longer than the lease: {error}")
                return
            retry = min(lease.interval / 3, left / 2)
            heapq.heappush(self._heap, (now + retry, next(self._seq), lease))
            return
        if not ok:
            self._lose(lease, "the lock is no longer ours (expired or taken over)")
            return
        lease.last_ok = now
        heapq.heappush(self._heap, (now + lease.interval, next(self._seq), lease))

    def _lose(self, lease: Lease, why: str) -> None:
        self.lost += 1
        lease.active = False
        lease.lost.set()
        log.warning("dedupe: lease on %r lost: %s", lease.job_id, why)
