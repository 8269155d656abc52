"""The sync driver: runs the flight protocol over redis-py, blocking the calling thread."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..backend import Backend, SyncClient, run_script, wait_replicas
from ..commands import translate
from ..context import check_reentry
from ..envelope import Outcome
from ..errors import BackendUnavailable, WaitTimeout
from ..inflight import RETRY
from ..keys import Names
from ..protocol import Command, FlightSpec, Lead, Replicate, Subscribe, Wait, is_abort, run_flight
from .base import DriverBase, local_leader

__all__ = ["call"]


def call(
    backend: Backend,
    names: Names,
    make_spec: Callable[[float | None], FlightSpec],
    wait_timeout: float | None,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run ``fn`` once across every caller of the job, and return its outcome."""
    deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
    key = names.channel
    check_reentry(key, names.job_id)
    copies = backend.local_copies
    if copies is not None:
        hit, value = copies.get(key)
        if hit:
            return value
    table = backend.sync_flights
    while True:
        entry, created = table.join(key)
        if not created:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not entry.result.wait(left):
                raise WaitTimeout(f"waited {wait_timeout}s for {names.job_id!r}")
            result = entry.result.get()
            if result is RETRY:
                continue
            assert isinstance(result, Outcome)
            return result.unwrap()
        spec = make_spec(deadline)  # only the driver needs one: joiners stay cheap
        shared: Outcome | object = RETRY
        try:
            outcome = _run(backend, spec, fn, args, kwargs)
        except WaitTimeout:
            raise  # our own deadline, not the other callers': they start over
        except Exception as exc:
            shared = Outcome(error=exc)
            raise
        else:
            if not is_abort(outcome.error):
                shared = outcome
                if copies is not None and outcome.error is None:
                    copies.put(key, outcome.value, outcome.fresh_ms)
            return outcome.unwrap()
        finally:
            table.finish(key, entry, shared)  # type: ignore[arg-type]


def _run(
    backend: Backend,
    spec: FlightSpec,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Outcome:
    if not backend.skip_redis():
        try:
            outcome = _Driver(backend, spec, fn, args, kwargs).run()
        except BackendUnavailable as exc:
            if not backend.fall_back(exc):
                raise
        else:
            backend.answered()
            return outcome
    try:
        with local_leader(backend, spec.names):
            return Outcome(value=fn(*args, **kwargs))
    except BaseException as exc:
        return Outcome(error=exc)


class _Driver(DriverBase):
    def run(self) -> Outcome:
        client = self.backend.sync_client()
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
                    reply = self.execute(client, cmd)
                except Exception as exc:
                    error = translate(exc)
        finally:
            flight.close()
            self.release()

    def execute(self, client: SyncClient, cmd: Command) -> object:
        script = self.script_for(cmd)
        if script is not None:
            return self.reply_of(cmd, run_script(client, script, self.cluster))
        if isinstance(cmd, Wait):
            assert self.mailbox is not None
            return self.mailbox.get(cmd.timeout)
        if isinstance(cmd, Subscribe):
            if not self.subscription().wait(self.backend.confirm_timeout):
                raise self.unconfirmed()
            return None
        if isinstance(cmd, Lead):
            try:
                with self.leased(cmd):
                    return Outcome(value=self.fn(*self.args, **self.kwargs))
            except BaseException as exc:  # an abort too: the protocol must tell the waiters
                return Outcome(error=exc)
        if isinstance(cmd, Replicate):
            return wait_replicas(client, self.spec.names.lock, cmd.replicas, cmd.timeout_ms)
        raise TypeError(f"unknown command {cmd!r}")
