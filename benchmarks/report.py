"""Turns scenario results into the markdown report and the PNG plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .scenarios import JOB_S, RAW_WAKE, Params
from .stats import Spread, percentile, ratios

# The scenarios, in the order `make bench` runs them and the report shows them.
SCENARIOS = (
    "callgrind",
    "servertime",
    "hit",
    "overhead",
    "wake",
    "stampede",
    "steady",
    "throughput",
    "memory",
    "herd",
    "flightmem",
)
PEERS_SYNC = ("python-redis-lock", "redis-py Lock", "dogpile.cache")
PEERS_ASYNC = ("cashews",)
CONTROL = "no lock (control)"


def _ok(flag: bool) -> str:
    return "met" if flag else "**missed**"


# Issue 23's targets, in its order and words: every one gets a row of the Targets table ("not
# run" if its scenario was left out). Keys are how the sections report them (Report.goal).
_WAKE_GOALS = tuple(
    (
        f"3 {mode} {n} p{q}",
        "2",
        f"3. Wake-up p{q} ≤ {limit}x the raw floor: {mode}, {n} follower(s)",
    )
    for mode in ("sync", "async")
    for n in (1, 3)
    for q, limit in ((50, 1.2), (99, 1.5))
)
# (key, the report section the figure comes from, the target)
GOALS: tuple[tuple[str, str, str], ...] = (
    ("1 sync", "0", "1. Instructions per uncontended flight ≤ 2.0x the hand-packed floor: sync"),
    ("1 async", "0", "1. Instructions per uncontended flight ≤ 2.0x the hand-packed floor: async"),
    ("1 raw sync", "0", "1. (shown) instructions per flight vs raw redis-py's client API: sync"),
    ("1 raw async", "0", "1. (shown) instructions per flight vs raw redis-py's client API: async"),
    ("2a sync", "0", "2. A hit (fresh kept value) ≤ 1.3x a raw GET's client instructions: sync"),
    ("2a async", "0", "2. A hit (fresh kept value) ≤ 1.3x a raw GET's client instructions: async"),
    ("2b", "0c", "2. A hit ≤ 3x a GET's server time"),
    ("2c instr", "0", "2. A local_cache=True hit ≤ 10k instructions"),
    ("2c trips", "0c", "2. A local_cache=True hit: no round trip"),
    ("2d sync", "0c", "2. Throughput on one hot key ≥ 0.9x raw GET: 8 threads (sync)"),
    ("2d async", "0c", "2. Throughput on one hot key ≥ 0.9x raw GET: 100 asyncio tasks"),
    *_WAKE_GOALS,
    ("4 async", "3", "4. Stampede: async p99 excess ≤ 0.3x the best peer's"),
    ("4 sync", "3", "4. (shown) stampede: sync p99 excess vs the best peer's"),
    ("4 herd", "7", "4. FastAPI herd: wake lag p99 ≤ 0.5x cashews', stable (every repeat)"),
    ("5 sync", "5", "5. Throughput on distinct keys ≥ 1.0x raw redis-py: sync"),
    ("5 async", "5", "5. Throughput on distinct keys ≥ 1.0x raw redis-py: async"),
    ("6 wait 0", "8", "6. Memory per waiting flight ≤ 4 KB, 1,000 flights"),
    ("6 wait 1", "8", "6. Memory per waiting flight ≤ 4 KB, 20,000 flights"),
    ("6 lead 0", "8", "6. Memory per leader ≤ 4 KB, 1,000 flights"),
    ("6 lead 1", "8", "6. Memory per leader ≤ 4 KB, 20,000 flights"),
)
ONE_COUNT = "none (one count)"


def _range(sp: Spread, digits: int = 2, unit: str = "x") -> str:
    """The spread column: min-max over the repeats."""
    if sp.n == 0:
        return "n/a"
    if sp.n == 1:
        return "none (one run)"
    return f"{sp.lo:.{digits}f}-{sp.hi:.{digits}f}{unit} ({sp.n} repeats)"


class Report:
    def __init__(self, res: dict[str, Any], p: Params, meta: dict[str, str]) -> None:
        self.res, self.p, self.meta = res, p, meta
        self.targets: list[tuple[str, str, str, str]] = []  # (scenario, target, measured, verdict)
        self.goals: dict[str, tuple[str, str, str]] = {}  # GOALS key -> (measured, spread, verdict)
        self.lines: list[str] = []

    # --- helpers ------------------------------------------------------------------------------

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("| " + " | ".join("---" for _ in header) + " |")
        for row in rows:
            self.lines.append("| " + " | ".join(row) + " |")
        self.lines.append("")

    def target(self, scenario: str, what: str, measured: str, met: bool | str) -> None:
        """A check beside issue 23's targets (from earlier issues), in the second table."""
        verdict = met if isinstance(met, str) else _ok(met)
        self.targets.append((scenario, what, measured, verdict))

    def goal(self, key: str, measured: str, spread: str, met: bool | str) -> None:
        """One of issue 23's targets (a key of GOALS): its measured figure, the spread over the
        repeats, and met / missed (or "shown" for a figure the issue gives no target)."""
        if key not in {g[0] for g in GOALS}:
            raise KeyError(key)
        self.goals[key] = (measured, spread, met if isinstance(met, str) else _ok(met))

    def ratio_goal(self, key: str, r: Spread, limit: float, *, at_least: bool = False) -> None:
        """A ratio target judged on the median of the per-repeat ratios."""
        met = r.median >= limit if at_least else r.median <= limit
        self.goal(key, f"{r.median:.2f}x", _range(r), met if r.n else "n/a")

    # --- sections -----------------------------------------------------------------------------

    def build(self) -> str:
        p = self.p
        head = [
            f"# dedupe benchmarks ({'--quick' if p.quick else 'full'})",
            "",
            " · ".join(f"{k}: {v}" for k, v in self.meta.items()),
            "",
            f"Every figure is the median of {p.repeats} repeats, with the min-max over the "
            "repeats in brackets. Within a repeat every tool ran once, in rotated order, so each "
            "ratio compares runs interleaved in time on this (noisy, shared) machine.",
            "",
            "Counting: *server cmds* are `INFO commandstats` calls after `CONFIG RESETSTAT` "
            "(every command the server executed, including each `redis.call` inside a Lua "
            "script; the benchmark's own CONFIG/INFO and connection handshakes excluded). "
            "*Round trips* are requests sent by the clients, counted in every process by "
            "wrapping redis-py's `Connection.send_packed_command`, every write of a request "
            "(sync and asyncio; a pipeline is one; dedupe's packed scripts too; handshakes "
            "excluded; pub/sub SUBSCRIBE/UNSUBSCRIBE count one each).",
            "",
        ]
        self.lines = []
        for name in SCENARIOS:
            if name in self.res:
                getattr(self, f"_{name}")(self.res[name])
        body = self.lines
        self.lines = []
        self.lines.append("## Targets (issue 23)")
        self.lines.append("")
        self.lines.append(
            "Each of issue 23's targets: the measured figure (a ratio is the median of the "
            "per-repeat ratios, each taken within one repeat of interleaved runs), its min-max "
            "over the repeats, and the verdict on the median (the herd's: on every repeat). "
            "Instruction counts and memory are one run each: they do not depend on the load "
            "(instructions vary by up to about 2% from run to run, async the most). "
            "*(shown)*: a figure the issue states without a target. *Section*: the section "
            "below with the figures it comes from."
        )
        self.lines.append("")
        rows = []
        for key, section, what in GOALS:
            measured, spread, verdict = self.goals.get(key, ("not run", "", "not run"))
            rows.append([what, measured, spread, verdict, section])
        self.table(["target", "measured", "spread (min-max)", "verdict", "section"], rows)
        self.lines += ["## Other checks (earlier issues)", ""]
        self.table(["scenario", "check", "measured", "verdict"], [list(t) for t in self.targets])
        return "\n".join(head + self.lines + body)

    def _callgrind(self, res: dict[str, Any]) -> None:
        from .callgrind import HIT_PAIRS, LABELS, PAIRS, WARM

        self.lines += ["## 0. Client cost per uncontended flight, in instructions (callgrind)", ""]
        if "skipped" in res:
            self.lines += [f"Skipped: {res['skipped']}.", ""]
            return
        tools = res["tools"]

        def per(t: str) -> float:
            return float(tools[t]["per_call"])

        rows = []
        for mode, dd, raw in PAIRS:
            wire = f"wire-{mode}"
            if dd not in tools or raw not in tools:
                continue
            for t in (raw, wire, dd):
                if t in tools:
                    vs_wire = f"{per(t) / per(wire):.2f}x" if wire in tools else "n/a"
                    rows.append(
                        [mode, LABELS[t], f"{per(t):,.0f}", f"{per(t) / per(raw):.2f}x", vs_wire]
                    )
            r = per(dd) / per(raw)
            self.goal(f"1 raw {mode}", f"{r:.2f}x", ONE_COUNT, "shown")
            if wire in tools:  # issue 23, target 1: the flight against the hand-packed floor
                r = per(dd) / per(wire)
                self.goal(f"1 {mode}", f"{r:.2f}x", ONE_COUNT, r <= 2.0)
        self.table(
            ["mode", "tool", "instructions per call", "vs raw (client API)", "vs hand-packed"],
            rows,
        )
        rows = []
        for mode, hit, get in HIT_PAIRS:
            if hit not in tools or get not in tools:
                continue
            r = per(hit) / per(get)
            rows.append([mode, LABELS[get], f"{per(get):,.0f}", "1.00x"])
            rows.append([mode, LABELS[hit], f"{per(hit):,.0f}", f"{r:.2f}x"])
            self.goal(f"2a {mode}", f"{r:.2f}x", ONE_COUNT, r <= 1.3)
        if "copy-hit-sync" in tools:
            c = per("copy-hit-sync")
            vs = f"{c / per('get-sync'):.2f}x" if "get-sync" in tools else "n/a"
            rows.append(["sync", LABELS["copy-hit-sync"], f"{c:,.0f}", vs])
            said = f"{c:,.0f} instructions"
            if "plain-sync" in tools:  # the loop and a call of a plain function, beside it
                floor = per("plain-sync")
                rows.append(["sync", LABELS["plain-sync"], f"{floor:,.0f}", "n/a"])
                said += f" ({c - floor:,.0f} beyond a plain function's call)"
            self.goal("2c instr", said, ONE_COUNT, c <= 10_000)
        if rows:
            self.lines += [
                "The hit: one hot key, a fresh kept value on every call but the first.",
                "",
            ]
            self.table(["mode", "tool", "instructions per call", "vs raw GET"], rows)
        n = res["calls"]
        self.lines.append(
            f"`valgrind --tool=callgrind`, one process per tool: {WARM} warm-up calls, then "
            f"{n} and {2 * n} more on fresh keys; counters dumped at each mark, so a call costs "
            f"(I(3N) - I(N)) / 2N with N = {n}: start-up removed, every thread of the process "
            "counted (renewal, pub/sub hub), the redis-server not. Instruction counts do not "
            "depend on the machine's load, so there are no repeats. "
            "`python -m benchmarks.callgrind --functions dedupe-sync` writes the per-function "
            "counts. dedupe sends its scripts packed by itself on redis-py connections (no "
            "command layer, no pool per command), so issue 23's target compares with the raw "
            "lease hand-packed on one held connection: the least two round trips cost on "
            "redis-py; the rest of dedupe's figure is its own layer. The raw lease through "
            "redis-py's client API is shown beside it."
        )
        self.lines.append("")

    def _servertime(self, res: dict[str, Any]) -> None:
        import statistics

        from . import server_time as st

        usec = res["usec"]
        self.lines += ["## 0b. Server time of the scripts (INFO commandstats)", ""]
        self.lines += st.report(usec)
        self.lines.append("")
        self.lines.append(
            "Each case alone after `CONFIG RESETSTAT`, one command per fresh key; Redis's own "
            "`usec_per_call` (the whole script for EVALSHA). The acquire before the speed work "
            "runs beside the current one in the same repeats."
        )
        self.lines.append("")

        def med(case: str) -> float:
            return statistics.median(usec[case])

        now, before = med("dedupe acquire"), med("dedupe acquire (before)")
        self.target(
            "0b",
            "acquire script server time comes down (vs the script before)",
            f"{now:.1f} µs vs {before:.1f} µs ({now / before:.2f}x)",
            now < before,
        )

    def _hit(self, res: dict[str, Any]) -> None:
        from .hit import SERVER_CASES, TRIP_CASES

        self.lines += ["## 0c. The hit: a fresh kept value against a raw GET, one hot key", ""]
        usec, per_cmd = res["usec"], res["per_command"]
        base = usec["raw GET"]
        rows = []
        for case in SERVER_CASES:
            sent = ", ".join(f"{k} {v:.2f} µs" for k, v in sorted(per_cmd.get(case, {}).items()))
            r = ratios(usec[case], base)
            rows.append([case, Spread.of(usec[case]).fmt(2), r.ratio(), sent])
        self.table(
            ["case (sync)", "server µs per call", "vs GET", "per command sent (last repeat)"], rows
        )
        self.ratio_goal("2b", ratios(usec["dedupe hit"], base), 3.0)
        self.lines.append(
            f"Server time: per case and repeat, `CONFIG RESETSTAT`, {res['calls']} calls, then "
            "`INFO commandstats`' `usec` summed over every command the client wrote in those "
            "calls (recorded by wrapping redis-py's `send_packed_command`), whatever they are, "
            "per call; a script's `usec` includes the commands it runs, which are not added "
            "again. The async hit sends the same commands."
        )
        self.lines.append("")
        trips = res["trips"]
        self.table(
            ["case (sync)", "round trips per call"],
            [[case, Spread.of(trips[case]).fmt(2)] for case in TRIP_CASES],
        )
        copy = Spread.of(trips["dedupe local copy hit"])
        self.goal(
            "2c trips",
            f"{copy.median:.2f} round trips/call",
            _range(copy, unit=""),
            copy.hi == 0,  # not one round trip in any repeat
        )
        rows = []
        trips_hot = res.get("throughput_trips", {})
        for mode, label in (("sync", "8 threads"), ("async", "100 asyncio tasks")):
            runs = res["throughput"][mode]
            get = runs["raw GET"]
            for tool, rates in runs.items():
                r = ratios(rates, get)
                rt = trips_hot.get(mode, {}).get(tool)
                rt_cell = "n/a" if rt is None else f"{rt:.2f}"
                rows.append([mode, label, tool, Spread.of(rates).fmt(0), r.ratio(), rt_cell])
                if tool == "dedupe hit":
                    self.ratio_goal(f"2d {mode}", r, 0.9, at_least=True)
        self.lines += ["Throughput on the hot key, one process:", ""]
        self.table(["mode", "callers", "tool", "calls/s", "vs raw GET", "round trips/call"], rows)
        self.lines.append(
            f"{self.p.throughput_seconds:g} s per run, after a warm-up round; raw GET through "
            "redis-py's client API (redis.asyncio for async). Round trips per call: from a "
            "separate short counted run of each (counting costs a little, so not in the timed "
            "runs); below 1.00, concurrent dedupe callers of the key shared a call in process."
        )
        self.lines.append("")

    def _flightmem(self, res: dict[str, Any]) -> None:
        from . import flight_memory as fm

        self.lines += ["## 8. Memory per waiting flight and per leader", ""]
        self.lines.append(fm.table(res["rows"]))
        self.lines += ["", fm.NOTE, ""]
        for i, (n, r) in enumerate(res["rows"][:2]):
            for role in ("wait", "lead"):
                kb = r[role]["py_bytes"] / n / 1024
                self.goal(
                    f"6 {role} {i}",
                    f"{kb:.2f} KB ({n:,} flights)",
                    "none (one run)",
                    kb <= fm.TARGET_KB,
                )

    def _herd(self, res: dict[str, Any]) -> None:
        from . import herd_fastapi as hf

        self.lines += [
            f"## 7. FastAPI herd: uvicorn, {hf.WORKERS} workers, {hf.CONCURRENCY} concurrent "
            f"httpx requests per key, {hf.JOB_S * 1000:.0f} ms job",
            "",
        ]
        p99: dict[str, list[float]] = {}
        rows = []
        for tool, e in res.items():
            runs = e["runs"]
            flat = [[x for h in r["lag"] for x in h] for r in runs]
            p50 = [percentile(x, 50) for x in flat]
            p99[tool] = [percentile(x, 99) for x in flat]
            lat99 = [percentile([x for h in r["latency"] for x in h], 99) for r in runs]
            execs = [x for r in runs for x in r["exec"]]
            waiters = [x for r in runs for x in r["waiters"]]
            failed = sum(len(r["errors"]) for r in runs)
            rows.append(
                [
                    tool,
                    f"{sum(execs) / len(execs):.2f} (max {max(execs)})",
                    f"{sum(waiters) / len(waiters):.0f}",
                    Spread.of(p50).fmt(2),
                    Spread.of(p99[tool]).fmt(2),
                    Spread.of(lat99).fmt(0),
                    str(failed),
                ]
            )
            if tool == "dedupe":
                self.target(
                    "7", "dedupe executions/herd = 1.00", f"max {max(execs)}", max(execs) == 1
                )
        self.table(
            [
                "tool",
                "executions/herd",
                "waiting requests/herd",
                "wake lag p50 ms",
                "wake lag p99 ms",
                "request p99 ms (client)",
                "failed requests",
            ],
            rows,
        )
        if "dedupe" in p99 and "cashews" in p99:
            per_repeat = [
                d / c
                for d, c in zip(p99["dedupe"], p99["cashews"], strict=False)
                if c and not math.isnan(d) and not math.isnan(c)
            ]
            r = Spread.of(per_repeat)
            within = sum(1 for x in per_repeat if x <= 0.5)
            self.goal(
                "4 herd",
                f"{r.median:.2f}x ({within} of {r.n} repeats ≤ 0.5x)",
                _range(r),
                r.n > 0 and within == r.n,  # stable: met in every repeat
            )
        self.lines.append(
            "Wake lag: from the job's end (stamped into its value) to a waiting request's "
            "handler having the value, for every request that was already waiting when the job "
            "ended. dedupe runs with result_ttl=60 s, cashews with ttl=60 s and lock=True. "
            "Failed requests: the connection dropped (a stale keep-alive), not counted."
        )
        self.lines.append("")

    def _overhead(self, res: dict[str, Any]) -> None:
        self.lines += ["## 1. Uncontended overhead (no-op, fresh key per call)", ""]
        raw = "raw SET NX PX + EVALSHA"
        rows = []
        for mode in ("sync", "async"):
            runs = res[mode]
            base = [percentile(x, 50) / 1000 for x in runs[raw]]
            for tool, lats in runs.items():
                med = [percentile(x, 50) / 1000 for x in lats]
                p99 = [percentile(x, 99) / 1000 for x in lats]
                mean = [sum(x) / len(x) / 1000 for x in lats]
                rows.append(
                    [
                        mode,
                        tool,
                        Spread.of(med).fmt(0),
                        Spread.of(p99).fmt(0),
                        Spread.of(mean).fmt(0),
                        "1.00x" if tool == raw else ratios(med, base).ratio(),
                    ]
                )
            dd = [percentile(x, 50) for x in runs["dedupe"]]
            r = ratios(dd, [percentile(x, 50) for x in runs[raw]])
            self.target("1", f"{mode}: dedupe ≤ 1.3x raw", r.ratio(), r.median <= 1.3)
            for peer in runs:
                if peer in (raw, "dedupe"):
                    continue
                rp = ratios(dd, [percentile(x, 50) for x in runs[peer]])
                self.target("1", f"{mode}: dedupe faster than {peer}", rp.ratio(), rp.median < 1)
        self.table(["mode", "tool", "median µs/call", "p99 µs", "mean µs", "median vs raw"], rows)
        self.lines.append(
            f"{self.p.overhead_calls} calls per run. The leader path, counted over 100 calls:"
        )
        self.lines.append("")
        rows = []
        for mode, cs in res["commandstats"].items():
            server = ", ".join(f"{k} {v:g}" for k, v in sorted(cs["server"].items()))
            top = cs["server"].get("evalsha", 0) + cs["server"].get("eval", 0)
            rows.append([mode, f"{cs['client']:.2f}", f"{top:.2f}", server])
            self.target(
                "1",
                f"{mode}: leader path = 2 round trips",
                f"{cs['client']:.2f} sent; EVALSHA {top:.2f}/call",
                abs(cs["client"] - 2) < 0.01,
            )
        self.table(
            ["mode", "round trips/call (client)", "EVALSHA/call (server)", "commandstats per call"],
            rows,
        )

    def _wake(self, res: dict[str, Any]) -> None:
        self.lines += [
            "## 2. Follower wake latency (leader's job done → follower returns, other process)",
            "",
            "The floor (*raw PUBLISH→receive*) is the fastest redis-py delivers a message: a "
            "thread in another process blocked in its socket read, stamped the moment redis-py "
            "parsed the message, measured from just before the PUBLISH. The ratios are taken "
            "per repeat against the floor of the same repeat.",
            "",
        ]
        # Issue 23: the floor must be published after the same idle as the leader's job, or it
        # is several times faster than any path that wakes after an idle can be.
        idle = {e.get("idle_ms") for tools in res.values() for e in tools.values()}
        if len(idle) == 1 and None not in idle:
            self.lines += [
                f"Same idle before the message: the raw publisher sleeps {idle.pop():g} ms after "
                "each key's barrier, as long as every leader's job, so the floor and the tools "
                "wake from the same idle (issue 23).",
                "",
            ]
        else:
            self.lines += [
                "**Not the same idle** before the floor's publish and the jobs' ends "
                f"(ms: {sorted(idle, key=str)}): the ratios are not comparable (issue 23).",
                "",
            ]
        for followers, tools in res.items():
            raw = tools[RAW_WAKE]["samples"]
            raw50 = [percentile(s, 50) for s in raw]
            raw99 = [percentile(s, 99) for s in raw]
            rows = []
            for tool, e in tools.items():
                s50 = [percentile(s, 50) for s in e["samples"]]
                s99 = [percentile(s, 99) for s in e["samples"]]
                n = sum(len(s) for s in e["samples"])
                r50, r99 = ratios(s50, raw50), ratios(s99, raw99)
                rows.append(
                    [
                        tool,
                        Spread.of(s50).fmt(2),
                        Spread.of(s99).fmt(2),
                        "1.00x" if tool == RAW_WAKE else r50.ratio(),
                        "1.00x" if tool == RAW_WAKE else r99.ratio(),
                        f"{n} ({e['dropped']} dropped)",
                    ]
                )
                if tool.startswith("dedupe"):
                    mode = "async" if "async" in tool else "sync"
                    self.ratio_goal(f"3 {mode} {followers} p50", r50, 1.2)
                    self.ratio_goal(f"3 {mode} {followers} p99", r99, 1.5)
            self.lines += [f"### {followers} follower process(es)", ""]
            self.table(
                ["tool", "p50 ms", "p99 ms", "p50 vs floor", "p99 vs floor", "samples"], rows
            )
            leg_rows = []
            for tool, e in tools.items():
                runs = [lg for lg in e.get("legs", []) if lg and lg.get("hub→return")]
                if not tool.startswith("dedupe") or not runs:
                    continue
                cells = [tool]
                for leg in ("job→complete", "complete→hub", "hub→return"):
                    m50 = Spread.of([percentile(lg[leg], 50) * 1000 for lg in runs])
                    m99 = Spread.of([percentile(lg[leg], 99) * 1000 for lg in runs])
                    cells.append(f"{m50.fmt(0)} / {m99.median:.0f}")
                leg_rows.append(cells)
            if leg_rows:
                self.lines.append(
                    "The three legs of a dedupe wake-up, p50 / p99 µs (stamped by wrapping "
                    "redis-py's send_packed_command and the hub's message dispatch from "
                    "outside): the "
                    "job's return to the complete script going out, from there to the "
                    "follower's hub reading the message, and from there to the caller's return."
                )
                self.lines.append("")
                self.table(["tool", "job → complete", "complete → hub", "hub → return"], leg_rows)
        self.lines.append(
            f"{self.p.wake_flights} flights per run; the leader's job takes "
            f"{self.p.wake_hold * 1000:.0f} ms and the followers (one per process) join "
            f"{self.p.wake_delay * 1000:.0f} ms after it started. Dropped: a follower that "
            "became the leader or arrived after the job had finished."
        )
        self.lines.append("")

    def _crowd_rows(
        self, res: dict[str, Any], peers: tuple[str, ...], label: str, per_call: bool = False
    ) -> list[list[str]]:
        rows = []
        d99: dict[str, list[float]] = {}
        job = JOB_S * 1000
        for tool, e in res.items():
            p50 = [percentile(x, 50) for x in e["lat"]]
            p99 = [percentile(x, 99) for x in e["lat"]]
            d99[tool] = p99
            row = [tool]
            if per_call:
                calls_per_key = [c / e["keys"] for c in e["calls"]]
                row += [
                    Spread.of(e["exec"]).fmt(2),
                    Spread.of(p50).fmt(1),
                    Spread.of(p99).fmt(1),
                    Spread.of(e["wall_key"]).fmt(0),
                    Spread.of(e["server"]).fmt(1),
                    Spread.of(e["client"]).fmt(1),
                    Spread.of([c / k for c, k in zip(e["client"], calls_per_key, strict=True)]).fmt(
                        2
                    ),
                ]
            else:
                a50 = [percentile(x, 50) for x in e["after_job"]]
                a99 = [percentile(x, 99) for x in e["after_job"]]
                row += [
                    f"{e['keys']}",
                    Spread.of(e["exec"]).fmt(2),
                    Spread.of([x - job for x in p50]).fmt(1),
                    Spread.of([x - job for x in p99]).fmt(1),
                    f"{Spread.of(a50).median:.1f} / {Spread.of(a99).median:.1f}",
                    Spread.of(e["wall_key"]).fmt(0),
                    Spread.of(e["server"]).fmt(1),
                    Spread.of(e["client"]).fmt(1),
                ]
            row.append(Spread.of(e["cpu_key"]).fmt(1))
            if e["wrong"] or e["errors"]:
                row[0] += f" ⚠ {e['wrong']} wrong values"
            rows.append(row)
        if "dedupe" in res:
            dd = res["dedupe"]
            ok_exec = all(abs(x - 1.0) < 1e-9 for x in dd["exec"])
            self.target(
                label,
                "dedupe executions/key = 1.00",
                Spread.of(dd["exec"]).fmt(2),
                ok_exec,
            )
            present = [t for t in peers if t in res]
            if present and not per_call:
                n = len(dd["lat"])
                best_ex, best_rt, dd_ex = [], [], []
                for i in range(n):
                    best_ex.append(
                        min(d99[t][i] - JOB_S * 1000 for t in present if i < len(d99[t]))
                    )
                    best_rt.append(min(res[t]["client"][i] for t in present))
                    dd_ex.append(d99["dedupe"][i] - JOB_S * 1000)
                r = ratios(dd_ex, best_ex)
                if label == "3 async":  # issue 23: async ≤ 0.3x the best peer's; sync shown
                    self.ratio_goal("4 async", r, 0.3)
                else:
                    self.goal("4 sync", f"{r.median:.2f}x", _range(r), "shown")
                r = ratios(dd["client"], best_rt)
                self.target(
                    label, "dedupe round trips/key ≤ 0.1x best peer", r.ratio(), r.median <= 0.1
                )
        return rows

    def _stampede(self, res: dict[str, Any]) -> None:
        p = self.p
        header = [
            "tool",
            "keys/run",
            "executions/key",
            "p50 excess ms",
            "p99 excess ms",
            "job end → return p50 / p99 ms",
            "wall ms/key",
            "server cmds/key",
            "round trips/key",
            "client CPU ms/key",
        ]
        self.lines += [
            f"## 3. Stampede: {p.procs} processes x {p.threads} threads (sync), "
            f"x {p.tasks} tasks (async), {JOB_S * 1000:.0f} ms job, 1 KB result",
            "",
            "Each key in turn: all callers meet at a cross-process barrier, then call it cold. "
            "Peers run cache-aside under their lock. Excess = caller latency - 20 ms job; "
            "'job end → return': from the end of the (first) execution to each caller's "
            "return. Client CPU: all 4 processes' CPU time during the run, per key. "
            f"Polling peers ({', '.join(p.slow_tools)}) get {p.stampede_keys_slow} key(s) per "
            f"run instead of {p.stampede_keys}: each of their keys takes seconds.",
            "",
            "### sync",
            "",
        ]
        self.table(header, self._crowd_rows(res["sync"], PEERS_SYNC, "3 sync"))
        self.lines += ["### async", ""]
        self.table(header, self._crowd_rows(res["async"], PEERS_ASYNC, "3 async"))
        for mode in ("sync", "async"):
            dd = res[mode].get("dedupe")
            if dd:
                bd = ", ".join(f"{k} {v:.1f}" for k, v in sorted(dd["breakdown"].items()))
                self.lines.append(f"dedupe {mode}, server commands per key (last run): {bd}")
                self.lines.append("")

    def _steady(self, res: dict[str, Any]) -> None:
        p = self.p
        header = [
            "tool",
            "executions/key",
            "p50 ms",
            "p99 ms",
            "wall ms",
            "server cmds/key",
            "round trips/key",
            "round trips/call",
            "client CPU ms/key",
        ]
        self.lines += [
            f"## 4. Steady traffic over cold keys: {p.procs} x {p.threads} callers, each visiting "
            f"all {p.steady_keys} keys in its own random order",
            "",
            "result_ttl / cache TTL cover the run, so late callers are served the kept value. "
            "The floor is one read per call (round trips/call = 1.00). "
            "'dedupe+local copy' is dedupe with local_cache=True: each kept value stays in "
            "the process while Redis keeps it fresh.",
            "",
        ]
        self.table(header, self._crowd_rows(res, PEERS_SYNC, "4", per_call=True))
        if "dedupe" in res:
            dd = res["dedupe"]
            rt = [c / (n / dd["keys"]) for c, n in zip(dd["client"], dd["calls"], strict=True)]
            self.target(
                "4", "dedupe round trips per call (floor: 1.00)", Spread.of(rt).fmt(2), "shown"
            )
        if "dedupe+local copy" in res and "dedupe" in res:
            loc, dd = res["dedupe+local copy"], res["dedupe"]
            r = ratios(loc["client"], dd["client"])
            self.target("4", "local copy: round trips vs plain dedupe", r.ratio(), r.median < 1)

    def _throughput(self, res: dict[str, Any]) -> None:
        raw = "raw SET NX PX + EVALSHA"
        self.lines += [
            "## 5. Throughput: distinct keys, one process (8 threads sync, 100 tasks async)",
            "",
        ]
        rows = []
        for mode in ("sync", "async"):
            base = res[mode][raw]
            for tool, rates in res[mode].items():
                r = ratios(rates, base)
                rows.append([mode, tool, Spread.of(rates).fmt(0), r.ratio()])
                if tool == "dedupe":
                    self.ratio_goal(f"5 {mode}", r, 1.0, at_least=True)
        self.table(["mode", "tool", "flights/s", "vs raw"], rows)
        self.lines.append(f"{self.p.throughput_seconds:g} s per run.")
        self.lines.append("")

    def _memory(self, res: dict[str, Any]) -> None:
        self.lines += ["## 6. Memory", ""]
        empty = res["sync_flights"] == 0 and res["async_flights"] == 0 and res["hub_channels"] == 0
        self.table(
            [
                "flights",
                "of them cross-table followers",
                "seconds",
                "RSS before → after (MB)",
                "growth MB",
                "sync / async flights left",
                "hub channels left",
            ],
            [
                [
                    f"{res['flights']:,}",
                    f"{res['contended']:,}",
                    f"{res['seconds']:.1f}",
                    f"{res['rss_before_mb']:.1f} → {res['rss_after_mb']:.1f}",
                    f"{res['growth_mb']:.2f}",
                    f"{res['sync_flights']} / {res['async_flights']}",
                    f"{res['hub_channels']}",
                ]
            ],
        )
        self.lines.append(
            "Async, 100 tasks, distinct keys; every 50th flight also has a sync caller in a "
            "thread, which follows through the pub/sub hub. RSS measured after a 2,000-flight "
            "warm-up and after the run (gc collected)."
        )
        self.lines.append("")
        self.target("6", "RSS growth < 10 MB", f"{res['growth_mb']:.2f} MB", res["growth_mb"] < 10)
        self.target("6", "in-process tables empty", "yes" if empty else "no", empty)


