"""The flight protocol as a sans-I/O state machine: it yields commands and takes their replies.

One generator, ``run_flight``, decides everything: acquire, subscribe, re-check, wait,
take over, complete. The sync and async drivers only carry its commands to Redis (and to
the pub/sub hub) and send the replies back; an I/O failure is thrown into the generator,
which lets it propagate (as BackendUnavailable) or handles it. Nothing here blocks, so the
whole protocol can be tested by feeding it scripted replies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Final, NamedTuple, TypeAlias

from . import events
from .envelope import NOTICE_ABORTED, NOTICE_STORED, Codec, Notice, Opened, Outcome, header_of
from .errors import BackendUnavailable, EnvelopeError, WaitTimeout
from .keys import Names
from .subscriptions import RECHECK  # what the hub hands a Wait: re-subscribe, re-check

__all__ = [
    "RECHECK",
    "Acquire",
    "Acquired",
    "Command",
    "Complete",
    "Completed",
    "Discard",
    "Finished",
    "FlightSpec",
    "Lead",
    "Pause",
    "Release",
    "Replicate",
    "Subscribe",
    "Unanswered",
    "Wait",
    "is_abort",
    "run_flight",
]

log = logging.getLogger(__name__)


# How often a follower whose subscription is not confirmed re-checks the job's state.
_POLL: Final = 0.5


@dataclass(slots=True)
class FlightSpec:
    """Everything the protocol needs to know about one flight (treat it as read-only)."""

    names: Names
    owner: str
    lock_ttl_ms: int
    token_ttl_ms: int
    keep_ms: int  # result_ttl: how long a value stays fresh for new callers
    grace_ms: int  # how long any outcome stays readable for followers that missed the message
    inline_max_bytes: int
    deadline: float | None  # on the clock given to run_flight; None: wait while a leader lives
    min_replicas: int = 0  # replicas that must acknowledge a new lease (WAIT) before we lead
    replica_timeout_ms: int = 1000
    max_hold_ms: int = 300_000  # a leader's hold on one lease; renewal stops after it

    def slack(self, pttl_ms: int) -> float:
        """Extra wait past the lease, so the re-check lands after a dead leader's lease expired."""
        return 0.025 + pttl_ms / 100_000


# --- commands (what the protocol asks the driver to do) and their replies --------------------


class Acquire(NamedTuple):
    """Run the acquire script. Reply: Acquired.

    ``floor``: the newest lease token this flight waited on ('' for none); the script
    never hands it an outcome of an older lease.
    """

    floor: str


class Acquired(NamedTuple):
    state: int  # DONE, BUSY or LEAD
    record: bytes = b""  # DONE: the record
    fresh_ms: int = 0  # DONE: how much longer the record's value is fresh for new callers
    pttl_ms: int = 0  # BUSY: the lease's remaining time
    holder: str = ""  # BUSY: the lock value "<token>:<owner>"
    token: int = 0  # LEAD: our fencing token
    # On run_flight's clock: when the request that got this reply was written to the
    # socket (0.0: unknown, then the time Acquire was yielded stands in). A lease is dated
    # from it, never from a queue before it.
    sent: float = 0.0


class Unanswered(Exception):
    """Thrown into run_flight for an Acquire whose request was written but whose reply never
    came (a timeout, a dropped connection, a cancelled caller): it may have been applied,
    so a lease may be ours. ``error`` is what the caller will raise."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


DONE: Final = 0
BUSY: Final = 1
LEAD: Final = 2


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


class Release(NamedTuple):
    """Give back the lease an unanswered Acquire may have granted us: owner-checked, best
    effort, off the caller's path, so that waiters take over at once rather than at the
    lease's end. Reply: None (at once: the release runs in the background)."""


class Replicate(NamedTuple):
    """WAIT for replicas to acknowledge our writes. Reply: how many did."""

    replicas: int
    timeout_ms: int


class Complete(NamedTuple):
    """Run the complete script. Reply: Completed."""

    lock_value: str
    record: bytes
    record_ttl_ms: int
    message: bytes
    token: int


class Completed(NamedTuple):
    state: int  # 1: the lease was ours; 0: lost, but no newer lease: shared; -1: withheld
    publish_error: str = ""  # the PUBLISH failed (stored all the same), e.g. an ACL


class Discard(NamedTuple):
    """Drop an unreadable record from the result key, if unchanged. Reply: ignored."""

    record: bytes


Command: TypeAlias = (
    Acquire | Subscribe | Wait | Lead | Complete | Discard | Replicate | Pause | Release
)
Flight: TypeAlias = Generator[Command, object, "Finished"]


def is_abort(error: BaseException | None) -> bool:
    """KeyboardInterrupt, SystemExit, CancelledError and kin: the run was cut short, not failed."""
    return error is not None and not isinstance(error, Exception)


