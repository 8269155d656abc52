"""Batches (``@sf.batch``, ``sf.call_batch``) on a real Redis: each item is still run once
across the fleet, whoever asks for it and how.

Across processes (spawned; tests/batch_workers.py), runs are counted in Redis per item:
overlapping batches, batches beside single-key calls both ways, a batch leader SIGKILLed mid
run, threads and asyncio tasks mixed. In one process (instances as good as other processes):
what a batch returns (failures, items left out or added, duplicates), max_batch_size, fresh
items, a lease lost for one item, and two batches that each lead part of the other's items;
Redis down under on_backend_error="local"; the round trips of an uncontended batch. On the
3-master Cluster: one pipeline per node, a slot moved or left open mid-batch, a master down.
Synchronisation is through events, barriers and Redis (BLPOP, PUBSUB NUMSUB), never sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import batch_workers as bw
import pytest
import redis
from helpers import SPAWN, _sf, gather, numsub, start, until
from redis.crc import key_slot
from test_cluster import (
    errorstat,
    finish_migration,
    migrate_slot,
    owner_of,
    restore_slot,
    shard_numsub,
    slot_owners,
)

from dedupe import BatchError, BatchFlight, BatchResult, SingleFlight, current_flight
from dedupe.backend import transport, wire
from dedupe.core.keys import names_for
from dedupe.errors import BackendUnavailable, WaitTimeout
from devtools.servers import RedisClusterSet

# --------------------------------------------------------------------------- helpers


def channel(prefix: str, job_id: str) -> str:
    return names_for(prefix, job_id).channel


def user(prefix: str, i: int) -> str:
    """The channel of item ``i`` of the workers' loaders (batch and single-key alike)."""
    return channel(prefix, f"{bw.NAMESPACE}:user:{i}")


def started(r: redis.Redis, prefix: str, n: int) -> list[int]:
    """Block (in Redis) until ``n`` runs have started; their PIDs."""
    pids = []
    for _ in range(n):
        got = r.blpop([bw.aux(prefix, "started")], timeout=30)
        assert got is not None, "a run never started"
        pids.append(int(got[1]))
    return pids


def go(r: redis.Redis, prefix: str, pid: int) -> None:
    r.rpush(bw.aux(prefix, "go", pid), 1)


def runs(r: redis.Redis, prefix: str, ids: list[int]) -> dict[int, int]:
    got = r.mget([bw.aux(prefix, "runs", i) for i in ids])
    return {i: int(v or 0) for i, v in zip(ids, got, strict=True)}


def ran(r: redis.Redis, prefix: str) -> list[tuple[int, list[int], list[int]]]:
    """Every run: (pid, the items it was given, their tokens), in the order they began."""
    return [tuple(json.loads(x)) for x in r.lrange(bw.aux(prefix, "ran"), 0, -1)]  # type: ignore[misc]


def subscribed(r: redis.Redis, channels: list[str], n: int = 1) -> None:
    """Wait (bounded) until each channel has at least ``n`` subscribers: the callers follow."""
    until(lambda: all(numsub(r, c) >= n for c in channels), 30, f"{n} subscribers each")


class Thread(threading.Thread):
    """A thread that keeps what its target returned or raised."""

    def __init__(self, target: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn, self.value, self.error = target, None, None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:
            self.error = exc

    def result(self, timeout: float = 30) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "the call never returned"
        if self.error is not None:
            raise self.error
        return self.value


def spawn(target: Callable[[], Any]) -> Thread:
    t = Thread(target)
    t.start()
    return t


# --------------------------------------------------------------------------- across processes


@pytest.mark.timeout(60)
def test_overlapping_batches_in_two_processes_run_each_item_once(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any]
) -> None:
    """Both batches run (each leads items the other lacks) and hold until both have
    started: the shared items were claimed by one while the other ran them."""
    a, b = list(range(0, 10)), list(range(5, 15))
    barrier, out = SPAWN.Barrier(2), SPAWN.Queue()
    for ids in (a, b):
        start(procs, bw.call, redis_url, prefix, "batch", ids, 20.0, barrier, out, {})
    for pid in started(redis_client, prefix, 2):
        go(redis_client, prefix, pid)
    results = {pid: value for kind, pid, value in gather(out, 2) if kind == "ok"}
    assert len(results) == 2, results
    got_a, got_b = sorted(results.values(), key=lambda v: min(v))
    assert list(got_a) == a and list(got_b) == b  # every value, in input order
    for i in range(5, 10):
        assert got_a[i] == got_b[i]  # one run of each shared item, seen by both
    assert runs(redis_client, prefix, list(range(15))) == dict.fromkeys(range(15), 1)


