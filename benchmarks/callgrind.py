"""Client cost per uncontended flight, counted in instructions under ``valgrind --tool=callgrind``.

Instruction counts do not depend on what else the (shared, noisy) machine is doing, so this
scenario measures every change without noise. Each tool runs in a fresh process under
callgrind: a warm-up, then N calls on fresh keys, then 2N more. The process calls
``os.getpgrp()`` (a function nothing else calls) after the warm-up, after N calls and after 3N,
and callgrind dumps its counters on entering it (``--dump-before=os_getpgrp``); the difference
of the counts through 3N calls and through N calls, divided by 2N, is the cost of one call,
with start-up, imports, warm-up and shutdown removed. Every thread of the process is counted
(the renewal thread and the pub/sub hub too), but not the redis-server, outside valgrind.
With ``callgrind_control`` at hand, valgrind starts with instrumentation off and the worker
turns it on after the warm-up: the uncounted start-up (97% of a process's instructions) runs
several times faster, and the counted calls are instrumented just the same.

``python -m benchmarks.callgrind [--calls N] [--tools a,b] [--functions TOOL]``; ``--functions``
also writes the per-C-function self counts (``--dump-instr=no``) of the last 2N calls of that
tool, per call, to ``results/profile/``, and ``--pyfuncs TOOL`` the Python bytecodes each Python
function runs per call (``sys.settrace``, deterministic, outside valgrind). It starts its own
redis-server. ``--worker TOOL N URL`` runs inside valgrind; it is not meant to be run by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

TOOLS = ("raw-sync", "wire-sync", "dedupe-sync", "raw-async", "wire-async", "dedupe-async")
# The hit (issue 23): a fresh kept value against a raw GET, sync and async; a local copy alone.
HIT_TOOLS = ("get-sync", "hit-sync", "copy-hit-sync", "plain-sync", "get-async", "hit-async")
HIT_PAIRS = (("sync", "hit-sync", "get-sync"), ("async", "hit-async", "get-async"))
LABELS = {
    "raw-sync": "raw SET NX PX + EVALSHA (redis-py)",
    "wire-sync": "raw, hand-packed on one redis-py Connection",
    "dedupe-sync": "dedupe (sync)",
    "raw-async": "raw SET NX PX + EVALSHA (redis.asyncio)",
    "wire-async": "raw, hand-packed on one redis.asyncio Connection",
    "dedupe-async": "dedupe (async)",
    "get-sync": "raw GET (redis-py client API)",
    "hit-sync": "dedupe, a fresh kept value (sync)",
    "copy-hit-sync": "dedupe, a local copy (local_cache, sync)",
    "plain-sync": "a plain function call (the loop's own cost)",
    "get-async": "raw GET (redis.asyncio client API)",
    "hit-async": "dedupe, a fresh kept value (async)",
}
# The target compares with raw redis-py; the wire baseline (no pool, no command layer) is
# shown beside it: it is what dedupe's own layer costs on top of the least redis-py can do.
PAIRS = (("sync", "dedupe-sync", "raw-sync"), ("async", "dedupe-async", "raw-async"))
WIRE_PAIRS = (("sync", "dedupe-sync", "wire-sync"), ("async", "dedupe-async", "wire-async"))
WARM = 100  # calls before the measured ones, in both runs: connections, scripts, caches
_LATE = "DEDUPE_CALLGRIND_INSTR_LATE"  # set: the worker turns instrumentation on after WARM
OUT = Path(__file__).resolve().parent / "results" / "profile"


# --------------------------------------------------------------------------- worker (in valgrind)


def _instrument_on() -> None:
    """Turn callgrind's instrumentation on in this process, if it was started without
    (``--instr-atstart=no``: Python's start-up, imports and the warm-up then run several
    times faster, uncounted). ``callgrind_control`` asks through vgdb, which valgrind polls
    while the process runs code: wait for it busily, never blocked in a system call."""
    if os.environ.get(_LATE) != "1":
        return
    proc = subprocess.Popen(
        ["callgrind_control", "--instr=on", str(os.getpid())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    end = time.monotonic() + 120
    while proc.poll() is None:
        if time.monotonic() > end:
            proc.kill()
            raise RuntimeError("callgrind_control did not answer in 120 s")
    out = proc.stdout.read() if proc.stdout else b""
    if proc.returncode != 0:
        raise RuntimeError(f"callgrind_control failed: {out[-500:]!r}")


def _worker(tool: str, n: int, url: str) -> None:
    prefix = f"cg:{tool}:{n}:{os.getpid()}"
    marks = (WARM, WARM + n, WARM + 3 * n)  # callgrind dumps at each os.getpgrp()
    if tool.endswith("-sync"):
        t: Any = _tool_class(tool)(url, prefix)
        i = 0
        for mark in marks:
            while i < mark:
                t(i)
                i += 1
            if mark == WARM:
                _instrument_on()
            os.getpgrp()
        t.close()
        return

    async def run() -> None:
        a: Any = _tool_class(tool)(url, prefix)
        await a.start()
        i = 0
        for mark in marks:
            while i < mark:
                await a(i)
                i += 1
            if mark == WARM:
                _instrument_on()
            os.getpgrp()
        await a.close()

    asyncio.run(run())


def _tool_class(tool: str) -> Any:
    from . import tools

    return {
        "raw-sync": tools.RawSync,
        "wire-sync": tools.RawWireSync,
        "dedupe-sync": tools.DedupeNoop,
        "raw-async": tools.RawAsync,
        "wire-async": tools.RawWireAsync,
        "dedupe-async": tools.DedupeNoopAsync,
        "get-sync": tools.RawGetSync,
        "hit-sync": tools.DedupeHit,
        "copy-hit-sync": tools.DedupeCopyHit,
        "plain-sync": tools.PlainCall,
        "get-async": tools.RawGetAsync,
        "hit-async": tools.DedupeHitAsync,
    }[tool]


# --------------------------------------------------------------------------- parent


def _total(path: Path) -> int:
    """The Ir total of a callgrind output file (the 'totals:' or 'summary:' line)."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def _env(extra_path: str | None) -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    parts = [p for p in (extra_path, env.get("PYTHONPATH"), root) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONHASHSEED"] = "0"  # the same dict layouts in every run
    return env


