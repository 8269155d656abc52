"""The pytest plugin the package ships (dedupe.pytest_plugin, entry point ``pytest11``).

A user's test file runs in a pytest of its own (``pytester.runpytest_subprocess``: plugins
load from the installed entry point, as in an app's checkout): the ``dedupe_memory`` fixture
gives one run per key with no Redis, ``fn.__wrapped__`` calls the undecorated function, the
``dedupe_redis`` fixture runs a flight on a throwaway redis-server (stopped after the
session: its port no longer answers), and without a redis-server the Redis fixtures skip
saying why. A session that uses none of them builds no instance and starts no thread.
"""

from __future__ import annotations

import os
import socket
from importlib.metadata import entry_points

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.timeout(120)

USER_TESTS = """
import threading
import time


def test_one_run_with_no_redis(dedupe_memory):
    runs = []
    gate = threading.Event()

    @dedupe_memory(key="user:{user_id}")
    def load(user_id):
        runs.append(user_id)
        gate.wait(10)
        return {"id": user_id}

    out = []
    threads = [threading.Thread(target=lambda: out.append(load(7))) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while sum(f.waiters for f in dedupe_memory.inflight()) < 8:  # all eight on the one flight
        assert time.monotonic() < deadline
        time.sleep(0.005)
    gate.set()
    for t in threads:
        t.join(10)
    assert runs == [7] and out == [{"id": 7}] * 8
    assert load.__wrapped__(8) == {"id": 8}  # the undecorated function: no flight
    assert dedupe_memory.forget("user:7") is False  # keyed by the template, namespaced


def test_each_test_has_a_store_of_its_own(dedupe_memory):
    assert dedupe_memory.call("shared-id", lambda: "mine") == "mine"


def test_each_test_has_a_store_of_its_own_too(dedupe_memory):
    assert dedupe_memory.call_detailed("shared-id", lambda: "again").role == "leader"


def test_a_real_redis(dedupe_redis, dedupe_redis_url):
    print("URL", dedupe_redis_url)
    assert dedupe_redis.call("job", lambda: 42) == 42
    assert dedupe_redis.call_detailed("job", lambda: 0).role == "kept"
"""


@pytest.fixture(autouse=True)
def _installed() -> None:
    if not any(e.value == "dedupe.pytest_plugin" for e in entry_points(group="pytest11")):
        pytest.fail(
            "the pytest11 entry point is not installed: run make install (pip install -e .)"
        )


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_the_fixtures_in_a_users_test_file(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", "-q")
    result.assert_outcomes(passed=4)
    url = next(line for line in result.outlines if "URL redis://" in line)
    port = int(url.split("URL redis://127.0.0.1:", 1)[1].split("/")[0])
    assert not _port_answers(port)  # the throwaway server was stopped with the session


APP = """
from dedupe import SingleFlight

sf = SingleFlight("redis://127.0.0.1:9/0", wait_timeout=0.5)  # no server there
runs = []


@sf(key="user:{user_id}", result_ttl=60)
def load(user_id):
    runs.append(user_id)
    return {"id": user_id}


@sf(key="user:{user_id}", result_ttl=60, namespace="async")
async def aload(user_id):
    runs.append(-user_id)
    return {"id": user_id}
"""

APP_TESTS = """
import asyncio

import pytest

import app
from dedupe import BackendUnavailable


def test_the_apps_own_functions_run_in_memory(dedupe_in_memory):
    dedupe_in_memory(app.sf)
    assert app.load(1) == app.load(1) == {"id": 1}
    assert asyncio.run(app.aload(1)) == {"id": 1}
    assert app.runs == [1, -1]  # kept: one run per key
    assert app.sf.settings.url.startswith("memory://")


def test_a_store_of_each_tests_own(dedupe_in_memory):
    dedupe_in_memory(app.sf, app.sf)  # twice: moved once
    assert app.load(1) == {"id": 1}
    assert app.runs == [1, -1, 1]  # not the last test's kept value


def test_the_settings_come_back_after():
    assert app.sf.settings.url == "redis://127.0.0.1:9/0"
    with pytest.raises(BackendUnavailable):
        app.load(2)
"""


def test_an_apps_own_instance_in_memory_for_a_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(app=APP, test_app=APP_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=3)


def test_the_redis_fixtures_skip_without_a_redis_server(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    env = {"DEDUPE_REDIS_SERVER": "no-such-redis-server-binary"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "-rs")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    result.assert_outcomes(passed=3, skipped=1)
    result.stdout.fnmatch_lines(["*no-such-redis-server-binary*dedupe_memory fixture*"])


def test_a_session_that_uses_no_fixture_starts_nothing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain="""
        import sys
        import threading

        def test_nothing_is_built_or_started():
            assert "dedupe.pytest_plugin" in sys.modules  # loaded from the entry point
            from dedupe import api

            assert all(sf._backend is None for sf in api._instances)  # nothing built
            assert not [t.name for t in threading.enumerate() if t.name.startswith("dedupe")]
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1)
