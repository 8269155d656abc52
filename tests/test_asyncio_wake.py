"""An asyncio follower's wake-up: the message reaches the waiting callers in one hand-off.

The hub wakes each event loop once per message (``wake_all``: one callback per loop); in that
callback the flight machine takes the message and, if it ends the flight, the shared flight's
machine resolves the entry, which resolves each waiting caller's future (``Mailbox.take_async``,
``aio._Driver.step_ahead``). What must hold all the same: a cancelled caller stops waiting
alone, and each outcome is taken once, by one flight, for all its callers.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from dedupe import SingleFlight
from dedupe.core.keys import names_for
from dedupe.core.signals import LoopWaker, Mailbox, wake_all

pytestmark = pytest.mark.compat


async def _until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def test_cancelled_followers_stop_alone_and_the_outcome_is_taken_once(
    sf: SingleFlight, other: SingleFlight
) -> None:
    """Four callers of one process follow another's leader; two of them (one is the caller
    whose call started the process's flight task) are cancelled while waiting. The other two
    still get the outcome; the message is opened once, the entry resolved once."""
    started, release = asyncio.Event(), asyncio.Event()

    async def lead() -> str:
        started.set()
        await release.wait()
        return "shared"

    async def never() -> str:
        raise AssertionError("a follower ran the job")

    leader = asyncio.create_task(sf.call("wake", lead))
    await started.wait()

    backend = other.backend()
    opened: list[Any] = []
    codec_open = backend.codec.open

    def counting_open(data: bytes, *args: Any, **kwargs: Any) -> Any:
        got = codec_open(data, *args, **kwargs)
        opened.append(got)
        return got

    backend.codec.open = counting_open  # type: ignore[method-assign]
    table = backend.async_flights()
    finished: list[Any] = []
    table_finish = table.finish

    def counting_finish(key: str, entry: Any, result: Any) -> None:
        finished.append(result)
        table_finish(key, entry, result)

    table.finish = counting_finish  # type: ignore[method-assign]
    try:
        callers = [asyncio.create_task(other.call("wake", never)) for _ in range(4)]
        hub = backend.hub()
        await _until(lambda: bool(hub.channels()), "the follower's subscription")
        channel = next(iter(hub.channels()))
        await _until(lambda: hub.confirmation(channel).is_set(), "its confirmation")
        await asyncio.sleep(0.05)  # each caller waits on the entry, the flight on its mailbox
        callers[0].cancel()  # the caller whose call launched the flight task
        callers[2].cancel()
        for cancelled in (callers[0], callers[2]):
            with pytest.raises(asyncio.CancelledError):
                await cancelled
        await asyncio.sleep(0.05)
        assert not callers[1].done() and not callers[3].done(), "the others stopped too"
        assert finished == [], "the flight ended when two of its four callers left"
        release.set()
        assert await leader == "shared"
        assert await asyncio.wait_for(asyncio.gather(callers[1], callers[3]), 10) == [
            "shared",
            "shared",
        ]
        await asyncio.sleep(0.05)  # anything delivered twice would land by now
        assert len(opened) == 1, f"the outcome was opened {len(opened)} times: {opened!r}"
        assert len(finished) == 1, f"the entry was resolved {len(finished)} times"
        assert finished[0].value == "shared"
        # The flight was counted out once (close() waits on that count).
        assert backend._active == 0
        await _until(lambda: not hub.channels(), "the unsubscribe")
    finally:
        del backend.codec.open
        del table.finish


async def test_the_callers_return_one_loop_turn_after_the_hub_callback(
    sf: SingleFlight, other: SingleFlight, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub's callback steps the flight and resolves the callers' futures; they return in
    the loop's next iteration (before: the callback woke the flight task, which woke them,
    one iteration later still)."""
    import dedupe.core.signals as signals
    import dedupe.drivers.aio as aio

    loop = asyncio.get_running_loop()
    turn = 0
    ticking = False

    def tick() -> None:  # once per loop iteration while armed (call_soon runs in the next)
        nonlocal turn
        turn += 1
        if ticking:
            loop.call_soon(tick)

    stepped: list[tuple[int, bool]] = []
    step_ahead = aio._Driver.step_ahead

    def spy(self: Any, message: object) -> None:
        stepped.append((turn, threading.current_thread() is threading.main_thread()))
        step_ahead(self, message)

    monkeypatch.setattr(aio._Driver, "step_ahead", spy)
    handed: list[int] = []
    handover = signals._Handover.run

    def spy_handover(self: Any) -> None:
        handed.append(turn)
        handover(self)

    monkeypatch.setattr(signals._Handover, "run", spy_handover)
    started, release = asyncio.Event(), asyncio.Event()

    async def lead() -> str:
        started.set()
        await release.wait()
        return "v"

    async def never() -> str:
        raise AssertionError("a follower ran the job")

    returned: list[int] = []

    async def follow() -> str:
        got = await other.call("turns", never)
        returned.append(turn)
        return got

    leader = asyncio.create_task(sf.call("turns", lead))
    await started.wait()
    callers = [asyncio.create_task(follow()) for _ in range(3)]
    hub = other.backend().hub()
    await _until(lambda: bool(hub.channels()), "the follower's subscription")
    channel = next(iter(hub.channels()))
    await _until(lambda: hub.confirmation(channel).is_set(), "its confirmation")
    await asyncio.sleep(0.05)
    ticking = True
    loop.call_soon(tick)
    try:
        release.set()
        assert await asyncio.wait_for(asyncio.gather(*callers), 10) == ["v"] * 3
    finally:
        ticking = False
    assert await leader == "v"
    # The hub's callback ran once, stepped the flight in that same iteration, and every
    # caller returned in the next.
    assert len(handed) == 1 and len(stepped) == 1, (handed, stepped)
    assert stepped == [(handed[0], True)], (handed, stepped)
    assert returned == [handed[0] + 1] * 3, (handed, returned)