def run_one(
    tool: str,
    n: int,
    url: str,
    workdir: Path,
    *,
    extra_path: str | None = None,
    timeout: float = 900,
) -> dict[str, Any]:
    """One process running ``tool``: instructions of its N and of its next 2N calls."""
    out = workdir / f"cg.{tool}.out"
    late = shutil.which("callgrind_control") is not None
    env = _env(extra_path)
    env[_LATE] = "1" if late else "0"
    cmd = [
        "valgrind",
        "--tool=callgrind",
        f"--instr-atstart={'no' if late else 'yes'}",
        "--dump-instr=no",
        "--collect-jumps=no",
        "--compress-strings=no",  # each dump file readable alone
        "--compress-pos=no",
        "--dump-before=os_getpgrp",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-m",
        "benchmarks.callgrind",
        "--worker",
        tool,
        str(n),
        url,
    ]
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"callgrind run of {tool} failed:\n{proc.stderr[-3000:]}")
    # Dump k holds the counts since dump k-1 (or since instrumentation went on): 1 = start-up
    # and warm-up, 2 = N calls, 3 = 2N.
    dumps = {int(p.suffix[1:]): p for p in workdir.glob(f"cg.{tool}.out.*")}
    if not {2, 3} <= set(dumps):
        raise RuntimeError(f"callgrind wrote no marker dumps for {tool}: {sorted(dumps)}")
    first, second = _total(dumps[2]), _total(dumps[3])
    return {
        "per_call": (second - first) / n,  # = (I(3N) - I(N)) / 2N, start-up removed
        "n_calls": first,
        "2n_calls": second,
        "calls": n,
        "dump": dumps[3],
    }


