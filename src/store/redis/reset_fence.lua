-- Replaces a fence that cannot be right with ARGV[1], a horizon drawn after it was seen: a value
-- that is not a number (or a key of another type), or a number above ARGV[1] (above anything the
-- version sequence had drawn: no fence of cacheward's is). A missing fence is left for the
-- monitor's restore. Returns 1 when it replaced the fence, 0 otherwise.
local f = redis.pcall('GET', KEYS[1])
if f == false then return 0 end
local n = nil
if type(f) == 'string' then n = tonumber(f) end
if n == nil or n > tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0
