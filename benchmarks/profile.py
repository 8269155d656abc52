"""Profile dedupe's hot paths.

``python -m benchmarks.profile [parts|overhead|throughput|stampede]``:

- ``overhead``: scenario 1, one caller, fresh key per call (sync and async), pyinstrument trees
  and the cProfile functions with the most own time, per call;
- ``throughput``: scenario 5 (100 tasks async; 8 threads sync, thread 0 profiled);
- ``stampede``: scenario 3 in the 4 spawned workers (thread 0 / the loop of each worker);
- ``parts``: the pieces of one call timed alone (µs per call), to weigh what a fix would save.

Text reports go to ``benchmarks/results/profile/``. It starts its own redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import threading
import time
import timeit
from pathlib import Path
from typing import Any

from devtools.servers import RedisServer

from .tools import DedupeNoop, DedupeNoopAsync, RawAsync, RawSync

OUT = Path(__file__).resolve().parent / "results" / "profile"


def _pyinstrument() -> Any:
    from pyinstrument import Profiler

    return Profiler(interval=0.0002, async_mode="disabled")


def _top(prof: cProfile.Profile, calls: int, limit: int = 25) -> str:
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime")
    rows = []
    for func, (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append((tt, ct, nc, func))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    lines = [
        f"cProfile: {calls} calls, {total / calls * 1e6:.0f} µs/call of profiled time "
        "(cProfile inflates pure-Python frames; compare rows, not totals)",
        f"{'own µs/call':>12} {'cum µs/call':>12} {'calls/call':>10}  function",
    ]
    for tt, ct, nc, (file, line, name) in rows[:limit]:
        where = file.split("site-packages/")[-1].split("/work/main/")[-1]
        lines.append(
            f"{tt / calls * 1e6:12.1f} {ct / calls * 1e6:12.1f} {nc / calls:10.2f}  "
            f"{name} ({where}:{line})"
        )
    return "\n".join(lines)


def overhead(url: str, out: Path, n: int) -> None:
    for cls in (RawSync, DedupeNoop):
        tool = cls(url, f"p1:{cls.__name__}")
        for i in range(300):
            tool(i)
        base = 10**6
        t0 = time.perf_counter()
        for i in range(n):
            tool(base + i)
        plain = (time.perf_counter() - t0) / n * 1e6
        prof = _pyinstrument()
        prof.start()
        for i in range(n):
            tool(2 * base + i)
        prof.stop()
        cp = cProfile.Profile()
        cp.enable()
        for i in range(n):
            tool(3 * base + i)
        cp.disable()
        tool.close()
        text = (
            f"{cls.__name__}: {plain:.0f} µs/call unprofiled ({n} calls)\n\n"
            + prof.output_text(unicode=True, show_all=False)
            + "\n"
            + _top(cp, n)
        )
        (out / f"overhead-sync-{cls.__name__}.txt").write_text(text)
        print(f"overhead sync {cls.__name__}: {plain:.0f} µs/call")

    async def run_async() -> None:
        for cls in (RawAsync, DedupeNoopAsync):
            tool = cls(url, f"p1a:{cls.__name__}")
            await tool.start()
            for i in range(300):
                await tool(i)
            base = 10**6
            t0 = time.perf_counter()
            for i in range(n):
                await tool(base + i)
            plain = (time.perf_counter() - t0) / n * 1e6
            prof = _pyinstrument()
            prof.start()
            for i in range(n):
                await tool(2 * base + i)
            prof.stop()
            cp = cProfile.Profile()
            cp.enable()
            for i in range(n):
                await tool(3 * base + i)
            cp.disable()
            await tool.close()
            text = (
                f"{cls.__name__}: {plain:.0f} µs/call unprofiled ({n} calls)\n\n"
                + prof.output_text(unicode=True, show_all=False)
                + "\n"
                + _top(cp, n)
            )
            (out / f"overhead-async-{cls.__name__}.txt").write_text(text)
            print(f"overhead async {cls.__name__}: {plain:.0f} µs/call")

    asyncio.run(run_async())


def throughput(url: str, out: Path, seconds: float) -> None:
    counter = iter(range(10**12))
    lock = threading.Lock()

    def next_i() -> int:
        with lock:
            return next(counter)

    for cls in (RawSync, DedupeNoop):
        tool = cls(url, f"p5:{cls.__name__}")
        counts = [0] * 8
        end = time.monotonic() + seconds
        prof = _pyinstrument()

        def worker(
            t: int, tool: Any = tool, end: float = end, prof: Any = prof, counts: Any = counts
        ) -> None:
            if t == 0:
                prof.start()
            n = 0
            while time.monotonic() < end:
                tool(next_i())
                n += 1
            counts[t] = n
            if t == 0:
                prof.stop()

        ts = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(seconds + 30)
        tool.close()
        rate = sum(counts) / seconds
        (out / f"throughput-sync-{cls.__name__}.txt").write_text(
            f"{cls.__name__}: {rate:.0f} flights/s with 8 threads (thread 0 profiled)\n\n"
            + prof.output_text(unicode=True, show_all=False)
        )
        print(f"throughput sync {cls.__name__}: {rate:.0f}/s")

    async def run_async() -> None:
        for cls in (RawAsync, DedupeNoopAsync):
            tool = cls(url, f"p5a:{cls.__name__}")
            await tool.start()
            end = time.monotonic() + seconds

            async def worker(tool: Any = tool, end: float = end) -> int:
                n = 0
                while time.monotonic() < end:
                    await tool(next_i())
                    n += 1
                return n

            # pyinstrument and cProfile both hook the profiler: one run each.
            prof = _pyinstrument()
            prof.start()
            counts = await asyncio.gather(*(worker() for _ in range(100)))
            prof.stop()
            rate = sum(counts) / seconds
            end = time.monotonic() + seconds
            cp = cProfile.Profile()
            cp.enable()
            counts = await asyncio.gather(*(worker(end=end) for _ in range(100)))
            cp.disable()
            await tool.close()
            (out / f"throughput-async-{cls.__name__}.txt").write_text(
                f"{cls.__name__}: {rate:.0f} flights/s with 100 tasks (profiled)\n\n"
                + prof.output_text(unicode=True, show_all=False)
                + "\n"
                + _top(cp, sum(counts))
            )
            print(f"throughput async {cls.__name__}: {rate:.0f}/s (profiled)")

    asyncio.run(run_async())


def stampede(url: str, out: Path, keys: int) -> None:
    from .pool import WorkerPool
    from .scenarios import JOB_S, PAYLOAD

    pool = WorkerPool(4, url)
    try:
        for mode in ("sync", "async"):
            task = {
                "kind": "stampede",
                "tool": "dedupe",
                "mode": mode,
                "prefix": f"p3:{mode}",
                "keys": [f"k{i}" for i in range(keys)],
                "job_s": JOB_S,
                "payload": PAYLOAD,
                "ttl": 60.0,
                "threads": 16,
                "tasks": 64,
                "seed": 0,
                "profile": str(out),
            }
            res = pool.run(task)
            per_key = sum(w["executions"] for w in res) / keys
            print(f"stampede {mode}: {per_key:.2f} executions/key; profiles in {out}")
    finally:
        pool.close()


def parts(url: str, out: Path) -> None:
    """Time the pieces of one dedupe call in isolation."""
    import pickle

    import cloudpickle

    from dedupe import SingleFlight
    from dedupe.backend.commands import acquire_call, complete_call
    from dedupe.core.keys import names_for
    from dedupe.core.leases import Lease
    from dedupe.core.protocol import Acquire, Complete
    from dedupe.core.sealing import Outcome

    sf = SingleFlight(url, prefix="parts")

    @sf(key="{i}")
    def noop(i: int) -> None:
        return None

    backend = sf.backend()
    codec = backend.codec
    client = backend.sync_client()
    from dedupe.core.keys import key_builder
    from dedupe.overrides import Overrides

    kb = key_builder(getattr(noop, "__wrapped__"), "{i}")  # noqa: B009
    o = Overrides()
    make = sf._spec_maker(backend, names_for("parts", "job"), o)
    spec = make(None, None)
    payload = b"x" * 1024
    channel = spec.names.channel
    rec = codec.seal(Outcome(value=None), channel=channel, token=1, keep_ms=1000, ttl_ms=12000)
    rec1k = codec.seal(Outcome(value=payload), channel=channel, token=1, keep_ms=1000, ttl_ms=12000)
    renewer = backend.renewer()

    def lease_cycle() -> None:
        lease = Lease("job", "lock", "1:o", 10.0)
        renewer.add(lease)
        renewer.remove(lease)

    from dedupe.core.protocol import run_flight

    def flight_steps() -> None:
        from dedupe.core.protocol import LEAD, Acquired

        g = run_flight(spec, codec, time.monotonic)
        g.send(None)
        g.send(Acquired(LEAD, token=1))
        try:
            g.send(Outcome(value=None))
            g.send(True)
        except StopIteration:
            pass

    items: list[tuple[str, Any, int]] = [
        (
            "key builder: bind arguments + template (KeyBuilder.__call__)",
            lambda: kb((1,), {}),
            20000,
        ),
        ("names_for (validate + tag + 4 f-strings)", lambda: names_for("dedupe", "job:1"), 20000),
        (
            "names_for + SingleFlight._spec_maker(...) + make(None)",
            lambda: sf._spec_maker(backend, names_for("parts", "j"), o)(None),
            20000,
        ),
        ("backend.owner() (uuid base + counter)", backend.owner, 20000),
        (
            "codec.seal(None)",
            lambda: codec.seal(
                Outcome(value=None), channel=channel, token=1, keep_ms=1000, ttl_ms=12000
            ),
            20000,
        ),
        ("cloudpickle.dumps(None)", lambda: cloudpickle.dumps(None, protocol=5), 20000),
        ("pickle.dumps(None)", lambda: pickle.dumps(None, protocol=5), 20000),
        ("cloudpickle.dumps(1 KB bytes)", lambda: cloudpickle.dumps(payload, protocol=5), 20000),
        ("pickle.dumps(1 KB bytes)", lambda: pickle.dumps(payload, protocol=5), 20000),
        ("codec.open(1 KB value)", lambda: codec.open(rec1k, channel=channel), 20000),
        (
            "acquire_call + evalsha_args",
            lambda: acquire_call(spec, Acquire("")).evalsha_args(),
            20000,
        ),
        (
            "complete_call + evalsha_args",
            lambda: complete_call(
                spec, Complete("1:o", rec, 12000, b"", 1), "PUBLISH"
            ).evalsha_args(),
            20000,
        ),
        ("Lease() + renewer.add + remove", lease_cycle, 20000),
        ("threading.Event()", threading.Event, 20000),
        ("run_flight generator, leader path, no I/O", flight_steps, 20000),
        ("redis-py client.evalsha round trip (tiny script)", None, 2000),
        ("redis-py client.set NX PX round trip", None, 2000),
    ]
    sha = client.script_load("return 1")
    ctr = iter(range(10**9))
    lines = ["µs per call, measured alone (timeit, best of 5):"]
    for label, fn, number in items:
        if label.startswith("redis-py client.evalsha"):
            fn = lambda: client.evalsha(sha, 0)  # noqa: E731
        elif label.startswith("redis-py client.set"):
            fn = lambda: client.set(f"parts:{next(ctr)}", "v", nx=True, px=10000)  # noqa: E731
        best = min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6
        lines.append(f"{best:9.2f}  {label}")
    sf.close()
    text = "\n".join(lines)
    (out / "parts.txt").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    ap.add_argument(
        "what",
        nargs="*",
        default=["parts", "overhead", "throughput", "stampede"],
        choices=["parts", "overhead", "throughput", "stampede"],
    )
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("-n", type=int, default=3000, help="calls for overhead")
    ns = ap.parse_args(argv)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    server = RedisServer().start()
    try:
        for what in ns.what:
            if what == "parts":
                parts(server.url, out)
            elif what == "overhead":
                overhead(server.url, out, ns.n)
            elif what == "throughput":
                throughput(server.url, out, 3.0)
            elif what == "stampede":
                stampede(server.url, out, 20)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
