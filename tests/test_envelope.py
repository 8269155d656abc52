"""Unit tests of records' envelopes: the safe serializer (dedupe.core.serializers), exceptions as
data (dedupe.core.remote_errors), sealing and opening records and notices, signing and rotation,
fallbacks and limits (dedupe.core.sealing).

No Redis server is needed (tests/test_security.py reads real bytes back from one).
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import decimal
import enum
import logging
import math
import pickle
import sys
import threading
import traceback
import types
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dedupe import SingleFlight
from dedupe.core import remote_errors, sealing, serializers
from dedupe.core.record import (
    KIND_ERROR,
    KIND_UNSERIALIZABLE,
    KIND_VALUE,
    NOTICE_ABORTED,
    NOTICE_STORED,
    header_of,
)
from dedupe.core.sealing import (
    Codec,
    Notice,
    Opened,
    Outcome,
    TamperedEnvelope,
    codec_for,
    secret_keys,
)
from dedupe.core.serializers import JSON, PICKLE, PICKLE_UNSAFE, SAFE
from dedupe.errors import (
    DedupeError,
    EnvelopeError,
    RemoteError,
    ResultNotSerializable,
    ResultTooLarge,
    WaitTimeout,
)

CHANNEL = "dedupe:{job}"
TOKEN = 17
SECRET = b"s3cret-key"


def seal(codec: Codec, outcome: Outcome, **kw: Any) -> bytes:
    args: dict[str, Any] = {"channel": CHANNEL, "token": TOKEN, "keep_ms": 1000, "ttl_ms": 12000}
    args.update(kw)
    return codec.seal(outcome, **args)


def opened(codec: Codec, data: bytes, channel: str = CHANNEL) -> Opened:
    result = codec.open(data, channel=channel)
    assert isinstance(result, Opened)
    return result


def roundtrip(codec: Codec, outcome: Outcome, reader: Codec | None = None) -> Outcome:
    return opened(reader or codec, seal(codec, outcome)).outcome


def raised(fn: Any, *args: Any) -> BaseException:
    try:
        fn(*args)
    except BaseException as exc:
        return exc
    raise AssertionError("did not raise")


def formatted(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def same(a: Any, b: Any) -> bool:
    """Equal, of the same type all the way down (NaN equals NaN; Decimals by representation)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, complex):
        return same(a.real, b.real) and same(a.imag, b.imag)
    if isinstance(a, decimal.Decimal):
        return a.compare_total(b) == 0
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            same(k, j) and same(x, y) for (k, x), (j, y) in zip(a.items(), b.items(), strict=True)
        )
    if isinstance(a, (set, frozenset)):
        mine = {y: y for y in b}  # maps each element to b's own equal element
        return a == b and all(same(x, mine[x]) for x in a)
    if isinstance(a, (dt.datetime, dt.time)):
        return a == b and a.utcoffset() == b.utcoffset() and a.fold == b.fold
    return bool(a == b)


# --------------------------------------------------------------------------- the safe serializer

UTC_PLUS_530 = dt.timezone(dt.timedelta(hours=5, minutes=30))
ODD_OFFSET = dt.timezone(dt.timedelta(hours=-3, seconds=7, microseconds=5))

EXAMPLES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**70,
    -(2**70),
    2**20_000,  # past CPython's decimal-digit limit for int(str)
    -(3**9_000),
    1.5,
    -0.0,
    float("nan"),
    float("inf"),
    float("-inf"),
    1e300,
    "",
    "ünïcødé \0 \ud800",
    b"",
    b"\x00\xff" * 10,
    bytearray(b"ab"),
    [],
    [1, "two", None, [3.0]],
    (),
    (1, (2, (3,))),
    {},
    {"a": 1, "b": [True, False], "c": {"d": None}},
    {1: "int key", 2.5: "float key", None: "none key", (1, "t"): "tuple key", b"k": "x"},
    {"\0t": "a lone key that looks like a tag"},
    {"\0t": 1, "other": 2},
    {frozenset({1}): {b"bytes key": (1, 2)}},
    {"order": 1, "is": 2, "kept": 3, "z": 4, "a": 5},
    set(),
    {1, "a", (2, 3)},
    frozenset({b"x", 1.5}),
    dt.datetime(2026, 12, 1, 21, 0, 0, 123456),
    dt.datetime(2026, 12, 1, 21, 0, 0, tzinfo=dt.timezone.utc),
    dt.datetime(2026, 3, 1, 0, 0, tzinfo=UTC_PLUS_530),
    dt.datetime(1, 1, 1, tzinfo=ODD_OFFSET),
    dt.datetime.max,
    dt.datetime(2026, 11, 1, 1, 30, fold=1),
    dt.date(2026, 12, 1),
    dt.time(23, 59, 59, 999999),
    dt.time(1, 2, tzinfo=UTC_PLUS_530),
    dt.timedelta(days=-3, seconds=5, microseconds=7),
    dt.timedelta.max,
    decimal.Decimal("1.50"),
    decimal.Decimal("-0"),
    decimal.Decimal("NaN"),
    decimal.Decimal("sNaN"),
    decimal.Decimal("-Infinity"),
    decimal.Decimal("1e-999999"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    1 + 2j,
]


