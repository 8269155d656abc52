"""Shared pytest fixtures: private redis-server processes on loopback (never the system Redis).

The server binary is redis-server on PATH, or the one ``DEDUPE_TEST_SERVER`` names
(``valkey``: Valkey 8.1; see devtools/servers.py); the session header names it.

- ``redis_server`` (session): one standalone server; ``redis_url`` / ``redis_client`` point at it.
- ``prefix``: a unique key prefix per test, so tests share that server without FLUSHALL.
- ``fresh_redis``: a private server per test, for tests that kill/pause/restart it.
- ``legacy_redis``: a private Redis 6.2 server per test (older than dedupe's minimum, 7.0), for
  tests of what dedupe does there; its binary is fetched once into .compat/ (see devtools).
- ``redis_cluster`` / ``redis_sentinel`` (session): started on first use only. After each test
  that used one, a dead/paused node is brought back (``reset()``) so the next test finds it
  healthy.
- ``sf`` / ``other``: two SingleFlights on the shared server with the test's prefix (lock_ttl
  2 s): a leader and a follower as good as one in another process. test_api.py has an ``sf``
  of its own (result_ttl 30 s).
- ``sfs``: a list the test appends the SingleFlights it builds to (``helpers._sf``); each is
  closed after the test.
- ``renewers``: a factory of lease watchdogs (``Renewer``), each closed after the test;
  ``proxy``: a TCP proxy (tests/proxy.py) in front of the shared server, counting RESP2
  commands.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, settings
from proxy import Proxy

from dedupe import SingleFlight
from dedupe.backend.renewal import Renewer
from devtools.servers import (
    SERVER_SETTING,
    RedisClusterSet,
    RedisSentinelSet,
    RedisServer,
    legacy_redis_server_binary,
    redis_server_binary,
    server_name,
)

# --------------------------------------------------------------------------- hypothesis

_truthy = {"1", "true", "yes", "on"}
settings.register_profile(
    "dedupe",
    deadline=None,  # real Redis round-trips make timings noisy
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "50")),
    # Deterministic in CI (CI=true) unless HYPOTHESIS_DERANDOMIZE says otherwise.
    derandomize=os.environ.get("HYPOTHESIS_DERANDOMIZE", os.environ.get("CI", "")).lower()
    in _truthy,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dedupe"))

# --------------------------------------------------------------------------- start-up times

STARTUP_SECONDS: dict[str, float] = {}


def _timed_start(name: str, start: float) -> None:
    STARTUP_SECONDS[name] = time.monotonic() - start
    print(f"\n[dedupe] {name} started in {STARTUP_SECONDS[name]:.2f}s")


def pytest_configure(config: pytest.Config) -> None:
    # `core` was renamed (it always held Cluster and Sentinel tests too): `-m core` would now
    # select nothing and say only "no tests ran".
    if re.search(r"\bcore\b", config.getoption("markexpr", "") or ""):
        raise pytest.UsageError("the `core` marker is now `compat`: use -m compat")


def pytest_report_header(config: pytest.Config) -> str:
    """Which server the private test sets run (``DEDUPE_TEST_SERVER``; devtools/servers.py)."""
    try:
        binary = redis_server_binary()
    except RuntimeError as exc:
        return f"dedupe test servers: none ({exc})"
    setting = os.environ.get(SERVER_SETTING) or "unset"
    return f"dedupe test servers: {server_name(binary)} ({binary}; {SERVER_SETTING}={setting})"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if STARTUP_SECONDS:
        times = ", ".join(f"{k} {v:.2f}s" for k, v in STARTUP_SECONDS.items())
        terminalreporter.write_line(f"dedupe test servers start-up: {times}")


# --------------------------------------------------------------------------- standalone


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    t0 = time.monotonic()
    server = RedisServer().start()
    _timed_start("standalone", t0)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Spawned test processes (see helpers.start); any still running are ended by PID."""
    started: list[Any] = []
    yield started
    for p in started:
        if p.is_alive():
            os.kill(p.pid, signal.SIGCONT)  # a test may have left it stopped
            p.kill()
        p.join(5)


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def legacy_redis() -> Iterator[RedisServer]:
    server = RedisServer(binary=legacy_redis_server_binary()).start()
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- cluster / sentinel


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterSet]:
    t0 = time.monotonic()
    cluster = RedisClusterSet(masters=3).start()
    _timed_start("cluster(3 masters)", t0)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinelSet]:
    t0 = time.monotonic()
    sset = RedisSentinelSet().start()
    _timed_start("sentinel(1+1+3)", t0)
    try:
        yield sset
    finally:
        sset.stop()


@pytest.fixture(autouse=True)
def _heal_shared_sets(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used a shared cluster/sentinel set, undo any chaos it caused
    (paused or killed nodes, a failover): the next test finds a healthy set."""
    yield
    if "redis_cluster" in request.fixturenames:
        request.getfixturevalue("redis_cluster").reset()
    if "redis_sentinel" in request.fixturenames:
        request.getfixturevalue("redis_sentinel").reset()


# --------------------------------------------------------------------------- flights and leases


@pytest.fixture
def sfs(redis_url: str, prefix: str) -> Iterator[list[SingleFlight]]:
    made: list[SingleFlight] = []
    yield made
    for sf in made:
        sf.close(timeout=0)


@pytest.fixture
def sf(redis_url: str, prefix: str) -> Iterator[SingleFlight]:
    inst = SingleFlight(redis_url, prefix=prefix, lock_ttl=2.0)
    yield inst
    inst.close()


@pytest.fixture
def other(redis_url: str, prefix: str) -> Iterator[SingleFlight]:
    """A second instance: a follower as good as one in another process."""
    inst = SingleFlight(redis_url, prefix=prefix, lock_ttl=2.0)
    yield inst
    inst.close()


@pytest.fixture
def renewers() -> Iterator[Callable[..., Renewer]]:
    made: list[Renewer] = []

    def make(*args: Any, **kw: Any) -> Renewer:
        r = Renewer(*args, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[Proxy]:
    with Proxy(redis_server.address, count_resp=True) as p:
        yield p
