"""dedupe.ops.events and its adapters (OpenTelemetry SDK, prometheus-client), fed events directly.

These tests drive the event surface the way the drivers do (``begin`` ... ``Call.end``,
``mark``); tests/test_ops_herd.py checks the same adapters on real flights.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dedupe.core.keys import names_for
from dedupe.errors import BackendUnavailable, WaitTimeout
from dedupe.ops import events, otel
from dedupe.ops import prometheus as prom
from dedupe.ops.events import Event

pytestmark = pytest.mark.timeout(20)


@pytest.fixture(autouse=True)
def _clean_events() -> Iterator[None]:
    assert not events.enabled, "an earlier test left a listener installed"
    yield
    otel.uninstrument()
    assert events.listeners == () and events.tracers == (), "a test left a listener installed"
    assert not events.enabled


class OTel:
    """A real SDK pipeline with in-memory reader and exporter, instrumented."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])
        self.exporter = InMemorySpanExporter()
        self.tracers = TracerProvider()
        self.tracers.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.handle = otel.instrument(meter_provider=self.meters, tracer_provider=self.tracers)

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found = []
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found

    def by_attrs(self, name: str) -> dict[tuple[str, str], Any]:
        """Points by (role, outcome); asserts each carries the prefix of its job."""
        found = {}
        for p in self.points(name):
            key = (p.attributes["dedupe.role"], p.attributes["dedupe.outcome"])
            expected = "users" if key == ("leader", "error") else "reports"
            assert p.attributes["dedupe.prefix"] == expected
            found[key] = p
        return found

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


@pytest.fixture
def sdk() -> Iterator[OTel]:
    pipeline = OTel()
    yield pipeline
    pipeline.handle.uninstrument()


# --- the event surface ---------------------------------------------------------------------


def test_nothing_installed_costs_one_false_flag() -> None:
    assert events.enabled is False
    assert events.trace_context() == b""


def test_listeners_get_every_event_until_removed() -> None:
    got: list[Event] = []
    remove = events.add_listener(got.append)
    assert events.enabled
    events.mark("takeover", "job", token=7)
    call = events.begin("job")
    assert call.end("leader", token=7) is not None
    remove()
    assert not events.enabled
    events.mark("lease_lost", "job")
    assert [(e.kind, e.token) for e in got] == [("takeover", 7), ("lead", 7)]
    assert got[1].role == "leader" and got[1].outcome == "value"
    assert got[1].duration_s is not None and got[1].duration_s >= 0


def test_a_failing_listener_is_logged_once_and_never_breaks_the_flight(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    got: list[Event] = []
    removers = [events.add_listener(broken), events.add_listener(got.append)]
    try:
        with caplog.at_level(logging.WARNING, logger="dedupe"):
            for _ in range(3):
                events.begin("job").end("remote")
        assert len(got) == 3  # the next listener still hears every event
        complaints = [r for r in caplog.records if "listener bug" in r.getMessage()]
        assert len(complaints) == 1
    finally:
        for remove in removers:
            remove()


@pytest.mark.parametrize(
    ("role", "error", "kind", "outcome"),
    [
        ("leader", None, "lead", "value"),
        ("local", None, "follow_local", "value"),
        ("remote", None, "follow_remote", "value"),
        ("kept", None, "kept", "value"),
        ("leader", ValueError("boom"), "lead", "error"),
        ("remote", WaitTimeout("late"), "timeout", "timeout"),
        ("", BackendUnavailable("down"), "backend_error", "backend_error"),
        ("", KeyboardInterrupt(), "failed", "error"),
    ],
)
def test_how_a_call_ends_decides_its_kind_and_outcome(
    role: str, error: BaseException | None, kind: str, outcome: str
) -> None:
    got: list[Event] = []
    remove = events.add_listener(got.append)
    try:
        call = events.begin("job")
        event = call.end(role, error, run_s=0.5 if role == "leader" else None)
        assert call.end(role, error) is None  # a second end (a finally:) reports nothing
    finally:
        remove()
    assert got == [event]
    assert event is not None
    assert (event.kind, event.outcome, event.role) == (kind, outcome, role)
    assert kind in events.CALL_KINDS
    assert event.detail == (type(error).__name__ if outcome == "error" else "")
    if role in ("local", "remote") or kind == "timeout":
        assert event.wait_s == event.duration_s  # a follower's call is all waiting
    else:
        assert event.wait_s is None
    assert event.run_s == (0.5 if role == "leader" and kind == "lead" else None)


def test_bad_listeners_and_tracers_are_refused() -> None:
    with pytest.raises(TypeError, match="callable"):
        events.add_listener("not a function")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="start"):
        events.add_tracer(object())  # type: ignore[arg-type]


# --- OpenTelemetry -------------------------------------------------------------------------


JOB = names_for("reports", "job")
OTHER = names_for("users", "other")


