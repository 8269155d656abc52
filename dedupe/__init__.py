"""dedupe: distributed single-flight on Redis. One runs the work; all get its outcome."""

from .api import INHERIT, AsyncFlightFunction, FlightFunction, SingleFlight, single_flight
from .context import Flight, current_flight
from .errors import (
    BackendBusy,
    BackendOutOfMemory,
    BackendUnavailable,
    ConfigurationError,
    DedupeError,
    EnvelopeError,
    LeaseLost,
    ReentrantFlight,
    RemoteError,
    ResultNotSerializable,
    ResultTooLarge,
    UnsupportedServer,
    WaitTimeout,
)
from .inflight import InFlightInfo, Served
from .inspector import JobState
from .serializers import Serializer

__all__ = [
    "INHERIT",
    "AsyncFlightFunction",
    "BackendBusy",
    "BackendOutOfMemory",
    "BackendUnavailable",
    "ConfigurationError",
    "DedupeError",
    "EnvelopeError",
    "Flight",
    "FlightFunction",
    "InFlightInfo",
    "JobState",
    "LeaseLost",
    "ReentrantFlight",
    "RemoteError",
    "ResultNotSerializable",
    "ResultTooLarge",
    "Serializer",
    "Served",
    "SingleFlight",
    "UnsupportedServer",
    "WaitTimeout",
    "current_flight",
    "single_flight",
]

__version__ = "0.1.0"