@pytest.mark.parametrize("value", EXAMPLES, ids=lambda v: type(v).__name__)
def test_safe_round_trips_every_supported_type_as_itself(value: Any) -> None:
    assert same(SAFE.loads(SAFE.dumps(value)), value)
    back = roundtrip(Codec(), Outcome(value=value))
    assert back.error is None
    assert same(back.value, value)


def test_safe_is_the_default_and_its_output_is_plain_json_for_json_data() -> None:
    assert Codec().serializer is SAFE
    assert SingleFlight("redis://127.0.0.1:1/0").settings.serializer == "safe"
    assert SAFE.dumps({"a": [1, 2.5, "x", None, True]}) == b'{"a":[1,2.5,"x",null,true]}'


_hashable = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        st.text(max_size=8),
        st.binary(max_size=8),
        st.dates(),
        st.uuids(),
        st.decimals(allow_nan=False),
    ),
    lambda inner: st.one_of(st.tuples(inner, inner), st.frozensets(inner, max_size=3)),
    max_leaves=6,
)
_offsets = st.builds(
    dt.timezone,
    st.timedeltas(
        min_value=dt.timedelta(hours=-23, minutes=-59), max_value=dt.timedelta(hours=23, minutes=59)
    ),
)
_leaves = st.one_of(
    _hashable,
    st.integers(min_value=-(2**12_000), max_value=2**12_000),
    st.floats(),
    st.complex_numbers(),
    st.binary(max_size=40).map(bytearray),
    st.datetimes(timezones=st.none() | _offsets),
    st.times(timezones=st.none() | _offsets),
    st.timedeltas(),
    st.decimals(),
)
safe_values = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=4), inner, max_size=4),
        st.dictionaries(_hashable, inner, max_size=4),
        st.dictionaries(st.integers(), inner, max_size=4),
        st.sets(_hashable, max_size=4),
        st.frozensets(_hashable, max_size=4),
    ),
    max_leaves=20,
)


@given(value=safe_values)
def test_property_safe_round_trip_keeps_types_nested(value: Any) -> None:
    assert same(SAFE.loads(SAFE.dumps(value)), value)


@given(value=safe_values, secret=st.sampled_from([None, SECRET]))
def test_property_sealed_values_open_as_themselves(value: Any, secret: bytes | None) -> None:
    assert same(roundtrip(Codec(secret=secret), Outcome(value=value)).value, value)


@given(value=st.dictionaries(st.integers(), st.integers(), max_size=10))
def test_property_int_dict_keys_stay_ints_in_order(value: dict[int, int]) -> None:
    back = SAFE.loads(SAFE.dumps(value))
    assert list(back.items()) == list(value.items())
    assert all(type(k) is int for k in back)


class Point(NamedTuple):
    x: int
    y: int


class Colour(enum.IntEnum):
    RED = 1


class Text(str):
    pass


def _generator() -> Any:
    yield 1


@pytest.mark.parametrize(
    "value",
    [
        Point(1, 2),
        Colour.RED,
        Text("x"),
        collections.OrderedDict(a=1),
        collections.defaultdict(list),
        object(),
        threading.Lock(),
        _generator(),
        [1, [2, {"deep": object()}]],
        {object(): 1},
    ],
    ids=lambda v: type(v).__name__,
)
def test_types_safe_cannot_keep_are_refused_not_changed(value: Any) -> None:
    with pytest.raises(TypeError):
        SAFE.dumps(value)
    record = seal(Codec(), Outcome(value=value))
    assert header_of(record).kind == KIND_UNSERIALIZABLE
    assert header_of(record).keep_ms == 0  # never served to new callers as a cached value
    err = opened(Codec(), record).outcome.error
    assert isinstance(err, ResultNotSerializable)


