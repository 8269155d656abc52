"""The deterministic simulator (tests/sim): dedupe's real machines and Lua scripts in a world.

A bounded share of what ``make simulate`` runs: 1,200 seeded schedules with every
invariant checked after every step. Then the simulator itself: the Lua conversion rules of
its Redis, determinism and replay, and that it does catch defects (planted ones, since the
real ones are fixed) and shrinks them to a few steps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from tests.sim.mutants import BEFORE_READ_FIRST, MUTANT_PARAMS, MUTANTS, planted
from tests.sim.redis import ScriptError, SimRedis
from tests.sim.schedule import Step, explore, run, shrink
from tests.sim.world import KINDS, Api, Params

BOUNDED_SCHEDULES = 1200
CACHE_SCHEDULES = 400
BATCH_SCHEDULES = 500
STEPS = 60


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    # The protocol logs every lost lease and withheld outcome; the sim provokes thousands.
    logger = logging.getLogger("dedupe")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def api() -> Api:
    return Api()


def _report(out: Any) -> str:
    assert out.violation is not None
    return f"seed {out.seed}: {out.violation}; replay with `make simulate SEED={out.seed}`"


@pytest.mark.timeout(120)
def test_bounded_run_finds_nothing(api: Api) -> None:
    params = Params()
    steps = 0
    for seed in range(1, BOUNDED_SCHEDULES + 1):
        out = explore(seed, STEPS, params, api)
        steps += len(out.steps)
        if out.violation is not None:
            small = shrink(out, params, api, budget=100)
            trace = run(small.seed, small.steps, params, api, trace=True)
            pytest.fail(_report(out) + "\n" + "\n".join(trace.lines))
    assert steps == BOUNDED_SCHEDULES * STEPS  # every schedule ran to its end


@pytest.mark.timeout(120)
def test_bounded_cache_fill_run_finds_nothing(api: Api) -> None:
    """The same with cache-fill flights (issue 20): stale values served at once and refreshed
    in the background, served in place of failed runs, backoffs; the invariants of stale
    values (one a lease stored, never older than one stored before the caller started) and
    of refreshes (one per key at a time) besides every other."""
    params = Params(cache=True)
    for seed in range(1, CACHE_SCHEDULES + 1):
        out = explore(seed, STEPS, params, api)
        if out.violation is not None:
            small = shrink(out, params, api, budget=100)
            trace = run(small.seed, small.steps, params, api, trace=True)
            pytest.fail(_report(out) + " (--cache)\n" + "\n".join(trace.lines))


@pytest.mark.timeout(120)
def test_bounded_batch_run_finds_nothing(api: Api) -> None:
    """The same with batch calls (issue 22) beside the single-key ones: the batch machine
    (run_batch_call, sync) over 2-3 of three keys, each item's scripts a request of its own;
    every invariant holds for each item as for a single key, and no batch waits on an item
    led by a batch that waits on it (batch-deadlock)."""
    params = Params(batches=True)
    batches = 0
    for seed in range(1, BATCH_SCHEDULES + 1):
        out = explore(seed, STEPS, params, api)
        batches += sum(1 for step in out.steps if step[0] == "batch")
        if out.violation is not None:
            small = shrink(out, params, api, budget=100)
            trace = run(small.seed, small.steps, params, api, trace=True)
            pytest.fail(_report(out) + " (--batches)\n" + "\n".join(trace.lines))
    assert batches > BATCH_SCHEDULES  # batches were called, beside the single-key calls


def test_two_batches_that_lead_each_others_followed_items_both_finish(api: Api) -> None:
    """p0's batch leads k0 and follows k1; p1's leads k1 and follows k0 (their acquires cross).
    Each completes what it led before it waits: both end with the other's value."""
    steps: list[Step] = [
        ("batch", 0, (0, 1), 0), ("batch", 1, (1, 0), 0),
        ("deliver", 0), ("deliver", 1), ("deliver", 0), ("deliver", 0),  # p0: k0, p1: k1
        ("deliver", 0), ("deliver", 0), ("deliver", 0), ("deliver", 0),  # the replies
        ("finish", 0, "ok"), ("finish", 0, "ok"),
    ]  # fmt: skip
    # Recorded before single-key flights read first (issue 23): replayed without the read.
    out = run(1, steps, Params(batches=True, reads=False), api, trace=True)
    assert out.violation is None, "\n".join(out.lines)
    text = "\n".join(out.lines)
    assert "batch #1 (p0 k0,k1) runs its function for k0:" in text, text
    assert "runs its function for k1:" in text, text
    ends = [line for line in out.lines if "batch sync k" in line and " ends: value " in line]
    assert len(ends) == 4, text  # each batch's two items, with a value


