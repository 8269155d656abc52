"""The lease lasts until the outcome is stored: renewed every lock_ttl/3 from acquire until
the complete script returned, so a slow encode or a slow complete never lets a waiter run the
job beside a live leader; renewals go in batches, one round trip per node for all of a
process's leases, a thread per node, so a slow node delays only its own leases.

Renewal on a migrating Cluster slot is in test_cluster.py.
"""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import redis
import redis.cluster
import workers
from helpers import SPAWN, _client, _hold, _sf, _take_over, gather, start, until, wait_started
from proxy import Proxy

from dedupe import SingleFlight
from dedupe.backend.renewal import Renewer, renew_many
from dedupe.core.keys import names_for
from dedupe.core.leases import RENEW_UNKNOWN, Lease
from devtools.servers import RedisClusterSet, RedisServer

pytestmark = pytest.mark.timeout(40)


# ------------------------------------------------------- renewed until the complete script returned


@pytest.mark.timeout(60)
def test_lease_is_renewed_for_a_job_many_times_its_ttl(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any]
) -> None:
    out = SPAWN.Queue()
    kw = {"lock_ttl": 0.3}
    leader = start(procs, workers.call_once, redis_url, prefix, "long", "value", 2.0, out, kw)
    assert wait_started(redis_client, prefix) == leader.pid
    for _ in range(2):
        start(procs, workers.call_once, redis_url, prefix, "long", "value", 2.0, out, kw)
    results = gather(out, 3, timeout=30)
    assert int(redis_client.get(f"{prefix}:runs") or 0) == 1
    assert {r[2]["pid"] for r in results} == {leader.pid}


@pytest.mark.timeout(60)
def test_lease_renewed_until_the_outcome_is_stored(
    redis_url: str, redis_client: redis.Redis, prefix: str, sfs: list[Any]
) -> None:
    """Encoding the value outlasts the lease several times over: nobody takes over a live
    leader, and the job runs once."""
    release = threading.Event()
    renewed_during_encoding: list[int] = []
    names = names_for(prefix, "slow-encode")

    class Slow:
        def __reduce__(self) -> Any:
            # Encoding: wait until the lock was seen renewed long past the first lease.
            assert release.wait(20)
            return (str, ("slow",))

    runs: list[int] = []

    def work() -> Any:
        runs.append(1)
        return Slow()

    sf_a = _sf(sfs, redis_url, prefix, lock_ttl=0.5, serializer="pickle", secret="s" * 32)
    sf_b = _sf(sfs, redis_url, prefix, lock_ttl=0.5, serializer="pickle", secret="s" * 32)
    results: dict[str, Any] = {}
    ta = threading.Thread(target=lambda: results.__setitem__("a", sf_a.call("slow-encode", work)))
    ta.start()
    until(lambda: bool(runs), what="the leader to run")
    tb = threading.Thread(target=lambda: results.__setitem__("b", sf_b.call("slow-encode", work)))
    tb.start()
    # Watch the lease live on for 4 lock_ttl (2 s) while the leader is encoding.
    first = redis_client.get(names.lock)
    assert first is not None
    deadline_checks = 0
    while deadline_checks < 20:
        assert redis_client.get(names.lock) == first, "the lease lapsed while encoding"
        renewed_during_encoding.append(int(redis_client.pttl(names.lock)))
        threading.Event().wait(0.1)
        deadline_checks += 1
    release.set()
    ta.join(10)
    tb.join(10)
    assert len(runs) == 1
    assert results["b"] == "slow"


@pytest.mark.timeout(120)
def test_an_encode_longer_than_the_lease_never_lets_a_waiter_run_the_job(
    redis_url: str, redis_client: redis.Redis, prefix: str, procs: list[Any]
) -> None:
    """The leader's value takes the C JSON encoder several leases to encode. Renewal threads
    cannot run while one C call holds the GIL, so the safe serializer encodes a value that
    large in pieces: the lease stays renewed, and the process waiting on it follows."""
    # The rest of the suite's heap out of the collector's sight for this test (gc.freeze):
    # a full collection walks every object in the process holding the GIL, and in a long
    # test process one took longer than this 0.2 s lease (CI saw a waiter take over). What
    # is tested is dedupe's own encode, whose tree no longer sets collections off.
    gc.collect()
    gc.freeze()
    try:
        _encode_longer_than_the_lease(redis_url, redis_client, prefix, procs)
    finally:
        gc.unfreeze()


