"""One small event surface: what flights did, for metrics, traces and logs to hang on.

The drivers report each call once, when it ends, as an :class:`Event` whose ``kind`` is
one of :data:`CALL_KINDS`; a few moments inside a call or outside any call (a takeover, a
lost lease, a rejected envelope, a local fallback run) are reported as events of
:data:`MARK_KINDS`. Adapters (``dedupe.ops.otel``, ``dedupe.ops.prometheus``, or any function)
subscribe with :func:`add_listener`.

Cost when nothing listens: every call site in dedupe is guarded by one module attribute
read, ``if events.enabled:``; no Event is built, no clock is read.

A listener that raises is logged once (per listener) and otherwise ignored: observing a
flight never breaks it.

Tracing: a tracer (see :func:`add_tracer`; ``dedupe.ops.otel`` installs one) opens a span when
a call begins (:func:`begin`) and closes it when the call's event is emitted
(:meth:`Call.end`). While it is open it is the current span, so spans the leader's function
makes nest under it, and :func:`trace_context` returns its W3C ``traceparent``: the leader
seals that into the outcome record, and a follower that reads the record hands it to
:meth:`Call.end` as ``leader_trace``, which links the follower's span to the leader's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from dedupe.core.keys import Names
from dedupe.errors import BackendUnavailable, WaitTimeout

__all__ = [
    "CALL_KINDS",
    "KINDS",
    "MARK_KINDS",
    "OUTCOMES",
    "ROLES",
    "Call",
    "Event",
    "Listener",
    "Tracer",
    "add_listener",
    "add_tracer",
    "begin",
    "emit",
    "enabled",
    "listeners",
    "mark",
    "outcome_of",
    "trace_context",
    "tracers",
]


# Seconds, from a cache hit's round-trip to a slow job; both adapters' histograms
# (OTel's and Prometheus's default buckets assume other scales).
DURATION_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)

log = logging.getLogger(__name__)

Kind = Literal[
    "lead",
    "follow_local",
    "follow_remote",
    "kept",
    "timeout",
    "backend_error",
    "failed",
    "takeover",
    "lease_lost",
    "rejected",
    "local_run",
    "refresh",
    "stood_in",
]

CALL_KINDS: Final = frozenset(
    {"lead", "follow_local", "follow_remote", "kept", "timeout", "backend_error", "failed"}
)
"""Kinds that end a call: exactly one per call, so counting them counts calls. ``failed``:
the call ended with an exception before it had a role (a permission error from Redis, an
interrupted or cancelled wait)."""
MARK_KINDS: Final = frozenset(
    {"takeover", "lease_lost", "rejected", "local_run", "refresh", "stood_in"}
)
"""Kinds that mark a moment: several, or none, per call. ``refresh``: a background run began
(stale_while_revalidate, early_refresh); ``stood_in``: a run failed and a stale value stood
in for its error (stale_if_error; ``detail`` names the error)."""
KINDS: Final = CALL_KINDS | MARK_KINDS

ROLES: Final = ("leader", "local", "remote", "kept", "copy")
"""leader: ran the function; local: shared another caller's run in this process; remote:
got the outcome of a leader in another process through Redis; kept: was served an outcome
Redis kept from an earlier run (``result_ttl``); copy: was served this process's local copy
of one (``local_cache``), with no round trip."""
OUTCOMES: Final = ("value", "error", "timeout", "backend_error")

# The kind a finished call reports, by the role it ended in.
_KIND_OF_ROLE: Final[dict[str, Kind]] = {
    "leader": "lead",
    "local": "follow_local",
    "remote": "follow_remote",
    "kept": "kept",
    "copy": "kept",  # a kept value too; the role tells the local copy apart
}


@dataclass(frozen=True, slots=True)
class Event:
    """Something one flight did. Durations are in seconds; None where they do not apply."""

    kind: Kind
    job_id: str
    prefix: str = ""  # the SingleFlight's key prefix: which instance (low cardinality)
    role: str = ""  # one of ROLES; "" where no role applies or none was reached
    outcome: str = ""  # one of OUTCOMES for CALL_KINDS; "" for MARK_KINDS
    duration_s: float | None = None  # the whole call, as its caller saw it
    run_s: float | None = None  # the function's own run (leaders and local runs)
    wait_s: float | None = None  # time spent waiting on another caller's run
    token: int = 0  # the fencing token of the lease involved, 0 if none
    leader_trace: bytes = b""  # the leader's traceparent, as read from its outcome record
    detail: str = ""  # free text: why an envelope was rejected, which error type, ...
    # Why the call was served a stale value: "revalidate", "error" or "timeout"; "" if not.
    stale: str = ""
    age_s: float | None = None  # the served value's age (server's clock), where one was served


class Listener(Protocol):
    def __call__(self, event: Event, /) -> None: ...


class Tracer(Protocol):
    """What a tracing adapter implements; dedupe.ops.otel has the only one dedupe ships."""

    def start(self, job_id: str, prefix: str, /) -> object:
        """A call begins: open its span, make it current; return a handle for ``finish``."""

    def finish(self, handle: object, event: Event, /) -> None:
        """The call ended with ``event``: close the span ``start`` opened."""

    def context(self) -> bytes:
        """The current span's W3C traceparent, b"" if there is none."""


