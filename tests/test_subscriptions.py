"""The hub's subscription machine (dedupe/core/subscriptions.py) under hypothesis, with no network.

A hypothesis state machine plays followers, the carrier (dedupe/backend/hub.py: routing, writers,
readers, reconnects, the health check) and model Redis nodes, and interleaves them freely:
followers subscribe and leave; writers take commands; a node processes one command at a
time, answering as Redis 7 does (acks, MOVED for a slot it does not own, NOPERM for a channel
the ACL refuses, an ERR for a channel it dislikes, injected ASK/TRYAGAIN/CLUSTERDOWN, an
error to an unsubscribe); readers deliver one reply at a time; connections are lost at any
point, also with commands in flight; slots move between nodes (the old owner sends its own
sunsubscribe for each channel of the slot it held); the router's view goes stale and learns
from MOVED; time passes (lingers, retries); reads fall silent (health checks).

After every step (``check``):
- ack order: on each connection the machine awaits exactly the commands written on it whose
  replies have not all been read, in order (unless a slot move's sunsubscribe stood in for
  the ack of our own sunsubscribe of that channel, which cannot be told apart: then that
  connection is exempt from this check from there on); each awaiting (un)subscribe names
  one slot and at most ``batch`` channels; a channel has at most one command awaiting;
- the machine's wishes are the followers': each channel's mailboxes are exactly the ones
  subscribed and not left; the states that mean "wanted" have mailboxes, LINGERING has none;
- a channel's latch is True exactly in SUBSCRIBED and LINGERING, False exactly in RETRYING,
  FAILED and DENIED, and unresolved otherwise; no latch resolves twice; a latch resolves True
  only on the read of an ack of the command the channel awaits on its link's live connection;
- a channel SUBSCRIBED or LINGERING on a link is held by that link's live connection at the
  node (or the node's own sunsubscribe of it is on its way); a channel a node holds for a
  connection is tracked on that link, or an undo (an unsubscribe) of it is planned or on its
  way;
- a connection lost or dropped, or a channel the node unsubscribed on its own, hands RECHECK
  to each of the affected channels' mailboxes in that step;
- a message read on a link reaches exactly the mailboxes of its channel, if routed there.

At the end of every run (``teardown``), after a fault-free tail (faults stop, the router
reads the true layout, every link connects, all commands and replies flow, time passes):
every wanted channel is SUBSCRIBED exactly once, at the node that owns its slot, with a True
latch (DENIED with the denial's text, or FAILED, for a channel the node refuses), and no
node holds anything else; every mailbox whose subscription was lost got a RECHECK after the
loss; nothing is left awaiting; close() resolves every pending latch False.

``make test`` runs a fixed-seed, bounded run (a few seconds); set
``DEDUPE_SUBSCRIPTIONS_EXAMPLES`` (e.g. 5000) for a longer one with random seeds.
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from dedupe.core.subscriptions import (
    LINGER,
    RECHECK,
    RETRY_MAX,
    Command,
    Effects,
    ErrorKind,
    Op,
    State,
    Subscriptions,
)

_LONG = os.environ.get("DEDUPE_SUBSCRIPTIONS_EXAMPLES")
EXAMPLES = int(_LONG) if _LONG else 200
STEPS = 100 if _LONG else 60

# A toy Cluster: 8 channels over 4 slots, 3 nodes. Small on purpose: batches share slots,
# and every rule finds something to act on.
CHANNELS = [f"c{i}" for i in range(8)]
SLOT = {ch: i // 2 for i, ch in enumerate(CHANNELS)}
NODES = ["n1:1", "n2:2", "n3:3"]
HOME = {0: "n1:1", 1: "n1:1", 2: "n2:2", 3: "n3:3"}
BATCH = 2  # channels per command: small, so that batches split too
BOXES = 4
TRACKED = {State.SUBSCRIBING, State.SUBSCRIBED, State.LINGERING, State.UNSUBSCRIBING}


class TLatch:
    """A latch that refuses to resolve twice."""

    def __init__(self) -> None:
        self.value: bool | None = None
        self.channel: str | None = None  # stamped by the harness once seen

    def set(self, value: bool) -> None:
        assert self.value is None, f"latch of {self.channel} resolved twice"
        self.value = value


@dataclass(eq=False)
class Box:
    """A follower's mailbox."""

    name: str
    items: list[tuple[int, object]] = field(default_factory=list)  # (step, item)

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return self.name


