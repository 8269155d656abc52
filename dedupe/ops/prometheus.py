"""Prometheus metrics for dedupe (``pip install 'redis-single-flight[prometheus]'``).

``instrument(registry)`` registers dedupe's metrics on a prometheus-client
CollectorRegistry (the default one if none is given) and feeds them from
:mod:`dedupe.ops.events`. Labels ``prefix`` (the SingleFlight's key prefix), ``role`` (leader,
local, remote, kept, copy, unknown) and ``outcome`` (value, error, timeout, backend_error,
failed); the event counters have ``prefix`` only, and ``stale_served`` ``prefix`` and
``reason`` (revalidate, error, timeout):

==================================  =========  ===============================================
``dedupe_calls_total``              counter    calls that ended, one per call
``dedupe_call_duration_seconds``    histogram  a call's start to its end
``dedupe_run_duration_seconds``     histogram  time the function ran (leaders, local runs)
``dedupe_wait_duration_seconds``    histogram  time a follower waited for another's run
``dedupe_takeovers_total``          counter    leads taken after a leader's lease expired
``dedupe_leases_lost_total``        counter    leases a running leader lost
``dedupe_envelopes_rejected_total`` counter    outcome records ignored (bad signature, ...)
``dedupe_local_runs_total``         counter    runs without Redis (local fallback)
``dedupe_refreshes_total``          counter    background runs begun (stale_while_revalidate,
                                               early_refresh)
``dedupe_errors_replaced_total``    counter    failed runs a stale value stood in for
                                               (stale_if_error)
``dedupe_stale_served_total``       counter    calls served a value past its result_ttl
==================================  =========  ===============================================

Several worker processes (gunicorn, uvicorn --workers): prometheus-client's multiprocess mode.
With ``PROMETHEUS_MULTIPROC_DIR`` set before prometheus-client is first imported, every
worker's values are written to that directory, and the registry a worker serves gathers all
of them with ``prometheus_client.multiprocess.MultiProcessCollector``. In that mode
``instrument()`` registers dedupe's metrics on no registry (as prometheus-client asks: one
registered beside the MultiProcessCollector would be exported twice, this worker's own values
beside the total); the registry argument is then only the one you serve. dedupe has only
counters and histograms, which multiprocess mode sums over every worker, live or gone; no
gauge needs a ``multiprocess_mode`` or ``mark_process_dead``.
"""

from __future__ import annotations

import threading
from typing import Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, values

from dedupe.ops import events
from dedupe.ops.events import Event

__all__ = ["PrometheusMetrics", "instrument", "multiprocess_mode"]

BUCKETS: Final = (*events.DURATION_BUCKETS, float("inf"))
_LABELS: Final = ("prefix", "role", "outcome")
_PREFIX: Final = ("prefix",)

# Multiprocess mode: the namespaces instrumented in this process. Their metrics are on no
# registry, so the registry cannot refuse a second instrument() that would count twice.
_unregistered: set[str] = set()
_unregistered_lock = threading.Lock()  # guards _unregistered


def multiprocess_mode() -> bool:
    """True if prometheus-client keeps metric values in ``PROMETHEUS_MULTIPROC_DIR`` (it
    decides once, when it is first imported)."""
    return values.ValueClass is not values.MutexValue


