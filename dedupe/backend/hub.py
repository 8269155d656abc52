"""The per-process pub/sub hub: one subscriber connection per Redis node, shared by all flights.

Channels are reference-counted: the first follower of a job subscribes, the last one out
unsubscribes a moment later (a hot key's next follower finds the subscription still open).
Every decision about them (batches per slot, which reply answers which command, errors,
reconnects, re-routes, lingering, the health check, what each follower is told and when its
confirmation resolves) is taken by the sans-I/O machine in ``dedupe/core/subscriptions.py``;
this module only carries it: connections, threads and the lock. Callers only record what
they want; they never touch a socket, nor a lock held across one.

Each node connection (a *link*) has two threads: a reader that owns every read (and feeds
the machine each reply, error reply and read interval of silence) and a writer that owns
every write (the commands the machine's ``take`` returns, in that order, so the machine's
list of commands awaiting replies is in socket order). A router thread builds or refreshes
the router (network I/O on Cluster) and routes the channels that wait for it.

A subscription's confirmation is a ``Latch[bool]``: True once the server acked it, False once
it is known to fail (denied by an ACL, any other error reply, the hub closed). Nothing may
depend on it arriving: a follower waits for it a bounded time and re-checks the job either way.

Pub/sub is at-most-once. When a connection drops (server restart, CLIENT KILL, output buffer
limit, a half-open or stalled socket caught by the health check within about two health
intervals), the link reconnects with backoff and re-subscribes slot by slot. Every mailbox of
that link gets RECHECK at the loss, and again once its channel's re-subscription resolved, so
each follower re-checks the job state: a lost message costs a re-check, never a stall.

Locks, in the order they may be taken (never the other way round):

1. ``Hub._lock`` guards the machine (``Hub._m``) and every field marked "hub lock" below.
   It is held briefly, never across network I/O: a link's writer takes its commands under
   it and writes them after releasing it; a reader reads with it released.
2. Leaf locks, taken under it and taking nothing themselves: each Latch's and Mailbox's own
   lock (resolving a confirmation, delivering a message or RECHECK) and ClusterRouter's
   ``_lock`` (``link_for`` and ``moved``). ClusterRouter's ``_refreshing`` is taken only
   by the router thread, with no lock of ours held.

No lock guards a socket: only a link's writer thread writes on it, only its reader reads.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoPermissionError,
    ResponseError,
    TryAgainError,
)

from dedupe.backend.resp import Stream
from dedupe.core.signals import Latch, Mailbox, wake_all
from dedupe.core.subscriptions import RECHECK, Command, Effects, ErrorKind, Subscriptions
from dedupe.errors import BackendUnavailable

__all__ = ["Hub", "Router", "SingleRouter"]

# The reconnect jitter's own generator: a library must not move the app's global random
# sequence (an app or a test that seeds it would see other numbers). Reseeded in a forked
# child, as the global one is, so that forked workers do not reconnect in step.
_jitter = random.Random()
if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_jitter.seed)
log = logging.getLogger(__name__)

Item = bytes | object  # a message, or RECHECK
_PIPELINE = 64  # commands per socket write
_RETRY_FIRST, _RETRY_MAX = 0.1, 2.0  # asking the router again after it failed
_JOIN = 1.0  # close() waits this long, in all, for the hub's threads to end

# An error reply's kind, by redis-py's exception class (the most derived one listed wins:
# MovedError is an AskError).
_KINDS: dict[type[BaseException], ErrorKind] = {
    MovedError: ErrorKind.MOVED,
    AskError: ErrorKind.ASK,
    TryAgainError: ErrorKind.TRYAGAIN,
    ClusterDownError: ErrorKind.CLUSTERDOWN,
    NoPermissionError: ErrorKind.NOPERM,
}


def _kind_of(exc: ResponseError) -> ErrorKind:
    for cls in type(exc).__mro__:
        kind = _KINDS.get(cls)
        if kind is not None:
            return kind
    return ErrorKind.OTHER


class Connection(Protocol):
    def connect(self) -> None: ...
    def disconnect(self) -> None: ...
    def send_command(self, *args: Any) -> None: ...
    def can_read(self, timeout: float = 0) -> bool: ...
    def read_response(self) -> Any: ...


class Router(Protocol):
    """Maps a channel to the node whose connection must carry it.

    ``link_for`` and ``moved`` must not do network I/O (they run under the hub's lock);
    ``refresh`` may, and runs on a hub thread only.
    """

    def link_for(self, channel: str) -> str: ...

    def connector(self, link: str) -> Callable[[], Connection]: ...

    def refresh(self) -> None: ...

    def moved(self, slot: int, host: str, port: int) -> None: ...


class SingleRouter:
    """Every channel on one server."""

    def __init__(self, connect: Callable[[], Connection]) -> None:
        self._connect = connect

    def link_for(self, channel: str) -> str:
        return "main"

    def connector(self, link: str) -> Callable[[], Connection]:
        return self._connect

    def refresh(self) -> None:
        pass

    def moved(self, slot: int, host: str, port: int) -> None:
        pass


class Hub:
    """Subscriptions of one backend, across as many node connections as its router needs.

    ``router`` is a Router, or a function that builds one (it may do network I/O: it is then
    called on a hub thread, never on a caller's). ``name``, if given, is sent as
    ``CLIENT SETNAME`` first on every connection of the hub (spaces and control characters,
    which Redis refuses in a name, become ``_``).
    """

    def __init__(
        self,
        router: Router | Callable[[], Router],
        *,
        sharded: bool,
        health_interval: float = 5.0,
        name: str | None = None,
    ) -> None:
        if health_interval <= 0:
            raise ValueError(f"health_interval must be > 0 seconds, got {health_interval!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, not {type(name).__name__}")
        # Written once, here, before any thread of the hub starts:
        self._health_interval = health_interval
        clean = "".join(c if c.isprintable() and not c.isspace() else "_" for c in name or "")
        self.name: str | None = clean or None
        self._lock = threading.Lock()
        self._closed = threading.Event()  # set once, by close() (under the hub lock)
        self._routes = threading.Condition(self._lock)  # wakes the router thread
        self._make_router: Callable[[], Router] | None = None
        router_now: Router | None = None
        if callable(getattr(router, "link_for", None)):
            router_now = cast(Router, router)
        else:
            self._make_router = cast("Callable[[], Router]", router)
        # Hub lock:
        self._m: Subscriptions[Mailbox[Item], Latch[bool]] = Subscriptions(
            Latch, sharded=sharded, slot_of=_slot_of, name=self.name
        )
        self._router = router_now  # None until the router thread built it
        self._links: dict[str, _Link] = {}
        self._refresh_wanted = False  # the layout is stale: the router thread refreshes it
        # Started (under the hub lock) only before close() set _closed: close() reads it after.
        self._route_thread: threading.Thread | None = None
        self._logged: set[str] = set()  # note keys logged once already

    @property
    def reconnects(self) -> int:
        """Connections lost after they were up (an int read without the lock)."""
        return self._m.reconnects

    # --- used by the drivers (never blocks: no I/O, no lock held across I/O) ----------------

    def subscribe(self, channel: str, mailbox: Mailbox[Item]) -> Latch[bool]:
        """Add a mailbox to a channel; the latch resolves True once the server confirmed the
        subscription, False once it is known to fail. Calling it again with the same mailbox
        returns the current latch (a reconnect replaces it)."""
        with self._lock:
            if self._closed.is_set():
                raise BackendUnavailable("this dedupe instance is closed")
            latch = self._m.subscribe(channel, mailbox)
            if self._m.unrouted or self._m.out:
                self._apply()
            return latch

    def confirmation(self, channel: str) -> Latch[bool]:
        """The latch of the channel's current subscription (False if there is none)."""
        with self._lock:
            latch = self._m.confirmation(channel)
        if latch is None:
            latch = Latch()
            latch.set(False)
        return latch

    def denied(self, channel: str) -> str | None:
        """Why the server refused the channel's subscription (an ACL), or None."""
        with self._lock:
            return self._m.denied(channel)

    def unsubscribe(self, channel: str, mailbox: Mailbox[Item]) -> None:
        now = time.monotonic()
        with self._lock:
            self._m.unsubscribe(channel, mailbox, now)
            if self._m.out:
                self._apply()

    def channels(self) -> dict[str, int]:
        """Channels held now, with their number of local subscribers (for hygiene checks)."""
        with self._lock:
            return self._m.channels()

    def close(self) -> None:
        """Stop every link; pending confirmations resolve False; subscribe() raises after."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            self._m.close()
            self._apply()
            links = list(self._links.values())
            self._links.clear()
            self._routes.notify_all()
            for link in links:
                link.stop()
        # Bounded as a whole: a thread stuck in a connect ends on its own (they are daemons).
        deadline = time.monotonic() + _JOIN
        threads = [t for link in links for t in link.threads()]
        if self._route_thread is not None:
            threads.append(self._route_thread)
        for thread in threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    # --- carrying out the machine's effects (hub lock held) ------------------------------------

    def _apply(self) -> None:
        """Do what the machine asked for since the last call, and route what waits."""
        out = self._m.drain()
        router = self._router
        if router is not None:
            for slot, host, port in out.moved:  # before routing: the router learns first
                router.moved(slot, host, port)
            if self._m.unrouted and not self._refresh_wanted:
                self._route(router)
        self._execute(out)
        if self._m.out:  # what routing asked for: links to open, writers to wake
            self._execute(self._m.drain())
        if (self._m.unrouted or self._refresh_wanted) and not self._closed.is_set():
            self._start_route_thread()
            self._routes.notify()

    def _execute(self, out: Effects[Mailbox[Item], Latch[bool]]) -> None:
        for latch, ok in out.resolve:
            latch.set(ok)
        for mailbox in out.recheck:
            mailbox.put(RECHECK)
        for key, text in out.notes:
            self._note(key, text)
        if out.refresh:
            self._refresh_wanted = True
        for name in out.opened:  # only routing opens links, and only with a router
            assert self._router is not None
            link = self._links[name] = _Link(self, name, self._router.connector(name))
            link.start()
        for name, why in out.drop.items():
            dropping = self._links.get(name)
            if dropping is not None:
                dropping.dropped = why
        for name in out.wake:
            waking = self._links.get(name)
            if waking is not None:
                waking.wake.notify()

    def _route(self, router: Router) -> None:
        for channel in list(self._m.unrouted):
            try:
                link = router.link_for(channel)
            except Exception as exc:  # e.g. a slot the cached layout does not cover
                self._note("route", f"cannot route {channel!r} yet ({exc})")
                self._refresh_wanted = True
                return  # the router thread routes the rest once the layout is read again
            self._m.route(channel, link)

    def _note(self, key: str | None, text: str) -> None:
        if key is None:
            log.info("%s", text)
        elif key in self._logged:
            log.debug("%s", text)
        else:
            self._logged.add(key)
            log.warning("%s", text)

    # --- the router thread ---------------------------------------------------------------------

    def _start_route_thread(self) -> None:
        if self._route_thread is None:
            self._route_thread = threading.Thread(
                target=self._run_routes, name="dedupe-hub-routes", daemon=True
            )
            self._route_thread.start()

    def _run_routes(self) -> None:
        """Build or refresh the router (network I/O, no lock held), then route what waits."""
        delay = 0.0
        while True:
            with self._lock:
                while not self._closed.is_set() and not self._m.unrouted:
                    if self._refresh_wanted:
                        break
                    self._routes.wait()
                if self._closed.is_set():
                    return
                router, refresh = self._router, self._refresh_wanted
                self._refresh_wanted = False
            ok = True
            try:
                if router is None:
                    assert self._make_router is not None
                    router = self._make_router()
                elif refresh:
                    router.refresh()
            except Exception as exc:
                ok = False
                log.warning("could not read the Redis layout for pub/sub: %s", exc)
            with self._lock:
                if self._closed.is_set():
                    return
                if ok:
                    self._router = router
                self._apply()  # routes what waits
                if ok and not self._m.unrouted and not self._refresh_wanted:
                    delay = 0.0
                    continue
                # The layout could not be read, or does not cover a slot yet: ask again soon.
                self._refresh_wanted = True
                delay = min(_RETRY_MAX, max(_RETRY_FIRST, delay * 2))
                self._routes.wait(delay)

    # --- the reader side (a link's reader thread; takes the lock briefly) ---------------------

    def _on_reply(self, link: _Link, reply: Any) -> None:
        with self._lock:
            mailboxes = self._m.reply(link.name, reply)
            if mailboxes is None:  # an ack, a PONG, ...: the machine has news
                self._apply()
                return
            # A message: the follower's path. A thread is woken as before; the flights of an
            # event loop with one callback on it however many of them wait on the channel.
            payload = reply[2]
            wakers = []
            for mailbox in mailboxes:
                waker = mailbox.put_quietly(payload)
                if waker is not None:
                    wakers.append(waker)
            if wakers:
                wake_all(wakers)

    def _on_error(self, link: _Link, exc: ResponseError) -> None:
        kind = _kind_of(exc)
        moved = None
        if isinstance(exc, MovedError):
            moved = (exc.slot_id, exc.host or link.name.rpartition(":")[0], exc.port)
        now = time.monotonic()
        with self._lock:
            self._m.error(link.name, kind, str(exc), now, moved)
            self._apply()

    def _on_silence(self, link: _Link, heard: bool) -> None:
        with self._lock:
            self._m.silent(link.name, heard)
            self._apply()


def _slot_of(channel: str) -> int:
    return int(key_slot(channel.encode()))


class _Link:
    """One node connection: a reader thread (connect, read) and a writer thread."""

    def __init__(self, hub: Hub, name: str, connect: Callable[[], Connection]) -> None:
        # Written once, here, before the threads start:
        self.hub = hub
        self.name = name
        self._connect = connect
        self._closed = threading.Event()  # set once, by stop()
        self._reader = threading.Thread(target=self._run, name=f"dedupe-hub-{name}", daemon=True)
        self._writer = threading.Thread(
            target=self._write_loop, name=f"dedupe-hub-send-{name}", daemon=True
        )
        # Hub lock:
        self.conn: Connection | None = None  # the live connection, from connected to lost
        self.stopped = False
        # Why the machine dropped the live connection. Set only while this link's reader
        # thread feeds the machine (drops follow replies and silences), so that thread
        # reads it right after, without the lock.
        self.dropped: str | None = None
        self.wake = threading.Condition(hub._lock)  # written once: the writer waits on it

    def start(self) -> None:
        self._reader.start()
        self._writer.start()

    def stop(self) -> None:
        """Hub lock held."""
        self.stopped = True
        self._closed.set()
        self.wake.notify_all()
        conn = self.conn
        if conn is not None:
            _shutdown(conn)

    def threads(self) -> tuple[threading.Thread, threading.Thread]:
        return self._reader, self._writer

    # --- the writer thread ---------------------------------------------------------------------

    def _write_loop(self) -> None:
        while not self._closed.is_set():
            try:
                self._write()
            except Exception:  # a bug must not kill the thread every follower relies on
                log.exception("pub/sub writer failed; restarting it")
                self._closed.wait(0.1)

    def _write(self) -> None:
        hub, machine = self.hub, self.hub._m
        while True:
            with hub._lock:
                while True:
                    if self.stopped:
                        return
                    now = time.monotonic()
                    commands = machine.take(self.name, now)
                    if commands:
                        conn = self.conn
                        break
                    self.wake.wait(machine.due(self.name, now))
                if machine.out:
                    hub._apply()
            # The machine takes commands only while it holds the link up, which it does
            # exactly while the connection is published here.
            assert conn is not None
            for i in range(0, len(commands), _PIPELINE):
                if not self._send(conn, commands[i : i + _PIPELINE]):
                    break
            del commands, conn  # nothing of a connection stays alive while parked

    def _send(self, conn: Connection, commands: list[Command]) -> bool:
        """Send commands on ``conn`` in one write (no lock held: this thread alone writes)."""
        try:
            pack = getattr(conn, "pack_commands", None)
            if pack is not None and len(commands) > 1:
                conn.send_packed_command(pack([c.args for c in commands]))  # type: ignore[attr-defined]
            else:
                for command in commands:
                    conn.send_command(*command.args)
        except Exception as exc:
            log.info("pub/sub send on %s failed (%s); reconnecting", self.name, exc)
            _shutdown(conn)  # the reader sees it and reconnects
            return False
        return True

    # --- the reader thread ---------------------------------------------------------------------

    def _run(self) -> None:
        delay = 0.0
        while not self._closed.is_set():
            try:
                up = self._session()
            except Exception:  # a bug must not kill the thread every follower relies on
                log.exception("pub/sub reader failed; restarting it")
                up = 0.0
            delay = 0.0 if up > 1.0 else min(2.0, max(0.05, delay * 2))
            self._closed.wait(delay * _jitter.uniform(0.5, 1.0))

    def _session(self) -> float:
        """Connect, subscribe and read until the connection fails; how long it was up."""
        hub = self.hub
        try:
            conn = self._connect()
            conn.connect()
            _no_reconnect(conn)
        except Exception as exc:
            log.info("pub/sub connect to %s failed: %s", self.name, exc)
            return 0.0
        up = time.monotonic()
        with hub._lock:
            stopped = self.stopped
            if not stopped:
                self.conn, self.dropped = conn, None
                hub._m.connected(self.name)
                hub._apply()
        if stopped:
            conn.disconnect()
            return 0.0
        try:
            self._read(conn)
        except Exception as exc:
            if not self._closed.is_set():
                log.info("pub/sub connection to %s lost: %s", self.name, exc)
        finally:
            with hub._lock:
                self.conn = None
                if not self.stopped:
                    hub._m.lost(self.name)
                    hub._apply()
            try:
                conn.disconnect()
            except Exception:
                pass
        return time.monotonic() - up

    def _read(self, conn: Connection) -> None:
        hub = self.hub
        interval = hub._health_interval
        # A socket of redis-py's (RESP2: _hub_kwargs) is read by resp.Stream, a burst of
        # messages in one pass over each read; any other Connection a reply at a time.
        replies = Stream(conn) if getattr(conn, "_sock", None) is not None else _OneByOne(conn)
        heard = True  # anything read since the last silence
        while not self._closed.is_set():
            got = replies.read(interval)
            if got is None:
                hub._on_silence(self, heard)
                heard = False
                got = []
            else:
                heard = True
            for reply in got:
                if isinstance(reply, ResponseError):
                    hub._on_error(self, reply)
                else:
                    hub._on_reply(self, reply)
                if self.dropped is not None:
                    break
            if self.dropped is not None:
                raise ConnectionError(self.dropped)


class _OneByOne:
    """resp.Stream's read() over the Connection protocol: one reply a read; None for
    silence; an error reply as its ResponseError."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def read(self, timeout: float) -> list[Any] | None:
        if not self._conn.can_read(timeout=timeout):
            return None
        try:
            return [self._conn.read_response()]
        except ResponseError as exc:
            return [exc]


def _shutdown(conn: Connection) -> None:
    """Make the reader's pending recv return at once (without redis-py reconnecting)."""
    sock: socket.socket | None = getattr(conn, "_sock", None)
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        elif not hasattr(conn, "_sock"):  # not redis-py's: it can only be closed
            conn.disconnect()
    except Exception:
        pass


def _no_reconnect(conn: Connection) -> None:
    """redis-py reconnects by itself when a read or send finds the socket gone; on a
    subscriber connection that would silently lose every subscription (and block for a
    connect timeout). Once connected, a connection of ours fails instead: the link then
    reconnects and re-subscribes."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("the pub/sub connection was closed")

    for method in ("connect", "connect_check_health"):
        if hasattr(conn, method):
            try:
                setattr(conn, method, refuse)
            except AttributeError:  # a connection class with slots: nothing to guard
                pass