@dataclass(eq=False)
class Reply:
    payload: Any  # a RESP value, or an Error
    origin: Command | None  # the command it answers; None: the node's own (s)unsubscribe
    last: bool = True  # the origin's last reply


@dataclass
class Error:
    kind: ErrorKind
    text: str
    moved: tuple[int, str, int] | None = None


@dataclass(eq=False)
class Conn:
    """One connection at a node, as the node and the wire see it."""

    link: str
    inbox: deque[Command] = field(default_factory=deque)  # written, not processed
    replies: deque[Reply] = field(default_factory=deque)  # produced, not read
    held: set[str] = field(default_factory=set)
    unread: deque[Command] = field(default_factory=deque)  # written, replies not all read
    tainted: bool = False  # a sunsubscribe stood in for an ack: no ack-order check
    heard: bool = True


class Machine(RuleBasedStateMachine):
    sharded = True

    def __init__(self) -> None:
        super().__init__()
        self.m: Subscriptions[Box, TLatch] = Subscriptions(
            TLatch,
            sharded=self.sharded,
            slot_of=SLOT.__getitem__,
            name="hub-test",
            batch=BATCH,
        )
        self.now = 100.0
        self.step = 0
        self.boxes = [Box(f"b{i}") for i in range(BOXES)]
        self.wish: dict[str, set[Box]] = {ch: set() for ch in CHANNELS}
        self.owner = dict(HOME) if self.sharded else dict.fromkeys(range(4), "main")
        self.view = dict(self.owner)  # the router's, maybe stale
        self.refresh_wanted = False
        self.opened: set[str] = set()
        self.conns: dict[str, Conn] = {}  # live connections by link
        self.sleep: dict[str, float] = {}  # until when each link's writer sleeps
        self.fresh: list[str] = []  # links just opened: their reader connects at once
        self.connecting = False
        self.faults: dict[str, ErrorKind] = {}  # the next subscribe at that node fails
        self.unsub_faults: set[str] = set()  # the next unsubscribe at that node fails
        self.denied: set[str] = set()
        self.odd: set[str] = set()
        self.lost_at: dict[tuple[Box, str], int] = {}  # the last loss of a box's channel
        self.stats: dict[str, int] = {}

    # --- the carrier ----------------------------------------------------------------------------

    def link_for(self, channel: str) -> str:
        return self.view[SLOT[channel]] if self.sharded else "main"

    def apply(
        self, before: dict[str, str | None] | None = None, *, acking: bool = False
    ) -> Effects[Box, TLatch]:
        """Carry out the machine's effects as dedupe/backend/hub.py does; check the RECHECK rule."""
        m = self.m
        out = m.drain()
        assert acking or all(ok is False for _, ok in out.resolve), "True without an ack"
        for slot, host, port in out.moved:
            self.view[slot] = f"{host}:{port}"
        for channel in list(m.unrouted):
            m.route(channel, self.link_for(channel))
        more = m.drain()
        assert not more.resolve and not more.recheck and not more.drop
        for latch, ok in out.resolve:
            latch.set(ok)
        for box in out.recheck:
            box.items.append((self.step, RECHECK))
        self.opened.update(out.opened, more.opened)
        for link in out.wake | more.wake:
            self.sleep[link] = -math.inf
        self.fresh.extend([*out.opened, *more.opened])
        if out.refresh:
            self.refresh_wanted = True
        for link in out.drop:
            self.count("drop")
            assert before is not None
            self.kill(link, before, out)
        for _, ok in out.resolve:
            self.count(f"resolve-{ok}")
        if not self.connecting:
            self.connecting = True
            try:
                self.connect_fresh()
            finally:
                self.connecting = False
        for ch in CHANNELS:  # name each latch after its channel, as soon as it is handed out
            latch = m.confirmation(ch)
            if latch is not None and latch.channel is None:
                latch.channel = ch
        return out

    def kill(self, link: str, before: dict[str, str | None], out: Effects[Box, TLatch]) -> None:
        """A connection ended: the node forgets it; each mailbox of its channels was told."""
        conn = self.conns.pop(link, None)
        if conn is None:
            return
        told = set(out.recheck)
        for ch, was in before.items():
            if was == link:
                for box in self.wish[ch]:
                    assert box in told, f"{box} of {ch} not told of the loss of {link}"
                    self.lost_at[(box, ch)] = self.step

    def connect_fresh(self) -> None:
        while self.fresh:
            link = self.fresh.pop(0)
            if link not in self.conns:
                self.conns[link] = Conn(link)
                self.m.connected(link)
                self.apply()

    def writable(self) -> list[str]:
        """Links whose writer is awake: woken, or its own timeout passed (as dedupe/backend/hub.py's
        writers, which sleep ``due`` seconds, or until woken)."""
        return [link for link in sorted(self.conns) if self.sleep.get(link, 0.0) <= self.now]

    def snapshot(self) -> dict[str, str | None]:
        return {ch: self.m.link_of(ch) for ch in CHANNELS}

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    # --- rules: followers -----------------------------------------------------------------------

    @initialize(
        denied=st.sets(st.sampled_from(CHANNELS), max_size=1),
        odd=st.sets(st.sampled_from(CHANNELS), max_size=1),
    )
    def acl(self, denied: set[str], odd: set[str]) -> None:
        self.denied, self.odd = denied, odd - denied

    @initialize(
        wishes=st.lists(
            st.tuples(st.integers(0, BOXES - 1), st.sampled_from(CHANNELS)), min_size=1, max_size=6
        )
    )
    def followers(self, wishes: list[tuple[int, str]]) -> None:
        for box, channel in wishes:
            self.subscribe(box, channel)

    @rule(box=st.integers(0, BOXES - 1), channel=st.sampled_from(CHANNELS))
    def subscribe(self, box: int, channel: str) -> None:
        b = self.boxes[box]
        latch = self.m.subscribe(channel, b)
        self.wish[channel].add(b)
        self.apply()
        assert latch is self.m.confirmation(channel)

    @precondition(lambda self: any(self.wish.values()))
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        pairs = [(i, ch) for ch in CHANNELS for i, b in enumerate(self.boxes) if b in self.wish[ch]]
        self.unsubscribe(*data.draw(st.sampled_from(pairs)))

    def unsubscribe(self, box: int, channel: str) -> None:
        b = self.boxes[box]
        self.m.unsubscribe(channel, b, self.now)
        self.wish[channel].discard(b)
        self.lost_at.pop((b, channel), None)
        self.apply()

    # --- rules: links ---------------------------------------------------------------------------

    @precondition(lambda self: self.opened - set(self.conns))
    @rule(data=st.data())
    def connect(self, data: st.DataObject) -> None:
        down = sorted(self.opened - set(self.conns))
        link = data.draw(st.sampled_from(down))
        self.conns[link] = Conn(link)
        self.m.connected(link)
        self.apply()

    @rule(
        fault=st.sampled_from(["lose", "silence", "inject", "unsubscribe-error", "move-slot"]),
        data=st.data(),
    )
    def fault(self, fault: str, data: st.DataObject) -> None:
        """One fault (a rule of its own each would make them most of every run)."""
        if fault == "lose" and self.conns:
            self.lose(data.draw(st.sampled_from(sorted(self.conns))))
        elif fault == "silence" and self.conns:
            self.silence(data.draw(st.sampled_from(sorted(self.conns))))
        elif fault == "inject" and self.sharded:
            kinds = [ErrorKind.ASK, ErrorKind.TRYAGAIN, ErrorKind.CLUSTERDOWN]
            self.faults[data.draw(st.sampled_from(NODES))] = data.draw(st.sampled_from(kinds))
        elif fault == "unsubscribe-error":
            self.unsub_faults.add(data.draw(st.sampled_from(NODES if self.sharded else ["main"])))
        elif fault == "move-slot" and self.sharded:
            slot = data.draw(st.sampled_from(sorted(HOME)))
            self.move_slot(slot, data.draw(st.sampled_from(NODES)))

    def lose(self, link: str) -> None:
        before = self.snapshot()
        self.m.lost(link)
        out = self.apply(before)
        self.count("lost")
        self.kill(link, before, out)

    @precondition(lambda self: self.writable())
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        """A link's writer takes what the machine has for it and writes it."""
        self.write_on(self.conns[data.draw(st.sampled_from(self.writable()))])

    def write_on(self, conn: Conn) -> None:
        commands = self.m.take(conn.link, self.now)
        due = self.m.due(conn.link, self.now)
        self.sleep[conn.link] = self.now + due if due is not None else math.inf
        self.apply()
        for cmd in commands:
            if cmd.op in (Op.SUBSCRIBE, Op.UNSUBSCRIBE, Op.UNDO):
                assert 1 <= len(cmd.channels) <= BATCH, cmd
                assert len(set(cmd.channels)) == len(cmd.channels), cmd
                if self.sharded:
                    assert {SLOT[ch] for ch in cmd.channels} == {cmd.slot}, cmd
            self.count(f"cmd-{cmd.op.value}")
        conn.inbox.extend(commands)
        conn.unread.extend(commands)

    @precondition(lambda self: any(c.inbox for c in self.conns.values()))
    @rule(data=st.data())
    def serve(self, data: st.DataObject) -> None:
        """A node processes the oldest command written on one of its connections."""
        busy = sorted(link for link, c in self.conns.items() if c.inbox)
        self.process(self.conns[data.draw(st.sampled_from(busy))])

    @precondition(lambda self: any(c.replies for c in self.conns.values()))
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        """A link's reader reads one reply."""
        ready = sorted(link for link, c in self.conns.items() if c.replies)
        self.deliver(self.conns[data.draw(st.sampled_from(ready))])

    @precondition(lambda self: self.conns)
    @rule(actions=st.lists(st.sampled_from(["write", "serve", "read"]), min_size=2, max_size=12))
    def flow(self, actions: list[str]) -> None:
        """Several writes, node steps and reads in a row, on links in turn."""
        for i, action in enumerate(actions):
            links = sorted(self.conns)
            if not links:
                return
            conn = self.conns[links[i % len(links)]]
            if action == "write" and conn.link in self.writable():
                self.write_on(conn)
            elif action == "serve" and conn.inbox:
                self.process(conn)
            elif action == "read" and conn.replies:
                self.deliver(conn)

    def silence(self, link: str) -> None:
        """A read interval passes with nothing read on a link (nothing is waiting there)."""
        conn = self.conns[link]
        if conn.replies:
            return
        before = self.snapshot()
        self.m.silent(conn.link, conn.heard)
        conn.heard = False
        self.apply(before)

    @rule(dt=st.sampled_from([0.01, LINGER, 0.3, RETRY_MAX]))
    def advance(self, dt: float) -> None:
        self.now += dt

    # --- faults and the router -----------------------------------------------------------------

    def move_slot(self, slot: int, to: str) -> None:
        """The slot's owner changes; the old owner unsubscribes our channels of it itself."""
        old = self.owner[slot]
        if old == to:
            return
        self.owner[slot] = to
        conn = self.conns.get(old)
        if conn is not None:
            for ch in sorted(ch for ch in conn.held if SLOT[ch] == slot):
                conn.held.discard(ch)
                payload = [b"sunsubscribe", ch.encode(), len(conn.held)]
                conn.replies.append(Reply(payload, None))
        self.count("slot-moved")

    @rule()
    def refresh_router(self) -> None:
        if self.refresh_wanted:
            self.view = dict(self.owner)
            self.refresh_wanted = False

    @rule(channel=st.sampled_from(CHANNELS))
    def publish(self, channel: str) -> None:
        node = self.owner[SLOT[channel]]
        conn = self.conns.get(node)
        if conn is not None and channel in conn.held:
            kind = b"smessage" if self.sharded else b"message"
            conn.replies.append(Reply([kind, channel.encode(), b"payload"], None))

    # --- the model node -------------------------------------------------------------------------

    def process(self, conn: Conn) -> None:
        cmd = conn.inbox.popleft()
        node = conn.link
        sub, unsub = (
            (b"ssubscribe", b"sunsubscribe") if self.sharded else (b"subscribe", b"unsubscribe")
        )
        if cmd.op is Op.NAME:
            conn.replies.append(Reply(b"OK", cmd))
            return
        if cmd.op is Op.PING:
            conn.replies.append(Reply([b"pong", b""] if conn.held else b"PONG", cmd))
            return
        owner = self.owner[cmd.slot] if self.sharded else node
        error: Error | None = None
        if owner != node:
            error = Error(ErrorKind.MOVED, f"{cmd.slot} {owner}", (cmd.slot, *_split(owner)))
        elif cmd.op is Op.SUBSCRIBE:
            fault = self.faults.pop(node, None)
            if fault is not None:
                error = Error(fault, f"{fault.value} injected")
            elif self.denied & set(cmd.channels):
                error = Error(
                    ErrorKind.NOPERM, "this user has no permissions to access one of the channels"
                )
            elif self.odd & set(cmd.channels):
                error = Error(ErrorKind.OTHER, "ERR something odd")
        elif node in self.unsub_faults:
            self.unsub_faults.discard(node)
            error = Error(ErrorKind.OTHER, "ERR nope")
        if error is not None:
            self.count(f"error-{error.kind.value}")
            conn.replies.append(Reply(error, cmd))
            return
        for i, ch in enumerate(cmd.channels):
            if cmd.op is Op.SUBSCRIBE:
                conn.held.add(ch)
            else:
                conn.held.discard(ch)
            kind = sub if cmd.op is Op.SUBSCRIBE else unsub
            conn.replies.append(
                Reply([kind, ch.encode(), len(conn.held)], cmd, i == len(cmd.channels) - 1)
            )

    def deliver(self, conn: Conn) -> None:
        reply = conn.replies.popleft()
        conn.heard = True
        link = conn.link
        m = self.m
        before = self.snapshot()
        awaited = m.awaiting(link)
        head = awaited[0] if awaited else None
        p = reply.payload
        dropped: str | None = None  # a channel the node unsubscribed on its own
        if reply.origin is None and p[0] in (b"sunsubscribe", b"unsubscribe"):
            dropped = p[1].decode()
            ours = head is not None and head.op in (Op.UNSUBSCRIBE, Op.UNDO)
            if ours and head is not None and head.channels[head.next] == dropped:
                conn.tainted = True  # it will be taken for our ack: see the module doc
                self.count("stand-in")
            held = m.state_of(dropped) in (State.SUBSCRIBED, State.LINGERING)
            if not held or m.link_of(dropped) != link:
                dropped = None
        acked: tuple[str, int] | None = None  # the channel and epoch a subscribe ack is for
        if isinstance(p, Error):
            m.error(link, p.kind, p.text, self.now, p.moved)
        else:
            boxes = m.reply(link, p)
            if boxes is not None:  # a message
                ch = p[1].decode()
                expected = self.wish[ch] if m.link_of(ch) == link else set()
                assert set(boxes) == expected, (ch, boxes, expected)
                for box in boxes:
                    box.items.append((self.step, p[2]))
                self.count("message")
            elif reply.origin is not None and p[0] in (b"ssubscribe", b"subscribe"):
                ch = p[1].decode()
                acked = (ch, reply.origin.epochs[reply.origin.channels.index(ch)])
        out = self.apply(before, acking=acked is not None)
        if reply.origin is not None and reply.last:
            if conn.unread and conn.unread[0] is reply.origin:
                conn.unread.popleft()
            else:
                assert conn.tainted or self.conns.get(link) is not conn, "answered out of order"
        if dropped is not None:
            for box in self.wish[dropped]:
                assert (self.step, RECHECK) in box.items, f"{box} not told {dropped} was dropped"
                self.lost_at[(box, dropped)] = self.step
        for latch, ok in out.resolve:
            if ok:
                # True only on the read of an ack of the command the channel awaits, on the
                # live connection of its link.
                assert acked is not None and latch.channel == acked[0], (latch.channel, acked)
                assert m.link_of(acked[0]) == link and self.conns.get(link) is conn
                assert m._channels[acked[0]].epoch == acked[1]

    # --- checks ---------------------------------------------------------------------------------

    @invariant()
    def check(self) -> None:
        self.step += 1
        m = self.m
        known = m.channels()
        for ch in CHANNELS:
            state = m.state_of(ch)
            if self.wish[ch]:
                assert state is not None, f"{ch} is wanted but not tracked"
            if state is None:
                continue
            chan = m._channels[ch]
            assert len(set(chan.mailboxes)) == len(chan.mailboxes), chan.mailboxes
            assert set(chan.mailboxes) == self.wish[ch], (ch, chan.mailboxes, self.wish[ch])
            assert known[ch] == len(self.wish[ch])
            if state is State.LINGERING:
                assert not chan.mailboxes
            elif state not in (State.SUBSCRIBING, State.SUBSCRIBED, State.UNSUBSCRIBING):
                assert chan.mailboxes, (ch, state)
            latch = m.confirmation(ch)
            assert latch is not None
            if latch.channel is None:
                latch.channel = ch
            expected = {State.SUBSCRIBED: True, State.LINGERING: True, State.RETRYING: False,
                        State.FAILED: False, State.DENIED: False}.get(state)  # fmt: skip
            assert latch.value is expected, (ch, state, latch.value)
            link = m.link_of(ch)
            assert (link is None) == (state is State.UNROUTED), (ch, state, link)
            conn = self.conns.get(link) if link is not None else None
            # One command at most awaits for a channel, and only in the states that say so.
            waiting = [
                c
                for ln, cn in self.conns.items()
                for c in m.awaiting(ln)
                if c.op in (Op.SUBSCRIBE, Op.UNSUBSCRIBE)
                and ch in c.channels[c.next :]
                and ln == link
                and c.epochs[c.channels.index(ch)] == chan.epoch
            ]
            in_flight = state in (State.SUBSCRIBING, State.UNSUBSCRIBING)
            assert len(waiting) == (1 if in_flight else 0), (ch, state, waiting)
            if state in (State.SUBSCRIBED, State.LINGERING):
                assert conn is not None, (ch, state)
                dropping = any(r.origin is None and r.payload[0] == b"sunsubscribe"
                               and r.payload[1] == ch.encode() for r in conn.replies)  # fmt: skip
                assert ch in conn.held or dropping, (ch, state, link)
        for link, conn in self.conns.items():
            awaited = m.awaiting(link)
            if not conn.tainted:
                assert list(awaited) == list(conn.unread), (link, awaited, list(conn.unread))
            for ch in conn.held:
                tracked = m.link_of(ch) == link and m.state_of(ch) in TRACKED
                undoing = any(ch in c.channels for c in awaited) or any(
                    ch in names for names in m._links[link].undo.values()
                )
                in_transit = any(isinstance(r.payload, list) and r.payload[1:2] == [ch.encode()]
                                 for r in conn.replies)  # fmt: skip
                assert tracked or undoing or in_transit, f"{ch} held at {link}, untracked"

    def teardown(self) -> None:
        try:
            self.settle()
            self.final_checks()
        finally:
            self.m.close()
            out = self.m.drain()
            for latch, ok in out.resolve:
                assert ok is False
                latch.set(ok)

    def settle(self) -> None:
        """The fault-free tail: everything flows until nothing changes."""
        self.faults.clear()
        self.unsub_faults.clear()
        self.view = dict(self.owner)
        self.refresh_wanted = False
        for _ in range(200):
            busy = False
            for link in sorted(self.opened - set(self.conns)):
                self.conns[link] = Conn(link)
                self.m.connected(link)
                self.apply()
                busy = True
            for link in self.writable():
                conn = self.conns[link]
                written = len(conn.unread)
                self.write_on(conn)
                busy = busy or len(conn.unread) > written
            for conn in list(self.conns.values()):
                while conn.inbox:
                    self.process(conn)
                    busy = True
                while conn.replies and self.conns.get(conn.link) is conn:
                    self.deliver(conn)
                    self.check()
                    busy = True
            if self.refresh_wanted:
                self.view = dict(self.owner)
                self.refresh_wanted = False
            if not busy and all(self.m.due(link, self.now) is None for link in self.conns):
                return
            self.now += RETRY_MAX
        raise AssertionError("the machine did not settle")

    def final_checks(self) -> None:
        m = self.m
        for ch in CHANNELS:
            state = m.state_of(ch)
            held_at = sorted(link for link, c in self.conns.items() if ch in c.held)
            if not self.wish[ch]:
                assert state is None, (ch, state)
                assert held_at == [], (ch, held_at)
                continue
            latch = m.confirmation(ch)
            assert latch is not None
            if ch in self.denied:
                assert state is State.DENIED and latch.value is False, (ch, state)
                reason = m.denied(ch)
                assert reason is not None and f"&{ch}" in reason, reason
                assert held_at == []
            elif ch in self.odd:
                assert state is State.FAILED and latch.value is False, (ch, state)
                assert held_at == []
            else:
                owner = self.owner[SLOT[ch]]
                assert state is State.SUBSCRIBED and latch.value is True, (ch, state)
                assert m.link_of(ch) == owner and held_at == [owner], (ch, m.link_of(ch), held_at)
                for box in self.wish[ch]:
                    lost = self.lost_at.get((box, ch))
                    if lost is not None:  # told again once the subscription was back
                        assert any(s > lost and it is RECHECK for s, it in box.items), (box, ch)
        assert m.channels() == {ch: len(b) for ch, b in self.wish.items() if b}
        for link in self.conns:
            assert m.awaiting(link) == ()
        # A message now reaches exactly the wanted mailboxes.
        for ch in CHANNELS:
            if self.wish[ch] and ch not in self.denied | self.odd:
                self.publish(ch)
        for conn in self.conns.values():
            while conn.replies:
                self.deliver(conn)


