"""The bytes dedupe keeps in Redis and sends on channels: records, notices, lock values.

This module alone states these formats; the sealing code, the protocol, the backend, the
inspector and the Lua scripts (through the Lua text below) read and write them through it.

Record (what a result key holds, and what a leader publishes inline)::

    <token>:<keep_ms>:<ttl_ms>:          the header, three numbers; the Lua scripts read it
                                         (and nothing after it) by the same grammar as Python
    "DD"                                 magic
    version (1 byte, 2)
    kind (1 byte)                        v value, e error, u unserializable, l too large
    serializer ident (1 byte)            s safe, j json, p pickle, or a custom one
    flags (1 byte)                       bit 0: signed
    trace length (2 bytes, big endian)
    trace (that many bytes)              the leader's W3C traceparent; opaque to dedupe
    MAC (32 bytes, only when signed)     HMAC-SHA256 over all the rest (see dedupe.core.sealing)
    body                                 the value, or the error's metadata (safe encoding)

``token`` is the fencing token of the lease whose outcome it is (the server's clock in
microseconds at the grant, or one past the last token); ``keep_ms`` how long after that grant
new callers may be served it (result_ttl plus the run; 0 for anything but a value);
``ttl_ms`` its whole life in Redis (keep_ms, or the grace for followers that missed the
message).

Notices (on the channel only): ``N:<token>`` (the outcome is stored: read the result key),
``A:<token>`` (the leader aborted, or ``forget`` voided its lease) and ``S:<token>`` (the run
failed and a stale value stands in for it: ``stale_if_error``), followed by ``:`` and a
32-byte MAC when signed.

Lock value (the lock key): ``<token>:<owner>``, the owner id up to the end (it holds no
``:``; see ``dedupe.ops.inspector.format_owner``).

**Numbers** (each header field, a notice's and a lock value's token) are ASCII decimal
digits, with no sign and no leading zero (``0`` is the one number that starts with one), at
most MAX_NUMBER = 2**53 - 1 (16 digits). Every number either side accepts is then the same
integer in Lua (whose numbers are doubles) and in Python, so both do the same arithmetic on
it; and a number has one spelling, so comparing text (the scripts compare a record's token
with the counter's bytes) is comparing numbers. Tokens are microseconds since 1970 (2**53 of
them last until the year 2255); the acquire script keeps the counter below 9e15. A value that
breaks the grammar is not a record: the scripts take the key as empty, Python refuses it.

**Freshness.** New callers are served a kept record while both clocks agree it is younger
than ``keep_ms`` (the key's own: ``ttl_ms - PTTL`` since it was written; and the server's:
since the grant, which the token is), and only while the record is *current*: the token
counter names its lease, as the newest lease or as the base of the newest (below). After
``keep_ms`` a current record is *stale* by the time since; the callers' stale windows
(``stale_while_revalidate``, ``stale_if_error``) decide, in the scripts, whether it is still
served. :func:`record_state` is that rule in Python; ``LUA_RECORD`` is it in Lua, and
tests/test_record.py holds the two to the same answer.

Token counter (``P:{J}:token``): ``<lease>`` (the newest lease's token) or
``<lease>:<base>``: that lease was granted while the value record of lease ``<base>`` was
current (a refresh), so that record stays current, and may be served stale, until a newer
record is stored (which writes the bare ``<lease>``) or ``forget`` moves the counter on.

Error mark (``P:{J}:error``): the token of a run that failed while a stale value was served
in its place (``stale_if_error``); while it lives (``error_backoff``), no run starts for the
job and callers get the stale value.
"""

from __future__ import annotations

import math
import re
from typing import Final, NamedTuple

from dedupe.errors import EnvelopeError

__all__ = [
    "KIND_ERROR",
    "KIND_NAMES",
    "KIND_TOO_LARGE",
    "KIND_UNSERIALIZABLE",
    "KIND_VALUE",
    "LUA_HEADER",
    "LUA_LOCK",
    "LUA_RECORD",
    "MAX_NUMBER",
    "NOTICE_ABORTED",
    "NOTICE_KINDS",
    "NOTICE_STALE",
    "NOTICE_STORED",
    "Lock",
    "NoticeParts",
    "RecordHeader",
    "RecordState",
    "counter_parts",
    "counter_value",
    "fresh_ms",
    "header",
    "header_of",
    "lock_value",
    "notice",
    "parse_lock",
    "parse_number",
    "read_header",
    "read_notice",
    "record_state",
]

# --- numbers ---------------------------------------------------------------------------------

MAX_NUMBER: Final = 2**53 - 1  # the largest integer a double (a Lua number) holds exactly
MAX_DIGITS: Final = len(str(MAX_NUMBER))
_DIGITS: Final = f"(0|[1-9][0-9]{{0,{MAX_DIGITS - 1}}})"  # and <= MAX_NUMBER, checked apart
_NUMBER_TEXT: Final = re.compile(_DIGITS)