listeners: tuple[Listener, ...] = ()
"""Installed listeners. Replaced, never mutated, so a reader needs no lock."""
tracers: tuple[Tracer, ...] = ()
enabled: bool = False
"""True while any listener or tracer is installed: the one check on the hot path."""

_lock = threading.Lock()  # guards installing and removing (listeners, tracers, enabled)
_complained: set[int] = set()  # ids of listeners whose failure was already logged


def _refresh() -> None:
    global enabled
    enabled = bool(listeners or tracers)


def add_listener(fn: Listener) -> Callable[[], None]:
    """Call ``fn(event)`` for every event, in the thread that produced it; returns a remover.

    ``fn`` must be quick and must not block: it runs on the flight's path (or in dedupe's
    renewal thread for ``lease_lost``).
    """
    global listeners
    if not callable(fn):
        raise TypeError(f"a listener must be callable, not {type(fn).__name__}")
    with _lock:
        listeners = (*listeners, fn)
        _refresh()

    def remove() -> None:
        global listeners
        with _lock:
            kept = list(listeners)
            if fn in kept:
                kept.remove(fn)
            listeners = tuple(kept)
            _refresh()

    return remove


def add_tracer(tracer: Tracer) -> Callable[[], None]:
    """Install a tracing adapter (see :class:`Tracer`); returns a remover."""
    global tracers
    for name in ("start", "finish", "context"):
        if not callable(getattr(tracer, name, None)):
            raise TypeError(f"a tracer needs a {name}() method; {type(tracer).__name__} has none")
    with _lock:
        tracers = (*tracers, tracer)
        _refresh()

    def remove() -> None:
        global tracers
        with _lock:
            tracers = tuple(t for t in tracers if t is not tracer)
            _refresh()

    return remove


def _complain(what: object, exc: BaseException) -> None:
    key = id(what)
    if key in _complained:
        return
    _complained.add(key)
    log.warning(
        "event listener %r raised %s: %s (ignored; logged once per listener)",
        what,
        type(exc).__name__,
        exc,
        exc_info=exc,
    )


def emit(event: Event) -> None:
    """Hand ``event`` to every listener; a listener's exception is logged once, never raised."""
    for fn in listeners:
        try:
            fn(event)
        except Exception as exc:
            _complain(fn, exc)


def _split(job: Names | str) -> tuple[str, str]:
    if isinstance(job, str):
        return job, ""
    channel = job.channel  # "<prefix>:{<tag>}"; a prefix never holds a brace
    return job.job_id, channel[: channel.find(":{")]


