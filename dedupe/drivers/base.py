"""What both drivers share: carrying one flight's commands, but the blocking.

The call's decisions live in ``call.run_call`` and the flight's in ``protocol.run_flight``;
the sync and async drivers are steppers that block (a thread) or await (a task) on what
those machines yield. What needs no blocking is done here, once for both: turning protocol
commands into scripts and replies into protocol replies, failures into what the protocol
is told, the lease and the subscription of a flight, notes and events.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Final, TypeVar

from redis.exceptions import ResponseError

from dedupe.backend.commands import (
    ScriptCall,
    Stamp,
    acquire_call,
    complete_call,
    discard_call,
    parse_acquired,
    parse_completed,
    parse_looked,
    read_call,
    translate,
)
from dedupe.backend.lifecycle import Backend
from dedupe.core.batch import (
    Absent,
    Background,
    Done,
    Each,
    MakeFlights,
    Many,
    RunLocally,
    WaitAny,
)
from dedupe.core.call import Begin, End, Takeover, served_read
from dedupe.core.context import BatchFlight, Flight, leading, leading_many
from dedupe.core.inflight import Entry, InFlight
from dedupe.core.keys import Names
from dedupe.core.leases import Lease, LostSignal
from dedupe.core.protocol import (
    REFRESH,
    Acquire,
    Acquired,
    Command,
    Complete,
    Discard,
    FlightSpec,
    Lead,
    Looked,
    Note,
    Offer,
    Read,
    ReadRefused,
    Reads,
    Rejected,
    Release,
    Unanswered,
    own_lease,
    run_flight,
)
from dedupe.core.protocol import Flight as ProtocolFlight
from dedupe.core.record import lock_value
from dedupe.core.sealing import Codec, Outcome
from dedupe.core.shapes import Shape
from dedupe.core.signals import Latch, Mailbox
from dedupe.ops import events

__all__ = ["BatchBase", "DriverBase", "local_flight", "note", "observe", "read_error", "read_found"]

log = logging.getLogger("dedupe.core.protocol")

# Notes that are warnings, and how many lines a second each may log (whoever may PUBLISH
# must not be able to flood the log with rejections).
_WARNINGS: Final = {
    "rejected": "ignored an outcome for %r (counted in stats()): %s",
    "withheld": "the lease on %r (token %d) was lost before the leader finished: %s",
    "publish_failed": "%r: %s",
    "store_failed": "%r: %s",
    "slow_seal": "%r: %s",
    "stood_in": "%r: %s",
}
_last_logged: dict[str, float] = {}  # kind -> monotonic time of its last line (races: a line)


def note(names: Names, cmd: Note) -> None:
    """Log a protocol note (at most one line a second per kind) and report it as an event."""
    now = time.monotonic()
    if now - _last_logged.get(cmd.kind, -1.0) >= 1.0:
        _last_logged[cmd.kind] = now
        if cmd.kind == "withheld":
            log.warning(_WARNINGS[cmd.kind], names.job_id, cmd.token, cmd.detail)
        else:
            log.warning(_WARNINGS.get(cmd.kind, "%r: %s"), names.job_id, cmd.detail)
    if events.enabled:
        if cmd.kind == "rejected":
            events.mark("rejected", names, detail=cmd.detail)
        elif cmd.kind == "withheld":
            events.mark("lease_lost", names, token=cmd.token, role="leader")
        elif cmd.kind == "stood_in":
            events.mark("stood_in", names, token=cmd.token, role="leader", detail=cmd.detail)


def observe(names: Names, cmd: Begin | End | Takeover) -> Any:
    """Carry the call machine's event commands to dedupe.ops.events."""
    if type(cmd) is End:
        if cmd.handle is not None:
            cmd.handle.end(cmd.role, cmd.error, token=cmd.token, leader_trace=cmd.leader_trace,
                           stale=cmd.stale, age_s=cmd.age_ms / 1000)  # fmt: skip
        return None
    if type(cmd) is Begin:
        return events.begin(names) if events.enabled else None
    if type(cmd) is Takeover:
        events.mark("takeover", names, token=cmd.token, role="leader")
    return None