@pytest.mark.timeout(60)
def test_single_key_calls_join_a_running_batch(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any]
) -> None:
    batch_out, single_out = SPAWN.Queue(), SPAWN.Queue()
    start(procs, bw.call, redis_url, prefix, "batch", [1, 2, 3], 20.0, None, batch_out, {})
    (leader,) = started(redis_client, prefix, 1)
    start(procs, bw.call, redis_url, prefix, "single", [2, 3, 4], 0, None, single_out, {})
    subscribed(redis_client, [user(prefix, 2), user(prefix, 3)])  # following the batch
    go(redis_client, prefix, leader)
    kind, _, batch = batch_out.get(timeout=30)
    kind2, pid, single = single_out.get(timeout=30)
    assert (kind, kind2) == ("ok", "ok"), (batch, single)
    assert single[2] == batch[2] and single[3] == batch[3]  # the batch's run, shared
    assert batch[2]["pid"] == leader and single[4]["pid"] == pid
    assert runs(redis_client, prefix, [1, 2, 3, 4]) == dict.fromkeys([1, 2, 3, 4], 1)


@pytest.mark.timeout(60)
def test_a_batch_joins_running_single_key_calls_and_runs_only_the_rest(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any]
) -> None:
    single_out, batch_out = SPAWN.Queue(), SPAWN.Queue()
    start(procs, bw.call, redis_url, prefix, "single", [2], 20.0, None, single_out, {})
    (single,) = started(redis_client, prefix, 1)
    start(procs, bw.call, redis_url, prefix, "batch", [1, 2, 3], 0, None, batch_out, {})
    subscribed(redis_client, [user(prefix, 2)])  # the batch ran 1 and 3, and follows 2
    go(redis_client, prefix, single)
    kind, _, one = single_out.get(timeout=30)
    kind2, pid, batch = batch_out.get(timeout=30)
    assert (kind, kind2) == ("ok", "ok"), (one, batch)
    assert batch[2] == one[2] and batch[2]["pid"] == single
    assert [(p, ids) for p, ids, _ in ran(redis_client, prefix)] == [(single, [2]), (pid, [1, 3])]
    assert runs(redis_client, prefix, [1, 2, 3]) == dict.fromkeys([1, 2, 3], 1)


@pytest.mark.timeout(60)
def test_a_sigkilled_batch_leaders_items_are_taken_over_each_once(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any]
) -> None:
    """A batch and single-key callers wait on a batch leader that is killed: its items are
    taken over item by item (a batch takes over several in one run), each by one caller."""
    kw = {"lock_ttl": 1.0}
    items = [1, 2, 3, 4]
    dead_out, out = SPAWN.Queue(), SPAWN.Queue()
    leader = start(procs, bw.call, redis_url, prefix, "batch", items, 60.0, None, dead_out, kw)
    assert started(redis_client, prefix, 1) == [leader.pid]
    start(procs, bw.call, redis_url, prefix, "batch", items, 0, None, out, kw)
    start(procs, bw.call, redis_url, prefix, "single", [3, 4], 0, None, out, kw)
    subscribed(redis_client, [user(prefix, i) for i in (1, 2)], 1)
    subscribed(redis_client, [user(prefix, i) for i in (3, 4)], 2)
    os.kill(leader.pid, signal.SIGKILL)
    results = gather(out, 2)
    assert [r[0] for r in results] == ["ok", "ok"], results
    by_pid = {pid: value for _, pid, value in results}
    batch = next(v for v in by_pid.values() if len(v) == 4)
    single = next(v for v in by_pid.values() if len(v) == 2)
    assert list(batch) == items and single == {3: batch[3], 4: batch[4]}
    assert {batch[i]["pid"] for i in items} <= set(by_pid)  # the survivors ran them
    assert runs(redis_client, prefix, items) == dict.fromkeys(items, 2)  # the dead run, one more
    dead_pid, dead_ids, dead_tokens = ran(redis_client, prefix)[0]
    assert (dead_pid, dead_ids) == (leader.pid, items)
    for i, old in zip(items, dead_tokens, strict=True):
        assert batch[i]["token"] > old  # each taken over under a newer, fenced lease


