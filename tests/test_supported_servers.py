"""Supported versions: a Cluster older than Redis 7.0 (no sharded pub/sub) is refused at the
first call, before any lease; a standalone Redis 6.2 runs flights.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from helpers import until

from dedupe import SingleFlight
from devtools.servers import RedisServer


@pytest.mark.timeout(120)
def test_a_cluster_older_than_7_is_refused_at_the_first_call() -> None:
    """Redis 6.2 has no sharded pub/sub: the first call, sync or async, raises
    UnsupportedServer naming the version, before any lease (no lock key is written)."""
    from dedupe import UnsupportedServer
    from devtools.servers import RedisClusterSet, legacy_redis_server_binary

    with RedisClusterSet(binary=legacy_redis_server_binary()) as cluster:
        host, port = cluster.startup_nodes[0]
        url = f"redis+cluster://{host}:{port}"
        sf = SingleFlight(url, prefix="old")
        try:
            with pytest.raises(UnsupportedServer, match=r"Redis 6\.2"):
                sf.call("j", lambda: 1)
        finally:
            sf.close(timeout=0)

        async def ajob() -> int:
            return 1

        async def main() -> None:
            asf = SingleFlight(url, prefix="old")
            try:
                with pytest.raises(UnsupportedServer):
                    await asf.call("j", ajob)
            finally:
                await asf.aclose(timeout=0)

        asyncio.run(main())
        client = cluster.client()
        try:
            assert list(client.scan_iter("old:*")) == []
        finally:
            client.close()


@pytest.mark.timeout(60)
def test_a_standalone_redis_6_2_runs_flights(legacy_redis: RedisServer, prefix: str) -> None:
    """The oldest server the README supports standalone: every script runs on it (SET ...
    GET in the acquire is 6.2's), sync and asyncio, leading, kept and followed."""
    sf = SingleFlight(legacy_redis.url, prefix=prefix, result_ttl=30)
    gate = threading.Event()
    runs: list[int] = []

    def slow() -> str:
        runs.append(1)
        gate.wait(10)
        return "v"

    async def aval() -> str:
        return "a"

    try:
        leader = threading.Thread(target=lambda: sf.call("slow", slow))
        leader.start()
        until(lambda: bool(runs), what="the leader to start")
        other = SingleFlight(legacy_redis.url, prefix=prefix, result_ttl=30)
        try:
            got: list[str] = []
            follower = threading.Thread(target=lambda: got.append(other.call("slow", slow)))
            follower.start()
            until(lambda: bool(other.inflight()), what="the follower to join")
            gate.set()
            follower.join(10)
            leader.join(10)
            assert got == ["v"] and runs == [1]
        finally:
            other.close(timeout=0)
        assert sf.call("slow", lambda: "again") == "v"  # kept

        async def main() -> str:
            try:
                return str(await sf.call("async", aval))
            finally:
                await sf.aclose()

        assert asyncio.run(main()) == "a"
    finally:
        sf.close(timeout=0)
