"""The process's table of flights in progress: callers of a busy key join its entry."""

from __future__ import annotations

import asyncio
import threading
from typing import Final

from .envelope import Outcome
from .signals import Latch

__all__ = ["RETRY", "Entry", "InFlight"]


class _Retry:
    def __repr__(self) -> str:
        return "RETRY"


RETRY: Final = _Retry()
"""An entry's result when its driver stopped without an outcome: joiners start over."""


class Entry:
    """One key's flight in this process; its first caller drives it, the others wait here."""

    __slots__ = ("leading", "result", "task", "waiters")

    def __init__(self) -> None:
        self.result: Latch[Outcome | _Retry] = Latch()
        self.waiters = 1  # async callers still awaiting it; 0 lets a following driver stop
        self.task: asyncio.Task[None] | None = None
        self.leading = False


class InFlight:
    """Entries by key. Resolving an entry removes it in the same step, so none is joined late."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}

    def join(self, key: str) -> tuple[Entry, bool]:
        """The key's entry, and whether this caller created it (and so must drive it)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = Entry()
                return entry, True
            entry.waiters += 1
            return entry, False

    def finish(self, key: str, entry: Entry, result: Outcome | _Retry) -> None:
        with self._lock:
            if self._entries.get(key) is entry:
                del self._entries[key]
            entry.result.set(result)

    def leave(self, entry: Entry) -> int:
        """An async caller stopped waiting; returns how many still wait."""
        with self._lock:
            entry.waiters -= 1
            return entry.waiters

    def __len__(self) -> int:
        return len(self._entries)