def _encode_longer_than_the_lease(
    redis_url: str, redis_client: redis.Redis, prefix: str, procs: list[Any]
) -> None:
    ttl = 0.2
    n = 50_000
    while True:
        value = [{"id": i, "name": f"item-{i}", "score": i * 0.5} for i in range(n)]
        started = time.perf_counter()
        json.dumps(value)
        if time.perf_counter() - started >= 3 * ttl:
            break
        n *= 2
    channel = names_for(prefix, "big").channel
    out = SPAWN.Queue()
    sf = SingleFlight(redis_url, prefix=prefix, lock_ttl=ttl, max_payload_bytes=None)

    def lead() -> list[Any]:
        redis_client.incr(f"{prefix}:runs")
        # No payload limit on either side: the value's size grows with this machine's speed
        # (it must take 3 leases to encode), and past 64 MiB a follower would rightly get
        # ResultTooLarge instead of the value.
        start(procs, workers.call_once, redis_url, prefix, "big", "value", 0.0, out,
              {"lock_ttl": ttl, "max_payload_bytes": None})  # fmt: skip
        until(lambda: redis_client.pubsub_numsub(channel)[0][1] >= 1, 30, "a waiter")
        return value

    try:
        assert sf.call("big", lead) is value
    finally:
        sf.close()
    kind, _, theirs = out.get(timeout=60)
    assert int(redis_client.get(f"{prefix}:runs") or 0) == 1
    assert kind == "ok", theirs
    assert theirs == value


def test_removed_lease_stops_being_renewed(
    redis_client: redis.Redis, prefix: str, renewers: Callable[..., Renewer]
) -> None:
    key = f"{prefix}:lock"
    lease = _hold(redis_client, key, 1.0)
    renewer = renewers(lambda items: renew_many(redis_client, items))
    renewer.add(lease)
    until(lambda: renewer.stats()["renewed"] >= 1, 5, "a renewal")
    renewer.remove(lease)
    assert renewer.pending() == 0
    _take_over(redis_client, key, 5)
    assert renewer.lost == 0  # a removal is not a loss


# -------------------------------- batches: one round trip per node, a slow node delays only its own


def _evalsha_calls(client: redis.Redis) -> int:
    stats: Any = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0)) + int(
        stats.get("cmdstat_eval", {}).get("calls", 0)
    )


@pytest.mark.timeout(40)
def test_ten_thousand_leases_renew_in_a_few_round_trips(
    proxy: Proxy,
    redis_client: redis.Redis,
    prefix: str,
    renewers: Callable[..., Renewer],
) -> None:
    n, ttl = 10_000, 3.0
    keys = [f"{prefix}:{i}:lock" for i in range(n)]
    sent = time.monotonic()
    pipe = redis_client.pipeline(transaction=False)
    for key in keys:
        pipe.set(key, "1:me", px=int(ttl * 1000))
    pipe.execute()
    leases = [Lease(key, key, "1:me", ttl, acquired_at=sent, max_hold=None) for key in keys]
    through = _client(proxy.address)
    renewer = renewers(lambda items: renew_many(through, items))
    calls_before = _evalsha_calls(redis_client)
    for lease in leases:
        renewer.add(lease)
    until(lambda: renewer.stats()["renewed"] >= n, 30, "every lease renewed once")
    # Counted outside our code: the server ran the renewals, the proxy saw the round trips.
    assert _evalsha_calls(redis_client) - calls_before >= n
    assert proxy.commands >= n
    assert proxy.round_trips <= 20, f"{proxy.round_trips} round trips for {n} renewals"
    stats = renewer.stats()
    print(f"round trips {proxy.round_trips}, commands {proxy.commands}, stats {stats}")
    assert stats["renewal_batches"] <= 10
    assert not any(lease.lost.is_set() for lease in leases)
    for lease in leases:
        renewer.remove(lease)
    assert renewer.pending() == 0