def test_result_not_serializable_names_the_type_and_the_ways_to_send_it() -> None:
    err = roundtrip(Codec(), Outcome(value=Point(1, 2))).error
    assert isinstance(err, ResultNotSerializable)
    text = str(err)
    assert f"{__name__}.Point" in text
    assert "secret" in text and "DEDUPE_SECRET" in text
    assert "serializer='pickle'" in text and "Serializer" in text


def test_the_leader_logs_an_unsendable_type_once(caplog: pytest.LogCaptureFixture) -> None:
    codec = Codec()
    with caplog.at_level(logging.WARNING, logger="dedupe"):
        for token in range(5):
            seal(codec, Outcome(value=Point(token, 0)), token=token)
        seal(codec, Outcome(value=Colour.RED))
    records = [
        r for r in caplog.records if r.name.startswith("dedupe") and r.levelno == logging.WARNING
    ]
    assert len(records) == 2
    assert "Point" in records[0].getMessage() and "Colour" in records[1].getMessage()


def test_too_deep_values_are_refused_when_sealed() -> None:
    value: Any = []
    for _ in range(serializers.MAX_DEPTH + 5):
        value = [value]
    assert isinstance(roundtrip(Codec(), Outcome(value=value)).error, ResultNotSerializable)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"[1,2",
        b"\xff\xfe",
        b'{"\\u0000t": 1}',
        b'{"\\u0000z": []}',
        b'{"\\u0000s": [[1]]}',
        b'{"\\u0000d": [1]}',
        b'{"\\u0000d": [[1], 2]}',
        b'{"\\u0000b": "not base64!"}',
        b'{"\\u0000i": "xyz"}',
        b'{"\\u0000T": [2026, 13, 1, 0, 0, 0, 0, 0, null]}',
        b'{"\\u0000T": [2026, 1, 1, 0, 0, 0, 0, 0, 999999999999999]}',
        b'{"\\u0000T": [true, 1, 1, 0, 0, 0, 0, 0, null]}',
        b'{"\\u0000R": [99999999999999999999, 0, 0]}',
        b'{"\\u0000N": "1.2.3"}',
        b'{"\\u0000N": 5}',
        b'{"\\u0000U": "1234"}',
        b'{"\\u0000c": ["1", 2]}',
        b"1" * 5000,  # past the int digit limit: ValueError inside json
        b"[" * 100_000,  # RecursionError inside json
    ],
)
def test_bad_safe_input_is_an_envelope_error(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        SAFE.loads(data)


# --------------------------------------------------------------------------- exceptions


class CustomError(Exception):
    pass


class TwoArgError(Exception):
    def __init__(self, a: object, b: object) -> None:
        super().__init__(f"{a}-{b}")


class MiddleError(LookupError):
    pass


class DeepTwoArgError(MiddleError):
    def __init__(self, a: object, b: object) -> None:
        super().__init__(f"{a}/{b}")


class LockHolderError(Exception):
    pass


def leader_raises_custom() -> None:
    raise CustomError("boom", 42, (1, b"x"))


def leader_raises_two_arg() -> None:
    raise TwoArgError(1, 2)


def leader_raises_deep_two_arg() -> None:
    raise DeepTwoArgError("x", "y")


def leader_raises_with_a_lock() -> None:
    raise LockHolderError("held", threading.Lock())


CODECS = {
    "safe": lambda: Codec(),
    "safe-signed": lambda: Codec(secret=SECRET),
    "json": lambda: Codec(JSON),
    "pickle-signed": lambda: Codec(PICKLE, secret=SECRET),
}


@pytest.fixture(params=sorted(CODECS))
def codec(request: pytest.FixtureRequest) -> Codec:
    made: Codec = CODECS[request.param]()
    return made


def test_an_imported_exception_class_comes_back_as_itself_with_its_traceback(codec: Codec) -> None:
    back = roundtrip(codec, Outcome(error=raised(leader_raises_custom)))
    err = back.error
    assert type(err) is CustomError
    assert err.args == ("boom", 42, (1, b"x"))
    assert err.__traceback__ is not None
    assert "leader_raises_custom" in formatted(err)
    with pytest.raises(CustomError):
        back.unwrap()


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("x", 1),
        KeyError("k"),
        FileNotFoundError(2, "No such file"),
        WaitTimeout("waited"),
        RemoteError("pkg.Original", "msg", "Traceback..."),
        Exception("plain"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_builtin_and_dedupe_exceptions_rebuild_exactly(codec: Codec, exc: Exception) -> None:
    err = roundtrip(codec, Outcome(error=exc)).error
    assert type(err) is type(exc)
    assert err.args == exc.args
    assert str(err) == str(exc)


def test_a_custom_init_signature_becomes_remote_error_naming_the_type(codec: Codec) -> None:
    err = roundtrip(codec, Outcome(error=raised(leader_raises_two_arg))).error
    assert isinstance(err, RemoteError)
    assert isinstance(err, DedupeError)
    assert err.type_name == f"{__name__}.TwoArgError"
    assert err.message == "1-2"
    assert "leader_raises_two_arg" in err.remote_traceback
    assert err.__traceback__ is not None
    assert "leader_raises_two_arg" in formatted(err)


def test_a_custom_init_falls_back_to_the_nearest_base_naming_the_type(codec: Codec) -> None:
    err = roundtrip(codec, Outcome(error=raised(leader_raises_deep_two_arg))).error
    assert type(err) is MiddleError
    assert f"{__name__}.DeepTwoArgError" in str(err)
    assert "x/y" in str(err)
    assert "leader_raises_deep_two_arg" in formatted(err)


def test_unencodable_args_become_remote_error(codec: Codec) -> None:
    original = raised(leader_raises_with_a_lock)
    err = roundtrip(codec, Outcome(error=original)).error
    assert isinstance(err, RemoteError)
    assert err.type_name == f"{__name__}.LockHolderError"
    assert err.message == str(original)
    assert "LockHolderError" in err.remote_traceback
    assert str(err).startswith(f"{__name__}.LockHolderError: ")


def _forged_error(meta: dict[str, Any], codec: Codec | None = None) -> Outcome:
    """Open an error record whose metadata the test wrote (as anyone with key access could)."""
    codec = codec or Codec()
    body = SAFE.dumps(meta)
    header = b"%d:0:1000:" % TOKEN
    head = codec._head(KIND_ERROR, b"")
    mac = codec._mac(sealing._RECORD_DOMAIN, CHANNEL, header, head, body) if codec._macs else b""
    return opened(codec, header + head + mac + body).outcome


@pytest.mark.parametrize(
    "cls", [KeyboardInterrupt, SystemExit, asyncio.CancelledError, GeneratorExit, BaseException]
)
def test_abort_classes_are_never_rebuilt(cls: type[BaseException]) -> None:
    meta = {
        "type": cls.__qualname__,
        "module": cls.__module__,
        "name": cls.__qualname__,
        "message": "stop",
        "args": ("stop",),
        "mro": [["builtins", "BaseException"]],
    }
    err = _forged_error(meta).error
    assert isinstance(err, RemoteError)
    assert err.type_name == cls.__qualname__
    # A leader's own abort never ships as a rebuildable error either.
    sealed = roundtrip(Codec(), Outcome(error=cls("stop"))).error
    assert isinstance(sealed, RemoteError)


def test_a_pickled_abort_is_refused_even_when_signed(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = Codec(PICKLE, secret=SECRET)
    monkeypatch.setattr(
        remote_errors, "_pickled_exception", lambda exc: pickle.dumps(KeyboardInterrupt())
    )
    err = roundtrip(codec, Outcome(error=raised(leader_raises_custom))).error
    assert not isinstance(err, KeyboardInterrupt)
    assert type(err) is CustomError  # rebuilt from its args instead


def test_a_class_that_is_not_imported_is_never_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "dedupe_test_trap_mod.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Boom(Exception):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    calls: list[str] = []
    lazy = types.ModuleType("dedupe_test_lazy_mod")

    def module_getattr(name: str) -> Any:
        calls.append(name)
        raise AttributeError(name)

    lazy.__getattr__ = module_getattr  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "dedupe_test_lazy_mod", lazy)
    for module, name in [("dedupe_test_trap_mod", "Boom"), ("dedupe_test_lazy_mod", "Lazy.Inner")]:
        meta = {
            "type": f"{module}.{name}",
            "module": module,
            "name": name,
            "message": "m",
            "args": ("m",),
            "mro": [[module, name], ["builtins", "ValueError"]],
        }
        err = _forged_error(meta).error
        assert type(err) is ValueError  # the nearest base this process has, naming the type
        assert f"{module}.{name}: m" in str(err)
    assert not marker.exists()
    assert "dedupe_test_trap_mod" not in sys.modules
    assert calls == []


@pytest.mark.parametrize(
    "meta",
    [
        [],
        "text",
        {"message": "no type"},
        {"type": 1, "message": "m"},
        {"type": "T", "message": ["not", "text"]},
        {"type": "T", "traceback": {}},
    ],
    ids=repr,
)
def test_malformed_error_metadata_is_an_envelope_error(meta: Any) -> None:
    with pytest.raises(EnvelopeError):
        _forged_error(meta)


@pytest.mark.parametrize(
    "frames",
    [
        "no",
        [["f", "n"]],
        [["f", "n", "1"]],
        [["f", "n", -1]],
        [[1, "n", 1]],
        [["f", "n", 1]] * 1000,
        [{"tb_frame": {"f_globals": {"__builtins__": {}}}}],
    ],
    ids=["str", "short", "str-line", "negative", "int-file", "too-many", "tblib-dict"],
)
def test_malformed_frames_only_drop_the_traceback(frames: Any) -> None:
    meta = {"type": "ValueError", "module": "builtins", "name": "ValueError", "message": "m"}
    meta.update(args=("m",), frames=frames)
    err = _forged_error(meta).error
    assert type(err) is ValueError
    assert err.__traceback__ is None


def test_pickle_with_a_secret_carries_classes_the_follower_has_not_imported() -> None:
    # The original instance, via pickle (signed): same class, even with a custom attribute.
    exc = CustomError("a")
    exc.detail = {"k": 1}  # type: ignore[attr-defined]
    err = roundtrip(Codec(PICKLE, secret=SECRET), Outcome(error=exc)).error
    assert type(err) is CustomError and err.detail == {"k": 1}  # type: ignore[attr-defined]
    # Without pickle only its args travel.
    err = roundtrip(Codec(secret=SECRET), Outcome(error=exc)).error
    assert type(err) is CustomError and not hasattr(err, "detail")


# --------------------------------------------------------------------------- size limits


def test_over_max_payload_is_result_too_large(codec: Codec) -> None:
    small = Codec(codec.serializer, secret=codec.secret, max_payload_bytes=1000)
    assert roundtrip(small, Outcome(value="x" * 100)).value == "x" * 100
    back = roundtrip(small, Outcome(value="x" * 5000))
    assert isinstance(back.error, ResultTooLarge) and "1000" in str(back.error)
    assert isinstance(roundtrip(small, Outcome(error=ValueError("y" * 5000))).error, ResultTooLarge)
    # A reader with a lower limit than the leader refuses to decode what is over it.
    big = seal(Codec(codec.serializer, secret=codec.secret), Outcome(value="x" * 5000))
    assert isinstance(opened(small, big).outcome.error, ResultTooLarge)


def test_large_values_round_trip() -> None:
    blob = bytes(range(256)) * 40_000  # ~10 MB
    assert roundtrip(Codec(secret=SECRET), Outcome(value=blob)).value == blob
    rows = [{"i": i, "s": "x" * 50, "t": (i, i)} for i in range(20_000)]
    assert roundtrip(Codec(secret=SECRET), Outcome(value=rows)).value == rows


# --------------------------------------------------------------------------- records


def test_a_record_carries_its_header_trace_and_outcome() -> None:
    for secret in (None, SECRET):
        codec = Codec(secret=secret)
        record = seal(codec, Outcome(value=(1, 2)), token=99, keep_ms=5, ttl_ms=7, trace=b"t\0r")
        assert record.startswith(b"99:5:7:DD")
        got = opened(codec, record)
        assert (got.token, got.keep_ms, got.ttl_ms, got.trace) == (99, 5, 7, b"t\0r")
        assert got.outcome.value == (1, 2) and got.outcome.fresh_ms == 5
        assert header_of(record) == (99, 5, 7, KIND_VALUE)


def test_only_values_keep_their_keep_time() -> None:
    record = seal(Codec(), Outcome(error=ValueError("x")), keep_ms=5000)
    assert header_of(record).keep_ms == 0
    assert opened(Codec(), record).keep_ms == 0


@pytest.mark.parametrize(
    "kw",
    [
        {"token": -1},
        {"token": 10**20},
        {"keep_ms": 1.5},
        {"ttl_ms": True},
        {"trace": "str"},
        {"trace": b"x" * 70_000},
    ],
    ids=repr,
)
def test_seal_refuses_bad_arguments(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        seal(Codec(), Outcome(1), **kw)


def test_an_old_token_comes_back_as_itself_for_the_protocol_to_refuse() -> None:
    codec = Codec(secret=SECRET)
    assert opened(codec, seal(codec, Outcome("old"), token=3)).token == 3
    notice = codec.open(codec.notice(NOTICE_STORED, channel=CHANNEL, token=3), channel=CHANNEL)
    assert notice == Notice(NOTICE_STORED, 3)


def test_every_single_byte_change_of_a_signed_record_is_refused() -> None:
    codec = Codec(secret=SECRET)
    record = seal(codec, Outcome(value={"answer": 42}), trace=b"trace")
    for i in range(len(record)):
        for mask in (0x01, 0x10, 0x80):
            mutated = bytearray(record)
            mutated[i] ^= mask
            with pytest.raises(EnvelopeError):
                codec.open(bytes(mutated), channel=CHANNEL)
    assert codec.rejected == 3 * len(record)


def test_a_raised_keep_time_is_tampering() -> None:
    codec = Codec(secret=SECRET)
    record = seal(codec, Outcome(value="stale"), keep_ms=1000, ttl_ms=12000)
    forged = record.replace(b":1000:12000:", b":600000:600000:", 1)
    with pytest.raises(TamperedEnvelope):
        codec.open(forged, channel=CHANNEL)
    newer = record.replace(b"%d:" % TOKEN, b"%d:" % (TOKEN + 1), 1)
    with pytest.raises(TamperedEnvelope):
        codec.open(newer, channel=CHANNEL)


def test_another_channel_or_secret_is_tampering() -> None:
    codec = Codec(secret=SECRET)
    record = seal(codec, Outcome(value=1))
    with pytest.raises(TamperedEnvelope):
        codec.open(record, channel="dedupe:{other}")
    with pytest.raises(TamperedEnvelope):
        Codec(secret=b"another").open(record, channel=CHANNEL)
    # The channel is length-prefixed: no shifting bytes between channel and header.
    a = codec.seal(Outcome(1), channel="a1", token=23, keep_ms=0, ttl_ms=1)
    with pytest.raises(TamperedEnvelope):
        codec.open(a[1:], channel="a")


def test_unsigned_records_and_notices_are_refused_when_a_secret_is_set() -> None:
    plain = Codec()
    signed = Codec(secret=SECRET)
    with pytest.raises(TamperedEnvelope, match="unsigned"):
        signed.open(seal(plain, Outcome(1)), channel=CHANNEL)
    with pytest.raises(TamperedEnvelope, match="unsigned"):
        signed.open(plain.notice(NOTICE_ABORTED, channel=CHANNEL, token=TOKEN), channel=CHANNEL)
    assert signed.rejected == 2


def test_a_reader_without_a_secret_reads_signed_records() -> None:
    record = seal(Codec(secret=SECRET), Outcome(value={"answer": 42}))
    assert opened(Codec(), record).outcome.value == {"answer": 42}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"1",
        b"1:2:3",
        b"1:2:3:",
        b"1:2:x:junk",
        b"a:2:3:DD",
        b"-1:2:3:DD",
        b" 1:2:3:DD",
        "\u0661:2:3:DD".encode(),
        b"5" * 5000 + b":1:1:DD\x02vs\x00\x00\x00null",
        b"1:" + b"9" * 21 + b":1:DD\x02vs\x00\x00\x00null",
        b"1:2:3:DD\x01vs\x00null",
        b"1:2:3:DD\x02zs\x00\x00\x00null",
        b"1:2:3:DD\x02vs\x04\x00\x00null",
        b"1:2:3:DD\x02vs\x00\xff\xffnull",
        b"1:2:3:DD\x02vx\x00\x00\x00null",
        b"1:2:3:DD\x02vp\x00\x00\x00" + pickle.dumps(1),
        b"garbage garbage",
        b"\x80\x05\x95",
        b"N",
        b"N:",
        b"N:x",
        b"N:1:short-mac",
        b"A:" + b"1" * 21,
        b"Q:1",
    ],
    ids=repr,
)
@pytest.mark.parametrize("secret", [None, SECRET], ids=["plain", "signed"])
def test_malformed_input_is_an_envelope_error_and_counted(
    data: bytes, secret: bytes | None
) -> None:
    codec = Codec(secret=secret)
    with pytest.raises(EnvelopeError) as info:
        codec.open(data, channel=CHANNEL)
    assert not getattr(info.value, "unexpected", False)
    assert codec.rejected == 1


def test_every_truncation_is_an_envelope_error(codec: Codec) -> None:
    record = seal(codec, Outcome(value=[1, "two", 3.0]))
    for n in range(len(record)):
        with pytest.raises(EnvelopeError):
            codec.open(record[:n], channel=CHANNEL)


@pytest.mark.parametrize("version", [0, 1, 3, 255])
def test_an_unknown_version_is_named(version: int) -> None:
    record = bytearray(seal(Codec(), Outcome(1)))
    record[record.index(b"DD") + 2] = version
    with pytest.raises(EnvelopeError, match=rf"version {version}\b"):
        Codec().open(bytes(record), channel=CHANNEL)


# --------------------------------------------------------------------------- notices


def test_notices_round_trip_and_are_signed() -> None:
    for secret in (None, SECRET):
        codec = Codec(secret=secret)
        for kind in (NOTICE_STORED, NOTICE_ABORTED):
            data = codec.notice(kind, channel=CHANNEL, token=12345)
            assert data.startswith(kind + b":12345")
            assert codec.open(data, channel=CHANNEL) == Notice(kind, 12345)
    assert Codec().notice(NOTICE_STORED, channel=CHANNEL, token=5) == b"N:5"
    with pytest.raises(ValueError):
        Codec().notice(b"X", channel=CHANNEL, token=5)


def test_forged_or_moved_notices_are_refused() -> None:
    codec = Codec(secret=SECRET)
    data = codec.notice(NOTICE_STORED, channel=CHANNEL, token=7)
    with pytest.raises(TamperedEnvelope):
        codec.open(data, channel="dedupe:{other}")
    with pytest.raises(TamperedEnvelope):
        codec.open(b"N:8" + data[3:], channel=CHANNEL)  # another token
    with pytest.raises(TamperedEnvelope):
        codec.open(b"A" + data[1:], channel=CHANNEL)  # another kind
    with pytest.raises(TamperedEnvelope):
        Codec(secret=b"other").open(data, channel=CHANNEL)


# --------------------------------------------------------------------------- secrets, modes


def test_rotation_first_key_signs_all_verify() -> None:
    old, new = Codec(secret="old"), Codec(secret=["new", "old"])
    assert opened(new, seal(old, Outcome("from old"))).outcome.value == "from old"
    assert opened(new, seal(new, Outcome("from new"))).outcome.value == "from new"
    with pytest.raises(TamperedEnvelope):
        old.open(seal(new, Outcome("x")), channel=CHANNEL)
    assert new.open(old.notice(NOTICE_ABORTED, channel=CHANNEL, token=1), channel=CHANNEL)
    assert Codec(secrets=[b"new", b"old"]).secret == b"new"


def test_secret_forms() -> None:
    assert secret_keys(None) == ()
    assert secret_keys("k") == (b"k",)
    assert secret_keys([b"a", "b"]) == (b"a", b"b")
    for bad, error in [
        ("", ValueError),
        ([], ValueError),
        (["a", ""], ValueError),
        (5, TypeError),
        ([1], TypeError),
        ({"a"}, TypeError),
    ]:
        with pytest.raises(error):
            secret_keys(bad)  # type: ignore[arg-type]


def test_dedupe_secret_may_hold_several_keys() -> None:
    codec = codec_for("safe", None, None, {"DEDUPE_SECRET": " new , old "})
    assert codec.mode == "signed (2 keys), serializer=safe"
    assert codec.secret == b"new"
    assert codec_for("safe", "explicit", None, {"DEDUPE_SECRET": "env"}).secret == b"explicit"
    with pytest.raises(ValueError, match="empty entry"):
        codec_for("safe", None, None, {"DEDUPE_SECRET": "a,,b"})


def test_a_misspelt_secret_variable_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dedupe"):
        codec = codec_for("safe", None, None, {"DEDUP_SECRET": "typo"})
    assert codec.mode == "unsigned, serializer=safe"
    assert "DEDUP_SECRET" in caplog.text


def test_modes() -> None:
    assert Codec().mode == "unsigned, serializer=safe"
    assert Codec(secret="k").mode == "signed (1 key), serializer=safe"
    assert Codec(PICKLE, secret=["a", "b"]).mode == "signed (2 keys), serializer=pickle"
    assert "UNSAFE" in Codec(PICKLE_UNSAFE).mode
    assert Codec(JSON).mode == "unsigned, serializer=json"


def test_pickle_needs_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEDUPE_SECRET", raising=False)
    with pytest.raises(ValueError, match=r"secret=.*DEDUPE_SECRET"):
        Codec(PICKLE)
    with pytest.raises(ValueError, match=r"secret=.*DEDUPE_SECRET"):
        SingleFlight("redis://127.0.0.1:1/0", serializer="pickle")
    SingleFlight("redis://127.0.0.1:1/0", serializer="pickle", secret="k")
    SingleFlight("redis://127.0.0.1:1/0", serializer="pickle-unsafe")
    monkeypatch.setenv("DEDUPE_SECRET", "from-env")
    SingleFlight("redis://127.0.0.1:1/0", serializer="pickle")
    with pytest.raises(ValueError, match="serializer must be"):
        SingleFlight("redis://127.0.0.1:1/0", serializer="marshal")
    with pytest.raises(TypeError, match="secret"):
        SingleFlight("redis://127.0.0.1:1/0", secret=5)  # type: ignore[arg-type]


def test_a_safe_reader_never_unpickles(monkeypatch: pytest.MonkeyPatch) -> None:
    record = seal(Codec(PICKLE_UNSAFE), Outcome(value={"x": 1}))
    error_record = seal(Codec(PICKLE_UNSAFE), Outcome(error=raised(leader_raises_custom)))
    calls: list[Any] = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(a))
    for reader in (Codec(), Codec(JSON)):
        with pytest.raises(EnvelopeError, match="serializer 'p'"):
            reader.open(record, channel=CHANNEL)
    assert type(opened(Codec(), error_record).outcome.error) is CustomError
    assert calls == []


