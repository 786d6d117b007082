-- Raises a declared table's own fence (KEYS[1]) to ARGV[1]: sets it when it is lower, missing (no
-- TRUNCATE of the table since Redis last lost its data: the shared fence guards that) or not a
-- number. Returns the fence.
local f = redis.pcall('GET', KEYS[1])
if type(f) == 'string' then f = tonumber(f) else f = nil end
if f == nil or tonumber(ARGV[1]) > f then
  redis.call('SET', KEYS[1], ARGV[1])
  return tonumber(ARGV[1])
end
return f
