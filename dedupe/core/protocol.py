"""The flight protocol as a sans-I/O state machine: it yields commands and takes their replies.

Charter: every decision of one flight against Redis lives here, in ``run_flight``; the
drivers only carry its commands to Redis and the pub/sub hub and send the replies back. What
the scripts decide atomically (freshness, whether a lease is ours, whether an outcome may be
stored) is in ``scripts.py``; what a caller does around a flight (joining the process's
flight, waiting, falling back, delivering) is in ``call.py``. Nothing here blocks, reads a
clock other than the one it is given, logs or emits events: notable moments are yielded as
``Note`` commands for the driver to log and count. So the whole protocol is tested by feeding
it scripted replies, and simulated with the real Lua scripts (tests/sim).

States and transitions (``STATE_OF`` names the state each command is yielded in)::

    state        command      reply                          next
    ACQUIRING    Read         Looked: a fresh, current value -> return (kept)
                              anything else, ReadRefused     -> Acquire
    ACQUIRING    Acquire      Acquired DONE, readable        -> return (kept, or remote)
                              Acquired DONE, unreadable      -> Discard, (Pause), ACQUIRING
                              Acquired BUSY, our own lease   -> LEADING (a retried acquire)
                              Acquired BUSY                  -> SUBSCRIBING (first time)
                                                                or WAITING
                              Acquired LEAD                  -> LEADING
                              Unanswered thrown in           -> Release, raise its error
    SUBSCRIBING  Subscribe    confirmed: bool                -> ACQUIRING (the re-check)
    WAITING      Wait         an outcome of our lease+       -> return (remote)
                              a notice, RECHECK, timeout     -> ACQUIRING
                              forged, foreign, older         -> WAITING (ignored, counted)
    LEADING      Lead         Outcome (the function's)       -> COMPLETING
    COMPLETING   Complete     Completed OWNED / LAPSED       -> return (leader)
                              Completed WITHHELD             -> return (leader; ours only)
    (any)        Note         None                           -> the same state

What goes in and what comes out:
- ``run_flight`` returns a ``Finished``. It raises ``WaitTimeout`` when the spec's deadline
  passes while following, ``BackendUnavailable`` (or another ``DedupeError``) that the
  driver threw in for a failed command, unless stated otherwise above (a failed Complete or
  Discard is absorbed: the leader's outcome is still returned), and ``ProtocolError`` for a
  reply that breaks the contract (a driver bug, never Redis input: bytes read from Redis are
  checked and ignored when bad, never raised).
- The driver may throw into it: a ``DedupeError`` (a command failed), ``Unanswered`` (an
  Acquire was written but never answered), or an abort (``KeyboardInterrupt``,
  ``CancelledError``), which goes straight through.
"""

from __future__ import annotations

import enum
import math
import operator
import os
import random
from collections.abc import Callable, Generator
from typing import Any, Final, NamedTuple, NoReturn, TypeAlias

from dedupe.core.keys import Names
from dedupe.core.record import (
    NOTICE_ABORTED,
    NOTICE_STALE,
    NOTICE_STORED,
    lock_value,
    parse_lock,
    read_header,
    record_state,
)
from dedupe.core.sealing import Codec, Notice, Opened, Outcome
from dedupe.core.shapes import Shape
from dedupe.core.subscriptions import RECHECK  # what the hub hands a Wait: re-subscribe, re-check
from dedupe.errors import (
    BackendUnavailable,
    DedupeError,
    EnvelopeError,
    ProtocolError,
    WaitTimeout,
)

# early_refresh's draws come from a generator of dedupe's own, not the global one (an app
# that seeds random must see the sequence it seeded); reseeded in a forked child, as the
# global one is: forked workers must not draw in step (XFetch spreads refreshes by the draw).
_rng = random.Random()
_random = _rng.random
if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_rng.seed)

__all__ = [
    "BUSY",
    "DONE",
    "LEAD",
    "RECHECK",
    "REFRESH",
    "STALE",
    "STATE_OF",
    "Acquire",
    "AcquireState",
    "Acquired",
    "Command",
    "Complete",
    "CompleteState",
    "Completed",
    "Discard",
    "Finished",
    "FlightSpec",
    "FlightState",
    "FlightTerms",
    "Lead",
    "Looked",
    "Note",
    "Offer",
    "Pause",
    "Read",
    "ReadRefused",
    "Reads",
    "Rejected",
    "Release",
    "Serve",
    "Subscribe",
    "Unanswered",
    "Wait",
    "is_abort",
    "own_lease",
    "read_kept",
    "run_flight",
]


# How often a follower whose subscription is not confirmed re-checks the job's state.
_POLL: Final = 0.5


class FlightState(enum.Enum):
    """Where a flight is; each command is yielded in one of these (``STATE_OF``)."""

    ACQUIRING = "acquiring"
    SUBSCRIBING = "subscribing"
    WAITING = "waiting"
    LEADING = "leading"
    COMPLETING = "completing"
    RELEASING = "releasing"


