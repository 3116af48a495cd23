-- update_meta: replace one holder's metadata, if that holder still holds a live lease.
--
-- KEYS[1]  lease hash (see acquire.lua)
-- ARGV[1]  owner token
-- ARGV[2]  new metadata, compact JSON
--
-- Returns 1 if updated, 0 if the token holds no live lease (gone, expired, taken).
local val = redis.call('HGET', KEYS[1], ARGV[1])
if not val then return 0 end
local exp, rest = string.match(val, '^(%d+)|(%d+|%d+|%d+)|')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(exp) <= now then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], exp .. '|' .. rest .. '|' .. ARGV[2])
return 1
