"""Schedules: seeded random steps over a World, replay, and shrinking of a failing schedule.

A schedule is a list of steps, each a small tuple that names what happens, not the object
it happens to: ``("deliver", 2)`` delivers the third message in transit, whatever that is
by then. So any sub-list of a schedule still replays, and shrinking is plain delta
debugging over the list (then making each step's numbers smaller), keeping the failure's
kind. Steps:

    ("call", p, k, wait_ms, mode[, "read"])  process p calls key k (wait_ms 0: no
                             wait_timeout) through the call machine in mode "sync" or "async"
                             (default "sync"); "read": it reads its kept value before any
                             flight, as the drivers' call(first=True) (Params.reads)
    ("cancel", n)            the n-th asyncio caller still running is cancelled
    ("batch", p, ks, wait_ms, mode)  process p calls keys ks (a tuple of distinct key numbers)
                             in one batch through the batch machine, mode "sync" (default) or
                             "async" (Params.batches)
    ("deliver", n)           the n-th deliverable item in transit arrives (0: the oldest)
    ("drop", n)              ... is lost        ("dup", n)  ... arrives twice (later)
    ("refuse", n)            the n-th request in transit is refused: an error reply, not run
                             (a READ: an ACL without MGET; any other: LOADING)
    ("next",)                time moves to the next timer (a timeout, a renewal, a resume)
    ("advance", ms)          time moves on by ms
    ("finish", n, how)       the n-th running job returns ("ok"), raises ("raise") or is
                             interrupted ("abort": KeyboardInterrupt)
    ("pause", p, ms)         process p stalls for ms (GC, a stopped VM); its clock runs on
    ("kill", p)              process p dies; a fresh process takes its place
    ("part", p)              cut (or heal) process p's links to Redis
    ("restart", jump_ms)     Redis restarts without persistence; TIME jumps forward
    ("replay", n)            the n-th message published so far is published again
    ("forge", n, k)          bytes that are no genuine outcome, on k's channel or result key
    ("writeback", n)         a key writer writes the n-th record stored so far back, with the
                             life it was stored with
    ("clog", p)              process p's commands wait in its client-side queue (its command
                             slots) before they are written (again: they are all written)
    ("send", p, n)           the n-th queued command of p is written
    ("mig", op)              k1's slot on the Cluster: "open" a migration to the other node,
                             "move" one key there, "close" it (the rest moves; the target owns it)
    ("starve", p, ms)        p's renewal thread cannot run for ms (the GIL held, CPU starved)
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from .world import US, Api, Params, Violation, World

__all__ = ["Outcome", "Step", "describe", "explore", "replay", "shrink"]

Step = tuple[Any, ...]

_QUIET_LIMIT_US = 120 * US  # a fault-free drain longer than this is a stuck call


def describe(step: Step) -> str:
    kind = step[0]
    if kind == "call":
        wait = f" wait_timeout={step[3]}ms" if step[3] else ""
        mode = step[4] if len(step) > 4 else "sync"
        first = ", reads first" if len(step) > 5 and step[5] == "read" else ""
        return f"p{step[1]} calls k{step[2]} ({mode}{first}){wait}"
    if kind == "batch":
        wait = f" wait_timeout={step[3]}ms" if step[3] else ""
        mode = step[4] if len(step) > 4 else "sync"
        return f"p{step[1]} calls {','.join(f'k{k}' for k in step[2])} in a batch ({mode}){wait}"
    if kind in ("deliver", "drop", "dup", "replay", "refuse", "cancel"):
        return f"{kind} #{step[1]}"
    if kind == "forge":
        return f"forge #{step[1]} on k{step[2]}"
    if kind == "next":
        return "to the next timer"
    if kind == "advance":
        return f"advance {step[1]} ms"
    if kind == "finish":
        return f"job #{step[1]} {'returns' if step[2] == 'ok' else step[2]}"
    if kind == "pause":
        return f"pause p{step[1]} for {step[2]} ms"
    if kind in ("kill", "part"):
        return f"{'kill' if kind == 'kill' else 'cut/heal'} p{step[1]}"
    if kind == "restart":
        return f"restart Redis: keys lost, TIME +{max(1, step[1])} ms"
    if kind == "writeback":
        return f"write back stored record #{step[1]}"
    if kind == "clog":
        return f"clog/unclog p{step[1]}'s command queue"
    if kind == "send":
        return f"p{step[1]} writes queued command #{step[2]}"
    if kind == "mig":
        return f"migration: {step[1]}"
    if kind == "starve":
        return f"starve p{step[1]}'s renewer for {step[2]} ms"
    return repr(step)


def apply(world: World, step: Step) -> str:
    """Carry out one step; returns what it did, for the trace."""
    kind = step[0]
    if kind == "call":
        proc = world.procs[step[1] % len(world.procs)]
        key, wait = f"k{step[2] % len(world.names)}", step[3]
        mode = step[4] if len(step) > 4 else "sync"
        first = len(step) > 5 and step[5] == "read"

        def start() -> None:
            caller = world.call(proc, key, wait, mode, first)
            world.log(f"caller #{caller.id} ({mode}) starts on {proc.name()}")

        # A paused process makes no calls: this one starts when it resumes.
        world.run_on(proc, proc.epoch, start, net=False)
        world.settle()
        return ""
    if kind == "batch":
        proc = world.procs[step[1] % len(world.procs)]
        keys = list(dict.fromkeys(f"k{k % len(world.names)}" for k in step[2]))

        def start_batch() -> None:
            run = world.batch(proc, keys, step[3], step[4] if len(step) > 4 else "sync")
            world.log(f"{run.name()} starts")

        world.run_on(proc, proc.epoch, start_batch, net=False)
        world.settle()
        return ""
    if kind in ("deliver", "drop", "dup", "refuse"):
        return world.deliver(step[1], mode=kind)
    if kind == "next":
        due = world.next_timer_us()
        world.advance((due - world.now_us) if due is not None else 100_000)
        return ""
    if kind == "advance":
        world.advance(step[1] * 1000)
        return ""
    if kind == "finish":
        return world.finish_job(step[1], step[2])
    if kind == "cancel":
        return world.cancel(step[1])
    if kind == "pause":
        world.pause(world.procs[step[1] % len(world.procs)], step[2] * 1000)
        return ""
    if kind == "kill":
        world.kill(world.procs[step[1] % len(world.procs)])
        return ""
    if kind == "part":
        proc = world.procs[step[1] % len(world.procs)]
        proc.partitioned = not proc.partitioned
        world.faults += 1
        return "cut" if proc.partitioned else "healed"
    if kind == "restart":
        world.restart_redis(step[1])
        return ""
    if kind == "replay":
        return world.replay(step[1])
    if kind == "forge":
        return world.forge(step[1], step[2])
    if kind == "writeback":
        return world.write_back(step[1])
    if kind == "clog":
        proc = world.procs[step[1] % len(world.procs)]
        proc.clogged = not proc.clogged
        if not proc.clogged:
            out = world.send_queued(proc, None)
            world.settle()
            return "unclogged; " + out
        return "clogged"
    if kind == "send":
        out = world.send_queued(world.procs[step[1] % len(world.procs)], step[2])
        world.settle()
        return out
    if kind == "mig":
        return world.migrate(step[1])
    if kind == "starve":
        return world.starve(world.procs[step[1] % len(world.procs)], step[2] * 1000)
    raise ValueError(f"unknown step {step!r}")


def choose(
    rng: random.Random, world: World, params: Params, without: frozenset[str] = frozenset()
) -> Step:
    """A random next step, weighted by what the world holds now (no step kind in without)."""
    items = len(world.deliverable())
    active = sum(1 for c in world.callers if not c.done)
    # Time moves on mostly when nothing is in transit: a network that sits on its messages
    # past socket_timeout is a fault like the others, and shows up often enough this way.
    # While k1's slot migrates, time must move on for a lease to outlive its renewals'
    # redirections: TRYAGAIN pauses (20 ms) would otherwise eat every "next".
    moving = world.slot.migrating is not None
    options: list[tuple[float, str]] = [
        (3 if items else 14, "next"),
        (8 if moving else 2, "advance"),
    ]
    options += [(1.2, "part"), (2, "pause")]
    options += [(0.6, "kill"), (0.5, "restart")]
    if active < 8:
        options.append((10, "call"))
        if params.batches:
            options.append((6, "batch"))
    if items:
        options += [(45, "deliver"), (3, "drop"), (3, "dup")]
        if params.refusals:
            options.append((1.5, "refuse"))
    if world.jobs:
        options.append((6, "finish"))
    if params.cancels and any(
        not c.done and c.mode == "async" and c.run is not None for c in world.callers
    ):
        options.append((1.5, "cancel"))
    if world.published:
        options.append((1.5, "replay"))
    options.append((0.7, "forge"))
    if world.stored:
        options.append((0.8, "writeback"))
    options += [(1.0, "clog"), (1.5, "mig"), (0.6, "starve")]
    if any(proc.outbox for proc in world.procs):
        options.append((6, "send"))
    options = [(w, k) for w, k in options if k not in without]
    if not options:
        return ("next",)  # nothing else can happen: time must move
    kind = rng.choices([k for _, k in options], [w for w, _ in options])[0]
    p = rng.randrange(params.procs)
    if kind == "call":
        wait = rng.choice((0, 0, 0, 1000, 3000, 6000))
        call = ("call", p, rng.randrange(params.keys), wait, rng.choice(("sync", "async")))
        first = params.reads and params.read_first > 0 and rng.random() < params.read_first
        return (*call, "read") if first else call
    if kind == "batch":
        size = min(params.keys, rng.choice((2, 3)))
        keys = tuple(rng.sample(range(params.keys), size))
        wait = rng.choice((0, 0, 0, 1000, 3000, 6000))
        return ("batch", p, keys, wait, rng.choice(("sync", "async")))
    if kind in ("deliver", "drop", "dup", "refuse"):
        return (kind, 0 if rng.random() < 0.6 else rng.randrange(max(1, items)))
    if kind == "advance":
        return ("advance", rng.choice((50, 200, 500, 1000, 2000, 3500)))
    if kind == "cancel":
        return ("cancel", rng.randrange(8))
    if kind == "finish":
        how = rng.choices(("ok", "raise", "abort"), (8, 2, 1))[0]
        return ("finish", rng.randrange(len(world.jobs)), how)
    if kind == "pause":
        return ("pause", p, rng.choice((500, 1500, 3000, 5000)))
    if kind in ("kill", "part"):
        return (kind, p)
    if kind == "restart":
        return ("restart", rng.choice((0, 0, 5, 1000)))
    if kind == "replay":
        return ("replay", rng.randrange(len(world.published)))
    if kind == "forge":
        # Variant 4 (a current-looking record) only where calls read first: the schedules
        # drawn before the read stay as they were.
        variants = 5 if params.read_first > 0 else 4
        return ("forge", rng.randrange(variants), rng.randrange(params.keys))
    if kind == "writeback":
        return ("writeback", rng.randrange(len(world.stored)))
    if kind == "clog":
        return ("clog", p)
    if kind == "send":
        queued = [i for i, proc in enumerate(world.procs) if proc.outbox]
        proc_i = rng.choice(queued)
        return ("send", proc_i, rng.randrange(len(world.procs[proc_i].outbox)))
    if kind == "mig":
        return ("mig", rng.choice(("open", "open", "move", "move", "close")))
    if kind == "starve":
        return ("starve", p, rng.choice((300, 1000, 2500)))
    return ("next",)


@dataclass
class Outcome:
    seed: int
    steps: list[Step]
    violation: Violation | None = None
    lines: list[str] = field(default_factory=list)
    drifts: list[float] = field(default_factory=list)


def drifts_for(seed: int, params: Params) -> list[float]:
    rng = random.Random(seed * 7919 + 1)
    return [rng.uniform(-params.max_drift, params.max_drift) for _ in range(params.procs)]


def _quiesce(world: World) -> None:
    """Heal everything, then run fault-free until no call is left (or it is stuck)."""
    world.quiet = True
    for proc in world.procs:
        proc.partitioned = False
        proc.starved_until = 0
        if proc.clogged:
            proc.clogged = False
            world.send_queued(proc, None)
    if world.slot.migrating is not None:
        world.log(world.migrate("close"))
    world.settle()
    limit = world.now_us + _QUIET_LIMIT_US
    world.log("--- schedule over: links healed, no more faults; draining")
    while world.now_us < limit:
        if world.deliverable():
            world.deliver(0)
        elif world.jobs:
            world.log(world.finish_job(0, "ok"))
        else:
            # Everything in transit arrived: a lease given back has been given back.
            world.check_orphans()
            if not any(not c.done and c.proc.epoch == c.epoch for c in world.callers):
                break
            due = world.next_timer_us()
            if due is None:
                break
            world.advance(due - world.now_us)
        world.check_step()
    world.check_quiet()


def run(
    seed: int,
    steps: list[Step],
    params: Params,
    api: Api,
    *,
    trace: bool = False,
    ignored: frozenset[str] = frozenset(),
) -> Outcome:
    """Replay a schedule from the start; the world is rebuilt from the seed's clock drifts."""
    drifts = drifts_for(seed, params)
    world = World(params, api, drifts, trace=trace)
    world.ignored = ignored
    out = Outcome(seed, list(steps), drifts=drifts)
    try:
        for i, step in enumerate(steps):
            world.log(f"step {i}: {describe(step)}")
            what = apply(world, step)
            if what:
                world.log(what)
            world.check_step()
        _quiesce(world)
    except Violation as exc:
        out.violation = exc
        world.log(f"VIOLATION {exc}")
    out.lines = world.lines
    return out


