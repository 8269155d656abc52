"""The simulated world: processes running the real ``run_flight``, a network, one Redis.

Nothing here runs on its own: every step of a schedule is applied by ``schedule.apply``,
and time moves only in ``World.advance``. True time is an integer count of
microseconds; the store's clock is true time plus an offset (a restart may move it), and
each process's monotonic clock is ``base + true * (1 + drift)`` with ``|drift| <= max_drift``
(the skew bound the invariants allow for). A paused process keeps its clock running but
handles nothing: what reaches it waits in its inbox until it resumes.

What each process holds mirrors the sync driver (dedupe/drivers/sync.py): an in-process
table of flights (the first caller of a key drives ``run_flight``, the others join and get
its outcome, or start over on RETRY), a pub/sub hub (per-channel mailboxes, a confirmation,
RECHECK into every mailbox after a reconnect), and a renewer stand-in that renews each
lease at ttl/3 through the real RENEW script. Script commands become KEYS/ARGV through the
package's own builders (``DriverBase.script_for`` and ``dedupe.commands``), so the mapping
cannot drift from the drivers'.

The network holds requests (process -> Redis), replies and pub/sub messages in transit;
a step delivers, drops or duplicates one of them. A dropped request never ran; a dropped
reply ran; either way the client gives up after ``socket_timeout`` on its own clock, as
redis-py does, and the driver sees BackendUnavailable (through ``dedupe.commands.translate``).

Invariants (``KINDS``), checked as things happen and after every step:
- no caller returns an outcome of a lease older than the one its flight waited on or it
  joined (older-outcome); one that drove its own flight gets none older than a lease granted
  before it started, unless its own leader made it (stale-outcome); no outcome is stored or
  published after a newer lease was granted (stale-record, stale-publish);
- a live lock is never replaced, and fencing tokens strictly grow per key, across restarts
  (lock-overwrite, token-order);
- when a lease is granted, every older leader still running its function knows its lease is
  lost, by its own clock, unless a Redis restart dropped the lock (unaware-leader); the skew
  bound is ``max_drift``;
- the protocol never waits past the lease bound; a caller with a wait_timeout ends within
  it plus one subscribe and one round trip, pauses not counted; after the faults stop, every
  call ends (unbounded-wait, missed-deadline, stuck-call); so a finished outcome reaches every
  caller that joined its flight, unless BackendUnavailable or WaitTimeout says why not;
- no key lives without a TTL or longer than its bound (ttl).

Not modelled: the asyncio driver (the sync driver's decisions are mirrored), the renewer's
batching and worker threads, TIME going backwards. The network is harsher than TCP: it may
reorder messages of one pub/sub connection. A restart takes at least 1 ms of Redis's clock.
"""

from __future__ import annotations

import heapq
import importlib
import inspect
import itertools
import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

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
        "missed-deadline",  # a caller waited past its wait_timeout (plus one round trip)
        "unbounded-wait",  # the protocol asked for a wait longer than the lease allows
        "stuck-call",  # after the faults stopped, a call never ended
        "ttl",  # a key with no expiry or one longer than its bound
        "unexpected-error",  # a caller raised what no documented fault explains
        "wrong-key",
        "script-error",
        "unknown-command",
    }
)

US = 1_000_000
_VALUE = re.compile(r"^(k\d+)@(\d+)#(\d+)$")


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
    confirm_timeout: float = 3.0  # the backend's connect_timeout + socket_timeout
    # The clock-skew bound: each process's clock runs within +-4 % of the store's rate. A
    # clock-deciding renewer gives a lease up 5 % early (renewal.lease_margin), which covers it.
    max_drift: float = 0.04
    loss_margin: float = 0.05  # fraction of the lease a clock-mode renewer gives up early
    secret: bytes = b"sim-secret"
    max_hold_ms: int = 20_000  # where the code has max_hold (the default 300 s, scaled)


class Api:
    """The package under test, imported by name so ``--package`` can point at any checkout."""

    def __init__(self) -> None:
        self.protocol = importlib.import_module("dedupe.protocol")
        self.commands = importlib.import_module("dedupe.commands")
        self.envelope = importlib.import_module("dedupe.envelope")
        self.errors = importlib.import_module("dedupe.errors")
        self.keys = importlib.import_module("dedupe.keys")
        self.base = importlib.import_module("dedupe.drivers.base")
        self.scripts = [
            v for v in vars(self.commands).values() if isinstance(v, self.commands.Script)
        ]
        # How the driver holds a lease (mirrored by the stand-in): renewed until the complete
        # script returned (new) or only while the function runs (old); dated from the acquire's
        # send time or from the start of the function; bounded by max_hold or not.
        base = self.base.DriverBase
        start = inspect.getsource(getattr(base, "start_lease", getattr(base, "leased", base)))
        self.renew_through_complete = hasattr(base, "start_lease") and hasattr(base, "finish")
        self.lease_from_acquire = "acquired_at" in start
        self.lease_max_hold = "max_hold" in start
        self.renewal = importlib.import_module("dedupe.renewal")
        # A renewer that decides a lost lease from its own clock, not only from a failed call.
        self.clock_renewer = hasattr(self.renewal, "lease_margin")

    def margin(self, ttl: float, fallback: float) -> float:
        if self.clock_renewer:
            return float(self.renewal.lease_margin(ttl))
        return ttl * fallback


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


