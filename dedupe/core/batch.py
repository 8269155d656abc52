"""Many keys in one call: one flight machine per item, stepped together (sans-I/O).

Charter: a batch decides nothing of its own about a key. Each item is an ordinary flight
(``protocol.run_flight``) with its own spec, lease, token and outcome; ``run_batch`` steps
them together and gathers what they ask for, so that the I/O is shared:

- every item's Acquire goes in one ``Many`` (the driver runs them in one pipelined round
  trip per server), so an uncontended batch claims all its keys in one round trip;
- the items that lead are run by **one** call of the function (``Many`` of Lead), with just
  those items, and their Completes go in one round trip;
- Subscribes are gathered too, and the items that wait are woken by one ``WaitAny``.

Order (no deadlock between batches): gathered I/O goes Acquire, Lead, Complete, Subscribe,
and only then Wait. A batch that leads some items therefore stores and publishes them before
it waits on any other leader's, so two batches that each lead part of the other's items
both finish; and its leases are renewed from the moment they are granted, not after other
items' subscriptions. (An item that waits subscribes after the run: a message published
meanwhile is not lost, as its re-check after subscribing reads the stored outcome.) An item
whose leader dies is taken over by the batch like any flight: its re-check leads, and the
function runs again with the items taken over.

Under on_backend_error="local", items whose flights met BackendUnavailable (every item,
during an outage) run in this process after the rest, in one call of the function with no
lease (``RunLocally``), as one key's ``RunHere``; their entries stay open until then, so
the process's other callers join that run.

Items served at once (a stale value, or a fresh one with an early refresh: ``Serve``) go on
in the background as a batch of their own (``Background``): the caller does not wait for
their refresh.

What goes in and what comes out: ``run_batch`` takes the items' flight machines and returns,
per item, its ``Finished`` or the exception its flight raised (a WaitTimeout, a
BackendUnavailable). ``Done`` is yielded as each item ends, so that the process's callers
who joined that item are released at once rather than at the end of the batch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, Final, NamedTuple, TypeAlias

from dedupe.core.call import CallEnv, copy_of, share, wait_for
from dedupe.core.context import check_reentry
from dedupe.core.inflight import RETRY, Entry, InFlight
from dedupe.core.keys import Names
from dedupe.core.protocol import (
    Acquire,
    Command,
    Complete,
    Discard,
    Finished,
    Flight,
    Lead,
    Note,
    Offer,
    Pause,
    Release,
    Serve,
    Subscribe,
    Wait,
    is_abort,
)
from dedupe.core.sealing import Outcome
from dedupe.errors import BackendUnavailable, ProtocolError, WaitTimeout

__all__ = [
    "Absent",
    "Background",
    "BatchCommand",
    "Done",
    "Each",
    "LaunchBatch",
    "MakeFlights",
    "Many",
    "RunLocally",
    "WaitAny",
    "run_batch",
    "run_batch_call",
    "run_shared_batch",
]

_monotonic: Final = time.monotonic
ABSENT: Final = "absent"  # the role of an entry whose item the function's mapping left out


class Absent(BaseException):
    """The Lead outcome of an item the function's mapping left out: like an abort, nothing
    is kept and the waiters on its lease look again (a single-key caller then runs it)."""


class Many(NamedTuple):
    """Run these items' commands (all of one kind: Acquire, Subscribe, Lead or Complete)
    together. Reply: a list, in order, of each item's reply or the exception to throw into
    its flight (a failed command; an abort is raised out of the batch instead)."""

    kind: type
    items: tuple[tuple[int, Command], ...]


class WaitAny(NamedTuple):
    """Wait until one of these items gets a channel message, or until the earliest ``until``
    (on the batch's clock). ``items``: (index, until, pause) where a pause gets no message.
    Reply: {index: message} for the items that got one (bytes or RECHECK); an item whose
    ``until`` passed is answered None by the batch itself."""

    items: tuple[tuple[int, float, bool], ...]


class Each(NamedTuple):
    """One item's command that needs no gathering (Note, Offer, Release, Discard). Reply:
    its reply, as the single-key driver gives it."""

    at: int  # the item's index
    cmd: Command


class Done(NamedTuple):
    """An item's flight ended: ``result`` is its Finished or the exception it raised (a
    value served at once, whose refresh goes on in the background, ends here too). Reply:
    None."""

    at: int  # the item's index
    result: Finished | BaseException
    going_on: bool = False  # served at once: its flight goes on in the background


class Background(NamedTuple):
    """These items' flights go on in the background (their callers were served): the driver
    steps them with ``run_batch`` on a thread or task of their own. Reply: None."""

    flights: tuple[tuple[int, Flight], ...]


BatchCommand: TypeAlias = Many | WaitAny | Each | Done | Background
Batch: TypeAlias = Generator[BatchCommand, Any, "list[Finished | BaseException]"]

# The kinds gathered into one Many, in the order they are served (see the module doc).
_GATHERED: Final = (Acquire, Lead, Complete, Subscribe)
_AT_ONCE: Final = (Note, Offer, Release, Discard)


def run_batch(flights: Sequence[Flight], clock: Callable[[], float]) -> Batch:
    """Step the items' flight machines together to their ends (see the module doc).

    ``flights``: fresh ``run_flight`` machines, or machines stopped at a ``Serve`` (the
    background half of a batch: each is resumed with None). ``clock``: the flights' clock.
    """
    n = len(flights)
    results: list[Finished | BaseException | None] = [None] * n
    # What to send into each flight next: (reply, error); flights blocked on I/O are absent.
    ready: dict[int, tuple[object, BaseException | None]] = {i: (None, None) for i in range(n)}
    blocked: dict[int, Command] = {}  # index -> the gathered command it waits on
    waiting: dict[int, tuple[float, bool]] = {}  # index -> (until, pause): a Wait or Pause
    try:
        while ready or blocked or waiting:
            served: list[tuple[int, Flight]] = []
            for i in sorted(ready):
                reply, error = ready.pop(i)
                flight = flights[i]
                while True:
                    try:
                        cmd = flight.send(reply) if error is None else flight.throw(error)
                    except StopIteration as stop:
                        results[i] = stop.value
                        yield Done(i, stop.value)
                        break
                    except Exception as exc:  # WaitTimeout, BackendUnavailable: this item's
                        results[i] = exc
                        yield Done(i, exc)
                        break
                    reply, error = None, None
                    kind = type(cmd)
                    if kind in _AT_ONCE:
                        try:
                            reply = yield Each(i, cmd)
                        except Exception as exc:
                            error = exc
                        continue
                    if kind is Serve:
                        results[i] = cmd.finished  # type: ignore[union-attr]
                        yield Done(i, cmd.finished, going_on=True)  # type: ignore[union-attr]
                        served.append((i, flight))
                        break
                    if kind is Wait:
                        waiting[i] = (clock() + cmd.timeout, False)  # type: ignore[union-attr]
                        break
                    if kind is Pause:
                        waiting[i] = (clock() + cmd.seconds, True)  # type: ignore[union-attr]
                        break
                    if kind not in _GATHERED:
                        raise ProtocolError(f"a batch cannot carry {cmd!r}")
                    blocked[i] = cmd
                    break
            if served:
                yield Background(tuple(served))
            gathered = _next_group(blocked)
            if gathered:
                kind = type(gathered[0][1])
                replies = yield Many(kind, tuple(gathered))
                if type(replies) is not list or len(replies) != len(gathered):
                    raise ProtocolError(f"the reply to Many must be a list of {len(gathered)}")
                for (i, _), got in zip(gathered, replies, strict=True):
                    del blocked[i]
                    ready[i] = (None, got) if isinstance(got, BaseException) else (got, None)
                continue
            if not waiting:
                continue
            now = clock()
            for i, (until, _) in list(waiting.items()):
                if until <= now:  # its wait (or pause) is over: the flight re-checks
                    del waiting[i]
                    ready[i] = (None, None)
            if ready:
                continue
            got = yield WaitAny(tuple((i, until, pause) for i, (until, pause) in waiting.items()))
            if type(got) is not dict:
                raise ProtocolError(f"the reply to WaitAny must be a dict, not {got!r}")
            for i, message in got.items():
                if i in waiting and not waiting[i][1]:
                    del waiting[i]
                    ready[i] = (message, None)
    finally:
        for i, flight in enumerate(flights):
            if results[i] is None:
                flight.close()  # an abort went through the batch: end the rest cleanly
    return [r if r is not None else ProtocolError("item never finished") for r in results]


def _next_group(blocked: dict[int, Command]) -> list[tuple[int, Command]]:
    """The blocked items of the first kind in _GATHERED's order, by index."""
    for kind in _GATHERED:
        group: list[tuple[int, Command]]
        group = [(i, cmd) for i, cmd in sorted(blocked.items()) if type(cmd) is kind]
        if group:
            return group
    return []