@pytest.mark.timeout(60)
def test_threads_and_asyncio_tasks_in_two_processes_run_each_item_once(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any]
) -> None:
    """In each process, a thread per window calls the sync loader and an event loop a task
    per window calls the async one, all at once over overlapping windows."""
    windows = [[[0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8]], [[2, 3, 4, 5, 6, 7], [6, 7, 8, 9, 10, 11]]]
    barrier, out = SPAWN.Barrier(2), SPAWN.Queue()
    for w in windows:
        start(procs, bw.mixed, redis_url, prefix, w, barrier, out, {})
    results = gather(out, 8)  # each process: 2 threads and 2 tasks
    assert {r[0] for r in results} == {"ok"}, results
    got = sorted(list(v) for _, _, v in results)
    assert got == sorted([w for ws in windows for w in ws] * 2)  # each caller its window
    seen: dict[int, Any] = {}
    for _, _, value in results:
        for i, v in value.items():
            assert seen.setdefault(i, v) == v  # every caller got the one run's value
    assert runs(redis_client, prefix, list(range(12))) == dict.fromkeys(range(12), 1)


# --------------------------------------------------------------------------- in one process


@pytest.fixture
def calls() -> list[list[Any]]:
    """The items each run of the test's batch function was given."""
    return []


def loader(sf: SingleFlight, calls: list[list[Any]], fail: Any = None, **kw: Any) -> Any:
    """A batch loader of "item:{item}" that records each run's items; ``fail`` decides,
    given an item, whether the run raises."""

    @sf.batch(key="item:{item}", **kw)
    def load(ids: list[int]) -> dict[int, str]:
        calls.append(list(ids))
        if fail is not None and any(fail(i) for i in ids):
            raise ValueError(f"cannot load {ids}")
        return {i: f"v{i}" for i in ids}

    return load


def test_a_failing_function_raises_batch_error_with_the_values_and_each_items_error(
    redis_url: str, prefix: str, sfs: list[SingleFlight], calls: list[list[Any]]
) -> None:
    sf = _sf(sfs, redis_url, prefix, result_ttl=30)
    load = loader(sf, calls, fail=lambda i: i >= 3)
    assert load([1, 2]) == {1: "v1", 2: "v2"}
    with pytest.raises(BatchError) as caught:
        load([1, 2, 3, 4])
    err = caught.value
    assert err.values == {1: "v1", 2: "v2"}  # the fresh ones still came
    assert set(err.errors) == {3, 4} and all(type(e) is ValueError for e in err.errors.values())
    assert err.__cause__ in err.errors.values()
    detailed = load.detailed([1, 2, 3, 4])  # a failure is never kept: run again
    assert isinstance(detailed, BatchResult)
    assert detailed.values == {1: "v1", 2: "v2"} and set(detailed.errors) == {3, 4}
    assert detailed.stale == frozenset()
    assert calls == [[1, 2], [3, 4], [3, 4]]
    with pytest.raises(BatchError):
        detailed.unwrap()


def test_a_batchs_failure_reaches_the_batches_that_wait_on_it_each_its_own_copy(
    redis_url: str, prefix: str, sfs: list[SingleFlight], redis_client: redis.Redis
) -> None:
    a, b = _sf(sfs, redis_url, prefix), _sf(sfs, redis_url, prefix)
    running, release = threading.Event(), threading.Event()

    def failing(ids: list[int]) -> dict[int, str]:
        running.set()
        release.wait(30)
        raise ValueError("origin down")

    leader = spawn(lambda: a.call_batch([3, 4], failing, key="e:{item}"))
    assert running.wait(30)
    follower = spawn(
        lambda: b.call_batch_detailed([3, 4, 5], lambda ids: {i: i for i in ids}, key="e:{item}")
    )
    subscribed(redis_client, [channel(prefix, "e:3"), channel(prefix, "e:4")])
    release.set()
    with pytest.raises(BatchError) as caught:
        leader.result()
    got = follower.result()
    assert got.values == {5: 5} and set(got.errors) == {3, 4}
    for i in (3, 4):
        assert type(got.errors[i]) is ValueError and str(got.errors[i]) == "origin down"
        assert got.errors[i] is not caught.value.errors[i]


def test_items_the_function_leaves_out_are_absent_and_not_kept(
    redis_url: str, prefix: str, sfs: list[SingleFlight], redis_client: redis.Redis
) -> None:
    """An item left out is absent from the result (not an error), nothing is kept for it,
    and a single-key caller that waited on it runs it itself."""
    a, b = _sf(sfs, redis_url, prefix, result_ttl=30), _sf(sfs, redis_url, prefix, result_ttl=30)
    running, release = threading.Event(), threading.Event()
    runs_of: list[list[int]] = []

    def partial(ids: list[int]) -> dict[int, str]:
        runs_of.append(list(ids))
        running.set()
        release.wait(30)
        return {i: f"v{i}" for i in ids if i != 3}

    batch = spawn(lambda: a.call_batch_detailed([1, 2, 3], partial, key="o:{item}"))
    assert running.wait(30)
    single = spawn(lambda: b.call("o:3", lambda: "single"))
    subscribed(redis_client, [channel(prefix, "o:3")])
    release.set()
    got = batch.result()
    assert got.values == {1: "v1", 2: "v2"} and got.errors == {} and 3 not in got.values
    assert single.result() == "single"  # it looked again, and ran it
    running.clear()
    release.set()
    assert a.call_batch([1, 2, 3], partial, key="o:{item}") == {1: "v1", 2: "v2", 3: "single"}
    assert runs_of == [[1, 2, 3]]  # 3 was kept from the single-key run, not from the batch
    assert a.call_batch([7], partial, key="o:{item}") == {7: "v7"}
    assert a.call_batch([8, 3], lambda ids: {}, key="o:{item}") == {3: "single"}
    assert a.call_batch([8], lambda ids: {8: "now"}, key="o:{item}") == {8: "now"}  # not kept


