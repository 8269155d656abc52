"""The pub/sub hub's subscription machine: every decision about channels, and no I/O.

Everything the hub decides lives here: which channels are wanted and on which link, what
each link must write and in what batches, which command each reply and error reply answers,
what an error means, when a connection is dead, what each follower's mailbox is told and
when each confirmation resolves. It starts no thread, touches no socket, reads no clock and
never logs: the caller passes the time in, and every consequence comes back as a value
(commands from ``take``, mailboxes from ``reply``) or in ``out`` (an ``Effects``) for the
carrier, ``dedupe/backend/hub.py``, to carry out. It is not thread-safe: the carrier calls it under
one lock. ``tests/test_subscriptions.py`` runs it under hypothesis against model servers.

Words. A *link* is the connection to one node, named by the carrier's router ("main", or
"host:port" on Cluster); it is *up* from ``connected`` to ``lost``. A channel is *wanted*
while a follower's mailbox is on it. A *latch* is a confirmation, made by ``new_latch()``
and resolved, once, through ``Effects.resolve``; a mailbox gets RECHECK through
``Effects.recheck``.

Channel states (a channel in none of them is simply absent):

================  =========================================================================
UNROUTED          wanted; waits for the carrier to name its link (``route``)
QUEUED            wanted on its link; subscribed by the link's next ``take`` once it is up
SUBSCRIBING       one (S)SUBSCRIBE for it awaits its reply
SUBSCRIBED        acked on the live connection                                (latch True)
LINGERING         acked, no mailbox left: unsubscribed once ``linger`` passed (latch True)
UNSUBSCRIBING     one (S)UNSUBSCRIBE for it awaits its reply
RETRYING          its slot was in flux (ASK, TRYAGAIN, CLUSTERDOWN, MOVED too often):
                  subscribed again after a backoff of 0.1 s doubling to 2 s   (latch False)
FAILED            refused by an error reply: tried again on the next connection (latch False)
DENIED            refused by an ACL (NOPERM): as FAILED, and ``denied`` says why (latch False)
================  =========================================================================

Transitions (``take`` sends the commands; "gone" forgets the channel):

==============  ===============================================  ============================
from            on                                               to
==============  ===============================================  ============================
(absent)        ``subscribe``                                    UNROUTED
UNROUTED        ``route``                                        QUEUED
QUEUED          ``take``, the link up                            SUBSCRIBING
SUBSCRIBING     its ack                                          SUBSCRIBED; LINGERING if no
                                                                 mailbox is left
SUBSCRIBING     MOVED, fewer than 8 in a row (router taught)     UNROUTED, RECHECK owed
SUBSCRIBING     ASK, TRYAGAIN, CLUSTERDOWN, the 8th MOVED        RETRYING, RECHECK owed (the
                                                                 8th MOVED: refresh layout)
SUBSCRIBING     NOPERM or another error, for a command of        QUEUED, sent alone from now
                several channels                                 on, to learn which it is about
SUBSCRIBING     NOPERM, alone                                    DENIED
SUBSCRIBING     another error, alone                             FAILED
SUBSCRIBING     any error, no mailbox left                       gone
SUBSCRIBED      its last mailbox leaves                          LINGERING until now + linger
LINGERING       a mailbox arrives                                SUBSCRIBED
LINGERING       ``take`` after the linger                        UNSUBSCRIBING
UNSUBSCRIBING   its ack, or MOVED                                gone; QUEUED (ack) or
                                                                 UNROUTED (MOVED) if a mailbox
                                                                 arrived meanwhile
UNSUBSCRIBING   another error                                    the link is dropped (below)
SUBSCRIBED,     the server's own (s)unsubscribe (its slot        UNROUTED, RECHECK now and
LINGERING       left the node)                                   owed; gone if no mailbox
RETRYING        ``take`` after the backoff                       QUEUED
every state     ``lost`` or dropped, of its link                 QUEUED, RECHECK now and owed;
on a link                                                        gone if no mailbox
UNROUTED,       its last mailbox leaves (the server holds        gone
QUEUED,         nothing of it)
RETRYING,
FAILED, DENIED
every state     ``close``                                        gone; latches not yet
                                                                 resolved resolve False
==============  ===============================================  ============================

Latches follow the states: a channel's latch resolves True on entering SUBSCRIBED or
LINGERING, False on entering RETRYING, FAILED or DENIED, and the channel gets a fresh latch
on leaving those states for any other. So the latch ``subscribe`` hands out is True only
after an ack of the newest command sent for the channel, on the connection still up. A
RECHECK *owed* goes to the channel's mailboxes when its latch next resolves, either way:
their follower stopped waiting for a message that may have been lost.

Replies. Each link keeps the commands written on its live connection, in socket order, in
``awaiting``; each ack, PONG, OK and error reply answers its head, so every reply belongs to
exactly one command (an error reply to all channels of it). Each command carries the epoch
of each of its channels; a channel's epoch grows with every command sent for it and every
re-route or loss, and only an answer of its current epoch moves it. At most one command per
channel awaits an answer (a follower that comes while its channel's unsubscribe is on its
way is subscribed again once that is answered). An ack no command awaits drops the
connection (a desynchronised stream costs a reconnect, never a wrong confirmation); a
subscribe ack of a channel not tracked there is undone by an untracked unsubscribe. A slot
that leaves a node makes it send its own (s)unsubscribe for each of our channels of that
slot; when our own unsubscribe of that channel is the one awaited, the two cannot be told
apart and the server's stands in for our ack, so the MOVED that later answers our
unsubscribe finds no command of its slot at the head and is ignored.

Batches: one (S)SUBSCRIBE or (S)UNSUBSCRIBE carries channels of one hash slot only (Redis
refuses CROSSSLOT otherwise) and at most ``batch`` of them. Health: after a read interval of
silence the carrier calls ``silent``; the first asks for a PING, a second with nothing heard
in between drops the connection.

Time is the carrier's monotonic clock, passed to ``unsubscribe`` (a linger's end), ``error``
(a retry's) and, per link, to ``due`` and ``take``: a link's writer sleeps for what ``due``
says, or until ``Effects.wake`` names its link (new work, or a sooner timer), then ``take``
moves whatever is due by then. There is no global tick.
"""