def mark(kind: Kind, job: Names | str, *, token: int = 0, role: str = "", detail: str = "") -> None:
    """Emit a moment (one of MARK_KINDS): a takeover, a lost lease, a rejection, a local run.

    ``job`` is the job's Names (which also tell the prefix), or its bare id.
    """
    job_id, prefix = _split(job)
    emit(Event(kind, job_id, prefix, role=role, token=token, detail=detail))


def outcome_of(error: BaseException | None) -> str:
    """The ``outcome`` a call that ended with ``error`` reports (None: it got a value)."""
    if error is None:
        return "value"
    if isinstance(error, WaitTimeout):
        return "timeout"
    if isinstance(error, BackendUnavailable):
        return "backend_error"
    return "error"


def trace_context() -> bytes:
    """The current span's W3C traceparent, for the leader to seal into its outcome record.

    b"" when no tracer is installed, or there is no current span.
    """
    for tracer in tracers:
        try:
            trace = tracer.context()
        except Exception as exc:
            _complain(tracer, exc)
            continue
        if trace:
            return trace
    return b""


class Call:
    """One call under observation, from :func:`begin` to :meth:`end`."""

    __slots__ = ("_handles", "_open", "job_id", "prefix", "started")

    def __init__(self, job: Names | str) -> None:
        self.job_id, self.prefix = _split(job)
        self.started = time.monotonic()
        self._open = True
        handles: list[tuple[Tracer, object]] = []
        for tracer in tracers:
            try:
                handles.append((tracer, tracer.start(self.job_id, self.prefix)))
            except Exception as exc:
                _complain(tracer, exc)
        self._handles = handles

    def end(
        self,
        role: str,
        error: BaseException | None = None,
        *,
        run_s: float | None = None,
        wait_s: float | None = None,
        token: int = 0,
        leader_trace: bytes = b"",
        stale: str = "",
        age_s: float | None = None,
    ) -> Event | None:
        """Report how the call ended: in ``role``, with a value (``error`` None) or ``error``.

        A WaitTimeout is reported as kind "timeout", a BackendUnavailable as
        "backend_error", whatever the role. Ending twice does nothing the second time, so an
        ``except``/``finally`` may end a call that an earlier line already ended. ``wait_s``
        defaults to the whole call for followers, ``run_s`` to the whole call for leaders.
        Call it in the thread (or task) that called :func:`begin`: a tracer's span was made
        current there.
        """
        if not self._open:
            return None
        self._open = False
        duration = time.monotonic() - self.started
        outcome = outcome_of(error)
        kind: Kind
        if outcome in ("timeout", "backend_error"):
            kind = outcome  # type: ignore[assignment]
        else:
            kind = _KIND_OF_ROLE.get(role, "failed")
        if (wait_s is None and role in ("local", "remote")) or kind == "timeout":
            wait_s = duration if wait_s is None else wait_s
        if run_s is None and kind == "lead":
            run_s = duration  # the driver did not time the run alone: the leader's whole call
        detail = "" if error is None or outcome != "error" else type(error).__qualname__
        event = Event(
            kind,
            self.job_id,
            self.prefix,
            role=role,
            outcome=outcome,
            duration_s=duration,
            run_s=run_s,
            wait_s=wait_s,
            token=token,
            leader_trace=leader_trace,
            detail=detail,
            stale=stale,
            age_s=age_s if error is None else None,
        )
        for tracer, handle in reversed(self._handles):
            try:
                tracer.finish(handle, event)
            except Exception as exc:
                _complain(tracer, exc)
        emit(event)
        return event


def begin(job: Names | str) -> Call:
    """A call starts: returns the :class:`Call` to :meth:`~Call.end` when it is over.

    ``job`` is the job's Names (which also tell the prefix), or its bare id. Call sites
    guard it: ``obs = events.begin(names) if events.enabled else None``.
    """
    return Call(job)