def _split(link: str) -> tuple[str, int]:
    host, _, port = link.rpartition(":")
    return host, int(port)


class UnshardedMachine(Machine):
    """The same on one plain server: SUBSCRIBE/UNSUBSCRIBE, no slots, no MOVED."""

    sharded = False


SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    database=None,
    derandomize=not _LONG,  # make test: the same runs every time
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# A failing run shrinks for minutes: let it finish and print its steps.
@pytest.mark.timeout(1200)
def test_subscription_machine_sharded() -> None:
    run_state_machine_as_test(Machine, settings=SETTINGS)


@pytest.mark.timeout(1200)
def test_subscription_machine_unsharded() -> None:
    run_state_machine_as_test(UnshardedMachine, settings=SETTINGS)


@pytest.mark.parametrize("sharded", [True, False])
def test_a_quiet_run_subscribes_and_unsubscribes(sharded: bool) -> None:
    """One scripted run without faults, as a readable example of the machine's API."""
    m: Subscriptions[Box, TLatch] = Subscriptions(
        TLatch, sharded=sharded, slot_of=SLOT.__getitem__, name="n"
    )
    box = Box("b")
    latch = m.subscribe("c0", box)
    assert list(m.unrouted) == ["c0"]
    m.route("c0", "main")
    out = m.drain()
    assert out.opened == ["main"] and not out.wake  # the link is not up yet
    m.connected("main")
    assert m.drain().wake == {"main"}
    sub = "SSUBSCRIBE" if sharded else "SUBSCRIBE"
    commands = m.take("main", 0.0)
    assert [c.args for c in commands] == [("CLIENT", "SETNAME", "n"), (sub, "c0")]
    assert m.reply("main", b"OK") is None
    assert m.reply("main", [sub.lower().encode(), b"c0", 1]) is None
    assert m.drain().resolve == [(latch, True)]
    msg = b"smessage" if sharded else b"message"
    assert list(m.reply("main", [msg, b"c0", b"data"]) or ()) == [box]
    m.unsubscribe("c0", box, 1.0)
    assert m.state_of("c0") is State.LINGERING and m.take("main", 1.0) == []
    assert m.due("main", 1.0) == pytest.approx(LINGER)
    (unsub,) = m.take("main", 1.0 + LINGER)
    assert unsub.args == (f"{sub[:-9]}UNSUBSCRIBE", "c0")
    assert m.reply("main", [unsub.args[0].lower().encode(), b"c0", 0]) is None
    assert m.channels() == {} and m.awaiting("main") == ()


