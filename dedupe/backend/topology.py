"""Which Redis deployment we talk to (standalone, Cluster, Sentinel): its clients and routes.

URLs:
- ``redis://host:port/db``, ``rediss://…``, ``unix://…``: one server.
- ``redis+cluster://host:port[,host:port…]`` (or ``rediss+cluster://``): Redis Cluster,
  from any of its nodes.
- ``redis+sentinel://[user:password@]host:port[,host:port…]/service[/db]``
  (or ``rediss+sentinel://``): the master of ``service``, found through those sentinels.
- ``memory://`` or ``memory://<name>``: no Redis; a store in this process
  (``dedupe.backend.memory``).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.crc import key_slot
from redis.exceptions import MovedError

from dedupe.backend import memory
from dedupe.backend.hub import Connection
from dedupe.errors import ConfigurationError

# Parts of redis-py are untyped; these aliases keep mypy --strict honest about it.
_cluster: Any = redis.cluster
_acluster: Any = redis.asyncio.cluster
_sentinel: Any = redis.sentinel
_asentinel: Any = redis.asyncio.sentinel

__all__ = [
    "AsyncSentinel",
    "ClusterRouter",
    "Kind",
    "SyncSentinel",
    "Target",
    "cluster_twin",
    "kind_of_clients",
    "note_moved",
    "parse_url",
    "sentinel_twin",
]

log = logging.getLogger(__name__)

Kind = Literal["standalone", "cluster", "sentinel", "memory"]


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed URL: how to build a sync and an asyncio client for it."""

    kind: Kind
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False

    def client(self, opts: dict[str, Any], *, to_async: bool) -> Any:
        """A client for this target: redis-py's sync one, or its asyncio twin."""
        if self.kind == "memory":
            store = memory.store_for(self.service)
            return memory.MemoryAsyncClient(store) if to_async else memory.MemoryClient(store)
        if self.kind == "cluster":
            cluster = _acluster if to_async else _cluster
            nodes = [cluster.ClusterNode(h, p) for h, p in self.hosts]
            return cluster.RedisCluster(startup_nodes=nodes, **self._auth(), **opts)
        if self.kind == "sentinel":
            sentinel = (AsyncSentinel if to_async else SyncSentinel)(
                list(self.hosts), sentinel_kwargs=self._sentinel_opts(opts), **self._auth(), **opts
            )
            return sentinel.master_for(self.service, db=self.db)
        standalone: Any = redis.asyncio.Redis if to_async else redis.Redis
        return standalone.from_url(self.url, **opts)

    def _auth(self) -> dict[str, Any]:
        auth: dict[str, Any] = {}
        if self.username:
            auth["username"] = self.username
        if self.password:
            auth["password"] = self.password
        if self.ssl:
            auth["ssl"] = True
        return auth

    @staticmethod
    def _sentinel_opts(opts: dict[str, Any]) -> dict[str, Any]:
        keep = ("socket_timeout", "socket_connect_timeout")
        return {k: opts[k] for k in keep if k in opts}


_SCHEMES = "redis://, rediss://, unix://, redis+cluster://, redis+sentinel:// or memory://"
_TRUE = ("1", "true", "yes", "on", "y", "t")


def _bad(url: str, why: str) -> ValueError:
    return ValueError(f"Redis URL {url!r}: {why}")


