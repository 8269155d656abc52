"""dedupe.core.record: the Lua the scripts run and the Python the package runs read records alike.

The same generated and mutated inputs go to both readers of a record's header (Lua 5.1
through lupa, as Redis runs it, and ``record.read_header``), which must give the same
verdict: both refuse it, or both read the same three numbers. The rule that says whether a
record is current and how fresh or stale it is is held to the same answer in both
(``record_state`` in Lua against ``record.record_state``), and so are the real ACQUIRE and
FORGET scripts, run by the simulator's Redis, against what Python predicts.

Seeded. By default each reader property runs 60 hypothesis examples of 5 to 40 inputs
each, beside a plain random sweep of 30,000 inputs (about 35,000 headers and 30,500
freshness cases compared, 300 script runs; a few seconds). ``DEDUPE_RECORD_EXAMPLES=N`` runs
N hypothesis examples per property and a sweep of 100 * N, with a random seed unless
``DEDUPE_RECORD_SEED`` is set too.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import pytest
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st
from lupa import lua51

from dedupe.core import record
from dedupe.core.record import MAX_NUMBER, parse_lock, read_header, record_state
from dedupe.core.scripts import ACQUIRE, FORGET
from dedupe.core.sealing import Codec, Outcome
from dedupe.errors import EnvelopeError
from tests.sim.redis import SimRedis

_LONG = os.environ.get("DEDUPE_RECORD_EXAMPLES")
_SEED = os.environ.get("DEDUPE_RECORD_SEED", "" if _LONG else "20261201")
# Hypothesis examples per property; the reader properties take a batch of inputs each.
HEADERS = int(_LONG) if _LONG else 60
FRESHNESS = int(_LONG) if _LONG else 60
SCRIPTS = int(_LONG) if _LONG else 300
BATCH = 40
SWEEP = 100 * int(_LONG) if _LONG else 30_000  # plain random inputs, besides hypothesis's

F = TypeVar("F", bound=Callable[..., Any])

pytestmark = pytest.mark.timeout(900 if _LONG else 60)  # a long run takes minutes


def examples(n: int) -> Callable[[F], F]:
    def wrap(fn: F) -> F:
        fn = settings(
            max_examples=n,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )(fn)
        return seed(int(_SEED))(fn) if _SEED else fn

    return wrap


# --------------------------------------------------------------------------- the Lua side

_STUB = b"""
redis = {}
function redis.call(...) return _stub(...) end
function redis.pcall(...) return _stub(...) end
"""


class LuaRecord:
    """record.LUA_* loaded into Lua 5.1, with a redis.call that answers from ``state``."""

    def __init__(self) -> None:
        self.lua = lua51.LuaRuntime(encoding=None, register_eval=False, register_builtins=False)
        self.state: dict[str, Any] = {"pttl": -2, "counter": None, "time": (0, 0)}
        self.calls: list[bytes] = []
        self.lua.globals()._stub = self._stub
        self.lua.execute(_STUB)
        self.fns = self.lua.execute(
            (
                record.LUA_HEADER
                + record.LUA_RECORD
                + record.LUA_LOCK
                + "return {header = record_header, state = record_state, "
                "lock_value = lock_value, lock_token = lock_token}"
            ).encode()
        )

    def _stub(self, cmd: bytes, *args: Any) -> Any:
        self.calls.append(cmd)
        if cmd == b"PTTL":
            return self.state["pttl"]
        if cmd == b"GET":
            counter = self.state["counter"]
            return False if counter is None else counter  # a nil bulk reaches Lua as false
        if cmd == b"TIME":
            sec, usec = self.state["time"]
            return self.lua.table_from([b"%d" % sec, b"%d" % usec])
        raise AssertionError(f"unexpected command {cmd!r}")

    def header(self, data: bytes) -> tuple[int, int, int] | None:
        got = self.fns.header(data)
        if got is None:
            return None
        tok, keep, ttl, at = got
        assert isinstance(tok, bytes) and tok.isdigit()
        h = read_header(data)
        assert h is None or at == h[3] + 1  # where the envelope starts (Lua counts from 1)
        return int(tok), keep, ttl

    def times(self, token: int, keep: int, ttl: int) -> tuple[int, int, int] | None:
        """record_state's three numbers (fresh, age, run), or None (not current)."""
        got = self.fns.state(b"result", b"counter", b"%d" % token, keep, ttl)
        if got is None:
            return None
        assert all(type(n) in (int, float) for n in got), got
        return tuple(int(n) for n in got)  # type: ignore[return-value]


