"""The public exceptions of dedupe; every one derives from DedupeError."""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "DedupeError",
    "EnvelopeError",
    "LeaseLost",
    "ReentrantFlight",
    "RemoteError",
    "ResultNotSerializable",
    "ResultTooLarge",
    "WaitTimeout",
]


class DedupeError(Exception):
    """Base class of every error dedupe raises itself."""


class WaitTimeout(DedupeError, TimeoutError):
    """This caller waited ``wait_timeout`` for another leader; the flight goes on without it."""


class BackendUnavailable(DedupeError, ConnectionError):
    """Redis could not be reached (or did not answer) within the configured bounds."""


class ResultNotSerializable(DedupeError):
    """The leader's value could not be serialized, so only callers in its own process got it."""


class ResultTooLarge(DedupeError):
    """The leader's outcome exceeded ``max_payload_bytes``; other processes did not get it."""


class EnvelopeError(DedupeError):
    """An outcome read from Redis could not be decoded: truncated, foreign or of unknown version."""


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
