"""Thread-safe one-shot latches and mailboxes that threads and asyncio tasks can both wait on.

The pub/sub hub and the renewal thread run on their own threads; these are how they hand
news to waiting callers, whether a caller blocks a thread or awaits on an event loop.

Locks: each Latch and Mailbox is guarded by one of ``_LOCKS``, handed out in turn when it is
made (a lock of its own would cost 88 bytes, and a waiting flight holds up to three of these:
issue 23's memory per flight). Each is a leaf: no other lock is taken while one is held
(wakers are called after it is released), so objects that share one cannot deadlock; Hub and
InFlight locks may be held while taking one, never the other way round.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Latch", "Mailbox", "take_any", "take_any_async"]

T = TypeVar("T")
_UNSET = object()

_STRIPES = 64
_LOCKS = [threading.Lock() for _ in range(_STRIPES)]
_turn = itertools.count()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Waker:
    """Wakes an asyncio future from any thread. An object with slots, not a closure: each
    waiting caller holds one, and a closure over its cells costs 208 bytes against 48 (issue
    23's memory per flight)."""

    __slots__ = ("fut",)

    def __init__(self, fut: asyncio.Future[None]) -> None:
        self.fut = fut

    def __call__(self) -> None:
        fut = self.fut
        loop = fut.get_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            _wake(fut)  # on the waiter's own loop: no self-pipe write, no extra loop turn
            return
        try:
            loop.call_soon_threadsafe(_wake, fut)
        except RuntimeError:
            pass  # the waiter's loop is closed: nobody is left to wake


def _timer(fut: asyncio.Future[None], timeout: float | None) -> asyncio.TimerHandle | None:
    """Wake ``fut`` after ``timeout`` seconds (None: never). A timer on the future itself:
    asyncio.wait_for would add a task and two loop turns; the waiter awaits ``fut`` in its own
    frame, with no coroutine of ours between (one frame less per waiting caller)."""
    if timeout is None:
        return None
    return fut.get_loop().call_later(max(0.0, timeout), _wake, fut)


class Latch(Generic[T]):
    """Set once with a value; every waiter, sync or async, sees it."""

    __slots__ = ("_lock", "_value", "_wakers")

    def __init__(self) -> None:
        self._lock = _LOCKS[next(_turn) % _STRIPES]  # a leaf, maybe shared (see Locks)
        # Written once, under _lock; read without it (one attribute read: set or not).
        self._value: object = _UNSET
        # Under _lock; called after it is released. An empty tuple once set.
        self._wakers: list[Callable[[], None]] | tuple[()] = []

    def set(self, value: T) -> bool:
        with self._lock:
            if self._value is not _UNSET:
                return False
            self._value = value
            # Never added to once set: an empty tuple, not a new list, stays behind (a
            # subscription's latch outlives its confirmation; issue 23's memory per flight).
            wakers, self._wakers = self._wakers, ()
        for wake in wakers:
            wake()
        return True

    def is_set(self) -> bool:
        return self._value is not _UNSET

    def poke(self) -> None:
        """Wake every waiter without setting it: their waits return False (not set), so
        they look again at what they wait for (a flight's stale value was offered)."""
        with self._lock:
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def get(self) -> T:
        if self._value is _UNSET:
            raise LookupError("latch is not set")
        return self._value  # type: ignore[return-value]

    def add_waker(self, wake: Callable[[], None]) -> None:
        with self._lock:
            if self._value is _UNSET:
                self._wakers.append(wake)  # type: ignore[union-attr]  # unset: a list
                return
        wake()

    def discard_waker(self, wake: Callable[[], None]) -> None:
        with self._lock:
            if wake in self._wakers:  # so unset: a list
                self._wakers.remove(wake)  # type: ignore[union-attr]

    def wait(self, timeout: float | None) -> bool:
        if self._value is not _UNSET:
            return True
        event = threading.Event()
        self.add_waker(event.set)
        try:
            event.wait(timeout)
        finally:
            self.discard_waker(event.set)
        return self._value is not _UNSET

    async def wait_async(self, timeout: float | None) -> bool:
        if self._value is not _UNSET:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        wake = _Waker(fut)
        self.add_waker(wake)
        timer = None
        try:
            timer = _timer(fut, timeout)
            await fut
        finally:
            if timer is not None:
                timer.cancel()
            self.discard_waker(wake)
        return self._value is not _UNSET


class Mailbox(Generic[T]):
    """A queue with one consumer at a time; producers on any thread wake it."""

    __slots__ = ("_items", "_lock", "_waker")

    def __init__(self) -> None:
        self._lock = _LOCKS[next(_turn) % _STRIPES]  # a leaf, maybe shared (see Locks)
        # Under _lock. A list: a box holds one or two items, and an empty deque costs 624
        # bytes against 56 (one per waiting flight; issue 23's memory per flight).
        self._items: list[T] = []
        self._waker: Callable[[], None] | None = None  # under _lock; called after release

    def put(self, item: T) -> None:
        with self._lock:
            self._items.append(item)
            waker, self._waker = self._waker, None
        if waker is not None:
            waker()

    def _take_or_arm(self, waker: Callable[[], None]) -> tuple[bool, T | None]:
        """The next item if there is one; else arm ``waker`` for the next put."""
        with self._lock:
            if self._items:
                return True, self._items.pop(0)
            self._waker = waker
            return False, None

    def _disarm(self, waker: Callable[[], None]) -> None:
        with self._lock:
            if self._waker is waker:
                self._waker = None

    def _take(self) -> T | None:
        with self._lock:
            self._waker = None
            return self._items.pop(0) if self._items else None

    def get(self, timeout: float | None) -> T | None:
        """The next item, or None after ``timeout`` seconds."""
        with self._lock:
            if self._items:
                return self._items.pop(0)
            event = threading.Event()
            self._waker = event.set
        event.wait(timeout)
        return self._take()

    async def get_async(self, timeout: float | None) -> T | None:
        with self._lock:
            if self._items:
                return self._items.pop(0)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waker = _Waker(fut)
        timer = None
        try:
            timer = _timer(fut, timeout)
            await fut
        finally:
            if timer is not None:
                timer.cancel()
            with self._lock:
                self._waker = None
        return self._take()


def _gather(boxes: dict[int, Mailbox[T]], waker: Callable[[], None]) -> dict[int, T]:
    got: dict[int, T] = {}
    for i, box in boxes.items():
        has, item = box._take_or_arm(waker)
        if has:
            got[i] = item  # type: ignore[assignment]
    return got


def _collect(boxes: dict[int, Mailbox[T]], waker: Callable[[], None], got: dict[int, T]) -> None:
    for i, box in boxes.items():
        box._disarm(waker)
        if i not in got:
            with box._lock:
                if box._items:
                    got[i] = box._items.pop(0)


def take_any(boxes: dict[int, Mailbox[T]], timeout: float) -> dict[int, T]:
    """One item from each of the mailboxes that has one, waiting up to ``timeout`` seconds
    for the first (a batch's waiting items: each box has this one consumer)."""
    event = threading.Event()
    got = _gather(boxes, event.set)
    if not got:
        event.wait(max(0.0, timeout))
    _collect(boxes, event.set, got)
    return got


async def take_any_async(boxes: dict[int, Mailbox[T]], timeout: float) -> dict[int, T]:
    """take_any on the running loop."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    wake = _Waker(fut)
    got = _gather(boxes, wake)
    if not got:
        timer = _timer(fut, max(0.0, timeout))
        try:
            await fut
        finally:
            if timer is not None:
                timer.cancel()
    _collect(boxes, wake, got)
    return got


def _after_fork_in_child() -> None:
    # A thread of the parent may have held one at fork time: the child's new objects take
    # fresh ones (the parent's objects are the parent's flights, abandoned in the child).
    _LOCKS[:] = [threading.Lock() for _ in range(_STRIPES)]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
