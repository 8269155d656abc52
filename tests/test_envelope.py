"""Unit tests of dedupe.envelope: values, exceptions, fallbacks, limits, signing, records.

No Redis server is needed.
"""

from __future__ import annotations

import threading
import traceback
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dedupe.envelope import (
    JSON,
    PICKLE,
    Codec,
    Outcome,
    Serializer,
    TamperedEnvelope,
    make_record,
    parse_record,
)
from dedupe.errors import (
    DedupeError,
    EnvelopeError,
    RemoteError,
    ResultNotSerializable,
    ResultTooLarge,
)

CHANNEL = "dedupe:{job}"
TOKEN = 17
SECRET = b"s3cret-key"


def roundtrip(codec: Codec, outcome: Outcome, reader: Codec | None = None) -> Outcome:
    envelope = codec.encode(outcome, channel=CHANNEL, token=TOKEN)
    assert isinstance(envelope, bytes)
    return (reader or codec).decode(envelope, channel=CHANNEL, token=TOKEN)


def raised(fn: Any, *args: Any) -> BaseException:
    try:
        fn(*args)
    except BaseException as exc:
        return exc
    raise AssertionError("did not raise")


def formatted(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


# --------------------------------------------------------------------------- values

VALUES: list[Any] = [
    None,
    0,
    -1,
    2**70,
    1.5,
    "text",
    "ünïcødé",
    [1, "two", None, [3.0]],
    {"a": 1, "b": [True, False], "c": {"d": None}},
    "",
    [],
    {},
]


@pytest.mark.parametrize("serializer", [PICKLE, JSON], ids=["pickle", "json"])
@pytest.mark.parametrize("secret", [None, SECRET], ids=["plain", "signed"])
@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_values_round_trip(serializer: Serializer, secret: bytes | None, value: Any) -> None:
    back = roundtrip(Codec(serializer, secret=secret), Outcome(value=value))
    assert back.error is None
    assert back.value == value
    assert type(back.value) is type(value)
    assert back.unwrap() == value


def test_pickle_only_values_round_trip() -> None:
    value = {"set": {1, 2}, "tuple": (1, 2), "bytes": b"\x00\xff", "complex": 1 + 2j}
    assert roundtrip(Codec(PICKLE), Outcome(value=value)).value == value


@pytest.mark.parametrize("secret", [None, SECRET], ids=["plain", "signed"])
def test_large_values_round_trip(secret: bytes | None) -> None:
    blob = bytes(range(256)) * 40_000  # ~10 MB
    assert roundtrip(Codec(PICKLE, secret=secret), Outcome(value=blob)).value == blob
    rows = [{"i": i, "s": "x" * 50} for i in range(50_000)]
    assert roundtrip(Codec(JSON, secret=secret), Outcome(value=rows)).value == rows


def test_value_written_by_another_serializer_is_an_envelope_error() -> None:
    envelope = Codec(PICKLE).encode(Outcome(value=1), channel=CHANNEL, token=TOKEN)
    with pytest.raises(EnvelopeError, match="serializer"):
        Codec(JSON).decode(envelope, channel=CHANNEL, token=TOKEN)


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
    raise CustomError("boom", 42)


def leader_raises_two_arg() -> None:
    raise TwoArgError(1, 2)


def leader_raises_deep_two_arg() -> None:
    raise DeepTwoArgError("x", "y")


def leader_raises_with_a_lock() -> None:
    raise LockHolderError("held", threading.Lock())


def leader_raises_value_error() -> None:
    raise ValueError("x", 1)


@pytest.mark.parametrize("secret", [None, SECRET], ids=["plain", "signed"])
def test_custom_exception_round_trips_with_its_traceback(secret: bytes | None) -> None:
    back = roundtrip(Codec(PICKLE, secret=secret), Outcome(error=raised(leader_raises_custom)))
    err = back.error
    assert type(err) is CustomError
    assert err.args == ("boom", 42)
    assert err.__traceback__ is not None
    assert "leader_raises_custom" in formatted(err)
    with pytest.raises(CustomError):
        back.unwrap()


def test_exception_with_a_custom_init_falls_back_to_its_base() -> None:
    original = raised(leader_raises_two_arg)
    err = roundtrip(Codec(PICKLE), Outcome(error=original)).error
    assert isinstance(err, Exception)
    assert type(err) is Exception
    assert str(err) == "1-2"
    assert err.__traceback__ is not None
    assert "leader_raises_two_arg" in formatted(err)


def test_exception_with_a_custom_init_falls_back_to_the_nearest_base() -> None:
    err = roundtrip(Codec(PICKLE), Outcome(error=raised(leader_raises_deep_two_arg))).error
    assert type(err) is MiddleError
    assert err.args == ("x/y",)


def test_exception_that_cannot_be_pickled_becomes_remote_error() -> None:
    original = raised(leader_raises_with_a_lock)
    err = roundtrip(Codec(PICKLE), Outcome(error=original)).error
    assert isinstance(err, RemoteError)
    assert isinstance(err, DedupeError)
    assert err.type_name == f"{__name__}.LockHolderError"
    assert err.message == str(original)
    assert "held" in err.message
    assert "LockHolderError" in err.remote_traceback
    assert "leader_raises_with_a_lock" in err.remote_traceback
    assert str(err).startswith(f"{__name__}.LockHolderError: ")


def test_json_rebuilds_builtin_exceptions() -> None:
    err = roundtrip(Codec(JSON), Outcome(error=raised(leader_raises_value_error))).error
    assert type(err) is ValueError
    assert err.args == ("x", 1)
    assert "leader_raises_value_error" in formatted(err)


def test_json_turns_custom_exceptions_into_remote_error() -> None:
    err = roundtrip(Codec(JSON), Outcome(error=raised(leader_raises_custom))).error
    assert isinstance(err, RemoteError)
    assert err.type_name == f"{__name__}.CustomError"
    assert err.message == str(CustomError("boom", 42))
    assert "leader_raises_custom" in err.remote_traceback


def test_json_builtin_exception_with_non_json_args_becomes_remote_error() -> None:
    err = roundtrip(Codec(JSON), Outcome(error=KeyError(threading.Lock()))).error
    assert isinstance(err, RemoteError)
    assert err.type_name == "KeyError"


def test_exception_never_raised_has_no_traceback_but_round_trips() -> None:
    err = roundtrip(Codec(PICKLE), Outcome(error=CustomError("fresh"))).error
    assert type(err) is CustomError
    assert err.args == ("fresh",)


# --------------------------------------------------------------------------- fallbacks, limits


def _generator() -> Any:
    yield 1


@pytest.mark.parametrize(
    ("serializer", "value"),
    [
        (PICKLE, _generator()),
        (PICKLE, threading.Lock()),
        (PICKLE, {"nested": [threading.Lock()]}),
        (JSON, {1, 2}),
        (JSON, object()),
    ],
    ids=["pickle-generator", "pickle-lock", "pickle-nested-lock", "json-set", "json-object"],
)
def test_unserializable_value_decodes_to_result_not_serializable(
    serializer: Serializer, value: Any
) -> None:
    envelope = Codec(serializer).encode(Outcome(value=value), channel=CHANNEL, token=TOKEN)
    assert envelope[3:4] == b"u"
    back = Codec(serializer).decode(envelope, channel=CHANNEL, token=TOKEN)
    assert back.value is None
    assert isinstance(back.error, ResultNotSerializable)
    assert type(value).__name__ in str(back.error)
    with pytest.raises(ResultNotSerializable):
        back.unwrap()


@pytest.mark.parametrize("serializer", [PICKLE, JSON], ids=["pickle", "json"])
def test_over_max_payload_decodes_to_result_too_large(serializer: Serializer) -> None:
    codec = Codec(serializer, max_payload_bytes=1000)
    assert roundtrip(codec, Outcome(value="x" * 100)).value == "x" * 100
    back = roundtrip(codec, Outcome(value="x" * 5000))
    assert back.value is None
    assert isinstance(back.error, ResultTooLarge)
    assert "1000" in str(back.error)
    big_error = roundtrip(codec, Outcome(error=ValueError("y" * 5000))).error
    assert isinstance(big_error, ResultTooLarge)


def test_max_payload_zero_refuses_everything_nonempty() -> None:
    assert isinstance(
        roundtrip(Codec(PICKLE, max_payload_bytes=0), Outcome(1)).error, ResultTooLarge
    )


# --------------------------------------------------------------------------- signing


def signed_envelope(serializer: Serializer = PICKLE, outcome: Outcome | None = None) -> bytes:
    outcome = outcome if outcome is not None else Outcome(value={"answer": 42})
    return Codec(serializer, secret=SECRET).encode(outcome, channel=CHANNEL, token=TOKEN)


def test_signed_round_trip() -> None:
    codec = Codec(PICKLE, secret=SECRET)
    assert roundtrip(codec, Outcome(value={"answer": 42})).value == {"answer": 42}
    err = roundtrip(codec, Outcome(error=raised(leader_raises_custom))).error
    assert type(err) is CustomError


@pytest.mark.parametrize("serializer", [PICKLE, JSON], ids=["pickle", "json"])
@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_flipping_any_byte_after_the_header_is_tampering(serializer: Serializer, mask: int) -> None:
    envelope = signed_envelope(serializer)
    reader = Codec(serializer, secret=SECRET)
    for i in range(6, len(envelope)):
        mutated = bytearray(envelope)
        mutated[i] ^= mask
        with pytest.raises(TamperedEnvelope):
            reader.decode(bytes(mutated), channel=CHANNEL, token=TOKEN)


@pytest.mark.parametrize("mask", [0x01, 0x02, 0x80, 0xFF])
def test_flipping_a_header_byte_is_refused(mask: int) -> None:
    envelope = signed_envelope()
    reader = Codec(PICKLE, secret=SECRET)
    for i in range(6):
        mutated = bytearray(envelope)
        mutated[i] ^= mask
        with pytest.raises(EnvelopeError):
            reader.decode(bytes(mutated), channel=CHANNEL, token=TOKEN)


@pytest.mark.parametrize(
    ("index", "new"),
    [(3, ord("e")), (3, ord("u")), (3, ord("l")), (4, ord("j")), (4, ord("x")), (5, 0)],
    ids=["kind-e", "kind-u", "kind-l", "ident-j", "ident-x", "unsigned-flag"],
)
def test_a_header_rewritten_to_another_valid_header_is_tampering(index: int, new: int) -> None:
    mutated = bytearray(signed_envelope())
    assert mutated[index] != new
    mutated[index] = new
    with pytest.raises(TamperedEnvelope):
        Codec(PICKLE, secret=SECRET).decode(bytes(mutated), channel=CHANNEL, token=TOKEN)


def test_another_channel_token_or_secret_is_tampering() -> None:
    envelope = signed_envelope()
    reader = Codec(PICKLE, secret=SECRET)
    assert reader.decode(envelope, channel=CHANNEL, token=TOKEN).value == {"answer": 42}
    with pytest.raises(TamperedEnvelope):
        reader.decode(envelope, channel="dedupe:{other}", token=TOKEN)
    with pytest.raises(TamperedEnvelope):
        reader.decode(envelope, channel=CHANNEL, token=TOKEN + 1)
    with pytest.raises(TamperedEnvelope):
        Codec(PICKLE, secret=b"another").decode(envelope, channel=CHANNEL, token=TOKEN)


def test_channel_and_token_cannot_be_shifted_into_each_other() -> None:
    codec = Codec(JSON, secret=SECRET)
    envelope = codec.encode(Outcome(value=1), channel="a1", token=23)
    with pytest.raises(TamperedEnvelope):
        codec.decode(envelope, channel="a", token=123)


@pytest.mark.parametrize("serializer", [PICKLE, JSON], ids=["pickle", "json"])
def test_unsigned_envelope_is_refused_when_a_secret_is_set(serializer: Serializer) -> None:
    unsigned = Codec(serializer).encode(Outcome(value=1), channel=CHANNEL, token=TOKEN)
    with pytest.raises(TamperedEnvelope, match="unsigned"):
        Codec(serializer, secret=SECRET).decode(unsigned, channel=CHANNEL, token=TOKEN)


@pytest.mark.parametrize("serializer", [PICKLE, JSON], ids=["pickle", "json"])
def test_reader_without_a_secret_accepts_a_signed_envelope(serializer: Serializer) -> None:
    envelope = signed_envelope(serializer)
    assert Codec(serializer).decode(envelope, channel=CHANNEL, token=TOKEN).value == {"answer": 42}


def test_tampered_envelope_is_an_envelope_error() -> None:
    assert issubclass(TamperedEnvelope, EnvelopeError)
    assert issubclass(EnvelopeError, DedupeError)


# --------------------------------------------------------------------------- format errors


@pytest.mark.parametrize("version", [0, 2, 9, 255])
def test_unknown_version_is_an_envelope_error_naming_it(version: int) -> None:
    for envelope in (signed_envelope(), Codec(PICKLE).encode(Outcome(1), channel="c", token=1)):
        mutated = bytearray(envelope)
        mutated[2] = version
        with pytest.raises(EnvelopeError, match=rf"version {version}\b") as info:
            Codec(PICKLE, secret=SECRET).decode(bytes(mutated), channel=CHANNEL, token=TOKEN)
        assert "version" in str(info.value)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"D",
        b"DD",
        b"DD\x01v",
        b"DD\x01vp",
        b"garbage garbage garbage",
        b"\x80\x05\x95",
        b"DD\x01zp\x00",
        b"DD\x01vp\x04",
    ],
)
@pytest.mark.parametrize("secret", [None, SECRET], ids=["plain", "signed"])
def test_garbage_is_an_envelope_error(data: bytes, secret: bytes | None) -> None:
    with pytest.raises(EnvelopeError):
        Codec(PICKLE, secret=secret).decode(data, channel=CHANNEL, token=TOKEN)


