"""FastAPI under uvicorn with several workers: one report build per name, whichever worker asks.

    export DEDUPE_REDIS_URL=redis://127.0.0.1:6379/0
    export PROMETHEUS_MULTIPROC_DIR=$(mktemp -d)   # before the workers start; empty it first
    uvicorn --app-dir examples/recipes fastapi_app:app --workers 2

- ``GET /reports/{name}``: concurrent requests, in every worker, share one run of
  ``build_report`` (a dedupe flight); the others wait for it and get its value.
- ``GET /rates/{currency}``: the same through ``call()``, with the SingleFlight given by a
  dependency (override it in tests with ``app.dependency_overrides``).
- ``GET /metrics``: Prometheus metrics of all the workers together, dedupe's among them, with
  prometheus_client's multiprocess mode (each worker writes its own files under
  ``PROMETHEUS_MULTIPROC_DIR``; the endpoint merges them).
- Shutdown: the lifespan closes dedupe (``await flights.aclose()``) in each worker.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Path, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    generate_latest,
    multiprocess,
)
from pydantic import BaseModel

import dedupe.ops.prometheus
from dedupe import SingleFlight

# One SingleFlight per worker process: each worker imports this module. It connects on first
# use. An explicit URL (no default): a recipe should never reach a Redis by accident.
flights = SingleFlight(os.environ["DEDUPE_REDIS_URL"], prefix="recipes")

# dedupe's metrics on the default registry. Under PROMETHEUS_MULTIPROC_DIR every counter and
# histogram of the process is written to its files, so /metrics sees all workers.
dedupe.ops.prometheus.instrument()
REPORT_BUILDS = Counter("report_builds", "Runs of build_report", ["name"])

Name = Annotated[str, Path(pattern=r"^[a-z0-9-]{1,40}$")]


class Report(BaseModel):
    name: str
    rows: int
    build_id: str  # new for every run: every response a run served carries its id
    built_by_pid: int


# namespace= keeps the job id the same however this module is imported (`fastapi_app` under
# uvicorn --app-dir, `examples.recipes.fastapi_app` elsewhere): the flight is shared by all.
@flights(key="report:{name}", namespace="recipes.reports", result_ttl=30)
async def build_report(name: str) -> dict[str, object]:
    """The expensive part: runs once at a time per name across every worker."""
    REPORT_BUILDS.labels(name).inc()
    await asyncio.sleep(0.5)  # queries, rendering, ...
    # TODO(typed decoding): return Report(...) itself once dedupe decodes a value by the
    # function's return annotation. Today the default "safe" serializer refuses a Pydantic
    # model for callers in other processes, so the flight carries plain JSON-able data and
    # the route's response_model=Report validates and documents it.
    return {"name": name, "rows": 1234, "build_id": uuid.uuid4().hex, "built_by_pid": os.getpid()}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    # The hub and renewal threads, and this event loop's client: before the loop ends.
    await flights.aclose()


app = FastAPI(lifespan=lifespan)


def get_flights() -> SingleFlight:
    """The dependency that hands routes the worker's SingleFlight."""
    return flights


@app.get("/reports/{name}", response_model=Report)
async def get_report(name: Name) -> dict[str, object]:
    return await build_report(name)


async def fetch_rate(currency: str) -> dict[str, object]:
    await asyncio.sleep(0.2)  # a slow upstream API
    return {"currency": currency, "rate": 1.0875, "fetch_id": uuid.uuid4().hex}


@app.get("/rates/{currency}")
async def get_rate(
    currency: Annotated[str, Path(pattern=r"^[A-Z]{3}$")],
    sf: Annotated[SingleFlight, Depends(get_flights)],
) -> dict[str, object]:
    return await sf.call(f"recipes:rate:{currency}", fetch_rate, currency)


@app.get("/healthz")
async def healthz() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/metrics")
def metrics() -> Response:
    """prometheus_client's documented multiprocess collection: a fresh registry per scrape."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
