"""Unit tests of dedupe.core.batch: the batch machine, driven by hand with scripted replies.

No Redis server is needed: each test plays the driver of ``run_batch`` (one flight machine
per item, stepped together) or of ``run_batch_call`` (a caller's batch over the process's
table of flights), as tests/test_protocol.py plays the driver of one flight.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_protocol import FakeClock, codec, record_for

from dedupe.core.batch import (
    Background,
    Done,
    Each,
    MakeFlights,
    Many,
    RunLocally,
    WaitAny,
    run_batch,
    run_batch_call,
)
from dedupe.core.call import AwaitFlight
from dedupe.core.inflight import InFlight
from dedupe.core.keys import Names, names_for
from dedupe.core.protocol import (
    BUSY,
    DONE,
    LEAD,
    REFRESH,
    Acquire,
    Acquired,
    Complete,
    Completed,
    Finished,
    FlightSpec,
    Lead,
    Note,
    Subscribe,
    run_flight,
)
from dedupe.core.sealing import Outcome
from dedupe.errors import BackendUnavailable, ProtocolError, WaitTimeout

OWNED = Completed(1)


def names(n: int) -> list[Names]:
    return [names_for("t", f"item-{i}") for i in range(n)]


def spec_for(n: Names, **overrides: Any) -> FlightSpec:
    fields: dict[str, Any] = {
        "names": n,
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


def busy(holder: str = "7:other:99", pttl_ms: int = 5_000) -> Acquired:
    return Acquired(BUSY, pttl_ms=pttl_ms, holder=holder)


def fresh(value: Any, channel: str, token: int = 4) -> Acquired:
    return Acquired(DONE, record=record_for(value, token=token, channel=channel), fresh_ms=700)


class BatchDriver:
    """Plays the driver of run_batch: records every command; Notes (Each) and Done are
    answered at once (Done recorded in ``done``), the rest by the test."""

    def __init__(self, n: int, clock: FakeClock | None = None, **spec: Any) -> None:
        self.names = names(n)
        self.clock = clock or FakeClock()
        self.codec = codec()
        self.flights = [
            run_flight(spec_for(nm, **spec), self.codec, self.clock) for nm in self.names
        ]
        self.gen = run_batch(self.flights, self.clock)
        self.commands: list[Any] = []
        self.done: dict[int, Finished | BaseException] = {}
        self.order: list[int] = []  # the items in the order they were Done
        self.result: list[Finished | BaseException] | None = None
        self.command: Any = self._next(lambda: next(self.gen))

    def _next(self, step: Any) -> Any:
        try:
            cmd = step()
            while type(cmd) is Done or (type(cmd) is Each and type(cmd.cmd) is Note):
                if type(cmd) is Done:
                    assert cmd.at not in self.done, f"item {cmd.at} done twice"
                    self.done[cmd.at] = cmd.result
                    self.order.append(cmd.at)
                cmd = self.gen.send(None)
        except StopIteration as stop:
            self.result = stop.value
            cmd = None
        self.commands.append(cmd)
        return cmd

    def send(self, reply: Any) -> Any:
        assert self.result is None, "the batch already ended"
        self.command = self._next(lambda: self.gen.send(reply))
        return self.command

    def kinds(self) -> list[Any]:
        """Each command, as (kind, indexes) for a Many, else its type."""
        return [(c.kind, [i for i, _ in c.items]) if type(c) is Many else type(c)
                for c in self.commands if c is not None]  # fmt: skip

    def outcome(self, i: int) -> Outcome:
        got = self.done[i]
        assert isinstance(got, Finished), got
        return got.outcome


def many(cmd: Any, kind: type, items: list[int]) -> list[Any]:
    """Assert ``cmd`` is a Many of ``kind`` over ``items``; each item's command."""
    assert type(cmd) is Many, cmd
    assert cmd.kind is kind, cmd
    assert [i for i, _ in cmd.items] == items, cmd
    return [c for _, c in cmd.items]


# --------------------------------------------------------------------------- claims and runs


def test_an_uncontended_batch_claims_runs_and_completes_in_one_round_each() -> None:
    d = BatchDriver(3)
    assert many(d.command, Acquire, [0, 1, 2]) == [Acquire("")] * 3  # every claim at once
    leads = many(d.send([Acquired(LEAD, token=t) for t in (5, 6, 7)]), Lead, [0, 1, 2])
    assert [lead.token for lead in leads] == [5, 6, 7]  # one run, each item its own lease
    completes = many(d.send([Outcome(value=v) for v in "abc"]), Complete, [0, 1, 2])
    assert [c.token for c in completes] == [5, 6, 7]
    assert d.send([OWNED] * 3) is None
    assert [d.outcome(i).value for i in range(3)] == ["a", "b", "c"]
    assert d.kinds() == [(Acquire, [0, 1, 2]), (Lead, [0, 1, 2]), (Complete, [0, 1, 2])]
    assert d.result is not None and [r.role for r in d.result] == ["leader"] * 3  # type: ignore[union-attr]


