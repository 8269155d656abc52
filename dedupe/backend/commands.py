"""How protocol commands become Redis script calls, and how replies and errors come back.

Both drivers use these, so the only thing each driver writes for itself is the call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis.exceptions as rexc

from dedupe.core import scripts
from dedupe.core.keys import ERROR, LOCK, RESULT, TOKEN, Names
from dedupe.core.protocol import (
    BUSY,
    DONE,
    LEAD,
    REFRESH,
    STALE,
    Acquire,
    Acquired,
    Complete,
    Completed,
    FlightSpec,
    Looked,
)
from dedupe.errors import (
    BackendBusy,
    BackendOutOfMemory,
    BackendUnavailable,
    ConfigurationError,
    DedupeError,
)

__all__ = [
    "READ",
    "ScriptCall",
    "Stamp",
    "acquire_call",
    "complete_call",
    "discard_call",
    "forget_call",
    "notify_call",
    "parse_acquired",
    "parse_completed",
    "parse_looked",
    "peek_call",
    "read_call",
    "renew_call",
    "translate",
    "typed_errors",
]


@dataclass(frozen=True, slots=True)
class Script:
    lua: str
    sha: str
    evalsha_head: bytes  # the RESP of "EVALSHA <sha>", ready to send (see wire.pack)
    eval_head: bytes  # the RESP of "EVAL <lua>"


def _script(lua: str) -> Script:
    sha = hashlib.sha1(lua.encode()).hexdigest()
    body = lua.encode()
    return Script(
        lua,
        sha,
        b"$7\r\nEVALSHA\r\n$40\r\n%b\r\n" % sha.encode(),
        b"$4\r\nEVAL\r\n$%d\r\n%b\r\n" % (len(body), body),
    )


ACQUIRE = _script(scripts.ACQUIRE)
RENEW = _script(scripts.RENEW)
COMPLETE = _script(scripts.COMPLETE)
COMPLETE_SHARDED = _script(scripts.COMPLETE_SHARDED)
DISCARD = _script(scripts.DISCARD)
PEEK = _script(scripts.PEEK)
READ = _script(scripts.READ)  # sent as plain MGET and TIME where dedupe packs (wire.pack)
FORGET = _script(scripts.FORGET)
NOTIFY = _script(scripts.NOTIFY)
NOTIFY_SHARDED = _script(scripts.NOTIFY_SHARDED)


class Stamp:
    """When a command's request was last written to a socket (``time.monotonic``), 0.0
    until then. A lease is dated from it, never from a queue before it (the lease began no
    earlier than the write); and a failure after it may have been applied."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = 0.0


class ScriptCall(NamedTuple):  # made twice per flight: a tuple is the cheapest immutable
    script: Script
    keys: tuple[str, ...]
    args: tuple[str | bytes | int, ...]

    def evalsha_args(self) -> tuple[Any, ...]:
        return (self.script.sha, len(self.keys), *self.keys, *self.args)

    def eval_args(self) -> tuple[Any, ...]:
        return (self.script.lua, len(self.keys), *self.keys, *self.args)


def acquire_call(spec: FlightSpec, cmd: Acquire, background: bool = False) -> ScriptCall:
    """``background``: this process may run a refresh in the background now."""
    c = spec.names.channel  # each key is the channel and a suffix
    keys = (c + LOCK, c + TOKEN, c + RESULT, c + ERROR)
    if not spec.caching:  # the arguments of every call without cache-fill settings
        return ScriptCall(
            ACQUIRE,
            keys,
            (spec.owner, spec.lock_ttl_ms, spec.token_ttl_ms, cmd.floor),
        )
    flags = (1 if background else 0) | (2 if cmd.after_error else 0)
    return ScriptCall(
        ACQUIRE,
        keys,
        (spec.owner, spec.lock_ttl_ms, spec.token_ttl_ms, cmd.floor, spec.stale_ms,
         spec.error_ms, cmd.early, flags),
    )  # fmt: skip


def complete_call(spec: FlightSpec, cmd: Complete, publish: str) -> ScriptCall:
    c = spec.names.channel  # each key is the channel and a suffix
    script = COMPLETE_SHARDED if publish == "SPUBLISH" else COMPLETE
    keys = (c + LOCK, c + RESULT, c + TOKEN, c + ERROR)
    args: tuple[str | bytes | int, ...] = (
        cmd.lock_value, cmd.record, cmd.record_ttl_ms if cmd.record_ttl_ms > 1 else 1, cmd.message
    )  # fmt: skip
    if spec.caching:
        fallback = cmd.fallback or ""
        args += (fallback, spec.error_ms, spec.backoff_ms, cmd.stale_notice)
    return ScriptCall(script, keys, args)


def discard_call(names: Names, record: bytes) -> ScriptCall:
    return ScriptCall(DISCARD, (names.result,), (record,))


def forget_call(names: Names, token_ttl_ms: int) -> ScriptCall:
    return ScriptCall(FORGET, (names.result, names.token, names.lock, names.error), (token_ttl_ms,))


