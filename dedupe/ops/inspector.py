"""What Redis holds for dedupe's jobs: who leads, which lease, what is kept, who waits.

Pure functions over a redis-py *sync* client (``redis.Redis`` or ``RedisCluster``); only
:func:`forget` writes. Nothing here deserializes a kept value: an operator's tool must not
unpickle what it finds in Redis.

A job's keys (see ``dedupe.core.keys.names_for``) are ``<prefix>:{<tag>}:lock`` (the lease,
value ``"<token>:<owner>"``), ``:token`` (the fencing counter), ``:result`` (the kept
outcome record, header ``"<token>:<keep_ms>:<ttl_ms>:"``; both formats are
``dedupe.core.record``'s, read here by its functions) and the channel
``<prefix>:{<tag>}`` followers subscribe to (sharded pub/sub on Cluster). The tag is the
job id itself, or ``#`` and 40 hex digits of its SHA-256 for ids that cannot be a hash tag
(long, unprintable, with braces); such a tag is accepted wherever a job id is.

Who holds a lease is read by ``dedupe.core.owners`` (:class:`Holder`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import redis
import redis.cluster

from dedupe.core.keys import Names, names_for, validate_job_id, validate_prefix
from dedupe.core.owners import Holder, parse_owner
from dedupe.core.record import (
    KIND_AT,
    KIND_NAMES,
    MAGIC,
    counter_parts,
    parse_number,
    read_header,
    record_state,
)

__all__ = [
    "JobState",
    "Kept",
    "forget",
    "inspect",
    "names_of",
    "scan",
]

_DIGEST_TAG: Final = re.compile(r"#[0-9a-f]{40}")
_UNSAFE: Final = re.compile(r"[:/\s]")
# SCAN returns at most about COUNT keys per round trip; bigger pages mean fewer trips.
_SCAN_COUNT: Final = 1000


# --- job state -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kept:
    """The outcome record in the result key (header only: the value is never decoded)."""

    token: int  # the lease whose outcome it is
    kind: str  # value, error, unserializable, too_large, or "unknown"
    keep_ms: int  # how long after its lease's grant new callers are served it (result_ttl + run)
    ttl_ms: int  # how long it stays in Redis in all (keep_ms, or the grace for followers)
    age_ms: int  # how long ago it was written
    fresh_ms: int  # how much longer new callers are served it fresh (0: not fresh)
    size: int  # bytes
    # "fresh"; "stale" (past its freshness: served only within the callers' stale windows,
    # stale_while_revalidate / stale_if_error); "not current" (a newer lease was granted, or
    # a forget: only its own waiters read it); "unknown" (not a record dedupe wrote).
    state: str = "unknown"
    stale_ms: int = 0  # how long past its freshness ("stale" only)


@dataclass(frozen=True, slots=True)
class JobState:
    """One job as Redis sees it now (read without a transaction: a snapshot, not atomic)."""

    job_id: str  # as asked (a job id, or a '#…' digest tag)
    tag: str  # the hash tag in its keys
    names: Names
    holder: Holder | None  # None: nobody leads it now
    lease_ms: int | None  # how long the lease has left; None without a lease
    token_counter: int | None  # the fencing counter (the newest token handed out), if kept
    kept: Kept | None  # the outcome record, if one is there
    subscribers: int  # processes subscribed to its channel (waiting followers' hubs)
    unreadable_lock: str | None = None  # a lock value dedupe did not write, as found
    # stale_if_error's backoff: how long no run starts (the error mark's PTTL); None: none.
    backoff_ms: int | None = None
    # The lease refreshes the kept value (the counter is "<lease>:<base>"), which stays
    # servable meanwhile (stale_while_revalidate, early_refresh).
    refreshing: bool = False

    @property
    def cache_state(self) -> str:
        """ "backing off", "fresh", "stale", or "none" (no value new callers may get)."""
        if self.backoff_ms is not None:
            return "backing off"
        if self.kept is not None and self.kept.state in ("fresh", "stale"):
            return self.kept.state
        return "none"

    @property
    def in_flight(self) -> bool:
        return self.holder is not None or self.unreadable_lock is not None


def names_of(prefix: str, job_id: str) -> Names:
    """A job's Redis names; a ``#``-and-40-hex-digits id is taken as a digest tag (from scan)."""
    validate_prefix(prefix)
    validate_job_id(job_id)
    if _DIGEST_TAG.fullmatch(job_id):
        return Names(job_id, f"{prefix}:{{{job_id}}}")
    return names_for(prefix, job_id)