from __future__ import annotations

import enum
import heapq
from collections import deque
from collections.abc import Callable, Collection, Hashable
from typing import Any, Final, Generic, TypeVar

__all__ = [
    "RECHECK",
    "Command",
    "Effects",
    "ErrorKind",
    "Op",
    "State",
    "Subscriptions",
]

M = TypeVar("M", bound=Hashable)  # a follower's mailbox
L = TypeVar("L")  # a confirmation latch: opaque here, resolved by the carrier

LINGER: Final = 0.05  # unsubscribing waits this long: a hot key's next follower reuses it
BATCH: Final = 512  # channels per (un)subscribe command
RETRY_FIRST: Final = 0.1  # the first backoff after ASK/TRYAGAIN/CLUSTERDOWN, doubling ...
RETRY_MAX: Final = 2.0  # ... up to this
MAX_MOVES: Final = 8  # MOVED replies in a row for one channel before the layout is refreshed


class _Recheck:
    __slots__ = ()

    def __repr__(self) -> str:
        return "RECHECK"


RECHECK: Final = _Recheck()
"""What a mailbox gets when its subscription may have missed messages: re-check the job."""


class State(enum.Enum):
    UNROUTED = "unrouted"
    QUEUED = "queued"
    SUBSCRIBING = "subscribing"
    SUBSCRIBED = "subscribed"
    LINGERING = "lingering"
    UNSUBSCRIBING = "unsubscribing"
    RETRYING = "retrying"
    FAILED = "failed"
    DENIED = "denied"


# The latch's value in each state where it is resolved; absent: not resolved yet.
_SETTLED: Final[dict[State, bool]] = {
    State.SUBSCRIBED: True,
    State.LINGERING: True,
    State.RETRYING: False,
    State.FAILED: False,
    State.DENIED: False,
}
# States in which the server holds nothing of the channel and no command for it awaits.
_IDLE: Final = frozenset({State.UNROUTED, State.QUEUED, State.RETRYING, State.FAILED, State.DENIED})


