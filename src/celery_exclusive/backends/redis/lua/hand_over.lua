-- hand_over: move one holder's live grant to another owner token, keeping its fence.
--
-- KEYS[1]  lease hash (see acquire.lua)
-- ARGV[1]  current owner token
-- ARGV[2]  new owner token
-- ARGV[3]  ttl in ms for the new owner
-- ARGV[4]  optional: the new owner's metadata, compact JSON (absent: keep the old one)
--
-- Returns 1 if the current token held a live lease (now held by the new token under the same
-- fence and grant time), 0 otherwise. Nobody else can get the key in between.
local val = redis.call('HGET', KEYS[1], ARGV[1])
if not val then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local exp, fence, acquired, meta = string.match(val, '^(%d+)|(%d+)|(%d+)|%d+|(.*)$')
redis.call('HDEL', KEYS[1], ARGV[1])
if tonumber(exp) <= now then return 0 end
if ARGV[4] then meta = ARGV[4] end
redis.call('HSET', KEYS[1], ARGV[2],
  string.format('%d|%s|%s|%d|', now + tonumber(ARGV[3]), fence, acquired, now) .. meta)
return 1
