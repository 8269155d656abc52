"""Efficiency, not correctness: a lease on an asynchronously replicated store avoids
duplicate work but proves nothing, so a leader gets a fencing token (current_flight().token)
for side effects that must not happen twice, and min_replicas_ack narrows the lost-write
window of a failover: WAIT on the acquiring connection, or no lead.

The tokens' growth is in test_outcomes_never_go_back_in_time.py, the failover in
test_sentinel.py.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from dedupe import SingleFlight, current_flight

pytestmark = pytest.mark.timeout(30)


@pytest.mark.compat
def test_current_flight_and_growing_tokens(sf: SingleFlight) -> None:
    seen: list[Any] = []

    @sf(key="tok", namespace=False)
    def job() -> int:
        flight = current_flight()
        assert flight is not None
        seen.append((flight.key, flight.token, flight.lease_lost))
        flight.check()
        return flight.token

    assert current_flight() is None
    sf.configure(result_ttl=0)
    first, second = job(), job()
    assert second > first
    assert seen[0][0] == "tok" and seen[0][2] is False
    assert current_flight() is None


@pytest.mark.sentinel
@pytest.mark.timeout(60)
def test_min_replicas_ack_waits_on_the_acquiring_connection(
    redis_sentinel: Any, prefix: str
) -> None:
    """WAIT vouches only for its own connection's writes: with the replica stopped, every one
    of many concurrent leaders must be refused, none may lead on a WAIT of an idle connection."""
    from test_sentinel import wait_replica_acks

    wait_replica_acks(redis_sentinel, prefix)
    sf = SingleFlight(
        redis_sentinel.master.url, prefix=prefix, min_replicas_ack=1, replica_ack_timeout=0.3
    )
    runs: list[int] = []
    errors: list[BaseException] = []
    try:
        # Warm the pool with several connections, none of which has written anything.
        warm = threading.Barrier(8)

        def warm_one() -> None:
            warm.wait(10)
            sf.backend().sync_client().ping()

        ws = [threading.Thread(target=warm_one) for _ in range(8)]
        for t in ws:
            t.start()
        for t in ws:
            t.join(10)
        redis_sentinel.replica.pause()
        try:
            barrier = threading.Barrier(8)

            def lead(i: int) -> None:
                barrier.wait(10)
                try:
                    sf.call(f"w{i}", lambda: runs.append(i))
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=lead, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        finally:
            redis_sentinel.replica.resume()
    finally:
        sf.close(timeout=0)
    assert runs == []
    assert len(errors) == 8 and all("replicas acknowledged" in str(e) for e in errors), errors
