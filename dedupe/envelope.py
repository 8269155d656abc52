"""Outcome records: a safe serializer, exceptions as data, signing, size limits, fallbacks.

Everything dedupe reads back from Redis (a record in a result key, a message on a job's
channel) is decoded here, and nothing here runs code named by those bytes: with no secret
nothing is unpickled and no module is imported. With a secret, the whole record (header,
trace and body) and every notice is signed with HMAC-SHA256, bound to the job's channel.

Record (the result key's value, and what a leader publishes inline)::

    <token>:<keep_ms>:<ttl_ms>:          ASCII, 1-20 digits each; the Lua scripts read this
    "DD"                                 magic
    version (1 byte, 2)
    kind (1 byte)                        v value, e error, u unserializable, l too large
    serializer ident (1 byte)            s safe, j json, p pickle, or a custom one
    flags (1 byte)                       bit 0: signed
    trace length (2 bytes, big endian)
    trace (that many bytes)              opaque to dedupe (OpenTelemetry context later)
    MAC (32 bytes, only when signed)     HMAC-SHA256, see below
    body                                 value, or the error metadata (safe encoding)

MAC input: ``b"dedupe/record/2\\0" + len(channel) (4 bytes, big endian) + channel (UTF-8) +
header + every envelope byte before the MAC + body``: a record verifies only for its own job,
with its own token, keep and ttl. The first key signs; a record verifies if any key matches.

Notices are ``N:<token>`` (outcome stored, read the result key) and ``A:<token>`` (the leader
aborted); when signed, ``:`` and a 32-byte MAC over ``b"dedupe/notice/2\\0" + len(channel) +
channel + b"N:<token>"`` follow.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import hashlib
import hmac
import json
import logging
import os
import pickle
import re
import socket
import sys
import threading
import time
import traceback
import types
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, Protocol, TypeAlias, runtime_checkable

import cloudpickle
from tblib import Traceback

from .errors import EnvelopeError, RemoteError, ResultNotSerializable, ResultTooLarge

__all__ = [
    "JSON",
    "NOTICE_ABORTED",
    "NOTICE_STORED",
    "PICKLE",
    "PICKLE_UNSAFE",
    "SAFE",
    "SECRET_ENV",
    "SECRET_SEPARATOR",
    "Codec",
    "Notice",
    "Opened",
    "Outcome",
    "SecretSpec",
    "Serializer",
    "TamperedEnvelope",
    "codec_for",
    "header_of",
    "resolve_serializer",
    "secret_keys",
    "validate_security",
]

log = logging.getLogger(__name__)

MAGIC: Final = b"DD"
VERSION: Final = 2
_MAC_LEN: Final = 32
_HEAD_LEN: Final = 8  # magic(2) version(1) kind(1) serializer(1) flags(1) trace length(2)
_SIGNED: Final = 0x01
_MAX_TRACE: Final = 0xFFFF
_MAX_DIGITS: Final = 20  # per header field: far above any real token or TTL, far below int limits

KIND_VALUE: Final = ord("v")
KIND_ERROR: Final = ord("e")
KIND_UNSERIALIZABLE: Final = ord("u")
KIND_TOO_LARGE: Final = ord("l")
_KINDS: Final = {KIND_VALUE, KIND_ERROR, KIND_UNSERIALIZABLE, KIND_TOO_LARGE}

NOTICE_STORED: Final = b"N"
NOTICE_ABORTED: Final = b"A"

_RECORD_DOMAIN: Final = b"dedupe/record/2\0"
_NOTICE_DOMAIN: Final = b"dedupe/notice/2\0"
_LEGACY_DOMAIN: Final = b"dedupe/envelope/2\0"

_HEADER_RE: Final = re.compile(rb"(\d{1,20}):(\d{1,20}):(\d{1,20}):")
_NOTICE_RE: Final = re.compile(rb"([NA]):(\d{1,20})(?::(.{32}))?", re.DOTALL)

SECRET_ENV: Final = "DEDUPE_SECRET"
SECRET_SEPARATOR: Final = ","  # DEDUPE_SECRET="new,old": the first signs, all verify

_MAX_FRAMES: Final = 100  # leader traceback frames carried (the innermost ones)
_MAX_TEXT: Final = 64_000  # characters of formatted traceback carried
_MAX_NOTE: Final = 2_000  # characters of a fallback message shown from a record


class TamperedEnvelope(EnvelopeError):
    """A record or notice failed its signature check; it is ignored, never deserialized."""


@dataclass(slots=True)
class Outcome:
    """What a flight produced: a value, or an exception to raise in every caller."""

    value: Any = None
    error: BaseException | None = None
    # How much longer new callers may be given this value (result_ttl); not part of its identity.
    fresh_ms: int = field(default=0, compare=False)

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class Opened(NamedTuple):
    """A record that parsed (and, with a secret, verified). The token is the record's own:
    the protocol must still refuse one older than the lease it waits on."""

    token: int
    keep_ms: int
    ttl_ms: int
    outcome: Outcome
    trace: bytes


class Notice(NamedTuple):
    """A channel notice: NOTICE_STORED (read the result key) or NOTICE_ABORTED."""

    kind: bytes
    token: int


class RecordHeader(NamedTuple):
    token: int
    keep_ms: int
    ttl_ms: int
    kind: int


@runtime_checkable
class Serializer(Protocol):
    """Turns values into bytes and back. ``ident`` is one ASCII byte naming the format.

    ``loads`` is given bytes read from Redis: unless a secret is set (then only records
    signed by a fleet member reach it), anyone who can write to that Redis chose them.
    """

    ident: bytes

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


# --- the safe serializer --------------------------------------------------------------------
#
# JSON, where a JSON object with exactly one key that starts with NUL is a tagged value:
#   {"\0t": [...]} tuple       {"\0s": [...]} set          {"\0f": [...]} frozenset
#   {"\0d": [k, v, k, v...]}   dict with keys other than str (order kept)
#   {"\0b": base64} bytes      {"\0a": base64} bytearray   {"\0i": hex} int past JSON's digits
#   {"\0c": [re, im]} complex  {"\0N": str} Decimal        {"\0U": hex} UUID
#   {"\0T": [y, mo, d, h, mi, s, us, fold, utcoffset_us | null]} datetime
#   {"\0D": [y, mo, d]} date   {"\0H": [h, mi, s, us, fold, utcoffset_us | null]} time
#   {"\0R": [days, seconds, microseconds]} timedelta
# Lists, str-keyed dicts, str, int, float (NaN and infinities included), bool and None are
# plain JSON. A body starting with NUL is a top-level bytes value, raw. Only exact types are
# encoded (a subclass would come back as its base class, so it is refused instead), and
# decoding builds only these types: it calls nothing the data names.

_TAG: Final = "\0"
MAX_DEPTH: Final = 100
_INT_BITS: Final = 10_000  # beyond this an int is sent as hex: CPython limits decimal digits
_RAW_BYTES: Final = b"\0"


def _offset_us(tz: dt.tzinfo | None, value: Any) -> int | None:
    if tz is None:
        return None
    offset = value.utcoffset()
    return None if offset is None else offset // dt.timedelta(microseconds=1)


def _enc(v: Any, depth: int) -> Any:
    t = type(v)
    if t is str or t is float or t is bool or v is None:
        return v
    if t is int:
        return v if v.bit_length() <= _INT_BITS else {"\0i": format(v, "x")}
    if depth >= MAX_DEPTH:
        raise TypeError(f"value nested deeper than {MAX_DEPTH} levels")
    d = depth + 1
    if t is list:
        return [_enc(x, d) for x in v]
    if t is dict:
        if all(type(k) is str for k in v) and not (len(v) == 1 and next(iter(v))[:1] == _TAG):
            return {k: _enc(x, d) for k, x in v.items()}
        flat: list[Any] = []
        for k, x in v.items():
            flat.append(_enc(k, d))
            flat.append(_enc(x, d))
        return {"\0d": flat}
    if t is tuple:
        return {"\0t": [_enc(x, d) for x in v]}
    if t is set:
        return {"\0s": [_enc(x, d) for x in v]}
    if t is frozenset:
        return {"\0f": [_enc(x, d) for x in v]}
    if t is bytes:
        return {"\0b": base64.b64encode(v).decode("ascii")}
    if t is bytearray:
        return {"\0a": base64.b64encode(v).decode("ascii")}
    if t is dt.datetime:
        tz = _offset_us(v.tzinfo, v)
        return {
            "\0T": [v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond, v.fold, tz]
        }
    if t is dt.date:
        return {"\0D": [v.year, v.month, v.day]}
    if t is dt.time:
        tz = _offset_us(v.tzinfo, v)
        return {"\0H": [v.hour, v.minute, v.second, v.microsecond, v.fold, tz]}
    if t is dt.timedelta:
        return {"\0R": [v.days, v.seconds, v.microseconds]}
    if t is decimal.Decimal:
        return {"\0N": str(v)}
    if t is uuid.UUID:
        return {"\0U": v.hex}
    if t is complex:
        return {"\0c": [v.real, v.imag]}
    raise TypeError(f"the 'safe' serializer does not encode values of type {_qualname(t)}")


def _list(p: Any) -> list[Any]:
    if type(p) is not list:
        raise ValueError("tagged value needs a list")
    return p


def _str(p: Any) -> str:
    if type(p) is not str:
        raise ValueError("tagged value needs a string")
    return p


def _ints(p: Any, n: int, *, last_optional: bool = False) -> list[Any]:
    items = _list(p)
    if len(items) != n:
        raise ValueError(f"tagged value needs {n} fields")
    for i, x in enumerate(items):
        if type(x) is int or (x is None and last_optional and i == n - 1):
            continue
        raise ValueError("tagged value needs integer fields")
    return items


def _tz(offset_us: int | None) -> dt.timezone | None:
    return None if offset_us is None else dt.timezone(dt.timedelta(microseconds=offset_us))


_MAX_SAME_HASH: Final = 64


def _hashed(keys: list[Any]) -> list[Any]:
    """Refuse keys crafted to share one hash (ints, floats and tuples hash predictably):
    inserting n of them into a set or dict takes n**2 steps."""
    if len(keys) > _MAX_SAME_HASH:
        counts = Counter(map(hash, keys))
        if max(counts.values()) > _MAX_SAME_HASH:
            raise ValueError(f"more than {_MAX_SAME_HASH} keys share one hash")
    return keys


def _dec_dict(p: Any) -> dict[Any, Any]:
    items = _list(p)
    if len(items) % 2:
        raise ValueError("a dict needs key, value pairs")
    return dict(zip(_hashed(items[0::2]), items[1::2], strict=True))


def _dec_datetime(p: Any) -> dt.datetime:
    y, mo, d, h, mi, s, us, fold, tz = _ints(p, 9, last_optional=True)
    return dt.datetime(y, mo, d, h, mi, s, us, tzinfo=_tz(tz), fold=fold)


def _dec_time(p: Any) -> dt.time:
    h, mi, s, us, fold, tz = _ints(p, 6, last_optional=True)
    return dt.time(h, mi, s, us, tzinfo=_tz(tz), fold=fold)


def _dec_complex(p: Any) -> complex:
    items = _list(p)
    if len(items) != 2 or not all(type(x) in (float, int) for x in items):
        raise ValueError("a complex needs two numbers")
    return complex(items[0], items[1])


_DECODERS: Final[dict[str, Callable[[Any], Any]]] = {
    "\0t": lambda p: tuple(_list(p)),
    "\0s": lambda p: set(_hashed(_list(p))),
    "\0f": lambda p: frozenset(_hashed(_list(p))),
    "\0d": _dec_dict,
    "\0b": lambda p: base64.b64decode(_str(p), validate=True),
    "\0a": lambda p: bytearray(base64.b64decode(_str(p), validate=True)),
    "\0i": lambda p: int(_str(p), 16),
    "\0c": _dec_complex,
    "\0N": lambda p: decimal.Decimal(_str(p)),
    "\0U": lambda p: uuid.UUID(hex=_str(p)),
    "\0T": _dec_datetime,
    "\0D": lambda p: dt.date(*_ints(p, 3)),
    "\0H": _dec_time,
    "\0R": lambda p: dt.timedelta(*_ints(p, 3)),
}


def _hook(obj: dict[str, Any]) -> Any:
    # json calls this bottom-up, so a tag's payload is already decoded.
    if len(obj) != 1:
        return obj
    ((key, payload),) = obj.items()
    if key[:1] != _TAG:
        return obj
    decoder = _DECODERS.get(key)
    if decoder is None:
        raise ValueError(f"unknown tag {key!r}")
    return decoder(payload)


# Built once: json.dumps/loads with any option build a new encoder or decoder per call.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=True)
_DECODER: Final = json.JSONDecoder(object_hook=_hook)
# A value whose tagging pass took longer than this is encoded in pieces: the C encoder holds
# the GIL for a whole value, and a lease's renewal thread cannot run meanwhile (a 0.2 s
# encode let a waiter take over a 0.12 s lease). The pure-Python encoder (several times
# slower) lets other threads run between pieces. Below it, an encode takes a few ms at most.
_LARGE_SECONDS: Final = 0.005


class _Safe:
    """The default: JSON plus type tags; every supported type comes back as itself."""

    ident = b"s"
    name = "safe"

    def dumps(self, value: Any) -> bytes:
        if type(value) is bytes:
            return _RAW_BYTES + value
        started = time.perf_counter()
        tree = _enc(value, 0)  # Python: other threads run between its steps
        if time.perf_counter() - started < _LARGE_SECONDS:
            return _ENCODER.encode(tree).encode("ascii")
        return _in_pieces(tree)

    def loads(self, data: bytes) -> Any:
        if data[:1] == _RAW_BYTES:
            return bytes(data[1:])
        try:
            return _DECODER.decode(bytes(data).decode("utf-8"))
        except Exception as exc:  # ValueError, TypeError, RecursionError, OverflowError, ...
            raise EnvelopeError(f"malformed 'safe' value: {_short(exc)}") from exc


def _in_pieces(tree: Any) -> bytes:
    """A large value's JSON, made so that other threads run meanwhile (see _LARGE_SECONDS):
    the pure-Python encoder's chunks, joined a few thousand at a time (one join of millions
    of chunks would itself hold the GIL for a lease's length)."""
    pieces: list[bytes] = []
    chunks: list[str] = []
    for chunk in _ENCODER.iterencode(tree):
        chunks.append(chunk)
        if len(chunks) >= 4096:
            pieces.append("".join(chunks).encode("ascii"))
            chunks.clear()
    pieces.append("".join(chunks).encode("ascii"))
    return b"".join(pieces)