def holder_token(holder: str) -> str:
    token, sep, _ = holder.partition(":")
    return token if sep and token.isdigit() else ""


# --- the flight -----------------------------------------------------------------------------


class Finished(NamedTuple):
    """What run_flight returns: the outcome, how this flight came by it, and its lease."""

    outcome: Outcome
    role: str  # "leader" (ran it), "remote" (another process's leader), "kept" (a kept value)
    token: int  # the fencing token of the lease whose outcome this is (0 if unknown)
    waited: bool = False  # a leader that waited on another lease first: a takeover
    trace: bytes = b""  # a follower: the leader's traceparent, from the record it read


def run_flight(spec: FlightSpec, codec: Codec, clock: Callable[[], float]) -> Flight:
    """Drive one flight to its outcome; the caller sends replies to the yielded commands."""
    floor = 0  # the newest lease we waited on: an outcome of an older one is never ours
    subscribed = False
    confirmed = False  # no message can wake us unless the server confirmed the subscription
    bad = 0
    while True:
        asked = clock()
        try:
            reply = yield Acquire(str(floor) if floor else "")
        except Unanswered as unanswered:
            lost: BaseException | None = unanswered.error
        else:
            lost = None
        if lost is not None:
            # The acquire may have granted us a lease nobody will run: give it back, so
            # that waiters take over now instead of when it runs out.
            yield Release()
            raise lost
        assert isinstance(reply, Acquired)
        # The lease, if granted, began no earlier than the request's write (not its queue).
        sent = reply.sent or asked
        since = sent
        if reply.state == BUSY and reply.holder.partition(":")[2] == spec.owner:
            # Our own lease: an acquire whose reply was lost and that the client retried. It
            # began before this acquire, by as much as it has run down (found by simulation).
            since = sent - max(0, spec.lock_ttl_ms - reply.pttl_ms) / 1000
            reply = Acquired(LEAD, token=int(holder_token(reply.holder) or 0))
        if reply.state == LEAD:
            if floor:
                log.debug(
                    "taking over %r after lease %d: leading with %d",
                    spec.names.job_id,
                    floor,
                    reply.token,
                )
            else:
                log.debug("leading %r with lease %d", spec.names.job_id, reply.token)
            return (
                yield from _lead(
                    spec, codec, clock, reply.token, sent, waited=floor > 0, since=since
                )
            )
        if reply.state == DONE:
            opened = _open(spec, codec, reply.record)
            if isinstance(opened, Opened) and opened.token >= floor:
                outcome = opened.outcome
                if outcome.error is None:
                    outcome.fresh_ms = reply.fresh_ms
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
        floor = max(floor, _token_of(reply.holder))
        log.debug(
            "following %r: lease %s, %d ms left", spec.names.job_id, reply.holder, reply.pttl_ms
        )
        timeout = reply.pttl_ms / 1000 + spec.slack(reply.pttl_ms)
        if spec.deadline is not None:
            left = spec.deadline - clock()
            if left <= 0:
                raise WaitTimeout(f"waited the wait_timeout for {spec.names.job_id!r}")
            timeout = min(timeout, left)
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
        until = clock() + timeout
        while True:
            message = yield Wait(max(0.0, until - clock()))
            if message is None:
                log.debug("re-checking %r: the lease ran out", spec.names.job_id)
                break  # the lease ran out, or the deadline: re-check
            if message is RECHECK:
                # The subscription dropped (and may have missed messages): give the hub until
                # the lease's end to re-subscribe (a restarting Redis answers nothing before
                # that anyway), then re-check.
                log.debug("re-checking %r: the subscription dropped", spec.names.job_id)
                confirmed = bool((yield Subscribe(max(0.0, until - clock()))))
                break
            assert isinstance(message, bytes)
            opened = _open(spec, codec, message)
            if opened is None:
                continue  # forged or foreign: ignored (counted by the codec), keep waiting
            if opened.token < floor:
                codec.count_rejection()  # genuine, but of an older lease: a replay
                continue
            if isinstance(opened, Notice):
                log.debug("re-checking %r: notice %r", spec.names.job_id, opened.kind)
                break  # stored (too large to travel inline) or aborted: the re-check tells
            outcome = opened.outcome
            if outcome.error is None:
                outcome.fresh_ms = min(opened.keep_ms, spec.keep_ms)
            return Finished(outcome, "remote", opened.token, trace=opened.trace)


def _bounded(spec: FlightSpec, clock: Callable[[], float], seconds: float) -> float:
    if spec.deadline is None:
        return seconds
    left = spec.deadline - clock()
    if left <= 0:
        raise WaitTimeout(f"waited the wait_timeout for {spec.names.job_id!r}")
    return min(seconds, left)


def _token_of(holder: str) -> int:
    token = holder_token(holder)
    return int(token) if token and len(token) <= 20 else 0


