"""The ``python -m dedupe`` CLI, run as a subprocess against real servers while flights run."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

import dedupe.backend.lifecycle
from dedupe import SingleFlight
from dedupe.core.keys import names_for
from dedupe.core.owners import Holder, parse_owner
from dedupe.ops.cli import _Watch, main
from dedupe.ops.inspector import JobState, Kept

pytestmark = pytest.mark.timeout(60)


def dedupe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "DEDUPE_REDIS_URL"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "dedupe", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=full_env,
        stdin=subprocess.DEVNULL,
    )


def in_process(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(args), out=out), out.getvalue()


def until(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@contextmanager
def held(make: Callable[[], SingleFlight], job_id: str, followers: int = 0) -> Iterator[None]:
    """A real flight leading ``job_id`` until the block ends, and ``followers`` waiting on it,
    each through a SingleFlight of its own (so each is one subscriber)."""
    release, started = threading.Event(), threading.Event()
    results: list[Any] = []

    def work() -> str:
        started.set()
        assert release.wait(20), "the test never released the leader"
        return "done"

    flights = [make() for _ in range(1 + followers)]
    threads = [
        threading.Thread(target=lambda sf=sf: results.append(sf.call(job_id, work)))
        for sf in flights
    ]
    threads[0].start()
    try:
        assert started.wait(10), "the leader never started"
        for t in threads[1:]:
            t.start()
        yield
    finally:
        release.set()
        for t in threads:
            t.join(20)
        for sf in flights:
            sf.close()
    assert results == ["done"] * (1 + followers)


def numsub(client: redis.Redis, channel: str) -> int:
    return int(client.pubsub_numsub(channel)[0][1])


def test_ls_inspect_forget_around_a_running_flight(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    job = "report:42"
    names = names_for(prefix, job)
    base = ("--url", redis_url, "--prefix", prefix)

    def make() -> SingleFlight:
        return SingleFlight(redis_url, prefix=prefix, result_ttl=30)

    with held(make, job, followers=2):
        until(lambda: numsub(redis_client, names.channel) == 2, "two followers subscribed")
        raw = redis_client.get(names.lock)
        assert raw is not None
        holder = parse_owner(raw)

        ls = dedupe("ls", *base)
        assert ls.returncode == 0, ls.stderr
        header, row = ls.stdout.splitlines()
        assert header.split() == ["JOB", "HOLDER", "TOKEN", "LEASE", "KEPT", "SUBS"]
        cells = row.split()
        assert cells[0] == job and cells[2] == str(holder.token) and cells[-1] == "2"
        assert cells[1] == (f"{holder.host}/{holder.pid}" if holder.host else holder.owner)

        shown = dedupe("inspect", job, *base)
        assert shown.returncode == 0, shown.stderr
        lines = dict(line.split(None, 1) for line in shown.stdout.splitlines() if line)
        assert lines["subscribers"].startswith("2 ")
        assert lines["token"] == str(holder.token)

        data = json.loads(dedupe("inspect", job, "--json", *base).stdout)
        assert data["subscribers"] == 2 and data["holder"]["token"] == holder.token
        assert 0 < data["lease_ms"] <= 10_000 and data["kept"] is None

    ls = dedupe("ls", *base)
    assert ls.returncode == 0 and "value" in ls.stdout.splitlines()[1]
    assert redis_client.exists(names.result)
    gone = dedupe("forget", job, *base)
    assert (gone.returncode, gone.stdout) == (0, f"forgot the kept outcome of {job!r}\n")
    assert not redis_client.exists(names.result)
    # The same CLI in-process (main() with a stream), to spare two interpreter starts.
    assert in_process("forget", job, *base) == (0, f"nothing kept for {job!r}\n")
    assert in_process("ls", *base) == (0, f"no flights or kept outcomes under prefix {prefix!r}\n")


def test_ls_shows_the_holders_host_and_pid(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    def make() -> SingleFlight:
        return SingleFlight(redis_url, prefix=prefix)

    with held(make, "job"):
        ls = dedupe("ls", "--url", redis_url, "--prefix", prefix)
    row = ls.stdout.splitlines()[1].split()
    host = socket.gethostname().replace(":", "_").replace("/", "_")
    assert row[1] == f"{host}/{os.getpid()}"


def test_watch_once_and_for_a_duration(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    names = names_for(prefix, "w")
    base = ("--url", redis_url, "--prefix", prefix)

    def make() -> SingleFlight:
        return SingleFlight(redis_url, prefix=prefix)

    with held(make, "w", followers=1):
        until(lambda: numsub(redis_client, names.channel) == 1, "a follower subscribed")
        once = dedupe("watch", "--once", *base)
        assert once.returncode == 0, once.stderr
        assert "in flight 1 " in once.stdout and "waiting processes 1 " in once.stdout
        assert once.stdout.count("dedupe watch") == 1
        timed = dedupe("watch", "--duration", "0.5", "--interval", "0.1", *base)
        assert timed.returncode == 0, timed.stderr
        assert timed.stdout.count("dedupe watch") >= 2
        assert "new leases 0.0/s" in timed.stdout  # the one lease was there from the start


def test_cluster_ls_inspect_forget(redis_cluster: Any, prefix: str) -> None:
    url = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in redis_cluster.startup_nodes)
    client = redis_cluster.client()
    base = ("--url", url, "--prefix", prefix)
    try:
        # Three jobs on three different primaries: one running, two kept.
        jobs: dict[str, str] = {}
        i = 0
        while len(jobs) < 3:
            node = client.get_node_from_key(names_for(prefix, f"c{i}").lock).name
            jobs.setdefault(node, f"c{i}")
            i += 1
        running, *kept = sorted(jobs.values())
        for job in kept:
            SingleFlight(client=client, prefix=prefix, result_ttl=30).call(job, lambda: 1)

        def make() -> SingleFlight:
            return SingleFlight(client=redis_cluster.client(), prefix=prefix, result_ttl=30)

        channel = names_for(prefix, running).channel
        node = client.get_node_from_key(channel)

        def shard_subscribers() -> int:
            reply = client.execute_command("PUBSUB SHARDNUMSUB", channel, target_nodes=node)
            return int(reply[0][1])

        with held(make, running, followers=2):
            until(lambda: shard_subscribers() == 2, "two followers subscribed")
            ls = dedupe("ls", *base)
            assert ls.returncode == 0, ls.stderr
            rows = {line.split()[0]: line.split() for line in ls.stdout.splitlines()[1:]}
            assert sorted(rows) == sorted(jobs.values())
            assert rows[running][-1] == "2" and rows[running][3] != "-"
            for job in kept:
                assert rows[job][1] == "-" and rows[job][4] == "value"
            data = json.loads(dedupe("inspect", running, "--json", *base).stdout)
            assert data["subscribers"] == 2 and data["holder"] is not None
        gone = dedupe("forget", kept[0], *base)
        assert gone.returncode == 0 and "forgot" in gone.stdout
        assert not client.exists(names_for(prefix, kept[0]).result)
    finally:
        client.close()


def test_unreachable_and_malformed_urls_fail_in_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens on it once closed
    down = dedupe("ls", "--url", f"redis://127.0.0.1:{port}/0", "--timeout", "1")
    assert down.returncode == 1 and down.stdout == ""
    assert down.stderr.startswith(
        f"dedupe: error: cannot reach Redis at redis://127.0.0.1:{port}/0"
    )
    assert len(down.stderr.splitlines()) == 1
    bad = dedupe("ls", "--url", "http://example.invalid/")
    assert bad.returncode == 2 and re.search(r"unsupported .*scheme 'http'", bad.stderr)
    assert len(bad.stderr.splitlines()) == 1


def test_bad_arguments_exit_2_before_any_connection(capsys: pytest.CaptureFixture[str]) -> None:
    assert in_process("ls", "--url", "redis://127.0.0.1:1/0", "--prefix", "a{b}") == (2, "")
    assert "prefix must not hold braces" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        in_process("watch", "--limit", "0")
    assert exit_.value.code == 2 and "positive whole number" in capsys.readouterr().err


def test_wrong_or_missing_password_fails_clearly_without_echoing_it(fresh_redis: Any) -> None:
    host, port = fresh_redis.address
    admin = fresh_redis.client()
    try:
        admin.config_set("requirepass", "s3cret-pass")
        wrong = dedupe("ls", "--url", f"redis://:wrong-pass@{host}:{port}/0")
        assert wrong.returncode == 1 and len(wrong.stderr.splitlines()) == 1
        assert "wrong user name or password" in wrong.stderr and "wrong-pass" not in wrong.stderr
        assert f"redis://:***@{host}:{port}/0" in wrong.stderr
        missing = dedupe("inspect", "j", "--url", f"redis://{host}:{port}/0")
        assert missing.returncode == 1 and "refused" in missing.stderr
        assert "requires a password and the URL gives none" in missing.stderr
        right = dedupe("ls", env={"DEDUPE_REDIS_URL": f"redis://:s3cret-pass@{host}:{port}/0"})
        assert right.returncode == 0, right.stderr
    finally:
        admin.close()


def _command_flags(server: Any, name: str) -> set[str]:
    """The flags the server itself gives ``name`` (e.g. ``client|setinfo``) in COMMAND INFO.
    Read on a plain connection: redis-py's parser of COMMAND replies differs by release."""
    conn = redis.Connection(host=server.host, port=server.port)
    try:
        conn.send_command("COMMAND", "INFO", name)
        reply = conn.read_response()
    finally:
        conn.disconnect()
    assert isinstance(reply, list) and len(reply) == 1 and reply[0], (name, reply)
    return {f.decode() if isinstance(f, bytes) else str(f) for f in reply[0][2]}


