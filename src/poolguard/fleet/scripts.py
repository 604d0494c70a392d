"""The Lua scripts that keep a fleet's state in Redis, one atomic step each.

Every script reads the time with ``redis.call('TIME')``: the members' clocks are never
compared, so skew between hosts changes nothing. Keys share the hash tag ``{name}`` (one
slot) and are derived from the prefix passed in ``ARGV[1]``:

``meta``     hash: ``created``, ``last`` (ms of the last script run), ``cap``, ``qver``
``leases``   hash: member -> leases held; ``expiry`` zset: member -> lease expiry (ms)
``pools``    hash: member -> pool capacity; ``info`` hash: member -> JSON for ``check``
``seq``      hash: member -> sequence number of the last request applied (stale ones lose)
``q:<fp>``   hash per quarantined fingerprint; ``qidx`` zset: fp -> key expiry (ms)
``s:<fp>``   zset of strikes (score: ms) within the window; ``events`` the pub/sub channel

The scripts only count and compare; what a member asks for is decided in
:mod:`poolguard.fleet.shares` (pure Python).
"""

from __future__ import annotations

__all__ = ["CLAIM", "CLOSE", "LEAVE", "OPEN", "READ", "STATE", "STRIKE", "SYNC"]

_PRELUDE = """
local p = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function num(x) if x then return tonumber(x) end return nil end
"""

#: ARGV: prefix, member, seq, want, claim, ttl_ms, cap, pool, info_json, rejoin
#: Returns {leases, members, total, fair, grace_ms, starving, qver, applied}.
SYNC = (
    _PRELUDE
    + """
local me = ARGV[2]
local seq = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local claim = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
local cap = tonumber(ARGV[7])
local pool = tonumber(ARGV[8])
local rejoin = ARGV[10] == '1'
local meta, leases, exp = p .. 'meta', p .. 'leases', p .. 'expiry'
local pools, info, seqs = p .. 'pools', p .. 'info', p .. 'seq'
local created = num(redis.call('HGET', meta, 'created'))
if not created then
  created = now
  redis.call('HSET', meta, 'created', now, 'last', now, 'qver', 0)
  -- State was lost (a restart without persistence) if the first to come back had a share:
  -- for one TTL nobody grows past what it had, so every survivor gets its share back.
  if rejoin then redis.call('HSET', meta, 'grace', now + ttl) end
end
local last = num(redis.call('HGET', meta, 'last')) or now
local gap = now - last
if gap > ttl then
  -- No script ran for a whole TTL: Redis was stalled (or every member was away), so
  -- nobody could renew. Nobody is presumed dead for it: every lease moves by the gap.
  local all = redis.call('ZRANGE', exp, 0, -1, 'WITHSCORES')
  for i = 1, #all, 2 do redis.call('ZADD', exp, tonumber(all[i + 1]) + gap, all[i]) end
end
redis.call('HSET', meta, 'last', now, 'cap', cap)
local dead = redis.call('ZRANGEBYSCORE', exp, '-inf', '(' .. now)
for _, m in ipairs(dead) do
  redis.call('HDEL', leases, m)
  redis.call('HDEL', pools, m)
  redis.call('HDEL', info, m)
  redis.call('HDEL', seqs, m)
end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', exp, '-inf', '(' .. now) end
local cur = num(redis.call('HGET', leases, me))
local registering = cur == nil
local applied = 1
if not registering then
  local s = num(redis.call('HGET', seqs, me)) or -1
  if seq < s then applied = 0 end
elseif rejoin and now - created < ttl then
  -- Coming back to a fleet re-created moments ago: the grace covers this member too.
  local g = num(redis.call('HGET', meta, 'grace')) or 0
  if g < created + ttl then redis.call('HSET', meta, 'grace', created + ttl) end
end
local vals = redis.call('HGETALL', leases)
local others, n, held = 0, 1, {}
for i = 1, #vals, 2 do
  if vals[i] ~= me then
    local h = tonumber(vals[i + 1])
    others = others + h
    n = n + 1
    held[vals[i]] = h
  end
end
local fair = math.floor(cap / n)
-- What the other members below their base share still need. Nobody grows past its own
-- base share into it: a member that just joined gets its share before anyone borrows.
local need = 0
local pv = redis.call('HGETALL', pools)
for i = 1, #pv, 2 do
  if pv[i] ~= me then
    local short = math.min(tonumber(pv[i + 1]), fair) - (held[pv[i]] or 0)
    if short > 0 then need = need + short end
  end
end
local grace = (num(redis.call('HGET', meta, 'grace')) or 0) - now
if registering then
  -- What the member is using already (its last share, or its fallback share), if it fits.
  cur = math.max(0, math.min(claim, cap - others))
end
if applied == 1 then
  if want <= cur then
    cur = math.max(want, 0)
  elseif grace <= 0 then
    local free = cap - others - cur
    local upto = math.max(0, math.min(math.min(want, math.min(pool, fair)) - cur, free))
    local above = math.max(0, math.min(want - cur - upto, free - upto - need))
    cur = cur + upto + above
  end
  redis.call('HSET', leases, me, cur)
  redis.call('HSET', seqs, me, seq)
elseif registering then
  redis.call('HSET', leases, me, cur)
end
redis.call('ZADD', exp, now + ttl, me)
redis.call('HSET', pools, me, pool)
redis.call('HSET', info, me, ARGV[9])
local free = cap - others - cur
local starving = 0
local function short(base, h) if h < base and free < base - h then starving = 1 end end
short(math.min(pool, fair), cur)
for i = 1, #pv, 2 do
  if pv[i] ~= me then short(math.min(tonumber(pv[i + 1]), fair), held[pv[i]] or 0) end
end
local qver = num(redis.call('HGET', meta, 'qver')) or 0
return {cur, n, others + cur, fair, math.max(grace, 0), starving, qver, applied}
"""
)