@dataclass(eq=False)
class Request:
    proc: Proc
    epoch: int
    label: str
    run: Callable[[], Any]  # executes at Redis, returns the raw reply
    on_reply: Callable[[Any, BaseException | None], None]
    answered: bool = False
    timer: Timer | None = None


@dataclass(eq=False)
class Caller:
    id: int
    proc: Proc
    epoch: int
    key: str
    start_us: int
    deadline: float | None  # on its process's clock
    ref_start: int  # the newest lease granted on the key before it started
    paused_at_start: float
    seen: int = 0  # the newest lease its flight saw (joiners: what the driver saw when joining)
    joined: bool = False
    own_token: int = 0  # the lease of the local flight it drove or joined, if that one led
    done: bool = False
    result: str = ""
    timer: Timer | None = None


@dataclass(eq=False)
class Entry:
    key: str
    driver: Driver
    joiners: list[Caller] = field(default_factory=list)


@dataclass(eq=False)
class Lease:
    key: str
    lock_key: str
    value: str
    token: int
    ttl: float
    last_ok: float
    restarts: int  # Redis restarts when last confirmed: a restart since loses the lock
    margin: float  # how early a clock-deciding renewer gives the lease up
    hold_until: float  # max_hold: renewal stops here (inf: no bound)
    lost: bool = False
    active: bool = True
    running: bool = True  # the user's function is still running under it
    completing: bool = False  # our complete script is on its way: a gone lock is our release


@dataclass(eq=False)
class Job:
    proc: Proc
    epoch: int
    driver: Driver
    token: int
    seq: int


class Hub:
    """One process's pub/sub hub: channel -> mailboxes, and whether Redis confirmed it."""

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

        def run() -> Any:
            if p.epoch == epoch:  # a dead process's late SUBSCRIBE subscribes nobody
                w.subs.setdefault(channel, set()).add(p)
            return 1

        def ack(_: Any, error: BaseException | None) -> None:
            if error is None and channel in self.channels:
                self.confirmed[channel] = True
                for wake in self.waiters.pop(channel, []):
                    wake(True)

        w.request(p, f"SUBSCRIBE {w.short(channel)}", run, ack, timeout=False)

    def unsubscribe(self, channel: str, mailbox: list[object]) -> None:
        boxes = self.channels.get(channel)
        if boxes is None or mailbox not in boxes:
            return
        boxes.remove(mailbox)
        if not boxes:
            del self.channels[channel]
            self.confirmed.pop(channel, None)
            self.world.subs.get(channel, set()).discard(self.proc)

    def reconnect(self) -> None:
        """The connection dropped (or was kicked): re-subscribe all, every waiter re-checks."""
        recheck = self.world.api.protocol.RECHECK
        for channel, boxes in list(self.channels.items()):
            self.world.subs.get(channel, set()).discard(self.proc)
            self.confirmed[channel] = False
            self._send(channel)
            for box in list(boxes):
                self.world.put(self.proc, box, recheck)

    def message(self, channel: str, data: bytes) -> None:
        for box in list(self.channels.get(channel, [])):
            self.world.put(self.proc, box, data)


