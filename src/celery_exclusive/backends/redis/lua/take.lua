-- take: release one holder's lease and return its metadata, in one step (a hand-over).
--
-- KEYS[1]  lease hash (see acquire.lua)
-- KEYS[2]  waiter signal list
-- ARGV[1]  owner token
-- ARGV[2]  signal list ttl in ms
--
-- Returns the holder's metadata (JSON text) if the token held a live lease, else nil.
local got = redis.call('HMGET', KEYS[1], ARGV[1], '#w')
local val = got[1]
if not val then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if got[2] and tonumber(got[2]) > now then
  redis.call('RPUSH', KEYS[2], '1')
  redis.call('LTRIM', KEYS[2], -64, -1)
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
local exp, meta = string.match(val, '^(%d+)|%d+|%d+|%d+|(.*)$')
if tonumber(exp) <= now then return false end
return meta
