"""Typed return values for the spawned processes of test_typed_values.py: each function's
annotation names the type; its leader counts its runs in Redis (``<prefix>:runs:<case>``).

Spawned children import this module by name, so everything here is top level.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import os
import threading
from typing import Any, NamedTuple, Optional, TypedDict

import pydantic
import redis

from dedupe import SingleFlight

WHEN = dt.datetime(2026, 12, 6, 22, 0, tzinfo=dt.timezone.utc)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass
class Profile:
    name: str
    age: int = 0
    tags: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Address:
    city: str
    zip: str = "00000"


@dataclasses.dataclass(frozen=True)
class Team:
    lead: Profile
    members: list[Profile]
    deputy: Optional[Profile]  # noqa: UP045  # typing.Optional, as apps write it
    offices: dict[str, Address]
    color: Color
    since: dt.datetime
    size: tuple[int, int] = (0, 0)


class Point(NamedTuple):
    x: int
    y: float = 0.5


class Summary(TypedDict):
    owner: Profile
    colors: list[Color]
    total: int


class Owner(pydantic.BaseModel):
    name: str
    since: dt.datetime


class Account(pydantic.BaseModel):
    id: int
    owner: Owner
    color: Color = Color.RED
    scores: list[float] = []


def expected(case: str, tag: str) -> Any:
    """What the function of ``case`` returns for ``tag`` (built the same in every process)."""
    p = Profile(tag, 42, ["a", "b"])
    if case in ("dataclass", "async", "call", "returns"):
        return p
    if case == "nested":
        return Team(p, [p, Profile("m")], None, {"hq": Address("Oslo")}, Color.BLUE, WHEN, (1, 2))
    if case == "model":
        return Account(id=7, owner=Owner(name=tag, since=WHEN), scores=[1.5])
    if case == "models":
        return [Account(id=i, owner=Owner(name=tag, since=WHEN)) for i in range(3)]
    if case == "optional_none":
        return None
    if case == "optional_some":
        return p
    if case == "enum":
        return Color.BLUE
    if case == "namedtuple":
        return Point(3)
    if case == "typeddict":
        return Summary(owner=p, colors=[Color.RED, Color.BLUE], total=2)
    if case == "batch":
        return {i: Profile(f"{tag}-{i}") for i in (1, 2, 3)}
    raise AssertionError(case)


_client: redis.Redis | None = None
_prefix = ""


def _ran(case: str) -> None:
    assert _client is not None
    _client.incr(f"{_prefix}:runs:{case}")
    _client.set(f"{_prefix}:leader:{case}", os.getpid())


def dataclass(tag: str) -> Profile:
    _ran("dataclass")
    return expected("dataclass", tag)  # type: ignore[no-any-return]


def nested(tag: str) -> Team:
    _ran("nested")
    return expected("nested", tag)  # type: ignore[no-any-return]


def model(tag: str) -> Account:
    _ran("model")
    return expected("model", tag)  # type: ignore[no-any-return]


def models(tag: str) -> list[Account]:
    _ran("models")
    return expected("models", tag)  # type: ignore[no-any-return]


def optional_none(tag: str) -> Optional[Profile]:  # noqa: UP045
    _ran("optional_none")
    return expected("optional_none", tag)  # type: ignore[no-any-return]


def optional_some(tag: str) -> Profile | None:
    _ran("optional_some")
    return expected("optional_some", tag)  # type: ignore[no-any-return]


def color(tag: str) -> Color:
    _ran("enum")
    return expected("enum", tag)  # type: ignore[no-any-return]


def point(tag: str) -> Point:
    _ran("namedtuple")
    return expected("namedtuple", tag)  # type: ignore[no-any-return]


def summary(tag: str) -> Summary:
    _ran("typeddict")
    return expected("typeddict", tag)  # type: ignore[no-any-return]


async def profile_async(tag: str) -> Profile:
    _ran("async")
    return expected("async", tag)  # type: ignore[no-any-return]


def profiles(ids: list[int], tag: str) -> dict[int, Profile]:
    _ran("batch")
    return {i: Profile(f"{tag}-{i}") for i in ids}


def profile_called(tag: str) -> Profile:
    _ran("call")
    return expected("call", tag)  # type: ignore[no-any-return]


def profile_unannotated(tag):  # type: ignore[no-untyped-def]  # returns= names the type
    _ran("returns")
    return expected("returns", tag)


DECORATED = {
    "dataclass": dataclass,
    "nested": nested,
    "model": model,
    "models": models,
    "optional_none": optional_none,
    "optional_some": optional_some,
    "enum": color,
    "namedtuple": point,
    "typeddict": summary,
    "async": profile_async,
}
CASES = [*DECORATED, "batch", "call", "returns"]


def herd(url: str, prefix: str, tag: str, threads: int, barrier: Any, out: Any) -> None:
    """Each case: ``threads`` threads of this process call it at the barrier (shared with
    the other process); sends [(case, pid, role, value or exception)]."""
    global _client, _prefix
    _client, _prefix = redis.Redis.from_url(url), prefix
    sf = SingleFlight(url, prefix=prefix, result_ttl=30, lock_ttl=10)
    flown = {case: sf(fn, key="{tag}") for case, fn in DECORATED.items()}
    batch = sf.batch(profiles, key="{tag}:{item}")
    results: list[Any] = []
    lock = threading.Lock()

    def one(case: str) -> None:
        barrier.wait(timeout=30)
        try:
            if case == "batch":
                role, value = "batch", batch([1, 2, 3], tag)
            elif case == "call":
                served = sf.call_detailed(f"call:{tag}", profile_called, tag)
                role, value = served.role, served.value
            elif case == "returns":
                served = sf.options(returns=Profile).call_detailed(
                    f"returns:{tag}", profile_unannotated, tag
                )
                role, value = served.role, served.value
            elif case == "async":
                served = asyncio.run(flown[case].detailed(tag))
                role, value = served.role, served.value
            else:
                served = flown[case].detailed(tag)
                role, value = served.role, served.value
        except Exception as exc:
            role, value = "error", repr(exc)
        with lock:
            results.append((case, os.getpid(), role, value))

    for case in CASES:
        pool = [threading.Thread(target=one, args=(case,)) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(60)
    out.put(results)
    sf.close()
