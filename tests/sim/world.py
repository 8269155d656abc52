"""The simulated world: processes running dedupe's real machines, a network, one Redis.

What runs is the package's own code: every caller steps the real call machine
(``call.run_call``, in its sync or its asyncio mode, and ``run_shared_flight`` for asyncio's
flight task), a caller that reads before any flight the real ``call.read_first``,
``drivers.base.read_found`` and ``call.read_failed`` (``ReadFirst``, as the drivers' call
with ``first``), every flight the real ``protocol.run_flight``, every lease sits in the real
``leases.LeaseBook`` of its process's renewer, scripts are built and replies parsed by the
real driver code (``DriverBase.script_for``, ``reply_of``, ``failed``), and the real Lua
scripts run in a simulated Redis (``redis.py``). The simulator carries their commands, as
the drivers do, through a world where every step of a schedule is one event.

Nothing here runs on its own: every step is applied by ``schedule.apply``, and time moves
only in ``World.advance``. True time is an integer count of microseconds; the store's clock
is true time plus an offset (a restart may move it), and each process's monotonic clock is
``base + true * (1 + drift)`` with ``|drift| <= max_drift``. A paused process keeps its
clock running but handles nothing: what reaches it waits in its inbox until it resumes.

The world holds, beside the processes:
- a network of requests, replies and pub/sub messages in transit; a step delivers, drops
  or duplicates one. A dropped request never ran; a dropped reply ran; either way the
  client gives up after ``socket_timeout`` on its own clock and, within the command's bound
  (``wire.retry_left``), tries once more on a fresh connection, as dedupe's wire does;
- a client-side queue per process (its command slots): while a process is clogged, its
  commands wait there before they are written (stamped then, as the wire stamps them);
- a two-node Cluster for key k1: its slot can migrate between nodes A and B (open, move one
  key, close), with MOVED, ASK (ASKING) and TRYAGAIN as Redis answers them; the drivers'
  scripts are re-sent as redis-py's cluster client and dedupe's migration pauses do, and
  renewals follow redirections as ``renewal._redirect`` decides;
- a key writer that writes genuine records captured earlier back into result keys, and one
  that forges records and messages; a publisher that replays genuine messages;
- requests refused with an error reply instead of run (a READ as an ACL without MGET refuses
  it: ReadRefused; any other command as a loading server does: BackendUnavailable), and
  asyncio callers cancelled where they await (their flight's entry, or their read);
- asyncio's parked followers: while a flight task's flight waits for its channel's message it
  holds no task (aio's ``_Driver.park``), ``Entry.task`` is what stands in for it
  (``ParkedFlight``: done, cancel), the message steps the flight in the hub's callback before
  its callers run (``step_ahead``), and a Cancel reaches whichever is the entry's task now.

Invariants (``KINDS``), checked as things happen and after every step:
- no caller returns an outcome of a lease older than the one its flight waited on or it
  joined (older-outcome); one that drove its own flight gets none older than a lease granted
  before it started, unless its own leader made it (stale-outcome); no outcome is stored or
  published after a newer lease was granted (stale-record, stale-publish);
- a live lock is never replaced, and fencing tokens strictly grow per key, across restarts
  (lock-overwrite, token-order);
- when a lease is granted, every older leader still running its function knows its lease is
  lost, by its own clock, unless a Redis restart dropped the lock (unaware-leader);
- a lease is never dated from before its acquire was written (lease-dated-early);
- a running leader's lock never lapses while its process was healthy and its renewer got an
  answer to every renewal it sent (lapsed-lease): so a lease is never abandoned, and a slot
  migration does not cost it;
- once the faults stop, no lock is left held for a flight that gave up on its acquire
  without leading (orphaned-lease): waiters must not wait out a lease nobody runs;
- the protocol never waits past the lease bound; a caller with a wait_timeout ends within
  it plus one subscribe and one round trip, pauses not counted; after the faults stop, every
  call ends (unbounded-wait, missed-deadline, stuck-call);
- no key lives without a TTL or longer than its bound (ttl);
- with cache fill (``Params.cache``: stale_while_revalidate, stale_if_error, error_backoff on
  every flight; a refresh is handed to the background at ``Serve``): a value served stale is
  one some lease's complete stored (stale-unstored); a caller that drove its own flight is
  never served stale a value older than one stored before it started (stale-regress); a
  refresh is granted only while no other refresh of the key runs unaware that its lease is
  lost (double-refresh);
- with batches (``Params.batches``: "batch" steps run the real batch machine,
  ``batch.run_batch_call``, sync and asyncio, over 2-3 of three keys; each item's scripts
  are requests of their own, the items a batch leads run by one job): every check above
  holds for each item as a caller of its own, and no batch waits for a message of a key
  whose lock is held by an item another batch leads, while that one waits (through others)
  on it (batch-deadlock);
- a plain read's hit (a flight's Read, or a caller's read before any flight) serves a value
  a lease stored, fresh by the server's clock when the read ran (its grant plus its keep),
  and current then: no newer lease granted on the key (stale-hit); the callers who joined a
  read get its value, or start over (stuck-call otherwise);
- an asyncio caller that stops waiting (cancelled, or at its wait_timeout) never cancels its
  process's flight while another caller still awaits it (cancel-spread): it stops alone.

Not modelled: on_backend_error="local", local copies, the real hub (its subscription
machine has a state-machine test of its own), TIME going backwards, the asyncio driver's own
code (its park, unpark and step_ahead run in tests/test_asyncio_wake.py against a real
server; here their protocol is modelled), a sync caller interrupted mid-read. The network is
harsher than TCP: it may reorder messages of one pub/sub connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import importlib
import itertools
import math
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import (
    AskError,
    BusyLoadingError,
    MovedError,
    ResponseError,
    TryAgainError,
)

from .redis import ScriptError, SimRedis

__all__ = ["KINDS", "US", "Params", "Violation", "World"]

KINDS = frozenset(
    {
        "older-outcome",  # a caller got an outcome older than the lease it waited on or joined
        "stale-outcome",  # a caller that drove its flight got one older than a lease granted before
        "stale-record",  # an outcome stored after a newer lease was granted
        "stale-publish",  # ... or published
        "token-order",  # fencing tokens did not strictly grow (across restarts too)
        "lock-overwrite",  # a live lock was replaced
        "unaware-leader",  # a new lease was granted while the old leader thought it still led
        "lease-dated-early",  # a lease dated from before its acquire was written
        "lapsed-lease",  # a lock lapsed under a healthy leader whose renewals were answered
        "orphaned-lease",  # a lock left held for a flight that gave up before leading
        "missed-deadline",  # a caller waited past its wait_timeout (plus one round trip)
        "unbounded-wait",  # the protocol asked for a wait longer than the lease allows
        "stuck-call",  # after the faults stopped, a call never ended
        "ttl",  # a key with no expiry or one longer than its bound
        "stale-unstored",  # a stale value served that no lease's complete stored
        "stale-regress",  # a stale value older than one stored before the caller started
        "double-refresh",  # a refresh granted while another of the key still runs, unaware
        "batch-deadlock",  # batches that wait on each other's led items (a cycle)
        "stale-hit",  # a read served a value that was not fresh and current when it ran
        "cancel-spread",  # a caller's cancel cancelled a flight other callers still await
        "unexpected-error",  # a caller raised what no documented fault explains
        "wrong-key",
        "script-error",
        "unknown-command",
    }
)

US = 1_000_000
_VALUE = re.compile(r"^(k\d+)@(\d+)#(\d+)$")
CLUSTER_KEY = "k1"  # the key whose slot lives on the two-node Cluster (A, B)
_RENEWAL_LATENCY_US = 1000  # a renewal's request or reply, unless a fault gets it first


class Violation(Exception):
    """An invariant failed; ``kind`` names it (shrinking keeps the kind)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass
class Params:
    """The simulated deployment (times scaled down from the defaults, same ratios)."""

    procs: int = 3
    keys: int = 2
    lock_ttl_ms: int = 3000
    result_ttl_ms: int = 1000
    grace_ms: int = 3600  # the api's lock_ttl + 2 s, scaled
    token_ttl_ms: int = 10_000
    socket_timeout: float = 1.5
    connect_timeout: float = 0.6  # with socket_timeout: a command's bound, its retry included
    confirm_timeout: float = 3.0  # the backend's connect_timeout + socket_timeout
    queue_timeout: float = 6.0  # longest wait for a command slot (the client-side queue)
    # The clock-skew bound: each process's clock runs within +-4 % of the store's rate. A
    # clock-deciding renewer gives a lease up 5 % early (leases.lease_margin), which covers it.
    max_drift: float = 0.04
    secret: bytes = b"sim-secret"
    max_hold_ms: int = 20_000  # where the code has max_hold (the default 300 s, scaled)
    # Cache fill (issue 20): every flight serves stale values for stale_ms past result_ttl
    # and refreshes in the background (stale_while_revalidate), serves them in place of a
    # failed run's error for error_ms (stale_if_error) and then backs off for backoff_ms.
    cache: bool = False
    stale_ms: int = 2000
    error_ms: int = 4000
    backoff_ms: int = 1000
    # Batches (issue 22): "batch" steps start a batch call (the real batch machine) over 2-3
    # keys beside the single-key calls; with batches the world has three keys.
    batches: bool = False
    # Issue 23: single-key flights read a kept value with plain MGET and TIME before the
    # acquire script, while their reads hit (protocol.Reads). False: the script alone (the
    # schedules recorded before the read replay as they were written).
    reads: bool = True
    # The share of random single-key calls that read before any flight (the drivers' call
    # with first=True: no Served, no events wanted), with Params.reads.
    read_first: float = 0.5
    # Faults of the read's era: requests refused with an error reply ("refuse" steps) and
    # asyncio callers cancelled ("cancel" steps). Off (with read_first 0), schedules are
    # drawn as before them, step for step (the older mutants' searches).
    refusals: bool = True
    cancels: bool = True

    def __post_init__(self) -> None:
        if self.batches and self.keys == 2:
            self.keys = 3


class Api:
    """The package under test, imported by name so ``--package`` can point at any checkout."""

    def __init__(self) -> None:
        imp = importlib.import_module
        self.protocol = imp("dedupe.core.protocol")
        self.call = imp("dedupe.core.call")
        self.commands = imp("dedupe.backend.commands")
        self.envelope = _first(imp, "dedupe.core.sealing", "dedupe.envelope")  # Outcome, Codec
        self.serializers = _first(imp, "dedupe.core.serializers", "dedupe.envelope")
        self.errors = imp("dedupe.errors")
        self.keys = imp("dedupe.core.keys")
        self.base = imp("dedupe.drivers.base")
        self.leases = imp("dedupe.core.leases")
        self.inflight = imp("dedupe.core.inflight")
        self.wire = imp("dedupe.backend.wire")
        try:
            self.batch: Any = imp("dedupe.core.batch")
        except ImportError:  # a checkout from before batches (--package)
            self.batch = None
        self.renewal = imp("dedupe.backend.renewal")
        self.scripts = [
            v for v in vars(self.commands).values() if isinstance(v, self.commands.Script)
        ]
        self.script_names = {
            v.sha: name
            for name, v in vars(self.commands).items()
            if isinstance(v, self.commands.Script)
        }
        terms = getattr(self.protocol, "FlightTerms", None)  # a function's, shared by specs
        if terms is not None:
            spec_fields = set(terms._fields)
        else:  # a checkout from before FlightTerms: FlightSpec was a dataclass of them all
            spec_fields = {f.name for f in dataclasses.fields(self.protocol.FlightSpec)}
        self.result_ttl_field = "keep_ms" if "keep_ms" in spec_fields else "result_ttl_ms"
        # Planted defects (tests of the simulator itself): what to do instead of the real code.
        self.blind_renewer = False  # the renewer learns of a loss only from a failed renewal


def _first(imp: Callable[[str], Any], *names: str) -> Any:
    for name in names:
        try:
            return imp(name)
        except ImportError:
            continue
    raise ImportError(names[0])


# --- bits of the world --------------------------------------------------------------------


@dataclass(eq=False)
class Timer:
    proc: Proc | None
    epoch: int
    fn: Callable[[], None]
    label: str
    cancelled: bool = False


@dataclass(eq=False)
class Item:
    """Something in transit: a request to Redis, its reply, or a pub/sub message."""

    seq: int
    kind: str  # "req", "reply", "msg"
    proc: Proc
    epoch: int
    label: str
    deliver: Callable[[], None]
    lease: Any = None  # a renewal's: dropping it is a fault of that lease
    req: Request | None = None  # a request's: what a refusal answers


@dataclass(eq=False)
class Request:
    proc: Proc
    epoch: int
    label: str
    run: Callable[[], Any]  # executes at Redis, returns the raw reply (or raises)
    on_reply: Callable[[Any, BaseException | None], None]
    timeout: float  # seconds on the process's clock, from the write
    answered: bool = False
    timer: Timer | None = None
    on_sent: Callable[[], None] | None = None
    queued_at: float = 0.0
    lease: Any = None


@dataclass(eq=False)
class Caller:
    id: int
    proc: Proc
    epoch: int
    key: str
    mode: str  # "sync" or "async": the call machine's mode
    start_us: int
    deadline: float | None  # on its process's clock
    ref_start: int  # the newest lease granted on the key before it started
    paused_at_start: float
    seen: int = 0  # the newest lease its flight saw (joiners: what the flight saw when joining)
    joined: bool = False
    own_token: int = 0  # the lease of the process's flight it drove or joined, if that one led
    ref_value: int = 0  # the newest value a lease stored on the key before it started
    done: bool = False
    result: str = ""
    batch: Any = None  # the BatchRun of a batch call's item
    run: Any = None  # what steps it now (ReadFirst, CallRun): a cancel goes there
    cancelled: bool = False  # asyncio: its task was cancelled (the "cancel" step)


@dataclass(eq=False)
class Job:
    proc: Proc
    epoch: int
    flight: FlightRun
    token: int
    seq: int
    lead: Any = None  # a batch's one run of the function for the items it leads (BatchRun)


