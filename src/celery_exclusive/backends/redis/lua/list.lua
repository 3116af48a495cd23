-- list: one step of a listing on a server that is not a Cluster: a SCAN from a cursor, then
-- the holders of every lease hash it found, in one round trip and one reply.
--
-- ARGV[1]  SCAN cursor ("0" to start)
-- ARGV[2]  MATCH pattern of lease hashes
-- ARGV[3]  SCAN COUNT (how much of the keyspace this step looks at)
--
-- Returns JSON text (one string, parsed at once by the caller, not element by element):
--   [next cursor, now in ms, name1, [field, value, ...], name2, [...], ...]
-- with every field of the hashes that have a holder (a released key keeps only its "#" fields
-- and is left out); the caller drops the "#" fields and the expired holders (a third of this
-- script's time when done here). Nothing is modified. The names are not declared in KEYS,
-- which only a Cluster would need: a Cluster lists through `holders` instead.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local found = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3], 'TYPE', 'hash')
local out = {found[1], string.format('%d', now)}
for _, name in ipairs(found[2]) do
  local entries = redis.call('HGETALL', name)
  for i = 1, #entries, 2 do
    if string.byte(entries[i], 1) ~= 35 then  -- a holder: not only "#" bookkeeping fields
      out[#out + 1] = name
      out[#out + 1] = entries
      break
    end
  end
end
return cjson.encode(out)