class AcquireState(enum.IntEnum):
    """The acquire script's verdict (the ints it replies with)."""

    DONE = 0  # an outcome is there for us
    BUSY = 1  # another holder leads (maybe with a stale value to fall back on)
    LEAD = 2  # we lead now (maybe with a stale value to fall back on)
    REFRESH = 3  # serve the value now, and lead: a refresh, in the background
    STALE = 4  # serve the stale value now; no run


class CompleteState(enum.IntEnum):
    """The complete script's verdict (the ints it replies with)."""

    WITHHELD = -1  # a newer lease exists or may have: nothing stored or published
    LAPSED = 0  # our lease was gone but no newer one was granted: stored and published
    OWNED = 1  # the lease was still ours: stored and published
    STOOD_IN = 2  # the run failed; the stale value stands in for it (stale_if_error)


DONE: Final = AcquireState.DONE
BUSY: Final = AcquireState.BUSY
LEAD: Final = AcquireState.LEAD
REFRESH: Final = AcquireState.REFRESH
STALE: Final = AcquireState.STALE


class FlightTerms(NamedTuple):
    """A function's flight parameters under one Settings (milliseconds), shared by every
    FlightSpec of its flights: not copied into each (some 130 bytes a flight, issue 23's
    memory per flight). FlightSpec reads them as its own fields."""

    lock_ttl_ms: int  # lock_ttl: the lease
    token_ttl_ms: int  # token_ttl: how long the fencing-token counter outlives a lease
    # result_ttl: how long after its run a value stays fresh for new callers. The record's
    # header carries result_ttl plus the run as its keep_ms, counted from the lease's grant.
    result_ttl_ms: int
    grace_ms: int  # how long any outcome stays readable for followers that missed the message
    inline_max_bytes: int
    min_replicas: int = 0  # replicas that must acknowledge a new lease (WAIT) before we lead
    replica_timeout_ms: int = 1000
    max_hold_ms: int = 300_000  # max_hold: a leader's hold on one lease; renewal stops after it
    # Cache fill (all 0 / None / (): off). Windows past the end of freshness, in ms:
    stale_ms: int = 0  # stale_while_revalidate: serve stale at once, refresh in the background
    error_ms: int = 0  # stale_if_error: serve stale in place of a failed run's error
    backoff_ms: int = 0  # error_backoff: after that, no run for this long (fleet-wide)
    early_refresh: float = 0.0  # XFetch's beta: refresh fresh values early, by chance
    answers: tuple[type[BaseException], ...] = ()  # errors no stale value ever replaces


class FlightSpec:
    """Everything the protocol needs to know about one flight (treat it as read-only).

    Built from named fields: the flight's own, and either ``terms`` (the function's
    FlightTerms, shared) or FlightTerms' fields by name (api.py works them out from the
    settings, in milliseconds). FlightTerms' fields read as the spec's own.
    """

    __slots__ = ("deadline", "names", "owner", "reads", "shape", "soft_deadline", "terms")

    # FlightTerms' fields, read through ``terms`` (properties made below the class).
    lock_ttl_ms: int
    token_ttl_ms: int
    result_ttl_ms: int
    grace_ms: int
    inline_max_bytes: int
    min_replicas: int
    replica_timeout_ms: int
    max_hold_ms: int
    stale_ms: int
    error_ms: int
    backoff_ms: int
    early_refresh: float
    answers: tuple[type[BaseException], ...]

    def __init__(
        self,
        *,
        names: Names,
        owner: str,
        deadline: float | None,
        soft_deadline: float | None = None,
        shape: Shape | None = None,
        reads: Reads | None = None,
        terms: FlightTerms | None = None,
        **fields: Any,
    ) -> None:
        self.names = names
        self.owner = owner
        # On the clock given to run_flight; None: wait while a leader lives.
        self.deadline = deadline
        # On run_flight's clock: when a follower with a stale value to fall back on takes it
        # (soft_timeout) rather than wait on; None: it waits on.
        self.soft_deadline = soft_deadline
        # The function's return annotation, compiled (dedupe.core.shapes): the value travels
        # as its plain data and is rebuilt by it here. None: no annotation, values travel as
        # they are.
        self.shape = shape
        # Whether a flight first tries the kept value with a plain read (Read) before the
        # acquire script: a function that keeps values, while its reads mostly hit. None:
        # never.
        self.reads = reads
        if terms is None:
            terms = FlightTerms(**fields)
        elif fields:
            raise TypeError(f"FlightSpec takes terms or their fields, not both: {set(fields)}")
        self.terms = terms

    def __repr__(self) -> str:
        return (
            f"FlightSpec(names={self.names!r}, owner={self.owner!r}, "
            f"deadline={self.deadline!r}, soft_deadline={self.soft_deadline!r}, "
            f"shape={self.shape!r}, reads={self.reads!r}, terms={self.terms!r})"
        )

    @property
    def caching(self) -> bool:
        """Whether the scripts get the cache-fill arguments (windows, draw, flags)."""
        return bool(self.stale_ms or self.error_ms or self.early_refresh)

    @property
    def refreshes(self) -> bool:
        """Whether a flight may be granted a refresh to run in the background."""
        return bool(self.stale_ms or self.early_refresh)

    def replaceable(self, error: BaseException, still_fresh: bool = False) -> bool:
        """Whether the value a run refreshes may stand in for its error: a failure, not an
        abort, and not one of the errors that are answers; under stale_if_error, or when the
        value is still fresh (an early refresh that failed never takes a fresh value away:
        the complete script keeps it only while it is fresh, by the server's clock)."""
        return (
            (self.error_ms > 0 or still_fresh)
            and isinstance(error, Exception)
            and not isinstance(error, self.answers)
        )

    def slack(self, pttl_ms: int) -> float:
        """Extra wait past the lease, so the re-check lands after a dead leader's lease expired."""
        return 0.025 + pttl_ms / 100_000


