"""What both drivers share: every decision of a call and of carrying a command, but the waiting.

The sync and async drivers differ only in how they block (a thread or an await); the
call's decisions (deadline, kept copies, what joiners get, how each caller raises) live in
``CallPlan``, and the protocol's in ``run_flight``.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Final

from redis.exceptions import ResponseError

from .. import events
from ..backend import Backend
from ..commands import (
    ScriptCall,
    Stamp,
    acquire_call,
    complete_call,
    discard_call,
    parse_acquired,
    parse_completed,
    translate,
)
from ..context import Flight, check_reentry, leading
from ..errors import WaitTimeout
from ..inflight import RETRY, Entry, Served
from ..keys import Names
from ..protocol import (
    Acquire,
    Command,
    Complete,
    Discard,
    Finished,
    FlightSpec,
    Lead,
    Unanswered,
    is_abort,
)
from ..renewal import Lease, LostSignal
from ..sealing import Codec, Outcome
from ..signals import Latch, Mailbox

__all__ = ["MISS", "CallPlan", "DriverBase", "local_flight", "run_trace", "share"]

MISS: Final = object()
"""CallPlan.kept() found no local copy."""


class CallPlan:
    """One caller's decisions, the same for both drivers."""

    __slots__ = ("backend", "deadline", "detail", "key", "names", "obs", "wait_timeout")

    def __init__(
        self, backend: Backend, names: Names, wait_timeout: float | None, detail: bool
    ) -> None:
        self.backend = backend
        self.names = names
        self.key = names.channel
        self.wait_timeout = wait_timeout
        self.deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
        self.detail = detail
        check_reentry(self.key, names.job_id)
        # Observed only while an adapter listens: otherwise one attribute read.
        self.obs = events.begin(names) if events.enabled else None

    def kept(self) -> Any:
        """A fresh local copy (local_cache=True) as this call's result, else MISS."""
        copies = self.backend.local_copies
        if copies is None:
            return MISS
        hit, value = copies.get(self.key)
        if not hit:
            return MISS
        if self.obs is not None:
            self.obs.end("kept")
        return Served(value, True, "kept") if self.detail else value

    def left(self) -> float | None:
        """How long this caller may still wait (None: as long as a leader lives)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def timed_out(self, role: str = "") -> WaitTimeout:
        exc = WaitTimeout(job_id=self.names.job_id, seconds=self.wait_timeout)
        if self.obs is not None:
            self.obs.end(role, exc)
        return exc

    def failed(self, exc: BaseException) -> None:
        """The call ends with an exception no other line reported (a no-op if one did)."""
        if self.obs is not None:
            self.obs.end("", exc)

    def deliver(
        self, outcome: Outcome, role: str, *, own: bool, token: int = 0, trace: bytes = b""
    ) -> Any:
        """Return the value, or raise the error: the original for the caller whose flight
        made it, a copy for every other caller (one object raised by 50 callers would pile
        50 callers' frames onto one traceback)."""
        error = outcome.error
        if self.obs is not None:
            # A leader's span is the run's own: it links to nothing.
            self.obs.end(role, error, token=token, leader_trace=b"" if role == "leader" else trace)
        if error is not None:
            raise error if own else _copy_of(error)
        if self.detail:
            return Served(outcome.value, role != "leader", role)
        return outcome.value


def _copy_of(error: BaseException) -> BaseException:
    tb = error.__traceback__
    try:
        dup = copy.copy(error)
    except Exception:
        return error.with_traceback(tb)  # cannot be copied: at least do not grow its frames
    if type(dup) is not type(error):
        return error.with_traceback(tb)
    dup.__cause__, dup.__context__ = error.__cause__, error.__context__
    dup.__suppress_context__ = error.__suppress_context__
    notes = getattr(error, "__notes__", None)
    if isinstance(notes, list):
        dup.__dict__["__notes__"] = list(notes)  # a note one caller adds stays its own
    return dup.with_traceback(tb)


def run_trace(finished: Finished) -> bytes:
    """The traceparent of the span under which the function ran, for this process's callers
    who joined the flight: the current span (the driving caller's own) if this flight led,
    else the leader's, read from its outcome record. b"" when no tracer listens."""
    if finished.role == "leader":
        return events.trace_context() if events.enabled else b""
    return finished.trace


def share(backend: Backend, key: str, finished: Finished) -> Outcome | object:
    """What the callers who joined this flight in-process get: its outcome, or RETRY after an
    abort (they start over: one of them leads)."""
    outcome = finished.outcome
    if is_abort(outcome.error):
        return RETRY
    copies = backend.local_copies
    if copies is not None and outcome.error is None:
        copies.put(key, outcome.value, outcome.fresh_ms)
    return outcome


class DriverBase:
    """One flight's plumbing: scripts to run, the subscription, the lease while leading."""

    def __init__(
        self,
        backend: Backend,
        spec: FlightSpec,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        entry: Entry,
    ) -> None:
        self.backend = backend
        self.entry = entry  # this process's entry of the flight (its callers wait on it)
        self.codec: Codec = backend.codec
        self.spec = spec
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.mailbox: Mailbox[object] | None = None
        self.lease: Lease | None = None
        self.acked = 0  # replicas that acknowledged our acquire (min_replicas_ack)
        self.stamp = Stamp()  # when the current Acquire's request was written

    def script_for(self, cmd: Command) -> ScriptCall | None:
        """The script a command runs, if it is one of the script commands."""
        if isinstance(cmd, Acquire):
            self.stamp.sent = 0.0
            return acquire_call(self.spec, cmd)
        if isinstance(cmd, Complete):
            if self.lease is not None:  # our own complete may now delete the lock
                self.backend.renewer().completing(self.lease)
            return complete_call(self.spec, cmd, self.backend.publish)
        if isinstance(cmd, Discard):
            return discard_call(self.spec, cmd)
        return None

    def reply_of(self, cmd: Command, raw: Any) -> object:
        if isinstance(cmd, Acquire):
            return parse_acquired(raw, self.stamp.sent)
        if isinstance(cmd, Complete):
            return parse_completed(raw)
        return raw

    def failed(self, cmd: Command, exc: BaseException) -> BaseException:
        """What to throw into the protocol for a command that raised ``exc``: the typed
        error, or Unanswered for an Acquire written but never answered (which the protocol
        answers by giving back the lease it may have granted). An error reply was answered."""
        error = translate(exc) if isinstance(exc, Exception) else exc
        if self.stamp.sent and isinstance(cmd, Acquire) and not isinstance(exc, ResponseError):
            return Unanswered(error)
        return error

    def release(self) -> None:
        """Release: hand the possible lease to the backend's releaser (off our path)."""
        self.backend.release_later(self.spec, self.stamp.sent)

    def subscribe(self) -> Latch[bool]:
        """Subscribe (first time), or the current subscription's confirmation."""
        if self.mailbox is None:
            self.mailbox = Mailbox()
        # Idempotent: after a RECHECK it hands back the current subscription's confirmation.
        return self.backend.hub().subscribe(self.spec.names.channel, self.mailbox)

    def confirm_timeout(self, timeout: float) -> float:
        return min(timeout, self.backend.confirm_timeout)

    def start_lease(self, cmd: Lead, loop: asyncio.AbstractEventLoop | None = None) -> Flight:
        """The lease is renewed from here until ``finish()``: after the complete script, so a
        slow encode or a slow complete never lets a waiter take over a live leader."""
        names, spec = self.spec.names, self.spec
        lease = Lease(
            names.job_id,
            names.lock,
            cmd.lock_value,
            spec.lock_ttl_ms / 1000,
            acquired_at=cmd.since,  # run_flight's clock is time.monotonic in both drivers
            max_hold=spec.max_hold_ms / 1000,
            loop=loop,
        )
        self.backend.renewer().add(lease)
        self.lease = lease
        return Flight(names.job_id, cmd.token, lease.lost)

    def as_leader(self, flight: Flight) -> AbstractContextManager[None]:
        """While the function runs: current_flight() set, reentry guarded."""
        return leading(self.spec.names.channel, flight)

    def finish(self) -> None:
        lease, self.lease = self.lease, None
        if lease is not None:
            self.backend.renewer().remove(lease)
        if self.mailbox is not None:
            self.backend.hub().unsubscribe(self.spec.names.channel, self.mailbox)
            self.mailbox = None


def local_flight(backend: Backend, names: Names) -> AbstractContextManager[None]:
    """on_backend_error="local": lead in this process only, with no lease and token 0."""
    backend.ran_locally()
    if events.enabled:
        events.mark("local_run", names, role="leader")
    return leading(names.channel, Flight(names.job_id, 0, LostSignal()))