# --- a caller's batch: joining the process's flights, driving the rest -----------------------


class MakeFlights(NamedTuple):
    """Build the flight machines (run_flight) of these items, each with its own driver state
    (spec, lease, subscription) and the deadlines on the machine's clock (None: none).
    Reply: a list of them, in order."""

    items: tuple[tuple[int, Entry], ...]
    deadline: float | None
    soft_deadline: float | None


class RunLocally(NamedTuple):
    """on_backend_error="local" while Redis is down: run the function once, in this process
    and with no lease, for these items (their indexes in the MakeFlights reply), as
    ``call.RunHere`` does for one key. Reply: each item's Outcome, in order."""

    items: tuple[int, ...]


class LaunchBatch(NamedTuple):
    """asyncio: start a task that steps ``run_shared_batch`` for these items' entries.
    Reply: None."""

    items: tuple[tuple[int, Entry], ...]


def run_batch_call(
    env: CallEnv,
    table: InFlight,
    names: Sequence[Names],
    wait_timeout: float | None,
    clock: Callable[[], float],
    *,
    tasked: bool = False,
    soft_timeout: float | None = None,
) -> Generator[Any, Any, list[Outcome | None]]:
    """One caller's batch, to each item's outcome (None: absent from the function's mapping).

    Per item, as ``call.run_call`` does for one key: a fresh local copy; else the process's
    flight of that key is joined (a single-key call's or another batch's, with no Redis I/O
    for it), or created and driven by this batch with the others it created (sync: on this
    caller's thread; asyncio: in a task of its own, which every caller awaits with its own
    deadline). An item whose flight ended without an outcome for its joiners (RETRY) is
    joined again. Errors are per item (in its Outcome); an abort goes through."""
    for n in names:
        check_reentry(n.channel, n.job_id)
    now = clock()
    deadline = None if wait_timeout is None else now + wait_timeout
    soft_at = None if soft_timeout is None else now + soft_timeout
    outcomes: list[Outcome | None] = [None] * len(names)
    todo = list(range(len(names)))
    copies = env.local_copies
    if copies is not None:
        for i in list(todo):
            hit, value = copies.get(names[i].channel)
            if hit:
                outcomes[i] = Outcome(value=value, age_ms=copies.age_ms(names[i].channel))
                todo.remove(i)
    while todo:
        mine: list[tuple[int, Entry]] = []
        joined: list[tuple[int, Entry]] = []
        for i in todo:
            entry, created = table.join(names[i].channel)
            if created:
                entry.job_id = names[i].job_id
                mine.append((i, entry))
            else:
                joined.append((i, entry))
        todo = []
        waits = [(i, entry, False) for i, entry in joined]
        if mine and tasked:
            yield LaunchBatch(tuple(mine))
            waits += [(i, entry, True) for i, entry in mine]
        elif mine:
            flights = yield MakeFlights(tuple(mine), deadline, soft_at)
            results = yield from resolving(env, table, names, tuple(mine), flights, clock)
            for (i, _), result in zip(mine, results, strict=True):
                if isinstance(result, Finished):
                    error = result.outcome.error
                    if error is None or not is_abort(error):
                        outcomes[i] = result.outcome
                    elif not isinstance(error, Absent):
                        raise error  # an abort of the run: the joiners start over
                elif isinstance(result, WaitTimeout):
                    outcomes[i] = Outcome(error=WaitTimeout(job_id=names[i].job_id,
                                                            seconds=wait_timeout))  # fmt: skip
                else:
                    outcomes[i] = Outcome(error=result)
        for i, entry, own in waits:
            try:
                done = yield from wait_for(entry, own, deadline, soft_at, clock)
            except BaseException:
                if tasked:
                    table.leave(entry)  # the task runs on for the other callers
                raise
            if done is None:  # soft_timeout: the stale value the flight offered
                if tasked:
                    table.leave(entry)
                outcomes[i] = dataclasses.replace(entry.fallback.outcome, stale="timeout")
                continue
            if not done:
                if tasked:
                    table.leave(entry)
                outcomes[i] = Outcome(error=WaitTimeout(job_id=names[i].job_id,
                                                        seconds=wait_timeout))  # fmt: skip
                continue
            got = entry.result.get()
            if got is RETRY:
                if not (own and entry.role == ABSENT):
                    todo.append(i)  # an abort: start over (absent: final for our own batch)
            elif type(got) is Outcome:
                outcomes[i] = got if own else _shared_copy(got)
            else:
                raise ProtocolError(f"a flight's result must be an Outcome, not {got!r}")
    return outcomes


