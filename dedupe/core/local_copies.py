"""Process-local copies of kept values (``local_cache=True``), each held only while Redis
would still hand it to a new caller, so a hot key costs no round trip within result_ttl."""

from __future__ import annotations

import heapq
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["LocalCopies", "estimate_size"]

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
# The size estimate looks at no more than this many objects of one value: a huge value is
# then estimated low, but costs no more than this to measure.
_MAX_VISITS = 10_000


def estimate_size(value: object) -> int:
    """Bytes a value holds, roughly: sys.getsizeof over containers, each object once."""
    seen: set[int] = set()
    stack = [value]
    total = 0
    while stack and len(seen) < _MAX_VISITS:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        try:
            total += sys.getsizeof(obj)
        except TypeError:
            total += 64
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        else:
            attrs = getattr(obj, "__dict__", None)
            if isinstance(attrs, dict):
                stack.append(attrs)
    return total


class LocalCopies:
    """Fresh values by key, bounded in entries and in estimated bytes.

    Expired entries are dropped on every put (soonest expiry first, from a heap), so none
    outlives its freshness by more than the next put; when a bound is reached the oldest
    entries go first. One lock guards ``entries``, ``_expiry`` and ``_bytes``; ``get``
    reads ``entries`` without it (a dict lookup is atomic) and takes it only to delete.
    ``entries`` and ``clock`` are public for the call's hot path, which reads a fresh entry
    as ``get`` does, inline (SingleFlight._run_sync).
    """

    def __init__(
        self,
        max_entries: int = 10_000,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        # key -> (expires at, value, estimated bytes, produced at); insertion order is age
        # order.
        self.entries: dict[str, tuple[float, Any, int, float]] = {}
        self._expiry: list[tuple[float, str]] = []  # may hold stale pairs; checked on pop
        self._bytes = 0
        self._max = max_entries
        self._max_bytes = max_bytes

    def get(self, key: str) -> tuple[bool, Any]:
        hit = self.entries.get(key)
        if hit is None:
            return False, None
        if hit[0] > self.clock():
            return True, hit[1]
        with self._lock:
            if self.entries.get(key) is hit:
                self._drop(key)
        return False, None

    def age_ms(self, key: str) -> int:
        """How old the copy of ``key`` is: its age when kept, and the time since (0: none)."""
        hit = self.entries.get(key)
        return 0 if hit is None else max(0, round((self.clock() - hit[3]) * 1000))

    def put(self, key: str, value: Any, fresh_ms: int, age_ms: int = 0) -> None:
        if fresh_ms <= 0:
            return
        size = estimate_size(value)
        now = self.clock()
        expires = now + fresh_ms / 1000
        with self._lock:
            if key in self.entries:
                self._drop(key)
            self._evict_expired(now)
            if size > self._max_bytes:
                return  # larger than the whole bound: not worth a copy
            self.entries[key] = (expires, value, size, now - age_ms / 1000)
            self._bytes += size
            heapq.heappush(self._expiry, (expires, key))
            while len(self.entries) > self._max or self._bytes > self._max_bytes:
                self._drop(next(iter(self.entries)))
            if len(self._expiry) > 2 * len(self.entries) + 64:
                self._expiry = [(e[0], k) for k, e in self.entries.items()]
                heapq.heapify(self._expiry)

    def discard(self, key: str) -> bool:
        """Forget the copy of ``key`` now (``SingleFlight.forget``); True if it was fresh."""
        with self._lock:
            entry = self.entries.get(key)
            if entry is None:
                return False
            self._drop(key)
        return entry[0] > self.clock()

    def _drop(self, key: str) -> None:
        self._bytes -= self.entries.pop(key)[2]

    def _evict_expired(self, now: float) -> None:
        heap = self._expiry
        while heap and heap[0][0] <= now:
            expires, key = heapq.heappop(heap)
            entry = self.entries.get(key)
            if entry is not None and entry[0] == expires:
                self._drop(key)

    @property
    def nbytes(self) -> int:
        """The estimated bytes of the copies held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self.entries)