async def test_a_waiting_flight_holds_no_task_and_ends_when_its_last_caller_leaves(
    sf: SingleFlight, other: SingleFlight
) -> None:
    """A follower's flight waits for its message with no task of its own (parked: issue 23's
    memory per flight); once every caller is cancelled, it ends all the same: the entry
    resolved (RETRY), the flight counted out, the channel left, the leader untouched."""
    from dedupe.core.inflight import RETRY

    started, release = asyncio.Event(), asyncio.Event()

    async def lead() -> str:
        started.set()
        await release.wait()
        return "v"

    async def never() -> str:
        raise AssertionError("a follower ran the job")

    leader = asyncio.create_task(sf.call("parked", lead))
    await started.wait()
    backend = other.backend()
    table = backend.async_flights()
    finished: list[Any] = []
    table_finish = table.finish

    def counting_finish(key: str, entry: Any, result: Any) -> None:
        finished.append(result)
        table_finish(key, entry, result)

    table.finish = counting_finish  # type: ignore[method-assign]
    try:
        before = asyncio.all_tasks()
        callers = [asyncio.create_task(other.call("parked", never)) for _ in range(2)]
        hub = backend.hub()
        await _until(lambda: bool(hub.channels()), "the follower's subscription")
        channel = next(iter(hub.channels()))
        await _until(lambda: hub.confirmation(channel).is_set(), "its confirmation")
        await asyncio.sleep(0.05)
        # Only the two callers run: the flight waits with no task.
        assert asyncio.all_tasks() - before == set(callers)
        assert backend._active == 1
        for caller in callers:
            caller.cancel()
        for caller in callers:
            with pytest.raises(asyncio.CancelledError):
                await caller
        await _until(lambda: bool(finished), "the flight's end")
        assert finished == [RETRY]
        assert backend._active == 0
        await _until(lambda: not hub.channels(), "the unsubscribe")
        assert not leader.done()
        release.set()
        assert await leader == "v"
    finally:
        del table.finish


