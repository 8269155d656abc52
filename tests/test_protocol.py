"""Unit tests of dedupe.core.protocol: the sans-I/O flight, driven by hand with scripted replies.

No Redis server is needed: each test plays the driver, sending replies into ``run_flight``.
"""

from __future__ import annotations

from typing import Any

import pytest

from dedupe.core.keys import names_for
from dedupe.core.protocol import (
    BUSY,
    DONE,
    LEAD,
    RECHECK,
    Acquire,
    Acquired,
    Complete,
    Completed,
    Discard,
    Finished,
    FlightSpec,
    Lead,
    Note,
    Pause,
    Subscribe,
    Wait,
    is_abort,
    run_flight,
)
from dedupe.core.record import NOTICE_ABORTED, NOTICE_STORED
from dedupe.core.sealing import Codec, Outcome
from dedupe.errors import BackendUnavailable, WaitTimeout

SECRET = b"protocol-secret-of-some-length"
NAMES = names_for("t", "job-1")
OWNED = Completed(1)


def codec(secret: bytes | None = None) -> Codec:
    return Codec(secrets=(secret,) if secret else ())


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
        "token_ttl_ms": 60_000,
        "result_ttl_ms": 1_000,
        "grace_ms": 12_000,
        "inline_max_bytes": 32 * 1024,
        "deadline": None,
    }
    fields.update(overrides)
    return FlightSpec(**fields)


class Driver:
    """Plays the driver: records every command and feeds the generator its replies."""

    def __init__(
        self, spec: FlightSpec | None = None, codec_: Codec | None = None, clock: Any = None
    ) -> None:
        self.spec = spec or make_spec()
        self.codec = codec_ or codec()
        self.clock = clock or FakeClock()
        self.gen = run_flight(self.spec, self.codec, self.clock)
        self.commands: list[Any] = []
        self.notes: list[Note] = []
        self.result: Finished | None = None
        self.command: Any = self._record(next(self.gen))

    def _record(self, command: Any) -> Any:
        # Notes are for the driver's log and events: answered at once, kept in self.notes.
        while isinstance(command, Note):
            self.notes.append(command)
            command = self.gen.send(None)
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

    @property
    def outcome(self) -> Outcome:
        assert self.result is not None
        return self.result.outcome


def record_for(
    value: Any = None,
    *,
    token: int = 7,
    error: BaseException | None = None,
    c: Codec | None = None,
    keep_ms: int = 1000,
    channel: str = NAMES.channel,
) -> bytes:
    c = c or codec()
    return c.seal(
        Outcome(value, error), channel=channel, token=token, keep_ms=keep_ms, ttl_ms=12000
    )


def busy(pttl_ms: int = 5_000, holder: str = "7:other:99") -> Acquired:
    return Acquired(BUSY, pttl_ms=pttl_ms, holder=holder)


def follow_until_wait(d: Driver, pttl_ms: int = 4_000, holder: str = "7:other:99") -> Wait:
    """Acquire -> BUSY -> Subscribe -> Acquire(holder's token) -> BUSY -> Wait."""
    token = holder.partition(":")[0]
    assert d.command == Acquire("")
    sub = d.send(busy(5_000, holder))
    assert isinstance(sub, Subscribe)
    assert d.send(True) == Acquire(token)
    wait = d.send(busy(pttl_ms, holder))
    assert isinstance(wait, Wait)
    return wait


# --------------------------------------------------------------------------- leading


@pytest.mark.parametrize(
    ("result_ttl_ms", "grace_ms"), [(1_000, 12_000), (60_000, 12_000), (0, 500)]
)
def test_uncontended_lead_with_a_value(result_ttl_ms: int, grace_ms: int) -> None:
    d = Driver(make_spec(result_ttl_ms=result_ttl_ms, grace_ms=grace_ms))
    assert d.command == Acquire("")
    assert d.send(Acquired(LEAD, token=5)) == Lead(5, "5:me:1", 1000.0)  # dated from the acquire
    complete = d.send(Outcome(value={"a": 1}))
    assert isinstance(complete, Complete)
    assert complete.lock_value == "5:me:1" and complete.token == 5
    assert complete.message == b""  # small: the record itself travels inline
    assert complete.record_ttl_ms == max(result_ttl_ms, grace_ms)
    opened = d.codec.open(complete.record, channel=NAMES.channel)
    assert (
        opened.token == 5 and opened.keep_ms == result_ttl_ms
    )  # the record's keep: result_ttl + the run (0 here)
    assert d.send(OWNED) is None
    assert d.outcome == Outcome(value={"a": 1})
    assert d.outcome.fresh_ms == result_ttl_ms
    assert d.result is not None and d.result.role == "leader" and not d.result.waited


