-- force_release: an operator removes one holder (or all) of a key, then wakes waiters.
--
-- KEYS[1]  lease hash (see acquire.lua)
-- KEYS[2]  waiter signal list
-- ARGV[1]  owner token, or "" for every holder
-- ARGV[2]  signal list ttl in ms
--
-- Returns how many holds were removed. The fence counter is kept.
local removed = 0
if ARGV[1] == '' then
  local fields = redis.call('HKEYS', KEYS[1])
  for i = 1, #fields do
    if string.byte(fields[i], 1) ~= 35 then
      removed = removed + redis.call('HDEL', KEYS[1], fields[i])
    end
  end
else
  removed = redis.call('HDEL', KEYS[1], ARGV[1])
end
for i = 1, removed do redis.call('RPUSH', KEYS[2], '1') end
if removed > 0 then
  redis.call('LTRIM', KEYS[2], -64, -1)
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return removed