@pytest.mark.parametrize(
    ("seed", "steps"),
    [
        # p2's command slots are busy: k2's acquire is written and granted, k1's waits for a
        # slot until the wait_timeout (3 s).
        (2537, [("clog", 2), ("call", 2, 0, 0, "sync"), ("batch", 2, (1, 2), 3000),
                ("send", 2, 2), ("deliver", 0), ("deliver", 0), ("next",)]),
        # k1's slot migrates: k2's acquire is granted, k1's is redirected (ASK) and its reply
        # never comes (1.5 s, then the wire's retry within the bound).
        (2969, [("mig", "open"), ("batch", 0, (2, 1), 0, "sync"), ("deliver", 0),
                ("deliver", 0), ("batch", 2, (0, 1), 0, "async"), ("next",), ("deliver", 0),
                ("deliver", 0), ("advance", 1750)]),
        # k1's grant is answered too late (the client retried): the retry finds our own
        # lease (BUSY, ours), while k0's acquire waits for a slot (6 s).
        (7226, [("clog", 1), ("batch", 1, (0, 1), 0), ("send", 1, 1), ("deliver", 0),
                ("next",), ("deliver", 0), ("deliver", 0), ("deliver", 0), ("next",)]),
    ],
)  # fmt: skip
def test_a_batch_lease_granted_is_renewed_while_another_items_acquire_waits(
    api: Api, seed: int, steps: list[Step]
) -> None:
    """Found by ``python -m tests.sim --batches`` (shrunk): a batch started the leases its
    acquires were granted only once every item's acquire was answered (at Lead); while a
    sibling's acquire waited for a slot or an answer, a granted lock (3 s) ran out unrenewed,
    and another process could lead that key while this batch ran the function for it. Now
    each item's lease is renewed from its grant (``DriverBase.renew_from_grant``).
    (Through a Cluster, or a client passed in, the drivers run a batch's scripts one after
    another, each in a command slot of its own: queue_timeout 20 s, a bound of 7 s each,
    against a lock_ttl of 10 s.)"""
    out = run(seed, steps, Params(batches=True, reads=False), api, trace=True)  # as recorded
    assert out.violation is None, "\n".join(out.lines)


def test_a_stale_value_is_served_at_once_and_refreshed_in_the_background(api: Api) -> None:
    """A cache-fill flight by hand: p0 stores a value; once it is stale, p1's caller is served
    it at once, and p1 refreshes it in the background under a lease of its own."""
    steps: list[Step] = [
        ("call", 0, 0, 0), ("deliver", 0), ("deliver", 0), ("finish", 0, "ok"),
        ("deliver", 0), ("deliver", 0), ("advance", 1500),  # stored; then stale
        ("call", 1, 0, 0), ("deliver", 0), ("deliver", 0),  # served stale; the refresh leads
    ]  # fmt: skip
    out = run(1, steps, Params(cache=True, reads=False), api, trace=True)  # as recorded
    assert out.violation is None, "\n".join(out.lines)
    text = "\n".join(out.lines)
    assert "p1 serves k0 now and refreshes it in the background" in text, text
    assert "(p1 sync k0): k0@1700000000000000#2 was served stale" in text, text
    assert text.count("leads k0 with lease") == 2, text  # the first run, and the refresh


# --- the read before any flight (issue 23), and asyncio's parked followers -------------------

_STORED: list[Step] = [
    ("call", 0, 0, 0, "sync"), ("deliver", 0), ("deliver", 0), ("deliver", 0), ("deliver", 0),
    ("finish", 0, "ok"), ("deliver", 0), ("deliver", 0),  # p0 leads k0 and stores its value
]  # fmt: skip


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_read_before_any_flight_serves_its_joiners_the_kept_value(api: Api, mode: str) -> None:
    """p1's caller reads k0's kept value before any flight (the drivers' first=True); two
    more callers of p1 come while the read is out and join it (one of them would read first
    too): the hit ends the process's flight of the key with the value for all three, and no
    flight starts."""
    steps: list[Step] = [
        *_STORED, ("call", 1, 0, 0, mode, "read"), ("call", 1, 0, 0, mode),
        ("call", 1, 0, 0, mode, "read"), ("deliver", 0), ("deliver", 0),
    ]  # fmt: skip
    out = run(1, steps, Params(), api, trace=True)
    text = "\n".join(out.lines)
    assert out.violation is None, text
    assert f"caller #3 (p1 {mode} k0): its read before any flight hit, for 3 caller(s)" in text
    ends = [line for line in out.lines if f"(p1 {mode} k0) ends: value k0@" in line]
    assert len(ends) == 3, text
    assert text.count("leads k0") == 1 and text.count("ACQUIRE k0 for p1") == 0, text