def test_a_batch_completes_what_it_leads_before_it_waits_on_anyone() -> None:
    """No deadlock between batches: item 1's leader may be a batch waiting on our item 0.
    We must store and publish item 0 before we subscribe to or wait on item 1."""
    d = BatchDriver(3)
    d.send([Acquired(LEAD, token=5), busy("7:other:99"), fresh("kept", channel=d.names[2].channel)])
    assert d.done.keys() == {2} and d.outcome(2).value == "kept"  # a fresh value: done at once
    many(d.command, Lead, [0])  # the run of what we lead comes first
    many(d.send([Outcome(value="mine")]), Complete, [0])  # then its complete...
    many(d.send([OWNED]), Subscribe, [1])  # ...and only then the subscription to item 1
    assert d.order == [2, 0]  # item 0 ended (its joiners released) before item 1's wait
    assert many(d.send([True]), Acquire, [1]) == [Acquire("7")]  # the re-check after subscribing
    wait = d.send([busy("7:other:99")])
    assert type(wait) is WaitAny and [i for i, _, _ in wait.items] == [1]
    assert d.send({1: record_for("theirs", token=7, channel=d.names[1].channel)}) is None
    assert d.outcome(1).value == "theirs"
    assert d.result is not None and [type(r) for r in d.result] == [Finished] * 3


def test_a_batch_with_every_item_fresh_never_leads() -> None:
    d = BatchDriver(3)
    assert d.send([fresh(i, channel=d.names[i].channel) for i in range(3)]) is None
    assert [d.outcome(i).value for i in range(3)] == [0, 1, 2]
    assert d.kinds() == [(Acquire, [0, 1, 2])]


def test_a_batch_with_every_item_followed_never_leads() -> None:
    d = BatchDriver(2)
    many(d.send([busy("7:a:1"), busy("8:b:1")]), Subscribe, [0, 1])  # subscribed together
    many(d.send([True, True]), Acquire, [0, 1])
    wait = d.send([busy("7:a:1"), busy("8:b:1")])
    assert type(wait) is WaitAny and sorted(i for i, _, _ in wait.items) == [0, 1]
    wait = d.send({1: record_for("b", token=8, channel=d.names[1].channel)})
    assert d.outcome(1).value == "b" and 0 not in d.done  # woken one at a time
    assert type(wait) is WaitAny and [i for i, _, _ in wait.items] == [0]
    assert d.send({0: record_for("a", token=7, channel=d.names[0].channel)}) is None
    assert Lead not in [k[0] for k in d.kinds() if type(k) is tuple]


def test_items_taken_over_from_a_dead_leader_run_again_together() -> None:
    """Both followed items' leader died: each wait ends, each re-check leads, and the
    function runs once more, with both items."""
    clock = FakeClock()
    d = BatchDriver(2, clock=clock)
    d.send([busy("7:dead:1", pttl_ms=1_000), busy("8:dead:1", pttl_ms=1_000)])
    d.send([True, True])
    wait = d.send([busy("7:dead:1", pttl_ms=1_000), busy("8:dead:1", pttl_ms=1_000)])
    assert type(wait) is WaitAny
    clock.now = max(until for _, until, _ in wait.items) + 0.01  # the leases ran out
    retry = d.send({})
    assert many(retry, Acquire, [0, 1]) == [Acquire("7"), Acquire("8")]
    leads = many(d.send([Acquired(LEAD, token=9), Acquired(LEAD, token=10)]), Lead, [0, 1])
    assert [lead.token for lead in leads] == [9, 10]
    many(d.send([Outcome(value=0), Outcome(value=1)]), Complete, [0, 1])
    assert d.send([OWNED, OWNED]) is None
    assert [d.outcome(i).value for i in range(2)] == [0, 1]
    assert d.result is not None and all(r.waited for r in d.result)  # type: ignore[union-attr]