def parse_number(text: str) -> int | None:
    """The number ``text`` spells, or None if it is not one (a token counter's value, say)."""
    if _NUMBER_TEXT.fullmatch(text) is None:
        return None
    number = int(text)
    return number if number <= MAX_NUMBER else None


def check_number(name: str, value: int) -> int:
    """``value`` if it is a number the formats can carry; ValueError naming ``name`` if not."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, not {value!r}")
    if value > MAX_NUMBER:
        raise ValueError(f"{name} must be at most {MAX_NUMBER} (2**53 - 1), not {value}")
    return value


# --- the envelope after the header -----------------------------------------------------------

MAGIC: Final = b"DD"
VERSION: Final = 2
HEAD_LEN: Final = 8  # magic(2) version(1) kind(1) serializer(1) flags(1) trace length(2)
KIND_AT: Final = 3  # the kind's offset after the header
SIGNED: Final = 0x01
MAC_LEN: Final = 32
MAX_TRACE: Final = 0xFFFF

KIND_VALUE: Final = ord("v")
KIND_ERROR: Final = ord("e")
KIND_UNSERIALIZABLE: Final = ord("u")
KIND_TOO_LARGE: Final = ord("l")
KIND_NAMES: Final = {
    KIND_VALUE: "value",
    KIND_ERROR: "error",
    KIND_UNSERIALIZABLE: "unserializable",
    KIND_TOO_LARGE: "too_large",
}

# --- the header ------------------------------------------------------------------------------

_HEADER: Final = re.compile(((_DIGITS + ":") * 3).encode("ascii"))


class RecordHeader(NamedTuple):
    token: int
    keep_ms: int
    ttl_ms: int
    kind: int  # 0 if the record is too short to have one


def header(token: int, keep_ms: int, ttl_ms: int) -> bytes:
    """The header of a record (the numbers unchecked: see :func:`check_number`)."""
    return b"%d:%d:%d:" % (token, keep_ms, ttl_ms)


def read_header(data: bytes) -> tuple[int, int, int, int] | None:
    """``(token, keep_ms, ttl_ms, end)`` of the header ``data`` starts with (the envelope
    starts at ``end``), or None if it does not start with one.

    A plain tuple: every follower opens a record with this, and a NamedTuple's constructor
    runs Python code."""
    m = _HEADER.match(data)
    if m is None:
        return None
    token, keep, ttl = int(m[1]), int(m[2]), int(m[3])
    if token > MAX_NUMBER or keep > MAX_NUMBER or ttl > MAX_NUMBER:
        return None
    return token, keep, ttl, m.end()


def header_of(record: bytes) -> RecordHeader:
    """The plain header and kind of a record (not verified): for the leader's own record."""
    h = read_header(record)
    if h is None:
        raise EnvelopeError("not a dedupe record")
    token, keep, ttl, end = h
    at = end + KIND_AT
    return RecordHeader(token, keep, ttl, record[at] if len(record) > at else 0)


_COUNTER: Final = re.compile(rb"([0-9]+)(?::([0-9]+))?")


def counter_parts(counter: bytes | None) -> tuple[bytes | None, bytes | None]:
    """The lease and base tokens (as text) of a token counter's value; None where absent."""
    m = None if counter is None else _COUNTER.fullmatch(counter)
    return (None, None) if m is None else (m[1], m[2])


def counter_value(lease: int, base: int | None = None) -> bytes:
    """A token counter's value (the acquire script writes the same)."""
    return b"%d" % lease if base is None else b"%d:%d" % (lease, base)


class RecordState(NamedTuple):
    fresh_ms: int  # how much longer new callers may be served it fresh; <= 0: stale by that
    age_ms: int  # since it was written (the key's clock)
    run_ms: int  # from its lease's grant to its write (the server's clock): XFetch's delta


def record_state(
    token: int, keep_ms: int, ttl_ms: int, pttl_ms: int, counter: bytes | None, now_ms: int
) -> RecordState | None:
    """The times of a value record, or None if it is not current (see the module's doc).

    The scripts' rule (``LUA_RECORD``'s ``record_state``), to the bit: ``pttl_ms`` is the
    result key's PTTL, ``counter`` the token counter's value (None if missing) and
    ``now_ms`` the server's clock. Lua computes in doubles, so this does too (exact for
    every value dedupe writes).
    """
    if keep_ms <= 0 or pttl_ms < 0 or pttl_ms > ttl_ms:
        return None
    lease, base = counter_parts(counter)
    spelt = b"%d" % token
    if spelt != lease and spelt != base:
        return None
    keep, now = float(keep_ms), float(now_ms)
    age = float(ttl_ms) - float(pttl_ms)
    granted = math.floor(float(token) / 1000)
    fresh = min(keep - age, granted + keep - now)
    return RecordState(int(fresh), int(age), int(max(0.0, now - age - granted)))


def fresh_ms(
    token: int, keep_ms: int, ttl_ms: int, pttl_ms: int, counter: bytes | None, now_ms: int
) -> int:
    """How much longer new callers may be served a record fresh, in ms; 0 or less: not."""
    state = record_state(token, keep_ms, ttl_ms, pttl_ms, counter, now_ms)
    return 0 if state is None else state.fresh_ms


