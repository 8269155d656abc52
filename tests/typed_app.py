"""A FastAPI app whose decorated function returns a Pydantic model, for uvicorn with several
workers (test_typed_values.py): DEDUPE_REDIS_URL and TYPED_APP_PREFIX configure it; each run
counts in Redis (``<prefix>:runs:<id>``)."""

from __future__ import annotations

import asyncio
import os

import redis
import redis.asyncio as aioredis
from fastapi import FastAPI, Response
from typed_workers import WHEN, Account, Owner

from dedupe import SingleFlight

PREFIX = os.environ["TYPED_APP_PREFIX"]
sf = SingleFlight(prefix=PREFIX, result_ttl=30, lock_ttl=10)
app = FastAPI()
_counter = aioredis.Redis.from_url(os.environ["DEDUPE_REDIS_URL"])
# Each worker says it is up (the test waits for two), and closes its client at once.
with redis.Redis.from_url(os.environ["DEDUPE_REDIS_URL"]) as _r:
    _r.sadd(f"{PREFIX}:workers", os.getpid())


@sf(key="account:{account_id}")
async def load_account(account_id: int) -> Account:
    await _counter.incr(f"{PREFIX}:runs:{account_id}")
    await asyncio.sleep(0.05)  # a query: followers in both workers join it meanwhile
    return Account(id=account_id, owner=Owner(name=f"user-{account_id}", since=WHEN))


@app.get("/ready")
async def ready() -> Response:
    return Response(str(os.getpid()))


@app.get("/accounts/{account_id}", response_model=Account)
async def account(account_id: int, response: Response) -> Account:
    served = await load_account.detailed(account_id)
    value = served.value
    response.headers["x-role"] = served.role
    response.headers["x-value-type"] = f"{type(value).__module__}.{type(value).__qualname__}"
    return value  # type: ignore[no-any-return]