LUA = LuaRecord()


def python_header(data: bytes) -> tuple[int, int, int] | None:
    h = read_header(data)
    return None if h is None else h[:3]


# --------------------------------------------------------------------------- inputs

numbers = st.one_of(
    st.integers(0, 999),
    st.integers(0, MAX_NUMBER),
    st.integers(1_700_000_000_000_000, 1_900_000_000_000_000),  # tokens: microseconds now
    st.sampled_from([0, 1, 9, 10, MAX_NUMBER - 1, MAX_NUMBER]),
)
number_text = st.one_of(
    numbers.map(str),
    numbers.map(str),
    st.integers(MAX_NUMBER + 1, 10**30).map(str),  # too large, 16 to 31 digits
    st.sampled_from(
        [
            "9007199254740992",  # 2**53: the first number a double no longer tells apart
            "9007199254740993",
            "9999999999999999",
            "10000000000000000",
            "18446744073709551616",
            "1" * 21,  # a 21-digit token: accepted by the old Lua pattern, refused by Python
            "9" * 25,
        ]
    ),
    st.tuples(st.integers(1, 4), numbers).map(lambda z: "0" * z[0] + str(z[1])),  # leading 0
    st.text(alphabet="0123456789", min_size=1, max_size=40),  # digit runs, zeros first too
    st.sampled_from(
        [
            "",
            "+1",
            "-1",
            "-0",
            " 1",
            "1 ",
            "0x1f",
            "1e5",
            "1.0",
            "inf",
            "nan",
            "\u0661",
            "\u00b2",
            "\uff11",
            "1\u0661",
        ]
    ),
)
separator = st.sampled_from([":"] * 12 + ["", ";", "::", ": ", "\uff1a", "\0"])
header_like = st.builds(
    lambda a, s1, b, s2, c, s3, tail: (a + s1 + b + s2 + c + s3).encode("utf-8") + tail,
    number_text,
    separator,
    number_text,
    separator,
    number_text,
    separator,
    st.one_of(st.just(b""), st.just(b"DD\x02vs\x00\x00\x00null"), st.binary(max_size=12)),
)

_CODECS = {"plain": Codec(), "signed": Codec(secret=b"record-test")}


def _sealed(codec: str, token: int, keep: int, ttl: int, value: Any) -> bytes:
    return _CODECS[codec].seal(
        Outcome(value=value), channel="dedupe:{r}", token=token, keep_ms=keep, ttl_ms=ttl
    )


genuine = st.builds(
    _sealed,
    st.sampled_from(sorted(_CODECS)),
    numbers,
    numbers,
    numbers,
    st.one_of(st.none(), st.integers(), st.text(max_size=8), st.binary(max_size=8)),
)
mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 60), st.integers(1, 255)),
    st.tuples(st.just("digit"), st.integers(0, 60), st.sampled_from(b"0123456789:+- ")),
    st.tuples(st.just("insert"), st.integers(0, 60), st.sampled_from([b"0", b"9", b":", b"99999"])),
    st.tuples(st.just("delete"), st.integers(0, 60), st.integers(1, 4)),
    st.tuples(st.just("truncate"), st.integers(0, 60), st.just(0)),
)


def mutate(data: bytes, ops: list[tuple[str, int, Any]]) -> bytes:
    buf = bytearray(data)
    for op, where, arg in ops:
        if not buf:
            break
        i = where % len(buf)
        if op == "flip":
            buf[i] ^= arg
        elif op == "digit":
            buf[i] = arg
        elif op == "insert":
            buf[i:i] = arg
        elif op == "delete":
            del buf[i : i + arg]
        else:
            del buf[i:]
    return bytes(buf)


mutated = st.builds(mutate, genuine, st.lists(mutation, min_size=1, max_size=3))
anything = st.one_of(header_like, header_like, genuine, mutated, mutated, st.binary(max_size=40))