# --- notices ---------------------------------------------------------------------------------

NOTICE_STORED: Final = b"N"
NOTICE_ABORTED: Final = b"A"
NOTICE_STALE: Final = b"S"
NOTICE_KINDS: Final = (NOTICE_STORED, NOTICE_ABORTED, NOTICE_STALE)
_NOTICE: Final = re.compile(rb"([NAS]):" + _DIGITS.encode("ascii") + rb"(?::(.{32}))?", re.DOTALL)


class NoticeParts(NamedTuple):
    kind: bytes
    token: int
    text_end: int  # the signed text is data[:text_end]
    mac: bytes | None


def notice(kind: bytes, token: int) -> bytes:
    """A notice's text (what is signed; sealing adds the MAC)."""
    if kind not in NOTICE_KINDS:
        raise ValueError(f"notice kind must be one of {NOTICE_KINDS!r}, not {kind!r}")
    return kind + b":%d" % check_number("token", token)


def read_notice(data: bytes) -> NoticeParts | None:
    """The parts of a notice, or None if ``data`` is not one."""
    m = _NOTICE.fullmatch(data)
    if m is None:
        return None
    token = int(m[2])
    if token > MAX_NUMBER:
        return None
    return NoticeParts(m[1], token, m.end(2), m[3])


# --- lock values -----------------------------------------------------------------------------


class Lock(NamedTuple):
    """A lock value's parts."""

    token: int
    owner: str


def lock_value(token: int, owner: str) -> str:
    """The lock value of a lease (the acquire script writes the same: ``LUA_LOCK``)."""
    return f"{token}:{owner}"


def parse_lock(value: str) -> Lock | None:
    """The token and owner of a lock value, or None if it is not one dedupe wrote."""
    text, sep, owner = value.partition(":")
    token = parse_number(text) if sep else None
    return None if token is None else Lock(token, owner)


# --- the same, in Lua ------------------------------------------------------------------------
#
# Prepended to the scripts that need them (dedupe.core.scripts). Local functions only: Redis
# refuses scripts that create globals.

LUA_HEADER: Final = """
-- A record's header (dedupe.core.record): its token as text, keep_ms and ttl_ms as numbers,
-- and where the envelope starts (the kind is the byte at +3); nil if rec is not a record.
-- Numbers: ASCII digits, no leading zero, at most @MAX@ (tonumber is exact up to there,
-- and rounds any larger number to more than it).
local function record_number(s)
  return #s <= @DIGITS@ and (#s == 1 or string.byte(s) ~= 48) and tonumber(s) <= @MAX@
end
local function record_header(rec)
  if type(rec) ~= 'string' then return nil end
  local tok, keep, ttl, at = string.match(rec, '^(%d+):(%d+):(%d+):()')
  if tok and record_number(tok) and record_number(keep) and record_number(ttl) then
    return tok, tonumber(keep), tonumber(ttl), at
  end
  return nil
end
""".replace("@DIGITS@", str(MAX_DIGITS)).replace("@MAX@", str(MAX_NUMBER))

LUA_RECORD: Final = """
-- A token counter's lease and base tokens as text (dedupe.core.record.counter_parts).
local function counter_parts(v)
  if type(v) ~= 'string' then return nil, nil end
  local lease, base = string.match(v, '^(%d+):(%d+)$')
  if lease then return lease, base end
  return string.match(v, '^(%d+)$'), nil
end
-- The times of the value record at rec_key, whose header record_header read: fresh (ms new
-- callers may still be served it fresh; <= 0: stale by that much), age (ms since it was
-- written) and run (ms from its lease's grant to its write); nil if it is not current
-- (dedupe.core.record.record_state).
local function record_state(rec_key, counter_key, tok, keep, ttl)
  if keep <= 0 then return nil end
  -- A record written back later with a longer life than it was sealed with, or none, is
  -- not ours as it stands.
  local pttl = redis.call('PTTL', rec_key)
  if pttl < 0 or pttl > ttl then return nil end
  -- Current only while the counter names its lease: a record of an older lease, written
  -- back after a newer lease was granted, is never served, fresh or stale.
  local lease, base = counter_parts(redis.pcall('GET', counter_key))
  if lease ~= tok and base ~= tok then return nil end
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local age = ttl - pttl
  local granted = math.floor(tonumber(tok) / 1000)
  -- Both clocks must agree: the key's own (keep_ms since it was written) and the server's
  -- (keep_ms since the lease's grant, which the token is, in microseconds).
  return math.min(keep - age, granted + keep - now_ms), age, math.max(0, now_ms - age - granted)
end
"""

LUA_LOCK: Final = """
-- A lock value '<token>:<owner>' (dedupe.core.record.lock_value), and the token as text of one
-- that dedupe built.
local function lock_value(tok, owner) return tok .. ':' .. owner end
local function lock_token(value) return string.match(value, '^(%d+):') end
"""
