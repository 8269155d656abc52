"""Spawned worker processes for the batch and cache-fill benchmarks, started in lock step.

The parent hands every worker the same task, naming a worker function (``module:name``) that
builds its tool, warms it up and then calls ``ctx.go()``: every worker and the parent meet
there, the parent resets the server's command stats while all of them hold still, and a
second meeting starts the measured part. ``ctx.sync()`` lines the workers up again (one
round after another). Timestamps are ``time.monotonic_ns()``, one clock for every process
on Linux. Every wait is bounded; a failing worker aborts the barriers so no one hangs.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import queue
import threading
import traceback
from collections.abc import Callable
from typing import Any

TIMEOUT = 120.0


class WorkerError(RuntimeError):
    pass


class Ctx:
    """What a worker function gets: its index, the fleet's size, and the two meetings."""

    def __init__(self, index: int, n: int, phase: Any, rounds: Any) -> None:
        self.index, self.n = index, n
        self._phase, self._rounds = phase, rounds

    def go(self) -> None:
        self._phase.wait(TIMEOUT)  # warmed up
        self._phase.wait(TIMEOUT)  # the parent has reset the stats: go

    def sync(self) -> None:
        self._rounds.wait(TIMEOUT)


def _worker(index: int, n: int, commands: Any, results: Any, phase: Any, rounds: Any) -> None:
    ctx = Ctx(index, n, phase, rounds)
    while True:
        item = commands.get()
        if item is None:
            return
        target, task = item
        try:
            module, name = target.split(":")
            fn = getattr(importlib.import_module(module), name)
            results.put((index, fn(ctx, task), None))
        except BaseException:
            phase.abort()
            rounds.abort()
            results.put((index, None, traceback.format_exc()))


class Fleet:
    """``n`` spawned processes, reused for every run of a benchmark."""

    def __init__(self, n: int) -> None:
        mp_ctx = mp.get_context("spawn")
        self.n = n
        self.phase = mp_ctx.Barrier(n + 1)
        self.rounds = mp_ctx.Barrier(n)
        self.results: Any = mp_ctx.Queue()
        self.commands: list[Any] = [mp_ctx.Queue() for _ in range(n)]
        self.procs = [
            mp_ctx.Process(
                target=_worker,
                args=(i, n, self.commands[i], self.results, self.phase, self.rounds),
                name=f"bench-fleet-{i}",
                daemon=True,
            )
            for i in range(n)
        ]
        for p in self.procs:
            p.start()

    def run(
        self,
        target: str,
        tasks: list[dict[str, Any]],
        on_ready: Callable[[], None] | None = None,
    ) -> list[Any]:
        """Run ``target`` with ``tasks[i]`` in worker i; ``on_ready`` while all hold still."""
        for q, task in zip(self.commands, tasks, strict=True):
            q.put((target, task))
        try:
            self.phase.wait(TIMEOUT)
            if on_ready is not None:
                on_ready()
            self.phase.wait(TIMEOUT)
        except threading.BrokenBarrierError:
            pass  # a worker failed: its traceback arrives below
        out: dict[int, Any] = {}
        errors = []
        for _ in range(self.n):
            try:
                index, res, err = self.results.get(timeout=TIMEOUT * 2)
            except queue.Empty:
                raise WorkerError("a worker did not answer in time") from None
            if err:
                errors.append(err)
            out[index] = res
        if errors:
            self.phase.reset()
            self.rounds.reset()
            raise WorkerError(errors[0])
        return [out[i] for i in range(self.n)]

    def close(self) -> None:
        for q in self.commands:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