def _sharded() -> Subscriptions[Box, TLatch]:
    return Subscriptions(TLatch, sharded=True, slot_of=SLOT.__getitem__)


def test_a_retry_wakes_the_writer_when_it_is_due() -> None:
    """TRYAGAIN resolves the latch False and sets a timer the link's writer is woken for
    (the hub before this machine recorded the retry and left its writer asleep)."""
    m = _sharded()
    box = Box("b")
    latch = m.subscribe("c0", box)
    m.route("c0", "n1:1")
    m.connected("n1:1")
    (cmd,) = m.take("n1:1", 0.0)
    m.drain()
    m.error("n1:1", ErrorKind.TRYAGAIN, "Multiple keys request during rehashing of slot", 0.0)
    out = m.drain()
    assert out.resolve == [(latch, False)] and out.wake == {"n1:1"}
    assert m.state_of("c0") is State.RETRYING and m.due("n1:1", 0.0) == pytest.approx(0.1)
    assert m.take("n1:1", 0.05) == []
    (again,) = m.take("n1:1", 0.1)
    assert again.args == cmd.args
    fresh = m.confirmation("c0")
    assert fresh is not latch and fresh is not None and fresh.value is None
    m.reply("n1:1", [b"ssubscribe", b"c0", 1])
    out = m.drain()
    assert out.resolve == [(fresh, True)] and out.recheck == [box]  # it stopped waiting