async def test_a_follower_re_checks_at_the_lease_end_when_no_message_comes(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    """A lease nobody runs (a leader gone without publishing): the waits time out at the
    lease's end, the flight re-checks and leads; a caller cancelled meanwhile stops alone."""
    sf = SingleFlight(redis_url, prefix=prefix, lock_ttl=2.0)
    try:
        redis_client.set(names_for(prefix, "silent").lock, "7:gone", px=400)
        runs: list[int] = []

        async def job() -> str:
            runs.append(1)
            return "took over"

        callers = [asyncio.create_task(sf.call("silent", job)) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert not any(c.done() for c in callers)
        callers[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await callers[0]
        got = await asyncio.wait_for(asyncio.gather(callers[1], callers[2]), 10)
        assert got == ["took over", "took over"]
        assert runs == [1]
    finally:
        await sf.aclose()


async def test_an_item_for_a_cancelled_wait_is_handed_to_nobody() -> None:
    """A mailbox item that arrives for a wait already cancelled is handed to nobody: the
    next wait takes it, once."""
    box: Mailbox[object] = Mailbox()
    handed: list[tuple[object, bool]] = []
    loop = asyncio.get_running_loop()

    def handle(item: object) -> None:
        handed.append((item, asyncio.get_running_loop() is loop))

    waiting = asyncio.create_task(box.take_async(10.0, handle))
    await asyncio.sleep(0)  # it waits now
    # The put's callback is queued on the loop, then the wait is cancelled before it runs.
    putter = threading.Thread(target=box.put, args=("late",))
    putter.start()
    putter.join()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0.01)
    assert handed == []
    assert await box.take_async(0.0, handle) is True
    assert handed == [("late", True)]
    assert await box.take_async(0.0, handle) is False
    assert handed == [("late", True)]


async def test_an_item_is_handed_over_in_the_producers_callback_before_the_task_resumes() -> None:
    box: Mailbox[object] = Mailbox()
    order: list[str] = []

    def handle(item: object) -> None:
        order.append(f"handled {item!r}")

    async def wait() -> bool:
        got = await box.take_async(10.0, handle)
        order.append("task resumed")
        return got

    waiting = asyncio.create_task(wait())
    await asyncio.sleep(0)
    threading.Thread(target=box.put, args=(b"m",)).start()
    assert await asyncio.wait_for(waiting, 10) is True
    assert order == ["handled b'm'", "task resumed"]
    # A wait that times out hands nothing over.
    assert await box.take_async(0.01, handle) is False
    assert order == ["handled b'm'", "task resumed"]


class _Note(LoopWaker):
    __slots__ = ("direct", "ran", "tag")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, direct: bool, ran: list[str], tag: str
    ) -> None:
        super().__init__(loop)
        self.direct, self.ran, self.tag = direct, ran, tag

    def run(self) -> None:
        self.ran.append(self.tag)


def test_wake_all_calls_each_loop_once() -> None:
    """Wakers of one loop, woken from another thread, share one call_soon_threadsafe."""
    loops = [asyncio.new_event_loop() for _ in range(2)]
    calls: list[int] = []
    ran: list[str] = []
    try:
        for i, loop in enumerate(loops):
            real = loop.call_soon_threadsafe

            def counted(*args: Any, _i: int = i, _real: Any = real, **kwargs: Any) -> Any:
                calls.append(_i)
                return _real(*args, **kwargs)

            loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        wakers: list[Callable[[], None]] = [
            _Note(loops[0], False, ran, "a0"),
            _Note(loops[1], True, ran, "b0"),
            _Note(loops[0], True, ran, "a1"),
            lambda: ran.append("plain"),
            _Note(loops[0], False, ran, "a2"),
        ]
        wake_all(wakers)
        assert sorted(calls) == [0, 1]
        assert ran == ["plain"]  # a waker of no loop at once; the others on their loop
        for loop in loops:
            loop.run_until_complete(asyncio.sleep(0))
        assert ran == ["plain", "a0", "a1", "a2", "b0"]
    finally:
        for loop in loops:
            loop.close()
