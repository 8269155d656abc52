"""The trust model, against a real redis-server. Attackers: a user allowed only PUBLISH on a
job's channel, and one allowed to write that job's keys, try to run code (a pickle that
creates a marker file) and to have forged, replayed, tampered, cross-key or written-back
outcomes served. Between processes, values and exceptions travel as the README says: the
same type, the nearest imported base class, or RemoteError; ResultNotSerializable where the
serializer cannot carry a value.

The codec tests feed ``Codec.open`` the very bytes Redis delivered (pub/sub) or returned (GET);
the flight tests run real SingleFlight followers mid-flight and new callers.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import _exception_herd, numsub, start, until

from dedupe import SingleFlight, current_flight
from dedupe.core.keys import names_for
from dedupe.core.record import NOTICE_STORED
from dedupe.core.sealing import Codec, Notice, Opened, Outcome
from dedupe.core.serializers import JSON, PICKLE, SAFE
from dedupe.errors import EnvelopeError, RemoteError
from devtools.servers import RedisServer

SECRET = "security-test-secret"
PASSWORD = "attacker-password"


class _Evil:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Evil(marker))


def test_the_payload_is_live(tmp_path: Path) -> None:
    """Control: the payload really runs code when unpickled, so its absence below matters."""
    marker = tmp_path / "pwned"
    pickle.loads(evil_pickle(marker))
    assert marker.exists()


def hostile_payloads(marker: Path, token: int) -> dict[str, bytes]:
    """Everything an attacker without the secret might write: each tries to get unpickled."""
    evil = evil_pickle(marker)
    head = b"%d:600000:600000:" % token
    old_error = json.dumps({"type": "X", "message": "m", "pickle": base64.b64encode(evil).decode()})
    new_error = SAFE.dumps(
        {"type": "X", "module": "builtins", "name": "X", "message": "m", "pickle": evil}
    )
    return {
        "raw-pickle": evil,
        "v1-pickle-value": head + b"DD\x01vp\x00" + evil,
        "v1-pickle-error": head + b"DD\x01ep\x00" + old_error.encode(),
        "v2-pickle-value": head + b"DD\x02vp\x00\x00\x00" + evil,
        "v2-forged-mac": head + b"DD\x02vp\x01\x00\x00" + b"\0" * 32 + evil,
        "v2-error-with-pickle": head + b"DD\x02es\x00\x00\x00" + new_error,
    }


READERS: dict[str, Callable[[], Codec]] = {
    "default": lambda: Codec(),
    "json": lambda: Codec(JSON),
    "secret+safe": lambda: Codec(secret=SECRET),
    "secret+json": lambda: Codec(JSON, secret=SECRET),
    "secret+pickle": lambda: Codec(PICKLE, secret=SECRET),
}


def _acl_user(admin: redis.Redis, name: str, *rules: str) -> None:
    admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{PASSWORD}", *rules)


@pytest.fixture
def attackers(
    redis_server: RedisServer, redis_client: redis.Redis, prefix: str
) -> Iterator[tuple[redis.Redis, redis.Redis]]:
    """(publisher, writer): PUBLISH-only on the prefix's channels; and GET/SET on its keys."""
    pub_name, key_name = f"pub-{prefix}", f"keys-{prefix}"
    _acl_user(redis_client, pub_name, f"&{prefix}:*", "+publish")
    _acl_user(redis_client, key_name, f"~{prefix}:*", f"&{prefix}:*", "+get", "+set", "+publish")
    publisher = redis_server.client(username=pub_name, password=PASSWORD)
    writer = redis_server.client(username=key_name, password=PASSWORD)
    try:
        yield publisher, writer
    finally:
        publisher.close()
        writer.close()
        redis_client.execute_command("ACL", "DELUSER", pub_name, key_name)


def test_the_attackers_have_only_their_rights(
    attackers: tuple[redis.Redis, redis.Redis], prefix: str
) -> None:
    publisher, writer = attackers
    assert publisher.publish(f"{prefix}:{{j}}", b"x") == 0
    with pytest.raises(redis.exceptions.NoPermissionError):
        publisher.get(f"{prefix}:{{j}}:result")
    with pytest.raises(redis.exceptions.NoPermissionError):
        publisher.set(f"{prefix}:{{j}}:result", b"x")
    assert writer.set(f"{prefix}:{{j}}:result", b"x")
    with pytest.raises(redis.exceptions.NoPermissionError):
        writer.set("elsewhere", b"x")


