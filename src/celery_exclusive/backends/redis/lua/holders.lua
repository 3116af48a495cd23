-- holders: read a key's holders together with the server clock, in one round trip.
--
-- KEYS[1]  lease hash (see acquire.lua)
--
-- Returns {now in ms, token1, value1, token2, value2, ...}; expired holders are included
-- (the caller filters them against `now`), "#" bookkeeping fields are not; nothing is modified.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local reply = {now}
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  if string.byte(entries[i], 1) ~= 35 then
    reply[#reply + 1] = entries[i]
    reply[#reply + 1] = entries[i + 1]
  end
end
return reply
