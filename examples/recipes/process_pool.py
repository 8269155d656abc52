"""A ProcessPoolExecutor: worker processes that ask for the same key share one run.

    python examples/recipes/process_pool.py redis://127.0.0.1:6379/0

A decorated function pickles by reference, as a plain one does, so ``pool.map`` and
``pool.submit`` can send it. The pool uses the "spawn" start method (the default of Python
3.14 is not fork either): each worker imports this module and builds its own SingleFlight from
DEDUPE_REDIS_URL, which the parent sets before starting the pool.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

from dedupe import SingleFlight

WORKERS = 4
flights = SingleFlight(os.environ.get("DEDUPE_REDIS_URL"), prefix="recipes")


# namespace=: run as a script, this module is __main__ in the parent and __mp_main__ in the
# spawned workers; a fixed namespace gives them one job id, so they share the flight.
@flights(key="thumbnail:{image}", namespace="recipes.thumbnails", result_ttl=30)
def thumbnail(image: str) -> str:
    time.sleep(0.5)  # decoding, resizing, ...
    return f"{image} thumbnail, run {uuid.uuid4().hex[:12]} in pid {os.getpid()}"


def main() -> int:
    if len(sys.argv) > 1:
        os.environ["DEDUPE_REDIS_URL"] = sys.argv[1]
    if not os.environ.get("DEDUPE_REDIS_URL"):
        print(f"usage: {sys.argv[0]} REDIS_URL (or set DEDUPE_REDIS_URL)", file=sys.stderr)
        return 2
    flights.configure(url=os.environ["DEDUPE_REDIS_URL"])
    images = ["cat.png"] * 6 + ["dog.png"] * 6
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=WORKERS, mp_context=spawn) as pool:
        results = list(pool.map(thumbnail, images))
        mine = thumbnail("cat.png")  # the parent shares the flight (or its kept value) too
    runs = Counter(results)
    print(f"{len(images)} calls in {WORKERS} worker processes: {len(runs)} run(s)")
    for result, calls in sorted(runs.items()):
        print(f"  {calls} x {result}")
    print(f"parent got the workers' run: {mine in runs}")
    flights.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
