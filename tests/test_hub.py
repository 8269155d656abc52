"""The pub/sub hub on real redis-server processes: batches per slot, error replies tied to their
command, reconnects, half-open and slow links (through a fault-injecting loopback proxy), ACL
denials, connection names, and a caller path that never waits on the network.

The Hub is built the way dedupe/backend/lifecycle.py builds it: a SingleRouter over the
connection class and kwargs of a standalone client's pool, or a ClusterRouter over a
RedisCluster client.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.cluster
from helpers import until
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, ResponseError, TryAgainError

from dedupe.backend.hub import Connection, Hub, Router, SingleRouter
from dedupe.backend.topology import ClusterRouter
from dedupe.core.keys import names_for
from dedupe.core.protocol import RECHECK
from dedupe.core.signals import Latch, Mailbox
from dedupe.errors import BackendUnavailable
from devtools.servers import RedisClusterSet, RedisServer

# --------------------------------------------------------------------------- a faulty proxy

pytestmark = pytest.mark.compat


class FaultProxy:
    """A TCP proxy on loopback: forwards both ways; ``blackhole()`` stops forwarding (sockets
    stay open, nothing is read), ``delay(s)`` holds every chunk ``s`` seconds, ``heal()``."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Small buffers (inherited by accepted sockets), so a blackhole fills up quickly.
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._open = threading.Event()  # set: forwarding
        self._open.set()
        self._delay = 0.0
        self._closed = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def blackhole(self) -> None:
        self._open.clear()

    def delay(self, seconds: float) -> None:
        self._delay = seconds
        self._open.set()

    def heal(self) -> None:
        self._delay = 0.0
        self._open.set()

    def close(self) -> None:
        self._closed = True
        self._open.set()
        self._listener.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._socks += [client, server]
                self.accepted += 1
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._closed:
                self._open.wait()  # blackholed: read nothing, so the sender's buffers fill
                data = src.recv(65536)
                if not data:
                    break
                if self._delay:
                    time.sleep(self._delay)
                self._open.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# --------------------------------------------------------------------------- hub builders


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """As dedupe/backend/lifecycle.py: RESP2 frames as bytes, no redis-py health checks."""
    kw = {k: v for k, v in kwargs.items() if not k.startswith("maint_notif")}
    kw.update(protocol=2, health_check_interval=0, decode_responses=False)
    return kw


def standalone_router(host: str, port: int, **client_kw: Any) -> SingleRouter:
    client = redis.Redis(host=host, port=port, **client_kw)
    pool = client.connection_pool
    kwargs, cls = _hub_kwargs(pool.connection_kwargs), pool.connection_class

    def connect() -> Connection:
        conn: Connection = cls(**kwargs)
        return conn

    return SingleRouter(connect)


def cluster_router(cluster: RedisClusterSet) -> tuple[ClusterRouter, redis.cluster.RedisCluster]:
    client = cluster.client()
    node_pool = client.get_default_node().redis_connection.connection_pool  # type: ignore[no-untyped-call]
    base, node_cls = _hub_kwargs(node_pool.connection_kwargs), node_pool.connection_class

    def make(host: str, port: int) -> Connection:
        conn: Connection = node_cls(**{**base, "host": host, "port": port})
        return conn

    return ClusterRouter(client, make), client


@pytest.fixture
def hubs() -> Iterator[list[Hub]]:
    made: list[Hub] = []
    yield made
    for hub in made:
        hub.close()


