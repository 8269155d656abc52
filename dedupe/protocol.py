"""The flight protocol as a sans-I/O state machine: it yields commands and takes their replies.

One generator, ``run_flight``, decides everything: acquire, subscribe, re-check, wait,
take over, complete. The sync and async drivers only carry its commands to Redis (and to
the pub/sub hub) and send the replies back; an I/O failure is thrown into the generator,
which lets it propagate (as BackendUnavailable) or handles it. Nothing here blocks, so the
whole protocol can be tested by feeding it scripted replies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Final, NamedTuple, TypeAlias

from .envelope import (
    KIND_VALUE,
    NOTICE_ABORTED,
    NOTICE_STORED,
    Codec,
    Outcome,
    TamperedEnvelope,
    make_notice,
    make_record,
    parse_record,
)
from .errors import BackendUnavailable, EnvelopeError, WaitTimeout
from .keys import Names

__all__ = [
    "RECHECK",
    "Acquire",
    "Acquired",
    "Command",
    "Complete",
    "Discard",
    "FlightSpec",
    "Lead",
    "Replicate",
    "Subscribe",
    "Wait",
    "is_abort",
    "run_flight",
]

log = logging.getLogger("dedupe")

# After this many unreadable records in a row, stop re-checking and report it.
_MAX_BAD_RECORDS: Final = 8


class _Recheck:
    def __repr__(self) -> str:
        return "RECHECK"


RECHECK: Final = _Recheck()
"""A Wait reply meaning: the subscription may have missed messages; re-subscribe, re-check."""


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

    def slack(self, pttl_ms: int) -> float:
        """Extra wait past the lease, so the re-check lands after a dead leader's lease expired."""
        return 0.025 + pttl_ms / 100_000


# --- commands (what the protocol asks the driver to do) and their replies --------------------


class Acquire(NamedTuple):
    """Run the acquire script. Reply: Acquired."""

    waiting_token: str


class Acquired(NamedTuple):
    state: int  # DONE, BUSY or LEAD
    record: bytes = b""  # DONE: the record
    fresh_ms: int = 0  # DONE: how much longer the record's value is fresh for new callers
    pttl_ms: int = 0  # BUSY: the lease's remaining time
    holder: str = ""  # BUSY: the lock value "<token>:<owner>"
    token: int = 0  # LEAD: our fencing token


DONE: Final = 0
BUSY: Final = 1
LEAD: Final = 2


class Subscribe(NamedTuple):
    """Make sure the channel is subscribed and the server confirmed it. Reply: None."""


class Wait(NamedTuple):
    """Wait for a channel message. Reply: bytes, RECHECK, or None on timeout."""

    timeout: float


class Lead(NamedTuple):
    """Run the function under a renewed lease. Reply: Outcome (any BaseException captured)."""

    token: int
    lock_value: str


class Replicate(NamedTuple):
    """WAIT for replicas to acknowledge our writes. Reply: how many did."""

    replicas: int
    timeout_ms: int


class Complete(NamedTuple):
    """Run the complete script. Reply: True if the lease was still ours."""

    lock_value: str
    record: bytes
    record_ttl_ms: int
    message: bytes
    token: int


class Discard(NamedTuple):
    """Drop an unreadable record from the result key, if unchanged. Reply: ignored."""

    record: bytes


Command: TypeAlias = Acquire | Subscribe | Wait | Lead | Complete | Discard | Replicate
Flight: TypeAlias = Generator[Command, object, Outcome]


def is_abort(error: BaseException | None) -> bool:
    """KeyboardInterrupt, SystemExit, CancelledError and kin: the run was cut short, not failed."""
    return error is not None and not isinstance(error, Exception)


def holder_token(holder: str) -> str:
    token, sep, _ = holder.partition(":")
    return token if sep and token.isdigit() else ""


# --- the flight -----------------------------------------------------------------------------


