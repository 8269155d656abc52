"""The asyncio driver: steps the call and flight machines over redis.asyncio.

The process's flight for a key runs in a task of its own (``call.run_shared_flight``), so a
cancelled caller stops waiting alone: the shared work and the other callers go on. A flight
that is only following, and that no caller awaits any more, is cancelled. Each event loop has
its own table of flights: a loop that stops mid-flight strands only its own callers.

While a follower waits for its channel's message (Wait), it holds no task: the task ends,
and the wait's end (the message, the timeout, or a Cancel) goes on in a new one
(``_Driver.park``; the driver stands in for the task in ``Entry.task`` meanwhile). A waiting
flight is then its machines and their small objects (issue 23's memory per flight).

A follower's message reaches its callers in one hand-off: the hub's callback on the loop
(one per loop and message) steps the flight machine with it right there
(``_Driver.step_ahead``); should that end the flight, it tidies up as fly() would and hands
the end to the shared flight's machine, which resolves the entry and so each caller's future.
The callers run at the loop's next turn; ``unpark``, after them, finds nothing left to step
and starts no task. (Otherwise the new task takes those steps as its own: ``_step``.) Before,
the message woke the task, which woke the callers: a turn more. The machines decide, as
ever; only who steps them changed.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from typing import Any, Final, TypeAlias

from dedupe.backend.commands import parse_looked, read_call, translate
from dedupe.backend.lifecycle import Backend
from dedupe.backend.transport import acquire_and_wait
from dedupe.core.batch import (
    Background,
    Done,
    Each,
    LaunchBatch,
    MakeFlights,
    Many,
    RunLocally,
    WaitAny,
    run_batch,
    run_batch_call,
    run_shared_batch,
)
from dedupe.core.call import (
    RUN_HERE,
    AwaitFlight,
    CallCommand,
    Cancel,
    FirstStep,
    Launch,
    RunHere,
    read_failed,
    read_first,
    run_call,
    shared_fly,
    shared_landed,
)
from dedupe.core.inflight import Entry, InFlight
from dedupe.core.keys import Names
from dedupe.core.protocol import (
    Acquire,
    Command,
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
from dedupe.core.signals import _Handover, take_any_async
from dedupe.drivers.base import BatchBase, DriverBase, local_flight, observe, read_error, read_found
from dedupe.errors import WaitTimeout
from dedupe.ops import events
from dedupe.overrides import FlightParams, spec_maker

__all__ = ["call", "call_batch"]

Fn = Callable[..., Coroutine[Any, Any, Any]]
_NO_KWARGS: Final[dict[str, Any]] = {}
"""A call's keyword arguments when it has none (read, never written: fn(**kwargs) copies)."""
log = logging.getLogger("dedupe.core.protocol")


async def call(
    backend: Backend,
    names: Names,
    p: FlightParams,
    shape: Shape | None,
    fn: Fn,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    detail: bool = False,
    first: bool = False,
) -> Any:
    """Await ``fn`` once across every caller of the job, and return its outcome, with the
    flight parameters ``p`` and the return annotation ``shape``. ``first``:
    the call needs no Served and no events, so it may read its kept value before any
    flight (``read_first``), in this coroutine: no task, no future."""
    # Few locals, and no long call here (a waiting caller holds this frame, 8 bytes a slot
    # of its locals and stack: issue 23's memory per flight): the machine's making and the
    # Launch are functions of their own.
    table = backend.async_flights()
    started = joined = None
    reply: Any = None
    if first and p.reads is not None:
        joined = read_first(backend, table, names, p.reads)
        if joined is not None and joined[2]:  # its own new entry, and the credit says read
            started = time.monotonic()
            reply = await _read(backend, table, names, p, shape, p.reads, joined[0])
            if reply[0]:
                return reply[1]  # a hit
    # A call that created its entry above asked the credit: its flight reads no more.
    fresh = joined is None or not joined[1]
    if not kwargs:
        # The call's own empty dict, held while it waits: the shared one (nobody writes it).
        kwargs = _NO_KWARGS
    machine = _call_machine(backend, table, names, p, detail, started, joined)
    joined = started = None  # the machine has them (88 bytes a waiting caller held)
    reply = None
    error: BaseException | None = None
    while True:
        try:
            cmd = machine.send(reply) if error is None else machine.throw(error)
        except StopIteration as exc:
            return exc.value
        reply, error = None, None
        try:
            if type(cmd) is AwaitFlight:
                # Latch.wait_async, written out: a waiting caller holds no coroutine of it
                # (issue 23's memory per flight).
                latch = cmd.entry.result
                wake = latch.wait_soon(cmd.timeout)
                del cmd  # nobody holds it while we wait
                if wake is not None:
                    try:
                        await wake.fut
                    finally:
                        latch.stop_wait(wake)
                reply = latch.is_set()
            elif type(cmd) is Launch:
                _launch(backend, names, p, shape, fresh, fn, args, kwargs, cmd.entry)
            elif type(cmd) is Cancel:
                _cancel(cmd.entry)
            else:
                reply = observe(names, cmd)  # type: ignore[arg-type]
        except BaseException as exc:  # thrown in: the machine tidies up and raises it
            error = exc


