"""Soak: N processes x M threads hammer a few hot keys while a fault injector breaks things.

Run with ``make soak`` (``python -m tests.soak --both``: the standalone soak, then the Cluster
soak, each for half of ``--minutes``; one summary and RESULT each, exit 1 if either failed).
``python -m tests.soak`` alone runs the standalone soak, ``--cluster`` the Cluster soak
(``python tests/soak.py`` works too). Options: ``--minutes`` (5), ``--procs`` (4),
``--threads`` (8), ``--keys`` (4), ``--seed``. Not a pytest module (no ``test_`` name, no test
functions): ``make test`` never runs it.

What runs
---------
The parent starts a private ``redis-server`` on loopback (``RedisServer``, no persistence)
and spawns ``--procs`` worker processes. Each worker builds one ``SingleFlight``
(``lock_ttl`` 1 s, ``wait_timeout`` 2 s, ``result_ttl`` 50 ms, short connect/socket timeouts)
and runs ``--threads`` threads that, until told to stop, call one decorated function over
``--keys`` hot keys: a random key, a 5-50 ms job that returns a small value (~70 %), returns a
100-300 kB value (~15 %, stored in the result key rather than inlined on the channel) or
raises ``SoakJobError`` (~15 %). A few jobs (``--slow-share``, 3 %) run 1.0-1.8 s instead,
longer than ``lock_ttl``, so that the lease renewal is exercised too (``--slow-share 0`` keeps
every job short). Meanwhile the parent injects, at random intervals (``--fault-interval``):

- ``kill_leader``: reads ``soak:leader:<key>`` (``<pid>:<run id>``, set by a running job and
  removed when it ends), SIGKILLs that worker by PID, reaps it, removes its entries from the
  overlap gauges (a dead process runs nothing) and spawns a replacement worker;
- ``kill_pubsub``: ``CLIENT KILL TYPE pubsub`` (every worker's hub connection);
- ``restart_redis``: SIGKILL redis-server and start it again on the same port, empty;
- ``pause_leader``: SIGSTOP a worker that runs a job for lock_ttl + 0.2-1.0 s, then SIGCONT:
  a late leader that finishes while a newer flight of its key runs;
- ``partition``: blackhole a worker's link to Redis (each worker's dedupe talks to Redis
  through its own loopback proxy, ``tests/proxy.py``; sockets stay open, half-open) for
  lock_ttl + 0.2-1.0 s, preferably a running leader's, then heal it.

Cluster mode (``--cluster``)
----------------------------
dedupe runs on a private 3-master Cluster (``RedisClusterSet``, no replicas; workers use a
``redis+cluster://`` URL). The soak's own keys (below) live on a separate standalone server,
the "judge", which no fault touches: the gauges stay linearizable while slots move. The job
reads its lock from the Cluster for the informational "held at start/end" figures (not atomic
with the gauge there). The faults:

- ``migrate_slot``: a random hot key's slot (a job's lock, token, result and error keys and its
  channel share one hash tag, hence one slot: ``dedupe.core.keys.names_for``) moves from its
  owner to another master the way ``redis-cli --cluster reshard`` does, slowly: IMPORTING on
  the target, MIGRATING on the source, then for 0.2-1.5 s its keys MIGRATE one at a time
  (callers meet ASK, and TRYAGAIN where a script's keys are split or partly missing), then
  the rest, then ``SETSLOT NODE`` on every node. A third of the time it goes straight back
  the same way (and with three masters later moves return it home now and then). The summary
  prints the nodes' ``INFO errorstats`` (ASK, TRYAGAIN, MOVED ...) as evidence;
- ``kill_leader`` and ``pause_leader`` as above;
- ``kill_pubsub``: ``CLIENT KILL TYPE pubsub`` on one node at random (the hubs' SSUBSCRIBE
  connections to that master).

Left out on Cluster: ``partition`` (the nodes announce their own addresses in CLUSTER SLOTS,
so a per-worker proxy would be bypassed; it would take a proxy per node and rewritten
announcements) and ``restart_redis`` (a master without replicas restarted empty loses its
slots' keys; the restart epoch below is standalone only: the judge never restarts).

Invariant 1 - no overlapping executions while both leases were valid
--------------------------------------------------------------------
Every execution of the job (a "run": the function body, only ever entered by a leader) does,
in one Lua script at its start, on the soak's own keys (outside the dedupe prefix):

- reads the restart epoch ``soak:epoch``. Redis restarts empty, so the epoch key vanishes with
  every restart; the first script after a restart (or the parent, right after restarting,
  with ``SET NX``) writes a fresh unique value. The gauge keys below carry the epoch in their
  name, so a run that started before a restart never counts against one started after it (a
  restart wipes every lease: such runs are excused by design);
- ``INCR soak:gauge:<epoch>:<key>`` and ``SADD soak:active:<epoch>:<key> <run id>``, and
  returns the gauge value with the ids of the other runs already active on the key; the run id
  is ``<pid>:<seq>:<fencing token>``;
- checks the fencing token against ``soak:maxtoken:<epoch>:<key>``: a run must hold a greater
  token than every run that started before it on the key (recorded as a "token order" suspect
  otherwise), and records whether the lock key still held its token at start.

At its end, a second script does ``SREM`` and ``DECR`` (the DECR only if the SREM removed
the id, so the gauge always equals the set size), records whether the lock key still held the
run's token, and deletes ``soak:leader:<key>`` if it is still this run's. Then the run reads
``current_flight().lease_lost``. Every worker appends both records (with wall-clock times,
the token, gauge, overlapping ids and ``lease_lost``) to its own JSON-lines file.

A gauge value > 1 at a run's start (an overlap "suspect") is adjudicated by the parent, after
the run, for every other run id the script reported:

- excused "lease lost": either run ended with ``current_flight().lease_lost`` true (dedupe
  detected and reported the loss to the function);
- excused "killed": the other run's process was SIGKILLed by the injector, and its death
  confirmed, before this run started (its gauge entry was stale; the injector also removes it);
- excused "stale": the other run's end script failed (Redis unreachable) and it had ended,
  by its own record, before this run started;
- anything else is a VIOLATION and is printed with both runs' records.

Runs on either side of a Redis restart never meet: different epochs (see above).

Invariant 2 - every call ends within its bound
----------------------------------------------
Every call must return a value or raise the job's exception, ``WaitTimeout`` or
``BackendUnavailable`` within ``bound = wait_timeout + lock_ttl + job_max +
4 * (connect_timeout + socket_timeout) + margin`` (job_max covers the job's sleep and its two
gauge scripts). Each call is timed with ``time.monotonic()``; a late return, a call still
running when the worker stops (plus the bound), an exception of another type, or a value or
exception that belongs to another key is a violation. Calls in flight in a worker that the
injector SIGKILLs are not counted (they died with it).

Invariant 4 - outcomes never go back in time
--------------------------------------------
Every call served another process's outcome or a kept one (``detailed()`` role "remote" or
"kept") records when it began and the token of the run whose value it got. A violation is
such a call that got a token older than that of a run which had started (so its lease had
been granted) more than 50 ms before the call began. Local joiners and leaders are not
checked: they get the outcome of the flight they joined or ran, by design.

Invariant 3 - clean after quiesce
---------------------------------
At the end the injector stops, the workers stop calling, wait for their calls to return and
for ``sf.stats()['flights_in_process'] == 0`` and ``sf.backend().hub().channels() == {}``
(bounded), and report both. With every worker still connected the parent then checks that no
key under the dedupe prefix lacks a TTL (``PTTL == -1``) and that ``PUBSUB CHANNELS`` is empty
(polled briefly, since an UNSUBSCRIBE may still be on its way); on Cluster on every node, with
``PUBSUB SHARDCHANNELS`` too, and that every node agrees on a stable slot layout. Any leftover
is a violation.

Bounds and hygiene
------------------
Every loop and wait is bounded. Processes are signalled only by their own PID. Everything
listens on 127.0.0.1 only. Workers talk to the parent only through files in a private temporary
directory (no shared locks a SIGKILLed process could leave held); the directory is removed at
the end unless a violation was found or ``--keep-logs`` is given.

Exit status: 0 when no invariant was violated, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python tests/soak.py): make `tests.soak` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
import redis.cluster
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from dedupe import BackendUnavailable, SingleFlight, WaitTimeout, current_flight
from dedupe.core.keys import function_name, names_for
from devtools.servers import RedisClusterSet, RedisServer
from tests.proxy import Proxy

__all__ = ["main"]
__test__ = False  # never a pytest module

SPAWN = mp.get_context("spawn")
PREFIX = "soakdd"  # the dedupe prefix (invariant 3 scans it); the soak's own keys use "soak:"
EPOCH_KEY = "soak:epoch"
SLOW_MS = (1000, 1800)  # the few "slow" jobs outlive lock_ttl (1 s) and so need renewal

# --------------------------------------------------------------------------- Redis scripts

# KEYS: none: the soak's keys live on one standalone server (the "judge"; with --cluster a
# server of its own, not a Cluster node). ARGV: key, run id, token, lock key ('' when the lock
# lives elsewhere, on the Cluster: held is then -1 and the job reads the lock itself), pid
START_LUA = """
local e = redis.call('GET', 'soak:epoch')
if not e then
  local t = redis.call('TIME')
  e = 'auto-' .. t[1] .. '.' .. t[2]
  redis.call('SET', 'soak:epoch', e)
