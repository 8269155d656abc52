"""The dedupe demo: many processes, one execution per key, and a takeover.

    python examples/demo.py redis://127.0.0.1:6379/0     (``make demo`` starts a private server)

Act 1: 4 processes x 9 threads call build_report() for 3 keys at the same moment;
       each key runs once and every caller gets its value.
Act 2: the leader of a key is SIGKILLed mid-run; once its lease expires a waiting caller
       in another process takes over, and every surviving caller gets the value.

The Redis URL comes from argv[1] or DEDUPE_REDIS_URL; any Redis 7.0 or later will do. The
demo's bookkeeping keys are named per run (``demo:<run>:...``) and deleted at the end.
Exits 0 if every invariant held, 1 otherwise.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Barrier
from typing import Any

import redis

from dedupe import SingleFlight, current_flight

PROCESSES, THREADS = 4, 9
KEYS = ("daily", "weekly", "monthly")
WORK_SECONDS = 0.5
LOCK_TTL = 2.0  # act 2: how long a dead leader's lease keeps the others waiting

sf = SingleFlight()  # reads DEDUPE_REDIS_URL, which main() sets for every worker process
# Names this run's bookkeeping keys; main() sets it before spawning the workers.
RUN_ENV = "DEDUPE_DEMO_RUN"


def k(*parts: object) -> str:
    """A bookkeeping key of this run: demo:<run>:<parts...>."""
    return ":".join(["demo", os.environ[RUN_ENV], *map(str, parts)])


@functools.cache
def db() -> redis.Redis:
    return redis.Redis.from_url(os.environ["DEDUPE_REDIS_URL"], decode_responses=True)


@sf(key="report:{name}")
def build_report(name: str) -> str:
    db().incr(k("executions", name))
    time.sleep(WORK_SECONDS)
    return f"{name} report by pid {os.getpid()}"


@sf(key="export:{name}", lock_ttl=LOCK_TTL)
def export(name: str) -> str:
    run = db().incr(k("executions", name))
    flight = current_flight()
    assert flight is not None
    db().hset(
        k("run", name, run),
        mapping={"pid": os.getpid(), "token": flight.token, "started": time.time()},
    )
    time.sleep(3600 if run == 1 else WORK_SECONDS)  # the first leader hangs: act 2 kills it
    return f"{name} export by pid {os.getpid()}"


JOBS: dict[str, Callable[[str], str]] = {"report": build_report, "export": export}


def worker(job: str, names: list[str], barrier: Barrier) -> None:
    """One process: a thread per name; all threads of all processes start together."""

    def call(name: str) -> None:
        barrier.wait(timeout=30)
        t0 = time.monotonic()
        value = JOBS[job](name)
        seconds = time.monotonic() - t0
        served = json.dumps({"pid": os.getpid(), "value": value, "seconds": seconds})
        db().rpush(k("served", name), served)

    with ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(call, names))  # re-raises a failed call: the process exits non-zero


def start_workers(job: str, names_per_process: list[list[str]]) -> list[BaseProcess]:
    """Spawn the worker processes; return once all their threads are released together."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(sum(map(len, names_per_process)) + 1)  # + 1: this process
    procs: list[BaseProcess] = [
        ctx.Process(target=worker, args=(job, names, barrier)) for names in names_per_process
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=30)
    return procs


def join(procs: list[BaseProcess], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()  # by its PID
            p.join()


def served(r: redis.Redis, name: str) -> list[dict[str, Any]]:
    """What each caller of ``name`` got: its pid, the value and how long it waited."""
    return [json.loads(item) for item in r.lrange(k("served", name), 0, -1)]


def act1(r: redis.Redis) -> bool:
    print(f"Act 1: {PROCESSES} processes x {THREADS} threads call build_report() for {KEYS}")
    names = [
        [KEYS[(p * THREADS + t) % len(KEYS)] for t in range(THREADS)] for p in range(PROCESSES)
    ]
    procs = start_workers("report", names)
    join(procs)

    ok = all(p.exitcode == 0 for p in procs)
    print("  key     | executions | callers served | processes | wall time")
    print("  --------+------------+----------------+-----------+----------")
    for key in KEYS:
        callers = sum(row.count(key) for row in names)
        got = served(r, key)
        executions = int(r.get(k("executions", key)) or 0)
        processes = len({c["pid"] for c in got})
        wall = max((c["seconds"] for c in got), default=0.0)
        ok = ok and executions == 1 and len(got) == callers and len({c["value"] for c in got}) == 1
        print(
            f"  {key:<7} | {executions:>10} | {len(got):>9} of {callers:<2} "
            f"| {processes:>9} | {wall:>7.2f} s"
        )
    total = sum(map(len, names))
    print(f"  verdict: every key ran once; all {total} callers served" if ok else "  FAILED")
    return ok


def act2(r: redis.Redis) -> bool:
    name, processes, threads = "nightly", 3, 4
    print(
        f"Act 2: {processes} processes x {threads} threads call export({name!r}); "
        f"the leader is killed mid-run (lock_ttl {LOCK_TTL} s)"
    )
    procs = start_workers("export", [[name] * threads for _ in range(processes)])

    deadline = time.monotonic() + 10
    while not (first := r.hgetall(k("run", name, 1))) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not first:
        print("  FAILED: no leader started")
        join(procs, 0)
        return False
    leader = int(first["pid"])
    assert leader in {p.pid for p in procs}, "the leader must be one of our workers"
    time.sleep(0.5)  # let it get well into its run
    os.kill(leader, signal.SIGKILL)
    killed_at = time.time()
    print(f"  leader pid {leader} holds the lease (fencing token {first['token']}): SIGKILL")
    join(procs)

    second = r.hgetall(k("run", name, 2))
    if not second:
        print("  FAILED: nobody took over")
        return False
    took = float(second["started"]) - killed_at
    print(
        f"  takeover: pid {second['pid']} (fencing token {second['token']}) took over "
        f"{took:.2f} s after the kill (lock_ttl {LOCK_TTL} s)"
    )
    got = served(r, name)
    survivors = (processes - 1) * threads
    values = {c["value"] for c in got}
    print(f"  {len(got)} of {survivors} surviving callers got {', '.join(map(repr, values))}")
    ok = (
        int(r.get(k("executions", name)) or 0) == 2
        and int(second["token"]) > int(first["token"])
        and took <= LOCK_TTL + 1.0
        and len(got) == survivors
        and values == {f"{name} export by pid {second['pid']}"}
        and all(p.exitcode == 0 for p in procs if p.pid != leader)
    )
    print(
        "  verdict: a waiter took over from the dead leader; every survivor served"
        if ok
        else "  FAILED"
    )
    return ok


def redis_url() -> str:
    """The Redis to use: argv[1], else DEDUPE_REDIS_URL."""
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DEDUPE_REDIS_URL", "")
    if not url:
        sys.exit(f"usage: python {sys.argv[0]} REDIS_URL (or set DEDUPE_REDIS_URL)")
    return url


def main() -> int:
    started = time.monotonic()
    url = redis_url()
    os.environ["DEDUPE_REDIS_URL"] = url  # inherited by the worker processes
    os.environ[RUN_ENV] = uuid.uuid4().hex[:8]
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        ok = act1(r)
        print()
        ok = act2(r) and ok
    finally:
        mine = list(r.scan_iter(match=k("*"), count=1000))  # only this run's bookkeeping keys
        if mine:
            r.delete(*mine)
        r.close()
    print(f"\n{'OK' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
