"""Fuzzing every function that reads bytes from Redis: only EnvelopeError ever escapes.

``Codec.open`` (records, notices, error metadata), the safe and JSON serializers' ``loads``,
and dedupe.core.record's readers of headers, notices and lock values. Seeded and small by default
(a few seconds in ``make test``); ``DEDUPE_FUZZ_EXAMPLES=100000`` runs that many examples per
test, with a random seed unless ``DEDUPE_FUZZ_SEED`` is set too.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import tracemalloc
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

from dedupe.core import record
from dedupe.core.record import NOTICE_ABORTED, NOTICE_STORED
from dedupe.core.sealing import Codec, Notice, Opened, Outcome
from dedupe.core.serializers import JSON, PICKLE, SAFE
from dedupe.errors import EnvelopeError

CHANNEL = "dedupe:{fuzz}"
SECRET = b"fuzz-secret"
TOKEN = 1_764_000_000_000_000

_LONG = os.environ.get("DEDUPE_FUZZ_EXAMPLES")
EXAMPLES = int(_LONG) if _LONG else 100
_SEED = os.environ.get("DEDUPE_FUZZ_SEED", "" if _LONG else "20261201")

F = TypeVar("F", bound=Callable[..., Any])


def fuzz(fn: F) -> F:
    """Hypothesis settings for a fuzz test: many small examples, seeded unless a long run."""
    fn = settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )(fn)
    return seed(int(_SEED))(fn) if _SEED else fn


def must_not_escape(call: Callable[[], Any]) -> Any:
    """Run a decoder on hostile input: a result, or an EnvelopeError that was not a bug."""
    try:
        return call()
    except EnvelopeError as exc:
        # open() turns an unforeseen exception into EnvelopeError too; that is still a finding.
        assert not getattr(exc, "unexpected", False), f"unforeseen: {exc!r} from {exc.__cause__!r}"
        return None


def check_open(codec: Codec, data: bytes) -> None:
    before = codec.rejected
    got = must_not_escape(lambda: codec.open(data, channel=CHANNEL))
    if got is None:
        assert codec.rejected == before + 1
    else:
        assert isinstance(got, (Opened, Notice))
        assert codec.rejected == before


def raised(exc: Exception) -> Exception:
    try:
        raise exc
    except Exception as caught:
        return caught


def _genuine(codec: Codec) -> list[bytes]:
    args: dict[str, Any] = {"channel": CHANNEL, "token": TOKEN, "keep_ms": 1000, "ttl_ms": 12000}
    small = Codec(codec.serializer, secret=codec.secret, max_payload_bytes=8)
    return [
        codec.seal(Outcome(value={"k": [1, 2.5, "s", None, (1, b"x")]}), **args, trace=b"tp"),
        codec.seal(Outcome(value={1: {2, 3}, "d": dt.datetime(2026, 1, 1)}), **args),
        codec.seal(Outcome(error=raised(ValueError("x", 1))), **args),
        codec.seal(Outcome(error=raised(KeyError("k"))), **args),
        codec.seal(Outcome(value=object()), **args),
        small.seal(Outcome(value="long enough"), **args),
        codec.notice(NOTICE_STORED, channel=CHANNEL, token=TOKEN),
        codec.notice(NOTICE_ABORTED, channel=CHANNEL, token=TOKEN),
    ]


READERS = {
    "safe": Codec(),
    "json": Codec(JSON),
    "safe-signed": Codec(secret=SECRET),
    "pickle-signed": Codec(PICKLE, secret=SECRET),
}
GENUINE = {name: _genuine(codec) for name, codec in READERS.items()}

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(b"")),
    st.tuples(st.just("extend"), st.just(0), st.binary(min_size=1, max_size=20)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 8)),
    st.tuples(st.just("digit"), st.integers(0, 10_000), st.sampled_from(b"0123456789:")),
)


def mutate(data: bytes, mutations: list[tuple[str, int, Any]]) -> bytes:
    buf = bytearray(data)
    for op, where, arg in mutations:
        if op == "extend":
            buf.extend(arg)
            continue
        if not buf:
            continue
        i = where % len(buf)
        if op == "flip":
            buf[i] ^= arg
        elif op == "truncate":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = arg
        elif op == "delete":
            del buf[i : i + arg]
        elif op == "digit":
            buf[i] = arg
    return bytes(buf)


# --------------------------------------------------------------------------- inputs

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=20),
)
_tag = st.sampled_from([*"tsfdbaicNUTDHRz", "", "tt", "\0"]).map(lambda c: "\0" + c)
json_like = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.text(max_size=6), inner, max_size=4),
        st.builds(lambda t, p: {t: p}, _tag, inner),
    ),
    max_leaves=30,
)
# Plausible payloads for each tag: right shape, wrong values.
_tag_payloads = st.one_of(
    st.builds(
        lambda fields, tz: {"\0T": [*fields, tz]},
        st.lists(st.integers(-(2**40), 2**40), min_size=8, max_size=8),
        st.none() | st.integers(-(2**40), 2**40),
    ),
    st.builds(
        lambda fields: {"\0H": fields}, st.lists(st.integers(-100, 10**7), min_size=6, max_size=6)
    ),
    st.builds(lambda f: {"\0D": f}, st.lists(st.integers(-10, 10**5), min_size=3, max_size=3)),
    st.builds(lambda f: {"\0R": f}, st.lists(st.integers(-(2**80), 2**80), min_size=3, max_size=3)),
    st.builds(lambda s: {"\0N": s}, st.text(alphabet="0123456789eE+-.naNIfinitysS_ ", max_size=30)),
    st.builds(lambda s: {"\0U": s}, st.text(alphabet="0123456789abcdefABCDEF-{}urn:", max_size=45)),
    st.builds(lambda s: {"\0i": s}, st.text(alphabet="0123456789abcdefx-_ +", max_size=40)),
    st.builds(lambda s: {"\0b": s}, st.text(alphabet="QUJD=+/\n -_", max_size=20)),
    st.builds(lambda items: {"\0d": items}, st.lists(json_like, max_size=6)),
    st.builds(lambda items: {"\0s": items}, st.lists(json_like, max_size=4)),
    st.builds(lambda p: {"\0c": p}, st.lists(_json_leaf, max_size=3)),
)
safe_text = st.one_of(json_like, _tag_payloads, st.lists(_tag_payloads, max_size=4)).map(
    lambda v: json.dumps(v, allow_nan=True).encode()
)
error_meta = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(st.text(max_size=20), st.sampled_from(["ValueError", "os.error"])),
        "module": st.sampled_from(["builtins", "os", "sys", "dedupe.errors", "nope", "", "a.b"]),
        "name": st.sampled_from(
            ["ValueError", "KeyboardInterrupt", "SystemExit", "RemoteError", "path", "a.b", ""]
        ),
        "message": st.text(max_size=20),
        "args": st.one_of(st.none(), st.lists(_json_leaf, max_size=4).map(tuple), json_like),
        "mro": st.lists(
            st.lists(st.sampled_from(["builtins", "LookupError", "x", "OSError"]), max_size=3),
            max_size=4,
        ),
        "traceback": st.text(max_size=20),
        "frames": st.one_of(
            json_like,
            st.lists(
                st.lists(st.one_of(st.text(max_size=8), st.integers(-5, 2**40)), max_size=4),
                max_size=4,
            ),
        ),
        "origin": st.one_of(st.text(max_size=10), st.integers()),
        "pickle": st.binary(max_size=30),
    },
).map(SAFE.dumps)


def _record(
    token: bytes,
    keep: bytes,
    ttl: bytes,
    kind: int,
    ident: int,
    flags: int,
    trace: bytes,
    tlen: int | None,
    body: bytes,
) -> bytes:
    n = len(trace) if tlen is None else tlen
    head = b"DD\x02" + bytes([kind, ident, flags]) + n.to_bytes(2, "big") + trace
    return token + b":" + keep + b":" + ttl + b":" + head + body


digits = st.one_of(st.integers(0, 2**64).map(lambda n: str(n).encode()), st.just(b"9" * 25))
record_like = st.builds(
    _record,
    digits,
    digits,
    digits,
    st.sampled_from(b"veulx"),
    st.sampled_from(b"sjpx"),
    st.sampled_from([0, 1, 2]),
    st.binary(max_size=8),
    st.none() | st.integers(0, 0xFFFF),
    st.one_of(st.binary(max_size=100), safe_text, error_meta),
)
notice_like = st.builds(
    lambda kind, token, tail: kind + b":" + token + tail,
    st.sampled_from([b"N", b"A", b"X"]),
    digits,
    st.one_of(st.just(b""), st.binary(max_size=40).map(lambda b: b":" + b)),
)
anything = st.one_of(st.binary(max_size=200), record_like, notice_like)


# --------------------------------------------------------------------------- the fuzz tests


@fuzz
@given(data=anything, reader=st.sampled_from(sorted(READERS)))
def test_fuzz_open_random_and_structured_input(data: bytes, reader: str) -> None:
    check_open(READERS[reader], data)


@fuzz
@given(
    reader=st.sampled_from(sorted(READERS)),
    which=st.integers(0, 7),
    mutations=st.lists(mutation, min_size=1, max_size=4),
)
def test_fuzz_open_mutated_genuine_records(
    reader: str, which: int, mutations: list[tuple[str, int, Any]]
) -> None:
    codec = READERS[reader]
    base = GENUINE[reader][which]
    mutated = mutate(base, mutations)
    assume(mutated != base)
    if codec.secret is not None:
        # Signed: every real change is refused before anything is deserialized.
        with pytest.raises(EnvelopeError) as info:
            codec.open(mutated, channel=CHANNEL)
        assert not getattr(info.value, "unexpected", False)
    else:
        check_open(codec, mutated)


@fuzz
@given(data=st.one_of(safe_text, error_meta, st.binary(max_size=200)))
def test_fuzz_safe_loads(data: bytes) -> None:
    must_not_escape(lambda: SAFE.loads(data))
    must_not_escape(lambda: JSON.loads(data))


@fuzz
@given(body=st.one_of(error_meta, safe_text), reader=st.sampled_from(["safe", "json"]))
def test_fuzz_error_metadata(body: bytes, reader: str) -> None:
    """Well-framed unsigned error records (what a key writer could store) with odd metadata."""
    check_open(READERS[reader], b"%d:0:1000:DD\x02es\x00\x00\x00" % TOKEN + body)


@fuzz
@given(data=anything)
def test_fuzz_record_readers(data: bytes) -> None:
    """The format's own readers answer None (or EnvelopeError) on anything, never raise else."""
    record.read_header(data)
    record.read_notice(data)
    record.parse_lock(data.decode("utf-8", "replace"))
    must_not_escape(lambda: record.header_of(data))