# --------------------------------------------------------------------------- the grammar


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"0:0:0:", (0, 0, 0)),
        (b"1:2:3:DD", (1, 2, 3)),
        (b"%d:1:1:" % MAX_NUMBER, (MAX_NUMBER, 1, 1)),
        (b"1:%d:%d:" % (MAX_NUMBER, MAX_NUMBER), (1, MAX_NUMBER, MAX_NUMBER)),
        (b"%d:1:1:" % (MAX_NUMBER + 1), None),  # beyond what a Lua number holds exactly
        (b"1:1:%d:" % 10**16, None),  # 17 digits
        (b"1" * 21 + b":1:1:", None),  # the old readers disagreed on this one
        (b"01:1:1:", None),  # leading zeros: a number has one spelling
        (b"1:00:1:", None),
        (b"+1:1:1:", None),
        (b"-1:1:1:", None),
        (b" 1:1:1:", None),
        (b"1:1:1", None),  # the last colon is part of the header
        (b"1::1:", None),
        ("\u0661:1:1:".encode(), None),  # non-ASCII digits
        ("\uff11:1:1:".encode(), None),
        (b"", None),
    ],
    ids=repr,
)
def test_the_grammar_at_its_edges(data: bytes, expected: tuple[int, int, int] | None) -> None:
    assert python_header(data) == expected
    assert LUA.header(data) == expected