def read_found(
    backend: Backend,
    table: InFlight,
    reads: Reads,
    names: Names,
    entry: Entry,
    looked: Looked,
    shape: Shape | None,
    result_ttl_ms: int,
) -> tuple[bool, Any, ScriptCall | None]:
    """What read_first's read found, as both drivers take it: (hit, value, None) from the
    core's served_read; or, for a forged or unreadable record, noted here once, the Discard
    that drops it (the driver sends it, and the machine goes on to the acquire script)."""
    hit, value = served_read(backend, table, reads, names, entry, backend.codec, looked,
                             shape, result_ttl_ms)  # fmt: skip
    if type(value) is not Rejected:
        return hit, value, None
    if value.detail:
        note(names, Note("rejected", value.detail))
    return False, None, discard_call(names, value.record)


def read_error(exc: BaseException) -> BaseException:
    """What a Read that raised ``exc`` tells the core: an error reply is ReadRefused (the
    acquire script decides instead); else the typed error (an abort as it is)."""
    if isinstance(exc, ResponseError):
        return ReadRefused(str(exc))
    return translate(exc) if isinstance(exc, Exception) else exc


class DriverBase(Stamp):
    """One flight's plumbing: scripts to run, the subscription, the lease while leading."""

    # One per flight: slots, not a __dict__ (issue 23's memory per flight).
    __slots__ = (
        "args",
        "backend",
        "background",
        "codec",
        "entry",
        "fn",
        "kwargs",
        "lease",
        "mailbox",
        "spec",
        "trace",
    )

    # The monotonic clock the flight's times are on (the simulator gives its own).
    clock: Callable[[], float] = staticmethod(time.monotonic)

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
        self.sent = 0.0  # Stamp's: when the current Acquire's request was written
        # A background run's place (max_background_runs) held for this flight: taken for an
        # acquire that may be granted a refresh, given back unless it was, or at the end.
        self.background = False
        # The leader's traceparent, sealed into its record (read in the caller's context).
        self.trace = events.trace_context() if events.enabled else b""

    @property
    def stamp(self) -> Stamp:
        """When the current Acquire's request was written: the driver is its own Stamp (one
        object less a flight: issue 23's memory per flight)."""
        return self

    def script_for(self, cmd: Command) -> ScriptCall | None:
        """The script a command runs, if it is one of the script commands."""
        if type(cmd) is Acquire:
            self.stamp.sent = 0.0
            if self.spec.refreshes and not self.background:
                self.background = self.backend.reserve_background()
            return acquire_call(self.spec, cmd, self.background)
        if type(cmd) is Complete:
            if self.lease is not None:  # our own complete may now delete the lock
                self.backend.renewer().completing(self.lease)
            return complete_call(self.spec, cmd, self.backend.publish)
        if type(cmd) is Discard:
            return discard_call(self.spec.names, cmd.record)
        if isinstance(cmd, Read):
            return read_call(self.spec.names)
        return None

    def reply_of(self, cmd: Command, raw: Any, replicas: int = 0) -> object:
        """The protocol's reply to a script command; ``replicas``: what WAIT answered."""
        if type(cmd) is Acquire:
            reply = parse_acquired(raw, self.stamp.sent)
            if self.background and reply.state != REFRESH:
                self.give_back_background()
            return reply._replace(replicas=replicas) if replicas else reply
        if type(cmd) is Complete:
            return parse_completed(raw)
        if isinstance(cmd, Read):
            return parse_looked(raw)
        return raw

    def failed(self, cmd: Command, exc: BaseException) -> BaseException:
        """What to throw into the protocol for a command that raised ``exc``: the typed
        error, or Unanswered for an Acquire once written (which the protocol answers by
        giving back the lease it may have granted). Also after an error reply: the command
        may have been sent more than once (the wire's retry after a lost reply, the Cluster
        client's re-sends on ASK and TRYAGAIN), and an earlier copy may have been granted
        (found by simulation: a slot migration, a retry, then TRYAGAIN until patience ran
        out). The give-back is owner-checked and off the caller's path."""
        if isinstance(cmd, Read):
            return read_error(exc)
        error = translate(exc) if isinstance(exc, Exception) else exc
        if isinstance(cmd, Acquire) and self.background:
            self.give_back_background()
        if self.stamp.sent and isinstance(cmd, Acquire):
            return Unanswered(error)
        return error

    def give_back_background(self) -> None:
        self.background = False
        self.backend.release_background()

    def at_once(self, cmd: Command) -> bool:
        """Carry a command that needs no blocking (Release, Note); False for the others."""
        if type(cmd) is Note:
            if cmd.kind == "stood_in":
                self.backend.stood_in()
            note(self.spec.names, cmd)
            return True
        if type(cmd) is Offer:
            self.entry.offer(cmd.finished)
            return True
        if type(cmd) is Release:
            # The possible lease goes to the backend's releaser: off this caller's path.
            self.backend.release_later(self.spec, self.stamp.sent)
            return True
        return False

    def serving(self) -> None:
        """Serve: the flight's callers have their value; the rest runs in the background."""
        if events.enabled:
            events.mark("refresh", self.spec.names, role="leader")

    def flight_of(self, cmd: Lead, loop: asyncio.AbstractEventLoop | None = None) -> Flight:
        """A Lead begins: the process's flight now leads, and its lease is renewed."""
        self.entry.leading = True
        return self.start_lease(cmd, loop)

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
        slow encode or a slow complete never lets a waiter take over a live leader. A batch
        item's lease may have started already, at its grant (``renew_from_grant``)."""
        lease = self.lease
        if lease is None or lease.value != cmd.lock_value:
            if lease is not None:
                self.backend.renewer().remove(lease)
            lease = self._renew(cmd.lock_value, cmd.since, loop)
        return Flight(self.spec.names.job_id, cmd.token, lease.lost)

    def renew_from_grant(self, reply: Acquired) -> None:
        """A batch item's acquire found a lease of ours (granted now, or to an earlier copy
        of it): renew it from now, not from the Lead, which waits for every sibling's
        acquire (one may wait for a slot, a redirection or a lost reply longer than the
        lease; found by simulation). Dated as run_flight dates it (``own_lease``)."""
        own = own_lease(self.spec, reply) if self.lease is None else None
        if own is not None:
            self._renew(lock_value(own[0], self.spec.owner), own[1], None)

    def _renew(self, value: str, since: float, loop: asyncio.AbstractEventLoop | None) -> Lease:
        names, spec = self.spec.names, self.spec
        lease = Lease(
            names.job_id,
            names,  # its lock key made when renewed: a leader holds no string of it
            value,
            spec.lock_ttl_ms / 1000,
            acquired_at=since,  # on run_flight's clock, self.clock
            max_hold=spec.max_hold_ms / 1000,
            loop=loop,
            clock=self.clock,
        )
        self.backend.renewer().add(lease)
        self.lease = lease
        return lease

    def as_leader(self, flight: Flight) -> AbstractContextManager[None]:
        """While the function runs: current_flight() set, reentry guarded."""
        return leading(self.spec.names.channel, flight)

    def finish(self) -> None:
        if self.background:
            self.give_back_background()
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


