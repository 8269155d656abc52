"""Ad hoc single-flight with ``sf.call(job_id, fn, *args)``: no decorator needed.

    python examples/adhoc_call.py redis://127.0.0.1:6379/0

Five threads, then five tasks, need a fresh token for "svc-a"; each time one refresh runs.
Inside it, ``current_flight().token`` is the fencing token of the lease: it grows with every
new flight of the job id, so a store can reject writes from a leader that was superseded.
The Redis URL comes from argv[1] or DEDUPE_REDIS_URL; any Redis 7.0 or later will do.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from dedupe import SingleFlight, current_flight

CALLERS = 5

# result_ttl=0: once a refresh is done, a later caller starts a new one instead of reusing it.
sf = SingleFlight(prefix="example", result_ttl=0)
fencing_tokens: list[int] = []


def refresh_token(service: str) -> str:
    flight = current_flight()
    assert flight is not None  # we run as the leader of the flight
    print(f"  refreshing {service}: flight key {flight.key!r}, fencing token {flight.token}")
    fencing_tokens.append(flight.token)
    time.sleep(0.3)  # POST /oauth/token ...
    return f"{service}-access-token-{flight.token}"


async def refresh_token_async(service: str) -> str:
    flight = current_flight()
    assert flight is not None
    print(f"  refreshing {service}: flight key {flight.key!r}, fencing token {flight.token}")
    fencing_tokens.append(flight.token)
    await asyncio.sleep(0.3)
    return f"{service}-access-token-{flight.token}"


async def refresh_from_tasks() -> list[str]:
    calls = (sf.call("token-refresh", refresh_token_async, "svc-a") for _ in range(CALLERS))
    return await asyncio.gather(*calls)


def redis_url() -> str:
    """The Redis to use: argv[1], else DEDUPE_REDIS_URL."""
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DEDUPE_REDIS_URL", "")
    if not url:
        sys.exit(f"usage: python {sys.argv[0]} REDIS_URL (or set DEDUPE_REDIS_URL)")
    return url


def main() -> int:
    url = redis_url()
    sf.configure(url=url)

    print(f"sync: {CALLERS} threads call sf.call('token-refresh', refresh_token, 'svc-a')")
    with ThreadPoolExecutor(CALLERS) as pool:
        sync_results = list(
            pool.map(lambda _: sf.call("token-refresh", refresh_token, "svc-a"), range(CALLERS))
        )
    print(f"  {len(set(sync_results))} distinct result for {len(sync_results)} callers")

    print(f"async: {CALLERS} tasks await sf.call('token-refresh', refresh_token_async, 'svc-a')")
    async_results = asyncio.run(refresh_from_tasks())
    print(f"  {len(set(async_results))} distinct result for {len(async_results)} callers")
    sf.close()

    print(f"refreshes: {len(fencing_tokens)}; fencing tokens: {fencing_tokens}")
    grew = len(fencing_tokens) == 2 and fencing_tokens[0] < fencing_tokens[1]
    shared = len(set(sync_results)) == len(set(async_results)) == 1
    return 0 if grew and shared else 1


if __name__ == "__main__":
    sys.exit(main())