def test_a_pickle_reader_still_reads_safe_and_json_records() -> None:
    reader = Codec(PICKLE, secret=SECRET)
    for writer in (Codec(secret=SECRET), Codec(JSON, secret=SECRET)):
        assert opened(reader, seal(writer, Outcome(value=[1]))).outcome.value == [1]


class Reverse:
    ident = b"r"

    def dumps(self, value: Any) -> bytes:
        return str(value).encode()[::-1]

    def loads(self, data: bytes) -> Any:
        return data[::-1].decode()


def test_custom_serializers() -> None:
    codec = Codec(Reverse())
    assert roundtrip(codec, Outcome(value="abc")).value == "abc"
    with pytest.raises(EnvelopeError, match="serializer 'r'"):
        Codec().open(seal(codec, Outcome(value="abc")), channel=CHANNEL)
    for ident in (b"s", b"p", b"j", b"", b"ab"):
        bad = Reverse()
        bad.ident = ident
        with pytest.raises(ValueError, match="ident"):
            Codec(bad)


def test_single_flight_builds_its_codec_from_secret_or_dedupe_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DEDUPE_SECRET", raising=False)
    cases = [
        ({}, "unsigned, serializer=safe"),
        ({"secret": ["new", b"old"]}, "signed (2 keys), serializer=safe"),
        ({"secret": "k", "serializer": "json"}, "signed (1 key), serializer=json"),
    ]
    for kw, mode in cases:
        sf = SingleFlight("redis://127.0.0.1:1/0", **kw)
        try:
            assert sf.backend().codec.mode == mode
        finally:
            sf.close()
    monkeypatch.setenv("DEDUPE_SECRET", "a,b,c")
    sf = SingleFlight("redis://127.0.0.1:1/0", serializer="pickle")
    try:
        assert sf.backend().codec.mode == "signed (3 keys), serializer=pickle"
    finally:
        sf.close()
