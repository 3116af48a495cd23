-- record_lost: count one lost lease of a task, in one small hash per prefix.
--
-- KEYS[1]  the counts hash: field "n:<task>" = how many leases of <task> were lost,
--          field "t:<task>" = ms (server clock) of the last loss
-- ARGV[1]  task name
-- ARGV[2]  most task names kept (a new name beyond it is not counted)
-- ARGV[3]  ms the hash lives after the last loss
--
-- Returns 1 when counted, 0 when the hash is full and the task is new to it.
local field = 'n:' .. ARGV[1]
if redis.call('HEXISTS', KEYS[1], field) == 0
   and redis.call('HLEN', KEYS[1]) >= 2 * tonumber(ARGV[2]) then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HINCRBY', KEYS[1], field, 1)
redis.call('HSET', KEYS[1], 't:' .. ARGV[1], string.format('%d', now))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
