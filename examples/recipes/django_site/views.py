"""GET /reports/<name>: concurrent requests in every gunicorn worker share one build."""

from __future__ import annotations

import os
import time
import uuid

from django.http import HttpRequest, JsonResponse

from .flights import flights


@flights(key="report:{name}", namespace="recipes.reports", result_ttl=30)
def build_report(name: str) -> dict[str, object]:
    """The expensive part: runs once at a time per name across every worker and thread."""
    time.sleep(0.5)  # queries, rendering, ...
    return {"name": name, "rows": 1234, "build_id": uuid.uuid4().hex, "built_by_pid": os.getpid()}


def report(request: HttpRequest, name: str) -> JsonResponse:
    return JsonResponse(build_report(name))


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"pid": os.getpid()})