for _name in FlightTerms._fields:  # FlightSpec's fields that are its function's terms
    setattr(FlightSpec, _name, property(operator.attrgetter(f"terms.{_name}")))
del _name


class Reads:
    """Whether a function's next flight tries a plain read of its kept value first (Read).

    A hit costs the server a read and the clock instead of the acquire script (a Redis shard
    is one thread: its time per hit bounds the hits per second of one hot key), but a miss
    costs one more round trip before the script. So reads go first while they pay: a hit
    earns ``HIT`` credit (up to ``CAP``), a miss costs one, and reads go first while there is
    credit: while at least one read in ``HIT + 1`` hits. Without credit, one flight in
    ``PROBE`` reads, until one hits. A new function starts with ``START``.

    No lock: the fields are counts that many threads update; a lost update only moves when
    the next read is tried, never what a flight is served.
    """

    START: Final = 3
    HIT: Final = 4
    CAP: Final = 32
    PROBE: Final = 32
    __slots__ = ("credit", "skipped")

    def __init__(self) -> None:
        self.credit = self.START
        self.skipped = 0  # flights without a read since the credit ran out, or the last probe

    def wanted(self) -> bool:
        if self.credit > 0:
            return True
        self.skipped += 1
        if self.skipped < self.PROBE:
            return False
        self.skipped = 0
        return True

    def saw(self, hit: bool) -> None:
        self.credit = min(self.CAP, self.credit + self.HIT) if hit else max(0, self.credit - 1)


# --- commands (what the protocol asks the driver to do) and their replies --------------------


class Read(NamedTuple):
    """Read the job's result key and token counter, then the server's clock, with plain
    commands (``MGET`` then ``TIME``, one round trip; no script). Reply: Looked. A read the
    server refuses (an ACL without MGET, a slot elsewhere) is thrown in as ReadRefused."""


class Looked(NamedTuple):
    record: bytes | None  # the result key's value
    counter: bytes | None  # the token counter's value
    now_ms: int  # the server's clock, read after them


class ReadRefused(DedupeError):
    """A Read got an error reply: the acquire script decides instead."""


class Acquire(NamedTuple):
    """Run the acquire script (with min_replicas, WAIT on the same connection). Reply: Acquired.

    ``floor``: the newest lease token this flight waited on ('' for none); the script
    never hands it an outcome of an older lease. ``early``: the XFetch draw,
    ``-early_refresh * ln(rand)`` in thousandths (0: none). ``after_error``: the run this
    flight waited on failed with a stale value standing in: serve it, start no run. The
    driver adds whether this process may run a refresh in the background (a bounded number
    at a time).
    """

    floor: str
    early: int = 0
    after_error: bool = False


class Acquired(NamedTuple):
    state: int  # an AcquireState
    # DONE, REFRESH, STALE: the record to serve; BUSY, LEAD: a stale value to fall back on
    # (b"": none)
    record: bytes = b""
    # How much longer the record's value is fresh for new callers; <= 0: stale by that much
    # (DONE: 0 for a record kept only for its flight's waiters)
    fresh_ms: int = 0
    age_ms: int = 0  # the record's age, by the server's clock
    pttl_ms: int = 0  # BUSY: the lease's remaining time
    holder: str = ""  # BUSY: the lock value "<token>:<owner>"
    token: int = 0  # LEAD, REFRESH: our fencing token
    why: str = ""  # STALE: "error" (a run failed: backing off) or "revalidate" (one runs)
    # On run_flight's clock: when the request that got this reply was written to the
    # socket (0.0: unknown, then the time Acquire was yielded stands in). A lease is dated
    # from it, never from a queue before it.
    sent: float = 0.0
    replicas: int = 0  # LEAD with min_replicas: how many replicas acknowledged the lease


