"""dedupe as the cache: stale-while-revalidate and stale-if-error, no stampede, no error storm.

    python examples/stale_cache.py redis://127.0.0.1:6379/0

The Redis URL comes from argv[1] or DEDUPE_REDIS_URL; any Redis 7.0 or later will do.
Three acts, 20 threads each, all asking for the same price at the same moment:
1. cold: one origin call, everyone gets its value;
2. the value has expired: everyone gets the stale value at once, one refresh runs behind;
3. the origin fails: everyone still gets the last good value, and the origin is left alone
   for error_backoff, fleet-wide.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from dedupe import Served, SingleFlight

CALLERS = 20

sf = SingleFlight(prefix=f"example-{uuid.uuid4().hex[:8]}")  # a fresh namespace per run
origin_calls = 0
origin_up = True
price_now = 100


@sf(
    key="price:{sku}",
    result_ttl=0.5,  # fresh for half a second after its run
    stale_while_revalidate=60,  # then served stale at once for a minute, while one refresh runs
    stale_if_error=300,  # a failed run is replaced by the last good value for five minutes
    error_backoff=30,  # after such a failure, nobody calls the origin for 30 s, fleet-wide
)
def price(sku: str) -> int:
    """The slow origin. dedupe makes sure one caller at a time, fleet-wide, runs it."""
    global origin_calls
    origin_calls += 1
    time.sleep(0.2)  # SELECT price FROM ...
    if not origin_up:
        raise ConnectionError("the price service is down")
    return price_now


def herd() -> list[Served]:
    """CALLERS threads ask for the price at the same moment."""
    start = threading.Barrier(CALLERS)

    def ask(_: int) -> Served:
        start.wait()
        return price.detailed("sku-1")

    with ThreadPoolExecutor(CALLERS) as pool:
        return list(pool.map(ask, range(CALLERS)))


def report(act: str, served: list[Served], calls_before: int) -> None:
    values = sorted({s.value for s in served})
    stale = sum(s.stale for s in served)
    calls = origin_calls - calls_before
    print(f"{act}: origin calls {calls}, values {values}, stale {stale}/{len(served)}")


def wait_until(check: object, timeout: float = 10.0) -> bool:
    """Poll (bounded) until check() is true: the background refresh has landed."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def redis_url() -> str:
    """The Redis to use: argv[1], else DEDUPE_REDIS_URL."""
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DEDUPE_REDIS_URL", "")
    if not url:
        sys.exit(f"usage: python {sys.argv[0]} REDIS_URL (or set DEDUPE_REDIS_URL)")
    return url


def main() -> int:
    global origin_up, price_now
    sf.configure(url=redis_url())
    ok = True

    before = origin_calls
    served = herd()
    report("act 1, cold", served, before)
    ok &= origin_calls - before == 1 and {s.value for s in served} == {100}

    time.sleep(0.6)  # past result_ttl: the value is stale now
    price_now = 101
    before = origin_calls
    served = herd()
    report("act 2, expired", served, before)
    ok &= all(s.stale and s.value == 100 for s in served)
    ok &= wait_until(lambda: not price.detailed("sku-1").stale)
    print(f"act 2, after the refresh: value {price('sku-1')}, origin calls {origin_calls - before}")
    ok &= origin_calls - before == 1 and price("sku-1") == 101

    time.sleep(0.6)
    origin_up = False
    before = origin_calls
    served = herd()
    job = price.job_id("sku-1")
    # The one background refresh ran and failed (its lease is gone); now the backoff holds.
    ok &= wait_until(lambda: origin_calls - before >= 1 and sf.inspect(job).holder is None)
    again = herd()
    report("act 3, origin down", served + again, before)
    errors = 0
    for s in served + again:
        errors += not isinstance(s.value, int)
    print(f"act 3, errors seen by callers: {errors}")
    ok &= errors == 0 and origin_calls - before == 1
    ok &= all(s.value == 101 and s.stale for s in served + again)

    sf.close()
    print("verdict:", "as promised" if ok else "NOT as promised")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
