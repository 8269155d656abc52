"""What a running function can see of its flight, and the guard against waiting on oneself."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import Any, Final

from dedupe.core.leases import LostSignal
from dedupe.errors import LeaseLost, ReentrantFlight

__all__ = [
    "BatchFlight",
    "Flight",
    "check_reentry",
    "current_flight",
    "leading",
    "leading_many",
    "leading_state",
]


class Flight:
    """The flight the current function runs as leader of.

    ``key`` is the job id; ``token`` the fencing token of this lease, greater for every new
    lease of the key, so that side effects can be fenced (reject writes with a smaller token).
    """

    __slots__ = ("_lost", "key", "token")

    def __init__(self, key: str, token: int, lost: LostSignal) -> None:
        self.key = key
        self.token = token
        self._lost = lost

    @property
    def lease_lost(self) -> bool:
        """True once the lease is lost or may have expired by the local clock (the last
        confirmed renewal is older than the lease, less a margin): another caller may be
        running the job too. Computed on every read, whatever the network is doing."""
        return self._lost.is_set()

    @property
    def lost_event(self) -> threading.Event:
        """A threading.Event set when the lease is lost; wait on it from a watchdog thread."""
        return self._lost.event()

    async def wait_lost(self, timeout: float | None = None) -> bool:
        """Wait on the running event loop (any loop) until the lease is lost; True then, or
        False if ``timeout`` seconds passed first. Race it against your work, e.g. with
        ``asyncio.wait`` or a TaskGroup, to stop when another caller may take over."""
        return await self._lost.wait_async(timeout)

    @property
    def time_left(self) -> float:
        """Seconds until the lease counts as lost unless a renewal is confirmed first
        (0.0 once lost; inf for a flight that holds no lease)."""
        if self._lost.is_set():
            return 0.0
        left = self._lost.deadline - time.monotonic()
        return left if math.isinf(left) else max(0.0, left)

    def check(self) -> None:
        """Raise LeaseLost if the lease is lost or may have expired; call it before a side
        effect (and fence the side effect with ``token``)."""
        if self._lost.is_set():
            raise LeaseLost(f"the lease on {self.key!r} (token {self.token}) was lost")

    def __repr__(self) -> str:
        return f"Flight(key={self.key!r}, token={self.token}, lease_lost={self.lease_lost})"


class BatchFlight(Flight):
    """The flight a batch function runs as leader of: one lease per item it leads, each
    with its own token, each lost alone. ``items`` maps each item to its Flight;
    ``lease_lost`` and ``check()`` are about any of them, ``lost_items()`` names which."""

    __slots__ = ("items",)

    def __init__(self, items: Mapping[Any, Flight]) -> None:
        self.items: dict[Any, Flight] = dict(items)
        tokens = [f.token for f in self.items.values()]
        super().__init__(f"a batch of {len(tokens)}", max(tokens, default=0), LostSignal())

    @property
    def lease_lost(self) -> bool:
        return any(f.lease_lost for f in self.items.values())

    def lost_items(self) -> list[Any]:
        """The items whose lease is lost or may have expired: another caller may run them."""
        return [item for item, f in self.items.items() if f.lease_lost]

    @property
    def lost_event(self) -> threading.Event:
        raise TypeError("a batch holds one lease per item: wait on flight.items[item].lost_event")

    async def wait_lost(self, timeout: float | None = None) -> bool:
        """Wait until the lease of any item is lost; True then, False after ``timeout``."""
        if self.lease_lost:
            return True
        waits = [asyncio.ensure_future(f.wait_lost(timeout)) for f in self.items.values()]
        if not waits:
            return False
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            return any(t.result() for t in done)
        finally:
            for t in waits:
                t.cancel()

    @property
    def time_left(self) -> float:
        return min((f.time_left for f in self.items.values()), default=math.inf)

    def check(self) -> None:
        lost = self.lost_items()
        if lost:
            raise LeaseLost(f"the leases of {len(lost)} items of this batch were lost: {lost!r}")

    def __repr__(self) -> str:
        return f"BatchFlight(items={len(self.items)}, lost={len(self.lost_items())})"


class _Leads:
    """What both context managers below share: the leader's state in its context, one value
    per led flight (its keys, its Flight, the leads around it), the manager itself. One
    ContextVar set, not a frozenset of every key led plus two ContextVars: a leader's context
    costs one object (issue 23's memory per flight). On the way out the lead outside is set
    back, not reset by a Token: no Token is held while the function runs (64 bytes a leader),
    and the variable reads the same (None outside any lead)."""

    __slots__ = ("_flight", "_outer")

    _flight: Flight
    _outer: _Leads | None  # the lead this one runs inside (a leader's function that leads)

    def leads(self, full_key: str) -> bool:
        raise NotImplementedError

    def __enter__(self) -> None:
        self._outer = _state.get()
        _state.set(self)

    def __exit__(self, *exc: object) -> None:
        _state.set(self._outer)


# The innermost lead of the running context (None outside one); each links the one outside.
_state: ContextVar[_Leads | None] = ContextVar("dedupe_leading", default=None)
leading_state: Final = _state  # read by call.copy_hit inline: None outside any lead


def current_flight() -> Flight | None:
    """The Flight of the function running now as a leader, or None outside one."""
    state = _state.get()
    return None if state is None else state._flight


def check_reentry(full_key: str, job_id: str) -> None:
    state = _state.get()
    while state is not None:  # as deep as leaders call leaders of other keys: a few
        if state.leads(full_key):
            raise ReentrantFlight(
                f"the flight {job_id!r} called itself with its own key; it would wait on itself"
            )
        state = state._outer


class leading_many(_Leads):
    """``leading`` for a batch: re-entry refused on every key it leads."""

    __slots__ = ("_keys",)

    def __init__(self, full_keys: Iterable[str], flight: Flight) -> None:
        self._keys = frozenset(full_keys)
        self._flight = flight

    def leads(self, full_key: str) -> bool:
        return full_key in self._keys


class leading(_Leads):
    """While a leader's function runs: current_flight() is its Flight, re-entry is refused.

    A class, not @contextmanager: it runs once per led flight, and a generator-based context
    manager costs about three times the bytecodes."""

    __slots__ = ("_key",)

    def __init__(self, full_key: str, flight: Flight) -> None:
        self._key = full_key
        self._flight = flight

    def leads(self, full_key: str) -> bool:
        return full_key == self._key
