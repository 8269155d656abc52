"""Typed return values (dedupe.core.shapes): what a function's return annotation (or
``returns=``) names travels as plain data and is rebuilt by each process's own annotation,
never by what Redis holds; a value that cannot travel fails on the leader too.

Units of the annotation-driven codec (hypothesis where inputs vary), then real processes: a
2-process herd per type, a value that misfits its annotation, forged records, and a FastAPI
app under uvicorn with 2 workers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, TypedDict

import pydantic
import pytest
import redis
import typed_workers as tw
from helpers import SPAWN, flatten, gather, numsub, start, until
from hypothesis import given
from hypothesis import strategies as st

from dedupe import DedupeError, ResultInvalid, ResultNotSerializable, SingleFlight
from dedupe.core.keys import names_for
from dedupe.core.sealing import Codec, Outcome
from dedupe.core.serializers import JSON, SAFE
from dedupe.core.shapes import ShapeError, function_shape, return_annotation, shape_of

# --------------------------------------------------------------------------- the codec, alone


@dataclasses.dataclass
class Node:
    """Recursive, with defaults."""

    label: str
    children: list[Node] = dataclasses.field(default_factory=list)
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Pair:
    left: int
    right: int


@dataclasses.dataclass(frozen=True)
class Other:
    left: int
    right: int


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Row(NamedTuple):
    id: int
    level: Level
    note: str = ""


class Doc(TypedDict, total=False):
    title: str
    rows: list[Row]


class Item(pydantic.BaseModel):
    name: str
    when: dt.datetime
    level: Level = Level.LOW
    raw: bytes = b""


def roundtrip(annotation: Any, value: Any, serializer: Any = SAFE) -> Any:
    shape = shape_of(annotation)
    assert shape is not None
    return shape.load(serializer.loads(serializer.dumps(shape.dump(value))))


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (a NamedTuple equals a plain tuple)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return bool(a == b)


names = st.text(max_size=8)
nodes = st.recursive(
    st.builds(Node, names, st.just([]), st.floats(allow_nan=False)),
    lambda inner: st.builds(Node, names, st.lists(inner, max_size=3), st.floats(-1e9, 1e9)),
    max_leaves=10,
)
rows = st.builds(Row, st.integers(), st.sampled_from(Level), names)
items = st.builds(
    Item,
    name=names,
    when=st.datetimes(timezones=st.just(dt.timezone.utc)),
    level=st.sampled_from(Level),
    raw=st.binary(max_size=8).filter(lambda b: b.isascii()),
)


@given(nodes)
def test_recursive_dataclasses_round_trip(value: Node) -> None:
    assert same(roundtrip(Node, value), value)
    assert same(roundtrip(list[Node], [value, value]), [value, value])


@given(st.lists(rows, max_size=5), st.sampled_from([SAFE, JSON]))
def test_named_tuples_and_int_enums_round_trip_under_safe_and_json(
    value: list[Row], serializer: Any
) -> None:
    assert same(roundtrip(list[Row], value, serializer), value)


@given(st.dictionaries(st.integers(), st.one_of(st.none(), items), max_size=4))
def test_pydantic_models_in_containers_round_trip(value: dict[int, Item | None]) -> None:
    assert same(roundtrip(dict[int, Optional[Item]], value), value)  # noqa: UP045


@given(
    st.one_of(
        st.builds(Pair, st.integers(), st.integers()),
        st.builds(Other, st.integers(), st.integers()),
        st.integers(),
        st.text(),
        st.none(),
    )
)
def test_a_union_comes_back_as_the_member_it_was(value: Any) -> None:
    assert same(roundtrip(Pair | Other | int | str | None, value), value)


@given(st.one_of(st.integers(), st.text(), st.none()))
def test_a_union_of_plain_types_travels_as_the_value_itself(value: Any) -> None:
    """Kept as it was: an unannotated reader of the same job gets the same bytes."""
    shape = shape_of(int | str | None)
    assert shape is not None and shape.dump(value) is value


def test_typed_dicts_literals_and_abstract_containers() -> None:
    doc = Doc(title="t", rows=[Row(1, Level.HIGH)])
    assert same(roundtrip(Doc, doc), doc)
    assert roundtrip(Literal["a", "b"], "b") == "b"
    assert same(roundtrip(tuple[Level, ...], (Level.LOW, Level.HIGH)), (Level.LOW, Level.HIGH))
    assert same(roundtrip(frozenset[Level], frozenset({Level.LOW})), frozenset({Level.LOW}))
    assert same(roundtrip(tuple[int, str], (1, "a"), JSON), (1, "a"))  # JSON has lists only


@pytest.mark.parametrize(
    ("annotation", "value", "where"),
    [
        (Node, {"label": "x"}, "expected exactly"),
        (Node, Node("x", [Node(3)]), "at .children[0].label: expected str, got int"),  # type: ignore[arg-type]
        (list[Row], [Row(1, 5)], "at [0].level"),  # type: ignore[arg-type]
        (Doc, {"title": "t", "extra": 1}, "has no key 'extra'"),
        (Item, Node("x"), "expected exactly"),
        (Literal["a"], "b", "expected one of"),
        (int, "1", "expected int, got str"),
        (None, 0, "expected None"),
    ],
)
def test_a_value_that_misfits_is_named_with_its_place(
    annotation: Any, value: Any, where: str
) -> None:
    shape = shape_of(annotation)
    assert shape is not None
    with pytest.raises(ShapeError, match=where.replace("[", r"\[").replace("]", r"\]")):
        shape.dump(value)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.floats(),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=12,
    )
)
def test_plain_data_builds_only_the_annotated_types_or_fails_cleanly(plain: Any) -> None:
    """Whatever a record holds: the annotated type, or ShapeError (never another class)."""
    for annotation in (Node, list[Row], Doc, Item, Pair | Other, Optional[Level]):  # noqa: UP045
        shape = shape_of(annotation)
        assert shape is not None
        try:
            built = shape.load(plain)
        except ShapeError:
            continue
        allowed = (Node, list, Row, dict, Item, Pair, Other, Level, type(None))
        assert isinstance(built, allowed)


def test_annotations_resolve_once_and_unannotated_functions_have_none() -> None:
    def typed() -> list[Node]:
        return []

    def untyped():  # type: ignore[no-untyped-def]
        return []

    assert return_annotation(typed) == list[Node]  # a string here: future annotations
    assert function_shape(untyped) is None
    assert function_shape(typed) is function_shape(typed)  # cached per function
    assert function_shape(untyped, Any) is None  # returns=Any: as they are
    assert function_shape(untyped, Node) is not None
    batch = function_shape(lambda ids: {}, dict[int, Node], batch=True)
    assert batch is not None and batch.annotation is Node  # per item: the mapping's value


def test_a_codec_rebuilds_by_the_readers_annotation_only() -> None:
    """The record holds plain data: a reader with another annotation misfits, cleanly."""
    codec = Codec()
    record = codec.seal(
        Outcome(value=Pair(1, 2)), channel="c", token=1, keep_ms=1, ttl_ms=1,
        shape=shape_of(Pair),
    )  # fmt: skip
    assert codec.open(record, channel="c", shape=shape_of(Pair)).outcome.value == Pair(1, 2)  # type: ignore[union-attr]
    assert codec.open(record, channel="c", shape=shape_of(Other)).outcome.value == Other(1, 2)  # type: ignore[union-attr]
    assert codec.open(record, channel="c").outcome.value == {"left": 1, "right": 2}  # type: ignore[union-attr]
    opened = codec.open(record, channel="c", shape=shape_of(Row))
    assert isinstance(opened.outcome.error, ResultInvalid)  # type: ignore[union-attr]
    assert codec.rejected == 1


def test_a_leader_whose_value_cannot_travel_gets_the_error_itself() -> None:
    codec = Codec()
    outcome = Outcome(value={"left": 1})
    codec.seal(outcome, channel="c", token=1, keep_ms=1, ttl_ms=1, shape=shape_of(Pair))
    assert isinstance(outcome.error, ResultNotSerializable) and outcome.value is None
    assert "does not fit the function's return annotation" in str(outcome.error)


# --------------------------------------------------------------------------- across processes


@pytest.mark.timeout(90)
def test_each_type_through_a_two_process_herd(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any]
) -> None:
    """Two spawned processes of 3 threads each call every case at once: one run per case,
    and every caller, in both processes, gets the same type and value."""
    n_proc, threads = 2, 3
    barrier, out = SPAWN.Barrier(n_proc * threads), SPAWN.Queue()
    for _ in range(n_proc):
        start(procs, tw.herd, redis_url, prefix, "t1", threads, barrier, out)
    results = flatten(gather(out, n_proc, timeout=80))
    assert len(results) == n_proc * threads * len(tw.CASES)
    errors = [r for r in results if r[2] == "error"]
    assert not errors
    for case in tw.CASES:
        assert redis_client.get(f"{prefix}:runs:{case}") == b"1", case
        got = [r for r in results if r[0] == case]
        want = tw.expected(case, "t1")
        assert all(same(value, want) for _, _, _, value in got), (case, got)
        leader = int(redis_client.get(f"{prefix}:leader:{case}") or 0)
        if case != "batch":  # a batch's roles are per item; its values are checked above
            elsewhere = {role for _, pid, role, _ in got if pid != leader}
            # The other process read it from Redis (its other threads joined that reader).
            assert elsewhere & {"remote", "kept"}, (case, elsewhere)
            assert elsewhere <= {"remote", "kept", "local"}, (case, elsewhere)


@pytest.mark.timeout(30)
def test_a_value_that_misfits_its_annotation_fails_alike_in_every_process(
    sf: SingleFlight, other: SingleFlight, redis_client: redis.Redis, prefix: str
) -> None:
    """The leader's callers and a follower elsewhere (another instance: as good as another
    process) get the same ResultNotSerializable naming the annotation."""
    running, release = threading.Event(), threading.Event()

    def job() -> tw.Profile:
        running.set()
        release.wait(20)
        return {"name": "not a Profile"}  # type: ignore[return-value]

    results: dict[str, Any] = {}

    def call(who: str, instance: SingleFlight) -> None:
        try:
            results[who] = instance.call("misfit", job)
        except DedupeError as exc:
            results[who] = exc

    leader = threading.Thread(target=call, args=("leader", sf))
    leader.start()
    assert running.wait(10)
    follower = threading.Thread(target=call, args=("follower", other))
    follower.start()
    until(lambda: numsub(redis_client, names_for(prefix, "misfit").channel) >= 1, what="follower")
    release.set()
    leader.join(15)
    follower.join(15)
    mine, theirs = results["leader"], results["follower"]
    assert isinstance(mine, ResultNotSerializable) and isinstance(theirs, ResultNotSerializable)
    assert str(mine) == str(theirs)
    assert "annotation typed_workers.Profile" in str(mine) and "expected exactly" in str(mine)


@pytest.mark.timeout(30)
def test_callers_in_the_leaders_process_share_its_object(sf: SingleFlight) -> None:
    """Local joins are unchanged: the leader's own object, not a rebuilt copy."""
    running, release = threading.Event(), threading.Event()
    made: list[tw.Profile] = []

    def load() -> tw.Profile:
        running.set()
        release.wait(20)
        made.append(tw.Profile("mine"))
        return made[0]

    got: dict[str, Any] = {}
    first = threading.Thread(target=lambda: got.setdefault("a", sf.call_detailed("own", load)))
    first.start()
    assert running.wait(10)
    second = threading.Thread(target=lambda: got.setdefault("b", sf.call_detailed("own", load)))
    second.start()
    until(lambda: any(i.waiters >= 2 for i in sf.inflight()), what="the local follower")
    release.set()
    first.join(10)
    second.join(10)
    assert {got["a"].role, got["b"].role} == {"leader", "local"}
    assert got["a"].value is got["b"].value is made[0]


