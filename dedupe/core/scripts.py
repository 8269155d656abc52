"""The Lua scripts of the flight protocol; each step that must be atomic is one script.

Every script touches only the keys of one job, which share a hash tag, so the same
scripts run unchanged on a single server and on Redis Cluster.

The record header, the lock value and the freshness rule belong to ``dedupe.core.record``: the
scripts that read them start with its Lua text (``record_header``, ``record_fresh``,
``lock_value``, ``lock_token``), so they read exactly what Python reads. A record is "fresh"
for new callers while its ``keep_ms`` has not passed since it was written nor since its lease
was granted, and the token counter still holds its token. After that, until its ``ttl_ms``
runs out, only a follower that waited on that lease (or an older one) may read it. That
grace lets a follower that lost the pub/sub message still find the outcome on re-check.
"""

from __future__ import annotations

from typing import Final

from dedupe.core import record

__all__ = ["ACQUIRE", "COMPLETE", "COMPLETE_SHARDED", "DISCARD", "FORGET", "PEEK", "RENEW"]

# KEYS: lock, token, result
# ARGV: owner, lock_ttl_ms, token_ttl_ms, floor_token ('' for none)
# -> {0, record, fresh_ms}     an outcome is there for us; fresh_ms: how much longer new
#                              callers may be given it (0: only its waiters may)
#    {1, pttl_ms, lock_value}  another holder leads
#    token (an integer)        we lead now, under lock value "<token>:<owner>" (a bare
#                              integer: the reply of every uncontended call, parsed cheapest)
# A caller that waited on lease T passes floor T: records of older leases are never its
# outcome, however fresh. A caller with no floor is given a record only while the token
# counter still holds the record's own token (COMPLETE keeps the counter alive as long as
# the record): a genuine record of an older lease, written back later, is not fresh.
# Tokens are max(counter + 1, server time in microseconds), so they grow across restarts
# and counter expiry (more than one lease per microsecond never happens).
ACQUIRE: Final = (
    record.LUA_HEADER
    + record.LUA_FRESH
    + record.LUA_LOCK
    + """
local floor = tonumber(ARGV[4])
local rec = redis.pcall('GET', KEYS[3])
local tok, keep, ttl = record_header(rec)
if tok and (floor == nil or tonumber(tok) >= floor) then
  local fresh = record_fresh(KEYS[3], KEYS[2], tok, keep, ttl)
  if fresh > 0 then return {0, rec, fresh} end
  if floor ~= nil then return {0, rec, 0} end
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
local ts = string.format('%d', t)
-- Set the counter to the clock and read what it held, in one call; it is almost always
-- behind the clock. If not (a clock that went back, leases within one microsecond), the
-- token is one past it instead. A value of another type is not ours: overwritten.
local last = redis.pcall('SET', KEYS[2], ts, 'PX', ARGV[3], 'GET')
if type(last) == 'table' and last.err then
  redis.call('SET', KEYS[2], ts, 'PX', ARGV[3])
  last = false
end
last = type(last) == 'string' and string.match(last, '^%d+$') and tonumber(last) or 0
if last > 9000000000000000 then last = 0 end  -- not ours: beyond what a double holds exactly
if last >= t then
  t = last + 1
  ts = string.format('%d', t)
  redis.call('SET', KEYS[2], ts, 'PX', ARGV[3])
end
redis.call('SET', KEYS[1], lock_value(ts, ARGV[1]), 'PX', ARGV[2])
return t
"""
)

# KEYS: lock
# ARGV: lock_value, lock_ttl_ms
# -> 1 renewed, 0 the lease is no longer ours
RENEW: Final = """
if redis.pcall('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lock, result, token
# ARGV: lock_value ("<token>:<owner>"), record ('' to store nothing), record_ttl_ms, message
#       ('' to publish the record itself)
# The channel is the lock key without its ":lock" suffix (keys.names_for), the token the
# lock value's head: neither travels as an argument.
# -> 1         the lease was still ours: stored (if asked) and published
#    0         the lease was lost but no newer lease was granted: stored and published
#    -1        a newer lease exists or may have existed: nothing stored or published
#    {1|0, err} as 1 or 0, but the publish, which alone may fail (an ACL without PUBLISH),
#              failed with err: the outcome is stored, so followers find it on re-check.
_COMPLETE = (
    record.LUA_LOCK
    + """
local owned = 0
if redis.pcall('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  owned = 1
elseif redis.pcall('GET', KEYS[3]) ~= lock_token(ARGV[1]) then
  -- Our lease is gone and the counter moved on (or expired): an outcome of ours would be
  -- older than a flight that has started since. It goes to our own callers only.
  return -1
end
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  -- The counter must outlive the record (ACQUIRE serves a record only while the counter
  -- holds its token). It holds our token here, or expired during a long run under our
  -- lock (no lease can have been granted since); any other value is not ours to touch.
  local tok = lock_token(ARGV[1])
  local cur = redis.pcall('GET', KEYS[3])
  if cur == tok then
    if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[3]) then
      redis.call('PEXPIRE', KEYS[3], ARGV[3])
    end
  elseif cur == false then
    redis.call('SET', KEYS[3], tok, 'PX', ARGV[3])
  end
end
local msg = ARGV[4]
if msg == '' then msg = ARGV[2] end
local sent = redis.pcall('@PUBLISH@', string.sub(KEYS[1], 1, -6), msg)
if type(sent) == 'table' and sent.err then return {owned, sent.err} end
return owned
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

# KEYS: result, token
# -> 1 the record was fresh: new callers would have been served it (as ACQUIRE judges it,
#      with no floor); 0 otherwise (none, or one kept only for its flight's own waiters).
# The key is deleted either way (SingleFlight.forget).
FORGET: Final = (
    record.LUA_HEADER
    + record.LUA_FRESH
    + """
local fresh = 0
local rec = redis.pcall('GET', KEYS[1])
local tok, keep, ttl = record_header(rec)
if tok and record_fresh(KEYS[1], KEYS[2], tok, keep, ttl) > 0 then fresh = 1 end
redis.call('DEL', KEYS[1])
return fresh
"""
)
