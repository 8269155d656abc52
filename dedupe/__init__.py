"""dedupe: distributed single-flight on Redis. One runs the work; all get its outcome."""

from .api import SingleFlight, single_flight
from .context import Flight, current_flight
from .envelope import Serializer
from .errors import (
    BackendUnavailable,
    DedupeError,
    EnvelopeError,
    LeaseLost,
    ReentrantFlight,
    RemoteError,
    ResultNotSerializable,
    ResultTooLarge,
    WaitTimeout,
)

__all__ = [
    "BackendUnavailable",
    "DedupeError",
    "EnvelopeError",
    "Flight",
    "LeaseLost",
    "ReentrantFlight",
    "RemoteError",
    "ResultNotSerializable",
    "ResultTooLarge",
    "Serializer",
    "SingleFlight",
    "WaitTimeout",
    "current_flight",
    "single_flight",
]

__version__ = "0.1.0"
