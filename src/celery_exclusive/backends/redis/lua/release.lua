-- release: compare-and-delete one owner's hold; wake one waiter if any waits.
--
-- KEYS[1]  lease hash (see acquire.lua)
-- KEYS[2]  waiter signal list (waiters BLPOP it)
-- ARGV[1]  owner token
-- ARGV[2]  signal list ttl in ms (a signal nobody took is dropped after this)
--
-- Returns 1 if the token held a live lease, 0 otherwise (never released, already released,
-- expired, or taken by force). Another token's hold is never touched. The signal is pushed only
-- while a refused caller said it would wait ("#w" in the future), so releases nobody waits for
-- leave no list behind.
local got = redis.call('HMGET', KEYS[1], ARGV[1], '#w')
local val = got[1]
if not val then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if got[2] and tonumber(got[2]) > now then
  redis.call('RPUSH', KEYS[2], '1')
  redis.call('LTRIM', KEYS[2], -64, -1)
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
-- The last holder gone: keep only the fence counter (and "#w" while someone waits) in a new
-- hash, with the old one's expiry. A hash that once held a long value keeps Redis's larger
-- encoding for good (about 400 bytes); a new one with these fields takes about 100.
local left = redis.call('HLEN', KEYS[1])
local marks = redis.call('HMGET', KEYS[1], '#f', '#l', '#w')
local kept = 0
for i = 1, 3 do if marks[i] then kept = kept + 1 end end
if left == kept and marks[1] then
  local pttl = redis.call('PTTL', KEYS[1])
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], '#f', marks[1])
  if marks[3] and tonumber(marks[3]) > now then redis.call('HSET', KEYS[1], '#w', marks[3]) end
  if pttl > 0 then redis.call('PEXPIRE', KEYS[1], pttl) end
end
if tonumber(string.match(val, '^(%d+)|')) <= now then return 0 end
return 1