class Hub:
    """One process's pub/sub hub stand-in: channel -> mailboxes, subscribed at one node."""

    def __init__(self, world: World, proc: Proc) -> None:
        self.world, self.proc = world, proc
        self.channels: dict[str, list[list[object]]] = {}
        self.confirmed: dict[str, bool] = {}
        self.waiters: dict[str, list[Callable[[bool], None]]] = {}

    def subscribe(self, channel: str, mailbox: list[object]) -> None:
        boxes = self.channels.setdefault(channel, [])
        boxes.append(mailbox)
        if len(boxes) == 1:
            self.confirmed[channel] = False
            self._send(channel)

    def _send(self, channel: str) -> None:
        w, p, epoch = self.world, self.proc, self.proc.epoch
        node = w.node_of(p, channel)

        def run() -> Any:
            if p.epoch == epoch:  # a dead process's late SUBSCRIBE subscribes nobody
                w.subs.setdefault((node, channel), set()).add(p)
            return 1

        def ack(_: Any, error: BaseException | None) -> None:
            if error is None and channel in self.channels:
                self.confirmed[channel] = True
                for wake in self.waiters.pop(channel, []):
                    wake(True)

        w.request(p, f"SUBSCRIBE {w.short(channel)}@{node}", run, ack, timeout=None)

    def unsubscribe(self, channel: str, mailbox: list[object]) -> None:
        boxes = self.channels.get(channel)
        if boxes is None or mailbox not in boxes:
            return
        boxes.remove(mailbox)
        if not boxes:
            del self.channels[channel]
            self.confirmed.pop(channel, None)
            for (_, ch), subs in self.world.subs.items():
                if ch == channel:
                    subs.discard(self.proc)

    def reconnect(self, only: str | None = None) -> None:
        """The connection dropped (or the slot moved): re-subscribe, every waiter re-checks."""
        recheck = self.world.api.protocol.RECHECK
        for channel, boxes in list(self.channels.items()):
            if only is not None and channel != only:
                continue
            for (_, ch), subs in self.world.subs.items():
                if ch == channel:
                    subs.discard(self.proc)
            self.confirmed[channel] = False
            self._send(channel)
            for box in list(boxes):
                self.world.put(self.proc, box, recheck)

    def message(self, channel: str, data: bytes) -> None:
        for box in list(self.channels.get(channel, [])):
            self.world.put(self.proc, box, data)


class Env:
    """What the call machine reads of its process (the CallEnv): no local copies, and no
    local fallback (on_backend_error="raise")."""

    local_copies = None
    codec: Any = None  # the backend's codec (drivers.base.read_found reads it)

    def skip_redis(self) -> bool:
        return False

    def fall_back(self, exc: Exception) -> bool:
        return False

    def answered(self) -> None:
        pass


class Proc:
    """One simulated process (an incarnation: a kill starts a fresh one in the slot)."""

    def __init__(self, world: World, idx: int, drift: float, base_us: int) -> None:
        self.world, self.idx = world, idx
        self.epoch = 0
        self.drift, self.base_us = drift, base_us
        self.paused_until: int | None = None
        self.partitioned = False
        self.clogged = False  # its commands wait in its client-side queue (command slots)
        self.inbox_net: list[Callable[[], None]] = []
        self.inbox_timers: list[Callable[[], None]] = []
        self.flights = 0
        self.paused_total = 0.0  # seconds of its clock spent paused
        self.env = Env()
        self.env.codec = world.codec
        self.reset()

    def reset(self) -> None:
        api = self.world.api
        self.sync_table = api.inflight.InFlight()
        self.async_table = api.inflight.InFlight()
        self.hub = Hub(self.world, self)
        self.renewer = SimRenewer(self.world, self)
        self.outbox: list[Request] = []
        self.cluster_view = "A"  # where its cluster client believes k1's slot lives
        self.faulted_since = -(10**15)  # true us of the last fault that touched this process
        self.starved_until = 0  # true us until which its renewer thread cannot run

    def clock(self) -> float:
        return (self.base_us + self.world.now_us * (1 + self.drift)) / US

    def true_us(self, at: float) -> int:
        """The first true microsecond at which this clock reads ``at`` or later."""
        return math.ceil((at * US - self.base_us) / (1 + self.drift) - 1e-6)

    def name(self) -> str:
        return f"p{self.idx}" + (f"'{self.epoch}" if self.epoch else "")


@dataclass
class Slot:
    """k1's slot on the two-node Cluster."""

    owner: str = "A"
    migrating: tuple[str, str] | None = None  # (source, target) while open


# --- the world ----------------------------------------------------------------------------


