"""Thread-safe one-shot latches and mailboxes that threads and asyncio tasks can both wait on.

The pub/sub hub and the renewal thread run on their own threads; these are how they hand
news to waiting callers, whether a caller blocks a thread or awaits on an event loop. A
waiter on a loop is woken through its ``LoopWaker``; ``wake_all`` wakes many at once, with
one callback per loop (one self-pipe write and one loop turn for all of that loop's).

Locks: each Latch and Mailbox is guarded by one of ``_LOCKS``, handed out in turn when it is
made (a lock of its own would cost 88 bytes, and a waiting flight holds up to three of these:
issue 23's memory per flight). Each is a leaf: no other lock is taken while one is held
(wakers are called after it is released), so objects that share one cannot deadlock; Hub and
InFlight locks may be held while taking one, never the other way round.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import os
import threading
from asyncio import events
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Final, Generic, TypeAlias, TypeVar

__all__ = ["Latch", "LoopWaker", "Mailbox", "take_any", "take_any_async", "wake_all"]

T = TypeVar("T")
_UNSET = object()

_STRIPES = 64
_LOCKS = [threading.Lock() for _ in range(_STRIPES)]
_turn = itertools.count()


def _wake(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(None)


class LoopWaker:
    """Runs ``run`` on ``loop``: from another thread through the loop's call_soon_threadsafe
    (``wake_all`` gives all the wakers of one loop a single one); from the loop's own thread
    at once if ``direct`` (setting a future: no self-pipe write, no extra loop turn), else at
    the loop's next turn (``run`` steps a consumer, which must not run inside its producer).
    Subclasses say what ``run`` does, in slots (a waiting flight holds one), and ``direct``."""

    __slots__ = ("loop",)
    direct = False

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop  # written once, here

    def run(self) -> None:
        """On the loop."""
        raise NotImplementedError

    def __call__(self) -> None:
        loop = self.loop
        try:
            if events._get_running_loop() is not loop:
                loop.call_soon_threadsafe(self.run)
            elif self.direct:
                self.run()
            else:
                loop.call_soon(self.run)
        except RuntimeError:
            pass  # the waiter's loop is closed: nobody is left to wake


class _FutureWaker(LoopWaker):
    """Resolves a future (with None) unless it is done already: the waker of a caller
    waiting on a Latch, a Mailbox or several. An object with slots, not a closure: each
    waiting caller holds one (issue 23's memory per flight)."""

    __slots__ = ("fut", "timer")
    direct = True

    def __init__(self, fut: asyncio.Future[Any]) -> None:
        # Written once, here:
        self.loop = fut.get_loop()
        self.fut = fut
        self.timer: asyncio.TimerHandle | None = None  # a Latch's wait_soon: its timeout

    def run(self) -> None:
        _wake(self.fut)


def _run_each(fns: list[Callable[[], None]]) -> None:
    """One loop's share of a ``wake_all``, on that loop: each runs, whatever another raised."""
    for fn in fns:
        try:
            fn()
        except Exception as exc:  # as the loop reports a callback that raised
            asyncio.get_running_loop().call_exception_handler(
                {"message": f"waking {fn!r} failed", "exception": exc}
            )


def wake_all(wakers: Sequence[Callable[[], None]]) -> None:
    """Call each waker; those of one event loop other than the running one share a single
    callback on it (one self-pipe write and one loop turn, however many wait there)."""
    if len(wakers) == 1:
        wakers[0]()  # the usual case: one waiter, nothing to share
        return
    batches: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = {}
    running = events._get_running_loop()
    for wake in wakers:
        if isinstance(wake, LoopWaker) and wake.loop is not running:
            batches.setdefault(wake.loop, []).append(wake.run)
        else:
            wake()
    for loop, fns in batches.items():
        try:
            loop.call_soon_threadsafe(fns[0] if len(fns) == 1 else partial(_run_each, fns))
        except RuntimeError:
            pass  # that loop is closed: nobody is left to wake


def _timer(fut: asyncio.Future[Any], timeout: float | None) -> asyncio.TimerHandle | None:
    """Wake ``fut`` after ``timeout`` seconds (None: never). A timer on the future itself:
    asyncio.wait_for would add a task and two loop turns; the waiter awaits ``fut`` in its own
    frame, with no coroutine of ours between (one frame less per waiting caller)."""
    if timeout is None:
        return None
    return fut.get_loop().call_later(max(0.0, timeout), _wake, fut, context=_wake_context())


_threads = threading.local()


def _wake_context() -> contextvars.Context:
    """An empty context for _wake's timers, one per thread (a loop's timers run on its
    thread, one at a time): call_later would copy the caller's context for each, 64 bytes
    a waiting flight (issue 23's memory per flight), and _wake reads no context variable."""
    try:
        return _threads.wake_context  # type: ignore[no-any-return]
    except AttributeError:
        _threads.wake_context = context = contextvars.Context()
        return context


_NO_WAKERS: Final = ()
_NO_ITEMS: Final = ()
_Wakers: TypeAlias = "Callable[[], None] | list[Callable[[], None]] | tuple[()]"


class Latch(Generic[T]):
    """Set once with a value; every waiter, sync or async, sees it."""

    __slots__ = ("_lock", "_value", "_wakers")

    def __init__(self) -> None:
        self._lock = _LOCKS[next(_turn) % _STRIPES]  # a leaf, maybe shared (see Locks)
        # Written once, under _lock; read without it (one attribute read: set or not).
        self._value: object = _UNSET
        # Under _lock; called after it is released. _NO_WAKERS (none, and once set), the
        # one waker itself, or a list of two or more: a latch mostly has one waiter (a
        # flight's caller), and a list for it costs 88 bytes (issue 23's memory per flight).
        self._wakers: _Wakers = _NO_WAKERS

    def set(self, value: T) -> bool:
        with self._lock:
            if self._value is not _UNSET:
                return False
            self._value = value
            wakers, self._wakers = self._wakers, _NO_WAKERS  # never added to once set
        if type(wakers) is list:
            for wake in wakers:
                wake()
        elif wakers is not _NO_WAKERS:
            wakers()  # type: ignore[operator]
        return True

    def is_set(self) -> bool:
        return self._value is not _UNSET

    def poke(self) -> None:
        """Wake every waiter without setting it: their waits return False (not set), so
        they look again at what they wait for (a flight's stale value was offered)."""
        with self._lock:
            wakers = self._wakers
            if type(wakers) is list:
                wakers = list(wakers)
        if type(wakers) is list:
            for wake in wakers:
                wake()
        elif wakers is not _NO_WAKERS:
            wakers()  # type: ignore[operator]

    def get(self) -> T:
        if self._value is _UNSET:
            raise LookupError("latch is not set")
        return self._value  # type: ignore[return-value]

    def add_waker(self, wake: Callable[[], None]) -> None:
        with self._lock:
            if self._value is _UNSET:
                wakers = self._wakers
                if wakers is _NO_WAKERS:
                    self._wakers = wake
                elif type(wakers) is list:
                    wakers.append(wake)
                else:
                    self._wakers = [wakers, wake]  # type: ignore[list-item]
                return
        wake()

    def discard_waker(self, wake: Callable[[], None]) -> None:
        with self._lock:
            wakers = self._wakers
            if type(wakers) is list:
                if wake in wakers:
                    wakers.remove(wake)
            elif wakers is not _NO_WAKERS and wakers == wake:  # == : a bound method anew
                self._wakers = _NO_WAKERS

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
        wake = self.wait_soon(timeout)
        if wake is None:
            return True
        try:
            await wake.fut
        finally:
            self.stop_wait(wake)
        return self._value is not _UNSET

    def wait_soon(self, timeout: float | None) -> _FutureWaker | None:
        """wait_async's first half, for a caller that awaits in its own frame (a waiting
        caller then holds no coroutine of ours: issue 23's memory per flight): None if set,
        else the armed waker; await its ``fut``, then ``stop_wait`` it however that ended."""
        if self._value is not _UNSET:
            return None
        wake = _FutureWaker(asyncio.get_running_loop().create_future())
        self.add_waker(wake)
        try:
            wake.timer = _timer(wake.fut, timeout)
        except BaseException:
            self.discard_waker(wake)
            raise
        return wake

    def stop_wait(self, wake: _FutureWaker) -> None:
        """wait_async's second half: the wait is over (woken, timed out or cancelled)."""
        if wake.timer is not None:
            wake.timer.cancel()
        self.discard_waker(wake)


class Mailbox(Generic[T]):
    """A queue with one consumer at a time; producers on any thread wake it."""

    __slots__ = ("_items", "_lock", "_waker")

    def __init__(self) -> None:
        self._lock = _LOCKS[next(_turn) % _STRIPES]  # a leaf, maybe shared (see Locks)
        # Under _lock. A list: a box holds one or two items, and an empty deque costs 624
        # bytes against 56 (one per waiting flight; issue 23's memory per flight). Until the
        # first put, the shared empty tuple (most boxes never get an item before their
        # flight ends): every take tests it first, only put_quietly writes it.
        self._items: list[T] = _NO_ITEMS  # type: ignore[assignment]
        self._waker: Callable[[], None] | None = None  # under _lock; called after release

    def put(self, item: T) -> None:
        waker = self.put_quietly(item)
        if waker is not None:
            waker()

    def put_quietly(self, item: T) -> Callable[[], None] | None:
        """Put ``item`` without waking the consumer: the waker to call (after releasing the
        caller's own locks, with ``wake_all`` to wake many), or None if nobody waits."""
        with self._lock:
            items: list[T] | tuple[()] = self._items
            if type(items) is list:
                items.append(item)
            else:
                self._items = [item]
            waker, self._waker = self._waker, None
        return waker

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
            self._waker = _FutureWaker(fut)
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

    async def take_async(self, timeout: float | None, handle: Callable[[T], None]) -> bool:
        """Hand the next item to ``handle`` on this loop, waiting up to ``timeout`` seconds
        for one: True once handed, False if none came.

        An item put while the task waits is handed over in the producer's callback on the
        loop, ahead of the task (which resumes at the loop's next turn, after whatever
        ``handle`` woke): what ``handle`` does needs no turn of the task's. A cancelled wait
        hands nothing over; one cancelled after the callback handed its item over raises
        all the same."""
        waker = self.take_soon(timeout, handle)
        if waker is None:
            return True
        try:
            await waker.fut
        finally:
            self.stop_take(waker)
        return self.took(waker)

    def take_soon(self, timeout: float | None, handle: Callable[[T], None]) -> _Handover[T] | None:
        """take_async's first half, for a consumer that awaits in its own frame (a waiting
        flight then holds no coroutine of ours: issue 23's memory per flight): hands the
        next item over now if there is one (None), else the armed waker. Await its ``fut``;
        then ``stop_take`` it however that ended, and, unless cancelled, ``took``."""
        fut: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        waker = _Handover(self, fut, handle)
        with self._lock:
            has = bool(self._items)
            item = self._items.pop(0) if has else None
            if not has:
                self._waker = waker
        if has:
            handle(item)  # type: ignore[arg-type]
            return None
        try:
            waker.timer = _timer(fut, timeout)
        except BaseException:
            self.stop_take(waker)
            raise
        return waker

    def stop_take(self, waker: _Handover[T]) -> None:
        """The wait of a take_soon is over (handed over, timed out or cancelled)."""
        if waker.timer is not None:
            waker.timer.cancel()
        with self._lock:
            if self._waker is waker:
                self._waker = None

    def took(self, waker: _Handover[T]) -> bool:
        """After a take_soon's wait that was not cancelled: True if an item was handed
        over (in the callback, or now: one that came as the wait timed out)."""
        if waker.fut.result():
            return True
        with self._lock:  # timed out; an item may have come just now
            has = bool(self._items)
            item = self._items.pop(0) if has else None
        if has:
            waker.handle(item)  # type: ignore[arg-type]
        return has


class _Handover(LoopWaker, Generic[T]):
    """A take_async's waker: on the loop, hands the mailbox's next item to its consumer."""

    __slots__ = ("box", "fut", "handle", "timer")

    def __init__(
        self, box: Mailbox[T], fut: asyncio.Future[bool | None], handle: Callable[[T], None]
    ) -> None:
        # Written once, here:
        self.loop = fut.get_loop()
        self.box = box
        self.fut = fut  # True once handed over; None: timed out (_wake); or cancelled
        self.handle = handle
        self.timer: asyncio.TimerHandle | None = None  # the wait's timeout (take_soon)

    def run(self) -> None:
        fut, box = self.fut, self.box
        if fut.done():
            return  # timed out or cancelled: the task takes what came itself, or nobody
        with box._lock:
            if not box._items:  # woken with nothing to take: wait on
                box._waker = self
                return
            got = box._items.pop(0)
        try:
            self.handle(got)  # what it wakes runs before the task, at the loop's next turn
        finally:
            if not fut.done():
                fut.set_result(True)


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
    wake = _FutureWaker(fut)
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