def _untyped(ids):  # type: ignore[no-untyped-def]
    return {i: tw.Profile(str(i)) for i in ids}


def _says_dict() -> dict[str, Any]:
    return tw.Profile("p")  # type: ignore[return-value]


@pytest.mark.timeout(30)
def test_returns_supplies_or_overrides_the_annotation(
    sf: SingleFlight, other: SingleFlight
) -> None:
    """``returns=`` on the decorator, sf.options and sf.batch; ``other`` (as good as another
    process) reads the kept values and rebuilds them by its own ``returns=``."""
    for instance in (sf, other):
        fn = instance(_says_dict, key="d", returns=tw.Profile)
        served = fn.detailed()
        assert type(served.value) is tw.Profile
    assert served.role == "kept"
    for instance in (sf, other):
        served = instance.options(returns=tw.Profile).call_detailed("o", lambda: tw.Profile("o"))
        assert served.value == tw.Profile("o")
    assert served.role == "kept"
    for instance in (sf, other):
        batch = instance.batch(_untyped, key="b:{item}", returns=dict[int, tw.Profile])
        assert batch([1, 2]) == {1: tw.Profile("1"), 2: tw.Profile("2")}
    # returns=Any: values as they are (a dataclass cannot travel then), for every caller.
    with pytest.raises(ResultNotSerializable, match=r"typed_workers\.Profile"):
        sf.options(returns=Any).call("any", lambda: tw.Profile("x"))


