"""The per-process pub/sub hub: one subscriber connection per Redis node, shared by all flights.

Channels are reference-counted: the first follower of a job subscribes, the last one out
unsubscribes a moment later (a hot key's next follower finds the subscription still open).
Callers only record what they want; they never touch a socket, nor a lock held across one.
Each node connection (a *link*) has two threads: a writer that turns the wishes into
(S)SUBSCRIBE / (S)UNSUBSCRIBE commands, and a reader that owns every read, answers the
health check and dispatches messages.

Every command a link sends goes into its FIFO of commands awaiting a reply, in socket order,
so each reply, and each error reply (MOVED, CROSSSLOT, NOPERM, ...), belongs to exactly one
command and so to exactly its channels. On a Cluster, one SSUBSCRIBE or SUNSUBSCRIBE carries
the channels of one hash slot only (Redis answers CROSSSLOT to the whole command otherwise).

A subscription's confirmation is a ``Latch[bool]``: True once the server acked it, False once
it is known to fail (denied by an ACL, any other error reply, the hub closed). Nothing may
depend on it arriving: a follower waits for it a bounded time and re-checks the job either way.

Pub/sub is at-most-once. When a connection drops (server restart, CLIENT KILL, output buffer
limit, a half-open or stalled socket caught by the health check within about two health
intervals), the link reconnects with backoff and re-subscribes slot by slot. Every mailbox of
that link gets RECHECK at the loss, and again once its channel's re-subscription resolved, so
each follower re-checks the job state: a lost message costs a re-check, never a stall.

Locks: ``Hub._lock`` guards every channel and link field below; it is held only briefly and
never across network I/O. ``_Link.send_lock`` serialises writes to one socket (writer thread
and the reader's PING); it is never taken with ``Hub._lock`` held, nor the other way round.
Latch and Mailbox locks are leaves, taken under ``Hub._lock``.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections import deque
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

from .errors import BackendUnavailable
from .protocol import RECHECK
from .signals import Latch, Mailbox

__all__ = ["Hub", "Router", "SingleRouter"]

log = logging.getLogger(__name__)

Item = bytes | object  # a message, or RECHECK
_BATCH = 512  # channels per (re-)subscribe or unsubscribe command
_PIPELINE = 64  # commands per socket write (the reader's PING waits for one write at most)
# Unsubscribing waits this long, off the caller's path: a follower returns without paying for
# it, a hot key's next follower reuses the subscription, and unsubscribes go out in batches.
_LINGER = 0.05
_RETRY_FIRST, _RETRY_MAX = 0.1, 2.0  # re-subscribing after ASK/TRYAGAIN/CLUSTERDOWN
_MAX_MOVES = 8  # MOVED replies in a row for one channel before we refresh the layout
_JOIN = 1.0  # close() waits this long, in all, for the hub's threads to end


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


class _Channel:
    """One channel's wish and its state at the server (all fields guarded by Hub._lock)."""

    __slots__ = (
        "blocked",
        "confirmed",
        "denied",
        "epoch",
        "inflight",
        "linger_until",
        "link",
        "mailboxes",
        "moves",
        "name",
        "retry_delay",
        "sent",
        "slot",
        "solo",
        "troubled",
    )

    def __init__(self, name: str, slot: int) -> None:
        self.name = name
        self.slot = slot
        self.link: _Link | None = None  # None: not routed yet
        self.mailboxes: set[Mailbox[Item]] = set()
        self.confirmed: Latch[bool] = Latch()
        # What the last command sent on the current connection asked for (True: subscribed).
        self.sent = False
        # Commands for it awaiting their reply; acks of an older epoch (before a reconnect or
        # a re-route) are ignored, so only the newest command's answer sets the latch.
        self.inflight = 0
        self.epoch = 0
        self.blocked = False  # failed on this connection: do not re-send until retry/reconnect
        self.linger_until = 0.0  # no mailbox left: unsubscribe after this moment
        self.troubled = False  # lost or re-routed: RECHECK its mailboxes once it resolves
        self.denied: str | None = None
        self.moves = 0
        self.retry_delay = 0.0
        self.solo = False  # an error answered a batch with it: send it in a command of its own

    def wanted(self, now: float) -> bool:
        return bool(self.mailboxes) or now < self.linger_until