def test_items_the_function_adds_are_ignored(
    redis_url: str, prefix: str, sfs: list[SingleFlight]
) -> None:
    sf = _sf(sfs, redis_url, prefix, result_ttl=30)
    got = sf.call_batch([1], lambda ids: {1: "one", 99: "extra"}, key="x:{item}")
    assert got == {1: "one"}
    assert sf.call("x:99", lambda: "ran") == "ran"  # nothing was kept for the extra item
    assert sf.call("x:1", lambda: "ran") == "one"


# Never connected (nothing listens on port 1): only its decorator is used, at import.
_PICKLE_SF = SingleFlight("redis://127.0.0.1:1/0", prefix="batch-pickle")


@_PICKLE_SF.batch(key="n:{item}")
def module_batch(items: list[int]) -> dict[int, int]:
    return {i: i for i in items}


def test_a_batch_function_pickles_and_copies_by_reference() -> None:
    """As a decorated function (and a plain one): ProcessPoolExecutor and multiprocessing
    can send it; copies are the object itself."""
    import copy
    import pickle

    assert pickle.loads(pickle.dumps(module_batch)) is module_batch
    assert copy.copy(module_batch) is module_batch
    assert copy.deepcopy(module_batch) is module_batch


def test_duplicate_items_collapse(
    redis_url: str, prefix: str, sfs: list[SingleFlight], calls: list[list[Any]]
) -> None:
    sf = _sf(sfs, redis_url, prefix)
    load = loader(sf, calls)
    assert load([2, 1, 2, 1, 3]) == {2: "v2", 1: "v1", 3: "v3"}
    got = sf.call_batch([5, 5, 4], lambda ids: calls.append(ids) or {i: i for i in ids},
                        key="d:{item}")  # fmt: skip
    assert got == {5: 5, 4: 4}
    assert calls == [[2, 1, 3], [5, 4]]


def test_max_batch_size_splits_a_batch_into_parts_in_order(
    redis_url: str, prefix: str, sfs: list[SingleFlight], calls: list[list[Any]]
) -> None:
    sf = _sf(sfs, redis_url, prefix, max_batch_size=3)
    load = loader(sf, calls)
    got = load([7, 0, 1, 2, 3, 4, 5, 6])
    assert list(got) == [7, 0, 1, 2, 3, 4, 5, 6]
    assert calls == [[7, 0, 1], [2, 3, 4], [5, 6]]


def test_a_batch_with_every_item_fresh_never_calls_the_function(
    redis_url: str, prefix: str, sfs: list[SingleFlight], calls: list[list[Any]]
) -> None:
    a, b = _sf(sfs, redis_url, prefix, result_ttl=30), _sf(sfs, redis_url, prefix, result_ttl=30)
    assert loader(a, calls)([1, 2, 3]) == {1: "v1", 2: "v2", 3: "v3"}
    assert loader(a, calls)([3, 1]) == {3: "v3", 1: "v1"}  # the same instance
    assert loader(b, calls)([2, 3]) == {2: "v2", 3: "v3"}  # another: from Redis
    assert calls == [[1, 2, 3]]


