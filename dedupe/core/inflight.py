"""The process's table of flights in progress: callers of a busy key join its entry."""

from __future__ import annotations

import threading
import time
from typing import Any, Final, NamedTuple, Protocol

from dedupe.core.sealing import Outcome
from dedupe.core.signals import Latch

__all__ = ["RETRY", "Entry", "InFlight", "InFlightInfo", "Served"]


class _Retry:
    def __repr__(self) -> str:
        return "RETRY"


RETRY: Final = _Retry()
"""An entry's result when its driver stopped without an outcome: joiners start over."""


class Cancellable(Protocol):
    """What runs an asyncio flight (Entry.task): an asyncio.Task, or what stands in for it."""

    def done(self) -> bool: ...
    def cancel(self) -> bool: ...


class Entry(Latch["Outcome | _Retry"]):
    """One key's flight in this process; its first caller drives it, the others wait here.
    It is its own ``result`` latch (one object a flight, not two: issue 23's memory per
    flight)."""

    __slots__ = (
        "fallback",
        "job_id",
        "leading",
        "role",
        "started",
        "task",
        "token",
        "trace",
        "waiters",
    )

    def __init__(self) -> None:
        # result: set once, by InFlight.finish() (under its lock and the Latch's own): the
        # outcome.
        Latch.__init__(self)
        self.waiters = 1  # asyncio callers still awaiting it: guarded by InFlight._lock
        # asyncio only, on its loop's thread: what runs the flight, its task or (while the
        # flight waits with no task: aio's parked flight) its driver; set by the caller that
        # launched it and by the driver, read by the last caller to leave (done, cancel).
        self.task: Cancellable | None = None
        # Written only by the thread or task that drives the flight (False -> True once it
        # leads, with no lock: one store); read without a lock by callers deciding whether
        # their wait_timeout bounds waiting on it. A stale False costs one wait's bound.
        self.leading = False
        # Written by the driving side before finish() resolves the entry, read by the
        # callers who joined only after it resolved (the Latch orders the two): no lock.
        self.role = "leader"  # how the flight came by the outcome (see Served.role)
        self.token = 0  # the fencing token of the outcome's lease (for dedupe.ops.events)
        self.trace = b""  # the traceparent of the span the function ran under
        self.job_id = ""  # set by its creator right after join(), before anyone reads it
        self.started = time.monotonic()
        # A stale value the callers may take at their soft_timeout (Offer): written once by
        # the driving side (one store, then the latch is poked), read without a lock.
        self.fallback: Any = None  # protocol.Finished | None

    @property
    def result(self) -> Latch[Outcome | _Retry]:
        """Set once with the flight's outcome (or RETRY): the entry itself."""
        return self

    def offer(self, fallback: Any) -> None:
        """A stale value to fall back on: waiting callers look again at their soft_timeout."""
        self.fallback = fallback
        self.result.poke()


class InFlight:
    """Entries by key. Resolving an entry removes it in the same step, so none is joined late.

    Lock order: ``_lock``, then an entry's Latch (finish() sets it holding ``_lock``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}  # guarded by _lock

    def join(self, key: str) -> tuple[Entry, bool]:
        """The key's entry, and whether this caller created it (and so must drive it)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = Entry()
                return entry, True
            entry.waiters += 1
            return entry, False

    def finish(self, key: str, entry: Entry, result: Outcome | _Retry) -> None:
        with self._lock:
            if self._entries.get(key) is entry:
                del self._entries[key]
            entry.result.set(result)

    def void(self, key: str) -> Entry | None:
        """Detach the key's entry (forget): callers that come later start a flight of their
        own; those who joined it already still get its outcome."""
        with self._lock:
            return self._entries.pop(key, None)

    def leave(self, entry: Entry) -> int:
        """An async caller stopped waiting; returns how many still wait."""
        with self._lock:
            entry.waiters -= 1
            return entry.waiters

    def __len__(self) -> int:
        return len(self._entries)

    def snapshot(self, kind: str) -> list[InFlightInfo]:
        """What runs now (for SingleFlight.inflight())."""
        now = time.monotonic()
        with self._lock:
            entries = list(self._entries.values())
        return [
            InFlightInfo(
                e.job_id, "leading" if e.leading else "following", e.waiters, now - e.started, kind
            )
            for e in entries
        ]


class InFlightInfo(NamedTuple):
    """One flight of this process, as ``SingleFlight.inflight()`` lists it."""

    job_id: str
    state: str  # "leading" (this process runs the function) or "following" (waiting on Redis)
    waiters: int  # callers of this process on it (async: still awaiting; sync: at least 1)
    age_s: float  # since its first caller joined
    driver: str  # "sync" or "async"


class Served(NamedTuple):
    """A call's value with how it came by it (``detail=True``), like Go's ``shared``.

    ``role``: "leader" (this call ran the function), "local" (joined a call of this
    process), "remote" (another process's leader), "kept" (a value Redis kept from a flight
    that had finished), "copy" (this process's local copy of a kept value: ``local_cache``).
    ``shared`` is True unless this call ran the function itself. ``stale``:
    the value is past its ``result_ttl`` (served by stale_while_revalidate, stale_if_error
    or soft_timeout); ``age``: seconds since the value was produced, by the server's clock
    (0 for a value produced by this call's flight).
    """

    value: Any
    shared: bool
    role: str
    stale: bool = False
    age: float = 0.0
