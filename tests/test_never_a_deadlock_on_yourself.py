"""Never a deadlock on yourself: a function that calls itself with its own key, directly or
through another flight, gets ReentrantFlight, sync and async. The call through a thread pool
(with contextvars.copy_context().run) is in test_api.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dedupe import ReentrantFlight, SingleFlight

pytestmark = [pytest.mark.timeout(30), pytest.mark.compat]


def test_reentry_fails_fast_sync(sf: SingleFlight) -> None:
    @sf(key="a:{n}")
    def a(n: int) -> int:
        return b(n)

    @sf(key="b:{n}")
    def b(n: int) -> int:
        return a(n) if n else 0

    with pytest.raises(ReentrantFlight):
        a(1)
    assert a(0) == 0  # a different key is no recursion
    with pytest.raises(ReentrantFlight):

        @sf(key="self")
        def itself() -> Any:
            return itself()

        itself()


async def test_reentry_fails_fast_async(sf: SingleFlight) -> None:
    @sf(key="x")
    async def outer() -> Any:
        return await asyncio.gather(inner())

    @sf(key="y")
    async def inner() -> Any:
        return await outer()

    with pytest.raises(ReentrantFlight):
        await outer()