def test_lead_with_an_exception_keeps_nothing_fresh() -> None:
    d = Driver()
    d.send(Acquired(LEAD, token=5))
    complete = d.send(Outcome(error=ValueError("no")))
    opened = d.codec.open(complete.record, channel=NAMES.channel)
    assert opened.keep_ms == 0
    d.send(OWNED)
    assert isinstance(d.outcome.error, ValueError)


def test_lead_with_a_large_record_publishes_a_notice() -> None:
    d = Driver(make_spec(inline_max_bytes=100))
    d.send(Acquired(LEAD, token=5))
    complete = d.send(Outcome(value="x" * 1000))
    notice = d.codec.open(complete.message, channel=NAMES.channel)
    assert (notice.kind, notice.token) == (NOTICE_STORED, 5)
    d.send(OWNED)


@pytest.mark.parametrize("state", [0, -1])
def test_lost_lease_still_returns_the_outcome_to_its_callers(state: int) -> None:
    d = Driver()
    d.send(Acquired(LEAD, token=9))
    d.send(Outcome(value=1))
    assert d.send(Completed(state)) is None
    assert d.outcome == Outcome(value=1)
    # Withheld (a newer lease exists): never kept as fresh by this process either.
    assert d.outcome.fresh_ms == (0 if state < 0 else 1000)


def test_publish_denied_still_returns_the_value() -> None:
    d = Driver()
    d.send(Acquired(LEAD, token=9))
    d.send(Outcome(value=1))
    assert d.send(Completed(1, "NOPERM no permission to publish")) is None
    assert d.outcome == Outcome(value=1)


@pytest.mark.parametrize(
    "abort", [KeyboardInterrupt(), SystemExit(3), GeneratorExit()], ids=lambda e: type(e).__name__
)
def test_aborted_leader_publishes_an_abort_notice_and_stores_nothing(abort: BaseException) -> None:
    assert is_abort(abort)
    d = Driver()
    d.send(Acquired(LEAD, token=77))
    outcome = Outcome(error=abort)
    complete = d.send(outcome)
    assert complete.record == b"" and complete.lock_value == "77:me:1"
    notice = d.codec.open(complete.message, channel=NAMES.channel)
    assert (notice.kind, notice.token) == (NOTICE_ABORTED, 77)
    assert d.send(OWNED) is None
    assert d.outcome is outcome


@pytest.mark.parametrize(
    "error",
    [BackendUnavailable("redis is down"), RuntimeError("an ACL, a bug")],
    ids=["unavailable", "other"],
)
def test_a_failing_complete_never_throws_the_value_away(error: Exception) -> None:
    d = Driver()
    d.send(Acquired(LEAD, token=2))
    d.send(Outcome(value="v"))
    assert d.throw(error) is None
    assert d.outcome == Outcome(value="v")
    assert d.outcome.fresh_ms == 0


def test_busy_under_our_own_lease_leads_dated_from_its_grant() -> None:
    clock = FakeClock(1000.0)
    d = Driver(clock=clock)
    lead = d.send(busy(pttl_ms=7_000, holder="12:me:1"))  # 3 s of our 10 s lease are gone
    assert lead == Lead(12, "12:me:1", 997.0)


def test_lead_waits_for_replicas_when_asked() -> None:
    d = Driver(make_spec(min_replicas=1))
    assert d.send(Acquired(LEAD, token=3, replicas=1)) == Lead(3, "3:me:1", 1000.0)


def test_lead_without_enough_replicas_gives_the_lease_back() -> None:
    d = Driver(make_spec(min_replicas=2))
    complete = d.send(Acquired(LEAD, token=3, replicas=1))
    assert isinstance(complete, Complete) and complete.record == b""
    with pytest.raises(BackendUnavailable, match="replicas acknowledged"):
        d.send(OWNED)


# --------------------------------------------------------------------------- following


def test_fresh_result_returns_at_once_as_kept() -> None:
    d = Driver()
    d.send(Acquired(DONE, record=record_for("v", token=4), fresh_ms=700))
    assert d.outcome == Outcome(value="v") and d.outcome.fresh_ms == 700
    assert d.result is not None and d.result.role == "kept"


def test_busy_subscribes_rechecks_waits_and_takes_the_published_record() -> None:
    d = Driver()
    follow_until_wait(d)
    assert d.send(record_for("v", token=7)) is None
    assert d.outcome == Outcome(value="v")
    assert d.result is not None and d.result.role == "remote" and d.result.token == 7


def test_a_newer_leases_outcome_is_taken() -> None:
    d = Driver()
    follow_until_wait(d)
    d.send(record_for("newer", token=8))
    assert d.outcome == Outcome(value="newer")


