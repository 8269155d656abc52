"""The Lua scripts of the flight protocol; each step that must be atomic is one script.

Every script touches only the keys of one job, which share a hash tag, so the same
scripts run unchanged on a single server and on Redis Cluster.

The record header, the lock value and the freshness rule belong to ``dedupe.core.record``: the
scripts that read them start with its Lua text (``record_header``, ``record_state``,
``counter_parts``, ``lock_value``, ``lock_token``), so they read exactly what Python reads. A
record is "fresh" for new callers while its ``keep_ms`` has not passed since it was written
nor since its lease was granted, and it is current (the token counter names it). After
that, until its ``ttl_ms`` runs out, a follower that waited on that lease (or an older one)
may read it, and new callers may be served it stale within their stale windows. The grace
lets a follower that lost the pub/sub message still find the outcome on re-check.
"""

from __future__ import annotations

from typing import Final

from dedupe.core import record

__all__ = [
    "ACQUIRE",
    "COMPLETE",
    "COMPLETE_SHARDED",
    "DISCARD",
    "FORGET",
    "NOTIFY",
    "NOTIFY_SHARDED",
    "PEEK",
    "READ",
    "RENEW",
]

# KEYS: lock, token, result, error
# ARGV: owner, lock_ttl_ms, token_ttl_ms, floor_token ('' for none)
#       [, stale_ms, error_ms, early, flags]: the caller's cache-fill settings, when it has
#       any: stale_while_revalidate and stale_if_error in ms, its XFetch draw
#       (-early_refresh * ln(rand) in thousandths; 0: off) and flags (1: this process may
#       run a refresh in the background; 2: the run this caller waited on failed and a stale
#       value stands in for it: serve it without a run)
# -> token (an integer)        we lead now, under lock value "<token>:<owner>" (a bare
#                              integer: the reply of every uncontended call, parsed cheapest)
#    {0, record, fresh_ms, age_ms}       an outcome is there for us; fresh_ms: how much longer
#                              new callers may be given it (0: only its waiters may)
#    {1, pttl_ms, lock_value [, record, fresh_ms, age_ms]}
#                              another holder leads; with a stale value to fall back on (at
#                              the caller's soft_timeout, or if that run fails)
#    {2, token, record, fresh_ms, age_ms}
#                              we lead now, with a stale value to fall back on
#    {3, record, fresh_ms, age_ms, token}
#                              serve this value now (stale if fresh_ms <= 0), and refresh it:
#                              we lead now, in the background
#    {4, record, fresh_ms, age_ms, why}
#                              serve this stale value now; no run: why 'e', a run failed
#                              (the job backs off, or the run this caller waited on failed);
#                              'r', a refresh runs already, or this caller may not start one
# A caller that waited on lease T passes floor T: records of older leases are never its
# outcome, however fresh. Other records are served only while current (the counter names
# them: record.LUA_RECORD), so a genuine record of an older lease, written back later, is
# never served. A stale value is served only within the caller's windows past its
# freshness, by the server's clock. Tokens are max(counter + 1, server time in
# microseconds), so they grow across restarts and counter expiry (more than one lease per
# microsecond never happens).
ACQUIRE: Final = (
    record.LUA_HEADER
    + record.LUA_RECORD
    + record.LUA_LOCK
    + """
local floor = tonumber(ARGV[4])
local swr = tonumber(ARGV[5]) or 0
local sie = tonumber(ARGV[6]) or 0
local early = tonumber(ARGV[7]) or 0
local flags = tonumber(ARGV[8]) or 0
local background = flags % 2 == 1
local after_error = flags % 4 >= 2

-- A new lease; base: the token of the current value record it refreshes, which then stays
-- current (servable stale) until a newer record is stored; life: the counter's life.
local function grant(base, life)
  local now = redis.call('TIME')
  local t = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local ts = string.format('%d', t)
  local tail = ''
  if base then tail = ':' .. base end
  -- Set the counter to the clock and read what it held, in one call; it is almost always
  -- behind the clock. If not (a clock that went back, leases within one microsecond), the
  -- token is one past it instead. A value of another type is not ours: overwritten.
  local last = redis.pcall('SET', KEYS[2], ts .. tail, 'PX', life, 'GET')
  if type(last) == 'table' and last.err then
    redis.call('SET', KEYS[2], ts .. tail, 'PX', life)
    last = false
  end
  last = type(last) == 'string' and tonumber(string.match(last, '^(%d+)')) or 0
  if last > 9000000000000000 then last = 0 end  -- not ours: beyond what a double holds exactly
  if last >= t then
    t = last + 1
    ts = string.format('%d', t)
    redis.call('SET', KEYS[2], ts .. tail, 'PX', life)
  end
  redis.call('SET', KEYS[1], lock_value(ts, ARGV[1]), 'PX', ARGV[2])
  return t
end

local rec = redis.pcall('GET', KEYS[3])
local tok, keep, ttl = record_header(rec)
local fresh, age, run
local stale = false
if tok then
  fresh, age, run = record_state(KEYS[3], KEYS[2], tok, keep, ttl)
  local ours = floor ~= nil and tonumber(tok) >= floor
  if fresh and fresh > 0 and (floor == nil or ours) then
    -- XFetch: refresh early, with a chance that grows as the end of freshness nears, scaled
    -- by how long the last run took; one refresh at a time, none while backing off.
    if early > 0 and background and run * early / 1000 >= fresh
        and redis.call('PTTL', KEYS[1]) == -2 and redis.call('EXISTS', KEYS[4]) == 0 then
      return {3, rec, fresh, age, grant(tok, math.max(tonumber(ARGV[3]), ttl - age))}
    end
    return {0, rec, fresh, age}
  end
  if ours then return {0, rec, 0, age or 0} end
  stale = fresh ~= nil and (-fresh < swr or -fresh < sie)
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl == -1 then
  -- A lease with no expiry was not written by us; bound it so no waiter waits forever.
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  pttl = tonumber(ARGV[2])
end
if stale then
  local life = math.max(tonumber(ARGV[3]), ttl - age)
  if after_error or redis.call('EXISTS', KEYS[4]) == 1 then
    return {4, rec, fresh, age, 'e'}  -- a run failed: no run, the stale value
  end
  if -fresh < swr then
    if pttl >= 0 or not background then return {4, rec, fresh, age, 'r'} end
    return {3, rec, fresh, age, grant(tok, life)}
  end
  -- Past stale_while_revalidate, within stale_if_error: callers wait for a run, with the
  -- stale value to fall back on.
  if pttl < 0 then return {2, grant(tok, life), rec, fresh, age} end
end
if pttl >= 0 then
  local holder = redis.pcall('GET', KEYS[1])
  if type(holder) ~= 'string' then holder = '' end
  if stale then return {1, pttl, holder, rec, fresh, age} end
  return {1, pttl, holder}
end
return grant(nil, ARGV[3])
"""
)