class Proc:
    """One simulated process (an incarnation: a kill starts a fresh one in the slot)."""

    def __init__(self, world: World, idx: int, drift: float, base_us: int) -> None:
        self.world, self.idx = world, idx
        self.epoch = 0
        self.drift, self.base_us = drift, base_us
        self.paused_until: int | None = None
        self.partitioned = False
        self.inbox_net: list[Callable[[], None]] = []
        self.inbox_timers: list[Callable[[], None]] = []
        self.flights = 0
        self.paused_total = 0.0  # seconds of its clock spent paused
        self.reset()

    def reset(self) -> None:
        self.table: dict[str, Entry] = {}
        self.hub = Hub(self.world, self)
        self.leases: list[Lease] = []

    def clock(self) -> float:
        return (self.base_us + self.world.now_us * (1 + self.drift)) / US

    def true_us(self, at: float) -> int:
        """The first true microsecond at which this clock reads ``at`` or later."""
        return math.ceil((at * US - self.base_us) / (1 + self.drift) - 1e-6)

    def name(self) -> str:
        return f"p{self.idx}" + (f"'{self.epoch}" if self.epoch else "")


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
        self.procs = [Proc(self, i, drifts[i], 10_000 * US * (i + 1)) for i in range(params.procs)]
        self.subs: dict[str, set[Proc]] = {}
        self.net: list[Item] = []
        self.timers: list[tuple[int, int, Timer]] = []
        self.seq = itertools.count()
        self.callers: list[Caller] = []
        self.jobs: list[Job] = []
        self.published: list[tuple[str, bytes]] = []
        self.max_token: dict[str, int] = {}  # newest lease granted per key, across restarts
        self.grants: dict[tuple[str, int], int] = {}  # (key, token) -> Redis restarts by then
        self.faults = 0
        self.codec = api.envelope.Codec(api.envelope.PICKLE, secret=params.secret)
        self.names = {f"k{i}": api.keys.names_for("sim", f"k{i}") for i in range(params.keys)}
        self.by_channel = {n.channel: k for k, n in self.names.items()}
        self.by_lock = {n.lock.encode(): k for k, n in self.names.items()}
        self.by_result = {n.result.encode(): k for k, n in self.names.items()}
        self.trace = trace
        self.ignored: frozenset[str] = frozenset()
        self.lines: list[str] = []
        self.ids = itertools.count(1)

    # --- plumbing -------------------------------------------------------------------------

    def short(self, channel: str) -> str:
        return self.by_channel.get(channel, channel)

    def log(self, text: str) -> None:
        if self.trace:
            self.lines.append(f"    {self.now_us / 1000:10.3f} ms  {text}")

    def live(self, proc: Proc, epoch: int) -> bool:
        return proc.epoch == epoch

    def run_on(self, proc: Proc, epoch: int, fn: Callable[[], None], *, net: bool) -> None:
        """Run fn on the process now, or when it resumes; never on a later incarnation."""
        if proc.epoch != epoch:
            return
        if proc.paused_until is not None:
            (proc.inbox_net if net else proc.inbox_timers).append(fn)
            return
        fn()

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
        timeout: bool = True,
    ) -> None:
        req = Request(proc, proc.epoch, label, run, on_reply)
        if timeout:

            def expire() -> None:
                if not req.answered:
                    req.answered = True
                    self.log(f"{proc.name()}: no reply to {label} in socket_timeout")
                    on_reply(None, TimeoutError(f"sim: no reply within {self.p.socket_timeout}s"))

            req.timer = self.at(proc, proc.clock() + self.p.socket_timeout, expire, "timeout")
        self._send(Item(next(self.seq), "req", proc, proc.epoch, label, lambda: self._execute(req)))

    def _send(self, item: Item) -> None:
        self.net.append(item)

    def _execute(self, req: Request) -> None:
        """A request reaches Redis: run it (even for a process that died since), reply."""
        try:
            raw, error = req.run(), None
        except ScriptError as exc:
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

        self._send(Item(next(self.seq), "reply", req.proc, req.epoch, f"reply {req.label}", reply))

    def _publish(self, channel: bytes, data: bytes) -> int:
        ch = channel.decode()
        self.published.append((ch, data))
        self._check_publish(ch, data)
        receivers = list(self.subs.get(ch, ()))
        for proc in receivers:
            self._send_message(proc, ch, data)
        return len(receivers)

    def _send_message(self, proc: Proc, ch: str, data: bytes) -> None:
        epoch = proc.epoch

        def deliver() -> None:
            self.run_on(proc, epoch, lambda: proc.hub.message(ch, data), net=True)

        label = f"msg {self.short(ch)} {_brief(data)} to {proc.name()}"
        self._send(Item(next(self.seq), "msg", proc, epoch, label, deliver))

    def script(
        self, proc: Proc, sc: Any, on_reply: Callable[[Any, BaseException | None], None]
    ) -> None:
        keys = [_enc(k) for k in sc.keys]
        args = [_enc(a) for a in sc.args]
        name = _script_name(self.api, sc.script)
        key = self._key_of(keys[0])

        def run() -> Any:
            raw = self.redis.evalsha(sc.script.sha, keys, args)
            if name == "ACQUIRE" and isinstance(raw, int):
                self._granted(key, raw, proc)  # a lease granted: the bare token
            elif name == "ACQUIRE" and isinstance(raw, list) and raw and raw[0] == 2:
                self._granted(key, int(raw[1]), proc)  # older scripts: {2, token}
            return raw

        self.request(proc, f"{name} {key}", run, on_reply)

    def _key_of(self, redis_key: bytes) -> str:
        for table in (self.by_lock, self.by_result):
            if redis_key in table:
                return table[redis_key]
        return redis_key.decode()

    # --- stepping -------------------------------------------------------------------------

    def deliverable(self) -> list[Item]:
        return [i for i in self.net if not i.proc.partitioned]

    def deliver(self, n: int, *, mode: str = "deliver") -> str:
        items = self.deliverable()
        if mode == "dup":
            items = [i for i in items if i.kind != "reply"]  # a reply answers one request
        if not items:
            return "nothing in transit"
        item = items[n % len(items)]
        if mode == "drop":
            self.net.remove(item)
            self.faults += 1
            return f"lost {item.label}"
        if mode == "dup":
            self.net.append(
                Item(next(self.seq), item.kind, item.proc, item.epoch, item.label, item.deliver)
            )
            self.faults += 1
            return f"duplicated {item.label}"
        self.net.remove(item)
        self.log(f"arrives: {item.label}")
        item.deliver()
        return ""

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
        epoch = proc.epoch

        def resume() -> None:
            if proc.epoch != epoch:
                return
            proc.paused_until = None
            proc.paused_total += us * (1 + proc.drift) / US
            # What arrived on its sockets first, then the timers that came due meanwhile.
            while proc.inbox_net or proc.inbox_timers:
                queue = proc.inbox_net if proc.inbox_net else proc.inbox_timers
                queue.pop(0)()

        self.at(None, self.now_us + us, resume, "resume")

    def kill(self, proc: Proc) -> None:
        """The process dies: its callers, jobs and leases vanish; a fresh one takes the slot."""
        self.faults += 1
        for caller in self.callers:
            if caller.proc is proc and caller.epoch == proc.epoch and not caller.done:
                caller.done, caller.result = True, "killed"
        for lease in proc.leases:
            lease.active = lease.running = False
        for subs in self.subs.values():
            subs.discard(proc)
        self.jobs = [j for j in self.jobs if j.proc is not proc]
        proc.epoch += 1
        proc.paused_until = None
        proc.partitioned = False
        proc.inbox_net.clear()
        proc.inbox_timers.clear()
        proc.reset()

    def restart_redis(self, jump_ms: int) -> None:
        self.faults += 1
        self.redis.restart(jump_ms)
        self.subs.clear()
        # Connections reset: whatever was in transit is gone; clients time out, hubs reconnect.
        self.net.clear()
        for proc in self.procs:
            self.run_on(proc, proc.epoch, proc.hub.reconnect, net=True)

    def replay(self, n: int) -> str:
        """Someone with access to Redis publishes a genuine earlier message again."""
        if not self.published:
            return "nothing published yet"
        ch, data = self.published[n % len(self.published)]
        for proc in list(self.subs.get(ch, ())):
            self._send_message(proc, ch, data)
        return f"replayed {self.short(ch)} {_brief(data)}"

    def forge(self, n: int, k: int) -> str:
        """Someone writes bytes that are not a genuine outcome: garbage or unsigned look-alikes."""
        key = f"k{k % len(self.names)}"
        names = self.names[key]
        huge = self.max_token.get(key, 0) + 10**6
        variant = n % 4
        if variant == 2:
            # A record header the scripts accept (fresh, newest token) on an unsigned body.
            forged = b"%d:1000:3600:DD-forged" % huge
            self.redis.data[names.result.encode()] = (forged, self.redis.now_ms() + 3600)
            return f"forged the result key of {key} (token {huge}, unsigned)"
        data = (b"hello", b"%d:1000:3600:DD-forged" % huge, b"", b"N:%d" % huge)[variant]
        for proc in list(self.subs.get(names.channel, ())):
            self._send_message(proc, names.channel, data)
        return f"forged a message on {key}: {data!r}"

    # --- callers and jobs -----------------------------------------------------------------

    def call(self, proc: Proc, key: str, wait_ms: int) -> Caller:
        deadline = proc.clock() + wait_ms / 1000 if wait_ms else None
        caller = Caller(
            next(self.ids),
            proc,
            proc.epoch,
            key,
            self.now_us,
            deadline,
            self.max_token.get(key, 0),
            proc.paused_total,
        )
        self.callers.append(caller)
        self._join(caller)
        return caller

    def _join(self, caller: Caller) -> None:
        proc = caller.proc
        entry = proc.table.get(caller.key)
        if entry is not None:
            caller.joined = True
            caller.seen = max(caller.seen, entry.driver.seen)
            caller.own_token = entry.driver.lead_token
            entry.joiners.append(caller)
            if caller.deadline is not None and caller.timer is None:

                def expire() -> None:
                    if not caller.done and caller in entry.joiners:
                        entry.joiners.remove(caller)
                        self.end(caller, "error", self.api.errors.WaitTimeout("joiner waited"))

                caller.timer = self.at(proc, caller.deadline, expire, "join deadline")
            return
        caller.joined = False  # (again) the driver of its own flight
        driver = Driver(self, caller)
        proc.table[caller.key] = Entry(caller.key, driver)
        driver.resume(None, None)

    def finish_job(self, n: int, how: str) -> str:
        if not self.jobs:
            return "no job running"
        job = self.jobs.pop(n % len(self.jobs))
        key = job.driver.key
        if how == "ok":
            outcome = self.api.envelope.Outcome(value=f"{key}@{job.token}#{job.seq}")
        elif how == "raise":
            outcome = self.api.envelope.Outcome(error=ValueError(f"{key}@{job.token}#{job.seq}"))
        else:
            outcome = self.api.envelope.Outcome(error=KeyboardInterrupt())
        self.run_on(job.proc, job.epoch, lambda: job.driver.led(outcome), net=False)
        return f"job {key}@{job.token} on {job.proc.name()} -> {how}"

    def end(self, caller: Caller, how: str, value: Any) -> None:
        """A caller returns: check what it got (invariant: no outcome older than its lease)."""
        caller.done = True
        if caller.timer is not None:
            caller.timer.cancelled = True
        errors = self.api.errors
        who = f"caller #{caller.id} ({caller.proc.name()} {caller.key})"
        if how == "value" or (isinstance(value, ValueError) and _VALUE.match(str(value))):
            text = str(value)
        elif isinstance(value, KeyboardInterrupt):
            caller.result = "abort"
            self.log(f"{who} ends: its own job was interrupted")
            if caller.joined or not caller.own_token:
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

    # --- invariants -----------------------------------------------------------------------

    def fail(self, kind: str, detail: str) -> None:
        """An invariant failed: stop the run, unless this kind is being looked past."""
        assert kind in KINDS, kind
        if kind in self.ignored:
            self.log(f"(ignored) {kind}: {detail}")
            return
        raise Violation(kind, detail)

    def _granted(self, key: str, token: int, proc: Proc) -> None:
        last = self.max_token.get(key, 0)
        self.log(f"redis granted lease {token} on {key} to {proc.name()}")
        if token <= last:
            self.fail("token-order", f"lease {token} on {key} after lease {last}")
        self.max_token[key] = token
        self.grants[(key, token)] = self.redis.restarts
        for other in self.procs:
            for lease in other.leases:
                if lease.key != key or not lease.running or lease.token >= token:
                    continue
                if lease.restarts != self.redis.restarts:
                    continue  # a restart dropped its lock: no clock can tell (documented)
                if not self.known_lost(other, lease):
                    age = other.clock() - lease.last_ok
                    self.fail(
                        "unaware-leader",
                        f"lease {token} on {key} granted to {proc.name()} while {other.name()} "
                        f"still runs lease {lease.token} unaware it is lost "
                        f"(last renewal {age:.3f}s ago by its clock, ttl {lease.ttl}s)",
                    )

    def known_lost(self, proc: Proc, lease: Lease) -> bool:
        if lease.lost:
            return True
        if self.api.clock_renewer:
            now = proc.clock()
            return now - lease.last_ok >= lease.ttl - lease.margin or now >= lease.hold_until
        return False

    def _on_set(self, key: bytes, value: bytes, px: int | None) -> None:
        if key in self.by_lock:
            held = self.redis.get(key)
            if held is not None and held != value:
                self.fail("lock-overwrite", f"{key!r}: {held!r} replaced by {value!r} while live")
        if key in self.by_result:
            k = self.by_result[key]
            token = int(value.split(b":", 1)[0] or 0)
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
        """After every step: keys have bounded lifetimes; callers with deadlines end in time."""
        p = self.p
        for raw in self.redis.live_keys():
            pttl = self.redis.pttl(raw)
            if raw in self.by_lock:
                bound = p.lock_ttl_ms
            elif raw in self.by_result:
                bound = max(p.result_ttl_ms, p.grace_ms)
            else:
                bound = p.token_ttl_ms
            if pttl == -1 or pttl > bound:
                self.fail("ttl", f"{raw.decode()} lives {pttl} ms (bound {bound} ms)")
        # After the deadline a flight may finish one subscribe and one script call.
        slack = p.confirm_timeout + p.socket_timeout + 0.1
        for caller in self.callers:
            proc = caller.proc
            if caller.done or caller.deadline is None or proc.paused_until is not None:
                continue
            if caller.own_token:
                continue  # its flight leads: wait_timeout bounds waiting, not running the job
            # Time the process spent paused does not count: it could not act.
            late = proc.clock() - (proc.paused_total - caller.paused_at_start) - caller.deadline
            if proc.epoch == caller.epoch and late > slack:
                self.fail(
                    "missed-deadline",
                    f"caller #{caller.id} ({proc.name()} {caller.key}) still waits "
                    f"{late:.3f}s past its wait_timeout (not counting pauses)",
                )

    def check_quiet(self) -> None:
        """After the schedule and a fault-free drain: every call ended."""
        for caller in self.callers:
            if not caller.done and caller.proc.epoch == caller.epoch:
                self.fail(
                    "stuck-call",
                    f"caller #{caller.id} ({caller.proc.name()} {caller.key}) never ended",
                )