def run_flight(spec: FlightSpec, codec: Codec, clock: Callable[[], float]) -> Flight:
    """Drive one flight to its outcome; the caller sends replies to the yielded commands."""
    waiting = ""
    subscribed = False
    bad_records = 0
    while True:
        reply = yield Acquire(waiting)
        assert isinstance(reply, Acquired)
        if reply.state == BUSY and reply.holder.partition(":")[2] == spec.owner:
            # Our own lease: an acquire whose reply was lost and that the client retried.
            reply = Acquired(LEAD, token=int(holder_token(reply.holder) or 0))
        if reply.state == LEAD:
            return (yield from _lead(spec, codec, reply.token))
        if reply.state == DONE:
            outcome = _read(spec, codec, reply.record, fresh_ms=reply.fresh_ms)
            if outcome is not None:
                return outcome
            bad_records += 1
            if bad_records >= _MAX_BAD_RECORDS:
                raise EnvelopeError(f"the outcome of {spec.names.job_id!r} keeps failing to verify")
            yield Discard(reply.record)
            continue
        waiting = holder_token(reply.holder)
        if not subscribed:
            # Subscribe first, then re-check: a publish between the two is then never missed.
            yield Subscribe()
            subscribed = True
            continue
        timeout = reply.pttl_ms / 1000 + spec.slack(reply.pttl_ms)
        if spec.deadline is not None:
            left = spec.deadline - clock()
            if left <= 0:
                raise WaitTimeout(f"waited the wait_timeout for {spec.names.job_id!r}")
            timeout = min(timeout, left)
        while True:
            message = yield Wait(timeout)
            if message is None:
                break  # lease ran out or deadline: re-check
            if message is RECHECK:
                yield Subscribe()
                break
            assert isinstance(message, bytes)
            kind, _, rest = message.partition(b":")
            if kind == NOTICE_STORED:
                waiting = rest.decode("ascii", "replace")
                break  # too large to travel inline: the re-check reads it
            if kind == NOTICE_ABORTED:
                break  # the leader gave up: take over now
            outcome = _read(spec, codec, message, fresh_ms=None)
            if outcome is not None:
                return outcome
            break


def _read(spec: FlightSpec, codec: Codec, data: bytes, *, fresh_ms: int | None) -> Outcome | None:
    """Decode a record; None if it must be ignored (foreign or failed its signature).

    ``fresh_ms`` is how much longer its value may be given to new callers; None for a record
    just published, which is fresh for its whole keep time.
    """
    try:
        record = parse_record(data)
        outcome = codec.decode(record.envelope, channel=spec.names.channel, token=record.token)
    except TamperedEnvelope as exc:
        _reject(spec, codec, exc)
        return None
    except EnvelopeError as exc:
        if data[:1].isdigit() and b":" in data[:64]:
            raise
        _reject(spec, codec, exc)  # not even a record: somebody else's bytes on our channel
        return None
    if outcome.error is None:
        outcome.fresh_ms = record.keep_ms if fresh_ms is None else fresh_ms
    return outcome


def _reject(spec: FlightSpec, codec: Codec, exc: EnvelopeError) -> None:
    codec.rejected += 1
    log.warning("dedupe: ignored an outcome for %r: %s", spec.names.job_id, exc)


def _lead(spec: FlightSpec, codec: Codec, token: int) -> Flight:
    lock_value = f"{token}:{spec.owner}"
    if spec.min_replicas:
        acked = yield Replicate(spec.min_replicas, spec.replica_timeout_ms)
        assert isinstance(acked, int)
        if acked < spec.min_replicas:
            # A lease only the master knows of could vanish in a failover: give it back.
            yield Complete(lock_value, b"", 0, make_notice(NOTICE_ABORTED, token), token)
            raise BackendUnavailable(
                f"only {acked} of {spec.min_replicas} replicas acknowledged the lease on "
                f"{spec.names.job_id!r} within {spec.replica_timeout_ms} ms"
            )
    outcome = yield Lead(token, lock_value)
    assert isinstance(outcome, Outcome)
    try:
        if is_abort(outcome.error):
            # Nothing to keep; tell the followers at once so one of them takes over.
            yield Complete(lock_value, b"", 0, make_notice(NOTICE_ABORTED, token), token)
            return outcome
        envelope = codec.encode(outcome, channel=spec.names.channel, token=token)
        keep = spec.keep_ms if envelope[3] == KIND_VALUE else 0
        ttl = max(keep, spec.grace_ms)
        record = make_record(token, keep, ttl, envelope)
        message = b"" if len(record) <= spec.inline_max_bytes else make_notice(NOTICE_STORED, token)
        owned = yield Complete(lock_value, record, ttl, message, token)
        outcome.fresh_ms = keep
        if not owned:
            log.warning(
                "dedupe: the lease on %r (token %d) was lost before the leader finished; "
                "another caller may have run it too",
                spec.names.job_id,
                token,
            )
    except BackendUnavailable as exc:
        # The outcome is still ours to return; waiters elsewhere re-check when Redis is back.
        log.warning("dedupe: could not publish the outcome of %r: %s", spec.names.job_id, exc)
    return outcome