def test_a_lease_lost_for_one_item_is_named_and_its_late_outcome_reaches_no_newer_flight(
    redis_url: str, prefix: str, sfs: list[SingleFlight], redis_client: redis.Redis
) -> None:
    """Item 2's lock is deleted while the batch runs: the BatchFlight names item 2 alone as
    lost; a newer flight of item 2 starts, with a caller waiting on it; the batch's late
    value for item 2 reaches neither that caller nor Redis, while items 1 and 3 are kept."""
    a = _sf(sfs, redis_url, prefix, lock_ttl=1.0, result_ttl=30)
    b, c = _sf(sfs, redis_url, prefix, result_ttl=30), _sf(sfs, redis_url, prefix, result_ttl=30)
    running, lost, release = threading.Event(), threading.Event(), threading.Event()
    newer_running, newer_release = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def old(ids: list[int]) -> dict[int, str]:
        flight = current_flight()
        assert isinstance(flight, BatchFlight)
        seen["tokens"] = {i: f.token for i, f in flight.items.items()}
        running.set()
        seen["lost_in_time"] = flight.items[2].lost_event.wait(10)  # the renewer finds out
        seen["lost"] = flight.lost_items()
        seen["any"] = flight.lease_lost
        lost.set()
        release.wait(30)
        return {i: f"old{i}" for i in ids}

    def newer() -> str:
        flight = current_flight()
        assert flight is not None
        seen["newer"] = flight.token
        newer_running.set()
        newer_release.wait(30)
        return "new2"

    batch = spawn(lambda: a.call_batch([1, 2, 3], old, key="l:{item}"))
    assert running.wait(30)
    redis_client.delete(names_for(prefix, "l:2").lock)
    assert lost.wait(30)
    assert seen["lost_in_time"] and seen["lost"] == [2] and seen["any"]
    newer_flight = spawn(lambda: b.call("l:2", newer))
    assert newer_running.wait(30)
    waiter = spawn(lambda: c.call("l:2", lambda: "the waiter ran it"))
    subscribed(redis_client, [channel(prefix, "l:2")])
    release.set()
    got = batch.result()  # the late leader's callers still get its value
    assert got == {1: "old1", 2: "old2", 3: "old3"}
    newer_release.set()
    assert waiter.result() == "new2"
    assert newer_flight.result() == "new2" and seen["newer"] > seen["tokens"][2]
    assert c.call("l:2", lambda: "ran") == "new2"  # kept: the newer flight's
    assert c.call("l:1", lambda: "ran") == "old1" and c.call("l:3", lambda: "ran") == "old3"


@pytest.mark.timeout(60)
def test_two_batches_each_leading_part_of_the_others_items_both_finish(
    redis_url: str, prefix: str, sfs: list[SingleFlight], redis_client: redis.Redis
) -> None:
    """B leads item 2 and follows item 1; A leads item 1 and follows item 2; both functions
    run at once. Each completes what it leads before it waits, so both finish (waiting
    first, they would wait on each other until wait_timeout)."""
    a, b, p = (_sf(sfs, redis_url, prefix, wait_timeout=8.0) for _ in range(3))
    held, let_go = threading.Event(), threading.Event()
    a_running, b_running = threading.Event(), threading.Event()

    def hold_then_abort() -> str:  # item 1's first leader: gone before A claims it
        held.set()
        let_go.wait(30)
        raise KeyboardInterrupt  # an abort: the lease is given back, nothing kept

    def run_a(ids: list[int]) -> dict[int, str]:
        a_running.set()
        return {i: f"a{i}" for i in ids}

    def run_b(ids: list[int]) -> dict[int, str]:
        b_running.set()
        assert a_running.wait(30)  # both run at once
        return {i: f"b{i}" for i in ids}

    first = spawn(lambda: p.call("k:1", hold_then_abort))
    assert held.wait(30)
    batch_b = spawn(lambda: b.call_batch([2, 1], run_b, key="k:{item}"))
    assert b_running.wait(30)  # B leads 2; it follows 1 once it has completed 2
    let_go.set()
    with pytest.raises(KeyboardInterrupt):
        first.result()
    batch_a = spawn(lambda: a.call_batch([1, 2], run_a, key="k:{item}"))
    assert batch_a.result() == {1: "a1", 2: "b2"}
    assert batch_b.result() == {2: "b2", 1: "a1"}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_wait_timeout_fails_the_item_that_waits_too_long_alone(
    redis_url: str, prefix: str, sfs: list[SingleFlight], redis_client: redis.Redis, mode: str
) -> None:
    """Item 2's leader (a single-key call elsewhere) holds on: past wait_timeout the batch
    gives up on item 2 alone (WaitTimeout among the errors), with item 1's value."""
    holder, sf = _sf(sfs, redis_url, prefix), _sf(sfs, redis_url, prefix, wait_timeout=0.3)
    running, release = threading.Event(), threading.Event()

    def held() -> str:
        running.set()
        release.wait(30)
        return "late"

    leader = spawn(lambda: holder.call("w:2", held))
    try:
        assert running.wait(30)

        async def afetch(ids: list[int]) -> dict[int, str]:
            return {i: "v" for i in ids}

        if mode == "sync":
            got = sf.call_batch_detailed([1, 2], lambda ids: {i: "v" for i in ids}, key="w:{item}")
        else:
            got = asyncio.run(sf.call_batch_detailed([1, 2], afetch, key="w:{item}"))
        assert got.values == {1: "v"} and list(got.errors) == [2]
        assert isinstance(got.errors[2], WaitTimeout)
    finally:
        release.set()
    assert leader.result() == "late"