def _accepted_without_secret(name: str, codec: Codec) -> bool:
    # Without a secret a well-formed error record is data anyone may write: it is served as an
    # error (never unpickled). Everything else here must be refused.
    return name == "v2-error-with-pickle" and codec.secret is None


def _check_opened(name: str, codec: Codec, data: bytes, marker: Path) -> None:
    if _accepted_without_secret(name, codec):
        got = codec.open(data, channel="unused")
        assert isinstance(got, Opened)
        assert isinstance(got.outcome.error, RemoteError)
    else:
        with pytest.raises(EnvelopeError):
            codec.open(data, channel="unused")
    assert not marker.exists(), f"{name} ran code"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("reader", sorted(READERS))
def test_published_pickles_never_run(
    reader: str,
    attackers: tuple[redis.Redis, redis.Redis],
    redis_client: redis.Redis,
    prefix: str,
    tmp_path: Path,
) -> None:
    publisher, _ = attackers
    marker = tmp_path / "pwned"
    channel = names_for(prefix, "job").channel
    codec = READERS[reader]()
    payloads = hostile_payloads(marker, 1)
    sub = redis_client.pubsub()
    sub.subscribe(channel)
    assert sub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    for data in payloads.values():
        assert publisher.publish(channel, data) == 1
    for name, sent in payloads.items():
        message = sub.get_message(timeout=5)
        assert message is not None and message["data"] == sent
        _check_opened(name, codec, message["data"], marker)
    sub.close()
    refused = sum(not _accepted_without_secret(n, codec) for n in payloads)
    assert codec.rejected == refused


@pytest.mark.timeout(30)
@pytest.mark.parametrize("reader", sorted(READERS))
def test_pickles_written_to_the_result_key_never_run(
    reader: str,
    attackers: tuple[redis.Redis, redis.Redis],
    redis_client: redis.Redis,
    prefix: str,
    tmp_path: Path,
) -> None:
    _, writer = attackers
    marker = tmp_path / "pwned"
    result = names_for(prefix, "job").result
    codec = READERS[reader]()
    for name, data in hostile_payloads(marker, 1).items():
        writer.set(result, data, px=60_000)
        stored = redis_client.get(result)
        assert stored == data
        _check_opened(name, codec, stored, marker)


def _settings(config: str) -> dict[str, Any]:
    return {
        "default": {},
        "secret+safe": {"secret": SECRET},
        "secret+json": {"secret": SECRET, "serializer": "json"},
        "secret+pickle": {"secret": SECRET, "serializer": "pickle"},
    }[config]