def _herd(n_remote: int, n_local: int) -> None:
    """What a herd's calls report: one leader, followers, a kept hit, a timeout, marks."""
    lead = events.begin(JOB)
    trace = events.trace_context()
    events.mark("takeover", JOB, token=5)
    lead.end("leader", run_s=0.01, token=5)
    for _ in range(n_remote):
        events.begin(JOB).end("remote", token=5, leader_trace=trace)
    for _ in range(n_local):
        events.begin(JOB).end("local", token=5)
    events.begin(JOB).end("kept", token=5)
    events.begin(JOB).end("remote", WaitTimeout("late"))
    events.begin(OTHER).end("leader", KeyError("x"), run_s=0.02, token=6)
    events.mark("lease_lost", OTHER, token=6)
    events.mark("rejected", JOB, detail="bad signature")
    events.mark("local_run", JOB)
    # Cache fill: a background refresh begun, a failed run a stale value stood in for, and
    # two calls served stale values; marks are never counted as calls.
    events.mark("refresh", JOB, token=7)
    events.mark("stood_in", JOB, token=7, detail="ConnectionError")
    events.begin(JOB).end("kept", token=5, stale="revalidate", age_s=2.5)
    events.begin(JOB).end("kept", token=5, stale="error", age_s=4.0)


def test_otel_counters_and_histograms_add_up_to_the_calls(sdk: OTel) -> None:
    _herd(n_remote=3, n_local=2)
    calls = {k: p.value for k, p in sdk.by_attrs("dedupe.calls").items()}
    assert calls == {
        ("leader", "value"): 1,
        ("remote", "value"): 3,
        ("local", "value"): 2,
        ("kept", "value"): 3,
        ("remote", "timeout"): 1,
        ("leader", "error"): 1,
    }
    durations = {k: p.count for k, p in sdk.by_attrs("dedupe.call.duration").items()}
    assert durations == calls  # one duration per call
    runs = {k: p.count for k, p in sdk.by_attrs("dedupe.run.duration").items()}
    assert runs == {("leader", "value"): 1, ("leader", "error"): 1}
    assert sdk.by_attrs("dedupe.run.duration")[("leader", "value")].sum == pytest.approx(0.01)
    waits = {k: p.count for k, p in sdk.by_attrs("dedupe.wait.duration").items()}
    assert waits == {("remote", "value"): 3, ("local", "value"): 2, ("remote", "timeout"): 1}
    stale = {
        (p.attributes["dedupe.stale.reason"], p.value) for p in sdk.points("dedupe.stale_served")
    }
    assert stale == {("revalidate", 1), ("error", 1)}
    for name in (
        "dedupe.takeovers",
        "dedupe.leases.lost",
        "dedupe.envelopes.rejected",
        "dedupe.local_runs",
        "dedupe.refreshes",
        "dedupe.errors_replaced",
    ):
        (point,) = sdk.points(name)
        prefix = "users" if name == "dedupe.leases.lost" else "reports"
        assert (point.value, point.attributes) == (1, {"dedupe.prefix": prefix}), name


def test_otel_follower_spans_link_to_the_leader_span(sdk: OTel) -> None:
    caller = sdk.tracers.get_tracer("app")
    with caller.start_as_current_span("request") as request:
        _herd(n_remote=3, n_local=1)
    spans = sdk.spans()
    leaders = [s for s in spans if s.name == "dedupe lead" and s.attributes["dedupe.token"] == 5]
    followers = [s for s in spans if s.name == "dedupe follow_remote"]
    assert len(leaders) == 1 and len(followers) == 3
    assert [s.attributes["dedupe.role"] for s in spans if s.name == "dedupe timeout"] == ["remote"]
    leader = leaders[0]
    for span in followers:
        assert [(ln.context.trace_id, ln.context.span_id) for ln in span.links] == [
            (leader.context.trace_id, leader.context.span_id)
        ]
    # Every dedupe span is a child of the caller's span, on the caller's trace.
    request_ctx = request.get_span_context()
    for span in spans:
        if span.name.startswith("dedupe "):
            assert span.parent is not None and span.parent.span_id == request_ctx.span_id
            assert span.context.trace_id == request_ctx.trace_id
    assert [e.name for e in leader.events] == ["dedupe.takeover"]
    failed = [s for s in spans if s.attributes.get("dedupe.outcome") == "error"]
    assert len(failed) == 1 and failed[0].status.description == "KeyError"


def test_otel_dedupe_span_is_current_while_the_leader_runs(sdk: OTel) -> None:
    app = sdk.tracers.get_tracer("app")
    lead = events.begin("job")
    with app.start_as_current_span("the work"):
        pass
    trace = events.trace_context()
    lead.end("leader")
    work, dedupe_span = sdk.spans()
    assert work.parent is not None and work.parent.span_id == dedupe_span.context.span_id
    assert otel.parse_traceparent(trace) == dedupe_span.context.__class__(
        dedupe_span.context.trace_id,
        dedupe_span.context.span_id,
        is_remote=True,
        trace_flags=dedupe_span.context.trace_flags,
    )
    assert events.trace_context() == b""  # the span is no longer current


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"00-" + b"0" * 32 + b"-" + b"1" * 16 + b"-01", b"01-" + b"a" * 32 + b"-x"],
)
def test_malformed_traceparents_link_nothing(data: bytes) -> None:
    assert otel.parse_traceparent(data) is None


