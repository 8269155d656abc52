"""Unit tests of dedupe.protocol: the sans-I/O flight, driven by hand with scripted replies.

No Redis server is needed: each test plays the driver, sending replies into ``run_flight``.
"""

from __future__ import annotations

from typing import Any

import pytest

from dedupe.envelope import PICKLE, Codec, Outcome, make_record, parse_record
from dedupe.errors import BackendUnavailable, EnvelopeError, WaitTimeout
from dedupe.keys import names_for
from dedupe.protocol import (
    BUSY,
    DONE,
    LEAD,
    RECHECK,
    Acquire,
    Acquired,
    Complete,
    Discard,
    FlightSpec,
    Lead,
    Replicate,
    Subscribe,
    Wait,
    holder_token,
    is_abort,
    run_flight,
)

SECRET = b"protocol-secret"
NAMES = names_for("t", "job-1")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_spec(**overrides: Any) -> FlightSpec:
    fields: dict[str, Any] = {
        "names": NAMES,
        "owner": "me:1",
        "lock_ttl_ms": 10_000,
        "token_ttl_ms": 86_400_000,
        "keep_ms": 1_000,
        "grace_ms": 12_000,
        "inline_max_bytes": 32 * 1024,
        "deadline": None,
    }
    fields.update(overrides)
    return FlightSpec(**fields)


class Driver:
    """Plays the driver: records every command and feeds the generator its replies."""

    def __init__(
        self, spec: FlightSpec | None = None, codec: Codec | None = None, clock: Any = None
    ) -> None:
        self.spec = spec or make_spec()
        self.codec = codec or Codec(PICKLE)
        self.clock = clock or FakeClock()
        self.gen = run_flight(self.spec, self.codec, self.clock)
        self.commands: list[Any] = []
        self.result: Outcome | None = None
        self.command: Any = self._record(next(self.gen))

    def _record(self, command: Any) -> Any:
        self.commands.append(command)
        return command

    def send(self, reply: object) -> Any:
        """Reply to the pending command; return the next command, or None once finished."""
        assert self.result is None, "the flight already finished"
        try:
            self.command = self._record(self.gen.send(reply))
        except StopIteration as stop:
            self.result = stop.value
            self.command = None
        return self.command

    def throw(self, exc: BaseException) -> Any:
        try:
            self.command = self._record(self.gen.throw(exc))
        except StopIteration as stop:
            self.result = stop.value
            self.command = None
        return self.command


def record_for(
    value: Any = None,
    *,
    token: int = 7,
    error: BaseException | None = None,
    codec: Codec | None = None,
) -> bytes:
    codec = codec or Codec(PICKLE)
    envelope = codec.encode(Outcome(value, error), channel=NAMES.channel, token=token)
    return make_record(token, 1000, 12000, envelope)


def busy(pttl_ms: int = 5_000, holder: str = "7:other:99") -> Acquired:
    return Acquired(BUSY, pttl_ms=pttl_ms, holder=holder)


def follow_until_wait(d: Driver, pttl_ms: int = 4_000, holder: str = "7:other:99") -> Wait:
    """Acquire -> BUSY -> Subscribe -> Acquire(holder's token) -> BUSY -> Wait."""
    assert d.command == Acquire("")
    assert d.send(busy(5_000, holder)) == Subscribe()
    assert d.send(None) == Acquire(holder_token(holder))
    wait = d.send(busy(pttl_ms, holder))
    assert isinstance(wait, Wait)
    return wait


# --------------------------------------------------------------------------- leading


