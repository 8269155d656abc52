"""Run as a script (``python tests/main_module_jobs.py``) by tests/test_start_methods.py.

Its decorated functions live in ``__main__``: in the spawn and forkserver children that this
script starts, Python imports the same file again as ``__mp_main__``. Every process reports
the job ids it computes, then the parent and the children herd onto one job, which must run
once. The URL and prefix come from the environment (children inherit it); the report is one
JSON line on stdout.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import threading
import time
from typing import Any

import redis

from dedupe import SingleFlight
from dedupe.core.keys import names_for

URL = os.environ["MAIN_JOBS_URL"]
PREFIX = os.environ["MAIN_JOBS_PREFIX"]
sf = SingleFlight(URL, prefix=PREFIX, lock_ttl=5.0, result_ttl=0)


@dataclasses.dataclass(frozen=True)
class Shape:  # a class of __main__ as an argument of a bare key
    width: int
    height: int


@sf(key="report:{name}")
def build(name: str) -> str:
    r = redis.Redis.from_url(URL)
    r.incr(f"{PREFIX}:runs")
    r.rpush(f"{PREFIX}:started", os.getpid())
    # Held until the parent saw every other process wait on this flight (or gave up).
    r.blpop([f"{PREFIX}:go"], timeout=30)
    return f"{name} built by {os.getpid()}"


@sf
def area(shape: Shape) -> int:
    return shape.width * shape.height


def ids() -> dict[str, str]:
    return {"build": build.job_id("daily"), "area": area.job_id(Shape(2, 3))}


def child(barrier: Any, out: Any) -> None:
    out.put(("ids", mp.current_process().name, ids()))
    barrier.wait(30)
    try:
        out.put(("value", mp.current_process().name, build("daily")))
    except Exception as exc:
        out.put(("error", mp.current_process().name, repr(exc)))
    finally:
        sf.close()


def main() -> None:
    r = redis.Redis.from_url(URL)
    contexts = [("spawn", mp.get_context("spawn")), ("spawn", mp.get_context("spawn"))]
    if "forkserver" in mp.get_all_start_methods():
        contexts.append(("forkserver", mp.get_context("forkserver")))
    barrier = mp.get_context("spawn").Barrier(len(contexts) + 1)
    outs = []
    procs = []
    for i, (method, ctx) in enumerate(contexts):
        out = ctx.Queue()
        p = ctx.Process(target=child, args=(barrier, out), name=f"{method}-{i}")
        p.start()
        procs.append(p)
        outs.append(out)
    results: list[Any] = [("ids", "parent", ids())]
    parent_value: list[str] = []

    def call() -> None:
        barrier.wait(30)
        parent_value.append(build("daily"))

    caller = threading.Thread(target=call)
    caller.start()
    # Release the job once every other process waits on its channel, or a second run began
    # (the ids differ): then every run blocked in BLPOP gets its own "go".
    channel = names_for(PREFIX, build.job_id("daily")).channel
    others = len(contexts)
    for _ in range(3000):
        subscribed = r.pubsub_numsub(channel)[0][1]
        if subscribed >= others or int(r.get(f"{PREFIX}:runs") or 0) > 1:
            break
        time.sleep(0.01)
    r.rpush(f"{PREFIX}:go", *["go"] * (others + 1))
    caller.join(30)
    results.append(("value", "parent", parent_value[0] if parent_value else None))
    for out in outs:
        results.extend(out.get(timeout=30) for _ in range(2))
    for p in procs:
        p.join(30)
    sf.close()
    print(
        json.dumps(
            {
                "results": results,
                "runs": int(r.get(f"{PREFIX}:runs") or 0),
                "methods": [m for m, _ in contexts],
            }
        )
    )


if __name__ == "__main__":
    main()
