"""What an installed metrics adapter costs an uncontended flight, side by side with none.

``python -m benchmarks.adapters [--calls N] [--repeats R] [--out FILE]`` starts a private
redis-server and times N uncontended sync flights (distinct keys, result_ttl 0) with no
adapter, with the Prometheus adapter, and with the OpenTelemetry adapter (metrics only, then
metrics and spans, on the SDK's in-memory exporters), interleaved within each repeat. Each
figure is the median of the repeats with its spread; ratios are to "no adapter" in the same
repeat, so the machine's noise cancels as far as it can. `make bench` runs it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from dedupe import SingleFlight
from dedupe.ops import otel
from dedupe.ops import prometheus as prom
from devtools.servers import RedisServer

from .stats import Spread

_Setup = Callable[[], Callable[[], None]]  # installs an adapter, returns its uninstall


def _none() -> Callable[[], None]:
    return lambda: None


def _prometheus() -> Callable[[], None]:
    from prometheus_client import CollectorRegistry

    handle = prom.instrument(CollectorRegistry())
    return handle.uninstrument


def _otel(traces: bool) -> _Setup:
    def setup() -> Callable[[], None]:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
        tracer = TracerProvider()
        tracer.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        otel.instrument(meter_provider=meters, tracer_provider=tracer, traces=traces)
        return otel.uninstrument

    return setup


SETUPS: dict[str, _Setup] = {
    "no adapter": _none,
    "prometheus": _prometheus,
    "otel metrics": _otel(traces=False),
    "otel metrics + spans": _otel(traces=True),
}


def _per_call_us(sf: SingleFlight, calls: int) -> float:
    tag = uuid.uuid4().hex[:8]
    t0 = time.perf_counter()
    for i in range(calls):
        sf.call(f"{tag}:{i}", int, i)
    return (time.perf_counter() - t0) / calls * 1e6


def run(calls: int, repeats: int) -> dict[str, tuple[Spread, Spread]]:
    per: dict[str, list[float]] = {name: [] for name in SETUPS}
    ratios: dict[str, list[float]] = {name: [] for name in SETUPS}
    with RedisServer() as server:
        sf = SingleFlight(server.url, prefix="bench-adapters", result_ttl=0)
        try:
            _per_call_us(sf, 200)  # warm: connections, script cache
            for _ in range(repeats):
                base = 0.0
                for name, setup in SETUPS.items():
                    uninstall = setup()
                    try:
                        us = _per_call_us(sf, calls)
                    finally:
                        uninstall()
                    per[name].append(us)
                    if name == "no adapter":
                        base = us
                    ratios[name].append(us / base)
        finally:
            sf.close(timeout=0)
    return {name: (Spread.of(per[name]), Spread.of(ratios[name])) for name in SETUPS}


def report(results: dict[str, tuple[Spread, Spread]], calls: int, repeats: int) -> str:
    lines = [
        f"Uncontended sync flights, {calls} per figure, median of {repeats} repeats "
        "(min-max), adapters interleaved within each repeat:",
        "",
        "| adapter | µs per call | vs no adapter |",
        "| --- | --- | --- |",
    ]
    for name, (us, ratio) in results.items():
        lines.append(
            f"| {name} | {us.median:.0f} ({us.lo:.0f}-{us.hi:.0f}) | "
            f"{ratio.median:.2f}x ({ratio.lo:.2f}-{ratio.hi:.2f}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.adapters", description=__doc__)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    ns = p.parse_args(argv)
    results = run(ns.calls, ns.repeats)
    text = report(results, ns.calls, ns.repeats)
    print(text)
    if ns.out is not None:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(text)
    spread = statistics.median(r.median for _, r in results.values())
    return 0 if spread == spread else 1  # NaN only if nothing ran


if __name__ == "__main__":
    sys.exit(main())