@pytest.mark.parametrize(("keep_ms", "grace_ms"), [(1_000, 12_000), (60_000, 12_000), (0, 500)])
def test_uncontended_lead_with_a_value(keep_ms: int, grace_ms: int) -> None:
    d = Driver(make_spec(keep_ms=keep_ms, grace_ms=grace_ms))
    assert d.command == Acquire("")
    assert d.send(Acquired(LEAD, token=42)) == Lead(42, "42:me:1")
    complete = d.send(Outcome(value={"v": 1}))
    assert isinstance(complete, Complete)
    assert d.send(True) is None
    assert d.result == Outcome(value={"v": 1})
    assert [type(c) for c in d.commands] == [Acquire, Lead, Complete]

    assert complete.lock_value == "42:me:1"
    assert complete.token == 42
    assert complete.message == b""
    record = parse_record(complete.record)
    assert record.token == 42
    assert record.keep_ms == keep_ms
    assert record.ttl_ms == max(keep_ms, grace_ms)
    assert complete.record_ttl_ms == max(keep_ms, grace_ms)
    decoded = d.codec.decode(record.envelope, channel=NAMES.channel, token=42)
    assert decoded == Outcome(value={"v": 1})


@pytest.mark.parametrize(
    "outcome",
    [Outcome(error=ValueError("bad")), Outcome(value=(i for i in range(3)))],
    ids=["exception", "unserializable"],
)
def test_lead_with_an_exception_or_unserializable_value_keeps_nothing(outcome: Outcome) -> None:
    d = Driver(make_spec(keep_ms=5_000, grace_ms=12_000))
    d.send(Acquired(LEAD, token=3))
    complete = d.send(outcome)
    assert isinstance(complete, Complete)
    record = parse_record(complete.record)
    assert record.keep_ms == 0
    assert record.ttl_ms == complete.record_ttl_ms == 12_000
    assert d.send(True) is None
    assert d.result is outcome


def test_lead_with_a_large_record_publishes_a_notice() -> None:
    d = Driver(make_spec(inline_max_bytes=100))
    d.send(Acquired(LEAD, token=1234))
    complete = d.send(Outcome(value="x" * 500))
    assert isinstance(complete, Complete)
    assert complete.message == b"N:1234"
    assert len(complete.record) > 100
    assert parse_record(complete.record).token == 1234
    d.send(True)
    assert d.result == Outcome(value="x" * 500)


def test_lead_with_a_record_at_the_inline_limit_travels_inline() -> None:
    probe = Driver()
    probe.send(Acquired(LEAD, token=5))
    size = len(probe.send(Outcome(value="abc")).record)

    at_limit = Driver(make_spec(inline_max_bytes=size))
    at_limit.send(Acquired(LEAD, token=5))
    assert at_limit.send(Outcome(value="abc")).message == b""

    over = Driver(make_spec(inline_max_bytes=size - 1))
    over.send(Acquired(LEAD, token=5))
    assert over.send(Outcome(value="abc")).message == b"N:5"


def test_lost_lease_still_returns_the_outcome() -> None:
    d = Driver()
    d.send(Acquired(LEAD, token=9))
    d.send(Outcome(value=1))
    assert d.send(False) is None
    assert d.result == Outcome(value=1)


@pytest.mark.parametrize(
    "abort", [KeyboardInterrupt(), SystemExit(3), GeneratorExit()], ids=lambda e: type(e).__name__
)
def test_aborted_leader_publishes_an_abort_notice_and_stores_nothing(abort: BaseException) -> None:
    assert is_abort(abort)
    d = Driver()
    d.send(Acquired(LEAD, token=77))
    outcome = Outcome(error=abort)
    complete = d.send(outcome)
    assert complete == Complete("77:me:1", b"", 0, b"A:77", 77)
    assert d.send(True) is None
    assert d.result is outcome
    assert [type(c) for c in d.commands] == [Acquire, Lead, Complete]


@pytest.mark.parametrize(
    "outcome",
    [Outcome(value="v"), Outcome(error=ValueError("e")), Outcome(error=KeyboardInterrupt())],
    ids=["value", "error", "abort"],
)
def test_complete_failing_with_backend_unavailable_still_returns_the_outcome(
    outcome: Outcome,
) -> None:
    d = Driver()
    d.send(Acquired(LEAD, token=2))
    assert isinstance(d.send(outcome), Complete)
    assert d.throw(BackendUnavailable("redis is down")) is None
    assert d.result is outcome


