"""``python -m benchmarks [--quick] [--only NAMES]``: run the scenarios and write the report."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from devtools.servers import RedisServer

from . import callgrind, flight_memory, herd_fastapi, hit, scenarios, server_time
from .pool import WorkerPool
from .report import SCENARIOS, Report, plots

RESULTS = Path(__file__).resolve().parent / "results"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _meta(server: RedisServer, quick: bool) -> dict[str, str]:
    out = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    ver = next((w.split("=")[1] for w in out.split() if w.startswith("v=")), "?")
    return {
        "python": platform.python_version(),
        "cores": str(os.cpu_count()),
        "redis-server": ver,
        "redis-py": _version("redis"),
        "hiredis": _version("hiredis"),
        "peers": ", ".join(
            f"{d} {_version(d)}" for d in ("dogpile.cache", "python-redis-lock", "cashews")
        ),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer samples; about 2 minutes")
    ap.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of: {', '.join(SCENARIOS)}",
    )
    ap.add_argument(
        "--out",
        default=None,
        help=f"where latest.md and the plots go (default {RESULTS}; with --quick, its quick/,"
        " git-ignored, so a quick run never replaces the committed full results)",
    )
    ns = ap.parse_args(argv)
    only = [s.strip() for s in ns.only.split(",") if s.strip()]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios: {', '.join(sorted(unknown))}")

    p = scenarios.Params.make(ns.quick)
    outdir = Path(ns.out) if ns.out else (RESULTS / "quick" if ns.quick else RESULTS)
    outdir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    res: dict[str, Any] = {}
    timings: dict[str, float] = {}
    server = RedisServer().start()
    pool: WorkerPool | None = None
    try:
        admin = redis.Redis.from_url(server.url)
        print(
            f"redis-server on {server.url} (pid {server.pid}); mode: "
            f"{'quick' if p.quick else 'full'}",
            flush=True,
        )
        meta = _meta(server, p.quick)

        def timed(name: str, fn: Any, *args: Any) -> None:
            if name not in only:
                return
            t0 = time.monotonic()
            print(f"[{name}] ...", flush=True)
            res[name] = fn(*args)
            timings[name] = time.monotonic() - t0
            print(f"[{name}] {timings[name]:.1f}s", flush=True)
            admin.flushall()

        timed("callgrind", callgrind.scenario, server.url, p.quick)
        timed("servertime", server_time.scenario, server.url, p.quick)
        timed("hit", hit.scenario, server.url, p)
        timed("overhead", scenarios.overhead, server.url, p)
        if {"wake", "stampede", "steady"} & set(only):
            t0 = time.monotonic()
            pool = WorkerPool(p.procs, server.url)
            print(f"[pool] {p.procs} spawned workers up in {time.monotonic() - t0:.1f}s")
            timed("wake", scenarios.wake, pool, p)
            timed("stampede", scenarios.stampede, pool, server.url, p)
            timed("steady", scenarios.steady, pool, server.url, p)
            pool.close()
            pool = None
        timed("throughput", scenarios.throughput, server.url, p)
        timed("memory", scenarios.memory, server.url, p)
        timed("herd", herd_fastapi.run, server.url, 2 if p.quick else 5, 3 if p.quick else 6)
        timed("flightmem", flight_memory.scenario, server.url, p.quick)
        admin.close()
    finally:
        if pool is not None:
            pool.close()
        server.stop()

    elapsed = time.monotonic() - t_start
    meta["run time"] = (
        f"{elapsed:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")"
    )
    text = Report(res, p, meta).build()
    made = plots(res, outdir)
    text += "\n" + "\n".join(f"![{m.stem}]({m.name})" for m in made) + "\n"
    (outdir / "latest.md").write_text(text)
    if "flightmem" in res:  # also alone, as `python -m benchmarks.flight_memory` writes it
        (outdir / "flight_memory.md").write_text(flight_memory.document(res["flightmem"]["rows"]))
    print()
    print(text)
    print(f"wrote {outdir / 'latest.md'} and {len(made)} plots in {elapsed:.0f} s", file=sys.stderr)
    return 0
