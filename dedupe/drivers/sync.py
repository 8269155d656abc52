"""The sync driver: steps the call and flight machines over redis-py, blocking the caller."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from dedupe.backend.lifecycle import Backend
from dedupe.backend.transport import acquire_and_wait
from dedupe.core.call import AwaitFlight, Fly, RunHere, run_call
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
    Serve,
    Subscribe,
    Wait,
    run_flight,
)
from dedupe.core.sealing import Outcome
from dedupe.drivers.base import DriverBase, local_flight, observe
from dedupe.ops import events

__all__ = ["call"]

log = logging.getLogger("dedupe.core.protocol")


def call(
    backend: Backend,
    names: Names,
    make_spec: Callable[[float | None, float | None], FlightSpec],
    wait_timeout: float | None,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    detail: bool = False,
    soft_timeout: float | None = None,
) -> Any:
    """Run ``fn`` once across every caller of the job, and return its outcome."""
    machine = run_call(
        backend,
        backend.sync_flights,
        names,
        wait_timeout,
        time.monotonic,
        detail=detail,
        observed=events.enabled,
        soft_timeout=soft_timeout,
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
    def run(self) -> Finished:
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
            return self.reply_of(cmd, self.backend.run_sync_script(script))
        if type(cmd) is Wait:
            return self.mailbox.get(cmd.timeout)  # type: ignore[union-attr]
        if type(cmd) is Lead:
            flight = self.flight_of(cmd)
            try:
                with self.as_leader(flight):
                    return Outcome(value=self.fn(*self.args, **self.kwargs))
            except BaseException as exc:  # an abort too: the protocol must tell the waiters
                return Outcome(error=exc)
        if type(cmd) is Subscribe:
            latch = self.subscribe()
            return latch.wait(self.confirm_timeout(cmd.timeout)) and latch.get()
        if type(cmd) is Pause:
            time.sleep(cmd.seconds)
            return None
        if self.at_once(cmd):
            return None
        raise TypeError(f"unknown command {cmd!r}")