# --- batches ---------------------------------------------------------------------------------


_B = TypeVar("_B", bound="BatchBase")


class BatchBase:
    """A batch's plumbing, but the blocking: each item's own DriverBase (its spec, lease,
    subscription, stamp), the script calls of a gathered command, the replies, the one run
    of the function for the items led, and the outcomes per item."""

    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(
        self,
        backend: Backend,
        names: Sequence[Names],
        make_spec: Callable[[int, float | None, float | None], FlightSpec],
        fn: Callable[..., Any],
        items: Sequence[Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.backend = backend
        self.names = names  # each item's job names, by its index in ``items``
        self.make_spec = make_spec
        self.fn, self.items, self.args, self.kwargs = fn, items, args, kwargs
        self.drivers: list[DriverBase] = []  # the current batch's items, by index
        self.positions: list[int] = []  # each driver's item: its index in ``items``
        self.handed: set[int] = set()  # drivers handed on to a background part

    def make(self, cmd: MakeFlights) -> list[ProtocolFlight]:
        """MakeFlights: each item its DriverBase and flight machine."""
        self.finish_all()  # a batch before this one (a retry) has ended
        self.drivers, self.positions, self.handed = [], [], set()
        flights: list[ProtocolFlight] = []
        for i, entry in cmd.items:
            spec = self.make_spec(i, cmd.deadline, cmd.soft_deadline)
            d = DriverBase(self.backend, spec, self.fn, (), {}, entry)
            self.drivers.append(d)
            self.positions.append(i)
            flights.append(run_flight(spec, d.codec, d.clock, d.trace))
        return flights

    def part(self: _B, cmd: Background) -> _B:
        """The plumbing of the items a Background hands on, indexed as its flights are."""
        other = copy.copy(self)
        other.drivers = [self.drivers[k] for k, _ in cmd.flights]
        other.positions = [self.positions[k] for k, _ in cmd.flights]
        other.handed = set()
        self.handed.update(k for k, _ in cmd.flights)
        return other

    def script_calls(self, cmd: Many) -> tuple[list[ScriptCall], list[Stamp | None]]:
        calls, stamps = [], []
        for k, c in cmd.items:
            d = self.drivers[k]
            call = d.script_for(c)
            if call is None:
                raise TypeError(f"{c!r} is not a script command")
            calls.append(call)
            stamps.append(d.stamp if type(c) is Acquire else None)
        return calls, stamps

    def replies(self, cmd: Many, raws: Sequence[Any]) -> list[Any]:
        """Each item's protocol reply, or what to throw into its flight."""
        out: list[Any] = []
        for (k, c), raw in zip(cmd.items, raws, strict=True):
            d = self.drivers[k]
            if isinstance(raw, BaseException):
                out.append(d.failed(c, raw))
                continue
            reply = d.reply_of(c, raw)
            if type(reply) is Acquired:
                d.renew_from_grant(reply)
            out.append(reply)
        return out

    def begin_leads(self, cmd: Many) -> tuple[list[Any], AbstractContextManager[None]]:
        """The items led now, in input order, and the context the function runs in: every
        lease renewed from here, current_flight() a BatchFlight, re-entry refused."""
        led, flights, keys = [], {}, []
        for k, c in cmd.items:
            d = self.drivers[k]
            item = self.items[self.positions[k]]
            flights[item] = d.flight_of(c)  # type: ignore[arg-type]
            led.append(item)
            keys.append(d.spec.names.channel)
        return led, leading_many(keys, BatchFlight(flights))

    def begin_local(self, cmd: RunLocally) -> tuple[list[Any], AbstractContextManager[None]]:
        """on_backend_error="local": the items run here, in input order, with no lease (token
        0), as ``local_flight`` runs one key."""
        led, flights, keys = [], {}, []
        for k in cmd.items:
            d = self.drivers[k]
            d.entry.leading = True
            names = d.spec.names
            item = self.items[self.positions[k]]
            self.backend.ran_locally()
            if events.enabled:
                events.mark("local_run", names, role="leader")
            flights[item] = Flight(names.job_id, 0, LostSignal())
            led.append(item)
            keys.append(names.channel)
        return led, leading_many(keys, BatchFlight(flights))

    @staticmethod
    def outcomes(led: Sequence[Any], got: Any, error: BaseException | None) -> list[Outcome]:
        """Each led item's outcome: its value in the function's mapping, Absent if the
        mapping leaves it out; the function's exception (or a mapping that is none) for all."""
        if error is None and not isinstance(got, Mapping):
            error = TypeError(
                f"a batch function must return a mapping of item to value, not {type(got).__name__}"
            )
        if error is not None:
            return [Outcome(error=error) for _ in led]
        return [
            Outcome(value=got[item]) if item in got else Outcome(error=Absent()) for item in led
        ]

    def subscribe(self, cmd: Many) -> tuple[list[Latch[bool]], float]:
        """Subscribe every item; the confirmations, and how long to wait for them."""
        latches = [self.drivers[k].subscribe() for k, _ in cmd.items]
        timeout = max(c.timeout for _, c in cmd.items)  # type: ignore[union-attr]
        return latches, max(0.0, min(timeout, self.backend.confirm_timeout))

    def boxes(self, cmd: WaitAny) -> tuple[dict[int, Mailbox[object]], float]:
        """The mailboxes of the items that wait for a message, and the time to the first end."""
        boxes: dict[int, Mailbox[object]] = {}
        for k, _, pause in cmd.items:
            box = self.drivers[k].mailbox
            if not pause and box is not None:
                boxes[k] = box
        first = min(until for _, until, _ in cmd.items)
        return boxes, first - self.clock()

    def each(self, cmd: Each) -> tuple[bool, ScriptCall | None]:
        """An item's single command: (True, None) if carried at once, else its script."""
        d = self.drivers[cmd.at]
        if d.at_once(cmd.cmd):
            return True, None
        return False, d.script_for(cmd.cmd)

    def done(self, cmd: Done) -> None:
        if not cmd.going_on:
            self.drivers[cmd.at].finish()

    def finish_all(self) -> None:
        """The end of a batch (or its abort): every item's lease and subscription ends, but
        those of items handed on to a background part (which ends them itself)."""
        for k, d in enumerate(self.drivers):
            if k not in self.handed:
                d.finish()