class Driver:
    """One flight: the real run_flight generator, its commands carried through the world."""

    def __init__(self, world: World, caller: Caller) -> None:
        self.w, self.caller = world, caller
        self.proc, self.epoch, self.key = caller.proc, caller.epoch, caller.key
        proc = self.proc
        proc.flights += 1
        api, p = world.api, world.p
        self.names = world.names[self.key]
        spec_fields = api.protocol.FlightSpec.__dataclass_fields__
        # result_ttl_ms was keep_ms before the settings were declared once (--package).
        result_ttl = "result_ttl_ms" if "result_ttl_ms" in spec_fields else "keep_ms"
        self.spec = api.protocol.FlightSpec(
            names=self.names,
            owner=f"{proc.name()}:{proc.flights}",
            lock_ttl_ms=p.lock_ttl_ms,
            token_ttl_ms=p.token_ttl_ms,
            grace_ms=p.grace_ms,
            **{result_ttl: p.result_ttl_ms},
            # k1's outcomes never travel inline: its followers read the stored record.
            inline_max_bytes=0 if self.key == "k1" else 32 * 1024,
            deadline=caller.deadline,
        )
        if hasattr(self.spec, "max_hold_ms"):
            self.spec.max_hold_ms = p.max_hold_ms
        self.gen = api.protocol.run_flight(self.spec, world.codec, proc.clock)
        # k1 publishes as on a cluster (SPUBLISH); the sim's subscribers get both alike.
        self.shim = _Shim(self.spec, "SPUBLISH" if self.key == "k1" else "PUBLISH", api)
        self.seen = 0
        self.lead_token = 0
        self.lease: Lease | None = None
        self.mailbox: list[object] | None = None
        self.wait_timer: Timer | None = None
        self.done = False
        self.acquire_sent = 0.0

    def resume(self, reply: object, error: BaseException | None) -> None:
        if self.done or self.proc.epoch != self.epoch:
            return
        while True:
            try:
                cmd = self.gen.send(reply) if error is None else self.gen.throw(error)
            except StopIteration as stop:
                self.finish(stop.value, None)
                return
            except Exception as exc:
                self.finish(None, exc)
                return
            reply, error = None, None
            handled = self.handle(cmd)
            if handled is None:
                return  # the reply comes later
            reply, error = handled

    # --- commands -------------------------------------------------------------------------

    def handle(self, cmd: Any) -> tuple[object, BaseException | None] | None:
        api, w = self.w.api, self.w
        name = type(cmd).__name__
        with _clock(self.proc.clock):  # script_for notes when an acquire is sent
            sc = api.base.DriverBase.script_for(self.shim, cmd)
        if sc is not None:
            if name == "Acquire":
                self.acquire_sent = self.proc.clock()  # for drivers that do not note it
                if hasattr(self.shim, "stamp"):
                    self.shim.stamp.sent = self.acquire_sent  # written to the socket now
            elif name == "Complete" and self.lease is not None:
                self.lease.completing = True  # as Renewer.completing()
            w.script(self.proc, sc, lambda raw, err: self._scripted(cmd, raw, err))
            return None
        bound = self.spec.lock_ttl_ms / 1000 + self.spec.slack(self.spec.lock_ttl_ms) + 1e-6
        if name == "Wait":
            if cmd.timeout > bound:
                self.w.fail(
                    "unbounded-wait", f"Wait({cmd.timeout}) past the lease bound {bound:.3f}s"
                )
            return self._wait(cmd.timeout)
        if name == "Subscribe":
            return self._subscribe(getattr(cmd, "timeout", None))
        if name == "Lead":
            self._lead(cmd)
            return None
        if name == "Release":
            self._release()
            return None, None
        if name == "Pause":
            if cmd.seconds > bound:
                self.w.fail("unbounded-wait", f"Pause({cmd.seconds})")
            w.at(
                self.proc, self.proc.clock() + cmd.seconds, lambda: self.resume(None, None), "pause"
            )
            return None
        self.w.fail("unknown-command", f"the simulator has no handler for {cmd!r}")
        return None

    def _scripted(self, cmd: Any, raw: Any, error: BaseException | None) -> None:
        api = self.w.api
        base = api.base.DriverBase
        if error is not None:
            if isinstance(error, ScriptError):
                self.w.fail("script-error", f"{type(cmd).__name__}: {error}")
                error = ResponseError(str(error))  # what redis-py raises for an error reply
            failed = getattr(base, "failed", None)  # new drivers: Unanswered for an acquire
            self.resume(
                None, failed(self.shim, cmd, error) if failed else api.commands.translate(error)
            )
            return
        if isinstance(inspect.getattr_static(base, "reply_of"), staticmethod):
            reply = base.reply_of(cmd, raw)
        else:
            reply = base.reply_of(self.shim, cmd, raw)
        if type(cmd).__name__ == "Acquire":
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

    def _subscribe(self, timeout: float | None) -> tuple[object, BaseException | None] | None:
        hub, channel = self.proc.hub, self.names.channel
        self._mailbox()
        new = timeout is not None
        if hub.confirmed.get(channel):
            return (True if new else None), None
        limit = (
            self.w.p.confirm_timeout if timeout is None else min(timeout, self.w.p.confirm_timeout)
        )
        state = {"open": True}

        def wake(ok: bool) -> None:
            if state["open"]:
                state["open"] = False
                timer.cancelled = True
                self.resume(True if new else None, None)

        def expire() -> None:
            if not state["open"]:
                return
            state["open"] = False
            if new:
                self.resume(False, None)
                return
            # The old driver: kick the hub (reconnect), fail the call.
            hub.reconnect()
            self.resume(
                None, self.w.api.errors.BackendUnavailable("sim: subscription not confirmed")
            )

        hub.waiters.setdefault(channel, []).append(wake)
        timer = self.w.at(self.proc, self.proc.clock() + limit, expire, "confirm")
        return None

    def _wait(self, timeout: float) -> tuple[object, BaseException | None] | None:
        box = self._mailbox()
        if box:
            return box.pop(0), None
        state = {"open": True}

        def wake() -> None:
            if state["open"]:
                state["open"] = False
                timer.cancelled = True
                self.resume(box.pop(0) if box else None, None)

        def expire() -> None:
            if state["open"]:
                state["open"] = False
                box.waker = None  # type: ignore[attr-defined]
                self.resume(None, None)

        box.waker = wake  # type: ignore[attr-defined]
        timer = self.w.at(self.proc, self.proc.clock() + timeout, expire, "wait")
        return None

    def _lead(self, cmd: Any) -> None:
        w, proc = self.w, self.proc
        self.lead_token = int(cmd.token)
        self.caller.own_token = self.lead_token
        entry = proc.table.get(self.key)
        if entry is not None:
            for joiner in entry.joiners:
                joiner.own_token = self.lead_token
        ttl = self.spec.lock_ttl_ms / 1000
        dated = self._driver_lease(cmd)
        if dated is not None:
            start, margin, hold_until = dated  # exactly as the driver dates it
        else:
            start = self.acquire_sent if w.api.lease_from_acquire else proc.clock()
            hold = getattr(self.spec, "max_hold_ms", 0) / 1000 if w.api.lease_max_hold else 0
            margin = w.api.margin(ttl, w.p.loss_margin)
            hold_until = start + hold if hold else float("inf")
        lease = Lease(
            self.key,
            self.names.lock,
            cmd.lock_value,
            int(cmd.token),
            ttl,
            start,
            w.grants.get((self.key, int(cmd.token)), w.redis.restarts),
            margin,
            hold_until,
        )
        self.lease = lease
        proc.leases.append(lease)
        Renewal(w, proc, lease).schedule(lease.last_ok + lease.ttl / 3)
        seq = next(w.ids)
        w.jobs.append(Job(proc, self.epoch, self, int(cmd.token), seq))
        w.log(f"{proc.name()} leads {self.key} with lease {cmd.token}: job runs")
        return None

    def _driver_lease(self, cmd: Any) -> tuple[float, float, float] | None:
        """The real ``DriverBase.start_lease`` on the process's clock: (start, margin, hold end).

        None for a driver without it (the old code): the stand-in then dates the lease itself.
        """
        start_lease = getattr(self.w.api.base.DriverBase, "start_lease", None)
        if start_lease is None or not self.w.api.lease_from_acquire:
            return None
        stub = self.shim.backend.stub
        with _clock(self.proc.clock):
            start_lease(self.shim, cmd)
        lease = stub.added[-1]
        return float(lease.sent_at), float(lease.margin), float(lease.hold_until)

    def _release(self) -> None:
        """As Backend.release_later: read the holder; if it is our owner, complete with an
        abort notice (owner-checked). In the background: the flight does not wait."""
        w, proc, api, spec = self.w, self.proc, self.w.api, self.spec
        if proc.epoch != self.epoch:
            return

        def peeked(raw: Any, error: BaseException | None) -> None:
            holder = raw.decode() if isinstance(raw, bytes) else ""
            token, sep, owner = holder.partition(":")
            if error is not None or not sep or owner != spec.owner or not token.isdigit():
                return
            notice = w.codec.notice(b"A", channel=spec.names.channel, token=int(token))
            cmd = api.protocol.Complete(holder, b"", 0, notice, int(token))
            w.script(proc, api.commands.complete_call(spec, cmd, self.shim.backend.publish),
                     lambda raw, err: None)  # fmt: skip

        w.log(f"{proc.name()} gives back the lease its unanswered acquire on {self.key} may hold")
        w.script(proc, api.commands.peek_call(spec), peeked)

    def led(self, outcome: Any) -> None:
        """The job finished: the function's outcome is the Lead reply."""
        lease = self.lease
        if lease is not None:
            lease.running = False
            if not self.w.api.renew_through_complete:
                self._drop_lease()
        self.resume(outcome, None)

    def _drop_lease(self) -> None:
        if self.lease is not None:
            self.lease.active = False
            if self.lease in self.proc.leases:
                self.proc.leases.remove(self.lease)
            self.lease = None

    # --- the end of a flight: what sync.call does with it --------------------------------

    def finish(self, value: Any, error: BaseException | None) -> None:
        self.done = True
        w, api = self.w, self.w.api
        self._drop_lease()
        if self.mailbox is not None:
            self.proc.hub.unsubscribe(self.names.channel, self.mailbox)
            self.mailbox = None
        if isinstance(error, Violation):
            raise error
        self.caller.seen = max(self.caller.seen, self.seen)
        retry = object()
        shared: Any = retry
        if error is not None:
            if not isinstance(error, api.errors.WaitTimeout):
                shared = api.envelope.Outcome(error=error)
            w.end(self.caller, "error", error)
        else:
            outcome = getattr(value, "outcome", value)  # run_flight returns Finished or Outcome
            if not api.protocol.is_abort(outcome.error):
                shared = outcome
            if outcome.error is None:
                w.end(self.caller, "value", outcome.value)
            else:
                w.end(self.caller, "error", outcome.error)
        entry = self.proc.table.get(self.key)
        if entry is None or entry.driver is not self:
            return
        del self.proc.table[self.key]
        for joiner in entry.joiners:
            if joiner.done:
                continue
            if shared is retry:
                joiner.seen = max(joiner.seen, self.seen)
                w.log(f"caller #{joiner.id} starts over (RETRY)")
                w._join(joiner)
            elif shared.error is None:
                w.end(joiner, "value", shared.value)
            else:
                w.end(joiner, "error", shared.error)


