"""dedupe: distributed single-flight on Redis. One runs the work; all get its outcome."""

from dedupe.api import CallOptions, SingleFlight, single_flight
from dedupe.batches import AsyncBatchFunction, BatchFunction, BatchResult
from dedupe.core.context import BatchFlight, Flight, current_flight
from dedupe.core.inflight import InFlightInfo, Served
from dedupe.core.serializers import Serializer
from dedupe.errors import (
    BackendBusy,
    BackendOutOfMemory,
    BackendUnavailable,
    BatchError,
    ConfigurationError,
    DedupeError,
    EnvelopeError,
    LeaseLost,
    ReentrantFlight,
    RemoteError,
    ResultInvalid,
    ResultNotSerializable,
    ResultTooLarge,
    UnsupportedServer,
    WaitTimeout,
)
from dedupe.functions import AsyncFlightFunction, FlightFunction
from dedupe.ops.inspector import JobState
from dedupe.overrides import INHERIT

__all__ = [
    "INHERIT",
    "AsyncBatchFunction",
    "AsyncFlightFunction",
    "BackendBusy",
    "BackendOutOfMemory",
    "BackendUnavailable",
    "BatchError",
    "BatchFlight",
    "BatchFunction",
    "BatchResult",
    "CallOptions",
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
    "ResultInvalid",
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