class _Boom:
    built = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _Boom.built += 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "forged",
    [
        {"name": 1},  # misfits a field
        {"name": "x", "__class__": "test_typed_values._Boom"},  # names a class
        ("test_typed_values", "_Boom"),  # a tuple where a dict belongs
        [0, {"name": "x"}],  # a union's index where there is no union
    ],
)
def test_a_forged_record_gives_a_validation_error_never_another_class(
    sf: SingleFlight, other: SingleFlight, redis_client: redis.Redis, prefix: str, forged: Any
) -> None:
    """A record published (no secret: anyone may) while a follower waits: it opens as
    ResultInvalid, and nothing but the annotation's own types is ever built."""
    names = names_for(prefix, "forged")
    running, release = threading.Event(), threading.Event()

    def load() -> tw.Profile:
        running.set()
        release.wait(20)
        return tw.Profile("real")

    results: dict[str, Any] = {}

    def call(who: str, instance: SingleFlight) -> None:
        try:
            results[who] = instance.call("forged", load)
        except DedupeError as exc:
            results[who] = exc

    leader = threading.Thread(target=call, args=("leader", sf))
    leader.start()
    assert running.wait(10)
    follower = threading.Thread(target=call, args=("follower", other))
    follower.start()
    until(lambda: numsub(redis_client, names.channel) >= 1, what="the follower subscribed")
    token = int(redis_client.get(names.lock).split(b":")[0])  # type: ignore[union-attr]
    record = Codec().seal(
        Outcome(value=forged), channel=names.channel, token=token, keep_ms=60_000,
        ttl_ms=60_000,
    )  # fmt: skip
    redis_client.publish(names.channel, record)
    follower.join(10)
    release.set()
    leader.join(10)
    error = results["follower"]
    assert isinstance(error, ResultInvalid), error
    assert "return annotation typed_workers.Profile" in str(error)
    assert _Boom.built == 0 and other.stats()["rejected_envelopes"] >= 1
    assert results["leader"] == tw.Profile("real")