end
local key, rid, token = ARGV[1], ARGV[2], ARGV[3]
local g = redis.call('INCR', 'soak:gauge:' .. e .. ':' .. key)
local others = redis.call('SMEMBERS', 'soak:active:' .. e .. ':' .. key)
redis.call('SADD', 'soak:active:' .. e .. ':' .. key, rid)
local mk = 'soak:maxtoken:' .. e .. ':' .. key
local prev = redis.call('GET', mk)
local order_ok = 1
if prev and tonumber(prev) >= tonumber(token) then
  order_ok = 0
else
  redis.call('SET', mk, token)
end
local held = -1
if ARGV[4] ~= '' then
  local lock = redis.call('GET', ARGV[4])
  held = 0
  if lock and string.sub(lock, 1, string.len(token) + 1) == token .. ':' then held = 1 end
end
redis.call('SET', 'soak:leader:' .. key, ARGV[5] .. ':' .. rid, 'PX', 5000)
return {e, g, others, order_ok, prev or '', held}
"""

# ARGV: epoch, key, run id, token, lock key
END_LUA = """
local e, key, rid, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('SREM', 'soak:active:' .. e .. ':' .. key, rid) == 1 then
  redis.call('DECR', 'soak:gauge:' .. e .. ':' .. key)
end
local held = -1
if ARGV[5] ~= '' then
  local lock = redis.call('GET', ARGV[5])
  held = 0
  if lock and string.sub(lock, 1, string.len(token) + 1) == token .. ':' then held = 1 end
end
local leader = redis.call('GET', 'soak:leader:' .. key)
if leader and string.sub(leader, -string.len(rid) - 1) == ':' .. rid then
  redis.call('DEL', 'soak:leader:' .. key)
end
return held
"""

# ARGV: epoch-less active key, gauge key, member
FORGET_LUA = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 1 then redis.call('DECR', KEYS[2]) return 1 end
return 0
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class SoakJobError(Exception):
    """What the job raises on purpose; args: (key, token)."""


class SoakRedisDown(Exception):
    """The job could not reach Redis for its gauge: it ran nothing and counts as the job's error."""


# --------------------------------------------------------------------------- worker side


class _Worker:
    """Per-process state the job function reaches through the module global ``_W``."""

    def __init__(self, idx: int, cfg: dict[str, Any], logdir: Path) -> None:
        self.idx = idx
        self.cfg = cfg
        self.pid = os.getpid()
        self.r = redis.Redis(
            host=cfg["host"],
            port=cfg["port"],
            socket_connect_timeout=cfg["job_connect_timeout"],
            socket_timeout=cfg["job_socket_timeout"],
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        self.start_script = self.r.register_script(START_LUA)
        self.end_script = self.r.register_script(END_LUA)
        # --cluster: the judge is not a Cluster node, so the job reads the lock (whether its
        # lease still stands: informational, "held at start/end") from the Cluster itself.
        self.cluster: redis.cluster.RedisCluster | None = None
        if cfg["cluster_nodes"]:
            self.cluster = redis.cluster.RedisCluster(
                startup_nodes=[
                    redis.cluster.ClusterNode(h, p)  # type: ignore[no-untyped-call,unused-ignore]
                    for h, p in cfg["cluster_nodes"]
                ],
                socket_connect_timeout=cfg["job_connect_timeout"],
                socket_timeout=cfg["job_socket_timeout"],
            )
        self._seq = 0
        self._lock = threading.Lock()
        self.runs_path = logdir / f"w{idx}-{self.pid}.runs.jsonl"
        self._runs = open(self.runs_path, "a", buffering=1)  # noqa: SIM115 - closed at exit
        self.stats_path = logdir / f"w{idx}-{self.pid}.stats.json"
        self.counts: Counter[str] = Counter()
        self.max_latency: dict[str, float] = {}
        self.violations: list[dict[str, Any]] = []
        self.violation_count = 0
        self.runs = 0
        self.dedupe_warnings: Counter[str] = Counter()
        self.current: dict[int, tuple[int, float, str] | None] = {}

    def lock_held(self, lock_key: str, token: int, held: int) -> int:
        """``held`` as the judge's script found it, else (-1: --cluster) read from the Cluster:
        1 if the lock holds ``token``, 0 if not, -1 if it could not be read."""
        if held != -1 or self.cluster is None:
            return held
        try:
            value = self.cluster.get(lock_key)
        except redis.RedisError:
            return -1
        return int(value is not None and _text(value).startswith(f"{token}:"))

    def next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def log_run(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            self._runs.write(line + "\n")

    def count(self, outcome: str, elapsed: float) -> None:
        with self._lock:
            self.counts[outcome] += 1
            if elapsed > self.max_latency.get(outcome, 0.0):
                self.max_latency[outcome] = elapsed

    def violation(self, kind: str, **detail: Any) -> None:
        with self._lock:
            self.violation_count += 1
            if len(self.violations) < 50:
                self.violations.append({"kind": kind, "pid": self.pid, **detail})

    def write_stats(self, phase: str, **extra: Any) -> None:
        with self._lock:
            data = {
                "idx": self.idx,
                "pid": self.pid,
                "phase": phase,
                "counts": dict(self.counts),
                "max_latency": self.max_latency,
                "violations": list(self.violations),
                "violation_count": self.violation_count,
                "runs": self.runs,
                "dedupe_warnings": dict(self.dedupe_warnings),
                **extra,
            }
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, default=str))
        os.replace(tmp, self.stats_path)