def test_a_cancelled_async_batch_caller_stops_waiting_alone(
    redis_url: str, prefix: str, sfs: list[SingleFlight]
) -> None:
    """Two tasks of one loop ask for overlapping items; the one whose flights run the
    function is cancelled: the run goes on, and the other task gets every value."""
    sf = _sf(sfs, redis_url, prefix, result_ttl=30)
    calls: list[list[int]] = []

    async def main() -> tuple[dict[int, int], bool]:
        running, release = asyncio.Event(), asyncio.Event()

        async def fetch(ids: list[int]) -> dict[int, int]:
            calls.append(list(ids))
            running.set()
            await release.wait()
            return {i: i * 10 for i in ids}

        first = asyncio.ensure_future(sf.call_batch([1, 2], fetch, key="c:{item}"))
        await running.wait()
        second = asyncio.ensure_future(sf.call_batch([1, 2, 3], fetch, key="c:{item}"))
        while calls != [[1, 2], [3]]:
            await asyncio.sleep(0.01)
        first.cancel()
        release.set()
        got = await second
        try:
            await first
        except asyncio.CancelledError:
            return got, True
        return got, False

    got, cancelled = asyncio.run(main())
    assert got == {1: 10, 2: 20, 3: 30} and cancelled
    assert calls == [[1, 2], [3]]
    assert sf.call_batch([1, 2, 3], lambda ids: {}, key="c:{item}") == got  # kept


# --------------------------------------------------------------------------- on a Cluster


def cluster_url(cluster: RedisClusterSet) -> str:
    return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in cluster.startup_nodes)


def owners(cluster: RedisClusterSet, prefix: str, ids: list[int]) -> dict[int, int]:
    """Each item's master (its port), as the cluster says now."""
    layout = slot_owners(cluster)
    slots = {i: key_slot(user(prefix, i).encode()) for i in ids}
    return {
        i: next(p for p, rs in layout.items() if any(lo <= s <= hi for lo, hi in rs))
        for i, s in slots.items()
    }


