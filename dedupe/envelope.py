"""Outcome envelopes: serializing values and exceptions, signing, size limits, fallbacks."""

from __future__ import annotations

import base64
import builtins
import hashlib
import hmac
import json
import os
import pickle
import socket
import traceback
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, Protocol, runtime_checkable

import cloudpickle
from tblib import Traceback

from .errors import EnvelopeError, RemoteError, ResultNotSerializable, ResultTooLarge

__all__ = [
    "JSON",
    "PICKLE",
    "Codec",
    "Outcome",
    "Serializer",
    "TamperedEnvelope",
    "resolve_serializer",
]

MAGIC: Final = b"DD"
VERSION: Final = 1
_MAC_LEN: Final = 32
_HEADER_LEN: Final = 6  # magic(2) version(1) kind(1) serializer(1) flags(1)
_SIGNED: Final = 0x01

KIND_VALUE: Final = ord("v")
KIND_ERROR: Final = ord("e")
KIND_UNSERIALIZABLE: Final = ord("u")
KIND_TOO_LARGE: Final = ord("l")
_KINDS: Final = {KIND_VALUE, KIND_ERROR, KIND_UNSERIALIZABLE, KIND_TOO_LARGE}


class TamperedEnvelope(EnvelopeError):
    """An envelope failed its signature check; it is treated as absent, never deserialized."""


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


@runtime_checkable
class Serializer(Protocol):
    """Turns values into bytes and back. ``ident`` is one ASCII byte naming the format."""

    ident: bytes

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


# Values of these types pickle the same with the stdlib as with cloudpickle, ten times faster.
_PLAIN = frozenset({type(None), bool, int, float, str, bytes, bytearray, complex})


class _Pickle:
    ident = b"p"

    def dumps(self, value: Any) -> bytes:
        if type(value) in _PLAIN:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return]

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)


class _Json:
    ident = b"j"

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), allow_nan=True).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


PICKLE: Final[Serializer] = _Pickle()
JSON: Final[Serializer] = _Json()


def resolve_serializer(spec: str | Serializer) -> Serializer:
    if spec == "pickle":
        return PICKLE
    if spec == "json":
        return JSON
    if isinstance(spec, Serializer):
        ident = getattr(spec, "ident", b"")
        if not isinstance(ident, bytes) or len(ident) != 1 or ident in (b"p", b"j"):
            raise ValueError("a custom serializer needs ident: one byte other than b'p' and b'j'")
        return spec
    raise ValueError(f"serializer must be 'pickle', 'json' or a Serializer object, not {spec!r}")


def _origin() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _qualname(tp: type) -> str:
    return tp.__qualname__ if tp.__module__ == "builtins" else f"{tp.__module__}.{tp.__qualname__}"


def _round_trips(exc: BaseException) -> bytes | None:
    try:
        data: bytes = cloudpickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        back = pickle.loads(data)
    except Exception:
        return None
    return data if type(back) is type(exc) else None


def _pickled_exception(exc: BaseException) -> bytes | None:
    """The original class if it round-trips, else the nearest base class that does (as Celery)."""
    data = _round_trips(exc)
    if data is not None:
        return data
    for base in type(exc).__mro__[1:]:
        if not issubclass(base, BaseException):
            continue
        try:
            substitute = base(*exc.args)
        except Exception:
            continue
        data = _round_trips(substitute)
        if data is not None:
            return data
    return None


