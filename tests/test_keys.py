"""Unit tests of dedupe.core.keys: Redis names, key templates, key callables, the default key.

No Redis server is needed.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import functools
import multiprocessing
import os
import pathlib
import re
import uuid
import zoneinfo
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from typing import Any, NamedTuple

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from dedupe.core.keys import key_builder, names_for, validate_job_id, validate_prefix

# --------------------------------------------------------------------------- cluster slots


def crc16_xmodem(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the checksum of the Redis Cluster key-slot spec."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def hashed_part(key: str) -> bytes:
    """The bytes Redis Cluster hashes: between the first '{' and the next '}', if non-empty."""
    raw = key.encode("utf-8")  # strict: redis-py could not send a key that fails this
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end != -1 and end != start + 1:
            return raw[start + 1 : end]
    return raw


def key_slot(key: str) -> int:
    return crc16_xmodem(hashed_part(key)) % 16384


def test_crc16_matches_the_cluster_spec_vector() -> None:
    # The Redis Cluster spec: "The CRC16 of 123456789 is 0x31C3".
    assert crc16_xmodem(b"123456789") == 0x31C3
    assert key_slot("foo{bar}zap") == key_slot("bar")
    assert key_slot("foo{}{bar}") == crc16_xmodem(b"foo{}{bar}") % 16384
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")


# --------------------------------------------------------------------------- names_for

DIGEST_TAG = re.compile(r"#[0-9a-f]{40}")


def tag_of(names: Any) -> str:
    return hashed_part(names.lock).decode("utf-8")


def assert_one_slot(prefix: str, job_id: str) -> str:
    names = names_for(prefix, job_id)
    assert names.job_id == job_id
    tag = tag_of(names)
    # The tag really is a tag: only it is hashed, not the whole key.
    assert tag.encode() != names.lock.encode()
    for key in (names.lock, names.token, names.result, names.channel):
        assert hashed_part(key) == tag.encode()
        assert key_slot(key) == key_slot(names.lock)
    assert len({names.lock, names.token, names.result, names.channel}) == 4
    assert names.channel == f"{prefix}:{{{tag}}}"
    assert names.lock == f"{names.channel}:lock"
    assert names.token == f"{names.channel}:token"
    assert names.result == f"{names.channel}:result"
    return tag


@pytest.mark.parametrize("job_id", ["user:42", "a", "x" * 200, "héllo wörld", "a b#c"])
def test_plain_ids_are_their_own_tag(job_id: str) -> None:
    assert assert_one_slot("dedupe", job_id) == job_id


@pytest.mark.parametrize(
    "job_id",
    [
        "user:{42}",
        "{",
        "}",
        "a}b{c",
        "line\nbreak",
        "tab\there",
        "bad\udcffutf8",
        "\ud800",
        "#leading-hash",
        "#" + "0" * 40,
        "x" * 201,
        "\x00",
    ],
)
def test_awkward_ids_get_a_digest_tag(job_id: str) -> None:
    tag = assert_one_slot("dedupe", job_id)
    assert DIGEST_TAG.fullmatch(tag), tag


def test_digest_tags_differ_per_id() -> None:
    ids = ["a{", "a}", "#a", "#b", "x" * 201, "x" * 202, "\udcff", "\udcfe", "a\nb", "a\rb"]
    tags = {tag_of(names_for("p", job_id)) for job_id in ids}
    assert len(tags) == len(ids)


def test_a_plain_id_never_collides_with_a_digest_tag() -> None:
    digest = tag_of(names_for("p", "{x}"))
    assert tag_of(names_for("p", digest)) != digest


def test_empty_id_is_refused() -> None:
    with pytest.raises(ValueError):
        names_for("p", "")
    with pytest.raises(ValueError):
        validate_job_id("")


@pytest.mark.parametrize("job_id", [None, 42, b"bytes", ["a"], 1.5])
def test_non_str_id_is_refused(job_id: Any) -> None:
    with pytest.raises(TypeError):
        names_for("p", job_id)
    with pytest.raises(TypeError):
        validate_job_id(job_id)


@pytest.mark.parametrize("prefix", ["", "a{b", "a}b", "{x}", None, 3])
def test_bad_prefixes_are_refused(prefix: Any) -> None:
    with pytest.raises(ValueError):
        validate_prefix(prefix)


@pytest.mark.parametrize("prefix", ["dedupe", "app:cache", "x"])
def test_good_prefixes_pass(prefix: str) -> None:
    assert validate_prefix(prefix) == prefix


any_text = st.text(
    st.one_of(
        st.characters(),
        st.characters(categories=["Cs"]),
        st.sampled_from("{}#:\n "),
    ),
    min_size=1,
    max_size=260,
)


@given(job_id=any_text)
def test_names_for_any_text_share_one_tag_without_braces(job_id: str) -> None:
    tag = assert_one_slot("pre:fix", job_id)
    assert "{" not in tag and "}" not in tag
    assert tag == job_id or DIGEST_TAG.fullmatch(tag)
    assert names_for("pre:fix", job_id) == names_for("pre:fix", job_id)


@given(a=any_text, b=any_text)
def test_distinct_ids_get_distinct_names(a: str, b: str) -> None:
    assume(a != b)
    assert names_for("p", a).lock != names_for("p", b).lock


# --------------------------------------------------------------------------- key templates


def get_user(user_id: int, region: str = "eu", *, verbose: bool = False) -> None: ...


class Service:
    def __init__(self, ident: int) -> None:
        self.id = ident

    def fetch(self, item: str, page: int = 1) -> None: ...


def test_template_formats_bound_arguments_with_defaults() -> None:
    kb = key_builder(get_user, "user:{user_id}:{region}:{verbose}", namespace=False)
    assert kb((7,), {}) == "user:7:eu:False"
    assert kb((), {"user_id": 7}) == "user:7:eu:False"
    assert kb((7, "us"), {"verbose": True}) == "user:7:us:True"
    assert kb((), {"region": "us", "user_id": 8}) == "user:8:us:False"


def test_template_reads_attributes_of_self() -> None:
    kb = key_builder(Service.fetch, "svc:{self.id}:{item}:{page}", namespace=False)
    assert kb((Service(3), "x"), {}) == "svc:3:x:1"
    assert kb((Service(4),), {"item": "y", "page": 2}) == "svc:4:y:2"


def test_template_with_index_and_escaped_braces() -> None:
    def fn(items: list[str], mapping: dict[str, int]) -> None: ...

    kb = key_builder(fn, "{{lit}}:{items[0]}:{mapping[k]}", namespace=False)
    assert kb((["a", "b"], {"k": 5}), {}) == "{lit}:a:5"


def test_template_naming_a_missing_argument_fails_at_decoration() -> None:
    with pytest.raises(TypeError, match="'uid'"):
        key_builder(get_user, "user:{uid}", namespace=False)
    with pytest.raises(TypeError, match="'owner'"):
        key_builder(Service.fetch, "{self.id}:{owner.name}", namespace=False)


@pytest.mark.parametrize("template", ["user:{}", "user:{0}", "{0.id}", "{user_id}:{1}"])
def test_positional_template_fields_are_refused(template: str) -> None:
    with pytest.raises(TypeError, match="positional"):
        key_builder(get_user, template)


def test_template_attribute_error_at_call_is_a_type_error() -> None:
    kb = key_builder(Service.fetch, "{self.missing}", namespace=False)
    with pytest.raises(TypeError, match="missing"):
        kb((Service(1), "x"), {})


def test_template_rendering_empty_is_refused() -> None:
    def fn(name: str) -> None: ...

    kb = key_builder(fn, "{name}", namespace=False)
    with pytest.raises(ValueError):
        kb(("",), {})


def test_empty_template_is_refused() -> None:
    with pytest.raises(ValueError):
        key_builder(get_user, "", namespace=False)


def test_key_of_another_type_is_refused() -> None:
    with pytest.raises(TypeError):
        key_builder(get_user, 42, namespace=False)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- key callables


def test_callable_key_receives_only_declared_parameters() -> None:
    seen: list[dict[str, Any]] = []

    def key(user_id: int) -> str:
        seen.append({"user_id": user_id})
        return f"u{user_id}"

    kb = key_builder(get_user, key, namespace=False)
    assert kb((9, "us"), {"verbose": True}) == "u9"
    assert seen == [{"user_id": 9}]


def test_callable_key_gets_defaults_of_the_function() -> None:
    kb = key_builder(get_user, lambda region, verbose: f"{region}/{verbose}", namespace=False)
    assert kb((1,), {}) == "eu/False"


def test_callable_key_with_var_keyword_gets_every_argument() -> None:
    seen: list[dict[str, Any]] = []

    def key(**kwargs: Any) -> str:
        seen.append(kwargs)
        return "k"

    kb = key_builder(get_user, key, namespace=False)
    assert kb((5,), {}) == "k"
    assert seen == [{"user_id": 5, "region": "eu", "verbose": False}]


def test_callable_key_for_a_method_gets_self() -> None:
    kb = key_builder(Service.fetch, lambda self, item: f"{self.id}:{item}", namespace=False)
    assert kb((Service(2), "z"), {}) == "2:z"


def test_callable_key_naming_a_missing_argument_fails_at_decoration() -> None:
    with pytest.raises(TypeError, match="'tenant'"):
        key_builder(get_user, lambda user_id, tenant: f"{tenant}:{user_id}", namespace=False)


def test_callable_key_with_a_defaulted_extra_parameter_is_allowed() -> None:
    kb = key_builder(get_user, lambda user_id, suffix="s": f"{user_id}{suffix}", namespace=False)
    assert kb((3,), {}) == "3s"


@pytest.mark.parametrize("result", [42, None, b"bytes", ("a",)])
def test_callable_key_returning_a_non_str_is_a_type_error(result: object) -> None:
    kb = key_builder(get_user, lambda user_id: result, namespace=False)
    with pytest.raises(TypeError, match="not str"):
        kb((1,), {})


# --------------------------------------------------------------------------- default key


def target(a: Any, b: Any = 2, *, c: Any = 3) -> None: ...


def target_var(*args: Any, **kwargs: Any) -> None: ...


DEFAULT = key_builder(target, None)
DEFAULT_VAR = key_builder(target_var, None)


def test_default_key_is_module_qualname_and_digest() -> None:
    job_id = DEFAULT((1,), {})
    assert re.fullmatch(rf"{re.escape(__name__)}\.target:[0-9a-f]{{32}}", job_id), job_id
    method_id = key_builder(Holder.method, None)((Holder(1), "x"), {})
    assert method_id.startswith(f"{__name__}.Holder.method:")


def test_default_key_differs_per_function() -> None:
    def other(a: Any, b: Any = 2, *, c: Any = 3) -> None: ...

    assert key_builder(other, None)((1,), {}) != DEFAULT((1,), {})


leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
values = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=5), inner, max_size=4),
        st.frozensets(st.one_of(st.integers(), st.text(max_size=5)), max_size=4),
    ),
    max_leaves=12,
)


@given(a=values, b=values, c=values)
def test_default_key_ignores_the_call_form(a: Any, b: Any, c: Any) -> None:
    forms = [
        DEFAULT((a, b), {"c": c}),
        DEFAULT((a,), {"b": b, "c": c}),
        DEFAULT((), {"c": c, "b": b, "a": a}),
    ]
    assert len(set(forms)) == 1


@given(a=values)
def test_default_key_omitted_defaults_equal_explicit_ones(a: Any) -> None:
    ids = {DEFAULT((a,), {}), DEFAULT((a, 2), {}), DEFAULT((a,), {"c": 3}), DEFAULT((), {"a": a})}
    assert len(ids) == 1
    assert DEFAULT((a, 2), {"c": 4}) not in ids


@given(x=values, y=values)
def test_default_key_differs_for_different_values(x: Any, y: Any) -> None:
    assume(x != y)
    assert DEFAULT((x,), {}) != DEFAULT((y,), {})
    assert DEFAULT((1, x), {}) != DEFAULT((1, y), {})


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (1, 1.0),
        (1, True),
        (1.0, True),
        (0, False),
        (0, None),
        ("1", 1),
        (b"a", "a"),
        ([1], (1,)),
        ([], {}),
        ("a,b", ["a", "b"]),
        (["a,s1:b"], ["a", "b"]),
        (0.0, -0.0),
    ],
)
def test_default_key_distinguishes_equal_looking_values(left: Any, right: Any) -> None:
    assert DEFAULT((left,), {}) != DEFAULT((right,), {})


@given(pairs=st.dictionaries(st.text(max_size=6), values, max_size=6))
def test_default_key_ignores_dict_order(pairs: dict[str, Any]) -> None:
    forward = dict(pairs.items())
    backward = dict(reversed(list(pairs.items())))
    ordered = OrderedDict(sorted(pairs.items()))
    assert DEFAULT((forward,), {}) == DEFAULT((backward,), {}) == DEFAULT((ordered,), {})


@given(items=st.lists(st.one_of(st.integers(), st.text(max_size=6)), max_size=8), data=st.data())
def test_default_key_ignores_set_order(items: list[Any], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(items))
    assert DEFAULT((set(items),), {}) == DEFAULT((set(shuffled),), {})
    assert DEFAULT((frozenset(items),), {}) == DEFAULT((set(shuffled),), {})


@given(kwargs=st.dictionaries(st.text(min_size=1, max_size=5), st.integers(), max_size=5))
def test_default_key_ignores_var_keyword_order(kwargs: dict[str, int]) -> None:
    reordered = dict(reversed(list(kwargs.items())))
    assert DEFAULT_VAR((1, 2), kwargs) == DEFAULT_VAR((1, 2), reordered)
    assert DEFAULT_VAR((1, 2), kwargs) != DEFAULT_VAR((2, 1), kwargs)


class NoRepr:
    pass


class StableRepr:
    def __init__(self, n: int) -> None:
        self.n = n

    def __repr__(self) -> str:
        return f"StableRepr({self.n})"

    def method(self, item: str) -> None: ...


@dataclasses.dataclass
class Holder:
    inner: Any

    def method(self, item: str) -> None: ...


def load_user(user: Any) -> None: ...


def load_items(items: Any) -> None: ...


@pytest.mark.parametrize("bad", [object(), NoRepr(), lambda: None, load_user])
def test_default_key_refuses_an_address_repr_and_names_the_argument(bad: Any) -> None:
    kb = key_builder(load_user, None)
    with pytest.raises(TypeError, match="'user'"):
        kb((bad,), {})


@pytest.mark.parametrize(
    ("items", "where"),
    [
        ([1, object()], "items[1]"),
        ((0, 1, [2, NoRepr()]), "items[2][1]"),
        ({"k": NoRepr()}, "items['k']"),
        (Holder(object()), "items.inner"),
    ],
)
def test_default_key_names_the_nested_argument(items: Any, where: str) -> None:
    kb = key_builder(load_items, None)
    with pytest.raises(TypeError) as info:
        kb((items,), {})
    assert repr(where) in str(info.value)


class Summary:
    """Like a numpy array: its repr leaves out most of its content."""

    def __init__(self, items: list[int]) -> None:
        self.items = items

    def __repr__(self) -> str:
        return f"array([{self.items[0]}, ..., {self.items[-1]}])"


def test_default_key_never_digests_a_repr() -> None:
    # Two different values with one repr: a repr-based key would give them one result.
    kb = key_builder(load_user, None)
    assert repr(Summary([1, 2, 3])) == repr(Summary([1, 5, 3]))
    for value in (Summary([1, 2, 3]), StableRepr(1)):
        with pytest.raises(TypeError, match=r"'user'.*key=") as info:
            kb((value,), {})
        assert "canonical" in str(info.value)


def test_default_key_refuses_a_cycle_instead_of_recursing_forever() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(TypeError, match="'user"):
        key_builder(load_user, None)((cyclic,), {})


# --------------------------------------------------------------------------- across processes


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: float
    tags: frozenset[str] = frozenset()


def cross_target(value: Any, extra: Any = None) -> None: ...


def cross_arguments() -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    return [
        ((set(words),), {}),
        ((frozenset(words[:5]),), {"extra": {"nested": set(words[3:])}}),
        (({"b": 1, "a": [1, 2.5], "c": {"d": None, "e": b"\x00\xff"}},), {}),
        ((Point(1, 2.5, frozenset(words)),), {}),
        ((Color.BLUE,), {"extra": [Color.RED, Color.BLUE]}),
        ((datetime.datetime(2024, 1, 2, 3, 4, 5, 678, tzinfo=datetime.timezone.utc),), {}),
        ((datetime.date(2024, 2, 29), datetime.timedelta(seconds=90)), {}),
        ((decimal.Decimal("1.10"),), {"extra": decimal.Decimal("-0")}),
        ((uuid.UUID("12345678-1234-5678-1234-567812345678"),), {}),
        (({frozenset({"x", "y"}): "v", "k": (1, "two", 3.0)},), {}),
        (("text",), {"extra": {True, None, 1.5, "s"}}),
    ]


def child_ids() -> tuple[int, str | None, list[str]]:
    """Runs in a spawn child: the ids of cross_arguments(), and evidence of the hash seed."""
    kb = key_builder(cross_target, None)
    ids = [kb(args, kwargs) for args, kwargs in cross_arguments()]
    return hash("dedupe hash-seed probe"), os.environ.get("PYTHONHASHSEED"), ids


def test_default_key_is_identical_in_a_spawned_process_with_another_hash_seed() -> None:
    parent_hash, _, parent_ids = child_ids()
    assert len(set(parent_ids)) == len(parent_ids)
    previous = os.environ.get("PYTHONHASHSEED")
    seed = "4242" if previous != "4242" else "4343"
    os.environ["PYTHONHASHSEED"] = seed
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            child_hash, child_seed, ids = pool.submit(child_ids).result(timeout=30)
    finally:
        if previous is None:
            del os.environ["PYTHONHASHSEED"]
        else:
            os.environ["PYTHONHASHSEED"] = previous
    # The child really ran under another hash seed, so set iteration order differs...
    assert child_seed == seed
    assert child_hash != parent_hash
    # ...and yet every id is the same.
    assert ids == parent_ids


# --------------------------------------------------------------------------- canonical values


class Label(str):
    pass


class Tagged(str):
    def __init__(self, value: str) -> None:
        self.tag = "extra state"


class Pair(NamedTuple):
    left: int
    right: str


@pytest.mark.parametrize(
    "value",
    [
        Pair(1, "a"),
        Label("x"),
        datetime.datetime(2024, 3, 1, 12, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
        datetime.time(1, 2, tzinfo=datetime.timezone.utc),
        range(3, 9, 2),
        collections.Counter("aab"),
        Color,
        pathlib.PurePosixPath("/a/b"),
    ],
)
def test_default_key_takes_more_canonical_values(value: Any) -> None:
    kb = key_builder(load_user, None)
    assert kb((value,), {}) == kb((value,), {})


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (Pair(1, "a"), (1, "a")),
        (Label("x"), "x"),
        (range(3), [0, 1, 2]),
        (
            datetime.datetime(2024, 1, 1),
            datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
        ),
        (Color, Point),
    ],
)
def test_default_key_tags_the_type_of_canonical_values(left: Any, right: Any) -> None:
    assert DEFAULT((left,), {}) != DEFAULT((right,), {})


class PytzLike(datetime.tzinfo):
    def utcoffset(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(hours=1)

    def dst(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(0)

    def tzname(self, dt: datetime.datetime | None) -> str:
        return "X"


def test_default_key_refuses_values_without_a_canonical_encoding() -> None:
    def local_class() -> type:
        class Inner:
            pass

        return Inner

    kb = key_builder(load_user, None)
    refused: list[Any] = [
        Tagged("x"),  # a str subclass with state of its own
        datetime.datetime(2024, 1, 1, tzinfo=PytzLike()),
        local_class(),
        b"x".hex,  # a builtin method
        memoryview(b"x"),
    ]
    for value in refused:
        with pytest.raises(TypeError, match="'user"):
            kb((value,), {})


# --------------------------------------------------------------------- what a function carries


def make_adder(n: Any) -> Any:
    def add(x: int) -> Any:
        return x + n

    return add


def test_closures_from_one_factory_get_their_own_ids() -> None:
    one, hundred = make_adder(1), make_adder(100)
    assert key_builder(one, None)((5,), {}) != key_builder(hundred, None)((5,), {})
    assert key_builder(one, None)((5,), {}) == key_builder(make_adder(1), None)((5,), {})


def test_a_closure_is_keyed_by_what_it_captures_now() -> None:
    state = {"n": 1}

    def outer() -> Any:
        n = state["n"]

        def inner(x: int) -> int:
            return x + n

        def rebind(value: int) -> None:
            nonlocal n
            n = value

        return inner, rebind

    inner, rebind = outer()
    kb = key_builder(inner, None)
    before = kb((1,), {})
    rebind(2)
    assert kb((1,), {}) != before


def test_a_closure_over_a_value_without_canonical_encoding_is_refused_at_decoration() -> None:
    with pytest.raises(TypeError, match=r"captures 'n'.*key="):
        key_builder(make_adder(object()), None)
    # With a key of your own, the closure is fine: you said what identifies a call.
    kb = key_builder(make_adder(object()), "add:{x}")
    assert kb((1,), {}).endswith(":add:1")


@dataclasses.dataclass(frozen=True)
class Frozen:
    items: tuple[int, ...]


@dataclasses.dataclass
class Thawed:
    items: tuple[int, ...]


def test_a_closure_over_a_mutable_value_is_refused_at_decoration() -> None:
    # Its key would change whenever the captured value changes: refuse rather than surprise.
    for captured, where in [
        ([1], "'n'"),
        ({"a": 1}, "'n'"),
        ((1, [2]), "'n[1]'"),
        (Thawed((1,)), "'n'"),
    ]:
        with pytest.raises(TypeError, match="can change between calls") as info:
            key_builder(make_adder(captured), None)
        assert where in str(info.value)
    assert key_builder(make_adder(Frozen((1,))), None)((1,), {}) != key_builder(
        make_adder(Frozen((2,))), None
    )((1,), {})
    assert key_builder(make_adder((1, frozenset({2}))), None)((1,), {})


def test_a_closure_that_uses_super_is_not_refused_for_its_class_cell() -> None:
    class Base:
        def get(self, n: int) -> int:
            return n

    @dataclasses.dataclass
    class Child(Base):
        ident: int

        def get(self, n: int) -> int:
            return super().get(n)

    kb = key_builder(Child.get, None)
    assert kb((Child(1), 2), {}) != kb((Child(2), 2), {})


def test_bare_key_refuses_lambdas() -> None:
    with pytest.raises(TypeError, match="lambda"):
        key_builder(lambda x: x, None)
    double: Any = lambda x: 2 * x  # noqa: E731
    with pytest.raises(TypeError, match="lambda"):
        key_builder(double, None)


def test_two_lambdas_never_share_a_namespace_by_accident() -> None:
    with pytest.raises(TypeError, match="namespace"):
        key_builder(lambda x: x, "v:{x}")
    assert key_builder(lambda x: x, "v:{x}", namespace="double")((1,), {}) == "double:v:1"
    assert key_builder(lambda x: x, "v:{x}", namespace=False)((1,), {}) == "v:1"


def scaled(x: int, factor: int) -> int:
    return x * factor


def test_partials_are_keyed_by_their_bound_arguments() -> None:
    two = key_builder(functools.partial(scaled, factor=2), None)
    three = key_builder(functools.partial(scaled, factor=3), None)
    assert two((1,), {}) != three((1,), {})
    assert two((1,), {}).startswith(f"{__name__}.scaled:")
    with pytest.raises(TypeError, match="bound to"):
        key_builder(functools.partial(scaled, factor=object()), None)


def test_bound_methods_are_keyed_by_their_instance() -> None:
    assert key_builder(Holder(1).method, None)(("a",), {}) != key_builder(Holder(2).method, None)(
        ("a",), {}
    )
    with pytest.raises(TypeError, match="bound to 'self'"):
        key_builder(Service(1).fetch, None)


@dataclasses.dataclass(frozen=True)
class Multiplier:
    factor: int

    def __call__(self, x: int) -> int:
        return x * self.factor


class Opaque:
    def __call__(self, x: int) -> int:
        return x


def test_callable_objects_are_keyed_by_their_state_or_refused() -> None:
    assert key_builder(Multiplier(2), None)((1,), {}) != key_builder(Multiplier(3), None)((1,), {})
    assert key_builder(Multiplier(2), None)((1,), {}).startswith(f"{__name__}.Multiplier:")
    with pytest.raises(TypeError, match="key="):
        key_builder(Opaque(), None)


# --------------------------------------------------------------------------- namespaces


def load_profile(user_id: int) -> None: ...


def load_orders(user_id: int) -> None: ...


def test_two_functions_with_one_template_get_two_job_ids() -> None:
    profile = key_builder(load_profile, "user:{user_id}")((42,), {})
    orders = key_builder(load_orders, "user:{user_id}")((42,), {})
    assert profile == f"{__name__}.load_profile:user:42"
    assert orders == f"{__name__}.load_orders:user:42"
    by_callable = key_builder(load_orders, lambda user_id: f"user:{user_id}")((42,), {})
    assert by_callable == orders


def test_namespace_can_be_shared_on_purpose() -> None:
    both = (load_profile, load_orders)
    shared = [key_builder(f, "user:{user_id}", namespace="users") for f in both]
    assert {kb((1,), {}) for kb in shared} == {"users:user:1"}
    bare = [key_builder(f, None, namespace="users") for f in both]
    assert bare[0]((1,), {}) == bare[1]((1,), {})
    assert bare[0]((1,), {}).startswith("users:")


@pytest.mark.parametrize("namespace", ["", None, 3, b"x"])
def test_bad_namespaces_are_refused(namespace: Any) -> None:
    with pytest.raises(TypeError, match="namespace"):
        key_builder(load_profile, "user:{user_id}", namespace=namespace)


def test_a_bare_key_needs_a_namespace() -> None:
    with pytest.raises(TypeError, match="namespace=False needs key="):
        key_builder(load_profile, None, namespace=False)
