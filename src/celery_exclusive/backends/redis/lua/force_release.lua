-- force_release: an operator removes one holder (or all) of a key, then wakes waiters.
--
-- KEYS[1]  lease hash (see acquire.lua)
-- KEYS[2]  waiter signal list
-- ARGV[1]  owner token, or "" for every holder
-- ARGV[2]  signal list ttl in ms
--
-- Returns how many live holds were removed (expired ones are dropped too, uncounted). The
-- "#" bookkeeping fields (fence counter, waiter mark, limit) are never removed.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local removed = 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local tok = entries[i]
  if string.byte(tok, 1) ~= 35 and (ARGV[1] == '' or tok == ARGV[1]) then
    redis.call('HDEL', KEYS[1], tok)
    if tonumber(string.match(entries[i + 1], '^(%d+)|')) > now then removed = removed + 1 end
  end
end
for i = 1, removed do redis.call('RPUSH', KEYS[2], '1') end
if removed > 0 then
  redis.call('LTRIM', KEYS[2], -64, -1)
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return removed