class _Json:
    """Plain JSON: tuples arrive as lists and dict keys as strings (lossy; for interop)."""

    ident = b"j"
    name = "json"

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), allow_nan=True).encode()

    def loads(self, data: bytes) -> Any:
        try:
            return json.loads(data)
        except Exception as exc:
            raise EnvelopeError(f"malformed JSON value: {_short(exc)}") from exc


# Values of these types pickle the same with the stdlib as with cloudpickle, ten times faster.
_PLAIN = frozenset({type(None), bool, int, float, str, bytes, bytearray, complex})


class _Pickle:
    """Any picklable value. Unpickling runs code: only signed records reach ``loads``,
    unless the ``pickle-unsafe`` opt-in was chosen."""

    ident = b"p"

    def __init__(self, name: str) -> None:
        self.name = name

    def dumps(self, value: Any) -> bytes:
        if type(value) in _PLAIN:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return]

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)


SAFE: Final[Serializer] = _Safe()
JSON: Final[Serializer] = _Json()
PICKLE: Final[Serializer] = _Pickle("pickle")
PICKLE_UNSAFE: Final[Serializer] = _Pickle("pickle-unsafe")
_BY_NAME: Final[dict[str, Serializer]] = {
    "safe": SAFE,
    "json": JSON,
    "pickle": PICKLE,
    "pickle-unsafe": PICKLE_UNSAFE,
}
# Formats any codec may read whatever it writes itself: decoding them runs no code.
_HARMLESS: Final[dict[int, Serializer]] = {SAFE.ident[0]: SAFE, JSON.ident[0]: JSON}


