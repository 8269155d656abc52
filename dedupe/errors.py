"""The public exceptions of dedupe; every one derives from DedupeError."""

from __future__ import annotations

from typing import Any

__all__ = [
    "BackendBusy",
    "BackendOutOfMemory",
    "BackendUnavailable",
    "BatchError",
    "ConfigurationError",
    "DedupeError",
    "EnvelopeError",
    "LeaseLost",
    "ReentrantFlight",
    "RemoteError",
    "ResultInvalid",
    "ResultNotSerializable",
    "ResultTooLarge",
    "UnsupportedServer",
    "WaitTimeout",
]


class DedupeError(Exception):
    """Base class of every error dedupe raises itself."""


class WaitTimeout(DedupeError, TimeoutError):
    """This caller waited ``wait_timeout`` for another leader; the flight goes on without it.

    ``WaitTimeout(job_id=..., seconds=...)`` builds the message; ``.job_id`` and ``.seconds``
    are then set (None when only a message was given).
    """

    def __init__(
        self, message: str = "", *, job_id: str | None = None, seconds: float | None = None
    ) -> None:
        if not message and job_id is not None:
            waited = "" if seconds is None else f" {seconds:g} s"
            message = (
                f"waited{waited} (wait_timeout) for the leader of {job_id!r}; the flight "
                "goes on without this caller"
            )
        super().__init__(message)
        self.job_id = job_id
        self.seconds = seconds


class BatchError(DedupeError):
    """Some items of a batch failed. ``values``: the items that got a value; ``errors``: each
    failed item's exception (the function's own, a WaitTimeout, a BackendUnavailable). The
    first failure is the ``__cause__``; ``fn.detailed(...)`` returns both without raising."""

    def __init__(self, values: dict[Any, Any], errors: dict[Any, BaseException]) -> None:
        kinds = sorted({type(e).__qualname__ for e in errors.values()})
        super().__init__(
            f"{len(errors)} of {len(errors) + len(values)} items failed "
            f"({', '.join(kinds)}); .values holds the rest, .errors each failure"
        )
        self.values = values
        self.errors = errors
        first = next(iter(errors.values()), None)
        if first is not None:
            self.__cause__ = first


class BackendUnavailable(DedupeError, ConnectionError):
    """Redis could not be reached (or did not answer) within the configured bounds.

    With ``on_backend_error="local"`` these (and only these) make flights run in-process.
    """


class BackendBusy(BackendUnavailable):
    """Redis answered BUSY: a script runs past ``lua-time-limit``/``busy-reply-threshold``
    (another client's, as dedupe's scripts are short); ``SCRIPT KILL`` ends it."""


class BackendOutOfMemory(BackendUnavailable):
    """Redis refused a write with OOM: it reached ``maxmemory`` and its ``maxmemory-policy``
    (e.g. ``noeviction``) evicts nothing. Raise maxmemory or choose an evicting policy."""


class ConfigurationError(DedupeError):
    """Redis refused dedupe for a reason only a change of configuration fixes: a wrong password
    or user, an ACL that lacks a command, key or channel dedupe needs, a ``redis://`` URL
    pointed at a Cluster node, a database the server does not have, a ``redis+cluster://``
    URL at a server that is not a Cluster node, a ``redis+sentinel://`` URL at servers that
    are not sentinels or naming a service they do not monitor, a client that decodes
    replies. Never an outage: it is raised even with ``on_backend_error="local"``. The
    message names what to change."""


class UnsupportedServer(ConfigurationError):
    """The Redis server is too old for this topology: Redis Cluster needs 7.0 or later
    (sharded pub/sub). Raised at the first call, before any lease is taken."""


class ResultNotSerializable(DedupeError):
    """The leader's value could not be serialized (or did not fit its function's return
    annotation): every caller gets this error, in the leader's own process too."""


class ResultTooLarge(DedupeError):
    """The leader's outcome exceeded ``max_payload_bytes``; other processes did not get it."""


class EnvelopeError(DedupeError):
    """An outcome read from Redis could not be decoded: truncated, foreign or of unknown version."""


class ResultInvalid(EnvelopeError):
    """A value read from Redis does not fit this function's return annotation (or
    ``returns=``): a record forged, or written by a different version of the code. The value
    is never built as any other type."""


class ReentrantFlight(DedupeError, RuntimeError):
    """A flight called itself with its own key, which would wait on itself forever."""


class LeaseLost(DedupeError):
    """The running leader no longer holds its lease: another caller may be running the job."""


class RemoteError(DedupeError):
    """The leader raised an exception that cannot be rebuilt in this process.

    ``type_name`` is the qualified name of the original class, ``message`` its ``str()``,
    and ``remote_traceback`` the leader's formatted traceback.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(type_name, message, remote_traceback)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name


class ProtocolError(DedupeError, RuntimeError):
    """A driver broke the contract of dedupe's protocol or call machine (a reply of the wrong
    kind): a bug in dedupe, never caused by what Redis holds. Not exported."""
