"""One caller's call as a sans-I/O machine: join the process's flight, wait, retry, deliver.

Charter: every decision a caller makes around a flight lives here, in ``run_call`` (and in
``run_shared_flight``, the flight a task runs for its callers on asyncio); ``run_flight``
(protocol.py) decides the flight itself. The drivers only carry the blocking commands: they
wait on the process's flight, run the flight protocol, run the function in-process, start or
cancel a flight task, and report events. The simulator (tests/sim) drives this same machine
in both modes, so a decision cannot differ between the drivers unnoticed.

What it decides: the local copy (``local_cache``: role "copy"); joining the process's
flight for the key, or creating it; the caller's deadline (``wait_timeout``) and soft
deadline (``soft_timeout``: the stale value its flight offered); starting over after an
abort (RETRY); ``on_backend_error="local"`` (run the function in-process while Redis is
down); the takeover mark; what the callers who joined get (``share``); and what each caller
returns or raises (the original exception for the caller whose flight made it, a copy for
the others).

Two modes, one machine:
- ``tasked=False`` (sync): the caller that creates the process's flight runs it on its own
  thread, under its own deadline; when it gives up, the callers who joined start over.
- ``tasked=True`` (asyncio): the flight runs in a task of its own with no deadline; every
  caller, its creator too, waits on it with its own deadline, so a cancelled or timed-out
  caller stops waiting alone. A flight that only follows and that nobody awaits any more is
  cancelled; one that leads runs on.

States and transitions::

    state        command                 reply                 next
    START        Begin (observed only)   the observation       -> LOCAL
    LOCAL        -                       local copy fresh      -> End, return it (kept)
                                         none                  -> JOINING
    JOINING      -                       joined another's      -> WAITING
                                         created (sync)        -> FLYING
                                         created (asyncio)     -> Launch, WAITING
    WAITING      AwaitFlight             resolved: outcome     -> End, return or raise it
                                         resolved: RETRY       -> JOINING
                                         timed out             -> (Cancel), End, raise WaitTimeout
                                         (asyncio creator whose flight leads: no timeout)
    FLYING       Fly                     Finished              -> (Takeover), End, return or raise
                 (Redis down, "local")   BackendUnavailable    -> RunHere -> End, return or raise
                                         WaitTimeout           -> End, raise; joiners RETRY
                                         another error         -> End, raise it; joiners too

Before the machine (a hit's hot path, when no Served and no events are wanted): the driver
may take the local copy (``copy_hit``), then the join, and for a function that reads first
the read of its kept value (``read_first``: the read is the process's flight of the key,
which callers who come meanwhile join); ``served_read`` and ``read_failed`` decide what the
read found, as the flight would. A hit ends the entry with the value; a miss hands the entry
to run_call (``joined``), whose flight then starts at the acquire script.

Contract: the driver replies to each command as its docstring says; it may throw an abort
(``CancelledError``, ``KeyboardInterrupt``) into an ``AwaitFlight`` or ``Fly``, which goes
back out after the machine has tidied up (left the flight, ended the observation). A reply
of the wrong kind raises ``ProtocolError``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Generator
from typing import Any, Final, NamedTuple, NoReturn, Protocol, TypeAlias

from dedupe.core.context import check_reentry, leading_state
from dedupe.core.inflight import RETRY, Entry, InFlight, Served
from dedupe.core.keys import Names
from dedupe.core.protocol import Finished, Looked, ReadRefused, Reads, is_abort, read_kept
from dedupe.core.sealing import Codec, Outcome
from dedupe.core.shapes import Shape
from dedupe.errors import BackendUnavailable, ProtocolError, WaitTimeout

__all__ = [
    "RUN_HERE",
    "AwaitFlight",
    "Begin",
    "CallCommand",
    "CallEnv",
    "Cancel",
    "End",
    "FirstStep",
    "Fly",
    "Launch",
    "RunHere",
    "Takeover",
    "copy_hit",
    "read_failed",
    "read_first",
    "run_call",
    "run_shared_flight",
    "served_read",
    "shared_fly",
    "shared_landed",
]


# --- commands (what the machine asks the driver to do) ----------------------------------------


class Begin(NamedTuple):
    """Start observing the call (events.begin: a span opens, current in the caller's
    context). Reply: the observation handle (passed back in End)."""


class End(NamedTuple):
    """The call ends: report it (events' Call.end). Reply: None."""

    handle: Any
    role: str
    error: BaseException | None = None
    token: int = 0
    leader_trace: bytes = b""
    stale: str = ""  # why a stale value was served ("": it was not)
    age_ms: int = 0  # the value's age, by the server's clock


class Takeover(NamedTuple):
    """This call's flight took over from a leader that died or gave up (an event). Reply:
    None."""

    token: int


class AwaitFlight(NamedTuple):
    """Wait until the process's flight ``entry`` is resolved, at most ``timeout`` seconds
    (None: no bound). Reply: True if resolved."""

    entry: Entry
    timeout: float | None


class Fly(NamedTuple):
    """Run the flight protocol (run_flight) for ``entry`` on this caller's thread, with the
    deadline and soft deadline on the machine's clock (None: none). Reply: Finished; its
    errors are thrown in (BackendUnavailable and kin, WaitTimeout)."""

    entry: Entry
    deadline: float | None
    soft_deadline: float | None = None


class Launch(NamedTuple):
    """Start a task that drives ``run_shared_flight`` for ``entry`` (asyncio). Reply: None."""

    entry: Entry


class Cancel(NamedTuple):
    """Cancel ``entry``'s flight task if it is still running (nobody awaits it any more and
    it only follows). Reply: None."""

    entry: Entry


class RunHere(NamedTuple):
    """Run the function in this process, with no lease (token 0), as a leader; count it as a
    local run. Reply: Outcome (any BaseException captured in it)."""

    entry: Entry


CallCommand: TypeAlias = Begin | End | Takeover | AwaitFlight | Fly | Launch | Cancel | RunHere


class CallEnv(Protocol):
    """What the machine reads and updates in the process (no I/O, nothing that blocks)."""

    local_copies: Any  # LocalCopies | None

    def skip_redis(self) -> bool: ...
    def fall_back(self, exc: Exception) -> bool: ...
    def answered(self) -> None: ...


_OBSERVE: Final = Begin()
_MISS: Final = (False, None)


def copy_hit(env: CallEnv, names: Names) -> tuple[bool, Any]:
    """The call's first step: (True, value) if this process holds a fresh local copy of the
    job's value (``local_cache``), else (False, None). A leader calling its own key raises
    ReentrantFlight first, copy or not. run_call takes this step itself; SingleFlight's
    _run_sync and _run_async take it before starting the machine (the hot path of a cache:
    no generator, no flight) when they need no Served and no events: inline outside any
    lead, by this function inside one."""
    key = names.channel
    if leading_state.get() is not None:  # inside a leader's function: is it this key?
        check_reentry(key, names.job_id)
    copies = env.local_copies
    return _MISS if copies is None else copies.get(key)


# --- the read before any flight (issue 23's hit) -----------------------------------------------


FirstStep: TypeAlias = tuple[Entry, bool, bool]
"""What read_first decided: the process's flight of the key the call joined, whether the
call created it (it is this call's), and whether the call reads the kept value now (then
the entry is its read's, joined by the callers who come meanwhile). A plain tuple: a
NamedTuple's constructor runs Python code on the hit's path."""


def read_first(env: CallEnv, table: InFlight, names: Names, reads: Reads) -> FirstStep | None:
    """A call whose function reads first (``Reads``) joins or creates the process's flight
    of its key as run_call would; if it created it and the read credit says so, it reads the
    kept value now, before any machine (the hot path of a cache: no generator, no driver, no
    spec), as the flight's first step would (run_flight's Read). The driver may take this
    step when it needs no Served and no events; run_call then goes on with the entry
    (``joined``), its flight starting at the acquire script if this call asked the credit.

    None: the machine as ever (Redis is skipped in an outage: local runs). A leader calling
    its own key raises ReentrantFlight first."""
    key = names.channel
    if leading_state.get() is not None:  # inside a leader's function: is it this key?
        check_reentry(key, names.job_id)
    if env.skip_redis():
        return None
    entry, created = table.join(key)
    if created:
        entry.job_id = names.job_id
        return entry, True, reads.wanted()
    return entry, False, False


def served_read(
    env: CallEnv,
    table: InFlight,
    reads: Reads,
    names: Names,
    entry: Entry,
    codec: Codec,
    looked: Looked,
    shape: Shape | None,
    result_ttl_ms: int,
) -> tuple[bool, Any]:
    """What read_first's read found (run_flight's rule, ``read_kept``). (True, value): a
    fresh, current value, which ends the call's flight as a kept outcome does (the callers
    who joined get it, a local copy is kept, the credit earned). Else (False, None): the
    machine goes on with the entry, its flight starting at the acquire script; or (False,
    Rejected): the driver notes it and drops the record (Discard) first."""
    kept = read_kept(codec, looked, names.channel, shape, result_ttl_ms)
    reads.saw(type(kept) is Finished)
    if type(kept) is not Finished:
        return _MISS if kept is None else (False, kept)
    env.answered()  # what Fly's reply tells (_flown): Redis answers
    entry.role, entry.token, entry.trace = "kept", kept.token, kept.trace
    outcome = kept.outcome
    table.finish(names.channel, entry, share(env, names.channel, kept))  # type: ignore[arg-type]
    return True, outcome.value


def read_failed(
    env: CallEnv,
    table: InFlight,
    reads: Reads,
    names: Names,
    entry: Entry,
    error: BaseException,
    wait_timeout: float | None,
) -> None:
    """read_first's read failed (``error``: the driver's, translated). Refused (ReadRefused:
    an ACL without MGET, a slot elsewhere): a miss, the machine goes on with the entry to
    the script; so it does for an outage under on_backend_error="local" (it finds Redis
    skipped and runs the function here). Else the call's flight ends as _drive_inline ends
    it: no command slot within wait_timeout raises WaitTimeout and an abort goes on up (the
    callers who joined start over); another error reaches them too."""
    if type(error) is ReadRefused:
        reads.saw(False)
        return
    key = names.channel
    if isinstance(error, WaitTimeout):
        table.finish(key, entry, RETRY)
        raise WaitTimeout(job_id=names.job_id, seconds=wait_timeout) from None
    if isinstance(error, BackendUnavailable) and env.fall_back(error):
        return
    table.finish(key, entry, Outcome(error=error) if isinstance(error, Exception) else RETRY)
    raise error


# --- the call ---------------------------------------------------------------------------------


def run_call(
    env: CallEnv,
    table: InFlight,
    names: Names,
    wait_timeout: float | None,
    clock: Callable[[], float],
    *,
    detail: bool = False,
    tasked: bool = False,
    observed: bool = False,
    soft_timeout: float | None = None,
    started: float | None = None,
    joined: FirstStep | None = None,
) -> Generator[CallCommand, Any, Any]:
    """One caller's call, to the value it returns (or the exception it raises).

    ``table``: the process's flights (per event loop for asyncio); ``clock``: a monotonic
    clock (the deadline and Fly's deadline are on it); ``detail``: return ``Served``;
    ``observed``: events listen (Begin, End and Takeover are yielded only then);
    ``soft_timeout``: past it, a caller still waiting takes the stale value its flight
    offered, if any (see Offer); a sync caller running the function itself never does.
    ``started``: when the call began on ``clock``, if before the machine (read_first's
    read): its deadlines count from there. ``joined``: the process's flight of the key the
    call joined or created already (read_first), taken up in place of its first join.
    """
    # An asyncio caller holds this frame while it waits: its locals are few (8 bytes a slot,
    # issue 23's memory per flight), the rare branches' in functions of their own.
    key = names.channel
    # raises ReentrantFlight: a leader calling its own key (read_first checked it)
    hit, value = copy_hit(env, names) if joined is None else _MISS
    handle = (yield _OBSERVE) if observed else None
    if started is None:
        started = clock()
    deadline = None if wait_timeout is None else started + wait_timeout
    soft_at = None if soft_timeout is None else started + soft_timeout
    started = None  # read no more: not held while the caller waits
    ended = False  # End was yielded (a later failure does not report the call again)
    try:
        if hit:
            ended = True
            return (yield from _copy(env, key, value, handle, detail, observed))
        while True:
            if joined is None:
                entry, created = table.join(key)
            else:
                entry, created = joined[0], joined[1]
                joined = None
            if created:
                entry.job_id = names.job_id
                if not tasked:
                    # Sync: this caller runs the flight, under its own deadline.
                    ended = True  # every way out below ends the observation itself
                    return (
                        yield from _drive_inline(
                            env,
                            table,
                            names,
                            entry,
                            deadline,
                            soft_at,
                            wait_timeout,
                            handle,
                            detail,
                            observed,
                        )
                    )
                yield Launch(entry)
            try:
                # wait_for's loop, written out: a waiting caller holds no generator of it.
                while True:
                    done = wait_step(entry, created, deadline, soft_at, clock)
                    if not isinstance(done, AwaitFlight):
                        break
                    # Yielded anew, not from a local: a waiting caller's frame holds none.
                    got = done.timeout
                    done = None
                    got = yield AwaitFlight(entry, got)
                    _expect_bool(got)
                    if got:
                        done = True
                        break
            except GeneratorExit:
                raise
            except BaseException:
                if tasked:
                    yield from _leave(table, entry)
                raise
            if done is None:
                # soft_timeout: the stale value the flight offered; the run goes on.
                if tasked:
                    yield from _leave(table, entry)
                ended = True
                return (yield from _deliver_stale(entry.fallback, handle, detail, observed))
            if not done:
                if tasked:
                    yield from _leave(table, entry)
                ended = True
                yield from _timed_out(names, wait_timeout, created, handle, observed)
            value = entry.result.get()
            if value is RETRY:
                continue
            ended = True
            return (
                yield from _deliver(value, entry.role if created else "local", created,
                                    entry.token, entry.trace, handle, detail, observed)
            )  # fmt: skip
    except GeneratorExit:
        raise
    except BaseException as exc:
        if observed and not ended:
            yield End(handle, "", exc)  # an abort, or a failure before any role
        raise


def _copy(
    env: CallEnv, key: str, value: Any, handle: Any, detail: bool, observed: bool
) -> Generator[CallCommand, Any, Any]:
    """run_call's local copy: the value (its End reported)."""
    age = env.local_copies.age_ms(key) if detail or observed else 0
    if observed:
        yield End(handle, "copy", age_ms=age)
    return Served(value, True, "copy", False, age / 1000) if detail else value


def _deliver_stale(
    fallback: Any, handle: Any, detail: bool, observed: bool
) -> Generator[CallCommand, Any, Any]:
    """soft_timeout: the stale value the flight offered (``fallback``: a Finished)."""
    stale = dataclasses.replace(fallback.outcome, stale="timeout")
    return (yield from _deliver(stale, "kept", False, fallback.token, fallback.trace, handle,
                                detail, observed))  # fmt: skip


def _timed_out(
    names: Names, wait_timeout: float | None, created: bool, handle: Any, observed: bool
) -> Generator[CallCommand, Any, NoReturn]:
    """wait_timeout: WaitTimeout (its End reported)."""
    error = WaitTimeout(job_id=names.job_id, seconds=wait_timeout)
    if observed:
        yield End(handle, "" if created else "local", error)
    raise error


def _drive_inline(
    env: CallEnv,
    table: InFlight,
    names: Names,
    entry: Entry,
    deadline: float | None,
    soft_deadline: float | None,
    wait_timeout: float | None,
    handle: Any,
    detail: bool,
    observed: bool,
) -> Generator[CallCommand, Any, Any]:
    """A sync caller runs its process's flight; the callers who joined get what it shares."""
    key = names.channel
    shared: Outcome | object = RETRY
    try:
        try:
            finished = yield from _fly(env, entry, deadline, soft_deadline)
        except WaitTimeout:
            # Ours alone: the callers who joined start over (RETRY), one of them leads.
            error = WaitTimeout(job_id=names.job_id, seconds=wait_timeout)
            if observed:
                yield End(handle, "remote", error)
            raise error from None
        except GeneratorExit:
            raise
        except Exception as exc:
            shared = Outcome(error=exc)  # BackendUnavailable and kin reach every caller
            if observed:
                yield End(handle, "", exc)
            raise
        except BaseException as exc:  # an abort of this caller: the joiners start over
            if observed:
                yield End(handle, "", exc)
            raise
        # Read by the callers who joined, once finish() below resolved the entry.
        entry.role, entry.token, entry.trace = finished.role, finished.token, finished.trace
        shared = share(env, key, finished)
        if finished.waited and observed:
            yield Takeover(finished.token)
    finally:
        table.finish(key, entry, shared)  # type: ignore[arg-type]
    return (yield from _deliver(finished.outcome, finished.role, True, finished.token,
                                finished.trace, handle, detail, observed))  # fmt: skip


def run_shared_flight(
    env: CallEnv, table: InFlight, names: Names, entry: Entry, *, observed: bool = False
) -> Generator[CallCommand, Any, None]:
    """The flight an asyncio task runs for its process's callers (see Launch): it resolves
    ``entry`` with the outcome, or RETRY after an abort (which then goes on up the task).

    Its two halves, which a driver may take apart: the Fly (``shared_fly``), then what its
    reply or error decides (``shared_landed``, a generator made once the flight landed: a
    flight holds no generator of this machine while it runs; issue 23's memory per flight).
    """
    reply: object = RUN_HERE
    error: BaseException | None = None
    try:
        fly = shared_fly(env, entry)
        if fly is not None:
            reply = yield fly
    except GeneratorExit:
        table.finish(names.channel, entry, RETRY)
        raise
    except BaseException as exc:
        error = exc
    yield from shared_landed(env, table, names, entry, reply, error, observed=observed)


RUN_HERE: Final = object()
"""shared_landed's reply when there was no Fly: Redis is skipped (on_backend_error="local"
in an outage), the function runs in this process."""


def shared_fly(env: CallEnv, entry: Entry) -> Fly | None:
    """run_shared_flight's first step: the Fly to carry, or None when Redis is skipped (then
    ``shared_landed`` gets RUN_HERE, and asks for the RunHere)."""
    return None if env.skip_redis() else Fly(entry, None)


def shared_landed(
    env: CallEnv,
    table: InFlight,
    names: Names,
    entry: Entry,
    reply: object,
    error: BaseException | None,
    *,
    observed: bool = False,
) -> Generator[CallCommand, Any, None]:
    """run_shared_flight after its Fly: the Fly's ``reply`` (RUN_HERE: there was none), or
    the ``error`` it raised; resolves ``entry`` whatever comes, once started (the driver
    steps it as soon as it is made)."""
    key = names.channel
    shared: Outcome | object = RETRY
    try:
        if error is not None:
            if not isinstance(error, BackendUnavailable) or not env.fall_back(error):
                raise error
            finished = yield from _run_here(entry)
        elif reply is RUN_HERE:
            finished = yield from _run_here(entry)
        else:
            finished = _flown(env, reply)
        entry.role, entry.token, entry.trace = finished.role, finished.token, finished.trace
        if finished.waited and observed:
            yield Takeover(finished.token)
        error = finished.outcome.error
        if error is not None and is_abort(error):
            raise error  # the waiters were told; the abort goes on up, as it would
        shared = share(env, key, finished)
    except GeneratorExit:
        raise
    except Exception as exc:
        shared = Outcome(error=exc)  # BackendUnavailable and kin reach every caller
    finally:
        table.finish(key, entry, shared)  # type: ignore[arg-type]


def _fly(
    env: CallEnv, entry: Entry, deadline: float | None, soft_deadline: float | None = None
) -> Generator[CallCommand, Any, Finished]:
    """The flight through Redis; or, under on_backend_error="local" while Redis is down,
    the function in this process. (run_shared_flight writes these steps out.)"""
    if not env.skip_redis():
        try:
            reply = yield Fly(entry, deadline, soft_deadline)
        except BackendUnavailable as exc:
            if not env.fall_back(exc):
                raise
        else:
            return _flown(env, reply)
    return (yield from _run_here(entry))


def _flown(env: CallEnv, finished: object) -> Finished:
    """Fly's reply: the flight through Redis finished (Redis answered)."""
    if type(finished) is not Finished:
        raise ProtocolError(f"the reply to Fly must be Finished, not {finished!r}")
    env.answered()
    return finished


def _run_here(entry: Entry) -> Generator[CallCommand, Any, Finished]:
    """on_backend_error="local" while Redis is down: the function in this process."""
    outcome = yield RunHere(entry)
    if type(outcome) is not Outcome:
        raise ProtocolError(f"the reply to RunHere must be Outcome, not {outcome!r}")
    return Finished(outcome, "leader", 0)


def wait_for(
    entry: Entry,
    created: bool,
    deadline: float | None,
    soft_at: float | None,
    clock: Callable[[], float],
) -> Generator[CallCommand, Any, bool | None]:
    """Wait for the process's flight: True once it is resolved, False at the deadline,
    None at the soft deadline once the flight offered a stale value (entry.fallback).
    Each step is ``wait_step``'s (run_call runs this loop itself)."""
    while True:
        step = wait_step(entry, created, deadline, soft_at, clock)
        if not isinstance(step, AwaitFlight):
            return step
        done = yield step
        _expect_bool(done)
        if done:
            return True


def wait_step(
    entry: Entry,
    created: bool,
    deadline: float | None,
    soft_at: float | None,
    clock: Callable[[], float],
) -> AwaitFlight | bool | None:
    """The next step of waiting for the process's flight: the AwaitFlight to yield, or the
    wait's end: False at the deadline, None at the soft deadline once the flight offered a
    stale value (entry.fallback). A plain function, so that a caller that loops over it
    holds no generator frame while it waits (issue 23's memory per flight).

    The deadline does not cut short an asyncio caller whose own flight leads: wait_timeout
    bounds waiting on others. An offer pokes the entry's latch, so a caller past its soft
    deadline takes the stale value as soon as it is offered."""
    now = clock()
    bound = None if deadline is None else deadline - now
    if bound is not None and bound <= 0:
        if not (created and entry.leading):
            return False
        bound = None  # our own call runs the function
    if soft_at is not None:
        if now >= soft_at:
            if entry.fallback is not None:
                return None
        else:
            bound = soft_at - now if bound is None else min(bound, soft_at - now)
    return AwaitFlight(entry, None if bound is None else max(0.0, bound))


def _leave(table: InFlight, entry: Entry) -> Generator[CallCommand, Any, None]:
    """An asyncio caller stops waiting; the last one out cancels a flight that only follows."""
    if table.leave(entry) == 0 and not entry.leading:
        yield Cancel(entry)


def _deliver(
    result: object,
    role: str,
    own: bool,
    token: int,
    trace: bytes,
    handle: Any,
    detail: bool,
    observed: bool,
) -> Generator[CallCommand, Any, Any]:
    """Return the value, or raise the error: the original for the caller whose flight made
    it, a copy for every other caller (one object raised by 50 callers would pile 50 callers'
    frames onto one traceback)."""
    if type(result) is not Outcome:
        raise ProtocolError(f"a flight's result must be an Outcome, not {result!r}")
    error = result.error
    if observed:
        # A leader's span is the run's own: it links to nothing.
        link = b"" if role == "leader" else trace
        yield End(handle, role, error, token, link, result.stale, result.age_ms)
    if error is not None:
        raise error if own else copy_of(error)
    if detail:
        return Served(
            result.value, role != "leader", role, bool(result.stale), result.age_ms / 1000
        )
    return result.value


def share(env: CallEnv, key: str, finished: Finished) -> Outcome | object:
    """What the callers who joined this flight in-process get: its outcome, or RETRY after an
    abort (they start over: one of them leads). A value is kept as a local copy."""
    outcome = finished.outcome
    if is_abort(outcome.error):
        return RETRY
    copies = env.local_copies
    if copies is not None and outcome.error is None:
        copies.put(key, outcome.value, outcome.fresh_ms, outcome.age_ms)
    return outcome


def _expect_bool(done: object) -> None:
    if type(done) is not bool:
        raise ProtocolError(f"the reply to AwaitFlight must be a bool, not {done!r}")


def copy_of(error: BaseException) -> BaseException:
    tb = error.__traceback__
    try:
        dup = copy.copy(error)
    except Exception:
        return error.with_traceback(tb)  # cannot be copied: at least do not grow its frames
    if type(dup) is not type(error):
        return error.with_traceback(tb)
    dup.__cause__, dup.__context__ = error.__cause__, error.__context__
    dup.__suppress_context__ = error.__suppress_context__
    notes = getattr(error, "__notes__", None)
    if isinstance(notes, list):
        dup.__dict__["__notes__"] = list(notes)  # a note one caller adds stays its own
    return dup.with_traceback(tb)