# --------------------------------------------------------------------------- FastAPI, 2 workers

_APP = Path(__file__).with_name("typed_app.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


@pytest.mark.timeout(90)
def test_fastapi_under_uvicorn_with_two_workers_returns_pydantic_models(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    port = _free_port()
    env = {**os.environ, "DEDUPE_REDIS_URL": redis_url, "TYPED_APP_PREFIX": prefix}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "typed_app:app", "--app-dir", str(_APP.parent),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "2", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        # Both workers imported the app (each adds its pid) and one answers.
        def ready() -> bool:
            assert server.poll() is None, server.stdout.read().decode()  # type: ignore[union-attr]
            if redis_client.scard(f"{prefix}:workers") < 2:
                return False
            try:
                return _get(f"{base}/ready")[0] == 200
            except OSError:
                return False

        until(ready, timeout=40, what="two uvicorn workers")
        ids = range(10)
        with ThreadPoolExecutor(100) as pool:
            answers = list(pool.map(lambda i: _get(f"{base}/accounts/{i % 10}"), range(100)))
        statuses: dict[int, int] = {}
        for status, _, _ in answers:
            statuses[status] = statuses.get(status, 0) + 1
        assert statuses == {200: 100}, [a[1][:300] for a in answers if a[0] != 200][:3]
        for i in ids:
            assert redis_client.get(f"{prefix}:runs:{i}") == b"1", i
        for _, body, headers in answers:
            account = tw.Account.model_validate_json(body)
            assert account.owner.name == f"user-{account.id}"
            assert headers["x-value-type"] == "typed_workers.Account"
        # Later callers, on either worker, get the kept value from Redis, rebuilt as Account
        # (a burst may land on one worker alone: the kernel picks who accepts).
        for i in ids:
            status, body, headers = _get(f"{base}/accounts/{i}")
            assert status == 200 and headers["x-role"] == "kept", (status, headers)
            assert headers["x-value-type"] == "typed_workers.Account"
            assert tw.Account.model_validate_json(body).id == i
    finally:
        server.send_signal(signal.SIGTERM)  # uvicorn's parent ends its workers
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        assert server.stdout is not None
        server.stdout.close()


@dataclasses.dataclass
class Checked:
    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise RuntimeError("negative")


def test_a_class_that_refuses_the_data_is_a_shape_error() -> None:
    shape = shape_of(Checked)
    assert shape is not None
    with pytest.raises(ShapeError, match="RuntimeError: negative"):
        shape.load({"n": -1})
