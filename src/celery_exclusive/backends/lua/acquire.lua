-- acquire: grant a lease if fewer than `limit` live holders hold the key.
--
-- KEYS[1]  lease hash: field = owner token, value = "exp|fence|acquired|renewed|metajson"
--          (times in ms of the server clock)
-- KEYS[2]  fence counter (string integer)
-- ARGV[1]  owner token
-- ARGV[2]  ttl in ms
-- ARGV[3]  limit (max live holders)
-- ARGV[4]  holder metadata, compact JSON
-- ARGV[5]  fence retention in ms (how long the counter outlives its last grant)
--
-- Returns {1, fence, reentered(0|1)} on a grant;
--         {0, ms until the earliest live holder expires, now in ms, token1, value1, ...}
--         on a conflict.
-- Expired holders are removed on the way. The counter is seeded from the server clock in
-- microseconds when it is (re)created, so fences keep rising even after it expired.
-- Numbers are written with string.format('%d'): Lua's default number-to-string keeps only
-- 14 significant digits, which would corrupt a 16-digit fence.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local entries = redis.call('HGETALL', KEYS[1])
local live = 0
local soonest = nil
local mine = nil
local holders = {}
for i = 1, #entries, 2 do
  local tok, val = entries[i], entries[i + 1]
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
local function extend_key(exp)
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl < exp - now then redis.call('PEXPIRE', KEYS[1], exp - now) end
end
if mine then
  local fence, acquired, meta = string.match(mine, '^%d+|(%d+)|(%d+)|%d+|(.*)$')
  redis.call('HSET', KEYS[1], ARGV[1],
    string.format('%d|%s|%s|%d|', now + ttl, fence, acquired, now) .. meta)
  extend_key(now + ttl)
  return {1, tonumber(fence), 1}
end
if live >= tonumber(ARGV[3]) then
  local reply = {0, soonest - now, now}
  for i = 1, #holders do reply[#reply + 1] = holders[i] end
  return reply
end
redis.call('SET', KEYS[2], t[1] .. string.format('%06d', tonumber(t[2])), 'NX')
local fence = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('HSET', KEYS[1], ARGV[1],
  string.format('%d|%d|%d|%d|', now + ttl, fence, now, now) .. ARGV[4])
extend_key(now + ttl)
return {1, fence, 0}
