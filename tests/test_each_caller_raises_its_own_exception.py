"""Each caller raises its own exception: callers that shared a flight each raise a copy of
its exception with the leader's traceback, in the leader's process and in every other one,
so tracebacks do not pile up. How exceptions travel between processes (the same class, the
nearest base, RemoteError) is the trust model's (test_trust_model.py).
"""

from __future__ import annotations

import sys
import threading
import traceback
from typing import Any

import pytest
import redis
from helpers import _exception_herd, _sf, until


@pytest.mark.timeout(60)
def test_each_local_caller_raises_its_own_copy(redis_url: str, prefix: str, sfs: list[Any]) -> None:
    sf = _sf(sfs, redis_url, prefix)
    go = threading.Event()
    n = 50
    joined = threading.Barrier(n)

    class Boom(Exception):
        pass

    def job() -> None:
        assert go.wait(20)
        raise Boom("boom")

    caught: list[BaseException] = []

    def caller() -> None:
        joined.wait(20)
        try:
            sf.call("boom", job)
        except Boom as exc:
            caught.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(n)]
    for t in threads:
        t.start()
    until(lambda: len(sf.backend().sync_flights) == 1, what="the flight")
    threading.Event().wait(0.2)  # let the joiners queue on the entry
    go.set()
    for t in threads:
        t.join(20)
    assert len(caught) == n
    assert len({id(e) for e in caught}) == n  # distinct objects
    longest = max(len(traceback.extract_tb(e.__traceback__)) for e in caught)
    assert longest < 20, longest


@pytest.mark.timeout(60)
def test_custom_exception_reaches_every_process_with_traceback(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any]
) -> None:
    mine, others = _exception_herd(redis_url, prefix, "custom", procs)
    assert int(redis_client.get(f"{prefix}:runs") or 0) == 1
    for kind, _, info in mine + others:
        assert kind == "err"
        assert (info["module"], info["type"]) == ("workers", "Custom")
        assert info["args"] == ["'custom failure'", "42"]
        assert "in _job" in info["traceback"]  # the leader's frames are attached
    # The note naming the leader is an exception note (add_note): Python 3.11 and later.
    noted = ["raised by the dedupe leader" in info["traceback"] for _, _, info in others]
    assert noted == [sys.version_info >= (3, 11)] * len(others)
