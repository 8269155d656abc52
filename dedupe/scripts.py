"""The Lua scripts of the flight protocol; each step that must be atomic is one script.

Every script touches only the keys of one job, which share a hash tag, so the same
scripts run unchanged on a single server and on Redis Cluster.

A record (what the result key holds) starts with ``<token>:<keep_ms>:<ttl_ms>:``;
the scripts read only that header. A record is "fresh" for new callers while less than
``keep_ms`` has passed since it was written (``ttl_ms - PTTL``); after that, until its
``ttl_ms`` runs out, only a follower that waits on that very token may read it. That
grace lets a follower that lost the pub/sub message still find the outcome on re-check.
"""

from __future__ import annotations

from typing import Final

__all__ = ["ACQUIRE", "COMPLETE", "DISCARD", "RENEW"]

# KEYS: lock, token, result
# ARGV: owner, lock_ttl_ms, token_ttl_ms, waiting_token ('' for none)
# -> {0, record, fresh_ms}     an outcome is there for us; fresh_ms: how much longer new
#                              callers may be given it (0: only its waiters may)
#    {1, pttl_ms, lock_value}  another holder leads
#    {2, token}                we lead now, under lock value "<token>:<owner>"
ACQUIRE: Final = """
local rec = redis.pcall('GET', KEYS[3])
if type(rec) == 'string' then
  local tok, keep, ttl = string.match(rec, '^(%d+):(%d+):(%d+):')
  if tok then
    keep = tonumber(keep)
    if keep > 0 then
      local fresh = keep - (tonumber(ttl) - redis.call('PTTL', KEYS[3]))
      if fresh > 0 then return {0, rec, fresh} end
    end
    if tok == ARGV[4] then return {0, rec, 0} end
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
local t = redis.pcall('INCR', KEYS[2])
if type(t) ~= 'number' or t == 1 then
  -- Seed a new counter from the clock, so tokens keep growing after the counter expires.
  local now = redis.call('TIME')
  t = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('SET', KEYS[2], string.format('%d', t), 'PX', ARGV[3])
else
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
redis.call('SET', KEYS[1], string.format('%d', t) .. ':' .. ARGV[1], 'PX', ARGV[2])
return {2, t}
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

# KEYS: lock, result
# ARGV: lock_value, record ('' to store nothing), record_ttl_ms, message ('' to publish the
#       record itself), channel, publish command ('PUBLISH' or 'SPUBLISH'), token
# -> 1 if the lease was still ours, else 0
COMPLETE: Final = """
local owned = 0
if redis.pcall('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  owned = 1
end
if ARGV[2] ~= '' then
  local store = owned == 1
  if not store then
    -- A leader that lost its lease must not overwrite a newer leader's outcome.
    local cur = redis.pcall('GET', KEYS[2])
    local tok = type(cur) == 'string' and string.match(cur, '^(%d+):') or nil
    store = tok == nil or tonumber(tok) <= tonumber(ARGV[7])
  end
  if store then redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3]) end
end
local msg = ARGV[4]
if msg == '' then msg = ARGV[2] end
redis.call(ARGV[6], ARGV[5], msg)
return owned
"""

# KEYS: result
# ARGV: record
# Drops a record that failed to decode here, if it is still the same bytes.
DISCARD: Final = """
if redis.pcall('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