class ErrorKind(enum.Enum):
    """What an error reply says, as far as a subscription is concerned."""

    MOVED = "MOVED"  # the slot is served by another node (named in the reply)
    ASK = "ASK"  # the slot is being migrated
    TRYAGAIN = "TRYAGAIN"  # ... and the keys are split between the nodes
    CLUSTERDOWN = "CLUSTERDOWN"  # the cluster cannot serve the slot now
    NOPERM = "NOPERM"  # an ACL refuses the channel or the command
    OTHER = "OTHER"  # anything else


class _Do(enum.Enum):
    REROUTE = "reroute"  # served elsewhere: route again (RETRY after MAX_MOVES in a row)
    RETRY = "retry"  # in flux: try again after a backoff
    DENY = "deny"  # refused by an ACL
    FAIL = "fail"  # refused


# What a failed subscribe does, by the error's kind. DENY and FAIL answered a command of
# several channels first re-send each alone: the error may be about only one of them.
_ON_SUBSCRIBE_ERROR: Final[dict[ErrorKind, _Do]] = {
    ErrorKind.MOVED: _Do.REROUTE,
    ErrorKind.ASK: _Do.RETRY,
    ErrorKind.TRYAGAIN: _Do.RETRY,
    ErrorKind.CLUSTERDOWN: _Do.RETRY,
    ErrorKind.NOPERM: _Do.DENY,
    ErrorKind.OTHER: _Do.FAIL,
}


class Op(enum.Enum):
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    UNDO = "undo"  # an unsubscribe of channels not tracked (a stray ack): no state moves
    PING = "ping"
    NAME = "name"  # CLIENT SETNAME, first on every connection


class Command:
    """A command to write, then awaiting its replies: one per channel, or one."""

    __slots__ = ("args", "channels", "epochs", "next", "op", "slot")

    def __init__(
        self,
        op: Op,
        args: tuple[str, ...],
        slot: int = -1,
        channels: list[str] | None = None,
        epochs: list[int] | None = None,
    ) -> None:
        self.op = op
        self.args = args  # what the carrier writes
        self.slot = slot  # the hash slot of its channels (0 unsharded; -1: no channels)
        self.channels: list[str] = channels or []
        self.epochs: list[int] = epochs or []  # each channel's epoch when sent
        self.next = 0  # the channel whose ack comes next

    def __repr__(self) -> str:
        return f"Command({' '.join(self.args)!r}, next={self.next})"


class Effects(Generic[M, L]):
    """What the carrier must do after a call, in this order: resolve, recheck, apply
    ``moved`` to the router, start ``opened`` links, end ``drop``-ped connections, wake the
    writers of ``wake``, refresh the layout if ``refresh``; log ``notes`` (key None: every
    time, at info; else once per key, as a warning)."""

    __slots__ = ("drop", "moved", "notes", "opened", "recheck", "refresh", "resolve", "wake")

    def __init__(self) -> None:
        self.resolve: list[tuple[L, bool]] = []
        self.recheck: list[M] = []
        self.moved: list[tuple[int, str, int]] = []  # (slot, host, port) learned from MOVED
        self.opened: list[str] = []  # links routed to for the first time
        self.drop: dict[str, str] = {}  # link -> why its connection must end
        self.wake: set[str] = set()  # links with something to write, or a sooner timer
        self.refresh = False
        self.notes: list[tuple[str | None, str]] = []

    def __bool__(self) -> bool:
        return bool(
            self.resolve
            or self.recheck
            or self.moved
            or self.opened
            or self.drop
            or self.wake
            or self.refresh
            or self.notes
        )


class _Channel(Generic[M, L]):
    """One channel: the wish (mailboxes) and where it stands with its link's server."""

    __slots__ = (
        "denied",
        "epoch",
        "latch",
        "linger_until",
        "link",
        "mailboxes",
        "moves",
        "name",
        "recheck",
        "retry_delay",
        "slot",
        "solo",
        "state",
    )

    def __init__(self, name: str, slot: int, latch: L) -> None:
        self.name = name
        self.slot = slot
        self.state = State.UNROUTED
        self.link: str | None = None  # set from QUEUED on, None while UNROUTED
        # A tuple, made anew on each change: a channel has one mailbox per flight of this
        # process on it (mostly one), and a tuple of one costs 48 bytes against a list's 88
        # or a set's 216 (one per waiting flight; issue 23's memory per flight); and what
        # reply() hands out is never changed under whoever reads it. Each mailbox is in it
        # once.
        self.mailboxes: tuple[M, ...] = ()
        self.latch = latch
        self.epoch = 0
        self.linger_until = 0.0  # no mailbox left: unsubscribe from this moment on
        self.retry_delay = 0.0  # the last backoff (RETRYING); 0 after an ack
        self.moves = 0  # MOVED replies in a row
        self.solo = False  # an error answered a batch with it: send it alone until acked
        self.recheck = False  # RECHECK owed to its mailboxes when the latch next resolves
        self.denied: str | None = None  # the last ACL denial, until an ack