def resolve_serializer(spec: str | Serializer) -> Serializer:
    """A serializer from its name ('safe', 'json', 'pickle', 'pickle-unsafe') or an object."""
    if isinstance(spec, str):
        found = _BY_NAME.get(spec)
        if found is None:
            raise ValueError(
                "serializer must be 'safe', 'json', 'pickle', 'pickle-unsafe' or a Serializer "
                f"object, not {spec!r}"
            )
        return found
    if isinstance(spec, Serializer):
        if any(spec is s for s in _BY_NAME.values()):
            return spec
        ident = getattr(spec, "ident", b"")
        if not isinstance(ident, bytes) or len(ident) != 1 or ident in (b"s", b"j", b"p"):
            raise ValueError(
                "a custom serializer needs ident: one byte other than b's', b'j', b'p'"
            )
        return spec
    raise ValueError(
        "serializer must be 'safe', 'json', 'pickle', 'pickle-unsafe' or a Serializer object, "
        f"not {spec!r}"
    )


def serializer_name(serializer: Serializer) -> str:
    name = getattr(serializer, "name", None)
    return name if isinstance(name, str) else _qualname(type(serializer))


# --- secrets ---------------------------------------------------------------------------------

SecretSpec: TypeAlias = str | bytes | Sequence[str | bytes] | None  # what secret= takes


