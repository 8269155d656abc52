"""The recipes (examples/recipes/) run as their docstrings say, against a private Redis: real
uvicorn and gunicorn servers with 2 workers, a real Celery worker, a real process pool. Each
shows one run of the shared function serving every concurrent caller: every run makes a new
build id, so one id among all the answers means one run served them all.

Servers are started by PID and stopped by PID (SIGTERM, then SIGKILL for them and the workers
they started); each wait is on their output or their port, bounded.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import dedupe
from devtools.servers import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "examples" / "recipes"
SOURCES = sorted(p.relative_to(RECIPES).as_posix() for p in RECIPES.rglob("*.py"))
# The documented adapters are public modules too (README, "Operating dedupe").
PUBLIC_MODULES = {"dedupe", "dedupe.ops.prometheus", "dedupe.ops.otel"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


@pytest.mark.parametrize("name", SOURCES)
def test_recipes_use_only_the_public_api(name: str) -> None:
    tree = ast.parse((RECIPES / name).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""] if node.level == 0 else []
            if node.module == "dedupe":
                private = [a.name for a in node.names if a.name not in dedupe.__all__]
                assert private == [], f"{name} imports {private} (not in dedupe.__all__)"
        else:
            continue
        for m in modules:
            top = m.split(".")[0]
            assert top not in ("devtools", "tests", "benchmarks"), f"{name} imports {m}"
            assert m in PUBLIC_MODULES or top != "dedupe", f"{name} imports the private {m}"


# --------------------------------------------------------------------------- helpers


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc), children first."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        for child in (int(c) for c in text.split()):
            found += [child, *_children(child)]
    return found


class Served:
    """A server process started by a test, its output in a file."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], log: Path, cwd: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                list(cmd), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 30) -> None:
        """Until ``pattern`` appears ``count`` times in the output; fails if the process ends."""
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.output)) < count:
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.output}"
            assert time.monotonic() < deadline, f"no {count} x {pattern!r}:\n{self.output}"
            time.sleep(0.05)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM (a graceful shutdown); after ``timeout``, SIGKILL it and its workers."""
        if self.proc.poll() is None:
            workers = _children(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in [*workers, *_children(self.proc.pid), self.proc.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait(10)
                pytest.fail(f"no graceful shutdown in {timeout} s:\n{self.output}")
        return self.proc.returncode


@contextlib.contextmanager
def serving(
    cmd: Sequence[str], env: dict[str, str], tmp_path: Path, cwd: Path = RECIPES
) -> Iterator[Served]:
    served = Served(cmd, env, tmp_path / "server.log", cwd)
    try:
        yield served
    finally:
        served.stop()


def get(url: str, timeout: float = 20) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def burst(url: str, n: int) -> list[dict[str, Any]]:
    """``n`` GETs of ``url`` at once (threads released together); their JSON bodies."""
    gate = threading.Barrier(n)
    bodies: list[Any] = [None] * n

    def one(i: int) -> None:
        gate.wait(10)
        status, body = get(url)
        bodies[i] = (status, body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(b is not None for b in bodies), "a request did not finish"
    assert all(status == 200 for status, _ in bodies), bodies
    return [json.loads(body) for _, body in bodies]


def env_for(server: RedisServer, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMETHEUS_", "CELERY_"))}
    return {**env, "DEDUPE_REDIS_URL": server.url, "PYTHONUNBUFFERED": "1", **extra}


def one_run_served_all(bodies: list[dict[str, Any]], name: str) -> None:
    builds = {b["build_id"] for b in bodies}
    assert len(builds) == 1, f"{len(builds)} runs for {len(bodies)} callers: {bodies}"
    assert all(b == bodies[0] for b in bodies) and bodies[0]["name"] == name


def bin_(name: str) -> str:
    """A console script of this environment (uvicorn, gunicorn, celery)."""
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is not installed here (pip install -e '.[recipes]')"
    return str(path)


# --------------------------------------------------------------------------- the recipes


def _metric(text: str, metric: str, **labels: str) -> float:
    """The sum of ``metric``'s samples whose labels include ``labels``."""
    total = 0.0
    for m in re.finditer(rf"^{metric}\{{([^}}]*)\}} (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_fastapi_uvicorn_two_workers(fresh_redis: RedisServer, tmp_path: Path) -> None:
    prom = tmp_path / "prometheus"
    prom.mkdir()
    port = free_port()
    cmd = [bin_("uvicorn"), "--app-dir", str(RECIPES), "fastapi_app:app", "--workers", "2"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    env = env_for(fresh_redis, PROMETHEUS_MULTIPROC_DIR=str(prom))
    base = f"http://127.0.0.1:{port}"
    with serving(cmd, env, tmp_path) as server:
        server.wait_for(r"Application startup complete\.", count=2)  # both workers
        bodies = burst(f"{base}/reports/q3", 20)
        one_run_served_all(bodies, "q3")
        assert get(f"{base}/reports/NOT-valid")[0] == 422  # the route's validation
        status, rate = get(f"{base}/rates/EUR")  # call() through the dependency
        assert status == 200 and json.loads(rate)["currency"] == "EUR"
        status, text = get(f"{base}/metrics")
        metrics = text.decode()
        assert status == 200
        # Both workers' files, merged: one build, and dedupe counted every call.
        assert _metric(metrics, "report_builds_total", name="q3") == 1.0, metrics
        assert _metric(metrics, "dedupe_calls_total", prefix="recipes") == 21.0, metrics
        assert _metric(metrics, "dedupe_calls_total", role="leader") == 2.0, metrics
        assert server.stop() == 0
    out = server.output
    # Each worker ran the lifespan's shutdown (await flights.aclose()) without an error.
    assert out.count("Application shutdown complete.") == 2, out
    assert "shutdown failed" not in out and "Traceback" not in out, out


def _gunicorn(
    fresh_redis: RedisServer, tmp_path: Path, args: list[str], path: str = "/reports/q3"
) -> list[dict[str, Any]]:
    port = free_port()
    env = env_for(fresh_redis)
    cmd = [bin_("gunicorn"), "--chdir", str(RECIPES), "-b", f"127.0.0.1:{port}", *args]
    with serving(cmd, env, tmp_path) as server:
        server.wait_for(r"Booting worker with pid", count=2)
        deadline = time.monotonic() + 20
        while get(f"http://127.0.0.1:{port}/healthz", timeout=2)[0] != 200:
            assert time.monotonic() < deadline, server.output
            time.sleep(0.05)
        bodies = burst(f"http://127.0.0.1:{port}{path}", 20)
        assert server.stop() == 0
    assert "Traceback" not in server.output, server.output
    return bodies


def test_django_gunicorn_two_workers(fresh_redis: RedisServer, tmp_path: Path) -> None:
    conf = str(RECIPES / "django_site" / "gunicorn.conf.py")
    bodies = _gunicorn(fresh_redis, tmp_path, ["-c", conf])
    one_run_served_all(bodies, "q3")


def test_flask_gunicorn_two_workers(fresh_redis: RedisServer, tmp_path: Path) -> None:
    args = ["-w", "2", "--threads", "8", "--graceful-timeout", "10", "flask_app:app"]
    bodies = _gunicorn(fresh_redis, tmp_path, args)
    one_run_served_all(bodies, "q3")


def test_celery_worker(fresh_redis: RedisServer, tmp_path: Path) -> None:
    env = env_for(fresh_redis)
    cmd = [bin_("celery"), "--workdir", str(RECIPES), "-A", "celery_app", "worker"]
    cmd += ["-P", "threads", "-c", "8", "--without-gossip", "--without-mingle"]
    cmd += ["--without-heartbeat", "--loglevel", "INFO", "--hostname", "recipe@%h"]
    with serving(cmd, env, tmp_path) as worker:
        worker.wait_for(r"recipe@\S+ ready\.")
        producer = subprocess.run(
            [sys.executable, str(RECIPES / "celery_app.py"), "q3", "10"],
            capture_output=True, text=True, timeout=45, env=env, cwd=tmp_path, check=False,
        )  # fmt: skip
        assert producer.returncode == 0, producer.stdout + producer.stderr
        assert "10 tasks for report 'q3': 1 build(s)" in producer.stdout, producer.stdout
        assert re.search(r"build [0-9a-f]{32}: 10 task\(s\)", producer.stdout)
        assert worker.stop() == 0
    assert len(re.findall(r"Task recipes\.report\[\S+\] succeeded", worker.output)) == 10


def test_process_pool(fresh_redis: RedisServer) -> None:
    proc = subprocess.run(
        [sys.executable, str(RECIPES / "process_pool.py"), fresh_redis.url],
        capture_output=True, text=True, timeout=45, cwd=ROOT, check=False,
        env={k: v for k, v in os.environ.items() if k != "DEDUPE_REDIS_URL"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "12 calls in 4 worker processes: 2 run(s)\n" in out, out
    assert re.search(r"^  6 x cat\.png thumbnail, run \w+ in pid \d+$", out, re.M), out
    assert re.search(r"^  6 x dog\.png thumbnail, run \w+ in pid \d+$", out, re.M), out
    assert "parent got the workers' run: True" in out, out