class World:
    def __init__(self, params: Params, api: Api, drifts: list[float], trace: bool = False) -> None:
        self.p, self.api = params, api
        self.now_us = 0
        self.redis = SimRedis(lambda: self.now_us, self._publish)
        self.redis.offset_us = 1_700_000_000 * US
        for script in api.scripts:
            self.redis.load(script.lua)
        self.redis.on_set = self._on_set
        self.redis.on_expire = self._on_expire
        self.subs: dict[tuple[str, str], set[Proc]] = {}
        self.net: list[Item] = []
        self.timers: list[tuple[int, int, Timer]] = []
        self.seq = itertools.count()
        self.ready: deque[Callable[[], None]] = deque()  # wake-ups to run after this event
        self.callers: list[Caller] = []
        self.jobs: list[Job] = []
        self.published: list[tuple[str, bytes]] = []
        self.stored: list[tuple[bytes, bytes, int]] = []  # genuine records written: key, value, px
        self.max_token: dict[str, int] = {}  # newest lease granted per key, across restarts
        self.reads: dict[tuple[str, str], Any] = {}  # (process, key) -> its protocol.Reads
        # Each READ's reply (by id, kept alive here) -> the newest lease granted on its key
        # when it ran: what a hit it makes must not be older than (check_hit).
        self.read_facts: dict[int, tuple[Any, int]] = {}
        # Value records the scripts stored, per key (tokens): what a stale value may be.
        self.values: dict[str, set[int]] = {}
        self.grants: dict[tuple[str, int], int] = {}  # (key, token) -> Redis restarts by then
        self.leases: list[SimLease] = []
        self.faults = 0
        self.ids = itertools.count(1)
        self.codec = api.envelope.Codec(api.serializers.PICKLE, secret=params.secret)
        self.names = {f"k{i}": api.keys.names_for("sim", f"k{i}") for i in range(params.keys)}
        self.by_channel = {n.channel: k for k, n in self.names.items()}
        self.by_lock = {n.lock.encode(): k for k, n in self.names.items()}
        self.by_result = {n.result.encode(): k for k, n in self.names.items()}
        self.slot = Slot()
        if CLUSTER_KEY in self.names:
            n = self.names[CLUSTER_KEY]
            self.redis.tracked = {x.encode() for x in (n.lock, n.token, n.result)}
        self.procs = [Proc(self, i, drifts[i], 10_000 * US * (i + 1)) for i in range(params.procs)]
        self.flight_by_entry: dict[int, FlightRun] = {}
        self.flight_by_owner: dict[str, FlightRun] = {}
        self.batches: list[BatchRun] = []  # batch calls and their background parts
        self.trace = trace
        self.ignored: frozenset[str] = frozenset()
        self.lines: list[str] = []
        self.quiet = False  # the faults are over (the drain)

    # --- plumbing -------------------------------------------------------------------------

    def short(self, channel: str) -> str:
        return self.by_channel.get(channel, channel)

    def log(self, text: str) -> None:
        if self.trace:
            self.lines.append(f"    {self.now_us / 1000:10.3f} ms  {text}")

    def run_on(self, proc: Proc, epoch: int, fn: Callable[[], None], *, net: bool) -> None:
        """Run fn on the process now, or when it resumes; never on a later incarnation."""
        if proc.epoch != epoch:
            return
        if proc.paused_until is not None:
            (proc.inbox_net if net else proc.inbox_timers).append(fn)
            return
        fn()

    def soon(self, fn: Callable[[], None]) -> None:
        """Run fn once the current event is handled (a thread or task woken now)."""
        self.ready.append(fn)

    def settle(self) -> None:
        """Run the wake-ups the last event caused (and theirs), in order."""
        while self.ready:
            self.ready.popleft()()

    def at(self, proc: Proc | None, when: float, fn: Callable[[], None], label: str) -> Timer:
        """A timer at ``when`` on proc's clock (true microseconds for proc None)."""
        timer = Timer(proc, proc.epoch if proc else 0, fn, label)
        true = proc.true_us(when) if proc is not None else int(when)
        heapq.heappush(self.timers, (max(true, self.now_us), next(self.seq), timer))
        return timer

    def put(self, proc: Proc, box: list[object], item: object) -> None:
        box.append(item)
        waker = getattr(box, "waker", None)
        if waker is not None:
            box.waker = None  # type: ignore[attr-defined]
            waker()

    def request(
        self,
        proc: Proc,
        label: str,
        run: Callable[[], Any],
        on_reply: Callable[[Any, BaseException | None], None],
        *,
        timeout: float | None = -1.0,
        on_sent: Callable[[], None] | None = None,
        queued: bool = False,
        lease: Any = None,
        deadline: float | None = None,
    ) -> Request:
        """Send a request (timeout -1: socket_timeout; None: none). ``queued``: it goes
        through the process's command slots, which hold it while the process is clogged, at
        most queue_timeout and not past ``deadline`` (a caller's wait_timeout: WaitTimeout),
        as Backend._take_sync_slot does."""
        req = Request(proc, proc.epoch, label, run, on_reply,
                      self.p.socket_timeout if timeout == -1.0 else (timeout or 0.0),
                      on_sent=on_sent, lease=lease)  # fmt: skip
        if queued and proc.clogged:
            req.queued_at = proc.clock()
            proc.outbox.append(req)

            limit = self.p.queue_timeout
            if deadline is not None:
                limit = min(limit, max(0.0, deadline - proc.clock()))
            errors = self.api.errors

            def give_up() -> None:
                if req in proc.outbox and not req.answered:
                    proc.outbox.remove(req)
                    req.answered = True
                    self.log(f"{proc.name()}: no command slot for {label} in {limit:.3f}s")
                    on_reply(None, errors.WaitTimeout("sim: no slot by the deadline")
                             if limit < self.p.queue_timeout
                             else errors.BackendUnavailable("sim: no command slot"))  # fmt: skip

            self.at(proc, proc.clock() + limit, give_up, "queue timeout")
            return req
        self._write(req, timed=timeout is not None)
        return req

    def _write(self, req: Request, *, timed: bool = True) -> None:
        """The request leaves the client: stamped, timed out after its timeout, in transit."""
        proc = req.proc
        if req.on_sent is not None:
            req.on_sent()
        if timed:

            def expire() -> None:
                if not req.answered:
                    req.answered = True
                    self.log(f"{proc.name()}: no reply to {req.label} in {req.timeout:.3f}s")
                    req.on_reply(None, TimeoutError(f"sim: no reply within {req.timeout:.3f}s"))

            req.timer = self.at(proc, proc.clock() + req.timeout, expire, "timeout")
        self._send(Item(next(self.seq), "req", proc, proc.epoch, req.label,
                        lambda: self._execute(req), req.lease, req))  # fmt: skip

    def send_queued(self, proc: Proc, n: int | None) -> str:
        """Write the n-th queued command of proc (None: all of them)."""
        if not proc.outbox:
            return "nothing queued"
        picked = list(proc.outbox) if n is None else [proc.outbox[n % len(proc.outbox)]]
        for req in picked:
            proc.outbox.remove(req)
            if not req.answered:
                self._write(req)
        return f"{proc.name()} wrote {', '.join(r.label for r in picked)}"

    def _send(self, item: Item) -> None:
        self.net.append(item)
        if item.lease is not None:
            # Renewals travel on the renewer's own connection and arrive within a
            # millisecond unless the schedule drops, duplicates or partitions them first.
            self.at(None, self.now_us + _RENEWAL_LATENCY_US, lambda: self._arrive(item),
                    "renewal latency")  # fmt: skip

    def _arrive(self, item: Item) -> None:
        if item in self.net and not item.proc.partitioned:
            self.net.remove(item)
            self.log(f"arrives: {item.label}")
            item.deliver()

    def _execute(self, req: Request, refused: BaseException | None = None) -> None:
        """A request reaches Redis: run it (even for a process that died since), reply; or,
        ``refused``, do not run it and reply that error."""
        if refused is not None:
            raw, error = None, refused
            self.log(f"redis refused {req.label} for {req.proc.name()} -> {_show(raw, error)}")
        else:
            try:
                raw, error = req.run(), None
            except (ScriptError, ResponseError) as exc:
                raw, error = None, exc
            self.log(f"redis ran {req.label} for {req.proc.name()} -> {_show(raw, error)}")

        def reply() -> None:
            def got() -> None:
                if not req.answered:
                    req.answered = True
                    if req.timer is not None:
                        req.timer.cancelled = True
                    req.on_reply(raw, error)

            self.run_on(req.proc, req.epoch, got, net=True)

        self._send(Item(next(self.seq), "reply", req.proc, req.epoch, f"reply {req.label}",
                        reply, req.lease))  # fmt: skip

    def _publish(self, channel: bytes, data: bytes) -> int:
        ch = channel.decode()
        self.published.append((ch, data))
        self._check_publish(ch, data)
        receivers = list(self.subs.get((self.redis.node, ch), ()))
        for proc in receivers:
            self._send_message(proc, ch, data)
        return len(receivers)

    def _send_message(self, proc: Proc, ch: str, data: bytes) -> None:
        epoch = proc.epoch

        def deliver() -> None:
            self.run_on(proc, epoch, lambda: proc.hub.message(ch, data), net=True)

        label = f"msg {self.short(ch)} {_brief(data)} to {proc.name()}"
        self._send(Item(next(self.seq), "msg", proc, epoch, label, deliver))

    # --- the Cluster of k1 ------------------------------------------------------------------

    def node_of(self, proc: Proc, name: str) -> str:
        """The node proc's client sends a command on ``name`` (a key or channel) to."""
        if self.by_channel.get(name) == CLUSTER_KEY or self._key_of(name.encode()) == CLUSTER_KEY:
            return proc.cluster_view
        return "A"

    def at_node(self, node: str, keys: list[bytes], asking: bool, run: Callable[[], Any]) -> Any:
        """Run a command at ``node`` as Redis Cluster would: MOVED, ASK or TRYAGAIN for a
        slot that is elsewhere or in migration."""
        if not any(k in self.redis.tracked for k in keys):
            self.redis.node = "A"
            return run()
        slot = self.slot
        present = [k for k in keys if self.redis.get_at(k, node) is not None]
        if slot.migrating is None:
            if node != slot.owner:
                raise MovedError(f"1 {slot.owner}:1")
        else:
            src, dst = slot.migrating
            if node == src:
                if len(present) != len(keys):
                    if present:
                        raise TryAgainError("Multiple keys request during rehashing of slot")
                    raise AskError(f"1 {dst}:1")
            elif node == dst and asking:
                if len(keys) > 1 and len(present) != len(keys):
                    raise TryAgainError("Multiple keys request during rehashing of slot")
            else:
                raise MovedError(f"1 {src}:1")
        self.redis.node = node
        try:
            return run()
        finally:
            self.redis.node = "A"

    def migrate(self, op: str) -> str:
        """k1's slot: open a migration to the other node, move one key, or close it."""
        slot = self.slot
        tracked = sorted(self.redis.tracked)
        if op == "open":
            if slot.migrating is not None:
                return "a migration is open already"
            other = "B" if slot.owner == "A" else "A"
            slot.migrating = (slot.owner, other)
            return f"k1's slot MIGRATING {slot.owner} -> {other}"
        if slot.migrating is None:
            return "no migration open"
        src, dst = slot.migrating
        if op == "move":
            for key in tracked:
                if self.redis.get_at(key, src) is not None:
                    self.redis.move(key, dst)
                    return f"moved {key.decode()} to {dst}"
            return "nothing left to move"
        for key in tracked:  # close: the rest moves, then the slot is the target's
            if self.redis.get_at(key, src) is not None:
                self.redis.move(key, dst)
        slot.owner, slot.migrating = dst, None
        channel = self.names[CLUSTER_KEY].channel
        # The source drops its shard subscribers of the slot (an unsolicited sunsubscribe):
        # their hubs re-subscribe at the new owner, and every waiter re-checks.
        for proc in list(self.subs.get((src, channel), ())):
            self.subs[(src, channel)].discard(proc)
            epoch = proc.epoch

            def moved(proc: Proc = proc) -> None:
                proc.cluster_view = dst
                proc.hub.reconnect(channel)

            self._send(Item(next(self.seq), "msg", proc, epoch, f"sunsubscribe k1 to {proc.name()}",
                            lambda proc=proc, epoch=epoch, moved=moved: self.run_on(
                                proc, epoch, moved, net=True)))  # fmt: skip
        return f"k1's slot now lives on {dst}"

    # --- scripts ------------------------------------------------------------------------------

    def script(
        self,
        proc: Proc,
        sc: Any,
        on_reply: Callable[[Any, BaseException | None], None],
        *,
        stamp: Any = None,
        queued: bool = True,
        deadline: float | None = None,
    ) -> None:
        """Run a script as a driver does: through the command slots, the wire's one retry
        within the command's bound, and (for k1) the cluster client's redirections and
        dedupe's pauses through an open migration."""
        keys = [_enc(k) for k in sc.keys]
        args = [_enc(a) for a in sc.args]
        name = self.api.script_names.get(sc.script.sha, "SCRIPT")
        key = self._key_of(keys[0])
        bound = self.p.connect_timeout + self.p.socket_timeout
        state: dict[str, Any] = {"asking": "", "retried": False, "first": 0.0, "retry_left": 0.0,
                                 "tryagain_until": 0.0, "pause": 0.02}  # fmt: skip

        def run_at(node: str, asking: bool) -> Any:
            def run() -> Any:
                raw = self.redis.evalsha(sc.script.sha, keys, args)
                if name == "ACQUIRE":
                    granted = _granted_token(raw)
                    if granted:
                        refresh = isinstance(raw, list) and raw[0] == 3
                        self._granted(key, granted, proc, refresh=refresh)
                if name == "COMPLETE" or name == "COMPLETE_SHARDED":
                    self._completed(key, args)
                if name == "READ":
                    self.read_facts[id(raw)] = (raw, self.max_token.get(key, 0))
                return raw

            return self.at_node(node, keys, asking, run)

        def send() -> None:
            node = state["asking"] or self.node_of(proc, keys[0].decode())
            asking = bool(state["asking"])
            label = f"{name} {key}" + (f"@{node}" if key == CLUSTER_KEY else "")
            first = not state["first"]

            def sent() -> None:
                now = proc.clock()
                if not state["first"]:
                    state["first"] = now
                if stamp is not None:
                    stamp.sent = now  # written now (as the wire stamps it)

            timeout = state["retry_left"] or self.p.socket_timeout
            self.request(proc, label, lambda: run_at(node, asking), answered, timeout=timeout,
                         on_sent=sent, queued=queued and first, deadline=deadline)  # fmt: skip

        def answered(raw: Any, error: BaseException | None) -> None:
            state["asking"] = ""
            if isinstance(error, MovedError):
                proc.cluster_view = error.host  # the client patches its slot map, re-sends
                return send()
            if isinstance(error, AskError):
                state["asking"] = error.host
                return send()
            if isinstance(error, TryAgainError):
                now = proc.clock()
                if not state["tryagain_until"]:
                    state["tryagain_until"] = now + 5.0  # backend._MIGRATION_PATIENCE
                pause = state["pause"]
                if now + pause <= state["tryagain_until"]:
                    state["pause"] = min(0.2, pause * 2)
                    self.at(proc, now + pause, lambda: self.run_on(
                        proc, proc.epoch, send, net=False), "tryagain pause")  # fmt: skip
                    return None
            if isinstance(error, TimeoutError) and not state["retried"] and state["first"]:
                # The wire drops the connection and tries once more, within the bound.
                left = self.api.wire.retry_left(bound, proc.clock() - state["first"])
                if left is not None:
                    state["retried"], state["retry_left"] = True, left
                    self.log(f"{proc.name()}: {name} {key} tried again, {left:.3f}s left")
                    return send()
            on_reply(raw, error)
            return None

        send()

    def _key_of(self, redis_key: bytes) -> str:
        for table in (self.by_lock, self.by_result):
            if redis_key in table:
                return table[redis_key]
        text = redis_key.decode("utf-8", "replace")
        for k, n in self.names.items():
            if text in (n.lock, n.token, n.result, n.channel):
                return k
        return text

    def _completed(self, key: str, args: list[bytes]) -> None:
        record = args[1] if len(args) > 1 else b""
        if record:
            px = int(args[2]) if len(args) > 2 and args[2].isdigit() else 0
            self.stored.append((self.names[key].result.encode(), record, px))

    # --- stepping -------------------------------------------------------------------------

    def deliverable(self) -> list[Item]:
        return [i for i in self.net if not i.proc.partitioned]

    def deliver(self, n: int, *, mode: str = "deliver") -> str:
        items = self.deliverable()
        if mode == "dup":
            items = [i for i in items if i.kind != "reply"]  # a reply answers one request
        if mode == "refuse":  # a request (not a renewal's) answered by an error, not run
            items = [i for i in items if i.req is not None and i.lease is None]
        if not items:
            return "nothing in transit"
        item = items[n % len(items)]
        if mode == "refuse":
            assert item.req is not None
            self.net.remove(item)
            self.faults += 1  # (no fault of the process's links or renewals: a reply came)
            self._execute(item.req, _refusal(item.req.label))
            self.settle()
            return ""
        if mode == "drop":
            self.net.remove(item)
            self.faults += 1
            self._fault(item.proc, item.lease)
            return f"lost {item.label}"
        if mode == "dup":
            self.net.append(Item(next(self.seq), item.kind, item.proc, item.epoch, item.label,
                                 item.deliver, item.lease, item.req))  # fmt: skip
            self.faults += 1
            self._fault(item.proc, item.lease)
            return f"duplicated {item.label}"
        self.net.remove(item)
        self.log(f"arrives: {item.label}")
        item.deliver()
        self.settle()
        return ""

    def _fault(self, proc: Proc, lease: Any = None) -> None:
        proc.faulted_since = self.now_us
        if lease is not None:
            lease.faulted = True

    def advance(self, us: int) -> None:
        """Move true time forward, firing every timer that comes due on the way."""
        target = self.now_us + max(0, us)
        while self.timers and self.timers[0][0] <= target:
            when, _, timer = heapq.heappop(self.timers)
            self.now_us = max(self.now_us, when)
            if timer.cancelled:
                continue
            if timer.proc is None:
                timer.fn()
            else:
                self.run_on(timer.proc, timer.epoch, timer.fn, net=False)
            self.settle()
            self.check_step()
        self.now_us = target

    def next_timer_us(self) -> int | None:
        while self.timers and self.timers[0][2].cancelled:
            heapq.heappop(self.timers)
        return self.timers[0][0] if self.timers else None

    def pause(self, proc: Proc, us: int) -> None:
        if proc.paused_until is not None:
            return
        self.faults += 1
        proc.paused_until = self.now_us + us
        self._fault(proc)
        epoch = proc.epoch

        def resume() -> None:
            if proc.epoch != epoch:
                return
            proc.paused_until = None
            proc.paused_total += us * (1 + proc.drift) / US
            self._fault(proc)
            # What arrived on its sockets first, then the timers that came due meanwhile.
            while proc.inbox_net or proc.inbox_timers:
                queue = proc.inbox_net if proc.inbox_net else proc.inbox_timers
                queue.pop(0)()
                self.settle()

        self.at(None, self.now_us + us, resume, "resume")

    def starve(self, proc: Proc, us: int) -> str:
        """The process's renewal thread cannot run for a while (the GIL held, CPU starved)."""
        self.faults += 1
        proc.starved_until = max(proc.starved_until, self.now_us + us)
        return f"{proc.name()}'s renewer starved for {us // 1000} ms"

    def kill(self, proc: Proc) -> None:
        """The process dies: its callers, jobs and leases vanish; a fresh one takes the slot."""
        self.faults += 1
        for caller in self.callers:
            if caller.proc is proc and caller.epoch == proc.epoch and not caller.done:
                caller.done, caller.result = True, "killed"
        for lease in self.leases:
            if lease.proc is proc:
                lease.running = False
                lease.real.active = False
        for subs in self.subs.values():
            subs.discard(proc)
        self.jobs = [j for j in self.jobs if j.proc is not proc]
        proc.epoch += 1
        proc.paused_until = None
        proc.partitioned = False
        proc.clogged = False
        proc.inbox_net.clear()
        proc.inbox_timers.clear()
        proc.reset()

    def restart_redis(self, jump_ms: int) -> None:
        self.faults += 1
        self.redis.restart(jump_ms)
        self.subs.clear()
        self.slot = Slot()
        # Connections reset: whatever was in transit is gone; clients time out, hubs reconnect.
        self.net.clear()
        for proc in self.procs:
            proc.cluster_view = "A"
            self._fault(proc)
            self.run_on(proc, proc.epoch, proc.hub.reconnect, net=True)
        self.settle()

    def replay(self, n: int) -> str:
        """Someone with access to Redis publishes a genuine earlier message again."""
        if not self.published:
            return "nothing published yet"
        ch, data = self.published[n % len(self.published)]
        for (_, c), subs in list(self.subs.items()):
            if c == ch:
                for proc in list(subs):
                    self._send_message(proc, ch, data)
        return f"replayed {self.short(ch)} {_brief(data)}"

    def write_back(self, n: int) -> str:
        """A key writer writes a genuine record captured earlier back into its result key,
        with the life it was stored with."""
        if not self.stored:
            return "nothing stored yet"
        key, record, px = self.stored[n % len(self.stored)]
        node = self.slot.owner if self._key_of(key) == CLUSTER_KEY else "A"
        self.redis.write(key, record, px or None, node)
        return f"wrote back {self._key_of(key)}'s {_brief(record)} (px {px})"

    def forge(self, n: int, k: int) -> str:
        """Someone writes bytes that are not a genuine outcome: garbage or unsigned look-alikes."""
        key = f"k{k % len(self.names)}"
        names = self.names[key]
        huge = self.max_token.get(key, 0) + 10**6
        variant = n % 5
        if variant == 4:
            # A forger who reads the token counter: an unsigned record of the lease it names,
            # fresh by the scripts' rule (its keep runs 1 s past now), so that a plain read
            # finds it current and must refuse it (noted, dropped: Discard) by its seal.
            node = self.slot.owner if key == CLUSTER_KEY else "A"
            counter = self.redis.get_at(names.token.encode(), node) or b""
            lease = counter.partition(b":")[0]
            if not lease.isdigit():
                return f"no counter on {key} to forge a current record by"
            age = self.redis.now_ms() - int(lease) // 1000
            if not 0 <= age <= 2000:
                return f"{key}'s lease {lease.decode()} is too old to forge a fresh record of"
            forged = b"%s:%d:3600:DD-forged" % (lease, age + 1000)
            self.redis.write(names.result.encode(), forged, 3600, node)
            return f"forged the result key of {key} as a current record of lease {lease.decode()}"
        if variant == 2:
            # A record header the scripts accept (fresh, newest token) on an unsigned body.
            forged = b"%d:1000:3600:DD-forged" % huge
            # (The counter is left alone: a key writer who moves it also moves the fencing
            # tokens the next leases get, which is no record it forged.)
            node = self.slot.owner if key == CLUSTER_KEY else "A"
            self.redis.write(names.result.encode(), forged, 3600, node)
            return f"forged the result key of {key} (token {huge}, unsigned)"
        data = (b"hello", b"%d:1000:3600:DD-forged" % huge, b"", b"N:%d" % huge)[variant % 4]
        for (_, c), subs in list(self.subs.items()):
            if c == names.channel:
                for proc in list(subs):
                    self._send_message(proc, names.channel, data)
        return f"forged a message on {key}: {data!r}"

    # --- callers and jobs -----------------------------------------------------------------

    def call(self, proc: Proc, key: str, wait_ms: int, mode: str, first: bool = False) -> Caller:
        """A single-key call; ``first``: it reads its kept value before any flight, as the
        drivers' call(first=True) does (ReadFirst), where the package has that read."""
        deadline = proc.clock() + wait_ms / 1000 if wait_ms else None
        caller = Caller(next(self.ids), proc, proc.epoch, key, mode, self.now_us, deadline,
                        self.max_token.get(key, 0), proc.paused_total)  # fmt: skip
        caller.ref_value = max(self.values.get(key, ()), default=0)
        self.callers.append(caller)
        wait = wait_ms / 1000 if wait_ms else None
        if first and self.reads_first():
            ReadFirst(self, caller, wait).start()
        else:
            CallRun(self, caller, wait).step(None, None)
        return caller

    def reads_first(self) -> bool:
        """Whether callers may read before any flight (a checkout from before has no
        read_first; Params.reads False: schedules recorded before the read)."""
        return self.p.reads and self.p.result_ttl_ms > 0 and hasattr(self.api.call, "read_first")

    def cancel(self, n: int) -> str:
        """The n-th asyncio caller still running has its task cancelled (CancelledError
        where it awaits: its flight's entry, or its read before any flight)."""
        live = [c for c in self.callers if not c.done and c.mode == "async" and c.run is not None
                and c.proc.epoch == c.epoch]  # fmt: skip
        if not live:
            return "no asyncio caller to cancel"
        caller = live[n % len(live)]
        self.faults += 1
        # (A paused process's task is cancelled when it resumes: what it awaits then.)
        self.run_on(caller.proc, caller.epoch, lambda: caller.run.cancel(), net=False)
        self.settle()
        return f"cancels caller #{caller.id} ({caller.proc.name()} {caller.key})"

    def batch(self, proc: Proc, keys: list[str], wait_ms: int, mode: str = "sync") -> BatchRun:
        """A batch call over ``keys`` (distinct): one Caller per item, stepped together by
        the real batch machine (``batch.run_batch_call``), in its sync mode or its asyncio
        one (the items it creates run in a task of their own: ``run_shared_batch``)."""
        deadline = proc.clock() + wait_ms / 1000 if wait_ms else None
        run = BatchRun(self, proc, keys)
        tasked = mode == "async"
        for key in keys:
            caller = Caller(next(self.ids), proc, proc.epoch, key, f"batch {mode}", self.now_us,
                            deadline, self.max_token.get(key, 0), proc.paused_total)  # fmt: skip
            caller.ref_value = max(self.values.get(key, ()), default=0)
            caller.batch = run
            self.callers.append(caller)
            run.callers.append(caller)
        names = [self.names[k] for k in keys]
        run.names = names
        run.table = proc.async_table if tasked else proc.sync_table
        wait = wait_ms / 1000 if wait_ms else None
        machine = self.api.batch.run_batch_call
        run.machine = machine(proc.env, run.table, names, wait, proc.clock, tasked=tasked)
        self.batches.append(run)
        run.step(None, None)
        return run

    def finish_job(self, n: int, how: str) -> str:
        if not self.jobs:
            return "no job running"
        job = self.jobs.pop(n % len(self.jobs))
        if job.lead is not None:
            lead = job.lead
            self.run_on(job.proc, job.epoch, lambda: lead.led(job, how), net=False)
            self.settle()
            return f"batch job of {lead.name()} on {job.proc.name()} -> {how}"
        key = job.flight.key
        if how == "ok":
            outcome = self.api.envelope.Outcome(value=f"{key}@{job.token}#{job.seq}")
        elif how == "raise":
            outcome = self.api.envelope.Outcome(error=ValueError(f"{key}@{job.token}#{job.seq}"))
        else:
            outcome = self.api.envelope.Outcome(error=KeyboardInterrupt())
        self.run_on(job.proc, job.epoch, lambda: job.flight.led(outcome), net=False)
        self.settle()
        return f"job {key}@{job.token} on {job.proc.name()} -> {how}"

    def end(self, caller: Caller, how: str, value: Any, stale: bool = False) -> None:
        """A caller returns: check what it got (invariant: no outcome older than its lease)."""
        if caller.done:
            return
        caller.done = True
        errors = self.api.errors
        who = f"caller #{caller.id} ({caller.proc.name()} {caller.mode} {caller.key})"
        if how == "value" and type(value).__name__ == "Served":  # a cache-fill world's calls
            stale, value = bool(value.stale), value.value
        if how == "value" or (isinstance(value, ValueError) and _VALUE.match(str(value))):
            text = str(value)
        elif isinstance(value, asyncio.CancelledError) and caller.cancelled:
            caller.result = "cancelled"
            self.log(f"{who} ends: cancelled")
            return
        elif isinstance(value, (KeyboardInterrupt, asyncio.CancelledError)):
            caller.result = "abort"
            self.log(f"{who} ends: its own job was interrupted")
            if not caller.own_token:
                self.fail("unexpected-error", f"{who} got an abort it did not cause")
            return
        elif isinstance(value, (errors.BackendUnavailable, errors.WaitTimeout)):
            # Explained by the network (a slow, lost or cut link) or a deadline.
            caller.result = type(value).__name__
            self.log(f"{who} ends: {type(value).__name__}: {value}")
            return
        else:
            caller.result = f"{type(value).__name__}: {value}"
            self.fail("unexpected-error", f"{who} raised {caller.result}")
            return
        m = _VALUE.match(text)
        assert m is not None, text
        token = int(m.group(2))
        caller.result = text
        self.log(f"{who} ends: {how} {text}")
        if m.group(1) != caller.key:
            self.fail("wrong-key", f"{who} got {text}")
        if stale:
            self._check_stale(caller, who, text, token)
            return
        if token < caller.seen:
            self.fail(
                "older-outcome",
                f"{who} returned {text}, older than lease {caller.seen}, the one it waited on",
            )
        # A caller that joined a flight in its process takes what that flight finds (the
        # check above); one that drove its own must not get an outcome older than a lease
        # granted before it started, unless its own leader made it.
        if not caller.joined and token < caller.ref_start and token != caller.own_token:
            self.fail(
                "stale-outcome",
                f"{who} started after lease {caller.ref_start} was granted, yet returned {text}",
            )

    def _check_stale(self, caller: Caller, who: str, text: str, token: int) -> None:
        """A stale value (cache fill) is older than the leases its flight saw by design; it
        must be one a lease stored, and, for a caller that drove its own flight, no older
        than a value stored before the caller started (a newer value, once stored, is the
        current record: an older one is never served again)."""
        self.log(f"{who}: {text} was served stale")
        if token not in self.values.get(caller.key, ()):
            self.fail("stale-unstored", f"{who} was served {text} stale, which no lease stored")
        if not caller.joined and token < caller.ref_value:
            self.fail(
                "stale-regress",
                f"{who} started after the value of lease {caller.ref_value} was stored, yet "
                f"was served {text} stale",
            )

    def check_hit(self, key: str, raw: Any, value: Any, who: str) -> None:
        """A plain read's hit (a flight's Read, or a caller's read before any flight) served
        ``value`` from the record the READ's reply ``raw`` holds: it must be a value a lease
        stored, fresh by the server's clock when the read ran (its grant, the token, plus its
        keep) and current then (no newer lease granted on the key by then)."""
        if type(value).__name__ == "Served":
            value = value.value
        record = raw[0][0]
        now_ms = int(raw[1][0]) * 1000 + int(raw[1][1]) // 1000
        parts = bytes(record or b"").split(b":", 3)
        m = _VALUE.match(str(value))
        if len(parts) < 4 or not parts[0].isdigit() or not parts[1].isdigit() or m is None:
            self.fail("stale-hit", f"{who} was served {value!r} by a read of {record!r}")
            return
        token, keep = int(parts[0]), int(parts[1])
        newest = self.read_facts.get(id(raw), (raw, 0))[1]
        late = now_ms - (token // 1000 + keep)  # past its keep, by the server's clock
        if int(m.group(2)) != token or token not in self.values.get(key, ()):
            why = f"a record of lease {token} that no lease stored"
        elif late >= 0:
            why = f"{late} ms past its keep ({keep} ms from its grant, by the server's clock)"
        elif newest > token:
            why = f"lease {token}'s record after lease {newest} was granted"
        else:
            return
        self.fail("stale-hit", f"{who} was served {value} by a read of {why}")

    # --- invariants -----------------------------------------------------------------------

    def fail(self, kind: str, detail: str) -> None:
        """An invariant failed: stop the run, unless this kind is being looked past."""
        assert kind in KINDS, kind
        if kind in self.ignored:
            self.log(f"(ignored) {kind}: {detail}")
            return
        raise Violation(kind, detail)

    def _granted(self, key: str, token: int, proc: Proc, refresh: bool = False) -> None:
        if refresh:
            # At most one background refresh of a key at a time: another one still running
            # must know its lease is lost (or have lost its lock to a restart).
            for run in self.flight_by_entry.values():
                lease = run.lease
                if (run.key != key or not run.served or run.done or lease is None
                        or not lease.running or lease.restarts != self.redis.restarts
                        or self.known_lost(lease)):  # fmt: skip
                    continue
                self.fail(
                    "double-refresh",
                    f"a refresh lease {token} on {key} granted to {proc.name()} while "
                    f"{run.proc.name()}'s refresh under lease {lease.token} still runs",
                )
        last = self.max_token.get(key, 0)
        self.log(f"redis granted lease {token} on {key} to {proc.name()}")
        if token <= last:
            self.fail("token-order", f"lease {token} on {key} after lease {last}")
        self.max_token[key] = token
        self.grants[(key, token)] = self.redis.restarts
        for lease in self.leases:
            if lease.key != key or not lease.running or lease.token >= token:
                continue
            if lease.restarts != self.redis.restarts:
                continue  # a restart dropped its lock: no clock can tell (documented)
            if not self.known_lost(lease):
                age = lease.proc.clock() - lease.real.sent_at
                self.fail(
                    "unaware-leader",
                    f"lease {token} on {key} granted to {proc.name()} while {lease.proc.name()} "
                    f"still runs lease {lease.token} unaware it is lost "
                    f"(last renewal {age:.3f}s ago by its clock, ttl {lease.real.ttl}s)",
                )

    def known_lost(self, lease: SimLease) -> bool:
        if self.api.blind_renewer:
            return bool(lease.real.lost._set)  # planted: only a failed renewal tells
        return bool(lease.real.lost.is_set())

    def _on_set(self, key: bytes, value: bytes, px: int | None) -> None:
        if key in self.by_lock:
            held = self.redis.get(key)
            if held is not None and held != value:
                self.fail("lock-overwrite", f"{key!r}: {held!r} replaced by {value!r} while live")
        if key in self.by_result:
            k = self.by_result[key]
            token = int(value.split(b":", 1)[0] or 0)
            parts = value.split(b":", 3)
            if len(parts) == 4 and parts[3][3:4] == b"v":  # after the header: DD, version, kind
                self.values.setdefault(k, set()).add(token)
            if token < self.max_token.get(k, 0):
                self.fail(
                    "stale-record",
                    f"a record of lease {token} stored on {k} after lease {self.max_token[k]}",
                )

    def _check_publish(self, ch: str, data: bytes) -> None:
        key = self.by_channel.get(ch)
        # An old abort notice costs a re-check at most; an old outcome (or its notice) misleads.
        token = None if data[:2] == b"A:" else _token_in(data)
        if key is not None and token is not None and token < self.max_token.get(key, 0):
            self.fail(
                "stale-publish",
                f"an outcome of lease {token} published on {key} after lease {self.max_token[key]}",
            )

    def check_step(self) -> None:
        """After every step: keys have bounded lifetimes; callers with deadlines end in time;
        running leaders' locks do not lapse under them while nothing was wrong."""
        p = self.p
        if self.batches:
            self.check_deadlock()
        for raw in self.redis.live_keys():
            pttl = self.redis.pttl(raw)
            if raw in self.by_lock:
                bound = p.lock_ttl_ms
            elif raw in self.by_result:
                window = max(p.stale_ms, p.error_ms) if p.cache else 0
                bound = max(p.result_ttl_ms + window, p.grace_ms)
            else:
                bound = max(p.token_ttl_ms, p.result_ttl_ms, p.grace_ms)
            if pttl == -1 or pttl > bound:
                self.fail("ttl", f"{raw.decode()} lives {pttl} ms (bound {bound} ms)")
        # After the deadline a flight may finish one subscribe and one script call.
        slack = p.confirm_timeout + p.socket_timeout + p.connect_timeout + 0.1
        for caller in self.callers:
            proc = caller.proc
            if caller.done or caller.deadline is None or proc.paused_until is not None:
                continue
            if caller.own_token:
                continue  # its flight leads: wait_timeout bounds waiting, not running the job
            if caller.batch is not None and caller.batch.led_any:
                continue  # its batch call ran the function for items of its own
            # Time the process spent paused does not count: it could not act.
            late = proc.clock() - (proc.paused_total - caller.paused_at_start) - caller.deadline
            if proc.epoch == caller.epoch and late > slack:
                self.fail(
                    "missed-deadline",
                    f"caller #{caller.id} ({proc.name()} {caller.key}) still waits "
                    f"{late:.3f}s past its wait_timeout (not counting pauses)",
                )

    def _on_expire(self, key: bytes, value: bytes, expired_ms: int) -> None:
        """A lock ran out in Redis: fine if its leader was done, or something was wrong (a
        fault of its process or of its renewals, a restart, its renewer starved at that
        moment, a renewal still on its way); a violation if the renewer of a running, healthy
        leader simply did not keep it."""
        if key not in self.by_lock:
            return
        expired_us = expired_ms * 1000 - self.redis.offset_us  # true time
        for lease in self.leases:
            if lease.real.value.encode() != value or lease.proc.epoch != lease.epoch:
                continue
            proc, ttl_us = lease.proc, lease.real.ttl * US
            if (
                not lease.running
                or lease.faulted
                or lease.in_transit_at(expired_us)  # the renewer did its part; a slow link
                or lease.restarts != self.redis.restarts
                or proc.paused_until is not None
                or expired_us - proc.faulted_since < ttl_us * 2
                or expired_us <= proc.starved_until
                or lease.real.hold_until <= proc.clock()  # max_hold: renewal stops for good
            ):
                return
            self.fail(
                "lapsed-lease",
                f"the lock of lease {lease.token} on {lease.key} ({proc.name()}) ran out while "
                "its leader ran, its process was healthy and every renewal it sent was answered",
            )

    def check_orphans(self) -> None:
        """The drain: no lock is left held for a live process's flight that gave up on its
        acquire before leading (its give-back must have run)."""
        for key, names in self.names.items():
            held = self.redis.get_any(names.lock.encode())
            if held is None:
                continue
            owner = held.decode().partition(":")[2]
            run = self.flight_by_owner.get(owner)
            if run is None or not run.done or not run.unanswered_at or run.lead_token:
                continue
            if run.proc.epoch != run.epoch or run.releasing:
                continue  # dead, or the give-back is still at work
            if run.proc.clock() >= run.unanswered_at + run.spec.lock_ttl_ms / 1000:
                continue  # past when such a lease must have run out: it goes by itself
            self.fail(
                "orphaned-lease",
                f"{key}'s lock {held.decode()} is held for {run.proc.name()}'s flight that gave "
                "up on its acquire without leading; waiters would wait out the lease",
            )

    def check_deadlock(self) -> None:
        """No batch waits on an item led by a batch that waits (through others) on it: a
        batch waits on another when it waits for a message of a key whose lock the other's
        item holds, led and not yet ended, or on a flight of its process the other runs."""
        live = [b for b in self.batches if not b.done and b.proc.epoch == b.epoch]
        if len(live) < 2:
            return
        edges: dict[BatchRun, list[tuple[str, BatchRun]]] = {}
        for b in live:
            cmd, out = b.pending, []
            kind = type(cmd).__name__
            if kind == "WaitAny":
                for i, _, pause in cmd.items:
                    key = b.runs[i].key
                    held = self.redis.get_any(self.names[key].lock.encode())
                    if pause or held is None:
                        continue
                    for o in live:
                        if o is not b and any(
                            r.key == key and r.lead_token and not r.done and r.lease is not None
                            and r.lease.real.value.encode() == held for r in o.runs
                        ):  # fmt: skip
                            out.append((key, o))
            elif kind == "AwaitFlight":
                run = self.flight_by_entry.get(id(cmd.entry))
                if isinstance(run, ItemRun) and not run.done and run.batch in live \
                        and run.batch is not b:  # fmt: skip
                    out.append((run.key, run.batch))
            edges[b] = out
        # A cycle: depth-first from each batch along its waits.
        for start in live:
            cycle = _cycle(start, edges)
            if cycle:
                said = ", ".join(f"{b.name()} waits on {k}" for b, k in cycle)
                self.fail("batch-deadlock", f"{said}: each led by the next, which waits")

    def check_quiet(self) -> None:
        """After the schedule and a fault-free drain: every call ended."""
        for caller in self.callers:
            if not caller.done and caller.proc.epoch == caller.epoch:
                self.fail(
                    "stuck-call",
                    f"caller #{caller.id} ({caller.proc.name()} {caller.key}) never ended",
                )


# --- the machines, stepped --------------------------------------------------------------------


class CallRun:
    """One caller: the real call machine (``run_call``) in its sync or asyncio mode."""

    def __init__(
        self,
        world: World,
        caller: Caller,
        wait_timeout: float | None,
        *,
        joined: Any = None,
        started: float | None = None,
        reads: bool = True,
    ) -> None:
        self.w, self.caller = world, caller
        proc = caller.proc
        self.proc, self.epoch = proc, caller.epoch
        self.tasked = caller.mode == "async"
        table = proc.async_table if self.tasked else proc.sync_table
        self.table = table
        self.names = world.names[caller.key]
        # After a read before any flight (ReadFirst): the entry it joined or created, and
        # when it began; its flights then start at the acquire script if it created it.
        more = {} if joined is None else {"joined": joined, "started": started}
        self.reads = reads
        self.machine = world.api.call.run_call(
            proc.env,
            table,
            self.names,
            wait_timeout,
            proc.clock,
            tasked=self.tasked,
            # Served: whether a value was served stale. (A caller that reads first needs no
            # Served in the drivers; the machine decides alike either way.)
            detail=world.p.cache,
            **more,
        )
        self.waiting: Any = None  # the entry it awaits
        self.unwait: Callable[[], None] | None = None  # stops that wait (a cancel)
        caller.run = self

    def step(self, reply: Any, error: BaseException | None) -> None:
        w, caller = self.w, self.caller
        if caller.done or self.proc.epoch != self.epoch:
            return
        while True:
            try:
                cmd = self.machine.send(reply) if error is None else self.machine.throw(error)
            except StopIteration as stop:
                w.end(caller, "value", stop.value)
                return
            except Violation:
                raise
            except BaseException as exc:
                w.end(caller, "error", exc)
                return
            reply, error = None, None
            kind = type(cmd).__name__
            if kind == "AwaitFlight":
                if self._await(cmd.entry, cmd.timeout):
                    return
                reply = cmd.entry.result.is_set()
                self._joined_result(cmd.entry)
                continue
            if kind == "Fly":
                caller.joined = False
                run = FlightRun(w, self.proc, caller.key, cmd.entry, cmd.deadline, self._flown,
                                reads=self.reads)  # fmt: skip
                self.flight = run
                run.attach(caller)
                run.start()
                return
            if kind == "Launch":
                caller.joined = False
                shared = SharedRun(w, self.proc, caller.key, cmd.entry, self.table, self.reads)
                cmd.entry.task = shared
                shared.attach(caller)
                shared.start()
                continue
            if kind == "Cancel":
                # As aio.call: Entry.task is the flight's task, or (parked at a Wait) what
                # stands in for it; either is a Cancellable.
                others = [
                    c for c in w.callers
                    if c is not caller and not c.done and isinstance(c.run, CallRun)
                    and c.run.waiting is cmd.entry
                ]  # fmt: skip
                task = cmd.entry.task
                if task is not None and not task.done():
                    if others:
                        w.fail(
                            "cancel-spread",
                            f"caller #{caller.id} left {caller.key}'s flight "
                            f"and cancelled it while caller #{others[0].id} still awaits it",
                        )
                    task.cancel()
                continue
            w.fail("unknown-command", f"the simulator has no handler for {cmd!r}")
            return

    def _await(self, entry: Any, timeout: float | None) -> bool:
        """Wait on the process's flight; True if the wait goes on (a waker will step us)."""
        caller = self.caller
        run = self.w.flight_by_entry.get(id(entry))
        if run is not None and caller not in run.attached:
            caller.joined = True
            caller.seen = max(caller.seen, run.seen)
            run.attach(caller)
        if entry.result.is_set():
            return False
        state = {"open": True}
        w = self.w

        def close() -> None:
            state["open"] = False
            self.waiting = self.unwait = None
            if timer is not None:
                timer.cancelled = True

        def wake() -> None:
            if state["open"]:
                close()
                w.soon(lambda: self._resume_await(entry))

        def expire() -> None:
            if state["open"]:
                close()
                entry.result.discard_waker(wake)
                self.step(False, None)

        def unwait() -> None:
            if state["open"]:
                close()
                entry.result.discard_waker(wake)

        timer = None
        if timeout is not None:
            timer = w.at(self.proc, self.proc.clock() + timeout, expire, "await flight")
        entry.result.add_waker(wake)
        self.waiting, self.unwait = entry, unwait
        return True

    def cancel(self) -> None:
        """asyncio: the caller's task is cancelled: CancelledError where it awaits (its
        flight's entry; the machine then leaves it, cancelling a flight nobody awaits)."""
        if self.caller.done or self.unwait is None:
            return
        self.caller.cancelled = True
        self.unwait()
        self.step(None, asyncio.CancelledError())

    def _resume_await(self, entry: Any) -> None:
        self._joined_result(entry)
        # A poke (a stale value offered) wakes the waiter with its flight unresolved.
        done = entry.result.is_set()
        self.w.run_on(self.proc, self.epoch, lambda: self.step(done, None), net=False)

    def _joined_result(self, entry: Any) -> None:
        """A RETRY carries what the aborted flight saw: the caller starts over after it; the
        caller that launched the flight (asyncio) saw what it saw."""
        if not entry.result.is_set():
            return
        run = self.w.flight_by_entry.get(id(entry))
        if run is None:
            return
        if entry.result.get() is self.w.api.inflight.RETRY or not self.caller.joined:
            self.caller.seen = max(self.caller.seen, run.seen)

    flight: FlightRun | None = None

    def _flown(self, finished: Any, error: BaseException | None) -> None:
        if self.flight is not None:  # the caller that drove it saw what its flight saw
            self.caller.seen = max(self.caller.seen, self.flight.seen)
        self.step(finished, error)


class ReadFirst:
    """A caller that reads its kept value before any flight, as the drivers' ``call`` does
    with ``first`` (no Served, no events): ``call.read_first`` joins or creates the
    process's flight of its key; if it created it and the read credit says so, its READ
    (MGET and TIME) goes out as the drivers' ``_read`` sends it (sync: its wait for a command
    slot bounded by wait_timeout; asyncio: the whole read cut at wait_timeout, WaitTimeout),
    the drivers' ``read_found`` decides what it found (a forged record is dropped: Discard),
    ``read_failed`` ends the entry on a failure; a miss (or a refused read) hands the entry
    to the call machine (``run_call(..., started=, joined=)``), whose flights then start at
    the acquire script. While the read is out the entry is the process's flight of the key:
    callers who come meanwhile join it."""

    served = False  # what World._granted reads of a process's flight
    lease: SimLease | None = None

    def __init__(self, world: World, caller: Caller, wait_timeout: float | None) -> None:
        self.w, self.caller, self.wait = world, caller, wait_timeout
        proc = caller.proc
        self.proc, self.epoch, self.key = proc, caller.epoch, caller.key
        self.tasked = caller.mode == "async"
        self.table = proc.async_table if self.tasked else proc.sync_table
        self.names = world.names[caller.key]
        self.attached: list[Caller] = []
        self.seen = 0  # a read sees no lease
        self.done = False
        self.pending = False  # its READ (or Discard) is out
        self.entry: Any = None
        self.joined: Any = None
        self.started = 0.0
        self.timer: Timer | None = None
        self.reads: Any = None

    def attach(self, caller: Caller) -> None:
        if caller not in self.attached:
            self.attached.append(caller)

    def start(self) -> None:
        w, api, proc, caller = self.w, self.w.api, self.proc, self.caller
        self.reads = w.reads.setdefault((proc.name(), self.key), api.protocol.Reads())
        joined = api.call.read_first(proc.env, self.table, self.names, self.reads)
        if joined is None or not joined[2]:
            self.go_on(joined, None)  # joined a flight, or the credit said no read
            return
        self.entry, self.joined, self.started = joined[0], joined, proc.clock()
        w.flight_by_entry[id(self.entry)] = self
        self.attach(caller)
        caller.run = self
        self.pending = True
        w.log(f"{proc.name()} reads {self.key} before any flight (caller #{caller.id})")
        bound = None if self.wait is None else self.started + self.wait
        w.script(proc, api.commands.read_call(self.names), self._looked,
                 deadline=None if self.tasked else bound)  # fmt: skip
        if self.tasked and bound is not None:
            self.timer = w.at(proc, bound, self._cut, "read wait_timeout")

    def _cut(self) -> None:
        """asyncio: the read is cut short at wait_timeout (aio._bounded)."""
        if self.pending and not self.caller.done:
            self.pending = False
            self.failed(self.w.api.errors.WaitTimeout("waited the wait_timeout for the read"))

    def cancel(self) -> None:
        """asyncio: the caller's task is cancelled while its read (or Discard) is out."""
        if self.pending and not self.caller.done:
            self.pending = False
            self.caller.cancelled = True
            if self.timer is not None:
                self.timer.cancelled = True
            self.failed(asyncio.CancelledError())

    def _answered(self, error: BaseException | None) -> bool:
        """Whether the reply is still awaited (not cut, cancelled, or the process gone)."""
        if not self.pending or self.caller.done or self.proc.epoch != self.epoch:
            return False
        self.pending = False
        if self.timer is not None:
            self.timer.cancelled = True
        return True

    def _looked(self, raw: Any, error: BaseException | None) -> None:
        if not self._answered(error):
            return
        w, api = self.w, self.w.api
        if error is not None:
            if isinstance(error, ScriptError):
                w.fail("script-error", f"READ: {error}")
                error = ResponseError(str(error))
            self.failed(api.base.read_error(error))
            return
        try:
            looked = api.commands.parse_looked(raw)
            hit, value, discard = api.base.read_found(
                self.proc.env, self.table, self.reads, self.names, self.entry, looked, None,
                w.p.result_ttl_ms,
            )  # fmt: skip
        except Violation:
            raise
        except BaseException as exc:
            self.failed(api.commands.translate(exc) if isinstance(exc, Exception) else exc)
            return
        if discard is not None:
            self.pending = True
            w.script(self.proc, discard, self._discarded)
            return
        if hit:
            self.done = True
            who = f"caller #{self.caller.id} ({self.proc.name()} {self.caller.mode} {self.key})"
            w.log(f"{who}: its read before any flight hit, for {len(self.attached)} caller(s)")
            w.check_hit(self.key, raw, value, who)
            w.end(self.caller, "value", value)
            return
        self.go_on(self.joined, self.started)

    def _discarded(self, raw: Any, error: BaseException | None) -> None:
        if not self._answered(error):
            return
        if error is not None:
            if isinstance(error, ScriptError):
                self.w.fail("script-error", f"DISCARD: {error}")
                error = ResponseError(str(error))
            self.failed(self.w.api.commands.translate(error) if isinstance(error, Exception)
                        else error)  # fmt: skip
            return
        self.go_on(self.joined, self.started)

    def failed(self, error: BaseException) -> None:
        """read_failed: the entry ends (its joiners get the error, or start over) and the
        call raises; or (refused) the machine goes on with the entry."""
        w = self.w
        try:
            w.api.call.read_failed(self.proc.env, self.table, self.reads, self.names,
                                   self.entry, error, self.wait)  # fmt: skip
        except Violation:
            raise
        except BaseException as exc:
            self.done = True
            w.end(self.caller, "error", exc)
            return
        self.go_on(self.joined, self.started)

    def go_on(self, joined: Any, started: float | None) -> None:
        """The call machine, with the entry read_first joined or created (if any); a call
        that created it asked the credit: its flights read no more."""
        self.done = True
        run = CallRun(self.w, self.caller, self.wait, joined=joined, started=started,
                      reads=joined is None or not joined[1])  # fmt: skip
        run.step(None, None)


class SharedRun:
    """asyncio's flight task for one entry: the real ``run_shared_flight``."""

    def __init__(
        self, world: World, proc: Proc, key: str, entry: Any, table: Any, reads: bool = True
    ) -> None:
        self.w, self.proc, self.epoch, self.key, self.entry = world, proc, proc.epoch, key, entry
        self.machine = world.api.call.run_shared_flight(proc.env, table, world.names[key], entry)
        self.ended = False
        self.reads = reads
        self.flight: FlightRun | None = None
        self.attached: list[Caller] = []

    def done(self) -> bool:
        """Task.done()."""
        return self.ended

    def attach(self, caller: Caller) -> None:
        self.attached.append(caller)

    def start(self) -> None:
        self.step(None, None)

    def step(self, reply: Any, error: BaseException | None) -> None:
        if self.ended or self.proc.epoch != self.epoch:
            return
        while True:
            try:
                cmd = self.machine.send(reply) if error is None else self.machine.throw(error)
            except StopIteration:
                self.ended = True
                return
            except Violation:
                raise
            except BaseException:  # an abort goes on up the task: it ends
                self.ended = True
                return
            reply, error = None, None
            kind = type(cmd).__name__
            if kind == "Fly":
                run = FlightRun(self.w, self.proc, self.key, self.entry, None, self.step,
                                reads=self.reads)  # fmt: skip
                run.task = self
                for caller in self.attached:
                    run.attach(caller)
                self.flight = run
                run.start()
                return
            self.w.fail("unknown-command", f"the simulator has no handler for {cmd!r}")
            return

    def cancel(self) -> bool:
        """task.cancel(): CancelledError where the task awaits (its flight's command)."""
        if self.flight is not None and not self.flight.done:
            self.w.log(f"{self.proc.name()} cancels its flight task on {self.key}")
            self.flight.cancel()
            return True
        return False


class ParkedFlight:
    """What stands in for an asyncio flight's task while its flight waits for its channel's
    message with no task (aio's ``_Driver.park``: ``Entry.task`` is then the driver, a
    ``Cancellable``). ``done()``: no longer parked (woken, or the flight ended in the hub's
    callback); ``cancel()``: the flight goes on in a new task, CancelledError thrown in at
    its Wait."""

    def __init__(self, flight: FlightRun) -> None:
        self.flight = flight
        self.parked = True

    def done(self) -> bool:
        return not self.parked

    def cancel(self) -> bool:
        if not self.parked:
            return False
        flight = self.flight
        self.unpark()
        flight.w.log(f"{flight.proc.name()} cancels its parked flight on {flight.key}")
        flight.cancel()
        return True

    def unpark(self) -> None:
        """The Wait ended: a new task goes on with the flight (Entry.task), unless the
        hub's callback ended it (then this stand-in stays, done)."""
        if not self.parked:
            return
        self.parked = False
        flight = self.flight
        if not flight.done and flight.task is not None and flight.entry.task is self:
            flight.entry.task = flight.task


def step_machine(
    run: Any,
    machine: Any,
    reply: Any,
    error: BaseException | None,
    ended: Callable[[Any, BaseException | None], None],
) -> None:
    """Step a flight's or a batch's machine with ``reply`` (or ``error``), carrying each
    command ``run.handle`` answers at once, until one is answered later (``run.pending``) or
    the machine ends (``ended`` gets its value or error; a Violation goes on up)."""
    while True:
        run.pending = None
        try:
            cmd = machine.send(reply) if error is None else machine.throw(error)
        except StopIteration as stop:
            ended(stop.value, None)
            return
        except Violation:
            raise
        except BaseException as exc:
            ended(None, exc)
            return
        reply, error = None, None
        run.pending = cmd
        handled = run.handle(cmd)
        if handled is None:
            return  # the reply comes later
        reply, error = handled


class FlightRun:
    """One flight: the real run_flight generator, its commands carried through the world."""

    reads_first = True  # a single key's flight: a plain read first (Params.reads)

    def __init__(
        self,
        world: World,
        proc: Proc,
        key: str,
        entry: Any,
        deadline: float | None,
        done_cb: Callable[[Any, BaseException | None], None],
        *,
        reads: bool = True,
    ) -> None:
        self.w, self.proc, self.epoch, self.key = world, proc, proc.epoch, key
        self.entry = entry
        self.done_cb = done_cb
        proc.flights += 1
        api, p = world.api, world.p
        self.names = world.names[key]
        fields = {
            "names": self.names,
            "owner": f"{proc.name()}:{proc.flights}",
            "lock_ttl_ms": p.lock_ttl_ms,
            "token_ttl_ms": p.token_ttl_ms,
            api.result_ttl_field: p.result_ttl_ms,
            "grace_ms": p.grace_ms,
            # k1's outcomes never travel inline: its followers read the stored record.
            "inline_max_bytes": 0 if key == CLUSTER_KEY else 32 * 1024,
            "deadline": deadline,
            "max_hold_ms": p.max_hold_ms,
        }
        if p.cache:
            fields.update(stale_ms=p.stale_ms, error_ms=p.error_ms, backoff_ms=p.backoff_ms)
        read, reads = reads, getattr(api.protocol, "Reads", None)  # a plain read first
        # (Not for a call that read, or asked the credit, before its flight: ReadFirst.)
        if reads is not None and p.reads and p.result_ttl_ms > 0 and self.reads_first and read:
            # One per process and job, as one per function and settings in a process.
            fields["reads"] = world.reads.setdefault((proc.name(), key), reads())
        self.spec = api.protocol.FlightSpec(**fields)
        self.shim = _Shim(self.spec, "SPUBLISH" if key == CLUSTER_KEY else "PUBLISH", api, proc)
        self.served = False  # Serve: its callers have a stale value; it refreshes on
        self.gen = api.protocol.run_flight(self.spec, world.codec, proc.clock)
        self.seen = 0
        self.lead_token = 0
        self.lease: SimLease | None = None
        self.mailbox: list[object] | None = None
        self.done = False
        self.unanswered_at = 0.0  # when an acquire of it was written that never got a reply
        self.releasing = 0  # give-back steps in progress (a request, or a retry's timer)
        self.pending: Any = None  # the command whose reply it awaits
        self.attached: list[Caller] = []
        before = world.flight_by_entry.get(id(entry))
        if isinstance(before, ReadFirst) and before.entry is entry:
            self.attached = list(before.attached)  # who joined while its read was out
        self.written_at = 0.0  # when the acquire that granted our lease was written
        self.read_raw: Any = None  # the reply of its Read, while nothing came after it
        self.task: SharedRun | None = None  # asyncio: the task it runs in (parks at a Wait)
        world.flight_by_entry[id(entry)] = self
        world.flight_by_owner[self.spec.owner] = self

    def attach(self, caller: Caller) -> None:
        if caller not in self.attached:
            self.attached.append(caller)
            if self.lead_token:
                caller.own_token = self.lead_token

    def start(self) -> None:
        self.resume(None, None)

    def resume(self, reply: object, error: BaseException | None) -> None:
        if self.done or self.proc.epoch != self.epoch:
            return
        step_machine(self, self.gen, reply, error, self.finish)

    def cancel(self) -> None:
        """The task awaiting this flight is cancelled: CancelledError at its pending await,
        as the driver's failed() turns it (Unanswered for an acquire already written)."""
        cmd = self.pending
        if cmd is None or self.done:
            return
        self.pending = None  # its late reply is ignored
        self._cancelled = True
        error = self.w.api.base.DriverBase.failed(self.shim, cmd, asyncio.CancelledError())
        self.w.soon(lambda: self.resume(None, error))

    _cancelled = False

    # --- commands -------------------------------------------------------------------------

    def handle(self, cmd: Any) -> tuple[object, BaseException | None] | None:
        api, w = self.w.api, self.w
        name = type(cmd).__name__
        self.read_raw = None
        sc = api.base.DriverBase.script_for(self.shim, cmd)
        if sc is not None:
            if name == "Complete" and self.lease is not None:
                self.lease.real.completing = True  # as Renewer.completing()
            acquire = name == "Acquire"
            # Before any lease (Acquire, Read) a sync caller's wait for a command slot is
            # bounded by its wait_timeout, as in the sync driver.
            before_lease = acquire or name == "Read"
            w.script(self.proc, sc, lambda raw, err: self._scripted(cmd, raw, err),
                     stamp=self.shim.stamp if acquire else None,
                     deadline=self.spec.deadline if before_lease else None)  # fmt: skip
            return None
        bound = self.spec.lock_ttl_ms / 1000 + self.spec.slack(self.spec.lock_ttl_ms) + 1e-6
        if name == "Wait":
            if cmd.timeout > bound:
                w.fail("unbounded-wait", f"Wait({cmd.timeout}) past the lease bound {bound:.3f}s")
            return self._wait(cmd.timeout)
        if name == "Subscribe":
            return self._subscribe(cmd.timeout)
        if name == "Lead":
            self._lead(cmd)
            return None
        if name == "Pause":
            if cmd.seconds > bound:
                w.fail("unbounded-wait", f"Pause({cmd.seconds})")
            w.at(self.proc, self.proc.clock() + cmd.seconds, lambda: self.resume(None, None),
                 "pause")  # fmt: skip
            return None
        if name == "Release":
            self._release(self.shim.stamp.sent)
            return None, None
        if name == "Note":
            w.log(f"{self.proc.name()} note {cmd.kind}: {cmd.detail}")
            return None, None
        if name == "Offer":
            self.entry.offer(cmd.finished)
            return None, None
        if name == "Serve":
            # The callers get the value now; the flight goes on in the background (the
            # drivers hand it to a thread or task of its own).
            self.served = True
            w.log(f"{self.proc.name()} serves {self.key} now and refreshes it in the background")
            done, finished = self.done_cb, cmd.finished
            w.soon(lambda: w.run_on(self.proc, self.epoch, lambda: done(finished, None),
                                    net=False))  # fmt: skip
            return None, None
        w.fail("unknown-command", f"the simulator has no handler for {cmd!r}")
        return None

    def _scripted(self, cmd: Any, raw: Any, error: BaseException | None) -> None:
        if self.pending is not cmd:
            return  # cancelled meanwhile: the reply is not read
        base = self.w.api.base.DriverBase
        if error is not None:
            if isinstance(error, ScriptError):
                self.w.fail("script-error", f"{type(cmd).__name__}: {error}")
                error = ResponseError(str(error))  # what redis-py raises for an error reply
            elif type(cmd).__name__ == "Acquire" and self.shim.stamp.sent:
                self.unanswered_at = self.shim.stamp.sent  # it may hold a lease now
            self.resume(None, base.failed(self.shim, cmd, error))
            return
        reply = base.reply_of(self.shim, cmd, raw)
        if type(cmd).__name__ == "Read":
            self.read_raw = raw  # a hit now is the read's: check_hit
        if type(cmd).__name__ == "Acquire":
            # Granted to this very request: it was written when the stamp says.
            self.written_at = self.shim.stamp.sent if reply.state in (2, 3) else 0.0
            if isinstance(self, ItemRun) and type(reply).__name__ == "Acquired":
                self.granted(reply)
            if reply.state == 1:
                tok = reply.holder.partition(":")[0]
                if tok.isdigit():
                    self.seen = max(self.seen, int(tok))
            elif reply.state == 2:
                self.seen = max(self.seen, int(reply.token))
        self.resume(reply, None)

    def _mailbox(self) -> list[object]:
        if self.mailbox is None:
            self.mailbox = _Box()
            self.proc.hub.subscribe(self.names.channel, self.mailbox)
        return self.mailbox

    def _subscribe(self, timeout: float) -> tuple[object, BaseException | None] | None:
        hub, channel = self.proc.hub, self.names.channel
        self._mailbox()
        if hub.confirmed.get(channel):
            return True, None
        limit = min(timeout, self.w.p.confirm_timeout)
        state = {"open": True}
        cmd = self.pending

        def wake(ok: bool) -> None:
            if state["open"] and self.pending is cmd:
                state["open"] = False
                timer.cancelled = True
                self.w.soon(lambda: self.resume(True, None))

        def expire() -> None:
            if state["open"] and self.pending is cmd:
                state["open"] = False
                self.resume(False, None)

        hub.waiters.setdefault(channel, []).append(wake)
        timer = self.w.at(self.proc, self.proc.clock() + limit, expire, "confirm")
        return None

    def _wait(self, timeout: float) -> tuple[object, BaseException | None] | None:
        box = self._mailbox()
        if box:
            return box.pop(0), None
        state = {"open": True}
        cmd = self.pending
        # asyncio's flight task parks here (aio's _Driver.park): the task ends, and what
        # stands in for it is the entry's task until the wait ends.
        parked = ParkedFlight(self) if self.task is not None and not self.served else None
        if parked is not None:
            self.entry.task = parked
            self.w.log(f"{self.proc.name()}'s flight on {self.key} parks at its Wait (no task)")

        def wake() -> None:
            if state["open"] and self.pending is cmd:
                state["open"] = False
                timer.cancelled = True
                if parked is None:
                    self.w.soon(lambda: self.resume(box.pop(0) if box else None, None))
                    return
                # aio's step_ahead: the hub's callback steps the flight with the message
                # at once; the callers its end wakes run next, then the task (unpark).
                self.resume(box.pop(0) if box else None, None)
                self.w.soon(parked.unpark)

        def expire() -> None:
            if state["open"] and self.pending is cmd:
                state["open"] = False
                box.waker = None  # type: ignore[attr-defined]
                if parked is not None:
                    parked.unpark()
                self.resume(None, None)

        box.waker = wake  # type: ignore[attr-defined]
        timer = self.w.at(self.proc, self.proc.clock() + timeout, expire, "wait")
        return None

    def _lead(self, cmd: Any, job: bool = True) -> None:
        w, proc = self.w, self.proc
        self.lead_token = int(cmd.token)
        for caller in self.attached:
            caller.own_token = self.lead_token
        self.entry.leading = True
        early = (
            self.lease if self.lease is not None and self.lease.token == self.lead_token else None
        )
        # The driver's own lease, on our clock (a batch item's: started at its grant).
        real = early.real if early is not None else api_start_lease(w.api, self.shim, cmd)
        if early is not None:
            w.api.base.DriverBase.start_lease(self.shim, cmd)  # reuses it, as the driver does
        # A lease granted to the acquire written at written_at began no earlier than that
        # write (not when the command was queued). An own lease found by a retried acquire
        # (written_at 0) is dated back by as much as it has run down: not checked here.
        if self.written_at and real.sent_at < self.written_at - 1e-6:
            w.fail(
                "lease-dated-early",
                f"lease {cmd.token} on {self.key} ({proc.name()}) is dated from "
                f"{self.written_at - real.sent_at:.3f}s before its acquire was written",
            )
        if early is None:
            grant = w.grants.get((self.key, int(cmd.token)), w.redis.restarts)
            lease = SimLease(proc, self.epoch, self.key, int(cmd.token), real, grant)
            self.lease = lease
            w.leases.append(lease)
            proc.renewer.add(lease)
        if not job:  # a batch's item: the batch runs one job for the items it leads
            w.log(f"{proc.name()} leads {self.key} with lease {cmd.token} (batch)")
            return
        seq = next(w.ids)
        w.jobs.append(Job(proc, self.epoch, self, int(cmd.token), seq))
        w.log(f"{proc.name()} leads {self.key} with lease {cmd.token}: job runs")

    def _release(self, sent: float) -> None:
        """As Backend.release_later: look at the holder now and again at growing intervals
        while a lease of that acquire could be alive; whenever it is ours, complete with an
        abort notice (owner-checked). In the background: the flight does not wait."""
        w, proc, api, spec = self.w, self.proc, self.w.api, self.spec
        epoch = proc.epoch
        until = sent + spec.lock_ttl_ms / 1000
        pause = [0.2]  # backend._RELEASE_PAUSE, doubled after each look

        def look() -> None:
            self.releasing += 1
            w.script(proc, api.commands.peek_call(spec), peeked)

        def fire() -> None:
            self.releasing -= 1  # the look's timer fired
            if proc.epoch == epoch:
                look()

        def later() -> None:
            now = proc.clock()
            if now < until:  # look again while such a lease could be alive, last at until
                self.releasing += 1
                w.at(proc, min(now + pause[0], until), fire, "release look")
                pause[0] *= 2

        def peeked(raw: Any, error: BaseException | None) -> None:
            self.releasing -= 1
            holder = raw.decode() if error is None and isinstance(raw, bytes) else ""
            token, sep, owner = holder.partition(":")
            if sep and owner == spec.owner and token.isdigit():
                notice = w.codec.notice(b"A", channel=spec.names.channel, token=int(token))
                cmd = api.protocol.Complete(holder, b"", 0, notice, int(token))
                self.releasing += 1

                def completed(raw: Any, err: BaseException | None) -> None:
                    self.releasing -= 1

                w.script(proc, api.commands.complete_call(spec, cmd, self.shim.backend.publish),
                         completed)  # fmt: skip
            later()

        w.log(f"{proc.name()} gives back the lease its unanswered acquire on {self.key} may hold")
        look()

    def led(self, outcome: Any) -> None:
        """The job finished: the function's outcome is the Lead reply."""
        if self.lease is not None:
            self.lease.running = False
        self.resume(outcome, None)

    def finish(self, value: Any, error: BaseException | None) -> None:
        self.done = True
        self.pending = None
        kept = type(value).__name__ == "Finished" and value.role == "kept"
        if self.read_raw is not None and kept and value.outcome.error is None:
            who = f"{self.proc.name()}'s flight on {self.key}"
            self.w.check_hit(self.key, self.read_raw, value.outcome.value, who)
        if self.lease is not None:
            self.lease.running = False
            self.proc.renewer.remove(self.lease)
        if self.mailbox is not None:
            self.proc.hub.unsubscribe(self.names.channel, self.mailbox)
            self.mailbox = None
        if not self.served:  # a refresh's callers were served already
            self.done_cb(value, error)


class ItemRun(FlightRun):
    """One item of a batch: its run_flight machine is stepped by the batch machine
    (``run_batch``); this carries the item's commands one by one, as a FlightRun does, and
    hands each reply to whoever asked (``carry``)."""

    reads_first = False  # a batch's items acquire together (as api's batch specs)

    def __init__(self, world: World, proc: Proc, key: str, entry: Any, deadline: float | None,
                 batch: BatchRun) -> None:  # fmt: skip
        super().__init__(world, proc, key, entry, deadline, lambda value, error: None)
        self.batch = batch  # the batch machine stepping it (a background part, once handed)
        self.reply_to: Callable[[Any, BaseException | None], None] | None = None

    def granted(self, reply: Any) -> None:
        """As BatchBase.replies: an item's granted lease is renewed from its grant, not from
        the Lead (which waits for every sibling's acquire)."""
        w = self.w
        stub = self.shim.backend.stub
        before = len(stub.added)
        w.api.base.DriverBase.renew_from_grant(self.shim, reply)
        if len(stub.added) == before:
            return
        real = stub.added[-1]
        token = int(real.value.partition(":")[0])  # granted now, or to an earlier copy
        lease = SimLease(self.proc, self.epoch, self.key, token, real,
                         w.grants.get((self.key, token), w.redis.restarts))  # fmt: skip
        self.lease = lease
        w.leases.append(lease)
        self.proc.renewer.add(lease)

    def carry(self, cmd: Any, to: Callable[[Any, BaseException | None], None]) -> None:
        """Carry one command of the item; ``to`` gets its reply (now, or when it comes)."""
        self.pending, self.reply_to = cmd, to
        handled = self.handle(cmd)
        if handled is not None:
            self.resume(*handled)

    def resume(self, reply: object, error: BaseException | None) -> None:
        if self.done or self.proc.epoch != self.epoch:
            return
        to, self.reply_to, self.pending = self.reply_to, None, None
        if to is not None:
            to(reply, error)


class BatchRun:
    """A batch call (the real ``batch.run_batch_call``, sync mode) or a background part
    (``batch.run_batch`` over the items served at once): its commands carried through the
    world, each item's scripts as requests of their own (so each can be delayed, dropped,
    duplicated or redirected), the items it leads run by one job."""

    def __init__(self, world: World, proc: Proc, keys: list[str]) -> None:
        self.w, self.proc, self.epoch, self.keys = world, proc, proc.epoch, keys
        self.id = next(world.ids)
        self.callers: list[Caller] = []  # by item (none for a background part)
        self.machine: Any = None
        self.runs: list[ItemRun] = []  # the current run_batch's items, by its indices
        self.item_runs: dict[int, ItemRun] = {}  # the caller's item -> its latest own flight
        self.pending: Any = None
        self.done = False
        # The function ran for items of this call (sync: on the caller's thread; asyncio: in
        # its task): wait_timeout bounds waiting on others, not the call's own run.
        self.led_any = False
        self.task = False  # asyncio: the task that runs the items a caller's batch created
        self.parent: BatchRun | None = None  # a task's batch call
        self.names: list[Any] = []
        self.table: Any = None

    def name(self) -> str:
        what = "task" if self.task else "batch"
        return f"{what} #{self.id} ({self.proc.name()} {','.join(self.keys)})"

    def step(self, reply: Any, error: BaseException | None) -> None:
        if self.done or self.proc.epoch != self.epoch:
            return
        if not self.task:
            self._step(reply, error)
            return
        # run_shared_batch steps its items on the driver's clock (time.monotonic, read when
        # its run_batch starts): here, the process's clock.
        mod = self.w.api.batch
        saved, mod._monotonic = mod._monotonic, self.proc.clock
        try:
            self._step(reply, error)
        finally:
            mod._monotonic = saved

    def _step(self, reply: Any, error: BaseException | None) -> None:
        step_machine(self, self.machine, reply, error, self.ended)

    def later(self, cmd: Any, reply: Any, error: BaseException | None) -> None:
        """A reply that came later: step on, once the current event is handled."""
        if self.pending is cmd:
            w = self.w
            w.soon(lambda: w.run_on(self.proc, self.epoch, lambda: self.step(reply, error),
                                    net=False))  # fmt: skip

    def handle(self, cmd: Any) -> tuple[Any, BaseException | None] | None:
        w = self.w
        kind = type(cmd).__name__
        if kind == "Many":
            if cmd.kind.__name__ == "Lead":
                self._lead(cmd)
                return None
            replies: list[Any] = [None] * len(cmd.items)
            state = {"left": len(cmd.items), "now": True}

            def reply_for(n: int) -> Callable[[Any, BaseException | None], None]:
                def to(reply: Any, error: BaseException | None) -> None:
                    replies[n] = error if error is not None else reply
                    state["left"] -= 1
                    if state["left"] == 0 and not state["now"]:
                        self.later(cmd, replies, None)

                return to

            for n, (k, c) in enumerate(cmd.items):
                self.runs[k].carry(c, reply_for(n))
            state["now"] = False
            return (replies, None) if state["left"] == 0 else None
        if kind == "WaitAny":
            return self._wait_any(cmd)
        if kind == "Each":
            got: list[tuple[Any, BaseException | None]] = []
            self.runs[cmd.at].carry(cmd.cmd, lambda reply, error: got.append((reply, error)))
            if got:
                return got[0]
            self.runs[cmd.at].reply_to = lambda reply, error: self.later(cmd, reply, error)
            return None
        if kind == "Done":
            run = self.runs[cmd.at]
            if cmd.going_on:
                run.served = True  # its callers have a value; it refreshes on
            else:
                run.finish(None, None)
            return None, None
        if kind == "Background":
            part = BatchRun(w, self.proc, [self.runs[k].key for k, _ in cmd.flights])
            part.runs = [self.runs[k] for k, _ in cmd.flights]
            for run in part.runs:
                run.batch = part
            part.machine = w.api.batch.run_batch([f for _, f in cmd.flights], self.proc.clock)
            w.batches.append(part)
            w.log(f"{self.proc.name()} refreshes {','.join(part.keys)} in the background")
            w.soon(lambda: w.run_on(self.proc, self.epoch, lambda: part.step(None, None),
                                    net=False))  # fmt: skip
            return None, None
        if kind == "MakeFlights":
            self.runs = []
            for i, entry in cmd.items:
                run = ItemRun(w, self.proc, self.keys[i], entry, cmd.deadline, self)
                caller = self.callers[i]
                caller.joined = False
                run.attach(caller)
                self.item_runs[i] = run
                self.runs.append(run)
            return [run.gen for run in self.runs], None
        if kind == "AwaitFlight":
            return self._await(cmd)
        if kind == "LaunchBatch":
            task = BatchRun(w, self.proc, self.keys)
            task.task, task.callers, task.item_runs = True, self.callers, self.item_runs
            task.parent = self
            task.machine = w.api.batch.run_shared_batch(self.proc.env, self.table, self.names,
                                                        cmd.items)  # fmt: skip
            w.batches.append(task)
            w.log(f"{self.name()} launches {task.name()} for "
                  f"{','.join(self.keys[i] for i, _ in cmd.items)}")  # fmt: skip
            task.step(None, None)
            return None, None
        w.fail("unknown-command", f"the simulator has no handler for {cmd!r}")
        return None

    def _lead(self, cmd: Any) -> None:
        """Many(Lead): every item's lease starts; one job runs the function for them all.
        (Sync: the function runs on the caller's thread, so the batch does nothing else.)"""
        w = self.w
        runs = [self.runs[k] for k, _ in cmd.items]
        for run, (_, c) in zip(runs, cmd.items, strict=True):
            run.pending = c
            run._lead(c, job=False)
        self.led_any = True
        if self.parent is not None:
            self.parent.led_any = True
        w.jobs.append(Job(self.proc, self.epoch, runs[0], runs[0].lead_token, next(w.ids),
                          lead=self))  # fmt: skip
        w.log(f"{self.name()} runs its function for {','.join(r.key for r in runs)}: job runs")
        self.leading = (cmd, runs)

    leading: Any = None

    def led(self, job: Job, how: str) -> None:
        """The batch's job ended: each led item's outcome (an abort or an error for all)."""
        if self.leading is None:
            return
        cmd, runs = self.leading
        self.leading = None
        outcome = self.w.api.envelope.Outcome
        outs = []
        for run in runs:
            if run.lease is not None:
                run.lease.running = False
            text = f"{run.key}@{run.lead_token}#{job.seq}"
            if how == "ok":
                outs.append(outcome(value=text))
            elif how == "raise":
                outs.append(outcome(error=ValueError(text)))
            else:
                outs.append(outcome(error=KeyboardInterrupt()))
            run.pending = None
        if self.pending is cmd:
            self.step(outs, None)

    def resume_if(self, cmd: Any, reply: Callable[[], Any]) -> None:
        """Step on with reply() if the batch still waits on cmd."""
        if self.pending is cmd:
            self.step(reply(), None)

    def _wait_any(self, cmd: Any) -> tuple[Any, BaseException | None] | None:
        w, proc = self.w, self.proc
        boxes = {i: self.runs[i].mailbox for i, _, pause in cmd.items
                 if not pause and self.runs[i].mailbox is not None}  # fmt: skip

        def take() -> dict[int, object]:
            return {i: box.pop(0) for i, box in boxes.items() if box}

        got = take()
        if got:
            return got, None
        first = min(until for _, until, _ in cmd.items)
        if first <= proc.clock():
            return {}, None
        state = {"open": True}

        def close() -> None:
            state["open"] = False
            for box in boxes.values():
                box.waker = None

        def wake() -> None:
            if state["open"] and self.pending is cmd:
                close()
                timer.cancelled = True
                w.soon(lambda: w.run_on(proc, self.epoch, lambda: self.resume_if(cmd, take),
                                        net=False))  # fmt: skip

        def expire() -> None:
            if state["open"] and self.pending is cmd:
                close()
                self.step({}, None)

        for box in boxes.values():
            box.waker = wake
        timer = w.at(proc, first, expire, "wait any")
        return None

    def _await(self, cmd: Any) -> tuple[Any, BaseException | None] | None:
        """AwaitFlight: a joined item waits on its process's flight of that key."""
        w, entry = self.w, cmd.entry
        run = w.flight_by_entry.get(id(entry))
        caller = None
        if run is not None and run.key in self.keys:
            caller = self.callers[self.keys.index(run.key)]
            if caller not in run.attached:
                caller.joined = True
                caller.seen = max(caller.seen, run.seen)
                run.attach(caller)

        def result() -> bool:
            done = bool(entry.result.is_set())
            retry = done and entry.result.get() is w.api.inflight.RETRY
            if retry and run is not None and caller is not None:
                caller.seen = max(caller.seen, run.seen)
            return done

        if entry.result.is_set():
            return result(), None
        state = {"open": True}

        def wake() -> None:
            if state["open"]:
                state["open"] = False
                if timer is not None:
                    timer.cancelled = True
                w.soon(lambda: w.run_on(self.proc, self.epoch, lambda: self.resume_if(cmd, result),
                                        net=False))  # fmt: skip

        def expire() -> None:
            if state["open"] and self.pending is cmd:
                state["open"] = False
                entry.result.discard_waker(wake)
                self.step(False, None)

        timer = None
        if cmd.timeout is not None:
            timer = w.at(self.proc, self.proc.clock() + cmd.timeout, expire, "await flight")
        entry.result.add_waker(wake)
        return None

    def ended(self, value: Any, error: BaseException | None) -> None:
        w = self.w
        self.done = True
        for run in self.runs:  # as the driver's finish_all: leases and subscriptions end
            if not run.done and run.batch is self:
                run.finish(None, None)
        if not self.callers or self.task:
            return  # the callers' outcomes come through their batch call
        if error is not None:
            if isinstance(error, KeyboardInterrupt) and self.led_any:
                for caller in self.callers:
                    if not caller.done:
                        caller.done, caller.result = True, "abort"
                w.log(f"{self.name()} ends: its own job was interrupted")
                return
            for caller in self.callers:
                w.end(caller, "error", error)
            return
        for i, (caller, outcome) in enumerate(zip(self.callers, value, strict=True)):
            own = self.item_runs.get(i)
            if own is not None and not caller.joined:
                caller.seen = max(caller.seen, own.seen)  # what its own flight saw
            if outcome is None:
                w.fail("unexpected-error", f"{self.name()}: {caller.key} came back absent")
            elif outcome.error is not None:
                w.end(caller, "error", outcome.error)
            else:
                w.end(caller, "value", outcome.value, stale=bool(outcome.stale))


def api_start_lease(api: Api, shim: Any, cmd: Any) -> Any:
    """The driver's own start_lease: its Lease, dated as the driver dates it."""
    api.base.DriverBase.start_lease(shim, cmd)
    return shim.backend.stub.added[-1]


# --- the renewer ------------------------------------------------------------------------------


@dataclass(eq=False)
class SimLease:
    """A lease the world watches: the real Lease, and what the invariants need of it."""

    proc: Proc
    epoch: int
    key: str
    token: int
    real: Any  # the driver's leases.Lease
    restarts: int  # Redis restarts when granted: a restart since loses the lock
    running: bool = True  # the user's function (or its complete) still runs under it
    faulted: bool = False  # a renewal of it was dropped or duplicated
    # Its renewals' round trips: [sent, answered] in true us (answered None: still out).
    trips: list[list[Any]] = field(default_factory=list)

    def in_transit_at(self, t: int) -> bool:
        """Was a renewal of it on its way at true time t?"""
        return any(sent < t and (done is None or done > t) for sent, done in self.trips)


class SimRenewer:
    """One process's renewal thread: the real LeaseBook, its batches carried by the world."""

    def __init__(self, world: World, proc: Proc) -> None:
        self.w, self.proc = world, proc
        self.book = world.api.leases.LeaseBook(lambda key: world.node_of(proc, key))
        self.by_real: dict[int, SimLease] = {}
        self.wake_at = math.inf
        self.timer: Timer | None = None

    def add(self, lease: SimLease) -> None:
        self.by_real[id(lease.real)] = lease
        first = self.book.add(lease.real)
        if first is not None:
            self._wake(first)

    def remove(self, lease: SimLease) -> None:
        lease.real.active = False

    def _wake(self, at: float) -> None:
        if at >= self.wake_at:
            return
        self.wake_at = at
        if self.timer is not None:
            self.timer.cancelled = True
        self.timer = self.w.at(self.proc, at, self.fire, "renewer")

    def fire(self) -> None:
        w, proc = self.w, self.proc
        self.timer, self.wake_at = None, math.inf
        if w.now_us < proc.starved_until:
            self._wake(proc.clock() + (proc.starved_until - w.now_us) * (1 + proc.drift) / US)
            return
        now = proc.clock()
        groups: dict[str, list[Any]] = {}
        for group, real in self.book.due(now):
            groups.setdefault(group, []).append(real)
        for group, batch in groups.items():
            self._send(group, batch, now)
        nxt = self.book.next_look()
        if not math.isinf(nxt):
            self._wake(max(nxt, now))

    def _send(self, node: str, batch: list[Any], sent: float) -> None:
        """One round trip of RENEW for a batch at one node; then the redirections it met,
        followed once as renewal._redirect decides (ASKING for ASK)."""
        w, proc, api = self.w, self.proc, self.w.api
        items = [(lease.lock_key, lease.value, lease.ttl_ms) for lease in batch]
        sims = [self.by_real.get(id(lease)) for lease in batch]
        trip: list[Any] = [w.now_us, None]
        for s in sims:
            if s is not None:
                s.trips = [t for t in s.trips if t[1] is None or w.now_us - t[1] < 10 * US]
                s.trips.append(trip)

        def run_one(i: int, at: str, asking: bool) -> Any:
            sc = api.commands.renew_call(*items[i])
            keys = [_enc(k) for k in sc.keys]
            args = [_enc(a) for a in sc.args]
            try:
                return w.at_node(at, keys, asking,
                                 lambda: w.redis.evalsha(sc.script.sha, keys, args))  # fmt: skip
            except (ResponseError, ScriptError) as exc:
                return exc

        def answered(replies: Any, error: BaseException | None) -> None:
            trip[1] = w.now_us
            for s in sims:
                if s is not None and error is not None:
                    s.faulted = True  # no answer in time: a slow or broken link
            if error is not None:
                self._settle(batch, sent, None, f"{type(error).__name__}: {error}")
                return
            out = [_flag(r) for r in replies]
            redirects = []
            for i, reply in enumerate(replies):
                target = api.renewal._redirect(reply)
                if target is not None:
                    redirects.append((i, *target))
                    if target[0] == "MOVED":
                        proc.cluster_view = target[1]
            if not redirects:
                self._settle(batch, sent, out, None)
                return
            trip2: list[Any] = [w.now_us, None]
            for s in sims:
                if s is not None:
                    s.trips.append(trip2)

            def followed(more: Any, error2: BaseException | None) -> None:
                trip2[1] = w.now_us
                for s in sims:
                    if s is not None and error2 is not None:
                        s.faulted = True
                if error2 is None:
                    for (i, _, _, _), reply in zip(redirects, more, strict=True):
                        out[i] = _flag(reply)
                self._settle(batch, sent, out, None)

            w.request(proc, f"RENEW x{len(redirects)} (redirected)",
                      lambda: [run_one(i, host, kind == "ASK") for i, kind, host, _ in redirects],
                      followed, timeout=min(w.p.socket_timeout, batch[0].ttl / 4),
                      lease=sims[0])  # fmt: skip

        w.request(proc, f"RENEW x{len(batch)}@{node}",
                  lambda: [run_one(i, node, False) for i in range(len(batch))], answered,
                  timeout=min(w.p.socket_timeout, batch[0].ttl / 4), lease=sims[0])  # fmt: skip

    def _settle(self, batch: list[Any], sent: float, replies: Any, error: str | None) -> None:
        now = self.proc.clock()
        earliest = self.book.settle(batch, sent, now, replies or [], error)
        if not math.isinf(earliest):
            self._wake(earliest)


def _cycle(start: Any, edges: dict[Any, list[tuple[str, Any]]]) -> list[tuple[Any, str]] | None:
    """A path of waits (node, key) from start back to start, if any."""
    path: list[tuple[Any, str]] = []
    seen: set[int] = set()

    def visit(b: Any) -> list[tuple[Any, str]] | None:
        for key, o in edges.get(b, []):
            path.append((b, key))
            if o is start:
                return list(path)
            if id(o) not in seen:
                seen.add(id(o))
                found = visit(o)
                if found:
                    return found
            path.pop()
        return None

    return visit(start)


def _flag(reply: Any) -> int:
    if isinstance(reply, Exception):
        return -1
    try:
        return 1 if int(reply) == 1 else 0
    except (TypeError, ValueError):
        return -1


# --- helpers ------------------------------------------------------------------------------


class _Box(list):  # type: ignore[type-arg]
    """A mailbox: a list with a waker slot."""

    waker: Callable[[], None] | None = None


class _RenewerStub:
    """What ``start_lease`` hands its lease to; the world's SimRenewer renews it."""

    def __init__(self) -> None:
        self.added: list[Any] = []

    def add(self, lease: Any) -> None:
        self.added.append(lease)

    def remove(self, lease: Any) -> None:
        pass

    def completing(self, lease: Any) -> None:
        pass


class _Shim:
    """Stands in for DriverBase's self in ``script_for``, ``reply_of``, ``failed`` and
    ``start_lease``: the driver's own code, on the process's clock."""

    def __init__(self, spec: Any, publish: str, api: Api, proc: Proc) -> None:
        self.spec = spec
        self.stamp = api.commands.Stamp()
        self.backend = _ShimBackend(publish)
        self.lease: Any = None
        self.clock = proc.clock
        self.background = False  # a place for a background run (the shim never runs out)
        self._driver = api.base.DriverBase

    def give_back_background(self) -> None:
        self.background = False

    def _renew(self, value: str, since: float, loop: Any) -> Any:
        return self._driver._renew(self, value, since, loop)


class _ShimBackend:
    def __init__(self, publish: str) -> None:
        self.publish = publish
        self.kind = "single"
        self.stub = _RenewerStub()

    def renewer(self) -> _RenewerStub:
        return self.stub

    def reserve_background(self) -> bool:
        return True

    def release_background(self) -> None:
        pass


def _enc(value: Any) -> bytes:
    """What redis-py's encoder sends for an argument."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (int, float)):
        return repr(value).encode()
    raise TypeError(f"cannot send {value!r}")


def _refusal(label: str) -> BaseException:
    """The error reply a refused request gets: a plain read is refused as an ACL without
    MGET or a slot elsewhere refuses it (an error reply: ReadRefused, the acquire script
    decides); any other command as a server still loading its data refuses it (redis-py's
    BusyLoadingError: BackendUnavailable)."""
    if label.startswith("READ"):
        return ResponseError("NOPERM this user has no permissions to run the 'mget' command")
    return BusyLoadingError("LOADING Redis is loading the dataset in memory")


def _granted_token(raw: Any) -> int:
    """The lease an acquire reply grants (0: none): a bare token, {2, token, ...} (lead with
    a stale value to fall back on) or {3, record, fresh, age, token} (a refresh)."""
    if isinstance(raw, int):
        return raw
    if isinstance(raw, list) and raw and raw[0] == 2 and len(raw) > 1:
        return int(raw[1])
    if isinstance(raw, list) and raw and raw[0] == 3 and len(raw) > 4:
        return int(raw[4])
    return 0


def _token_in(data: bytes) -> int | None:
    """The lease token a record (``<token>:...``) or notice (``N:<token>...``) names."""
    head, _, rest = data.partition(b":")
    if head.isdigit():
        return int(head)
    if head in (b"N", b"A"):
        digits = re.match(rb"\d+", rest)
        return int(digits.group()) if digits else None
    return None


def _brief(data: bytes) -> str:
    token = _token_in(data)
    kind = data[:1].decode("ascii", "replace")
    if kind in ("N", "A"):
        return f"notice {kind}:{token}"
    return f"record {token}"


def _show(raw: Any, error: BaseException | None) -> str:
    if error is not None:
        return f"error {error}"
    if isinstance(raw, list):
        return "[" + ", ".join(_show(r, None) for r in raw) + "]"
    if isinstance(raw, Exception):
        return f"error {raw}"
    if isinstance(raw, bytes):
        if len(raw) > 40:
            return _brief(raw)
        return raw.decode("utf-8", "replace")
    return repr(raw)
