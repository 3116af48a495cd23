-- renew: extend many leases in one script.
--
-- KEYS[1..N]     lease hashes (see acquire.lua)
-- ARGV[1..N]     the owner token for each key
-- ARGV[N+1]      the new ttl in ms (the same for every lease of one call)
-- ARGV[N+2]      retention in ms for the hashes (see acquire.lua)
--
-- Returns a string of N characters, one per key: "1" renewed, "0" lost (gone, expired, or
-- held by another token). One string, not a list of N integers: it is read at once.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local ttl = tonumber(ARGV[n + 1])
local out = {}
for i = 1, n do
  local val = redis.call('HGET', KEYS[i], ARGV[i])
  out[i] = '0'
  if val then
    local exp, fence, acquired, meta = string.match(val, '^(%d+)|(%d+)|(%d+)|%d+|(.*)$')
    if tonumber(exp) > now then
      redis.call('HSET', KEYS[i], ARGV[i],
        string.format('%d|%s|%s|%d|', now + ttl, fence, acquired, now) .. meta)
      redis.call('PEXPIRE', KEYS[i], ARGV[n + 2])
      out[i] = '1'
    end
  end
end
return table.concat(out)
