"""What the test modules share: starting spawned processes, and bounded waits."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any

SPAWN = mp.get_context("spawn")


def start(procs: list[Any], target: Any, *args: Any) -> Any:
    """Start ``target(*args)`` in a spawned process; the ``procs`` fixture cleans it up."""
    p = SPAWN.Process(target=target, args=args)
    p.start()
    procs.append(p)
    return p


def until(check: Callable[[], bool], timeout: float = 15, what: str = "condition") -> None:
    """Poll ``check`` until it holds; fail the test (not hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
