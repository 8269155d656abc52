"""OpenTelemetry metrics and traces for dedupe (``pip install 'redis-single-flight[otel]'``).

``instrument()`` hangs an adapter on :mod:`dedupe.ops.events`; it needs only
``opentelemetry-api`` (an SDK, or any other implementation, decides where data goes).

Metrics (meter ``dedupe``), attributes ``dedupe.prefix`` (the SingleFlight's key prefix),
``dedupe.role`` (leader, local, remote, kept, copy; "unknown" where a call failed before it
had one) and ``dedupe.outcome`` (value, error, timeout, backend_error, failed); the event
counters carry ``dedupe.prefix`` only, ``dedupe.stale_served`` also ``dedupe.stale.reason``
(revalidate, error, timeout):

=============================  =========  ====================================================
``dedupe.calls``               counter    calls that ended, one per call
``dedupe.call.duration``       histogram  seconds from a call's start to its end
``dedupe.run.duration``        histogram  seconds the function ran (leaders, local runs)
``dedupe.wait.duration``       histogram  seconds a follower waited for another caller's run
``dedupe.takeovers``           counter    leads taken after a waited-on leader's lease expired
``dedupe.leases.lost``         counter    leases a running leader lost (renewal failed)
``dedupe.envelopes.rejected``  counter    outcome records ignored (bad signature, foreign bytes)
``dedupe.local_runs``          counter    runs without Redis (``on_backend_error="local"``)
``dedupe.refreshes``           counter    background runs begun (stale_while_revalidate, ...)
``dedupe.errors_replaced``     counter    failed runs a stale value stood in for
``dedupe.stale_served``        counter    calls served a value past its result_ttl
=============================  =========  ====================================================

Traces (tracer ``dedupe``): one INTERNAL span per call, a child of the caller's current
span, named ``dedupe <kind>`` (``dedupe lead``, ``dedupe follow_remote``, ...), with
``dedupe.job_id``, ``dedupe.prefix``, ``dedupe.role``, ``dedupe.outcome`` and
``dedupe.token``; a takeover, lost lease or rejected envelope is an event on it. The leader's
span is current while its function runs, and its traceparent travels (signed with the
rest) in the outcome record, so a follower's span in any process carries a Link to the
leader's span.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from dedupe import __version__
from dedupe.ops import events
from dedupe.ops.events import Event

__all__ = ["Instrumentation", "instrument", "parse_traceparent", "uninstrument"]


_TRACEPARENT: Final = re.compile(rb"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_MARK_COUNTERS: Final = {
    "takeover": ("dedupe.takeovers", "{takeover}", "leads taken after a leader's lease expired"),
    "lease_lost": ("dedupe.leases.lost", "{lease}", "leases a running leader lost"),
    "rejected": ("dedupe.envelopes.rejected", "{envelope}", "outcome records ignored"),
    "local_run": ("dedupe.local_runs", "{run}", "runs without Redis (local fallback)"),
    "refresh": ("dedupe.refreshes", "{run}", "background runs begun (refreshes)"),
    "stood_in": ("dedupe.errors_replaced", "{run}", "failed runs a stale value stood in for"),
}


def parse_traceparent(data: bytes) -> SpanContext | None:
    """The remote SpanContext a W3C traceparent names; None if it is empty or malformed."""
    m = _TRACEPARENT.match(data)
    if m is None:
        return None
    trace_id, span_id = int(m.group(1), 16), int(m.group(2), 16)
    if not trace_id or not span_id:
        return None
    return SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(m.group(3), 16))
    )


def _traceparent(ctx: SpanContext) -> bytes:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}".encode()


class _Tracing:
    """The events.Tracer: opens a span when a call begins and closes it when it ends."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def start(self, job_id: str, prefix: str) -> object:
        attributes = {"dedupe.job_id": job_id, "dedupe.prefix": prefix}
        span = self._tracer.start_span("dedupe call", kind=SpanKind.INTERNAL, attributes=attributes)
        token = otel_context.attach(trace.set_span_in_context(span))
        return span, token

    def finish(self, handle: object, event: Event) -> None:
        assert isinstance(handle, tuple)
        span: trace.Span = handle[0]
        token: object = handle[1]
        try:
            span.update_name(f"dedupe {event.kind}")
            span.set_attribute("dedupe.role", event.role or "unknown")
            span.set_attribute("dedupe.outcome", event.outcome)
            if event.token:
                span.set_attribute("dedupe.token", event.token)
            leader = parse_traceparent(event.leader_trace)
            if leader is not None and leader != span.get_span_context():
                span.add_link(leader, {"dedupe.link": "leader"})
            if event.outcome != "value":
                span.set_status(Status(StatusCode.ERROR, event.detail or event.outcome))
            span.end()
        finally:
            otel_context.detach(token)  # type: ignore[arg-type]

    def context(self) -> bytes:
        ctx = trace.get_current_span().get_span_context()
        return _traceparent(ctx) if ctx.is_valid else b""


