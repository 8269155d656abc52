"""The sync driver: runs the flight protocol over redis-py, blocking the calling thread."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .. import events
from ..backend import Backend, acquire_and_wait
from ..errors import BackendUnavailable, WaitTimeout
from ..inflight import RETRY, Entry
from ..keys import Names
from ..protocol import (
    Acquire,
    Command,
    Finished,
    FlightSpec,
    Lead,
    Pause,
    Release,
    Replicate,
    Subscribe,
    Wait,
    run_flight,
)
from ..sealing import Outcome
from .base import MISS, CallPlan, DriverBase, local_flight, run_trace, share

__all__ = ["call"]


def call(
    backend: Backend,
    names: Names,
    make_spec: Callable[[float | None], FlightSpec],
    wait_timeout: float | None,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    detail: bool = False,
) -> Any:
    """Run ``fn`` once across every caller of the job, and return its outcome."""
    plan = CallPlan(backend, names, wait_timeout, detail)
    try:
        kept = plan.kept()
        if kept is not MISS:
            return kept
        table = backend.sync_flights
        while True:
            entry, created = table.join(plan.key)
            if created:
                entry.job_id = names.job_id
            else:
                if not entry.result.wait(plan.left()):
                    raise plan.timed_out("local")
                result = entry.result.get()
                if result is RETRY:
                    continue
                assert isinstance(result, Outcome)
                return plan.deliver(
                    result, "local", own=False, token=entry.token, trace=entry.trace
                )
            shared: Outcome | object = RETRY
            try:
                finished = _run(backend, make_spec(plan.deadline), fn, args, kwargs, entry)
            except WaitTimeout:
                raise plan.timed_out("remote") from None  # ours alone: the other callers start over
            except Exception as exc:
                shared = Outcome(error=exc)
                raise
            else:
                # Read by the callers who joined, once finish() below resolved the entry.
                entry.token, entry.trace = finished.token, run_trace(finished)
                shared = share(backend, plan.key, finished)
                if finished.waited and events.enabled:
                    events.mark("takeover", names, token=finished.token, role="leader")
                return plan.deliver(
                    finished.outcome,
                    finished.role,
                    own=True,
                    token=finished.token,
                    trace=entry.trace,
                )
            finally:
                table.finish(plan.key, entry, shared)  # type: ignore[arg-type]

    except BaseException as exc:
        plan.failed(exc)  # WaitTimeout, BackendUnavailable, an abort: unless reported
        raise


def _run(
    backend: Backend,
    spec: FlightSpec,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    entry: Entry,
) -> Finished:
    backend.begin_flight()
    try:
        if not backend.skip_redis():
            try:
                finished = _Driver(backend, spec, fn, args, kwargs, entry).run()
            except BackendUnavailable as exc:
                if not backend.fall_back(exc):
                    raise
            else:
                backend.answered()
                return finished
    finally:
        backend.end_flight()
    try:
        with local_flight(backend, spec.names):
            return Finished(Outcome(value=fn(*args, **kwargs)), "leader", 0)
    except BaseException as exc:
        return Finished(Outcome(error=exc), "leader", 0)


class _Driver(DriverBase):
    def run(self) -> Finished:
        flight = run_flight(self.spec, self.codec, time.monotonic)
        reply: object = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    cmd = flight.send(reply) if error is None else flight.throw(error)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                reply, error = None, None
                try:
                    reply = self.execute(cmd)
                except BaseException as exc:  # an abort too: thrown in, it goes on up
                    error = self.failed(cmd, exc)
        finally:
            flight.close()
            self.finish()

    def execute(self, cmd: Command) -> object:
        script = self.script_for(cmd)
        if script is not None:
            if isinstance(cmd, Acquire) and self.spec.min_replicas:
                raw, self.acked = acquire_and_wait(
                    self.backend, self.backend.sync_client(), script, self.spec, self.stamp
                )
                return self.reply_of(cmd, raw)
            stamp = self.stamp if isinstance(cmd, Acquire) else None
            return self.reply_of(cmd, self.backend.run_sync_script(script, stamp))
        if isinstance(cmd, Wait):
            assert self.mailbox is not None
            return self.mailbox.get(cmd.timeout)
        if isinstance(cmd, Subscribe):
            latch = self.subscribe()
            return latch.wait(self.confirm_timeout(cmd.timeout)) and latch.get()
        if isinstance(cmd, Lead):
            self.entry.leading = True
            flight = self.start_lease(cmd)
            try:
                with self.as_leader(flight):
                    return Outcome(value=self.fn(*self.args, **self.kwargs))
            except BaseException as exc:  # an abort too: the protocol must tell the waiters
                return Outcome(error=exc)
        if isinstance(cmd, Pause):
            time.sleep(cmd.seconds)
            return None
        if isinstance(cmd, Replicate):
            return self.acked
        if isinstance(cmd, Release):
            self.release()
            return None
        raise TypeError(f"unknown command {cmd!r}")