@pytest.mark.parametrize("secret", [None, SECRET], ids=["unsigned", "signed"])
def test_an_older_leases_outcome_is_never_taken(secret: bytes | None) -> None:
    """The late-leader and the replay defects: a genuine record of an older lease arrives
    while we wait on a newer one."""
    c = codec(secret)
    d = Driver(codec_=c)
    wait = follow_until_wait(d, holder="7:other:99")
    cmd = d.send(record_for("old", token=6, c=c))
    assert isinstance(cmd, Wait) and cmd.timeout <= wait.timeout  # ignored: keep waiting
    cmd = d.send(c.notice(NOTICE_STORED, channel=NAMES.channel, token=6))
    assert isinstance(cmd, Wait)  # an old notice too
    assert d.send(record_for("right", token=7, c=c)) is None
    assert d.outcome == Outcome(value="right")


def test_subscription_unconfirmed_still_rechecks_and_polls_within_the_lease() -> None:
    d = Driver()
    sub = d.send(busy(3_000))
    assert isinstance(sub, Subscribe) and sub.timeout <= 3.1
    assert d.send(False) == Acquire("7")  # no confirmation: re-check all the same
    wait = d.send(busy(2_000))
    assert isinstance(wait, Wait) and wait.timeout == 0.5  # no message may come: poll
    assert d.send(None) == Acquire("7")


def test_confirmed_subscription_waits_for_the_whole_lease() -> None:
    d = Driver()
    wait = follow_until_wait(d, pttl_ms=2_000)
    assert 2.0 <= wait.timeout < 2.2


def test_recheck_reply_waits_for_the_resubscription_then_rechecks() -> None:
    d = Driver()
    wait = follow_until_wait(d)
    sub = d.send(RECHECK)
    assert isinstance(sub, Subscribe) and sub.timeout <= wait.timeout
    assert d.send(False) == Acquire("7")  # confirmed or not, the re-check comes


@pytest.mark.parametrize("kind", [NOTICE_STORED, NOTICE_ABORTED])
def test_a_notice_of_our_lease_rechecks(kind: bytes) -> None:
    d = Driver()
    follow_until_wait(d)
    assert d.send(d.codec.notice(kind, channel=NAMES.channel, token=7)) == Acquire("7")


def test_wait_timeout_then_lead_takes_over() -> None:
    d = Driver()
    follow_until_wait(d)
    assert d.send(None) == Acquire("7")
    assert d.send(Acquired(LEAD, token=8)) == Lead(8, "8:me:1", 1000.0)
    d.send(Outcome(value=1))
    d.send(OWNED)
    assert d.result is not None and d.result.waited


def test_holder_without_a_token_waits_for_nothing_in_particular() -> None:
    d = Driver()
    assert isinstance(d.send(busy(holder="foreign")), Subscribe)
    assert d.send(True) == Acquire("")


def test_deadline_passing_raises_wait_timeout() -> None:
    clock = FakeClock()
    d = Driver(make_spec(deadline=clock.now + 1), clock=clock)
    follow_until_wait(d)
    clock.now += 2
    d.send(None)
    with pytest.raises(WaitTimeout):
        d.send(busy())


def test_deadline_shortens_each_wait() -> None:
    clock = FakeClock()
    d = Driver(make_spec(deadline=clock.now + 0.5), clock=clock)
    wait = follow_until_wait(d)
    assert wait.timeout <= 0.5


# --------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    "junk",
    [b"", b"junk", b"1:2:x:junk", b"9" * 5000 + b":1:1:x", b"N:" + b"9" * 5000, b"\xff" * 64],
    ids=["empty", "junk", "bad-header", "huge-token", "huge-notice", "binary"],
)
@pytest.mark.parametrize("secret", [None, SECRET], ids=["unsigned", "signed"])
def test_junk_on_the_channel_is_ignored_and_counted(junk: bytes, secret: bytes | None) -> None:
    c = codec(secret)
    d = Driver(codec_=c)
    follow_until_wait(d)
    assert isinstance(d.send(junk), Wait)
    assert c.rejected >= 1
    assert d.send(record_for("real", token=7, c=c)) is None
    assert d.outcome == Outcome(value="real")


def test_forged_stored_records_never_make_a_follower_give_up() -> None:
    c = codec(SECRET)
    d = Driver(codec_=c)
    forged = record_for("forged", token=7)  # unsigned: refused under a secret
    cmd = d.command
    for _ in range(20):
        assert isinstance(cmd, Acquire)
        cmd = d.send(Acquired(DONE, record=forged, fresh_ms=500))
        assert isinstance(cmd, Discard)
        cmd = d.send(None)
        if isinstance(cmd, Pause):
            assert 0 < cmd.seconds <= 1.0
            cmd = d.send(None)
    assert c.rejected >= 20
    d.send(Acquired(DONE, record=record_for("real", token=7, c=c), fresh_ms=500))
    assert d.outcome == Outcome(value="real")


def test_backend_unavailable_at_acquire_propagates() -> None:
    d = Driver()
    with pytest.raises(BackendUnavailable):
        d.throw(BackendUnavailable("down"))
