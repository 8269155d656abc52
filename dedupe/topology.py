"""Which Redis deployment we talk to (standalone, Cluster, Sentinel): its clients and routes.

URLs:
- ``redis://host:port/db``, ``rediss://…``, ``unix://…``: one server.
- ``redis+cluster://host:port[,host:port…]`` (or ``rediss+cluster://``): Redis Cluster,
  from any of its nodes.
- ``redis+sentinel://[user:password@]host:port[,host:port…]/service[/db]``
  (or ``rediss+sentinel://``): the master of ``service``, found through those sentinels.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel

from .hub import Connection

# Parts of redis-py are untyped; these aliases keep mypy --strict honest about it.
_cluster: Any = redis.cluster
_acluster: Any = redis.asyncio.cluster
_sentinel: Any = redis.sentinel
_asentinel: Any = redis.asyncio.sentinel

__all__ = [
    "ClusterRouter",
    "Kind",
    "Target",
    "cluster_twin",
    "kind_of_clients",
    "parse_url",
    "sentinel_twin",
]

Kind = Literal["standalone", "cluster", "sentinel"]


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed URL: how to build a sync and an asyncio client for it."""

    kind: Kind
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False

    def client(self, opts: dict[str, Any], *, to_async: bool) -> Any:
        """A client for this target: redis-py's sync one, or its asyncio twin."""
        if self.kind == "cluster":
            cluster = _acluster if to_async else _cluster
            nodes = [cluster.ClusterNode(h, p) for h, p in self.hosts]
            return cluster.RedisCluster(startup_nodes=nodes, **self._auth(), **opts)
        if self.kind == "sentinel":
            sentinel = (_asentinel if to_async else _sentinel).Sentinel(
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


def parse_url(url: str) -> Target:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel"):
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"unsupported Redis URL scheme {parts.scheme!r}: use redis://, rediss://, "
                "unix://, redis+cluster:// or redis+sentinel://"
            )
        return Target("standalone", url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"Redis URL {url!r}: expected host:port, got {item!r}")
        hosts.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    kind: Kind = "cluster" if scheme.endswith("cluster") else "sentinel"
    service, db = "", 0
    if kind == "sentinel":
        if not path:
            raise ValueError(f"Redis URL {url!r}: name the sentinel service, as in /mymaster")
        service = unquote(path[0])
        if len(path) > 1:
            if not path[1].isdigit():
                raise ValueError(f"Redis URL {url!r}: the database must be a number")
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
    nodes = [cluster.ClusterNode(n.host, n.port) for n in client.get_nodes()]
    kw = _node_kwargs(client.get_default_node())
    kw.update(opts)
    return cluster.RedisCluster(startup_nodes=nodes, **kw)


def _node_kwargs(node: Any) -> dict[str, Any]:
    pool = getattr(getattr(node, "redis_connection", None), "connection_pool", None)
    kw = dict(getattr(pool, "connection_kwargs", None) or getattr(node, "connection_kwargs", {}))
    return {k: kw[k] for k in ("username", "password", "ssl") if kw.get(k)}


class ClusterRouter:
    """Routes each shard channel to the primary that owns its slot, one connection per node."""

    def __init__(self, client: redis.cluster.RedisCluster, make: Callable[..., Connection]) -> None:
        self._client: Any = client
        self._make = make
        self._lock = threading.Lock()

    def link_for(self, channel: str) -> str:
        node = self._client.get_node_from_key(channel)
        return f"{node.host}:{node.port}"

    def connector(self, link: str) -> Callable[[], Connection]:
        host, _, port = link.rpartition(":")
        return lambda: self._make(host=host, port=int(port))

    def refresh(self) -> None:
        with self._lock:
            self._client.nodes_manager.initialize()


def sentinel_twin(client: Any, opts: dict[str, Any], *, to_async: bool) -> Any:
    """A client of the other kind (sync/async) for the same sentinels and service."""
    pool = client.connection_pool
    hosts = []
    for sentinel in pool.sentinel_manager.sentinels:
        kw = sentinel.connection_pool.connection_kwargs
        hosts.append((kw["host"], int(kw["port"])))
    conn_kw = pool.connection_kwargs
    auth = {k: conn_kw[k] for k in ("username", "password") if conn_kw.get(k)}
    cls: Any = _asentinel.Sentinel if to_async else _sentinel.Sentinel
    manager = cls(hosts, sentinel_kwargs=Target._sentinel_opts(opts), **auth, **opts)
    return manager.master_for(pool.service_name, db=conn_kw.get("db", 0))
