"""Events, OpenTelemetry and Prometheus on real flights: herds across processes, takeovers.

They go through the drivers' calls to dedupe.ops.events, on real flights.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from typing import Any

import pytest
import redis
from helpers import SPAWN, start, until
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dedupe import SingleFlight
from dedupe.core.keys import names_for
from dedupe.ops import events, otel
from dedupe.ops import prometheus as prom
from dedupe.ops.events import Event

pytestmark = pytest.mark.timeout(60)


def _pipeline() -> tuple[Any, Any, Any]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    reader, exporter = InMemoryMetricReader(), InMemorySpanExporter()
    tracers = TracerProvider()
    tracers.add_span_processor(SimpleSpanProcessor(exporter))
    otel.instrument(meter_provider=MeterProvider(metric_readers=[reader]), tracer_provider=tracers)
    return reader, exporter, tracers


def _spans(exporter: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": s.name,
            "ids": (s.context.trace_id, s.context.span_id),
            "parent": s.parent.span_id if s.parent else None,
            "links": [(ln.context.trace_id, ln.context.span_id) for ln in s.links],
            "role": s.attributes.get("dedupe.role"),
        }
        for s in exporter.get_finished_spans()
    ]


def _calls(reader: Any) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == "dedupe.calls":
                    for p in metric.data.data_points:
                        key = (p.attributes["dedupe.role"], p.attributes["dedupe.outcome"])
                        counts[key] = counts.get(key, 0) + p.value
    return counts


def follower(url: str, prefix: str, job: str, out: Any) -> None:
    """A spawned follower: its own SDK, one call under a 'request' span, spans sent back."""
    reader, exporter, tracers = _pipeline()
    sf = SingleFlight(url, prefix=prefix)
    try:
        with tracers.get_tracer("app").start_as_current_span("request"):
            value = sf.call(job, lambda: f"follower {os.getpid()} ran it")
        out.put((value, _spans(exporter), _calls(reader)))
    finally:
        sf.close()
        otel.uninstrument()


def test_cross_process_herd_links_every_follower_span_to_the_one_leader_span(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any]
) -> None:
    n = 3
    job = "herd"
    channel = names_for(prefix, job).channel
    reader, exporter, tracers = _pipeline()
    sf = SingleFlight(redis_url, prefix=prefix)
    release, started = threading.Event(), threading.Event()
    got: list[str] = []

    def work() -> str:
        started.set()
        assert release.wait(30), "never released"
        return "the leader's value"

    def lead() -> None:
        with tracers.get_tracer("app").start_as_current_span("request"):
            got.append(sf.call(job, work))

    out = SPAWN.Queue()
    leader = threading.Thread(target=lead)
    leader.start()
    try:
        assert started.wait(10)
        for _ in range(n):
            start(procs, follower, redis_url, prefix, job, out)
        until(lambda: redis_client.pubsub_numsub(channel)[0][1] == n, 30, "followers waiting")
    finally:
        release.set()
        leader.join(30)
    results = [out.get(timeout=30) for _ in range(n)]
    sf.close()
    otel.uninstrument()

    assert got == ["the leader's value"]
    mine = _spans(exporter)
    (lead_span,) = [s for s in mine if s["name"] == "dedupe lead"]
    (request,) = [s for s in mine if s["name"] == "request"]
    assert lead_span["parent"] == request["ids"][1] and lead_span["role"] == "leader"
    assert _calls(reader) == {("leader", "value"): 1}
    total = 1
    for value, spans, calls in results:
        assert value == "the leader's value"
        (span,) = [s for s in spans if s["name"].startswith("dedupe ")]
        assert span["name"] == "dedupe follow_remote" and span["role"] == "remote"
        assert span["links"] == [lead_span["ids"]]  # linked across processes to the leader
        assert calls == {("remote", "value"): 1}
        total += sum(calls.values())
    assert total == n + 1  # the counters add up to the calls made


def test_prometheus_counts_add_up_to_real_calls(redis_url: str, prefix: str) -> None:
    registry = CollectorRegistry()
    metrics = prom.instrument(registry)
    sf = SingleFlight(redis_url, prefix=prefix, result_ttl=30)
    runs = []

    async def work() -> str:
        runs.append(1)
        return "v"

    async def herd() -> list[str]:
        # gather starts every caller before the flight's task runs: one leads, four join.
        values = await asyncio.gather(*(sf.call("job", work) for _ in range(5)))
        return [*values, await sf.call("job", work)]  # the kept value, from Redis

    try:
        assert asyncio.run(herd()) == ["v"] * 6 and runs == [1]
        text = generate_latest(registry).decode()
    finally:
        metrics.uninstrument()
        sf.close()
    samples = {
        (sample.name, sample.labels.get("role"), sample.labels.get("outcome")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("prefix") == prefix
    }
    calls = {k[1:]: v for k, v in samples.items() if k[0] == "dedupe_calls_total"}
    assert calls == {("leader", "value"): 1, ("local", "value"): 4, ("kept", "value"): 1}
    assert samples["dedupe_wait_duration_seconds_count", "local", "value"] == 4


def dying_leader(url: str, prefix: str, job: str) -> None:
    sf = SingleFlight(url, prefix=prefix, lock_ttl=0.5)
    client = redis.Redis.from_url(url)

    def hang() -> str:
        client.rpush(f"{prefix}:leading", os.getpid())
        client.blpop([f"{prefix}:never"], timeout=60)
        return "never"

    sf.call(job, hang)


def test_a_takeover_and_a_rejected_envelope_are_reported(
    redis_url: str, prefix: str, redis_client: redis.Redis, procs: list[Any]
) -> None:
    job = "orphan"
    seen: list[Event] = []
    remove = events.add_listener(seen.append)
    sf = SingleFlight(redis_url, prefix=prefix, lock_ttl=0.5)
    try:
        child = start(procs, dying_leader, redis_url, prefix, job)
        assert redis_client.blpop([f"{prefix}:leading"], timeout=30) is not None
        result: list[str] = []
        waiter = threading.Thread(target=lambda: result.append(sf.call(job, lambda: "mine")))
        waiter.start()
        channel = names_for(prefix, job).channel
        until(lambda: redis_client.pubsub_numsub(channel)[0][1] == 1, 30, "the follower")
        redis_client.publish(channel, b"not an outcome")
        until(lambda: any(e.kind == "rejected" for e in seen), 30, "a rejected event")
        os.kill(child.pid, signal.SIGKILL)
        waiter.join(30)
    finally:
        remove()
        sf.close()
    assert result == ["mine"]
    kinds = [e.kind for e in seen]
    assert kinds[-2:] == ["takeover", "lead"] and kinds.count("rejected") == 1
    assert seen[-1].token == seen[-2].token > 0 and seen[-1].role == "leader"


def _ids(span: dict[str, Any]) -> tuple[int, int]:
    trace_id, span_id = span["ids"]
    return trace_id, span_id


def test_in_process_followers_spans_link_to_the_leader_span_sync(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    """Threads of one instance join its flight ("local"); another instance (as another
    process would) follows it through Redis ("remote"), and threads join that one in turn."""
    _, exporter, _ = _pipeline()
    leading = SingleFlight(redis_url, prefix=prefix)
    following = SingleFlight(redis_url, prefix=prefix)
    release, started = threading.Event(), threading.Event()
    got: list[str] = []

    def work() -> str:
        started.set()
        assert release.wait(30), "never released"
        return "the leader's value"

    def waiting(sf: SingleFlight) -> int:
        return sum(info.waiters for info in sf.inflight())

    threads = [threading.Thread(target=lambda: got.append(leading.call("job", work)))]
    threads[0].start()
    try:
        assert started.wait(10)
        for sf in (leading, leading, following, following, following):
            threads.append(threading.Thread(target=lambda sf=sf: got.append(sf.call("job", work))))
            threads[-1].start()
        channel = names_for(prefix, "job").channel
        until(lambda: waiting(leading) == 3 and waiting(following) == 3, 15, "the followers")
        # ...and the second instance's flight follows the lease (it subscribed once it
        # found the job busy), so it gets the outcome as a remote follower.
        until(lambda: redis_client.pubsub_numsub(channel)[0][1] == 1, 15, "the subscription")
    finally:
        release.set()
        for t in threads:
            t.join(30)
        leading.close()
        following.close()
        otel.uninstrument()
    assert got == ["the leader's value"] * 6
    spans = _spans(exporter)
    (lead,) = [s for s in spans if s["name"] == "dedupe lead"]
    remote = [s for s in spans if s["name"] == "dedupe follow_remote"]
    local = [s for s in spans if s["name"] == "dedupe follow_local"]
    assert (len(remote), len(local)) == (1, 4)
    for span in remote + local:
        assert span["links"] == [_ids(lead)], span  # the span of the run, wherever it ran
    assert {s["role"] for s in local} == {"local"}


def test_in_process_followers_spans_link_to_the_leader_span_async(
    redis_url: str, prefix: str
) -> None:
    _, exporter, _ = _pipeline()
    sf = SingleFlight(redis_url, prefix=prefix)

    async def work() -> str:
        return "v"

    async def herd() -> list[str]:
        # gather starts every caller before the flight's task runs: one leads, three join.
        return await asyncio.gather(*(sf.call("job", work) for _ in range(4)))

    try:
        assert asyncio.run(herd()) == ["v"] * 4
    finally:
        sf.close()
        otel.uninstrument()
    spans = _spans(exporter)
    (lead,) = [s for s in spans if s["name"] == "dedupe lead"]
    local = [s for s in spans if s["name"] == "dedupe follow_local"]
    assert len(local) == 3
    assert all(s["links"] == [_ids(lead)] for s in local), local


def multiprocess_worker(url: str, prefix: str, job: str, lead: bool, done: Any, out: Any) -> None:
    """A spawned worker in prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR is
    set), instrumented on the registry it would serve: prometheus-client's recipe, a
    CollectorRegistry with a MultiProcessCollector."""
    from prometheus_client import multiprocess, values

    assert values.ValueClass is not values.MutexValue, "not in multiprocess mode"
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    metrics = prom.instrument(registry)
    try:
        prom.instrument(registry)  # would count every call twice: refused, as without the mode
        raise AssertionError("instrumented twice")
    except ValueError as exc:
        assert "Duplicated" in str(exc)
    sf = SingleFlight(url, prefix=prefix)
    client = redis.Redis.from_url(url)

    def work() -> str:
        client.rpush(f"{prefix}:leading", os.getpid())
        client.blpop([f"{prefix}:go"], timeout=30)
        return f"run by {os.getpid()}"

    try:
        if not lead:  # follow: call once the other worker leads
            assert client.blpop([f"{prefix}:leading"], timeout=30) is not None
        value = sf.call(job, work)
        done.wait(30)  # both calls ended: a scrape now sees both workers
        out.put((lead, value, generate_latest(registry).decode()))
    finally:
        metrics.uninstrument()
        sf.close()


def _family_samples(text: str) -> tuple[list[str], dict[tuple[str, str], float]]:
    families = list(text_string_to_metric_families(text))
    calls = {
        (s.labels["role"], s.labels["outcome"]): s.value
        for f in families
        if f.name == "dedupe_calls"
        for s in f.samples
        if s.name == "dedupe_calls_total"
    }
    return [f.name for f in families], calls


def test_prometheus_multiprocess_mode_shows_every_worker(
    redis_url: str,
    prefix: str,
    redis_client: redis.Redis,
    procs: list[Any],
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prometheus_client import multiprocess

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # the workers inherit it
    job = "report"
    done, out = SPAWN.Barrier(2), SPAWN.Queue()
    start(procs, multiprocess_worker, redis_url, prefix, job, True, done, out)
    start(procs, multiprocess_worker, redis_url, prefix, job, False, done, out)
    channel = names_for(prefix, job).channel
    until(lambda: redis_client.pubsub_numsub(channel)[0][1] == 1, 30, "the follower")
    redis_client.rpush(f"{prefix}:go", "go")
    scrapes = [out.get(timeout=30) for _ in range(2)]
    assert len({value for _, value, _ in scrapes}) == 1  # one run, shared
    # A scrape in either worker, and in a process that only collects, shows both workers:
    # one leader and one remote call, each once (no worker's own copy beside the total).
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
    texts = [text for _, _, text in scrapes] + [generate_latest(registry).decode()]
    for text in texts:
        names, calls = _family_samples(text)
        assert len(names) == len(set(names)), names  # a family twice: Prometheus rejects it
        assert calls == {("leader", "value"): 1.0, ("remote", "value"): 1.0}, text