class _Sent:
    """A command sent on a link, awaiting its replies (one per channel, or one)."""

    __slots__ = ("args", "channels", "epochs", "kind", "next")

    def __init__(self, kind: str, args: tuple[str, ...], channels: list[_Channel]) -> None:
        self.kind = kind  # "sub", "unsub", "orphan" (untracked unsub), "ping", "name"
        self.args = args
        self.channels = [c.name for c in channels]
        self.epochs = [c.epoch for c in channels]
        self.next = 0  # index of the channel whose reply comes next


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
        self._lock = threading.Lock()
        self._router: Router | None = None
        self._make_router: Callable[[], Router] | None = None
        if callable(getattr(router, "link_for", None)):
            self._router = cast(Router, router)
        else:
            self._make_router = cast("Callable[[], Router]", router)
        self._sharded = sharded
        self._health_interval = health_interval
        # Redis refuses client names with spaces or control characters: replace them.
        clean = "".join(c if c.isprintable() and not c.isspace() else "_" for c in name or "")
        self.name: str | None = clean or None
        self._channels: dict[str, _Channel] = {}
        self._links: dict[str, _Link] = {}
        self._unrouted: set[str] = set()  # waiting for the router (built or refreshed)
        self._refresh_wanted = False
        self._routes = threading.Condition(self._lock)
        self._route_thread: threading.Thread | None = None
        self._closed = threading.Event()  # set once, by close()
        self._logged: set[str] = set()
        if sharded:
            self.sub, self.unsub = "SSUBSCRIBE", "SUNSUBSCRIBE"
            self._msg, self._ack, self._nack = b"smessage", b"ssubscribe", b"sunsubscribe"
        else:
            self.sub, self.unsub = "SUBSCRIBE", "UNSUBSCRIBE"
            self._msg, self._ack, self._nack = b"message", b"subscribe", b"unsubscribe"
        self.reconnects = 0

    # --- used by the drivers (never blocks: no I/O, no lock held across I/O) ----------------

    def subscribe(self, channel: str, mailbox: Mailbox[Item]) -> Latch[bool]:
        """Add a mailbox to a channel; the latch resolves True once the server confirmed the
        subscription, False once it is known to fail. Calling it again with the same mailbox
        returns the current latch (a reconnect replaces it)."""
        with self._lock:
            if self._closed.is_set():
                raise BackendUnavailable("this dedupe instance is closed")
            state = self._channels.get(channel)
            if state is None:
                slot = key_slot(channel.encode()) if self._sharded else 0
                state = self._channels[channel] = _Channel(channel, slot)
                state.mailboxes.add(mailbox)
                self._place(state)
                return state.confirmed
            if mailbox in state.mailboxes:
                return state.confirmed
            state.mailboxes.add(mailbox)
            state.linger_until = 0.0
            if not state.sent and state.link is not None:
                state.link.want(state)
            return state.confirmed

    def confirmation(self, channel: str) -> Latch[bool]:
        """The latch of the channel's current subscription (False if there is none)."""
        with self._lock:
            state = self._channels.get(channel)
            if state is not None:
                return state.confirmed
        failed: Latch[bool] = Latch()
        failed.set(False)
        return failed

    def denied(self, channel: str) -> str | None:
        """Why the server refused the channel's subscription (an ACL), or None."""
        with self._lock:
            state = self._channels.get(channel)
            return state.denied if state is not None else None

    def unsubscribe(self, channel: str, mailbox: Mailbox[Item]) -> None:
        with self._lock:
            state = self._channels.get(channel)
            if state is None or mailbox not in state.mailboxes:
                return
            state.mailboxes.discard(mailbox)
            if state.mailboxes:
                return
            if state.link is None:  # never routed: nothing at any server
                self._unrouted.discard(channel)
                del self._channels[channel]
                return
            state.linger_until = time.monotonic() + _LINGER
            state.link.leave(state)

    def kick(self, channel: str) -> None:
        """Ask for the channel's connection to be dropped and re-made (off the caller's path)."""
        with self._lock:
            state = self._channels.get(channel)
            if state is not None and state.link is not None:
                state.link.request_drop()

    def channels(self) -> dict[str, int]:
        """Channels held now, with their number of local subscribers (for hygiene checks)."""
        with self._lock:
            return {ch: len(st.mailboxes) for ch, st in self._channels.items()}

    def close(self) -> None:
        """Stop every link; pending confirmations resolve False; subscribe() raises after."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            links = list(self._links.values())
            self._links.clear()
            for state in self._channels.values():
                state.confirmed.set(False)
            self._channels.clear()
            self._unrouted.clear()
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

    # --- routing (lock held unless said otherwise) ---------------------------------------------

    def _place(self, state: _Channel) -> None:
        """Route a channel to its link and mark it wanted there, or leave it for the router."""
        router = self._router
        name: str | None = None
        if router is not None:
            try:
                name = router.link_for(state.name)
            except Exception as exc:  # e.g. a slot the cached layout does not cover
                self._log_once("route", "cannot route %r yet (%s)", state.name, exc)
                self._refresh_wanted = True
        if name is None:
            state.link = None
            self._unrouted.add(state.name)
            self._start_route_thread()
            self._routes.notify()
            return
        link = self._links.get(name)
        if link is None:
            assert router is not None
            link = self._links[name] = _Link(self, name, router.connector(name))
            link.start()
        state.link = link
        if state.mailboxes:
            link.want(state)
        else:
            link.leave(state)  # lingering: its unsubscribe is now this link's to decide

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
                while not self._closed.is_set() and not self._unrouted and not self._refresh_wanted:
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
                self._place_unrouted()
                if ok and not self._unrouted:
                    delay = 0.0
                    continue
                # The layout could not be read, or does not cover a slot yet: ask again soon.
                self._refresh_wanted = True
                delay = min(_RETRY_MAX, max(_RETRY_FIRST, delay * 2))
                self._routes.wait(delay)

    def _place_unrouted(self) -> None:
        # A method of its own (lock held): its locals, which hold channel states, are gone
        # when it returns, and do not keep them alive while the routing thread is parked.
        waiting, self._unrouted = self._unrouted, set()
        for name in waiting:
            state = self._channels.get(name)
            if state is not None and state.link is None:
                self._place(state)

    def _reroute(self, state: _Channel) -> None:
        """The channel's subscription is gone from its node: forget it there, route afresh."""
        self._forget(state)
        if state.link is not None:
            state.link.dirty.discard(state.name)
        self._place(state)

    @staticmethod
    def _forget(state: _Channel) -> None:
        state.epoch += 1
        state.inflight = 0
        state.sent = False
        state.blocked = False
        if state.confirmed.is_set():
            state.confirmed = Latch()  # it described a subscription that is gone

    # --- the writer side (lock held) -----------------------------------------------------------

    def _plan(self, link: _Link, now: float) -> list[_Sent]:
        """The commands that bring this link's channels to what is wanted, one slot each."""
        subs: dict[int, list[_Channel]] = {}
        unsubs: dict[int, list[_Channel]] = {}
        names, link.dirty = link.dirty, set()
        for name in names:
            state = self._channels.get(name)
            if state is None or state.link is not link:
                continue
            if state.wanted(now):
                if not state.mailboxes:
                    continue  # lingering: link.leaving brings it back when it is due
                if not state.sent and not state.blocked:
                    key = -1 - len(subs) if state.solo else state.slot  # solo: a group alone
                    subs.setdefault(key, []).append(state)
            elif state.sent:
                unsubs.setdefault(state.slot, []).append(state)
            elif state.inflight == 0:
                del self._channels[name]
        commands: list[_Sent] = []
        for kind, command, groups in (("sub", self.sub, subs), ("unsub", self.unsub, unsubs)):
            for slot in sorted(groups):
                group = groups[slot]
                for i in range(0, len(group), _BATCH):
                    batch = group[i : i + _BATCH]
                    for state in batch:
                        state.sent = kind == "sub"
                        state.inflight += 1
                        if state.confirmed.is_set():
                            state.confirmed = Latch()
                    commands.append(_Sent(kind, (command, *(s.name for s in batch)), batch))
        orphans, link.orphans = link.orphans, {}
        for slot in sorted(orphans):
            names_ = sorted(orphans[slot])
            for i in range(0, len(names_), _BATCH):
                batch_names = names_[i : i + _BATCH]
                sent = _Sent("orphan", (self.unsub, *batch_names), [])
                sent.channels = batch_names
                sent.epochs = [-1] * len(batch_names)
                commands.append(sent)
        return commands

    def _next_due(self, link: _Link, now: float) -> float | None:
        """Seconds until a lingering channel or a retry of this link is due (lock held)."""
        if link.dirty:
            return 0.0
        due: float | None = None
        if link.leaving:
            due = max(0.0, link.leaving[0][0] - now)
        if link.retries:
            left = max(0.0, min(link.retries.values()) - now)
            due = left if due is None else min(due, left)
        return due

    # --- the reader side (called from a link's reader thread; takes the lock briefly) ---------

    def _on_reply(self, link: _Link, reply: Any) -> None:
        if isinstance(reply, list) and len(reply) >= 3 and reply[0] == self._msg:
            channel = _text(reply[1])
            with self._lock:
                state = self._channels.get(channel)
                if state is not None and state.link is link:
                    for mailbox in state.mailboxes:
                        mailbox.put(reply[2])
            return
        if isinstance(reply, list) and len(reply) >= 2 and reply[0] in (self._ack, self._nack):
            self._on_ack(link, _text(reply[1]), subscribed=reply[0] == self._ack)
            return
        # PONG (a list inside the subscribed state, a plain string outside) or SETNAME's OK.
        with self._lock:
            head = link.fifo[0] if link.fifo else None
            if head is None or head.kind not in ("ping", "name"):
                raise _Desync(f"unexpected reply {reply!r} on {link.name}")
            link.fifo.popleft()

    def _on_ack(self, link: _Link, channel: str, *, subscribed: bool) -> None:
        with self._lock:
            head = link.fifo[0] if link.fifo else None
            kinds = ("sub",) if subscribed else ("unsub", "orphan")
            if head is not None and head.kind in kinds and head.channels[head.next] == channel:
                epoch = head.epochs[head.next]
                head.next += 1
                if head.next == len(head.channels):
                    link.fifo.popleft()
                if head.kind != "orphan":
                    self._acked(link, channel, epoch, subscribed=subscribed)
                return
            if subscribed:
                raise _Desync(f"unexpected subscribe ack for {channel!r} on {link.name}")
            self._dropped_by_server(link, channel)

    def _acked(self, link: _Link, channel: str, epoch: int, *, subscribed: bool) -> None:
        state = self._channels.get(channel)
        if state is None or state.link is not link or state.epoch != epoch:
            if subscribed:  # a subscription we no longer track: undo it at that server
                link.orphan(channel, key_slot(channel.encode()) if self._sharded else 0)
            return
        state.inflight -= 1
        if state.inflight > 0:
            return
        now = time.monotonic()
        if state.sent:
            state.moves = 0
            state.retry_delay = 0.0
            state.denied = None
            self._resolve(state, True)
        elif not state.wanted(now):
            del self._channels[channel]
        else:
            link.want(state)

    def _resolve(self, state: _Channel, ok: bool) -> None:
        state.confirmed.set(ok)
        if state.troubled:
            state.troubled = False
            for mailbox in state.mailboxes:
                mailbox.put(RECHECK)

    def _dropped_by_server(self, link: _Link, channel: str) -> None:
        """An unsolicited sunsubscribe: the channel's slot left this node."""
        state = self._channels.get(channel)
        if state is None or state.link is not link:
            return
        log.info("%r was unsubscribed by %s (slot moved); re-subscribing", channel, link.name)
        state.troubled = True
        for mailbox in state.mailboxes:
            mailbox.put(RECHECK)
        if state.wanted(time.monotonic()):
            self._reroute(state)  # a stale route lands here again and meets MOVED
        else:
            del self._channels[channel]

    def _on_error(self, link: _Link, exc: ResponseError) -> None:
        """An error reply: it answers the oldest command awaiting a reply, as a whole."""
        with self._lock:
            head = link.fifo.popleft() if link.fifo else None
            if head is None:
                raise _Desync(f"unexpected error reply on {link.name}: {exc}")
            code = str(exc).split(" ", 1)[0] or type(exc).__name__
            if head.kind in ("ping", "name"):
                self._log_once(f"{head.kind}:{code}", "%s on %s failed: %s",
                               head.args[0], link.name, exc)  # fmt: skip
                return
            if head.kind == "orphan":
                link.request_drop()  # a reconnect unsubscribes everything at that server
                return
            states: list[_Channel] = []
            for channel, epoch in zip(
                head.channels[head.next :], head.epochs[head.next :], strict=True
            ):
                state = self._channels.get(channel)
                if state is not None and state.link is link and state.epoch == epoch:
                    state.inflight -= 1
                    states.append(state)
            if head.kind == "sub":
                self._subscribe_failed(link, states, exc, code)
            else:
                self._unsubscribe_failed(link, states, exc, code)

    def _subscribe_failed(
        self, link: _Link, states: list[_Channel], exc: ResponseError, code: str
    ) -> None:
        shared = len(states) > 1
        router = self._router
        if isinstance(exc, MovedError) and router is not None:
            router.moved(exc.slot_id, exc.host or link.name.rpartition(":")[0], exc.port)
        now = time.monotonic()
        for state in states:
            if state.inflight > 0 or not state.sent:
                continue  # a newer command for it is on its way
            state.sent = False
            if not state.wanted(now):
                if state.inflight == 0:
                    del self._channels[state.name]
                continue
            if isinstance(exc, MovedError) and state.moves < _MAX_MOVES:
                state.moves += 1
                state.troubled = True  # a follower may have stopped waiting: re-check then
                self._reroute(state)
                continue
            transient = isinstance(exc, (AskError, TryAgainError, ClusterDownError))
            if not transient and shared and not state.solo:
                # One error answers the whole command (an ACL may deny only one channel of
                # it): send each channel on its own to learn which ones the error is about.
                state.solo = True
                link.want(state)
                continue
            state.blocked = True
            if isinstance(exc, NoPermissionError):
                state.denied = (
                    f"Redis denied {self.sub} {state.name!r} on {link.name}: the ACL user needs "
                    f"the channel (&{state.name} or a pattern that matches it) and the command "
                    f"(+{self.sub.lower()}); server said: {exc}"
                )
                self._log_once("NOPERM", "%s", state.denied)
                self._resolve(state, False)
                continue
            if isinstance(exc, (AskError, TryAgainError, ClusterDownError, MovedError)):
                # A slot in migration, or a layout in flux: try again a little later.
                state.retry_delay = min(_RETRY_MAX, max(_RETRY_FIRST, state.retry_delay * 2))
                link.retries[state.name] = now + state.retry_delay
                if isinstance(exc, MovedError):
                    self._refresh_wanted = True
                    self._start_route_thread()
                    self._routes.notify()
                self._log_once(code, "%s %r on %s: %s; retrying", self.sub,
                               state.name, link.name, exc)  # fmt: skip
                self._resolve(state, False)
                state.troubled = True  # its follower stopped waiting: RECHECK once it works
                continue
            self._log_once(code, "%s %r on %s failed: %s", self.sub, state.name,
                           link.name, exc)  # fmt: skip
            self._resolve(state, False)

    def _unsubscribe_failed(
        self, link: _Link, states: list[_Channel], exc: ResponseError, code: str
    ) -> None:
        if isinstance(exc, MovedError):
            # Not this node's slot: the server holds no subscription of ours for it here.
            now = time.monotonic()
            for state in states:
                if state.inflight == 0 and not state.sent:
                    if state.wanted(now):
                        self._reroute(state)
                    else:
                        del self._channels[state.name]
            return
        # We cannot tell what the server kept: drop the connection, which forgets it all, and
        # re-subscribe only what is wanted.
        self._log_once(code, "%s on %s failed: %s; reconnecting", self.unsub,
                       link.name, exc)  # fmt: skip
        link.request_drop()

    def _on_up(self, link: _Link) -> None:
        """A link (re)connected (lock held): want every channel routed to it."""
        for state in self._channels.values():
            if state.link is link:
                link.want(state)

    def _on_lost(self, link: _Link) -> None:
        """A link's connection dropped (lock held): its channels are no longer subscribed."""
        self.reconnects += 1
        link.fifo = deque()
        link.orphans.clear()
        link.retries.clear()
        now = time.monotonic()
        for name, state in list(self._channels.items()):
            if state.link is not link:
                continue
            self._forget(state)
            if not state.wanted(now):
                del self._channels[name]
                continue
            state.troubled = True
            for mailbox in state.mailboxes:
                mailbox.put(RECHECK)
            link.want(state)

    def _log_once(self, what: str, msg: str, *args: object) -> None:
        if what in self._logged:
            log.debug(msg, *args)
        else:
            self._logged.add(what)
            log.warning(msg, *args)