def _call_machine(
    backend: Backend,
    table: InFlight,
    names: Names,
    p: FlightParams,
    detail: bool,
    started: float | None,
    joined: FirstStep | None,
) -> Generator[CallCommand, Any, Any]:
    return run_call(
        backend,
        table,
        names,
        p.wait_timeout,
        time.monotonic,
        detail=detail,
        tasked=True,
        observed=events.enabled,
        soft_timeout=p.soft_timeout,
        started=started,
        joined=joined,
    )


def _launch(
    backend: Backend,
    names: Names,
    p: FlightParams,
    shape: Shape | None,
    fresh: bool,
    fn: Fn,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    entry: Entry,
) -> None:
    """Launch: the flight's task. The flight has no deadline of its own: each caller waits
    with its own. Its spec is made here, not before the machine: a caller who joins another's
    flight makes none, and one who launched holds no maker while it waits."""
    spec = spec_maker(backend, names, p, shape, fresh)(None, None)
    driver = _Driver(backend, spec, fn, args, kwargs, entry)
    # Named by its job: a name of its own ("Task-N") is a string per flight.
    entry.task = asyncio.get_running_loop().create_task(driver.fly(), name=names.job_id)


def _cancel(entry: Entry) -> None:
    task = entry.task
    if task is not None and not task.done():
        task.cancel()  # same loop: the table is this loop's


async def _read(
    backend: Backend,
    table: InFlight,
    names: Names,
    p: FlightParams,
    shape: Shape | None,
    reads: Reads,
    entry: Entry,
) -> tuple[bool, Any]:
    """read_first's read, carried as a flight's Read is, but by the caller: wait_timeout
    bounds it, as it bounds a caller's wait for its flight; counted as a flight (close()
    waits for it); the core decides what it found and ends ``entry`` on a hit or a
    failure. (False, _): the machine goes on with the entry."""
    wait_timeout = p.wait_timeout
    backend.begin_flight()
    try:
        try:
            if wait_timeout is None:
                raw = await backend.run_async_script(read_call(names))
            else:
                raw = await _bounded(backend.run_async_script(read_call(names)), wait_timeout)
            looked = parse_looked(raw)
        except BaseException as exc:
            error = read_error(exc)
        else:
            try:
                hit, value, discard = read_found(backend, table, reads, names, entry, looked,
                                                 shape, p.result_ttl_ms)  # fmt: skip
                if discard is None:
                    return hit, value
                await backend.run_async_script(discard)
                return False, None
            except BaseException as exc:
                error = translate(exc) if isinstance(exc, Exception) else exc
        read_failed(backend, table, reads, names, entry, error, wait_timeout)  # raises, or on
        return False, None
    finally:
        backend.end_flight()


if sys.version_info >= (3, 11):

    async def _bounded(read: Awaitable[Any], timeout: float) -> Any:
        """``read``, cut short past ``timeout`` seconds: WaitTimeout (no task: a timer)."""
        bound = asyncio.timeout(timeout)
        try:
            async with bound:
                return await read
        except TimeoutError:
            if bound.expired():
                raise WaitTimeout("waited the wait_timeout for the read") from None
            raise