@pytest.mark.parametrize("serializer", [PICKLE, JSON], ids=["pickle", "json"])
@pytest.mark.parametrize("secret", [None, SECRET], ids=["plain", "signed"])
def test_every_truncation_is_an_envelope_error(
    serializer: Serializer, secret: bytes | None
) -> None:
    codec = Codec(serializer, secret=secret)
    envelope = codec.encode(Outcome(value=[1, "two", 3.0]), channel=CHANNEL, token=TOKEN)
    for n in range(len(envelope)):
        with pytest.raises(EnvelopeError):
            codec.decode(envelope[:n], channel=CHANNEL, token=TOKEN)


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b"42", b'"s"', b"{}", b'{"message":"m"}', b"\xff\xfe"],
)
def test_malformed_error_body_is_an_envelope_error(body: bytes) -> None:
    with pytest.raises(EnvelopeError, match="malformed"):
        Codec(JSON).decode(b"DD\x01ej\x00" + body, channel=CHANNEL, token=TOKEN)


@pytest.mark.parametrize("serializer", [PICKLE, JSON], ids=["pickle", "json"])
def test_deeply_nested_error_body_is_an_envelope_error(serializer: Serializer) -> None:
    # json.loads raises RecursionError (not ValueError) on deep nesting; decode must still
    # raise only EnvelopeError for what it reads from Redis.
    envelope = b"DD\x01e" + serializer.ident + b"\x00" + b"[" * 100_000
    with pytest.raises(EnvelopeError):
        Codec(serializer).decode(envelope, channel=CHANNEL, token=TOKEN)