class _Metrics:
    """The events listener that records dedupe's counters and histograms."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.calls = meter.create_counter("dedupe.calls", "{call}", "calls that ended")
        self.call_duration = meter.create_histogram(
            "dedupe.call.duration",
            "s",
            "time from a call's start to its end",
            explicit_bucket_boundaries_advisory=events.DURATION_BUCKETS,
        )
        self.run_duration = meter.create_histogram(
            "dedupe.run.duration",
            "s",
            "time the function ran, in leaders and local runs",
            explicit_bucket_boundaries_advisory=events.DURATION_BUCKETS,
        )
        self.wait_duration = meter.create_histogram(
            "dedupe.wait.duration",
            "s",
            "time a follower waited for another caller's run",
            explicit_bucket_boundaries_advisory=events.DURATION_BUCKETS,
        )
        self.marks = {
            kind: meter.create_counter(name, unit, text)
            for kind, (name, unit, text) in _MARK_COUNTERS.items()
        }
        self.stale = meter.create_counter(
            "dedupe.stale_served", "{call}", "calls served a value past its result_ttl"
        )
        self._attrs: dict[tuple[str, str, str], dict[str, str]] = {}
        self._lock = threading.Lock()  # guards _attrs' growth (reads are lock-free)

    def _attributes(self, prefix: str, role: str, outcome: str) -> dict[str, str]:
        key = (prefix, role, outcome)
        attrs = self._attrs.get(key)
        if attrs is None:
            with self._lock:
                attrs = self._attrs.setdefault(
                    key,
                    {
                        "dedupe.prefix": prefix,
                        "dedupe.role": role or "unknown",
                        "dedupe.outcome": outcome,
                    },
                )
        return attrs

    def __call__(self, event: Event) -> None:
        if event.kind in events.MARK_KINDS:
            counter = self.marks.get(event.kind)
            if counter is not None:
                counter.add(1, {"dedupe.prefix": event.prefix})
            span = trace.get_current_span()
            if span.is_recording():
                span.add_event(f"dedupe.{event.kind}", {"dedupe.token": event.token})
            return
        attrs = self._attributes(event.prefix, event.role, event.outcome)
        self.calls.add(1, attrs)
        if event.stale:
            self.stale.add(1, {"dedupe.prefix": event.prefix, "dedupe.stale.reason": event.stale})
        if event.duration_s is not None:
            self.call_duration.record(event.duration_s, attrs)
        if event.run_s is not None:
            self.run_duration.record(event.run_s, attrs)
        if event.wait_s is not None:
            self.wait_duration.record(event.wait_s, attrs)


class Instrumentation:
    """What :func:`instrument` installed; :meth:`uninstrument` takes it away again."""

    def __init__(self, removers: list[Callable[[], None]]) -> None:
        self._removers = removers

    def uninstrument(self) -> None:
        removers, self._removers = self._removers, []
        for remove in removers:
            remove()

    @property
    def active(self) -> bool:
        return bool(self._removers)


_current: Instrumentation | None = None
_install_lock = threading.Lock()  # guards _current


def instrument(
    *,
    meter_provider: metrics.MeterProvider | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    traces: bool = True,
    metrics_: bool = True,
) -> Instrumentation:
    """Report every SingleFlight of this process to OpenTelemetry.

    Providers default to the global ones (``opentelemetry.metrics/trace.get_*_provider()``).
    Instrumenting again replaces the previous instrumentation, so data is never counted
    twice. ``traces=False`` or ``metrics_=False`` leaves that half out.
    """
    global _current
    removers: list[Callable[[], None]] = []
    if metrics_:
        meter = metrics.get_meter("dedupe", __version__, meter_provider)
        removers.append(events.add_listener(_Metrics(meter)))
    if traces:
        tracer = trace.get_tracer("dedupe", __version__, tracer_provider)
        removers.append(events.add_tracer(_Tracing(tracer)))
    with _install_lock:
        old, _current = _current, Instrumentation(removers)
        new = _current
    if old is not None:
        old.uninstrument()
    return new


def uninstrument() -> None:
    """Remove what :func:`instrument` installed, if anything."""
    global _current
    with _install_lock:
        old, _current = _current, None
    if old is not None:
        old.uninstrument()