def test_an_item_taken_over_while_another_waits_runs_and_completes_before_the_next_wait() -> None:
    """The machine never waits while an item has I/O to do: an item whose leader died
    leads, runs and completes while another item is still waiting, and only then does the
    batch wait again (else its waiters could wait on it while it waits on them)."""
    clock = FakeClock()
    d = BatchDriver(2, clock=clock)
    d.send([busy("7:a:1", pttl_ms=5_000), busy("8:dead:1", pttl_ms=1_000)])
    d.send([True, True])
    wait = d.send([busy("7:a:1", pttl_ms=5_000), busy("8:dead:1", pttl_ms=1_000)])
    until = {i: u for i, u, _ in wait.items}
    clock.now = until[1] + 0.01  # item 1's leader is gone; item 0's still holds
    assert many(d.send({}), Acquire, [1]) == [Acquire("8")]
    many(d.send([Acquired(LEAD, token=9)]), Lead, [1])
    many(d.send([Outcome(value="taken")]), Complete, [1])
    wait = d.send([OWNED])
    assert d.outcome(1).value == "taken"
    assert type(wait) is WaitAny and [i for i, _, _ in wait.items] == [0]
    assert d.send({0: record_for("a", token=7, channel=d.names[0].channel)}) is None


# --------------------------------------------------------------------------- failures per item


def test_a_failed_claim_fails_its_item_alone() -> None:
    d = BatchDriver(2)
    many(d.send([Acquired(LEAD, token=5), BackendUnavailable("that node is down")]), Lead, [0])
    assert isinstance(d.done[1], BackendUnavailable)
    many(d.send([Outcome(value="v")]), Complete, [0])
    assert d.send([OWNED]) is None
    assert d.outcome(0).value == "v"


def test_a_failed_complete_keeps_the_items_value() -> None:
    d = BatchDriver(2)
    d.send([Acquired(LEAD, token=5), Acquired(LEAD, token=6)])
    d.send([Outcome(value="a"), Outcome(value="b")])
    assert d.send([OWNED, BackendUnavailable("lost the reply")]) is None
    assert d.outcome(0).value == "a" and d.outcome(1).value == "b"
    assert d.outcome(1).fresh_ms == 0  # not known to be stored: never kept as fresh here


def test_an_items_deadline_ends_that_item_alone() -> None:
    clock = FakeClock()
    d = BatchDriver(2, clock=clock, deadline=clock.now + 1)
    d.send([busy("7:a:1"), busy("8:b:1")])
    d.send([True, True])
    d.send([busy("7:a:1"), busy("8:b:1")])
    clock.now += 0.5
    d.send({1: record_for("b", token=8, channel=d.names[1].channel)})
    clock.now += 1  # past the deadline: item 0's wait ends, its re-check finds it still busy
    many(d.send({}), Acquire, [0])
    assert d.send([busy("7:a:1")]) is None
    assert isinstance(d.done[0], WaitTimeout) and d.outcome(1).value == "b"


def test_a_lead_outcome_per_item_goes_to_its_own_complete() -> None:
    """The driver turns the one run's mapping into an outcome per item: one item's error
    is recorded for that item alone."""
    d = BatchDriver(2)
    d.send([Acquired(LEAD, token=5), Acquired(LEAD, token=6)])
    completes = many(d.send([Outcome(value="a"), Outcome(error=ValueError("bad"))]), Complete,
                     [0, 1])  # fmt: skip
    opened = [d.codec.open(c.record, channel=d.names[i].channel) for i, c in enumerate(completes)]
    assert opened[0].keep_ms == 1000 and opened[1].keep_ms == 0  # an error is never kept fresh
    d.send([OWNED, OWNED])
    assert d.outcome(0).value == "a" and isinstance(d.outcome(1).error, ValueError)


@pytest.mark.parametrize("reply", [None, [], [None, None, None]], ids=["none", "short", "long"])
def test_a_malformed_reply_to_many_is_a_protocol_error(reply: Any) -> None:
    d = BatchDriver(2)
    with pytest.raises(ProtocolError):
        d.send(reply)
    assert all(f.gi_frame is None for f in d.flights)  # every item's machine was closed


def test_a_stale_value_is_served_and_its_refresh_handed_to_the_background() -> None:
    """stale_while_revalidate: the item ends at once (Done, going on) and its flight goes to
    a background batch; the other items go on here."""
    d = BatchDriver(2, stale_ms=60_000)
    stale = Acquired(REFRESH, record=record_for("old", token=3, channel=d.names[0].channel),
                     fresh_ms=-10, token=9)  # fmt: skip  # REFRESH: stale, and we refresh it
    cmds: list[Any] = []
    cmd = d.gen.send([stale, Acquired(LEAD, token=6)])
    while type(cmd) is not Many:
        cmds.append(cmd)
        cmd = d.gen.send(None)
    done = [c for c in cmds if type(c) is Done]
    assert [(c.at, c.going_on) for c in done] == [(0, True)]
    assert done[0].result.outcome.value == "old"  # type: ignore[union-attr]
    background = [c for c in cmds if type(c) is Background]
    assert [[i for i, _ in b.flights] for b in background] == [[0]]
    many(cmd, Lead, [1])  # the other item runs in this batch