# KEYS: result, token
# -> {{record, counter}, {seconds, microseconds}}: the hit's read (protocol.Read). Where dedupe
# packs its own requests it is no script: the same replies come from a plain MGET and TIME
# in one round trip (a script costs the server several times a GET); this text carries it
# through a client's command layer (a Cluster, a client passed in, memory://, the simulator).
READ: Final = """
return {redis.call('MGET', KEYS[1], KEYS[2]), redis.call('TIME')}
"""

# KEYS: lock
# ARGV: lock_value, lock_ttl_ms
# -> 1 renewed, 0 the lease is no longer ours
RENEW: Final = """
if redis.pcall('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lock, result, token, error
# ARGV: lock_value ("<token>:<owner>"), record ('' to store nothing), record_ttl_ms, message
#       ('' to publish the record itself)
#       [, fallback token, error_ms, backoff_ms, stale notice]: a failed run with a value
#       to fall back on (stale_if_error; or a failed early refresh, with error_ms 0): if the
#       result key still holds that value, current and less than error_ms past its freshness
#       (error_ms 0: still fresh), it stays; nothing is stored, the job backs off for
#       backoff_ms (if above 0), and the stale notice is published instead
# The channel is the lock key without its ":lock" suffix (keys.names_for), the token the
# lock value's head: neither travels as an argument.
# -> 1         the lease was still ours: stored (if asked) and published
#    0         the lease was lost but no newer lease was granted: stored and published
#    2         the stale value stands in for the failed run (see above)
#    -1        a newer lease exists or may have existed: nothing stored or published
#    {1|0|2, err} as 1, 0 or 2, but the publish, which alone may fail (an ACL without
#              PUBLISH), failed with err: followers find the outcome on re-check.
_COMPLETE = (
    record.LUA_HEADER
    + record.LUA_RECORD
    + record.LUA_LOCK
    + """