def test_complete_failing_with_another_error_propagates() -> None:
    d = Driver()
    d.send(Acquired(LEAD, token=2))
    d.send(Outcome(value=1))
    with pytest.raises(RuntimeError, match="driver bug"):
        d.throw(RuntimeError("driver bug"))


def test_busy_under_our_own_lease_leads() -> None:
    # An acquire whose reply was lost and that the client retried finds our own lease.
    d = Driver()
    assert d.send(busy(9_000, "31:me:1")) == Lead(31, "31:me:1")
    assert not any(isinstance(c, Subscribe) for c in d.commands)


def test_lead_waits_for_replicas_when_asked() -> None:
    d = Driver(make_spec(min_replicas=2, replica_timeout_ms=250))
    assert d.send(Acquired(LEAD, token=4)) == Replicate(2, 250)
    assert d.send(2) == Lead(4, "4:me:1")


def test_lead_without_enough_replicas_gives_the_lease_back() -> None:
    d = Driver(make_spec(min_replicas=2))
    d.send(Acquired(LEAD, token=4))
    assert d.send(1) == Complete("4:me:1", b"", 0, b"A:4", 4)
    with pytest.raises(BackendUnavailable, match="replicas"):
        d.send(True)


# --------------------------------------------------------------------------- fresh results


def test_fresh_result_returns_at_once() -> None:
    d = Driver()
    assert d.send(Acquired(DONE, record=record_for({"fresh": True}))) is None
    assert d.result == Outcome(value={"fresh": True})
    assert d.commands == [Acquire("")]


def test_fresh_error_result_returns_the_error() -> None:
    d = Driver()
    d.send(Acquired(DONE, record=record_for(error=KeyError("k"))))
    assert d.result is not None
    assert isinstance(d.result.error, KeyError)
    assert d.commands == [Acquire("")]


# --------------------------------------------------------------------------- following


def test_busy_subscribes_rechecks_waits_and_takes_the_published_record() -> None:
    spec = make_spec()
    d = Driver(spec)
    wait = follow_until_wait(d, pttl_ms=4_000, holder="7:other:99")
    assert wait.timeout == pytest.approx(4.0 + spec.slack(4_000))
    assert 4.0 < wait.timeout < 4.5
    assert d.send(record_for("published", token=7)) is None
    assert d.result == Outcome(value="published")
    assert [type(c) for c in d.commands] == [Acquire, Subscribe, Acquire, Wait]


def test_busy_then_done_on_the_recheck_returns_without_waiting() -> None:
    d = Driver()
    assert d.send(busy()) == Subscribe()
    assert d.send(None) == Acquire("7")
    assert d.send(Acquired(DONE, record=record_for(5))) is None
    assert d.result == Outcome(value=5)
    assert not any(isinstance(c, Wait) for c in d.commands)


def test_subscribes_only_once() -> None:
    d = Driver()
    follow_until_wait(d)
    assert d.send(None) == Acquire("7")
    assert isinstance(d.send(busy(3_000)), Wait)
    assert d.send(None) == Acquire("7")
    assert isinstance(d.send(busy(2_000)), Wait)
    assert sum(isinstance(c, Subscribe) for c in d.commands) == 1


def test_wait_timeout_rechecks_with_the_holders_token() -> None:
    d = Driver()
    follow_until_wait(d, holder="7:other:99")
    assert d.send(None) == Acquire("7")
    # The lease moved on to a new holder: the waiting token follows it.
    wait = d.send(busy(1_500, "8:someone:1"))
    assert isinstance(wait, Wait)
    assert wait.timeout == pytest.approx(1.5 + make_spec().slack(1_500))
    assert d.send(None) == Acquire("8")


def test_wait_timeout_then_lead_takes_over() -> None:
    d = Driver()
    follow_until_wait(d)
    assert d.send(None) == Acquire("7")
    assert d.send(Acquired(LEAD, token=8)) == Lead(8, "8:me:1")