class _Link:
    """One node connection's share of the work."""

    __slots__ = ("awaiting", "control", "dirty", "members", "name", "pinged", "timers", "undo")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: dict[str, None] = {}  # channels routed here (ordered: deterministic)
        # Kept for the live connection only (``lost`` clears them):
        self.awaiting: deque[Command] | None = None  # None: the link is down
        self.dirty: dict[str, None] = {}  # members a command may be due for
        self.timers: list[tuple[float, int, str]] = []  # (when, epoch, channel): heap
        self.undo: dict[int, set[str]] = {}  # stray subscriptions to unsubscribe, by slot
        self.control: list[Command] = []  # CLIENT SETNAME, PING: written first
        self.pinged = False  # a health-check PING went out and nothing was heard since


def _text(raw: Any) -> str:
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)


class Subscriptions(Generic[M, L]):
    """The channels of one hub, across its links. See the module docstring.

    ``slot_of`` maps a channel to its hash slot (sharded only); ``name``, if given, is sent
    as ``CLIENT SETNAME`` first on every connection.
    """

    def __init__(
        self,
        new_latch: Callable[[], L],
        *,
        sharded: bool,
        slot_of: Callable[[str], int] | None = None,
        name: str | None = None,
        linger: float = LINGER,
        batch: int = BATCH,
    ) -> None:
        if sharded and slot_of is None:
            raise ValueError("a sharded machine needs slot_of")
        self._new_latch = new_latch
        self._sharded = sharded
        self._slot_of = slot_of
        self._name = name
        self._linger = linger
        self._batch = batch
        if sharded:
            self._sub, self._unsub = "SSUBSCRIBE", "SUNSUBSCRIBE"
            self._msg, self._ack, self._nack = b"smessage", b"ssubscribe", b"sunsubscribe"
        else:
            self._sub, self._unsub = "SUBSCRIBE", "UNSUBSCRIBE"
            self._msg, self._ack, self._nack = b"message", b"subscribe", b"unsubscribe"
        self._channels: dict[str, _Channel[M, L]] = {}
        self._links: dict[str, _Link] = {}
        self.unrouted: dict[str, None] = {}  # channels the carrier must ``route``
        self.out: Effects[M, L] = Effects()
        self.reconnects = 0  # connections lost (or dropped) after they were up

    def drain(self) -> Effects[M, L]:
        """The effects collected so far; ``out`` starts afresh."""
        out, self.out = self.out, Effects()
        return out

    # --- followers ------------------------------------------------------------------------------

    def subscribe(self, channel: str, mailbox: M) -> L:
        """Add a mailbox to a channel; its current latch (the same one for the same mailbox)."""
        st = self._channels.get(channel)
        if st is None:
            slot = self._slot_of(channel) if self._slot_of is not None and self._sharded else 0
            st = self._channels[channel] = _Channel(channel, slot, self._new_latch())
            st.mailboxes = (mailbox,)
            self.unrouted[channel] = None
        elif mailbox not in st.mailboxes:
            st.mailboxes += (mailbox,)
            st.linger_until = 0.0
            if st.state is State.LINGERING:
                st.state = State.SUBSCRIBED  # still acked: the same (True) latch
        return st.latch

    def unsubscribe(self, channel: str, mailbox: M, now: float) -> None:
        st = self._channels.get(channel)
        if st is None or mailbox not in st.mailboxes:
            return
        st.mailboxes = tuple(m for m in st.mailboxes if m != mailbox)  # it was in it, once
        if st.mailboxes:
            return
        if st.state in _IDLE:
            self._forget(st)  # nothing at the server to undo
            return
        st.linger_until = now + self._linger
        if st.state is State.SUBSCRIBED:
            st.state = State.LINGERING
            assert st.link is not None
            self._timer(self._links[st.link], st, st.linger_until)
        # SUBSCRIBING: decided by its answer; UNSUBSCRIBING: on its way out already.

    def confirmation(self, channel: str) -> L | None:
        st = self._channels.get(channel)
        return st.latch if st is not None else None

    def denied(self, channel: str) -> str | None:
        st = self._channels.get(channel)
        return st.denied if st is not None else None

    def channels(self) -> dict[str, int]:
        """Every channel known here (lingering and unsubscribing too), with its mailboxes."""
        return {name: len(st.mailboxes) for name, st in self._channels.items()}

    def state_of(self, channel: str) -> State | None:
        st = self._channels.get(channel)
        return st.state if st is not None else None

    def link_of(self, channel: str) -> str | None:
        st = self._channels.get(channel)
        return st.link if st is not None else None

    def awaiting(self, link: str) -> tuple[Command, ...]:
        """The commands of the link's live connection awaiting replies, oldest first."""
        ls = self._links.get(link)
        return tuple(ls.awaiting) if ls is not None and ls.awaiting is not None else ()

    def close(self) -> None:
        """Forget everything; every latch not resolved yet resolves False."""
        for st in self._channels.values():
            if st.state not in _SETTLED:
                self.out.resolve.append((st.latch, False))
        self._channels.clear()
        self.unrouted.clear()
        for ls in self._links.values():
            ls.members.clear()
            self._reset(ls)

    # --- routing --------------------------------------------------------------------------------

    def route(self, channel: str, link: str) -> None:
        """The carrier's router says which link carries an UNROUTED channel."""
        self.unrouted.pop(channel, None)
        st = self._channels.get(channel)
        if st is None or st.state is not State.UNROUTED:
            return
        ls = self._links.get(link)
        if ls is None:
            ls = self._links[link] = _Link(link)
            self.out.opened.append(link)
        st.link = link
        ls.members[channel] = None
        self._enter(st, State.QUEUED)
        self._want(ls, channel)

    # --- links ----------------------------------------------------------------------------------

    def connected(self, link: str) -> None:
        """The link has a new connection: name it, and subscribe every channel routed here."""
        ls = self._links[link]
        if ls.awaiting is not None:
            self._lose(ls)
        ls.awaiting = deque()
        if self._name is not None:
            ls.control.append(Command(Op.NAME, ("CLIENT", "SETNAME", self._name)))
        ls.dirty.update(ls.members)
        self.out.wake.add(link)

    def lost(self, link: str) -> None:
        """The link's connection ended (a no-op if it was already dropped here)."""
        ls = self._links.get(link)
        if ls is not None and ls.awaiting is not None:
            self._lose(ls)

    def silent(self, link: str, heard: bool) -> None:
        """A read interval passed with nothing read; ``heard``: something was read since
        the previous call. The first asks for a PING; the second in a row drops the link."""
        ls = self._links.get(link)
        if ls is None or ls.awaiting is None:
            return
        if heard:
            ls.pinged = False
        if ls.pinged:
            self._drop(ls, "no reply to the health check (a half-open or stalled connection)")
            return
        ls.pinged = True
        ls.control.append(Command(Op.PING, ("PING",)))
        self.out.wake.add(link)

    def take(self, link: str, now: float) -> list[Command]:
        """The commands to write on the link now, in order; they await replies from here."""
        ls = self._links.get(link)
        if ls is None or ls.awaiting is None:
            return []
        self._due(ls, now)
        commands, ls.control = ls.control, []
        if ls.dirty:
            commands += self._plan(ls, now)
        if ls.undo:
            undo, ls.undo = ls.undo, {}
            for slot in sorted(undo):
                names = sorted(undo[slot])
                for i in range(0, len(names), self._batch):
                    batch = names[i : i + self._batch]
                    cmd = Command(Op.UNDO, (self._unsub, *batch), slot, batch, [-1] * len(batch))
                    commands.append(cmd)
        ls.awaiting.extend(commands)
        return commands

    def due(self, link: str, now: float) -> float | None:
        """Seconds until ``take`` has something for the link (0: now); None: nothing planned."""
        ls = self._links.get(link)
        if ls is None or ls.awaiting is None:
            return None
        if ls.dirty or ls.control or ls.undo:
            return 0.0
        return max(0.0, ls.timers[0][0] - now) if ls.timers else None

    # --- replies --------------------------------------------------------------------------------

    def reply(self, link: str, reply: Any) -> Collection[M] | None:
        """A reply read on the link. For a channel message: the mailboxes to hand its
        payload (``reply[2]``) to, possibly none; for anything else None (see ``out``)."""
        if type(reply) is list and len(reply) >= 2:
            kind = reply[0]
            if kind == self._msg:  # the follower's path: one lookup
                st = self._channels.get(_text(reply[1]))
                return st.mailboxes if st is not None and st.link == link else ()
            if kind == self._ack or kind == self._nack:
                self._acked(link, _text(reply[1]), subscribed=kind == self._ack)
                return None
        ls = self._links.get(link)
        if ls is None or ls.awaiting is None:
            return None
        head = ls.awaiting[0] if ls.awaiting else None
        if head is None or head.op not in (Op.PING, Op.NAME):  # PONG (either form) or OK
            self._drop(ls, f"a reply no command awaits: {reply!r}")
            return None
        ls.awaiting.popleft()
        return None

    def error(
        self,
        link: str,
        kind: ErrorKind,
        text: str,
        now: float,
        moved: tuple[int, str, int] | None = None,
    ) -> None:
        """An error reply read on the link; ``moved``: MOVED's (slot, host, port)."""
        ls = self._links.get(link)
        if ls is None or ls.awaiting is None:
            return
        head = ls.awaiting[0] if ls.awaiting else None
        slot = moved[0] if moved is not None and self._sharded else None
        if slot is not None and (head is None or head.slot != slot):
            # The late answer to an unsubscribe that the server's own sunsubscribe stood in
            # for (module docstring): that command was taken as answered already.
            return
        if head is None:
            self._drop(ls, f"an error reply no command awaits: {text}")
            return
        ls.awaiting.popleft()
        code = text.split(" ", 1)[0] if kind is ErrorKind.OTHER else kind.value
        if head.op in (Op.PING, Op.NAME):
            self._note(f"{head.op.value}:{code}", f"{head.args[0]} on {link} failed: {text}")
            return
        if head.op is Op.UNDO:
            if kind is not ErrorKind.MOVED:  # MOVED: that node holds none of them anyway
                self._drop(ls, f"{self._unsub} on {link} failed: {text}")  # forgets them all
            return
        states: list[_Channel[M, L]] = []  # the ones this command still speaks for
        for name, epoch in zip(head.channels[head.next :], head.epochs[head.next :], strict=True):
            st = self._channels.get(name)
            if st is not None and st.link == link and st.epoch == epoch:
                states.append(st)
        if head.op is Op.SUBSCRIBE:
            several = len(head.channels) - head.next > 1
            self._subscribe_failed(ls, states, kind, code, text, now, moved, several)
        elif kind is ErrorKind.MOVED:
            # Not this node's slot (any more): it holds nothing of ours for it.
            for st in states:
                if st.mailboxes:
                    self._reroute(st)
                else:
                    self._forget(st)
        else:
            # What the server kept is unknown: a new connection holds nothing.
            self._note(code, f"{self._unsub} on {link} failed: {text}; reconnecting")
            self._drop(ls, f"{self._unsub} failed: {text}")

    # --- internals ------------------------------------------------------------------------------

    def _enter(self, st: _Channel[M, L], state: State) -> None:
        """Move a channel to ``state``, resolving or renewing its latch as the states say."""
        was, now = _SETTLED.get(st.state), _SETTLED.get(state)
        st.state = state
        if was is now:
            return
        if was is not None:
            st.latch = self._new_latch()  # it described a subscription that is gone
        if now is not None:
            self.out.resolve.append((st.latch, now))
            if st.recheck:
                st.recheck = False
                self.out.recheck.extend(st.mailboxes)

    def _want(self, ls: _Link, channel: str) -> None:
        ls.dirty[channel] = None
        if ls.awaiting is not None:
            self.out.wake.add(ls.name)

    def _timer(self, ls: _Link, st: _Channel[M, L], when: float) -> None:
        heapq.heappush(ls.timers, (when, st.epoch, st.name))
        if ls.awaiting is not None:
            self.out.wake.add(ls.name)

    def _note(self, key: str | None, text: str) -> None:
        self.out.notes.append((key, text))

    def _forget(self, st: _Channel[M, L]) -> None:
        del self._channels[st.name]
        self.unrouted.pop(st.name, None)
        if st.link is not None:
            ls = self._links[st.link]
            ls.members.pop(st.name, None)
            ls.dirty.pop(st.name, None)

    def _reroute(self, st: _Channel[M, L]) -> None:
        """Its node holds nothing of it: route it afresh (to the same link, maybe)."""
        if st.link is not None:
            ls = self._links[st.link]
            ls.members.pop(st.name, None)
            ls.dirty.pop(st.name, None)
        st.link = None
        st.epoch += 1
        self._enter(st, State.UNROUTED)
        self.unrouted[st.name] = None

    def _reset(self, ls: _Link) -> None:
        ls.awaiting = None
        ls.dirty = {}
        ls.timers = []
        ls.undo = {}
        ls.control = []
        ls.pinged = False

    def _lose(self, ls: _Link) -> None:
        """The link's connection is gone, and with it every subscription it held."""
        self.reconnects += 1
        self._reset(ls)
        for name in list(ls.members):
            st = self._channels[name]
            st.epoch += 1
            if not st.mailboxes:
                self._forget(st)
                continue
            self.out.recheck.extend(st.mailboxes)
            st.recheck = True
            self._enter(st, State.QUEUED)

    def _drop(self, ls: _Link, why: str) -> None:
        """End the link's connection: from now on as if lost; the carrier closes it."""
        self.out.drop[ls.name] = why
        self._lose(ls)

    def _due(self, ls: _Link, now: float) -> None:
        while ls.timers and ls.timers[0][0] <= now:
            _, epoch, name = heapq.heappop(ls.timers)
            st = self._channels.get(name)
            if st is None or st.link != ls.name:
                continue
            if st.state is State.LINGERING and st.linger_until <= now:
                ls.dirty[name] = None
            elif st.state is State.RETRYING and st.epoch == epoch:
                self._enter(st, State.QUEUED)
                ls.dirty[name] = None

    def _plan(self, ls: _Link, now: float) -> list[Command]:
        """(Un)subscribes for the link's dirty channels: one slot, at most ``batch``, each."""
        subs: dict[int, list[_Channel[M, L]]] = {}
        unsubs: dict[int, list[_Channel[M, L]]] = {}
        alone: list[_Channel[M, L]] = []
        dirty, ls.dirty = ls.dirty, {}
        for name in dirty:
            st = self._channels.get(name)
            if st is None or st.link != ls.name:
                continue
            if st.state is State.QUEUED:
                if st.solo:
                    alone.append(st)
                else:
                    subs.setdefault(st.slot, []).append(st)
            elif st.state is State.LINGERING and st.linger_until <= now:
                unsubs.setdefault(st.slot, []).append(st)
        commands: list[Command] = []
        groups = [(st.slot, [st]) for st in alone] + sorted(subs.items())
        for slot, group in groups:
            commands += self._commands(Op.SUBSCRIBE, slot, group)
        for slot, group in sorted(unsubs.items()):
            commands += self._commands(Op.UNSUBSCRIBE, slot, group)
        return commands

    def _commands(self, op: Op, slot: int, group: list[_Channel[M, L]]) -> list[Command]:
        verb, state = (
            (self._sub, State.SUBSCRIBING)
            if op is Op.SUBSCRIBE
            else (self._unsub, State.UNSUBSCRIBING)
        )
        commands = []
        for i in range(0, len(group), self._batch):
            batch = group[i : i + self._batch]
            for st in batch:
                st.epoch += 1
                self._enter(st, state)
            names = [st.name for st in batch]
            epochs = [st.epoch for st in batch]
            commands.append(Command(op, (verb, *names), slot, names, epochs))
        return commands

    def _acked(self, link: str, channel: str, *, subscribed: bool) -> None:
        ls = self._links.get(link)
        if ls is None or ls.awaiting is None:
            return
        head = ls.awaiting[0] if ls.awaiting else None
        ops = (Op.SUBSCRIBE,) if subscribed else (Op.UNSUBSCRIBE, Op.UNDO)
        if head is not None and head.op in ops and head.channels[head.next] == channel:
            epoch = head.epochs[head.next]
            head.next += 1
            if head.next == len(head.channels):
                ls.awaiting.popleft()
            if head.op is not Op.UNDO:
                self._answered(ls, channel, epoch, subscribed=subscribed)
            return
        if subscribed:
            self._drop(ls, f"a subscribe ack for {channel!r} that no command awaits")
        else:
            self._unsubscribed_by_server(ls, channel)

    def _answered(self, ls: _Link, channel: str, epoch: int, *, subscribed: bool) -> None:
        st = self._channels.get(channel)
        if st is None or st.link != ls.name or st.epoch != epoch:
            if subscribed:  # a subscription nobody tracks here: undo it at that server
                slot = self._slot_of(channel) if self._slot_of is not None and self._sharded else 0
                ls.undo.setdefault(slot, set()).add(channel)
                self.out.wake.add(ls.name)
            return
        if subscribed:
            st.moves = 0
            st.retry_delay = 0.0
            st.denied = None
            st.solo = False
            if st.mailboxes:
                self._enter(st, State.SUBSCRIBED)
            else:
                self._enter(st, State.LINGERING)
                self._timer(ls, st, st.linger_until)
        elif st.mailboxes:  # a follower came while it was on its way out
            self._enter(st, State.QUEUED)
            self._want(ls, channel)
        else:
            self._forget(st)

    def _unsubscribed_by_server(self, ls: _Link, channel: str) -> None:
        """An (s)unsubscribe no command of ours asked for: the channel's slot left the node."""
        st = self._channels.get(channel)
        if st is None or st.link != ls.name:
            return
        if st.state not in (State.SUBSCRIBED, State.LINGERING):
            return  # nothing of ours held there; an UNSUBSCRIBING one ends with its reply
        self._note(None, f"{channel!r} was unsubscribed by {ls.name} (slot moved); re-subscribing")
        if not st.mailboxes:
            self._forget(st)
            return
        self.out.recheck.extend(st.mailboxes)
        st.recheck = True
        self._reroute(st)  # a stale route lands here again and meets MOVED

    def _subscribe_failed(
        self,
        ls: _Link,
        states: list[_Channel[M, L]],
        kind: ErrorKind,
        code: str,
        text: str,
        now: float,
        moved: tuple[int, str, int] | None,
        several: bool,
    ) -> None:
        do = _ON_SUBSCRIBE_ERROR[kind]
        if kind is ErrorKind.MOVED and moved is not None:
            self.out.moved.append(moved)
        for st in states:
            if not st.mailboxes:
                self._forget(st)  # nobody waits: the server holds nothing of it
                continue
            if do is _Do.REROUTE and st.moves < MAX_MOVES:
                st.moves += 1
                st.recheck = True  # its follower may have stopped waiting: re-check then
                self._reroute(st)
                continue
            if do in (_Do.DENY, _Do.FAIL) and several and not st.solo:
                st.solo = True
                self._enter(st, State.QUEUED)
                self._want(ls, st.name)
                continue
            if do is _Do.DENY:
                st.denied = (
                    f"Redis denied {self._sub} {st.name!r} on {ls.name}: the ACL user needs "
                    f"the channel (&{st.name} or a pattern that matches it) and the command "
                    f"(+{self._sub.lower()}); server said: {text}"
                )
                self._note("NOPERM", st.denied)
                self._enter(st, State.DENIED)
            elif do is _Do.FAIL:
                self._note(code, f"{self._sub} {st.name!r} on {ls.name} failed: {text}")
                self._enter(st, State.FAILED)
            else:  # RETRY, or REROUTE once the moves ran out: the layout is in flux
                if kind is ErrorKind.MOVED:
                    self.out.refresh = True
                self._note(code, f"{self._sub} {st.name!r} on {ls.name}: {text}; retrying")
                st.retry_delay = min(RETRY_MAX, max(RETRY_FIRST, st.retry_delay * 2))
                self._enter(st, State.RETRYING)
                st.recheck = True  # its follower stopped waiting: RECHECK once it works
                self._timer(ls, st, now + st.retry_delay)