class Renewal:
    """The renewer stand-in for one lease: RENEW at ttl/3 on the process's clock.

    As dedupe/renewal.py: a renewal that fails (no reply in socket_timeout) is retried while
    ``last_ok + ttl`` lies ahead, else the lease is lost; a 0 reply loses it at once; ``last_ok``
    is when the last successful renewal was sent. With a clock-deciding renewer (new code) the
    lease is also lost once ``last_ok + ttl * (1 - loss_margin)`` passes, whatever the network.
    """

    def __init__(self, world: World, proc: Proc, lease: Lease) -> None:
        self.w, self.proc, self.lease = world, proc, lease

    def schedule(self, when: float) -> None:
        self.w.at(self.proc, when, self.fire, "renew")
        if self.w.api.clock_renewer:
            lease = self.lease
            limit = min(lease.last_ok + lease.ttl - lease.margin, lease.hold_until)
            self.w.at(self.proc, limit, self.expire, "lease deadline")

    def expire(self) -> None:
        lease = self.lease
        if lease.active and self.w.known_lost(self.proc, lease):
            self.lose("no renewal confirmed within the lease")

    def fire(self) -> None:
        lease, w = self.lease, self.w
        if not lease.active or lease.lost:
            return
        sent = self.proc.clock()
        sc = w.api.commands.renew_call(lease.lock_key, lease.value, max(1, int(lease.ttl * 1000)))

        def done(raw: Any, error: BaseException | None) -> None:
            if not lease.active or lease.lost:
                return
            if error is not None:
                left = lease.last_ok + lease.ttl - self.proc.clock()
                if left <= 0:
                    self.lose(f"renewal failed for longer than the lease: {error}")
                    return
                self.schedule(sent + min(lease.ttl / 9, left / 2))
                return
            if not raw:
                if lease.completing:
                    lease.active = False  # our own complete deleted it: not a loss
                    return
                self.lose("the lock is no longer ours")
                return
            if w.known_lost(self.proc, lease):
                # Confirmed too late: a lease the clock gave up on stays lost (LostSignal.extend).
                self.lose("no renewal confirmed within the lease")
                return
            lease.last_ok = sent
            self.schedule(sent + lease.ttl / 3)

        w.script(self.proc, sc, done)

    def lose(self, why: str) -> None:
        self.lease.lost = True
        self.lease.active = False
        self.w.log(f"{self.proc.name()} lease {self.lease.token} on {self.lease.key} lost: {why}")