def test_a_slot_moves_under_our_own_unsubscribe() -> None:
    """Our SUNSUBSCRIBE of c0 is on its way when c0's slot leaves the node: the node's own
    sunsubscribe stands in for our ack, and the MOVED that then answers our command finds no
    command of its slot awaiting and is ignored; the next command's ack still matches it."""
    m = _sharded()
    box, other = Box("b"), Box("o")
    m.subscribe("c0", box)
    m.route("c0", "n1:1")
    m.connected("n1:1")
    m.take("n1:1", 0.0)
    m.reply("n1:1", [b"ssubscribe", b"c0", 1])
    m.unsubscribe("c0", box, 0.0)
    (unsub,) = m.take("n1:1", 1.0)
    assert unsub.args == ("SUNSUBSCRIBE", "c0")
    m.subscribe("c2", other)  # another slot, same node, written right behind it
    m.route("c2", "n1:1")
    (sub,) = m.take("n1:1", 1.0)
    m.drain()
    m.reply("n1:1", [b"sunsubscribe", b"c0", 0])  # the node's own, at the slot move
    assert m.state_of("c0") is None and m.awaiting("n1:1") == (sub,)
    m.error("n1:1", ErrorKind.MOVED, "0 n2:2", 1.0, (0, "n2", 2))  # our command's answer
    assert m.awaiting("n1:1") == (sub,) and not m.drain().drop
    m.reply("n1:1", [b"ssubscribe", b"c2", 1])
    assert m.state_of("c2") is State.SUBSCRIBED and m.reconnects == 0


