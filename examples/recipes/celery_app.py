"""Celery workers: tasks that ask for the same report share one build, in every worker.

    export DEDUPE_REDIS_URL=redis://127.0.0.1:6379/0      # dedupe; also the broker here
    celery --workdir examples/recipes -A celery_app worker -P threads -c 8
    python examples/recipes/celery_app.py q3 10           # send 10 tasks, print the results

Any pool works: with the default prefork pool each child process gets its own dedupe
connections and threads after the fork (dedupe is fork-safe). The broker and result backend
default to the dedupe Redis; set CELERY_BROKER_URL / CELERY_RESULT_BACKEND to use others.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections import Counter

from celery import Celery

from dedupe import SingleFlight

REDIS_URL = os.environ["DEDUPE_REDIS_URL"]
app = Celery(
    "recipes",
    broker=os.environ.get("CELERY_BROKER_URL", REDIS_URL),
    backend=os.environ.get("CELERY_RESULT_BACKEND", REDIS_URL),
)
app.conf.broker_connection_retry_on_startup = True
flights = SingleFlight(REDIS_URL, prefix="recipes")


@flights(key="report:{name}", namespace="recipes.reports", result_ttl=30)
def build_report(name: str) -> dict[str, object]:
    """The expensive part: runs once at a time per name across every worker."""
    time.sleep(0.5)  # queries, rendering, ...
    return {"name": name, "rows": 1234, "build_id": uuid.uuid4().hex, "built_by_pid": os.getpid()}


# An explicit name: run as a script (the producer below) this module is __main__, under the
# worker it is celery_app, and both must mean one task.
@app.task(name="recipes.report")
def report(name: str) -> dict[str, object]:
    return build_report(name)


def main(argv: list[str]) -> int:
    """Send ``count`` tasks for one report at once and print what came back."""
    name, count = argv[0], int(argv[1])
    pending = [report.delay(name) for _ in range(count)]
    results = [p.get(timeout=30) for p in pending]
    builds = Counter(str(r["build_id"]) for r in results)
    print(f"{count} tasks for report {name!r}: {len(builds)} build(s)")
    for build_id, served in builds.items():
        print(f"  build {build_id}: {served} task(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["q3", "10"]))