@examples(HEADERS)
@given(batch=st.lists(anything, min_size=BATCH // 2, max_size=BATCH))
@example(batch=[b"1" * 21 + b":1:1:DD", b"007:1:1:DD"])
def test_lua_and_python_read_the_same_headers(batch: list[bytes]) -> None:
    for data in batch:
        assert LUA.header(data) == python_header(data), data


def _random_field(rng: random.Random) -> bytes:
    pick = rng.random()
    if pick < 0.5:
        return b"%d" % rng.choice([rng.randrange(1000), rng.randrange(MAX_NUMBER + 1)])
    if pick < 0.7:
        return b"".join(rng.choice(_DIGIT_BYTES) for _ in range(rng.randrange(1, 26)))
    if pick < 0.8:
        return b"0" * rng.randrange(1, 3) + b"%d" % rng.randrange(10**6)
    if pick < 0.9:
        return b"%d" % rng.randrange(MAX_NUMBER - 3, 10**17)
    return rng.choice(_ODD_FIELDS)


_DIGIT_BYTES = [bytes([c]) for c in b"0123456789"]
_ODD_FIELDS = [b"", b"+1", b"-1", b" 1", b"1e3", b"0x1", "\u0661".encode(), "\u00b2".encode()]
_SEPARATORS = [b":"] * 14 + [b"", b";", b"::", b"\0"]


def test_lua_and_python_read_the_same_headers_swept() -> None:
    """Plain seeded random inputs, many more than hypothesis makes in the same time."""
    rng = random.Random(int(_SEED) if _SEED else None)
    for _ in range(SWEEP):
        data = b"".join(_random_field(rng) + rng.choice(_SEPARATORS) for _ in range(3))
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data) + 1)]
        data += rng.choice([b"", b"DD\x02v", bytes([rng.randrange(256)])])
        assert LUA.header(data) == python_header(data), data
    for _ in range(SWEEP // 10):  # dedupe's own records, mutated
        data = mutate(rng.choice(_SEALED), [_random_mutation(rng) for _ in range(2)])
        assert LUA.header(data) == python_header(data), data


_SEALED = [
    _sealed(c, t, k, 12_000, "v")
    for c in _CODECS
    for t in (0, 7, 1_790_000_000_000_001)
    for k in (0, 1500)
]


def _random_mutation(rng: random.Random) -> tuple[str, int, Any]:
    op = rng.choice(["flip", "digit", "insert", "delete", "truncate"])
    arg = {
        "flip": rng.randrange(1, 256),
        "digit": rng.choice(b"0123456789:+- "),
        "insert": rng.choice([b"0", b"9", b":", b"99999"]),
        "delete": rng.randrange(1, 5),
    }.get(op, 0)
    return op, rng.randrange(60), arg


def test_what_dedupe_seals_both_read() -> None:
    for codec in sorted(_CODECS):
        data = _sealed(codec, 1_790_000_000_000_123, 1500, 12000, {"a": 1})
        assert LUA.header(data) == python_header(data) == (1_790_000_000_000_123, 1500, 12000)
    with pytest.raises(ValueError, match="2\\*\\*53"):
        _sealed("plain", MAX_NUMBER + 1, 0, 0, None)


# --------------------------------------------------------------------------- freshness


@st.composite
def fresh_cases(draw: st.DrawFn) -> tuple[int, int, int, int, bytes | None, int, int]:
    token = draw(numbers)
    keep = draw(st.one_of(st.integers(0, 100_000), numbers))
    ttl = draw(st.one_of(st.integers(0, 100_000), st.just(keep), numbers))
    pttl = draw(
        st.one_of(
            st.just(-1),
            st.integers(max(0, ttl - keep - 5), ttl + 5),
            st.integers(0, 100_000),
            st.integers(0, MAX_NUMBER),
        )
    )
    grant_ms = token // 1000
    now_ms = draw(
        st.one_of(
            st.integers(max(0, grant_ms - 5), grant_ms + min(keep, 10**13) + 5),
            st.integers(0, 4_000_000_000_000),
        )
    )
    usec = (now_ms % 1000) * 1000 + draw(st.integers(0, 999))
    spelt = b"%d" % token
    counter = draw(
        st.one_of(
            st.just(spelt),
            st.just(spelt),
            st.none(),
            st.just(b"%d" % (token + 1)),
            st.just(b"0" + spelt),
            st.just(b"%d:%b" % (token + 1, spelt)),  # a refresh of it runs: still current
            st.just(b"%b:%d" % (spelt, token + 1)),
            st.just(b"%d:0%b" % (token + 1, spelt)),
            st.just(spelt + b":"),
            st.binary(max_size=20),
        )
    )
    return token, keep, ttl, pttl, counter, now_ms // 1000, usec


@examples(FRESHNESS)
@given(batch=st.lists(fresh_cases(), min_size=5, max_size=BATCH // 2))
def test_lua_and_python_judge_freshness_alike(
    batch: list[tuple[int, int, int, int, bytes | None, int, int]],
) -> None:
    for token, keep, ttl, pttl, counter, sec, usec in batch:
        LUA.state.update(pttl=pttl, counter=counter, time=(sec, usec))
        lua = LUA.times(token, keep, ttl)
        python = record_state(token, keep, ttl, pttl, counter, sec * 1000 + usec // 1000)
        assert lua == python, (token, keep, ttl, pttl, counter, sec, usec)


def test_lua_and_python_judge_freshness_alike_swept() -> None:
    rng = random.Random(int(_SEED) if _SEED else None)
    for _ in range(SWEEP):
        token = rng.choice([rng.randrange(MAX_NUMBER + 1), rng.randrange(10**15, 2 * 10**15)])
        keep = rng.choice([0, rng.randrange(100_000), rng.randrange(MAX_NUMBER + 1)])
        ttl = rng.choice([keep, rng.randrange(100_000), rng.randrange(MAX_NUMBER + 1)])
        pttl = rng.choice([-1, max(0, ttl - rng.randrange(keep + 10)), rng.randrange(100_000)])
        now_ms = token // 1000 + rng.randrange(-5, min(keep, 10**12) + 5)
        if now_ms < 0 or rng.random() < 0.1:
            now_ms = rng.randrange(4 * 10**12)
        sec, usec = now_ms // 1000, (now_ms % 1000) * 1000 + rng.randrange(1000)
        counter = rng.choice(
            [b"%d" % token, b"%d" % token, None, b"%d" % (token + 1), b"x",
             b"%d:%d" % (token + 1, token), b"%d:%d" % (token, token - 1)]
        )  # fmt: skip
        LUA.state.update(pttl=pttl, counter=counter, time=(sec, usec))
        lua = LUA.times(token, keep, ttl)
        assert lua == record_state(token, keep, ttl, pttl, counter, now_ms), (
            token, keep, ttl, pttl, counter
        )  # fmt: skip


def test_freshness_reads_the_counter_and_the_clock_only_when_it_must() -> None:
    LUA.calls.clear()
    LUA.state.update(pttl=500, counter=b"1", time=(1, 0))
    assert LUA.times(1, 0, 1000) is None  # keeps nothing: no call at all
    assert LUA.calls == []
    assert LUA.times(1, 1000, 100) is None  # a longer life than sealed
    assert LUA.calls == [b"PTTL"]
    LUA.calls.clear()
    assert LUA.times(2, 1000, 1000) is None  # the counter names another lease
    assert LUA.calls == [b"PTTL", b"GET"]
    LUA.calls.clear()
    LUA.state.update(counter=b"3:2")  # lease 3 refreshes record 2: still current
    assert LUA.times(2, 1000, 1000) is not None
    assert LUA.calls == [b"PTTL", b"GET", b"TIME"]


# --------------------------------------------------------------------------- the real scripts


class Case(NamedTuple):
    """What a job's keys hold, what the acquiring caller asks, and the server's clock."""

    data: bytes  # the result key
    pttl: int  # its PTTL (-1: no expiry)
    counter: bytes | None
    lock_pttl: int | None  # the lock's PTTL (None: no lock; -1: no expiry)
    backoff: bool  # the error mark is there
    floor: int | None
    swr: int  # the caller's stale_while_revalidate, ms
    sie: int  # its stale_if_error, ms
    early: int  # its XFetch draw, thousandths
    flags: int  # 1: may refresh in the background; 2: after an error
    now_us: int


@st.composite
def stored_cases(draw: st.DrawFn) -> Case:
    """Often a plausible record (a recent lease, a short keep, a counter naming it, windows
    around its staleness), else anything above."""
    now_us = draw(st.integers(1_700_000_000_000_000, 1_900_000_000_000_000))
    shape = draw(st.sampled_from(["kept", "kept", "kept", "plausible", "anything"]))
    if shape == "kept":  # as a leader keeps a value: fresh, stale, or past every window
        run, result_ttl = draw(st.integers(0, 500)), draw(st.integers(1, 3000))
        keep, ttl = result_ttl + run, result_ttl + draw(st.integers(0, 5000))
        age = draw(st.integers(0, ttl - 1))  # a key with PTTL 0 is gone
        token = now_us - (age + run) * 1000 - draw(st.integers(0, 999))
        data = record.header(token, keep, ttl) + b"DD\x02v"
        pttl = ttl - age
    elif shape == "plausible":
        token = now_us - draw(st.integers(0, 5_000_000))
        keep, ttl = draw(st.integers(0, 5000)), draw(st.integers(0, 5000))
        data = record.header(token, keep, ttl) + draw(st.binary(max_size=4))
        if draw(st.booleans()):
            data = mutate(data, draw(st.lists(mutation, min_size=1, max_size=2)))
        pttl = draw(st.one_of(st.just(-1), st.integers(max(1, ttl - keep - 5), ttl + 5)))
    else:
        data = draw(anything)
        pttl = draw(st.one_of(st.just(-1), st.integers(1, 6000)))
    h = read_header(data)
    own = None if h is None else b"%d" % h[0]
    based = None if h is None else b"%d:%d" % (h[0] + 7, h[0])
    current = st.one_of(st.just(own), st.just(based))
    others = st.one_of(st.none(), st.binary(max_size=18))
    counter = draw(st.one_of(current, current, current, others) if shape == "kept" else
                   st.one_of(current, others))  # fmt: skip
    floor = draw(st.one_of(st.none(), st.none(), st.none(), numbers, st.just(h[0] if h else 0)))
    window = st.one_of(st.just(0), st.integers(0, 6000), st.integers(0, 6000))
    return Case(
        data,
        pttl,
        counter,
        draw(st.one_of(st.none(), st.none(), st.just(-1), st.integers(1, 10_000))),
        draw(st.booleans()),
        floor,
        draw(window),
        draw(window),
        draw(st.one_of(st.just(0), st.integers(0, 5000))),
        draw(st.integers(0, 3)),
        now_us,
    )


def predict_acquire(c: Case) -> tuple[str, list[Any]]:
    """What ACQUIRE replies, by the rules its comment states: ("lead", [base]) for a grant
    (then the reply is a token, or an array holding it), else ("reply", the reply)."""
    now_ms = c.now_us // 1000
    h = read_header(c.data)
    state = stale = None
    if h is not None:
        state = record_state(*h[:3], c.pttl, c.counter, now_ms)
        ours = c.floor is not None and h[0] >= c.floor
        if state is not None and state.fresh_ms > 0 and (c.floor is None or ours):
            fire = c.early > 0 and c.flags & 1 and state.run_ms * c.early / 1000 >= state.fresh_ms
            if fire and c.lock_pttl is None and not c.backoff:
                return "refresh", [3, c.data, state.fresh_ms, state.age_ms, h[0]]
            return "reply", [0, c.data, state.fresh_ms, state.age_ms]
        if ours:
            return "reply", [0, c.data, 0, state.age_ms if state else 0]
        if state is not None and (-state.fresh_ms < c.swr or -state.fresh_ms < c.sie):
            stale = state
    lock = None if c.lock_pttl is None else (10_000 if c.lock_pttl == -1 else c.lock_pttl)
    if stale is not None:
        assert h is not None
        served = [c.data, stale.fresh_ms, stale.age_ms]
        if c.flags & 2 or c.backoff:
            return "reply", [4, *served, b"e"]
        if -stale.fresh_ms < c.swr:
            if lock is not None or not c.flags & 1:
                return "reply", [4, *served, b"r"]
            return "refresh", [3, *served, h[0]]
        if lock is None:
            return "fallback", [2, *served, h[0]]
        return "reply", [1, lock, b"holder", *served]
    if lock is not None:
        return "reply", [1, lock, b"holder"]
    return "lead", []


def check_acquire_and_forget(c: Case) -> str:
    """Run ACQUIRE and FORGET on the case's keys; assert they do what Python predicts.
    Returns the kind of reply (for coverage counts)."""
    redis = SimRedis(lambda: c.now_us, lambda channel, message: 0)
    lock, token, result, error = b"p:{j}:lock", b"p:{j}:token", b"p:{j}:result", b"p:{j}:error"

    def store() -> None:
        redis.data.clear()
        redis.data[result] = (c.data, None if c.pttl < 0 else redis.now_ms() + c.pttl)
        if c.counter is not None:
            redis.data[token] = (c.counter, None)
        if c.lock_pttl is not None:
            expiry = None if c.lock_pttl < 0 else redis.now_ms() + c.lock_pttl
            redis.data[lock] = (b"holder", expiry)
        if c.backoff:
            redis.data[error] = (b"1", redis.now_ms() + 30_000)

    kind, want = predict_acquire(c)
    store()
    args = [b"owner", b"10000", b"60000", b"" if c.floor is None else b"%d" % c.floor]
    if c.swr or c.sie or c.early or c.flags:
        args += [b"%d" % c.swr, b"%d" % c.sie, b"%d" % c.early, b"%d" % c.flags]
    got = redis.evalsha(redis.load(ACQUIRE), [lock, token, result, error], args)
    if kind == "reply":
        assert got == want, (got, c)
    else:
        granted = got if kind == "lead" else got[4] if kind == "refresh" else got[1]
        assert isinstance(granted, int) and granted >= c.now_us, (got, c)
        if kind == "refresh":
            assert got[:4] == want[:4], (got, c)
        if kind == "fallback":
            assert [got[0], *got[2:]] == [2, *want[1:4]], (got, c)
        # The lease is ours; the counter names it, and the record it refreshes, if any.
        assert redis.get(lock) == b"%d:owner" % granted
        base = b"" if kind == "lead" else b":%d" % want[-1]
        assert redis.get(token) == b"%d" % granted + base
    store()
    h = read_header(c.data)
    # Current (fresh, or stale but servable within a caller's window): forget drops a kept value.
    current = (
        h is not None and record_state(*h[:3], c.pttl, c.counter, c.now_us // 1000) is not None
    )
    got = redis.evalsha(redis.load(FORGET), [result, token, lock, error], [b"60000"])
    assert got == [int(current), 0], c  # the lock "holder" is no lock value dedupe wrote
    assert redis.get(result) is None and redis.get(error) is None and redis.get(lock) is None
    if c.counter is not None:  # moved past every lease: no run that started before stores
        moved = redis.get(token)
        assert moved is not None and moved.isdigit() and int(moved) >= c.now_us, (moved, c)
        lease, _ = record.counter_parts(c.counter)
        assert lease is None or int(lease) >= 9 * 10**15 or int(moved) > int(lease), (moved, c)
    return kind if kind != "reply" else f"reply {want[0]}"


@examples(SCRIPTS)
@given(case=stored_cases())
def test_acquire_and_forget_judge_records_as_python_does(case: Case) -> None:
    check_acquire_and_forget(case)


def test_acquire_serves_and_refreshes_as_python_predicts_swept() -> None:
    """Kept values at every point of their life, with windows, locks, backoffs and flags
    around them; each of ACQUIRE's replies must come up, or the sweep proves nothing."""
    rng = random.Random(int(_SEED) if _SEED else None)
    seen: dict[str, int] = {}
    for _ in range(SWEEP // 10):
        now_us = rng.randrange(1_700_000_000_000_000, 1_900_000_000_000_000)
        run, result_ttl = rng.randrange(500), rng.randrange(1, 3000)
        keep, ttl = result_ttl + run, result_ttl + rng.randrange(5000)
        age = rng.randrange(ttl)
        tok = now_us - (age + run) * 1000 - rng.randrange(1000)
        counter = rng.choice([b"%d" % tok, b"%d:%d" % (tok + 9, tok), b"%d" % (tok + 9), None])
        case = Case(
            record.header(tok, keep, ttl) + b"DD\x02v",
            ttl - age,
            counter,
            rng.choice([None, None, rng.randrange(1, 10_000)]),
            rng.random() < 0.2,
            rng.choice([None, None, None, tok, tok + 9]),
            rng.choice([0, rng.randrange(6000)]),
            rng.choice([0, rng.randrange(6000)]),
            rng.choice([0, 0, rng.randrange(1, 20_000)]),
            rng.randrange(4),
            now_us,
        )
        state = record_state(tok, keep, ttl, ttl - age, counter, now_us // 1000)
        if state is not None and rng.random() < 0.3:  # a window that ends right there
            edge = max(0, -state.fresh_ms + rng.choice([-1, 0, 1]))
            case = case._replace(**{rng.choice(["swr", "sie"]): edge})
        kind = check_acquire_and_forget(case)
        seen[kind] = seen.get(kind, 0) + 1
    wanted = ["lead", "refresh", "fallback", "reply 0", "reply 1", "reply 4"]
    assert all(seen.get(k, 0) >= 10 for k in wanted), seen


# --------------------------------------------------------------------------- lock values, notices


@examples(500)
@given(token=numbers, owner=st.text(max_size=30))
def test_lock_values_are_built_and_read_alike(token: int, owner: str) -> None:
    value = record.lock_value(token, owner)
    assert LUA.fns.lock_value(b"%d" % token, owner.encode()) == value.encode()
    assert LUA.fns.lock_token(value.encode()) == b"%d" % token
    assert parse_lock(value) == (token, owner)


@pytest.mark.parametrize(
    "value", ["", "1", "x:o", ":o", "01:o", "-1:o", "\u00b2:o", f"{MAX_NUMBER + 1}:o"]
)
def test_lock_values_dedupe_did_not_write_are_refused(value: str) -> None:
    assert parse_lock(value) is None


def test_notices() -> None:
    assert record.notice(record.NOTICE_STORED, 5) == b"N:5"
    assert record.read_notice(b"A:12") == (b"A", 12, 4, None)
    mac = bytes(range(32))
    assert record.read_notice(b"N:7:" + mac) == (b"N", 7, 3, mac)
    for bad in (b"N:07", b"N:", b"X:1", b"N:1:short", b"N:%d" % (MAX_NUMBER + 1), b"n:1"):
        assert record.read_notice(bad) is None
    with pytest.raises(ValueError):
        record.notice(b"X", 1)
    with pytest.raises(ValueError):
        record.notice(record.NOTICE_ABORTED, MAX_NUMBER + 1)


def test_header_of_reads_the_kind() -> None:
    data = _sealed("plain", 9, 5, 7, "v")
    assert record.header_of(data) == (9, 5, 7, record.KIND_VALUE)
    assert record.header_of(b"9:5:7:") == (9, 5, 7, 0)
    with pytest.raises(EnvelopeError):
        record.header_of(b"09:5:7:DD")