#: ARGV: prefix, member. Returns the leases given back.
LEAVE = (
    _PRELUDE
    + """
local me = ARGV[2]
local had = num(redis.call('HGET', p .. 'leases', me)) or 0
redis.call('HDEL', p .. 'leases', me)
redis.call('HDEL', p .. 'pools', me)
redis.call('HDEL', p .. 'info', me)
redis.call('HDEL', p .. 'seq', me)
redis.call('ZREM', p .. 'expiry', me)
return had
"""
)

# A quarantine entry as scripts return and publish it: kind, fp, summary, retry_in_ms,
# cooldown_ms, trips, timeouts, from.
_ENTRY = """
local function opened(fp, kind, from)
  local q = p .. 'q:' .. fp
  local h = redis.call('HMGET', q, 'summary', 'retry_at', 'cooldown', 'trips', 'timeouts')
  local e = {kind = kind, fp = fp, summary = h[1], retry_in = tonumber(h[2]) - now,
             cooldown = tonumber(h[3]), trips = tonumber(h[4]), timeouts = tonumber(h[5]),
             from = from}
  return e
end
local function publish(e)
  redis.call('HINCRBY', p .. 'meta', 'qver', 1)
  redis.call('PUBLISH', p .. 'events', cjson.encode(e))
end
local function keep(fp, ms)
  local q = p .. 'q:' .. fp
  local left = redis.call('PTTL', q)
  if left < ms then redis.call('PEXPIRE', q, ms) end
  redis.call('ZADD', p .. 'qidx', now + math.max(left, ms), fp)
end
local function create(fp, summary, cooldown, timeouts, linger)
  local q = p .. 'q:' .. fp
  redis.call('HSET', q, 'summary', summary, 'retry_at', now + cooldown, 'cooldown', cooldown,
             'trips', 1, 'timeouts', timeouts, 'opened_at', now, 'probe', '', 'probe_until', 0)
  redis.call('PEXPIRE', q, cooldown + linger)
  redis.call('ZADD', p .. 'qidx', now + cooldown + linger, fp)
  redis.call('DEL', p .. 's:' .. fp)
end
"""

#: ARGV: prefix, fp, summary, member, strike_id, threshold, window_ms, cooldown_ms, linger_ms
#: Returns the entry as JSON when this strike opened the breaker (or it was open), else "".
STRIKE = (
    _PRELUDE
    + _ENTRY
    + """
local fp, summary, me = ARGV[2], ARGV[3], ARGV[4]
local threshold, window = tonumber(ARGV[6]), tonumber(ARGV[7])
local cooldown, linger = tonumber(ARGV[8]), tonumber(ARGV[9])
if redis.call('EXISTS', p .. 'q:' .. fp) == 1 then
  return cjson.encode(opened(fp, 'open', me))
end
local s = p .. 's:' .. fp
redis.call('ZADD', s, now, ARGV[5])
redis.call('ZREMRANGEBYSCORE', s, '-inf', now - window)
redis.call('PEXPIRE', s, window)
if redis.call('ZCARD', s) >= threshold then
  create(fp, summary, cooldown, threshold, linger)
  local e = opened(fp, 'opened', me)
  publish(e)
  return cjson.encode(e)
end
return ''
"""
)

