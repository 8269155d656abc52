"""The sync driver: steps the call and flight machines over redis-py, blocking the caller."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

from dedupe.backend.commands import parse_looked, read_call, translate
from dedupe.backend.lifecycle import Backend
from dedupe.backend.transport import acquire_and_wait
from dedupe.core.batch import (
    Background,
    Done,
    Each,
    MakeFlights,
    Many,
    RunLocally,
    WaitAny,
    run_batch,
    run_batch_call,
)
from dedupe.core.call import (
    AwaitFlight,
    Fly,
    RunHere,
    read_failed,
    read_first,
    run_call,
)
from dedupe.core.inflight import Entry
from dedupe.core.keys import Names
from dedupe.core.protocol import (
    Acquire,
    Command,
    Finished,
    Flight,
    FlightSpec,
    Lead,
    Pause,
    Read,
    Reads,
    Serve,
    Subscribe,
    Wait,
    run_flight,
)
from dedupe.core.sealing import Outcome
from dedupe.core.shapes import Shape
from dedupe.core.signals import take_any
from dedupe.drivers.base import BatchBase, DriverBase, local_flight, observe, read_error, read_found
from dedupe.ops import events
from dedupe.overrides import FlightParams, spec_maker

__all__ = ["call", "call_batch"]

log = logging.getLogger("dedupe.core.protocol")
# What _Driver.run gives (aio's: drive's coroutine; the twins stay the same code).
Run = Finished


def call(
    backend: Backend,
    names: Names,
    p: FlightParams,
    shape: Shape | None,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    detail: bool = False,
    first: bool = False,
) -> Any:
    """Run ``fn`` once across every caller of the job, and return its outcome, with the
    flight parameters ``p`` and the return annotation ``shape``. ``first``:
    the call needs no Served and no events, so it may read its kept value before any
    flight (``read_first``)."""
    started = joined = None
    reads = p.reads
    if first and reads is not None:
        joined = read_first(backend, backend.sync_flights, names, reads)
        if joined is not None and joined[2]:  # its own new entry, and the credit says read
            started = time.monotonic()
            hit, value = _read(backend, names, p, shape, reads, joined[0], started)
            if hit:
                return value
    # A call that created its entry above asked the credit: its flight reads no more.
    make_spec = spec_maker(backend, names, p, shape, joined is None or not joined[1])
    machine = run_call(
        backend,
        backend.sync_flights,
        names,
        p.wait_timeout,
        time.monotonic,
        detail=detail,
        observed=events.enabled,
        soft_timeout=p.soft_timeout,
        started=started,
        joined=joined,
    )
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            cmd = machine.send(reply) if error is None else machine.throw(error)
        except StopIteration as stop:
            return stop.value
        reply, error = None, None
        try:
            if type(cmd) is Fly:
                spec = make_spec(cmd.deadline, cmd.soft_deadline)
                backend.begin_flight()
                try:
                    reply = _Driver(backend, spec, fn, args, kwargs, cmd.entry).run()
                finally:
                    backend.end_flight()
            elif type(cmd) is AwaitFlight:
                reply = cmd.entry.result.wait(cmd.timeout)
            elif type(cmd) is RunHere:
                reply = _run_here(backend, names, cmd.entry, fn, args, kwargs)
            else:
                reply = observe(names, cmd)  # type: ignore[arg-type]
        except BaseException as exc:  # thrown in: the machine tidies up and raises it
            error = exc


def _read(
    backend: Backend,
    names: Names,
    p: FlightParams,
    shape: Shape | None,
    reads: Reads,
    entry: Entry,
    started: float,
) -> tuple[bool, Any]:
    """read_first's read, carried as a flight's Read is (no lease yet: wait_timeout bounds
    its wait for a command slot), counted as a flight (close() waits for it); the core
    decides what it found and ends ``entry`` on a hit or a failure. (False, _): the machine
    goes on with the entry."""
    wait_timeout = p.wait_timeout
    table = backend.sync_flights
    backend.begin_flight()
    try:
        deadline = None if wait_timeout is None else started + wait_timeout
        try:
            looked = parse_looked(backend.run_sync_script(read_call(names), None, deadline))
        except BaseException as exc:
            error = read_error(exc)
        else:
            try:
                hit, value, discard = read_found(backend, table, reads, names, entry, looked,
                                                 shape, p.result_ttl_ms)  # fmt: skip
                if discard is None:
                    return hit, value
                backend.run_sync_script(discard)
                return False, None
            except BaseException as exc:
                error = translate(exc) if isinstance(exc, Exception) else exc
        read_failed(backend, table, reads, names, entry, error, wait_timeout)  # raises, or on
        return False, None
    finally:
        backend.end_flight()


def _run_here(
    backend: Backend,
    names: Names,
    entry: Entry,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Outcome:
    entry.leading = True
    try:
        with local_flight(backend, names):
            return Outcome(value=fn(*args, **kwargs))
    except BaseException as exc:
        return Outcome(error=exc)


class _Driver(DriverBase):
    __slots__ = ()

    def run(self) -> Run:
        return self.drive(run_flight(self.spec, self.codec, self.clock, self.trace))

    def drive(self, flight: Flight) -> Finished:
        """Step the flight to its end; at a Serve, hand the rest to a background thread."""
        reply: object = None
        error: BaseException | None = None
        handed_off = False
        try:
            while True:
                try:
                    cmd = flight.send(reply) if error is None else flight.throw(error)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                reply, error = None, None
                if type(cmd) is Serve:
                    self.serving()
                    self.backend.run_in_background(self.refresh, flight)
                    handed_off = True
                    return cmd.finished
                try:
                    reply = self.execute(cmd)
                except BaseException as exc:  # an abort too: thrown in, it goes on up
                    error = self.failed(cmd, exc)
        finally:
            if not handed_off:
                flight.close()
                self.finish()

    def refresh(self, flight: Flight) -> None:
        """The rest of a flight whose callers were served: on a thread of its own, in a copy
        of the caller's context (its contextvars; not its thread-locals)."""
        try:
            self.drive(flight)
        except Exception as exc:
            log.warning("a background refresh of %r failed: %s", self.spec.names.job_id, exc)

    def execute(self, cmd: Command) -> object:
        if type(cmd) is Lead:  # first: the one command of a leader that runs no script
            flight = self.flight_of(cmd)
            try:
                with self.as_leader(flight):
                    return Outcome(value=self.fn(*self.args, **self.kwargs))
            except BaseException as exc:  # an abort too: the protocol must tell the waiters
                return Outcome(error=exc)
        script = self.script_for(cmd)
        if script is not None:
            if type(cmd) is Acquire:
                if self.spec.min_replicas:
                    client = self.backend.sync_client()
                    raw, acked = acquire_and_wait(self.backend.transport, client, script, self.spec,
                                                  self.stamp)  # fmt: skip
                    return self.reply_of(cmd, raw, acked)
                # No lease yet: the caller's wait_timeout bounds its wait for a slot too.
                raw = self.backend.run_sync_script(script, self.stamp, self.spec.deadline)
                return self.reply_of(cmd, raw)
            if type(cmd) is Read:  # no lease yet either
                raw = self.backend.run_sync_script(script, None, self.spec.deadline)
                return self.reply_of(cmd, raw)
            return self.reply_of(cmd, self.backend.run_sync_script(script))
        if type(cmd) is Wait:
            return self.mailbox.get(cmd.timeout)  # type: ignore[union-attr]
        if type(cmd) is Subscribe:
            latch = self.subscribe()
            return latch.wait(self.confirm_timeout(cmd.timeout)) and latch.get()
        if type(cmd) is Pause:
            time.sleep(cmd.seconds)
            return None
        if self.at_once(cmd):
            return None
        raise TypeError(f"unknown command {cmd!r}")