@pytest.mark.timeout(40)
@pytest.mark.parametrize("config", ["default", "secret+safe", "secret+json", "secret+pickle"])
def test_new_callers_recompute_instead_of_running_a_stored_pickle(
    config: str,
    attackers: tuple[redis.Redis, redis.Redis],
    redis_url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    _, writer = attackers
    marker = tmp_path / "pwned"
    sf = SingleFlight(redis_url, prefix=prefix, **_settings(config))
    try:
        # A token of now (tokens are the server's microseconds at the grant), which the
        # counter holds too, so that the acquire script takes these for fresh and the codec
        # must refuse them itself.
        token = int(time.time() * 1_000_000)
        for name, data in hostile_payloads(marker, token).items():
            job = f"kept-{name}"
            writer.set(names_for(prefix, job).token, b"%d" % token, px=60_000)
            writer.set(names_for(prefix, job).result, data, px=60_000)
            if _accepted_without_secret(name, sf.backend().codec):
                with pytest.raises(RemoteError):  # a forged error: data, not code
                    sf.call(job, lambda: "computed")
            else:
                assert sf.call(job, lambda: "computed") == "computed"
            assert not marker.exists(), f"{name} ran code"
        assert sf.stats()["rejected_envelopes"] >= 4
    finally:
        sf.close()


def _token(client: redis.Redis, lock_key: str) -> int:
    raw = client.get(lock_key)
    assert raw is not None
    return int(raw.split(b":")[0])


class HeldFlight:
    """A leader (thread) holding job's lease until released, and a follower waiting on it."""

    def __init__(self, redis_url: str, prefix: str, job: str, value: Any, **settings: Any) -> None:
        self.leader = SingleFlight(redis_url, prefix=prefix, lock_ttl=30, **settings)
        self.follower = SingleFlight(redis_url, prefix=prefix, lock_ttl=30, **settings)
        self.running, self.release = threading.Event(), threading.Event()
        self.results: dict[str, Any] = {}
        self.job = job
        self.value = value

    def work(self) -> Any:
        self.running.set()
        assert self.release.wait(20)
        return self.value

    def start(
        self, client: redis.Redis, before_follower: Callable[[int], None] | None = None
    ) -> int:
        """Start both; ``before_follower(token)`` runs once the lease is held. The token."""
        names = names_for(self.leader.settings.prefix, self.job)
        self.lead = threading.Thread(target=self._run, args=("leader", self.leader))
        self.lead.start()
        assert self.running.wait(10)
        token = _token(client, names.lock)
        if before_follower is not None:
            before_follower(token)
        self.follow = threading.Thread(target=self._run, args=("follower", self.follower))
        self.follow.start()
        until(lambda: client.pubsub_numsub(names.channel)[0][1] >= 1, what="follower waits")
        return token

    def _run(self, who: str, sf: SingleFlight) -> None:
        try:
            self.results[who] = sf.call_detailed(self.job, self.work)
        except BaseException as exc:
            self.results[who] = exc

    def finish(self) -> dict[str, Any]:
        self.release.set()
        self.lead.join(20)
        self.follow.join(20)
        return self.results

    def close(self) -> None:
        self.release.set()
        self.leader.close()
        self.follower.close()


@pytest.mark.timeout(40)
@pytest.mark.parametrize("config", ["default", "secret+safe", "secret+json", "secret+pickle"])
def test_a_follower_waiting_mid_flight_gets_the_real_outcome(
    config: str,
    attackers: tuple[redis.Redis, redis.Redis],
    redis_client: redis.Redis,
    redis_url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    publisher, writer = attackers
    marker = tmp_path / "pwned"
    names = names_for(prefix, "mid")
    flight = HeldFlight(redis_url, prefix, "mid", ["genuine"], **_settings(config))
    codec = flight.follower.backend().codec

    def poison(token: int) -> None:
        # What the follower's first look at the result key finds: a "fresh" pickle.
        writer.set(names.result, hostile_payloads(marker, token)["v2-pickle-value"], px=60_000)

    try:
        token = flight.start(redis_client, poison)
        until(lambda: flight.follower.stats()["rejected_envelopes"] >= 1, what="the poison refused")
        payloads = {
            name: data
            for name, data in hostile_payloads(marker, token).items()
            if not _accepted_without_secret(name, codec)
        }
        before = flight.follower.stats()["rejected_envelopes"]
        for data in payloads.values():
            publisher.publish(names.channel, data)
        until(
            lambda: flight.follower.stats()["rejected_envelopes"] >= before + len(payloads),
            what="the follower refused every payload",
        )
        assert "follower" not in flight.results
        results = flight.finish()
    finally:
        flight.close()
    assert not marker.exists()
    assert results["leader"].value == results["follower"].value == ["genuine"]
    assert results["follower"].role == "remote"


@pytest.mark.timeout(40)
def test_replayed_tampered_and_cross_key_outcomes_are_not_served(
    attackers: tuple[redis.Redis, redis.Redis],
    redis_client: redis.Redis,
    redis_url: str,
    prefix: str,
) -> None:
    publisher, writer = attackers
    names = names_for(prefix, "replay")
    other = names_for(prefix, "other")
    signer = Codec(secret=SECRET)  # stands in for genuine records of earlier flights
    # A genuine record of the first flight, captured as it went by.
    sub = redis_client.pubsub()
    sub.subscribe(names.channel)
    assert sub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    first = SingleFlight(redis_url, prefix=prefix, secret=SECRET, result_ttl=0)
    assert first.call("replay", lambda: "first") == "first"
    message = sub.get_message(timeout=5)
    assert message is not None
    old_record = message["data"]
    old = signer.open(old_record, channel=names.channel)
    assert isinstance(old, Opened) and old.outcome.value == "first"
    sub.close()
    first.close()

    flight = HeldFlight(redis_url, prefix, "replay", "second", secret=SECRET)
    try:
        token = flight.start(redis_client)
        assert token > old.token
        replays = [
            old_record,  # an older lease's genuine record
            signer.notice(NOTICE_STORED, channel=names.channel, token=old.token),
        ]
        forged = [
            # an older record re-labelled as the current lease, or kept for ten minutes
            old_record.replace(b"%d:" % old.token, b"%d:" % token, 1),
            old_record.replace(b":%d:%d:" % (old.keep_ms, old.ttl_ms), b":600000:600000:", 1),
            # a genuine record and notice of another job, with the current token
            signer.seal(Outcome("other"), channel=other.channel, token=token, keep_ms=1, ttl_ms=1),
            signer.notice(NOTICE_STORED, channel=other.channel, token=token),
        ]
        for data in replays + forged:
            publisher.publish(names.channel, data)
        # Messages arrive in order: once the forged ones are counted, the replays were seen.
        until(
            lambda: flight.follower.stats()["rejected_envelopes"] >= len(forged),
            what="the follower refused the forgeries",
        )
        assert "follower" not in flight.results
        results = flight.finish()
    finally:
        flight.close()
    assert results["follower"].value == "second"

    # The second flight's record, written back with a raised keep-time: not served as fresh.
    later = SingleFlight(redis_url, prefix=prefix, secret=SECRET)
    try:
        stored = redis_client.get(names.result)
        assert stored is not None
        got = signer.open(stored, channel=names.channel)
        assert isinstance(got, Opened) and got.outcome.value == "second"
        tampered = stored.replace(b":%d:%d:" % (got.keep_ms, got.ttl_ms), b":600000:600000:", 1)
        assert tampered != stored
        writer.set(names.result, tampered, px=600_000)
        assert later.call("replay", lambda: "third") == "third"
    finally:
        later.close()


@pytest.mark.timeout(30)
def test_notices_and_records_read_back_from_redis_keep_their_true_token(
    redis_client: redis.Redis, prefix: str
) -> None:
    names = names_for(prefix, "tokens")
    codec = Codec(secret=SECRET)
    redis_client.set(
        names.result,
        codec.seal(Outcome((1, 2)), channel=names.channel, token=5, keep_ms=9, ttl_ms=90),
    )
    got = codec.open(redis_client.get(names.result) or b"", channel=names.channel)
    assert isinstance(got, Opened) and (got.token, got.keep_ms, got.outcome.value) == (5, 9, (1, 2))
    sub = redis_client.pubsub()
    sub.subscribe(names.channel)
    assert sub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    redis_client.publish(names.channel, codec.notice(NOTICE_STORED, channel=names.channel, token=4))
    message = sub.get_message(timeout=5)
    assert message is not None
    assert codec.open(message["data"], channel=names.channel) == Notice(NOTICE_STORED, 4)
    with pytest.raises(EnvelopeError):
        codec.open(message["data"], channel=names_for(prefix, "elsewhere").channel)
    sub.close()


# --------------------------------------------------------------------------- no unpickling at all

_LOADERS = [
    ("pickle", "loads"),
    ("pickle", "load"),
    ("pickle", "Unpickler"),
    ("_pickle", "loads"),
    ("_pickle", "load"),
    ("_pickle", "Unpickler"),
    ("cloudpickle", "loads"),
    ("cloudpickle", "load"),
]


def _wrap_loaders(calls: list[str]) -> None:
    import importlib

    for module_name, attr in _LOADERS:
        module = importlib.import_module(module_name)
        original = getattr(module, attr)
        if isinstance(original, type):

            class Recording(original):  # type: ignore[misc, valid-type]
                def __init__(self, *a: Any, _n: str = f"{module_name}.{attr}", **k: Any) -> None:
                    calls.append(_n)
                    super().__init__(*a, **k)

            setattr(module, attr, Recording)
        else:

            def recording(
                *a: Any, _o: Any = original, _n: str = f"{module_name}.{attr}", **k: Any
            ) -> Any:
                calls.append(_n)
                return _o(*a, **k)

            setattr(module, attr, recording)


def follower_process(url: str, prefix: str, out: Any) -> None:
    """Spawned: follow a flight another process leads, with every pickle loader recorded."""
    calls: list[str] = []
    _wrap_loaders(calls)
    client = redis.Redis.from_url(url)
    sf = SingleFlight(url, prefix=prefix)
    try:
        # Each call starts only once the other process leads that job.
        assert client.blpop([f"{prefix}:started-f"], timeout=20) is not None
        served = sf.call_detailed("rich", lambda: "follower ran it")
        error: Any = None
        assert client.blpop([f"{prefix}:started-f"], timeout=20) is not None
        try:
            sf.call("boom", lambda: "follower ran it")
        except Exception as exc:
            error = (type(exc).__name__, str(exc))
        during = list(calls)
        pickle.loads(pickle.dumps(1))  # control: the recording works
        out.put(
            ("ok", served.value, served.role, error, during, list(calls), sf.backend().codec.mode)
        )
    except BaseException as exc:
        out.put(("error", repr(exc)))
    finally:
        sf.close()
        client.close()


RICH = {
    "tuple": (1, 2),
    "set": {1, 2},
    (1, "key"): b"bytes",
    3: [time.gmtime(0)[:3], uuid.UUID(int=7)],
}


def leader_process(url: str, prefix: str) -> None:
    """Spawned: lead 'rich' and 'boom', each held until the test says go."""
    client = redis.Redis.from_url(url)
    sf = SingleFlight(url, prefix=prefix, lock_ttl=30)

    def rich() -> Any:
        client.rpush(f"{prefix}:started-f", "rich")
        client.rpush(f"{prefix}:started", "rich")
        client.blpop([f"{prefix}:go"], timeout=20)
        return RICH

    def boom() -> Any:
        client.rpush(f"{prefix}:started-f", "boom")
        client.rpush(f"{prefix}:started", "boom")
        client.blpop([f"{prefix}:go"], timeout=20)
        raise KeyError("missing")

    try:
        sf.call("rich", rich)
        try:
            sf.call("boom", boom)
        except KeyError:
            pass
    finally:
        sf.close()
        client.close()


@pytest.mark.timeout(60)
def test_a_default_follower_process_never_unpickles(
    procs: list[Any], redis_client: redis.Redis, redis_url: str, prefix: str
) -> None:
    import multiprocessing as mp

    out = mp.get_context("spawn").Queue()
    start(procs, leader_process, redis_url, prefix)
    follower: Any = None
    for job in ("rich", "boom"):
        got = redis_client.blpop([f"{prefix}:started"], timeout=30)
        assert got is not None and got[1] == job.encode()
        if follower is None:
            follower = start(procs, follower_process, redis_url, prefix, out)
        channel = names_for(prefix, job).channel
        until(lambda: redis_client.pubsub_numsub(channel)[0][1] >= 1, 30, "follower waits")  # noqa: B023
        redis_client.rpush(f"{prefix}:go", 1)
    result = out.get(timeout=30)
    assert result[0] == "ok", result
    _, value, role, error, during, after, mode = result
    assert value == RICH and role == "remote"
    assert [type(k) for k in value] == [type(k) for k in RICH]
    assert error == ("KeyError", "'missing'")
    assert during == []
    assert after == ["pickle.loads"]
    assert mode == "unsigned, serializer=safe"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("life", ["longer", "re-armed"])
def test_a_genuine_record_written_back_with_a_new_expiry_is_not_fresh_again(
    life: str,
    attackers: tuple[redis.Redis, redis.Redis],
    redis_client: redis.Redis,
    redis_url: str,
    prefix: str,
) -> None:
    _, writer = attackers
    names = names_for(prefix, "pinned")
    sf = SingleFlight(redis_url, prefix=prefix, secret=SECRET, result_ttl=0.05)
    try:
        assert sf.call("pinned", lambda: "first") == "first"
        record = writer.get(names.result)
        assert record is not None
        got = Codec(secret=SECRET).open(record, channel=names.channel)
        assert isinstance(got, Opened)
        until(
            lambda: redis_client.pttl(names.result) < got.ttl_ms - got.keep_ms - 10,
            what="the record to go stale",
        )
        # The same genuine bytes with a new life: past its signed ttl, or just its ttl again.
        writer.set(names.result, record, px=600_000 if life == "longer" else got.ttl_ms)
        assert sf.call("pinned", lambda: "second") == "second"
    finally:
        sf.close()


class Opaque:
    """A value the safe serializer does not encode."""


@pytest.mark.timeout(30)
def test_an_unsendable_value_is_the_same_error_in_the_leaders_process_and_elsewhere(
    redis_client: redis.Redis, redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Strict at seal time: a one-process run shows what a fleet would."""
    value = Opaque()
    flight = HeldFlight(redis_url, prefix, "opaque", value)
    try:
        with caplog.at_level("WARNING", logger="dedupe"):
            flight.start(redis_client)
            results = flight.finish()
    finally:
        flight.close()
    mine, error = results["leader"], results["follower"]
    assert type(mine).__name__ == type(error).__name__ == "ResultNotSerializable"
    assert str(mine) == str(error)
    assert f"{__name__}.Opaque" in str(error) and "serializer='pickle'" in str(error)
    warnings = [r for r in caplog.records if "Opaque" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"


@pytest.mark.timeout(40)
@pytest.mark.parametrize("keys", ["one secret", "rotated"])
def test_a_genuine_record_of_an_older_lease_written_back_is_not_served(
    keys: str,
    attackers: tuple[redis.Redis, redis.Redis],
    redis_client: redis.Redis,
    redis_url: str,
    prefix: str,
) -> None:
    """A key writer captures T1's record (result_ttl 30 s), and writes it back with its own
    TTL while T2 runs and after T2 completed: no new caller gets T1's value."""
    _, writer = attackers
    names = names_for(prefix, "revived")
    old_keys: Any = SECRET if keys == "one secret" else ["k1"]
    new_keys: Any = SECRET if keys == "one secret" else ["k2", "k1"]
    first = SingleFlight(redis_url, prefix=prefix, secret=old_keys, result_ttl=30)
    sf = SingleFlight(redis_url, prefix=prefix, secret=new_keys, result_ttl=30, lock_ttl=30)
    other = SingleFlight(redis_url, prefix=prefix, secret=new_keys, result_ttl=30)
    running, release = threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    def t2() -> str:
        running.set()
        assert release.wait(20)
        return "T2"

    def run(who: str, inst: SingleFlight, fn: Callable[[], str]) -> None:
        try:
            results[who] = inst.call_detailed("revived", fn)
        except BaseException as exc:
            results[who] = exc

    try:
        assert first.call("revived", lambda: "T1") == "T1"
        record = writer.get(names.result)
        pttl = redis_client.pttl(names.result)
        assert record is not None and pttl > 20_000
        sf.forget("revived")
        lead = threading.Thread(target=run, args=("T2", sf, t2))
        lead.start()
        assert running.wait(10)
        # While T2 runs: T1's record back, with the life it had.
        writer.set(names.result, record, px=pttl)
        follow = threading.Thread(target=run, args=("new", other, lambda: "T3"))
        follow.start()
        until(
            lambda: "new" in results or redis_client.pubsub_numsub(names.channel)[0][1] >= 1,
            what="it follows T2",
        )
        assert "new" not in results, results.get("new")
        kept = other.inspect("revived").kept
        assert kept is not None and kept.token < _token(redis_client, names.lock)
        assert kept.fresh_ms == 0  # the ops view judges it as the acquire script does
        release.set()
        lead.join(20)
        follow.join(20)
        assert results["T2"].value == "T2" and results["T2"].role == "leader"
        assert results["new"].value == "T2" and results["new"].role == "remote"
        # After T2 completed: T1's record back again; new callers never get it.
        writer.set(names.result, record, px=pttl)
        served = other.call_detailed("revived", lambda: "T4")
        assert served.value == "T4" and served.role == "leader"
        assert sf.call("revived", lambda: "T5") == "T4"  # T4's own record is fresh
    finally:
        release.set()
        first.close()
        sf.close()
        other.close()


# ---------------------------------------------------------- values and exceptions between processes


@pytest.mark.timeout(60)
def test_unbuildable_exception_arrives_as_remote_error_naming_it(
    redis_url: str, prefix: str, procs: list[Any]
) -> None:
    # Its class is imported in every process, but it does not rebuild from its args, and
    # without a signed pickle nothing else may rebuild it: a RemoteError names it.
    mine, others = _exception_herd(redis_url, prefix, "unbuildable", procs)
    assert {info["type"] for _, _, info in mine} == {"Unbuildable"}
    for _, _, info in others:
        assert info["type"] == "RemoteError" and "workers.Unbuildable" in info["args"][0]
        assert "in _job" in info["traceback"]


@pytest.mark.timeout(60)
def test_exception_that_cannot_travel_becomes_remote_error(
    redis_url: str, prefix: str, procs: list[Any]
) -> None:
    mine, others = _exception_herd(redis_url, prefix, "holds-lock", procs)
    assert {info["type"] for _, _, info in mine} == {"HoldsLock"}
    for _, _, info in others:
        assert info["type"] == "RemoteError"
        assert info["attrs"]["type_name"] == "workers.HoldsLock"
        assert "cannot travel" in info["attrs"]["message"]
        assert "in _job" in info["traceback"]


@pytest.mark.timeout(60)
def test_unpicklable_value_raises_in_every_process(
    redis_url: str, prefix: str, procs: list[Any]
) -> None:
    mine, others = _exception_herd(redis_url, prefix, "unpicklable", procs)
    assert {info["type"] for _, _, info in mine} == {"ResultNotSerializable"}
    assert {info["type"] for _, _, info in others} == {"ResultNotSerializable"}


# -------------------------------------------------------------------- signed records on the channel


def _forged(prefix: str, job_id: str, secret: bytes | None, token: int, value: Any) -> bytes:
    codec = Codec(secret=secret)
    channel = names_for(prefix, job_id).channel
    return codec.seal(
        Outcome(value=value), channel=channel, token=token, keep_ms=60_000, ttl_ms=60_000
    )


@pytest.mark.timeout(30)
def test_forged_and_unsigned_envelopes_are_refused(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    secret = "s3cret"
    leader = SingleFlight(redis_url, prefix=prefix, secret=secret, lock_ttl=30)
    follower = SingleFlight(redis_url, prefix=prefix, secret=secret, lock_ttl=30)
    names = names_for(prefix, "signed")
    running, release = threading.Event(), threading.Event()

    def job() -> str:
        flight = current_flight()
        assert flight is not None
        running.set()
        release.wait(20)
        return f"genuine {flight.token}"

    results: dict[str, Any] = {}
    t = threading.Thread(target=lambda: results.update(a=leader.call("signed", job)))
    t.start()
    assert running.wait(10)
    f = threading.Thread(target=lambda: results.update(b=follower.call("signed", job)))
    f.start()
    until(lambda: numsub(redis_client, names.channel) == 1, what="the follower subscribed")
    token = int(redis_client.get(names.lock).split(b":")[0])  # type: ignore[union-attr]
    hostile = [
        _forged(prefix, "signed", b"wrong secret", token, "forged"),
        _forged(prefix, "signed", None, token, "unsigned"),
        b"garbage on the channel",
        _forged(prefix, "signed", b"s3cret", token, "ok")[:-3],  # truncated
    ]
    for message in hostile:
        redis_client.publish(names.channel, message)
    # The follower's re-checks read the result key too: poison it as well.
    redis_client.set(names.result, hostile[0], px=60_000)
    until(lambda: follower.stats()["rejected_envelopes"] >= len(hostile), what="rejections")
    assert "b" not in results  # nothing forged was delivered
    release.set()
    t.join(10)
    f.join(10)
    assert results["a"] == results["b"] == f"genuine {token}"
    # A forged *kept* value is never served to a new caller either.
    redis_client.set(names_for(prefix, "kept").result, _forged(prefix, "kept", None, 1, "bad"))
    assert follower.call("kept", lambda: "recomputed") == "recomputed"
    leader.close()
    follower.close()
