"""Checked by mypy (tests/test_typing.py): the decorators keep the signatures they wrap."""

from collections.abc import Coroutine
from typing import Any

from dedupe import SingleFlight

sf = SingleFlight("redis://localhost:6379/0")


@sf(key="user:{user_id}")
def load_user(user_id: int) -> dict[str, int]:
    return {"id": user_id}


@sf
async def square(x: int) -> int:
    return x * x


@sf(key=lambda user_id: f"u:{user_id}", lock_ttl=30, wait_timeout=5, result_ttl=0)
def load(user_id: int, *, verbose: bool = False) -> str:
    return ""


user: dict[str, int] = load_user(1)
squared: Coroutine[Any, Any, int] = square(2)
text: str = load(3, verbose=True)
adhoc: dict[str, int] = sf.call("x", load_user, 4)
adhoc_async: Coroutine[Any, Any, int] = sf.call("y", square, 5)
reveal_type(load_user)  # noqa: F821 (mypy's builtin)
reveal_type(square)  # noqa: F821
load_user("not an int")  # E: the wrapped signature still checks arguments