# --------------------------------------------------------------------------- bounds


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 200_000,
        b'{"\\u0000t":' * 50_000,
        b"[" + b"[]," * 300_000 + b"[]]",
        b'{"\\u0000i":"' + b"f" * 1_000_000 + b'"}',
        b'{"\\u0000N":"' + b"9" * 1_000_000 + b'"}',
        b'{"\\u0000N":"1e999999999999999999"}',
        b'{"\\u0000R":[999999999,0,0]}',
        b"1" * 1_000_000,
    ],
    ids=[
        "deep",
        "deep-tags",
        "many-lists",
        "huge-hex",
        "long-decimal",
        "big-exponent",
        "big-days",
        "long-int",
    ],
)
def test_hostile_safe_input_stays_within_bounded_memory(data: bytes) -> None:
    tracemalloc.start()
    try:
        must_not_escape(lambda: SAFE.loads(data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * len(data) + 1_000_000, f"{peak} bytes for {len(data)} bytes of input"


_COLLIDING = [k * (2**61 - 1) for k in range(100_000)]  # every one hashes to 0


@pytest.mark.timeout(20)
@pytest.mark.parametrize("tag", ["\0s", "\0f", "\0d"])
def test_keys_crafted_to_share_one_hash_are_refused(tag: str) -> None:
    # Inserting these into a set would take ~5e9 steps; decoding must refuse them instead.
    payload = [x for k in _COLLIDING for x in (k, 0)] if tag == "\0d" else _COLLIDING
    data = json.dumps({tag: payload}).encode()
    with pytest.raises(EnvelopeError, match="share one hash"):
        SAFE.loads(data)
    assert SAFE.loads(SAFE.dumps(set(range(100_000)))) == set(range(100_000))


def test_round_trip_examples_survive_the_fuzz_harness() -> None:
    """The harness itself: genuine records do open (so a rejecting decoder would fail)."""
    for name, codec in READERS.items():
        for data in GENUINE[name]:
            assert isinstance(codec.open(data, channel=CHANNEL), (Opened, Notice))
    assert SAFE.loads(SAFE.dumps([decimal.Decimal(1), uuid.UUID(int=1)])) == [1, uuid.UUID(int=1)]