def _port(url: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise _bad(url, f"the port must be a number from 1 to 65535, not {text!r}")
    return int(text)


def _standalone(url: str, scheme: str) -> Target:
    """Check a one-server URL as redis-py would read it, without its silent defaults."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    decode = query.get("decode_responses", [""])[-1].lower()
    if decode in _TRUE:
        raise _bad(url, "decode_responses must stay off: dedupe's records are bytes")
    if scheme == "unix":
        if not parts.path:
            raise _bad(url, "name the socket path, as in unix:///run/redis.sock")
        db_text = query.get("db", ["0"])[-1]
        if not db_text.isdigit():
            raise _bad(url, f"the database must be a number, not {db_text!r}")
        return Target("standalone", url, db=int(db_text))
    if not parts.netloc:
        raise _bad(
            url, f"no host: write {scheme}://host:port/db, as in {scheme}://localhost:6379/0"
        )
    host = parts.hostname
    if not host:
        raise _bad(url, f"no host before the port: write {scheme}://localhost:6379/0 for localhost")
    _, _, hostport = parts.netloc.rpartition("@")
    after_host = hostport.rpartition("]")[2] if hostport.startswith("[") else hostport
    port = _port(url, after_host.partition(":")[2]) if ":" in after_host else 6379
    path = parts.path.strip("/")
    db_text = path or query.get("db", ["0"])[-1]
    if not db_text.isdigit():
        raise _bad(url, f"the database must be a number, as in /0, not {db_text!r}")
    return Target(
        "standalone",
        url,
        ((host, port),),
        db=int(db_text),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ssl=scheme == "rediss",
    )


def parse_url(url: str) -> Target:
    """Check and read a Redis URL once, for sync and asyncio clients alike.

    Raises TypeError or ValueError naming what is wrong; never connects.
    """
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, not {type(url).__name__}")
    if "://" not in url:
        typo = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]*):?/*(.+)", url)
        hint = f"did you mean {typo[1]}://{typo[2]}? " if typo else ""
        raise _bad(url, f"not a URL (no '://'); {hint}use {_SCHEMES}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return _standalone(url, scheme)
    if scheme == "memory":
        # memory://<name>: the name is all there is (no host, port or database).
        name = unquote(url.split("://", 1)[1]).strip("/")
        if parts.query or parts.fragment:
            raise _bad(url, "memory:// takes a name only, as in memory:// or memory://tests")
        return Target("memory", url, service=name)
    if scheme not in ("redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel"):
        raise _bad(url, f"unsupported scheme {parts.scheme!r}: use {_SCHEMES}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host.strip("[]"):
            raise _bad(url, f"expected host:port, got {item!r}")
        hosts.append((host.strip("[]"), _port(url, port)))
    path = [p for p in parts.path.split("/") if p]
    kind: Kind = "cluster" if scheme.endswith("cluster") else "sentinel"
    service, db = "", 0
    if kind == "sentinel":
        if not path:
            raise _bad(url, "name the sentinel service, as in /mymaster")
        service = unquote(path[0])
        if len(path) > 1:
            if not path[1].isdigit():
                raise _bad(url, "the database must be a number")
            db = int(path[1])
    return Target(
        kind,
        url,
        tuple(hosts),
        service,
        db,
        unquote(username) or None,
        unquote(password) or None,
        scheme.startswith("rediss"),
    )


def kind_of_clients(client: Any, async_client: Any) -> Kind:
    if isinstance(client, redis.cluster.RedisCluster) or isinstance(
        async_client, redis.asyncio.cluster.RedisCluster
    ):
        return "cluster"
    for c in (client, async_client):
        pool = getattr(c, "connection_pool", None)
        if isinstance(pool, (redis.sentinel.SentinelConnectionPool,)) or hasattr(
            pool, "service_name"
        ):
            return "sentinel"
    return "standalone"


def cluster_twin(client: Any, opts: dict[str, Any], *, to_async: bool) -> Any:
    """A cluster client of the other kind (sync/async) for the same nodes."""
    cluster = _acluster if to_async else _cluster
    # A client that has not connected yet knows only its startup nodes.
    known = list(client.get_nodes()) or list(client.nodes_manager.startup_nodes.values())
    nodes = [cluster.ClusterNode(n.host, n.port) for n in known]
    kw = _node_kwargs(client.get_default_node() or known[0])
    kw.update(opts)
    return cluster.RedisCluster(startup_nodes=nodes, **kw)


def _node_kwargs(node: Any) -> dict[str, Any]:
    pool = getattr(getattr(node, "redis_connection", None), "connection_pool", None)
    kw = dict(getattr(pool, "connection_kwargs", None) or getattr(node, "connection_kwargs", {}))
    return {k: kw[k] for k in ("username", "password", "ssl") if kw.get(k)}


class ClusterRouter:
    """Routes each shard channel to the primary that owns its slot, one connection per node.

    ``link_for`` reads the client's cached slot layout (no network I/O), overridden by what
    MOVED replies to the hub taught us since the last ``refresh`` (which does network I/O and
    runs on a hub thread).
    """

    def __init__(self, client: redis.cluster.RedisCluster, make: Callable[..., Connection]) -> None:
        self._client: Any = client
        self._make = make
        self._lock = threading.Lock()  # guards _moved only: never held across I/O
        self._refreshing = threading.Lock()  # one layout refresh at a time
        self._moved: dict[int, str] = {}  # slot -> "host:port" learned from MOVED

    def link_for(self, channel: str) -> str:
        if self._moved:
            with self._lock:
                link = self._moved.get(key_slot(channel.encode()))
            if link is not None:
                return link
        node = self._client.get_node_from_key(channel)
        return f"{node.host}:{node.port}"

    def connector(self, link: str) -> Callable[[], Connection]:
        host, _, port = link.rpartition(":")
        return lambda: self._make(host=host, port=int(port))

    def moved(self, slot: int, host: str, port: int) -> None:
        with self._lock:
            self._moved[slot] = f"{host}:{port}"

    def refresh(self) -> None:
        with self._refreshing:
            self._client.nodes_manager.initialize()
            with self._lock:
                self._moved.clear()


def sentinel_twin(client: Any, opts: dict[str, Any], *, to_async: bool) -> Any:
    """A client of the other kind (sync/async) for the same sentinels and service."""
    pool = client.connection_pool
    hosts = []
    for sentinel in pool.sentinel_manager.sentinels:
        kw = sentinel.connection_pool.connection_kwargs
        hosts.append((kw["host"], int(kw["port"])))
    conn_kw = pool.connection_kwargs
    auth = {k: conn_kw[k] for k in ("username", "password") if conn_kw.get(k)}
    cls: Any = AsyncSentinel if to_async else SyncSentinel
    manager = cls(hosts, sentinel_kwargs=Target._sentinel_opts(opts), **auth, **opts)
    return manager.master_for(pool.service_name, db=conn_kw.get("db", 0))


# --- Sentinel: why no master was found ----------------------------------------------------------
#
# redis-py raises MasterNotFoundError (a ConnectionError, so an outage) whatever the reason,
# with the repr of every sentinel's connection pool in its message. Only an outage should
# be one: a URL whose "sentinels" are plain servers, or that names a service no sentinel
# monitors, is fixed by changing the URL. So when discovery fails, the sentinels are asked
# once more (SENTINEL MASTERS, bounded by the sentinel connections' timeouts) and the answer
# decides: ConfigurationError, or a MasterNotFoundError with a short message.


@dataclass(frozen=True, slots=True)
class _Answer:
    """What one sentinel said to SENTINEL MASTERS."""

    where: str  # host:port
    kind: Literal["knows", "unknown", "not-sentinel", "unreachable"]
    detail: str = ""  # the services it knows ("unknown"), or why it did not answer


def _where(sentinel: Any) -> str:
    kw = sentinel.connection_pool.connection_kwargs
    return f"{kw.get('host')}:{kw.get('port')}"


def _answer(where: str, service: str, masters: Any, error: BaseException | None) -> _Answer:
    if error is None:
        known = sorted(str(name) for name in (masters or {}))
        return _Answer(where, "knows" if service in known else "unknown", ", ".join(known))
    if isinstance(error, redis.exceptions.ResponseError) and "unknown command" in str(error):
        return _Answer(where, "not-sentinel")
    return _Answer(where, "unreachable", f"{type(error).__name__}: {error}"[:200])


def _no_master(service: str, answers: list[_Answer], not_found: type[Exception]) -> Exception:
    """The error to raise when no sentinel named a master of ``service``."""
    if any(a.kind == "knows" for a in answers):
        up = ", ".join(a.where for a in answers if a.kind == "knows")
        return not_found(
            f"no master of {service!r} is up now, according to the sentinels at {up} "
            "(a failover may be under way)"
        )
    plain = [a.where for a in answers if a.kind == "not-sentinel"]
    blind = [a for a in answers if a.kind == "unknown"]
    if not plain and not blind:
        why = "; ".join(f"{a.where}: {a.detail}" for a in answers)
        return not_found(f"no sentinel of {service!r} answered ({why})")
    parts = []
    if plain:
        parts.append(
            f"{', '.join(plain)} {'is' if len(plain) == 1 else 'are'} not a Sentinel ("
            "answered: unknown command 'SENTINEL'): for one plain server use redis://host:port/db; "
            "redis+sentinel:// lists sentinels, as in redis+sentinel://host:26379/mymaster/0"
        )
    if blind:
        known = sorted({name for a in blind for name in a.detail.split(", ") if name})
        parts.append(
            f"no sentinel at {', '.join(a.where for a in blind)} monitors a service "
            f"{service!r} (they know: {', '.join(known) or 'none'}): name one of those in the URL"
        )
    return ConfigurationError("; ".join(parts))


class SyncSentinel(_sentinel.Sentinel):  # type: ignore[misc]
    """redis-py's Sentinel, which says why no master was found (see _no_master)."""

    def discover_master(self, service_name: str) -> Any:
        try:
            return super().discover_master(service_name)
        except _sentinel.MasterNotFoundError:
            pass
        answers = []
        for sentinel in self.sentinels:
            masters, error = None, None
            try:
                masters = sentinel.sentinel_masters()
            except redis.exceptions.RedisError as exc:
                error = exc
            answers.append(_answer(_where(sentinel), service_name, masters, error))
        raise _no_master(service_name, answers, _sentinel.MasterNotFoundError)


class AsyncSentinel(_asentinel.Sentinel):  # type: ignore[misc]
    """redis.asyncio's Sentinel, which says why no master was found (see _no_master)."""

    async def discover_master(self, service_name: str) -> Any:
        try:
            return await super().discover_master(service_name)
        except _asentinel.MasterNotFoundError:
            pass
        answers = []
        for sentinel in self.sentinels:
            masters, error = None, None
            try:
                masters = await sentinel.sentinel_masters()
            except redis.exceptions.RedisError as exc:
                error = exc
            answers.append(_answer(_where(sentinel), service_name, masters, error))
        raise _no_master(service_name, answers, _asentinel.MasterNotFoundError)


def note_moved(cluster: Any, replies: Sequence[Any]) -> None:
    """A slot moved: patch the Cluster client's slot map (no I/O) from the first MOVED among
    ``replies``, so the next batch or renewal goes to the new owner (the command layer
    learns it anyway when it meets the move)."""
    manager = cluster.nodes_manager
    for reply in replies:
        if isinstance(reply, MovedError):
            try:
                if hasattr(manager, "move_slot"):
                    manager.move_slot(reply)
                else:  # redis-py < 5.1
                    manager.update_moved_exception(reply)
            except Exception:
                log.debug("could not patch the slot map", exc_info=True)
            return