_W: _Worker | None = None


class _CountWarnings(logging.Handler):
    """Counts dedupe's log records by message template (lease lost, could not publish...)."""

    def emit(self, record: logging.LogRecord) -> None:
        if _W is not None:
            with _W._lock:
                _W.dedupe_warnings[str(record.msg)[:90]] += 1


def _job(key: str, behaviour: str, duration_ms: int, size: int) -> dict[str, Any]:
    """The decorated function: gauge in, sleep, gauge out, then return or raise."""
    w = _W
    assert w is not None
    flight = current_flight()
    assert flight is not None
    token = flight.token
    lock_key = names_for(PREFIX, flight.key).lock
    judged_lock = "" if w.cluster is not None else lock_key
    rid = f"{w.pid}:{w.next_seq()}:{token}"
    t_before = time.time()
    try:
        e, gauge, others, order_ok, prev, held = w.start_script(
            args=[key, rid, token, judged_lock, w.pid]
        )
    except redis.RedisError as exc:
        raise SoakRedisDown(f"gauge start failed: {exc!r}") from None
    t_start = time.time()
    held = w.lock_held(lock_key, token, int(held))
    epoch = e.decode()
    w.runs += 1
    w.log_run(
        {
            "ev": "start",
            "rid": rid,
            "key": key,
            "token": token,
            "epoch": epoch,
            "gauge": int(gauge),
            "others": [o.decode() for o in others],
            "order_ok": int(order_ok),
            "prev_token": prev.decode() if isinstance(prev, bytes) else str(prev),
            "held_at_start": int(held),
            "t_before": t_before,
            "t_start": t_start,
        }
    )
    deadline = time.monotonic() + duration_ms / 1000
    while True:  # bounded: at most duration_ms in 10 ms steps
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(0.01, left))
    end_ok, held_end = True, -1
    try:
        held_end = int(w.end_script(args=[epoch, key, rid, token, judged_lock]))
    except redis.RedisError:
        end_ok = False
    t_end = time.time()
    held_end = w.lock_held(lock_key, token, held_end)
    lost = flight.lease_lost
    w.log_run(
        {
            "ev": "end",
            "rid": rid,
            "key": key,
            "token": token,
            "epoch": epoch,
            "end_ok": end_ok,
            "held_at_end": held_end,
            "lease_lost": lost,
            "t_end": t_end,
        }
    )
    if behaviour == "raise":
        raise SoakJobError(key, token)
    return {"key": key, "token": token, "blob": "x" * size}


def _paused_during(w: _Worker, t0: float, t1: float) -> float:
    """Seconds this process spent stopped (SIGSTOP by the injector) within [t0, t1]."""
    try:
        r = redis.Redis(host=w.cfg["host"], port=w.cfg["port"], socket_timeout=1.0)
        spans = [_text(s).split(":") for s in r.lrange(f"soak:pauses:{w.pid}", 0, -1)]
        r.close()
    except redis.RedisError:
        return float("inf")  # cannot tell (Redis down): excuse rather than guess
    return sum(max(0.0, min(t1, float(b)) - max(t0, float(a))) for a, b in spans)


def _caller(w: _Worker, work: Any, ti: int, stop: threading.Event) -> None:
    cfg = w.cfg
    rng = random.Random(f"{cfg['seed']}:{w.idx}:{ti}")
    keys = [f"hot-{i}" for i in range(cfg["keys"])]
    bound = cfg["bound"]
    while not stop.is_set():
        key = rng.choice(keys)
        roll = rng.random()
        behaviour = "raise" if roll < 0.15 else "big" if roll < 0.30 else "ok"
        size = rng.randint(100_000, 300_000) if behaviour == "big" else rng.randint(10, 2000)
        duration = rng.randint(*cfg["job_ms"])
        if rng.random() < cfg["slow_share"]:  # longer than the lease: renewal must hold it
            duration = rng.randint(*SLOW_MS)
        seq = w.next_seq()
        t0 = time.monotonic()
        t_call = time.time()
        w.current[ti] = (seq, t0, key)
        pause = 0.0
        try:
            served = work.detailed(key, behaviour, duration, size)
            value = served.value
        except SoakJobError as exc:
            outcome = "SoakJobError"
            if exc.args[0] != key:
                w.violation("wrong-key", asked=key, got=repr(exc.args))
        except SoakRedisDown:
            outcome = "SoakRedisDown"
            pause = rng.uniform(0.02, 0.1)
        except WaitTimeout:
            outcome = "WaitTimeout"
        except BackendUnavailable:
            outcome = "BackendUnavailable"
            pause = rng.uniform(0.02, 0.1)  # Redis is down: do not spin on refused connects
        except Exception as exc:
            outcome = type(exc).__name__
            w.violation(
                "unexpected-error",
                key=key,
                error=repr(exc)[:300],
                tb=traceback.format_exc()[-1500:],
            )
        else:
            outcome = "ok"
            if not isinstance(value, dict) or value.get("key") != key:
                w.violation("wrong-key", asked=key, got=repr(value)[:200])
            elif served.role in ("remote", "kept"):
                # Invariant 4 (checked by the parent): an outcome from another process is of
                # the newest lease granted before this call began, or a newer one.
                w.log_run(
                    {
                        "ev": "call",
                        "rid": f"call:{w.pid}:{seq}",
                        "key": key,
                        "token": value["token"],
                        "role": served.role,
                        "t_call": t_call,
                    }
                )
        elapsed = time.monotonic() - t0
        w.current[ti] = None
        w.count(outcome, elapsed)
        if elapsed > bound:
            paused = _paused_during(w, t_call, time.time())
            if elapsed - paused > bound:
                w.violation(
                    "late", key=key, outcome=outcome, elapsed=round(elapsed, 3), bound=bound
                )
        if pause:
            stop.wait(pause)