#: ARGV: prefix, fp, summary, member, kind ("opened" | "reopened"), cooldown_ms,
#: max_cooldown_ms, timeouts, linger_ms. A member's own breaker opened (or its probe failed):
#: create the entry if the fleet has none, never reset one it has. Returns the entry as JSON.
OPEN = (
    _PRELUDE
    + _ENTRY
    + """
local fp, summary, me, kind = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local cooldown, maxc = tonumber(ARGV[6]), tonumber(ARGV[7])
local timeouts, linger = tonumber(ARGV[8]), tonumber(ARGV[9])
local q = p .. 'q:' .. fp
if redis.call('EXISTS', q) == 0 then
  create(fp, summary, cooldown, timeouts, linger)
  local e = opened(fp, 'opened', me)
  publish(e)
  return cjson.encode(e)
end
if kind == 'reopened' then
  local h = redis.call('HMGET', q, 'retry_at', 'cooldown', 'probe', 'probe_until')
  local holder, pu = h[3], tonumber(h[4])
  -- Only the probe's verdict reopens: the member that holds the probe, or anyone once the
  -- cool-down is over and no probe is held.
  if now >= tonumber(h[1]) and (holder == me or holder == '' or pu <= now) then
    local c = math.min(tonumber(h[2]) * 2, maxc)
    redis.call('HSET', q, 'retry_at', now + c, 'cooldown', c, 'probe', '', 'probe_until', 0)
    redis.call('HINCRBY', q, 'trips', 1)
    redis.call('HINCRBY', q, 'timeouts', 1)
    keep(fp, c + linger)
    local e = opened(fp, 'reopened', me)
    publish(e)
    return cjson.encode(e)
  end
end
return cjson.encode(opened(fp, 'open', me))
"""
)

#: ARGV: prefix, fp, member, how ("probe" | "release"). Returns 1 if an entry was removed.
CLOSE = (
    _PRELUDE
    + _ENTRY
    + """
local fp, me, how = ARGV[2], ARGV[3], ARGV[4]
local q = p .. 'q:' .. fp
redis.call('DEL', p .. 's:' .. fp)
if redis.call('EXISTS', q) == 0 then
  if how == 'release' then publish({kind = 'closed', fp = fp, from = me}) end
  return 0
end
if how == 'probe' then
  local h = redis.call('HMGET', q, 'probe', 'probe_until')
  if h[1] ~= me and h[1] ~= '' and tonumber(h[2]) > now then return 0 end
end
redis.call('DEL', q)
redis.call('ZREM', p .. 'qidx', fp)
publish({kind = 'closed', fp = fp, from = me})
return 1
"""
)

#: ARGV: prefix, fp, member, lease_ms, linger_ms. The one probe per cool-down.
#: Returns {verdict, ms}: "granted" (lease ms), "open" (cool-down left), "held" (another
#: member's probe, lease left) or "absent".
CLAIM = (
    _PRELUDE
    + _ENTRY
    + """
local fp, me, lease, linger = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local q = p .. 'q:' .. fp
if redis.call('EXISTS', q) == 0 then return {'absent', 0} end
local h = redis.call('HMGET', q, 'retry_at', 'probe', 'probe_until')
local retry_at, holder, pu = tonumber(h[1]), h[2], tonumber(h[3])
if now < retry_at then return {'open', retry_at - now} end
if holder ~= '' and holder ~= me and pu > now then return {'held', pu - now} end
redis.call('HSET', q, 'probe', me, 'probe_until', now + lease)
keep(fp, lease + linger)
return {'granted', lease}
"""
)

#: ARGV: prefix. Every quarantine entry, for a (re)joining member. Returns {qver, json...}.
STATE = (
    _PRELUDE
    + _ENTRY
    + """
local out = {num(redis.call('HGET', p .. 'meta', 'qver')) or 0}
redis.call('ZREMRANGEBYSCORE', p .. 'qidx', '-inf', now)
for _, fp in ipairs(redis.call('ZRANGE', p .. 'qidx', 0, -1)) do
  if redis.call('EXISTS', p .. 'q:' .. fp) == 1 then
    table.insert(out, cjson.encode(opened(fp, 'open', '')))
  else
    redis.call('ZREM', p .. 'qidx', fp)
  end
end
return out
"""
)

#: ARGV: prefix. A read-only view for ``poolguard check --fleet``:
#: {now, cap, created, json(leases), json(pools), json(expiry_in), json(info), n_quarantined}.
READ = (
    _PRELUDE
    + """
local function hash(k)
  local v = redis.call('HGETALL', k)
  local o = {}
  for i = 1, #v, 2 do o[v[i]] = v[i + 1] end
  return o
end
local ex = redis.call('ZRANGE', p .. 'expiry', 0, -1, 'WITHSCORES')
local left = {}
for i = 1, #ex, 2 do left[ex[i]] = tonumber(ex[i + 1]) - now end
local meta = hash(p .. 'meta')
return {now, meta['cap'] or '', meta['created'] or '', cjson.encode(hash(p .. 'leases')),
        cjson.encode(hash(p .. 'pools')), cjson.encode(left), cjson.encode(hash(p .. 'info')),
        redis.call('ZCOUNT', p .. 'qidx', now, '+inf')}
"""
)