def per_call(
    tools: tuple[str, ...],
    n: int,
    url: str,
    *,
    extra_path: str | None = None,
    keep: Path | None = None,
    jobs: int = 0,
) -> dict[str, dict[str, Any]]:
    """Instructions per call for each tool: (I(3N) - I(N)) / 2N.

    ``jobs`` processes run at once (0: one per core). The counts are each process's own, so
    running several at a time changes the wall time only; most of it is Python's start-up
    under valgrind."""
    res: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="dedupe-cg-") as tmp:
        work = Path(tmp)

        def one(tool: str) -> dict[str, Any]:
            t0 = time.monotonic()
            r = run_one(tool, n, url, work, extra_path=extra_path)
            r["seconds"] = time.monotonic() - t0
            k = r["per_call"] / 1000
            print(f"  callgrind {tool}: {k:.0f}k instr/call ({r['seconds']:.0f} s)", flush=True)
            return r

        with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as ex:
            done = dict(zip(tools, ex.map(one, tools), strict=True))
        for tool in tools:  # in the order asked for
            r = done[tool]
            dump = r.pop("dump")
            res[tool] = r
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(dump, keep / f"callgrind.{tool}.out")  # the last 2N calls
    return res


def functions(path: Path, calls: int, limit: int = 40) -> str:
    """Self instructions per call of each C function (callgrind's own file format, read here:
    a cost line that follows a ``calls=`` line is the callee's inclusive cost, not self)."""
    own: dict[str, int] = {}
    fn, ob, after_call = "?", "", False
    with path.open(errors="replace") as f:
        for line in f:
            head = line[:1]
            if line.startswith("fn="):
                fn, after_call = line[3:].strip(), False
            elif line.startswith("ob="):
                ob = line[3:].strip().rsplit("/", 1)[-1]
            elif line.startswith("calls="):
                after_call = True
            elif head.isdigit() or head in "+-*":
                fields = line.split()
                if after_call:
                    after_call = False
                elif len(fields) > 1:
                    name = f"{fn} [{ob}]"
                    own[name] = own.get(name, 0) + int(fields[1])
    total = sum(own.values())
    lines = [f"{total / calls:16,.0f}  TOTAL instructions per call (over {calls} calls)", ""]
    lines.append(f"{'self instr/call':>16}  C function [object]")
    for name, ir in sorted(own.items(), key=lambda kv: -kv[1])[:limit]:
        lines.append(f"{ir / calls:16,.0f}  {name}")
    return "\n".join(lines)


def pyfuncs(tool: str, n: int, url: str, limit: int = 400) -> str:
    """Python bytecodes run per call, per Python function (all threads), over ``n`` calls."""
    import threading
    from types import FrameType

    counts: dict[tuple[str, str, int], int] = {}
    calls: dict[tuple[str, str, int], int] = {}

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        code = frame.f_code
        where = (code.co_filename, code.co_name, code.co_firstlineno)
        if event == "call":
            frame.f_trace_opcodes = True
            calls[where] = calls.get(where, 0) + 1
        elif event == "opcode":
            counts[where] = counts.get(where, 0) + 1
        return tracer

    prefix = f"pf:{tool}:{os.getpid()}"
    if tool.endswith("-sync"):
        t: Any = _tool_class(tool)(url, prefix)
        for i in range(WARM):
            t(i)
        threading.settrace(tracer)
        sys.settrace(tracer)
        for i in range(WARM, WARM + n):
            t(i)
        sys.settrace(None)
        threading.settrace(None)  # type: ignore[arg-type]
        t.close()
    else:

        async def run() -> None:
            a: Any = _tool_class(tool)(url, prefix)
            await a.start()
            for i in range(WARM):
                await a(i)
            threading.settrace(tracer)
            sys.settrace(tracer)
            for i in range(WARM, WARM + n):
                await a(i)
            sys.settrace(None)
            threading.settrace(None)  # type: ignore[arg-type]
            await a.close()

        asyncio.run(run())
    total = sum(counts.values())
    lines = [f"{total / n:12,.0f}  TOTAL bytecodes per call ({tool}, {n} calls)", ""]
    lines.append(f"{'bytecodes/call':>14} {'calls/call':>10}  function")
    for where, c in sorted(counts.items(), key=lambda kv: -kv[1])[:limit]:
        file = where[0].split("site-packages/")[-1].split("/work/main/")[-1]
        lines.append(
            f"{c / n:14,.0f} {calls.get(where, 0) / n:10.2f}  {where[1]} ({file}:{where[2]})"
        )
    return "\n".join(lines)


