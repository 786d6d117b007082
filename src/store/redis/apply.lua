-- The one script every cache write goes through (store::redis::scripts::apply).
-- KEYS[1]: the fence (users', guarding every table's entries). KEYS[2..1+k]: the own fences of the
-- k declared tables among the writes (raised by their TRUNCATEs). KEYS[1+k+i]: the key of write i.
-- ARGV[1]: k. Write i takes ARGV[5i-3]: the index (1..k) of its table's own fence (0: users'
-- entries have none), ARGV[5i-2]: its version, ARGV[5i-1]: its read_at ('' for a tombstone),
-- ARGV[5i]: what to store (the live JSON, or the tombstone's JSON as model::entry::tombstone_json
-- built it), ARGV[5i+1]: its TTL in seconds (its table's).
-- A live write applies when newer than what is stored and read at or after the fence and its
-- table's own fence; a tombstone when at least as new (it removes the row of that very version).
-- A value that is not cacheward's (another type, or a string that is neither a live entry nor a
-- tombstone) is left alone. Returns per key: 1 applied, 0 refused (Redis holds a newer version,
-- or a tombstone of this one), 2 nothing to do (this very version is live there already), 3
-- fenced (read before a fence, or no fence; an older live entry there is dropped all the same), 4
-- foreign (the key holds a value that is not cacheward's).
local function number_at(key)
  local value = redis.pcall('GET', key)
  if type(value) == 'string' then return tonumber(value) end
  return nil
end
local fence = number_at(KEYS[1])
local k = tonumber(ARGV[1])
local own_fences = {}
for j = 1, k do own_fences[j] = number_at(KEYS[1 + j]) end
local out = {}
for n = 1, #KEYS - 1 - k do
  local key = KEYS[1 + k + n]
  local own = tonumber(ARGV[5 * n - 3])
  local incoming = tonumber(ARGV[5 * n - 2])
  local live = ARGV[5 * n - 1] ~= ''
  local value = ARGV[5 * n]
  local ttl = ARGV[5 * n + 1]
  local own_fence = nil
  if own > 0 then own_fence = own_fences[own] end
  local read_at = tonumber(ARGV[5 * n - 1])
  if live and (fence == nil or read_at < fence or (own_fence ~= nil and read_at < own_fence)) then
    out[n] = 3
    -- Refused, yet a newer version than a live entry there: that entry is stale for certain.
    -- It goes (a tombstone one below this version), so that a fence that is wrong (set by
    -- someone else, or deleted) can keep changes out of the cache but never keep stale ones in.
    local current = redis.pcall('GET', key)
    if type(current) == 'string' then
      local v, tomb = read_entry(current)
      if v ~= nil and not tomb and v < incoming then
        redis.call('SET', key, tombstone(incoming - 1), 'EX', ttl)
      end
    end
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
