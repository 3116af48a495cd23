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
if tonumber(string.match(val, '^(%d+)|')) <= now then return 0 end
return 1
