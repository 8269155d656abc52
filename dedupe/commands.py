"""How protocol commands become Redis script calls, and how replies and errors come back.

Both drivers use these, so the only thing each driver writes for itself is the call.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis.exceptions as rexc

from . import scripts
from .errors import BackendUnavailable
from .protocol import BUSY, DONE, LEAD, Acquire, Acquired, Complete, Discard, FlightSpec

__all__ = [
    "ScriptCall",
    "acquire_call",
    "complete_call",
    "discard_call",
    "parse_acquired",
    "renew_call",
    "translate",
]


@dataclass(frozen=True, slots=True)
class Script:
    lua: str
    sha: str


def _script(lua: str) -> Script:
    return Script(lua, hashlib.sha1(lua.encode()).hexdigest())


ACQUIRE = _script(scripts.ACQUIRE)
RENEW = _script(scripts.RENEW)
COMPLETE = _script(scripts.COMPLETE)
DISCARD = _script(scripts.DISCARD)


class ScriptCall(NamedTuple):  # made twice per flight: a tuple is the cheapest immutable
    script: Script
    keys: tuple[str, ...]
    args: tuple[str | bytes | int, ...]

    def evalsha_args(self) -> tuple[Any, ...]:
        return (self.script.sha, len(self.keys), *self.keys, *self.args)

    def eval_args(self) -> tuple[Any, ...]:
        return (self.script.lua, len(self.keys), *self.keys, *self.args)


def acquire_call(spec: FlightSpec, cmd: Acquire) -> ScriptCall:
    n = spec.names
    return ScriptCall(
        ACQUIRE,
        (n.lock, n.token, n.result),
        (spec.owner, spec.lock_ttl_ms, spec.token_ttl_ms, cmd.waiting_token),
    )


def complete_call(spec: FlightSpec, cmd: Complete, publish: str) -> ScriptCall:
    n = spec.names
    return ScriptCall(
        COMPLETE,
        (n.lock, n.result),
        (
            cmd.lock_value,
            cmd.record,
            max(1, cmd.record_ttl_ms),
            cmd.message,
            n.channel,
            publish,
            cmd.token,
        ),
    )


def discard_call(spec: FlightSpec, cmd: Discard) -> ScriptCall:
    return ScriptCall(DISCARD, (spec.names.result,), (cmd.record,))


def renew_call(lock_key: str, lock_value: str, ttl_ms: int) -> ScriptCall:
    return ScriptCall(RENEW, (lock_key,), (lock_value, ttl_ms))


def parse_acquired(raw: Any) -> Acquired:
    state = int(raw[0])
    if state == DONE:
        return Acquired(DONE, record=bytes(raw[1]), fresh_ms=int(raw[2]) if len(raw) > 2 else 0)
    if state == BUSY:
        holder = raw[2].decode("utf-8", "replace") if isinstance(raw[2], bytes) else str(raw[2])
        return Acquired(BUSY, pttl_ms=int(raw[1]), holder=holder)
    if state == LEAD:
        return Acquired(LEAD, token=int(raw[1]))
    raise ValueError(f"unexpected acquire reply {raw!r}")


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


def translate(exc: Exception) -> Exception:
    """Redis failures become BackendUnavailable; anything else is a bug and stays as it is."""
    if isinstance(exc, BackendUnavailable):
        return exc
    if isinstance(exc, _UNAVAILABLE):
        error = BackendUnavailable(f"Redis is unavailable: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error
    if isinstance(exc, rexc.ResponseError) and str(exc).startswith(("LOADING", "MASTERDOWN")):
        error = BackendUnavailable(f"Redis is not ready: {exc}")
        error.__cause__ = exc
        return error
    return exc
