"""Every Redis failure reaches the user as a typed DedupeError whose message says what to change.

The first half feeds ``translate`` the exceptions redis-py raises (no server needed); the
second provokes each failure on a real server: a wrong password, ACL users lacking EVALSHA,
PUBLISH or channel access, maxmemory with noeviction, a script that keeps the server BUSY,
and a ``redis://`` URL pointed at a Cluster node.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.exceptions as rexc

from dedupe import (
    BackendBusy,
    BackendOutOfMemory,
    BackendUnavailable,
    ConfigurationError,
    DedupeError,
    SingleFlight,
    WaitTimeout,
)
from dedupe.backend.commands import translate
from devtools.servers import RedisClusterSet, RedisServer

# --------------------------------------------------------------------------- translate


@pytest.mark.parametrize(
    ("raised", "expected", "words"),
    [
        (
            rexc.AuthenticationError("invalid username-password pair or user is disabled."),
            ConfigurationError,
            ["credentials", "password"],
        ),
        (rexc.AuthenticationError("Authentication required."), ConfigurationError, ["password"]),
        (
            rexc.NoPermissionError("this user has no permissions to run the 'evalsha' command"),
            ConfigurationError,
            ["'evalsha'", "+evalsha", "&<prefix>:*"],
        ),
        (
            rexc.ResponseError(
                "The user executing the script can't run this command or subcommand script: "
                "cfe1bd6c, on @user_script:1."
            ),
            ConfigurationError,
            ["ACL", "+publish"],
        ),
        (
            rexc.ResponseError(
                "The user executing the script can't publish to the channel mentioned in the "
                "command script: 1b52, on @user_script:1."
            ),
            ConfigurationError,
            ["channel", "&<prefix>:*"],
        ),
        (
            rexc.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
            BackendOutOfMemory,
            ["maxmemory", "maxmemory-policy"],
        ),
        (
            rexc.ResponseError(
                "BUSY Redis is busy running a script. You can only call SCRIPT KILL or "
                "SHUTDOWN NOSAVE."
            ),
            BackendBusy,
            ["SCRIPT KILL"],
        ),
        (rexc.MovedError("3999 127.0.0.1:6381"), ConfigurationError, ["redis+cluster://", "MOVED"]),
        (
            UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
            ConfigurationError,
            ["decode_responses"],
        ),
        (RuntimeError("this dedupe backend is closed"), BackendUnavailable, ["closed"]),
        (LookupError("not subscribed to 'dedupe:{x}'"), BackendUnavailable, ["subscription"]),
        (rexc.ConnectionError("Connection refused"), BackendUnavailable, ["unavailable"]),
        (rexc.BusyLoadingError("Redis is loading"), BackendUnavailable, ["loading"]),
        (rexc.ResponseError("DB index is out of range"), ConfigurationError, ["databases"]),
        (
            rexc.RedisClusterException("Cluster mode is not enabled on this node"),
            ConfigurationError,
            ["not a Redis Cluster node", "redis://"],
        ),
    ],
)
def test_translate_gives_a_typed_error_naming_what_to_change(
    raised: Exception, expected: type[Exception], words: list[str]
) -> None:
    error = translate(raised)
    assert type(error) is expected
    assert isinstance(error, DedupeError)
    assert error.__cause__ is raised
    for word in words:
        assert word.lower() in str(error).lower(), (word, str(error))


@pytest.mark.parametrize(
    "raised",
    [
        rexc.AuthenticationError("x"),
        rexc.NoPermissionError("x"),
        rexc.MovedError("1 h:1"),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "x"),
    ],
)
def test_configuration_errors_are_not_outages(raised: Exception) -> None:
    # on_backend_error="local" runs locally on BackendUnavailable only; these must raise.
    assert not isinstance(translate(raised), BackendUnavailable)


@pytest.mark.parametrize("bug", [ValueError("x"), KeyError("k"), TypeError("t")])
def test_translate_leaves_bugs_alone(bug: Exception) -> None:
    assert translate(bug) is bug


def test_wait_timeout_says_how_long_it_waited() -> None:
    error = WaitTimeout(job_id="report:7", seconds=2.5)
    assert "2.5 s" in str(error) and "'report:7'" in str(error)
    assert (error.job_id, error.seconds) == ("report:7", 2.5)
    assert isinstance(error, TimeoutError)
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error)
    assert str(WaitTimeout("plain message")) == "plain message"


# --------------------------------------------------------------------------- real servers


def sf_for(url: str, prefix: str, **kw: Any) -> SingleFlight:
    return SingleFlight(url, prefix=prefix, connect_timeout=2.0, socket_timeout=2.0, **kw)


@pytest.fixture
def acl_user(redis_server: RedisServer) -> Iterator[Any]:
    """A factory of ACL users on the shared server, each deleted after the test."""
    admin = redis_server.client()
    made: list[str] = []

    def make(*rules: str) -> str:
        name = f"u{uuid.uuid4().hex[:10]}"
        admin.acl_setuser(name, enabled=True, passwords=["+pw"], reset=True)
        admin.execute_command("ACL", "SETUSER", name, *rules)
        made.append(name)
        return f"redis://{name}:pw@{redis_server.host}:{redis_server.port}/0"

    yield make
    for name in made:
        admin.acl_deluser(name)
    admin.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("policy", ["raise", "local"])
def test_a_wrong_password_raises_even_with_local_fallback(
    fresh_redis: RedisServer, prefix: str, policy: str
) -> None:
    admin = fresh_redis.client()
    admin.config_set("requirepass", "right")
    url = f"redis://:wrong@{fresh_redis.host}:{fresh_redis.port}/0"
    sf = sf_for(url, prefix, on_backend_error=policy)
    runs: list[int] = []
    try:
        for _ in range(2):  # the second call too: no "outage" mode was entered
            with pytest.raises(ConfigurationError, match="password"):
                sf.call("job", lambda: runs.append(1))
        assert runs == []  # never ran locally
        assert sf.stats()["local_runs"] == 0
    finally:
        sf.close()
        admin.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("policy", ["raise", "local"])
def test_an_acl_user_without_evalsha_gets_a_configuration_error(
    acl_user: Any, prefix: str, policy: str
) -> None:
    url = acl_user("~*", "&*", "+@all", "-evalsha")
    sf = sf_for(url, prefix, on_backend_error=policy)
    runs: list[int] = []
    try:
        with pytest.raises(ConfigurationError, match="evalsha") as info:
            sf.call("job", lambda: runs.append(1))
        assert "+evalsha" in str(info.value)
        assert runs == []
    finally:
        sf.close()


@pytest.mark.timeout(20)
def test_an_acl_user_without_publish_still_gets_its_value(
    acl_user: Any, prefix: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    url = acl_user("~*", "&*", "+@all", "-publish", "-spublish")
    sf = sf_for(url, prefix, result_ttl=5.0)
    try:
        assert sf.call("job", lambda: "computed") == "computed"
        # The outcome was stored, so followers find it on their re-check.
        assert redis_client.exists(f"{prefix}:{{job}}:result") == 1
        assert any("publish" in r.getMessage().lower() for r in caplog.records)
    finally:
        sf.close()


@pytest.mark.timeout(30)
def test_an_acl_user_without_channel_access_is_told_so_and_still_served(
    acl_user: Any, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    leader_url = acl_user("~*", "&*", "+@all")
    follower_url = acl_user("~*", "resetchannels", "+@all")
    # A follower without a subscription re-checks when the lease would run out: keep it short.
    leader = sf_for(leader_url, prefix, lock_ttl=1.0)
    follower = sf_for(follower_url, prefix, lock_ttl=1.0)
    started, release = threading.Event(), threading.Event()

    def hold() -> str:
        started.set()
        release.wait(20)
        return "held"

    def denied() -> bool:
        return any("&" in r.getMessage() and "SUBSCRIBE" in r.getMessage() for r in caplog.records)

    results: list[Any] = []
    lead = threading.Thread(target=lambda: results.append(leader.call("job", hold)))
    lead.start()
    try:
        assert started.wait(10)
        follow = threading.Thread(
            target=lambda: results.append(follower.call("job", lambda: "follower ran"))
        )
        follow.start()
        deadline = time.monotonic() + 10
        while not denied():  # the hub names the missing channel permission
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.01)
    finally:
        release.set()
        lead.join(20)
        follow.join(20)
        leader.close()
        follower.close()
    # The follower was not failed for it: it re-checked and got the leader's value.
    assert results == ["held", "held"]


@pytest.mark.timeout(20)
def test_out_of_memory_is_a_typed_error_naming_maxmemory(
    fresh_redis: RedisServer, prefix: str
) -> None:
    admin = fresh_redis.client()
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1mb")
    blob = b"x" * 100_000
    for i in range(200):  # until the server refuses writes
        try:
            admin.set(f"fill:{i}", blob)
        except rexc.OutOfMemoryError:
            break
    else:
        pytest.fail("the server never reached maxmemory")
    sf = sf_for(fresh_redis.url, prefix)
    try:
        with pytest.raises(BackendOutOfMemory, match="maxmemory"):
            sf.call("job", lambda: "value")
    finally:
        sf.close()
        admin.close()


@pytest.mark.timeout(30)
def test_a_busy_server_is_a_typed_error_naming_script_kill(
    fresh_redis: RedisServer, prefix: str
) -> None:
    admin = fresh_redis.client()
    admin.config_set("busy-reply-threshold", "50")
    looper = fresh_redis.client(socket_timeout=20)
    killed: list[BaseException] = []

    def loop() -> None:
        try:
            looper.eval("while true do end", 0)
        except rexc.RedisError as exc:
            killed.append(exc)

    thread = threading.Thread(target=loop)
    thread.start()
    probe = fresh_redis.client(socket_timeout=5)
    sf = sf_for(fresh_redis.url, prefix)
    try:
        deadline = time.monotonic() + 10
        while True:  # until the server answers BUSY (the script is running)
            try:
                probe.ping()
            except rexc.ResponseError as exc:
                if str(exc).startswith("BUSY"):
                    break
                raise
            assert time.monotonic() < deadline, "the looping script never made the server BUSY"
        with pytest.raises(BackendBusy, match="SCRIPT KILL"):
            sf.call("job", lambda: "value")
    finally:
        for _ in range(50):
            try:
                probe.script_kill()
                break
            except rexc.ResponseError as exc:
                if "NOTBUSY" in str(exc):
                    break
        thread.join(20)
        sf.close()
        for c in (admin, looper, probe):
            c.close()
    assert killed, "the looping script was not killed"


@pytest.mark.timeout(60)
def test_a_redis_url_at_a_cluster_node_is_a_configuration_error(
    redis_cluster: RedisClusterSet, prefix: str
) -> None:
    sf = sf_for(redis_cluster.url, prefix)  # redis://: one node, not the cluster
    try:
        outcomes = []
        for i in range(12):  # some ids hash to the slots of another node: MOVED
            try:
                outcomes.append(sf.call(f"job{i}", lambda: "ran"))
            except ConfigurationError as exc:
                assert "redis+cluster://" in str(exc)
                outcomes.append("moved")
        assert "moved" in outcomes
    finally:
        sf.close()


# --------------------------------------------------------------------------- URLs that do not fit


def _misfit_url(server: RedisServer, case: str) -> str:
    where = f"{server.host}:{server.port}"
    return {
        "db": f"redis://{where}/99",  # the server has 16 databases
        "cluster": f"redis+cluster://{where}",  # a standalone server, not a Cluster node
        "sentinel": f"redis+sentinel://{where}/mymaster",  # a plain server, not a Sentinel
    }[case]


_MISFIT_WORDS = {
    "db": ["database", "databases", "redis://host:port/0"],
    "cluster": ["not a Redis Cluster node", "redis://host:port/0"],
    "sentinel": ["not a Sentinel", "redis://"],
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", ["db", "cluster", "sentinel"])
@pytest.mark.parametrize("policy", ["raise", "local"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_url_that_does_not_fit_the_server_is_a_short_configuration_error(
    redis_server: RedisServer, prefix: str, case: str, policy: str, mode: str
) -> None:
    sf = sf_for(_misfit_url(redis_server, case), prefix, on_backend_error=policy)
    runs: list[int] = []

    def work() -> str:
        runs.append(1)
        return "ran"

    async def awork() -> str:
        return work()

    async def acall() -> None:
        try:
            await sf.call("job", awork)
        finally:
            await sf.aclose()

    errors: list[BaseException] = []
    started = time.monotonic()
    try:
        for _ in range(2):  # the second call too: no "outage" mode was entered
            with pytest.raises(ConfigurationError) as info:
                if mode == "sync":
                    sf.call("job", work)
                else:
                    asyncio.run(acall())
            errors.append(info.value)
        with pytest.raises(ConfigurationError):
            if mode == "sync":
                sf.forget("job")
            else:
                asyncio.run(sf.aforget("job"))
    finally:
        sf.close()
    assert time.monotonic() - started < 10  # answered at once: nothing waits for a timeout
    assert runs == []  # never ran locally, whatever the policy
    for error in errors:
        text = str(error)
        for word in _MISFIT_WORDS[case]:
            assert word in text, (word, text)
        assert len(text) < 300 and "<redis." not in text, text  # no connection reprs


@pytest.mark.timeout(60)
@pytest.mark.sentinel
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_sentinel_service_nobody_knows_is_a_configuration_error(
    redis_sentinel: Any, prefix: str, mode: str
) -> None:
    hosts = ",".join(f"{h}:{p}" for h, p in redis_sentinel.sentinel_addresses)
    sf = sf_for(f"redis+sentinel://{hosts}/no-such-service", prefix, on_backend_error="local")

    async def acall() -> None:
        try:
            await sf.call("job", asyncio.sleep, 0)
        finally:
            await sf.aclose()

    try:
        with pytest.raises(ConfigurationError) as info:
            if mode == "sync":
                sf.call("job", lambda: "ran")
            else:
                asyncio.run(acall())
    finally:
        sf.close()
    text = str(info.value)
    assert "'no-such-service'" in text and redis_sentinel.service_name in text, text
    assert len(text) < 400 and "<redis." not in text, text


@pytest.mark.timeout(20)
@pytest.mark.parametrize("policy", ["raise", "local"])
def test_an_unreachable_cluster_is_an_outage(prefix: str, policy: str) -> None:
    from devtools.servers import free_port

    sf = sf_for(f"redis+cluster://127.0.0.1:{free_port()}", prefix, on_backend_error=policy)
    try:
        if policy == "raise":
            with pytest.raises(BackendUnavailable, match=r"Connection refused|connecting"):
                sf.call("job", lambda: "ran")
        else:
            assert sf.call("job", lambda: "ran") == "ran"  # in-process while Redis is away
    finally:
        sf.close()
