"""An async request handler: 50 concurrent requests for one report build it once.

    python examples/async_handler.py redis://127.0.0.1:6379/0

An exception raised by the one execution reaches every request that waited for it.
The Redis URL comes from argv[1] or DEDUPE_REDIS_URL; any Redis 7.0 or later will do.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter

from dedupe import SingleFlight

REQUESTS = 50

sf = SingleFlight(prefix="example")
builds: Counter[str] = Counter()


@sf(key="report:{report_id}")
async def get_report(report_id: str) -> dict[str, object]:
    """An expensive report; concurrent callers for the same report_id share one build."""
    builds[report_id] += 1
    await asyncio.sleep(0.3)  # slow queries, rendering, ...
    if report_id == "broken":
        raise RuntimeError("the report backend is down")
    return {"report": report_id, "rows": 1234}


async def handle(path: str) -> tuple[int, object]:
    """A tiny stand-in for a web framework's handler: GET /reports/<report_id>."""
    report_id = path.rsplit("/", 1)[-1]
    try:
        return 200, await get_report(report_id)
    except RuntimeError as exc:
        return 500, {"error": str(exc)}


async def burst(path: str) -> Counter[int]:
    """Fire REQUESTS concurrent requests at one path; print and count the responses."""
    responses = await asyncio.gather(*(handle(path) for _ in range(REQUESTS)))
    print(f"GET {path} x{REQUESTS} concurrent requests")
    print(f"  executions: {builds[path.rsplit('/', 1)[-1]]}")
    for response, count in Counter(f"{status} {body}" for status, body in responses).items():
        print(f"  {count} x {response}")
    return Counter(status for status, _ in responses)


async def serve() -> bool:
    ok = await burst("/reports/q3-sales") == {200: REQUESTS}
    # The build raises: every request that waited for it gets the same exception.
    return await burst("/reports/broken") == {500: REQUESTS} and ok


def redis_url() -> str:
    """The Redis to use: argv[1], else DEDUPE_REDIS_URL."""
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DEDUPE_REDIS_URL", "")
    if not url:
        sys.exit(f"usage: python {sys.argv[0]} REDIS_URL (or set DEDUPE_REDIS_URL)")
    return url


def main() -> int:
    url = redis_url()
    sf.configure(url=url)
    ok = asyncio.run(serve())
    sf.close()
    return 0 if ok and builds == {"q3-sales": 1, "broken": 1} else 1


if __name__ == "__main__":
    sys.exit(main())
