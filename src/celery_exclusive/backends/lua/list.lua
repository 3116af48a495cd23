-- list: one step of a listing on a server that is not a Cluster: a SCAN from a cursor, then
-- the live holders of every lease hash it found, in one round trip and one reply.
--
-- ARGV[1]  SCAN cursor ("0" to start)
-- ARGV[2]  MATCH pattern of lease hashes
-- ARGV[3]  SCAN COUNT (how much of the keyspace this step looks at)
--
-- Returns JSON text (one string, parsed at once by the caller, not element by element):
--   [next cursor, now in ms, name1, [token, value, ...], name2, [...], ...]
-- with only the hashes that have a live holder, and only their live holders ("#" bookkeeping
-- fields and expired holders left out); nothing is modified. The names are not declared in
-- KEYS, which only a Cluster would need: a Cluster lists through `holders` instead.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local found = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3], 'TYPE', 'hash')
local out = {found[1], string.format('%d', now)}
for _, name in ipairs(found[2]) do
  local entries = redis.call('HGETALL', name)
  local live = {}
  for i = 1, #entries, 2 do
    local tok, val = entries[i], entries[i + 1]
    if string.byte(tok, 1) ~= 35 and tonumber(string.match(val, '^(%d+)|')) > now then
      live[#live + 1] = tok
      live[#live + 1] = val
    end
  end
  if #live > 0 then
    out[#out + 1] = name
    out[#out + 1] = live
  end
end
return cjson.encode(out)