def test_recheck_reply_resubscribes_then_rechecks() -> None:
    d = Driver()
    follow_until_wait(d)
    assert d.send(RECHECK) == Subscribe()
    assert d.send(None) == Acquire("7")
    assert d.send(Acquired(DONE, record=record_for("after reconnect"))) is None
    assert d.result == Outcome(value="after reconnect")


def test_stored_notice_rechecks_with_the_notice_token() -> None:
    d = Driver()
    follow_until_wait(d, holder="7:other:99")
    assert d.send(b"N:9") == Acquire("9")
    assert d.send(Acquired(DONE, record=record_for("big", token=9))) is None
    assert d.result == Outcome(value="big")


def test_aborted_notice_rechecks_then_takes_over() -> None:
    d = Driver()
    follow_until_wait(d, holder="7:other:99")
    assert d.send(b"A:7") == Acquire("7")
    assert d.send(Acquired(LEAD, token=8)) == Lead(8, "8:me:1")
    complete = d.send(Outcome(value="mine"))
    assert isinstance(complete, Complete)
    d.send(True)
    assert d.result == Outcome(value="mine")


def test_holder_without_a_token_waits_for_nothing_in_particular() -> None:
    assert holder_token("12:owner:3") == "12"
    assert holder_token("") == ""
    assert holder_token("garbage") == ""
    assert holder_token("x1:owner") == ""
    d = Driver()
    assert d.send(busy(holder="not-ours")) == Subscribe()
    assert d.send(None) == Acquire("")


def test_deadline_passing_raises_wait_timeout() -> None:
    clock = FakeClock(100.0)
    d = Driver(make_spec(deadline=101.0), clock=clock)
    wait = follow_until_wait(d, pttl_ms=5_000)
    assert wait.timeout == pytest.approx(1.0)  # capped by the deadline, not the lease
    clock.now = 101.0
    assert d.send(None) == Acquire("7")
    with pytest.raises(WaitTimeout):
        d.send(busy(4_000))


def test_deadline_shortens_each_wait() -> None:
    clock = FakeClock(100.0)
    d = Driver(make_spec(deadline=103.0), clock=clock)
    assert follow_until_wait(d, pttl_ms=10_000).timeout == pytest.approx(3.0)
    clock.now = 102.5
    d.send(None)
    assert d.send(busy(10_000)).timeout == pytest.approx(0.5)


def test_deadline_is_no_reason_to_fail_when_the_result_is_there() -> None:
    clock = FakeClock(100.0)
    d = Driver(make_spec(deadline=99.0), clock=clock)
    assert d.send(Acquired(DONE, record=record_for("late but ready"))) is None
    assert d.result == Outcome(value="late but ready")


# --------------------------------------------------------------------------- bad records


def tampered(record: bytes) -> bytes:
    mutated = bytearray(record)
    mutated[-1] ^= 0x01
    return bytes(mutated)


def test_tampered_stored_record_is_discarded_and_reacquired() -> None:
    codec = Codec(PICKLE, secret=SECRET)
    good = record_for("genuine", codec=codec)
    bad = tampered(good)
    d = Driver(codec=codec)
    assert codec.rejected == 0
    assert d.send(Acquired(DONE, record=bad)) == Discard(bad)
    assert codec.rejected == 1
    assert d.send(None) == Acquire("")
    assert d.send(Acquired(DONE, record=good)) is None
    assert d.result == Outcome(value="genuine")


def test_unsigned_stored_record_is_ignored_when_a_secret_is_set() -> None:
    forged = record_for("forged")  # written without the secret
    d = Driver(codec=Codec(PICKLE, secret=SECRET))
    assert d.send(Acquired(DONE, record=forged)) == Discard(forged)
    assert d.send(None) == Acquire("")
    assert d.send(Acquired(LEAD, token=8)) == Lead(8, "8:me:1")