def worker_main(idx: int, cfg: dict[str, Any], logdir_s: str) -> None:
    """One worker process: M caller threads, a stats writer, then drain and report."""
    global _W
    logdir = Path(logdir_s)
    if cfg["break_renewal"]:
        # Detector self-test only: leases are never renewed, so long jobs overlap silently.
        from dedupe.backend.renewal import Renewer

        Renewer.add = lambda self, lease: None  # type: ignore[method-assign]
    w = _W = _Worker(idx, cfg, logdir)
    log = logging.getLogger("dedupe")
    log.addHandler(_CountWarnings(level=logging.WARNING))
    file_handler = logging.FileHandler(logdir / f"w{idx}-{w.pid}.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(message)s"))
    log.addHandler(file_handler)
    log.setLevel(logging.WARNING)
    log.propagate = False
    sf = SingleFlight(
        cfg["url"],
        prefix=PREFIX,
        lock_ttl=cfg["lock_ttl"],
        wait_timeout=cfg["wait_timeout"],
        result_ttl=cfg["result_ttl"],
        connect_timeout=cfg["connect_timeout"],
        socket_timeout=cfg["socket_timeout"],
        health_check_interval=cfg["health_check_interval"],
    )
    work = sf(key="{key}")(_job)
    stop = threading.Event()
    stop_file, close_file = logdir / "STOP", logdir / "CLOSE"
    bound = cfg["bound"]

    def watch() -> None:
        while not stop.is_set():
            if stop_file.exists() or time.time() > cfg["hard_end"]:
                stop.set()
                return
            time.sleep(0.05)

    def report() -> None:
        while not stop.wait(1.0):
            now = time.monotonic()
            overdue = sum(1 for c in list(w.current.values()) if c and now - c[1] > bound)
            w.write_stats("running", overdue_now=overdue, sf_stats=sf.stats())

    threading.Thread(target=watch, name="soak-watch", daemon=True).start()
    threading.Thread(target=report, name="soak-report", daemon=True).start()
    callers = [
        threading.Thread(target=_caller, args=(w, work, ti, stop), name=f"soak-{ti}", daemon=True)
        for ti in range(cfg["threads"])
    ]
    for t in callers:
        t.start()
    w.write_stats("running", overdue_now=0)
    while not stop.wait(0.2):
        pass
    stopped_at = time.monotonic()
    for t in callers:
        t.join(max(0.1, bound + 2.0 - (time.monotonic() - stopped_at)))
    now = time.monotonic()
    for ti, cur in list(w.current.items()):
        if cur is not None:
            w.violation("never-returned", thread=ti, key=cur[2], running_for=round(now - cur[1], 3))
    # Drain: no flight left in this process's tables, no channel left in its hub (bounded).
    drain_deadline = time.monotonic() + 15.0
    while True:
        st = sf.stats()
        chans = sf.backend().hub().channels()
        if (st["flights_in_process"] == 0 and not chans) or time.monotonic() > drain_deadline:
            break
        time.sleep(0.05)
    w.write_stats("drained", sf_stats=st, hub_channels=chans, drain_s=time.monotonic() - now)
    close_deadline = time.monotonic() + 120.0
    while not close_file.exists() and time.monotonic() < close_deadline:
        time.sleep(0.05)
    sf.close()
    w.write_stats("closed", sf_stats=st, hub_channels=chans)
    with contextlib.suppress(Exception):
        w._runs.close()
        if w.cluster is not None:
            w.cluster.close()


# --------------------------------------------------------------------------- parent side