# --------------------------------------------------------------------------- fuzz


def check_decode(codec: Codec, data: bytes) -> None:
    """decode may return an Outcome or raise an EnvelopeError, and nothing else."""
    try:
        outcome = codec.decode(data, channel=CHANNEL, token=TOKEN)
    except EnvelopeError:
        return
    assert isinstance(outcome, Outcome)


envelope_like = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda kind, ident, flags, body: b"DD\x01" + bytes([kind, ident, flags]) + body,
        st.sampled_from(b"veulx"),
        st.sampled_from(b"pjx"),
        st.sampled_from([0, 1, 2, 3]),
        st.one_of(
            st.binary(max_size=200),
            st.sampled_from(
                [
                    b'{"type":"ValueError","module":"builtins","name":"ValueError","args":[1]}',
                    b'{"type":"x","tb":{"tb_frame":1},"args":"no"}',
                    b'{"type":"x","module":"builtins","name":"int","args":[]}',
                    b'{"type":"x","module":"builtins","name":"ExceptionGroup","args":[1]}',
                    b'{"type":"x","tb":{"tb_frame":{"f_code":{}}, "tb_lineno":"a"}}',
                    b'{"type":1,"message":[],"traceback":{},"origin":null}',
                    b"[1,2,{",
                ]
            ),
        ),
    ),
)


