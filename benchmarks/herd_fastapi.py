"""A FastAPI herd, tried as a new user would: uvicorn with 4 workers, 200 concurrent requests.

``python -m benchmarks.herd_fastapi [--quick]`` starts its own redis-server, then for each tool
(dedupe, cashews) and repeat a real uvicorn (``--workers 4``, 127.0.0.1, a free port), and
sends herds of 200 concurrent httpx requests for one cold key each; the endpoint runs a 200 ms
job through the tool (dedupe: a decorated function with a long ``result_ttl``; cashews:
``@cache(lock=True)``). The job stamps its end (``time.monotonic_ns()``, one clock for every
process) into its value; each request that was waiting when the job ended reports its *wake
lag*, from the job's end to its handler having the value. Executions are counted in Redis.

Bounded: every request has a timeout, the server is started and stopped by its own PID
(SIGTERM, then SIGKILL after 10 s), and the whole run gives up after ``--budget`` seconds.
The module is also the ASGI app (``benchmarks.herd_fastapi:app``), configured by environment
variables HERD_TOOL, HERD_URL and HERD_PREFIX.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

JOB_S = 0.200
CONCURRENCY = 200
WORKERS = 4
TOOLS = ("dedupe", "cashews")


# --------------------------------------------------------------------------- the app (in uvicorn)


def make_app() -> Any:
    import redis.asyncio
    from fastapi import FastAPI

    tool = os.environ.get("HERD_TOOL", "dedupe")
    url = os.environ.get("HERD_URL", "redis://127.0.0.1:6390/0")
    prefix = os.environ.get("HERD_PREFIX", "herd")
    counter = redis.asyncio.Redis.from_url(url)
    startup: list[Any] = []

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        for init in startup:
            await init()
        yield

    api = FastAPI(lifespan=lifespan)

    async def job(key: str) -> dict[str, Any]:
        await asyncio.sleep(JOB_S)
        await counter.incr(f"{prefix}:exec:{key}")
        return {"key": key, "done_ns": time.monotonic_ns(), "pid": os.getpid()}

    if tool == "dedupe":
        from dedupe import SingleFlight

        sf = SingleFlight(url, prefix=prefix, result_ttl=60.0, lock_ttl=10.0)
        shared: Any = sf(key="{key}")(job)
    elif tool == "cashews":
        from cashews import Cache

        cache = Cache()
        cache.setup(url)
        shared = cache(ttl=60, key=prefix + ":{key}", lock=True)(job)
        startup.append(cache.init)
    else:
        raise ValueError(f"HERD_TOOL must be one of {TOOLS}, not {tool!r}")

    @api.get("/health")
    async def health() -> dict[str, str]:
        return {"tool": tool}

    @api.get("/item/{key}")
    async def item(key: str) -> dict[str, Any]:
        t0 = time.monotonic_ns()
        value = await shared(key)
        t1 = time.monotonic_ns()
        waited = t0 < value["done_ns"]  # this request was waiting when the job ended
        return {**value, "lag_ns": t1 - value["done_ns"] if waited else -1}

    return api


if os.environ.get("HERD_TOOL"):
    app = make_app()


# --------------------------------------------------------------------------- the driver


def _free_port() -> int:
    from devtools.servers import free_port

    return free_port()


class Uvicorn:
    """One uvicorn with WORKERS workers, started and stopped by its own PID."""

    def __init__(self, tool: str, url: str, prefix: str) -> None:
        self.port = _free_port()
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, HERD_TOOL=tool, HERD_URL=url, HERD_PREFIX=prefix)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), root) if p)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "benchmarks.herd_fastapi:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                str(WORKERS),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.base = f"http://127.0.0.1:{self.port}"

    async def ready(self, client: Any, timeout: float = 60.0) -> None:
        """Every worker answers (a few rounds of requests on fresh connections)."""
        end = time.monotonic() + timeout
        ok = 0
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"uvicorn exited ({self.proc.returncode}):\n{err[-2000:]}")
            try:
                r = await client.get(f"{self.base}/health", timeout=2.0)
                ok = ok + 1 if r.status_code == 200 else 0
            except Exception:
                ok = 0
            if ok >= 20:
                return
            await asyncio.sleep(0.05 if ok else 0.2)
        raise RuntimeError(f"uvicorn on {self.base} did not come up in {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # our own child; it stops its workers
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only its workers
                self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


async def _herd(client: Any, base: str, key: str) -> dict[str, Any]:
    errors: list[str] = []

    async def one() -> dict[str, Any] | None:
        t0 = time.monotonic_ns()
        try:
            r = await client.get(f"{base}/item/{key}", timeout=30.0)
            r.raise_for_status()
        except Exception as exc:  # counted and shown; a herd never hangs on one request
            errors.append(f"{type(exc).__name__}: {exc}")
            return None
        body: dict[str, Any] = r.json()
        body["latency_ns"] = time.monotonic_ns() - t0
        return body

    t0 = time.monotonic()
    got = await asyncio.gather(*(one() for _ in range(CONCURRENCY)))
    bodies = [b for b in got if b is not None]
    return {"bodies": bodies, "wall_s": time.monotonic() - t0, "errors": errors}


async def _run_tool(tool: str, url: str, prefix: str, herds: int) -> dict[str, Any]:
    import httpx
    import redis.asyncio

    server = Uvicorn(tool, url, prefix)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    admin = redis.asyncio.Redis.from_url(url)
    try:
        async with httpx.AsyncClient(limits=limits) as client:
            await server.ready(client)
            await _herd(client, server.base, "warm")  # connections, scripts, the hub
            lags: list[list[float]] = []
            latency: list[list[float]] = []
            execs: list[int] = []
            waiters: list[int] = []
            errors: list[str] = []
            for h in range(herds):
                key = f"k{h}"
                res = await _herd(client, server.base, key)
                lag = [b["lag_ns"] / 1e6 for b in res["bodies"] if b["lag_ns"] >= 0]
                lags.append(lag)
                waiters.append(len(lag))
                latency.append([b["latency_ns"] / 1e6 for b in res["bodies"]])
                execs.append(int(await admin.get(f"{prefix}:exec:{key}") or 0))
                errors += res["errors"]
            return {
                "lag": lags,
                "latency": latency,
                "exec": execs,
                "waiters": waiters,
                "errors": errors,
            }
    finally:
        await admin.aclose()
        server.stop()


def run(url: str, repeats: int, herds: int, budget: float = 600.0) -> dict[str, Any]:
    """Every tool once per repeat, in rotated order; the results per tool, per repeat."""
    from .stats import percentile

    out: dict[str, dict[str, list[Any]]] = {t: {"runs": []} for t in TOOLS}
    end = time.monotonic() + budget
    for r in range(repeats):
        order = list(TOOLS[r % len(TOOLS) :] + TOOLS[: r % len(TOOLS)])
        for tool in order:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the FastAPI herd ran past its {budget:.0f} s budget")
            prefix = f"herd:{r}:{tool}"
            res = asyncio.run(asyncio.wait_for(_run_tool(tool, url, prefix, herds), left))
            out[tool]["runs"].append(res)
            flat = [x for h in res["lag"] for x in h]
            print(
                f"  herd {tool} repeat {r + 1}/{repeats}: wake lag p50 "
                f"{percentile(flat, 50):.2f} ms p99 {percentile(flat, 99):.2f} ms, "
                f"executions/herd {res['exec']}, failed requests {len(res['errors'])}"
                + (f" (first: {res['errors'][0]})" if res["errors"] else ""),
                flush=True,
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.herd_fastapi", description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ns = ap.parse_args(argv)
    from devtools.servers import RedisServer

    from .stats import Spread, percentile, ratios

    server = RedisServer().start()
    try:
        res = run(server.url, 2 if ns.quick else 5, 3 if ns.quick else 6)
    finally:
        server.stop()
    p99 = {
        t: [percentile([x for h in r["lag"] for x in h], 99) for r in e["runs"]]
        for t, e in res.items()
    }
    for t in TOOLS:
        print(f"{t}: wake lag p99 {Spread.of(p99[t]).fmt(2)} ms")
    print(f"dedupe / cashews p99 wake lag: {ratios(p99['dedupe'], p99['cashews']).ratio()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