def test_instrumenting_again_replaces_never_doubles(sdk: OTel) -> None:
    second = OTel()  # instrument() again: the first pipeline stops hearing events
    try:
        events.begin("job").end("leader")
        assert sum(p.value for p in second.points("dedupe.calls")) == 1
        assert not sdk.handle.active
        assert sdk.points("dedupe.calls") == []
    finally:
        second.handle.uninstrument()
    assert not events.enabled


# --- Prometheus ----------------------------------------------------------------------------


def _scrape(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Scrape the registry as Prometheus would (text), and parse the samples back."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _labels(role: str, outcome: str, prefix: str = "reports") -> frozenset[tuple[str, str]]:
    return frozenset({"prefix": prefix, "role": role, "outcome": outcome}.items())


def _of(samples: dict[Any, float], name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def test_prometheus_metrics_scraped_from_a_real_registry() -> None:
    registry = CollectorRegistry()
    metrics = prom.instrument(registry)
    try:
        _herd(n_remote=3, n_local=2)
        samples = _scrape(registry)
    finally:
        metrics.uninstrument()
    calls = _of(samples, "dedupe_calls_total")
    assert calls == {
        _labels("leader", "value"): 1,
        _labels("remote", "value"): 3,
        _labels("local", "value"): 2,
        _labels("kept", "value"): 3,
        _labels("remote", "timeout"): 1,
        _labels("leader", "error", "users"): 1,
    }
    assert _of(samples, "dedupe_call_duration_seconds_count") == calls
    assert _of(samples, "dedupe_wait_duration_seconds_count") == {
        _labels("remote", "value"): 3,
        _labels("local", "value"): 2,
        _labels("remote", "timeout"): 1,
    }
    assert _of(samples, "dedupe_run_duration_seconds_sum") == {
        _labels("leader", "value"): pytest.approx(0.01),
        _labels("leader", "error", "users"): pytest.approx(0.02),
    }
    names = ("takeovers", "leases_lost", "envelopes_rejected", "local_runs", "refreshes",
             "errors_replaced")  # fmt: skip
    for name in names:
        prefix = "users" if name == "leases_lost" else "reports"
        assert _of(samples, f"dedupe_{name}_total") == {frozenset({("prefix", prefix)}): 1}
    assert _of(samples, "dedupe_stale_served_total") == {
        frozenset({"prefix": "reports", "reason": "revalidate"}.items()): 1,
        frozenset({"prefix": "reports", "reason": "error"}.items()): 1,
    }
    assert "dedupe_" not in generate_latest(registry).decode()  # uninstrument unregisters
    assert not events.enabled


def test_prometheus_twice_on_one_registry_is_refused_cleanly() -> None:
    registry = CollectorRegistry()
    first = prom.instrument(registry)
    try:
        with pytest.raises(ValueError, match="Duplicated"):
            prom.instrument(registry)
        assert len(events.listeners) == 1
        events.begin(JOB).end("leader")
        assert _of(_scrape(registry), "dedupe_calls_total") == {_labels("leader", "value"): 1}
    finally:
        first.uninstrument()


# --- what the README says the adapters set ---------------------------------------------------

README = Path(__file__).parent.parent / "README.md"


def _readme_paragraph(heading: str, starts: str) -> str:
    """The README paragraph starting with ``starts`` under the section ``heading``."""
    text = README.read_text()
    section = text.split(f"\n{heading}\n", 1)[1].split("\n#", 1)[0]
    (paragraph,) = [p for p in section.split("\n\n") if p.startswith(starts)]
    return paragraph


def test_the_readme_names_the_attributes_and_labels_the_adapters_set(sdk: OTel) -> None:
    registry = CollectorRegistry()
    metrics = prom.instrument(registry)
    try:
        events.begin(JOB).end("leader", token=5)
        samples = _scrape(registry)
    finally:
        metrics.uninstrument()
    listed = re.findall(r"`([a-z_.]+)`", _readme_paragraph("### Metrics", "Attributes"))
    otel_names = {name for name in listed if name.startswith("dedupe.")}
    prom_names = set(listed) - otel_names
    (point,) = sdk.points("dedupe.calls")
    assert otel_names == set(point.attributes)  # what OpenTelemetry receives
    assert prom_names == {
        label for name, labels in samples if name == "dedupe_calls_total" for label, _ in labels
    }
    traces = _readme_paragraph("### Traces", "Each call is a span")
    (span,) = sdk.spans()
    assert {name for name in re.findall(r"`([a-z_.]+)`", traces) if "." in name} == set(
        span.attributes
    )