def base_envelopes(serializer: Serializer, secret: bytes | None) -> list[bytes]:
    codec = Codec(serializer, secret=secret)
    small = Codec(serializer, secret=secret, max_payload_bytes=4)
    return [
        codec.encode(Outcome(value={"k": [1, 2.5, "s", None]}), channel=CHANNEL, token=TOKEN),
        codec.encode(
            Outcome(error=raised(leader_raises_value_error)), channel=CHANNEL, token=TOKEN
        ),
        codec.encode(Outcome(error=raised(leader_raises_custom)), channel=CHANNEL, token=TOKEN),
        codec.encode(Outcome(value=threading.Lock()), channel=CHANNEL, token=TOKEN),
        small.encode(Outcome(value="long enough"), channel=CHANNEL, token=TOKEN),
    ]


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=20), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.just(0)),
)


def mutate(data: bytes, mutations: list[tuple[str, Any, int]]) -> bytes:
    buf = bytearray(data)
    for op, where, value in mutations:
        if op == "extend":
            buf.extend(where)
            continue
        if not buf:
            continue
        i = where % len(buf)
        if op == "flip":
            buf[i] ^= value
        elif op == "truncate":
            del buf[i:]
        elif op == "insert":
            buf.insert(i, value)
        elif op == "delete":
            del buf[i]
    return bytes(buf)