def _open(spec: FlightSpec, codec: Codec, data: bytes) -> Opened | Notice | None:
    """Decode a record or notice; None if it must be ignored (unreadable, forged, foreign)."""
    try:
        return codec.open(data, channel=spec.names.channel)
    except EnvelopeError as exc:  # codec.open counted it in codec.rejected
        _warn_rejected(spec.names.job_id, exc)
        if events.enabled:
            events.mark("rejected", spec.names, detail=str(exc))
        return None


_last_rejection_warning = -1.0  # monotonic time of the last one (a race here costs a line)


def _warn_rejected(job_id: str, exc: EnvelopeError) -> None:
    """At most one line a second: whoever may PUBLISH must not be able to flood the log."""
    global _last_rejection_warning
    now = time.monotonic()
    if now - _last_rejection_warning >= 1.0:
        _last_rejection_warning = now
        log.warning("ignored an outcome for %r (counted in stats()): %s", job_id, exc)


def _lead(
    spec: FlightSpec,
    codec: Codec,
    clock: Callable[[], float],
    token: int,
    sent: float,
    *,
    waited: bool,
    since: float,
) -> Flight:
    lock_value = f"{token}:{spec.owner}"
    channel = spec.names.channel
    if spec.min_replicas:
        acked = yield Replicate(spec.min_replicas, spec.replica_timeout_ms)
        assert isinstance(acked, int)
        if acked < spec.min_replicas:
            # A lease only the master knows of could vanish in a failover: give it back.
            notice = codec.notice(NOTICE_ABORTED, channel=channel, token=token)
            yield Complete(lock_value, b"", 0, notice, token)
            raise BackendUnavailable(
                f"only {acked} of {spec.min_replicas} replicas acknowledged the lease on "
                f"{spec.names.job_id!r} within {spec.replica_timeout_ms} ms"
            )
    outcome = yield Lead(token, lock_value, since)
    assert isinstance(outcome, Outcome)
    done = Finished(outcome, "leader", token, waited)
    try:
        if is_abort(outcome.error):
            # Nothing to keep; tell the followers at once so one of them takes over.
            notice = codec.notice(NOTICE_ABORTED, channel=channel, token=token)
            yield Complete(lock_value, b"", 0, notice, token)
            return done
        # Fresh for result_ttl after the run: sealed as keep since the grant (the token's
        # time), so that a record written back later can never pass for fresh.
        run_ms = max(0, round((clock() - sent) * 1000))
        keep = spec.keep_ms + run_ms if outcome.error is None and spec.keep_ms else 0
        ttl = max(spec.keep_ms, spec.grace_ms)
        trace = events.trace_context() if events.enabled else b""
        sealing = clock()
        record = codec.seal(
            outcome, channel=channel, token=token, keep_ms=keep, ttl_ms=ttl, trace=trace
        )
        sealed = clock() - sealing
        if sealed * 1000 > spec.lock_ttl_ms:
            # The safe serializer encodes a large value in pieces so renewals run meanwhile;
            # pickle, json or a custom serializer may hold the GIL for the whole encode.
            log.warning(
                "sealing the outcome of %r took %.3f s, longer than its lease (%.3f s): a "
                "serializer that holds the GIL that long keeps the lease from being renewed; "
                "raise lock_ttl",
                spec.names.job_id,
                sealed,
                spec.lock_ttl_ms / 1000,
            )
        # seal keeps nothing fresh of an outcome that other processes could not read.
        keep = min(spec.keep_ms, header_of(record).keep_ms)
        message = b""
        if len(record) > spec.inline_max_bytes:
            message = codec.notice(NOTICE_STORED, channel=channel, token=token)
        completed = yield Complete(lock_value, record, ttl, message, token)
        assert isinstance(completed, Completed)
        outcome.fresh_ms = keep if completed.state >= 0 else 0
        if completed.state < 0:
            if events.enabled:
                events.mark("lease_lost", spec.names, token=token, role="leader")
            log.warning(
                "the lease on %r (token %d) was lost before the leader finished; its outcome "
                "went to its own callers only (a newer flight has started)",
                spec.names.job_id,
                token,
            )
        elif completed.state == 0:
            # The lock was gone but no newer lease was granted: the lease lapsed unclaimed (the
            # watchdog reported that), or a retried complete found its own first attempt done.
            log.debug("completed %r (token %d) after its lock was gone", spec.names.job_id, token)
        if completed.publish_error:
            log.warning(
                "could not publish the outcome of %r (%s); followers read it on re-check",
                spec.names.job_id,
                completed.publish_error,
            )
    except Exception as exc:  # a computed value is never thrown away
        # Redis down, an ACL, an encoding bug: the outcome is still ours to return; waiters
        # elsewhere find no outcome and take over when the lease runs out.
        log.warning("could not store the outcome of %r: %s", spec.names.job_id, exc)
        outcome.fresh_ms = 0
    return done