def test_a_refused_read_before_any_flight_goes_on_to_the_acquire_script(api: Api) -> None:
    """The read is refused (an error reply: an ACL without MGET): the call goes on with the
    entry it created, its flight starting at the acquire script (no second read), and the
    caller who joined meanwhile gets the value it leads to."""
    steps: list[Step] = [
        ("call", 0, 0, 0, "sync", "read"), ("call", 0, 0, 0, "sync"), ("refuse", 0),
        ("deliver", 0), ("deliver", 0), ("finish", 0, "ok"), ("deliver", 0), ("deliver", 0),
    ]  # fmt: skip
    out = run(1, steps, Params(), api, trace=True)
    text = "\n".join(out.lines)
    assert out.violation is None, text
    assert "redis refused READ k0 for p0" in text and "redis ran READ" not in text, text
    assert "redis ran ACQUIRE k0 for p0" in text, text
    assert len([line for line in out.lines if "(p0 sync k0) ends: value k0@" in line]) == 2


def test_a_forged_current_record_is_dropped_by_a_read_before_any_flight(api: Api) -> None:
    """A forger who reads the token counter writes an unsigned record of the lease it names,
    fresh by the scripts' rule: the read finds it current, its seal refuses it, the driver
    drops it (Discard) and the call goes on to the acquire script, following p0's run."""
    steps: list[Step] = [
        ("call", 0, 0, 0, "sync"), ("deliver", 0), ("deliver", 0), ("deliver", 0),
        ("deliver", 0), ("forge", 4, 0), ("call", 1, 0, 0, "sync", "read"),
        *[("deliver", 0)] * 8, ("finish", 0, "ok"),
    ]  # fmt: skip
    out = run(1, steps, Params(), api, trace=True)
    text = "\n".join(out.lines)
    assert out.violation is None, text
    assert "forged the result key of k0 as a current record of lease" in text, text
    assert "redis ran DISCARD k0 for p1 -> 1" in text, text
    assert "caller #3 (p1 sync k0) ends: value k0@1700000000000000#2" in text, text


def test_an_asyncio_read_cut_at_wait_timeout_lets_its_joiner_start_over(api: Api) -> None:
    """An asyncio read before any flight is cut at the caller's wait_timeout (aio._bounded:
    WaitTimeout); the caller who joined it (no wait_timeout) starts over, leads, and gets
    its own flight's value."""
    steps: list[Step] = [
        ("call", 1, 0, 1000, "async", "read"), ("call", 1, 0, 0, "async"), ("advance", 1100),
        ("deliver", 0), ("deliver", 0), ("deliver", 0), ("deliver", 0), ("deliver", 0),
        ("deliver", 0), ("finish", 0, "ok"),
    ]  # fmt: skip
    out = run(1, steps, Params(), api, trace=True)
    text = "\n".join(out.lines)
    assert out.violation is None, text
    assert "caller #1 (p1 async k0) ends: WaitTimeout" in text, text
    assert "caller #2 (p1 async k0) ends: value k0@" in text, text


# p0 leads k0 (its job runs); two asyncio callers of p1 follow: their flight task parks at its
# Wait for k0's message.
_PARKED: list[Step] = [
    ("call", 0, 0, 0, "sync"), ("deliver", 0), ("deliver", 0), ("deliver", 0), ("deliver", 0),
    ("call", 1, 0, 0, "async"), ("call", 1, 0, 0, "async"), *[("deliver", 0)] * 8,
]  # fmt: skip