@pytest.mark.timeout(30)
def test_after_a_pause_the_backlog_goes_out_most_urgent_first(
    renewers: Callable[..., Renewer],
) -> None:
    """A round trip stalls 1 s (a slow node, a full garbage collection; inside a 2 s lease):
    4,000 other leases of the group come due meanwhile, the most urgent with 0.23 s left.
    The backlog must not go out as one pipeline that answers none of its leases until all
    went through (4,000 at 0.1 ms each: 0.4 s, past that lease's deadline): the most urgent
    go first, in round trips short enough for their replies to come back in time, and no
    lease is lost. Timed in the fake round trip (sleeps, GIL released), which renews 10,000
    leases a second while 6,000 a second come due: a renewer can keep up."""
    n, ttl, pause, cost = 4000, 2.0, 1.0, 0.0001
    stalled = threading.Event()
    sizes: list[int] = []

    def renew(items: list[tuple[str, str, int]]) -> list[int]:
        sizes.append(len(items))
        if not stalled.is_set():
            stalled.set()
            time.sleep(pause)
        time.sleep(cost * len(items))
        return [1] * len(items)

    renewer = renewers(renew)
    interval = ttl / 3
    # One lease due now: its round trip is the one that stalls.
    leases = [Lease("k", "k", "1:me", ttl, acquired_at=time.monotonic() - interval, max_hold=None)]
    renewer.add(leases[0])
    assert stalled.wait(10)
    # The rest due one after another over the next interval: all come due in the pause.
    now = time.monotonic()
    leases += [
        Lease(f"k{i}", f"k{i}", "1:me", ttl, acquired_at=now - interval + interval * i / n,
              max_hold=None)
        for i in range(n)
    ]  # fmt: skip
    for lease in leases[1:]:
        renewer.add(lease)
    until(lambda: renewer.stats()["renewed"] >= 2 * n, 20, "every lease renewed twice")
    lost = sum(lease.lost.is_set() for lease in leases)
    assert lost == 0, f"{lost} of {n + 1} leases lost; round trips of {sizes[:12]}..."
    assert renewer.lost == 0, renewer.stats()


@pytest.mark.timeout(30)
def test_a_stuck_group_does_not_delay_another_group(
    redis_server: RedisServer,
    fresh_redis: RedisServer,
    prefix: str,
    renewers: Callable[..., Renewer],
) -> None:
    """Two servers, two groups; the link to A is blackholed (its round trip hangs 10 s):
    the lease on B keeps being renewed, past its own length, and is never lost."""
    direct_a, direct_b = redis_server.client(), fresh_redis.client()
    with Proxy(redis_server.address) as proxy_a:
        via_a = _client(proxy_a.address, socket_timeout=10.0)
        via_b = _client(fresh_redis.address, socket_timeout=10.0)
        key_a, key_b = f"{prefix}:a:lock", f"{prefix}:b:lock"

        def group_of(key: str) -> str:
            return "A" if key == key_a else "B"

        def renew(items: list[tuple[str, str, int]]) -> Sequence[int]:
            return renew_many(via_a if group_of(items[0][0]) == "A" else via_b, items)

        renewer = renewers(renew, group_of)
        lease_a, lease_b = _hold(direct_a, key_a, 1.0), _hold(direct_b, key_b, 1.0)
        renewer.add(lease_a)
        renewer.add(lease_b)
        until(lambda: renewer.stats()["renewed"] >= 2, 5, "both leases renewed once")
        proxy_a.blackhole()
        until(lambda: proxy_a.held > 0, 5, "a renewal on A to hang")
        start = _evalsha_calls(direct_b)
        # Four renewals of B take longer than B's lease: all while A's round trip hangs.
        until(lambda: _evalsha_calls(direct_b) >= start + 4, 10, "B renewed while A hangs")
        assert proxy_a.held > 0
        assert not lease_b.lost.is_set()
        assert direct_b.get(key_b) == b"1:me" and direct_b.pttl(key_b) > 0
        until(lease_a.lost.is_set, 5, "A's lease lost by the clock")
        assert not lease_b.lost.is_set()
        proxy_a.heal()