else:  # pragma: no cover - Python 3.10

    async def _bounded(read: Awaitable[Any], timeout: float) -> Any:
        """``read``, cut short past ``timeout`` seconds: WaitTimeout."""
        try:
            return await asyncio.wait_for(read, timeout)
        except asyncio.TimeoutError:
            raise WaitTimeout("waited the wait_timeout for the read") from None


async def _run_here(
    backend: Backend,
    names: Names,
    entry: Entry,
    fn: Fn,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Outcome:
    entry.leading = True
    try:
        with local_flight(backend, names):
            return Outcome(value=await fn(*args, **kwargs))
    except BaseException as exc:
        return Outcome(error=exc)


_AHEAD: Final = object()
"""A Wait's reply once the hub's callback stepped the flight with the message (step_ahead)."""

_Step: TypeAlias = tuple[bool, Any, "BaseException | None"]

_LED: Final = Lead(0, "", 0.0)
"""What fly() holds for the Lead it carries while the function runs (the Lead is done with)."""


def _step(machine: Generator[Any, Any, Any], reply: object) -> _Step:
    """One step of a machine taken on the loop (in the hub's callback) ahead of the task that
    drives it, which then takes it as its own next step: (False, the command yielded, None),
    or (True, the value returned, None), or (True, None, what it raised)."""
    try:
        return False, machine.send(reply), None
    except StopIteration as stop:
        return True, stop.value, None
    except BaseException as exc:  # raised in the task, where it would have been
        return True, None, exc


class _Driver(DriverBase):
    # Written and read on the loop only (the hub's callback and this driver's task never run
    # at once), so no lock.
    __slots__ = ("ahead", "ended", "parked", "running", "shared")
    running: Flight | None  # the flight fly() steps
    ahead: _Step | None  # a step of it the hub's callback took
    # run_shared_flight's machine once the flight landed (shared_landed); None before
    shared: Generator[CallCommand, Any, None] | None
    ended: _Step | None  # its step, once the flight ended (and was counted out) there
    parked: _Handover[object] | None  # the armed Wait of a flight that waits with no task

    def __init__(
        self, backend: Backend, spec: FlightSpec, fn: Callable[..., Any],
        args: tuple[Any, ...], kwargs: dict[str, Any], entry: Entry,
    ) -> None:  # fmt: skip
        super().__init__(backend, spec, fn, args, kwargs, entry)
        self.running = self.ahead = self.shared = self.ended = None
        self.parked = None

    async def fly(
        self,
        flight: Flight | None = None,
        reply: Any = None,
        error: BaseException | None = None,
        *,
        alone: bool = False,
    ) -> Any:
        """The task of a key's flight for this loop's callers: call.run_shared_flight's two
        halves, its Fly (``shared_fly``: the flight itself, stepped here) and then, once the
        flight landed, the machine of what that decides (``shared``: ``shared_landed``), in
        this one frame (a waiting flight holds one coroutine of ours, not two, and no
        generator of the shared machine while the flight runs: issue 23's memory per flight).

        At a Wait, the flight parks: the task ends, and the wait's end (the hub's callback,
        the timeout, or a Cancel) goes on with a new task, ``fly(flight, reply, error)``,
        unless the hub's callback ended the flight there (step_ahead). At a Serve, the rest
        of the flight goes to a task of its own (``refresh``), where ``fly(flight,
        alone=True)`` steps that flight alone and returns its Finished."""
        machine = self.shared
        handed_off = False
        if flight is None and machine is None:
            # run_shared_flight's first step, taken apart: the Fly, or the machine at once.
            try:
                if shared_fly(self.backend, self.entry) is not None:
                    self.backend.begin_flight()
                    flight = run_flight(self.spec, self.codec, self.clock, self.trace)
                    self.running = flight
            except BaseException as exc:
                error = exc
            if flight is None:
                machine = self.shared = self.landed(RUN_HERE, error)
                error = None
        while True:
            if flight is None:
                assert machine is not None
                # run_shared_flight's step; or the one the hub's callback took as the flight
                # ended (step_ahead), unless an error came after it: thrown in instead.
                ahead, self.ended = self.ended, None
                try:
                    if ahead is not None and error is None:
                        ended, cmd, raised = ahead
                        if raised is not None:
                            raise raised
                        if ended:
                            return None
                    else:
                        cmd = machine.send(reply) if error is None else machine.throw(error)
                except StopIteration:
                    return None
                reply, error = None, None
                try:
                    if type(cmd) is RunHere:
                        reply = await _run_here(self.backend, self.spec.names, self.entry,
                                                self.fn, self.args, self.kwargs)  # fmt: skip
                    else:
                        reply = observe(self.spec.names, cmd)
                except GeneratorExit:
                    raise  # closed (its loop is gone): no await may follow
                except BaseException as exc:
                    error = exc
                continue
            # The flight's step.
            landed = False  # the flight ended: its Finished in reply, or its error
            try:
                if reply is _AHEAD:  # step_ahead took this step, then woke us
                    assert self.ahead is not None
                    ended, cmd, raised = self.ahead
                    self.ahead = None
                    if raised is not None:
                        raise raised
                    if ended:
                        landed, reply = True, cmd
                else:
                    cmd = flight.send(reply) if error is None else flight.throw(error)
            except StopIteration as stop:
                landed, reply, error = True, stop.value, None
            except BaseException as exc:
                landed, reply, error = True, None, exc
            if not landed:
                reply, error = None, None
                if type(cmd) is Serve:
                    landed = True
                    try:
                        self.serving()
                        self.backend.start_task(self.refresh(flight))
                        handed_off, reply = True, cmd.finished
                    except BaseException as exc:
                        error = exc
                else:
                    # Lead and Wait, the commands a flight waits on, are carried here rather
                    # than in execute(): a waiting flight holds no coroutine of execute's,
                    # nor of Mailbox.take_async's.
                    try:
                        if type(cmd) is Lead:
                            lead = self.flight_of(cmd, asyncio.get_running_loop())
                            cmd = _LED  # not held while the function runs (64 bytes a leader)
                            try:
                                with self.as_leader(lead):
                                    reply = Outcome(value=await self.fn(*self.args, **self.kwargs))
                            except GeneratorExit:
                                raise  # closed (its loop is gone): no await may follow
                            except BaseException as exc:  # an abort too: the waiters are told
                                reply = Outcome(error=exc)
                        elif type(cmd) is Wait:
                            # The message goes into the flight in the hub's callback
                            # (step_ahead): _AHEAD.
                            box = self.mailbox
                            assert box is not None  # a Wait comes after a Subscribe
                            waker = box.take_soon(cmd.timeout, self.step_ahead)
                            if waker is None:
                                reply = _AHEAD
                            elif not alone:
                                # Parked: a waiting flight holds no task nor coroutine.
                                self.park(waker)
                                return None
                            else:  # a refresh (which leads: it never waits, as it stands)
                                try:
                                    await waker.fut
                                finally:
                                    box.stop_take(waker)
                                reply = _AHEAD if box.took(waker) else None
                        else:
                            reply = await self.execute(cmd)
                    except GeneratorExit:
                        raise  # closed (its loop is gone): no await may follow
                    except BaseException as exc:  # an abort too: thrown in, it goes on up
                        error = self.failed(cmd, exc)
                    continue
            # The flight ended: its subscription and lease end (unless handed off), it is
            # counted out (unless the hub's callback did both), and its end goes on up.
            try:
                if not handed_off:
                    flight.close()
                    self.finish()
            except BaseException as exc:
                reply, error = None, exc
            if alone:  # a refresh: the flight alone
                if error is not None:
                    raise error
                return reply
            flight, handed_off = None, False
            if self.ended is None:
                self.backend.end_flight()
            machine = self.shared  # made already if the hub's callback ended the flight
            if machine is None:
                machine = self.shared = self.landed(reply, error)
                reply, error = None, None

    def landed(
        self, reply: object, error: BaseException | None
    ) -> Generator[CallCommand, Any, None]:
        """The shared flight's machine once its Fly landed with ``reply`` or ``error`` (to be
        stepped at once: it resolves the entry)."""
        backend = self.backend
        return shared_landed(backend, backend.async_flights(), self.spec.names, self.entry,
                             reply, error, observed=events.enabled)  # fmt: skip

    async def refresh(self, flight: Flight) -> None:
        """The rest of a flight whose callers were served, in a task the backend keeps."""
        try:
            await self.fly(flight, alone=True)
        except Exception as exc:
            log.warning("a background refresh of %r failed: %s", self.spec.names.job_id, exc)

    def park(self, waker: _Handover[object]) -> None:
        """A Wait of the flight's task: the task ends here; the flight waits with no task
        (issue 23's memory per flight) until the wait ends (unpark) or a Cancel comes."""
        self.parked = waker
        # In a copy of this task's context: so is the task that unpark() starts. The driver
        # is the callback itself (__call__): a bound method would be 64 bytes more.
        waker.fut.add_done_callback(self)
        self.entry.task = self

    def unpark(self, fut: asyncio.Future[bool | None]) -> None:
        """The parked Wait ended (on the loop, after whatever the hub's callback woke)."""
        waker = self.parked
        if waker is not None and waker.fut is fut:  # else cancel() took it on already
            self.resume(None)

    __call__ = unpark

    def resume(self, error: BaseException | None) -> None:
        """The parked flight goes on, in a new task, with what the Wait replies (or with
        ``error`` thrown in); or ends here if the hub's callback ended it and the shared
        flight's machine (step_ahead): then nothing is left to step."""
        waker = self.parked
        assert waker is not None
        self.parked = None
        box = waker.box  # self.mailbox is gone if the flight ended (step_ahead's finish())
        box.stop_take(waker)
        reply: object = None
        if error is None:
            reply = _AHEAD if box.took(waker) else None
            ended = self.ended
            if reply is _AHEAD and ended is not None and ended[0] and ended[2] is None:
                self.ahead = self.ended = None
                return  # what fly() would do: the flight and the machine ended, tidied up
        flight = self.fly(self.running, reply, error)
        loop = asyncio.get_running_loop()
        self.entry.task = loop.create_task(flight, name=self.spec.names.job_id)

    def done(self) -> bool:
        """Entry.task's done(), while the driver stands in for the flight's task."""
        return self.parked is None

    def cancel(self) -> bool:
        """Entry.task's cancel(), while the driver stands in for the flight's task: a parked
        flight goes on in a task, with CancelledError thrown in as into its task."""
        if self.parked is None:
            return False
        self.resume(asyncio.CancelledError())
        return True

    def step_ahead(self, message: object) -> None:
        """A Wait's message, on the loop (the hub's callback, ahead of this driver's task):
        into the flight now. Should that end it, the shared flight's machine takes the end
        here too, which resolves the entry: the callers then run before the task."""
        assert self.running is not None
        ended, value, raised = self.ahead = _step(self.running, message)
        if ended and raised is None and self.shared is None:  # the shared flight's, not a refresh
            # What fly() does next, in its order: the flight's finish() (its own then finds
            # nothing left), the flight counted out, the shared machine's step.
            try:
                self.finish()
            except BaseException as exc:  # the task raises it, as fly() would have
                self.ahead = (True, None, exc)
                return
            try:
                self.backend.end_flight()
            finally:  # counted out, so the machine's step is the task's to take, whatever
                self.shared = self.landed(value, None)
                self.ended = _step(self.shared, None)

    async def execute(self, cmd: Command) -> object:
        """The commands but Serve, Lead and Wait (fly() carries those)."""
        script = self.script_for(cmd)
        if script is not None:
            if type(cmd) is Acquire:
                if self.spec.min_replicas:
                    # Acquire and WAIT on one connection: the sync client's one-node pipeline.
                    backend = self.backend
                    client = await backend.in_thread(backend.sync_client)
                    raw, acked = await backend.in_thread(
                        acquire_and_wait, backend.transport, client, script, self.spec, self.stamp
                    )
                    return self.reply_of(cmd, raw, acked)
                raw = await self.backend.run_async_script(script, self.stamp)
                return self.reply_of(cmd, raw)
            if type(cmd) is Read:  # no lease yet either
                raw = await self.backend.run_async_script(script)
                return self.reply_of(cmd, raw)
            return self.reply_of(cmd, await self.backend.run_async_script(script))
        if type(cmd) is Subscribe:
            latch = self.subscribe()
            return await latch.wait_async(self.confirm_timeout(cmd.timeout)) and latch.get()
        if type(cmd) is Pause:
            await asyncio.sleep(cmd.seconds)
            return None
        if self.at_once(cmd):
            return None
        raise TypeError(f"unknown command {cmd!r}")


# --- batches ---------------------------------------------------------------------------------


async def call_batch(
    backend: Backend,
    names: Sequence[Names],
    make_spec: Callable[[int, float | None, float | None], FlightSpec],
    wait_timeout: float | None,
    fn: Fn,
    items: Sequence[Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    soft_timeout: float | None = None,
) -> list[Outcome | None]:
    """Each item's outcome (None: absent), with every key still run once across callers.
    The items this call creates flights for run in a task of their own (as one key's do)."""
    table = backend.async_flights()
    machine = run_batch_call(
        backend, table, names, wait_timeout, time.monotonic, tasked=True,
        soft_timeout=soft_timeout,
    )  # fmt: skip
    driver = _BatchDriver(backend, names, make_spec, fn, items, args, kwargs)
    return await driver.step(machine)  # type: ignore[no-any-return]


class _BatchDriver(BatchBase):
    async def step(self, machine: Generator[Any, Any, Any]) -> Any:
        """Carry a batch machine's commands (run_batch_call's, run_shared_batch's, or
        run_batch's alone)."""
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
                    reply = await self.execute(cmd)
                except BaseException as exc:  # thrown in: the machine tidies up and raises it
                    error = exc
        finally:
            machine.close()
            self.finish_all()

    async def execute(self, cmd: Any) -> Any:
        kind = type(cmd)
        if kind is Many:
            return await self.many(cmd)
        if kind is WaitAny:
            boxes, timeout = self.boxes(cmd)
            return await take_any_async(boxes, timeout)
        if kind is Done:
            return self.done(cmd)
        if kind is Each:
            carried, script = self.each(cmd)
            return None if carried else await self.backend.run_async_script(script)  # type: ignore[arg-type]
        if kind is MakeFlights:
            return self.make(cmd)
        if kind is RunLocally:
            led, context = self.begin_local(cmd)
            try:
                with context:
                    got = await self.fn(led, *self.args, **self.kwargs)
            except BaseException as exc:  # an abort too: the joiners start over
                return self.outcomes(led, None, exc)
            return self.outcomes(led, got, None)
        if kind is AwaitFlight:
            return await cmd.entry.result.wait_async(cmd.timeout)
        if kind is LaunchBatch:
            # The flights of the items this call created, in a task: a cancelled caller stops
            # waiting alone (the task, kept by the backend, runs on for the others).
            runner = copy.copy(self)
            runner.drivers, runner.positions, runner.handed = [], [], set()
            table = self.backend.async_flights()
            shared = run_shared_batch(self.backend, table, self.names, cmd.items)
            self.backend.start_task(runner.step(shared))
            return None
        if kind is Background:
            part = self.part(cmd)
            flights = [flight for _, flight in cmd.flights]
            self.backend.start_task(_refresh(part, flights))
            return None
        raise TypeError(f"unknown command {cmd!r}")

    async def many(self, cmd: Many) -> list[Any]:
        if cmd.kind is Lead:
            led, context = self.begin_leads(cmd)
            try:
                with context:
                    got = await self.fn(led, *self.args, **self.kwargs)
            except BaseException as exc:  # an abort too: the protocol tells the waiters
                return self.outcomes(led, None, exc)
            return self.outcomes(led, got, None)
        if cmd.kind is Subscribe:
            latches, timeout = self.subscribe(cmd)
            end = time.monotonic() + timeout
            return [
                await latch.wait_async(max(0.0, end - time.monotonic())) and latch.get()
                for latch in latches
            ]
        calls, stamps = self.script_calls(cmd)
        return self.replies(cmd, await self.backend.transport.run_async_scripts(calls, stamps))


async def _refresh(part: _BatchDriver, flights: list[Any]) -> None:
    """Items served at once whose refresh goes on, in a task the backend keeps."""
    try:
        await part.step(run_batch(flights, part.clock))
    except Exception as exc:
        log.warning("a background refresh of a batch failed: %s", exc)
