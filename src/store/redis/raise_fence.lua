-- Raises the fence (KEYS[1]) to ARGV[1] if it is lower; returns the fence, or -1 when it is
-- missing (Redis lost its data: only a horizon drawn after that was seen may set it).
local f = redis.pcall('GET', KEYS[1])
if type(f) ~= 'string' or tonumber(f) == nil then return -1 end
if tonumber(ARGV[1]) > tonumber(f) then
  redis.call('SET', KEYS[1], ARGV[1])
  return tonumber(ARGV[1])
end
return tonumber(f)