@pytest.mark.cluster
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_cluster_batch_claims_and_completes_in_one_pipeline_per_node(
    redis_cluster: RedisClusterSet,
    prefix: str,
    sfs: list[SingleFlight],
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    """60 items over many slots of the 3 masters: each round (claims, completes) is one
    pipeline per node, and no script goes on its own."""
    items = list(range(60))
    where = owners(redis_cluster, prefix, items)
    assert len(set(where.values())) == 3
    assert len({key_slot(user(prefix, i).encode()) for i in items}) > 50
    pipelines: list[int] = []
    alone: list[Any] = []
    pipelined = transport._pipelined

    def counted(node: Any, calls: Any, stamps: Any, ks: Any) -> list[Any]:
        pipelines.append(len(ks))
        return pipelined(node, calls, stamps, ks)

    sf = _sf(sfs, cluster_url(redis_cluster), prefix)
    sf.call("warm", lambda: 1)  # the route and the scripts, before counting
    monkeypatch.setattr(transport, "_pipelined", counted)
    real = transport.Transport.run_sync_script

    def one(self: Any, call: Any, *args: Any) -> Any:
        alone.append(call)
        return real(self, call, *args)

    monkeypatch.setattr(transport.Transport, "run_sync_script", one)
    calls: list[list[int]] = []

    @sf.batch(key=bw.KEY, namespace=bw.NAMESPACE)
    def load(ids: list[int]) -> dict[int, int]:
        calls.append(list(ids))
        return {i: i * 2 for i in ids}

    @sf.batch(key=bw.KEY, namespace=bw.NAMESPACE)
    async def aload(ids: list[int]) -> dict[int, int]:
        calls.append(list(ids))
        return {i: i * 2 for i in ids}

    got = load(items) if mode == "sync" else asyncio.run(aload(items))
    assert got == {i: i * 2 for i in items} and calls == [items]
    per_node = sorted(Counter(where.values()).values())
    assert sorted(pipelines) == sorted(per_node * 2), pipelines  # claims, then completes
    assert alone == []


@pytest.mark.cluster
@pytest.mark.timeout(90)
@pytest.mark.parametrize("finish", [True, False], ids=["moved", "open"])
def test_cluster_batches_across_processes_with_a_slot_migrating_mid_batch(
    redis_cluster: RedisClusterSet, prefix: str, procs: list[Any], finish: bool
) -> None:
    """Two processes' overlapping batches over many slots of the 3 masters; while the first
    still runs, a slot holding items of both (their leases, the second's subscriptions) moves
    to another master (finished: MOVED; or left open with its keys moved: ASK, TRYAGAIN).
    Every item runs once; each caller gets every value."""
    url = cluster_url(redis_cluster)
    a, b = list(range(0, 40)), list(range(20, 60))
    where = owners(redis_cluster, prefix, a + b)
    assert len(set(where.values())) == 3
    moving = 25  # an item of both batches, led by the first
    slot = key_slot(user(prefix, moving).encode())
    assert slot != key_slot(bw.aux(prefix, "x").encode())
    src = owner_of(redis_cluster, slot)
    dst = next(s for s in redis_cluster.servers if s is not src)
    aux_client = bw.counter(url)
    out_a, out_b = SPAWN.Queue(), SPAWN.Queue()
    try:
        kw = {"lock_ttl": 2.0}
        start(procs, bw.call, url, prefix, "batch", a, 30.0, None, out_a, kw)
        (first,) = started(aux_client, prefix, 1)
        start(procs, bw.call, url, prefix, "batch", b, 0, None, out_b, kw)
        started(aux_client, prefix, 1)  # the second ran 40..59, then follows 20..39
        until(lambda: shard_numsub(src, user(prefix, moving)) >= 1, 30, "the follower")
        migrate_slot(redis_cluster, slot, src, dst, finish=finish)
        tryagains = errorstat(src, "TRYAGAIN") + errorstat(dst, "TRYAGAIN")
        go(aux_client, prefix, first)
        if not finish:  # the first's complete meets the open slot; the move then completes
            until(lambda: errorstat(src, "TRYAGAIN") + errorstat(dst, "TRYAGAIN") > tryagains,
                  30, "a script to meet TRYAGAIN")  # fmt: skip
            finish_migration(redis_cluster, slot, src, dst)
        results = [out_a.get(timeout=45), out_b.get(timeout=45)]
    finally:
        restore_slot(redis_cluster, slot, src)
    assert [r[0] for r in results] == ["ok", "ok"], results
    got_a, got_b = results[0][2], results[1][2]
    assert list(got_a) == a and list(got_b) == b
    assert all(got_a[i] == got_b[i] and got_a[i]["pid"] == first for i in range(20, 40))
    assert runs(aux_client, prefix, a + b) == dict.fromkeys(a + b, 1)
    aux_client.delete(*(bw.aux(prefix, "runs", i) for i in a + b))


# --------------------------------------------------------------------------- Redis down


def closed_port() -> int:
    """A loopback port nothing listens on (taken from the kernel, then let go)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_batch_runs_in_process_while_redis_is_down_under_local(
    prefix: str, sfs: list[SingleFlight], mode: str
) -> None:
    """on_backend_error="local": as a single-key call, a batch runs its items in this process
    (no lease: token 0), still once per item for the process's callers; the first batch finds
    Redis down, the next skips it during the outage."""
    sf = SingleFlight(f"redis://127.0.0.1:{closed_port()}", prefix=prefix,
                      on_backend_error="local", connect_timeout=0.5)  # fmt: skip
    sfs.append(sf)
    calls: list[list[int]] = []
    running, release = threading.Event(), threading.Event()

    def record(ids: list[int]) -> dict[int, tuple[int, int]]:
        flight = current_flight()
        assert isinstance(flight, BatchFlight)
        calls.append(list(ids))
        return {i: (i, flight.items[i].token) for i in ids}

    def held(ids: list[int]) -> dict[int, tuple[int, int]]:
        got = record(ids)
        running.set()
        assert release.wait(30)
        return got

    async def aheld(ids: list[int]) -> dict[int, tuple[int, int]]:
        got = record(ids)
        running.set()
        await asyncio.to_thread(release.wait, 30)
        return got

    async def arecord(ids: list[int]) -> dict[int, tuple[int, int]]:
        return record(ids)

    if mode == "sync":
        first = spawn(lambda: sf.call_batch([1, 2, 3], held, key="d:{item}"))
        assert running.wait(30)
        second = spawn(lambda: sf.call_batch([2, 3, 4], record, key="d:{item}"))
        until(lambda: calls == [[1, 2, 3], [4]], 30, "the second batch to run item 4")
        release.set()
        got = [first.result(), second.result()]
    else:

        async def both() -> list[Any]:
            first = asyncio.ensure_future(sf.call_batch([1, 2, 3], aheld, key="d:{item}"))
            await asyncio.to_thread(running.wait, 30)
            second = asyncio.ensure_future(sf.call_batch([2, 3, 4], arecord, key="d:{item}"))
            while calls != [[1, 2, 3], [4]]:
                await asyncio.sleep(0.01)
            release.set()
            return [await first, await second]

        got = asyncio.run(both())
    assert got == [{i: (i, 0) for i in (1, 2, 3)}, {i: (i, 0) for i in (2, 3, 4)}]
    assert calls == [[1, 2, 3], [4]]  # each item once: the second joined items 2 and 3
    assert sf.stats()["local_runs"] >= 1


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_uncontended_batch_takes_one_round_trip_to_claim_and_one_to_complete(
    redis_url: str,
    prefix: str,
    sfs: list[SingleFlight],
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    """Standalone, dedupe's own connections: 50 items claimed in one pipeline and completed
    in one, with no script sent on its own; also as the first batch on an event loop."""
    sf = _sf(sfs, redis_url, prefix)
    sf.call_batch([0], lambda ids: {i: i for i in ids}, key="warm:{item}")  # loads the scripts
    pipelines: list[int] = []
    alone: list[Any] = []
    cls = wire.SyncWire if mode == "sync" else wire.AsyncWire
    many, one = cls.run_many_on, transport.Transport.run_sync_script
    aone = transport.Transport.run_async_script

    def counted(self: Any, conn: Any, calls: Any, stamps: Any) -> Any:
        pipelines.append(len(calls))
        return many(self, conn, calls, stamps)

    def single(self: Any, call: Any, *args: Any) -> Any:
        alone.append(call)
        return one(self, call, *args)

    async def asingle(self: Any, call: Any, *args: Any) -> Any:
        alone.append(call)
        return await aone(self, call, *args)

    monkeypatch.setattr(cls, "run_many_on", counted)
    monkeypatch.setattr(transport.Transport, "run_sync_script", single)
    monkeypatch.setattr(transport.Transport, "run_async_script", asingle)
    items = list(range(50))

    async def afetch(ids: list[int]) -> dict[int, int]:
        return {i: i for i in ids}

    if mode == "sync":
        got = sf.call_batch(items, lambda ids: {i: i for i in ids}, key="rt:{item}")
    else:
        got = asyncio.run(sf.call_batch(items, afetch, key="rt:{item}"))
    assert got == {i: i for i in items}
    assert pipelines == [50, 50] and alone == []


def cluster_state(server: Any) -> str:
    with server.client() as c:
        return str(c.execute_command("CLUSTER", "INFO").decode()).split("cluster_state:")[1][:2]


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_cluster_batch_with_a_master_down_sends_one_script_alone_per_round(
    redis_cluster: RedisClusterSet,
    prefix: str,
    sfs: list[SingleFlight],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A master dies after the first batch: the claims of its items find it gone, and the
    completes of the others meet CLUSTERDOWN. Per round, one script goes on its own through
    the client (with its patience); the rest fail with it (BackendUnavailable per item)
    instead of each waiting as long in turn. The items on live masters keep their values."""
    monkeypatch.setattr(transport, "_MIGRATION_PATIENCE", 0.2)
    sf = _sf(sfs, cluster_url(redis_cluster), prefix, socket_timeout=1.0, connect_timeout=0.5)
    sf.call_batch(list(range(3)), lambda ids: {i: i for i in ids}, key="warm:{item}")
    items = list(range(10, 40))
    dead = redis_cluster.servers[1]
    live = [s for s in redis_cluster.servers if s is not dead]
    on_dead = {i for i, port in owners(redis_cluster, prefix, items).items() if port == dead.port}
    assert on_dead and len(on_dead) < len(items)
    caller = threading.get_ident()
    alone: list[str] = []
    real = transport.Transport.run_sync_script

    def one(self: Any, call: Any, *args: Any) -> Any:
        if threading.get_ident() == caller:  # not the background releaser's
            alone.append(call.keys[0])
        return real(self, call, *args)

    monkeypatch.setattr(transport.Transport, "run_sync_script", one)

    def fetch(ids: list[int]) -> dict[int, int]:
        # The Cluster says it is down before we complete: every node answers CLUSTERDOWN.
        until(lambda: all(cluster_state(s) == "fa" for s in live), 30, "cluster_state:fail")
        return {i: i for i in ids}

    dead.kill()
    got = sf.call_batch_detailed(items, fetch, key=f"{bw.NAMESPACE}:{bw.KEY}")  # as user()
    assert set(got.errors) == on_dead
    assert all(isinstance(e, BackendUnavailable) for e in got.errors.values())
    assert got.values == {i: i for i in items if i not in on_dead}  # kept for their callers
    assert len(alone) == 2, alone  # one claim, one complete
