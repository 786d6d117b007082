-- Sets the fence (KEYS[1]) to ARGV[1] if it is missing; returns the fence. An error if the key
-- holds a value that is not a number (not cacheward's: it is left alone).
local f = redis.pcall('GET', KEYS[1])
if type(f) == 'table' then return redis.error_reply('fence key holds a value of another type') end
if f == false then
  redis.call('SET', KEYS[1], ARGV[1])
  return tonumber(ARGV[1])
end
if tonumber(f) == nil then return redis.error_reply('fence key holds a value that is not a number') end
return tonumber(f)
