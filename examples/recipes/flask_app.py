"""Flask under gunicorn, 2 workers x 8 threads: one report build per name across all of them.

    export DEDUPE_REDIS_URL=redis://127.0.0.1:6379/0
    gunicorn --chdir examples/recipes -w 2 --threads 8 -b 127.0.0.1:8000 flask_app:app

(``flask --app flask_app run --with-threads`` works the same for a single process.)
"""

from __future__ import annotations

import os
import time
import uuid

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue

from dedupe import SingleFlight, WaitTimeout

flights = SingleFlight(os.environ["DEDUPE_REDIS_URL"], prefix="recipes")
app = Flask(__name__)


# A follower waits at most 10 s for the build (then WaitTimeout), whatever the leader does.
@flights(key="report:{name}", namespace="recipes.reports", result_ttl=30, wait_timeout=10)
def build_report(name: str) -> dict[str, object]:
    """The expensive part: runs once at a time per name across every worker and thread."""
    time.sleep(0.5)  # queries, rendering, ...
    return {"name": name, "rows": 1234, "build_id": uuid.uuid4().hex, "built_by_pid": os.getpid()}


@app.get("/reports/<name>")
def report(name: str) -> ResponseReturnValue:
    try:
        return jsonify(build_report(name))
    except WaitTimeout:
        return jsonify(error="the report is still being built, retry"), 503


@app.get("/healthz")
def healthz() -> ResponseReturnValue:
    return jsonify(pid=os.getpid())