# --------------------------------------------------------------------------- a caller's batch


class Env:
    local_copies = None

    def skip_redis(self) -> bool:
        return False

    def fall_back(self, exc: Exception) -> bool:
        return False

    def answered(self) -> None:
        pass


def test_a_callers_batch_joins_the_processs_flights_with_no_claim_of_its_own() -> None:
    """Local joins: an item already in flight in this process (a single-key call's or
    another batch's) gets no flight machine, hence no Redis I/O; the batch waits on it."""
    table = InFlight()
    ns = names(3)
    running, created = table.join(ns[1].channel)  # a single-key call of item 1 is in flight
    assert created
    clock = FakeClock()
    call = run_batch_call(Env(), table, ns, None, clock)
    make = next(call)
    assert type(make) is MakeFlights and [i for i, _ in make.items] == [0, 2]
    c = codec()
    flights = [run_flight(spec_for(ns[i]), c, clock) for i, _ in make.items]
    cmd = call.send(flights)
    assert many(cmd, Acquire, [0, 1]) == [Acquire("")] * 2  # run_batch's indexes: items 0, 2
    cmd = call.send([fresh("a", channel=ns[0].channel), fresh("c", channel=ns[2].channel)])
    while type(cmd) is Done:
        cmd = call.send(None)
    assert type(cmd) is AwaitFlight and cmd.entry is running
    table.finish(ns[1].channel, running, Outcome(value="b"))
    with pytest.raises(StopIteration) as stop:
        call.send(True)
    assert [o.value for o in stop.value.value] == ["a", "b", "c"]


def test_a_callers_batch_with_every_item_joined_makes_no_flights() -> None:
    table = InFlight()
    ns = names(2)
    entries = [table.join(n.channel)[0] for n in ns]
    call = run_batch_call(Env(), table, ns, None, FakeClock())
    for n, entry in zip(ns, entries, strict=True):
        cmd = next(call) if n is ns[0] else call.send(True)
        assert type(cmd) is AwaitFlight and cmd.entry is entry
        table.finish(n.channel, entry, Outcome(value=n.job_id))
    with pytest.raises(StopIteration) as stop:
        call.send(True)
    assert [o.value for o in stop.value.value] == ["item-0", "item-1"]


class Down(Env):
    """on_backend_error="local": Redis failed, or an outage says not to try it yet."""

    def __init__(self, skip: bool) -> None:
        self.skip, self.fell_back = skip, 0

    def skip_redis(self) -> bool:
        return self.skip

    def fall_back(self, exc: Exception) -> bool:
        self.fell_back += 1
        return True


@pytest.mark.parametrize("skip", [False, True], ids=["fails", "outage"])
def test_items_redis_could_not_serve_run_here_under_local(skip: bool) -> None:
    """Under on_backend_error="local", an item whose claim met BackendUnavailable (or every
    item, during an outage) runs in this process, in one run for the batch, its entry
    resolved only then; an item Redis served keeps its outcome."""
    table = InFlight()
    ns = names(2)
    env = Down(skip)
    clock = FakeClock()
    call = run_batch_call(env, table, ns, None, clock)
    make = next(call)
    c = codec()
    cmd = call.send([run_flight(spec_for(ns[i]), c, clock) for i, _ in make.items])
    if not skip:
        many(cmd, Acquire, [0, 1])
        cmd = call.send([fresh("a", channel=ns[0].channel), BackendUnavailable("down")])
        while type(cmd) is Done or type(cmd) is Each:
            cmd = call.send(None)
        assert env.fell_back == 1
    assert type(cmd) is RunLocally and cmd.items == ((1,) if not skip else (0, 1))
    joined, created = table.join(ns[1].channel)
    assert not created  # still open: a caller who joins now waits for the local run
    with pytest.raises(StopIteration) as stop:
        call.send([Outcome(value=f"here{k}") for k in cmd.items])
    got = [o.value for o in stop.value.value]
    assert got == (["a", "here1"] if not skip else ["here0", "here1"])
    assert joined.result.get() == Outcome(value="here1")
