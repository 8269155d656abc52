"""Process-local copies of kept values (``local_cache=True``), each held only while Redis
would still hand it to a new caller, so a hot key costs no round trip within result_ttl."""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["LocalCopies"]


class LocalCopies:
    """Fresh values by key, bounded in number; the oldest entry goes first when full."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, Any]] = {}
        self._max = max_entries

    def get(self, key: str) -> tuple[bool, Any]:
        hit = self._entries.get(key)
        if hit is None:
            return False, None
        if hit[0] > time.monotonic():
            return True, hit[1]
        with self._lock:
            if self._entries.get(key) is hit:
                del self._entries[key]
        return False, None

    def put(self, key: str, value: Any, fresh_ms: int) -> None:
        if fresh_ms <= 0:
            return
        expires = time.monotonic() + fresh_ms / 1000
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (expires, value)
            if len(self._entries) > self._max:
                del self._entries[next(iter(self._entries))]

    def __len__(self) -> int:
        return len(self._entries)