def test_record_signed_for_another_token_is_ignored() -> None:
    codec = Codec(PICKLE, secret=SECRET)
    envelope = codec.encode(Outcome("replayed"), channel=NAMES.channel, token=5)
    replayed = make_record(6, 1000, 12000, envelope)
    d = Driver(codec=codec)
    assert d.send(Acquired(DONE, record=replayed)) == Discard(replayed)


def test_tampered_published_record_is_ignored_and_rechecked() -> None:
    codec = Codec(PICKLE, secret=SECRET)
    d = Driver(codec=codec)
    follow_until_wait(d)
    assert d.send(tampered(record_for("x", codec=codec))) == Acquire("7")
    assert d.send(Acquired(DONE, record=record_for("real", codec=codec))) is None
    assert d.result == Outcome(value="real")


@pytest.mark.parametrize("junk", [b"hello", b"", b"\x00\x01", b"X:1"])
def test_foreign_bytes_on_the_channel_are_ignored(junk: bytes) -> None:
    d = Driver()
    follow_until_wait(d)
    assert d.send(junk) == Acquire("7")


def test_repeated_bad_records_eventually_raise_envelope_error() -> None:
    codec = Codec(PICKLE, secret=SECRET)
    bad = tampered(record_for("x", codec=codec))
    d = Driver(codec=codec)
    discards = 0
    with pytest.raises(EnvelopeError) as info:
        for _ in range(50):
            command = d.send(Acquired(DONE, record=bad))
            assert command == Discard(bad)
            discards += 1
            assert d.send(None) == Acquire("")
    assert 1 <= discards < 50
    assert "job-1" in str(info.value)


def test_undecodable_record_without_a_secret_raises() -> None:
    envelope = bytearray(Codec(PICKLE).encode(Outcome(1), channel=NAMES.channel, token=7))
    envelope[2] = 99  # a version this dedupe cannot read
    d = Driver()
    with pytest.raises(EnvelopeError, match="version 99"):
        d.send(Acquired(DONE, record=make_record(7, 1000, 12000, bytes(envelope))))


# --------------------------------------------------------------------------- I/O failures


def test_backend_unavailable_at_acquire_propagates() -> None:
    d = Driver()
    with pytest.raises(BackendUnavailable):
        d.throw(BackendUnavailable("no redis"))


@pytest.mark.parametrize("stage", ["subscribe", "recheck", "wait"])
def test_backend_unavailable_while_following_propagates(stage: str) -> None:
    d = Driver()
    d.send(busy())
    if stage in ("recheck", "wait"):
        d.send(None)
    if stage == "wait":
        d.send(busy())
        assert isinstance(d.command, Wait)
    with pytest.raises(BackendUnavailable):
        d.throw(BackendUnavailable("no redis"))


# --------------------------------------------------------------------------- freshness


def test_freshness_travels_with_each_kind_of_outcome() -> None:
    """How long a value may still be handed to new callers (local_cache relies on it)."""
    lead = Driver(make_spec(keep_ms=3_000))
    lead.send(Acquired(LEAD, token=1))
    lead.send(Outcome(value="v"))
    lead.send(True)
    assert lead.result is not None and lead.result.fresh_ms == 3_000

    failed = Driver(make_spec(keep_ms=3_000))
    failed.send(Acquired(LEAD, token=1))
    failed.send(Outcome(error=ValueError("x")))
    failed.send(True)
    assert failed.result is not None and failed.result.fresh_ms == 0

    read = Driver()
    read.send(Acquired(DONE, record=record_for("kept"), fresh_ms=250))
    assert read.result is not None and read.result.fresh_ms == 250

    published = Driver()
    follow_until_wait(published)
    published.send(record_for("pushed", token=7))  # record_for keeps it 1000 ms
    assert published.result is not None and published.result.fresh_ms == 1_000

    error_read = Driver()
    error_read.send(Acquired(DONE, record=record_for(error=KeyError("k")), fresh_ms=250))
    assert error_read.result is not None and error_read.result.fresh_ms == 0
