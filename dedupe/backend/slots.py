"""Command slots of one event loop: a FIFO semaphore whose waiters all share one timer.

Past the slots, callers queue rather than fail, each for at most the queue timeout. With
asyncio.Semaphore and a timer per wait, queueing cost about 1,400 bytecodes a flight at 100
concurrent tasks (heap pushes, cancelled handles, the semaphore's wake-up scan). Every
waiter here waits the same time, so the oldest waiter's deadline is always the next one
due: one timer, re-armed for the next oldest when it fires, serves them all.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

__all__ = ["AsyncSlots"]


class AsyncSlots:
    """``n`` slots on one event loop (used from that loop only: no lock)."""

    __slots__ = ("_free", "_timeout_error", "_timer", "_waiters")

    def __init__(self, n: int, timeout_error: Callable[[], Exception]) -> None:
        # Invariant: _free > 0 only while nobody waits (release() hands a slot to a waiter
        # before it would count it free).
        self._free = n
        self._waiters: deque[tuple[float, asyncio.Future[None]]] = deque()  # (deadline, fut)
        self._timer: asyncio.TimerHandle | None = None
        self._timeout_error = timeout_error

    def locked(self) -> bool:
        return self._free <= 0

    async def take(self, timeout: float) -> None:
        """Take a slot; wait in line for at most ``timeout`` seconds, then raise the error."""
        if self._free > 0:
            self._free -= 1
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        deadline = loop.time() + timeout
        self._waiters.append((deadline, fut))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire, loop)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release()  # granted just before the cancel: pass the slot on
            raise

    def release(self) -> None:
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()[1]
            if not fut.done():  # skip those that were cancelled or timed out
                fut.set_result(None)
                return
        self._free += 1

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        waiters = self._waiters
        while waiters:
            deadline, fut = waiters[0]
            if fut.done():
                waiters.popleft()
            elif deadline <= now:
                waiters.popleft()
                fut.set_exception(self._timeout_error())
            else:
                self._timer = loop.call_at(deadline, self._expire, loop)
                return
