"""pytest fixtures for apps that use dedupe (the ``pytest11`` entry point ``dedupe``).

Loaded by pytest wherever the package is installed, and inert until a test asks for one of
its fixtures: no instance is built, no thread and no server started, before that.

- ``dedupe_memory``: a ``SingleFlight("memory://<unique>")`` of the test's own (no Redis),
  closed after the test, its store dropped.
- ``dedupe_in_memory``: a function; ``dedupe_in_memory(app.sf)`` moves your app's own
  instances (the ones its functions were decorated with, or ``dedupe.single_flight``) to a
  memory:// store of the test's own until the test ends, then gives them back their
  settings and drops the store.
- ``dedupe_redis_url``: the URL of a throwaway ``redis-server`` on a free loopback port,
  started once per session (no persistence, in a temporary directory) and stopped by its
  PID at the end; the test is skipped, saying why, when no ``redis-server`` is on PATH
  (``DEDUPE_REDIS_SERVER`` may name the binary).
- ``dedupe_redis``: a ``SingleFlight`` on that server, with a prefix of the test's own,
  closed after the test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from dedupe.api import SingleFlight
    from dedupe.settings import Settings

__all__ = ["dedupe_in_memory", "dedupe_memory", "dedupe_redis", "dedupe_redis_url"]

_START_TIMEOUT = 10.0  # a redis-server that does not answer by then is reported, not waited on


@pytest.fixture
def dedupe_memory() -> Iterator[SingleFlight]:
    """A memory:// SingleFlight of this test's own: one process, no Redis."""
    from dedupe import SingleFlight
    from dedupe.backend.memory import drop_store

    name = f"pytest-{uuid.uuid4().hex}"
    sf = SingleFlight(f"memory://{name}")
    try:
        yield sf
    finally:
        sf.close(timeout=5)
        drop_store(name)


@pytest.fixture
def dedupe_in_memory() -> Iterator[Callable[..., None]]:
    """``dedupe_in_memory(app.sf, ...)``: those instances run on a memory:// store of this
    test's own until it ends (functions decorated earlier follow, as after configure());
    then their own settings come back and the store is dropped."""
    from dedupe.backend.memory import drop_store

    name = f"pytest-{uuid.uuid4().hex}"
    moved: list[tuple[SingleFlight, Settings]] = []

    def use(*instances: SingleFlight) -> None:
        for sf in instances:
            if any(sf is done for done, _ in moved):
                continue
            moved.append((sf, sf.settings))
            sf.configure(url=f"memory://{name}", client=None, async_client=None)

    try:
        yield use
    finally:
        for sf, settings in reversed(moved):
            sf.configure(**{f.name: getattr(settings, f.name) for f in fields(settings)})
        drop_store(name)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    """True once the server replies +PONG on the port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(7).startswith(b"+PONG")
    except OSError:
        return False


def _start(binary: str, workdir: str) -> tuple[subprocess.Popen[bytes], int]:
    """A redis-server on a free loopback port; a second port if the first was taken meanwhile."""
    for _ in range(3):
        port = _free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", workdir]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(port):
                return proc, port
            time.sleep(0.02)  # polling the port: the server says nothing else when it is up
        _stop(proc)
    raise RuntimeError(f"{binary} did not start on a free loopback port (tried 3)")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server we started, by its PID."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="session")
def dedupe_redis_url() -> Iterator[str]:
    """redis://127.0.0.1:<port>/0 of a throwaway redis-server (skips without one on PATH)."""
    wanted = os.environ.get("DEDUPE_REDIS_SERVER") or "redis-server"
    binary = shutil.which(wanted)
    if binary is None:
        pytest.skip(
            f"dedupe_redis_url needs a {wanted!r} binary on PATH and found none: install "
            "Redis (or set DEDUPE_REDIS_SERVER), or use the dedupe_memory fixture"
        )
    with tempfile.TemporaryDirectory(prefix="dedupe-redis-") as workdir:
        proc, port = _start(binary, workdir)
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            _stop(proc)


@pytest.fixture
def dedupe_redis(dedupe_redis_url: str) -> Iterator[SingleFlight]:
    """A SingleFlight on the throwaway server, with a prefix of this test's own."""
    from dedupe import SingleFlight

    sf = SingleFlight(dedupe_redis_url, prefix=f"pytest-{uuid.uuid4().hex[:12]}")
    try:
        yield sf
    finally:
        sf.close(timeout=5)