def drain(mailbox: Mailbox[object], want: Callable[[object], bool], timeout: float = 15) -> None:
    """Take items until one satisfies ``want`` (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "the mailbox never got the expected item"
        item = mailbox.get(left)
        if item is not None and want(item):
            return


def equal_to(expected: bytes) -> Callable[[object], bool]:
    return lambda item: item == expected


def all_confirmed(hub: Hub, channels: list[str]) -> bool:
    for ch in channels:
        latch = hub.confirmation(ch)
        if not latch.is_set() or latch.get() is not True:
            return False
    return True


def wait_latches(latches: list[Latch[bool]], timeout: float = 20) -> list[bool]:
    deadline = time.monotonic() + timeout
    for latch in latches:
        assert latch.wait(max(0.0, deadline - time.monotonic())), "a confirmation never came"
    return [latch.get() for latch in latches]


# --------------------------------------------------------------------------- cluster


def master_ports(cluster: RedisClusterSet) -> dict[int, list[tuple[int, int]]]:
    with cluster.servers[0].client() as c:
        raw = c.execute_command("CLUSTER", "SLOTS")
    owners: dict[int, list[tuple[int, int]]] = {}
    for entry in raw:
        owners.setdefault(int(entry[2][1]), []).append((int(entry[0]), int(entry[1])))
    return owners


def channels_on(cluster: RedisClusterSet, server: RedisServer, prefix: str, n: int) -> list[str]:
    """``n`` job channels (as dedupe names them) whose slots all belong to ``server``."""
    ranges = master_ports(cluster)[server.port]
    found: list[str] = []
    i = 0
    while len(found) < n:
        channel = names_for(prefix, f"job-{i}").channel
        slot = key_slot(channel.encode())
        if any(lo <= slot <= hi for lo, hi in ranges):
            found.append(channel)
        i += 1
    return found


def shard_channels(server: RedisServer, prefix: str) -> int:
    with server.client() as c:
        return len(c.execute_command("PUBSUB", "SHARDCHANNELS", f"{prefix}:*"))


def errorstat(server: RedisServer, name: str) -> int:
    with server.client() as c:
        entry = c.info("errorstats").get(f"errorstat_{name}", {})
    return int(entry.get("count", 0)) if isinstance(entry, dict) else 0


@pytest.mark.cluster
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kill", [False, True], ids=["plain", "client-kill"])
def test_many_slots_on_one_master(
    redis_cluster: RedisClusterSet, prefix: str, hubs: list[Hub], kill: bool
) -> None:
    """2,000 channels over many slots of ONE master: each SSUBSCRIBE/SUNSUBSCRIBE carries one
    slot (no CROSSSLOT), every subscription is confirmed, survives CLIENT KILL TYPE pubsub
    (every mailbox gets RECHECK, the hub re-subscribes slot by slot), every SPUBLISH arrives,
    and after the unsubscribes no node holds a channel of ours."""
    master = redis_cluster.servers[1]
    channels = channels_on(redis_cluster, master, prefix, 2000)
    assert len({key_slot(c.encode()) for c in channels}) > 500  # many slots, one node
    router, client = cluster_router(redis_cluster)
    hub = Hub(router, sharded=True, health_interval=2.0)
    hubs.append(hub)
    crossslot_before = errorstat(master, "CROSSSLOT")
    boxes = {ch: Mailbox[object]() for ch in channels}
    latches = [hub.subscribe(ch, boxes[ch]) for ch in channels]
    assert wait_latches(latches) == [True] * len(channels)
    assert shard_channels(master, prefix) == len(channels)

    if kill:
        with master.client() as c:
            assert c.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
        for box in boxes.values():  # once at the loss, once the re-subscription resolved
            drain(box, lambda item: item is RECHECK)
            drain(box, lambda item: item is RECHECK)
        until(lambda: all_confirmed(hub, channels), timeout=20, what="re-subscriptions")
        assert hub.reconnects >= 1
        until(lambda: shard_channels(master, prefix) == len(channels), what="all re-subscribed")

    with master.client() as c:
        pipe = c.pipeline(transaction=False)
        for ch in channels:
            pipe.execute_command("SPUBLISH", ch, f"to {ch}")
        assert all(int(n) == 1 for n in pipe.execute())
    for ch, box in boxes.items():
        drain(box, equal_to(f"to {ch}".encode()))

    for ch, box in boxes.items():
        hub.unsubscribe(ch, box)
    until(lambda: hub.channels() == {}, timeout=20, what="every unsubscribe acked")
    for server in redis_cluster.servers:
        assert shard_channels(server, prefix) == 0, f":{server.port} still holds channels"
    assert errorstat(master, "CROSSSLOT") == crossslot_before
    client.close()


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_unsubscribe_across_a_kill_leaves_nothing(
    redis_cluster: RedisClusterSet, prefix: str, hubs: list[Hub]
) -> None:
    """Unsubscribes racing a pub/sub kill and re-subscribes: nothing stays at any server."""
    master = redis_cluster.servers[2]
    channels = channels_on(redis_cluster, master, prefix, 600)
    router, client = cluster_router(redis_cluster)
    hub = Hub(router, sharded=True, health_interval=2.0)
    hubs.append(hub)
    boxes = {ch: Mailbox[object]() for ch in channels}
    assert wait_latches([hub.subscribe(ch, boxes[ch]) for ch in channels]) == [True] * 600
    keep = channels[:300]
    for ch in channels[300:]:
        hub.unsubscribe(ch, boxes[ch])
    with master.client() as c:
        c.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    until(lambda: set(hub.channels()) == set(keep), timeout=20, what="the dropped half gone")
    until(lambda: all_confirmed(hub, keep), timeout=20, what="the kept half re-confirmed")
    until(lambda: shard_channels(master, prefix) == len(keep), what="the server to agree")
    for ch in keep:
        hub.unsubscribe(ch, boxes[ch])
    until(lambda: hub.channels() == {}, timeout=20, what="every unsubscribe acked")
    for server in redis_cluster.servers:
        assert shard_channels(server, prefix) == 0
    client.close()


@pytest.mark.cluster
@pytest.mark.timeout(30)
def test_stale_route_follows_moved(
    redis_cluster: RedisClusterSet, prefix: str, hubs: list[Hub]
) -> None:
    """A router that sends every channel to the wrong node: MOVED replies re-route each
    command's channels (and only those) to their owner, where they are confirmed."""
    router, client = cluster_router(redis_cluster)
    wrong = redis_cluster.servers[0]

    class Stale:
        def __init__(self) -> None:
            self.moves = 0

        def link_for(self, channel: str) -> str:
            return router.link_for(channel) if self.moves else f"{wrong.host}:{wrong.port}"

        def connector(self, link: str) -> Callable[[], Connection]:
            return router.connector(link)

        def refresh(self) -> None:
            router.refresh()

        def moved(self, slot: int, host: str, port: int) -> None:
            self.moves += 1
            router.moved(slot, host, port)

    stale = Stale()
    hub = Hub(stale, sharded=True, health_interval=2.0)
    hubs.append(hub)
    others = redis_cluster.servers[1:]
    channels = [c for s in others for c in channels_on(redis_cluster, s, prefix, 50)]
    boxes = {ch: Mailbox[object]() for ch in channels}
    assert wait_latches([hub.subscribe(ch, boxes[ch]) for ch in channels]) == [True] * 100
    assert stale.moves >= 1
    for server in others:
        assert shard_channels(server, prefix) == 50
    assert shard_channels(wrong, prefix) == 0
    for ch, box in boxes.items():
        hub.unsubscribe(ch, box)
    until(lambda: hub.channels() == {}, what="every unsubscribe acked")
    client.close()


