"""Cache fill (issue 20) on real servers and real processes: each test holds one promise.

stale_while_revalidate (a herd at expiry: the stale value at once, one refresh fleet-wide;
past the window, callers wait as before), stale_if_error with error_backoff (the stale value
in place of the error; origin calls throttled fleet-wide), soft_timeout (the stale value at
the soft timeout, the run's value stored and pushed all the same), early_refresh (one
refresh before expiry; nobody waits), forget during a refresh (its outcome is void), a
refresh whose process is SIGKILLed (the lease lapses, another caller refreshes), an older
lease's record written back (never served), asyncio and sync callers mixed, and a herd over
several Cluster slots.

The origin (tests/cache_fill_workers.py) follows a plan the test writes to Redis, counts its
runs there and pushes to lists as it starts and ends; the tests wait on those, on barriers
and on PUBSUB NUMSUB, never on a clock. Short result_ttl values (0.3 s) only make a value
stale soon; what is asserted is what each caller got and how many runs there were.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.cluster
from cache_fill_workers import (
    Failing,
    Where,
    aorigin,
    aux,
    call_and_report,
    herd,
    origin,
    url_of,
)
from helpers import SPAWN, _sf, flatten, gather, numsub, start, until

from dedupe import Served, SingleFlight
from dedupe.core.keys import names_for
from devtools.servers import RedisClusterSet

pytestmark = pytest.mark.timeout(40)

JOB = "item"
# Stale for 30 s after a freshness of 0.3 s: every test's calls fall inside the window.
SWR: dict[str, Any] = {"result_ttl": 0.3, "stale_while_revalidate": 30.0, "lock_ttl": 2.0}
SIE: dict[str, Any] = {"result_ttl": 0.3, "stale_if_error": 30.0, "lock_ttl": 2.0}


# --------------------------------------------------------------------------- helpers


class Origin:
    """The bookkeeping of one job's origin (see cache_fill_workers)."""

    def __init__(self, r: Any, prefix: str, job_id: str = JOB) -> None:
        self.r, self.prefix, self.job_id = r, prefix, job_id

    def key(self, what: str) -> str:
        return aux(self.prefix, self.job_id, what)

    def plan(self, *steps: str) -> None:
        self.r.rpush(self.key("plan"), *steps)

    def runs(self) -> int:
        return int(self.r.get(self.key("runs")) or 0)

    def started(self) -> int:
        """Block (in Redis) until a run starts; its PID."""
        got = self.r.blpop([self.key("started")], timeout=20)
        assert got is not None, f"no run of {self.job_id} started"
        return int(got[1])

    def done(self) -> int:
        """Block (in Redis) until a run returns or raises; its number."""
        got = self.r.blpop([self.key("done")], timeout=20)
        assert got is not None, f"no run of {self.job_id} ended"
        return int(got[1])

    def release(self) -> None:
        self.r.rpush(self.key("go"), 1)

    def settle(self) -> None:
        """Forget the start and end of the runs so far (the priming run's)."""
        self.r.delete(self.key("started"), self.key("done"))


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_timeout=60)  # longer than its BLPOPs
    yield client
    client.close()


def call(sf: SingleFlight, where: Where, prefix: str, job_id: str = JOB) -> Served:
    return sf.call_detailed(job_id, origin, where, prefix, job_id)


def prime(sf: SingleFlight, where: Where, prefix: str, job_id: str = JOB) -> None:
    """Run 1 stores a value; then wait (polling what Redis holds) until it is stale."""
    first = call(sf, where, prefix, job_id)
    assert (first.value["n"], first.role, first.stale) == (1, "leader", False)
    until_stale(sf, job_id)


def until_stale(sf: SingleFlight, job_id: str = JOB) -> None:
    def stale() -> bool:
        kept = sf.inspect(job_id).kept
        return kept is not None and kept.fresh_ms == 0

    until(stale, 10, f"the value of {job_id} to go stale")


def in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn(*args)`` on a thread; its result (or exception) lands in the list."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn(*args))
        except BaseException as exc:
            box.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def start_herd(
    procs: list[Any],
    where: Where,
    prefix: str,
    sf_kw: dict[str, Any],
    layout: list[tuple[str, int]],
    job_ids: list[str],
    rounds: int = 1,
) -> Any:
    """Spawn one process per (mode, callers) of ``layout``; all start at one barrier."""
    barrier, out = SPAWN.Barrier(len(layout)), SPAWN.Queue()
    for mode, callers in layout:
        start(procs, herd, where, prefix, sf_kw, mode, callers, job_ids, rounds, barrier, out)
    _alive.append(barrier)  # its semaphore must outlive the children's unpickling of it
    return out