def _text(raw: Any) -> str | None:
    if raw is None:
        return None
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def _raw(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    # decode_responses=True clients hand us str; surrogateescape round-trips what it can.
    return str(value).encode("utf-8", "surrogateescape")


def _newest(counter: bytes | None) -> int | None:
    """The newest lease's token from the counter (``<lease>`` or ``<lease>:<base>``)."""
    lease = counter_parts(counter)[0]
    return None if lease is None else parse_number(lease.decode("ascii"))


def _kept(record: bytes | None, pttl: int, counter: bytes | None) -> Kept | None:
    if record is None:
        return None
    header = read_header(record)
    if header is None:
        return Kept(0, "unknown", 0, 0, 0, 0, len(record))
    token, keep_ms, ttl_ms, end = header
    kind = "unknown"
    if record[end : end + 2] == MAGIC and len(record) > end + KIND_AT:
        kind = KIND_NAMES.get(record[end + KIND_AT], "unknown")
    age = max(0, ttl_ms - max(pttl, 0))
    # As the acquire script judges it, by this machine's clock rather than the server's.
    st = record_state(token, keep_ms, ttl_ms, pttl, counter, int(time.time() * 1000))
    if st is None:
        return Kept(token, kind, keep_ms, ttl_ms, age, 0, len(record), "not current")
    if st.fresh_ms > 0:
        return Kept(token, kind, keep_ms, ttl_ms, age, st.fresh_ms, len(record), "fresh")
    return Kept(token, kind, keep_ms, ttl_ms, age, 0, len(record), "stale", -st.fresh_ms)


def _is_cluster(client: Any) -> bool:
    return isinstance(client, redis.cluster.RedisCluster)


def _subscribers(client: Any, channel: str) -> int:
    if _is_cluster(client):
        # dedupe subscribes with SSUBSCRIBE on the primary that owns the channel's slot.
        node = client.get_node_from_key(channel)
        reply = client.execute_command("PUBSUB SHARDNUMSUB", channel, target_nodes=node)
    else:
        reply = client.execute_command("PUBSUB NUMSUB", channel)
    # redis-py turns the flat reply into [(channel, count)]; some versions leave it flat.
    if reply and isinstance(reply[0], (tuple, list)):
        return int(reply[0][1])
    return int(reply[1]) if len(reply) > 1 else 0


def inspect(client: Any, prefix: str, job_id: str) -> JobState:
    """Read a job's lease, fencing counter, kept outcome and subscribers from Redis."""
    names = names_of(prefix, job_id)
    pipe = client.pipeline(transaction=False) if not _is_cluster(client) else client.pipeline()
    pipe.get(names.lock)
    pipe.pttl(names.lock)
    pipe.get(names.token)
    pipe.get(names.result)
    pipe.pttl(names.result)
    pipe.pttl(names.error)
    lock_raw, lock_pttl, counter_raw, record_raw, record_pttl, error_pttl = pipe.execute()
    holder: Holder | None = None
    unreadable: str | None = None
    lock_text = _text(lock_raw)
    if lock_text is not None:
        try:
            holder = parse_owner(lock_text)
        except ValueError:
            unreadable = lock_text
    tag = names.channel[len(prefix) + 2 : -1]
    return JobState(
        job_id=job_id,
        tag=tag,
        names=names,
        holder=holder,
        lease_ms=int(lock_pttl) if lock_text is not None and int(lock_pttl) >= 0 else None,
        token_counter=_newest(_raw(counter_raw)),
        kept=_kept(_raw(record_raw), int(record_pttl), _raw(counter_raw)),
        subscribers=_subscribers(client, names.channel),
        unreadable_lock=unreadable,
        backoff_ms=int(error_pttl) if int(error_pttl) >= 0 else None,
        refreshing=counter_parts(_raw(counter_raw))[1] is not None,
    )


def forget(client: Any, prefix: str, job_id: str) -> bool:
    """Drop a job's kept outcome (DEL its result key); True if there was one.

    The lease is left alone: a running leader still finishes, and stores its own outcome.
    """
    names = names_of(prefix, job_id)
    return bool(client.delete(names.result))


# --- listing -------------------------------------------------------------------------------


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _nodes(client: Any) -> Iterator[Any]:
    """A plain redis.Redis per place to SCAN: the client itself, or each Cluster primary."""
    if not _is_cluster(client):
        yield client
        return
    for node in client.get_primaries():
        conn = node.redis_connection
        if conn is None:  # not connected yet: let the cluster client make one
            conn = client.get_redis_connection(node)
        yield conn


def scan(client: Any, prefix: str) -> list[str]:
    """The jobs under ``prefix`` that Redis holds a lease or an outcome for, sorted.

    Each is the job id, or the ``#…`` digest tag of an id that cannot be a hash tag (which
    :func:`inspect` and :func:`forget` accept). SCAN-based (never KEYS), over every primary
    on Cluster; a job that appears or goes during the scan may or may not be listed.
    """
    validate_prefix(prefix)
    head = _glob_escape(prefix) + ":{"
    found: set[str] = set()
    start = len(prefix) + 2
    for node in _nodes(client):
        for suffix in (":lock", ":result"):
            for key in node.scan_iter(match=f"{head}*}}{suffix}", count=_SCAN_COUNT):
                text = _text(key)
                assert text is not None
                found.add(text[start : -len(suffix) - 1])
    return sorted(found)