def test_renew_many_standalone_and_noscript_fallback(
    redis_client: redis.Redis, prefix: str
) -> None:
    mine, theirs, gone = (f"{prefix}:{n}" for n in ("mine", "theirs", "gone"))
    redis_client.set(mine, "1:me", px=1000)
    redis_client.set(theirs, "1:other", px=1000)
    redis_client.script_flush()  # the first renewal meets NOSCRIPT and falls back to EVAL
    items = [(mine, "1:me", 5000), (theirs, "1:me", 5000), (gone, "1:me", 5000)]
    assert renew_many(redis_client, items) == [1, 0, 0]
    assert redis_client.pttl(mine) > 1000 and redis_client.pttl(theirs) <= 1000
    redis_client.set(gone, "not a lock")
    redis_client.hset(f"{prefix}:hash", "f", "v")
    assert renew_many(redis_client, [(f"{prefix}:hash", "1:me", 5000)]) == [0]
    assert renew_many(redis_client, []) == []


def test_renew_many_raises_when_the_round_trip_fails(fresh_redis: RedisServer) -> None:
    client = _client(fresh_redis.address, socket_timeout=1.0)
    fresh_redis.stop()
    with pytest.raises(redis.ConnectionError):
        renew_many(client, [("k", "1:me", 1000)])


@pytest.mark.cluster
def test_renew_many_on_a_cluster_one_pipeline_per_node(
    redis_cluster: RedisClusterSet, prefix: str, renewers: Callable[..., Renewer]
) -> None:
    cluster: Any = redis_cluster.client()
    keys = [f"{prefix}:{{job{i}}}:lock" for i in range(300)]
    for key in keys:
        cluster.set(key, "1:me", px=60_000)
    items = [(key, "1:me", 120_000) for key in keys]
    assert renew_many(cluster, items) == [1] * len(keys)
    assert all(cluster.pttl(key) > 60_000 for key in keys)
    # And through a Renewer, one group per node.
    nodes = {cluster.get_node_from_key(key).name for key in keys}
    assert len(nodes) == 3
    renewer = renewers(
        lambda batch: renew_many(cluster, batch),
        lambda key: str(cluster.get_node_from_key(key).name),
    )
    sent = time.monotonic()
    for key in keys:
        cluster.set(key, "1:me", px=600)
    for key in keys:
        renewer.add(Lease(key, key, "1:me", 0.6, acquired_at=sent, max_hold=None))
    until(lambda: renewer.stats()["renewed"] >= len(keys), 10, "every lease renewed")
    assert renewer.stats()["renewal_batches"] <= 3 * 3
    assert renewer.lost == 0
    assert renew_many(cluster, [(keys[0], "1:other", 1000)]) == [0]
    assert RENEW_UNKNOWN not in renew_many(cluster, items[:5])


@pytest.mark.cluster
@pytest.mark.timeout(30)
def test_renew_many_on_a_cluster_a_frozen_node_costs_only_its_own_keys(
    redis_cluster: RedisClusterSet, prefix: str
) -> None:
    cluster: Any = redis_cluster.client(socket_timeout=0.5, socket_connect_timeout=0.5)
    keys = [f"{prefix}:{{f{i}}}:lock" for i in range(60)]
    for key in keys:
        cluster.set(key, "1:me", px=60_000)
    frozen_node = cluster.get_node_from_key(keys[0])
    frozen = next(s for s in redis_cluster.servers if s.port == frozen_node.port)
    frozen.pause()
    try:
        replies = renew_many(cluster, [(key, "1:me", 60_000) for key in keys])
    finally:
        frozen.resume()
    for key, reply in zip(keys, replies, strict=True):
        on_frozen = cluster.get_node_from_key(key).port == frozen_node.port
        assert reply == (RENEW_UNKNOWN if on_frozen else 1), key