def test_a_cancelled_parked_caller_stops_alone(api: Api) -> None:
    """Cancelling one of two callers of a parked asyncio flight stops that caller alone: the
    flight waits on (parked) and the other gets the leader's value. Cancelling the last one
    cancels the parked flight (it only follows, and nobody awaits it)."""
    out = run(1, [*_PARKED, ("cancel", 0), ("finish", 0, "ok")], Params(), api, trace=True)
    text = "\n".join(out.lines)
    assert out.violation is None, text
    assert "p1's flight on k0 parks at its Wait (no task)" in text, text
    assert "caller #3 (p1 async k0) ends: cancelled" in text, text
    assert "cancels its parked flight" not in text, text
    assert "caller #4 (p1 async k0) ends: value k0@" in text, text
    out = run(1, [*_PARKED, ("cancel", 0), ("cancel", 0)], Params(), api, trace=True)
    text = "\n".join(out.lines)
    assert out.violation is None, text
    assert "p1 cancels its parked flight on k0" in text, text
    assert text.count("(p1 async k0) ends: cancelled") == 2, text


def test_a_parked_follower_takes_over_when_the_lease_ends(api: Api) -> None:
    """The leader dies while p1's flight is parked: no message comes, the Wait ends at the
    lease's end (its timer), and p1's flight takes over, leads and serves both its callers."""
    steps: list[Step] = [*_PARKED, ("kill", 0), ("next",), ("next",), ("deliver", 0),
                         ("deliver", 0), ("finish", 0, "ok")]  # fmt: skip
    out = run(1, steps, Params(), api, trace=True)
    text = "\n".join(out.lines)
    assert out.violation is None, text
    assert "p1's flight on k0 parks at its Wait (no task)" in text, text
    assert "p1 leads k0 with lease" in text, text
    assert len([line for line in out.lines if "(p1 async k0) ends: value k0@" in line]) == 2


# --- the simulated Redis ----------------------------------------------------------------------


def _redis() -> tuple[SimRedis, list[int], list[tuple[bytes, bytes]]]:
    now = [5_000_000]
    published: list[tuple[bytes, bytes]] = []

    def publish(channel: bytes, message: bytes) -> int:
        published.append((channel, message))
        return 1

    r = SimRedis(lambda: now[0], publish)
    return r, now, published


def _eval(r: SimRedis, lua: str, keys: list[bytes] = [], args: list[bytes] = []) -> Any:  # noqa: B006
    return r.evalsha(r.load(lua), keys, args)


def test_lua_replies_follow_redis_conversion() -> None:
    r, _, _ = _redis()
    assert _eval(r, "return 2.7") == 2  # a Lua number is truncated to an integer reply
    assert _eval(r, "return {1, 'a', nil, 3}") == [1, b"a"]  # an array ends at its first nil
    assert _eval(r, "return false") is None
    assert _eval(r, "return true") == 1
    assert _eval(r, "return redis.call('GET', 'missing')") is None
    assert _eval(r, "return type(redis.call('GET', 'missing'))") == b"boolean"  # nil is false
    assert _eval(r, "return redis.call('SET', 'k', 'v')") == b"OK"
    assert _eval(r, "return ARGV[1] .. KEYS[1]", [b"k"], [b"7"]) == b"7k"  # arguments are strings
    with pytest.raises(ScriptError, match="boom"):
        _eval(r, "return {err = 'boom'}")
    with pytest.raises(ScriptError, match="not an integer"):
        _eval(r, "redis.call('SET', 'k', 'x'); return redis.call('INCR', 'k')")
    # pcall hands the error back as a table; call raises it.
    assert _eval(r, "local e = redis.pcall('INCR', 'k'); return e.err") == (
        b"ERR value is not an integer or out of range"
    )


def test_keys_expire_on_the_store_clock_and_restart_loses_them() -> None:
    r, now, published = _redis()
    assert _eval(r, "return redis.call('SET', 'k', 'v', 'NX', 'PX', 100)") == b"OK"
    assert _eval(r, "return redis.call('SET', 'k', 'w', 'NX', 'PX', 100)") is None
    assert r.pttl(b"k") == 100
    assert _eval(r, "redis.call('SET', 'p', 'v'); return redis.call('PTTL', 'p')") == -1
    assert _eval(r, "return redis.call('PTTL', 'nothing')") == -2
    now[0] += 99_000
    assert r.get(b"k") == b"v"
    now[0] += 1_000
    assert r.get(b"k") is None
    assert _eval(r, "return redis.call('PUBLISH', 'ch', 'hi')") == 1
    assert published == [(b"ch", b"hi")]
    before = _eval(r, "local t = redis.call('TIME'); return t[1] * 1000000 + t[2]")
    r.restart(jump_ms=5)
    assert r.live_keys() == []
    after = _eval(r, "local t = redis.call('TIME'); return t[1] * 1000000 + t[2]")
    assert after - before == 5_000