# --- batches ---------------------------------------------------------------------------------


def call_batch(
    backend: Backend,
    names: Sequence[Names],
    make_spec: Callable[[int, float | None, float | None], FlightSpec],
    wait_timeout: float | None,
    fn: Callable[..., Any],
    items: Sequence[Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    soft_timeout: float | None = None,
) -> list[Outcome | None]:
    """Each item's outcome (None: absent), with every key still run once across callers."""
    machine = run_batch_call(
        backend, backend.sync_flights, names, wait_timeout, time.monotonic,
        soft_timeout=soft_timeout,
    )  # fmt: skip
    driver = _BatchDriver(backend, names, make_spec, fn, items, args, kwargs)
    backend.begin_flight()
    try:
        return driver.step(machine)  # type: ignore[no-any-return]
    finally:
        backend.end_flight()


class _BatchDriver(BatchBase):
    def step(self, machine: Generator[Any, Any, Any]) -> Any:
        """Carry a batch machine's commands (run_batch_call's, or run_batch's alone)."""
        reply: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    cmd = machine.send(reply) if error is None else machine.throw(error)
                except StopIteration as stop:
                    return stop.value
                reply, error = None, None
                try:
                    reply = self.execute(cmd)
                except BaseException as exc:  # thrown in: the machine tidies up and raises it
                    error = exc
        finally:
            machine.close()
            self.finish_all()

    def execute(self, cmd: Any) -> Any:
        kind = type(cmd)
        if kind is Many:
            return self.many(cmd)
        if kind is WaitAny:
            boxes, timeout = self.boxes(cmd)
            return take_any(boxes, timeout)
        if kind is Done:
            return self.done(cmd)
        if kind is Each:
            carried, script = self.each(cmd)
            return None if carried else self.backend.run_sync_script(script)  # type: ignore[arg-type]
        if kind is MakeFlights:
            return self.make(cmd)
        if kind is RunLocally:
            led, context = self.begin_local(cmd)
            try:
                with context:
                    got = self.fn(led, *self.args, **self.kwargs)
            except BaseException as exc:  # an abort too: the joiners start over
                return self.outcomes(led, None, exc)
            return self.outcomes(led, got, None)
        if kind is AwaitFlight:
            return cmd.entry.result.wait(cmd.timeout)
        if kind is Background:
            part = self.part(cmd)
            flights = [flight for _, flight in cmd.flights]
            self.backend.run_in_background(_refresh, part, flights)
            return None
        raise TypeError(f"unknown command {cmd!r}")

    def many(self, cmd: Many) -> list[Any]:
        if cmd.kind is Lead:
            led, context = self.begin_leads(cmd)
            try:
                with context:
                    got = self.fn(led, *self.args, **self.kwargs)
            except BaseException as exc:  # an abort too: the protocol tells the waiters
                return self.outcomes(led, None, exc)
            return self.outcomes(led, got, None)
        if cmd.kind is Subscribe:
            latches, timeout = self.subscribe(cmd)
            end = time.monotonic() + timeout
            return [
                latch.wait(max(0.0, end - time.monotonic())) and latch.get() for latch in latches
            ]
        calls, stamps = self.script_calls(cmd)
        return self.replies(cmd, self.backend.transport.run_sync_scripts(calls, stamps))


def _refresh(part: _BatchDriver, flights: list[Any]) -> None:
    """Items served at once whose refresh goes on, on a thread of their own."""
    try:
        part.step(run_batch(flights, part.clock))
    except Exception as exc:
        log.warning("a background refresh of a batch failed: %s", exc)