class PrometheusMetrics:
    """dedupe's collectors on one registry, fed by events while installed."""

    def __init__(self, registry: CollectorRegistry, namespace: str = "dedupe") -> None:
        self.registry = registry
        self.multiprocess = multiprocess_mode()
        # Where the metrics are registered: nowhere in multiprocess mode (see the module doc).
        self._target: CollectorRegistry | None = None if self.multiprocess else registry
        self._namespace = namespace
        self._lock = threading.Lock()  # guards _remove
        self._made: list[Counter | Histogram] = []
        self._reserved = False  # holds its namespace in _unregistered (multiprocess mode)
        if self.multiprocess:
            with _unregistered_lock:
                if namespace in _unregistered:
                    raise ValueError(
                        f"Duplicated timeseries: dedupe's metrics (namespace {namespace!r}) are "
                        "already instrumented in this process; call uninstrument() on the "
                        "first one, or use another namespace"
                    )
                _unregistered.add(namespace)
                self._reserved = True
        try:
            self.calls = self._counter(namespace, "calls", "Calls that ended", _LABELS)
            self.call_duration = self._histogram(
                namespace, "call_duration_seconds", "A call's start to its end"
            )
            self.run_duration = self._histogram(
                namespace, "run_duration_seconds", "Time the function ran"
            )
            self.wait_duration = self._histogram(
                namespace, "wait_duration_seconds", "Time a follower waited for another's run"
            )
            self.marks = {
                "takeover": self._counter(
                    namespace, "takeovers", "Leads taken after a leader's lease expired", _PREFIX
                ),
                "lease_lost": self._counter(
                    namespace, "leases_lost", "Leases a running leader lost", _PREFIX
                ),
                "rejected": self._counter(
                    namespace, "envelopes_rejected", "Outcome records ignored", _PREFIX
                ),
                "local_run": self._counter(
                    namespace, "local_runs", "Runs without Redis (local fallback)", _PREFIX
                ),
                "refresh": self._counter(
                    namespace, "refreshes", "Background runs begun (refreshes)", _PREFIX
                ),
                "stood_in": self._counter(
                    namespace, "errors_replaced", "Failed runs a stale value stood in", _PREFIX
                ),
            }
            self.stale = self._counter(
                namespace, "stale_served", "Calls served a value past its result_ttl",
                ("prefix", "reason"),
            )  # fmt: skip
        except ValueError:
            self._unregister()  # leave the registry as we found it
            raise
        self._remove = events.add_listener(self)

    def _counter(
        self, namespace: str, name: str, text: str, labels: tuple[str, ...] = ()
    ) -> Counter:
        c = Counter(name, text, labels, namespace=namespace, registry=self._target)
        self._made.append(c)
        return c

    def _histogram(self, namespace: str, name: str, text: str) -> Histogram:
        h = Histogram(
            name, text, _LABELS, namespace=namespace, buckets=BUCKETS, registry=self._target
        )
        self._made.append(h)
        return h

    def _unregister(self) -> None:
        if self._target is None:
            with _unregistered_lock:
                if self._reserved:
                    _unregistered.discard(self._namespace)
                    self._reserved = False
        else:
            for collector in self._made:
                try:
                    self._target.unregister(collector)
                except KeyError:
                    pass  # already gone
        self._made = []

    def __call__(self, event: Event) -> None:
        if event.kind in events.MARK_KINDS:
            counter = self.marks.get(event.kind)
            if counter is not None:
                counter.labels(event.prefix).inc()
            return
        labels = (event.prefix, event.role or "unknown", event.outcome)
        self.calls.labels(*labels).inc()
        if event.stale:
            self.stale.labels(event.prefix, event.stale).inc()
        if event.duration_s is not None:
            self.call_duration.labels(*labels).observe(event.duration_s)
        if event.run_s is not None:
            self.run_duration.labels(*labels).observe(event.run_s)
        if event.wait_s is not None:
            self.wait_duration.labels(*labels).observe(event.wait_s)

    def uninstrument(self) -> None:
        """Stop feeding these metrics and unregister them from the registry."""
        with self._lock:
            remove, self._remove = self._remove, _nothing
        remove()
        self._unregister()


def _nothing() -> None:
    return None


def instrument(
    registry: CollectorRegistry | None = None, *, namespace: str = "dedupe"
) -> PrometheusMetrics:
    """Register dedupe's metrics on ``registry`` (default: the global REGISTRY) and feed them.

    In prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) they are
    registered nowhere: serve a registry with a ``MultiProcessCollector`` (module doc).
    Raises ValueError (prometheus-client's duplicate-timeseries error) if that registry
    already has dedupe's metrics (in multiprocess mode: if this process has them): call
    ``uninstrument()`` on the first one, or use another ``namespace``.
    """
    return PrometheusMetrics(REGISTRY if registry is None else registry, namespace)