# --- helpers ------------------------------------------------------------------------------


class _Box(list):  # type: ignore[type-arg]
    """A mailbox: a list with a waker slot."""

    waker: Callable[[], None] | None = None


@contextmanager
def _clock(now: Callable[[], float]) -> Iterator[None]:
    """While the driver's own bookkeeping runs, time.monotonic reads the process's clock."""
    real = time.monotonic
    time.monotonic = now
    try:
        yield
    finally:
        time.monotonic = real


class _RenewerStub:
    """What ``start_lease`` and ``script_for`` hand leases to; the stand-in does the renewing."""

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
    ``start_lease``."""

    def __init__(self, spec: Any, publish: str, api: Api) -> None:
        self.spec = spec
        stamp = getattr(api.commands, "Stamp", None)
        if stamp is not None:
            self.stamp = stamp()
        self.backend = _ShimBackend(publish)
        self.cluster = False
        self.lease: Any = None  # set by start_lease; the stand-in renews its own copy
        self.acquire_sent = 0.0  # set by script_for (on the process's clock, see _clock)


class _ShimBackend:
    def __init__(self, publish: str) -> None:
        self.publish = publish
        self.kind = "single"
        self.stub = _RenewerStub()

    def renewer(self) -> _RenewerStub:
        return self.stub


def _enc(value: Any) -> bytes:
    """What redis-py's encoder sends for an argument."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (int, float)):
        return repr(value).encode()
    raise TypeError(f"cannot send {value!r}")


def _script_name(api: Api, script: Any) -> str:
    for name, value in vars(api.commands).items():
        if value is script:
            return name
    return "SCRIPT"


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
    if isinstance(raw, bytes):
        if len(raw) > 40:
            return _brief(raw)
        return raw.decode("utf-8", "replace")
    return repr(raw)
