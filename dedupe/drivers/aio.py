"""The asyncio driver: runs the flight protocol over redis.asyncio, in a task of its own.

The flight runs in a task separate from its callers, so a cancelled caller stops waiting
alone: the shared work and the other callers go on. A flight that is only following, and
that no caller awaits any more, is cancelled. Each event loop has its own table of flights:
a loop that stops mid-flight strands only its own callers, never another loop's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

from .. import events
from ..backend import Backend, acquire_and_wait
from ..errors import BackendUnavailable
from ..inflight import RETRY, Entry, InFlight
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
    is_abort,
    run_flight,
)
from ..sealing import Outcome
from .base import MISS, CallPlan, DriverBase, local_flight, run_trace, share

__all__ = ["call"]


async def call(
    backend: Backend,
    names: Names,
    make_spec: Callable[[float | None], FlightSpec],
    wait_timeout: float | None,
    fn: Callable[..., Coroutine[Any, Any, Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    detail: bool = False,
) -> Any:
    """Await ``fn`` once across every caller of the job, and return its outcome."""
    plan = CallPlan(backend, names, wait_timeout, detail)
    try:
        kept = plan.kept()
        if kept is not MISS:
            return kept
        table = backend.async_flights()
        while True:
            entry, created = table.join(plan.key)
            if created:
                entry.job_id = names.job_id
                # The shared task follows with no deadline of its own: each caller keeps its own.
                driver = _Driver(backend, make_spec(None), fn, args, kwargs, entry)
                entry.task = asyncio.get_running_loop().create_task(_drive(driver, table, plan.key))
            try:
                done = await entry.result.wait_async(plan.left())
                if not done and created and entry.leading:
                    # Our own call runs the function: wait_timeout bounds waiting on others only
                    # (as in the sync driver, whose leader's caller is the one running it).
                    done = await entry.result.wait_async(None)
            except BaseException:
                _leave(table, entry)
                raise
            if not done:
                _leave(table, entry)
                raise plan.timed_out("" if created else "local")
            result = entry.result.get()
            if result is RETRY:
                continue
            assert isinstance(result, Outcome)
            if created:
                return plan.deliver(
                    result, entry.role, own=True, token=entry.token, trace=entry.trace
                )
            return plan.deliver(result, "local", own=False, token=entry.token, trace=entry.trace)

    except BaseException as exc:
        plan.failed(exc)  # WaitTimeout, BackendUnavailable, a cancellation: unless reported
        raise


def _leave(table: InFlight, entry: Entry) -> None:
    task = entry.task
    if table.leave(entry) == 0 and not entry.leading and task is not None and not task.done():
        task.cancel()  # same loop: the table is this loop's


async def _drive(driver: _Driver, table: InFlight, key: str) -> None:
    shared: Outcome | object = RETRY
    try:
        finished = await _run(driver)
        driver.entry.role = finished.role
        driver.entry.token, driver.entry.trace = finished.token, run_trace(finished)
        if finished.waited and events.enabled:
            events.mark("takeover", driver.spec.names, token=finished.token, role="leader")
        outcome = finished.outcome
        if is_abort(outcome.error):
            assert outcome.error is not None
            raise outcome.error  # the waiters were told; the abort goes on up, as it would
        shared = share(driver.backend, key, finished)
    except Exception as exc:
        shared = Outcome(error=exc)  # BackendUnavailable and kin reach every caller
    finally:
        table.finish(key, driver.entry, shared)  # type: ignore[arg-type]


async def _run(driver: _Driver) -> Finished:
    backend = driver.backend
    backend.begin_flight()
    try:
        if not backend.skip_redis():
            try:
                finished = await driver.run()
            except BackendUnavailable as exc:
                if not backend.fall_back(exc):
                    raise
            else:
                backend.answered()
                return finished
    finally:
        backend.end_flight()
    driver.entry.leading = True
    try:
        with local_flight(backend, driver.spec.names):
            return Finished(
                Outcome(value=await driver.fn(*driver.args, **driver.kwargs)), "leader", 0
            )
    except BaseException as exc:
        return Finished(Outcome(error=exc), "leader", 0)


class _Driver(DriverBase):
    async def run(self) -> Finished:
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
                    reply = await self.execute(cmd)
                except BaseException as exc:  # an abort too: thrown in, it goes on up
                    error = self.failed(cmd, exc)
        finally:
            flight.close()
            self.finish()

    async def execute(self, cmd: Command) -> object:
        script = self.script_for(cmd)
        if script is not None:
            if isinstance(cmd, Acquire) and self.spec.min_replicas:
                # Acquire and WAIT on one connection; the sync client has the one-node pipeline.
                sync_client = await self.backend.in_thread(self.backend.sync_client)
                raw, self.acked = await self.backend.in_thread(
                    acquire_and_wait, self.backend, sync_client, script, self.spec, self.stamp
                )
                return self.reply_of(cmd, raw)
            stamp = self.stamp if isinstance(cmd, Acquire) else None
            return self.reply_of(cmd, await self.backend.run_async_script(script, stamp))
        if isinstance(cmd, Wait):
            assert self.mailbox is not None
            return await self.mailbox.get_async(cmd.timeout)
        if isinstance(cmd, Subscribe):
            latch = self.subscribe()
            return await latch.wait_async(self.confirm_timeout(cmd.timeout)) and latch.get()
        if isinstance(cmd, Lead):
            self.entry.leading = True
            flight = self.start_lease(cmd, asyncio.get_running_loop())
            try:
                with self.as_leader(flight):
                    return Outcome(value=await self.fn(*self.args, **self.kwargs))
            except BaseException as exc:  # an abort too: the protocol must tell the waiters
                return Outcome(error=exc)
        if isinstance(cmd, Pause):
            await asyncio.sleep(cmd.seconds)
            return None
        if isinstance(cmd, Replicate):
            return self.acked
        if isinstance(cmd, Release):
            self.release()
            return None
        raise TypeError(f"unknown command {cmd!r}")