def available() -> bool:
    return shutil.which("valgrind") is not None


def scenario(url: str, quick: bool) -> dict[str, Any]:
    """The `make bench` scenario: per-call instructions of dedupe and raw, sync and async."""
    if not available():
        return {"skipped": "valgrind is not installed (apt-get install valgrind)"}
    n = 100 if quick else 300
    return {"calls": n, "tools": per_call(TOOLS + HIT_TOOLS, n, url)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.callgrind", description=__doc__)
    ap.add_argument("--worker", nargs=3, metavar=("TOOL", "N", "URL"), help=argparse.SUPPRESS)
    ap.add_argument("--calls", type=int, default=300, help="N (the runs do N and 3N calls)")
    ap.add_argument(
        "--tools", default=",".join(TOOLS), help=f"subset of {', '.join(TOOLS + HIT_TOOLS)}"
    )
    ap.add_argument("--functions", default="", help="also write per-function counts of TOOL")
    ap.add_argument("--pyfuncs", default="", help="Python bytecodes per function of TOOL")
    ap.add_argument("--path", default=None, help="prepend this to PYTHONPATH (a patched copy)")
    ap.add_argument("--jobs", type=int, default=0, help="valgrind processes at once (0: cores)")
    ns = ap.parse_args(argv)
    if ns.worker:
        tool, n, url = ns.worker
        _worker(tool, int(n), url)
        return 0
    if ns.pyfuncs:
        from devtools.servers import RedisServer as _Server

        srv = _Server().start()
        try:
            text = pyfuncs(ns.pyfuncs, ns.calls, srv.url)
        finally:
            srv.stop()
        OUT.mkdir(parents=True, exist_ok=True)
        dest = OUT / f"pyfuncs-{ns.pyfuncs}.txt"
        dest.write_text(text + "\n")
        print(text)
        return 0
    if not available():
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 1
    from devtools.servers import RedisServer

    tools = tuple(t.strip() for t in ns.tools.split(",") if t.strip())
    bad = set(tools) - set(TOOLS) - set(HIT_TOOLS)
    if bad:
        ap.error(f"unknown tools: {', '.join(sorted(bad))}")
    server = RedisServer().start()
    try:
        with tempfile.TemporaryDirectory(prefix="dedupe-cgf-") as keep:
            res = per_call(
                tools, ns.calls, server.url, extra_path=ns.path, keep=Path(keep), jobs=ns.jobs
            )
            if ns.functions:
                OUT.mkdir(parents=True, exist_ok=True)
                dump = Path(keep) / f"callgrind.{ns.functions}.out"
                text = functions(dump, 2 * ns.calls)
                dest = OUT / f"callgrind-{ns.functions}.txt"
                dest.write_text(text + "\n")
                print(f"wrote {dest}")
    finally:
        server.stop()
    for tool, r in res.items():
        print(f"{LABELS[tool]:45} {r['per_call']:>10,.0f} instr/call")
    for mode, dd, raw in PAIRS:
        if dd in res and raw in res:
            print(f"{mode}: dedupe / raw = {res[dd]['per_call'] / res[raw]['per_call']:.2f}x")
    for mode, dd, wire in WIRE_PAIRS:
        if dd in res and wire in res:
            ratio = res[dd]["per_call"] / res[wire]["per_call"]
            print(f"{mode}: dedupe / hand-packed raw = {ratio:.2f}x")
    for mode, hit, get in HIT_PAIRS:
        if hit in res and get in res:
            ratio = res[hit]["per_call"] / res[get]["per_call"]
            print(f"{mode}: kept hit / raw GET = {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
