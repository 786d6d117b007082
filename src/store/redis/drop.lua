-- Drops the live entries of KEYS (cacheward's own only): each becomes a tombstone one version
-- below its own (model::entry::version_below), so that no older write can land, while a fill that
-- reads the row after the fence may. ARGV[1]: TTL. Returns how many it dropped.
local dropped = 0
for _, key in ipairs(KEYS) do
  local current = redis.pcall('GET', key)
  if type(current) == 'string' then
    local v, tomb = read_entry(current)
    if v ~= nil and not tomb then
      redis.call('SET', key, tombstone(v - 1), 'EX', ARGV[1])
      dropped = dropped + 1
    end
  end
end
return dropped
