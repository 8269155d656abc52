"""The hit without a script (issue 23): a call that keeps values first reads the result key
and the token counter with MGET, then the server's clock with TIME, and is served a fresh,
current value without the acquire script; anything else goes on to the script.

The sans-I/O tests drive ``run_flight`` with scripted replies; the property test holds the
read's verdict to the script's rule (``record_state`` with the key's real PTTL) for every
record a lease can store; the rest run against a real redis-server: what a hit sends, a
record of an older lease written back, an ACL without MGET, the adaptive reads.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from test_protocol import Driver, codec, make_spec, record_for

from dedupe import SingleFlight
from dedupe.core.keys import names_for
from dedupe.core.protocol import (
    LEAD,
    Acquire,
    Acquired,
    Discard,
    Looked,
    Read,
    ReadRefused,
    Reads,
)
from dedupe.core.record import counter_value, record_state
from dedupe.errors import BackendUnavailable, WaitTimeout
from dedupe.overrides import NO_OVERRIDES
from devtools.servers import RedisServer

pytestmark = pytest.mark.timeout(60)

TOKEN = 1_700_000_000_000_000  # a lease's token: its grant, in µs of the server's clock
GRANTED_MS = TOKEN // 1000


def reading(**spec: Any) -> Driver:
    d = Driver(make_spec(reads=Reads(), **spec))
    assert d.command == Read()
    return d


# --------------------------------------------------------------------------- sans-I/O


def test_a_fresh_current_value_is_served_from_the_read_alone() -> None:
    d = reading()
    record = record_for("v", token=TOKEN, keep_ms=1_000)
    assert d.send(Looked(record, counter_value(TOKEN), GRANTED_MS + 400)) is None
    assert d.result is not None and d.result.role == "kept" and d.result.token == TOKEN
    assert d.outcome.value == "v"
    assert d.outcome.fresh_ms == 600  # by the server's clock: the grant + keep - now
    assert [type(c) for c in d.commands] == [Read]


def test_a_value_kept_as_the_base_of_a_running_refresh_is_served() -> None:
    d = reading()
    record = record_for("v", token=TOKEN, keep_ms=1_000)
    assert d.send(Looked(record, counter_value(TOKEN + 5, TOKEN), GRANTED_MS + 10)) is None
    assert d.outcome.value == "v"


@pytest.mark.parametrize(
    ("counter", "now_ms", "why"),
    [
        (counter_value(TOKEN + 5), GRANTED_MS + 10, "a newer lease: the record is not current"),
        (None, GRANTED_MS + 10, "no counter: nothing names the record"),
        (b"junk", GRANTED_MS + 10, "a counter that is not ours"),
        (counter_value(TOKEN), GRANTED_MS + 1_000, "past its freshness by the server's clock"),
    ],
)
def test_a_record_the_script_would_not_serve_fresh_goes_to_the_script(
    counter: bytes | None, now_ms: int, why: str
) -> None:
    d = reading()
    record = record_for("old", token=TOKEN, keep_ms=1_000)
    assert d.send(Looked(record, counter, now_ms)) == Acquire(""), why
    assert d.send(Acquired(LEAD, token=TOKEN + 9)) is not None  # leads, as without the read


def test_a_miss_an_error_record_and_a_non_record_go_to_the_script() -> None:
    error = record_for(error=ValueError("e"), token=TOKEN, keep_ms=0)  # as a lease stores one
    for record in (None, b"not a record", error):
        d = reading()
        assert d.send(Looked(record, counter_value(TOKEN), GRANTED_MS)) == Acquire("")


def test_a_forged_record_is_rejected_dropped_and_left_to_the_script() -> None:
    d = Driver(make_spec(reads=Reads()), codec_=codec(b"the-real-secret-of-this-test"))
    forged = record_for("forged", token=TOKEN, c=codec(b"an-attackers-secret-key-here"))
    assert d.send(Looked(forged, counter_value(TOKEN), GRANTED_MS)) == Discard(forged)
    assert [n.kind for n in d.notes] == ["rejected"]
    assert d.send(None) == Acquire("")


def test_a_refused_read_goes_to_the_script_and_an_outage_is_raised() -> None:
    d = reading()
    assert d.throw(ReadRefused("NOPERM this user has no permissions to run 'mget'")) == Acquire("")
    d = reading()
    with pytest.raises(BackendUnavailable):
        d.throw(BackendUnavailable("down"))


def test_reads_stop_once_misses_spent_their_credit_and_probe_until_one_hits() -> None:
    reads = Reads()
    for _ in range(Reads.START):
        assert reads.wanted()
        reads.saw(False)
    tried = [reads.wanted() for _ in range(3 * Reads.PROBE)]
    assert tried.count(True) == 3  # one probe in every PROBE flights
    assert tried.index(True) == Reads.PROBE - 1
    reads.saw(True)  # a probe that hits earns credit: reads go first again
    assert all(reads.wanted() for _ in range(10))


def test_reads_go_on_while_one_in_five_hits() -> None:
    reads = Reads()
    for _ in range(200):  # a hit, then four misses, over and over: the reads pay
        for hit in (True, False, False, False, False):
            assert reads.wanted()
            reads.saw(hit)
    for _ in range(Reads.CAP):  # misses only: the credit runs out, capped, and reads stop
        reads.wanted()
        reads.saw(False)
    assert not reads.wanted()


def test_no_read_without_a_policy() -> None:
    assert Driver(make_spec()).command == Acquire("")


@given(
    keep=st.integers(1, 10**7),
    run=st.integers(0, 10**6),  # from the grant to the write
    age=st.integers(0, 2 * 10**7),  # from the write to the read
    extra_ttl=st.integers(0, 10**7),
    counter=st.sampled_from(["own", "base", "newer", "none"]),
)
def test_the_reads_verdict_is_the_scripts_for_every_record_a_lease_stores(
    keep: int, run: int, age: int, extra_ttl: int, counter: str
) -> None:
    """For a record written after its grant, with the life it was written with: the read's
    verdict (no PTTL) is the script's (the key's real PTTL), fresh or not, to the ms."""
    ttl = keep + extra_ttl
    if age >= ttl:
        return  # expired: MGET and the script both find no key
    now = GRANTED_MS + run + age
    pttl = ttl - age
    c = {
        "own": counter_value(TOKEN),
        "base": counter_value(TOKEN + 7, TOKEN),
        "newer": counter_value(TOKEN + 7),
        "none": None,
    }[counter]
    script = record_state(TOKEN, keep, ttl, pttl, c, now)
    read = record_state(TOKEN, keep, ttl, ttl, c, now)
    script_fresh = script is not None and script.fresh_ms > 0
    read_fresh = read is not None and read.fresh_ms > 0
    assert read_fresh == script_fresh
    if read_fresh:
        assert read is not None and script is not None and read.fresh_ms == script.fresh_ms


# ------------------------------------------- the read before any flight (sans-I/O)


class _Env:
    """What the call machine reads in the process (CallEnv), with no Redis."""

    def __init__(self, fall_back: bool = False) -> None:
        from dedupe.core.local_copies import LocalCopies

        self.local_copies = LocalCopies(max_bytes=1 << 20)
        self._fall_back = fall_back
        self.down = False

    def skip_redis(self) -> bool:
        return self.down

    def fall_back(self, exc: Exception) -> bool:
        self.down = self._fall_back
        return self._fall_back

    def answered(self) -> None:
        pass


def test_the_read_first_is_the_processs_flight_of_the_key() -> None:
    """The call that reads first creates the process's flight of the key: a caller who
    comes meanwhile joins it (no read of its own) and gets the kept value it finds, which
    is also kept as the local copy."""
    from test_protocol import NAMES

    from dedupe.core.call import read_first, served_read
    from dedupe.core.inflight import InFlight

    env, table, reads = _Env(), InFlight(), Reads()
    entry, created, read = read_first(env, table, NAMES, reads)
    assert created and read
    joiner, joined_created, joiner_reads = read_first(env, table, NAMES, reads)
    assert joiner is entry and not joined_created and not joiner_reads
    record = record_for("v", token=TOKEN, keep_ms=1_000)
    looked = Looked(record, counter_value(TOKEN), GRANTED_MS + 400)
    assert served_read(env, table, reads, NAMES, entry, codec(), looked, None, 1_000) == (True, "v")
    assert entry.result.get().value == "v" and entry.role == "kept" and entry.token == TOKEN
    assert env.local_copies.get(NAMES.channel) == (True, "v")
    assert reads.credit == Reads.START + Reads.HIT
    assert read_first(env, table, NAMES, reads)[1]  # ended: the next call's flight is new


def test_a_read_first_that_misses_leaves_its_flight_to_the_machine() -> None:
    from test_protocol import NAMES

    from dedupe.core.call import read_first, served_read
    from dedupe.core.inflight import InFlight

    env, table, reads = _Env(), InFlight(), Reads()
    entry, _, _ = read_first(env, table, NAMES, reads)
    got = served_read(env, table, reads, NAMES, entry, codec(), Looked(None, None, 1), None, 1_000)
    assert got == (False, None)
    assert not entry.result.is_set() and reads.credit == Reads.START - 1
    assert read_first(env, table, NAMES, reads)[0] is entry  # still the key's flight: joined


@pytest.mark.parametrize(
    ("error", "fall_back", "joiners_get"),
    [
        (ReadRefused("NOPERM"), False, None),  # a miss: the machine goes on
        (BackendUnavailable("down"), True, None),  # local runs: the machine goes on
        (BackendUnavailable("down"), False, "error"),  # raised, and shared
        (WaitTimeout("no slot"), False, "retry"),  # ours alone: the joiners start over
        (KeyboardInterrupt(), False, "retry"),  # an abort: the joiners start over
    ],
)
def test_a_failed_read_first_ends_its_flight_as_a_failed_flight_does(
    error: BaseException, fall_back: bool, joiners_get: str | None
) -> None:
    from test_protocol import NAMES

    from dedupe.core.call import read_failed, read_first
    from dedupe.core.inflight import RETRY, InFlight

    env, table, reads = _Env(fall_back), InFlight(), Reads()
    entry, _, _ = read_first(env, table, NAMES, reads)
    if joiners_get is None:
        read_failed(env, table, reads, NAMES, entry, error, 2.0)
        assert not entry.result.is_set()
        return
    with pytest.raises(type(error)) as raised:
        read_failed(env, table, reads, NAMES, entry, error, 2.0)
    result = entry.result.get()
    if joiners_get == "retry":
        assert result is RETRY
    else:
        assert result.error is error
    if isinstance(error, WaitTimeout):
        assert raised.value.job_id == NAMES.job_id and raised.value.seconds == 2.0
    assert reads.credit == Reads.START  # no verdict on the reads


# --------------------------------------------------------------------------- real Redis


def _calls(client: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in client.info("commandstats").items()}


@pytest.fixture
def server() -> Iterator[RedisServer]:
    srv = RedisServer().start()  # its own: the tests count every command it runs
    try:
        yield srv
    finally:
        srv.stop()


def test_a_hit_sends_mget_and_time_and_no_script(server: RedisServer) -> None:
    client = server.client()
    sf = SingleFlight(server.url, prefix=f"t{uuid.uuid4().hex[:6]}", result_ttl=30)
    runs: list[int] = []

    @sf(key="h:{x}")
    def get(x: int) -> dict[str, int]:
        runs.append(x)
        return {"x": x}

    @sf(key="a:{x}")
    async def aget(x: int) -> list[int]:
        runs.append(x)
        return [x]

    async def async_hits() -> None:
        for _ in range(10):
            assert await aget(2) == [2]

    try:
        assert get(1) == {"x": 1}
        asyncio.run(aget(2))
        client.config_resetstat()
        for _ in range(10):
            assert get(1) == {"x": 1}
        asyncio.run(async_hits())
        calls = _calls(client)
        for handshake in ("config|resetstat", "hello", "client|setname"):  # a new connection's
            calls.pop(handshake, None)
        assert calls == {"mget": 20, "time": 20}, calls
        assert runs == [1, 2]
    finally:
        sf.close()
        client.close()


def test_an_older_record_written_back_is_refused_by_the_read(server: RedisServer) -> None:
    """T1's record, captured, is written back with a fresh life over T2's: the read (the
    counter names T2) refuses it, and so does the script (T2's record is gone), so a new
    run: never T1's value."""
    client = server.client()
    prefix = f"t{uuid.uuid4().hex[:6]}"
    sf = SingleFlight(server.url, prefix=prefix, result_ttl=30, secret="s" * 32)
    names = names_for(prefix, "job")
    try:
        assert sf.call("job", lambda: "T1") == "T1"
        old = client.get(names.result)
        assert old is not None
        assert sf.forget("job")
        assert sf.call("job", lambda: "T2") == "T2"
        client.set(names.result, old, px=30_000)  # T1's genuine record, back
        client.config_resetstat()
        served = sf.call_detailed("job", lambda: "T3")
        assert served.value == "T3" and served.role == "leader"
        assert _calls(client).get("mget") == 1  # the read ran first, and refused it
        assert sf.call("job", lambda: "T4") == "T3"  # T3's own record: a hit
    finally:
        sf.close()
        client.close()


def test_a_user_without_mget_is_served_through_the_script(server: RedisServer) -> None:
    admin = server.client()
    admin.execute_command(
        "ACL", "SETUSER", "nomget", "on", ">pw-of-the-test", "~*", "&*", "+@all", "-mget"
    )
    url = server.url.replace("redis://", "redis://nomget:pw-of-the-test@")
    sf = SingleFlight(url, prefix=f"t{uuid.uuid4().hex[:6]}", result_ttl=30)
    runs: list[int] = []

    def job() -> int:
        runs.append(1)
        return 42

    try:
        assert sf.call("j", job) == 42
        admin.config_resetstat()
        for _ in range(40):
            assert sf.call("j", job) == 42
        stats = admin.info("commandstats")
        assert runs == [1]
        assert stats["cmdstat_evalsha"]["calls"] == 40  # every hit through the script
        # Refused reads count as misses (the first call's was one): after Reads.START of
        # them (no hit earned any credit), one probe per PROBE flights.
        denied = stats["cmdstat_mget"]["rejected_calls"]
        left = Reads.START - 1
        assert denied == left + (40 - left) // Reads.PROBE, stats
    finally:
        sf.close()
        admin.close()


def test_reads_stop_for_a_function_whose_reads_miss(server: RedisServer) -> None:
    client = server.client()
    sf = SingleFlight(server.url, prefix=f"t{uuid.uuid4().hex[:6]}", result_ttl=30)
    try:
        client.config_resetstat()
        for i in range(100):  # every key new: every read would miss
            assert sf.call(f"k{i}", lambda i=i: i) == i
        calls = _calls(client)
        assert calls["evalsha"] == 200  # acquire and complete each
        assert calls["mget"] == Reads.START + (100 - Reads.START) // Reads.PROBE, calls
    finally:
        sf.close()
        client.close()


@pytest.mark.cluster
def test_a_hit_on_a_cluster_reads_on_the_slots_node(redis_cluster: Any, prefix: str) -> None:
    """Through the Cluster client the read is a one-line script of the same MGET and TIME,
    on the node that owns the job's slot: hits of sync and asyncio callers, one run."""
    host, port = redis_cluster.startup_nodes[0]
    sf = SingleFlight(f"redis+cluster://{host}:{port}", prefix=prefix, result_ttl=30)
    nodes = [s.client() for s in redis_cluster.servers]
    runs: list[int] = []

    @sf(key="c:{x}")
    def get(x: int) -> int:
        runs.append(x)
        return x

    @sf(key="c:{x}")
    async def aget(x: int) -> int:
        runs.append(x)
        return x

    async def async_hits() -> None:
        for _ in range(5):
            assert await aget(7) == 7

    try:
        assert get(7) == 7
        asyncio.run(aget(7))
        for node in nodes:
            node.config_resetstat()
        for _ in range(5):
            assert get(7) == 7
        asyncio.run(async_hits())
        mget = sum(n.info("commandstats").get("cmdstat_mget", {}).get("calls", 0) for n in nodes)
        assert runs == [7, 7]  # a sync and an async function, one run each
        assert mget == 10  # every hit read, in its script, on its slot's node
    finally:
        sf.close()
        for node in nodes:
            node.close()


@pytest.mark.parametrize("detailed", [True, False], ids=["machine", "read-first"])
@pytest.mark.parametrize("lost", [1, 2])
def test_a_lost_read_reply_on_a_hanging_connection(
    server: RedisServer, lost: int, detailed: bool
) -> None:
    """The read's reply is lost and its connection hangs. One lost: the read is tried again
    on a fresh connection within its bound and the kept value is served. Two lost (the
    retry's too): the caller gets BackendUnavailable within the bound, not a hang; nothing
    was run and no lease is left behind (a read takes none)."""
    from proxy import Proxy

    prefix = f"t{uuid.uuid4().hex[:6]}"
    names = names_for(prefix, "hung")
    client = server.client()
    direct = SingleFlight(server.url, prefix=prefix, result_ttl=60)
    runs: list[str] = []

    def job(who: str) -> str:
        runs.append(who)
        return who

    try:
        assert direct.call("hung", job, "first") == "first"
        with Proxy(server.address) as proxy:
            url = "redis://{}:{}/0".format(*proxy.address)
            cut = SingleFlight(
                url, prefix=prefix, result_ttl=60, connect_timeout=0.5, socket_timeout=1
            )
            try:
                proxy.lose_reply_to(b"MGET", lost)
                if lost == 1 and detailed:
                    served = cut.call_detailed("hung", job, "again")
                    assert served.value == "first" and served.role == "kept"
                elif lost == 1:
                    assert cut.call("hung", job, "again") == "first"
                else:
                    with pytest.raises(BackendUnavailable):
                        if detailed:
                            cut.call_detailed("hung", job, "again")
                        else:
                            cut.call("hung", job, "again")
                assert proxy.lost_replies == lost
            finally:
                cut.close(timeout=0)
        assert runs == ["first"]
        assert client.exists(names.lock) == 0
    finally:
        direct.close()
        client.close()


# ------------------------------------------------------------- the read before any flight


class _Machines:
    """Counts the call machines the drivers start (a spy on run_call: the read before any
    flight starts none on a hit)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from dedupe.drivers import aio, sync

        self.started = 0
        real = sync.run_call

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.started += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(sync, "run_call", counted)
        monkeypatch.setattr(aio, "run_call", counted)


@pytest.fixture
def machines(monkeypatch: pytest.MonkeyPatch) -> _Machines:
    return _Machines(monkeypatch)


def _plain(calls: dict[str, int]) -> dict[str, int]:
    for handshake in ("config|resetstat", "hello", "client|setname", "info"):  # not the calls'
        calls.pop(handshake, None)
    return calls


def _sent(client: redis.Redis) -> dict[str, int]:
    """The reads (MGET) and scripts the calls sent since the stats were reset (what the
    scripts run inside, TIME too, is counted under its own names: left out)."""
    calls = _calls(client)
    return {k: calls[k] for k in ("mget", "evalsha", "eval") if k in calls}


def _load_scripts(client: redis.Redis) -> None:
    """Every script in the server's cache: a script's first run is then one EVALSHA."""
    from dedupe.backend import commands

    for script in (commands.ACQUIRE, commands.COMPLETE, commands.DISCARD):
        client.script_load(script.lua)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_hit_runs_no_machine_and_keeps_the_local_copy_and_earns_credit(
    server: RedisServer, machines: _Machines, mode: str
) -> None:
    """Served by the read alone: no call machine; what a kept outcome does still happens
    (the local copy kept, so the next call makes no round trip; the credit earned)."""
    client = server.client()
    prefix = f"t{uuid.uuid4().hex[:6]}"
    writer = SingleFlight(server.url, prefix=prefix, result_ttl=30)
    reader = SingleFlight(server.url, prefix=prefix, result_ttl=30, local_cache=True)
    runs: list[str] = []

    def job() -> str:
        runs.append("run")
        return "kept"

    async def ajob() -> str:
        return job()

    async def twice() -> list[str]:
        return [await reader.call("k", ajob), await reader.call("k", ajob)]

    try:
        assert writer.call("k", job) == "kept"
        reads = reader._flight_params(NO_OVERRIDES).reads
        assert reads is not None and reads.credit == Reads.START
        client.config_resetstat()
        started = machines.started
        got = (
            [reader.call("k", job), reader.call("k", job)]
            if mode == "sync"
            else asyncio.run(twice())
        )
        assert got == ["kept", "kept"] and runs == ["run"]
        assert machines.started == started  # neither call started a machine
        assert _plain(_calls(client)) == {"mget": 1, "time": 1}  # the second: the local copy
        assert reads.credit == Reads.START + Reads.HIT
    finally:
        writer.close()
        reader.close()
        client.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_miss_goes_straight_to_the_acquire_script(
    server: RedisServer, machines: _Machines, mode: str
) -> None:
    """The read misses: the machine's flight starts at the acquire script (no second MGET),
    and the miss costs the credit one."""
    client = server.client()
    sf = SingleFlight(server.url, prefix=f"t{uuid.uuid4().hex[:6]}", result_ttl=30)

    async def ajob() -> int:
        return 7

    try:
        reads = sf._flight_params(NO_OVERRIDES).reads
        assert reads is not None
        _load_scripts(client)
        client.config_resetstat()
        if mode == "sync":
            assert sf.call("m", lambda: 7) == 7
        else:
            assert asyncio.run(sf.call("m", ajob)) == 7  # type: ignore[arg-type]
        assert machines.started == 1
        # acquire and complete: two scripts; one read
        assert _sent(client) == {"mget": 1, "evalsha": 2}
        assert reads.credit == Reads.START - 1
    finally:
        sf.close()
        client.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_forged_record_read_first_is_refused_once_dropped_and_the_script_decides(
    server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    """A fresh, current record sealed with another secret: the read refuses it (counted
    once, logged), drops it (the discard script), and the acquire script, finding no
    record, grants a lease: the function runs; the forged value is never served."""
    client = server.client()
    prefix = f"t{uuid.uuid4().hex[:6]}"
    forger = SingleFlight(server.url, prefix=prefix, result_ttl=30, secret="f" * 32)
    sf = SingleFlight(server.url, prefix=prefix, result_ttl=30, secret="s" * 32)

    async def ajob() -> str:
        return "genuine"

    from dedupe.drivers import base

    monkeypatch.setattr(base, "_last_logged", {})  # the note's line: not held back by others'
    try:
        assert forger.call("j", lambda: "forged") == "forged"
        _load_scripts(client)
        client.config_resetstat()
        if mode == "sync":
            assert sf.call("j", lambda: "genuine") == "genuine"
        else:
            assert asyncio.run(sf.call("j", ajob)) == "genuine"  # type: ignore[arg-type]
        assert sf.stats()["rejected_envelopes"] == 1
        assert any("ignored an outcome" in r.getMessage() for r in caplog.records)
        # discard, acquire, complete; one read (the flight read no more)
        assert _sent(client) == {"mget": 1, "evalsha": 3}
        assert sf.call("j", lambda: "again") == "genuine"  # its own record: a hit
    finally:
        forger.close()
        sf.close()
        client.close()


def test_a_running_flight_of_the_key_is_joined_not_read_past(server: RedisServer) -> None:
    """A flight of the key runs in this process (sync): a new caller joins it, as ever,
    with no read of its own."""
    import threading

    from helpers import until

    client = server.client()
    sf = SingleFlight(server.url, prefix=f"t{uuid.uuid4().hex[:6]}", result_ttl=30)
    release = threading.Event()
    runs: list[int] = []
    got: list[int] = []

    def slow() -> int:
        runs.append(1)
        assert release.wait(30)
        return 5

    leader = threading.Thread(target=lambda: got.append(sf.call("r", slow)))
    joiner = threading.Thread(target=lambda: got.append(sf.call("r", slow)))
    try:
        leader.start()
        until(lambda: runs == [1], what="the leader runs")
        client.config_resetstat()
        joiner.start()
        until(lambda: [f.waiters for f in sf.inflight()] == [2], what="the caller joined")
        release.set()
        leader.join(30)
        joiner.join(30)
        assert got == [5, 5] and runs == [1]
        assert "mget" not in _calls(client)  # joined: no read
    finally:
        release.set()
        sf.close()
        client.close()


def test_a_running_flight_of_the_key_is_joined_not_read_past_async(server: RedisServer) -> None:
    """The same on asyncio: the loop's flight of the key is joined, with no read."""
    client = server.client()
    sf = SingleFlight(server.url, prefix=f"t{uuid.uuid4().hex[:6]}", result_ttl=30)
    runs: list[int] = []

    async def scenario() -> list[int]:
        release = asyncio.Event()
        running = asyncio.Event()

        async def slow() -> int:
            runs.append(1)
            running.set()
            await release.wait()
            return 5

        leader = asyncio.ensure_future(sf.call("r", slow))  # type: ignore[arg-type]
        await running.wait()
        client.config_resetstat()
        joiner = asyncio.ensure_future(sf.call("r", slow))  # type: ignore[arg-type]
        while [f.waiters for f in sf.inflight()] != [2]:
            await asyncio.sleep(0)  # the joiner's turn: it joins the flight
        release.set()
        return [await leader, await joiner]

    try:
        assert asyncio.run(scenario()) == [5, 5] and runs == [1]
        assert "mget" not in _calls(client)
    finally:
        sf.close()
        client.close()


def test_detail_and_events_go_through_the_machine(server: RedisServer, machines: _Machines) -> None:
    """A Served, or a listener, needs the machine: the hit still reads first (its flight's
    Read) and is reported, as before."""
    from dedupe.ops import events

    client = server.client()
    sf = SingleFlight(server.url, prefix=f"t{uuid.uuid4().hex[:6]}", result_ttl=30)
    seen: list[Any] = []
    try:
        assert sf.call("d", lambda: 1) == 1
        client.config_resetstat()
        started = machines.started
        served = sf.call_detailed("d", lambda: 2)
        assert served.value == 1 and served.role == "kept"
        remove = events.add_listener(seen.append)
        try:
            assert sf.call("d", lambda: 3) == 1
        finally:
            remove()
        assert machines.started == started + 2
        assert [e.role for e in seen if e.role] == ["kept"]
        assert _plain(_calls(client)) == {"mget": 2, "time": 2}
    finally:
        sf.close()
        client.close()


def test_the_wait_timeout_bounds_an_async_read_that_hangs(server: RedisServer) -> None:
    """The read's reply is lost and its connection hangs, far longer than wait_timeout: an
    asyncio caller gets WaitTimeout at its wait_timeout, as it would waiting for a flight."""
    import time

    from proxy import Proxy

    from dedupe.errors import WaitTimeout

    prefix = f"t{uuid.uuid4().hex[:6]}"
    direct = SingleFlight(server.url, prefix=prefix, result_ttl=60)

    async def job() -> str:
        return "again"

    try:
        assert direct.call("hung", lambda: "first") == "first"
        with Proxy(server.address) as proxy:
            url = "redis://{}:{}/0".format(*proxy.address)
            cut = SingleFlight(url, prefix=prefix, result_ttl=60, socket_timeout=20,
                               wait_timeout=0.5)  # fmt: skip
            try:
                proxy.lose_reply_to(b"MGET", 2)
                began = time.monotonic()
                with pytest.raises(WaitTimeout):
                    asyncio.run(cut.call("hung", job))  # type: ignore[arg-type]
                assert time.monotonic() - began < 5
            finally:
                cut.close(timeout=0)
    finally:
        direct.close()
