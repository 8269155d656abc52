"""memory://'s store against the Lua: the same command sequences, the same replies and keys.

``dedupe.backend.memory.MemoryStore`` runs a Python twin of each script of
``dedupe.core.scripts``; ``tests.sim.redis.SimRedis`` runs the real Lua (Lua 5.1 through
lupa). Hypothesis draws sequences of script calls on one job's keys (acquires with and
without cache-fill arguments and floors, renews, completes that store, abort, fall back on a
stale value or find their lease gone, discards, peeks, forgets, notifies), foreign writes of
records and counters, and clock steps; both stores share one clock. After every step the
replies (or both raising), the live keys with their expiries, and the messages published
must be equal; the random sequences must reach the common replies, and a scripted flight
walks every reply of ACQUIRE and COMPLETE. Seeded (80 examples, a few seconds);
``DEDUPE_MEMORY_EXAMPLES=N`` runs N examples with a random seed.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from dedupe.backend.commands import (
    ACQUIRE,
    COMPLETE,
    DISCARD,
    FORGET,
    NOTIFY,
    PEEK,
    READ,
    RENEW,
    Script,
)
from dedupe.backend.memory import MemoryHub, MemoryStore, ScriptFailed
from dedupe.core import record
from dedupe.core.signals import Mailbox
from tests.sim.redis import ScriptError, SimRedis

_LONG = os.environ.get("DEDUPE_MEMORY_EXAMPLES")
EXAMPLES = int(_LONG) if _LONG else 80

pytestmark = pytest.mark.timeout(900 if _LONG else 60)

LOCK, TOKEN, RESULT, ERROR = b"p:{j}:lock", b"p:{j}:token", b"p:{j}:result", b"p:{j}:error"
CHANNEL = b"p:{j}"
T0 = 1_800_000_000_000_000  # microseconds: the clock both stores read


def _record(token: int, keep: int, ttl: int, kind: bytes) -> bytes:
    return record.header(token, keep, ttl) + b"DD\x02" + kind + b"s\x00\x00\x00body"


class Pair:
    """The Lua and the Python store, one clock, what each published."""

    def __init__(self) -> None:
        self.now = T0
        self.lua_sent: list[tuple[bytes, bytes]] = []
        self.lua = SimRedis(lambda: self.now, self._lua_publish)
        self.py = MemoryStore("diff", clock_us=lambda: self.now)
        self.box: Mailbox[Any] = Mailbox()
        MemoryHub(self.py).subscribe(CHANNEL.decode(), self.box)
        self.tokens: list[int] = [1]  # tokens seen, to build lock values and records from

    def _lua_publish(self, channel: bytes, message: bytes) -> int:
        self.lua_sent.append((channel, message))
        return 1

    def run(self, script: Script, keys: list[bytes], args: list[Any]) -> Any:
        try:
            want: Any = self.lua.evalsha(self.lua.load(script.lua), keys, [_b(a) for a in args])
        except ScriptError:
            want = "error"
        try:
            got: Any = self.py.run(script.sha, keys, args)
        except ScriptFailed:
            got = "error"
        assert got == want, (script.lua.strip()[:60], keys, args)
        SEEN.add(_shape(script, got))
        for reply in want if isinstance(want, list) else [want]:
            if isinstance(reply, int) and reply > 1000:
                self.tokens.append(reply)
        self.check()
        return got

    def write(self, key: bytes, value: bytes, px: int | None) -> None:
        """Someone else's SET (px None: no expiry)."""
        self.lua.write(key, value, px)
        self.py.data[key] = (value, None if px is None else self.now // 1000 + px)
        self.check()

    def current(self, key: bytes) -> bytes | None:
        entry = self.py.data.get(key)
        return None if entry is None or (entry[1] or 2**62) <= self.now // 1000 else entry[0]

    def check(self) -> None:
        now_ms = self.now // 1000
        lua = {k: v for k, v in self.lua.data.items() if v[1] is None or v[1] > now_ms}
        py = {k: v for k, v in self.py.data.items() if v[1] is None or v[1] > now_ms}
        assert py == lua
        sent = []
        while (message := self.box.get(0)) is not None:
            sent.append((CHANNEL, message))
        assert sent == self.lua_sent
        self.lua_sent.clear()


SEEN: set[str] = set()  # the reply shapes met, across every example of a run


def _shape(script: Script, reply: Any) -> str:
    """A reply's kind: which branch of the script answered."""
    name = {ACQUIRE.sha: "acquire", COMPLETE.sha: "complete", FORGET.sha: "forget"}
    what = name.get(script.sha, "other")
    if what == "acquire" and isinstance(reply, list):
        return f"acquire {reply[0]}" + (f" {reply[4]!r}" if reply[0] == 4 else "")
    if what == "acquire":
        return f"acquire {'lead' if isinstance(reply, int) else reply}"
    if what == "forget" and isinstance(reply, list):
        return f"forget {reply[0]}"
    return f"{what} {reply}" if what == "complete" else what


# Every branch of ACQUIRE's and COMPLETE's replies, and forget finding a fresh value: a
# generator that stops reaching one would compare less than it claims.
SHAPES = {
    "acquire lead", "acquire 0", "acquire 1", "acquire 2", "acquire 3", "acquire 4 b'e'",
    "acquire 4 b'r'", "complete -1", "complete 0", "complete 1", "complete 2", "forget 1",
}  # fmt: skip


def _b(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


ms = st.one_of(st.integers(1, 5_000), st.sampled_from([1, 60_000]))
small = st.one_of(st.integers(0, 3_000), st.just(0))
owners = st.sampled_from([b"o1", b"o2"])


@st.composite
def steps(draw: st.DrawFn, pair: Pair) -> None:
    kind = draw(st.sampled_from(
        ["acquire", "acquire", "acquire", "complete", "complete", "renew", "discard", "peek",
         "read", "forget", "notify", "write", "clock", "clock", "flight", "flight", "flight",
         "stale", "stale"]
    ))  # fmt: skip
    held = pair.current(LOCK)
    token = draw(st.sampled_from(pair.tokens[-4:]))
    lock_value = b"%d:" % token + draw(owners)
    if held is not None and draw(st.integers(0, 3)):
        lock_value = held  # mostly the lease that is held: completes and renews that count
        token = int(held.split(b":")[0]) if held.split(b":")[0].isdigit() else token
    if draw(st.integers(0, 20)) == 0:
        lock_value = draw(st.sampled_from([b"junk", b"", b"12:"]))
    kept = pair.current(RESULT)
    kept_token = kept.split(b":")[0] if kept else b"%d" % token
    if kind == "flight":  # a lease granted and completed with a value of its own token
        args: list[Any] = [b"o1", draw(ms), draw(ms), ""]
        if draw(st.booleans()):
            args += [draw(small), draw(small), draw(st.sampled_from([0, 500, 5_000])), 1]
        reply = pair.run(ACQUIRE, [LOCK, TOKEN, RESULT, ERROR], args)
        held = pair.current(LOCK)
        if held is not None and held.endswith(b":o1") and reply != "error":
            granted = int(held.split(b":")[0])
            keep = draw(small)
            rec = _record(granted, keep, keep + draw(ms), draw(st.sampled_from([b"v", b"e"])))
            tail = []
            if len(args) > 4:
                tail = [draw(st.sampled_from([b"", kept_token])), args[5], draw(small),
                        b"S:%d" % granted]  # fmt: skip
            pair.now += 1_000 * draw(st.integers(0, 50))
            pair.run(COMPLETE, [LOCK, RESULT, TOKEN, ERROR],
                     [held, rec, rec.split(b":")[2], b"", *tail])  # fmt: skip
    elif kind == "stale":  # a cache-fill acquire just past the kept value's freshness
        head = record.read_header(kept) if kept else None
        if head is not None:
            pair.now = max(pair.now, head[0] + 1_000 * (head[1] + draw(st.integers(0, 2_000))))
        args = [b"o2", draw(ms), draw(ms), "", draw(st.integers(0, 3_000)),
                draw(st.integers(0, 3_000)), 0, draw(st.sampled_from([0, 1, 1, 2, 3]))]  # fmt: skip
        reply = pair.run(ACQUIRE, [LOCK, TOKEN, RESULT, ERROR], args)
        held = pair.current(LOCK)
        led = isinstance(reply, list) and reply[0] in (2, 3)
        if led and held is not None and held.endswith(b":o2"):  # the refresh ends: it fails
            granted = int(held.split(b":")[0])  # (stale_if_error) or stores a new value
            rec = draw(st.sampled_from([b"", _record(granted, 1_000, 5_000, b"v")]))
            tail = [kept_token, draw(st.sampled_from([0, args[5]])), draw(small), b"S:1"]
            pair.now += 1_000 * draw(st.integers(0, 50))
            pair.run(COMPLETE, [LOCK, RESULT, TOKEN, ERROR], [held, rec, 5_000, b"", *tail])
    elif kind == "acquire":
        args = [draw(owners), draw(ms), draw(ms)]
        args.append(
            draw(
                st.sampled_from(
                    ["", "", token, token + 1, int(kept_token) if kept_token.isdigit() else token]
                )
            )
        )
        if draw(st.booleans()):
            early = draw(st.sampled_from([0, 0, 500, 5_000]))
            args += [draw(small), draw(small), early, draw(st.integers(0, 3))]
        pair.run(ACQUIRE, [LOCK, TOKEN, RESULT, ERROR], args)
    elif kind == "complete":
        keep = draw(small)
        rec = draw(st.sampled_from([b"", _record(token, keep, keep + draw(ms), b"v")]))
        args = [lock_value, rec, draw(ms), draw(st.sampled_from([b"", b"N:%d" % token]))]
        if draw(st.booleans()):
            fallback = draw(st.sampled_from([b"", kept_token, kept_token, b"%d" % token]))
            args += [fallback, draw(small), draw(small),
                     b"S:%d" % token]  # fmt: skip
        pair.run(COMPLETE, [LOCK, RESULT, TOKEN, ERROR], args)
    elif kind == "renew":
        pair.run(RENEW, [LOCK], [lock_value, draw(ms)])
    elif kind == "discard":
        rec = pair.py.data.get(RESULT, (b"x", None))[0]
        pair.run(DISCARD, [RESULT], [draw(st.sampled_from([rec, b"other"]))])
    elif kind == "peek":
        pair.run(PEEK, [LOCK], [])
    elif kind == "read":
        pair.run(READ, [RESULT, TOKEN], [])
    elif kind == "forget":
        pair.run(FORGET, [RESULT, TOKEN, LOCK, ERROR], [draw(ms)])
    elif kind == "notify":
        pair.run(NOTIFY, [LOCK], [b"A:%d" % token])
    elif kind == "write":  # someone else's SET: a record, a counter, a lock, an error mark
        key = draw(st.sampled_from([RESULT, TOKEN, LOCK, ERROR]))
        keep = draw(small)
        value = {
            RESULT: _record(token, keep, keep + draw(small),
                            draw(st.sampled_from([b"v", b"e"]))),
            TOKEN: draw(st.sampled_from([b"%d" % token, b"%d:%d" % (token + 1, token), b"x"])),
            LOCK: lock_value or b"x",
            ERROR: b"%d" % token,
        }[key]  # fmt: skip
        pair.write(key, value, None if draw(st.integers(0, 8)) == 0 else draw(ms))
    else:
        pair.now += draw(st.sampled_from([0, 1, 999, 1_000, 250_000, 1_500_000, 6_000_000]))
        pair.now += 1_000 * draw(small)


@settings(
    max_examples=EXAMPLES,
    phases=[Phase.explicit, Phase.generate],  # unshrunk: a failing sequence is reported as drawn
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.data())
def _sequences(data: st.DataObject) -> None:
    pair = Pair()
    for _ in range(data.draw(st.integers(5, 60))):
        data.draw(steps(pair))


# What random sequences must reach (the rarer branches are walked by the scripted test).
COMMON = {"acquire lead", "acquire 0", "acquire 1", "complete -1", "complete 0", "complete 1"}


def test_the_python_scripts_answer_and_write_as_the_lua_does() -> None:
    SEEN.clear()
    (_sequences if _LONG else seed(20261206)(_sequences))()
    assert COMMON <= SEEN, f"never reached: {sorted(COMMON - SEEN)}"


def test_every_reply_branch_on_a_scripted_flight() -> None:
    """A refresh, a failed refresh standing in the stale value, a backoff, a lost lease: each
    reply of ACQUIRE and COMPLETE, Lua and Python compared at every step."""
    pair = Pair()
    keys_a, keys_c = [LOCK, TOKEN, RESULT, ERROR], [LOCK, RESULT, TOKEN, ERROR]

    def acquire(owner: bytes, *cache: int) -> Any:
        return pair.run(ACQUIRE, keys_a, [owner, 1_000, 60_000, "", *cache])

    def complete(lock: bytes, rec: bytes, *tail: Any) -> Any:
        return pair.run(COMPLETE, keys_c, [lock, rec, 11_000, b"", *tail])

    def value(token: int) -> bytes:
        return _record(token, 1_000, 11_000, b"v")

    SEEN.clear()
    t1 = acquire(b"o1")
    assert complete(b"%d:o1" % t1, value(t1)) == 1
    assert acquire(b"o2")[0] == 0  # fresh
    assert pair.run(FORGET, [RESULT, TOKEN, LOCK, ERROR], [60_000]) == [1, 0]
    t2 = acquire(b"o1")
    assert acquire(b"o2")[0] == 1  # busy
    assert complete(b"%d:o1" % t2, value(t2)) == 1
    pair.now += 1_500_000  # stale by 500 ms
    refresh = acquire(b"o2", 2_000, 0, 0, 1)
    assert refresh[0] == 3  # served stale, and o2 refreshes in the background
    assert acquire(b"o1", 2_000, 0, 0, 1)[:1] + acquire(b"o1", 2_000, 0, 0, 1)[4:] == [4, b"r"]
    # The refresh fails: the stale value stands in, and the job backs off for 2 s.
    assert complete(b"%d:o2" % refresh[4], b"", b"%d" % t2, 5_000, 2_000, b"S:1") == 2
    assert acquire(b"o1", 0, 5_000, 0, 0)[4:] == [b"e"]
    pair.now += 2_500_000  # the backoff is over; past stale_while_revalidate
    t4 = acquire(b"o1", 0, 10_000, 0, 0)
    assert t4[0] == 2  # o1 leads, with the stale value to fall back on
    pair.run(FORGET, [RESULT, TOKEN, LOCK, ERROR], [60_000])
    assert complete(b"%d:o1" % t4[1], value(t4[1])) == -1  # voided: nothing stored
    t5 = acquire(b"o1")
    pair.write(LOCK, b"1:someone", 1_000)  # the lease lost, no newer one granted
    assert complete(b"%d:o1" % t5, value(t5)) == 0
    assert SHAPES <= SEEN, f"never reached: {sorted(SHAPES - SEEN)}"


def test_a_token_grows_past_a_counter_ahead_of_the_clock() -> None:
    """The acquire's ``last >= t`` branch and forget's: a counter ahead of the clock."""
    pair = Pair()
    pair.write(TOKEN, b"%d" % (T0 + 10_000_000), 60_000)
    pair.run(ACQUIRE, [LOCK, TOKEN, RESULT, ERROR], [b"o1", 1000, 60_000, ""])
    assert pair.py.data[LOCK][0] == b"%d:o1" % (T0 + 10_000_001)
    pair.run(FORGET, [RESULT, TOKEN, LOCK, ERROR], [60_000])
    assert pair.py.data[TOKEN][0] == b"%d" % (T0 + 10_000_002)