class Soak:
    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns
        self.rng = random.Random(ns.seed)
        # Standalone: dedupe's server, which is also the judge (the soak's own keys) and is
        # restarted by the injector. --cluster: the judge only, never faulted; dedupe runs on
        # a private 3-master Cluster.
        self.server = RedisServer()
        self.cluster = RedisClusterSet(3) if ns.cluster else None
        self.node_ids: dict[int, str] = {}  # port -> Cluster node id
        self.errorstats: dict[int, dict[str, int]] = {}  # port -> {ASK: n, ...} at the end
        self.logdir = Path(tempfile.mkdtemp(prefix="dedupe-soak-"))
        self.procs: dict[int, Any] = {}  # idx -> Process
        self.proxies: dict[int, Proxy] = {}  # idx -> the worker's link to Redis
        self.next_idx = 0
        self.killed: dict[int, float] = {}  # pid -> wall time its death was confirmed
        self.faults: Counter[str] = Counter()
        self.violations: list[str] = []
        self.crashed: list[str] = []
        self.restarts = 0
        self.admin: redis.Redis | None = None
        self.details: list[str] = []  # full records of violating runs, for violations.jsonl
        # --break-renewal (a self-test of the overlap detector) runs jobs longer than the lease.
        self.job_ms = (5, 50) if not ns.break_renewal else (1200, 1600)
        longest = max(self.job_ms[1], SLOW_MS[1] if ns.slow_share > 0 else 0) / 1000
        job_max = longest + 2 * (ns.job_socket_timeout + ns.job_connect_timeout) * 2
        self.bound = (
            ns.wait_timeout
            + ns.lock_ttl
            + job_max
            + 4 * (ns.connect_timeout + ns.socket_timeout)
            + ns.margin
        )

    # -- helpers
    def client(self) -> redis.Redis:
        if self.admin is None:
            self.admin = redis.Redis(
                host=self.server.host,
                port=self.server.port,
                socket_connect_timeout=0.5,
                socket_timeout=2.0,
                retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 2),
            )
        return self.admin

    def cfg(self) -> dict[str, Any]:
        ns = self.ns
        return {
            "url": self.server.url if self.cluster is None else self.cluster_url(),
            "cluster_nodes": [] if self.cluster is None else self.cluster.startup_nodes,
            "host": self.server.host,
            "port": self.server.port,
            "seed": ns.seed,
            "keys": ns.keys,
            "threads": ns.threads,
            "lock_ttl": ns.lock_ttl,
            "wait_timeout": ns.wait_timeout,
            "result_ttl": ns.result_ttl,
            "connect_timeout": ns.connect_timeout,
            "socket_timeout": ns.socket_timeout,
            "health_check_interval": ns.health_check_interval,
            "job_connect_timeout": ns.job_connect_timeout,
            "job_socket_timeout": ns.job_socket_timeout,
            "bound": self.bound,
            "job_ms": self.job_ms,
            "break_renewal": self.ns.break_renewal,
            "slow_share": self.ns.slow_share,
            "hard_end": self.hard_end,
        }

    def cluster_url(self) -> str:
        assert self.cluster is not None
        return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in self.cluster.startup_nodes)

    def spawn(self) -> None:
        idx = self.next_idx
        self.next_idx += 1
        cfg = self.cfg()
        if self.cluster is None:
            # dedupe reaches Redis through a proxy of its own (the partition fault); the job's
            # gauge scripts go straight to the server, so the judge sees the truth. (Not on
            # Cluster: the nodes announce their own addresses, so a client would bypass it.)
            proxy = self.proxies[idx] = Proxy((self.server.host, self.server.port)).start()
            cfg["url"] = "redis://{}:{}/0".format(*proxy.address)
        p = SPAWN.Process(
            target=worker_main, args=(idx, cfg, str(self.logdir)), name=f"soak-w{idx}"
        )
        p.start()
        self.procs[idx] = p

    def say(self, msg: str) -> None:
        print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def read_stats(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.logdir.glob("*.stats.json")):
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads(path.read_text()))
        return out

    # -- faults
    def kill_leader(self) -> None:
        found = self._leader_worker()
        if found is None:
            self.faults["kill_leader (no leader running: skipped)"] += 1
            return
        idx, p, key, raw = found
        pid = p.pid
        del self.procs[idx]
        p.kill()  # SIGKILL by PID
        p.join(10)
        proxy = self.proxies.pop(idx, None)
        if proxy is not None:
            proxy.close()
        if p.is_alive():
            self.violations.append(f"worker pid {pid} survived SIGKILL for 10 s")
        self.killed[pid] = time.time()
        self.faults["kill_leader"] += 1
        with contextlib.suppress(redis.RedisError):
            if self.client().get(f"soak:leader:{key}") == raw:
                self.faults["kill_leader (killed mid-run)"] += 1
            self.forget_pid(pid)
        self.spawn()

    def forget_pid(self, pid: int) -> None:
        """A killed process runs nothing: drop its entries from the current overlap gauges."""
        c = self.client()
        forget = c.register_script(FORGET_LUA)
        for akey in c.scan_iter(match="soak:active:*", count=200):
            gkey = b"soak:gauge:" + akey[len(b"soak:active:") :]
            for member in c.smembers(akey):
                if _text(member).split(":", 1)[0] == str(pid):
                    forget(keys=[akey, gkey], args=[member])

    def kill_pubsub(self) -> None:
        """Standalone: every pub/sub connection. Cluster: those of one node, at random (the
        hubs' SSUBSCRIBE connections to that master)."""
        if self.cluster is None:
            n = int(self.client().client_kill_filter(_type="pubsub"))
        else:
            node = self.rng.choice(self.cluster.servers)
            with node.client(socket_timeout=2.0) as c:
                n = int(c.client_kill_filter(_type="pubsub"))
        self.faults["kill_pubsub"] += 1
        self.faults["pubsub connections killed"] += n

    # -- the Cluster fault
    def node(self, port: int) -> RedisServer:
        assert self.cluster is not None
        return next(s for s in self.cluster.servers if s.port == port)

    def owner_port(self, slot: int) -> int:
        """The master that owns ``slot``, as every node reports it (bounded wait for them to
        agree: each migration assigns the slot on every node itself)."""
        assert self.cluster is not None
        deadline = time.monotonic() + 10.0
        while True:
            seen = set()
            for s in self.cluster.servers:
                with s.client(socket_timeout=2.0) as c:
                    for entry in c.execute_command("CLUSTER", "SLOTS"):
                        if int(entry[0]) <= slot <= int(entry[1]):
                            seen.add(int(entry[2][1]))
            if len(seen) == 1:
                return seen.pop()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the nodes disagree on who owns slot {slot}: {seen}")
            time.sleep(0.05)

    def migrate_slot(self) -> None:
        """Move one hot key's slot (every key of a job shares its hash tag, so its lock,
        token, result and error keys and its channel move together) to another master, the
        way ``redis-cli --cluster reshard`` does, but slowly: the slot stays open (IMPORTING
        on the target, MIGRATING on the source) for 0.2-1.5 s while its keys move one at a
        time, so callers meet ASK, and TRYAGAIN where a script's keys are split or partly
        missing; then the rest moves and every node is told the new owner. A third of the
        time the slot goes straight back the same way."""
        assert self.cluster is not None
        key = f"hot-{self.rng.randrange(self.ns.keys)}"
        job_id = f"{function_name(_job)}:{key}"
        slot = key_slot(names_for(PREFIX, job_id).lock.encode())
        src = self.node(self.owner_port(slot))
        dst = self.rng.choice([s for s in self.cluster.servers if s is not src])
        self._move(slot, src, dst)
        self.faults["migrate_slot"] += 1
        if self.rng.random() < 1 / 3:
            self._move(slot, dst, src)
            self.faults["migrate_slot (moved straight back)"] += 1

    def _move(self, slot: int, src: RedisServer, dst: RedisServer) -> None:
        assert self.cluster is not None
        hold = self.rng.uniform(0.2, 1.5)
        src_id, dst_id = self.node_ids[src.port], self.node_ids[dst.port]
        t0 = time.monotonic()
        with src.client(socket_timeout=10.0) as s, dst.client(socket_timeout=10.0) as d:
            d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            try:
                while time.monotonic() - t0 < hold:  # bounded by hold
                    left = hold - (time.monotonic() - t0)
                    time.sleep(max(0.0, min(self.rng.uniform(0.02, 0.2), left)))
                    self._migrate_keys(s, dst, slot, 1)
                for _ in range(1000):  # bounded; a hot slot holds a handful of keys
                    if not self._migrate_keys(s, dst, slot, 100):
                        break
                else:
                    raise RuntimeError(f"slot {slot} did not empty on :{src.port}")
                others = [n for n in self.cluster.servers if n is not src and n is not dst]
                for node in [dst, src, *others]:  # the order redis-cli uses
                    with node.client(socket_timeout=10.0) as c:
                        c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
            except BaseException:
                self.faults["migrate_slot (failed: slot restored)"] += 1
                self._restore(slot, src)
                raise
        self.faults["slot held open, ms (sum)"] += round(1000 * (time.monotonic() - t0))
        if self.owner_port(slot) != dst.port:
            self.violations.append(f"harness: slot {slot} did not move to :{dst.port}")

    def _migrate_keys(self, s: Any, dst: RedisServer, slot: int, n: int) -> int:
        """MIGRATE up to ``n`` of the slot's keys from the source (client ``s``); how many.
        Without REPLACE: a key on both nodes would be a finding (BUSYKEY), counted, then
        replaced so the migration can end."""
        keys = s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, n)
        if not keys:
            return 0
        try:
            s.execute_command("MIGRATE", dst.host, dst.port, "", 0, 5000, "KEYS", *keys)
        except redis.ResponseError as exc:
            if "BUSYKEY" not in str(exc):
                raise
            self.faults["migrate_slot: BUSYKEY (a key on both nodes)"] += 1
            s.execute_command("MIGRATE", dst.host, dst.port, "", 0, 5000, "REPLACE", "KEYS",
                              *keys)  # fmt: skip
        self.faults["keys migrated"] += len(keys)
        return len(keys)

    def _restore(self, slot: int, home: RedisServer) -> None:
        """After a failed move: close the slot on every node and bring its keys home."""
        assert self.cluster is not None
        home_id = self.node_ids[home.port]
        for node in self.cluster.servers:
            with node.client(socket_timeout=10.0) as c:
                c.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        for node in self.cluster.servers:
            if node is home:
                continue
            with node.client(socket_timeout=10.0) as c:
                keys = c.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
                if keys:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", home_id)
                    c.execute_command("MIGRATE", home.host, home.port, "", 0, 5000, "REPLACE",
                                      "KEYS", *keys)  # fmt: skip
                    c.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        for node in self.cluster.servers:
            with node.client(socket_timeout=10.0) as c:
                c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", home_id)

    def restart_redis(self) -> None:
        self.server.kill()
        time.sleep(self.rng.uniform(0.0, 0.5))  # a short outage
        self.server.restart(timeout=20)
        self.restarts += 1
        if self.admin is not None:
            self.admin.close()
            self.admin = None
        with contextlib.suppress(redis.RedisError):
            self.client().set(EPOCH_KEY, f"restart-{self.restarts}-{time.time()}", nx=True)
        self.faults["restart_redis"] += 1

    def _leader_worker(self) -> tuple[int, Any, str, bytes] | None:
        """A worker running a job now (its pid is in soak:leader:<key>), if any: its index,
        process, the key it leads and that key's leader record as read."""
        c = self.client()
        keys = [f"hot-{i}" for i in range(self.ns.keys)]
        self.rng.shuffle(keys)
        alive = {p.pid: idx for idx, p in self.procs.items() if p.is_alive()}
        for key in keys:
            raw = c.get(f"soak:leader:{key}")
            if raw:
                idx = alive.get(int(_text(raw).split(":", 1)[0]))
                if idx is not None:
                    return idx, self.procs[idx], key, raw
        return None

    def pause_leader(self) -> None:
        """SIGSTOP a running leader past its lease, then SIGCONT: a late leader finishes
        while a newer flight of its key runs (its outcome must reach nobody but its callers)."""
        found = self._leader_worker()
        if found is None:
            self.faults["pause_leader (no leader running: skipped)"] += 1
            return
        p = found[1]
        span = self.ns.lock_ttl + self.rng.uniform(0.2, 1.0)
        t0 = time.time()
        os.kill(p.pid, signal.SIGSTOP)
        try:
            time.sleep(span)
        finally:
            os.kill(p.pid, signal.SIGCONT)
        with contextlib.suppress(redis.RedisError):
            self.client().rpush(f"soak:pauses:{p.pid}", f"{t0}:{time.time()}")
        self.faults["pause_leader"] += 1

    def partition(self) -> None:
        """Blackhole one worker's link to Redis (sockets stay open: half-open) past the lease,
        preferably a running leader's, then heal it."""
        found = self._leader_worker()
        idx = found[0] if found else self.rng.choice(list(self.proxies))
        proxy = self.proxies.get(idx)
        if proxy is None:
            return
        proxy.blackhole()
        try:
            time.sleep(self.ns.lock_ttl + self.rng.uniform(0.2, 1.0))
        finally:
            proxy.heal()
        self.faults["partition" + (" (of a leader)" if found else "")] += 1

    def inject(self) -> None:
        mix = MIXES["cluster" if self.cluster is not None else "standalone"]
        mix = {k: w for k, w in mix.items() if not self.ns.faults or k in self.ns.faults}
        kind = self.rng.choices(list(mix), weights=list(mix.values()))[0]
        try:
            getattr(self, kind)()
        except redis.RedisError as exc:  # e.g. during the seconds after a restart
            self.faults[f"{kind} (failed: {type(exc).__name__})"] += 1

    def check_workers(self) -> None:
        for idx, p in list(self.procs.items()):
            if not p.is_alive():
                p.join(1)
                self.procs.pop(idx)
                # A violation of its own (below); its runs end with it, as a killed worker's.
                self.killed[p.pid] = time.time()
                with contextlib.suppress(redis.RedisError):
                    self.forget_pid(p.pid)
                proxy = self.proxies.pop(idx, None)
                if proxy is not None:
                    proxy.close()
                msg = f"worker w{idx} pid {p.pid} died on its own (exit code {p.exitcode})"
                self.crashed.append(msg)
                self.violations.append(msg)
                self.say(msg + "; starting a replacement")
                self.spawn()

    # -- the run
    def run(self) -> int:
        ns = self.ns
        t_begin = time.monotonic()
        self.server.start()
        if self.cluster is not None:
            try:
                self.cluster.start()
            except BaseException:
                self.server.stop()
                raise
            for node in self.cluster.servers:
                with node.client() as c:
                    self.node_ids[node.port] = _text(c.execute_command("CLUSTER", "MYID"))
        self.end = time.time() + ns.minutes * 60
        self.hard_end = self.end + 120  # workers stop on their own even if the parent vanished
        where = (
            f"redis {self.server.url} pid {self.server.pid}"
            if self.cluster is None
            else f"cluster {self.cluster_url()}, judge {self.server.url}"
        )
        self.say(
            f"{where}; {ns.procs} procs x {ns.threads} "
            f"threads, {ns.keys} keys, {ns.minutes} min, seed {ns.seed}; call bound "
            f"{self.bound:.2f} s; logs in {self.logdir}"
        )
        for _ in range(ns.procs):
            self.spawn()
        next_fault = time.time() + 3.0  # let the workers start first
        next_progress = time.time() + ns.progress
        try:
            while time.time() < self.end:  # bounded by --minutes
                time.sleep(0.05)
                self.check_workers()
                if time.time() >= next_fault:
                    self.inject()
                    next_fault = time.time() + self.rng.uniform(
                        0.25 * ns.fault_interval, 1.75 * ns.fault_interval
                    )
                if time.time() >= next_progress:
                    next_progress += ns.progress
                    stats = self.read_stats()
                    calls = sum(sum(s["counts"].values()) for s in stats)
                    self.say(f"{calls} calls so far; faults {dict(self.faults)}")
            self.quiesce()
        finally:
            for p in self.procs.values():
                if p.is_alive():
                    os.kill(p.pid, signal.SIGCONT)
                    p.kill()
                    p.join(5)
            for proxy in self.proxies.values():
                proxy.close()
            self.server.stop()
            if self.cluster is not None:
                self.cluster.stop()
        elapsed = time.monotonic() - t_begin
        ok = self.report(elapsed)
        if ok and not ns.keep_logs:
            shutil.rmtree(self.logdir, ignore_errors=True)
        else:
            print(f"logs kept in {self.logdir}")
        return 0 if ok else 1

    def quiesce(self) -> None:
        self.say("stopping the load; quiescing")
        (self.logdir / "STOP").touch()
        live = {idx: p for idx, p in self.procs.items()}
        deadline = time.monotonic() + self.bound + 40.0
        drained: dict[int, dict[str, Any]] = {}
        while time.monotonic() < deadline and len(drained) < len(live):
            for s in self.read_stats():
                if s["phase"] in ("drained", "closed") and s["idx"] in live:
                    drained[s["idx"]] = s
            for idx, p in live.items():
                if idx not in drained and not p.is_alive():
                    drained[idx] = {"idx": idx, "phase": "died", "exitcode": p.exitcode}
            time.sleep(0.1)
        for idx in live:
            got = drained.get(idx)
            if got is None or got["phase"] == "died":
                self.violations.append(f"worker w{idx} did not drain and report: {got}")
                continue
            st, chans = got.get("sf_stats", {}), got.get("hub_channels", {})
            if st.get("flights_in_process", 0) != 0:
                self.violations.append(f"worker w{idx}: flights left in process: {st}")
            if chans:
                self.violations.append(f"worker w{idx}: hub channels left: {chans}")
        self.drained = drained
        # The server side, while every worker is still connected.
        nodes: list[Any] = [self.client()] if self.cluster is None else [
            s.client(socket_timeout=2.0) for s in self.cluster.servers
        ]  # fmt: skip
        leftover: list[Any] = []
        poll_end = time.monotonic() + 5.0
        while time.monotonic() < poll_end:
            leftover = []
            for c in nodes:
                leftover += c.pubsub_channels()
                if self.cluster is not None:
                    leftover += c.execute_command("PUBSUB", "SHARDCHANNELS")
            if not leftover:
                break
            time.sleep(0.1)
        if leftover:
            self.violations.append(f"channels still subscribed on the server: {leftover}")
        no_ttl, scanned = [], 0
        for c in nodes:
            for k in c.scan_iter(match=f"{PREFIX}:*", count=500):
                scanned += 1
                if c.pttl(k) == -1:
                    no_ttl.append(k)
        self.keys_scanned = scanned
        if no_ttl:
            self.violations.append(f"keys under {PREFIX}: without a TTL: {no_ttl[:20]}")
        if self.cluster is not None:
            # Every migration was closed (a slot left open would be the harness's fault), and
            # what the nodes answered with meanwhile: evidence that ASK and TRYAGAIN occurred.
            if not self.cluster.is_healthy():
                self.violations.append("harness: the Cluster is not healthy at the end")
            for server, c in zip(self.cluster.servers, nodes, strict=True):
                info = c.info("errorstats")
                self.errorstats[server.port] = {
                    name[len("errorstat_") :]: int(v.get("count", 0)) if isinstance(v, dict) else 0
                    for name, v in info.items()
                }
                c.close()
        (self.logdir / "CLOSE").touch()
        for p in live.values():
            p.join(20)
            if p.is_alive():
                self.violations.append(f"worker pid {p.pid} did not exit after CLOSE; killed")

    # -- adjudication and the summary
    def load_runs(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        starts: dict[str, dict[str, Any]] = {}
        ends: dict[str, dict[str, Any]] = {}
        self.calls: list[dict[str, Any]] = []
        for path in self.logdir.glob("*.runs.jsonl"):
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # the torn last line of a SIGKILLed worker
                if rec["ev"] == "call":
                    self.calls.append(rec)
                    continue
                (starts if rec["ev"] == "start" else ends)[rec["rid"]] = rec
        return starts, ends

    def check_outcome_order(self, starts: dict[str, dict[str, Any]]) -> list[str]:
        """Invariant 4: a call served another process's outcome (or a kept one) never gets an
        outcome of a lease older than one granted before the call began. A run's t_before
        comes after its lease was granted, so "run started before the call" is conservative;
        _ORDER_SLACK covers a message already on its way when the newer lease was granted."""
        by_key: dict[str, list[tuple[float, int]]] = {}
        for s in starts.values():
            by_key.setdefault(s["key"], []).append((s["t_before"], int(s["token"])))
        bad = []
        for runs in by_key.values():
            runs.sort()
        import bisect

        for c in self.calls:
            runs = by_key.get(c["key"], [])
            cut = bisect.bisect_left(runs, (c["t_call"] - _ORDER_SLACK, -1))
            newest = max((tok for _, tok in runs[:cut]), default=0)
            if int(c["token"]) < newest:
                bad.append(
                    f"outcome went back in time on {c['key']}: a {c['role']} call begun at "
                    f"{c['t_call']:.3f} got token {c['token']}, older than token {newest} "
                    "whose run had started before it"
                )
        return bad

    def adjudicate(self) -> tuple[Counter[str], list[str], int, int]:
        starts, ends = self.load_runs()
        excused: Counter[str] = Counter()
        bad: list[str] = []
        suspects = 0
        for rid, s in starts.items():
            e = ends.get(rid, {})
            mine_lost = bool(e.get("lease_lost"))
            checks: list[tuple[str, str]] = [(o, "overlap") for o in s["others"]]
            if not s["order_ok"]:
                checks.append((f"token<= {s['prev_token']}", "token-order"))
            if not checks:
                continue
            suspects += 1
            for other, what in checks:
                if what == "token-order":
                    if mine_lost:
                        excused["token order: lease lost (reported)"] += 1
                    else:
                        bad.append(f"{what}: run {rid} {s} / end {e}")
                    continue
                oe = ends.get(other, {})
                os_ = starts.get(other, {})
                other_pid = int(other.split(":", 1)[0])
                if mine_lost or oe.get("lease_lost"):
                    excused["overlap: lease lost (reported to the function)"] += 1
                elif other_pid in self.killed and self.killed[other_pid] <= s["t_before"]:
                    excused["overlap: other run's process killed before"] += 1
                elif oe and not oe.get("end_ok") and oe["t_end"] <= s["t_before"]:
                    excused["overlap: stale entry (end script failed)"] += 1
                else:
                    bad.append(
                        f"overlap on {s['key']} (epoch {s['epoch']}): run {rid} started at "
                        f"{s['t_start']:.3f} while {other} (started {os_.get('t_start', 0):.3f},"
                        f" ended {oe.get('t_end', 0):.3f}) was active; lease_lost "
                        f"{mine_lost}/{bool(oe.get('lease_lost'))}, lock held at end "
                        f"{e.get('held_at_end')}/{oe.get('held_at_end')}"
                        + (
                            f", other killed at {self.killed[other_pid]:.3f}"
                            if other_pid in self.killed
                            else ""
                        )
                    )
                    self.details.append(json.dumps({"this": [s, e], "other": [os_, oe]}))
        lost = sum(1 for e in ends.values() if e.get("lease_lost"))
        self.runs_total = len(starts)
        self.runs_unfinished = sum(1 for r in starts if r not in ends)
        self.silent_losses = sum(
            1 for e in ends.values() if e.get("held_at_end") == 0 and not e.get("lease_lost")
        )
        return excused, bad, suspects, lost

    def report(self, elapsed: float) -> bool:
        stats = self.read_stats()
        counts: Counter[str] = Counter()
        maxlat: dict[str, float] = {}
        worker_viol: list[dict[str, Any]] = []
        worker_viol_count = 0
        warnings: Counter[str] = Counter()
        sf_totals: Counter[str] = Counter()
        for s in stats:
            counts.update(s["counts"])
            for k, v in s["max_latency"].items():
                maxlat[k] = max(maxlat.get(k, 0.0), v)
            worker_viol.extend(s["violations"])
            worker_viol_count += s["violation_count"]
            warnings.update(s.get("dedupe_warnings", {}))
            for k, v in (s.get("sf_stats") or {}).items():
                if k != "flights_in_process":
                    sf_totals[k] += v
        excused, bad, suspects, lost = self.adjudicate()
        order_bad = self.check_outcome_order(self.load_runs()[0])
        total = sum(counts.values())
        v1, v2 = len(bad), worker_viol_count
        v3 = len(self.violations)
        v4 = len(order_bad)
        print()
        print("=" * 30 + " soak summary " + "=" * 30)
        print(
            f"{'Cluster (3 masters)' if self.cluster is not None else 'standalone'}: "
            f"duration {elapsed:.0f} s (load {self.ns.minutes:g} min); {self.ns.procs} procs x "
            f"{self.ns.threads} threads; {self.ns.keys} keys; seed {self.ns.seed}"
        )
        print(
            f"settings: lock_ttl {self.ns.lock_ttl} s, wait_timeout {self.ns.wait_timeout} s, "
            f"result_ttl {self.ns.result_ttl} s, slow jobs {self.ns.slow_share:.0%}, "
            f"call bound {self.bound:.2f} s"
        )
        print(f"calls served: {total}")
        for name, n in counts.most_common():
            print(f"  {name:<20} {n:>9}   max {maxlat.get(name, 0):.3f} s")
        print(
            f"executions (leader runs): {self.runs_total} ({self.runs_unfinished} cut short by "
            f"SIGKILL or Redis); leases lost (reported to the function): {lost}; "
            f"lock not held at end without lease_lost: {self.silent_losses}"
        )
        print(f"faults injected: {sum(v for k, v in self.faults.items() if k in FAULT_KINDS)}")
        for name, n in sorted(self.faults.items()):
            print(f"  {name:<44} {n:>6}")
        print(f"dedupe sf.stats() summed over all {len(stats)} workers: {dict(sf_totals)}")
        if warnings:
            print("dedupe warnings logged by workers:")
            for msg, n in warnings.most_common(8):
                print(f"  {n:>6}  {msg}")
        print(f"overlap suspects (gauge > 1 or token order): {suspects}; excused:")
        for why, n in excused.most_common():
            print(f"  {why:<52} {n:>6}")
        print(f"keys under {PREFIX}: at quiesce: {getattr(self, 'keys_scanned', '?')}")
        if self.cluster is not None:
            errs: Counter[str] = Counter()
            for per_node in self.errorstats.values():
                errs.update(per_node)
            print(f"error replies of the Cluster nodes (INFO errorstats, summed): {dict(errs)}")
        print(
            f"invariant violations: 1 (overlap) {v1}; 2 (call bound / outcome) {v2}; "
            f"3 (quiesce) {v3}; 4 (outcome older than a lease granted before the call) {v4} "
            f"of {len(self.calls)} cross-process outcomes"
        )
        for line in order_bad[:20]:
            print(f"  [4] {line}")
        for line in bad[:20]:
            print(f"  [1] {line}")
        for v in worker_viol[:20]:
            print(f"  [2] {json.dumps(v, default=str)[:1500]}")
        for line in self.violations[:20]:
            print(f"  [3] {line}")
        if self.details:
            (self.logdir / "violations.jsonl").write_text("\n".join(self.details) + "\n")
        ok = v1 == v2 == v3 == v4 == 0
        print("RESULT: " + ("PASS" if ok else "FAIL"))
        return ok


# Each mode's faults and their weights (see the docstring for what each does).
MIXES = {
    "standalone": {
        "kill_leader": 0.25,
        "kill_pubsub": 0.2,
        "restart_redis": 0.15,
        "pause_leader": 0.2,
        "partition": 0.2,
    },
    "cluster": {"kill_leader": 0.2, "kill_pubsub": 0.15, "pause_leader": 0.2, "migrate_slot": 0.45},
}
FAULT_KINDS = set(MIXES["standalone"]) | set(MIXES["cluster"])
# See check_outcome_order: how long a message may have been on its way.
_ORDER_SLACK = 0.05


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--keys", type=int, default=4, help="hot keys")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lock-ttl", type=float, default=1.0)
    p.add_argument("--wait-timeout", type=float, default=2.0)
    p.add_argument("--result-ttl", type=float, default=0.05)
    p.add_argument("--connect-timeout", type=float, default=0.5)
    p.add_argument("--socket-timeout", type=float, default=0.5)
    p.add_argument("--health-check-interval", type=float, default=1.0)
    p.add_argument("--job-connect-timeout", type=float, default=0.25)
    p.add_argument("--job-socket-timeout", type=float, default=0.5)
    p.add_argument("--margin", type=float, default=1.0, help="slack added to the call bound")
    p.add_argument("--fault-interval", type=float, default=2.0, help="mean seconds between faults")
    p.add_argument("--progress", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument(
        "--slow-share",
        type=float,
        default=0.03,
        help="share of calls whose job runs 1.0-1.8 s, longer than lock_ttl (0 for none)",
    )
    one_mode = p.add_mutually_exclusive_group()
    one_mode.add_argument(
        "--cluster",
        action="store_true",
        help="dedupe on a private 3-master Cluster, with the migrate_slot fault",
    )
    one_mode.add_argument(
        "--both",
        action="store_true",
        help="standalone, then Cluster, each for half of --minutes (what `make soak` runs)",
    )
    p.add_argument(
        "--faults",
        type=lambda text: set(filter(None, text.split(","))),
        default=set(),
        help="only these faults, comma-separated (default: all of the mode's): "
        + ", ".join(sorted(FAULT_KINDS)),
    )
    p.add_argument("--keep-logs", action="store_true")
    p.add_argument(
        "--break-renewal",
        action="store_true",
        help="self-test of the overlap detector: no lease renewal, 1.2-1.6 s jobs (must FAIL)",
    )
    ns = p.parse_args(argv)
    if ns.seed is None:
        ns.seed = random.SystemRandom().randrange(1 << 31)
    for name in ("minutes", "lock_ttl", "wait_timeout", "fault_interval", "progress"):
        if getattr(ns, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if ns.procs < 1 or ns.threads < 1 or ns.keys < 1:
        p.error("--procs, --threads and --keys must be >= 1")
    if ns.faults - FAULT_KINDS:
        p.error(f"unknown --faults: {', '.join(sorted(ns.faults - FAULT_KINDS))}")
    modes = ["standalone", "cluster"] if ns.both else ["cluster" if ns.cluster else "standalone"]
    for mode in modes:
        if ns.faults and not ns.faults & set(MIXES[mode]):
            p.error(f"none of --faults is a {mode} fault ({', '.join(sorted(MIXES[mode]))})")
    if not ns.both:
        return Soak(ns).run()
    results = {}
    for cluster in (False, True):
        one = argparse.Namespace(**{**vars(ns), "cluster": cluster, "minutes": ns.minutes / 2})
        results["Cluster" if cluster else "standalone"] = Soak(one).run()
        print(flush=True)
    print("soak: " + ", ".join(f"{k} {'PASS' if v == 0 else 'FAIL'}" for k, v in results.items()))
    return max(results.values())


if __name__ == "__main__":
    # Run through the importable module, so that spawned workers and pickled exceptions
    # refer to `tests.soak`, not to this process's `__main__`.
    import tests.soak

    sys.exit(tests.soak.main())