# --------------------------------------------------------------------------- plots


def plots(res: dict[str, Any], outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []

    def cdf(ax: Any, data: dict[str, list[float]], xlabel: str) -> None:
        for name, vals in data.items():
            vals = sorted(v for v in vals if v > 0)
            if not vals:
                continue
            ys = [(i + 1) / len(vals) for i in range(len(vals))]
            ax.plot(vals, ys, label=name, lw=1.6 if name.startswith("dedupe") else 1.1)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of calls ≤ x")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")

    if "stampede" in res:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, mode in zip(axes, ("sync", "async"), strict=True):
            data = {
                t: [x for run in e["lat"] for x in run] for t, e in res["stampede"][mode].items()
            }
            cdf(ax, data, "caller latency, ms (log)")
            ax.axvline(JOB_S * 1000, color="grey", ls=":", lw=1)
            ax.set_title(f"Stampede latency distribution ({mode})")
        fig.tight_layout()
        path = outdir / "stampede_latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)

        fig, ax = plt.subplots(figsize=(12, 4.5))
        labels, server, client = [], [], []
        for mode in ("sync", "async"):
            for t, e in res["stampede"][mode].items():
                labels.append(f"{t}\n({mode})")
                server.append(Spread.of(e["server"]).median)
                client.append(Spread.of(e["client"]).median)
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], server, 0.4, label="server commands/key (commandstats)")
        ax.bar([x + 0.2 for x in xs], client, 0.4, label="client round trips/key")
        for x, s, c in zip(xs, server, client, strict=True):
            ax.text(x - 0.2, s, f"{s:.0f}", ha="center", va="bottom", fontsize=7)
            ax.text(x + 0.2, c, f"{c:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("per key (log)")
        ax.set_title("Stampede: Redis commands per key per tool")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        fig.tight_layout()
        path = outdir / "commands_per_key.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)

    if "wake" in res:
        panels = list(res["wake"].items())
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
        for ax, (followers, tools) in zip(axes[0], panels, strict=True):
            data = {t: [x for run in e["samples"] for x in run] for t, e in tools.items()}
            floor = data.pop(RAW_WAKE, [])
            cdf(
                ax, {"raw floor (blocked redis-py reader)": floor, **data}, "wake latency, ms (log)"
            )
            ax.set_title(f"Wake latency vs the raw floor, {followers} follower process(es)")
        fig.tight_layout()
        path = outdir / "wake_latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)

    if "overhead" in res:
        fig, ax = plt.subplots(figsize=(8, 4))
        labels, vals, errs = [], [], []
        for mode in ("sync", "async"):
            for t, lats in res["overhead"][mode].items():
                sp = Spread.of([percentile(x, 50) / 1000 for x in lats])
                labels.append(f"{t}\n({mode})")
                vals.append(sp.median)
                errs.append((sp.median - sp.lo, sp.hi - sp.median))
        ax.bar(range(len(vals)), vals, yerr=list(zip(*errs, strict=True)), capsize=3)
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("median µs per call")
        ax.set_title("Uncontended overhead (acquire+release on a fresh key)")
        fig.tight_layout()
        path = outdir / "overhead.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made
