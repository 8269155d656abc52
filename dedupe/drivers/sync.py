"""The sync driver: runs the flight protocol over redis-py, blocking the calling thread."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..backend import Backend, run_script, wait_replicas
from ..commands import acquire_call, complete_call, discard_call, parse_acquired, translate
from ..context import Flight, check_reentry, leading
from ..envelope import Outcome
from ..errors import BackendUnavailable, WaitTimeout
from ..inflight import RETRY
from ..keys import Names
from ..protocol import (
    Acquire,
    Command,
    Complete,
    Discard,
    FlightSpec,
    Lead,
    Replicate,
    Subscribe,
    Wait,
    is_abort,
    run_flight,
)
from ..renewal import Lease, LostSignal
from ..signals import Mailbox

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
    # on_backend_error="local": deduplicated in this process only, and no fencing token.
    backend.ran_locally()
    names = spec.names
    try:
        with leading(names.channel, Flight(names.job_id, 0, LostSignal())):
            return Outcome(value=fn(*args, **kwargs))
    except BaseException as exc:
        return Outcome(error=exc)


class _Driver:
    def __init__(
        self,
        backend: Backend,
        spec: FlightSpec,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.backend = backend
        self.client = backend.sync_client()
        self.cluster = backend.kind == "cluster"  # isinstance on cluster clients is slow
        self.spec = spec
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.mailbox: Mailbox[object] | None = None

    def run(self) -> Outcome:
        flight = run_flight(self.spec, self.backend.codec, time.monotonic)
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
                    reply = self.execute(cmd)
                except Exception as exc:
                    error = translate(exc)
        finally:
            flight.close()
            if self.mailbox is not None:
                self.backend.hub().unsubscribe(self.spec.names.channel, self.mailbox)

    def execute(self, cmd: Command) -> object:
        spec = self.spec
        if isinstance(cmd, Acquire):
            call = acquire_call(spec, cmd)
            return parse_acquired(run_script(self.client, call, self.cluster))
        if isinstance(cmd, Wait):
            assert self.mailbox is not None
            return self.mailbox.get(cmd.timeout)
        if isinstance(cmd, Subscribe):
            hub = self.backend.hub()
            channel = spec.names.channel
            if self.mailbox is None:
                self.mailbox = Mailbox()
                latch = hub.subscribe(channel, self.mailbox)
            else:
                latch = hub.confirmation(channel)
            if not latch.wait(self.backend.confirm_timeout):
                hub.kick(channel)
                raise BackendUnavailable(f"Redis did not confirm the subscription to {channel!r}")
            return None
        if isinstance(cmd, Lead):
            return self.lead(cmd)
        if isinstance(cmd, Complete):
            call = complete_call(spec, cmd, self.backend.publish)
            return bool(run_script(self.client, call, self.cluster))
        if isinstance(cmd, Discard):
            return run_script(self.client, discard_call(spec, cmd), self.cluster)
        if isinstance(cmd, Replicate):
            return wait_replicas(self.client, spec.names.lock, cmd.replicas, cmd.timeout_ms)
        raise TypeError(f"unknown command {cmd!r}")

    def lead(self, cmd: Lead) -> Outcome:
        names = self.spec.names
        lease = Lease(names.job_id, names.lock, cmd.lock_value, self.spec.lock_ttl_ms / 1000)
        renewer = self.backend.renewer()
        renewer.add(lease)
        try:
            with leading(names.channel, Flight(names.job_id, cmd.token, lease.lost)):
                return Outcome(value=self.fn(*self.args, **self.kwargs))
        except BaseException as exc:  # an abort too: the protocol must tell the waiters
            return Outcome(error=exc)
        finally:
            renewer.remove(lease)