def secret_keys(secret: SecretSpec) -> tuple[bytes, ...]:
    """The HMAC keys of a ``secret=`` setting: the first signs, every one verifies."""
    if secret is None:
        return ()
    items: Sequence[Any] = [secret] if isinstance(secret, (str, bytes)) else secret
    if not isinstance(items, Sequence) or isinstance(items, (bytearray, memoryview)):
        raise TypeError(
            f"secret must be str, bytes or a sequence of them, not {type(secret).__name__}"
        )
    keys: list[bytes] = []
    for item in items:
        if isinstance(item, str):
            item = item.encode("utf-8")
        if not isinstance(item, bytes):
            raise TypeError(f"each secret must be str or bytes, not {type(item).__name__}")
        if not item:
            raise ValueError("a secret must not be empty")
        keys.append(item)
    if not keys:
        raise ValueError("secret must hold at least one key (or be None)")
    return tuple(keys)


def _env_keys(environ: Mapping[str, str]) -> tuple[bytes, ...]:
    raw = environ.get(SECRET_ENV)
    if raw is None:
        near = sorted(k for k in environ if "SECRET" in k.upper() and "DEDUP" in k.upper())
        if near:
            log.warning("%s is not set (found %s): records are not signed", SECRET_ENV, near)
        return ()
    parts = [p.strip() for p in raw.split(SECRET_SEPARATOR)]
    if not any(parts):
        log.warning("%s is set but empty: records are not signed", SECRET_ENV)
        return ()
    if not all(parts):
        raise ValueError(f"{SECRET_ENV} has an empty entry between {SECRET_SEPARATOR!r}s")
    return tuple(p.encode("utf-8") for p in parts)


_PICKLE_NEEDS_SECRET: Final = (
    "serializer='pickle' needs a secret: pass secret=... or set the DEDUPE_SECRET environment "
    "variable, so that only records signed by your own processes are ever unpickled (or choose "
    "serializer='pickle-unsafe' if anyone who can write to this Redis may run code in this "
    "process)"
)