def test_the_real_scripts_are_loaded(api: Api) -> None:
    names = {s.lua for s in api.scripts}
    import dedupe.core.scripts as scripts

    assert {scripts.ACQUIRE, scripts.COMPLETE, scripts.RENEW} <= names


# --- determinism, replay, and that the simulator can fail -------------------------------------


def test_a_seed_replays_to_the_same_trace(api: Api) -> None:
    params = Params()
    first = explore(77, STEPS, params, api)
    again = explore(77, STEPS, params, api)
    assert first.steps == again.steps
    a = run(77, first.steps, params, api, trace=True).lines
    b = run(77, first.steps, params, api, trace=True).lines
    assert a == b and len(a) > STEPS


def test_followers_get_the_leaders_value(api: Api) -> None:
    """A plain flight: one leader, a follower in another process, a joiner in the same one."""
    steps: list[Step] = [("call", 0, 0, 0), ("deliver", 0), ("deliver", 0), ("call", 1, 0, 0)]
    steps += [("call", 0, 0, 0)] + [("deliver", 0)] * 6 + [("finish", 0, "ok")]
    out = run(1, steps, Params(), api, trace=True)
    assert out.violation is None, "\n".join(out.lines)
    ends = [line for line in out.lines if " ends: value " in line]
    assert len(ends) == 3, "\n".join(out.lines)
    assert len({line.rsplit(" ", 1)[1] for line in ends}) == 1  # one value, from one lease


def _first_failure(api: Api, params: Params, kind: str, limit: int = 3000) -> Any:
    for seed in range(1, limit + 1):
        out = explore(seed, STEPS, params, api, KINDS - {kind})
        if out.violation is not None:
            assert out.violation.kind == kind, _report(out)
            return out
    pytest.fail(f"no {kind} in {limit} schedules")


@pytest.mark.timeout(120)
def test_finds_a_leader_that_does_not_know_its_lease_is_gone(api: Api) -> None:
    """Planted defect: the renewer learns of a loss only from a failed renewal (the old one).
    A paused or cut-off leader then runs on while a new lease is granted elsewhere."""
    blind = _blind_renewer(api)
    params = Params(**BEFORE_READ_FIRST)  # drawn as when it was written (see MUTANT_PARAMS)
    out = _first_failure(blind, params, "unaware-leader")
    others = KINDS - {"unaware-leader"}
    small = shrink(out, params, blind, budget=100, ignored=others)
    assert len(small.steps) <= 8, small.steps
    replayed = run(small.seed, small.steps, params, blind, ignored=others)
    assert replayed.violation is not None and replayed.violation.kind == "unaware-leader"


def _blind_renewer(api: Api) -> Api:
    blind = Api()
    blind.blind_renewer = True
    return blind


class _ForgetfulCodec:
    """Planted defect: every outcome claims to be of the newest lease (no floor holds)."""

    def __init__(self, codec: Any) -> None:
        self._codec = codec

    def __getattr__(self, name: str) -> Any:
        return getattr(self._codec, name)

    def open(self, data: bytes, *, channel: str, **kw: Any) -> Any:
        opened = self._codec.open(data, channel=channel, **kw)
        return opened._replace(token=10**17)