# --------------------------------------------------------------------------- standalone


def numsub_total(server: RedisServer, prefix: str) -> int:
    with server.client() as c:
        return len(c.execute_command("PUBSUB", "CHANNELS", f"{prefix}:*"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kill", [False, True], ids=["plain", "client-kill"])
def test_many_channels_standalone(
    redis_server: RedisServer, prefix: str, hubs: list[Hub], kill: bool
) -> None:
    channels = [names_for(prefix, f"job-{i}").channel for i in range(2000)]
    hub = Hub(standalone_router(redis_server.host, redis_server.port), sharded=False)
    hubs.append(hub)
    boxes = {ch: Mailbox[object]() for ch in channels}
    assert wait_latches([hub.subscribe(ch, boxes[ch]) for ch in channels]) == [True] * 2000
    assert numsub_total(redis_server, prefix) == 2000
    if kill:
        with redis_server.client() as c:
            c.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        for box in boxes.values():  # once at the loss, once the re-subscription resolved
            drain(box, lambda item: item is RECHECK)
            drain(box, lambda item: item is RECHECK)
        until(lambda: all_confirmed(hub, channels), timeout=20, what="re-subscriptions")
    with redis_server.client() as c:
        pipe = c.pipeline(transaction=False)
        for ch in channels:
            pipe.publish(ch, f"to {ch}")
        assert all(int(n) == 1 for n in pipe.execute())
    for ch, box in boxes.items():
        drain(box, equal_to(f"to {ch}".encode()))
    for ch, box in boxes.items():
        hub.unsubscribe(ch, box)
    until(lambda: hub.channels() == {}, timeout=20, what="every unsubscribe acked")
    assert numsub_total(redis_server, prefix) == 0


@pytest.mark.timeout(30)
def test_acl_denial_is_tied_to_its_channel(
    redis_server: RedisServer, prefix: str, hubs: list[Hub]
) -> None:
    """An ACL that allows one channel pattern: the denied channel's latch resolves False at
    once with a reason naming it and the permission; the allowed ones, sent in the same batch
    at first, are confirmed."""
    user, password = f"u{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    with redis_server.client() as c:
        c.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "resetchannels",
                          f"&{prefix}:ok:*", "+@all")  # fmt: skip
    try:
        router = standalone_router(
            redis_server.host, redis_server.port, username=user, password=password
        )
        hub = Hub(router, sharded=False)
        hubs.append(hub)
        allowed = [f"{prefix}:ok:{i}" for i in range(5)]
        denied = f"{prefix}:no:1"
        boxes = {ch: Mailbox[object]() for ch in [*allowed, denied]}
        latches = {ch: hub.subscribe(ch, box) for ch, box in boxes.items()}
        assert latches[denied].wait(15)
        assert latches[denied].get() is False
        reason = hub.denied(denied)
        assert reason is not None and denied in reason and "&" in reason, reason
        assert wait_latches([latches[ch] for ch in allowed]) == [True] * 5
        assert all(hub.denied(ch) is None for ch in allowed)
        with redis_server.client() as c:
            c.publish(allowed[0], b"hello")
        drain(boxes[allowed[0]], lambda item: item == b"hello")
        # A new follower of the denied channel learns it at once.
        assert hub.subscribe(denied, Mailbox()).get() is False
        for ch, box in boxes.items():
            hub.unsubscribe(ch, box)
    finally:
        with redis_server.client() as c:
            c.execute_command("ACL", "DELUSER", user)


@pytest.mark.timeout(30)
def test_connection_is_named(redis_server: RedisServer, prefix: str, hubs: list[Hub]) -> None:
    name = f"{prefix}:hub:testhost:4242"
    hub = Hub(standalone_router(redis_server.host, redis_server.port), sharded=False, name=name)
    hubs.append(hub)
    assert hub.subscribe(f"{prefix}:ch", Mailbox()).wait(15)
    with redis_server.client() as c:
        clients = c.client_list(_type="pubsub")
    assert [cl["name"] for cl in clients if cl["name"] == name] == [name]
    odd = Hub(standalone_router("127.0.0.1", 1), sharded=False, name=f"{prefix} odd\tname")
    assert odd.name == f"{prefix}_odd_name"  # Redis refuses spaces in a client name
    odd.close()


@pytest.mark.timeout(30)
def test_closed_hub_raises_a_dedupe_error(
    redis_server: RedisServer, prefix: str, hubs: list[Hub]
) -> None:
    proxy = FaultProxy(redis_server.address)
    try:
        hub = Hub(standalone_router("127.0.0.1", proxy.port, socket_timeout=5), sharded=False)
        proxy.blackhole()  # the first subscription stays unconfirmed
        latch = hub.subscribe(f"{prefix}:a", Mailbox())
        hub.close()
        assert latch.wait(5) and latch.get() is False  # whoever waits on it is told
        with pytest.raises(BackendUnavailable, match="closed"):
            hub.subscribe(f"{prefix}:b", Mailbox())
        after = hub.confirmation(f"{prefix}:a")
        assert after.is_set() and after.get() is False
        hub.unsubscribe(f"{prefix}:a", Mailbox())  # harmless
    finally:
        proxy.close()


@pytest.mark.timeout(30)
def test_router_is_built_off_the_callers_path(
    redis_server: RedisServer, prefix: str, hubs: list[Hub]
) -> None:
    """Given a function that builds the router (network I/O), the hub calls it on its own
    thread: subscribe() returns at once, and the latch resolves once the router exists."""
    gate = threading.Event()
    callers: list[str] = []

    def build() -> Router:
        callers.append(threading.current_thread().name)
        assert gate.wait(20)
        return standalone_router(redis_server.host, redis_server.port)

    hub = Hub(build, sharded=False)
    hubs.append(hub)
    box: Mailbox[object] = Mailbox()
    latch = hub.subscribe(f"{prefix}:ch", box)
    assert not latch.is_set()
    gate.set()
    assert latch.wait(15) and latch.get() is True
    assert callers and callers[0] != threading.current_thread().name


# --------------------------------------------------------------------------- faulty links


@pytest.mark.timeout(60)
def test_blackholed_link_is_detected_and_callers_never_wait(
    redis_server: RedisServer, prefix: str, hubs: list[Hub]
) -> None:
    """A half-open link (the proxy keeps both sockets open and forwards nothing): the health
    check, not the 30 s socket timeout, catches it and the hub reconnects; meanwhile
    subscribe() returns at once even with megabytes of commands stuck in the socket, and the
    new latches stay unset until the link is healthy again."""
    proxy = FaultProxy(redis_server.address)
    try:
        router = standalone_router("127.0.0.1", proxy.port, socket_timeout=30)
        hub = Hub(router, sharded=False, health_interval=0.5)
        hubs.append(hub)
        first: Mailbox[object] = Mailbox()
        assert hub.subscribe(f"{prefix}:first", first).wait(15)
        before = hub.reconnects
        proxy.blackhole()
        # 2,000 channels of 4 KB: more than the socket buffers hold, so a sender blocks.
        channels = [f"{prefix}:{i}:" + "x" * 4096 for i in range(2000)]
        boxes = {ch: Mailbox[object]() for ch in channels}
        latches: list[Latch[bool]] = []
        caller = threading.Thread(
            target=lambda: latches.extend(hub.subscribe(ch, boxes[ch]) for ch in channels)
        )
        caller.start()
        caller.join(10)
        assert not caller.is_alive(), "subscribe() blocked on a stalled connection"
        assert not any(latch.is_set() for latch in latches)
        until(lambda: hub.reconnects > before, timeout=10, what="the health check to notice")
        drain(first, lambda item: item is RECHECK)
        proxy.heal()
        assert wait_latches(latches, timeout=40) == [True] * len(channels)
        with redis_server.client() as c:
            c.publish(f"{prefix}:first", b"after")
        drain(first, lambda item: item == b"after")
        for ch, box in boxes.items():
            hub.unsubscribe(ch, box)
        hub.unsubscribe(f"{prefix}:first", first)
        until(lambda: hub.channels() == {}, timeout=20, what="every unsubscribe acked")
    finally:
        proxy.close()


@pytest.mark.timeout(60)
def test_slow_link_is_reconnected(redis_server: RedisServer, prefix: str, hubs: list[Hub]) -> None:
    """Replies slower than the health interval count as a dead link: reconnect; once the link
    is fast again the subscription is confirmed and messages flow."""
    proxy = FaultProxy(redis_server.address)
    try:
        router = standalone_router("127.0.0.1", proxy.port, socket_timeout=30)
        hub = Hub(router, sharded=False, health_interval=0.3)
        hubs.append(hub)
        box: Mailbox[object] = Mailbox()
        assert hub.subscribe(f"{prefix}:ch", box).wait(15)
        before = hub.reconnects
        proxy.delay(2.0)
        until(lambda: hub.reconnects > before, timeout=15, what="the slow link to be dropped")
        late: Mailbox[object] = Mailbox()
        latch = hub.subscribe(f"{prefix}:late", late)  # returns at once; confirmed later
        proxy.heal()
        assert latch.wait(30) and latch.get() is True
        until(lambda: all_confirmed(hub, [f"{prefix}:ch"]), timeout=30, what="re-subscribed")
        with redis_server.client() as c:
            c.publish(f"{prefix}:ch", b"fast again")
        drain(box, lambda item: item == b"fast again")
    finally:
        proxy.close()


# --------------------------------------------------------------------------- scripted replies


Failure = ResponseError | list[ResponseError]


class Scripted:
    """A sans-I/O Connection: answers each (S)SUBSCRIBE/(S)UNSUBSCRIBE/PING the way Redis
    would, except that a command naming a channel in ``fail`` gets that one error reply (a
    list: one error per such command until it runs out, then success)."""

    def __init__(self, fail: dict[tuple[str, str], Failure], gate: threading.Event) -> None:
        self.fail = fail
        self.gate = gate
        self.sent: list[tuple[str, ...]] = []
        self.subscribed: set[str] = set()
        self._replies: deque[object] = deque()
        self._cond = threading.Condition()
        self.closed = False

    def connect(self) -> None:
        assert self.gate.wait(10)

    def disconnect(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def send_command(self, *args: Any) -> None:
        with self._cond:
            if self.closed:
                raise ConnectionError("closed")
            self.sent.append(args)
            cmd, channels = str(args[0]), [str(a) for a in args[1:]]
            errors = [self._error(cmd, ch) for ch in channels if (cmd, ch) in self.fail]
            if any(errors):
                self._replies.append(next(e for e in errors if e is not None))
            elif cmd == "PING":
                self._replies.append([b"pong", b""])
            else:
                for ch in channels:
                    if cmd.endswith("UNSUBSCRIBE"):
                        self.subscribed.discard(ch)
                    else:
                        self.subscribed.add(ch)
                    kind = cmd.lower().encode()
                    self._replies.append([kind, ch.encode(), len(self.subscribed)])
            self._cond.notify_all()

    def _error(self, cmd: str, channel: str) -> ResponseError | None:
        failure = self.fail[(cmd, channel)]
        if isinstance(failure, list):
            return failure.pop(0) if failure else None
        return failure

    def can_read(self, timeout: float = 0) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: self._replies or self.closed, timeout)
            if self.closed:
                raise ConnectionError("closed")
            return bool(self._replies)

    def read_response(self) -> Any:
        with self._cond:
            reply = self._replies.popleft()
        if isinstance(reply, Exception):
            raise reply
        return reply


def scripted_hub(
    fail: dict[tuple[str, str], Failure], hubs: list[Hub]
) -> tuple[Hub, list[Scripted], threading.Event]:
    conns: list[Scripted] = []
    gate = threading.Event()

    def connect() -> Connection:
        conn = Scripted(fail, gate)
        conns.append(conn)
        return conn

    hub = Hub(SingleRouter(connect), sharded=True, health_interval=5.0)
    hubs.append(hub)
    return hub, conns, gate


@pytest.mark.timeout(30)
def test_error_reply_answers_exactly_its_command(
    hubs: list[Hub], caplog: pytest.LogCaptureFixture
) -> None:
    """Three channels of one slot go out in one SSUBSCRIBE; an error reply naming the batch
    is traced to the one channel it is about (each is re-sent alone): the other two are
    confirmed, the failing ones resolve False, and the error is logged once."""
    bad, worse = "{t}bad", "{t}worse"
    good = ["{t}a", "{t}b"]
    err = ResponseError("ERR something odd")
    hub, conns, gate = scripted_hub({("SSUBSCRIBE", bad): err, ("SSUBSCRIBE", worse): err}, hubs)
    latches = {ch: hub.subscribe(ch, Mailbox()) for ch in [*good, bad]}
    gate.set()  # connect only now: all three are in the first command
    assert wait_latches([latches[ch] for ch in good]) == [True, True]
    assert wait_latches([latches[bad]]) == [False]
    assert hub.denied(bad) is None  # not an ACL denial
    first = conns[0].sent[0]
    assert first[0] == "SSUBSCRIBE" and sorted(first[1:]) == sorted([*good, bad])
    assert wait_latches([hub.subscribe(worse, Mailbox())]) == [False]
    assert len([r for r in caplog.records if "something odd" in r.getMessage()]) == 1
    for command in conns[0].sent:  # one slot per (un)subscribe, always
        if command[0] != "PING":
            assert len({key_slot(ch.encode()) for ch in command[1:]}) == 1, command
    assert hub.reconnects == 0


@pytest.mark.timeout(30)
def test_failed_unsubscribe_reconnects_so_nothing_stays(hubs: list[Hub]) -> None:
    """An unsubscribe answered by an error leaves the server's state unknown: the hub drops
    that connection (which ends every subscription at the server) and re-subscribes only
    the channels still wanted."""
    gone, kept = "{t}gone", "{u}kept"
    hub, conns, gate = scripted_hub({("SUNSUBSCRIBE", gone): ResponseError("ERR nope")}, hubs)
    gate.set()
    box_gone, box_kept = Mailbox[object](), Mailbox[object]()
    assert wait_latches([hub.subscribe(gone, box_gone), hub.subscribe(kept, box_kept)]) == [
        True,
        True,
    ]
    hub.unsubscribe(gone, box_gone)
    until(lambda: len(conns) >= 2 and hub.reconnects >= 1, what="a reconnect after the error")
    until(lambda: all_confirmed(hub, [kept]), what="the kept channel re-subscribed")
    assert conns[0].closed
    assert conns[-1].subscribed == {kept}
    drain(box_kept, lambda item: item is RECHECK)
    until(lambda: hub.channels() == {kept: 1}, what="the dropped channel forgotten")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("code", ["TRYAGAIN", "CLUSTERDOWN", "ASK"])
def test_transient_error_is_retried_on_its_own(hubs: list[Hub], code: str) -> None:
    """A subscribe answered by TRYAGAIN (a slot mid-migration), CLUSTERDOWN or ASK resolves
    False and is sent again after a short backoff, with nothing else happening on the link
    to wake its writer; once acked, its follower gets RECHECK (it stopped waiting)."""
    channel = "{t}busy"
    errors = {
        "TRYAGAIN": TryAgainError("Multiple keys request during rehashing of slot"),
        "CLUSTERDOWN": ClusterDownError("The cluster is down"),
        "ASK": AskError(f"{key_slot(channel.encode())} 127.0.0.1:1"),
    }
    hub, conns, gate = scripted_hub({("SSUBSCRIBE", channel): [errors[code]]}, hubs)
    gate.set()
    box: Mailbox[object] = Mailbox()
    assert wait_latches([hub.subscribe(channel, box)]) == [False]
    until(lambda: all_confirmed(hub, [channel]), timeout=10, what="the retried subscribe")
    drain(box, lambda item: item is RECHECK)
    assert [c for c in conns[0].sent if c[0] == "SSUBSCRIBE"] == [("SSUBSCRIBE", channel)] * 2
    assert hub.reconnects == 0
