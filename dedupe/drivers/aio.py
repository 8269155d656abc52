"""The asyncio driver: runs the flight protocol over redis.asyncio, in a task of its own.

The flight runs in a task separate from its callers, so a cancelled caller stops waiting
alone: the shared work and the other callers go on. A flight that is only following, and
that no caller awaits any more, is cancelled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ..backend import AsyncClient, Backend, run_script_async, wait_replicas_async
from ..commands import translate
from ..context import check_reentry
from ..envelope import Outcome
from ..errors import BackendUnavailable, WaitTimeout
from ..inflight import RETRY, Entry, InFlight
from ..keys import Names
from ..protocol import Command, FlightSpec, Lead, Replicate, Subscribe, Wait, is_abort, run_flight
from .base import DriverBase, local_leader

__all__ = ["call"]


async def call(
    backend: Backend,
    names: Names,
    make_spec: Callable[[float | None], FlightSpec],
    wait_timeout: float | None,
    fn: Callable[..., Coroutine[Any, Any, Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Await ``fn`` once across every caller of the job, and return its outcome."""
    deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
    key = names.channel
    check_reentry(key, names.job_id)
    copies = backend.local_copies
    if copies is not None:
        hit, value = copies.get(key)
        if hit:
            return value
    table = backend.async_flights
    while True:
        entry, created = table.join(key)
        if created:
            # The shared task follows with no deadline of its own: each caller keeps its own.
            driver = _Driver(backend, make_spec(None), fn, args, kwargs, entry)
            entry.task = asyncio.get_running_loop().create_task(_drive(driver, table, key))
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            done = await entry.result.wait_async(left)
        except BaseException:
            _leave(table, entry)
            raise
        if not done:
            _leave(table, entry)
            raise WaitTimeout(f"waited {wait_timeout}s for {names.job_id!r}")
        result = entry.result.get()
        if result is RETRY:
            continue
        assert isinstance(result, Outcome)
        return result.unwrap()


def _leave(table: InFlight, entry: Entry) -> None:
    task = entry.task
    if table.leave(entry) == 0 and not entry.leading and task is not None and not task.done():
        try:
            task.get_loop().call_soon_threadsafe(task.cancel)
        except RuntimeError:
            pass  # its loop is closed, and the task with it


async def _drive(driver: _Driver, table: InFlight, key: str) -> None:
    shared: Outcome | object = RETRY
    try:
        outcome = await _run(driver)
        if is_abort(outcome.error):
            assert outcome.error is not None
            raise outcome.error  # the waiters were told; the abort goes on up, as it would
        shared = outcome
        copies = driver.backend.local_copies
        if copies is not None and outcome.error is None:
            copies.put(key, outcome.value, outcome.fresh_ms)
    except Exception as exc:
        shared = Outcome(error=exc)  # BackendUnavailable and kin reach every caller
    finally:
        table.finish(key, driver.entry, shared)  # type: ignore[arg-type]


async def _run(driver: _Driver) -> Outcome:
    backend = driver.backend
    if not backend.skip_redis():
        try:
            outcome = await driver.run()
        except BackendUnavailable as exc:
            if not backend.fall_back(exc):
                raise
        else:
            backend.answered()
            return outcome
    driver.entry.leading = True
    try:
        with local_leader(backend, driver.spec.names):
            return Outcome(value=await driver.fn(*driver.args, **driver.kwargs))
    except BaseException as exc:
        return Outcome(error=exc)


class _Driver(DriverBase):
    def __init__(
        self,
        backend: Backend,
        spec: FlightSpec,
        fn: Callable[..., Coroutine[Any, Any, Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        entry: Entry,
    ) -> None:
        super().__init__(backend, spec, fn, args, kwargs)
        self.entry = entry

    async def run(self) -> Outcome:
        client = self.backend.async_client()
        flight = run_flight(self.spec, self.codec, time.monotonic)
        reply: object = None
        error: Exception | None = None
        try:
            while True:
                try:
                    cmd = flight.send(reply) if error is None else flight.throw(error)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                reply, error = None, None
                try:
                    reply = await self.execute(client, cmd)
                except Exception as exc:
                    error = translate(exc)
        finally:
            flight.close()
            self.release()

    async def execute(self, client: AsyncClient, cmd: Command) -> object:
        script = self.script_for(cmd)
        if script is not None:
            return self.reply_of(cmd, await run_script_async(client, script, self.cluster))
        if isinstance(cmd, Wait):
            assert self.mailbox is not None
            return await self.mailbox.get_async(cmd.timeout)
        if isinstance(cmd, Subscribe):
            if not await self.subscription().wait_async(self.backend.confirm_timeout):
                raise self.unconfirmed()
            return None
        if isinstance(cmd, Lead):
            self.entry.leading = True
            try:
                with self.leased(cmd):
                    return Outcome(value=await self.fn(*self.args, **self.kwargs))
            except BaseException as exc:  # an abort too: the protocol must tell the waiters
                return Outcome(error=exc)
        if isinstance(cmd, Replicate):
            lock = self.spec.names.lock
            return await wait_replicas_async(client, lock, cmd.replicas, cmd.timeout_ms)
        raise TypeError(f"unknown command {cmd!r}")
