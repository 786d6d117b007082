-- The one script every cache write goes through (store::redis::scripts::apply).
-- KEYS[1]: the fence. KEYS[i+1]: the key of write i. Write i takes ARGV[4i-3]: its version,
-- ARGV[4i-2]: its read_at ('' for a tombstone), ARGV[4i-1]: what to store (the live JSON, or the
-- tombstone's JSON as model::entry::tombstone_json built it), ARGV[4i]: its TTL in seconds (its
-- table's).
-- A live write applies when newer than what is stored and read at or after the fence; a tombstone
-- when at least as new (it removes the row of that very version). A value that is not
-- cacheward's (another type, or a string that is neither a live entry nor a tombstone) is left
-- alone. Returns per key: 1 applied, 0 refused (Redis holds a newer version, or a tombstone of
-- this one), 2 nothing to do (this very version is live there already), 3 fenced (read before
-- the fence, or no fence), 4 foreign (the key holds a value that is not cacheward's).
local fence = redis.pcall('GET', KEYS[1])
if type(fence) == 'string' then fence = tonumber(fence) else fence = nil end
local out = {}
for i = 2, #KEYS do
  local key = KEYS[i]
  local n = i - 1
  local incoming = tonumber(ARGV[4 * n - 3])
  local live = ARGV[4 * n - 2] ~= ''
  local value = ARGV[4 * n - 1]
  local ttl = ARGV[4 * n]
  if live and (fence == nil or tonumber(ARGV[4 * n - 2]) < fence) then
    out[n] = 3
  else
    local current = redis.pcall('GET', key)
    local apply = true
    if type(current) == 'table' then
      out[n] = 4
      apply = false
    elseif type(current) == 'string' then
      local v, tomb = read_entry(current)
      if v == nil then
        out[n] = 4
        apply = false
      elseif live then
        apply = incoming > v
        if incoming == v and not tomb then out[n] = 2 end
      else
        apply = incoming >= v
      end
    end
    if apply then
      redis.call('SET', key, value, 'EX', ttl)
      out[n] = 1
    elseif out[n] == nil then
      out[n] = 0
    end
  end
end
return out