def notify_call(names: Names, message: bytes, publish: str) -> ScriptCall:
    return ScriptCall(
        NOTIFY_SHARDED if publish == "SPUBLISH" else NOTIFY, (names.lock,), (message,)
    )


def read_call(names: Names) -> ScriptCall:
    return ScriptCall(READ, (names.result, names.token), ())


def parse_looked(raw: Any) -> Looked:
    """The read's reply: ``[[record, counter], [seconds, microseconds]]``."""
    keys, now = raw
    record, counter = keys
    return Looked(
        None if record is None else bytes(record),
        None if counter is None else bytes(counter),
        int(now[0]) * 1000 + int(now[1]) // 1000,
    )


def peek_call(spec: FlightSpec) -> ScriptCall:
    return ScriptCall(PEEK, (spec.names.lock,), ())


def renew_call(lock_key: str, lock_value: str, ttl_ms: int) -> ScriptCall:
    return ScriptCall(RENEW, (lock_key,), (lock_value, ttl_ms))


def _text(raw: Any) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def parse_acquired(raw: Any, sent: float = 0.0) -> Acquired:
    """The acquire script's reply; ``sent``: when its request was written (see Acquired)."""
    if type(raw) is int:  # the usual reply: we lead, with this token
        return Acquired(LEAD, token=raw, sent=sent)
    state = int(raw[0])
    n = len(raw)
    if state == DONE:
        return Acquired(
            DONE,
            record=bytes(raw[1]),
            fresh_ms=int(raw[2]) if n > 2 else 0,
            age_ms=int(raw[3]) if n > 3 else 0,
            sent=sent,
        )
    if state == BUSY:
        if n > 3:  # with a stale value to fall back on
            return Acquired(BUSY, pttl_ms=int(raw[1]), holder=_text(raw[2]), record=bytes(raw[3]),
                            fresh_ms=int(raw[4]), age_ms=int(raw[5]), sent=sent)  # fmt: skip
        return Acquired(BUSY, pttl_ms=int(raw[1]), holder=_text(raw[2]), sent=sent)
    if state == LEAD:
        if n > 2:
            return Acquired(LEAD, token=int(raw[1]), record=bytes(raw[2]), fresh_ms=int(raw[3]),
                            age_ms=int(raw[4]), sent=sent)  # fmt: skip
        return Acquired(LEAD, token=int(raw[1]), sent=sent)
    if state == REFRESH:
        return Acquired(REFRESH, record=bytes(raw[1]), fresh_ms=int(raw[2]), age_ms=int(raw[3]),
                        token=int(raw[4]), sent=sent)  # fmt: skip
    if state == STALE:
        why = "error" if n > 4 and raw[4] == b"e" else "revalidate"
        return Acquired(STALE, record=bytes(raw[1]), fresh_ms=int(raw[2]), age_ms=int(raw[3]),
                        why=why, sent=sent)  # fmt: skip
    raise ValueError(f"unexpected acquire reply {raw!r}")


def parse_completed(raw: Any) -> Completed:
    if isinstance(raw, int):  # the usual reply: no publish error
        return Completed(raw)
    err = raw[1] if len(raw) > 1 else b""
    return Completed(int(raw[0]), _text(err))


_UNAVAILABLE = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.ReadOnlyError,  # a failover demoted the server we talk to
    rexc.ClusterDownError,
    rexc.TryAgainError,
    rexc.MasterDownError,
    rexc.ClusterError,
    rexc.SlotNotCoveredError,
    ConnectionError,
    TimeoutError,
    OSError,
)


# The ACL a dedupe user needs; named in every permission error.
ACL_NEEDED = (
    "commands +evalsha +eval +mget +time +publish +spublish +subscribe +ssubscribe +unsubscribe "
    "+sunsubscribe +ping +wait +del, keys ~<prefix>:* and channels &<prefix>:*"
)


_AUTH = (
    rexc.AuthenticationError,
    rexc.AuthenticationWrongNumberOfArgsError,
    rexc.AuthorizationError,
)


def _wrap(error: Exception, cause: Exception) -> Exception:
    error.__cause__ = cause
    return error


@contextmanager
def typed_errors() -> Iterator[None]:
    """Redis errors raised in the body leave it as translate() makes them."""
    try:
        yield
    except Exception as exc:
        error = translate(exc)
        if error is exc:
            raise
        raise error from exc