def test_nothing_but_forget_writes(fresh_redis: Any) -> None:
    admin = fresh_redis.client()
    url = fresh_redis.url
    try:
        admin.set(names_for("dedupe", "j").lock, "5:h/1/2/abc.3", px=20_000)
        admin.set(names_for("dedupe", "j").result, b"4:20000:20000:DD\x01vp\x00", px=20_000)
        admin.config_resetstat()
        for args in (("ls",), ("ls", "--json"), ("inspect", "j"), ("watch", "--once")):
            done = dedupe(*args, env={"DEDUPE_REDIS_URL": url})
            assert done.returncode == 0, (args, done.stderr)
        stats = admin.info("commandstats")
        used = {name.removeprefix("cmdstat_") for name in stats}
        used -= {"info", "config|resetstat"}  # our own queries
        assert {"scan", "get"} <= used, used  # the CLI did read
        # Which commands a connection sends besides depends on the server and redis-py (e.g.
        # CLIENT SETINFO where the server has it): the server's own flags say what writes.
        writes = {name for name in used if "write" in _command_flags(fresh_redis, name)}
        assert writes == set(), writes
        assert not used & {"publish", "spublish"}, used
        assert admin.exists(names_for("dedupe", "j").result)
    finally:
        admin.close()


def _state(job: str, token: int | None, kept_token: int | None = None) -> JobState:
    kept = None if kept_token is None else Kept(kept_token, "value", 1000, 1000, 10, 990, 40)
    return JobState(
        job_id=job,
        tag=job,
        names=names_for("p", job),
        holder=None if token is None else Holder(token, "h/1/2/abc.1", "h", 1, 2, "abc", 1),
        lease_ms=None if token is None else 5000,
        token_counter=token,
        kept=kept,
        subscribers=0,
    )


def test_watch_tells_new_leases_from_takeovers() -> None:
    watch = _Watch()
    first = watch.frame([_state("a", 10)], 1.0, "p", 20)
    assert "in flight 1   new leases -" in first
    # a: a newer lease, and no outcome of lease 10: its leader died (a takeover). b: new.
    second = watch.frame([_state("a", 11), _state("b", 5)], 1.0, "p", 20)
    assert "new leases 2.0/s" in second and "takeovers seen 1" in second
    # a: lease 11 stored its outcome before lease 12 began: no takeover. b finished.
    third = watch.frame([_state("a", 12, kept_token=11), _state("b", None, 5)], 0.5, "p", 1)
    assert "in flight 1   new leases 2.0/s   kept 2" in third and "takeovers seen 1" in third
    assert third.endswith("... and 1 more\n")