class Codec:
    """Encodes outcomes into versioned, optionally signed envelopes, and decodes them."""

    def __init__(
        self,
        serializer: Serializer = PICKLE,
        secret: bytes | None = None,
        max_payload_bytes: int | None = None,
    ) -> None:
        self.serializer = serializer
        self.secret = secret
        self.max_payload_bytes = max_payload_bytes
        self.rejected = 0  # envelopes refused (bad signature, foreign bytes): never unpickled

    # --- encoding ---------------------------------------------------------------------------

    def encode(self, outcome: Outcome, *, channel: str, token: int) -> bytes:
        if outcome.error is None:
            try:
                kind, body = KIND_VALUE, self.serializer.dumps(outcome.value)
            except Exception as exc:
                kind = KIND_UNSERIALIZABLE
                body = (
                    f"the leader's value of type {_qualname(type(outcome.value))} could not be "
                    f"serialized: {type(exc).__name__}: {exc}"
                ).encode()
        else:
            kind, body = KIND_ERROR, self._error_body(outcome.error)
        if self.max_payload_bytes is not None and len(body) > self.max_payload_bytes:
            kind = KIND_TOO_LARGE
            body = (
                f"the leader's outcome is {len(body)} bytes, over max_payload_bytes="
                f"{self.max_payload_bytes}"
            ).encode()
        return self._seal(kind, body, channel=channel, token=token)

    def _error_body(self, exc: BaseException) -> bytes:
        tp = type(exc)
        meta: dict[str, Any] = {
            "type": _qualname(tp),
            "module": tp.__module__,
            "name": tp.__qualname__,
            "message": _safe_str(exc),
            "traceback": "".join(traceback.format_exception(exc)),
            "origin": _origin(),
        }
        try:
            meta["tb"] = Traceback(exc.__traceback__).to_dict() if exc.__traceback__ else None
            json.dumps(meta["tb"])
        except Exception:
            meta["tb"] = None
        if self.serializer is PICKLE:
            pickled = _pickled_exception(exc)
            meta["pickle"] = base64.b64encode(pickled).decode() if pickled is not None else None
        else:
            try:
                meta["args"] = json.loads(json.dumps(list(exc.args)))
            except (TypeError, ValueError):
                meta["args"] = None
        return json.dumps(meta, separators=(",", ":")).encode()

    def _seal(self, kind: int, body: bytes, *, channel: str, token: int) -> bytes:
        flags = _SIGNED if self.secret else 0
        header = MAGIC + bytes((VERSION, kind, self.serializer.ident[0], flags))
        if not self.secret:
            return header + body
        return header + self._mac(header, body, channel, token) + body

    def _mac(self, header: bytes, body: bytes, channel: str, token: int) -> bytes:
        assert self.secret is not None
        mac = hmac.new(self.secret, digestmod=hashlib.sha256)
        # Binding the channel and token stops a genuine envelope being replayed onto another key.
        mac.update(channel.encode("utf-8", "surrogatepass") + b"\0" + str(token).encode() + b"\0")
        mac.update(header)
        mac.update(body)
        return mac.digest()

    # --- decoding ---------------------------------------------------------------------------

    def decode(self, envelope: bytes, *, channel: str, token: int) -> Outcome:
        """Rebuild an outcome; raises EnvelopeError (TamperedEnvelope) on unreadable input."""
        # With a secret set, nothing unverifiable is an error to report: it is ignored.
        bad = TamperedEnvelope if self.secret else EnvelopeError
        if len(envelope) < _HEADER_LEN or envelope[:2] != MAGIC:
            raise bad("not a dedupe envelope (bad magic or truncated)")
        version, kind, ident, flags = envelope[2], envelope[3], envelope[4], envelope[5]
        if version != VERSION:
            raise bad(
                f"envelope format version {version} is not supported by this dedupe "
                f"(it reads version {VERSION}); run one dedupe version across the fleet"
            )
        header, rest = envelope[:_HEADER_LEN], envelope[_HEADER_LEN:]
        if flags & ~_SIGNED or kind not in _KINDS:
            raise bad("envelope has unknown flags or kind")
        if flags & _SIGNED:
            if len(rest) < _MAC_LEN:
                raise TamperedEnvelope("signed envelope is truncated")
            mac, body = rest[:_MAC_LEN], rest[_MAC_LEN:]
            if self.secret and not hmac.compare_digest(
                mac, self._mac(header, body, channel, token)
            ):
                raise TamperedEnvelope("envelope signature does not match")
        else:
            if self.secret:
                raise TamperedEnvelope("unsigned envelope refused: a secret is configured")
            body = rest
        if kind == KIND_VALUE:
            if ident != self.serializer.ident[0]:
                raise EnvelopeError(
                    f"envelope was written with serializer {chr(ident)!r}, "
                    f"this process reads {self.serializer.ident.decode()!r}"
                )
            try:
                return Outcome(value=self.serializer.loads(body))
            except Exception as exc:
                raise EnvelopeError(f"could not deserialize the leader's value: {exc!r}") from exc
        if kind == KIND_UNSERIALIZABLE:
            return Outcome(error=ResultNotSerializable(body.decode("utf-8", "replace")))
        if kind == KIND_TOO_LARGE:
            return Outcome(error=ResultTooLarge(body.decode("utf-8", "replace")))
        return Outcome(error=self._rebuild_error(body))

    def _rebuild_error(self, body: bytes) -> BaseException:
        try:
            meta = json.loads(body)
            type_name = str(meta["type"])
            message = str(meta.get("message", ""))
            remote_tb = str(meta.get("traceback", ""))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise EnvelopeError(f"malformed error envelope: {exc!r}") from exc
        error: BaseException | None = None
        pickled = meta.get("pickle")
        if pickled and self.serializer is PICKLE:
            try:
                candidate = pickle.loads(base64.b64decode(pickled))
                # Leaders never ship aborts (KeyboardInterrupt, SystemExit): refuse them.
                if isinstance(candidate, Exception):
                    error = candidate
            except Exception:
                error = None
        elif meta.get("module") == "builtins" and isinstance(meta.get("args"), list):
            cls = getattr(builtins, str(meta.get("name")), None)
            if isinstance(cls, type) and issubclass(cls, Exception):
                try:
                    error = cls(*meta["args"])
                except Exception:
                    error = None
        if error is None:
            error = RemoteError(type_name, message, remote_tb)
        tb_dict = meta.get("tb")
        if tb_dict:
            try:
                error = error.with_traceback(Traceback.from_dict(tb_dict).as_traceback())
            except Exception:
                pass
        if hasattr(error, "add_note"):
            error.add_note(f"(raised by the dedupe leader at {meta.get('origin', '?')})")
        return error


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


# --- records and channel messages -----------------------------------------------------------
#
# A record is what the result key holds and what travels inline on the channel:
#   b"<token>:<keep_ms>:<ttl_ms>:" + envelope
# The numeric header is what the Lua scripts read; the envelope is opaque to them.
# Other channel messages are notices: b"N:<token>" (outcome stored, fetch it) and
# b"A:<token>" (the leader aborted: re-check now).


class Record(NamedTuple):
    token: int
    keep_ms: int
    ttl_ms: int
    envelope: bytes


def make_record(token: int, keep_ms: int, ttl_ms: int, envelope: bytes) -> bytes:
    return f"{token}:{keep_ms}:{ttl_ms}:".encode() + envelope


def parse_record(data: bytes) -> Record:
    parts = data.split(b":", 3)
    if len(parts) != 4 or not all(p.isdigit() for p in parts[:3]):
        raise EnvelopeError("malformed outcome record")
    return Record(int(parts[0]), int(parts[1]), int(parts[2]), parts[3])


NOTICE_STORED: Final = b"N"
NOTICE_ABORTED: Final = b"A"


def make_notice(kind: bytes, token: int) -> bytes:
    return kind + b":" + str(token).encode()