local tok = lock_token(ARGV[1])
local state = 0
if redis.pcall('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  state = 1
elseif counter_parts(redis.pcall('GET', KEYS[3])) ~= tok then
  -- Our lease is gone and the counter moved on (or expired): an outcome of ours would be
  -- older than a flight that has started since. It goes to our own callers only.
  return -1
end
local msg = ARGV[4]
local cached = ARGV[5] ~= nil
if cached and ARGV[5] ~= '' then
  local rec = redis.pcall('GET', KEYS[2])
  local rtok, keep, ttl, at = record_header(rec)
  if rtok == ARGV[5] and string.byte(rec, at + 3) == 118 then  -- 'v': a value
    local fresh = record_state(KEYS[2], KEYS[3], rtok, keep, ttl)
    if fresh and -fresh < tonumber(ARGV[6]) then
      if tonumber(ARGV[7]) > 0 then redis.call('SET', KEYS[4], tok, 'PX', ARGV[7]) end
      state = 2
      msg = ARGV[8]
    end
  end
end
if state ~= 2 and ARGV[2] ~= '' then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  if cached then redis.call('DEL', KEYS[4]) end  -- a new outcome ends a backoff
  -- The counter must outlive the record (a record is served only while the counter names
  -- it), and now names this record alone. It names our lease here, or expired during a long
  -- run under our lock (no lease can have been granted since); any other value is not ours.
  local cur = redis.pcall('GET', KEYS[3])
  local lease, base = counter_parts(cur)
  if lease == tok then
    local life = redis.call('PTTL', KEYS[3])
    if base or life < tonumber(ARGV[3]) then
      redis.call('SET', KEYS[3], tok, 'PX', math.max(life, tonumber(ARGV[3])))
    end
  elseif cur == false then
    redis.call('SET', KEYS[3], tok, 'PX', ARGV[3])
  end
end
if msg == '' then msg = ARGV[2] end
local sent = redis.pcall('@PUBLISH@', string.sub(KEYS[1], 1, -6), msg)
if type(sent) == 'table' and sent.err then return {state, sent.err} end
return state
"""
)
COMPLETE: Final = _COMPLETE.replace("@PUBLISH@", "PUBLISH")
COMPLETE_SHARDED: Final = _COMPLETE.replace("@PUBLISH@", "SPUBLISH")  # Redis Cluster

# KEYS: result
# ARGV: record
# Drops a record that failed to decode here, if it is still the same bytes.
DISCARD: Final = """
if redis.pcall('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lock
# -> the lock value ("<token>:<owner>"), or nil
# Who holds the lease: read before giving back a lease an unanswered acquire may have granted
# (the give-back itself is COMPLETE with an abort notice, owner-checked). A script, not GET,
# so that the ACL dedupe needs stays what it is.
PEEK: Final = """
return redis.pcall('GET', KEYS[1])
"""

# KEYS: result, token, lock, error
# ARGV: token_ttl_ms
# -> {kept, voided}: kept 1 if the record was current (fresh, or stale but still servable
#    within a caller's stale window), else 0; voided: the token of the lease held
#    now, 0 for none. SingleFlight.forget: the record and any backoff are deleted; the lease
#    and every older one are voided: the counter moves past them, so none of their runs
#    stores or publishes an outcome (COMPLETE withholds it), and no record of one is served.
FORGET: Final = (
    record.LUA_HEADER
    + record.LUA_RECORD
    + record.LUA_LOCK
    + """
local kept = 0
local rec = redis.pcall('GET', KEYS[1])
local tok, keep, ttl = record_header(rec)
if tok and record_state(KEYS[1], KEYS[2], tok, keep, ttl) then kept = 1 end
redis.call('DEL', KEYS[1], KEYS[4])
local voided = 0
local held = redis.pcall('GET', KEYS[3])
if type(held) == 'string' then
  voided = tonumber(lock_token(held)) or 0
  redis.call('DEL', KEYS[3])
end
local last = redis.pcall('GET', KEYS[2])
if type(last) == 'string' then
  local now = redis.call('TIME')
  local t = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local lease = tonumber(string.match(last, '^(%d+)')) or 0
  if lease >= t and lease < 9000000000000000 then t = lease + 1 end
  redis.call('SET', KEYS[2], string.format('%d', t), 'PX', ARGV[1])
end
return {kept, voided}
"""
)

# KEYS: lock (the channel is its job's: the lock key without ":lock")
# ARGV: message
# Publishes a notice: the abort of a lease that forget voided, so its followers re-check now.
_NOTIFY = """
return redis.pcall('@PUBLISH@', string.sub(KEYS[1], 1, -6), ARGV[1])
"""
NOTIFY: Final = _NOTIFY.replace("@PUBLISH@", "PUBLISH")
NOTIFY_SHARDED: Final = _NOTIFY.replace("@PUBLISH@", "SPUBLISH")
