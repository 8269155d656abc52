"""Serializers: values to bytes and back. The default, "safe", builds only the types it names.

``Serializer`` is the protocol a custom one follows; ``SAFE`` (typed JSON), ``JSON`` (plain,
lossy), ``PICKLE`` and ``PICKLE_UNSAFE`` (cloudpickle) are dedupe's own, and
``resolve_serializer`` turns a ``serializer=`` setting into one. Nothing here decides what
may be decoded: ``dedupe.core.sealing`` hands ``loads`` only what its rules allow.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import gc
import json
import pickle
import time
import uuid
from collections import Counter
from collections.abc import Callable
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, Final, Protocol, runtime_checkable

import cloudpickle

from dedupe.errors import EnvelopeError

__all__ = [
    "HARMLESS",
    "JSON",
    "MAX_DEPTH",
    "PICKLE",
    "PICKLE_UNSAFE",
    "SAFE",
    "Serializer",
    "is_pickle",
    "resolve_serializer",
    "serializer_name",
]


@runtime_checkable
class Serializer(Protocol):
    """Turns values into bytes and back. ``ident`` is one ASCII byte naming the format.

    ``loads`` is given bytes read from Redis: unless a secret is set (then only records
    signed by a fleet member reach it), anyone who can write to that Redis chose them.
    """

    ident: bytes

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


def qualname(tp: type) -> str:
    """A type's name as messages show it: ``ValueError``, ``mymod.MyError``."""
    return tp.__qualname__ if tp.__module__ == "builtins" else f"{tp.__module__}.{tp.__qualname__}"


def safe_str(exc: BaseException) -> str:
    """``str(exc)``, or a stand-in if that raises."""
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def short(exc: BaseException) -> str:
    """An exception's type and message, cut to about 200 characters for a log line."""
    text = f"{type(exc).__name__}: {safe_str(exc)}"
    return text if len(text) <= 200 else text[:200] + "..."


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
    raise TypeError(f"the 'safe' serializer does not encode values of type {qualname(t)}")


def tagged(value: Any) -> Any:
    """The JSON tree the safe serializer encodes ``value`` as; TypeError if it cannot."""
    return _enc(value, 0)


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
# What _ENCODER.encode runs, built once too (encode builds it anew for every value: some 90
# bytecodes). No cycle check: _enc's trees are fresh containers, at most MAX_DEPTH deep.
_ONE_SHOT: Final = (
    None
    if c_make_encoder is None
    else c_make_encoder(None, _ENCODER.default, encode_basestring_ascii, None, ":", ",",
                        False, False, True)
)  # fmt: skip
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
        # No cyclic garbage collection while the tree is built and encoded: a large value's
        # tree is millions of new containers, and the full collections they set off walk the
        # whole heap holding the GIL (0.13 s each with 3 million objects already in the
        # process), so the lease's renewal thread could not run (a 0.2 s lease was lost in
        # a long test process). The tree has no cycles; reference counting frees it.
        # The tree is dropped before collection resumes, or the first collection after would
        # walk it all the same.
        collecting = gc.isenabled()
        if collecting:
            gc.disable()
        try:
            started = time.perf_counter()
            tree = _enc(value, 0)  # Python: other threads run between its steps
            if time.perf_counter() - started < _LARGE_SECONDS:
                if _ONE_SHOT is not None:
                    out = "".join(_ONE_SHOT(tree, 0)).encode("ascii")
                else:
                    out = _ENCODER.encode(tree).encode("ascii")
            else:
                out = _in_pieces(tree)
            del tree
        finally:
            if collecting:
                gc.enable()
        return out

    def loads(self, data: bytes) -> Any:
        if data[:1] == _RAW_BYTES:
            return bytes(data[1:])
        try:
            return _DECODER.decode(bytes(data).decode("utf-8"))
        except Exception as exc:  # ValueError, TypeError, RecursionError, OverflowError, ...
            raise EnvelopeError(f"malformed 'safe' value: {short(exc)}") from exc


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
            raise EnvelopeError(f"malformed JSON value: {short(exc)}") from exc


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
HARMLESS: Final[dict[int, Serializer]] = {SAFE.ident[0]: SAFE, JSON.ident[0]: JSON}


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


def is_pickle(serializer: Serializer) -> bool:
    """Whether ``serializer`` is dedupe's pickle (signed or not)."""
    return isinstance(serializer, _Pickle)


def serializer_name(serializer: Serializer) -> str:
    name = getattr(serializer, "name", None)
    return name if isinstance(name, str) else qualname(type(serializer))