_alive: list[Any] = []


def served(results: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
    """What the calls got, as a set of (kind, run number, stale)."""
    return {(x["kind"], x.get("n"), x.get("stale")) for x in results}


def roles(results: list[dict[str, Any]]) -> set[str]:
    return {x.get("role", "") for x in results}


# ------------------------------------------------------------------ stale_while_revalidate


def test_a_herd_at_expiry_gets_the_stale_value_at_once_and_one_refresh_runs(
    redis_url: str, prefix: str, r: redis.Redis, sfs: list[SingleFlight], procs: list[Any]
) -> None:
    """Three processes (sync threads and asyncio tasks) call a key whose value just went
    stale: every call returns the stale value, marked stale, while the one refresh
    fleet-wide is still running (it is held until they all returned); then its value is
    served to later callers, fresh."""
    where: Where = ("url", redis_url)
    o = Origin(r, prefix)
    o.plan("ok", "block")
    sf = _sf(sfs, redis_url, prefix, **SWR)
    prime(sf, where, prefix)
    o.settle()
    out = start_herd(procs, where, prefix, SWR, [("sync", 4), ("sync", 4), ("async", 4)], [JOB])
    results = flatten(gather(out, 3))
    assert len(results) == 12
    # Nobody waited for the refresh: it is held until after they all returned.
    assert served(results) == {("ok", 1, True)}, results
    assert roles(results) <= {"kept", "local"}
    refresher = o.started()
    assert refresher in {p.pid for p in procs}
    assert o.runs() == 2  # one refresh, fleet-wide
    o.release()
    assert o.done() == 2
    until(lambda: call(sf, where, prefix).value["n"] == 2, 10, "the refresh's value")
    later = call(sf, where, prefix)
    assert (later.value["n"], later.stale, later.role) == (2, False, "kept")
    assert o.runs() == 2


def test_past_the_window_callers_wait_for_a_run(
    redis_url: str, prefix: str, r: redis.Redis, sfs: list[SingleFlight], procs: list[Any]
) -> None:
    """Once a value is past result_ttl + stale_while_revalidate, nobody is served it: a
    caller in another process waits on the run, as without cache fill."""
    where: Where = ("url", redis_url)
    kw = {"result_ttl": 0.2, "stale_while_revalidate": 0.3, "lock_ttl": 2.0}
    o = Origin(r, prefix)
    o.plan("ok", "block")
    sf = _sf(sfs, redis_url, prefix, **kw)
    prime(sf, where, prefix)

    def past_the_window() -> bool:
        kept = sf.inspect(JOB).kept
        assert kept is not None  # the record outlives the window (grace): still in Redis
        return kept.age_ms > kept.keep_ms + 300 + 50

    until(past_the_window, 10, "the value to leave its stale window")
    o.settle()
    leader, got = in_thread(call, sf, where, prefix)
    o.started()
    out = start_herd(procs, where, prefix, kw, [("sync", 2)], [JOB])
    # The other process waits on the lease (subscribed) rather than take the old value.
    channel = names_for(prefix, JOB).channel
    until(lambda: numsub(r, channel) >= 1, 20, "the other process to wait on the run")
    o.release()
    results = gather(out, 1)[0]
    leader.join(10)
    assert served(results) == {("ok", 2, False)}, results
    assert roles(results) <= {"remote", "local"}
    assert (got[0].value["n"], got[0].role, got[0].stale) == (2, "leader", False)
    assert o.runs() == 2


# --------------------------------------------------------------------------- stale_if_error


def test_a_failing_origin_serves_the_stale_value_and_backs_off_fleet_wide(
    redis_url: str, prefix: str, r: redis.Redis, sfs: list[SingleFlight], procs: list[Any]
) -> None:
    """The origin fails while a good value is within stale_if_error: the failed run's
    leader, its local joiners and the followers in another process all get the stale value
    (marked stale), never the error; for error_backoff no caller anywhere runs the origin
    again; once the backoff ends, one run does, and fails over to the stale value again."""
    where: Where = ("url", redis_url)
    kw = {**SIE, "error_backoff": 20.0}
    o = Origin(r, prefix)
    o.plan("ok", "block-fail", "fail")
    sf = _sf(sfs, redis_url, prefix, **kw)
    prime(sf, where, prefix)
    o.settle()
    names = names_for(prefix, JOB)
    # Two processes of four threads, three calls each. The first caller's run fails only
    # once the other process waits on it.
    out = start_herd(procs, where, prefix, kw, [("sync", 4)] * 2, [JOB], rounds=3)
    o.started()
    until(lambda: numsub(r, names.channel) >= 1, 20, "the other process to wait on the run")
    o.release()
    results = flatten(gather(out, 2))
    assert len(results) == 24
    assert served(results) == {("ok", 1, True)}, results
    assert o.runs() == 2  # the one failed run: every later call was served during the backoff
    backoff = r.pttl(names.error)
    assert 0 < backoff <= 20_000
    assert r.get(names.result) is not None  # the good value was not overwritten
    # The backoff ends (its mark expires: here, at once): the next caller runs the origin,
    # which fails again; the caller still gets the stale value, and the backoff starts again.
    r.delete(names.error)
    again = call(sf, where, prefix)
    assert (again.value["n"], again.stale, again.role) == (1, True, "kept")
    assert o.runs() == 3
    assert r.pttl(names.error) > 0


def test_without_a_value_in_the_window_the_error_goes_to_every_caller(
    redis_url: str, prefix: str, r: redis.Redis, sfs: list[SingleFlight]
) -> None:
    """stale_if_error has nothing to serve for a key that never had a value: the error goes
    to the caller, as without cache fill (nothing is served from nowhere)."""
    where: Where = ("url", redis_url)
    o = Origin(r, prefix)
    o.plan("fail")
    sf = _sf(sfs, redis_url, prefix, **SIE)
    with pytest.raises(Exception, match="run 1 failed"):
        call(sf, where, prefix)
    assert o.runs() == 1


def test_past_stale_if_error_the_error_goes_to_the_caller(
    redis_url: str, prefix: str, r: redis.Redis, sfs: list[SingleFlight]
) -> None:
    """A value further past its freshness than stale_if_error never stands in for an error:
    a stale value is served only within its window."""
    where: Where = ("url", redis_url)
    kw = {"result_ttl": 0.2, "stale_if_error": 0.3, "lock_ttl": 2.0}
    o = Origin(r, prefix)
    o.plan("ok", "fail")
    sf = _sf(sfs, redis_url, prefix, **kw)
    prime(sf, where, prefix)

    def past_the_window() -> bool:
        kept = sf.inspect(JOB).kept
        assert kept is not None  # the record outlives the window (grace): still in Redis
        return kept.age_ms > kept.keep_ms + 300 + 50

    until(past_the_window, 10, "the value to leave its stale window")
    with pytest.raises(Failing, match="run 2 failed"):
        call(sf, where, prefix)
    assert o.runs() == 2


def test_an_error_that_is_an_answer_is_never_replaced_by_the_stale_value(
    redis_url: str, prefix: str, r: redis.Redis, sfs: list[SingleFlight]
) -> None:
    """``answers``: a not-found is what the origin says, not a failure; the caller gets it
    although a good value is within stale_if_error, and no backoff starts."""
    where: Where = ("url", redis_url)
    o = Origin(r, prefix)
    o.plan("ok", "fail")
    sf = _sf(sfs, redis_url, prefix, **SIE)
    prime(sf, where, prefix)
    with pytest.raises(Failing, match="run 2 failed"):
        sf.options(answers=(Failing,)).call(JOB, origin, where, prefix, JOB)
    assert r.exists(names_for(prefix, JOB).error) == 0
    assert o.runs() == 2


# --------------------------------------------------------------------------- soft_timeout


def test_soft_timeout_serves_the_stale_value_and_the_run_still_stores_and_pushes(
    redis_url: str, prefix: str, r: redis.Redis, sfs: list[SingleFlight], procs: list[Any]
) -> None:
    """A slow run on a stale value: a local joiner and the callers of another process get the
    stale value at their soft timeout, while the run goes on; the sync leader's own caller
    is not cut short. The run's value is then stored for later callers and pushed to a
    follower that has no soft timeout."""
    where: Where = ("url", redis_url)
    kw = {**SIE, "soft_timeout": 0.3}
    o = Origin(r, prefix)
    o.plan("ok", "block")
    sf = _sf(sfs, redis_url, prefix, **kw)
    patient = _sf(sfs, redis_url, prefix, **SIE)  # another instance: no soft timeout
    prime(sf, where, prefix)
    o.settle()
    channel = names_for(prefix, JOB).channel
    leader, led = in_thread(call, sf, where, prefix)
    o.started()
    follower, followed = in_thread(call, patient, where, prefix)
    until(lambda: numsub(r, channel) >= 1, 20, "the patient follower to wait on the run")
    joiner, joined = in_thread(call, sf, where, prefix)
    out = start_herd(procs, where, prefix, kw, [("sync", 3)], [JOB])
    others = gather(out, 1)[0]
    joiner.join(20)
    # All served while the run is still held: it has not ended.
    assert served(others) == {("ok", 1, True)}, others
    assert (joined[0].value["n"], joined[0].stale) == (1, True)
    assert r.llen(o.key("done")) == 0
    o.release()
    leader.join(20)
    follower.join(20)
    assert (led[0].value["n"], led[0].role, led[0].stale) == (2, "leader", False)
    assert (followed[0].value["n"], followed[0].role, followed[0].stale) == (2, "remote", False)
    later = call(sf, where, prefix)
    assert (later.value["n"], later.role, later.stale) == (2, "kept", False)
    assert o.runs() == 2


async def test_asyncio_and_sync_callers_mixed_under_soft_timeout(
    redis_url: str, prefix: str, r: redis.Redis, sfs: list[SingleFlight]
) -> None:
    """One instance, an event loop and a thread: the asyncio caller that leads gets the stale
    value at its soft timeout (the run goes on as a task), and so does a sync caller that
    waits on the same lease; the run's value is stored for both kinds of caller next."""
    where: Where = ("url", redis_url)
    kw = {**SIE, "soft_timeout": 0.3}
    o = Origin(r, prefix)
    o.plan("ok", "block")
    sf = _sf(sfs, redis_url, prefix, **kw)
    try:
        first = await sf.call_detailed(JOB, aorigin, where, prefix, JOB)
        assert (first.value["n"], first.role) == (1, "leader")
        await asyncio.to_thread(until_stale, sf)
        await asyncio.to_thread(o.settle)
        led = await sf.call_detailed(JOB, aorigin, where, prefix, JOB)
        assert (led.value["n"], led.stale, led.role) == (1, True, "kept")
        assert await asyncio.to_thread(o.started) == os.getpid()
        synced = await asyncio.to_thread(call, sf, where, prefix)
        assert (synced.value["n"], synced.stale) == (1, True)
        assert r.llen(o.key("done")) == 0  # both returned while the run is held
        o.release()
        assert await asyncio.to_thread(o.done) == 2

        async def refreshed() -> Served:
            while True:
                got = await sf.call_detailed(JOB, aorigin, where, prefix, JOB)
                if got.value["n"] == 2:
                    return got
                await asyncio.sleep(0.01)  # polling what Redis holds, bounded below

        later = await asyncio.wait_for(refreshed(), 10)
        assert later.stale is False and later.role in ("kept", "local")
        synced = await asyncio.to_thread(call, sf, where, prefix)
        assert (synced.value["n"], synced.stale) == (2, False)
        assert o.runs() == 2
    finally:
        await sf.aclose()


# --------------------------------------------------------------------------- early_refresh


def test_early_refresh_runs_once_before_expiry_and_nobody_waits(
    redis_url: str, prefix: str, r: redis.Redis, sfs: list[SingleFlight], procs: list[Any]
) -> None:
    """A hot, fresh key with a beta so large that every hit would fire: exactly one caller
    fleet-wide starts a refresh, every caller (that one too) gets the fresh value at once
    (the refresh is held until all returned), and the refresh's value replaces the old one
    before it expired."""
    where: Where = ("url", redis_url)
    kw = {"result_ttl": 30.0, "early_refresh": 1e6, "lock_ttl": 2.0}
    o = Origin(r, prefix)
    # The first run takes a while: XFetch scales the chance by the last run's length, and a
    # run shorter than the server's millisecond would never fire.
    o.plan("slow", "block")
    sf = _sf(sfs, redis_url, prefix, **kw)
    quiet = sf.options(early_refresh=0.0)  # reads without firing refreshes of its own
    led = quiet.call_detailed(JOB, origin, where, prefix, JOB)
    assert (led.value["n"], led.role) == (1, "leader")
    o.settle()
    out = start_herd(procs, where, prefix, kw, [("sync", 4), ("async", 4)], [JOB], rounds=2)
    results = flatten(gather(out, 2))
    assert len(results) == 16
    assert served(results) == {("ok", 1, False)}, results
    o.started()
    assert o.runs() == 2  # one refresh fleet-wide
    kept = sf.inspect(JOB).kept
    assert kept is not None and kept.fresh_ms > 0  # before expiry
    o.release()
    assert o.done() == 2
    until(lambda: quiet.call_detailed(JOB, origin, where, prefix, JOB).value["n"] == 2, 10,
          "the early refresh's value")  # fmt: skip
    assert o.runs() == 2


def test_over_max_background_runs_callers_get_the_stale_value_without_a_refresh(
    redis_url: str, prefix: str, r: redis.Redis, sfs: list[SingleFlight]
) -> None:
    """A process with one place for background runs, taken by a refresh of one key: a stale
    hit on another key gets its stale value and starts nothing; once the place is free
    again, the next stale hit refreshes."""
    where: Where = ("url", redis_url)
    sf = _sf(sfs, redis_url, prefix, **SWR, max_background_runs=1)
    busy, idle = Origin(r, prefix, "busy"), Origin(r, prefix, "idle")
    for o in (busy, idle):
        o.plan("ok", "block")  # a refresh holds its lease until released
        prime(sf, where, prefix, o.job_id)
        o.settle()
    assert call(sf, where, prefix, "busy").stale  # its refresh takes the one place
    busy.started()
    got = call(sf, where, prefix, "idle")
    assert (got.value["n"], got.stale) == (1, True)
    # No place: no refresh (a refresh's lease is granted before the call returns).
    assert r.exists(names_for(prefix, "idle").lock) == 0
    busy.release()
    assert busy.done() == 2
    until(lambda: sf.stats()["background_runs"] == 0, 10, "the refresh to give its place back")
    assert call(sf, where, prefix, "idle").stale
    idle.started()  # refreshed now
    idle.release()
    assert idle.done() == 2


# ------------------------------------------------------------ forget, SIGKILL, write-back


def test_forget_during_a_background_refresh_voids_it(
    redis_url: str, prefix: str, r: redis.Redis, sfs: list[SingleFlight]
) -> None:
    """forget() while a refresh runs: the refresh's late value is not stored; the next call
    runs the origin itself rather than get it."""
    where: Where = ("url", redis_url)
    o = Origin(r, prefix)
    o.plan("ok", "block")
    sf = _sf(sfs, redis_url, prefix, **SWR)
    other = _sf(sfs, redis_url, prefix, **SWR)
    prime(sf, where, prefix)
    o.settle()
    stale = call(sf, where, prefix)  # starts the refresh in the background
    assert (stale.value["n"], stale.stale) == (1, True)
    o.started()
    other.forget(JOB)
    o.release()
    assert o.done() == 2
    until(lambda: sf.stats()["background_runs"] == 0, 10, "the refresh to end")
    names = names_for(prefix, JOB)
    assert r.get(names.result) is None  # its outcome was withheld
    after = call(other, where, prefix)
    assert (after.value["n"], after.role, after.stale) == (3, "leader", False)
    assert o.runs() == 3


def test_sigkill_of_the_refreshing_process_lets_another_caller_refresh(
    redis_url: str, prefix: str, r: redis.Redis, sfs: list[SingleFlight], procs: list[Any]
) -> None:
    """The process running a refresh is SIGKILLed: until its lease lapses, callers get the
    stale value with no run; then one caller refreshes, and its value is served."""
    where: Where = ("url", redis_url)
    kw = {**SWR, "lock_ttl": 1.0}
    o = Origin(r, prefix)
    o.plan("ok", "hang", "ok")
    sf = _sf(sfs, redis_url, prefix, **kw)
    prime(sf, where, prefix)
    o.settle()
    out = SPAWN.Queue()
    victim = start(procs, call_and_report, where, prefix, kw, JOB, out)
    got = out.get(timeout=30)
    assert (got["n"], got["stale"]) == (1, True)
    assert o.started() == victim.pid
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(10)
    seen: list[Served] = []

    def refreshed() -> bool:
        seen.append(call(sf, where, prefix))
        return seen[-1].value["n"] == 3

    until(refreshed, 15, "another caller's refresh")
    assert {(s.value["n"], s.stale) for s in seen[:-1]} <= {(1, True)}
    assert seen[-1].stale is False
    assert o.runs() == 3  # the killed refresh and one more
    assert o.started() == os.getpid()


def test_a_record_of_an_older_lease_written_back_is_never_served_stale(
    redis_url: str, prefix: str, r: redis.Redis, sfs: list[SingleFlight]
) -> None:
    """A genuine record of run 1, written back after run 2 refreshed it, is within the stale
    window by its own times; it is still never served (the token counter names run 2's
    lease): the caller runs the origin instead."""
    where: Where = ("url", redis_url)
    names = names_for(prefix, JOB)
    o = Origin(r, prefix)
    sf = _sf(sfs, redis_url, prefix, **SWR)
    prime(sf, where, prefix)
    old = r.get(names.result)
    assert old is not None
    o.settle()
    assert call(sf, where, prefix).value["n"] == 1  # stale; refreshes in the background
    assert o.done() == 2
    until(lambda: call(sf, where, prefix).value["n"] == 2, 10, "the refresh's value")
    until_stale(sf)
    ttl_ms = int(old.split(b":")[2])
    r.set(names.result, old, px=ttl_ms)  # written back: a replica, a restore, a stray SET
    got = call(sf, where, prefix)
    assert (got.value["n"], got.role, got.stale) == (3, "leader", False)
    assert o.runs() == 3


# --------------------------------------------------------------------------- Cluster


@pytest.mark.cluster
@pytest.mark.timeout(90)
def test_stale_while_revalidate_over_keys_in_several_cluster_slots(
    redis_cluster: RedisClusterSet, prefix: str, sfs: list[SingleFlight], procs: list[Any]
) -> None:
    """On a 3-master Cluster, a herd of two processes over one key on each master: every call
    gets the stale value, each key is refreshed exactly once, and its value is served next."""
    nodes = [(h, int(p)) for h, p in redis_cluster.startup_nodes]
    where: Where = ("cluster", nodes)
    aux_client = redis.cluster.RedisCluster(
        startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in nodes], socket_timeout=60
    )
    try:
        jobs = _jobs_in_distinct_slots(aux_client, prefix, 3)
        sf = SingleFlight(url_of(where), prefix=prefix, **SWR)
        sfs.append(sf)
        origins = [Origin(aux_client, prefix, j) for j in jobs]
        for o in origins:
            o.plan("ok", "block")
        for j, o in zip(jobs, origins, strict=True):
            first = call(sf, where, prefix, j)
            assert first.value["n"] == 1
            o.settle()
        for j in jobs:
            until_stale(sf, j)
        out = start_herd(procs, where, prefix, SWR, [("sync", 3), ("sync", 3)], jobs)
        results = flatten(gather(out, 2, timeout=60))
        assert len(results) == 2 * 3 * len(jobs)
        assert served(results) == {("ok", 1, True)}, results
        for o in origins:
            o.started()
            assert o.runs() == 2
            o.release()
            assert o.done() == 2
        for j, o in zip(jobs, origins, strict=True):
            until(lambda j=j: call(sf, where, prefix, j).value["n"] == 2, 10, f"{j}'s refresh")
            assert o.runs() == 2
    finally:
        for server in redis_cluster.servers:
            with server.client() as c:
                for key in c.scan_iter(match=f"{prefix}*", count=1000):
                    c.delete(key)
        aux_client.close()


def _jobs_in_distinct_slots(client: redis.cluster.RedisCluster, prefix: str, n: int) -> list[str]:
    """``n`` job ids whose keys sit on ``n`` different masters."""
    found: dict[str, str] = {}
    for i in range(1000):
        job_id = f"swr-{i}"
        node = client.get_node_from_key(names_for(prefix, job_id).channel)
        found.setdefault(node.name, job_id)
        if len(found) == n:
            return list(found.values())
    raise AssertionError("no jobs on every master")