class Unanswered(Exception):
    """Thrown into run_flight for an Acquire whose request was written but whose reply never
    came (a timeout, a dropped connection, a cancelled caller): it may have been applied,
    so a lease may be ours. ``error`` is what the caller will raise."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class Subscribe(NamedTuple):
    """Subscribe to the job's channel; wait up to ``timeout`` for the server to confirm it.

    Reply: True if confirmed. Nothing depends on it: a slow or failing pub/sub connection
    costs latency (the wait then ends with the lease), never the call.
    """

    timeout: float


class Pause(NamedTuple):
    """Sleep (off the event loop for async). Reply: None."""

    seconds: float


class Wait(NamedTuple):
    """Wait for a channel message. Reply: bytes, RECHECK, or None on timeout."""

    timeout: float


class Lead(NamedTuple):
    """Run the function under a renewed lease. Reply: Outcome (any BaseException captured)."""

    token: int
    lock_value: str
    # On run_flight's clock: the lease began no earlier than this (the acquire's send time,
    # or earlier for an own lease found through BUSY). Its renewal clock starts here.
    since: float


class Complete(NamedTuple):
    """Run the complete script. Reply: Completed.

    ``fallback``: for a failed run, the token of the stale value that may stand in for it
    (0: none); the script keeps that value if it is still current and within stale_if_error,
    stores nothing, starts the backoff and publishes ``stale_notice`` instead.
    """

    lock_value: str
    record: bytes
    record_ttl_ms: int
    message: bytes
    token: int
    fallback: int = 0
    stale_notice: bytes = b""


def own_lease(spec: FlightSpec, reply: Acquired) -> tuple[int, float] | None:
    """The lease an acquire reply says is ours, as (token, when it began on the flight's
    clock), or None. Granted to this request (LEAD, REFRESH): it began at the request's
    write. BUSY with our own lock value: an earlier copy of the acquire (its reply lost, the
    client retried) was granted, by as much before this write as it has run down (found by
    simulation). ``reply.sent`` 0 (unknown): None."""
    if not reply.sent:
        return None
    if reply.state == LEAD or reply.state == REFRESH:
        return reply.token, reply.sent
    if reply.state == BUSY:
        holder = parse_lock(reply.holder)
        if holder is not None and holder.owner == spec.owner:
            return holder.token, reply.sent - max(0, spec.lock_ttl_ms - reply.pttl_ms) / 1000
    return None


class Offer(NamedTuple):
    """A stale value this flight's callers may take at their soft_timeout rather than wait
    on (the process's callers who joined the flight, and asyncio callers). Reply: None."""

    finished: Finished


class Serve(NamedTuple):
    """Give this value to the flight's callers now; the flight goes on in the background (a
    refresh: its outcome is stored and pushed to whoever waits on its lease). The driver
    hands the rest of the flight to a background thread or task and replies None there."""

    finished: Finished


class Completed(NamedTuple):
    state: int  # a CompleteState
    publish_error: str = ""  # the PUBLISH failed (stored all the same), e.g. an ACL


class Discard(NamedTuple):
    """Drop an unreadable record from the result key, if unchanged. Reply: ignored."""

    record: bytes


class Release(NamedTuple):
    """Give back the lease an unanswered Acquire may have granted us: owner-checked, best
    effort, off the caller's path, so that waiters take over at once rather than at the
    lease's end. Reply: None (at once: the release runs in the background)."""


class Note(NamedTuple):
    """Something worth a log line or a count; the protocol goes on. Reply: None.

    ``kind``: "rejected" (a record or message ignored: forged, foreign or unreadable),
    "withheld" (our lease was lost and a newer one granted: the outcome went to our own
    callers only), "publish_failed", "store_failed", "slow_seal". ``token``: the lease it is
    about (0: none); ``detail``: words for the log.
    """

    kind: str
    detail: str
    token: int = 0


Command: TypeAlias = (
    Read
    | Acquire
    | Subscribe
    | Wait
    | Lead
    | Complete
    | Discard
    | Pause
    | Release
    | Note
    | Offer
    | Serve
)
Flight: TypeAlias = Generator[Command, object, "Finished"]

STATE_OF: Final[dict[type, FlightState | None]] = {
    Read: FlightState.ACQUIRING,
    Acquire: FlightState.ACQUIRING,
    Discard: FlightState.ACQUIRING,
    Pause: FlightState.ACQUIRING,
    Subscribe: FlightState.SUBSCRIBING,
    Wait: FlightState.WAITING,
    Lead: FlightState.LEADING,
    Complete: FlightState.COMPLETING,
    Release: FlightState.RELEASING,
    Serve: FlightState.ACQUIRING,
    Note: None,  # in whatever state it was yielded
    Offer: None,
}
"""The state a command is yielded in (see the table above)."""


def is_abort(error: BaseException | None) -> bool:
    """KeyboardInterrupt, SystemExit, CancelledError and kin: the run was cut short, not failed."""
    return error is not None and not isinstance(error, Exception)


# --- the flight -----------------------------------------------------------------------------


class Finished(NamedTuple):
    """What run_flight returns: the outcome, how this flight came by it, and its lease."""

    outcome: Outcome
    role: str  # "leader" (ran it), "remote" (another process's leader), "kept" (a kept value)
    token: int  # the fencing token of the lease whose outcome this is (0 if unknown)
    waited: bool = False  # a leader that waited on another lease first: a takeover
    # The traceparent of the span the function ran under: ours (leader), or the leader's,
    # read from its record (remote, kept). b"" when no tracer listens.
    trace: bytes = b""


def _unexpected(reply: object, kind: type, cmd: str) -> NoReturn:
    # The type test is inline at each reply (a call per reply cost more than the test).
    raise ProtocolError(f"the reply to {cmd} must be {kind.__name__}, not {reply!r}")


def run_flight(
    spec: FlightSpec,
    codec: Codec,
    clock: Callable[[], float],
    trace: bytes = b"",
    rand: Callable[[], float] = _random,
) -> Flight:
    """Drive one flight to its outcome; the caller sends replies to the yielded commands.

    ``clock``: the monotonic clock every time here is on (the spec's deadline too).
    ``trace``: the leader's W3C traceparent, sealed into the record if this flight leads.
    ``rand``: uniform in [0, 1), for early_refresh's draw.
    """
    # A waiting flight holds this frame: its locals are few (8 bytes a slot, issue 23's
    # memory per flight), the read before the script and a refresh's steps in generators of
    # their own.
    floor = 0  # the newest lease we waited on: an outcome of an older one is never ours
    subscribed = False
    confirmed = False  # no message can wake us unless the server confirmed the subscription
    bad = 0
    fallback: Finished | None = None  # a stale value to fall back on (soft_timeout, a failure)
    fallen_back_on = b""  # the record it was opened from (offered once per record)
    after_error = False  # the run we waited on failed, and a stale value stands in for it
    if spec.reads is not None and spec.reads.wanted():
        # The read's kept value, in fallback's slot (a local less): served if any, else
        # None, which is what fallback starts as.
        fallback = yield from _read_first(spec, codec)
        if fallback is not None:
            return fallback
    while True:
        asked = clock()
        try:
            reply = yield Acquire(
                str(floor) if floor else "",
                _draw(spec, rand) if spec.early_refresh else 0,
                after_error,
            )
        except Unanswered as unanswered:
            reply = unanswered
        if type(reply) is Unanswered:
            # The acquire may have granted us a lease nobody will run: give it back, so
            # that waiters take over now instead of when it runs out.
            yield Release()
            raise reply.error
        if type(reply) is not Acquired:
            _unexpected(reply, Acquired, "Acquire")
        # The lease, if granted, began no earlier than the request's write (not its queue).
        sent = reply.sent or asked
        since = sent
        state = reply.state
        holder = parse_lock(reply.holder) if state == BUSY else None
        own = own_lease(spec, reply._replace(sent=sent)) if holder is not None else None
        if own is not None:
            # Our own lease: an acquire whose reply was lost and that the client retried.
            since = own[1]
            reply = reply._replace(state=LEAD, token=own[0], replicas=-1)
            state = LEAD
        if (state in (BUSY, LEAD)) and reply.record and reply.record != fallen_back_on:
            fallen_back_on = reply.record
            served = yield from _stale(spec, codec, reply)
            if served is not None:
                fallback = served
                yield Offer(served)
        if state == LEAD:
            # _lead, written out: while the function runs, the flight holds no generator of
            # it (issue 23's memory per flight).
            token = reply.token
            lock = lock_value(token, spec.owner)
            if spec.min_replicas and 0 <= reply.replicas < spec.min_replicas:
                yield from _too_few_replicas(spec, codec, reply, lock)
            reply = holder = None  # dead while the function runs
            asked = 0.0  # (sent and since are read after it)
            outcome = yield Lead(token, lock, since)
            return (yield from _led(spec, codec, clock, trace, outcome, token, lock, sent,
                                    floor > 0, fallback))  # fmt: skip
        if state in (REFRESH, STALE):
            served = yield from _stale(spec, codec, reply)
            if served is None:
                bad += 1
                yield Discard(reply.record)
                if state == STALE:
                    continue
                # A lease, with nothing to serve: lead in the foreground.
                return (yield from _lead(spec, codec, clock, trace, reply, sent,
                                         waited=floor > 0, since=since))  # fmt: skip
            if state == STALE:
                served.outcome.stale = reply.why or "revalidate"
                return served
            if reply.fresh_ms <= 0:
                served.outcome.stale = "revalidate"
            yield Serve(served)
            # From here on this flight runs in the background: a refresh, under the normal
            # renewed, fenced lease; its outcome is stored and pushed to whoever waits on the
            # lease. Should it fail, the value just served stands in (stale_if_error).
            return (
                yield from _lead(
                    spec, codec, clock, trace, reply, sent, waited=False, since=since,
                    fallback=served,
                )
            )  # fmt: skip
        if state == DONE:
            opened = yield from _open(spec, codec, reply.record)
            if isinstance(opened, Opened) and opened.token >= floor:
                outcome = opened.outcome
                if outcome.error is None:
                    outcome.fresh_ms = reply.fresh_ms
                    outcome.age_ms = reply.age_ms
                return Finished(
                    outcome, "remote" if floor else "kept", opened.token, trace=opened.trace
                )
            # Unreadable, forged or foreign: ignored (and counted). Drop it if unchanged, and
            # back off a little if it keeps coming, so a writer cannot make us spin.
            bad += 1
            yield Discard(reply.record)
            if bad > 1:
                yield Pause(_bounded(spec, clock, min(1.0, 0.005 * 2**bad)))
            continue
        if state != BUSY:
            raise ProtocolError(f"unknown acquire state {state!r}")
        if holder is not None:
            floor = max(floor, holder.token)
        after_error = False
        timeout = reply.pttl_ms / 1000 + spec.slack(reply.pttl_ms)
        timeout = _bounded(spec, clock, timeout)  # the deadline, if any
        if fallback is not None and spec.soft_deadline is not None:
            # soft_timeout: past it, the stale value rather than a longer wait; the run goes
            # on and stores its outcome for the next callers.
            until = spec.soft_deadline - clock()
            if until <= 0:
                fallback.outcome.stale = "timeout"
                return fallback
            timeout = min(timeout, until)
        if not subscribed:
            # Subscribe first, then re-check: a publish between the two is then never missed.
            # The confirmation only hurries things along: the wait below is bounded by the
            # lease either way, and the re-check at its end finds a stored outcome.
            subscribed = True
            confirmed = bool((yield Subscribe(timeout)))
            continue
        if not confirmed:
            # Pub/sub is denied, slow or down: no message may come, so look again sooner
            # than the lease's end (a round trip per _POLL, only in this degraded state).
            timeout = min(timeout, _POLL)
        # Dead while it waits, and some 370 bytes a waiting flight (issue 23's memory per
        # flight): the acquire's reply and its parsed holder, and the times before the wait
        # (each set anew before it is read again).
        reply = holder = None
        until = clock() + timeout
        asked = sent = since = timeout = 0.0
        while True:
            message = yield Wait(max(0.0, until - clock()))
            if message is None:
                break  # the lease ran out, or the deadline: re-check
            if message is RECHECK:
                # The subscription dropped (and may have missed messages): give the hub until
                # the lease's end to re-subscribe (a restarting Redis answers nothing before
                # that anyway), then re-check.
                confirmed = bool((yield Subscribe(max(0.0, until - clock()))))
                break
            if type(message) is not bytes:
                raise ProtocolError(
                    f"the reply to Wait must be bytes, RECHECK or None: {message!r}"
                )
            opened = yield from _open(spec, codec, message)
            if opened is None:
                continue  # forged or foreign: ignored (counted by the codec), keep waiting
            if opened.token < floor:
                codec.count_rejection()  # genuine, but of an older lease: a replay
                continue
            if isinstance(opened, Notice):
                # Stored (too large to travel inline) or aborted: the re-check tells. Failed
                # with a stale value standing in: the re-check serves it, with no run.
                after_error = opened.kind == NOTICE_STALE
                break
            outcome = opened.outcome
            if outcome.error is None:
                outcome.fresh_ms = min(opened.keep_ms, spec.result_ttl_ms)
            return Finished(outcome, "remote", opened.token, trace=opened.trace)


class Rejected(NamedTuple):
    """A record a Read found that is not to be served: forged, foreign or unreadable
    (counted once, by the codec, when it was opened). It is dropped if unchanged (Discard)
    and the acquire script decides as if it had never been there. ``detail``: the
    rejection's words for a "rejected" Note ("" for a readable record that holds no value)."""

    record: bytes
    detail: str


def read_kept(
    codec: Codec, looked: Looked, channel: str, shape: Shape | None, result_ttl_ms: int
) -> Finished | Rejected | None:
    """The kept value a Read found, if the acquire script would serve it to a new caller
    now (fresh, current, readable); a Rejected record; None: the script decides. The one
    rule of a read, for the flight (``_read_kept``) and for a call that reads before any
    flight (``call.served_read``).

    The script's rule (``record_state``), by the server's clock read after the keys. Without
    the key's PTTL, its own clock is taken as just written: for a record written after its
    lease's grant (every record a lease stores) the grant's clock is the stricter of the two,
    so the answer is the same, and a key whose expiry was moved is still served no longer
    than its signed header allows. MGET reads both keys at one instant: the counter names the
    record then (a record of an older lease written back is refused, as by the script), and
    the later clock only makes it older."""
    record = looked.record
    if record is None:
        return None  # a miss
    h = read_header(record)
    if h is None:
        return None  # not a record: the script takes the key as empty
    token, keep, ttl = h[0], h[1], h[2]
    state = record_state(token, keep, ttl, ttl, looked.counter, looked.now_ms)
    if state is None or state.fresh_ms <= 0:
        return None
    try:
        opened = codec.open(record, channel=channel, shape=shape, header=h)
    except EnvelopeError as exc:  # codec.open counted it in codec.rejected
        return Rejected(record, str(exc))
    if type(opened) is not Opened or opened.outcome.error is not None:
        return Rejected(record, "")
    outcome = opened.outcome
    outcome.fresh_ms = state.fresh_ms
    # Its age since the write: the grant's age (run_ms here) less the run, which the keep
    # holds beyond result_ttl (exact while the leader's result_ttl was this function's).
    outcome.age_ms = max(0, state.run_ms - max(0, keep - result_ttl_ms))
    return Finished(outcome, "kept", opened.token, trace=opened.trace)


def _read_first(spec: FlightSpec, codec: Codec) -> Generator[Command, object, Finished | None]:
    """The plain read of the kept value before the acquire script (Read): the kept value
    if it is to be served, else None (the script decides); the read credit told."""
    try:
        looked = yield Read()
    except ReadRefused:
        looked = None
    kept = None if looked is None else (yield from _read_kept(spec, codec, looked))
    spec.reads.saw(kept is not None)  # type: ignore[union-attr]  # read only with credit
    return kept


def _read_kept(
    spec: FlightSpec, codec: Codec, looked: object
) -> Generator[Command, object, Finished | None]:
    """read_kept's verdict, in the flight: a Rejected record is noted and dropped (if
    unchanged), and the script decides."""
    if type(looked) is not Looked:
        _unexpected(looked, Looked, "Read")
    kept = read_kept(codec, looked, spec.names.channel, spec.shape, spec.result_ttl_ms)
    if type(kept) is Rejected:
        if kept.detail:
            yield Note("rejected", kept.detail)
        yield Discard(kept.record)
        return None
    return kept  # type: ignore[return-value]


def _draw(spec: FlightSpec, rand: Callable[[], float]) -> int:
    """XFetch's draw, ``-beta * ln(rand)``, in thousandths (0 when early_refresh is off)."""
    if not spec.early_refresh:
        return 0
    return min(10**9, int(-spec.early_refresh * math.log(1.0 - rand()) * 1000))


def _stale(
    spec: FlightSpec, codec: Codec, reply: Acquired
) -> Generator[Command, object, Finished | None]:
    """The value a reply serves or offers to fall back on (a "kept" one: marked stale by
    whoever uses it as such); None if its record is unreadable, forged or not a value."""
    opened = yield from _open(spec, codec, reply.record)
    if not isinstance(opened, Opened) or opened.outcome.error is not None:
        return None
    outcome = opened.outcome
    outcome.fresh_ms = max(0, reply.fresh_ms)  # only a fresh value is kept in-process
    outcome.age_ms = reply.age_ms
    return Finished(outcome, "kept", opened.token, trace=opened.trace)


def _bounded(spec: FlightSpec, clock: Callable[[], float], seconds: float) -> float:
    if spec.deadline is None:
        return seconds
    left = spec.deadline - clock()
    if left <= 0:
        raise WaitTimeout(f"waited the wait_timeout for {spec.names.job_id!r}")
    return min(seconds, left)


def _open(
    spec: FlightSpec, codec: Codec, data: bytes
) -> Generator[Command, object, Opened | Notice | None]:
    """Decode a record or notice; None if it must be ignored (unreadable, forged, foreign)."""
    try:
        return codec.open(data, channel=spec.names.channel, shape=spec.shape)
    except EnvelopeError as exc:  # codec.open counted it in codec.rejected
        yield Note("rejected", str(exc))
        return None


def _lead(
    spec: FlightSpec,
    codec: Codec,
    clock: Callable[[], float],
    trace: bytes,
    acquired: Acquired,
    sent: float,
    *,
    waited: bool,
    since: float,
    fallback: Finished | None = None,
) -> Flight:
    """Lead under the lease ``acquired`` granted: run the function (Lead), then store and
    publish its outcome (``_led``). (run_flight writes these steps out for a LEAD.)"""
    token = acquired.token
    lock = lock_value(token, spec.owner)
    if spec.min_replicas and 0 <= acquired.replicas < spec.min_replicas:
        yield from _too_few_replicas(spec, codec, acquired, lock)
    outcome = yield Lead(token, lock, since)
    return (yield from _led(spec, codec, clock, trace, outcome, token, lock, sent, waited,
                            fallback))  # fmt: skip


def _too_few_replicas(
    spec: FlightSpec, codec: Codec, acquired: Acquired, lock: str
) -> Generator[Command, object, NoReturn]:
    """Too few replicas acknowledged the lease (min_replicas; -1: our own lease found by a
    retried acquire, acknowledged when it was granted): a lease only the master knows of
    could vanish in a failover, so give it back and fail."""
    token = acquired.token
    notice = codec.notice(NOTICE_ABORTED, channel=spec.names.channel, token=token)
    yield Complete(lock, b"", 0, notice, token)
    raise BackendUnavailable(
        f"only {acquired.replicas} of {spec.min_replicas} replicas acknowledged the lease "
        f"on {spec.names.job_id!r} within {spec.replica_timeout_ms} ms"
    )


def _led(
    spec: FlightSpec,
    codec: Codec,
    clock: Callable[[], float],
    trace: bytes,
    outcome: object,
    token: int,
    lock: str,
    sent: float,
    waited: bool,
    fallback: Finished | None,
) -> Flight:
    """After the Lead: the function's outcome sealed, stored and published (Complete). Its
    own generator, made once the function has returned: a leader whose function runs holds
    no frame of these steps (issue 23's memory per flight)."""
    if type(outcome) is not Outcome:
        _unexpected(outcome, Outcome, "Lead")
    channel = spec.names.channel
    done = Finished(outcome, "leader", token, waited, trace)
    # A failure a stale value may stand in for (stale_if_error).
    error = outcome.error
    stand_in = (
        fallback is not None
        and error is not None
        and spec.replaceable(error, fallback.outcome.fresh_ms > 0)
    )
    try:
        if error is not None and not isinstance(error, Exception):  # is_abort, inline
            # Nothing to keep; tell the followers at once so one of them takes over.
            notice = codec.notice(NOTICE_ABORTED, channel=channel, token=token)
            yield Complete(lock, b"", 0, notice, token)
            return done
        # Fresh for result_ttl after the run: sealed as keep since the grant (the token's
        # time), so that a record written back later can never pass for fresh.
        # (Comparisons, not min() and max(): each of those parses its arguments for keywords,
        # some 600 instructions a call, on every flight.)
        sealing = clock()  # the run's end, and the seal's start
        run_ms = round((sealing - sent) * 1000)
        if run_ms < 0:
            run_ms = 0
        value = outcome.error is None
        window = (spec.stale_ms if spec.stale_ms > spec.error_ms else spec.error_ms) if value else 0
        kept = spec.result_ttl_ms or window
        keep = ((spec.result_ttl_ms + run_ms) or 1) if value and kept else 0  # both >= 0
        # In Redis for its freshness and the longest stale window after it.
        ttl = spec.result_ttl_ms + window
        if ttl < spec.grace_ms:
            ttl = spec.grace_ms
        record, sealed_keep = codec.seal_kept(
            outcome, channel=channel, token=token, keep_ms=keep, ttl_ms=ttl, trace=trace,
            shape=spec.shape,
        )  # fmt: skip
        sealed = clock() - sealing
        if sealed * 1000 > spec.lock_ttl_ms:
            # The safe serializer encodes a large value in pieces so renewals run meanwhile;
            # pickle, json or a custom serializer may hold the GIL for the whole encode.
            yield Note(
                "slow_seal",
                f"sealing the outcome took {sealed:.3f} s, longer than the lease "
                f"({spec.lock_ttl_ms / 1000:.3f} s): a serializer that holds the GIL that "
                "long keeps the lease from being renewed; raise lock_ttl",
                token,
            )
        # seal keeps nothing fresh of an outcome that other processes could not read.
        keep = sealed_keep if sealed_keep < spec.result_ttl_ms else spec.result_ttl_ms
        message = b""
        if len(record) > spec.inline_max_bytes:
            message = codec.notice(NOTICE_STORED, channel=channel, token=token)
        if stand_in and fallback is not None:
            stale_notice = codec.notice(NOTICE_STALE, channel=channel, token=token)
            cmd = Complete(lock, record, ttl, message, token, fallback.token, stale_notice)
        else:
            cmd = Complete(lock, record, ttl, message, token)
        completed = yield cmd
        if type(completed) is not Completed:
            _unexpected(completed, Completed, "Complete")
        if completed.publish_error:
            yield Note(
                "publish_failed",
                f"could not publish the outcome ({completed.publish_error}); followers read "
                "it on re-check",
                token,
            )
        if completed.state == CompleteState.STOOD_IN and stand_in:
            return (yield from _stand_in(outcome, fallback, token, waited))
        outcome.fresh_ms = keep if completed.state >= 0 else 0
        if completed.state == CompleteState.WITHHELD:
            yield Note(
                "withheld",
                "the lease was lost before the leader finished; its outcome went to its own "
                "callers only (a newer flight has started)",
                token,
            )
    except Exception as exc:  # a computed value is never thrown away
        # Redis down, an ACL, an encoding bug: the outcome is still ours to return; waiters
        # elsewhere find no outcome and take over when the lease runs out.
        if isinstance(exc, ProtocolError):
            raise
        outcome.fresh_ms = 0
        yield Note("store_failed", f"could not store the outcome: {exc}", token)
        if stand_in:  # the stale value was within stale_if_error when we acquired
            return (yield from _stand_in(outcome, fallback, token, waited))
    return done


def _stand_in(
    outcome: Outcome, fallback: Finished | None, token: int, waited: bool
) -> Generator[Command, object, Finished]:
    """The leader's callers get the stale value in place of the run's error (logged, counted)."""
    error = outcome.error
    assert fallback is not None and error is not None
    yield Note(
        "stood_in",
        f"the run failed ({type(error).__qualname__}: {error}); the stale value (token "
        f"{fallback.token}) stands in for it (stale_if_error)",
        token,
    )
    fallback.outcome.stale = "error"
    return Finished(fallback.outcome, "kept", fallback.token, waited, fallback.trace)
