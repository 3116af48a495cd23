-- acquire: grant a lease if fewer than `limit` live holders hold the key.
--
-- KEYS[1]  lease hash: field = owner token, value = "exp|fence|acquired|renewed|metajson"
--          (times in ms of the server clock); field "#f" = the key's fence counter;
--          field "#w" = ms until which some caller waits for a release (see release.lua);
--          field "#l" = the limit the live holders were granted under
-- ARGV[1]  owner token
-- ARGV[2]  ttl in ms
-- ARGV[3]  limit (max live holders)
-- ARGV[4]  holder metadata, compact JSON
-- ARGV[5]  retention in ms: how long the hash (and so the fence counter) outlives its last
--          grant; always longer than any ttl
-- ARGV[6]  ms the caller will wait for a release if refused (0: it will not wait)
--
-- Returns {1, fence, reentered(0|1)} on a grant;
--         {0, ms until the earliest live holder expires, now in ms, token1, value1, ...}
--         on a conflict;
--         {-1, the key's limit} when other live holders hold the key under another limit
--         (a key's limit is set by its first grant and kept while anyone holds it).
-- Expired holders are removed on the way. A grant's fence is the counter plus one, or the
-- server clock in microseconds if that is higher: fences keep rising after the hash expired,
-- and after a failover to a replica that missed the last grants (its counter is behind, its
-- clock is not), so a fence is never handed out twice.
-- Numbers are written with string.format('%d'): Lua's default number-to-string keeps only
-- 14 significant digits, which would corrupt a 16-digit fence.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local entries = redis.call('HGETALL', KEYS[1])
local limit = tonumber(ARGV[3])
local last = 0
local keylimit = nil
local live = 0
local soonest = nil
local mine = nil
local holders = {}
for i = 1, #entries, 2 do
  local tok, val = entries[i], entries[i + 1]
  if tok == '#l' then
    keylimit = tonumber(val)
  elseif tok == '#f' then
    last = tonumber(val)
  elseif string.byte(tok, 1) ~= 35 then  -- not another "#" bookkeeping field
    local exp = tonumber(string.match(val, '^(%d+)|'))
    if exp <= now then
      redis.call('HDEL', KEYS[1], tok)
    elseif tok == ARGV[1] then
      mine = val
    else
      live = live + 1
      if soonest == nil or exp < soonest then soonest = exp end
      holders[#holders + 1] = tok
      holders[#holders + 1] = val
    end
  end
end
if live > 0 and keylimit and keylimit ~= limit then
  return {-1, keylimit}
end
if mine then
  local fence, acquired, meta = string.match(mine, '^%d+|(%d+)|(%d+)|%d+|(.*)$')
  redis.call('HSET', KEYS[1], ARGV[1],
    string.format('%d|%s|%s|%d|', now + ttl, fence, acquired, now) .. meta)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {1, tonumber(fence), 1}
end
if live >= limit then
  -- Keep the latest time anyone waits until: a short waiter must not hide a long one.
  local waits = tonumber(ARGV[6])
  if waits > 0 then
    local until_ms = now + waits
    local before = tonumber(redis.call('HGET', KEYS[1], '#w') or '0')
    if until_ms > before then
      redis.call('HSET', KEYS[1], '#w', string.format('%d', until_ms))
    end
  end
  local reply = {0, soonest - now, now}
  for i = 1, #holders do reply[#reply + 1] = holders[i] end
  return reply
end
local fence = math.max(last + 1, tonumber(t[1]) * 1000000 + tonumber(t[2]))
redis.call('HSET', KEYS[1], '#f', string.format('%d', fence), '#l', ARGV[3], ARGV[1],
  string.format('%d|%d|%d|%d|', now + ttl, fence, now, now) .. ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {1, fence, 0}
