"""Concurrency queues, never fails: past the 64 command slots per client (per event loop
for asyncio) callers queue for a slot, first come first served, at most the queue timeout,
then BackendUnavailable; 20,000 concurrent asyncio flights and 500 threads complete.

The command slots (dedupe/backend/slots.py): never more holders than slots, every wait
bounded, and no slot lost to a cancellation or a timeout, however they interleave.
"""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import pytest
from helpers import SLACK, _sf
from hypothesis import given, settings
from hypothesis import strategies as st

from dedupe import BackendUnavailable, SingleFlight
from dedupe.backend.slots import AsyncSlots
from devtools.servers import RedisServer

pytestmark = pytest.mark.timeout(60)


class Busy(Exception):
    pass


def _slots(n: int) -> AsyncSlots:
    return AsyncSlots(n, Busy)


@pytest.mark.compat
def test_waiters_are_served_in_arrival_order() -> None:
    async def main() -> list[str]:
        slots = _slots(1)
        order: list[str] = []
        await slots.take(10)

        async def waiter(name: str) -> None:
            await slots.take(10)
            order.append(name)
            slots.release()

        tasks = [asyncio.create_task(waiter(n)) for n in "bcd"]
        await asyncio.sleep(0)  # all three queue, in this order
        slots.release()
        await asyncio.gather(*tasks)
        assert not slots.locked()
        return order

    assert asyncio.run(main()) == ["b", "c", "d"]


@pytest.mark.compat
def test_a_wait_ends_with_the_error_after_its_timeout_and_the_slot_is_kept() -> None:
    async def main() -> None:
        slots = _slots(1)
        await slots.take(10)
        clock = asyncio.get_running_loop().time  # the clock the slots' timer runs on
        t0 = clock()
        with pytest.raises(Busy):
            await slots.take(0.05)
        waited = clock() - t0
        # Not before its timeout (the error is the timer's), and bounded by it.
        assert 0.05 <= waited < 0.05 + SLACK, waited
        slots.release()
        await asyncio.wait_for(slots.take(10), 1)  # the slot came back: free at once
        slots.release()

    asyncio.run(main())


@pytest.mark.compat
def test_a_waiter_cancelled_after_it_was_granted_passes_the_slot_on() -> None:
    async def main() -> None:
        slots = _slots(1)
        await slots.take(10)
        b = asyncio.create_task(slots.take(10))
        c = asyncio.create_task(slots.take(10))
        await asyncio.sleep(0)
        slots.release()  # granted to b ...
        b.cancel()  # ... which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await b
        await asyncio.wait_for(c, 1)  # c got it
        slots.release()
        assert not slots.locked()

    asyncio.run(main())


@pytest.mark.compat
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 4),
    plan=st.lists(
        st.tuples(st.sampled_from(["hold", "cancel", "timeout"]), st.integers(0, 3)),
        min_size=1,
        max_size=40,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_never_more_holders_than_slots_and_none_lost(
    n: int, plan: list[tuple[str, int]], seed: int
) -> None:
    rng = random.Random(seed)

    async def main() -> None:
        slots = _slots(n)
        holders = [0]
        peak = [0]

        async def user(kind: str, turns: int) -> None:
            try:
                await slots.take(0.002 if kind == "timeout" else 10)
            except Busy:
                return
            holders[0] += 1
            peak[0] = max(peak[0], holders[0])
            try:
                for _ in range(turns):
                    await asyncio.sleep(0)
            finally:
                holders[0] -= 1
                slots.release()

        tasks = []
        for kind, turns in plan:
            tasks.append(asyncio.create_task(user(kind, turns)))
            if rng.random() < 0.5:
                await asyncio.sleep(0)
        for task, (kind, _) in zip(tasks, plan, strict=True):
            if kind == "cancel":
                task.cancel()
                if rng.random() < 0.5:
                    await asyncio.sleep(0)
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        assert peak[0] <= n
        assert holders[0] == 0
        for _ in range(n):  # every slot is free again
            await asyncio.wait_for(slots.take(10), 1)
        assert slots.locked()

    asyncio.run(main())


@pytest.mark.compat
def test_callers_past_every_slot_of_a_stuck_link_fail_after_the_queue_timeout(
    redis_server: RedisServer, prefix: str
) -> None:
    """A half-open link holds all 64 slots of the loop in reads; the callers queued behind
    them get BackendUnavailable after queue_timeout, the stuck ones after socket_timeout:
    nobody waits forever."""
    from proxy import Proxy

    async def val(i: int) -> int:
        return i

    with Proxy(redis_server.address).start() as proxy:
        url = "redis://{}:{}/0".format(*proxy.address)
        sf = SingleFlight(url, prefix=prefix, connect_timeout=1, socket_timeout=3)
        # The queue bound is 20 s, not a setting: shortened here, in the transport.
        sf.backend().transport.queue_timeout = 0.3

        async def main() -> list[tuple[object, float]]:
            try:
                assert await sf.call("warm", val, -1) == -1
                proxy.blackhole()
                clock = asyncio.get_running_loop().time
                t0 = clock()

                async def ended(i: int) -> tuple[object, float]:
                    """How the call ended, and when (seconds after the link went dead)."""
                    try:
                        result: object = await sf.call(f"k{i}", val, i)
                    except Exception as exc:
                        result = exc
                    return result, clock() - t0

                return await asyncio.wait_for(asyncio.gather(*(ended(i) for i in range(80))), 20)
            finally:
                proxy.heal()
                await sf.aclose()

        try:
            ends = asyncio.run(main())
        finally:
            sf.close(timeout=0)
    results = [r for r, _ in ends]
    assert all(isinstance(r, BackendUnavailable) for r in results), results
    busy = [r for r in results if "stayed busy" in str(r)]
    assert len(busy) == 80 - 64
    # Each within its own bound: the queued ones once the queue timeout passed, the stuck
    # ones within connect_timeout + socket_timeout (their one retry included).
    queued = [t for r, t in ends if "stayed busy" in str(r)]
    stuck = [t for r, t in ends if "stayed busy" not in str(r)]
    assert all(0.3 <= t < 0.3 + SLACK for t in queued), queued
    assert all(t < 1 + 3 + SLACK for t in stuck), max(stuck)


# --------------------------------------------------------------------------- thousands at once


@pytest.mark.timeout(120)
def test_twenty_thousand_async_flights_and_500_threads_queue_not_fail(
    redis_url: str, prefix: str, sfs: list[Any]
) -> None:
    sf = _sf(sfs, redis_url, prefix, result_ttl=0)

    async def work(i: int) -> int:
        return i

    async def main() -> list[int]:
        try:
            return list(await asyncio.gather(*(sf.call(f"a{i}", work, i) for i in range(20_000))))
        finally:
            await sf.aclose()

    assert asyncio.run(main()) == list(range(20_000))

    got: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(500)

    def thread(i: int) -> None:
        try:
            barrier.wait(30)
            got.append(sf.call(f"t{i}", lambda: i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(500)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert sorted(got) == list(range(500))