def translate(exc: Exception) -> Exception:
    """A failure met while talking to Redis, as the DedupeError a user can act on.

    Outages (unreachable, timed out, loading, failing over, BUSY, OOM) become
    BackendUnavailable or a subclass; what only a configuration change fixes (credentials,
    ACL, a Cluster node behind a ``redis://`` URL, a client that decodes replies) becomes
    ConfigurationError, as do URLs that do not fit the server: a database it does not have, a
    ``redis+cluster://`` URL at a server that is not a Cluster node. Anything else is a bug
    and stays as it is.
    """
    if isinstance(exc, DedupeError):
        return exc
    text = str(exc)
    if isinstance(exc, _AUTH):
        return _wrap(
            ConfigurationError(
                f"Redis refused the credentials: {text}. Check the username and password "
                "(in the URL, as redis://user:password@host:port/0, or on the client you pass)"
            ),
            exc,
        )
    if isinstance(exc, rexc.NoPermissionError) or (
        isinstance(exc, rexc.ResponseError) and "The user executing the script can't" in text
    ):
        return _wrap(
            ConfigurationError(f"Redis ACL denied dedupe: {text}. The ACL user needs {ACL_NEEDED}"),
            exc,
        )
    if isinstance(exc, rexc.OutOfMemoryError):
        return _wrap(
            BackendOutOfMemory(
                f"Redis is out of memory and refused a write: {text}. Raise maxmemory, or "
                "set maxmemory-policy to an evicting policy (volatile-ttl suits dedupe's keys)"
            ),
            exc,
        )
    if isinstance(exc, rexc.ResponseError) and text.startswith("BUSY"):
        return _wrap(
            BackendBusy(
                f"Redis is busy running a script (not dedupe's): {text} Another client's "
                "script blocks the server; SCRIPT KILL ends it"
            ),
            exc,
        )
    if isinstance(exc, rexc.AskError):  # MovedError too: a standalone client met a Cluster
        code = getattr(exc, "status_code", None) or "MOVED"
        return _wrap(
            ConfigurationError(
                f"the server is a Redis Cluster node (it answered {code} {text}): use a "
                "redis+cluster://host:port URL or a RedisCluster client"
            ),
            exc,
        )
    if isinstance(exc, rexc.ResponseError) and "DB index is out of range" in text:
        return _wrap(
            ConfigurationError(
                "the Redis server has no such database (it answered: DB index is out of "
                "range): use a database number below its 'databases' setting (16 by "
                "default), as in redis://host:port/0"
            ),
            exc,
        )
    if isinstance(exc, rexc.ResponseError) and "SELECT is not allowed in cluster mode" in text:
        return _wrap(
            ConfigurationError(
                "the server is a Redis Cluster node, which has database 0 only: use a "
                "redis+cluster://host:port URL or a RedisCluster client"
            ),
            exc,
        )
    if isinstance(exc, rexc.RedisClusterException):  # the cluster client's own, not a RedisError
        if "Cluster mode is not enabled" in text:
            return _wrap(
                ConfigurationError(
                    "the server is not a Redis Cluster node (cluster mode is not enabled on "
                    "it): for one server use a redis://host:port/0 URL or a redis.Redis client"
                ),
                exc,
            )
        cause = exc.__cause__  # no node answered: why the last one did not
        if isinstance(cause, Exception) and not isinstance(cause, rexc.RedisClusterException):
            error = translate(cause)
            if error is not cause:
                return _wrap(error, exc)
        if "cannot be connected" in text:
            return _wrap(BackendUnavailable(f"Redis Cluster is unavailable: {text}"), exc)
    if isinstance(exc, rexc.ConnectionError) and type(exc).__name__ == "MasterNotFoundError":
        # A Sentinel client of the caller's (dedupe's own say why: topology.SyncSentinel):
        # redis-py's message holds the repr of every sentinel's connection pool.
        head = text.split(" : ", 1)[0]
        if "unknown command 'SENTINEL'" in text:
            return _wrap(
                ConfigurationError(
                    f"{head}: a server given as a sentinel is not a Sentinel (it answered: "
                    "unknown command 'SENTINEL'); for one plain server use redis://host:port/db"
                ),
                exc,
            )
        return _wrap(BackendUnavailable(f"Redis is unavailable: {head}"), exc)
    if isinstance(exc, UnicodeDecodeError):
        return _wrap(
            ConfigurationError(
                "a Redis reply could not be decoded: the client was built with "
                "decode_responses=True, and dedupe's records are bytes. Pass a client "
                "without decode_responses (or a url=) to SingleFlight"
            ),
            exc,
        )
    if isinstance(exc, RuntimeError) and "backend is closed" in text:
        return _wrap(
            BackendUnavailable(
                "the SingleFlight was closed or reconfigured while this call ran; call again"
            ),
            exc,
        )
    if isinstance(exc, LookupError) and "not subscribed to" in text:
        return _wrap(
            BackendUnavailable(f"the pub/sub subscription was dropped mid-call ({text})"),
            exc,
        )
    if isinstance(exc, _UNAVAILABLE):
        return _wrap(BackendUnavailable(f"Redis is unavailable: {type(exc).__name__}: {text}"), exc)
    if isinstance(exc, rexc.ResponseError) and text.startswith(("LOADING", "MASTERDOWN")):
        return _wrap(BackendUnavailable(f"Redis is not ready: {text}"), exc)
    return exc
