"""dedupe.ops.inspector against real Redis: leases held by real flights, kept outcomes, Cluster."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
import redis.cluster
from helpers import _sf

from dedupe import SingleFlight
from dedupe.core.keys import names_for
from dedupe.core.owners import Holder, OwnerIds, format_owner, parse_owner
from dedupe.ops.inspector import forget, inspect, names_of, scan

pytestmark = pytest.mark.timeout(30)


def until(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@contextmanager
def held(
    make: Callable[[], SingleFlight], job_id: str, followers: int = 0
) -> Iterator[tuple[SingleFlight, threading.Event]]:
    """A real flight leading ``job_id`` (its function waits for the event), with
    ``followers`` SingleFlights of their own (each its own hub: one subscriber each)."""
    release, started = threading.Event(), threading.Event()
    results: list[Any] = []

    def work() -> str:
        started.set()
        assert release.wait(20), "the test never released the leader"
        return "done"

    leader = make()
    others = [make() for _ in range(followers)]
    threads = [threading.Thread(target=lambda: results.append(leader.call(job_id, work)))]
    threads[0].start()
    try:
        assert started.wait(10), "the leader never started"
        for sf in others:
            t = threading.Thread(target=lambda sf=sf: results.append(sf.call(job_id, work)))
            t.start()
            threads.append(t)
        yield leader, release
    finally:
        release.set()
        for t in threads:
            t.join(20)
        for sf in (leader, *others):
            sf.close()
    assert results == ["done"] * (1 + followers)


# --- owner ids -----------------------------------------------------------------------------


def test_owner_ids_name_host_pid_and_start_and_parse_back() -> None:
    owner = format_owner("ab12cd34ef56ab78", 7, started_ms=1_764_625_203_120)
    assert ":" not in owner
    holder = parse_owner(f"1764625203120001:{owner}")
    assert holder == Holder(
        token=1764625203120001,
        owner=owner,
        host=socket.gethostname().replace(":", "_").replace("/", "_"),
        pid=os.getpid(),
        started_ms=1_764_625_203_120,
        instance="ab12cd34ef56ab78",
        seq=7,
    )


def test_owner_ids_count_up_within_one_instance() -> None:
    ids = OwnerIds()
    first, second = parse_owner(f"1:{ids()}"), parse_owner(f"2:{ids()}")
    assert (first.instance, first.seq, second.seq) == (ids.instance, 1, 2)
    assert first.pid == os.getpid() and first.started_ms is not None
    assert abs(first.started_ms - time.time() * 1000) < 60_000
    assert OwnerIds().instance != ids.instance


def test_older_owner_ids_parse_without_host() -> None:
    assert parse_owner(b"42:90926cfe4a8b40c7.1") == Holder(42, "90926cfe4a8b40c7.1")


@pytest.mark.parametrize("value", ["", "no-token", "x:owner", ":owner"])
def test_values_dedupe_did_not_write_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="not a dedupe lock value"):
        parse_owner(value)


@pytest.mark.parametrize("instance", ["", "a:b", "a/b", "a.b"])
def test_owner_instances_that_would_break_the_format_are_refused(instance: str) -> None:
    with pytest.raises(ValueError, match="owner instance"):
        format_owner(instance, 1)


# --- standalone ----------------------------------------------------------------------------


def test_nothing_there(redis_client: redis.Redis, prefix: str) -> None:
    state = inspect(redis_client, prefix, "absent")
    assert (state.holder, state.lease_ms, state.kept, state.subscribers) == (None, None, None, 0)
    assert not state.in_flight
    assert scan(redis_client, prefix) == []
    assert forget(redis_client, prefix, "absent") is False


def test_a_held_lease_its_follower_then_its_kept_outcome(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    def make() -> SingleFlight:
        return SingleFlight(redis_url, prefix=prefix, result_ttl=30, lock_ttl=10)

    names = names_for(prefix, "report:42")
    with held(make, "report:42", followers=1):
        until(lambda: inspect(redis_client, prefix, "report:42").subscribers == 1, "a follower")
        state = inspect(redis_client, prefix, "report:42")
        raw = redis_client.get(names.lock)
        assert raw is not None
        assert state.holder == parse_owner(raw)
        assert state.holder.token > 0 and state.in_flight
        assert state.lease_ms is not None and 0 < state.lease_ms <= 10_000
        assert state.token_counter == state.holder.token
        assert state.kept is None
        assert scan(redis_client, prefix) == ["report:42"]
        token = state.holder.token
    state = inspect(redis_client, prefix, "report:42")
    assert state.holder is None and state.subscribers == 0
    kept = state.kept
    assert kept is not None
    assert (kept.token, kept.kind) == (token, "value")
    assert 30_000 <= kept.keep_ms < 40_000  # result_ttl plus the run (from the lease's grant)
    # Fresh for result_ttl after the run: up to one round trip more, as the lease's grant
    # came after the acquire was sent (the client's clock starts the run there).
    assert 0 <= kept.age_ms < kept.keep_ms and 0 < kept.fresh_ms <= 31_000
    assert kept.size == len(redis_client.get(names.result) or b"")
    assert scan(redis_client, prefix) == ["report:42"]
    assert forget(redis_client, prefix, "report:42") is True
    assert redis_client.exists(names.result) == 0
    assert scan(redis_client, prefix) == []


def test_kept_errors_and_records_past_their_keep(redis_client: redis.Redis, prefix: str) -> None:
    names = names_for(prefix, "j")
    redis_client.set(names.result, b"9:0:5000:DD\x01ep\x00{}", px=5000)
    kept = inspect(redis_client, prefix, "j").kept
    assert kept is not None and (kept.token, kept.kind, kept.fresh_ms) == (9, "error", 0)
    redis_client.set(names.result, b"garbage", px=5000)
    kept = inspect(redis_client, prefix, "j").kept
    assert kept is not None and kept.kind == "unknown"
    redis_client.set(names.lock, "hand-written")
    state = inspect(redis_client, prefix, "j")
    assert state.holder is None and state.unreadable_lock == "hand-written" and state.in_flight


def test_long_ids_are_listed_by_tag_and_the_tag_inspects_them(
    redis_client: redis.Redis, prefix: str
) -> None:
    long_id = "x" * 300
    names = names_for(prefix, long_id)
    redis_client.set(names.result, b"1:1000:1000:DD\x01vp\x00", px=5000)
    (tag,) = scan(redis_client, prefix)
    assert tag.startswith("#") and names_of(prefix, tag) == names._replace(job_id=tag)
    assert inspect(redis_client, prefix, tag).kept is not None
    assert forget(redis_client, prefix, tag) is True


def test_scan_takes_the_prefix_literally(redis_client: redis.Redis, prefix: str) -> None:
    redis_client.set(names_for(f"{prefix}Xb", "j").lock, "1:o", px=5000)
    redis_client.set(names_for(f"{prefix}*b", "k").lock, "1:o", px=5000)
    assert scan(redis_client, f"{prefix}*b") == ["k"]
    assert scan(redis_client, f"{prefix}Xb") == ["j"]


def test_clients_that_decode_responses_work_too(redis_server: Any, prefix: str) -> None:
    client = redis_server.client(decode_responses=True)
    try:
        names = names_for(prefix, "j")
        client.set(names.lock, "5:host/1/2/abc.3", px=5000)
        state = inspect(client, prefix, "j")
        assert state.holder is not None and (state.holder.host, state.holder.pid) == ("host", 1)
        assert scan(client, prefix) == ["j"]
    finally:
        client.close()


# --- cluster -------------------------------------------------------------------------------


def _spread_ids(client: redis.cluster.RedisCluster, prefix: str) -> list[str]:
    """Three job ids whose slots live on three different primaries."""
    by_node: dict[str, str] = {}
    i = 0
    while len(by_node) < 3:
        job = f"job-{i}"
        node = client.get_node_from_key(names_for(prefix, job).lock)
        by_node.setdefault(node.name, job)
        i += 1
    return sorted(by_node.values())


def test_cluster_scan_covers_every_primary_and_counts_shard_subscribers(
    redis_cluster: Any, prefix: str
) -> None:
    client = redis_cluster.client()
    try:
        jobs = _spread_ids(client, prefix)
        for job in jobs[1:]:
            client.set(names_for(prefix, job).result, b"3:20000:20000:DD\x01vp\x00", px=20_000)

        def make() -> SingleFlight:
            return SingleFlight(client=redis_cluster.client(), prefix=prefix, result_ttl=30)

        with held(make, jobs[0], followers=2):
            until(lambda: inspect(client, prefix, jobs[0]).subscribers == 2, "two followers")
            assert scan(client, prefix) == jobs
            state = inspect(client, prefix, jobs[0])
            assert state.holder is not None and state.lease_ms is not None
            assert inspect(client, prefix, jobs[1]).kept is not None
        assert forget(client, prefix, jobs[0]) is True
        assert inspect(client, prefix, jobs[0]).kept is None
    finally:
        client.close()


# ---------------------------------------------------- a running flight, in the process and in Redis


@pytest.mark.timeout(30)
def test_inflight_and_inspect_show_a_running_flight(
    redis_url: str, prefix: str, sfs: list[Any]
) -> None:
    sf = _sf(sfs, redis_url, prefix, lock_ttl=5)
    running, release = threading.Event(), threading.Event()

    def job() -> str:
        running.set()
        assert release.wait(20)
        return "v"

    t = threading.Thread(target=lambda: sf.call("seen", job))
    t.start()
    try:
        assert running.wait(10)
        [info] = sf.inflight()
        assert (info.job_id, info.state, info.driver) == ("seen", "leading", "sync")
        assert info.age_s >= 0
        state = sf.inspect("seen")
        assert state.holder is not None and state.holder.pid == os.getpid()
        assert state.lease_ms is not None and 0 < state.lease_ms <= 5000
    finally:
        release.set()
        t.join(10)
    assert sf.inflight() == []


# --- cache fill states (issue 20) ------------------------------------------------------------


def test_inspect_shows_fresh_stale_refreshing_and_backing_off(redis_url: str, prefix: str) -> None:
    """A value goes fresh -> stale; a refresh shows while it runs; a failed run whose
    error a stale value stood in for shows the backoff, with its time left."""
    sf = SingleFlight(
        redis_url, prefix=prefix, result_ttl=0.2, stale_while_revalidate=60,
        stale_if_error=60, error_backoff=30,
    )  # fmt: skip
    client = redis.Redis.from_url(redis_url)
    job = "inspect-cache-states"
    gate, started = threading.Event(), threading.Event()
    mode = {"fail": False, "block": False}

    def work() -> str:
        if mode["block"]:
            started.set()
            assert gate.wait(20), "the test never released the refresh"
        if mode["fail"]:
            raise ConnectionError("origin down")
        return "v"

    try:
        assert sf.call(job, work) == "v"
        state = inspect(client, prefix, job)
        assert state.kept is not None and state.kept.state == "fresh", state
        assert state.cache_state == "fresh" and state.kept.fresh_ms > 0

        def stale_for_a_while() -> bool:
            kept = inspect(client, prefix, job).kept
            return kept is not None and kept.state == "stale" and kept.stale_ms > 0

        until(stale_for_a_while, "the value to go stale")
        state = inspect(client, prefix, job)
        assert state.cache_state == "stale" and state.kept is not None
        assert state.kept.stale_ms > 0 and state.kept.fresh_ms == 0
        assert not state.refreshing and state.backoff_ms is None

        mode["block"] = True  # the next call is served stale; its refresh waits on the gate
        served = sf.call_detailed(job, work)
        assert served.stale and served.value == "v"
        assert started.wait(10)
        state = inspect(client, prefix, job)
        assert state.refreshing and state.holder is not None and state.cache_state == "stale"

        mode["fail"] = True  # the refresh fails: the stale value stands in, the backoff starts
        gate.set()
        until(lambda: inspect(client, prefix, job).backoff_ms is not None, "the backoff")
        state = inspect(client, prefix, job)
        assert state.cache_state == "backing off", state
        assert state.backoff_ms is not None and 0 < state.backoff_ms <= 30_000
        assert state.kept is not None and state.kept.state == "stale"  # the good value stays

        assert sf.forget(job)  # a forget moves the counter on: the record is no longer current
        state = inspect(client, prefix, job)
        assert state.cache_state in ("none", "backing off")
        assert state.kept is None or state.kept.state == "not current"
    finally:
        sf.close()
        client.close()