@pytest.mark.timeout(120)
def test_finds_an_old_outcome_returned_to_a_newer_flight(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tests.sim.world as world

    real = world.World.__init__

    def forgetful(self: Any, *args: Any, **kwargs: Any) -> None:
        real(self, *args, **kwargs)
        self.codec = _ForgetfulCodec(self.codec)

    monkeypatch.setattr(world.World, "__init__", forgetful)
    wanted = {"older-outcome", "stale-outcome"}
    others = KINDS - wanted  # real defects elsewhere must not mask the planted one
    out = None
    for seed in range(1, 3001):
        out = explore(seed, STEPS, Params(), api, others)
        if out.violation is not None:
            break
    assert out is not None and out.violation is not None, "no failure in 3000 schedules"
    assert out.violation.kind in wanted, _report(out)
    small = shrink(out, Params(), api, budget=100, ignored=others)
    assert len(small.steps) <= 25, small.steps
    replayed = run(small.seed, small.steps, Params(), api, ignored=others)
    assert replayed.violation is not None and replayed.violation.kind == out.violation.kind


def test_a_leader_that_finds_its_own_lease_dates_it_from_when_it_began(api: Api) -> None:
    """Found by the long run (seed 255262), rewritten by hand: p1's re-check acquire is sent
    twice (a client retry); the first copy finds p0's dead lease busy, and its reply holds p1
    waiting; the second copy, after that lease expired, grants p1 a lease whose reply is
    discarded. p1's next acquire finds its own lease with only ~2 s of 3 left. If p1 dates
    the lease from that acquire, it believes in it for ~1 s longer than Redis keeps it, and
    p2 is granted a new lease while p1 still runs, unaware."""
    steps: list[Step] = [
        ("call", 0, 0, 0), ("deliver", 0), ("deliver", 0), ("kill", 0),  # a dead leader's lease
        ("call", 1, 0, 0), ("deliver", 0), ("deliver", 0), ("deliver", 0), ("deliver", 0),
        ("dup", 0), ("deliver", 0),  # the re-check, sent twice: the first copy finds it busy
        ("advance", 1000), ("deliver", 1),  # its reply, late: p1 waits out the dead lease
        ("advance", 2100), ("deliver", 0),  # the second copy grants p1 a lease; reply lost
        ("next",), ("deliver", 0), ("deliver", 0), ("deliver", 0),  # p1 finds its own lease
        ("pause", 1, 3000), ("advance", 2100),  # p1 leads; nothing renews it
        ("call", 2, 0, 0), ("deliver", 0),  # p2 acquires once Redis dropped p1's lease
    ]  # fmt: skip
    out = run(1, steps, Params(), api, trace=True)
    assert out.violation is None, "\n".join(out.lines)


def test_a_call_that_fails_after_its_acquire_was_written_gives_back_its_lease(api: Api) -> None:
    """Found by the long run (seed 17185, shrunk to these steps): during a slot migration
    p1's acquire is answered ASK, then TRYAGAIN until the client's patience runs out, and
    the call fails on that error reply; but a copy of that acquire sent earlier (a retry, a
    re-send) is granted after the slot moved. The driver took the error reply as "not
    granted" and gave nothing back, so the lock stayed held for a flight that had ended."""
    steps: list[Step] = [
        ("mig", "open"), ("call", 1, 1, 0, "sync"), ("deliver", 0), ("deliver", 0),
        ("deliver", 0), ("deliver", 0), ("next",), ("deliver", 0), ("pause", 1, 5000),
        ("deliver", 0), ("call", 1, 0, 0, "sync"), ("next",), ("call", 1, 1, 3000, "async"),
        ("next",), ("deliver", 0), ("deliver", 2), ("drop", 1), ("drop", 0),
        ("pause", 1, 5000), ("advance", 2000), ("call", 2, 1, 0, "async"), ("deliver", 0),
        ("deliver", 0), ("deliver", 0), ("next",), ("deliver", 0), ("advance", 2000),
        ("drop", 0), ("deliver", 1), ("deliver", 0), ("deliver", 2), ("deliver", 2),
        ("next",), ("dup", 2), ("deliver", 0), ("deliver", 5),
    ]  # fmt: skip
    out = run(17185, steps, Params(), api, trace=True)
    assert out.violation is None, "\n".join(out.lines)


# --- the defects of issue 18, planted again, found from random starts ---------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_finds_each_fixed_defect_planted_again(name: str) -> None:
    """Each defect found from outside once (a revived record, a lease dated from its queue,
    a renewer that abandons a lease lost by the clock, renewals that ignore ASK, a lease an
    unanswered acquire leaves behind) is put back, and random schedules must find it and
    shrink it to a short schedule that still fails the same way."""
    with planted(name) as kinds:
        api, params, others = Api(), Params(**MUTANT_PARAMS.get(name, {})), KINDS - kinds
        out = None
        for seed in range(1, 12_001):
            out = explore(seed, STEPS, params, api, others)
            if out.violation is not None:
                break
        assert out is not None and out.violation is not None, f"{name}: not found"
        assert out.violation.kind in kinds, _report(out)
        small = shrink(out, params, api, budget=60, ignored=others)
        assert len(small.steps) <= 30, small.steps
        replayed = run(small.seed, small.steps, params, api, ignored=others)
        assert replayed.violation is not None and replayed.violation.kind in kinds
