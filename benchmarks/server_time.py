"""Server time of the flight's scripts, from Redis's own ``INFO commandstats``.

Redis times every command it executes (``usec_per_call``, the script's whole run for
EVALSHA). Each case runs alone after ``CONFIG RESETSTAT``: N fresh keys, one command each,
so the figure is that command's server time and nothing else's. The cases: the raw lease's
two steps (SET NX PX, and its release-and-publish script), and dedupe's acquire (now, and as
it was before the speed work) and complete scripts on the uncontended path (a fresh key:
nothing stored, no lease; the complete stores a 100-byte record and publishes it). Median of
the repeats, min-max in brackets.

``python -m benchmarks.server_time [--calls N] [--repeats R]``; starts its own redis-server.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import uuid
from typing import Any

import redis

from dedupe.backend.commands import ACQUIRE, COMPLETE, Script

from .tools import RELEASE_AND_PUBLISH

CASES = (
    "SET NX PX",
    "raw release + PUBLISH",
    "dedupe acquire",
    "dedupe acquire (before)",
    "dedupe complete",
)

# The acquire script as it was before the speed work (commit 4bf4664): GET and SET of the
# fencing counter as two calls, and a two-element reply for a granted lease. Run beside the
# current one so that the change is measured in one run, not against an old figure.
ACQUIRE_BEFORE = """
local floor = tonumber(ARGV[4])
local rec = redis.pcall('GET', KEYS[3])
if type(rec) == 'string' then
  local tok, keep, ttl = string.match(rec, '^(%d+):(%d+):(%d+):')
  if tok and (floor == nil or tonumber(tok) >= floor) then
    keep, ttl = tonumber(keep), tonumber(ttl)
    local pttl = redis.call('PTTL', KEYS[3])
    -- Fresh while both clocks agree: the key's own (keep_ms since it was written) and the
    -- server's (keep_ms since the lease's grant, which the token is, in microseconds). A
    -- record written back later, or with a longer life than it was sealed with, is stale.
    if keep > 0 and pttl <= ttl then
      local now = redis.call('TIME')
      local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
      local fresh = math.min(keep - (ttl - pttl), math.floor(tonumber(tok) / 1000) + keep - now_ms)
      if fresh > 0 then return {0, rec, fresh} end
    end
    if floor ~= nil then return {0, rec, 0} end
  end
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl == -1 then
  -- A lease with no expiry was not written by us; bound it so no waiter waits forever.
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  pttl = tonumber(ARGV[2])
end
if pttl >= 0 then
  local holder = redis.pcall('GET', KEYS[1])
  if type(holder) ~= 'string' then holder = '' end
  return {1, pttl, holder}
end
local now = redis.call('TIME')
local t = tonumber(now[1]) * 1000000 + tonumber(now[2])
local last = redis.pcall('GET', KEYS[2])
last = type(last) == 'string' and string.match(last, '^%d+$') and tonumber(last) or 0
if last > 9000000000000000 then last = 0 end  -- not ours: beyond what a double holds exactly
if last >= t then t = last + 1 end
local ts = string.format('%d', t)
redis.call('SET', KEYS[2], ts, 'PX', ARGV[3])
redis.call('SET', KEYS[1], ts .. ':' .. ARGV[1], 'PX', ARGV[2])
return {2, ts}
"""


def _usec(client: redis.Redis, command: str) -> float:
    stats: Any = client.info("commandstats")
    return float(stats[f"cmdstat_{command}"]["usec_per_call"])


def _case(client: redis.Redis, case: str, n: int, release_sha: str, before_sha: str) -> float:
    run = uuid.uuid4().hex[:8]
    owner = "bench/1/1/x.1"
    record = b"1:1000:1000:" + b"x" * 88
    if case == "dedupe complete":  # leases to complete, taken before the stats reset
        tokens = [
            int(client.evalsha(ACQUIRE.sha, 3, *_keys(run, i), owner, 10_000, 60_000, ""))
            for i in range(n)
        ]
    client.config_resetstat()
    for i in range(n):
        lock, token, result = _keys(run, i)
        if case == "SET NX PX":
            client.set(lock, "1:me", nx=True, px=10_000)
        elif case == "raw release + PUBLISH":
            client.evalsha(release_sha, 1, lock, "1:me", lock[:-5], b"x" * 100)
        elif case == "dedupe acquire":
            client.evalsha(ACQUIRE.sha, 3, lock, token, result, owner, 10_000, 60_000, "")
        elif case == "dedupe acquire (before)":
            client.evalsha(before_sha, 3, lock, token, result, owner, 10_000, 60_000, "")
        else:
            value = f"{tokens[i]}:{owner}"
            client.evalsha(COMPLETE.sha, 3, lock, result, token, value, record, 60_000, "")
    return _usec(client, "set" if case == "SET NX PX" else "evalsha")


def _keys(run: str, i: int) -> tuple[str, str, str]:
    base = f"st:{run}:{{{i}}}"
    return f"{base}:lock", f"{base}:token", f"{base}:result"


def measure(url: str, calls: int = 5000, repeats: int = 5) -> dict[str, list[float]]:
    client = redis.Redis.from_url(url)
    try:
        release_sha = client.script_load(RELEASE_AND_PUBLISH)
        before_sha = client.script_load(ACQUIRE_BEFORE)
        script: Script
        for script in (ACQUIRE, COMPLETE):
            client.script_load(script.lua)
        out: dict[str, list[float]] = {c: [] for c in CASES}
        for _ in range(repeats):
            for case in CASES:  # interleaved: each repeat runs every case once
                out[case].append(_case(client, case, calls, release_sha, before_sha))
        return out
    finally:
        client.close()


def report(res: dict[str, list[float]]) -> list[str]:
    def med(case: str) -> float:
        return statistics.median(res[case])

    rows = ["| case | server µs per call | vs SET NX PX |", "| --- | --- | --- |"]
    for case in CASES:
        values = res[case]
        rows.append(
            f"| {case} | {med(case):.1f} ({min(values):.1f}-{max(values):.1f}) "
            f"| {med(case) / med('SET NX PX'):.1f}x |"
        )
    return rows


def scenario(url: str, quick: bool) -> dict[str, Any]:
    res = measure(url, calls=1000 if quick else 5000, repeats=3 if quick else 5)
    return {"usec": res}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.server_time", description=__doc__)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=5)
    ns = ap.parse_args(argv)
    from devtools.servers import RedisServer

    server = RedisServer().start()
    try:
        res = measure(server.url, ns.calls, ns.repeats)
    finally:
        server.stop()
    print("\n".join(report(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
