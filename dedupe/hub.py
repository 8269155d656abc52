"""The per-process pub/sub hub: one subscriber connection per Redis node, shared by all flights.

Channels are reference-counted: the first follower of a job subscribes, the last one out
unsubscribes, a moment later and from a hub thread, so that it does not wait for it and a
hot key's next follower finds the subscription still open. A reader thread per connection
owns all reads; callers only send. A follower
may re-check the job's state only after the server confirmed its subscription, so the hub
tracks the acks of every SUBSCRIBE/UNSUBSCRIBE it sent, in order.

Pub/sub is at-most-once. When a connection drops (server restart, CLIENT KILL, output
buffer limit, a half-open socket caught by the health check), the hub reconnects with
backoff, re-subscribes, and puts RECHECK into every mailbox of that connection so each
follower re-subscribes and re-checks the job state at once: a lost message costs a re-check.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from redis.exceptions import ResponseError

from .protocol import RECHECK
from .signals import Latch, Mailbox

__all__ = ["Hub", "Router", "SingleRouter"]

log = logging.getLogger("dedupe")

Item = bytes | object  # a message, or RECHECK
_BATCH = 512  # channels per (re-)subscribe or unsubscribe command
# Unsubscribing waits this long, off the caller's path: a follower returns without paying for
# it, a hot key's next follower reuses the subscription, and unsubscribes go out in batches.
_LINGER = 0.05


class Connection(Protocol):
    def connect(self) -> None: ...
    def disconnect(self) -> None: ...
    def send_command(self, *args: Any) -> None: ...
    def can_read(self, timeout: float = 0) -> bool: ...
    def read_response(self) -> Any: ...


class Router(Protocol):
    """Maps a channel to the node whose connection must carry it."""

    def link_for(self, channel: str) -> str: ...

    def connector(self, link: str) -> Callable[[], Connection]: ...

    def refresh(self) -> None: ...


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


class _Channel:
    __slots__ = ("confirmed", "leaving", "link", "mailboxes", "pending")

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.mailboxes: set[Mailbox[Item]] = set()
        self.pending: deque[bool] = deque()  # sent and not yet acked: True subscribe, False un-
        self.confirmed: Latch[bool] = Latch()
        self.leaving = False  # an UNSUBSCRIBE is queued, not yet sent


class Hub:
    """Subscriptions of one backend, across as many node connections as its router needs."""

    def __init__(self, router: Router, *, sharded: bool, health_interval: float = 5.0) -> None:
        self._router = router
        self._lock = threading.RLock()
        self._channels: dict[str, _Channel] = {}
        self._links: dict[str, _Link] = {}
        self._health_interval = health_interval
        self._closed = False
        self._leaving: list[str] = []
        self._leaving_cond = threading.Condition(self._lock)
        self._sender: threading.Thread | None = None
        if sharded:
            self.sub, self.unsub = "SSUBSCRIBE", "SUNSUBSCRIBE"
            self._msg, self._ack, self._nack = b"smessage", b"ssubscribe", b"sunsubscribe"
        else:
            self.sub, self.unsub = "SUBSCRIBE", "UNSUBSCRIBE"
            self._msg, self._ack, self._nack = b"message", b"subscribe", b"unsubscribe"
        self.reconnects = 0

    # --- used by the drivers ----------------------------------------------------------------

    def subscribe(self, channel: str, mailbox: Mailbox[Item]) -> Latch[bool]:
        """Add a mailbox to a channel; the latch is set once the server confirmed it."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this dedupe backend is closed")
            state = self._channels.get(channel)
            if state is None:
                state = self._channels[channel] = _Channel(self._link(channel))
            first = not state.mailboxes
            state.mailboxes.add(mailbox)
            if first:
                if state.leaving:
                    state.leaving = False  # still subscribed at the server: keep it
                else:
                    state.confirmed = Latch()
                    self._send(state.link, [channel], subscribe=True)
            return state.confirmed

    def confirmation(self, channel: str) -> Latch[bool]:
        """The latch of the channel's current subscription (a reconnect replaces it)."""
        with self._lock:
            state = self._channels.get(channel)
            if state is None:
                raise LookupError(f"not subscribed to {channel!r}")
            return state.confirmed

    def unsubscribe(self, channel: str, mailbox: Mailbox[Item]) -> None:
        with self._lock:
            state = self._channels.get(channel)
            if state is None or mailbox not in state.mailboxes:
                return
            state.mailboxes.discard(mailbox)
            if state.mailboxes or state.leaving:
                return
            state.leaving = True
            self._leaving.append(channel)
            if self._sender is None:
                self._sender = threading.Thread(
                    target=self._send_unsubscribes, name="dedupe-hub-unsubscribe", daemon=True
                )
                self._sender.start()
            self._leaving_cond.notify()

    def _send_unsubscribes(self) -> None:
        while True:
            with self._lock:
                while not self._leaving and not self._closed:
                    self._leaving_cond.wait()
                if self._closed:
                    return
            time.sleep(_LINGER)
            with self._lock:
                by_link: dict[_Link, list[str]] = {}
                for channel in self._leaving:
                    state = self._channels.get(channel)
                    if state is not None and state.leaving and not state.mailboxes:
                        state.leaving = False
                        by_link.setdefault(state.link, []).append(channel)
                self._leaving.clear()
                for link, channels in by_link.items():
                    self._send(link, channels, subscribe=False)

    def kick(self, channel: str) -> None:
        """A confirmation is overdue: drop that connection so it reconnects afresh."""
        with self._lock:
            state = self._channels.get(channel)
            link = state.link if state else None
        if link is not None:
            link.drop()

    def channels(self) -> dict[str, int]:
        """Channels held now, with their number of local subscribers (for hygiene checks)."""
        with self._lock:
            return {ch: len(st.mailboxes) for ch, st in self._channels.items()}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._leaving_cond.notify_all()
            links = list(self._links.values())
            self._links.clear()
        for link in links:
            link.close()

    # --- links --------------------------------------------------------------------------------

    def _link(self, channel: str) -> _Link:
        name = self._router.link_for(channel)
        link = self._links.get(name)
        if link is None:
            link = self._links[name] = _Link(self, name, self._router.connector(name))
            link.start()
        return link

    def _on_connect(self, link: _Link) -> None:
        """Called with the lock held once a link (re)connected: subscribe its channels."""
        mine = [ch for ch, st in self._channels.items() if st.link is link and st.mailboxes]
        self._send(link, mine, subscribe=True)

    def _send(self, link: _Link, channels: list[str], *, subscribe: bool) -> None:
        """(Un)subscribe channels in batches (lock held), noting each command awaiting its ack."""
        command = self.sub if subscribe else self.unsub
        for i in range(0, len(channels), _BATCH):
            batch = channels[i : i + _BATCH]
            sent = link.send(command, *batch)
            for channel in batch:
                state = self._channels[channel]
                if sent:
                    state.pending.append(subscribe)
                elif not state.pending and not state.mailboxes:
                    del self._channels[channel]  # no connection: nothing left to undo

    def _on_lost(self, link: _Link) -> None:
        """Called with the lock held when a link's connection dropped."""
        self.reconnects += 1
        for ch, st in list(self._channels.items()):
            if st.link is not link:
                continue
            st.pending.clear()
            if not st.mailboxes:
                del self._channels[ch]
                continue
            # A latch not yet set may have a follower waiting on it: keep it, it will be
            # set by the re-subscription's ack. A set one describes a subscription now gone.
            if st.confirmed.is_set():
                st.confirmed = Latch()
            for mailbox in st.mailboxes:
                mailbox.put(RECHECK)

    def _dispatch(self, link: _Link, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 2:
            return
        kind = reply[0]
        channel = reply[1].decode("utf-8", "surrogateescape") if isinstance(reply[1], bytes) else ""
        with self._lock:
            state = self._channels.get(channel)
            if state is None or state.link is not link:
                return
            if kind == self._msg and len(reply) >= 3:
                for mailbox in state.mailboxes:
                    mailbox.put(reply[2])
                return
            if kind not in (self._ack, self._nack):
                return
            subscribed = kind == self._ack
            if state.pending and state.pending[0] == subscribed:
                state.pending.popleft()
            elif not subscribed:
                self._moved(channel, state)  # the server dropped us: the slot moved
                return
            if state.pending:
                return
            if subscribed:
                state.confirmed.set(True)  # the server has us subscribed now
            elif not state.mailboxes:
                del self._channels[channel]

    def _on_error_reply(self, link: _Link, exc: ResponseError) -> None:
        """An error reply to one of our commands: re-route every channel whose slot moved."""
        log.info("dedupe: pub/sub command failed on %s: %s; re-routing", link.name, exc)
        with self._lock:
            try:
                self._router.refresh()
            except Exception as refresh_exc:
                log.warning("dedupe: could not refresh the cluster layout: %s", refresh_exc)
            for channel, state in list(self._channels.items()):
                if state.link is not link or not state.pending:
                    continue
                try:
                    moved = self._router.link_for(channel) != link.name
                except Exception:
                    moved = False
                if moved:
                    self._moved(channel, state, refresh=False)
        # A command that failed for another reason leaves its confirmation unset: the
        # follower's bounded wait then kicks the connection, which re-subscribes everything.

    def _moved(self, channel: str, state: _Channel, *, refresh: bool = True) -> None:
        """The server unsubscribed a channel itself: follow its slot to the new owner."""
        log.info("dedupe: %r was unsubscribed by the server; re-subscribing", channel)
        if refresh:
            try:
                self._router.refresh()
            except Exception as exc:  # the next reconnect or re-check retries it
                log.warning("dedupe: could not refresh the cluster layout: %s", exc)
        state.pending.clear()
        if state.confirmed.is_set():
            state.confirmed = Latch()
        if not state.mailboxes:
            del self._channels[channel]
            return
        state.link = self._link(channel)
        self._send(state.link, [channel], subscribe=True)
        for mailbox in state.mailboxes:
            mailbox.put(RECHECK)


class _Link:
    """One subscriber connection and the thread that reads it."""

    def __init__(self, hub: Hub, name: str, connect: Callable[[], Connection]) -> None:
        self.hub = hub
        self.name = name
        self._connect = connect
        self.conn: Connection | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"dedupe-hub-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send(self, *args: str) -> bool:
        """Send on the live connection (hub lock held); False if there is none right now."""
        conn = self.conn
        if conn is None:
            return False
        try:
            conn.send_command(*args)
        except Exception as exc:
            log.info("dedupe: pub/sub send failed (%s); reconnecting", exc)
            self.conn = None
            return False
        return True

    def drop(self) -> None:
        conn = self.conn
        if conn is not None:
            try:
                conn.disconnect()
            except Exception:
                pass

    def close(self) -> None:
        self._closed.set()
        self.drop()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)

    def _run(self) -> None:
        delay = 0.0
        while not self._closed.is_set():
            try:
                up = self._session()
            except Exception:  # a bug must not kill the thread every follower relies on
                log.exception("dedupe: pub/sub reader failed; restarting it")
                up = 0.0
            delay = 0.0 if up > 1.0 else min(2.0, max(0.05, delay * 2))
            self._closed.wait(delay * random.uniform(0.5, 1.0))

    def _session(self) -> float:
        """Connect, subscribe and read until the connection fails; how long it was up."""
        try:
            conn = self._connect()
            conn.connect()
        except Exception as exc:
            log.info("dedupe: pub/sub connect failed: %s", exc)
            return 0.0
        up = time.monotonic()
        with self.hub._lock:
            self.conn = conn
            self.hub._on_connect(self)
        try:
            self._read(conn)
        except Exception as exc:
            if not self._closed.is_set():
                log.info("dedupe: pub/sub connection lost: %s", exc)
        finally:
            with self.hub._lock:
                if self.conn is conn:
                    self.conn = None
                self.hub._on_lost(self)
            try:
                conn.disconnect()
            except Exception:
                pass
        return time.monotonic() - up

    def _read(self, conn: Connection) -> None:
        interval = self.hub._health_interval
        ping_sent = False
        while not self._closed.is_set():
            if self.conn is not conn:
                raise ConnectionError("connection replaced after a failed send")
            if conn.can_read(timeout=interval):
                try:
                    reply = conn.read_response()
                except ResponseError as exc:
                    # e.g. MOVED for a shard channel whose slot left this node.
                    self.hub._on_error_reply(self, exc)
                    continue
                ping_sent = False  # any traffic proves the socket is alive
                if isinstance(reply, list) and reply and reply[0] == b"pong":
                    continue
                self.hub._dispatch(self, reply)
                continue
            if ping_sent:
                raise ConnectionError("pub/sub health check got no reply (half-open socket?)")
            with self.hub._lock:
                conn.send_command("PING")
            ping_sent = True