JSON_PLAIN = base_envelopes(JSON, None)
JSON_SIGNED = base_envelopes(JSON, SECRET)
PICKLE_SIGNED = base_envelopes(PICKLE, SECRET)


@settings(max_examples=300)
@given(data=envelope_like)
def test_fuzz_random_bytes_json_without_secret(data: bytes) -> None:
    check_decode(Codec(JSON), data)


@settings(max_examples=300)
@given(data=envelope_like)
def test_fuzz_random_bytes_with_secret(data: bytes) -> None:
    check_decode(Codec(JSON, secret=SECRET), data)
    check_decode(Codec(PICKLE, secret=SECRET), data)


@settings(max_examples=300)
@given(
    base=st.sampled_from(JSON_PLAIN + JSON_SIGNED),
    mutations=st.lists(mutation, min_size=1, max_size=4),
)
def test_fuzz_mutated_json_envelopes_without_secret(
    base: bytes, mutations: list[tuple[str, Any, int]]
) -> None:
    check_decode(Codec(JSON), mutate(base, mutations))


@settings(max_examples=300)
@given(
    base=st.sampled_from(PICKLE_SIGNED + JSON_SIGNED),
    mutations=st.lists(mutation, min_size=1, max_size=4),
)
def test_fuzz_mutated_envelopes_with_secret(
    base: bytes, mutations: list[tuple[str, Any, int]]
) -> None:
    mutated = mutate(base, mutations)
    assume(mutated != base)
    for codec in (Codec(PICKLE, secret=SECRET), Codec(JSON, secret=SECRET)):
        # The MAC rejects every real change before anything is deserialized.
        with pytest.raises(EnvelopeError):
            codec.decode(mutated, channel=CHANNEL, token=TOKEN)


# --------------------------------------------------------------------------- records


@given(
    token=st.integers(0, 2**63),
    keep=st.integers(0, 2**40),
    ttl=st.integers(0, 2**40),
    envelope=st.binary(max_size=100),
)
def test_record_round_trip(token: int, keep: int, ttl: int, envelope: bytes) -> None:
    data = make_record(token, keep, ttl, envelope)
    assert data.startswith(f"{token}:{keep}:{ttl}:".encode())
    record = parse_record(data)
    assert (record.token, record.keep_ms, record.ttl_ms, record.envelope) == (
        token,
        keep,
        ttl,
        envelope,
    )


def test_record_with_a_real_envelope() -> None:
    envelope = signed_envelope()
    record = parse_record(make_record(TOKEN, 1000, 12000, envelope))
    assert record.envelope == envelope
    codec = Codec(PICKLE, secret=SECRET)
    assert codec.decode(record.envelope, channel=CHANNEL, token=record.token).value == {
        "answer": 42
    }


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"1",
        b"1:2:3",
        b"1:2",
        b"a:2:3:x",
        b"1:b:3:x",
        b"1:2:c:x",
        b"-1:2:3:x",
        b"1::3:x",
        b":1:2:3:x",
        b" 1:2:3:x",
        b"1.5:2:3:x",
        b"N:17",
        b"A:17",
        "\u0661:2:3:x".encode(),
    ],
)
def test_malformed_records_are_envelope_errors(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        parse_record(data)