def validate_security(
    serializer: str | Serializer,
    secret: SecretSpec,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Check the serializer/secret settings; ValueError/TypeError naming what is wrong."""
    chosen = resolve_serializer(serializer)
    keys = secret_keys(secret)
    if chosen is PICKLE and not keys and not _env_keys(os.environ if environ is None else environ):
        raise ValueError(_PICKLE_NEEDS_SECRET)


def codec_for(
    serializer: str | Serializer,
    secret: SecretSpec,
    max_payload_bytes: int | None,
    environ: Mapping[str, str] | None = None,
) -> Codec:
    """The codec of a SingleFlight: ``secret=`` if given, else DEDUPE_SECRET."""
    keys = secret_keys(secret) or _env_keys(os.environ if environ is None else environ)
    return Codec(resolve_serializer(serializer), keys or None, max_payload_bytes)


# --- exceptions as data ----------------------------------------------------------------------


def _qualname(tp: type) -> str:
    return tp.__qualname__ if tp.__module__ == "builtins" else f"{tp.__module__}.{tp.__qualname__}"


def _origin() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {_safe_str(exc)}"
    return text if len(text) <= 200 else text[:200] + "..."


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = limit // 4
    return text[:head] + "\n[... dedupe cut this text ...]\n" + text[-(limit - head) :]


def _frames(tb: types.TracebackType | None) -> list[list[Any]]:
    """The traceback as [file, function, line] rows: data, rebuilt with tblib on arrival."""
    rows: deque[list[Any]] = deque(maxlen=_MAX_FRAMES)
    while tb is not None:
        code = tb.tb_frame.f_code
        rows.append([code.co_filename, code.co_name, tb.tb_lineno])
        tb = tb.tb_next
    return list(rows)


def _traceback_of(frames: Any) -> types.TracebackType | None:
    if type(frames) is not list or not frames or len(frames) > _MAX_FRAMES:
        return None
    node: dict[str, Any] | None = None
    for row in reversed(frames):
        if type(row) is not list or len(row) != 3:
            return None
        file, name, line = row
        if type(file) is not str or type(name) is not str or type(line) is not int:
            return None
        if not 0 <= line < 2**31:
            return None
        # Only these plain strings and ints reach tblib: no globals or locals from the data.
        node = {
            "tb_frame": {
                "f_globals": {"__file__": file, "__name__": "dedupe.leader"},
                "f_locals": {},
                "f_code": {"co_filename": file, "co_name": name},
                "f_lineno": line,
            },
            "tb_lineno": line,
            "tb_next": node,
        }
    try:
        return Traceback.from_dict(node).as_traceback()  # type: ignore[no-any-return]
    except Exception:
        return None


def _imported_class(module: Any, qualname: Any) -> type[Exception] | None:
    """The Exception subclass at module.qualname if that module is already imported.

    Plain dictionary lookups only: no import, no module ``__getattr__``, no descriptors.
    """
    if type(module) is not str or type(qualname) is not str:
        return None
    try:
        obj: Any = sys.modules.get(module)
        for part in qualname.split("."):
            if isinstance(obj, types.ModuleType):
                namespace = object.__getattribute__(obj, "__dict__")
            elif isinstance(obj, type):
                namespace = type.__getattribute__(obj, "__dict__")  # past any metaclass hooks
            else:
                return None
            obj = namespace.get(part)
        if isinstance(obj, type) and issubclass(obj, Exception):
            return obj
    except Exception:
        return None
    return None


def _rebuilt(cls: type[Exception], args: tuple[Any, ...], message: str) -> Exception | None:
    """``cls(*args)`` if that rebuilds it faithfully (same type, args and message)."""
    try:
        exc = cls(*args)
        if type(exc) is cls and exc.args == args and _safe_str(exc) == message:
            return exc
    except Exception:
        pass
    return None


def _stand_in(cls: type[Exception], text: str) -> Exception | None:
    try:
        exc = cls(text)
        return exc if type(exc) is cls else None
    except Exception:
        return None


def _pickled_exception(exc: BaseException) -> bytes | None:
    """The exception pickled, if it unpickles as its own class (checked here, on the leader)."""
    try:
        data: bytes = cloudpickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        back = pickle.loads(data)
    except Exception:
        return None
    return data if type(back) is type(exc) else None


def _error_meta(exc: BaseException, *, with_pickle: bool) -> dict[str, Any]:
    tp = type(exc)
    try:
        args: Any = tuple(exc.args)
        _enc(args, 0)
    except Exception:
        args = None
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception:
        text = f"{_qualname(tp)}: {_safe_str(exc)}"
    meta: dict[str, Any] = {
        "type": _qualname(tp),
        "module": tp.__module__,
        "name": tp.__qualname__,
        "message": _safe_str(exc),
        "args": args,
        "mro": [
            [c.__module__, c.__qualname__]
            for c in tp.__mro__[1:17]
            if issubclass(c, Exception) and c is not Exception
        ],
        "traceback": _clip(text, _MAX_TEXT),
        "frames": _frames(exc.__traceback__),
        "origin": _origin(),
    }
    if with_pickle and isinstance(exc, Exception):
        meta["pickle"] = _pickled_exception(exc)
    return meta


def _error_body(exc: BaseException, *, with_pickle: bool) -> bytes:
    try:
        return SAFE.dumps(_error_meta(exc, with_pickle=with_pickle))
    except Exception:  # an exception type with odd names or text: send what is certain
        meta = {"type": _qualname(type(exc)), "message": _safe_str(exc), "origin": _origin()}
        return SAFE.dumps({k: str(v) for k, v in meta.items()})


def _error_from_meta(meta: Any, *, allow_pickle: bool) -> BaseException:
    if type(meta) is not dict:
        raise EnvelopeError("malformed error record: not a mapping")
    type_name = meta.get("type")
    message = meta.get("message", "")
    remote_tb = meta.get("traceback", "")
    origin = meta.get("origin", "?")
    if not (
        type(type_name) is str
        and type(message) is str
        and type(remote_tb) is str
        and type(origin) is str
    ):
        raise EnvelopeError("malformed error record: type, message and traceback must be text")
    error: Exception | None = None
    pickled = meta.get("pickle")
    if allow_pickle and type(pickled) is bytes:
        try:
            candidate = pickle.loads(pickled)
        except Exception:
            candidate = None
        # Leaders never ship aborts (KeyboardInterrupt, SystemExit, CancelledError): refuse them.
        if isinstance(candidate, Exception):
            error = candidate
    if error is None:
        cls = _imported_class(meta.get("module"), meta.get("name"))
        args = meta.get("args")
        if cls is not None and type(args) is tuple:
            error = _rebuilt(cls, args, message)
    if error is None:
        mro = meta.get("mro")
        for row in mro[:16] if type(mro) is list else ():
            if type(row) is not list or len(row) != 2:
                continue
            base = _imported_class(row[0], row[1])
            if base is not None and base is not Exception:
                error = _stand_in(base, f"{type_name}: {message}")
                if error is not None:
                    break
    if error is None:
        error = RemoteError(type_name, message, remote_tb)
    tb = _traceback_of(meta.get("frames"))
    if tb is not None:
        error = error.with_traceback(tb)
    if hasattr(error, "add_note"):
        error.add_note(f"(raised by the dedupe leader at {origin[:200]})")
    return error


# --- the codec -------------------------------------------------------------------------------


def _digits(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, not {value!r}")
    if value >= 10**_MAX_DIGITS:
        raise ValueError(f"{name} must have at most {_MAX_DIGITS} digits")
    return value


def _bound(channel: str) -> bytes:
    raw = channel.encode("utf-8", "surrogatepass")
    return len(raw).to_bytes(4, "big") + raw


def header_of(record: bytes) -> RecordHeader:
    """The plain header of a record (not verified): for the leader's own sealed record."""
    m = _HEADER_RE.match(record)
    if m is None:
        raise EnvelopeError("not a dedupe record")
    end = m.end()
    kind = record[end + 3] if len(record) > end + 3 else 0
    return RecordHeader(int(m[1]), int(m[2]), int(m[3]), kind)


class Codec:
    """Seals outcomes into (optionally signed) records and notices, and opens them again.

    ``serializer`` names the value format; ``secret`` is one key or several (the first signs,
    all verify; ``secrets=`` is the same as a sequence). ``open`` raises only EnvelopeError
    and counts each refusal in ``rejected``.
    """

    def __init__(
        self,
        serializer: str | Serializer = SAFE,
        secret: SecretSpec = None,
        max_payload_bytes: int | None = None,
        *,
        secrets: Sequence[str | bytes] = (),
    ) -> None:
        self.serializer: Serializer = resolve_serializer(serializer)
        if secrets and secret is not None:
            raise ValueError("give secret= or secrets=, not both")
        self._keys = secret_keys(secret) if secret is not None else secret_keys(secrets or None)
        if self.serializer is PICKLE and not self._keys:
            raise ValueError(_PICKLE_NEEDS_SECRET)
        self._macs = tuple(hmac.new(k, digestmod=hashlib.sha256) for k in self._keys)
        self._pickle = isinstance(self.serializer, _Pickle)
        self.max_payload_bytes = max_payload_bytes
        self.rejected = 0  # inputs refused (bad signature, malformed, foreign): never decoded
        self._lock = threading.Lock()
        self._warned: set[str] = set()  # value types already logged as unserializable

    @property
    def secret(self) -> bytes | None:
        """The signing key, if any."""
        return self._keys[0] if self._keys else None

    @property
    def mode(self) -> str:
        """How records are protected, for the start-up log line and stats()."""
        n = len(self._keys)
        text = f"signed ({n} key{'' if n == 1 else 's'})" if n else "unsigned"
        text += f", serializer={serializer_name(self.serializer)}"
        if self._pickle and not n:
            text += " (UNSAFE: whoever can write to this Redis can run code in this process)"
        return text

    def count_rejection(self) -> None:
        """Count one refused input (the protocol calls this for a stale token, say)."""
        with self._lock:
            self.rejected += 1

    # --- sealing ---------------------------------------------------------------------------

    def seal(
        self,
        outcome: Outcome,
        *,
        channel: str,
        token: int,
        keep_ms: int,
        ttl_ms: int,
        trace: bytes = b"",
    ) -> bytes:
        """The record of an outcome. Only a value keeps ``keep_ms``; anything else gets 0."""
        _digits("token", token)
        _digits("keep_ms", keep_ms)
        _digits("ttl_ms", ttl_ms)
        if not isinstance(trace, bytes) or len(trace) > _MAX_TRACE:
            raise ValueError(f"trace must be bytes of at most {_MAX_TRACE} bytes")
        kind, body = self._body(outcome, channel)
        if kind != KIND_VALUE:
            keep_ms = 0
        header = b"%d:%d:%d:" % (token, keep_ms, ttl_ms)
        head = self._head(kind, trace)
        if not self._macs:
            return header + head + body
        return header + head + self._mac(_RECORD_DOMAIN, channel, header, head, body) + body

    def notice(self, kind: bytes, *, channel: str, token: int) -> bytes:
        """A channel notice (NOTICE_STORED or NOTICE_ABORTED), signed when a secret is set."""
        if kind not in (NOTICE_STORED, NOTICE_ABORTED):
            raise ValueError(f"notice kind must be NOTICE_STORED or NOTICE_ABORTED, not {kind!r}")
        text = kind + b":%d" % _digits("token", token)
        if not self._macs:
            return text
        return text + b":" + self._mac(_NOTICE_DOMAIN, channel, text)

    def _head(self, kind: int, trace: bytes) -> bytes:
        flags = _SIGNED if self._macs else 0
        return (
            MAGIC
            + bytes((VERSION, kind, self.serializer.ident[0], flags))
            + len(trace).to_bytes(2, "big")
            + trace
        )

    def _mac(self, domain: bytes, channel: str, *parts: bytes | memoryview) -> bytes:
        mac = self._macs[0].copy()
        mac.update(domain)
        mac.update(_bound(channel))
        for part in parts:
            mac.update(part)
        return mac.digest()

    def _verifies(
        self, mac: bytes, domain: bytes, channel: str, *parts: bytes | memoryview
    ) -> bool:
        bound = _bound(channel)
        for base in self._macs:
            h = base.copy()
            h.update(domain)
            h.update(bound)
            for part in parts:
                h.update(part)
            if hmac.compare_digest(mac, h.digest()):
                return True
        return False

    def _body(self, outcome: Outcome, channel: str) -> tuple[int, bytes]:
        if outcome.error is not None:
            kind, body = KIND_ERROR, _error_body(outcome.error, with_pickle=self._pickle)
        else:
            try:
                body = self.serializer.dumps(outcome.value)
                if not isinstance(body, bytes):
                    raise TypeError(f"dumps returned {type(body).__name__}, not bytes")
                kind = KIND_VALUE
            except Exception as exc:
                kind, body = KIND_UNSERIALIZABLE, self._unserializable(outcome.value, exc, channel)
        limit = self.max_payload_bytes
        if limit is not None and len(body) > limit:
            kind = KIND_TOO_LARGE
            body = (
                f"the leader's outcome is {len(body)} bytes, over max_payload_bytes={limit}"
            ).encode()
        return kind, body

    def _unserializable(self, value: Any, exc: Exception, channel: str) -> bytes:
        type_name = _qualname(type(value))
        name = serializer_name(self.serializer)
        how = (
            "pass serializer=<your own Serializer> that can encode it"
            if self._pickle
            else "set a secret (secret=... or DEDUPE_SECRET) and serializer='pickle', "
            "or pass serializer=<your own Serializer>"
        )
        message = (
            f"the leader's value of type {type_name} cannot be sent to other processes with "
            f"serializer {name!r} ({_short(exc)}); only callers in the leader's process got "
            f"it. To send it: {how}"
        )
        with self._lock:
            first = type_name not in self._warned and len(self._warned) < 1024
            if first:
                self._warned.add(type_name)
        if first:
            log.warning("%s (first seen on %r; logged once per type)", message, channel)
        return message.encode("utf-8", "replace")

    # --- opening ---------------------------------------------------------------------------

    def open(self, data: bytes, *, channel: str) -> Opened | Notice:
        """Parse (and, with a secret, verify) a record or notice read from ``channel``'s job.

        Raises only EnvelopeError (TamperedEnvelope for a failed or missing signature), and
        counts every such refusal in ``rejected``. An Opened's token may be older than the
        lease a follower waits on: refusing that is the protocol's decision.
        """
        try:
            return self._open(data, channel)
        except EnvelopeError:
            self.count_rejection()
            raise
        except Exception as exc:  # a decoder bug must not take a follower down either
            self.count_rejection()
            error = EnvelopeError(f"could not decode a record: {_short(exc)}")
            error.unexpected = True  # type: ignore[attr-defined]  # the fuzz tests look for it
            raise error from exc

    def _open(self, data: bytes, channel: str) -> Opened | Notice:
        if type(data) is not bytes:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise EnvelopeError(f"expected bytes, got {type(data).__name__}")
            data = bytes(data)
        if data[:1] in (NOTICE_STORED, NOTICE_ABORTED):
            return self._open_notice(data, channel)
        m = _HEADER_RE.match(data)
        if m is None:
            raise EnvelopeError(
                "not a dedupe record (expected '<token>:<keep_ms>:<ttl_ms>:', "
                f"at most {_MAX_DIGITS} digits each) or notice"
            )
        header = data[: m.end()]
        kind, ident, trace, body = self._unpack(
            memoryview(data)[m.end() :], _RECORD_DOMAIN, channel, header
        )
        outcome = self._outcome(kind, ident, body)
        token, keep, ttl = int(m[1]), int(m[2]), int(m[3])
        if outcome.error is None:
            outcome.fresh_ms = keep
        return Opened(token, keep, ttl, outcome, trace)

    def _open_notice(self, data: bytes, channel: str) -> Notice:
        m = _NOTICE_RE.fullmatch(data)
        if m is None:
            raise EnvelopeError("malformed notice")
        if self._macs:
            if m[3] is None:
                raise TamperedEnvelope("unsigned notice refused: a secret is configured")
            if not self._verifies(m[3], _NOTICE_DOMAIN, channel, data[: m.end(2)]):
                raise TamperedEnvelope("notice signature does not match")
        return Notice(m[1], int(m[2]))

    def _unpack(
        self, env: memoryview, domain: bytes, channel: str, bound: bytes
    ) -> tuple[int, int, bytes, bytes]:
        """Check an envelope's framing and MAC; its kind, serializer ident, trace and body."""
        bad = TamperedEnvelope if self._macs else EnvelopeError
        if len(env) < _HEAD_LEN or bytes(env[:2]) != MAGIC:
            raise bad("not a dedupe envelope (bad magic or truncated)")
        version, kind, ident, flags = env[2], env[3], env[4], env[5]
        if version != VERSION:
            raise bad(
                f"record format version {version} is not supported by this dedupe (it reads "
                f"version {VERSION}); run one dedupe version across the fleet"
            )
        if flags & ~_SIGNED or kind not in _KINDS:
            raise bad("envelope has unknown flags or kind")
        end = _HEAD_LEN + int.from_bytes(env[6:8], "big")
        if len(env) < end:
            raise bad("envelope is truncated")
        if flags & _SIGNED:
            if len(env) < end + _MAC_LEN:
                raise TamperedEnvelope("signed envelope is truncated")
            mac, body = bytes(env[end : end + _MAC_LEN]), env[end + _MAC_LEN :]
            if self._macs and not self._verifies(mac, domain, channel, bound, env[:end], body):
                raise TamperedEnvelope("signature does not match")
        else:
            if self._macs:
                raise TamperedEnvelope("unsigned record refused: a secret is configured")
            body = env[end:]
        return kind, ident, bytes(env[_HEAD_LEN:end]), bytes(body)

    def _outcome(self, kind: int, ident: int, body: bytes) -> Outcome:
        limit = self.max_payload_bytes
        if limit is not None and len(body) > limit:
            return Outcome(
                error=ResultTooLarge(
                    f"the leader's outcome is {len(body)} bytes, over this process's "
                    f"max_payload_bytes={limit}"
                )
            )
        if kind == KIND_VALUE:
            return Outcome(value=self._loads(ident, body))
        if kind == KIND_ERROR:
            return Outcome(error=_error_from_meta(SAFE.loads(body), allow_pickle=self._pickle))
        text = body.decode("utf-8", "replace")[:_MAX_NOTE]
        if kind == KIND_UNSERIALIZABLE:
            return Outcome(error=ResultNotSerializable(text))
        return Outcome(error=ResultTooLarge(text))

    def _loads(self, ident: int, body: bytes) -> Any:
        if ident == self.serializer.ident[0]:
            serializer = self.serializer
        else:
            found = _HARMLESS.get(ident)
            if found is None:
                raise EnvelopeError(
                    f"record was written with serializer {chr(ident)!r}, this process reads "
                    f"{serializer_name(self.serializer)!r}: use one serializer across the fleet"
                )
            serializer = found
        try:
            return serializer.loads(body)
        except EnvelopeError:
            raise
        except Exception as exc:
            raise EnvelopeError(f"could not deserialize the leader's value: {_short(exc)}") from exc

    # --- transitional: the header-unsigned API protocol.py used before seal/open ----------

    def encode(self, outcome: Outcome, *, channel: str, token: int) -> bytes:
        """Deprecated: an envelope bound to (channel, token) only; use ``seal``."""
        kind, body = self._body(outcome, channel)
        head = self._head(kind, b"")
        if not self._macs:
            return head + body
        bound = b"%d\0" % _digits("token", token)
        return head + self._mac(_LEGACY_DOMAIN, channel, bound, head, body) + body

    def decode(self, envelope: bytes, *, channel: str, token: int) -> Outcome:
        """Deprecated: the inverse of ``encode``; use ``open``. Raises only EnvelopeError."""
        try:
            bound = b"%d\0" % _digits("token", token)
            kind, ident, _, body = self._unpack(
                memoryview(envelope), _LEGACY_DOMAIN, channel, bound
            )
            return self._outcome(kind, ident, body)
        except EnvelopeError:
            raise
        except Exception as exc:
            raise EnvelopeError(f"could not decode an envelope: {_short(exc)}") from exc


# --- transitional record helpers (protocol.py before it calls seal/open) --------------------


class Record(NamedTuple):
    token: int
    keep_ms: int
    ttl_ms: int
    envelope: bytes


def make_record(token: int, keep_ms: int, ttl_ms: int, envelope: bytes) -> bytes:
    return f"{token}:{keep_ms}:{ttl_ms}:".encode() + envelope


def parse_record(data: bytes) -> Record:
    m = _HEADER_RE.match(data)
    if m is None:
        raise EnvelopeError("malformed outcome record")
    return Record(int(m[1]), int(m[2]), int(m[3]), data[m.end() :])


def make_notice(kind: bytes, token: int) -> bytes:
    return kind + b":" + str(token).encode()