def run_shared_batch(
    env: CallEnv, table: InFlight, names: Sequence[Names], items: tuple[tuple[int, Entry], ...]
) -> Generator[Any, Any, None]:
    """The flights an asyncio task runs for its process's callers (see LaunchBatch): each
    entry resolved as its item ends."""
    flights = yield MakeFlights(items, None, None)
    results = yield from resolving(env, table, names, items, flights, None)
    for result in results:
        if isinstance(result, Finished) and result.outcome.error is not None:
            error = result.outcome.error
            if is_abort(error) and not isinstance(error, Absent):
                raise error  # the waiters were told; the abort goes on up, as it would


def resolving(
    env: CallEnv,
    table: InFlight,
    names: Sequence[Names],
    items: tuple[tuple[int, Entry], ...],
    flights: object,
    clock: Callable[[], float] | None,
) -> Generator[Any, Any, list[Finished | BaseException]]:
    """Step run_batch over ``flights``, resolving each item's entry as soon as it ends (so
    its joiners are released then, not at the end of the batch); every other command goes
    to the driver. Entries still open when this ends (an abort) resolve to RETRY."""
    if type(flights) is not list or len(flights) != len(items):
        raise ProtocolError(f"the reply to MakeFlights must be a list of {len(items)} flights")
    open_ = {k: entry for k, (_, entry) in enumerate(items)}
    here: set[int] = set()  # on_backend_error="local", Redis down: the items to run here
    if env.skip_redis():  # an outage: Redis is not tried again yet
        for flight in flights:
            flight.close()
        here = set(range(len(items)))
    batch = run_batch(flights if not here else [], clock or _monotonic)
    results: list[Finished | BaseException] = [ProtocolError("item never finished")] * len(items)
    reply: Any = None
    error: BaseException | None = None
    try:
        while True:
            try:
                cmd = batch.send(reply) if error is None else batch.throw(error)
            except StopIteration as stop:
                results = stop.value or results
                break
            reply, error = None, None
            if type(cmd) is Done:
                down = cmd.result if isinstance(cmd.result, BackendUnavailable) else None
                if down is not None and env.fall_back(down):
                    here.add(cmd.at)  # its entry stays open, for the local run
            if type(cmd) is Done and cmd.at not in here:
                key = names[items[cmd.at][0]].channel
                result = cmd.result
                shared: Outcome | object
                entry = open_.pop(cmd.at)
                if isinstance(result, Finished):
                    env.answered()
                    entry.role, entry.token, entry.trace = result.role, result.token, result.trace
                    if isinstance(result.outcome.error, Absent):
                        entry.role = ABSENT  # RETRY for joiners; for this batch, final
                    shared = share(env, key, result)
                elif isinstance(result, WaitTimeout):
                    shared = RETRY  # ours alone: the callers who joined start over
                else:
                    shared = Outcome(error=result)  # BackendUnavailable and kin: everyone's
                table.finish(key, entry, shared)  # type: ignore[arg-type]
            try:
                reply = yield cmd  # Done too: the driver ends the item's lease and subscription
            except BaseException as exc:
                error = exc
        if here:
            outcomes = yield RunLocally(tuple(sorted(here)))
            if type(outcomes) is not list or len(outcomes) != len(here):
                raise ProtocolError(f"the reply to RunLocally must be a list of {len(here)}")
            for k, outcome in zip(sorted(here), outcomes, strict=True):
                finished = Finished(outcome, "leader", 0)
                results[k] = finished
                entry = open_.pop(k)
                entry.role = ABSENT if isinstance(outcome.error, Absent) else "leader"
                key = names[items[k][0]].channel
                table.finish(key, entry, share(env, key, finished))  # type: ignore[arg-type]
        return results
    finally:
        for k, entry in open_.items():
            table.finish(names[items[k][0]].channel, entry, RETRY)


def _shared_copy(outcome: Outcome) -> Outcome:
    """A joiner's copy of an outcome: its own exception object (see call._copy_of)."""
    if outcome.error is None:
        return outcome
    return dataclasses.replace(outcome, error=copy_of(outcome.error))