class _Desync(ConnectionError):
    """A reply that no command awaits: start the connection afresh."""


def _text(raw: Any) -> str:
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)


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


class _Link:
    """One subscriber connection: a session thread (connect, read) and a writer thread."""

    def __init__(self, hub: Hub, name: str, connect: Callable[[], Connection]) -> None:
        self.hub = hub
        self.name = name
        self._connect = connect
        # Guarded by hub._lock:
        self.conn: Connection | None = None
        self.dirty: set[str] = set()  # channels whose wish may differ from the server
        self.orphans: dict[int, set[str]] = {}  # untracked subscriptions to undo, by slot
        self.retries: dict[str, float] = {}  # channel -> when to try subscribing again
        # (linger end, channel) in time order: unsubscribes to consider once due.
        self.leaving: deque[tuple[float, str]] = deque()
        self.drop_wanted = False
        self.stopped = False
        # The live connection's commands awaiting a reply, in socket order: appended under
        # send_lock, popped by the reader under hub._lock; a new deque for each connection.
        self.fifo: deque[_Sent] = deque()
        self.send_lock = threading.Lock()
        self._wake = threading.Condition(hub._lock)
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._run, name=f"dedupe-hub-{name}", daemon=True)
        self._writer = threading.Thread(
            target=self._write_loop, name=f"dedupe-hub-send-{name}", daemon=True
        )

    def start(self) -> None:
        self._reader.start()
        self._writer.start()

    # --- lock held -----------------------------------------------------------------------------

    def want(self, state: _Channel) -> None:
        self.dirty.add(state.name)
        self._wake.notify()

    def leave(self, state: _Channel) -> None:
        """The channel's last mailbox left: look at it again once its linger is over."""
        if not self.leaving:
            self._wake.notify()
        self.leaving.append((state.linger_until, state.name))

    def orphan(self, channel: str, slot: int) -> None:
        self.orphans.setdefault(slot, set()).add(channel)
        self._wake.notify()

    def request_drop(self) -> None:
        self.drop_wanted = True
        self._wake.notify()

    def stop(self) -> None:
        self.stopped = True
        self._closed.set()
        self._wake.notify_all()
        conn = self.conn
        if conn is not None:
            _shutdown(conn)

    # --- no lock held --------------------------------------------------------------------------

    def threads(self) -> tuple[threading.Thread, threading.Thread]:
        return self._reader, self._writer

    def _write_loop(self) -> None:
        hub = self.hub
        while True:
            with hub._lock:
                while True:
                    if self.stopped:
                        return
                    conn = self.conn
                    now = time.monotonic()
                    if conn is not None and self.drop_wanted:
                        self.drop_wanted = False
                        _shutdown(conn)  # the reader sees it and reconnects
                        continue
                    while self.leaving and self.leaving[0][0] <= now:
                        self.dirty.add(self.leaving.popleft()[1])
                    if self.retries:
                        self._retries_due(now)
                    due = hub._next_due(self, now) if conn is not None else None
                    if conn is not None and (self.orphans or due == 0.0):
                        break
                    self._wake.wait(due)
                commands = hub._plan(self, now)
                fifo = self.fifo
            for i in range(0, len(commands), _PIPELINE):
                if not self._send(conn, fifo, commands[i : i + _PIPELINE]):
                    break

    def _retries_due(self, now: float) -> None:
        # Hub lock held. A method of its own: no channel state stays in the writer's locals
        # while it waits.
        for channel, at in list(self.retries.items()):
            if at <= now:
                del self.retries[channel]
                state = self.hub._channels.get(channel)
                if state is not None and state.link is self:
                    state.blocked = False
                    self.dirty.add(channel)

    def _send(
        self, conn: Connection, fifo: deque[_Sent], commands: list[_Sent], timeout: float = -1
    ) -> bool:
        """Send commands on ``conn`` in one write, noting each in that connection's FIFO."""
        if not self.send_lock.acquire(timeout=timeout):
            return False
        try:
            fifo.extend(commands)  # before the bytes leave: their replies cannot come first
            pack = getattr(conn, "pack_commands", None)
            if pack is not None and len(commands) > 1:
                conn.send_packed_command(pack([c.args for c in commands]))  # type: ignore[attr-defined]
            else:
                for sent in commands:
                    conn.send_command(*sent.args)
        except Exception as exc:
            log.info("pub/sub send on %s failed (%s); reconnecting", self.name, exc)
            _shutdown(conn)
            return False
        finally:
            self.send_lock.release()
        return True

    def _run(self) -> None:
        delay = 0.0
        while not self._closed.is_set():
            try:
                up = self._session()
            except Exception:  # a bug must not kill the thread every follower relies on
                log.exception("pub/sub reader failed; restarting it")
                up = 0.0
            delay = 0.0 if up > 1.0 else min(2.0, max(0.05, delay * 2))
            self._closed.wait(delay * random.uniform(0.5, 1.0))

    def _session(self) -> float:
        """Connect, subscribe and read until the connection fails; how long it was up."""
        fifo: deque[_Sent] = deque()  # this connection's commands awaiting a reply
        try:
            conn = self._connect()
            conn.connect()
            _no_reconnect(conn)
            if self.hub.name is not None:
                # First on the wire, before any subscription puts it in the pub/sub state.
                fifo.append(_Sent("name", ("CLIENT", "SETNAME", self.hub.name), []))
                conn.send_command("CLIENT", "SETNAME", self.hub.name)
        except Exception as exc:
            log.info("pub/sub connect to %s failed: %s", self.name, exc)
            return 0.0
        up = time.monotonic()
        with self.hub._lock:
            stopped = self.stopped
            if not stopped:
                self.fifo, self.conn = fifo, conn
                self.hub._on_up(self)
        if stopped:
            conn.disconnect()
            return 0.0
        try:
            self._read(conn, fifo)
        except Exception as exc:
            if not self._closed.is_set():
                log.info("pub/sub connection to %s lost: %s", self.name, exc)
        finally:
            with self.hub._lock:
                self.conn = None
                self.drop_wanted = False
                if not self.stopped:
                    self.hub._on_lost(self)
            try:
                conn.disconnect()
            except Exception:
                pass
        return time.monotonic() - up

    def _read(self, conn: Connection, fifo: deque[_Sent]) -> None:
        interval = self.hub._health_interval
        ping_sent = False
        while not self._closed.is_set():
            if conn.can_read(timeout=interval):
                try:
                    reply = conn.read_response()
                except ResponseError as exc:
                    self.hub._on_error(self, exc)
                else:
                    self.hub._on_reply(self, reply)
                ping_sent = False  # any traffic proves the socket is alive
                continue
            if ping_sent:
                raise ConnectionError(
                    f"pub/sub health check on {self.name} got no reply in {interval}s "
                    "(half-open or stalled connection)"
                )
            # A writer stuck in a send for a whole interval means a stalled socket too.
            if not self._send(conn, fifo, [_Sent("ping", ("PING",), [])], timeout=interval):
                raise ConnectionError(f"pub/sub connection to {self.name} is stalled")
            ping_sent = True