replay = run


def explore(
    seed: int,
    n_steps: int,
    params: Params,
    api: Api,
    ignored: frozenset[str] = frozenset(),
    without: frozenset[str] = frozenset(),
) -> Outcome:
    """A fresh random schedule of up to n_steps; stops at the first violation."""
    rng = random.Random(seed)
    drifts = drifts_for(seed, params)
    world = World(params, api, drifts)
    world.ignored = ignored
    steps: list[Step] = []
    out = Outcome(seed, steps, drifts=drifts)
    try:
        for _ in range(n_steps):
            step = choose(rng, world, params, without)
            steps.append(step)
            apply(world, step)
            world.check_step()
        _quiesce(world)
    except Violation as exc:
        out.violation = exc
    return out


def shrink(
    out: Outcome,
    params: Params,
    api: Api,
    budget: float = 20.0,
    ignored: frozenset[str] = frozenset(),
    max_runs: int = 4000,
) -> Outcome:
    """Delta debugging: the shortest sub-schedule (then the smallest numbers) failing alike.

    Bounded by ``max_runs`` replays (deterministic) and by ``budget`` seconds (a safety net).
    """
    assert out.violation is not None
    kind = out.violation.kind
    best = out
    deadline = time.monotonic() + budget
    runs = 0

    def more() -> bool:
        return runs < max_runs and time.monotonic() < deadline

    def fails(steps: list[Step]) -> Outcome | None:
        nonlocal runs
        runs += 1
        trial = run(out.seed, steps, params, api, ignored=ignored)
        if trial.violation is not None and trial.violation.kind == kind:
            return trial
        return None

    chunk = max(1, len(best.steps) // 2)
    while chunk >= 1 and more():
        i, shrunk = 0, False
        while i < len(best.steps) and more():
            trial = fails(best.steps[:i] + best.steps[i + chunk :])
            if trial is not None:
                best, shrunk = trial, True
            else:
                i += chunk
        if not shrunk:
            chunk //= 2
    # Steps that only matter together (a call and the drop of its request): remove pairs.
    removed = True
    while removed and more():
        removed = False
        n = len(best.steps)
        for i in range(n):
            for j in range(i + 1, n):
                if not more():
                    break
                trial = fails([s for k, s in enumerate(best.steps) if k not in (i, j)])
                if trial is not None:
                    best, removed = trial, True
                    break
            if removed:
                break
    # Smaller numbers read better: deliver the oldest item, shorter pauses and waits.
    for i in range(len(best.steps)):
        if not more():
            break
        step = best.steps[i]
        for simpler in _simpler(step):
            trial = fails([*best.steps[:i], simpler, *best.steps[i + 1 :]])
            if trial is not None:
                best = trial
                break
    return best


def _simpler(step: Step) -> list[Step]:
    kind = step[0]
    if kind in ("deliver", "drop", "dup", "refuse", "cancel", "replay", "finish") and step[1]:
        return [(kind, 0, *step[2:])]
    if kind == "batch" and step[3]:
        return [("batch", step[1], step[2], 0, *step[4:])]
    if kind == "batch" and len(step[2]) > 2:
        return [("batch", step[1], step[2][:2], *step[3:])]
    if kind == "batch" and len(step) > 4 and step[4] != "sync":
        return [step[:4]]
    if kind == "call" and len(step) > 5:
        return [step[:5]]  # no read before the flight
    if kind == "call" and step[3]:
        return [("call", step[1], step[2], 0, *step[4:])]
    if kind == "call" and len(step) > 4 and step[4] != "sync":
        return [("call", step[1], step[2], step[3], "sync")]
    if kind in ("send",) and step[2]:
        return [(kind, step[1], 0)]
    if kind == "starve" and step[2] > 300:
        return [("starve", step[1], step[2] // 2)]
    if kind == "advance" and step[1] > 50:
        return [("next",), ("advance", step[1] // 2)]
    if kind == "pause" and step[2] > 500:
        return [("pause", step[1], step[2] // 2)]
    if kind == "restart" and step[1]:
        return [("restart", 0)]
    return []
