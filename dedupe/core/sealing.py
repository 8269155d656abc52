"""Sealing: outcomes into records and notices, signed with a secret, and opening them again.

Everything dedupe reads back from Redis (a record in a result key, a message on a job's
channel) is opened here, and nothing here runs code named by those bytes: with no secret
nothing is unpickled and no module is imported. The formats are ``dedupe.core.record``'s;
this module adds the values (``dedupe.core.serializers``), the errors
(``dedupe.core.remote_errors``), the size limits and the signatures.

With a secret, the whole record and every notice is signed with HMAC-SHA256, bound to the
job's channel. The MAC of a record is over ``b"dedupe/record/2\\0"``, ``len(channel)`` (4
bytes, big endian), the channel (UTF-8), the header, every envelope byte before the MAC and
the body: a record verifies only for its own job, with its own token, keep and ttl. The MAC
of a notice is over ``b"dedupe/notice/2\\0"``, ``len(channel)``, the channel and the notice's
text (``N:<token>``). The first key signs; a record verifies if any key matches.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, TypeAlias

from dedupe.core import record
from dedupe.core.record import (
    HEAD_LEN,
    KIND_ERROR,
    KIND_NAMES,
    KIND_TOO_LARGE,
    KIND_UNSERIALIZABLE,
    KIND_VALUE,
    MAC_LEN,
    MAGIC,
    MAX_NUMBER,
    MAX_TRACE,
    NOTICE_ABORTED,
    NOTICE_STALE,
    NOTICE_STORED,
    SIGNED,
    VERSION,
    check_number,
    read_header,
    read_notice,
)
from dedupe.core.remote_errors import error_body, error_from_meta
from dedupe.core.serializers import (
    HARMLESS,
    JSON,
    PICKLE,
    SAFE,
    Serializer,
    is_pickle,
    qualname,
    resolve_serializer,
    serializer_name,
    short,
)
from dedupe.core.shapes import Shape, ShapeError
from dedupe.errors import EnvelopeError, ResultInvalid, ResultNotSerializable, ResultTooLarge

__all__ = [
    "SECRET_ENV",
    "SECRET_SEPARATOR",
    "Codec",
    "Notice",
    "Opened",
    "Outcome",
    "SecretSpec",
    "TamperedEnvelope",
    "codec_for",
    "secret_keys",
    "validate_security",
]

log = logging.getLogger(__name__)

_RECORD_DOMAIN: Final = b"dedupe/record/2\0"
_NOTICE_DOMAIN: Final = b"dedupe/notice/2\0"

SECRET_ENV: Final = "DEDUPE_SECRET"
SECRET_SEPARATOR: Final = ","  # DEDUPE_SECRET="new,old": the first signs, all verify

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
    # Why a stale value was served ("" for a fresh one): "revalidate" (stale_while_revalidate),
    # "error" (stale_if_error: a run failed, or the job backs off) or "timeout" (soft_timeout).
    stale: str = field(default="", compare=False)
    age_ms: int = field(default=0, compare=False)  # since it was produced (the server's clock)

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
    """A channel notice: NOTICE_STORED (read the result key), NOTICE_ABORTED or NOTICE_STALE."""

    kind: bytes
    token: int


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


# --- the codec -------------------------------------------------------------------------------


def _bound(channel: str) -> bytes:
    raw = channel.encode("utf-8", "surrogatepass")
    return len(raw).to_bytes(4, "big") + raw


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
        self._pickle = is_pickle(self.serializer)
        # Shapes (a function's return annotation) apply to the plain-data formats only:
        # pickle carries its own types, and a custom serializer its own way of them.
        self._shaped = self.serializer is SAFE or self.serializer is JSON
        self.max_payload_bytes = max_payload_bytes
        # The envelope head of each kind with no trace (every record when no tracer
        # listens), made once. No lock: a race only makes one twice.
        self._bare_heads: dict[int, bytes] = {}
        self._lock = threading.Lock()  # guards rejected and _warned; a leaf
        # Inputs refused (bad signature, malformed, foreign): never decoded; and values that
        # misfit this process's annotation (ResultInvalid): never built.
        self.rejected = 0
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
        shape: Shape | None = None,
    ) -> bytes:
        """The record of an outcome. Only a value keeps ``keep_ms``; anything else gets 0.

        ``shape``: the function's return annotation, compiled (dedupe.core.shapes): the
        value is sent as its plain data. A value that cannot travel (the serializer refuses
        it, or it does not fit the annotation) becomes ResultNotSerializable in ``outcome``
        too: the leader's callers get the same error as every other process, so a
        one-process run shows what a fleet would.
        """
        return self.seal_kept(
            outcome, channel=channel, token=token, keep_ms=keep_ms, ttl_ms=ttl_ms, trace=trace,
            shape=shape,
        )[0]  # fmt: skip

    def seal_kept(
        self,
        outcome: Outcome,
        *,
        channel: str,
        token: int,
        keep_ms: int,
        ttl_ms: int,
        trace: bytes = b"",
        shape: Shape | None = None,
    ) -> tuple[bytes, int]:
        """As ``seal``, with the keep_ms its header carries (0 but for a value that can
        travel): what the leader keeps fresh, without reading back the record just made."""
        # One test for the usual numbers; check_number names the one that is wrong.
        if not (
            type(token) is int
            and type(keep_ms) is int
            and type(ttl_ms) is int
            and 0 <= token <= MAX_NUMBER
            and 0 <= keep_ms <= MAX_NUMBER
            and 0 <= ttl_ms <= MAX_NUMBER
        ):
            check_number("token", token)
            check_number("keep_ms", keep_ms)
            check_number("ttl_ms", ttl_ms)
        if not isinstance(trace, bytes) or len(trace) > MAX_TRACE:
            raise ValueError(f"trace must be bytes of at most {MAX_TRACE} bytes")
        kind, body = self._body(outcome, channel, shape)
        if kind == KIND_UNSERIALIZABLE:
            outcome.value, outcome.error = None, ResultNotSerializable(body.decode())
        if kind != KIND_VALUE:
            keep_ms = 0
        header = record.header(token, keep_ms, ttl_ms)
        head = None if trace else self._bare_heads.get(kind)
        if head is None:
            head = self._head(kind, trace)
            if not trace:
                self._bare_heads[kind] = head
        if not self._macs:
            return header + head + body, keep_ms
        mac = self._mac(_RECORD_DOMAIN, channel, header, head, body)
        return header + head + mac + body, keep_ms

    def notice(self, kind: bytes, *, channel: str, token: int) -> bytes:
        """A channel notice (record.NOTICE_KINDS), signed when a secret is set."""
        text = record.notice(kind, token)
        if not self._macs:
            return text
        return text + b":" + self._mac(_NOTICE_DOMAIN, channel, text)

    def _head(self, kind: int, trace: bytes) -> bytes:
        flags = SIGNED if self._macs else 0
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

    def _body(self, outcome: Outcome, channel: str, shape: Shape | None) -> tuple[int, bytes]:
        if outcome.error is not None:
            kind, body = KIND_ERROR, error_body(outcome.error, with_pickle=self._pickle)
        else:
            try:
                value = outcome.value
                if shape is not None and self._shaped:
                    value = shape.dump(value)
                body = self.serializer.dumps(value)
                if not isinstance(body, bytes):
                    raise TypeError(f"dumps returned {type(body).__name__}, not bytes")
                kind = KIND_VALUE
            except Exception as exc:
                kind = KIND_UNSERIALIZABLE
                body = self._unserializable(outcome.value, exc, channel, shape)
        limit = self.max_payload_bytes
        if limit is not None and len(body) > limit:
            kind = KIND_TOO_LARGE
            body = (
                f"the leader's outcome is {len(body)} bytes, over max_payload_bytes={limit}"
            ).encode()
        return kind, body

    def _unserializable(
        self, value: Any, exc: Exception, channel: str, shape: Shape | None
    ) -> bytes:
        type_name = qualname(type(value))
        if isinstance(exc, ShapeError) and shape is not None:
            message = (
                f"the leader's value of type {type_name} does not fit the function's return "
                f"annotation {shape.name} ({exc}), so no process could rebuild it from its "
                "own annotation: return what the annotation says, or pass returns=..."
            )
            self._warn_once(type_name, message, channel)
            return message.encode("utf-8", "replace")
        name = serializer_name(self.serializer)
        how = (
            "pass serializer=<your own Serializer> that can encode it"
            if self._pickle
            else "set a secret (secret=... or DEDUPE_SECRET) and serializer='pickle', "
            "or pass serializer=<your own Serializer>"
        )
        message = (
            f"the leader's value of type {type_name} cannot be sent to other processes with "
            f"serializer {name!r} ({short(exc)}); every caller gets this error, in the "
            f"leader's process too. To send it: {how}"
        )
        self._warn_once(type_name, message, channel)
        return message.encode("utf-8", "replace")

    def _warn_once(self, type_name: str, message: str, channel: str) -> None:
        with self._lock:
            first = type_name not in self._warned and len(self._warned) < 1024
            if first:
                self._warned.add(type_name)
        if first:
            log.warning("%s (first seen on %r; logged once per type)", message, channel)

    # --- opening ---------------------------------------------------------------------------

    def open(
        self,
        data: bytes,
        *,
        channel: str,
        shape: Shape | None = None,
        header: tuple[int, int, int, int] | None = None,
    ) -> Opened | Notice:
        """Parse (and, with a secret, verify) a record or notice read from ``channel``'s job.

        ``shape``: this process's own return annotation, compiled: a value is rebuilt by it
        (never by anything the record names); one that does not fit it opens as an Outcome
        whose error is ResultInvalid (counted in ``rejected``).

        Raises only EnvelopeError (TamperedEnvelope for a failed or missing signature), and
        counts every such refusal in ``rejected``. An Opened's token may be older than the
        lease a follower waits on: refusing that is the protocol's decision. ``header``: the
        record's header, if the caller read it already (``read_header`` of these bytes).
        """
        try:
            return self._open(data, channel, shape, header)
        except EnvelopeError:
            self.count_rejection()
            raise
        except Exception as exc:  # a decoder bug must not take a follower down either
            self.count_rejection()
            error = EnvelopeError(f"could not decode a record: {short(exc)}")
            error.unexpected = True  # type: ignore[attr-defined]  # the fuzz tests look for it
            raise error from exc

    def _open(
        self, data: bytes, channel: str, shape: Shape | None, h: tuple[int, int, int, int] | None
    ) -> Opened | Notice:
        if h is None:
            if type(data) is not bytes:
                if not isinstance(data, (bytes, bytearray, memoryview)):
                    raise EnvelopeError(f"expected bytes, got {type(data).__name__}")
                data = bytes(data)
            if data[:1] in (NOTICE_STORED, NOTICE_ABORTED, NOTICE_STALE):
                return self._open_notice(data, channel)
            h = read_header(data)
        if h is None:
            raise EnvelopeError(
                "not a dedupe record (expected '<token>:<keep_ms>:<ttl_ms>:', numbers without "
                "sign or leading zeros, at most 2**53 - 1) or notice"
            )
        token, keep, ttl, end = h
        kind, ident, trace, body = self._unpack(
            memoryview(data)[end:], _RECORD_DOMAIN, channel, data[:end]
        )
        outcome = self._outcome(kind, ident, body, shape)
        if outcome.error is None:
            outcome.fresh_ms = keep
        return Opened(token, keep, ttl, outcome, trace)

    def _open_notice(self, data: bytes, channel: str) -> Notice:
        n = read_notice(data)
        if n is None:
            raise EnvelopeError("malformed notice")
        if self._macs:
            if n.mac is None:
                raise TamperedEnvelope("unsigned notice refused: a secret is configured")
            if not self._verifies(n.mac, _NOTICE_DOMAIN, channel, data[: n.text_end]):
                raise TamperedEnvelope("notice signature does not match")
        return Notice(n.kind, n.token)

    def _unpack(
        self, env: memoryview, domain: bytes, channel: str, bound: bytes
    ) -> tuple[int, int, bytes, bytes]:
        """Check an envelope's framing and MAC; its kind, serializer ident, trace and body."""
        bad = TamperedEnvelope if self._macs else EnvelopeError
        if len(env) < HEAD_LEN or bytes(env[:2]) != MAGIC:
            raise bad("not a dedupe envelope (bad magic or truncated)")
        version, kind, ident, flags = env[2], env[3], env[4], env[5]
        if version != VERSION:
            raise bad(
                f"record format version {version} is not supported by this dedupe (it reads "
                f"version {VERSION}); run one dedupe version across the fleet"
            )
        if flags & ~SIGNED or kind not in KIND_NAMES:
            raise bad("envelope has unknown flags or kind")
        end = HEAD_LEN + int.from_bytes(env[6:8], "big")
        if len(env) < end:
            raise bad("envelope is truncated")
        if flags & SIGNED:
            if len(env) < end + MAC_LEN:
                raise TamperedEnvelope("signed envelope is truncated")
            mac, body = bytes(env[end : end + MAC_LEN]), env[end + MAC_LEN :]
            if self._macs and not self._verifies(mac, domain, channel, bound, env[:end], body):
                raise TamperedEnvelope("signature does not match")
        else:
            if self._macs:
                raise TamperedEnvelope("unsigned record refused: a secret is configured")
            body = env[end:]
        return kind, ident, bytes(env[HEAD_LEN:end]), bytes(body)

    def _outcome(self, kind: int, ident: int, body: bytes, shape: Shape | None) -> Outcome:
        limit = self.max_payload_bytes
        if limit is not None and len(body) > limit:
            return Outcome(
                error=ResultTooLarge(
                    f"the leader's outcome is {len(body)} bytes, over this process's "
                    f"max_payload_bytes={limit}"
                )
            )
        if kind == KIND_VALUE:
            value = self._loads(ident, body)
            if shape is None or HARMLESS.get(ident) is None:
                return Outcome(value=value)
            try:
                return Outcome(value=shape.load(value))
            except ShapeError as exc:
                self.count_rejection()
                return Outcome(
                    error=ResultInvalid(
                        f"the value read from Redis does not fit this function's return "
                        f"annotation {shape.name} ({str(exc)[:500]})"
                    )
                )
        if kind == KIND_ERROR:
            return Outcome(error=error_from_meta(SAFE.loads(body), allow_pickle=self._pickle))
        text = body.decode("utf-8", "replace")[:_MAX_NOTE]
        if kind == KIND_UNSERIALIZABLE:
            return Outcome(error=ResultNotSerializable(text))
        return Outcome(error=ResultTooLarge(text))

    def _loads(self, ident: int, body: bytes) -> Any:
        if ident == self.serializer.ident[0]:
            serializer = self.serializer
        else:
            found = HARMLESS.get(ident)
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
            raise EnvelopeError(f"could not deserialize the leader's value: {short(exc)}") from exc