def test_an_ack_no_command_awaits_drops_the_connection() -> None:
    """A desynchronised stream costs a reconnect, never a wrong confirmation: every waiting
    mailbox is told, and the channel is subscribed again on the next connection."""
    m = _sharded()
    box = Box("b")
    latch = m.subscribe("c0", box)
    m.route("c0", "n1:1")
    m.connected("n1:1")
    m.take("n1:1", 0.0)
    m.drain()
    m.reply("n1:1", [b"ssubscribe", b"c1", 1])
    out = m.drain()
    assert "n1:1" in out.drop and out.recheck == [box] and latch.value is None
    assert m.state_of("c0") is State.QUEUED and m.reconnects == 1
    m.lost("n1:1")  # the carrier's reader, once it saw the connection end: nothing more
    assert m.reconnects == 1 and not m.drain()
    m.connected("n1:1")
    assert [c.args for c in m.take("n1:1", 0.0)] == [("SSUBSCRIBE", "c0")]


@pytest.mark.parametrize("comes_back", [False, True])
def test_moved_answers_our_unsubscribe(comes_back: bool) -> None:
    """Our SUNSUBSCRIBE meets MOVED (the slot left the node, whose own sunsubscribe came
    while another command was awaited): the node holds nothing of it, so it is forgotten, or
    routed afresh if a follower came meanwhile."""
    m = _sharded()
    box = Box("b")
    m.subscribe("c0", box)
    m.route("c0", "n1:1")
    m.connected("n1:1")
    m.take("n1:1", 0.0)
    m.reply("n1:1", [b"ssubscribe", b"c0", 1])
    m.unsubscribe("c0", box, 0.0)
    m.silent("n1:1", heard=True)  # a PING goes first, then our unsubscribe
    ping, unsub = m.take("n1:1", 1.0)
    assert ping.op is Op.PING and unsub.args == ("SUNSUBSCRIBE", "c0")
    m.reply("n1:1", [b"sunsubscribe", b"c0", 0])  # the node's own: not our head's
    assert m.state_of("c0") is State.UNSUBSCRIBING
    m.reply("n1:1", [b"pong", b""])
    late = Box("late")
    if comes_back:
        latch = m.subscribe("c0", late)
    m.drain()
    m.error("n1:1", ErrorKind.MOVED, "0 n2:2", 1.0, (0, "n2", 2))
    assert m.awaiting("n1:1") == () and not m.drain().drop
    if comes_back:
        assert m.state_of("c0") is State.UNROUTED and m.confirmation("c0") is latch
        assert latch.value is None
    else:
        assert m.state_of("c0") is None
