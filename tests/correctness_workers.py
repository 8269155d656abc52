"""Functions that the correctness tests run in spawned processes (top level, importable by name)."""

from __future__ import annotations

import os
from typing import Any

import redis

from dedupe import SingleFlight, current_flight


def late_leader(url: str, prefix: str, job: str, lock_ttl: float, out: Any) -> None:
    """Lead ``job``, announce it, wait for <prefix>:a-go, return "old" (the test pauses us
    past our lease in between, so a newer flight starts meanwhile)."""
    r = redis.Redis.from_url(url)
    sf = SingleFlight(url, prefix=prefix, lock_ttl=lock_ttl, result_ttl=30)

    def work() -> str:
        flight = current_flight()
        assert flight is not None
        r.rpush(f"{prefix}:a-started", os.getpid())
        r.blpop([f"{prefix}:a-go"], timeout=30)
        return "old"

    try:
        out.put(("value", sf.call(job, work)))
    except BaseException as exc:
        out.put(("error", repr(exc)))
    finally:
        sf.close(timeout=0)
