"""Cache fill without a stampede: many threads miss the cache at once, the database is hit once.

    python examples/cache_fill.py redis://127.0.0.1:6379/0

The Redis URL comes from argv[1] or DEDUPE_REDIS_URL; any Redis 7.0 or later will do.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import redis

from dedupe import SingleFlight

CALLERS = 20

sf = SingleFlight(prefix="example")
cache: redis.Redis  # connected in main()
db_queries = 0


@sf(key="user:{user_id}")
def load_user(user_id: int) -> dict[str, object]:
    """Query the (slow) database and fill the cache. Runs once for all concurrent callers."""
    global db_queries
    db_queries += 1  # only one thread runs here at a time for a given user
    time.sleep(0.3)  # SELECT * FROM users WHERE id = ...
    user = {"id": user_id, "name": f"user-{user_id}"}
    cache.set(f"cache:user:{user_id}", json.dumps(user), ex=60)
    return user


def get_user(user_id: int) -> dict[str, object]:
    cached = cache.get(f"cache:user:{user_id}")
    if cached is not None:
        return json.loads(cached)
    return load_user(user_id)


def redis_url() -> str:
    """The Redis to use: argv[1], else DEDUPE_REDIS_URL."""
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DEDUPE_REDIS_URL", "")
    if not url:
        sys.exit(f"usage: python {sys.argv[0]} REDIS_URL (or set DEDUPE_REDIS_URL)")
    return url


def main() -> int:
    global cache
    url = redis_url()
    sf.configure(url=url)
    cache = redis.Redis.from_url(url)
    cache.delete("cache:user:42")  # start cold

    start = threading.Barrier(CALLERS)

    def request(_: int) -> dict[str, object]:
        start.wait()  # every caller misses the cache at the same moment
        return get_user(42)

    with ThreadPoolExecutor(CALLERS) as pool:
        users = list(pool.map(request, range(CALLERS)))
    sf.close()

    served = sum(user == {"id": 42, "name": "user-42"} for user in users)
    print(f"{CALLERS} threads asked for user 42 at once")
    print(f"database queries: {db_queries}")
    print(f"callers served: {served}/{CALLERS}")
    return 0 if db_queries == 1 and served == CALLERS else 1


if __name__ == "__main__":
    sys.exit(main())
